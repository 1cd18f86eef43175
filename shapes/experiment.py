"""
The shapes experiment: does DyRate's per-step rate pay off? On held-out captions and detailed descriptions, none,
VTW, and per cost (FLOPs with a KV cache, mean KV-cache size, no-cache FLOPs) and budget the learned DyRate against
FastV and a hand-set ramp matched to its cost; the seed paper's Figure 2 measured; decode speed at batch 32; figures.

    python -m shapes.data --out data/shapes
    python -m shapes.experiment --out out/shapes      # the README's tables: out/shapes/experiment.json, figures
"""
import argparse
import json
import os
import statistics
import time

import numpy as np

import dyrate
import generate
import model
import processing
from shapes.data import CAPTION_PROMPT, DETAIL_PROMPT, caption, detail, task
from tools import costs, eval, fast, viz

MAX_NEW_TOKENS = 64  # the longest answer, a detailed description, is at most 57 tokens with </s>
PREDICTORS = ["models/shapes/predictor-0.55", "models/shapes/predictor-0.33", "models/shapes/predictor-kv-0.36",
              "models/shapes/predictor-kv-0.3"]
COST_NAMES = {"flops": "FLOPs (KV cache)", "kv": "mean KV cache", "nocache": "no-cache FLOPs"}


def evaluate_answers(llava, tok, records, batch=32, **kw):
    """Exact-match accuracy of the greedy answers (generate(), batched) on records {image, prompt, answer}."""
    right, out = 0, []
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        rows = generate.generate(llava, tok, [r["image"] for r in chunk], [r["prompt"] for r in chunk],
                                 max_new_tokens=MAX_NEW_TOKENS, stats=False, **kw).rows
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


def task_records(data):
    """Every held-out scene of a shapes JSONL file, asked for its caption and for its detailed description."""
    folder = os.path.dirname(os.path.abspath(data))
    with open(data) as f:
        scenes = [(os.path.join(folder, r["image"]), r["scene"]) for r in map(json.loads, f)]
    return {"detail": [dict(image=im, prompt=DETAIL_PROMPT, answer=detail(s), caption=caption(s)) for im, s in scenes],
            "caption": [dict(image=im, prompt=CAPTION_PROMPT, answer=caption(s)) for im, s in scenes]}


def figure2(llava, tok, records, out, log):
    """The seed paper's Figure 2: layer K-1's attention of the current token on the four token types, averaged over
    heads and over the held-out detailed descriptions, at each answer position; and the image share in the first and
    the last third of each answer."""
    rows = []
    for i in range(0, len(records), 32):
        chunk = records[i:i + 32]
        rows += generate.generate(llava, tok, [r["image"] for r in chunk], [r["prompt"] for r in chunk],
                                  max_new_tokens=MAX_NEW_TOKENS).rows
    result = eval.figure2([r["type_shares"] for r in rows])
    viz.shares_plot(result["by_position"]).save(os.path.join(out, "figure2.png"))
    first, last = result["first_third"], result["last_third"]
    log(f"Figure 2 ({len(rows)} held-out detailed descriptions, layer K-1, none): image share {first:.3f} in the first "
        f"third of the answer, {last:.3f} in the last third ({last / first:.2f}x); wrote {out}/figure2.png")
    return result


def run(llava, tok, records, name, log, **kw):
    """One method on one task's records: accuracy (and, for detailed descriptions, of the first sentence), every cost
    ratio, the kept counts and how often they fall during an answer."""
    acc, rows = evaluate_answers(llava, tok, records, **kw)
    costs.add(rows, llava.config)
    result = dict(accuracy=acc, **{f"{b}_ratio": costs.cost_ratio(rows, costs.COSTS[b]) for b in COST_NAMES},
                  kept_first=float(np.mean([r["kept_visual"][0] for r in rows])),
                  kept_last=float(np.mean([r["kept_visual"][-1] for r in rows])),
                  falls=float(np.mean([r["kept_visual"][-1] < r["kept_visual"][0] for r in rows])),
                  mean_new_tokens=float(np.mean([len(r["token_ids"]) for r in rows])))
    if "caption" in records[0]:
        result["first_sentence"] = float(np.mean([row["text"].strip().startswith(r["caption"])
                                                  for r, row in zip(records, rows)]))
    log(f"{name:40}{result['accuracy']:9.3f}{result.get('first_sentence', float('nan')):9.3f}"
        + "".join(f"{result[f'{b}_ratio']:9.3f}" for b in COST_NAMES)
        + f"{result['kept_first']:8.1f}{result['kept_last']:8.1f}{result['falls']:7.2f}")
    return result, rows


def comparison(llava, tok, records, predictors, log):
    """none, VTW, and per cost and predictor ({path: RatePredictor}): the learned rate, FastV and a hand-set ramp
    matched on that cost."""
    cfg, N = llava.config, llava.config.n_image_tokens
    table = {"none": run(llava, tok, records, "none", log)[0],
             "vtw": run(llava, tok, records, "vtw", log, rule="vtw")[0]}
    learned = {path: (predictor, *run(llava, tok, records, f"dyrate learned ({os.path.basename(path)})", log,
                                      rule=dyrate.Learned(predictor)))
               for path, predictor in predictors.items()}
    for cost in COST_NAMES:
        for path, (predictor, result, rows) in learned.items():
            budget = predictor.meta.get("budget", "flops")
            if budget != cost and not (cost == "nocache" and budget == "kv"):
                continue  # no-cache FLOPs, like the mean KV, reward late drops: the KV predictors stand in there
            lengths = [(row["prompt_tokens"], len(row["token_ids"])) for row in rows]
            target = result[f"{cost}_ratio"]
            keep = costs.matched_keep(cfg, lengths, target, predictor.k, cost=costs.COSTS[cost])
            start = costs.matched_keep(cfg, lengths, target, predictor.k, ramp=True, cost=costs.COSTS[cost])
            steps = int(statistics.median(n for _, n in lengths))  # the ramp spans a typical answer
            fastv = run(llava, tok, records, f"  fastv R={1 - keep / N:.3f}", log, rule=dyrate.FastV(1 - keep / N))
            ramp = run(llava, tok, records, f"  ramp {1 - start / N:.2f}->1", log,
                       rule=dyrate.Ramp(1 - start / N, steps))
            table[f"{cost}: {os.path.basename(path)}"] = dict(cost=cost, target=target, learned=result,
                                                               fastv=fastv[0], ramp=ramp[0])
    return table


def serving(llava, tok, records, predictor, log, batch=32, rounds=3):
    """Decode ms/token at batch 32 on detailed descriptions: none, FastV matched to the learned rate's mean KV cache,
    and the learned rate, in interleaved rounds (medians)."""
    chunk = records[:batch]
    images, prompts = [r["image"] for r in chunk], [r["prompt"] for r in chunk]
    cfg, N = llava.config, llava.config.n_image_tokens
    rows = generate.generate(llava, tok, images, prompts, MAX_NEW_TOKENS, rule=dyrate.Learned(predictor),
                             stats=False).rows
    keep = costs.matched_keep(cfg, [(r["prompt_tokens"], len(r["token_ids"])) for r in rows],
                              costs.cost_ratio(costs.add(rows, cfg), costs.COSTS["kv"]), predictor.k,
                              cost=costs.COSTS["kv"])
    methods = {"none": {}, f"fastv R={1 - keep / N:.3f}": dict(rule=dyrate.FastV(1 - keep / N)),
               "dyrate learned": dict(rule=dyrate.Learned(predictor))}
    times = {m: [] for m in methods}
    for _ in range(rounds + 1):  # the first round warms up
        for m, kw in methods.items():
            g = generate.generate(llava, tok, images, prompts, MAX_NEW_TOKENS, stats=False, **kw)
            times[m].append((g.decode_ms_per_token, costs.cost_ratio(costs.add(g.rows, cfg), costs.COSTS["kv"])))
    out = {m: dict(decode_ms_per_token=statistics.median(t for t, _ in v[1:]), mean_kv_ratio=v[-1][1])
           for m, v in times.items()}
    for m, r in out.items():
        log(f"batch {batch}: {m:20} decode {r['decode_ms_per_token']:7.2f} ms/token "
            f"({r['decode_ms_per_token'] / out['none']['decode_ms_per_token']:.2f}x none), mean KV "
            f"{r['mean_kv_ratio']:.3f} of none")
    return out


def pictures(llava, tok, records, predictor, out, name, log):
    """The kept patches at each step and the type shares over the steps, for the first record."""
    r = records[0]
    row = generate.generate(llava, tok, [r["image"]], [r["prompt"]], max_new_tokens=MAX_NEW_TOKENS,
                            rule=dyrate.Learned(predictor)).rows[0]
    for p in viz.save(os.path.join(out, name), r["image"], row, tok, llava.config):
        log(f"wrote {p}")


def experiment(model_dir, data, predictors, out, log=print, serving_batch=32):
    llava = model.Llava.from_pretrained(model_dir)
    llava.cache_class = fast.FastKVCache  # decode-time drops compacted by moves: the same tokens, faster
    tok = processing.Tokenizer(model_dir, llava.config)
    predictors = {path: dyrate.RatePredictor.load(path, llava.config) for path in predictors}
    os.makedirs(out, exist_ok=True)
    tasks = task_records(data)
    t0 = time.perf_counter()
    result = dict(figure2=figure2(llava, tok, tasks["detail"], out, log))
    for name, records in tasks.items():
        log(f"\n{name}: {len(records)} held-out questions ({data}), exact match; cost ratios to none")
        log(f"{'method':40}{'accuracy':>9}{'1st sent':>9}" + "".join(f"{b:>9}" for b in COST_NAMES)
            + f"{'kept@0':>8}{'kept@end':>8}{'falls':>7}")
        result[name] = comparison(llava, tok, records, predictors, log)
    kv = [p for p in predictors.values() if p.meta.get("budget") == "kv"]
    if kv and serving_batch:
        result["serving"] = serving(llava, tok, tasks["detail"], kv[-1], log, serving_batch)
    if kv:
        pictures(llava, tok, tasks["detail"], kv[-1], out, "detail0", log)
    if predictors:
        pictures(llava, tok, tasks["caption"], next(iter(predictors.values())), out, "example0", log)
    result["seconds"] = time.perf_counter() - t0

    processing.write_json(os.path.join(out, "experiment.json"), result)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description="The shapes experiment: every method on held-out questions, and figures.")
    p.add_argument("--model", default="models/shapes", help="checkpoint folder")
    p.add_argument("--data", default="data/shapes/test.jsonl", help="held-out JSONL (python -m shapes.data)")
    p.add_argument("--predictors", nargs="*", default=PREDICTORS, help="predictor files (train.py), one per budget")
    p.add_argument("--out", default="out/shapes", help="folder for experiment.json and the figures (the README's "
                   "are in assets/: pass --out assets to rewrite them)")
    args = p.parse_args(argv)
    experiment(args.model, args.data, args.predictors, args.out)


if __name__ == "__main__":
    main()
