"""
The shapes experiment: accuracy, FLOPs, time and memory of every method (none, VTW, and per shipped predictor the
learned DyRate against FastV and a hand-set ramp matched to its FLOPs) on held-out questions, and the figures.

    python -m shapes.data --out data/shapes
    python -m shapes.experiment --out out/shapes      # the README's table: out/shapes/experiment.json, figures
"""
import argparse
import json
import os

import numpy as np
import torch

import dyrate
import generate
import model
import processing
import viz
from shapes.data import CAPTION_PROMPT, task


def evaluate_answers(llava, tok, records, batch=32, **kw):
    """Exact-match accuracy of the greedy answers (generate(), batched) on records {image, prompt, answer}."""
    right, out = 0, []
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        rows = generate.generate(llava, tok, [r["image"] for r in chunk], [r["prompt"] for r in chunk],
                                 max_new_tokens=48, stats=False, **kw).rows
        for r, row in zip(chunk, rows):
            right += row["text"].strip() == r["answer"]
            out.append(row)
    return right / len(records), out


def accuracy_line(records, rows):
    """Exact match per kind of question, on one line."""
    kinds = {}
    for r, row in zip(records, rows):
        kinds.setdefault(task(r["prompt"]), []).append(row["text"].strip() == r["answer"])
    return ", ".join(f"{k} {np.mean(v):.3f}" for k, v in sorted(kinds.items()))


def experiment(model_dir, data, predictors, out, n_timed=16, log=print):
    """The README table and figures: none, VTW, and per predictor (budget) the learned DyRate against FastV and a
    hand-set ramp matched to its achieved FLOPs. Accuracy = exact match of the free-running greedy answers."""
    llava = model.Llava.from_pretrained(model_dir)
    tok, cfg, N = processing.Tokenizer(model_dir, llava.config), llava.config, llava.config.n_image_tokens
    folder = os.path.dirname(os.path.abspath(data))
    with open(data) as f:
        records = [json.loads(line) for line in f]
    for r in records:
        r["image"] = os.path.join(folder, r["image"])

    def run(name, **kw):
        acc, rows = evaluate_answers(llava, tok, records, **kw)
        timed = []
        for r in records[:n_timed]:  # batch 1, for milliseconds
            g = generate.generate(llava, tok, [r["image"]], [r["prompt"]], max_new_tokens=48, stats=False, **kw)
            timed.append((g.prefill_ms, g.decode_ms_per_token))
        result = dict(accuracy=acc, flops_ratio=dyrate.flops_ratio(rows),
                      prefill_ms=float(np.median([t[0] for t in timed])),
                      decode_ms=float(np.median([t[1] for t in timed])),
                      kv_bytes=float(np.mean([r["kv_cache_bytes"] for r in rows])),
                      kept_prefill=float(np.mean([r["kept_visual"][0] for r in rows])),
                      kept_last=float(np.mean([r["kept_visual"][-1] for r in rows])))
        log(f"{name:34}{result['accuracy']:9.3f}{result['flops_ratio']:8.3f}{result['prefill_ms']:9.1f}"
            f"{result['decode_ms']:9.2f}{result['kv_bytes'] / 1024:9.1f}{result['kept_prefill']:8.1f}"
            f"{result['kept_last']:8.1f}")
        return result, rows

    log(f"{len(records)} held-out questions ({data}); ms: median of {n_timed} at batch 1 on "
        f"{torch.get_num_threads()} CPU threads")
    log(f"{'method':34}{'accuracy':>9}{'FLOPs':>8}{'prefill':>9}{'ms/tok':>9}{'KV KiB':>9}{'kept@0':>8}{'kept@end':>8}")
    table = {"none": run("none")[0], "vtw": run("vtw", method="vtw")[0]}
    for path in predictors:
        predictor = dyrate.RatePredictor.load(path, cfg)
        learned, rows = run(f"dyrate learned ({os.path.basename(path)})", method="dyrate", predictor=predictor)
        lengths = [(row["prompt_tokens"], len(row["token_ids"])) for row in rows]
        keep = dyrate.matched_keep(cfg, lengths, learned["flops_ratio"], predictor.k)
        start = dyrate.matched_keep(cfg, lengths, learned["flops_ratio"], predictor.k, ramp=True)
        fastv = run(f"fastv R={1 - keep / N:.3f}", method="fastv", ratio=1 - keep / N)[0]
        ramp = dyrate.ramp_rates(1 - start / N, 24)  # a hand-set schedule over a typical answer length
        hand = run(f"dyrate ramp {1 - start / N:.2f}->1", method="dyrate", schedule=ramp)[0]
        table[os.path.basename(path)] = dict(learned=learned, fastv=fastv, ramp=hand)
    os.makedirs(out, exist_ok=True)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1)
    processing.atomic_write(os.path.join(out, "experiment.json"), write)
    if predictors:  # the figures: type shares over the steps and the kept patches, for a few captions
        predictor = dyrate.RatePredictor.load(predictors[-1], cfg)
        captions = [r for r in records if r["prompt"] == CAPTION_PROMPT][:3]
        for i, r in enumerate(captions):
            row = generate.generate(llava, tok, [r["image"]], [r["prompt"]], max_new_tokens=48, method="dyrate",
                                    predictor=predictor).rows[0]
            for p in viz.save(os.path.join(out, f"example{i}"), r["image"], row, tok, cfg):
                log(f"wrote {p}")
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description="The shapes experiment: every method on held-out questions, and figures.")
    p.add_argument("--model", default="models/shapes", help="checkpoint folder")
    p.add_argument("--data", default="data/shapes/test.jsonl", help="held-out JSONL (python -m shapes.data)")
    p.add_argument("--predictors", nargs="*", default=["models/shapes/predictor-0.55", "models/shapes/predictor-0.33"],
                   help="predictor files, one per budget")
    p.add_argument("--out", default="out/shapes", help="folder for experiment.json and the figures (the README's "
                   "are in assets/: pass --out assets to rewrite them)")
    args = p.parse_args(argv)
    experiment(args.model, args.data, args.predictors, args.out)


if __name__ == "__main__":
    main()
