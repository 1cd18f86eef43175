"""
Train the DyRate rate predictor end to end under a budget (FLOPs, mean KV-cache size or no-cache FLOPs); the VLM
stays frozen and only the predictor (1161 parameters for LLaVA-1.5-7B) learns.

    python train.py --model DIR --data train.jsonl --out predictor --target 0.5                # a FLOPs budget
    python train.py --model DIR --data train.jsonl --out predictor --budget kv --target 0.4    # a mean KV-cache budget
    python train.py --model llava-1.5-7b-hf --conv vicuna_v1 --pad --data mix.json --max-samples 20000 \\
        --max-answer-tokens 256 --out predictor --micro-batch-size 1 --checkpoint               # 7B on one 24 GB GPU
    torchrun --nproc_per_node=8 train.py --model DIR --data train.jsonl --out predictor --target 0.5

Data: JSONL {"image", "prompt", "answer" (optional)} or LLaVA's conversation JSON; a record without an answer takes the
unpruned model's greedy one, which `python -m tools.distill` writes first; a sample is tokenised when a batch first
needs it. Loss: KL(unpruned || pruned) over the answer + --budget-weight * (cost ratio - target)^2, in bfloat16 on CUDA.
A failure on any torchrun rank saves the state and stops every rank. docs/training.md has the details and 7B's memory.
"""
import argparse
import io
import json
import math
import os
import re
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import cli
import dyrate
import generate
import processing

ANSWER_TOKENS = 64  # the length of self-distilled answers (tools/distill.py), part of their key in the answers cache

# ----------------------------------------------------------------------------------------------------------------------
# data


@dataclass
class Sample:
    image: str  # absolute path
    prompt: str
    ids: list | None  # prompt ids, image tokens expanded (None: not tokenised yet)
    start: int | None  # index of the first image token
    answer: list | str | None  # answer ids (its text until tokenised; None: to be distilled)
    key: str = ""  # its distilled answer's key in the answers cache ("" if it has its own)
    bad: str = ""  # why it is skipped, found when first used (a bad prompt, too long, an image that does not decode)


def read_records(path, image_folder=None):
    """(image, prompt, answer or None) from JSONL or LLaVA's conversation JSON, and a Counter of the records skipped.
    Rows are decoded one at a time: mix665k's 1 GB of JSON never becomes a list of dicts (~6x the file's size)."""
    folder = image_folder or os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        text = f.read()
    records, skipped = [], Counter()

    def rows():
        if not text.lstrip().startswith("["):  # JSONL
            for line in filter(str.strip, io.StringIO(text)):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    skipped["bad JSON line"] += 1
            return
        i, decode, gap = text.index("[") + 1, json.JSONDecoder().raw_decode, re.compile(r"[\s,]*")
        while (i := gap.match(text, i).end()) < len(text) and text[i] != "]":  # LLaVA's JSON: one list
            try:
                row, i = decode(text, i)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}).") from None
            yield row
    for row in rows():
        row = row if isinstance(row, dict) else {}
        prompt, answer = row.get("prompt"), row.get("answer")
        if "conversations" in row:  # LLaVA's format: the first human and gpt turns
            turns = row["conversations"] if isinstance(row["conversations"], list) else []
            turns = [t for t in turns if isinstance(t, dict)]
            prompt = next((t.get("value") for t in turns if t.get("from") == "human"), None)
            answer = next((t.get("value") for t in turns if t.get("from") == "gpt"), None)
            prompt = prompt.replace("<image>", "") if isinstance(prompt, str) else prompt
        why = ("no image path" if not isinstance(row.get("image"), str) or not row["image"] else
               "prompt is not text" if prompt and not isinstance(prompt, str) else
               "empty prompt" if not prompt or not prompt.strip() else
               "answer is not text" if answer is not None and not isinstance(answer, str) else None)
        if why:
            skipped[why] += 1
        else:
            records.append((os.path.join(folder, row["image"]), prompt.strip(), answer or None))
    return records, skipped


def read_answers(data, keys=None):
    """{key: answer ids, or why tools.distill skipped it (a str)} from every rank's answers file (`keys`, if given)."""
    folder, name = os.path.split(os.path.abspath(data))
    files = sorted(f for f in os.listdir(folder) if f.startswith(name + ".answers") and f.endswith(".jsonl"))
    return {line["key"]: line.get("answer", line.get("skipped")) for f in files
            for line in processing.read_lines(os.path.join(folder, f)) if keys is None or line["key"] in keys}


def usable_samples(path, cfg, args, need_answers=True, max_samples=None, seed=None):
    """path's records as Samples not yet tokenised, and a Counter of those skipped; with a seed, in a random order drawn
    from it alone (the same on every rank and in tools.distill), the first max_samples of it only. Only what needs no
    tokens is checked: the image exists, the answer is given or distilled (need_answers=False: None, tools.distill)."""
    records, skipped = read_records(path, args.image_folder)
    if seed is not None:
        order = torch.randperm(len(records), generator=torch.Generator("cpu").manual_seed(seed), device="cpu")
        records = [records[i] for i in order[:max_samples].tolist()]
    key = [dyrate.fingerprint(cfg), args.conv, args.pad, args.distill_max_new_tokens]  # + image, prompt
    samples = [Sample(image, prompt, None, None, answer, "" if answer else json.dumps(key + [image, prompt]))
               for image, prompt, answer in records]
    answers = read_answers(path, {s.key for s in samples if s.answer is None})
    for s in samples:
        if s.answer is None:
            s.answer = answers.get(s.key)
            s.bad = s.answer if isinstance(s.answer, str) else ""  # why tools.distill skipped it (the image, too long)
        if not os.path.isfile(s.image):
            s.bad = "image not found"
        if s.bad:
            skipped[s.bad] += 1
    samples = [s for s in samples if not s.bad]
    missing = sum(s.answer is None for s in samples)
    if need_answers and missing:
        folder = f" --image-folder {args.image_folder}" if args.image_folder else ""
        subset = f" --max-samples {max_samples} --seed {seed}" if max_samples else ""
        raise ValueError(f"{path}: {missing} record(s) have no answer and none distilled for this model, --conv, --pad "
                         f"and --distill-max-new-tokens: distil them first with `python -m tools.distill --model "
                         f"{args.model} --data {path}{folder} --conv {args.conv}{' --pad' if args.pad else ''} "
                         f"--max-new-tokens {args.distill_max_new_tokens}{subset}` (torchrun shards it over GPUs).")
    return samples, skipped


def tokenise(samples, cfg, tok, args, skipped, max_answer=None):
    """The usable ones of `samples`, each tokenised (in place) when first used, its answer cut to its first
    `max_answer` tokens; one that cannot be used (a bad prompt, longer than the context) is marked, counted once."""
    limit = cfg.text.max_position_embeddings
    for s in samples:
        if s.ids is None and not s.bad:
            try:
                s.ids, s.start = tok.encode_prompt(s.prompt, args.conv)
            except ValueError as e:
                s.bad = f"bad prompt ({e})"
            if isinstance(s.answer, str):  # EOS ends a given answer, as the model ends its own
                s.answer = tok.tok.encode(s.answer, add_special_tokens=False).ids + [cfg.eos_token_id]
            if s.answer is not None and max_answer:  # NOTE: a cut answer has no EOS: it does not end there
                s.answer = s.answer[:max_answer]
            n_answer = args.distill_max_new_tokens if s.answer is None else len(s.answer)
            if not s.bad and len(s.ids) + n_answer > limit:
                s.bad = f"longer than the context ({limit})"
            if s.bad:
                skipped[s.bad] += 1
    return [s for s in samples if not s.bad]


def load_samples(path, cfg, tok, args, log, need_answers=True, max_answer=None):
    """All of path's usable samples, tokenised (a held-out file; tools.compare), and a Counter of those skipped."""
    samples, skipped = usable_samples(path, cfg, args, need_answers)
    samples = tokenise(samples, cfg, tok, args, skipped, max_answer)
    log(f"{path}: {len(samples)} samples" + skip_note(skipped))
    return samples, skipped


def skip_note(skipped, lead=", skipped "):
    """'{lead}N: n1 reason1, n2 reason2', or '' if none was skipped."""
    reasons = ", ".join(f"{n} {why}" for why, n in skipped.items())
    return f"{lead}{sum(skipped.values())}: {reasons}" if skipped else ""


# ----------------------------------------------------------------------------------------------------------------------
# the training step


def load_pixels(samples, model, args, skipped):
    """The samples whose image decodes and their pixels (B, 3, S, S); one that does not is counted once and dropped."""
    kept, px = [], []
    for s in [s for s in samples if not s.bad]:
        try:
            px.append(processing.preprocess(s.image, model.config.vision.image_size, args.pad))
            kept.append(s)
        except (ValueError, OSError):
            s.bad = "unreadable image"
            skipped[s.bad] += 1
    return kept, torch.stack(px).to(args.device, model.language_model.lm_head.weight.dtype) if px else None


def batch_tensors(samples, pad_id, device):
    """input ids (B, T) of prompt + answer padded at the end; prompt lengths, image starts, answer lengths (B,)."""
    T = max(len(s.ids) + len(s.answer) for s in samples)
    ids = torch.tensor([s.ids + s.answer + [pad_id] * (T - len(s.ids) - len(s.answer)) for s in samples], device=device)
    columns = zip(*[(len(s.ids), s.start, len(s.answer)) for s in samples])
    return ids, *(torch.tensor(column, device=device) for column in columns)


@dataclass
class MicroBatch:
    """A micro-batch after layers < K: what its teacher and its student both start from at layer K."""
    ids: torch.Tensor  # (b, T) prompt + answer, padded at the end
    lengths: torch.Tensor  # (b,) prompt tokens
    n_answer: torch.Tensor  # (b,) answer tokens
    x: torch.Tensor  # (b, T, C) the hidden state entering layer K
    mask: dyrate.TrainMask  # holds the rows' Gumbel noise: decide() with autograd gives the student the same sample
    shares: torch.Tensor  # (b, T, H, 4) what each row's rate is decided from (TrainMask.statistics)
    scores: torch.Tensor  # (b, T, N) each row's ranking of the image tokens
    cost: float  # the budget's cost of its sampled decisions, summed over its rows
    cost_none: float  # the same with every image token kept


def budget_cost(cfg, kept_count, lengths, n_answer, predictor, budget):
    """Σ over the rows of dyrate.budget_cost of the answer steps' kept counts (differentiable), and Σ of none's."""
    pairs = [dyrate.budget_cost(cfg, L, kept_count[b, L - 1:L - 1 + n], predictor.k, budget, n, predictor.flops())
             for b, (L, n) in enumerate(zip(lengths.tolist(), n_answer.tolist()))]
    return sum(cost for cost, _ in pairs), sum(none for _, none in pairs)


@torch.no_grad()
def prefix(model, predictor, samples, pixels, noise, args, tau):
    """The vision tower and layers < K of a micro-batch, once for teacher and student and without autograd (the
    predictor's input is data, not a function of its parameters); the rows' rates sampled for the batch's cost."""
    cfg, lm = model.config, model.language_model.model
    ids, lengths, starts, n_answer = batch_tensors(samples, cfg.pad_token_id, args.device)
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device).expand(B, T)
    mask = dyrate.TrainMask(predictor, cfg.n_image_tokens, starts, lengths, tau, noise[:, :T])
    x, probs = lm.run(0, mask.k, model.embed(ids, pixels), positions, None, probe_rows=mask.probe_rows(lengths, T))
    shares, scores = mask.statistics(probs)  # (B, T, H, 4), (B, T, N)
    mask.decide(shares, scores, T)
    cost, none = budget_cost(cfg, mask.kept_count, lengths, n_answer, predictor, args.budget)
    return MicroBatch(ids, lengths, n_answer, x, mask, shares, scores, float(cost), float(none))


def response_logits(model, mb, key_weight=None, checkpoint=False):
    """Layers >= K (the student's key weight, or None for the teacher): logits (b, R, V) of the rows that predict the
    answer (row L-1+i predicts answer token i) and a (b, R) mask of the real ones; the LM head runs on those only."""
    lm, (B, T) = model.language_model.model, mb.ids.shape
    positions = torch.arange(T, device=mb.ids.device).expand(B, T)
    h, _ = lm.run(mb.mask.k, len(lm.layers), mb.x, positions, None, key_weight=key_weight, checkpoint=checkpoint)
    R = int(mb.n_answer.max())
    rows = (mb.lengths - 1)[:, None] + torch.arange(R, device=h.device)  # (B, R)
    valid = torch.arange(R, device=h.device) < mb.n_answer[:, None]
    h = lm.norm(h).gather(1, rows.clamp(max=T - 1)[..., None].expand(-1, -1, h.shape[2]))  # (B, R, C)
    return model.language_model.lm_head(h).float(), valid


def micro_batch_loss(model, predictor, mb, args, n_tokens, cost_rest, cost_none):
    """A micro-batch's share of the batch's loss (the other micro-batches' costs, cost_rest, held constant): the
    shares' gradients sum to the whole batch's. Returns the share and the micro-batch's summed fit (a number)."""
    weight = mb.mask.decide(mb.shares, mb.scores, mb.ids.shape[1])  # (b, T, T): the Gumbel sample prefix() drew
    logits, valid = response_logits(model, mb, weight, args.checkpoint)
    if args.loss == "kl":
        with torch.no_grad():
            teacher, _ = response_logits(model, mb)
        per_token = F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    else:
        answer_rows = mb.lengths[:, None] + torch.arange(logits.shape[1], device=logits.device)  # (b, R)
        targets = mb.ids.gather(1, answer_rows.clamp(max=mb.ids.shape[1] - 1))
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    fit = (per_token * valid).sum()
    cost, _ = budget_cost(model.config, mb.mask.kept_count, mb.lengths, mb.n_answer, predictor, args.budget)
    ratio = (cost + cost_rest) / cost_none
    return fit / n_tokens + args.budget_weight * (ratio - args.target) ** 2, fit.detach().item()


def train_step(model, predictor, samples, args, tau, generator, skipped):
    """One batch's forward and backward passes, the gradient accumulated in the predictor: every micro-batch's prefix
    first (the cost ratio needs them all), then each one's layers >= K and backward. The Gumbel noise is drawn once
    per batch, whatever --micro-batch-size. Returns (loss, fit, cost ratio), or None if no image decoded."""
    samples, pixels = load_pixels(samples, model, args, skipped)
    if not samples:
        return None
    B, T = len(samples), max(len(s.ids) + len(s.answer) for s in samples)
    noise = torch.rand((B, T, len(predictor.rates)), generator=generator, device=args.device)
    m = args.micro_batch_size or B
    parts = [prefix(model, predictor, samples[i:i + m], pixels[i:i + m], noise[i:i + m], args, tau)
             for i in range(0, B, m)]
    n_tokens = sum(int(mb.n_answer.sum()) for mb in parts)
    cost, cost_none = sum(mb.cost for mb in parts), sum(mb.cost_none for mb in parts)
    fit = 0.0
    for mb in parts:
        share, mb_fit = micro_batch_loss(model, predictor, mb, args, n_tokens, cost - mb.cost, cost_none)
        share.backward()
        fit += mb_fit
    ratio = cost / cost_none
    return fit / n_tokens + args.budget_weight * (ratio - args.target) ** 2, fit / n_tokens, ratio


# ----------------------------------------------------------------------------------------------------------------------
# evaluation through the real inference path


@torch.inference_mode()
def forced_decode(model, s, px, pruner, n_steps, tokens=None):
    """Decode one sample over the KV cache, feeding back `tokens` (teacher forcing) or else the greedy ones up to EOS:
    the logits of every step (n, V) and the tokens fed or chosen."""
    dev = px.device
    choose = None if tokens is None else (lambda t, logits: torch.tensor([tokens[t]], device=dev))
    eos = None if tokens is not None else model.config.eos_token_id
    steps = list(generate.decode(model, torch.tensor([s.ids], device=dev), torch.tensor([len(s.ids)], device=dev), px,
                                 model.new_caches(1, n_steps), n_steps, pruner, choose, eos))
    return torch.stack([logits[0] for _, logits in steps]).float(), [int(token[0]) for token, _ in steps]


def reference(model, samples, args, log):
    """(sample, logits, tokens) of the unpruned model's greedy answer to each held-out sample whose image decodes."""
    refs, skipped = [], Counter()
    for s in samples:
        kept, px = load_pixels([s], model, args, skipped)
        if kept:
            refs.append((s, *forced_decode(model, s, px, None, args.eval_max_new_tokens)))
    if skipped:
        log(f"held-out set: left out {skipped['unreadable image']} sample(s) whose image does not decode")
    return refs


def evaluate(model, refs, make_rule, k, args):
    """Hard decisions of make_rule(n_steps) at layer k, teacher-forced with the unpruned greedy tokens: each budget's
    cost ratio (Σ over samples / Σ for none), top-1 agreement with those tokens, KL(unpruned || pruned) per token."""
    cfg, dev = model.config, torch.device(args.device)
    rows, agree, kl, count = [], 0, 0, 0
    for s, ref_logits, ref_tokens in refs:
        n = len(ref_tokens)
        pruner = dyrate.Pruner(make_rule(n), cfg.n_image_tokens, torch.tensor([s.start], device=dev),
                               torch.tensor([len(s.ids)], device=dev), k, stats=False)
        logits, _ = forced_decode(model, s, load_pixels([s], model, args, Counter())[1], pruner, n, ref_tokens)
        rows.append(dict(pruner.summary(0, n), prompt_tokens=len(s.ids)))
        agree += (logits.argmax(-1).cpu() == torch.tensor(ref_tokens, device="cpu")).sum().item()
        kl += F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="sum").item()
        count += n

    def ratio(budget):
        pairs = [dyrate.row_cost(cfg, r, budget) for r in rows]
        return sum(c for c, _ in pairs) / sum(none for _, none in pairs)
    return dict({f"{budget}_ratio": ratio(budget) for budget in dyrate.BUDGETS}, agreement=agree / count, kl=kl / count)


# ----------------------------------------------------------------------------------------------------------------------
# the loop, and its state: OUT.state (safetensors + JSON, written atomically), kept in memory at each step boundary


def capture(it, held_out, predictor, optimizer, generator, args):
    """The whole state after `it` steps as CPU tensors and JSON metadata (the predictor is tiny: copies are free)."""
    opt = optimizer.state_dict()
    tensors = {f"predictor.{k}": v.detach().to("cpu", copy=True) for k, v in predictor.state_dict().items()}
    tensors |= {f"optimizer.{i}.{k}": torch.as_tensor(v, device="cpu").clone()
                for i, state in opt["state"].items() for k, v in state.items()}
    tensors["generator"] = generator.get_state().cpu()
    return tensors, dict(iter=it, held_out=held_out, args=vars(args), param_groups=opt["param_groups"])


def restore(state, predictor, optimizer, generator):
    """Put a captured (or read) state back; returns its metadata."""
    tensors, meta = state
    predictor.load_state_dict({k[len("predictor."):]: v for k, v in tensors.items() if k.startswith("predictor.")})
    opt = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, i, name = key.split(".", 2)
            opt.setdefault(int(i), {})[name] = v.to(predictor.linear.weight.device) if name != "step" else v
    optimizer.load_state_dict({"state": opt, "param_groups": meta["param_groups"]})
    generator.set_state(tensors["generator"])
    return meta


def write_state(path, state):
    tensors, meta = state
    processing.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"train_state": json.dumps(meta)}))


def read_state(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["train_state"])


def save_checkpoint(state, predictor, args, cfg, rank):
    """Rank 0 writes the predictor file (the predictor holds the state's weights; its metadata, the prompt protocol
    that generate.py and the evaluations then use by default) and OUT.state."""
    if rank == 0:
        meta = state[1]
        predictor.save(args.out, dyrate.fingerprint(cfg), dict(
            trained_iters=meta["iter"], budget=args.budget, target=args.target, held_out=meta["held_out"],
            conv=args.conv, pad=args.pad))
        write_state(args.out + ".state", state)


def get_lr(it, args):
    """Linear warmup, then cosine decay to min_lr (nanoGPT's schedule)."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = min(1.0, (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def batch_indices(it, n, batch, rank=0, world=1, seed=0):
    """This rank's share of global batch `it`, from a permutation drawn from (seed, epoch) alone: a resumed run at
    step `it` gets exactly the batch an uninterrupted one would."""
    per_epoch = max(1, n // (batch * world))
    epoch, i = divmod(it, per_epoch)
    order = torch.Generator("cpu").manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(n, generator=order, device="cpu").tolist()
    start = (i * world + rank) * batch
    return [perm[(start + j) % n] for j in range(batch)]


class RankFailed(Exception):
    """A step failed on one rank or more: raised on every rank at the same all-reduce."""


def all_reduce(values, error, rank, world):
    """values (1-D) summed over the ranks, each rank's failure flag (its error, or None) folded into the same
    all-reduce: an error on any rank raises RankFailed on all of them at once, naming each rank that failed and why."""
    if isinstance(error, cli.Stop):  # SIGTERM: an interrupt, not a failure
        raise error
    if error is not None:
        traceback.print_exception(error)
        error = f"{type(error).__name__}: {error}"
    failed = torch.zeros(world, device=values.device)
    failed[rank] = error is not None
    if world > 1:
        both = torch.cat([values, failed])
        dist.all_reduce(both)
        values, failed = both[:-world], both[-world:]
    if failed.any():
        errors = [error] * world
        if world > 1:
            dist.all_gather_object(errors, error)
        raise RankFailed("; ".join(f"rank {r}: {e}" if world > 1 else e for r, e in enumerate(errors) if e))
    return values


def train(model, tok, predictor, samples, refs, args, log, rank=0, world=1, resumed=None):
    """The loop; Ctrl-C, SIGTERM or an error on any rank (out of memory, ...) save the last step boundary's state, so
    that --resume redoes the failed step exactly. Returns the latest held-out evaluation."""
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator(args.device).manual_seed(args.seed * 1000 + rank)
    start, held_out = 0, None
    if resumed is not None:
        meta = restore(resumed, predictor, optimizer, generator)
        start, held_out = meta["iter"], meta["held_out"]
        log(f"resumed from {args.out}.state at step {start}")
    if start >= args.max_iters:
        log(f"the state at {args.out}.state is already at step {start} of {args.max_iters}: nothing to train")
        return held_out
    cost_name = {"flops": "FLOPs", "kv": "mean KV", "nocache": "no-cache FLOPs"}[args.budget]
    skipped, params = Counter(), list(predictor.parameters()) if world > 1 else []  # params: those all-reduced
    generate.peak_memory(args.device, reset=True)
    boundary = capture(start, held_out, predictor, optimizer, generator, args)
    try:
        with cli.sigterm_raises_stop():
            for it in range(start, args.max_iters):
                t0, lr = time.perf_counter(), get_lr(it, args)
                tau = args.tau_start * (args.tau_end / args.tau_start) ** (it / max(1, args.max_iters - 1))  # geometric
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                batch = [samples[i] for i in batch_indices(it, len(samples), args.batch_size, rank, world, args.seed)]
                out = error = None
                try:
                    batch = tokenise(batch, model.config, tok, args, skipped, args.max_answer_tokens)
                    out = train_step(model, predictor, batch, args, tau, generator, skipped)
                except Exception as e:  # every rank learns it at the all-reduce below: none waits for a failed one
                    error = e
                for p in params:
                    p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                # one all-reduce per step (gradient, stats, failure flags): the micro-batches communicate nothing
                stats = torch.tensor(out or (0.0, 0.0, 0.0), device=args.device)
                stats = all_reduce(torch.cat([*(p.grad.flatten() for p in params), stats]), error, rank, world)
                *grads, stats = (stats / world).split([p.numel() for p in params] + [3])
                for p, g in zip(params, grads):
                    p.grad = g.view_as(p)
                optimizer.step()
                loss, fit, ratio = stats.tolist()
                if (it + 1) % args.log_interval == 0 or it == 0:  # the step's time (its stats synchronised) and peak
                    log(f"step {it + 1}/{args.max_iters}: loss {loss:.4f} | {args.loss} {fit:.4f} | {cost_name} "
                        f"ratio {ratio:.3f} (target {args.target}) | tau {tau:.3f} | lr {lr:.2e} | "
                        f"{(time.perf_counter() - t0) * 1e3:.0f} ms | peak memory "
                        f"{generate.peak_memory(args.device) / 2**30:.2f} GiB" + skip_note(skipped, " | skipped "))
                if (it + 1) % args.eval_interval == 0 or it + 1 == args.max_iters:
                    try:
                        if rank == 0:
                            r = held_out = evaluate(model, refs, lambda n: dyrate.Learned(predictor), args.k, args)
                            log(f"held-out, hard decisions: {cost_name} ratio {r[f'{args.budget}_ratio']:.3f} (target "
                                f"{args.target}) | FLOPs {r['flops_ratio']:.3f}, mean KV {r['kv_ratio']:.3f}, "
                                f"no-cache FLOPs {r['nocache_ratio']:.3f} | agreement with unpruned "
                                f"{r['agreement']:.3f} | KL/token {r['kl']:.4f}")
                        save_checkpoint(capture(it + 1, held_out, predictor, optimizer, generator, args), predictor,
                                        args, model.config, rank)
                    except Exception as e:
                        error = e
                    all_reduce(torch.zeros(0, device=args.device), error, rank, world)  # rank 0 done, or failed
                boundary = capture(it + 1, held_out, predictor, optimizer, generator, args)
    except (*cli.INTERRUPTS, RankFailed) as e:  # back to the last step boundary, saved
        it = restore(boundary, predictor, optimizer, generator)["iter"]
        save_checkpoint(boundary, predictor, args, model.config, rank)
        if isinstance(e, RankFailed):
            if world > 1:
                dist.barrier()  # the state is on disk before any rank exits (torchrun then stops the others)
            sys.exit(f"error: step {it + 1} failed ({e}); the state of step {it} is saved to {args.out}.state: " + (
                "resume with --checkpoint and a smaller --micro-batch-size (docs/training.md gives the memory per "
                "setting)" if "OutOfMemoryError" in str(e) else "rerun with --resume once the cause is fixed"))
        log(f"\ninterrupted at step {it}: state saved to {args.out}.state; rerun with --resume to continue")
        sys.exit(143 if isinstance(e, cli.Stop) else 130)
    log(f"predictor written to {args.out}")
    return held_out


# ----------------------------------------------------------------------------------------------------------------------
# the command line


def parse_args(argv=None):
    """Each number is checked by its type, so argparse names the flag in its error before anything loads."""
    p = argparse.ArgumentParser(description="Train the DyRate rate predictor under a budget (the VLM frozen).")
    cli.add_model_args(p, default_model=None, required=True, dtype_help="default: bfloat16 on CUDA, float32 on CPU "
                       "(float16 is refused: no loss scaling)")
    whole, positive, nonnegative = cli.number(int, 1), cli.number(float, 0, strict=True), cli.number(float, 0)
    g = cli.add_data_args(p, "the records {image, prompt, answer?}")
    g.add_argument("--val-data", default=None, help="held-out file (default: --val-size samples of --data)")
    g.add_argument("--val-size", type=whole, default=32, help="held-out samples taken from --data without --val-data")
    g.add_argument("--distill-max-new-tokens", type=whole, default=ANSWER_TOKENS, help="tools.distill --max-new-tokens")
    g.add_argument("--max-samples", type=whole, default=None, help="a random N of --data's records (by --seed, the "
                   "held-out ones among them), chosen before tokenising; tools.distill takes the same")
    g.add_argument("--max-answer-tokens", type=whole, default=None, help="cut each answer (given or distilled) to its "
                   "first N tokens: a step's memory grows with the answer")
    g = p.add_argument_group("predictor and objective")
    g.add_argument("--out", required=True, help="predictor file to write (generate.py --predictor reads it)")
    cli.add_k_arg(g)
    g.add_argument("--rates", type=lambda text: cli.parse_rates(text) and text, default="0:1:9",
                   help="candidate drop rates: 'start:stop:count' or a comma list")
    g.add_argument("--step-feature", action="store_true", help="an extension: the predictor also sees the answer step")
    g.add_argument("--budget", choices=dyrate.BUDGETS, default="flops", help="FLOPs, mean KV cache or no-cache FLOPs")
    g.add_argument("--target", type=cli.number(float, 0, strict=True, high=1, hint=" (a fraction of none's cost)"),
                   default=0.5, help="the budget as a fraction of none's cost")
    g.add_argument("--budget-weight", type=nonnegative, default=20.0, help="weight of (cost ratio - target)^2")
    g.add_argument("--loss", choices=["kl", "ce"], default="kl", help="KL to the unpruned model, or CE to the answer")
    g.add_argument("--tau-start", type=positive, default=1.0, help="Gumbel temperature at the start")
    g.add_argument("--tau-end", type=positive, default=0.1, help="Gumbel temperature at the end")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-iters", type=cli.number(int, 1, hint=" (to evaluate a trained predictor: python -m "
                   "tools.compare)"), default=300, help="training steps")
    g.add_argument("--batch-size", type=whole, default=8, help="samples per step (per rank under torchrun)")
    g.add_argument("--micro-batch-size", type=whole, default=None, help="samples per forward/backward (7B on 24 GB: 1)")
    g.add_argument("--checkpoint", action="store_true", help="activation checkpointing of layers >= K (less memory)")
    g.add_argument("--lr", type=positive, default=0.05, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=nonnegative, default=0.005, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-iters", type=cli.number(int, 0), default=10, help="linear warmup steps")
    g.add_argument("--weight-decay", type=nonnegative, default=0.0, help="AdamW weight decay")
    g.add_argument("--seed", type=int, default=0, help="--max-samples' subset, held-out split, data order, noise")
    g.add_argument("--resume", action="store_true", help="continue from OUT.state exactly")
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=whole, default=10, help="steps between log lines")
    g.add_argument("--eval-interval", type=whole, default=100, help="steps between held-out evaluations (and saves)")
    g.add_argument("--eval-max-new-tokens", type=whole, default=32, help="answer length evaluated per held-out sample")
    return p.parse_args(argv)


def resumed_state(args):
    """The saved state, if it was trained with these options (else those that differ are named)."""
    if not os.path.isfile(args.out + ".state"):
        raise FileNotFoundError(f"--resume but no training state at {args.out}.state; drop --resume to start afresh.")
    try:
        state = read_state(args.out + ".state")
    except (SafetensorError, OSError, KeyError, TypeError) as e:
        raise ValueError(f"{args.out}.state is not a training state written by train.py ({e}).") from None
    # how the steps are computed (smaller after running out of memory), logged and saved: the rest must match
    may_change = {"device", "out", "resume", "micro_batch_size", "checkpoint", "log_interval", "eval_interval",
                  "eval_max_new_tokens"}
    saved, names = state[1]["args"], {"world_size": "WORLD_SIZE"}  # torchrun's: it sets the batch and data order
    changed = [f"{names.get(k, '--' + k.replace('_', '-'))} {v!r} (the state has {saved.get(k)!r})"
               for k, v in vars(args).items() if k not in may_change and saved.get(k) != v]
    if changed:
        raise ValueError(f"--resume with other options than the run in {args.out}.state: {'; '.join(changed)}. "
                         f"Resume with the same options, or train afresh to another --out.")
    return state


def load_data(cfg, tok, args, log):
    """The training samples, each tokenised when a batch first needs it, and the held-out ones, tokenised now:
    --val-data, or the first --val-size of --data's usable records in their seeded order (the same for any
    --max-samples)."""
    samples, skipped = usable_samples(args.data, cfg, args, True, args.max_samples, args.seed)
    if args.val_data:
        val = load_samples(args.val_data, cfg, tok, args, log, max_answer=args.max_answer_tokens)[0]
    else:
        n, size = len(samples), args.val_size
        if n < 2:
            raise ValueError(f"{args.data} has {n} usable sample(s): at least 2 are needed (one to train on, one held "
                             f"out), or give --val-data.")
        if size >= n:
            size = max(1, n // 5)
            log(f"only {n} samples: holding out {size} of them for evaluation (--val-size {args.val_size} would hold "
                f"out all; give --val-data for a separate held-out set)")
        samples, val = samples[size:], tokenise(samples[:size], cfg, tok, args, skipped, args.max_answer_tokens)
    subset = f" (--max-samples: a random {args.max_samples} of its records)" if args.max_samples else ""
    log(f"{args.data}{subset}: {len(samples)} training samples, tokenised when first used" + skip_note(skipped))
    if not samples or not val:
        raise ValueError(f"need training and held-out samples: got {len(samples)} and {len(val)} usable ones")
    return samples, val


def make_predictor(args, cfg, val):
    """A new predictor, its target checked against what dropping every image token reaches on the held-out samples
    (the training ones are not tokenised yet)."""
    torch.manual_seed(args.seed)
    predictor = dyrate.RatePredictor(cfg.text.num_attention_heads, cli.parse_rates(args.rates), args.k,
                                     args.step_feature).to(args.device)
    floor = [dyrate.budget_cost(cfg, len(s.ids), [0] * len(s.answer), args.k, args.budget) for s in val]
    floor = sum(c for c, _ in floor) / sum(none for _, none in floor)
    if not floor < args.target <= 1:
        raise ValueError(f"--target {args.target} is out of reach: dropping every image token gives {floor:.3f} of "
                         f"none's cost ({args.budget} budget) on the held-out samples; choose a target in "
                         f"({floor:.3f}, 1].")
    return predictor


def training_dtype(name, device):
    """--dtype, or bfloat16 on CUDA and float32 on CPU; float16 is refused."""
    if name == "float16":
        raise ValueError("--dtype float16 does not train: with no loss scaling the KL's per-logit gradients (~3e-7) "
                         "lie below float16's smallest normal number, then cross ~30 frozen layers to the keep mask, "
                         "while the budget's gradient is float32: training could meet the budget and lose the quality "
                         "(docs/training.md). Use --dtype bfloat16; generate.py may run the predictor in float16.")
    return name or ("bfloat16" if device.type == "cuda" else "float32")


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors():  # every check that needs no weights (files, torchrun, the checkpoint, data, target) first
        cli.check_files((("--data", args.data), ("--val-data", args.val_data)), args.image_folder)
        cli.check_writable_folder(args.out, "--out")
        rank, world, device = cli.distributed(cli.device(args.device))
        args.device, args.world_size, args.dtype = str(device), world, training_dtype(args.dtype, device)
        log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
        cfg, tok = cli.checkpoint(args.model)
        args.k = dyrate.pruning_layer(cfg.text.num_hidden_layers, args.k)
        resumed = resumed_state(args) if args.resume else None
        samples, val = load_data(cfg, tok, args, log)
        predictor = make_predictor(args, cfg, val)
        model = cli.load_model(args.model, device, getattr(torch, args.dtype), log)
    log(predictor.describe(cfg))
    log(f"unpruned references for {len(val)} held-out samples ...")
    refs = reference(model, val, args, log) if rank == 0 else None
    held_out = train(model, tok, predictor, samples, refs, args, log, rank, world, resumed)
    if world > 1:
        dist.destroy_process_group()
    return predictor, held_out


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # during start-up: nothing of the user's to save yet (the loop saves its own state)
        sys.exit("interrupted before training started; nothing to save")
