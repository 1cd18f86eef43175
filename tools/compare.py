"""
The README's comparison: a trained rate predictor against FastV and a hand-set ramp at the same cost (the predictor's
budget), the mass rule and VTW (its layer) matched likewise, and none; every row with all three cost ratios, on a
held-out set through the real inference path (train.evaluate: hard decisions, teacher-forced with the unpruned
model's greedy tokens; the records' answers are not used).

    python -m shapes.data --out data/shapes                  # the shapes model's held-out questions
    python -m tools.compare --model models/shapes --data data/shapes/val.jsonl \\
        --predictor models/shapes/predictor-kv-0.3
"""
import argparse

import cli
import dyrate
import generate
import train
from tools import costs


def matched_mass(model, refs, target, budget, args, k, tries=10):
    """The mass rule's eps whose held-out cost ratio (the budget's) is closest to `target`, by bisection over log eps
    in [1e-8, 1] (the cost falls as eps grows), and its evaluation."""
    lo, hi, best = -8.0, 0.0, None
    for _ in range(tries):
        eps = 10 ** ((lo + hi) / 2)
        r = train.evaluate(model, refs, lambda n: dyrate.Mass(eps=eps), k, args)
        if best is None or abs(r[f"{budget}_ratio"] - target) < abs(best[1][f"{budget}_ratio"] - target):
            best = (eps, r)
        lo, hi = (lo, (lo + hi) / 2) if r[f"{budget}_ratio"] < target else ((lo + hi) / 2, hi)
    return best


def compare(model, predictor, refs, args, log, budget=None):
    """The README table: the learned predictor against FastV, a hand-set ramp, the mass rule and VTW (its layer)
    matched on the same cost (the predictor's budget), and none; every row with all three cost ratios."""
    N, k = model.config.n_image_tokens, predictor.k
    budget = budget or getattr(predictor, "meta", {}).get("budget", "flops")
    cost = costs.COSTS[budget]
    rows = {"none": train.evaluate(model, refs, lambda n: dyrate.Rule(), k, args)}
    rows["dyrate (learned)"] = train.evaluate(model, refs, lambda n: dyrate.Learned(predictor), k, args)
    target = rows["dyrate (learned)"][f"{budget}_ratio"]
    lengths = [(len(s.ids), len(tokens)) for s, _, tokens in refs]
    keep = costs.matched_keep(model.config, lengths, target, k, cost=cost)
    rows[f"fastv R={1 - keep / N:.3f} (= constant-rate dyrate)"] = train.evaluate(
        model, refs, lambda n: dyrate.FastV(ratio=1 - keep / N), k, args)
    start = costs.matched_keep(model.config, lengths, target, k, ramp=True, cost=cost)
    rows[f"dyrate hand-set ramp {1 - start / N:.3f} -> 1"] = train.evaluate(
        model, refs, lambda n: dyrate.Ramp(start=1 - start / N, steps=n), k, args)
    eps, mass = matched_mass(model, refs, target, budget, args, k)
    rows[f"mass rule eps={eps:.2g}"] = mass
    layer = costs.matched_layer(model.config, lengths, target, cost=cost)
    rows[f"vtw K={layer}"] = train.evaluate(model, refs, lambda n: dyrate.VTW(), layer, args)
    rows = {name + ("*" if name != "none" and abs(r[f"{budget}_ratio"] - target) > 0.01 else ""): r
            for name, r in rows.items()}
    log(f"matched on the {budget} budget; ratios to none ({len(refs)} held-out samples; *: more than 0.01 off, the "
        f"nearest its parameter reaches)")
    log(f"{'method':42}{'FLOPs':>8}{'mean KV':>9}{'no-cache':>9}{'agreement':>11}{'KL/token':>10}")
    for name, r in rows.items():
        log(f"{name:42}{r['flops_ratio']:8.3f}{r['kv_ratio']:9.3f}{r['nocache_ratio']:9.3f}{r['agreement']:11.3f}"
            f"{r['kl']:10.4f}")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="A trained rate predictor against FastV, a ramp, the mass rule and VTW "
                                            "at the same cost, and none, on a held-out set.")
    cli.add_model_args(p, default_model=None, required=True)
    g = cli.add_data_args(p, "the held-out records {image, prompt}", evaluate=True)
    g.add_argument("--predictor", required=True, help="predictor file written by train.py")
    g.add_argument("--budget", choices=dyrate.BUDGETS, default=None,
                   help="the cost the baselines are matched on (default: the predictor's budget)")
    g.add_argument("--max-new-tokens", dest="eval_max_new_tokens", type=cli.number(int, 1), default=32,
                   help="answer length evaluated per held-out sample")
    args = p.parse_args(argv)
    args.distill_max_new_tokens = args.eval_max_new_tokens  # train.load_samples: each prompt and answer must fit
    return args


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors():  # every check that needs no weights first
        cli.check_files((("--data", args.data), ("--predictor", args.predictor)), args.image_folder)
        device = cli.device(args.device)
        args.device = str(device)
        cfg, tok = cli.checkpoint(args.model)
        predictor = dyrate.RatePredictor.load(args.predictor, cfg, device)
        args.conv, args.pad = generate.prompt_protocol([dyrate.Learned(predictor)], args.conv, args.pad,
                                                       args.allow_protocol_mismatch)
        samples = train.load_samples(args.data, cfg, tok, args, print, need_answers=False)[0]
        if not samples:
            raise ValueError(f"{args.data} has no usable sample to evaluate on.")
        model = cli.load_model(args.model, device, cli.dtype(args.dtype, device), print)
    print(f"unpruned references for {len(samples)} held-out samples ...")
    return compare(model, predictor, train.reference(model, samples, args, print), args, print, args.budget)


if __name__ == "__main__":
    main()
