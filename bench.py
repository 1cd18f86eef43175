"""
Benchmark: our generation against HF transformers' LlavaForConditionalGeneration.generate on the same weights,
side by side in one run (random weights: nothing to download).

    python bench.py                                   # CPU, mid-size geometry (hidden 1024, 8 layers, 576 image tokens)
    python bench.py --geometry 7b --device cuda --dtype bfloat16

Greedy decoding of --new-tokens tokens, median of --repeats runs after one warm-up, CUDA synchronised. Both produce
the same tokens (checked). Prints a table and writes --out as JSON.
"""
import argparse
import json
import statistics
import sys
import time

import torch

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


def timed(fns, device, repeats):
    """Median seconds of each function, runs interleaved (a, b, a, b, ...) so drift hits all alike; last results."""
    results = [fn() for fn in fns]  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            G.sync(device)
            t0 = time.perf_counter()
            results[i] = fn()
            G.sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times], results


def main(argv=None):
    p = argparse.ArgumentParser(description="Speed of our LLaVA generation vs transformers, same weights, one run.")
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="mid", help="model size (random weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights and activations")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per run")
    p.add_argument("--prompt-tokens", type=int, default=40, help="text tokens around the 576 image tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported) after one warm-up")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--out", default="bench.json", help="JSON results file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, dev = getattr(torch, args.dtype), args.device
    print(f"building {args.geometry} models on {dev} in {args.dtype} ...", file=sys.stderr)
    hf, ours = random_models(args.geometry, dev, dtype)
    torch.manual_seed(1)
    text = torch.randint(3, 32000, (args.prompt_tokens,)).tolist()
    ids = torch.tensor([[1] + text[:5] + [32000] * 576 + text[5:]], device=dev)  # (1, T)
    px = torch.randn(1, 3, 336, 336, device=dev, dtype=dtype)
    T, n = ids.shape[1], args.new_tokens

    @torch.inference_mode()
    def run_ours(new_tokens):
        caches = ours.new_caches(1, T + new_tokens)
        token = ours.step(ids, torch.arange(T, device=dev)[None], caches, pixel_values=px).argmax(-1)
        out = [token]
        for t in range(1, new_tokens):
            token = ours.step(token[:, None], torch.tensor([[T + t - 1]], device=dev), caches).argmax(-1)
            out.append(token)
        return torch.stack(out, 1)[0].tolist()

    @torch.inference_mode()
    def run_hf(new_tokens):
        out = hf.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return out[0, T:].tolist()

    names, fns = ("ours", "transformers"), (run_ours, run_hf)
    print("timing prefill (1 token) ...", file=sys.stderr)
    prefill_s, _ = timed([lambda f=f: f(1) for f in fns], dev, args.repeats)
    print(f"timing {n} tokens ...", file=sys.stderr)
    total_s, tokens = timed([lambda f=f: f(n) for f in fns], dev, args.repeats)
    rows = {name: dict(prefill_ms=p * 1e3, total_ms=t * 1e3, decode_ms_per_token=(t - p) * 1e3 / (n - 1), tokens=tok)
            for name, p, t, tok in zip(names, prefill_s, total_s, tokens)}
    same = rows["ours"].pop("tokens") == rows["transformers"].pop("tokens")
    print(f"\n{args.geometry} geometry, {dev}, {args.dtype}, prompt {T} tokens (576 image), {n} greedy new tokens, "
          f"median of {args.repeats}; same tokens: {same}")
    print(f"{'':14}{'prefill ms':>12}{'decode ms/tok':>15}{'decode tok/s':>14}{'total ms':>11}")
    for name, r in rows.items():
        print(f"{name:14}{r['prefill_ms']:12.1f}{r['decode_ms_per_token']:15.2f}{1e3 / r['decode_ms_per_token']:14.1f}"
              f"{r['total_ms']:11.1f}")
    ratio = rows["transformers"]["total_ms"] / rows["ours"]["total_ms"]
    print(f"ours is {ratio:.2f}x transformers' end-to-end speed")
    with open(args.out, "w") as f:
        json.dump(dict(vars(args), same_tokens=same, results=rows, speedup=ratio), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
