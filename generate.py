"""
Answer a prompt about an image with LLaVA-1.5 (model.py): prefill, then a decode loop over a preallocated KV cache,
with a pruning rule (dyrate.py) dropping image tokens at the prefill and while the answer is written.

    python generate.py --image assets/examples/1.png          # the shipped shapes model (models/shapes), CPU
    python generate.py --image photo.jpg --model path/to/llava-1.5-7b-hf --prompt "What is unusual here?" --json
    python generate.py --image photo.jpg --model DIR --method dyrate --predictor FILE --viz out/photo
    python generate.py --image photo.jpg --model DIR --method fastv:ratio=0.75 --num-beams 3

A batch (generate() with several image/prompt pairs) pads each row at its end and every cache row keeps its own
length, so no row ever attends to padding and each row computes what it would alone. The answer streams, then one
summary line (prompt tokens, new tokens, prefill ms, decode tokens/s, peak memory, what was kept) goes to stderr.
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

import cli
import dyrate
from processing import preprocess


@dataclass
class Generation:
    """The result of one generate() call; `rows` holds one dict per image/prompt pair."""
    rows: list = field(default_factory=list)  # text, token_ids (new tokens, EOS included), prompt_tokens, history
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
    """The one prefill + decode loop (generation, beam search, training's forced decoding, the benchmark and the tests
    run it). Prefill the prompts (B, T) (rows padded at the end, lengths (B,) real tokens each), then feed each new
    token back over the caches. choose(t, logits) -> (B,) new token t (default: greedy): the seam where sampling and
    beam search plug in. Yields (token, logits) for each new token as soon as it is chosen; stops after n_new, or once
    every row has produced eos_id."""
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


def whole(x, low):
    return not isinstance(x, bool) and isinstance(x, int) and x >= low


def check_options(max_new_tokens, temperature, top_k, top_p):
    if not whole(max_new_tokens, 1):
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}.")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}.")
    if not whole(top_k, 0):
        raise ValueError(f"top_k must be a whole number >= 0 (0 = all tokens), got {top_k!r}.")


@dataclass
class Batch:
    """Image/prompt pairs made ready for the decode loop (no weights needed): the prompts encoded and padded at their
    ends, the images preprocessed, the pruner made. Used once: the pruner keeps its state."""
    input_ids: torch.Tensor  # (B, T) on the device
    lengths: torch.Tensor  # (B,) real tokens of each row
    image_starts: list  # index of each row's first image token
    pixel_values: torch.Tensor  # (B, 3, S, S) float32, on the CPU
    pruner: dyrate.Pruner


def prompt_protocol(rules, conv=None, pad=None, allow_protocol_mismatch=False, default=("llava-hf", False)):
    """The prompt template and image padding (conv, pad) of a run of these rules: as given, else what their learned
    predictors were trained with, else `default`. A predictor prompted otherwise than it was trained reads other type
    shares (a system prompt before the image shifts them): an error unless allowed."""
    trained = sorted({p for p in map(dyrate.protocol, rules) if p is not None})
    flags = lambda c, p: f"--conv {c} {'--pad' if p else '--no-pad'}"  # noqa: E731
    if len(trained) > 1 and not allow_protocol_mismatch:
        both = " and ".join(flags(*p) for p in trained)
        raise ValueError(f"The predictors were trained under different protocols ({both}): evaluate them apart.")
    c, p = trained[0] if trained else default
    wanted = (conv if conv is not None else c, pad if pad is not None else p)
    if trained and wanted != (c, p) and not allow_protocol_mismatch:
        raise ValueError(f"The predictor was trained with {flags(c, p)}, and this run asks for {flags(*wanted)}: its "
                         f"rates would answer other type shares than it learned from. Leave --conv and --pad to the "
                         f"predictor, or pass --allow-protocol-mismatch (allow_protocol_mismatch=True) to do so on "
                         f"purpose.")
    return wanted


def make_batch(cfg, tokenizer, images, prompts, max_new_tokens, rule="none", k=None, conv=None, pad=None,
               stats=True, device="cpu", repeat=1, allow_protocol_mismatch=False):
    """Every check of generate()'s inputs, then the Batch; repeat > 1 repeats each row (beam search's beams)."""
    if isinstance(images, (str, os.PathLike)) or isinstance(prompts, str):
        raise ValueError("Give a list of images and a list of prompts, one prompt per image.")
    if len(images) != len(prompts) or not images:
        raise ValueError(f"Give one prompt per image: got {len(images)} images and {len(prompts)} prompts.")
    rule = dyrate.parse_rule(rule)
    k = dyrate.pruning_layer(cfg.text.num_hidden_layers, k, rule)
    conv, pad = prompt_protocol([rule], conv, pad, allow_protocol_mismatch)
    encoded = [tokenizer.encode_prompt(p, conv, rule.image_tokens(cfg.n_image_tokens)) for p in prompts]
    lengths = torch.tensor([len(ids) for ids, _ in encoded], device=device)  # (B,)
    B, T = len(encoded), int(lengths.max())
    cfg.check_length(T + max_new_tokens)
    input_ids = torch.full((B, T), cfg.pad_token_id, dtype=torch.long, device=device)  # rows padded at their end
    for b, (ids, _) in enumerate(encoded):
        input_ids[b, :len(ids)] = torch.tensor(ids, device=device)
    pixel_values = torch.stack([preprocess(im, cfg.vision.image_size, pad) for im in images])
    starts = [start for _, start in encoded for _ in range(repeat)]
    input_ids, lengths, pixel_values = (t.repeat_interleave(repeat, 0) for t in (input_ids, lengths, pixel_values))
    pruner = dyrate.Pruner(rule, cfg.n_image_tokens, torch.tensor(starts, device=device), lengths, k, stats)
    return Batch(input_ids, lengths, starts, pixel_values, pruner)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device, reset=False):
    """CUDA: the allocator's peak since the last reset; CPU: the process's peak resident set (never reset)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.reset_peak_memory_stats(device) if reset else torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_decode(model, batch, caches, max_new_tokens, choose, eos_id, on_token):
    """The decode loop over a Batch, timed: on_token(token) after each new token (True stops the loop). Returns the
    new tokens (B, n) and a Generation holding the timings and the peak memory."""
    device, dtype = model.language_model.lm_head.weight.device, model.language_model.lm_head.weight.dtype
    assert batch.input_ids.device == device, "make the batch on the model's device"
    peak_memory(device, reset=True)
    sync(device)
    t0 = t1 = time.perf_counter()
    tokens = []
    for token, _ in decode(model, batch.input_ids, batch.lengths, batch.pixel_values.to(device, dtype), caches,
                           max_new_tokens, batch.pruner, choose, eos_id):
        if not tokens:  # prefill: vision tower + prompt forward + the first token
            sync(device)
            t1 = time.perf_counter()
        tokens.append(token)
        if on_token(token):
            break
    sync(device)
    t2 = time.perf_counter()
    return torch.stack(tokens, 1), Generation(
        prefill_ms=(t1 - t0) * 1e3, decode_ms_per_token=(t2 - t1) * 1e3 / max(len(tokens) - 1, 1),
        peak_memory_bytes=peak_memory(device))


def row(tokenizer, batch, r, tokens, history=None, **extra):
    """Row r's result: its text and tokens, its prompt, the rule with its settings, and its pruning history
    (dyrate.Pruner.summary)."""
    p = batch.pruner
    return dict(text=tokenizer.decode(tokens), token_ids=tokens, prompt_tokens=int(batch.lengths[r]),
                image_token_start=batch.image_starts[r], rule=dyrate.rule_name(p.rule),
                settings=dyrate.rule_spec(p.rule, p.k), **extra,
                **p.summary(r if history is None else 0, len(tokens), history))


@torch.inference_mode()
def generate(model, tokenizer, images, prompts, max_new_tokens=64, rule="none", k=None, conv=None, pad=None,
             temperature=0.0, top_k=0, top_p=1.0, seed=0, stats=True, on_text=None, allow_protocol_mismatch=False):
    """Answer a batch of image/prompt pairs (images: paths or PIL images). rule: a dyrate rule or its name with
    parameters ('fastv:ratio=0.75'); K defaults to the rule's (dyrate.pruning_layer); conv, pad to the predictor's
    protocol (prompt_protocol); stats records the type shares at every step. on_text(row, piece) receives each row's
    text as it is produced. Each row reports its pruning history (tools/costs.py counts its FLOPs and KV-cache
    bytes)."""
    check_options(max_new_tokens, temperature, top_k, top_p)
    device = model.language_model.lm_head.weight.device
    batch = make_batch(model.config, tokenizer, images, prompts, max_new_tokens, rule, k, conv, pad, stats, device,
                       allow_protocol_mismatch=allow_protocol_mismatch)
    eos, B = model.config.eos_token_id, len(batch.input_ids)
    generator = torch.Generator(device).manual_seed(seed)
    streams, done = [StreamDecoder(tokenizer) for _ in range(B)], torch.zeros(B, dtype=torch.bool, device=device)

    def on_token(token):
        if on_text is not None:
            for b in range(B):
                if not done[b]:
                    on_text(b, streams[b].push(token[b]))
        done.logical_or_(token == eos)

    choose = lambda t, logits: sample_next_token(logits, temperature, top_k, top_p, generator)  # noqa: E731
    tokens, out = timed_decode(model, batch, model.new_caches(B, max_new_tokens), max_new_tokens, choose, eos, on_token)
    for b, ids in enumerate(tokens.tolist()):
        out.rows.append(row(tokenizer, batch, b, ids[:ids.index(eos) + 1] if eos in ids else ids))
        if on_text is not None:
            on_text(b, streams[b].flush())
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Answer a prompt about an image with LLaVA-1.5.")
    g = p.add_argument_group("input")
    g.add_argument("--image", required=True, help="image file (anything Pillow opens)")
    g.add_argument("--prompt", default="Provide a one-sentence caption for the provided image.", help="the question")
    cli.add_protocol_args(g)
    g = cli.add_model_args(p)
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (tools/fast.py: static shapes "
                   "in buckets of 64 cache slots, CUDA graphs on GPU): slower first steps, faster tokens after them")
    cli.add_pruning_args(p)
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens (or at EOS)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (tools/beam.py: each "
                   "prunes for itself), as transformers' num_beams with do_sample=False; 1: greedy or sampling")
    g.add_argument("--num-return-sequences", type=int, default=1, help="with --num-beams: the best this many "
                   "hypotheses, one per line")
    g.add_argument("--length-penalty", type=float, default=1.0, help="with --num-beams: a finished hypothesis scores "
                   "its summed log-probability / length ** this")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object (with tools/costs.py's figures) per "
                   "answer instead of streaming text")
    g.add_argument("--viz", default=None, metavar="OUT", help="write OUT.gif (kept patches per step with the text so "
                   "far), OUT_strip.png and OUT_shares.png (attention mass per token type over the steps)")
    return p.parse_args(argv)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def summary_line(out, cfg):
    """The one line on stderr after a streamed answer: speed, memory, what was kept, its costs against none's."""
    r = out.rows[0]
    n_new = len(r["token_ids"])
    speed = f"{1e3 / out.decode_ms_per_token:.1f} tok/s" if n_new > 1 else "n/a (one new token)"
    flops, kv = (dyrate.row_cost(cfg, r, budget) for budget in ("flops", "kv"))
    stages = f" (at layers {'/'.join(map(str, r['stages']))}: {'/'.join(map(str, r['kept_stages'][-1]))})" \
        if len(r["stages"]) > 1 else ""
    return (f"prompt tokens {r['prompt_tokens']} | new tokens {n_new} | prefill {out.prefill_ms:.1f} ms | decode "
            f"{speed} | peak memory {out.peak_memory_bytes / 2**30:.2f} GiB | {r['rule']}: image tokens kept "
            f"{r['kept_visual'][0]} -> {r['kept_visual'][-1]}{stages} of {cfg.n_image_tokens}, FLOPs "
            f"{flops[0] / flops[1]:.2f} of none's, mean KV cache {kv[0] / kv[1]:.2f} of none's")


def main(argv=None):
    args = parse_args(argv)
    beams = args.num_beams > 1 or args.num_return_sequences > 1
    with cli.user_errors():  # every check before the weights load (minutes for 7B): flags, files, the inputs
        device = cli.device(args.device)
        cfg, tokenizer = cli.checkpoint(args.model)
        rule = cli.rule(args.method, args.predictor, cfg, device)
        conv, pad = prompt_protocol([rule], args.conv, args.pad, args.allow_protocol_mismatch)
        options = dict(rule=rule, k=args.k, conv=conv, pad=pad, stats=bool(args.json or args.viz),
                       allow_protocol_mismatch=args.allow_protocol_mismatch)
        check_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        make_batch(cfg, tokenizer, [args.image], [args.prompt], args.max_new_tokens, device=device, **options)
        if beams:
            from tools import beam
            beam.check_options(args.num_beams, args.num_return_sequences, args.length_penalty, args.temperature)
        if args.viz:
            if getattr(rule, "compress", None):
                raise ValueError("--viz greys out the patches a rule drops, and VisionZip's tokens are not patches "
                                 "(it merges them before the language model): leave --viz out.")
            cli.check_writable_folder(args.viz + ".gif", "--viz", make=True)
        model = cli.load_model(args.model, device, cli.dtype(args.dtype, device), log)
        if args.compile:
            from tools import fast
            fast.compile_decode(model)
        if isinstance(options["rule"], dyrate.Learned):
            log(options["rule"].predictor.describe(cfg))
        streamed = not args.json and not beams
        if beams:
            out = beam.generate(model, tokenizer, [args.image], [args.prompt], args.max_new_tokens, args.num_beams,
                                args.num_return_sequences, args.length_penalty, **options)
        else:
            out = generate(model, tokenizer, [args.image], [args.prompt], args.max_new_tokens, **options,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           on_text=(lambda b, piece: print(piece, end="", flush=True)) if streamed else None)
        if args.viz:
            from tools import viz
            for path in viz.save(args.viz, args.image, out.rows[0], tokenizer, cfg, pad):
                log(f"wrote {path}")
    report(args, out, cfg, streamed)
    return out


def report(args, out, cfg, streamed):
    """--json: one line per returned sequence, with its costs; else the answer(s) and the summary line."""
    if args.json:
        from tools import costs
        for r in costs.add(out.rows, cfg):
            print(json.dumps(dict(r, prefill_ms=round(out.prefill_ms, 3), new_tokens=len(r["token_ids"]),
                                  decode_ms_per_token=round(out.decode_ms_per_token, 3),
                                  peak_memory_bytes=out.peak_memory_bytes)))
        return
    if streamed:
        print()  # the streamed answer ends its line
    else:  # beam search: the returned sequences, a line each
        print("\n".join(r["text"] for r in out.rows))
    log(summary_line(out, cfg))


if __name__ == "__main__":
    main()
