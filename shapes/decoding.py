"""
The seed paper's decoding-strategy table on the shapes model: greedy, beam search with 2 and 5 beams (each beam
pruning for itself) and top-p sampling, for none, FastV, the learned DyRate predictor and the mass rule, on held-out
captions and detailed descriptions: exact-match accuracy, CIDEr-D (pycocoevalcap, one reference per image) and the
cost ratios to none.

    python -m shapes.data --out data/shapes
    python -m shapes.decoding --out runs/decoding        # runs/decoding/decoding.json and decoding.md
"""
import argparse
import os

import dyrate
import generate
import model
import processing
from shapes import experiment
from tools import beam, costs, eval, fast

DECODING = {"greedy": {}, "beam-2": dict(num_beams=2), "beam-5": dict(num_beams=5),
            "top-p 0.9": dict(temperature=1.0, top_p=0.9, seed=0)}


def methods(predictor_path, cfg):
    predictor = dyrate.RatePredictor.load(predictor_path, cfg)
    return {"none": {}, "fastv R=0.875": dict(rule=dyrate.FastV(0.875)),
            f"dyrate ({os.path.basename(predictor_path)})": dict(rule=dyrate.Learned(predictor)),
            "mass eps=0.05": dict(rule=dyrate.Mass(0.05))}


def measure(llava, tok, records, batch, **kw):
    """Accuracy, CIDEr-D and cost ratios of one method and decoding over a task's records."""
    rows = []
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        images, prompts = [r["image"] for r in chunk], [r["prompt"] for r in chunk]
        rows += (beam.generate if "num_beams" in kw else generate.generate)(
            llava, tok, images, prompts, experiment.MAX_NEW_TOKENS, stats=False, **kw).rows
    texts = {str(i): row["text"].strip() for i, row in enumerate(rows)}
    refs = {str(i): [r["answer"]] for i, r in enumerate(records)}
    return dict(accuracy=sum(texts[str(i)] == r["answer"] for i, r in enumerate(records)) / len(records),
                cider=eval.caption_scores(refs, texts)["cider"],
                **{f"{b}_ratio": costs.cost_ratio(costs.add(rows, llava.config), costs.COSTS[b])
                   for b in ("flops", "kv", "nocache")})


def table(results):
    lines = ["| task | method | decoding | accuracy | CIDEr-D | FLOPs | mean KV | no-cache FLOPs |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['task']} | {r['method']} | {r['decoding']} | {r['accuracy']:.3f} | {r['cider']:.3f} | "
                     f"{r['flops_ratio']:.3f} | {r['kv_ratio']:.3f} | {r['nocache_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="Decoding strategies x pruning methods on the shapes model.")
    p.add_argument("--model", default="models/shapes", help="checkpoint folder")
    p.add_argument("--data", default="data/shapes/test.jsonl", help="held-out JSONL (python -m shapes.data)")
    p.add_argument("--predictor", default="models/shapes/predictor-kv-0.36", help="the learned predictor")
    p.add_argument("--limit", type=int, default=100, help="held-out scenes per task")
    p.add_argument("--batch", type=int, default=25, help="prompts per generate() call")
    p.add_argument("--out", default="runs/decoding", help="folder for decoding.json and decoding.md")
    args = p.parse_args(argv)
    llava = model.Llava.from_pretrained(args.model)
    llava.cache_class = fast.FastKVCache  # decode-time drops compacted by moves: the same tokens, faster
    tok = processing.Tokenizer(args.model, llava.config)
    tasks = experiment.task_records(args.data)
    results = []
    for task in ("caption", "detail"):
        for name, kw in methods(args.predictor, llava.config).items():
            for decoding, dkw in DECODING.items():
                r = measure(llava, tok, tasks[task][:args.limit], args.batch, **kw, **dkw)
                results.append(dict(task=task, method=name, decoding=decoding, **r))
                print(table(results[-1:]).splitlines()[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    processing.write_json(os.path.join(args.out, "decoding.json"), results)
    with open(os.path.join(args.out, "decoding.md"), "w") as f:
        f.write(table(results))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
