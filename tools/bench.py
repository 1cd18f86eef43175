"""
Speed, FLOPs and memory of every method (none, fastv, vtw, dyrate) of our generation, eager and compiled, and of HF
transformers' generate on the same weights, side by side in one run.

    python -m tools.bench                                            # CPU, mid geometry (random weights)
    python -m tools.bench --geometry 7b --device cuda --dtype bfloat16 \
        --methods none,none+compile,fastv,dyrate,transformers
    python -m tools.bench --model path/to/llava-1.5-7b-hf --device cuda --dtype float16 \
        --batch-sizes 1,8,32 --memory-gib 80
    python -m tools.bench --geometry 7b --layers 4 --dtype bfloat16 --methods none,transformers  # 7B width, 4 layers

Each method generates --new-tokens greedy tokens for a prompt of 576 image + --prompt-tokens text tokens, at every
--batch-sizes batch (identical rows). After one warm-up run per method and batch, --repeats rounds run all of them in
turn (drift hits all alike); medians are reported, CUDA synchronised. Methods: any rule of dyrate.RULES with its
parameters (fastv:ratio=0.75, mass:eps=1e-5, ...); dyrate runs --predictor, else a predictor whose bias always picks
the constant --rate, so its per-step work is real; a bare ramp rises from --rate to 1 over the answer (compaction at
several steps); transformers (LlavaForConditionalGeneration, sdpa); a "+compile" suffix runs ours with
tools.fast.compile_decode.
Each rule prunes at its own layer K (vtw:k=15; dyrate.pruning_layer) unless --k sets one for all; vtw:k=match takes
the layer whose FLOPs ratio is closest to the method before it in --methods (fastv,vtw:k=match). Every model is built
in --dtype: random weights are created in it, once, and ours shares transformers' tensors; with --model, transformers
loads its own copy, and is left out of the default methods (one line says so) where that copy would not fit.
Memory is measured, never computed: the peak of each run (CUDA: the allocator's peak, weights included; CPU: the
process's peak resident set, Linux's VmHWM, reset before each run after the heap's free pages go back to the OS).
With --memory-gib, the largest batch that fits that memory is found for each of our methods by running it
(allocate the caches, prefill, decode): a batch fits when it runs without running out of memory (CUDA: the
allocator is capped at the budget, so an out-of-memory is real and caught) and its measured peak is within the
budget. The search starts at a linear guess from the batches timed, gallops to the boundary, then bisects; the
largest batch is then timed with the rest, and --plot draws tokens/s against batch size.
"""
import argparse
import gc
import os
import statistics
import sys
import time

import torch

import cli
import dyrate
import generate
import model
import processing
from tools import beam, costs, fast, memory, viz

GEOMETRIES = {  # (vision: hidden, layers, heads, intermediate), (text: hidden, layers, heads, intermediate)
    "tiny": ((64, 2, 2, 128), (64, 4, 4, 128)),  # for dry runs of scripts (tools/gpu_check.py --dry-run)
    "mid": ((512, 6, 8, 2048), (1024, 8, 16, 2816)),
    "7b": ((1024, 24, 16, 4096), (4096, 32, 32, 11008)),
    "13b": ((1024, 24, 16, 4096), (5120, 40, 40, 13824)),
}


DEFAULT_METHODS = "none,fastv,vtw,dyrate,ramp,transformers"


def geometry_config(geometry, layers=None):
    """Our LlavaConfig of a named geometry (LLaVA-1.5's vocabulary, 336 px images), with `layers` decoder layers
    (None: the geometry's own)."""
    (vh, vl, vn, vi), (th, tl, tn, ti) = GEOMETRIES[geometry]
    tl = tl if layers is None else layers
    return model.LlavaConfig(
        vision=model.VisionConfig(hidden_size=vh, num_hidden_layers=vl, num_attention_heads=vn, intermediate_size=vi),
        text=model.TextConfig(hidden_size=th, num_hidden_layers=tl, num_attention_heads=tn, num_key_value_heads=tn,
                              head_dim=th // tn, intermediate_size=ti))


def random_models(geometry, device, dtype, layers=None, seed=0):
    """A random-weight HF LLaVA of the geometry, built in `dtype` on `device` (no float32 copy first), and our Llava
    sharing the very same weight tensors."""
    from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig
    cfg = geometry_config(geometry, layers)
    v, t = cfg.vision, cfg.text
    vision = CLIPVisionConfig(hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
                              num_attention_heads=v.num_attention_heads, intermediate_size=v.intermediate_size,
                              image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
                       num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
                       vocab_size=32064, rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False)
    hf_cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, pad_token_id=32001)
    torch.manual_seed(seed)
    with torch.device(device):  # NOTE: dtype= makes transformers create (and initialise) each weight in dtype
        hf = AutoModelForImageTextToText.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa").eval()
    with torch.device("meta"):
        ours = model.Llava(cfg)
    return hf, share_weights(ours, {model.canonical_key(k): v for k, v in hf.state_dict().items()}, device)


def share_weights(llava, state, device):
    """Our Llava on `state`'s very tensors (no copy)."""
    llava.load_state_dict(state, strict=True, assign=True)
    llava.language_model.model.inv_freq = model.rope_inv_freq(llava.config.text).to(device)
    return llava.eval().requires_grad_(False)


def checkpoint_models(folder, device, dtype, need_hf):
    """Our Llava from a checkpoint folder, and transformers' from the same files (its own copy of the weights)."""
    ours = cli.load_model(folder, device, dtype)
    if not need_hf:
        return None, ours
    from transformers import LlavaForConditionalGeneration
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    return hf.to(device).eval(), ours


def constant_predictor(n_heads, rate, k, device):
    """A rate predictor whose bias always picks `rate`: the real per-step work of dyrate at a known rate."""
    rates = sorted({0.0, float(rate), 1.0})
    predictor = dyrate.RatePredictor(n_heads, rates, k)
    with torch.no_grad():
        predictor.linear.bias[rates.index(float(rate))] = 10.0
    return predictor.to(device)


def method_rule(method, predictor, args, cfg):
    """A --methods entry's rule and its pruning layer K (--k, else the rule's own): dyrate runs `predictor`, a bare
    ramp rises from --rate to 1 over the answer."""
    rule = (dyrate.Learned(predictor) if method.split(":")[0] == "dyrate" else
            dyrate.Ramp(args.rate, args.new_tokens) if method == "ramp" else dyrate.parse_rule(method))
    return rule, dyrate.pruning_layer(cfg.text.num_hidden_layers, args.k, rule)


def is_out_of_memory(error):
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in ("can't allocate memory", "out of memory")))


def largest_batch(fits, guess):
    """The largest batch B for which fits(B) holds, found by running: from `guess`, gallop up (or down) in doubling
    steps until the answer changes, then bisect. fits is called at most once per batch, and on B + 1 too (False).
    Returns B (0: batch 1 does not fit)."""
    tried = {}

    def ok(b):
        if b not in tried:
            tried[b] = fits(b)
        return tried[b]
    step, B = 1, max(1, guess)
    if ok(B):
        lo = B
        while ok(lo + step):
            lo, step = lo + step, step * 2
        hi = lo + step
    else:
        hi = B
        while hi - step >= 1 and not ok(hi - step):
            hi, step = hi - step, step * 2
        lo = max(0, hi - step)
    while hi - lo > 1:  # lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def interleaved(fns, repeats, log):
    """One warm-up run of each function, then `repeats` rounds of all in turn; the median of each timing, the last
    run's other results."""
    for i, fn in enumerate(fns):
        log(f"warm-up {i + 1}/{len(fns)}")
        fn()
    runs = []
    for r in range(repeats):
        log(f"round {r + 1}/{repeats}")
        runs.append([fn() for fn in fns])
    return [dict(runs[-1][i], **{key: statistics.median(run[i][key] for run in runs)
                                 for key in ("prefill_s", "decode_s")}) for i in range(len(fns))]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Speed, FLOPs and memory of each method, and of transformers, on the "
                                            "same weights.")
    g = cli.add_model_args(p, default_model=None, default_device="cpu")
    g.add_argument("--geometry", choices=sorted(GEOMETRIES), default="mid", help="random-weight model of this size "
                   "(without --model)")
    g.add_argument("--layers", type=int, default=None, help="decoder layers of the --geometry (default: its own, 32 "
                   "for 7b): fewer for a quick check, e.g. memory per layer")
    g = p.add_argument_group("methods")
    g.add_argument("--methods", default=None,
                   help=f"comma-separated: transformers, or our rules with their parameters "
                        f"({', '.join(dyrate.RULES)}, e.g. fastv:ratio=0.75, vtw:k=15); add +compile to one of "
                        f"ours for the compiled decode path (e.g. none+compile), +beamN for beam search with N beams "
                        f"(e.g. fastv+beam5). Without --predictor, dyrate's predictor always picks --rate; ramp runs "
                        f"from --rate to 1 over the answer. Default: {DEFAULT_METHODS}, but with --model without "
                        f"transformers where its own copy of the weights would not fit (named here, it runs unless "
                        f"the two copies alone exceed the device's available memory: an error)")
    cli.add_k_arg(g)
    g.add_argument("--predictor", default=None, help="DyRate rate predictor file written by train.py (for dyrate)")
    g.add_argument("--rate", type=float, default=0.5, help="the stand-in predictor's constant rate and the ramp's "
                   "start (rules named without parameters)")
    g.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the +compile methods "
                   "(eager or aot_eager check the path without compiling code)")
    g = p.add_argument_group("workload")
    g.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per run")
    g.add_argument("--prompt-tokens", type=int, default=40, help="text tokens around the 576 image tokens")
    g.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (identical rows)")
    g.add_argument("--memory-gib", type=float, default=None,
                   help="find, by running it, the largest batch of each of our methods that fits this memory, and "
                        "time it too")
    g.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported) after one warm-up")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    g.add_argument("--out", default="bench.json", help="JSON results file")
    g.add_argument("--plot", default=None, help="also draw tokens/s against batch size per method into this PNG")
    g.add_argument("--profile", action="store_true", help="also split each of our runs' decode ms/token into "
                   "attention, MLP/projections, DyRate's own work and the rest (one profiled run each)")
    g.add_argument("--prefill-rows", type=int, default=0, help="run prefills in chunks of this many rows "
                   "(tools.fast.chunk_prefill): the largest batch is then set by the KV caches; 0: one pass")
    return p.parse_args(argv)


def variant(method):
    """'fastv+compile+beam5' -> ('fastv', True, 5): the method, compiled decode, beam search with N beams (0: none)."""
    parts = method.split("+")
    beams = [p for p in parts[1:] if p.startswith("beam")]
    try:
        n = int(beams[0][4:]) if beams else 0
    except ValueError:
        n = -1
    return parts[0], "compile" in parts[1:], n if len(parts) == 1 + ("compile" in parts[1:]) + bool(beams) else -1


def check_args(args, available=None):
    """Every argument checked before any model is built or timed, and with --model, room made for transformers' copy
    of the weights (room_for_transformers; available: the device's free bytes, None: measured). Returns the methods,
    batch sizes, the device and the predictor dyrate runs (--predictor's, else one of the constant --rate)."""
    named = args.methods is not None
    methods = (args.methods or DEFAULT_METHODS).split(",")
    for m in methods:
        base, compiled, beams = variant(m)
        if base == "transformers" and (compiled or beams) or beams == 1 or not m:
            raise ValueError(f"{m!r} in --methods: +compile and +beamN (N >= 2 beams) are for our rules only")
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch-sizes {args.batch_sizes!r}: give whole numbers >= 1, e.g. 1,8,32")
    for name, value, low in (("--new-tokens", args.new_tokens, 2), ("--prompt-tokens", args.prompt_tokens, 5),
                             ("--repeats", args.repeats, 1), ("--threads", args.threads, 0),
                             ("--prefill-rows", args.prefill_rows, 0)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}" + (
                " (decode is timed over the tokens after the first)" if name == "--new-tokens" else ""))
    if args.layers is not None and (args.model or args.layers < 2):
        raise ValueError(f"--layers {args.layers}: the decoder depth of a --geometry, at least 2 (a --model has its "
                         f"own)")
    dev = cli.device(args.device)
    if args.memory_gib is not None:
        check_budget(args.memory_gib, dev)
    dyrate.fraction("--rate", args.rate)
    cfg = cli.config(args.model) if args.model else geometry_config(args.geometry, args.layers)
    cfg.check_length(1 + args.prompt_tokens + cfg.n_image_tokens + args.new_tokens)
    predictor = (dyrate.RatePredictor.load(args.predictor, cfg, dev) if args.predictor else constant_predictor(
        cfg.text.num_attention_heads, args.rate, dyrate.pruning_layer(cfg.text.num_hidden_layers, args.k), dev))
    costs.check_matches([variant(m)[0] for m in methods])
    for m in methods:  # an unknown rule or parameter, or a K out of range, is an error here
        if m != "transformers":
            method_rule(variant(m)[0].replace(costs.MATCH, ""), predictor, args, cfg)
    cli.check_writable_folder(args.out, "--out", make=True)
    if args.plot:
        cli.check_writable_folder(args.plot, "--plot", make=True)
    if args.model and "transformers" in methods:
        rows = max(batches) * max(max(variant(m)[2], 1) for m in methods)
        methods = room_for_transformers(methods, named, args, cfg, dev, rows, available)
    args.methods = ",".join(methods)
    return methods, batches, dev, predictor


def available_memory(dev):
    """The bytes the device can still give: CUDA's free memory, else Linux's MemAvailable (or the free pages)."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def room_for_transformers(methods, named, args, cfg, dev, rows, available=None):
    """--model DIR: transformers loads its own copy of the weights from the files, beside ours (random weights are
    shared). Where both copies, the KV caches of `rows` rows and a tenth of the weights (activations) exceed the
    `available` bytes (None: available_memory), transformers is left out of the default methods, with one line saying
    so; named in --methods, it runs unless the two copies alone exceed them (an error). Returns the methods to run."""
    dtype, t = cli.dtype(args.dtype, dev), cfg.text
    with torch.device("meta"):
        weights = sum(p.numel() for p in model.Llava(cfg).parameters()) * dtype.itemsize
    tokens = 1 + args.prompt_tokens + cfg.n_image_tokens + args.new_tokens
    caches = rows * tokens * 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * dtype.itemsize
    need, available = 2 * weights + caches + weights // 10, available_memory(dev) if available is None else available
    what = (f"transformers' own copy of the weights of {args.model} ({weights / 2**30:.2f} GiB in "
            f"{str(dtype).removeprefix('torch.')}) beside ours")
    if named and 2 * weights > available:
        raise ValueError(f"--methods transformers: {what} needs {2 * weights / 2**30:.2f} GiB, but {dev} has "
                         f"{available / 2**30:.2f} GiB available; drop transformers from --methods or use a smaller "
                         f"--dtype")
    if named or need <= available:
        return methods
    log(f"transformers left out: {what}, with the caches, needs ~{need / 2**30:.2f} GiB, but {dev} has "
        f"{available / 2**30:.2f} GiB available; name it in --methods to run it anyway, or use a smaller --dtype")
    return [m for m in methods if m != "transformers"]


def check_budget(gib, dev):
    """--memory-gib: positive, measurable on this device, and safe to search (a try may need up to ~2x the budget
    on CPU, where nothing caps it)."""
    if not gib > 0:
        raise ValueError(f"--memory-gib must be positive, got {gib}")
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        if gib * 2**30 > total:
            raise ValueError(f"--memory-gib {gib:g} is more than the {total / 2**30:.1f} GiB of {dev}")
        return
    if not memory.reset_resident_peak():
        raise ValueError("--memory-gib on CPU measures each run's peak resident set through /proc/self/clear_refs, "
                         "which this system does not offer; use a CUDA device or drop --memory-gib")
    free = available_memory(dev)
    if 2 * gib * 2**30 > free:
        raise ValueError(f"--memory-gib {gib:g}: the search may try batches needing twice the budget, but only "
                         f"{free / 2**30:.1f} GiB of memory is available; pass at most {free / 2**31:.1f}")


def build_models(args, methods, dev, dtype):
    """transformers' model (if a method needs it), ours on the same weights, and a second Llava on the same tensors
    with its decode compiled (if a +compile method needs it). Both run the fast path (tools/fast.py): KV caches that
    drop by moves, without waiting for the host."""
    log(f"building {args.model or args.geometry} on {dev} in {args.dtype} ...")
    hf, ours = checkpoint_models(args.model, dev, dtype, "transformers" in methods) if args.model else \
        random_models(args.geometry, dev, dtype, args.layers)
    ours.cache_class = fast.FastKVCache
    fast.chunk_prefill(ours, args.prefill_rows)
    compiled = None
    if any(variant(m)[1] for m in methods):
        with torch.device("meta"):
            compiled = model.Llava(ours.config)
        compiled = fast.compile_decode(share_weights(compiled, ours.state_dict(), dev), args.compile_backend)
        fast.chunk_prefill(compiled, args.prefill_rows)
    return hf, ours, compiled


def profiler_labels(llava):
    """--profile's labels, put in from outside the model: forward hooks open a profiler label as each decoder layer's
    attention block ("self_attn"), its projections ("projections") and MLP ("mlp") start, and close it as they end
    (none inside compiled code, which traces no label). Returns the hooks' handles."""
    handles = []
    for layer in llava.language_model.model.layers:
        a = layer.self_attn
        for module, name in [(a, "self_attn"), (layer.mlp, "mlp")] + [(p, "projections") for p in
                                                                       (a.q_proj, a.k_proj, a.v_proj, a.o_proj)]:
            labels = []

            def enter(module, args, name=name, labels=labels):
                if not torch.compiler.is_compiling():
                    labels.append(torch.profiler.record_function(name).__enter__())

            def leave(module, args, output, labels=labels):
                if labels and not torch.compiler.is_compiling():
                    labels.pop().__exit__(None, None, None)
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


class LabelledPruner(dyrate.Pruner):
    """A Pruner whose work carries the profiler label "dyrate" (--profile: the method's own work)."""

    def __call__(self, *args):
        with torch.profiler.record_function("dyrate"):
            return super().__call__(*args)


class Workload:
    """One prompt (576 image tokens inside --prompt-tokens of text) and --new-tokens greedy tokens, run by any method
    at any batch size (identical rows); run() times it and measures its peak memory."""

    def __init__(self, args, hf, ours, compiled, predictor, dev):
        self.args, self.hf, self.ours, self.compiled, self.dev = args, hf, ours, compiled, dev
        self.cfg, self.predictor = ours.config, predictor
        self.matched = {}  # vtw:k=match -> the rule it stands for, vtw:k=K (match_vtw)
        torch.manual_seed(1)
        self.text = torch.randint(3, self.cfg.image_token_index, (args.prompt_tokens,), device="cpu").tolist()

    def rule(self, method):
        """A method's rule and K, None for none and transformers."""
        base = variant(method)[0]
        return None if base in ("none", "transformers") else \
            method_rule(self.matched.get(base, base), self.predictor, self.args, self.cfg)

    def prompt(self, method):
        """The prompt's ids: the image's ids (576, fewer for a rule that compresses it: VisionZip) at index 6."""
        rule, N = self.rule(method), self.cfg.n_image_tokens
        n = rule[0].image_tokens(N) if rule else N
        return [self.cfg.bos_token_id] + self.text[:5] + [self.cfg.image_token_index] * n + self.text[5:]

    def pruner(self, method, B):
        T, N = len(self.prompt(method)), self.cfg.n_image_tokens
        start, length = torch.full((B,), 6, device=self.dev), torch.full((B,), T, device=self.dev)
        if method == "none":
            return None
        rule, k = self.rule(method)
        return LabelledPruner(rule, N, start, length, k, stats=isinstance(rule, dyrate.Learned))

    def match_vtw(self, methods, log):
        """Each vtw:k=match of `methods` at the layer whose FLOPs ratio is closest to the method before it, run once at
        batch 1 to read its kept counts (every row and batch prunes alike here)."""
        n = self.args.new_tokens
        for before, m in zip(methods, methods[1:]):
            base = variant(m)[0]
            if costs.MATCH in base and base not in self.matched:
                T = len(self.prompt(before))
                ratio = costs.row_costs(self.cfg, dict(self.run(before, 1)["hook"].summary(0, n), prompt_tokens=T))
                k = costs.matched_layer(self.cfg, [(T, n)], ratio["flops_ratio"])
                self.matched[base] = f"vtw:k={k}"
                log(f"{base}: K={k}, the layer whose FLOPs ratio is closest to {before}'s {ratio['flops_ratio']:.3f}")

    def inputs(self, B, method="none"):
        """The prompt ids (B, T) and pixel values (B, 3, S, S) of B identical rows."""
        ids = torch.tensor([self.prompt(method)] * B, device=self.dev)
        S = self.cfg.vision.image_size
        px = torch.randn(1, 3, S, S, device=self.dev, generator=torch.Generator(self.dev).manual_seed(0))
        return ids, px.to(self.ours.language_model.lm_head.weight.dtype).expand(B, -1, -1, -1)  # (B, 3, S, S)

    def steps(self, method, B):
        """Our generation as the one decode loop's iterator (prefill first), with its pruner; +beamN: beam search,
        each of the B prompts with N beams (B * N rows), the decode loop's chooser transformers' beam search."""
        base, compiled, beams = variant(method)
        llava, rows = self.compiled if compiled else self.ours, B * max(beams, 1)
        ids, px = self.inputs(rows, base)
        hook, caches = self.pruner(base, rows), llava.new_caches(rows, self.args.new_tokens)
        lengths = torch.full((rows,), ids.shape[1], device=self.dev)
        choose = beam.BeamSearch(B, beams, self.args.new_tokens, None, caches, hook).choose if beams else None
        steps = generate.decode(llava, ids, lengths, px, caches, self.args.new_tokens, hook, choose)
        return ((token[::max(beams, 1)], logits) for token, logits in steps), hook  # each prompt's first beam

    @torch.inference_mode()
    def run(self, method, B):
        memory.reset_peak(self.dev)
        if method == "transformers":
            return self.run_transformers(*self.inputs(B))
        steps, hook = self.steps(method, B)
        generate.sync(self.dev)
        t0 = time.perf_counter()
        out = [next(steps)[0]]  # the prefill and the first token
        generate.sync(self.dev)
        t1 = time.perf_counter()
        out += [token for token, _ in steps]
        generate.sync(self.dev)
        t2 = time.perf_counter()
        return dict(prefill_s=t1 - t0, decode_s=t2 - t1, tokens=torch.stack(out, 1)[0].tolist(), hook=hook,
                    memory=memory.peak(self.dev))

    @torch.inference_mode()
    def profile(self, method, B):
        """One run's decode steps under torch's profiler: ms per token in attention (the attention blocks without
        their projections: RoPE, cache writes and masks included), MLP and projections, DyRate's own work
        (statistics, predictor, ranking, dropping: the pruner), and the rest (norms, embeddings, LM head, sampling,
        compaction at a step that drops nothing, and the decode loop's Python); their sum is what the profiler saw
        under one "decode step" label per step, and the step time measured around the profiler should come near it
        (what it does not see: the profiler's own work and this loop)."""
        compiled = variant(method)[1]
        handles = profiler_labels(self.compiled if compiled else self.ours)
        if compiled:  # torch.compile guards on the hooks: compile with them before measuring
            self.run(method, B)
        steps, _ = self.steps(method, B)
        next(steps)
        cuda = self.dev.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        generate.sync(self.dev)
        with torch.profiler.profile(activities=activities) as prof:
            t0, n = time.perf_counter(), 0
            while True:
                with torch.profiler.record_function("decode step"):  # the whole step, the loop's Python included
                    done = next(steps, None) is None
                if done:
                    break
                n += 1
            generate.sync(self.dev)
            seconds = time.perf_counter() - t0
        for handle in handles:
            handle.remove()
        cats = {"self_attn": "attention", "mlp": "mlp/projections", "projections": "mlp/projections",
                "dyrate": "dyrate"}
        split, total = dict.fromkeys(("attention", "mlp/projections", "dyrate", "rest"), 0.0), 0.0
        for e in prof.events():
            if e.device_type != torch.autograd.DeviceType.CPU:  # a GPU's copy of a label: its host event counts it
                continue
            ms = (e.device_time_total if cuda and e.device_time_total else e.cpu_time_total) / 1e3 / n
            if e.cpu_parent is None:  # the top-level events: the decoder's forward, the embedding, the LM head, ...
                total += ms
            if e.name in cats:  # the labels, which nest only as projections inside self_attn
                split[cats[e.name]] += ms
                split["attention"] -= ms if e.name == "projections" else 0
        split["rest"] = total - sum(split.values())
        return dict(step_ms=seconds * 1e3 / n, **{f"{k}_ms": v for k, v in split.items()})

    def run_transformers(self, ids, px):
        """A 1-token generation times the prefill; the rest of an n-token one is decode."""
        times = []
        for count in (1, self.args.new_tokens):  # NOTE: eos_token_id=None: exactly `count` tokens, EOS never masked
            generate.sync(self.dev)
            t0 = time.perf_counter()
            out = self.hf.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids),
                                   do_sample=False, max_new_tokens=count, eos_token_id=None,
                                   pad_token_id=self.cfg.pad_token_id, return_dict_in_generate=True)
            generate.sync(self.dev)
            times.append(time.perf_counter() - t0)
        return dict(prefill_s=times[0], decode_s=times[1] - times[0], tokens=out.sequences[0, ids.shape[1]:].tolist(),
                    hook=None, memory=memory.peak(self.dev))

    def row(self, method, B, r, largest):
        """One result row: timings, the FLOPs and KV bytes of the first row (all rows are alike), memory, tokens."""
        cfg, N, n, hook = self.cfg, self.cfg.n_image_tokens, self.args.new_tokens, r["hook"]
        T = len(self.prompt(method))
        dtype = self.ours.language_model.lm_head.weight.dtype

        def summary(steps):  # the first `steps` steps: kept counts, FLOPs, KV bytes (no pruner: K changes no cost)
            row = hook.summary(0, steps) if hook else dict(kept_visual=[N] * steps, probes=0, predictor_flops=0,
                                                           k=dyrate.DEFAULT_K, kept_stages=[N] * steps,
                                                           stages=dyrate.DEFAULT_K, prompt_cut=0, compressed=None)
            return dict(row, **costs.row_costs(cfg, dict(row, prompt_tokens=T), dtype))
        whole, first = summary(n), summary(1)
        total_s = r["prefill_s"] + r["decode_s"]
        weights = sum(p.numel() * p.element_size() for name, p in self.ours.language_model.named_parameters()
                      if "embed_tokens" not in name)  # what every decode step reads, besides the KV caches
        rows = B * max(variant(method)[2], 1)  # beam search: a row per beam
        read, read_none = (weights + rows * whole[key] / (n - 1) for key in ("kv_bytes_read", "kv_bytes_read_none"))
        return dict(method=method, k=hook and hook.k, batch=B, prefill_ms=r["prefill_s"] * 1e3,
                    decode_ms_per_token=r["decode_s"] * 1e3 / (n - 1), total_ms=total_s * 1e3,
                    tokens_per_s=B * n / total_s, prefill_tflops=B * first["flops"] / 1e12,
                    tflops=B * whole["flops"] / 1e12, kept_visual=whole.get("kept_visual", [N] * n),
                    nocache_tflops=B * whole["nocache_flops"] / 1e12, mean_kv_bytes=B * whole["mean_kv_bytes"],
                    peak_memory_bytes=r["memory"], kv_cache_bytes=B * whole["kv_cache_bytes"], tokens=r["tokens"],
                    largest=largest, bytes_read_per_step=read, bytes_read_limit=read / read_none)


def measure(work, methods, batches, log):
    """Every method at every batch in interleaved rounds; with --memory-gib, each method's largest batch found by
    running it, then timed in rounds of its own. Returns the result rows and the searches."""
    args = work.args
    jobs = [(m, B) for B in batches for m in methods]
    log(f"timing {len(methods)} methods x {len(batches)} batch sizes: {len(jobs)} runs per round")
    results = interleaved([lambda m=m, B=B: work.run(m, B) for m, B in jobs], args.repeats, log)
    searches = {}
    if args.memory_gib:
        peaks = {job: r["memory"] for job, r in zip(jobs, results)}
        searches = search_largest(args, methods, peaks, work.run, work.dev, log)
        extra = [(m, s["largest"]) for m, s in searches.items() if s["largest"] and (m, s["largest"]) not in peaks]
        if extra:
            log(f"timing the largest batches: {len(extra)} runs per round")
            results += interleaved([lambda m=m, B=B: work.run(m, B) for m, B in extra], args.repeats, log)
            jobs += extra
    rows = [work.row(m, B, r, B == searches.get(m, {}).get("largest") and B not in batches)
            for (m, B), r in zip(jobs, results)]
    if args.profile:
        for row in rows:
            if row["method"] != "transformers":
                log(f"profiling {row['method']} at batch {row['batch']}")
                row["profile"] = work.profile(row["method"], row["batch"])
    return rows, searches


def save(rows, searches, args, work, dev):
    """The JSON results and, with --plot, the throughput plot, each written atomically."""
    weights = sum(t.numel() * t.element_size() for t in work.ours.state_dict().values())
    result = dict(vars(args), prompt_tokens_total=len(work.prompt("none")), weights_bytes=weights,
                  device_name=device_name(dev), results=rows, largest_batch=searches)
    processing.write_json(args.out, result)
    log(f"wrote {args.out}")
    if args.plot:
        title = f"{args.model or args.geometry + ' geometry'}, {device_name(dev)}, {args.dtype}: tokens/s vs batch" + (
            f" (--memory-gib {args.memory_gib:g})" if args.memory_gib else "")
        processing.atomic_write(args.plot, lambda tmp: viz.throughput_plot(rows, title).save(tmp, format="PNG"))
        log(f"wrote {args.plot}")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors():
        methods, batches, dev, predictor = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = cli.dtype(args.dtype, dev)
    args.dtype = str(dtype).removeprefix("torch.")
    hf, ours, compiled = build_models(args, methods, dev, dtype)
    work = Workload(args, hf, ours, compiled, predictor, dev)
    work.match_vtw(methods, log)
    rows, searches = measure(work, methods, batches, log)
    report(rows, args, ours.config, len(work.prompt("none")), searches)
    save(rows, searches, args, work, dev)
    return rows


def search_largest(args, methods, peaks, run, dev, log):
    """For each of our methods (+compile ones and transformers excluded), the largest batch whose run fits
    --memory-gib, by running it (largest_batch). Returns {method: dict(largest, tried={batch: peak bytes or
    'out of memory'})}."""
    budget = args.memory_gib * 2**30
    cuda = torch.device(dev).type == "cuda"
    if cuda:  # allocations beyond the budget fail for real
        torch.cuda.set_per_process_memory_fraction(budget / torch.cuda.get_device_properties(dev).total_memory, dev)
    out = {}
    try:
        for m in methods:
            if m == "transformers" or variant(m)[1] or variant(m)[2]:
                continue
            tried = {}

            def fits(B):
                try:
                    tried[B] = run(m, B)["memory"]
                except Exception as e:
                    if not is_out_of_memory(e):
                        raise
                    tried[B] = "out of memory"
                gc.collect()
                ok = tried[B] != "out of memory" and tried[B] <= budget
                peak = tried[B] if isinstance(tried[B], str) else f"peak {tried[B] / 2**30:.2f} GiB"
                log(f"largest batch of {m} in {args.memory_gib:g} GiB: batch {B} -> {peak}, "
                    f"{'fits' if ok else 'does not fit'}")
                return ok
            largest = largest_batch(fits, guess_batch(m, peaks, budget, log))
            out[m] = dict(largest=largest, tried={b: tried[b] for b in sorted(tried)})
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
    return out


def guess_batch(method, peaks, budget, log):
    """Where the search starts: the budget on the line through the measured peaks of the method's two largest
    batches timed ({(method, batch): bytes}), or in proportion to one."""
    pts = sorted((B, p) for (m, B), p in peaks.items() if m == method)[-2:]
    (b1, m1), (b2, m2) = pts if len(pts) == 2 else ((0, 0), pts[0])
    per_row = max((m2 - m1) / (b2 - b1), 1.0)
    guess = max(1, int((budget - (m2 - per_row * b2)) // per_row))
    log(f"largest batch of {method}: {per_row / 2**20:.1f} MiB per row between the batches timed; the search starts "
        f"at {guess}")
    return guess


def device_name(dev):
    if torch.device(dev).type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU, {torch.get_num_threads()} threads"


def report(rows, args, cfg, T, searches):
    """The table on stdout (ratios to none at the same batch), and the comparisons the README quotes."""
    mem = "peak MiB" if torch.device(args.device).type == "cuda" else "RSS MiB"
    k = f"--k {args.k} for every rule" if args.k else "each rule's own"
    print(f"\n{args.model or args.geometry + ' geometry (random weights)'}, {device_name(args.device)}, {args.dtype}, "
          f"prompt {T} tokens ({cfg.n_image_tokens} image; VisionZip's fewer), {args.new_tokens} greedy new tokens, "
          f"K: {k}, "
          f"rate {args.rate}, median of {args.repeats} interleaved rounds; (x) = ratio to none at the same batch; "
          f"{mem}: the run's measured peak")
    print(f"{'method':20}{'K':>3}{'batch':>6}{'prefill ms':>11}{'(x)':>6}{'prefill TF':>11}{'(x)':>6}"
          f"{'decode ms/tok':>14}{'(x)':>6}{'limit':>6}{'total ms':>10}{'tok/s':>8}{'TFLOPs':>8}{'(x)':>6}"
          f"{'no-cache':>9}{mem:>10}{'KV MiB':>8}{'mean KV':>8}{'(x)':>6}{'kept':>9}")
    by = {(r["method"], r["batch"]): r for r in rows}
    for r in rows:
        base = by.get(("none", r["batch"]))

        def ratio(key):
            return f"{r[key] / base[key]:6.2f}" if base else f"{'-':>6}"
        print(f"{r['method']:20}{r['k'] or '-':>3}{r['batch']:6d}{r['prefill_ms']:11.1f}{ratio('prefill_ms')}"
              f"{r['prefill_tflops']:11.4f}{ratio('prefill_tflops')}{r['decode_ms_per_token']:14.2f}{ratio('decode_ms_per_token')}"
              f"{r['bytes_read_limit']:6.2f}{r['total_ms']:10.1f}{r['tokens_per_s']:8.1f}{r['tflops']:8.3f}"
              f"{ratio('tflops')}"
              f"{ratio('nocache_tflops'):>9}{r['peak_memory_bytes'] / 2**20:10.0f}{r['kv_cache_bytes'] / 2**20:8.1f}"
              f"{r['mean_kv_bytes'] / 2**20:8.1f}{ratio('mean_kv_bytes')}"
              f"{str(r['kept_visual'][0]) + '->' + str(r['kept_visual'][-1]):>9}")
    for (m, B), r in by.items():
        if m == "transformers" and ("none", B) in by:
            ours = by[("none", B)]
            print(f"batch {B}: ours (none) vs transformers: same tokens {ours['tokens'] == r['tokens']}, end to end "
                  f"{r['total_ms'] / ours['total_ms']:.2f}x as fast, prefill "
                  f"{r['prefill_ms'] / ours['prefill_ms']:.2f}x, decode "
                  f"{r['decode_ms_per_token'] / ours['decode_ms_per_token']:.2f}x")
        fastv = by.get(("fastv", B))
        if m == "dyrate" and fastv and not args.predictor:  # same kept tokens: the difference is DyRate's work
            print(f"batch {B}: DyRate per-step overhead (statistics + predictor, same kept tokens as fastv): "
                  f"{r['decode_ms_per_token'] / fastv['decode_ms_per_token'] - 1:+.1%} of a decode step")
        if m == "ramp" and fastv:
            print(f"batch {B}: ramp (statistics + cache compaction at {len(set(r['kept_visual'])) - 1} steps, "
                  f"mean KV {r['mean_kv_bytes'] / fastv['mean_kv_bytes']:.2f}x fastv's): decode "
                  f"{r['decode_ms_per_token'] / fastv['decode_ms_per_token'] - 1:+.1%} vs fastv")
    if any("profile" in r for r in rows):
        print("decode ms/token, profiled (one run each): attention | MLP/projections | DyRate's own work | rest = sum "
              "(step measured around the profiler)")
    for r in rows:
        if "profile" in r:
            p = r["profile"]
            parts = [p[f"{k}_ms"] for k in ("attention", "mlp/projections", "dyrate", "rest")]
            print(f"{r['method']:20}{r['batch']:6d}" + " | ".join(f"{v:8.2f}" for v in parts) + f" = {sum(parts):8.2f} "
                  f"({p['step_ms']:.2f}); DyRate {p['dyrate_ms'] / p['step_ms']:.1%} of the step")
    print("limit: the decode step's bytes read (weights + KV caches, dyrate.kv_bytes_read) as a ratio to none's: what "
          "a memory-bound step can reach")
    none = searches.get("none", {}).get("largest")
    for m, s in searches.items():
        B, top = s["largest"], by.get((m, s["largest"]))
        over = s["tried"].get(B + 1)
        over = over if isinstance(over, str) else f"peak {over / 2**30:.2f} GiB"
        timed = f", peak {top['peak_memory_bytes'] / 2**30:.2f} GiB, {top['tokens_per_s']:.1f} tokens/s" if top else ""
        print(f"{m}: largest batch in {args.memory_gib:g} GiB: {B}" + (f" ({B / none:.2f}x none's)" if none else "")
              + f"{timed}; batch {B + 1}: {over} (measured: {len(s['tried'])} runs)")


if __name__ == "__main__":
    main()
