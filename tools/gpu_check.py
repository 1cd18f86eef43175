"""
The GPU check: one run on one H100/H200-class GPU gives a verdict on the CUDA path, figure by figure, each against its
threshold, in at most ten minutes; everything it writes lands in one folder. docs/gpu.md says how to read it.

    python -m tools.gpu_check --out gpu-check                       # on a CUDA machine: <= 10 minutes
    python -m tools.gpu_check --out gpu-check --steps parity,loading   # a subset
    python -m tools.gpu_check --out /tmp/gpu-dry --dry-run          # CPU, tiny shapes: every check's code path (CI)

The steps, cheapest and most telling first, each in a process of its own that is killed at its time budget:
tests     the device-parametrised tests on CUDA in float32, float16 and bfloat16 (pytest -k cuda): all pass
parity    one random 7B model, ours and transformers on the same tensors, 32 greedy tokens at batch 1 and 8: float32
          tokens equal; bfloat16 our logits choose transformers' tokens wherever its choice is decisive (greedy_agrees)
loading   a random 7B checkpoint in the hub layout (float16, sharded) loaded: the allocator's peak <= 1.1x the weights
training  one train.py step at the 24 GB settings (--checkpoint --micro-batch-size 1, batch 8, bfloat16), 7B at full
          depth: the allocator's peak against the docs' 13.9 GiB, failing above 22 GiB; the seconds of a plain step
dropping  a schedule whose drop rate rises during the answer: the KV caches hold none's bytes scaled as the kept image
          tokens say (dyrate.kv_cache_bytes), within 5%
compile   compiled decode (tools/fast.py) gives eager's tokens for none, fastv and dyrate at batch 1 and 16 (7B width,
          4 layers, float32; 617 + 24 tokens stay in one 64-slot cache bucket, so at most 10 graphs compile)
speed     decode ms/token of fastv, vtw and dyrate at batch 16 and 64 as a ratio to none's, beside its bytes-read
          limit: above 1 (slower than none) fails; decode tokens/s of none at batch 1, eager and compiled, as a fraction
          of its roofline (bytes read per token over the copy bandwidth measured here): above 1 fails
The whole run is bounded by the step budgets (GPU.budgets: 570 s together) and --deadline (580 s from the start): a
step that reaches its budget or the deadline is killed, and a figure not measured by then is "not run", never "pass".
OUT/summary.json lists every check: value, threshold, pass/fail/not run; OUT/summary.txt is the same as a table. Exit
status: 0 all passed, 1 a check failed or a step raised, 3 nothing failed but some check was not run.
--dry-run runs the same code at tiny shapes on the CPU, where "the allocator's peak" is the process's resident-set
growth (loading) or the live tensors' peak plus the weights (training, tools/memory.py), and CPU timings say nothing of
a GPU: its bounds (DRY) are stand-ins that only a gross fault crosses. --plant CHECK plants a fault behind a check (a
self-test of the checks: that check, and no other, must fail; tests/test_gpu_check.py).
"""
import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from xml.etree import ElementTree

import torch

import cli
import dyrate
import generate
import model
import processing
from tools import bench, fast, memory

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


@dataclasses.dataclass
class Sizes:
    """The shapes, repeats and bounds of a run: LLaVA-1.5-7B's on a GPU, tiny ones in the dry run."""
    geometry: str
    parity_batches: tuple
    parity_tokens: int
    compile_layers: int | None  # decoder layers of the compile step's model (None: the geometry's own)
    compile_batches: tuple
    speed_batches: tuple  # the pruned methods' batches; batch 1 is none's, eager and compiled
    new_tokens: int  # compile and speed: 617 prompt tokens + these stay inside one 64-slot cache bucket
    repeats: int
    train_batch: int
    dtype: torch.dtype  # speed, dropping (parity runs both float32 and bfloat16; compile float32; loading float16)
    budgets: dict  # seconds each step may take, killed after
    deadline: float  # seconds from the start after which no step runs
    load_bound: float  # peak bytes while loading / the weights' bytes
    train_reference_gib: float  # what the docs say a training step needs
    train_bound_gib: float
    slower_bound: float  # decode ms/token of a pruned method / none's at the same batch
    compile_backend: str


GPU = Sizes(geometry="7b", parity_batches=(1, 8), parity_tokens=32, compile_layers=4, compile_batches=(1, 16),
            speed_batches=(16, 64), new_tokens=24, repeats=3, train_batch=8, dtype=torch.bfloat16,
            budgets=dict(tests=80, parity=60, loading=80, training=60, dropping=30, compile=110, speed=150),
            deadline=580, load_bound=1.1, train_reference_gib=13.9, train_bound_gib=22.0, slower_bound=1.0,
            compile_backend="inductor")
# The dry run's stand-in bounds. Loading: the resident set grows by ~0.4x the weights (safetensors maps the file; pages
# are read as touched). Training: the live tensors' peak plus the weights measured 0.076 GiB at these shapes, and the
# bound keeps the GPU's ratio to it (22 / 13.9). Speed: at tiny shapes the pruner's fixed work outweighs what it saves
# (0.7-1.6x none's ms/token measured), and a shared CPU's timings swing.
DRY = Sizes(geometry="tiny", parity_batches=(1, 2), parity_tokens=16, compile_layers=None, compile_batches=(2,),
            speed_batches=(2, 4), new_tokens=4, repeats=2, train_batch=2, dtype=torch.float32,
            budgets=dict(tests=300, parity=300, loading=300, training=300, dropping=300, compile=300, speed=300),
            deadline=1800, load_bound=1.1, train_reference_gib=0.076, train_bound_gib=0.076 * 22 / 13.9,
            slower_bound=4.0, compile_backend="eager")
PROMPT_TEXT = 40  # text tokens around the 576 image tokens: a prompt of 617 tokens, as tools/bench.py's
SLOWDOWN = 4  # --plant decode-METHOD-bB: that method's decode steps take SLOWDOWN x slower_bound as long


def checks_of(sizes):
    """{step: [its checks' names]}, in the order they run."""
    parity, speed = sizes.parity_batches, sizes.speed_batches
    return dict(
        tests=["tests"],
        parity=[f"greedy-{d}-b{B}" for d in ("fp32", "bf16") for B in parity],
        loading=["load-peak"],
        training=["train-peak"],
        dropping=["kv-dropped"],
        compile=[f"compiled-{m}" for m in ("none", "fastv", "dyrate")],
        speed=[f"decode-{m}-b{B}" for B in speed for m in ("fastv", "vtw", "dyrate")]
        + [f"decode-{m}-b1" for m in ("none", "none+compile")])


def planted(args, check):
    return check in args.plant


class Recorder:
    """A step's checks, written to OUT/<step>.json as each is measured: a step killed at its budget keeps them."""

    def __init__(self, path, plant):
        self.path, self.plant, self.checks = path, plant, {}

    def __call__(self, name, value, op, threshold, unit, **detail):
        ok = value <= threshold if op == "<=" else value >= threshold  # NaN fails either way
        self.checks[name] = dict(status="pass" if ok else "fail", value=value, op=op, threshold=threshold, unit=unit,
                                 planted=name in self.plant, **detail)
        processing.write_json(self.path, self.checks)
        print(f"{name}: {self.checks[name]['status']} ({value:.4g} {unit}, bound {op} {threshold:g})", flush=True)


def prompt_inputs(cfg, B, dev, dtype, seed=0):
    """A prompt of tools/bench.py's shape (BOS, 5 text tokens, the image, the rest text) in B rows, each with its own
    random image: ids (B, T), lengths (B,), pixel values (B, 3, S, S)."""
    g = torch.Generator("cpu").manual_seed(seed)  # drawn on the CPU: the same prompt and images on every device
    text = torch.randint(3, cfg.image_token_index, (PROMPT_TEXT,), generator=g, device="cpu").tolist()
    prompt = [cfg.bos_token_id] + text[:5] + [cfg.image_token_index] * cfg.n_image_tokens + text[5:]
    S = cfg.vision.image_size
    px = torch.randn(B, 3, S, S, generator=g, device="cpu").to(dev, dtype)
    return torch.tensor([prompt] * B, device=dev), torch.full((B,), len(prompt), device=dev), px


def weights_bytes(llava):
    return sum(t.numel() * t.element_size() for t in llava.state_dict().values())


def checkpoint(args, sizes):
    """The random checkpoint of the geometry in the hub layout (float16, sharded), written once into --work."""
    from tools import bench_train  # NOTE: imported where used: it registers a FLOP formula test_dyrate.py registers too
    folder = os.path.join(args.work, "checkpoint")
    if not os.path.isfile(os.path.join(folder, "config.json")):  # written last: a killed write is started over
        shutil.rmtree(folder, ignore_errors=True)
        bench_train.write_checkpoint(bench.geometry_config(sizes.geometry), folder, torch.float16)
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# the steps: each measures its figures and records each against its bound


def run_tests(args, sizes, dev, record):
    """The device-parametrised tests on CUDA in every dtype (dry run: two of them on the CPU), in a pytest process of
    their own (the tests import what this process has imported, some of which registers things once)."""
    select = "cpu-float32 and (test_logits_match or test_greedy_generation)" if args.dry_run else "cuda"
    # the dry run collects only the two files it selects from (collecting the whole suite takes longer than they run)
    paths = ["tests/test_model.py", "tests/test_generate.py"] if args.dry_run else ["."]
    xml = os.path.join(args.out, "tests.xml")
    if planted(args, "tests"):  # a failing test among the selected ones
        path = os.path.join(args.work, "test_planted_fault.py")
        with open(path, "w") as f:
            f.write("def test_planted_fault():\n    assert False, 'planted by tools.gpu_check --plant tests'\n")
        paths, select = paths + [path], f"({select}) or planted_fault"
    env = dict(os.environ, OMP_NUM_THREADS="1") if args.dry_run else None
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-c", "pyproject.toml",
                          "--rootdir", ".", "--junitxml", xml, "-k", select, *paths], cwd=HERE, env=env)
    suite = ElementTree.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    c = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    ran = c["tests"] - c["skipped"]
    passed = ran - c["failures"] - c["errors"]
    record("tests", passed / ran if ran else 0.0, ">=", 1.0, "of the tests run passed", selection=select,
           passed=passed, failed=c["failures"], errors=c["errors"], skipped=c["skipped"], exit_status=run.returncode)


@torch.inference_mode()
def run_parity(args, sizes, dev, record):
    """Ours against transformers on the same random weights, greedy tokens at each batch: float32 equal, bfloat16 our
    logits (fed transformers' tokens) choosing its tokens wherever its choice is decisive."""
    from conftest import TOLERANCE, greedy_agrees  # the tests' judge of half-precision greedy tokens
    n = sizes.parity_tokens
    for dtype, short in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        hf, ours = bench.random_models(sizes.geometry, dev, dtype)
        for B in sizes.parity_batches:
            name = f"greedy-{short}-b{B}"
            ids, lengths, px = prompt_inputs(ours.config, B, dev, dtype)
            ref = hf.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=n, eos_token_id=None, pad_token_id=ours.config.pad_token_id,
                              output_scores=True, return_dict_in_generate=True)  # eos None: exactly n tokens
            ref_tokens, scores = ref.sequences[:, ids.shape[1]:], torch.stack(ref.scores)  # (B, n), (n, B, V)
            if dtype == torch.float32:
                tokens = torch.stack([t for t, _ in generate.decode(ours, ids, lengths, px, ours.new_caches(B, n), n)],
                                     1)  # (B, n)
                if planted(args, name):  # one token of row 0 changed
                    tokens[0, n // 2] = (tokens[0, n // 2] + 1) % ours.config.text.vocab_size
                differ = int((tokens != ref_tokens).any(1).sum())
                record(name, differ, "<=", 0, "rows differing", batch=B, tokens=n,
                       first_difference=[int((r != s).nonzero()[0]) if (r != s).any() else None
                                         for r, s in zip(tokens, ref_tokens)])
                continue
            forced = generate.decode(ours, ids, lengths, px, ours.new_caches(B, n), n,
                                     choose=lambda t, logits: ref_tokens[:, t])
            logits, scores = torch.stack([lg for _, lg in forced]).float(), scores.float()  # (n, B, V) each
            scale = scores.abs().amax((0, 2))  # (B,): each row's largest logit, as greedy_agrees and TOLERANCE take it
            if planted(args, name):  # our logits choose another token, by that much, at one step of row 0
                logits[n // 2, 0, (ref_tokens[0, n // 2] + 1) % logits.shape[-1]] += 2 * scale[0]
            top2 = scores.topk(2, dim=-1).values
            decisive = ((top2[..., 0] - top2[..., 1]) > 2 * TOLERANCE[dtype] * scale).sum(0)  # (B,)
            diff = ((logits - scores).abs().amax((0, 2)) / scale).tolist()  # (B,)
            agree = [greedy_agrees(logits[:, b], ref_tokens[b], scores[:, b], dtype) for b in range(B)]
            bad = sum(not a or d > TOLERANCE[dtype] for a, d in zip(agree, diff))
            record(name, bad, "<=", 0, "rows disagreeing", batch=B, tokens=n, greedy_agrees=agree,
                   max_difference=diff, tolerance=TOLERANCE[dtype], decisive_steps=decisive.tolist(),
                   note="a row agrees when our logits (fed transformers' tokens) lie within bfloat16's tolerance of "
                        "its logits (a fraction of its largest) and choose its token at every decisive step (its two "
                        "best logits further apart than twice that): conftest.greedy_agrees")
        del hf, ours
        memory.reset_peak(dev)  # the float32 model's memory back before the bfloat16 one is built


def run_loading(args, sizes, dev, record):
    """The checkpoint loaded in float16; the peak bytes held while loading, against the weights'."""
    folder = checkpoint(args, sizes)
    memory.reset_peak(dev)
    before = memory.now(dev)
    t0 = time.perf_counter()
    llava = cli.load_model(folder, dev, torch.float16)
    spare = [t.clone() for t in llava.state_dict().values()] if planted(args, "load-peak") else None  # a 2nd copy
    generate.sync(dev)
    seconds, peak = time.perf_counter() - t0, memory.peak(dev) - before
    del spare
    weights = weights_bytes(llava)
    record("load-peak", peak / weights, "<=", sizes.load_bound, "x the weights", peak_bytes=peak,
           weights_bytes=weights, seconds=round(seconds, 2),
           measure="CUDA allocator's peak" if dev.type == "cuda" else "resident-set growth (dry run's stand-in)")


def run_training(args, sizes, dev, record):
    """One train.py step at the 24 GB settings: its seconds (a plain timed step) and the allocator's peak (CPU: the
    live tensors' peak plus the weights, in a second step under tools/memory.py's trackers)."""
    import train
    from tools import bench_train
    bound = sizes.train_bound_gib * 2**30
    if planted(args, "train-peak"):  # ballast of the bound's size held through the step
        step = train.train_step

        def train_step(*a, **kw):
            ballast = torch.ones(int(bound), dtype=torch.uint8, device=dev)
            out = step(*a, **kw)
            del ballast
            return out
        train.train_step = train_step
    llava = bench.random_models(sizes.geometry, dev, torch.bfloat16)[1]
    samples = bench_train.make_samples(llava.config, args.work, sizes.train_batch)
    setting = "checkpoint, micro-batch 1"
    bench_train.time_step(llava, samples[:1], setting, dev)  # warm-up
    memory.reset_peak(dev)
    seconds = bench_train.time_step(llava, samples, setting, dev)
    weights = weights_bytes(llava)
    if dev.type == "cuda":
        peak, measure = memory.peak(dev), "CUDA allocator's peak, weights included"
    else:
        peak = weights + bench_train.measure_step(llava, samples, setting, dev)["live_peak"]
        measure = "live tensors' peak + weights (dry run's stand-in)"
    record("train-peak", peak / 2**30, "<=", sizes.train_bound_gib, "GiB", reference_gib=sizes.train_reference_gib,
           step_seconds=round(seconds, 2), batch=sizes.train_batch, setting=setting, weights_bytes=weights,
           measure=measure)


@torch.inference_mode()
def run_dropping(args, sizes, dev, record):
    """none, then a schedule whose drop rate rises during the answer, on the core KV caches: the bytes the caches hold
    after the run (slots in use), as a ratio to none's, against the kept counts' (dyrate.kv_cache_bytes)."""
    llava = bench.random_models(sizes.geometry, dev, sizes.dtype)[1]
    cfg, n, B = llava.config, sizes.parity_tokens, 2
    N, k = cfg.n_image_tokens, dyrate.DEFAULT_K
    ids, lengths, px = prompt_inputs(cfg, B, dev, sizes.dtype)
    schedule = dyrate.Schedule(tuple(0.25 * min(3, 4 * s // n) for s in range(n)))  # 0, 1/4, 1/2, 3/4 in quarters
    held, buffers = {}, {}
    for name, rule in (("none", None), ("schedule", schedule)):
        caches = llava.new_caches(B, n)
        pruner = rule and dyrate.Pruner(rule, N, torch.full((B,), 6, device=dev), lengths, k)
        if rule and planted(args, "kv-dropped"):  # the caches ignore the drops
            for c in caches:
                c.drop = lambda gone: None
        for _ in generate.decode(llava, ids, lengths, px, caches, n, pruner):
            pass
        held[name] = sum(int(c.length.sum()) * 2 * c.k[0, :, 0].numel() * c.k.element_size() for c in caches)
        buffers[name] = sum(c.k.nbytes + c.v.nbytes for c in caches)
    kept = pruner.history[-1].kept_count.tolist()  # (B,) image tokens kept in layers >= k at the end
    T = int(lengths[0])
    expected = sum(dyrate.kv_cache_bytes(cfg, T, n, kb, k, sizes.dtype) for kb in kept) / (
        B * dyrate.kv_cache_bytes(cfg, T, n, N, k, sizes.dtype))
    measured = held["schedule"] / held["none"]
    record("kv-dropped", abs(measured / expected - 1), "<=", 0.05, "relative error", measured_ratio=measured,
           expected_ratio=expected, kept_at_end=kept, held_bytes=held, buffer_bytes=buffers,
           note="held: the slots in use; the buffers are preallocated and compacted in place, so their bytes stay")


def bench_rows(args, sizes, dev, name, methods, batches, dtype, layers=None, repeats=None):
    """tools/bench.py through its main(): its table into OUT/bench-<name>.txt, its JSON into OUT/bench-<name>.json.
    Returns {(method, batch): row}."""
    argv = ["--geometry", sizes.geometry, "--device", str(dev), "--dtype", str(dtype).removeprefix("torch."),
            "--methods", ",".join(methods), "--batch-sizes", ",".join(map(str, batches)), "--prompt-tokens",
            str(PROMPT_TEXT), "--new-tokens", str(sizes.new_tokens), "--repeats", str(repeats or sizes.repeats),
            "--compile-backend", sizes.compile_backend, "--out", os.path.join(args.out, f"bench-{name}.json")]
    argv += ["--layers", str(layers)] if layers else []
    print(f"python -m tools.bench {' '.join(argv)}", flush=True)
    with open(os.path.join(args.out, f"bench-{name}.txt"), "w") as f, contextlib.redirect_stdout(f):
        rows = bench.main(argv)
    return {(r["method"], r["batch"]): r for r in rows}


def run_compile(args, sizes, dev, record):
    """Compiled decode against eager, token for token, one tools/bench.py run per method (each recorded as it ends;
    each batch's rows are alike and row 0's tokens are kept). float32: eager and compiled differ by ~1e-6, so no
    near-tie of random logits flips a token."""
    for m in ("none", "fastv", "dyrate"):
        name, per_batch = f"compiled-{m}", {}
        rows = bench_rows(args, sizes, dev, f"compile-{m}", [m, m + "+compile"], sizes.compile_batches, torch.float32,
                          sizes.compile_layers, repeats=1)
        for B in sizes.compile_batches:
            eager, compiled = rows[(m, B)]["tokens"], list(rows[(m + "+compile", B)]["tokens"])
            if planted(args, name) and B == sizes.compile_batches[-1]:  # one compiled token changed
                compiled[len(compiled) // 2] += 1
            per_batch[B] = sum(a != b for a, b in zip(eager, compiled)) + abs(len(eager) - len(compiled))
        record(name, sum(per_batch.values()), "<=", 0, "tokens differing", per_batch=per_batch,
               tokens=sizes.new_tokens, layers=sizes.compile_layers or "all")


def copy_bandwidth(dev, nbytes, repeats=5):
    """Bytes per second a device-to-device copy moves (each byte read once and written once)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    generate.sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        y.copy_(x)
    generate.sync(dev)
    return 2 * nbytes * repeats / (time.perf_counter() - t0)


def slow_decode(method, B, factor):
    """--plant decode-METHOD-bB: that method's decode steps at batch B take `factor` times as long (a sleep after each
    step, proportional to it)."""
    step = model.Llava.decode_step

    def decode_step(self, token, positions, caches, pruner=None):
        t0 = time.perf_counter()
        logits = step(self, token, positions, caches, pruner)
        if pruner is not None and dyrate.rule_name(pruner.rule) == method and len(token) == B:
            generate.sync(token.device)
            time.sleep((factor - 1) * (time.perf_counter() - t0))
        return logits
    model.Llava.decode_step = decode_step


def run_speed(args, sizes, dev, record):
    """The pruned methods at each larger batch against none's decode speed, beside their bytes-read limits (one
    tools/bench.py run per batch, recorded as it ends); then none at batch 1, eager and compiled, against its
    roofline."""
    for name in args.plant:
        if name.startswith("decode-") and not name.endswith("-b1"):
            method, B = name.removeprefix("decode-").rsplit("-b", 1)
            slow_decode(method, int(B), SLOWDOWN * sizes.slower_bound)
    for B in sizes.speed_batches:
        rows = bench_rows(args, sizes, dev, f"speed-batch{B}", ["none", "fastv", "vtw", "dyrate"], [B], sizes.dtype)
        none = rows.get(("none", B))
        for m in ("fastv", "vtw", "dyrate"):
            r = rows.get((m, B))
            if r is None or none is None:
                print(f"decode-{m}-b{B}: bench.py left {m if r is None else 'none'} out at batch {B}", flush=True)
                continue
            record(f"decode-{m}-b{B}", r["decode_ms_per_token"] / none["decode_ms_per_token"], "<=",
                   sizes.slower_bound, "x none's ms/token", ms_per_token=r["decode_ms_per_token"],
                   none_ms_per_token=none["decode_ms_per_token"], bytes_read_limit=r["bytes_read_limit"],
                   kept_visual=r["kept_visual"][-1])
    one = bench_rows(args, sizes, dev, "speed-batch1", ["none", "none+compile"], [1], sizes.dtype)
    bandwidth = copy_bandwidth(dev, int(min(one[("none", 1)]["bytes_read_per_step"], 2**30)))
    for m in ("none", "none+compile"):
        name, r = f"decode-{m}-b1", one[(m, 1)]
        bw = bandwidth / 1e3 if planted(args, name) else bandwidth  # planted: a roofline 1000x too low
        tokens_per_s, roofline = 1e3 / r["decode_ms_per_token"], bw / r["bytes_read_per_step"]
        record(name, tokens_per_s / roofline, "<=", 1.0, "of the roofline", tokens_per_s=tokens_per_s,
               roofline_tokens_per_s=roofline, bytes_read_per_token=r["bytes_read_per_step"],
               copy_bandwidth_bytes_per_s=bw, note="above 1: the timing or the bytes-read count is wrong")


STEP_RUNS = dict(tests=run_tests, parity=run_parity, loading=run_loading, training=run_training,
                 dropping=run_dropping, compile=run_compile, speed=run_speed)


# ----------------------------------------------------------------------------------------------------------------------
# the run: each step in a process of its own, within its budget and the deadline


def run_steps(args, sizes, plan, scratch):
    """Each step in its own process group, killed at its budget or at the deadline; returns {step: outcome}."""
    start, outcomes = time.monotonic(), {}
    for step in plan:
        left = sizes.deadline - (time.monotonic() - start)
        results = os.path.join(args.out, f"{step}.json")
        if os.path.exists(results):  # an earlier run's
            os.remove(results)
        if left <= 0:
            outcomes[step] = dict(status="not run", seconds=0, why="no time left before the deadline")
            print(f"gpu_check: {step} not run (deadline)", flush=True)
            continue
        timeout = min(sizes.budgets[step], left)
        print(f"gpu_check: {step} (at most {timeout:.0f} s) ...", flush=True)
        cmd = [sys.executable, "-m", "tools.gpu_check", "--step", step, "--out", args.out, "--work", scratch] + \
            (["--dry-run"] if args.dry_run else []) + [a for p in args.plant for a in ("--plant", p)]
        t0 = time.monotonic()
        with open(os.path.join(args.out, f"{step}.log"), "w") as log:
            proc = subprocess.Popen(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the step and whatever it started (compile workers)
                proc.wait()
                code = None
        seconds = round(time.monotonic() - t0, 1)
        if code is None:
            why = f"killed at {'its budget' if timeout == sizes.budgets[step] else 'the deadline'} ({timeout:.0f} s)"
            outcomes[step] = dict(status="timed out", seconds=seconds, why=why)
        elif code:
            why = last_lines(os.path.join(args.out, f"{step}.log"))
            outcomes[step] = dict(status="error", seconds=seconds, why=why)
        else:
            outcomes[step] = dict(status="done", seconds=seconds)
        print(f"gpu_check: {step} {outcomes[step]['status']} in {seconds} s", flush=True)
        write_summary(args, sizes, plan, outcomes)
    return outcomes


def last_lines(path, n=6):
    with open(path) as f:
        return "\n".join(f.read().strip().splitlines()[-n:])


def write_summary(args, sizes, plan, outcomes):
    """OUT/summary.json and OUT/summary.txt: every check of the planned steps, those not measured as "not run"."""
    checks = {}
    for step, names in plan.items():
        path = os.path.join(args.out, f"{step}.json")
        got = {}
        if step in outcomes and os.path.exists(path):
            with open(path) as f:
                got = json.load(f)
        why = outcomes.get(step, {}).get("why", "the step has not run yet" if step not in outcomes else
                                         "the step ended without measuring it")
        for name in names:
            checks[name] = dict(step=step, **got[name]) if name in got else dict(step=step, status="not run", why=why)
    counts = Counter(c["status"] for c in checks.values())
    summary = dict(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else "cpu",
                   torch=torch.__version__, cuda=torch.version.cuda, dry_run=args.dry_run, planted=args.plant,
                   date=time.strftime("%Y-%m-%d %H:%M"), deadline_s=sizes.deadline, budgets_s=sizes.budgets,
                   counts=dict(counts), steps=outcomes, checks=checks)
    processing.write_json(os.path.join(args.out, "summary.json"), summary)
    lines = [f"{'check':28}{'status':>9}{'value':>12}  {'bound':14}unit"]
    for name, c in checks.items():
        value = f"{c['value']:12.4g}" if "value" in c else f"{'-':>12}"
        bound = f"{c['op']} {c['threshold']:g}" if "op" in c else c["why"].splitlines()[-1][:70]
        lines.append(f"{name:28}{c['status']:>9}{value}  {bound:14}{c.get('unit', '')}")
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "; steps: " +
                 ", ".join(f"{s} {o['status']} {o['seconds']} s" for s, o in outcomes.items()))

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
    processing.atomic_write(os.path.join(args.out, "summary.txt"), write)
    return summary, lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The CUDA path's verdict, check by check, in <= 10 minutes on one GPU.")
    p.add_argument("--out", required=True, help="folder for every output (summary.json, summary.txt, tables, logs)")
    p.add_argument("--dry-run", action="store_true", help="on the CPU at tiny shapes: every check's code path")
    p.add_argument("--steps", default=",".join(STEP_RUNS), help=f"comma-separated, of {', '.join(STEP_RUNS)} (run in "
                   f"this order)")
    p.add_argument("--deadline", type=float, default=None, help=f"seconds from the start after which no step runs "
                   f"(default {GPU.deadline:g}; dry run {DRY.deadline:g})")
    p.add_argument("--plant", action="append", default=[], metavar="CHECK", help="self-test of the checks: plant a "
                   "fault behind this check (repeatable), which must then fail and no other")
    p.add_argument("--work", default=None, help="scratch folder for the random checkpoint (default: a temporary one, "
                   "removed at the end)")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: run one step in this process
    return p.parse_args(argv)


def compile_buckets(sizes):
    """The most cache buckets (tools/fast.py) a decode step's window passes through in the compile step, where none's
    caches hold the prompt and the tokens fed back and fastv's half the image tokens fewer: a graph compiles for each
    segment, batch and bucket."""
    bucket = inspect.signature(fast.compile_decode).parameters["bucket"].default
    n_image = bench.geometry_config(sizes.geometry).n_image_tokens
    prompt = 1 + PROMPT_TEXT + n_image
    return max(len({-(-(prompt - gone + t) // bucket) for t in range(1, sizes.new_tokens)})
               for gone in (0, n_image // 2))


def plan_of(args, sizes):
    """{step: its checks} of the --steps asked for, in the default order; every --plant names one of their checks."""
    checks = checks_of(sizes)
    steps = args.steps.split(",")
    unknown = [s for s in steps if s not in checks]
    if unknown or not steps:
        raise ValueError(f"--steps {args.steps!r}: choose from {', '.join(checks)}")
    plan = {s: names for s, names in checks.items() if s in steps}
    wrong = [c for c in args.plant if not any(c in names for names in plan.values())]
    if wrong:
        raise ValueError(f"--plant {', '.join(wrong)}: not a check of the steps run; they are "
                         f"{', '.join(c for names in plan.values() for c in names)}")
    return plan


def main(argv=None):
    args = parse_args(argv)
    sizes = DRY if args.dry_run else GPU
    if args.step:  # one step, in this process (the parent started it)
        dev = torch.device("cpu" if args.dry_run else "cuda")
        if args.dry_run:  # NOTE: tiny shapes gain nothing from threads, and on a busy CPU spinning ones cost 40x
            torch.set_num_threads(1)
        STEP_RUNS[args.step](args, sizes, dev, Recorder(os.path.join(args.out, f"{args.step}.json"), args.plant))
        return
    with cli.user_errors():
        plan = plan_of(args, sizes)
        if not args.dry_run and not torch.cuda.is_available():
            raise ValueError("no CUDA GPU here: run it on a GPU machine, or with --dry-run (the script's logic, on "
                             "the CPU)")
        cli.check_writable_folder(os.path.join(args.out, "summary.json"), "--out", make=True)
    if args.deadline is not None:
        sizes = dataclasses.replace(sizes, deadline=args.deadline)
    print(f"gpu_check: {len(plan)} steps, {sum(map(len, plan.values()))} checks, at most "
          f"{min(sum(sizes.budgets[s] for s in plan), sizes.deadline):g} s (budgets: "
          f"{', '.join(f'{s} {sizes.budgets[s]} s' for s in plan)}; deadline {sizes.deadline:g} s)"
          + (f"; planted: {', '.join(args.plant)}" if args.plant else ""), flush=True)
    if "compile" in plan:
        buckets = compile_buckets(sizes)
        print(f"gpu_check: compile: {buckets} cache bucket(s) per segment, so at most "
              f"{5 * len(sizes.compile_batches) * buckets} graphs (none's, fastv's two, dyrate's two, at each batch)",
              flush=True)
    write_summary(args, sizes, plan, {})
    scratch = args.work or tempfile.mkdtemp(prefix="gpu-check-")
    try:
        outcomes = run_steps(args, sizes, plan, scratch)
    finally:
        if not args.work:
            shutil.rmtree(scratch, ignore_errors=True)
    summary, lines = write_summary(args, sizes, plan, outcomes)
    print("\n".join(lines))
    failed = summary["counts"].get("fail") or any(o["status"] == "error" for o in outcomes.values())
    sys.exit(1 if failed else 3 if summary["counts"].get("not run") else 0)


if __name__ == "__main__":
    main()
