"""
The method's evidence as curves: accuracy against cost for every method over a sweep of its one parameter, on the
shapes model's held-out detailed descriptions, captions and short questions.

    python -m shapes.data --out data/shapes
    python -m shapes.sweep --out runs/sweep          # resumable: every point is saved as soon as it is measured

Methods and their parameter: FastV over R, VTW over its withdrawal layer K, hand-set ramps (the rate rising linearly
to 1 over a typical answer) over their start rate, the training-free mass rule over eps, random drops at FastV's step
over R, PyramidDrop over lam, the depth-based rule over its ratio at K, VisionZip over its token count, and the
learned predictors
(--predictors: train.py's files, one point each at the cost it reached; those trained with --step-feature are a
series of their own). Writes OUT/sweep.json (every point: exact-
match accuracy, the FLOPs, mean KV-cache and no-cache FLOPs ratios to none, kept counts), one plot per task and cost
(OUT/TASK-COST.png: accuracy against cost, one curve per method, none as a line) and OUT/table.md: each learned
point against every other curve at the same cost (linear between the curve's two nearest points).
"""
import argparse
import json
import os
import random
import statistics

import numpy as np

import dyrate
import model
import processing
from shapes import data, experiment
from tools import costs, fast, viz

FASTV_R = [0.25, 0.5, 0.625, 0.75, 0.8125, 0.875, 0.9375, 0.97]
RAMP_START = [0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 0.9375, 0.97]
# eps down to 1e-7: the shapes model's layer-1 attention sits on a few patches, so the rest carry almost nothing
MASS_EPS = [1e-7, 1e-6, 1e-5, 1e-4, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4]
PDROP_LAM = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9]  # stages at layers 3, 6, 9 of 12
DEPTH_R = [0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 0.9375]
VISIONZIP = [(14, 2), (27, 5), (54, 10), (81, 15), (108, 20), (162, 30)]  # (dominant, contextual): its papers' 5.4 : 1
PREDICTORS = [f"models/shapes/predictor-{name}" for name in  # the shipped ones: 4 targets per budget, two extensions
              ("0.7", "0.55", "0.4", "0.33", "kv-0.6", "kv-0.45", "kv-0.36", "kv-0.3", "kv-0.3-step",
               "kv-0.3-step-grid")]
COSTS = {"flops": "FLOPs (KV cache)", "kv": "mean KV cache", "nocache": "no-cache FLOPs"}
CURVES = ("fastv", "vtw", "ramp", "mass", "random", "pdrop", "depth", "visionzip")  # the curves learned points meet


def task_records(path, seed=0):
    """The held-out scenes as three tasks: detailed descriptions, captions and one short question each (a count, a
    colour or a position, drawn by seed)."""
    records = experiment.task_records(path)
    rng = random.Random(seed)
    with open(path) as f:
        scenes = [json.loads(line)["scene"] for line in f]
    short = []
    for r, scene in zip(records["caption"], scenes):
        q, a = rng.choice(data.questions(scene)[1:-1])
        short.append(dict(image=r["image"], prompt=q, answer=a))
    return dict(detail=records["detail"], caption=records["caption"], short=short)


def points(llava, tok, predictors, tasks):
    """(task, method, parameter, generate() keyword arguments) of every point of the sweep."""
    L = llava.config.text.num_hidden_layers
    for task, records in tasks.items():
        # the ramp spans a typical answer: its tokens, EOS included
        steps = int(statistics.median(len(tok.tok.encode(r["answer"], add_special_tokens=False).ids) + 1
                                      for r in records))
        yield task, "none", None, {}
        yield from ((task, "fastv", r, dict(rule=dyrate.FastV(r))) for r in FASTV_R)
        yield from ((task, "vtw", k, dict(rule=dyrate.VTW(), k=k)) for k in range(1, L))
        yield from ((task, "ramp", r0, dict(rule=dyrate.Ramp(r0, steps))) for r0 in RAMP_START)
        yield from ((task, "mass", eps, dict(rule=dyrate.Mass(eps))) for eps in MASS_EPS)
        yield from ((task, "random", r, dict(rule=dyrate.Random(r))) for r in FASTV_R)
        yield from ((task, "pdrop", lam, dict(rule=dyrate.Pyramid(lam=lam))) for lam in PDROP_LAM)
        yield from ((task, "depth", r, dict(rule=dyrate.Depth(r))) for r in DEPTH_R)
        yield from ((task, "visionzip", d + c, dict(rule=dyrate.VisionZip(d, c))) for d, c in VISIONZIP)
        yield from ((task, "learned+step" if p.step else "learned", name, dict(rule=dyrate.Learned(p)))
                    for name, p in predictors.items())


def measure(llava, tok, records, kw):
    """One point: accuracy and every cost ratio over the task's records."""
    accuracy, rows = experiment.evaluate_answers(llava, tok, records, **kw)
    costs.add(rows, llava.config)
    return dict(accuracy=accuracy, **{f"{b}_ratio": costs.cost_ratio(rows, costs.COSTS[b]) for b in COSTS},
                kept_first=float(np.mean([r["kept_visual"][0] for r in rows])),
                kept_last=float(np.mean([r["kept_visual"][-1] for r in rows])))


def curve(results, task, method, cost):
    """A method's (cost, accuracy) points on a task, by cost."""
    return sorted((r[f"{cost}_ratio"], r["accuracy"]) for r in results
                  if r["task"] == task and r["method"] == method)


def at(points_, cost):
    """The accuracy of a curve at `cost` (linear between the two nearest points), or None outside its range."""
    for (c0, a0), (c1, a1) in zip(points_, points_[1:]):
        if c0 <= cost <= c1:
            return a0 if c1 == c0 else a0 + (a1 - a0) * (cost - c0) / (c1 - c0)
    return None


def none_accuracy(results):
    """{task: none's accuracy} for the tasks whose points have begun, in sweep order (an interrupted sweep still gets
    its table and plots)."""
    nones = {r["task"]: r["accuracy"] for r in results if r["method"] == "none"}
    return {t: nones[t] for t in ("detail", "caption", "short") if t in nones}


def table(results, predictors):
    """Markdown: each learned point, on each task and on its own budget's cost, against every curve there."""
    lines = ["| task | predictor | cost | learned | " + " | ".join(CURVES) + " | none |",
             "|---|---|---|---:|" + "---:|" * (len(CURVES) + 1)]
    for task, none in none_accuracy(results).items():
        for r in results:
            if r["task"] != task or not r["method"].startswith("learned"):
                continue
            budget = predictors[r["param"]].meta.get("budget", "flops")
            c = r[f"{budget}_ratio"]
            others = [at(curve(results, task, m, budget), c) for m in CURVES]
            lines.append(f"| {task} | {r['param']}{' (+step)' if r['method'] == 'learned+step' else ''} | "
                         f"{COSTS[budget]} {c:.3f} | **{r['accuracy']:.3f}** | "
                         + " | ".join("-" if a is None else f"{a:.3f}" for a in others) + f" | {none:.3f} |")
    return "\n".join(lines) + "\n"


AT = [("kv", 0.3), ("kv", 0.45), ("flops", 0.4)]  # where every curve is read side by side


def curves_at(results):
    """Markdown: every curve's accuracy at each cost of AT (linear between its two nearest points), and the learned
    points nearest there (within 0.02), on each task."""
    methods = ("none", *CURVES)
    lines = ["| task | cost | " + " | ".join(methods[1:]) + " | learned (nearest) |",
             "|---|---|" + "---:|" * len(methods)]
    for task in none_accuracy(results):
        for budget, c in AT:
            cells = [at(curve(results, task, m, budget), c) for m in methods[1:]]
            near = [f"{r['param']} {r['accuracy']:.3f}" for r in results if r["task"] == task and
                    r["method"].startswith("learned") and abs(r[f"{budget}_ratio"] - c) <= 0.02]
            lines.append(f"| {task} | {COSTS[budget]} {c} | " + " | ".join("-" if a is None else f"{a:.3f}"
                                                                            for a in cells)
                         + f" | {', '.join(near) or '-'} |")
    return "\n".join(lines) + "\n"


def plots(results, out):
    for task, none in none_accuracy(results).items():
        for cost, name in COSTS.items():
            series = {m: curve(results, task, m, cost) for m in (*CURVES, "learned", "learned+step")
                      if any(r["method"] == m for r in results)}
            viz.curves_plot(series, none, f"shapes model, {task}: accuracy against {name}",
                            f"{name} (ratio to none)").save(os.path.join(out, f"{task}-{cost}.png"))


def load(model_dir, predictor_paths):
    """The model (decode-time drops compacted by moves: the same tokens, faster), its tokenizer and the predictors by
    file name."""
    llava = model.Llava.from_pretrained(model_dir)
    llava.cache_class = fast.FastKVCache
    tok = processing.Tokenizer(model_dir, llava.config)
    return llava, tok, {os.path.basename(path): dyrate.RatePredictor.load(path, llava.config)
                        for path in predictor_paths}


def measure_all(llava, tok, predictors, tasks, path, wanted=lambda point: True, log=print):
    """Every point of the sweep that `wanted` keeps, resumable: each is saved to the JSON file `path` as soon as it is
    measured, and one found there is not measured again. Returns all the points in the file."""
    results = json.load(open(path)) if os.path.isfile(path) else []
    done = {(r["task"], r["method"], json.dumps(r["param"])) for r in results}
    todo = [pt for pt in points(llava, tok, predictors, tasks)
            if wanted(pt) and (pt[0], pt[1], json.dumps(pt[2])) not in done]
    log(f"{path}: {len(done)} points measured already, {len(todo)} to go")
    for i, (task, method, param, kw) in enumerate(todo):
        r = dict(task=task, method=method, param=param, **measure(llava, tok, tasks[task], kw))
        results.append(r)
        processing.write_json(path, results)
        log(f"[{i + 1}/{len(todo)}] {task:8} {method:12} {str(param):22} accuracy {r['accuracy']:.3f} | FLOPs "
            f"{r['flops_ratio']:.3f} | mean KV {r['kv_ratio']:.3f} | no-cache {r['nocache_ratio']:.3f}")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description="Accuracy against cost for every method over its parameter (shapes).")
    p.add_argument("--model", default="models/shapes", help="checkpoint folder")
    p.add_argument("--data", default="data/shapes/test.jsonl", help="held-out JSONL (python -m shapes.data)")
    p.add_argument("--predictors", nargs="*", default=PREDICTORS, help="predictor files (train.py), a point each")
    p.add_argument("--out", default="runs/sweep", help="folder for sweep.json, the plots and table.md")
    args = p.parse_args(argv)
    llava, tok, predictors = load(args.model, args.predictors)
    os.makedirs(args.out, exist_ok=True)
    results = measure_all(llava, tok, predictors, task_records(args.data), os.path.join(args.out, "sweep.json"),
                          log=lambda msg: print(msg, flush=True))
    plots(results, args.out)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table(results, predictors) + "\n" + curves_at(results))
    print(open(os.path.join(args.out, "table.md")).read())
    return results


if __name__ == "__main__":
    main()
