"""
The honest yardstick: every KV-budget predictor against FastV, the mass rule and the hand-set ramp at its own mean KV
cache, on held-out scenes drawn from seeds that no training run, model choice or predictor choice ever used, the mean
and spread over the seeds.

    python -m shapes.yardstick --out runs/yardstick     # 3 seeds x 100 scenes, ~55 min on 2 CPU cores, resumable

Why fresh seeds: the shipped test split (shapes.data --seed 0, data/shapes/test.jsonl) is the one the predictors'
targets, the rate grid and the shipped checkpoints were chosen on, by looking at its tables; the shapes model itself
was trained on scene streams drawn from Python's random.Random(0) and random.Random(1). A seed s here draws its scenes
as `python -m shapes.data --seed s` draws its test split (random.Random(10 s + 2)), for the SEEDS below, which nothing
else in the project uses. Per seed: the sweep's points for none, FastV over R, the ramp over its start and the mass rule
over eps (shapes.sweep), on detailed descriptions and captions, and each predictor's one point; a predictor is then set
against each curve at its own mean KV (linear between the curve's two nearest points), seed by seed. Writes
OUT/seed-S/ (the scenes and the sweep's sweep.json), OUT/yardstick.json, OUT/table.md and the curves averaged over
the seeds, OUT/TASK-COST.png.
"""
import argparse
import json
import os
import statistics

import processing
from shapes import data, experiment, sweep

SEEDS = (11, 12, 13)  # shapes.data --seed 11, 12, 13: scenes from random.Random(112), (122), (132)
N_SCENES = 100
# each curve's points around the predictors' mean KV (0.29-0.6), a subset of shapes.sweep's grids
GRIDS = dict(fastv=[0.5, 0.625, 0.75, 0.8125, 0.875, 0.9375, 0.97], ramp=[0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 0.9375],
             mass=[1e-7, 1e-6, 1e-5, 1e-4, 0.002, 0.01, 0.05])
PREDICTORS = [f"models/shapes/predictor-{name}" for name in ("kv-0.3", "kv-0.3-step", "kv-0.3-step-grid", "kv-0.36",
                                                             "kv-0.45", "kv-0.6")]
CURVES = ("fastv", "mass", "ramp")
TASKS = ("detail", "caption")


def seed_scenes(out, seed, n):
    """OUT/seed-S/test.jsonl: n scenes drawn as `shapes.data --seed S` draws its test split (written once)."""
    folder = os.path.join(out, f"seed-{seed}")
    if not os.path.isfile(os.path.join(folder, "test.jsonl")):
        data.write_dataset(folder, n, seed * 10 + 2, "test")
    return os.path.join(folder, "test.jsonl")


def measure_seed(llava, tok, predictors, path, log):
    """The sweep's points of none, the learned predictors and the GRIDS' curves (no VTW: a KV budget ranks no VTW
    point) on one seed's scenes, resumable point by point in the folder's sweep.json. Returns the points."""
    records = experiment.task_records(path)
    return sweep.measure_all(llava, tok, predictors, {task: records[task] for task in TASKS},
                             os.path.join(os.path.dirname(path), "sweep.json"),
                             lambda pt: pt[1] in ("none", "learned", "learned+step") or pt[2] in GRIDS.get(pt[1], ()),
                             log)


def compare(results, name):
    """One seed: for each task, the predictor's mean KV and accuracy, each curve's accuracy there, and none's."""
    rows = {}
    for task in TASKS:
        point = next(r for r in results if r["task"] == task and r["param"] == name and "learned" in r["method"])
        kv = point["kv_ratio"]
        rows[task] = dict(kv=kv, learned=point["accuracy"],
                          none=next(r["accuracy"] for r in results if r["task"] == task and r["method"] == "none"),
                          **{m: sweep.at(sweep.curve(results, task, m, "kv"), kv) for m in CURVES})
    return rows


def pooled(runs):
    """The points measured on every seed (runs: each seed's sweep points), their accuracy and cost ratios averaged over
    the seeds: the curves drawn."""
    by_point = {}
    for results in runs:
        for r in results:
            by_point.setdefault((r["task"], r["method"], json.dumps(r["param"])), []).append(r)
    return [dict(task=rs[0]["task"], method=rs[0]["method"], param=rs[0]["param"],
                 **{key: statistics.mean(r[key] for r in rs) for key in ("accuracy", "flops_ratio", "kv_ratio",
                                                                          "nocache_ratio")})
            for rs in by_point.values() if len(rs) == len(runs)]


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(per_seed):
    """{predictor: {task: {figure: (mean, sd over the seeds)}}} from {seed: {predictor: compare()}}."""
    names = list(next(iter(per_seed.values())))
    return {name: {task: {key: mean_sd([per_seed[s][name][task][key] for s in per_seed])
                          for key in ("kv", "learned", *CURVES, "none")} for task in TASKS} for name in names}


def table(summary, seeds):
    """Markdown: each predictor on each task against every curve at its own mean KV, mean ± sd over the seeds; the
    goal's verdict (on or above FastV and mass within 0.01, mean over seeds)."""
    def cell(ms, bold=False):
        mean, sd = ms
        return "-" if mean is None else (f"**{mean:.3f}**" if bold else f"{mean:.3f}") + f" ± {sd:.3f}"
    lines = [f"| task | predictor | mean KV | learned | {' | '.join(CURVES)} | none | learned ≥ FastV, mass - 0.01 |",
             "|---|---|---:|---:|" + "---:|" * (len(CURVES) + 2)]
    for task in TASKS:
        for name, by_task in summary.items():
            s = by_task[task]
            best = max([s[m][0] for m in ("fastv", "mass") if s[m][0] is not None], default=None)
            met = "-" if best is None else "met" if s["learned"][0] >= best - 0.01 else \
                f"not met ({s['learned'][0] - best:+.3f})"
            lines.append(f"| {task} | {name} | {cell(s['kv'])} | {cell(s['learned'], True)} | "
                         + " | ".join(cell(s[m]) for m in CURVES) + f" | {cell(s['none'])} | {met} |")
    return (f"Mean ± standard deviation over seeds {', '.join(map(str, seeds))} ({N_SCENES} scenes each); each curve "
            f"read at the predictor's own mean KV on each seed.\n\n" + "\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description="Predictors against FastV, mass and the ramp on fresh seeds (shapes).")
    p.add_argument("--model", default="models/shapes", help="checkpoint folder")
    p.add_argument("--predictors", nargs="*", default=PREDICTORS, help="KV-budget predictor files (train.py)")
    p.add_argument("--out", default="runs/yardstick", help="folder for the scenes, each seed's sweep and the table")
    args = p.parse_args(argv)
    llava, tok, predictors = sweep.load(args.model, args.predictors)
    if any(p.meta.get("budget") != "kv" for p in predictors.values()):
        raise SystemExit("error: --predictors: the yardstick compares at the mean KV cache; give KV-budget predictors")
    os.makedirs(args.out, exist_ok=True)
    per_seed, runs = {}, []
    for seed in SEEDS:
        runs.append(measure_seed(llava, tok, predictors, seed_scenes(args.out, seed, N_SCENES),
                                 lambda msg, seed=seed: print(f"seed {seed}: {msg}", flush=True)))
        per_seed[seed] = {name: compare(runs[-1], name) for name in predictors}
    sweep.plots([r for r in pooled(runs) if "learned" not in r["method"] or r["param"] in predictors], args.out)
    summary = summarise(per_seed)
    processing.write_json(os.path.join(args.out, "yardstick.json"), dict(seeds=SEEDS, scenes=N_SCENES,
                                                                         per_seed=per_seed, summary=summary))
    text = table(summary, SEEDS)
    processing.atomic_write(os.path.join(args.out, "table.md"), lambda tmp: open(tmp, "w").write(text))
    print(text)
    return summary


if __name__ == "__main__":
    main()
