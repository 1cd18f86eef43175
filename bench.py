"""
Benchmark every method (none, fastv, vtw, dyrate) of our generation and HF transformers' generate on the same weights,
side by side in one run (random weights: nothing to download): prefill and decode times, FLOPs, KV-cache bytes.

    python bench.py                                   # CPU, mid-size geometry (hidden 1024, 8 layers, 576 image tokens)
    python bench.py --geometry 7b --device cuda --dtype bfloat16

Greedy decoding of --new-tokens tokens, median of --repeats runs after one warm-up, all methods' runs interleaved,
CUDA synchronised. Prints a table and writes --out as JSON.
"""
import argparse
import json
import statistics
import sys
import time

import torch

import dyrate as D
import generate as G
import model as M

GEOMETRIES = {  # (vision: hidden, layers, heads, intermediate), (text: hidden, layers, heads, intermediate)
    "mid": ((512, 6, 8, 2048), (1024, 8, 16, 2816)),
    "7b": ((1024, 24, 16, 4096), (4096, 32, 32, 11008)),
    "13b": ((1024, 24, 16, 4096), (5120, 40, 40, 13824)),
}


def random_models(geometry, device, dtype, seed=0):
    """A random-weight HF LLaVA of the geometry, and our Llava sharing the very same weight tensors."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    (vh, vl, vn, vi), (th, tl, tn, ti) = GEOMETRIES[geometry]
    vision = CLIPVisionConfig(hidden_size=vh, num_hidden_layers=vl, num_attention_heads=vn, intermediate_size=vi,
                              image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(hidden_size=th, num_hidden_layers=tl, num_attention_heads=tn, intermediate_size=ti,
                       vocab_size=32064, rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, pad_token_id=32001)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    hf.generation_config.pad_token_id = 32001
    ours = M.Llava(M.LlavaConfig(
        vision=M.VisionConfig(hidden_size=vh, num_hidden_layers=vl, num_attention_heads=vn, intermediate_size=vi),
        text=M.TextConfig(hidden_size=th, num_hidden_layers=tl, num_attention_heads=tn, num_key_value_heads=tn,
                          head_dim=th // tn, intermediate_size=ti)))
    ours.load_state_dict({M.canonical_key(k): v for k, v in hf.state_dict().items()}, strict=True, assign=True)
    ours.language_model.model.inv_freq = M.rope_inv_freq(ours.config.text).to(device)
    return hf, ours.eval().requires_grad_(False)


def interleaved(fns, repeats):
    """Run each function once to warm up, then `repeats` rounds of all of them in turn (a, b, a, b, ...) so that drift
    hits all alike. Each returns a dict of timings (seconds) and results; returns per function the median of each
    timing and the last results."""
    for fn in fns:
        fn()
    runs = [[fn() for fn in fns] for _ in range(repeats)]
    return [dict(runs[-1][i], **{key: statistics.median(r[i][key] for r in runs) for key in ("prefill_s", "decode_s")})
            for i in range(len(fns))]


def main(argv=None):
    p = argparse.ArgumentParser(description="Speed, FLOPs and KV cache of each method, and of transformers, same weights.")
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="mid", help="model size (random weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights and activations")
    p.add_argument("--methods", default="none,fastv,vtw,dyrate,dyrate0,transformers",
                   help="comma-separated: none, fastv, vtw, dyrate, dyrate0 (statistics every step, nothing dropped: "
                        "DyRate's overhead), transformers")
    p.add_argument("--k", type=int, default=2, help="pruning layer K")
    p.add_argument("--ratio", type=float, default=0.5, help="FastV's R; also where dyrate's ramp starts")
    p.add_argument("--predictor", default=None, help="dyrate predictor file; without one dyrate follows a ramp of "
                   "rates from --ratio at prefill to 1 at the last step, on the candidates 0, 1/8, .., 1 as a "
                   "predictor's would be (so drops happen at a few steps)")
    p.add_argument("--ramp-every-step", action="store_true", help="dyrate's ramp without the candidates: it drops "
                   "tokens at every step, the worst case for cache compaction")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per run")
    p.add_argument("--prompt-tokens", type=int, default=40, help="text tokens around the 576 image tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported) after one warm-up")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--out", default="bench.json", help="JSON results file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, dev, methods = getattr(torch, args.dtype), args.device, args.methods.split(",")
    print(f"building {args.geometry} models on {dev} in {args.dtype} ...", file=sys.stderr)
    hf, ours = random_models(args.geometry, dev, dtype)
    cfg, N = ours.config, ours.config.n_image_tokens
    predictor = args.predictor and D.RatePredictor.load(args.predictor, cfg, dev)
    torch.manual_seed(1)
    text = torch.randint(3, 32000, (args.prompt_tokens,)).tolist()
    ids = torch.tensor([[1] + text[:5] + [32000] * N + text[5:]], device=dev)  # (1, T): the image starts at 6
    px = torch.randn(1, 3, 336, 336, device=dev, dtype=dtype)
    T, n = ids.shape[1], args.new_tokens

    def pruner(method, new_tokens):
        one = torch.tensor([6], device=dev), torch.tensor([T], device=dev)
        if method in ("none", "transformers"):
            return None
        if method == "dyrate0":
            return D.Pruner("dyrate", N, *one, args.k, schedule=[0.0], stats=True)
        if method == "dyrate" and predictor is None:
            ramp = [args.ratio + (1 - args.ratio) * t / max(new_tokens - 1, 1) for t in range(new_tokens)]
            ramp = ramp if args.ramp_every_step else [round(r * 8) / 8 for r in ramp]
            return D.Pruner("dyrate", N, *one, args.k, schedule=ramp, stats=True)
        return D.Pruner(method, N, *one, args.k, args.ratio, predictor, stats=False)

    @torch.inference_mode()
    def run(method, new_tokens):
        if method == "transformers":  # one call: time a 1-token generation, then the rest is decode
            times = []
            for count in (1, new_tokens):
                G.sync(dev)
                t0 = time.perf_counter()
                out = hf.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=count, min_new_tokens=count)
                G.sync(dev)
                times.append(time.perf_counter() - t0)
            return dict(prefill_s=times[0], decode_s=times[1] - times[0], tokens=out[0, T:].tolist(), hook=None)
        hook, caches = pruner(method, new_tokens), ours.new_caches(1, new_tokens)
        G.sync(dev)
        t0 = time.perf_counter()
        token = ours.step(ids, torch.arange(T, device=dev)[None], caches, pixel_values=px, pruner=hook).argmax(-1)
        out = [token]
        G.sync(dev)
        t1 = time.perf_counter()
        for t in range(1, new_tokens):
            token = ours.step(token[:, None], torch.tensor([[T + t - 1]], device=dev), caches, pruner=hook).argmax(-1)
            out.append(token)
        G.sync(dev)
        return dict(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1, tokens=torch.stack(out, 1)[0].tolist(), hook=hook)

    print(f"timing {len(methods)} methods, {args.repeats} rounds ...", file=sys.stderr)
    results = interleaved([lambda m=m: run(m, n) for m in methods], args.repeats)
    rows = {}
    for m, r in zip(methods, results):
        hook = r["hook"]
        kept = [int(h["kept"][0]) for h in hook.history] if hook else [N] * n
        probes = sum(h["shares"] is not None for h in hook.history) if hook else 0
        pf = predictor.flops() if m == "dyrate" and predictor is not None else 0
        flops = D.generation_flops(cfg, T, kept, args.k, probes, pf)
        first = D.generation_flops(cfg, T, kept[:1], args.k, min(probes, 1), pf)
        rows[m] = dict(prefill_ms=r["prefill_s"] * 1e3, decode_ms_per_token=r["decode_s"] * 1e3 / (n - 1),
                       total_ms=(r["prefill_s"] + r["decode_s"]) * 1e3,
                       prefill_tflops=first["total"] / 1e12, tflops=flops["total"] / 1e12, kept_visual=kept,
                       kv_cache_bytes=D.kv_cache_bytes(cfg, T, n, kept[-1], args.k, dtype), tokens=r["tokens"])
    base = rows.get("none") or rows[methods[0]]
    print(f"\n{args.geometry} geometry, {dev}, {args.dtype}, prompt {T} tokens ({N} image), {n} greedy new tokens, "
          f"K={args.k}, R={args.ratio}, median of {args.repeats} interleaved runs; ratios are to {methods[0] if 'none' not in rows else 'none'}")
    print(f"{'method':14}{'prefill ms':>11}{'(ratio)':>8}{'prefill TFLOPs':>15}{'(ratio)':>8}{'decode ms/tok':>14}"
          f"{'(ratio)':>8}{'TFLOPs':>8}{'(ratio)':>8}{'KV MiB':>8}{'kept':>10}")
    for m, r in rows.items():
        print(f"{m:14}{r['prefill_ms']:11.1f}{r['prefill_ms'] / base['prefill_ms']:8.2f}{r['prefill_tflops']:15.4f}"
              f"{r['prefill_tflops'] / base['prefill_tflops']:8.2f}{r['decode_ms_per_token']:14.2f}"
              f"{r['decode_ms_per_token'] / base['decode_ms_per_token']:8.2f}{r['tflops']:8.3f}"
              f"{r['tflops'] / base['tflops']:8.2f}{r['kv_cache_bytes'] / 2**20:8.1f}"
              f"{str(r['kept_visual'][0]) + '->' + str(r['kept_visual'][-1]):>10}")
    if "transformers" in rows and "none" in rows:
        same = rows["none"]["tokens"] == rows["transformers"]["tokens"]
        print(f"ours (none) vs transformers: same tokens {same}, end to end "
              f"{rows['transformers']['total_ms'] / rows['none']['total_ms']:.2f}x as fast")
    if "dyrate0" in rows and "none" in rows:
        print(f"DyRate statistics (probe + type shares) every step: "
              f"{rows['dyrate0']['decode_ms_per_token'] / rows['none']['decode_ms_per_token'] - 1:+.1%} per decode step")
    with open(args.out, "w") as f:
        json.dump(dict(vars(args), results=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
