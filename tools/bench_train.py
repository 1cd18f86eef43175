"""
What a train.py step costs at LLaVA-1.5's real width, measured on any machine, and what it would cost at full depth.

    python -m tools.bench_train --geometry 7b --layers 4,5,6 --out runs/train-7b.json  # memory per setting (CPU ok)
    python -m tools.bench_train --geometry 13b --layers 4,5 --out runs/train-13b.json
    python -m tools.bench_train --geometry mid --time --out runs/train-time.json  # time: checkpointing, distillation

Memory (default): a random-weight checkpoint of the geometry's full width (hidden size, heads, MLP, CLIP-L, 576 image
tokens) but only --layers decoder layers is written in the hub layout and loaded; one train_step (train.py's) runs on
--batch-size samples of 617 prompt + 64 answer tokens under each setting: --batch-size at once (train.py's defaults),
checkpointing, checkpointing with micro-batches of 2 and of 1. Measured per step: the peak bytes of the live tensors
(what a GPU would hold besides the weights), the bytes autograd keeps for the backward pass, the process's peak
resident set (CUDA: the allocator's peak), the FLOPs (torch's FlopCounterMode, in a run of its own) and seconds. Each
is fitted as a + b * (layers - K) over the layer counts and extrapolated to the geometry's real depth (32 layers for
7B, 40 for 13B), with the real model's weights added. Measure at >= K + 2 layers: with a single layer >= K the
backward pass needs no gradient for that layer's input, so the smallest model's peak is lower than the line.

Time (--time): in interleaved rounds on the same model, a step without and with checkpointing (their time ratio), and
self-distillation at batch 8 against batch 1 (samples/s).
"""
import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

import cli
import dyrate
import generate
import model
import processing
import train
from tools import bench, distill, memory, tokenizer

SETTINGS = {  # name -> train.py flags (besides --batch-size)
    "defaults": [],
    "checkpoint": ["--checkpoint"],
    "checkpoint, micro-batch 2": ["--checkpoint", "--micro-batch-size", "2"],
    "checkpoint, micro-batch 1": ["--checkpoint", "--micro-batch-size", "1"],
}
PROMPT, ANSWER = 617, 64  # llava-hf's template around 576 image tokens and a short question; a detailed answer
CORPUS = ["USER: Describe the picture in detail. ASSISTANT: A red circle and a blue square on a white background."] * 20


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """torch's FlopCounterMode has SDPA formulas for the CUDA kernels only: the CPU kernel gets the same one."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# ----------------------------------------------------------------------------------------------------------------------
# a random checkpoint of the real width, and samples of the real length


def write_checkpoint(cfg, folder, dtype, seed=0, shard_bytes=2 * 2**30):
    """Random weights (normal(0, 0.02); norms 1, biases 0) of our Llava, whose names are the hub's keys, written as
    llava-hf writes them: safetensors shards with an index, a config.json and a (small) tokenizer.json."""
    os.makedirs(folder, exist_ok=True)
    cfg.image_token_index, cfg.pad_token_id = tokenizer.build_tokenizer(folder, CORPUS)
    with torch.device("meta"):
        llava = model.Llava(cfg)
    g = torch.Generator(device="cpu").manual_seed(seed)
    state, shard, shards = {}, {}, []
    for name, p in llava.state_dict().items():
        t = torch.empty(p.shape, dtype=dtype, device="cpu")
        if name.endswith("bias"):
            t.zero_()
        elif "norm" in name:
            t.fill_(1.0)
        else:
            t.normal_(0, 0.02, generator=g)
        if shard and sum(v.nbytes for v in shard.values()) + t.nbytes > shard_bytes:
            shards.append(shard)
            shard = {}
        shard[name] = t
    shards.append(shard)
    os.makedirs(folder, exist_ok=True)
    for i, part in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, os.path.join(folder, file), metadata={"format": "pt"})
        state.update({name: file for name in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": state}, f)
    t, v = cfg.text, cfg.vision
    config = dict(model_type="llava", image_token_index=cfg.image_token_index, pad_token_id=cfg.pad_token_id,
                  vision_feature_layer=cfg.vision_feature_layer, projector_hidden_act="gelu",
                  text_config=dict(model_type="llama", hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                                   num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                                   num_key_value_heads=t.num_key_value_heads, vocab_size=t.vocab_size,
                                   rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings),
                  vision_config=dict(model_type="clip_vision_model", hidden_size=v.hidden_size,
                                     intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                                     num_attention_heads=v.num_attention_heads, image_size=v.image_size,
                                     patch_size=v.patch_size))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return folder


def make_samples(cfg, folder, n, seed=0):
    """n samples of PROMPT prompt tokens (BOS, 4 text, the image, the rest text) and ANSWER answer tokens (EOS last),
    random ids, each with its own random image file."""
    rng = np.random.default_rng(seed)
    N, samples = cfg.n_image_tokens, []
    for i in range(n):
        path = os.path.join(folder, f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)).save(path)
        text = rng.integers(3, cfg.image_token_index, PROMPT - N - 1).tolist()
        ids = [cfg.bos_token_id] + text[:4] + [cfg.image_token_index] * N + text[4:]
        answer = rng.integers(3, cfg.image_token_index, ANSWER - 1).tolist() + [cfg.eos_token_id]
        samples.append(train.Sample(path, "", ids, 5, answer))
    return samples


def step_args(batch, setting, device, budget="kv"):
    return train.parse_args(["--model", "m", "--data", "d", "--out", "o", "--device", str(device), "--budget", budget,
                             "--target", "0.5", "--batch-size", str(batch), "--k", str(dyrate.DEFAULT_K),
                             *SETTINGS[setting]])


# ----------------------------------------------------------------------------------------------------------------------
# memory


def measure_step(llava, samples, setting, device):
    """One train_step under a setting: its peak live tensors, saved-for-backward bytes, resident (or CUDA allocator)
    peak and seconds (with the trackers' bookkeeping: time_step times a step alone)."""
    args, predictor, generator = step_inputs(llava, len(samples), setting, device)
    memory.reset_peak(device)
    t0 = time.perf_counter()
    with memory.LiveTensors() as live, memory.SavedTensors(live) as saved:
        train.train_step(llava, predictor, samples, args, 1.0, generator, Counter())
    seconds = time.perf_counter() - t0
    return dict(live_peak=live.peak, saved=saved.bytes, process_peak=memory.peak(device), seconds=seconds)


def step_inputs(llava, batch, setting, device):
    args = step_args(batch, setting, device)
    predictor = dyrate.RatePredictor(llava.config.text.num_attention_heads, cli.parse_rates(args.rates),
                                     args.k).to(device)
    return args, predictor, torch.Generator(device).manual_seed(0)


def time_step(llava, samples, setting, device):
    """The seconds of one train_step under a setting, nothing else running in the process."""
    args, predictor, generator = step_inputs(llava, len(samples), setting, device)
    generate.sync(device)
    t0 = time.perf_counter()
    train.train_step(llava, predictor, samples, args, 1.0, generator, Counter())
    generate.sync(device)
    return time.perf_counter() - t0


def step_flops(llava, sample, setting, device):
    """The FLOPs of a one-sample train_step (torch's FlopCounterMode; counted in a run of its own: its backward
    hooks keep tensors alive, which would inflate the memory measured with it)."""
    args = step_args(1, setting, device)
    predictor = dyrate.RatePredictor(llava.config.text.num_attention_heads, cli.parse_rates(args.rates),
                                     args.k).to(device)
    with FlopCounterMode(display=False) as flops:
        train.train_step(llava, predictor, [sample], args, 1.0, torch.Generator(device).manual_seed(0), Counter())
    return flops.get_total_flops()


def weights_bytes(cfg, dtype):
    with torch.device("meta"):
        llava = model.Llava(cfg)
    return sum(p.numel() for p in llava.state_dict().values()) * torch.finfo(dtype).bits // 8


def fit(layers, values, k, depth):
    """Least squares value = a + b * (layers - k); returns (a, b, the value at `depth` layers)."""
    x = np.array(layers) - k
    b, a = np.polyfit(x, np.array(values, dtype=np.float64), 1) if len(set(layers)) > 1 else (0.0, values[0])
    return float(a), float(b), float(a + b * (depth - k))


def memory_sweep(args, device, dtype, log):
    """Every setting at every layer count; then the fits and their extrapolation to the real depth."""
    full = bench.geometry_config(args.geometry)
    depth, runs = full.text.num_hidden_layers, {}
    for n_layers in args.layers:
        cfg = bench.geometry_config(args.geometry)
        cfg.text.num_hidden_layers = n_layers
        folder = os.path.join(args.work, f"{args.geometry}-{n_layers}")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            log(f"writing a random {args.geometry}-width checkpoint with {n_layers} decoder layers to {folder} ...")
            write_checkpoint(cfg, folder, dtype)
        llava = cli.load_model(folder, device, dtype, log)
        samples = make_samples(llava.config, folder, args.batch_size)
        # the samples are alike: a step's FLOPs are the batch's times one's
        flops = {setting: args.batch_size * step_flops(llava, samples[0], setting, device)
                 for setting in ("defaults", "checkpoint")}
        for setting in SETTINGS:
            log(f"{n_layers} layers, {setting}: one step of {args.batch_size} samples ...")
            runs[(n_layers, setting)] = r = measure_step(llava, samples, setting, device)
            r["flops"] = flops["checkpoint" if "--checkpoint" in SETTINGS[setting] else "defaults"]
            log(f"  live tensors peak {r['live_peak'] / 2**30:.2f} GiB, saved for backward {r['saved'] / 2**30:.2f} "
                f"GiB, process peak {r['process_peak'] / 2**30:.2f} GiB, {r['flops'] / 1e12:.1f} TFLOPs, "
                f"{r['seconds']:.0f} s")
        del llava
    weights = weights_bytes(full, dtype)
    table = {}
    for setting in SETTINGS:
        rows = [runs[(n, setting)] for n in args.layers]
        out = {key: fit(args.layers, [r[key] for r in rows], dyrate.DEFAULT_K, depth)
               for key in ("live_peak", "saved", "flops")}
        table[setting] = dict(per_layer_live=out["live_peak"][1], per_layer_saved=out["saved"][1],
                              live_at_depth=out["live_peak"][2], saved_at_depth=out["saved"][2],
                              flops_at_depth=out["flops"][2], gpu_bytes=weights + out["live_peak"][2])
    return dict(runs={f"{n} layers, {s}": r for (n, s), r in runs.items()}, fits=table, weights_bytes=weights,
                depth=depth)


def report_memory(result, args):
    print(f"\n{args.geometry} width, {result['depth']} layers (extrapolated from {args.layers} decoder layers, "
          f"K={dyrate.DEFAULT_K}), batch {args.batch_size} of {PROMPT}+{ANSWER} tokens, {args.dtype}; weights "
          f"{result['weights_bytes'] / 2**30:.1f} GiB")
    print(f"{'setting':28}{'per layer >= K':>16}{'saved/layer':>13}{'activations':>13}{'GPU total':>11}"
          f"{'TFLOPs/step':>13}")
    for setting, r in result["fits"].items():
        print(f"{setting:28}{r['per_layer_live'] / 2**20:12.0f} MiB{r['per_layer_saved'] / 2**20:9.0f} MiB"
              f"{r['live_at_depth'] / 2**30:9.1f} GiB{r['gpu_bytes'] / 2**30:7.1f} GiB"
              f"{r['flops_at_depth'] / 1e12:13.1f}")


# ----------------------------------------------------------------------------------------------------------------------
# time


def time_sweep(args, device, dtype, log):
    """Interleaved rounds on one random model of the geometry (full depth, a tokenizer written beside it): a step
    without and with checkpointing, and self-distillation (tools/distill.py) of --batch-size samples at batch 1 and
    8."""
    cfg = bench.geometry_config(args.geometry)
    folder = os.path.join(args.work, f"{args.geometry}-{cfg.text.num_hidden_layers}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        write_checkpoint(cfg, folder, dtype)
    llava = cli.load_model(folder, device, dtype, log)
    tok = processing.Tokenizer(folder, llava.config)
    samples = make_samples(llava.config, folder, args.batch_size)
    questions = [train.Sample(s.image, "Describe the picture in detail.", [], 0, None, key=str(i))
                 for i, s in enumerate(samples)]

    def step(setting):
        return lambda: time_step(llava, samples, setting, device)

    def distil(batch):
        def run():
            a = distill.parse_args(["--model", "m", "--data", "d", "--batch-size", str(batch), "--max-new-tokens",
                                    "32"])
            path = os.path.join(args.work, "answers.jsonl")
            t0 = time.perf_counter()
            distill.distill(llava, tok, questions, path, a, lambda msg: None)
            os.remove(path)
            return time.perf_counter() - t0
        return run
    jobs = {"step": step("defaults"), "step, checkpoint": step("checkpoint"),
            "distil, batch 1": distil(1), "distil, batch 8": distil(8)}
    times = {name: [] for name in jobs}
    for r in range(args.repeats + 1):  # the first round warms up
        for name, job in jobs.items():
            log(f"round {r}/{args.repeats}: {name}")
            times[name].append(job())
    med = {name: statistics.median(t[1:]) for name, t in times.items()}
    return dict(seconds=med, rounds=times, checkpoint_ratio=med["step, checkpoint"] / med["step"],
                distil_samples_per_s={b: len(samples) / med[f"distil, batch {b}"] for b in (1, 8)})


def report_time(result, args):
    s = result["seconds"]
    print(f"\n{args.geometry} geometry, batch {args.batch_size}, {args.dtype}, medians of {args.repeats} interleaved "
          f"rounds: step {s['step']:.2f} s, with checkpointing {s['step, checkpoint']:.2f} s "
          f"({result['checkpoint_ratio']:.2f}x); distillation {result['distil_samples_per_s'][1]:.2f} samples/s at "
          f"batch 1, {result['distil_samples_per_s'][8]:.2f} at batch 8 "
          f"({result['distil_samples_per_s'][8] / result['distil_samples_per_s'][1]:.2f}x)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Memory and time of a train.py step at LLaVA-1.5's width.")
    p.add_argument("--geometry", choices=sorted(bench.GEOMETRIES), default="7b", help="width (and real depth)")
    p.add_argument("--layers", default="3,4,6", help="decoder layer counts to measure (memory)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step (train.py's default)")
    p.add_argument("--time", action="store_true", help="time checkpointing and batched distillation instead")
    p.add_argument("--repeats", type=int, default=3, help="--time: timed rounds after one warm-up")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=cli.DTYPES, default="bfloat16", help="weights and activations")
    p.add_argument("--work", default="/tmp/dyrate-bench-train", help="folder for the random checkpoints")
    p.add_argument("--out", default="runs/train-bench.json", help="JSON results file")
    args = p.parse_args(argv)
    try:
        args.layers = sorted({int(n) for n in args.layers.split(",")})
    except ValueError:
        p.error(f"--layers {args.layers!r}: give decoder layer counts, e.g. 3,4,6")
    return args


def main(argv=None):
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    with cli.user_errors():
        device = cli.device(args.device)
        if min(args.layers) <= dyrate.DEFAULT_K or args.batch_size < 1 or args.repeats < 1:
            raise ValueError(f"--layers must exceed K={dyrate.DEFAULT_K}; --batch-size and --repeats at least 1")
        cli.check_writable_folder(args.out, "--out", make=True)
    dtype = getattr(torch, args.dtype)
    if args.time:
        result = time_sweep(args, device, dtype, log)
        report_time(result, args)
    else:
        result = memory_sweep(args, device, dtype, log)
        report_memory(result, args)

    processing.write_json(args.out, dict(vars(args), device_name=bench.device_name(device), torch=torch.__version__,
                                         **result))
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
