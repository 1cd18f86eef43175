"""
Answer a prompt about an image with LLaVA-1.5 (model.py): prefill, then a decode loop over a preallocated KV cache.

    python generate.py --image assets/examples/1.png          # the shipped shapes model (models/shapes), CPU
    python generate.py --image photo.jpg --model path/to/llava-1.5-7b-hf --prompt "What is unusual here?" --json
    python generate.py --image photo.jpg --model DIR --method dyrate --predictor FILE --viz out/photo --compile

A batch (generate() with several image/prompt pairs) pads each row at its end and every cache row keeps its own
length, so no row ever attends to padding and each row computes what it would alone. Streams the answer, then prints
one summary line (prompt tokens, new tokens, prefill ms, decode tokens/s, peak memory) on stderr.
"""
import argparse
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import torch

import dyrate
from model import Llava, check_device, read_config
from processing import Tokenizer, load_image, preprocess


@dataclass
class Generation:
    """The result of one generate() call; `rows` holds one dict per image/prompt pair."""
    rows: list = field(default_factory=list)  # text, token_ids (new tokens, EOS included), prompt_tokens, costs, ...
    prefill_ms: float = 0.0  # vision tower + prompt forward + first token
    decode_ms_per_token: float = 0.0
    peak_memory_bytes: int = 0  # CUDA: max allocated; CPU: the process's peak resident set


class StreamDecoder:
    """Text of a growing list of ids, released piece by piece: decode everything so far and emit the new suffix,
    holding back while it ends in an incomplete UTF-8 sequence (byte-fallback tokens of a multi-byte character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token_id):
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def flush(self):
        """Whatever was held back (an incomplete character at the very end decodes to U+FFFD)."""
        text = self.tokenizer.decode(self.ids)
        new, self.text = text[len(self.text):] if text.startswith(self.text) else "", text
        return new


def sample_next_token(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """(B, V) logits -> (B,) next tokens. temperature 0 is greedy; top_k and top_p restrict what is sampled."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def decode(model, input_ids, lengths, pixel_values, caches, n_new, pruner=None, choose=None, eos_id=None):
    """The one prefill + decode loop (generation, training's forced decoding, the benchmark and the tests run it).
    Prefill the prompts (B, T) (rows padded at the end, lengths (B,) real tokens each), then feed each new token back
    over the caches. choose(t, logits) -> (B,) new token t (default: greedy). Yields (token, logits) for each new
    token as soon as it is chosen; stops after n_new, or once every row has produced eos_id."""
    choose = choose or (lambda t, logits: logits.argmax(-1))
    logits = model.prefill(input_ids, caches, lengths, pixel_values, pruner)
    done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    for t in range(n_new):
        token = choose(t, logits)
        yield token, logits
        if eos_id is not None:
            done |= token == eos_id
        if t == n_new - 1 or bool(done.all()):
            return
        # new token t sits at index lengths + t of its row's full sequence: that is its RoPE position
        logits = model.decode_step(token, lengths + t, caches, pruner)


def check_options(cfg, method="none", k=None, ratio=0.5, predictor=None, schedule=None, max_new_tokens=64,
                  temperature=0.0, top_k=0, top_p=1.0):
    """Every generation option checked against the model's config (no weights needed). Returns K."""
    dyrate.check_method(method, ratio, predictor, schedule)
    if predictor is not None and k is not None and k != predictor.k:
        raise ValueError(f"The predictor was trained for K={predictor.k}; drop --k or pass --k {predictor.k}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}.")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"--top-p must lie in (0, 1], got {top_p!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"--top-k must be a whole number >= 0 (0 = all tokens), got {top_k!r}.")
    layers = cfg.text.num_hidden_layers
    k = (predictor.k if predictor is not None else min(2, max(1, layers - 1))) if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max(1, layers - 1):
        raise ValueError(f"K must lie in [1, {max(1, layers - 1)}] for this {layers}-layer model: layer K-1 ranks the "
                         f"image tokens and layers K.. see the kept ones; got {k!r}.")
    return k


def check_writable_folder(path, what, make=False):
    """The folder a file will be written to must exist (make=True: is made) and be writable; checked before any long
    work, so that no result is lost at the end."""
    folder = os.path.dirname(os.path.abspath(path))
    if make:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{what} {path!r}: cannot make the folder {folder!r} ({e.strerror}).") from None
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path!r}: the folder {folder!r} does not exist; create it first.")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what} {path!r}: the folder {folder!r} is not writable.")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder; give a file name.")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model: Llava, tokenizer: Tokenizer, images, prompts, max_new_tokens=64, temperature=0.0, top_k=0,
             top_p=1.0, seed=0, conv="llava-hf", pad=False, on_text=None, method="none", k=None, ratio=0.5,
             predictor=None, schedule=None, stats=True):
    """Generate for a batch of image/prompt pairs. on_text(row, piece) receives the text as it is produced.
    method/k/ratio/predictor/schedule choose the visual-token pruning (dyrate.Pruner); stats records the type
    shares at every step. Each row reports its pruning history, FLOPs and KV-cache bytes next to those of `none`."""
    if isinstance(images, (str, os.PathLike)) or isinstance(prompts, str):
        raise ValueError("Give a list of images and a list of prompts, one prompt per image.")
    if len(images) != len(prompts) or not images:
        raise ValueError(f"Give one prompt per image: got {len(images)} images and {len(prompts)} prompts.")
    cfg, device = model.config, model.language_model.lm_head.weight.device
    k = check_options(cfg, method, k, ratio, predictor, schedule, max_new_tokens, temperature, top_k, top_p)
    encoded = [tokenizer.encode_prompt(p, conv) for p in prompts]
    lengths = torch.tensor([len(ids) for ids, _ in encoded], device=device)  # (B,)
    B, T = len(encoded), int(lengths.max())
    cfg.check_length(T + max_new_tokens)
    input_ids = torch.full((B, T), cfg.pad_token_id, dtype=torch.long, device=device)  # rows padded at their end
    for b, (ids, _) in enumerate(encoded):
        input_ids[b, :len(ids)] = torch.tensor(ids)
    dtype = model.language_model.lm_head.weight.dtype
    pixel_values = torch.stack([preprocess(im, cfg.vision.image_size, pad) for im in images]).to(device, dtype)
    caches = model.new_caches(B, max_new_tokens)
    starts = torch.tensor([start for _, start in encoded], device=device)
    pruner = dyrate.Pruner(method, cfg.n_image_tokens, starts, lengths, k, ratio, predictor, schedule, stats)
    generator = torch.Generator(device).manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def choose(t, logits):
        return sample_next_token(logits, temperature, top_k, top_p, generator)

    streams, new_tokens = [StreamDecoder(tokenizer) for _ in range(B)], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    sync(device)
    t0 = t1 = time.perf_counter()
    for token, _ in decode(model, input_ids, lengths, pixel_values, caches, max_new_tokens, pruner, choose,
                           cfg.eos_token_id):
        if not new_tokens:  # prefill: vision tower + prompt forward + the first token
            sync(device)
            t1 = time.perf_counter()
        if on_text is not None:
            for b in range(B):
                if not done[b]:
                    on_text(b, streams[b].push(token[b]))
        new_tokens.append(token)
        done |= token == cfg.eos_token_id
    sync(device)
    t2 = time.perf_counter()
    if on_text is not None:
        for b in range(B):
            on_text(b, streams[b].flush())

    out = Generation(prefill_ms=(t1 - t0) * 1e3, decode_ms_per_token=(t2 - t1) * 1e3 / max(len(new_tokens) - 1, 1))
    if torch.device(device).type == "cuda":
        out.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    else:
        out.peak_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    all_tokens = torch.stack(new_tokens, dim=1).tolist()  # (B, n_new)
    for b, (ids, start) in enumerate(encoded):
        row = all_tokens[b]
        if cfg.eos_token_id in row:
            row = row[:row.index(cfg.eos_token_id) + 1]
        out.rows.append(dict(text=tokenizer.decode(row), token_ids=row, prompt_tokens=len(ids), image_token_start=start,
                             method=method, k=k, **pruner.row_summary(b, len(row), cfg, len(ids), dtype)))
    return out


SHAPES_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "shapes")


def default_dtype(device):
    return "float16" if torch.device(device).type == "cuda" else "float32"


def main(argv=None):
    p = argparse.ArgumentParser(description="Answer a prompt about an image with LLaVA-1.5.")
    g = p.add_argument_group("input")
    g.add_argument("--image", required=True, help="image file (anything Pillow opens)")
    g.add_argument("--prompt", default="Provide a one-sentence caption for the provided image.", help="the question")
    g.add_argument("--conv", choices=["llava-hf", "vicuna_v1"], default="llava-hf",
                   help="prompt template: llava-hf's 'USER: <image>\\n... ASSISTANT:' or the original with a system "
                        "prompt")
    g.add_argument("--pad", action="store_true", help="pad the image to a square first (original LLaVA evaluation)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=SHAPES_MODEL, help="llava-hf checkpoint folder (config.json, safetensors, "
                   "tokenizer.json); default: the shipped shapes model (models/shapes), e.g. llava-1.5-7b-hf for "
                   "the real one")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1, cpu, ...")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float16 on CUDA, float32 on CPU (use bfloat16 for 7B on CPU: ~14 GB)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (static shapes in buckets "
                   "of 64 cache slots, CUDA graphs on GPU): slower first steps, faster tokens after them")
    g = p.add_argument_group("visual-token pruning (dyrate.py)")
    g.add_argument("--method", choices=dyrate.METHODS, default="none",
                   help="none; fastv: drop --ratio of the image tokens once at prefill; vtw: drop them all at prefill; "
                        "dyrate: a learned rate at every step (needs --predictor)")
    g.add_argument("--k", type=int, default=None, help="pruning layer K: layers >= K see only kept image tokens "
                   "(default 2, or the predictor's)")
    g.add_argument("--ratio", type=float, default=0.5, help="FastV's R: fraction of the image tokens dropped")
    g.add_argument("--predictor", default=None, help="DyRate rate predictor file written by train.py")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens (or at EOS)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--viz", default=None, metavar="OUT", help="write OUT.gif (kept patches per step with the text so "
                   "far), OUT_strip.png and OUT_shares.png (attention mass per token type over the steps)")
    args = p.parse_args(argv)
    if args.method == "dyrate" and args.predictor is None:
        p.error("--method dyrate needs --predictor FILE (train one with train.py)")

    try:  # everything that can be checked before the weights load (minutes for 7B)
        device = check_device(args.device)
        cfg = read_config(args.model)
        tokenizer = Tokenizer(args.model, cfg)
        image = load_image(args.image)
        predictor = args.predictor and dyrate.RatePredictor.load(args.predictor, cfg, device)
        check_options(cfg, args.method, args.k, args.ratio, predictor or None, None, args.max_new_tokens,
                      args.temperature, args.top_k, args.top_p)
        ids = tokenizer.encode_prompt(args.prompt, args.conv)[0]
        cfg.check_length(len(ids) + args.max_new_tokens)
        if args.viz:
            check_writable_folder(args.viz + ".gif", "--viz", make=True)
        dtype = getattr(torch, args.dtype or default_dtype(device))
        print(f"loading {args.model} on {device} in {dtype} ...", file=sys.stderr)
        model = Llava.from_pretrained(args.model, device=device, dtype=dtype)
        if args.compile:
            model.compile_decode()
        if predictor:
            print(predictor.describe(model.config), file=sys.stderr)
        stream = None if args.json else (lambda b, piece: print(piece, end="", flush=True))
        out = generate(model, tokenizer, [image], [args.prompt], args.max_new_tokens, args.temperature, args.top_k,
                       args.top_p, args.seed, args.conv, args.pad, stream, args.method, args.k, args.ratio,
                       predictor or None, stats=bool(args.json or args.viz))
        if not args.json:
            print()  # the streamed answer ends its line
        if args.viz:
            import viz
            for path in viz.save(args.viz, image, out.rows[0], tokenizer, model.config, args.pad):
                print(f"wrote {path}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:  # a user mistake: the message says what to do
        sys.exit(f"error: {e}")
    row = out.rows[0]
    if args.json:
        print(json.dumps(dict(row, prefill_ms=round(out.prefill_ms, 3),
                              decode_ms_per_token=round(out.decode_ms_per_token, 3),
                              new_tokens=len(row["token_ids"]), peak_memory_bytes=out.peak_memory_bytes)))
        return out
    n_new = len(row["token_ids"])
    speed = f"{1e3 / out.decode_ms_per_token:.1f} tok/s" if n_new > 1 else "n/a (one new token)"
    print(f"prompt tokens {row['prompt_tokens']} | new tokens {n_new} | prefill {out.prefill_ms:.1f} ms | decode "
          f"{speed} | peak memory "
          f"{out.peak_memory_bytes / 2**30:.2f} GiB | {row['method']}: image tokens kept {row['kept_visual'][0]} -> "
          f"{row['kept_visual'][-1]} of {model.config.n_image_tokens}, {row['flops'] / 1e12:.3f} TFLOPs "
          f"({row['flops_ratio']:.2f} of none), KV cache {row['kv_cache_bytes'] / 2**20:.1f} MiB "
          f"({row['kv_cache_bytes'] / row['kv_cache_bytes_none']:.2f} of none)", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
