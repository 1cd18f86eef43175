"""
Answer a prompt about an image with LLaVA-1.5 (model.py): prefill, then a decode loop over a preallocated KV cache.

    python generate.py --image assets/examples/1.png          # the shipped shapes model (models/shapes), CPU
    python generate.py --image photo.jpg --model path/to/llava-1.5-7b-hf --prompt "What is unusual here?" --json
    python generate.py --image photo.jpg --model DIR --method dyrate --predictor FILE --viz out/photo --compile

A batch (generate() with several image/prompt pairs) pads each row at its end and every cache row keeps its own
length, so no row ever attends to padding and each row computes what it would alone. generate() is prepare() (every
check, the prompts and images; no weights needed) then run(); the command line prepares before it loads the weights.
Streams the answer, then prints one summary line (prompt tokens, new tokens, prefill ms, decode tokens/s, peak
memory) on stderr.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

import cli
import dyrate
from tools import memory
from model import Llava
from processing import TEMPLATES, Tokenizer, preprocess


@dataclass
class Generation:
    """The result of one generate() call; `rows` holds one dict per image/prompt pair."""
    rows: list = field(default_factory=list)  # text, token_ids (new tokens, EOS included), prompt_tokens, costs, ...
    prefill_ms: float = 0.0  # vision tower + prompt forward + first token
    decode_ms_per_token: float = 0.0
    peak_memory_bytes: int = 0  # CUDA: max allocated; CPU: the process's peak resident set (memory.py)


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


class BeamSearch:
    """transformers' beam search (do_sample=False: beams ranked by their summed token log-probabilities, finished
    hypotheses kept with a length penalty, early_stopping=False) as the chooser of the one decode loop. Sample b's
    beams are rows b*N .. b*N+N-1 of the batch, each with its own KV-cache rows and its own pruning state: after each
    step a beam takes its parent's rows (select_rows: only the rows that change are copied), so every beam prunes by
    its own attention. Finished hypotheses keep their tokens, scores and pruning history (Pruner.lineage)."""

    def __init__(self, batch, num_beams, n_new, eos_id, caches, pruner, length_penalty=1.0):
        B, N, dev = batch, num_beams, caches[0].length.device
        self.B, self.N, self.n_new, self.eos, self.lp = B, N, n_new, eos_id, length_penalty
        self.caches, self.pruner = caches, pruner
        self.K = max(2, 1 + (eos_id is not None)) * N  # candidates per sample each step (transformers' beams_to_keep)
        self.tokens = torch.zeros(B, N, n_new, dtype=torch.long, device=dev)  # each running beam's tokens so far
        self.scores = torch.zeros(B, N, device=dev)  # their summed log-probabilities; at first only beam 0 counts
        self.scores[:, 1:] = -1e9
        self.done_tokens = torch.zeros(B, N, n_new, dtype=torch.long, device=dev)  # finished, best first
        self.done_scores = torch.full((B, N), -1e9, device=dev)  # length-penalised
        self.done_sums = torch.zeros(B, N, device=dev)  # summed log-probabilities
        self.done_len = torch.zeros(B, N, dtype=torch.long, device=dev)
        self.done_finished = torch.zeros(B, N, dtype=torch.bool, device=dev)
        self.done_history = [[None] * N for _ in range(B)]  # each finished hypothesis's pruning history
        self.undecided = torch.ones(B, dtype=torch.bool, device=dev)
        self.over = False  # every sample decided: the caller stops the loop

    @torch.profiler.record_function("beam search")  # bench.py --profile: its bookkeeping is part of "the rest"
    def choose(self, t, logits):
        """Step t: logits (B*N, V) of every beam -> the N best continuations of each sample, the finished ones into
        its hypotheses, each beam's rows to its parent's; returns the (B*N,) tokens the beams feed back."""
        B, N, K, dev = self.B, self.N, self.K, logits.device
        V = logits.shape[-1]
        logp = logits.float().log_softmax(-1).view(B, N, V)
        top, idx = (logp + self.scores[..., None]).view(B, N * V).topk(K)  # (B, K): beam-major, as transformers
        parent, token = idx // V, idx % V
        cand = self.tokens.gather(1, parent[..., None].expand(-1, -1, self.n_new)).clone()  # (B, K, n_new)
        cand[:, :, t] = token
        stops = torch.full_like(token, t + 1 >= self.n_new, dtype=torch.bool)
        if self.eos is not None:
            stops |= token == self.eos
        # the running beams: the N best candidates that did not stop
        running = top + stops.float() * -1e9
        keep = running.topk(N).indices  # (B, N)
        # the finished hypotheses: the candidates among the first N that stopped, length-penalised, merged
        length = t + 1  # generated tokens, EOS included
        finished = stops & (torch.arange(K, device=dev) < N)
        score = top / length ** self.lp + (~self.undecided[:, None]).float() * -1e9
        score = score + (~finished).float() * -1e9
        best = torch.cat([self.done_scores, score], 1).topk(N).indices  # (B, N): the old ones first on ties
        self.keep_finished(best, cand, score, top, finished, parent, length)
        self.tokens, self.scores = cand.gather(1, keep[..., None].expand(-1, -1, self.n_new)), running.gather(1, keep)
        # transformers' heuristic: a sample is decided once its N hypotheses are finished and its best running beam,
        # at the current length, cannot beat the worst of them
        worst = torch.where(self.done_finished, self.done_scores.min(1, keepdim=True).values, -1e9)
        self.undecided &= (self.scores[:, :1] / length ** self.lp > worst).any(-1)
        self.over = not bool(self.undecided.any()) or bool(stops.all())
        # each beam's rows (KV caches, pruning state) to its parent's: only the rows whose parent is another row
        rows = (torch.arange(B, device=dev)[:, None] * N + parent.gather(1, keep)).flatten()  # (B*N,)
        moved = (rows != torch.arange(B * N, device=dev)).nonzero()[:, 0]
        if len(moved):
            for cache in self.caches:
                cache.select_rows(rows[moved], moved)
            if self.pruner is not None:
                self.pruner.select_rows(rows[moved], moved)
        return self.tokens[:, :, t].flatten()

    def keep_finished(self, best, cand, score, top, finished, parent, length):
        """The N best of the old hypotheses and the new candidates (best (B, N): indices into both, old first)."""
        B, N = self.B, self.N
        new = best >= N  # (B, N): a candidate of this step
        c = (best - N).clamp(min=0)
        pick = lambda old, now: torch.where(new.view(B, N, *[1] * (old.dim() - 2)), now, old.gather(  # noqa: E731
            1, best.clamp(max=N - 1).view(B, N, *[1] * (old.dim() - 2)).expand_as(old)))
        self.done_tokens = pick(self.done_tokens, cand.gather(1, c[..., None].expand(-1, -1, self.n_new)))
        self.done_scores = torch.cat([self.done_scores, score], 1).gather(1, best)
        self.done_sums = pick(self.done_sums, top.gather(1, c))
        self.done_len = pick(self.done_len, torch.full_like(self.done_len, length))
        self.done_finished = pick(self.done_finished, finished.gather(1, c))
        histories = []
        for b, row in enumerate(best.tolist()):
            old = self.done_history[b]
            histories.append([old[i] if i < N else self.lineage(b * N + int(parent[b, i - N]), length) for i in row])
        self.done_history = histories

    def lineage(self, row, n_steps):
        return None if self.pruner is None else self.pruner.lineage(row, n_steps)

    def results(self, returns):
        """Sample b's `returns` best hypotheses, best first: (b, tokens, summed log-probability, length-penalised
        score, pruning history)."""
        out = []
        for b in range(self.B):
            for r in range(returns):
                n = int(self.done_len[b, r])
                out.append((b, self.done_tokens[b, r, :n].tolist(), float(self.done_sums[b, r]),
                            float(self.done_scores[b, r]), self.done_history[b][r]))
        return out


@dataclass
class Request:
    """A batch of image/prompt pairs made ready for generation without the weights (prepare()): every option
    checked, the prompts encoded, the images preprocessed, the pruner made. Used once: the pruner keeps its state."""
    input_ids: torch.Tensor  # (B, T) on the device, rows padded at their end
    lengths: torch.Tensor  # (B,) real tokens of each row
    image_starts: list  # index of each row's first image token
    pixel_values: torch.Tensor  # (B, 3, S, S) float32, on the CPU
    pruner: dyrate.Pruner
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    num_beams: int = 1  # > 1: beam search, each prompt's rows repeated once per beam (rows b*N .. b*N+N-1)
    num_return_sequences: int = 1
    length_penalty: float = 1.0


def check_search(temperature, num_beams, num_return_sequences, length_penalty):
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a whole number >= 1 (1: greedy or sampling), got {num_beams!r}.")
    if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) or \
            not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must lie in [1, num_beams={num_beams}], got {num_return_sequences!r}.")
    if not (isinstance(length_penalty, (int, float)) and math.isfinite(length_penalty)):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}.")
    if num_beams > 1 and temperature > 0:
        raise ValueError("beam search ranks beams by their log-probabilities (transformers' do_sample=False): use "
                         "temperature 0 with num_beams > 1.")


def check_sampling(max_new_tokens, temperature, top_k, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}.")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a whole number >= 0 (0 = all tokens), got {top_k!r}.")


def prepare(cfg, tokenizer, images, prompts, device="cpu", max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
            seed=0, conv="llava-hf", pad=False, method="none", k=None, ratio=0.5, predictor=None, schedule=None,
            stats=True, mass=0.05, num_beams=1, num_return_sequences=1, length_penalty=1.0):
    """Everything generate() does before the weights are needed, so that a command line finds every mistake before
    loading them (minutes for 7B). images: paths or PIL images; prompts: one question each. method/k/ratio/predictor/
    schedule/mass choose the visual-token pruning (dyrate.Pruner; K defaults to the predictor's or dyrate.DEFAULT_K);
    stats records the type shares at every step. num_beams > 1: beam search (BeamSearch), returning the
    num_return_sequences best hypotheses of each prompt."""
    if isinstance(images, (str, os.PathLike)) or isinstance(prompts, str):
        raise ValueError("Give a list of images and a list of prompts, one prompt per image.")
    if len(images) != len(prompts) or not images:
        raise ValueError(f"Give one prompt per image: got {len(images)} images and {len(prompts)} prompts.")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    check_search(temperature, num_beams, num_return_sequences, length_penalty)
    k = dyrate.pruning_layer(cfg.text.num_hidden_layers, k, predictor)
    encoded = [tokenizer.encode_prompt(p, conv) for p in prompts]
    lengths = torch.tensor([len(ids) for ids, _ in encoded], device=device)  # (B,)
    B, T = len(encoded), int(lengths.max())
    cfg.check_length(T + max_new_tokens)
    input_ids = torch.full((B, T), cfg.pad_token_id, dtype=torch.long, device=device)  # rows padded at their end
    for b, (ids, _) in enumerate(encoded):
        input_ids[b, :len(ids)] = torch.tensor(ids, device=device)
    pixel_values = torch.stack([preprocess(im, cfg.vision.image_size, pad) for im in images])
    starts = [start for _, start in encoded]
    if num_beams > 1:  # one row per beam, as transformers expands its inputs
        input_ids, lengths, pixel_values = (t.repeat_interleave(num_beams, 0)
                                            for t in (input_ids, lengths, pixel_values))
        starts = [s for s in starts for _ in range(num_beams)]
    pruner = dyrate.Pruner(method, cfg.n_image_tokens, torch.tensor(starts, device=device), lengths, k, ratio,
                           predictor, schedule, stats, mass)
    return Request(input_ids, lengths, starts, pixel_values, pruner, max_new_tokens, temperature, top_k, top_p, seed,
                   num_beams, num_return_sequences, length_penalty)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run(model: Llava, tokenizer: Tokenizer, request: Request, on_text=None):
    """Generate a prepared batch. on_text(row, piece) receives the text as it is produced (beam search: each returned
    hypothesis's, at the end). Each row reports its pruning history, FLOPs and KV-cache bytes next to those of
    `none`; beam search returns num_return_sequences rows per prompt, best first, each with its scores."""
    cfg, device = model.config, model.language_model.lm_head.weight.device
    dtype = model.language_model.lm_head.weight.dtype
    r, pruner = request, request.pruner
    assert r.input_ids.device == device, "prepare() the request for the model's device"
    B = len(r.input_ids)  # rows: prompts x beams
    caches = model.new_caches(B, r.max_new_tokens)
    memory.reset_peak(device)
    if r.num_beams > 1:
        search = BeamSearch(B // r.num_beams, r.num_beams, r.max_new_tokens, cfg.eos_token_id, caches, pruner,
                            r.length_penalty)
        choose, eos = search.choose, None
    else:
        generator = torch.Generator(device).manual_seed(r.seed)
        search, eos = None, cfg.eos_token_id

        def choose(t, logits):
            return sample_next_token(logits, r.temperature, r.top_k, r.top_p, generator)

    streams, new_tokens = [StreamDecoder(tokenizer) for _ in range(B)], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    sync(device)
    t0 = t1 = time.perf_counter()
    for token, _ in decode(model, r.input_ids, r.lengths, r.pixel_values.to(device, dtype), caches, r.max_new_tokens,
                           pruner, choose, eos):
        if not new_tokens:  # prefill: vision tower + prompt forward + the first token
            sync(device)
            t1 = time.perf_counter()
        new_tokens.append(token)
        if search is not None:
            if search.over:
                break
            continue
        if on_text is not None:
            for b in range(B):
                if not done[b]:
                    on_text(b, streams[b].push(token[b]))
        done |= token == cfg.eos_token_id
    sync(device)
    t2 = time.perf_counter()
    out = Generation(prefill_ms=(t1 - t0) * 1e3, decode_ms_per_token=(t2 - t1) * 1e3 / max(len(new_tokens) - 1, 1),
                     peak_memory_bytes=memory.peak(device))
    if search is not None:
        hypotheses = search.results(r.num_return_sequences)
    else:
        all_tokens = torch.stack(new_tokens, dim=1).tolist()  # (B, n_new)
        hypotheses = [(b, row[:row.index(cfg.eos_token_id) + 1] if cfg.eos_token_id in row else row, None, None, None)
                      for b, row in enumerate(all_tokens)]
    for i, (b, tokens, logprob, score, history) in enumerate(hypotheses):
        row = b * r.num_beams  # the prompt's first row
        prompt_len = int(r.lengths[row])
        out.rows.append(dict(text=tokenizer.decode(tokens), token_ids=tokens, prompt_tokens=prompt_len,
                             image_token_start=r.image_starts[row], method=pruner.method, k=pruner.k,
                             **({} if search is None else dict(logprob_sum=logprob, score=score)),
                             **pruner.row_summary(row if history is None else 0, len(tokens), cfg, prompt_len, dtype,
                                                  history)))
        if on_text is not None:
            on_text(i, streams[i].flush() if search is None else out.rows[-1]["text"])
    return out


def generate(model: Llava, tokenizer: Tokenizer, images, prompts, max_new_tokens=64, on_text=None, **options):
    """Generate for a batch of image/prompt pairs: prepare() (options: its sampling, template and pruning
    arguments), then run()."""
    device = model.language_model.lm_head.weight.device
    return run(model, tokenizer, prepare(model.config, tokenizer, images, prompts, device, max_new_tokens, **options),
               on_text)


# ----------------------------------------------------------------------------------------------------------------------
# the command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Answer a prompt about an image with LLaVA-1.5.")
    g = p.add_argument_group("input")
    g.add_argument("--image", required=True, help="image file (anything Pillow opens)")
    g.add_argument("--prompt", default="Provide a one-sentence caption for the provided image.", help="the question")
    g.add_argument("--conv", choices=sorted(TEMPLATES), default="llava-hf",
                   help="prompt template: llava-hf's 'USER: <image>\\n... ASSISTANT:' or the original with a system "
                        "prompt")
    g.add_argument("--pad", action="store_true", help="pad the image to a square first (original LLaVA evaluation)")
    g = cli.add_model_args(p)
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (static shapes in buckets "
                   "of 64 cache slots, CUDA graphs on GPU): slower first steps, faster tokens after them")
    cli.add_pruning_args(p)
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens (or at EOS)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (each prunes for "
                   "itself), as transformers' num_beams with do_sample=False; 1: greedy or sampling")
    g.add_argument("--num-return-sequences", type=int, default=1, help="with --num-beams: the best this many "
                   "hypotheses, one per line")
    g.add_argument("--length-penalty", type=float, default=1.0, help="with --num-beams: a finished hypothesis scores "
                   "its summed log-probability / length ** this")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--viz", default=None, metavar="OUT", help="write OUT.gif (kept patches per step with the text so "
                   "far), OUT_strip.png and OUT_shares.png (attention mass per token type over the steps)")
    return p.parse_args(argv)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def summary_line(out, n_image):
    """The one line on stderr after a streamed answer: speed, memory, what was kept, costs against none."""
    row = out.rows[0]
    n_new = len(row["token_ids"])
    speed = f"{1e3 / out.decode_ms_per_token:.1f} tok/s" if n_new > 1 else "n/a (one new token)"
    return (f"prompt tokens {row['prompt_tokens']} | new tokens {n_new} | prefill {out.prefill_ms:.1f} ms | decode "
            f"{speed} | peak memory {out.peak_memory_bytes / 2**30:.2f} GiB | {row['method']}: image tokens kept "
            f"{row['kept_visual'][0]} -> {row['kept_visual'][-1]} of {n_image}, {row['flops'] / 1e12:.3f} TFLOPs "
            f"({row['flops_ratio']:.2f} of none), KV cache {row['kv_cache_bytes'] / 2**20:.1f} MiB "
            f"({row['kv_cache_bytes'] / row['kv_cache_bytes_none']:.2f} of none)")


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors():
        # every check before the weights load (minutes for 7B): flags, files, then the request itself
        cli.check_pruning_flags([args.method], args.predictor)
        device = cli.device(args.device)
        cfg, tokenizer = cli.checkpoint(args.model)
        predictor = cli.load_predictor(args.predictor, cfg, device)
        request = prepare(cfg, tokenizer, [args.image], [args.prompt], device, args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, args.seed, args.conv, args.pad, args.method, args.k, args.ratio,
                          predictor, stats=bool(args.json or args.viz), mass=args.mass, num_beams=args.num_beams,
                          num_return_sequences=args.num_return_sequences, length_penalty=args.length_penalty)
        if args.viz:
            cli.check_writable_folder(args.viz + ".gif", "--viz", make=True)
        model = cli.load_model(args.model, device, cli.dtype(args.dtype, device), log)
        if args.compile:
            model.compile_decode()
        if predictor:
            log(predictor.describe(cfg))
        streamed = not args.json and args.num_beams == 1
        out = run(model, tokenizer, request, (lambda b, piece: print(piece, end="", flush=True)) if streamed else None)
        if args.viz:
            from tools import viz
            for path in viz.save(args.viz, args.image, out.rows[0], tokenizer, cfg, args.pad):
                log(f"wrote {path}")
    if args.json:  # one line per returned sequence
        for row in out.rows:
            print(json.dumps(dict(row, prefill_ms=round(out.prefill_ms, 3),
                                  decode_ms_per_token=round(out.decode_ms_per_token, 3),
                                  new_tokens=len(row["token_ids"]), peak_memory_bytes=out.peak_memory_bytes)))
    else:
        if streamed:
            print()  # the streamed answer ends its line
        else:  # beam search: the returned sequences, a line each
            print("\n".join(row["text"] for row in out.rows))
        log(summary_line(out, cfg.n_image_tokens))
    return out


if __name__ == "__main__":
    main()
