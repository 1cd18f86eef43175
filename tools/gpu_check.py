"""
The GPU check: every CUDA-facing path of this repository in one run of at most ~8 minutes on one H100/H200-class GPU,
with no install step (it needs only what the library and its tests need: torch, transformers, safetensors,
tokenizers, pillow, numpy, pytest), every output under one folder.

    python -m tools.gpu_check --out gpu-check                  # on a CUDA machine
    python -m tools.gpu_check --out /tmp/gpu-dry --dry-run     # on a CPU, every geometry shrunk (CI runs this)

The steps, each in a process of its own (a failure is recorded and the next step runs):
1. pytest: the device-parametrised tests on CUDA in float32, float16 and bfloat16 -> OUT/pytest.txt
2. bench.py at the 7B geometry in bfloat16, batch 1 and 16: none, fastv, dyrate (constant and ramp), eager and
   compiled, and transformers -> OUT/bench-7b.json, OUT/bench-7b.txt
3. generate: a random 7B-geometry checkpoint written in the hub layout (float16, sharded), loaded (seconds, peak GPU
   memory against the weights' bytes), and generate() for none, fastv and a dyrate ramp (decode tokens/s) ->
   OUT/generate-7b.json
4. train: one train.py step at 7B width and depth with the 24 GB settings (--micro-batch-size 1 --checkpoint,
   bfloat16, batch 8): the allocator's peak, weights included, and seconds -> OUT/train-7b.json
OUT/summary.json: each step's status and seconds, the machine and the torch version.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, HERE)

STEPS = ("pytest", "bench", "generate", "train")


def geometry(dry):
    return "tiny" if dry else "7b"


def run_pytest(args):
    """The device-parametrised tests on CUDA (on a dry run: two of them on the CPU)."""
    select = "cpu-float32 and (test_logits_match or test_greedy_generation)" if args.dry_run else "cuda"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-k", select], cwd=HERE, capture_output=True,
                         text=True)
    with open(os.path.join(args.out, "pytest.txt"), "w") as f:
        f.write(run.stdout + run.stderr)
    if run.returncode != 0:
        raise RuntimeError(f"pytest failed ({run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ''})")
    return dict(result=run.stdout.strip().splitlines()[-1])


def run_bench(args):
    """bench.py on random weights of LLaVA-1.5-7B's geometry (on a dry run: tiny, the compile path with aot_eager)."""
    methods = "none,none+compile,fastv,dyrate,dyrate+compile,ramp,ramp+compile,transformers"
    cmd = [sys.executable, "-m", "tools.bench", "--geometry", geometry(args.dry_run), "--device", args.device,
           "--dtype", "bfloat16" if not args.dry_run else "float32", "--methods", methods, "--batch-sizes",
           "1,16" if not args.dry_run else "1", "--repeats", "2" if not args.dry_run else "1", "--new-tokens",
           "32" if not args.dry_run else "4", "--out", os.path.join(args.out, "bench-7b.json")]
    if args.dry_run:
        cmd += ["--compile-backend", "aot_eager"]
    run = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    with open(os.path.join(args.out, "bench-7b.txt"), "w") as f:
        f.write(run.stdout + run.stderr)
    if run.returncode != 0:
        raise RuntimeError(f"bench.py failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ''}")
    return dict(table=run.stdout.strip().splitlines())


def run_generate(args):
    """A random 7B-geometry checkpoint in the hub layout, loaded and generated with."""
    import numpy as np
    import torch
    from PIL import Image

    from tools import bench
    from tools import bench_train
    import cli
    import generate
    import processing
    dev = cli.device(args.device)
    folder = os.path.join(args.work, "checkpoint")
    cfg = bench.geometry_config(geometry(args.dry_run))
    t0 = time.perf_counter()
    bench_train.write_checkpoint(cfg, folder, torch.float16)
    written = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    llava = cli.load_model(folder, dev, torch.float16)
    generate.sync(dev)
    load_s = time.perf_counter() - t0
    weights = sum(t.numel() * t.element_size() for t in llava.state_dict().values())
    load_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    tok = processing.Tokenizer(folder, llava.config)
    image = os.path.join(args.work, "image.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(image)
    runs = {}
    for name, kw in (("none", {}), ("fastv", dict(rule="fastv:ratio=0.5")),
                     ("ramp", dict(rule="ramp:start=0.5:steps=64"))):
        generate.generate(llava, tok, [image], ["Describe the image in detail."], 4, **kw)  # warm-up
        out = generate.generate(llava, tok, [image], ["Describe the image in detail."], 64, **kw)
        runs[name] = dict(prefill_ms=out.prefill_ms, decode_tokens_per_s=1e3 / out.decode_ms_per_token,
                          new_tokens=len(out.rows[0]["token_ids"]), peak_memory_bytes=out.peak_memory_bytes,
                          kept_visual=[out.rows[0]["kept_visual"][0], out.rows[0]["kept_visual"][-1]])
    result = dict(write_s=written, load_s=load_s, weights_bytes=weights, load_peak_bytes=load_peak,
                  load_peak_over_weights=load_peak / weights if load_peak else None, runs=runs)
    with open(os.path.join(args.out, "generate-7b.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def run_train(args):
    """One train_step at 7B width and depth with the 24 GB settings, on the checkpoint the generate step wrote."""
    import torch

    from tools import bench_train
    import cli
    from tools import memory
    dev = cli.device(args.device)
    folder = os.path.join(args.work, "checkpoint")
    llava = cli.load_model(folder, dev, torch.bfloat16)
    batch = 2 if args.dry_run else 8
    samples = bench_train.make_samples(llava.config, args.work, batch)
    setting = "checkpoint, micro-batch 1"
    bench_train.measure_step(llava, samples[:1], setting, dev)  # warm-up
    memory.reset_peak(dev)
    result = dict(setting=setting, batch=batch, **bench_train.measure_step(llava, samples, setting, dev))
    result["weights_bytes"] = sum(t.numel() * t.element_size() for t in llava.state_dict().values())
    with open(os.path.join(args.out, "train-7b.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Every CUDA-facing path in one run, outputs under one folder.")
    p.add_argument("--out", required=True, help="folder for every output")
    p.add_argument("--dry-run", action="store_true", help="on the CPU with every geometry shrunk: the script's logic")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: run one step in this process
    p.add_argument("--work", default=None, help="scratch folder for the random checkpoint (default: a temporary one, "
                   "removed at the end)")
    args = p.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.step:  # one step, in a process of its own
        step = {"pytest": run_pytest, "bench": run_bench, "generate": run_generate, "train": run_train}[args.step]
        print(json.dumps(step(args)))
        return
    import torch
    scratch = args.work or tempfile.mkdtemp(prefix="gpu-check-")
    summary = dict(torch=torch.__version__, cuda=torch.version.cuda, dry_run=args.dry_run, steps={},
                   device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    for step in args.steps.split(","):
        print(f"gpu_check: {step} ...", flush=True)
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--out", args.out, "--work", scratch,
                              "--step", step] + (["--dry-run"] if args.dry_run else []), cwd=HERE,
                             capture_output=True, text=True)
        with open(os.path.join(args.out, f"{step}.log"), "w") as f:
            f.write(run.stdout + run.stderr)
        summary["steps"][step] = dict(ok=run.returncode == 0, seconds=round(time.perf_counter() - t0, 1),
                                      error=None if run.returncode == 0 else run.stderr.strip()[-2000:])
        print(f"gpu_check: {step} {'ok' if run.returncode == 0 else 'FAILED'} in "
              f"{summary['steps'][step]['seconds']} s", flush=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    if not args.work:
        shutil.rmtree(scratch)
    if not all(s["ok"] for s in summary["steps"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
