"""
Train the DyRate rate predictor end to end under a budget (FLOPs, mean KV-cache size or no-cache FLOPs); the VLM
stays frozen and only the predictor (1161 parameters for LLaVA-1.5-7B) learns.

    python train.py --model DIR --data train.jsonl --out predictor --target 0.5                # a FLOPs budget
    python train.py --model DIR --data train.jsonl --out predictor --budget kv --target 0.4    # a mean KV-cache budget
    python train.py --model llava-1.5-7b-hf --data train.jsonl --out predictor --dtype bfloat16 \\
        --micro-batch-size 1 --checkpoint                                                       # 7B on one 24 GB GPU
    torchrun --nproc_per_node=8 train.py --model DIR --data train.jsonl --out predictor --target 0.5

Data: JSONL records {"image": path, "prompt": text, "answer": text (optional)} (paths relative to the file's folder),
or LLaVA's conversation JSON (a list of {"image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", ...}]}). A record without an answer takes the frozen unpruned model's own greedy answer from
DATA.answers.jsonl, which `python -m tools.distill` writes first (self-distillation: a step before training, as
nanoGPT's data/*/prepare.py). Images are decoded when first used; bad records are skipped and counted.

A step (train_step): layers < K once without autograd, the rates sampled with the straight-through Gumbel-Softmax,
then micro-batch by micro-batch the student's layers >= K (--checkpoint: recomputed in the backward pass) and the
teacher's; the loss is KL(unpruned || pruned) over the response tokens plus --budget-weight * (cost ratio - target)^2,
the ratio counted by dyrate.budget_cost so that its gradient reaches the predictor. Every --eval-interval steps the
held-out set runs through the real inference path with hard decisions (`python -m tools.compare` sets a trained
predictor beside FastV, a ramp and VTW at the same cost) and the predictor and OUT.state are saved atomically
(safetensors + JSON); --resume continues exactly; Ctrl-C and SIGTERM save the last step boundary's state first.
docs/training.md has the details and the memory at 7B.
"""
import argparse
import json
import math
import os
import sys
import time
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
    ids: list  # prompt ids, image tokens expanded
    start: int  # index of the first image token
    answer: list | None  # answer ids, EOS included (None: to be distilled)
    key: str = ""  # its answer's key in the answers cache (self-distilled samples)
    bad: bool = False  # its image did not decode when first used


def read_records(path, image_folder=None):
    """(image, prompt, answer or None) triples from a JSONL file or a LLaVA conversation JSON list, and a Counter of
    the records skipped for their form."""
    folder = image_folder or os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        text = f.read()
    try:  # a LLaVA conversation JSON file: one list
        rows = json.loads(text)
        rows = rows if isinstance(rows, list) else [rows]
    except json.JSONDecodeError:
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line) if line.strip() else None)
            except json.JSONDecodeError:
                rows.append("bad JSON line")
    records, skipped = [], Counter()
    for row in rows:
        if row is None:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
            skipped[row if isinstance(row, str) else "no image path"] += 1
            continue
        prompt, answer = row.get("prompt"), row.get("answer")
        if "conversations" in row:  # LLaVA format: the first human/gpt exchange
            turns = row["conversations"] if isinstance(row["conversations"], list) else []
            turns = [t for t in turns if isinstance(t, dict)]
            prompt = next((t.get("value") for t in turns if t.get("from") == "human"), None)
            answer = next((t.get("value") for t in turns if t.get("from") == "gpt"), None)
            prompt = prompt.replace("<image>", "").strip() if isinstance(prompt, str) else prompt
        if not isinstance(prompt, str) or not prompt.strip():
            skipped["empty prompt" if not prompt or isinstance(prompt, str) else "prompt is not text"] += 1
            continue
        if answer is not None and not isinstance(answer, str):
            skipped["answer is not text"] += 1
            continue
        records.append((os.path.join(folder, row["image"]), prompt.strip(), answer or None))
    return records, skipped


def read_answers(data):
    """{key: answer ids, or None for a sample whose image did not decode} from every rank's answers file (written by
    tools/distill.py)."""
    folder, name = os.path.split(os.path.abspath(data))
    answers = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith(name + ".answers") and f.endswith(".jsonl"):
            answers.update((line["key"], line.get("answer")) for line in processing.read_lines(os.path.join(folder, f)))
    return answers


def load_samples(path, cfg, tok, args, log, need_answers=True):
    """Tokenised samples and a Counter of the records skipped. A record without an answer takes its distilled one from
    the answers cache next to the data, keyed by model, template, answer length and prompt; one not there is an error
    naming the command that distils it (need_answers=False: its answer stays None, for tools.distill). Images are
    only checked to exist here: they are decoded when first used."""
    records, skipped = read_records(path, args.image_folder)
    limit, answers, samples = cfg.text.max_position_embeddings, read_answers(path), []
    for image, prompt, answer in records:
        if not os.path.isfile(image):
            skipped["image not found"] += 1
            continue
        try:
            ids, start = tok.encode_prompt(prompt, args.conv)
        except ValueError as e:
            skipped[f"bad prompt ({e})"] += 1
            continue
        answer_ids = tok.tok.encode(answer, add_special_tokens=False).ids + [cfg.eos_token_id] if answer else None
        if len(ids) + (len(answer_ids) if answer_ids else args.distill_max_new_tokens) > limit:
            skipped[f"longer than the context ({limit})"] += 1
            continue
        key = json.dumps([dyrate.fingerprint(cfg), args.conv, args.pad, args.distill_max_new_tokens, image, prompt])
        if answer_ids is None and key in answers:
            answer_ids = answers[key]
            if answer_ids is None:  # tools.distill found that its image does not decode
                skipped["unreadable image"] += 1
                continue
        samples.append(Sample(image, prompt, ids, start, answer_ids, key))
    missing = sum(s.answer is None for s in samples)
    if need_answers and missing:
        options = "".join(f" {flag} {value}" for flag, value in (("--image-folder", args.image_folder),
                                                                  ("--conv", args.conv)) if value)
        raise ValueError(f"{path}: {missing} record(s) have no answer and none distilled for this model, --conv, --pad "
                         f"and --distill-max-new-tokens: distil them first with `python -m tools.distill --model "
                         f"{args.model} --data {path}{options}{' --pad' if args.pad else ''} --max-new-tokens "
                         f"{args.distill_max_new_tokens}` (torchrun shards it over GPUs).")
    log(f"{path}: {len(samples)} samples" + (f", skipped {sum(skipped.values())}: " +
        ", ".join(f"{n} {why}" for why, n in skipped.items()) if skipped else ""))
    return samples, skipped


# ----------------------------------------------------------------------------------------------------------------------
# the training step


def load_pixels(samples, model, args, skipped):
    """The samples whose image decodes, and their pixel values (B, 3, S, S) on the device; an image that does not
    decode is counted in `skipped` the first time it is used and its sample left out from then on."""
    kept, px = [], []
    for s in samples:
        if s.bad:
            continue
        try:
            px.append(processing.preprocess(s.image, model.config.vision.image_size, args.pad))
            kept.append(s)
        except (ValueError, OSError):
            s.bad = True
            skipped["unreadable image"] += 1
    dtype = model.language_model.lm_head.weight.dtype
    return kept, torch.stack(px).to(args.device, dtype) if px else None


def batch_tensors(samples, pad_id, device):
    """input ids (B, T) of prompt + answer padded at the end, prompt lengths, image starts, answer lengths (B,)."""
    seqs = [s.ids + s.answer for s in samples]
    T = max(map(len, seqs))
    ids = torch.tensor([seq + [pad_id] * (T - len(seq)) for seq in seqs], device=device)
    as_tensor = lambda values: torch.tensor(values, device=device)  # noqa: E731
    return (ids, as_tensor([len(s.ids) for s in samples]), as_tensor([s.start for s in samples]),
            as_tensor([len(s.answer) for s in samples]))


@dataclass
class MicroBatch:
    """A micro-batch after layers < K: what its teacher and its student both start from at layer K."""
    ids: torch.Tensor  # (b, T) prompt + answer, padded at the end
    lengths: torch.Tensor  # (b,) prompt tokens
    starts: torch.Tensor  # (b,) index of the first image token
    n_answer: torch.Tensor  # (b,) answer tokens
    k: int  # the pruning layer K
    x: torch.Tensor  # (b, T, C) the hidden state entering layer K
    shares: torch.Tensor  # (b, T, H, 4) what each row's rate is decided from (TrainMask.statistics)
    scores: torch.Tensor  # (b, T, N) each row's ranking of the image tokens
    noise: torch.Tensor  # (b, T, n_rates) the Gumbel noise's uniform samples for its rows
    cost: float  # the budget's cost of its sampled decisions, summed over its rows
    cost_none: float  # the same with every image token kept


def budget_cost(cfg, kept_count, lengths, n_answer, predictor, budget):
    """Σ over the rows of the budget's cost (dyrate.budget_cost) of each response step's straight-through kept count: a
    tensor the predictor's gradient flows through; and Σ of none's, a number."""
    cost = none = 0
    for b in range(len(lengths)):
        L, n = int(lengths[b]), int(n_answer[b])
        row, row_none = dyrate.budget_cost(cfg, L, kept_count[b, L - 1:L - 1 + n], predictor.k, budget, n,
                                           predictor.flops())
        cost, none = cost + row, none + row_none
    return cost, none


@torch.no_grad()
def prefix(model, predictor, samples, pixels, noise, args, tau):
    """The vision tower and layers < K of a micro-batch, without autograd: no gradient reaches the predictor there
    (its input, the type shares, is data, not a function of its parameters), and the teacher and the student both
    start from what they compute. Also samples the rows' rates once, for the cost of the whole batch."""
    cfg, lm, k = model.config, model.language_model.model, predictor.k
    ids, lengths, starts, n_answer = batch_tensors(samples, cfg.pad_token_id, args.device)
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device).expand(B, T)
    mask = dyrate.TrainMask(predictor, cfg.n_image_tokens, starts, lengths, tau, noise[:, :T])
    x, probs = lm.run(0, k, model.embed(ids, pixels), positions, None, probe_rows=mask.probe_rows(lengths, T))
    shares, scores = mask.statistics(probs)  # (B, T, H, 4), (B, T, N)
    mask.decide(shares, scores, T)
    cost, none = budget_cost(cfg, mask.kept_count, lengths, n_answer, predictor, args.budget)
    return MicroBatch(ids, lengths, starts, n_answer, k, x, shares, scores, noise[:, :T], float(cost), float(none))


def response_logits(model, mb, key_weight=None, checkpoint=False):
    """Layers >= K from the micro-batch's hidden state (with the student's key weight, or none for the teacher):
    logits (b, R, V) of the rows that predict the answer tokens (row L-1+i predicts answer token i) and a (b, R) mask
    of the real ones; the LM head runs on those rows only."""
    lm, (B, T) = model.language_model.model, mb.ids.shape
    positions = torch.arange(T, device=mb.ids.device).expand(B, T)
    h, _ = lm.run(mb.k, len(lm.layers), mb.x, positions, None, key_weight=key_weight, checkpoint=checkpoint)
    R = int(mb.n_answer.max())
    rows = (mb.lengths - 1)[:, None] + torch.arange(R, device=h.device)  # (B, R)
    valid = torch.arange(R, device=h.device) < mb.n_answer[:, None]
    h = lm.norm(h).gather(1, rows.clamp(max=T - 1)[..., None].expand(-1, -1, h.shape[2]))  # (B, R, C)
    return model.language_model.lm_head(h).float(), valid


def micro_batch_loss(model, predictor, mb, args, tau, n_tokens, cost_rest, cost_none):
    """One micro-batch's share of the batch's loss: its tokens' fit divided by the batch's n_tokens, plus the budget
    term of the batch's cost ratio in which the other micro-batches' costs (cost_rest) are constants. Each share's
    gradient is the micro-batch's part of the batch's gradient, so their sum is the whole batch's. Returns the share
    and the micro-batch's summed fit (a number)."""
    cfg = model.config
    mask = dyrate.TrainMask(predictor, cfg.n_image_tokens, mb.starts, mb.lengths, tau, mb.noise)
    weight = mask.decide(mb.shares, mb.scores, mb.ids.shape[1])  # (b, T, T): the Gumbel sample prefix() drew
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
    cost, _ = budget_cost(cfg, mask.kept_count, mb.lengths, mb.n_answer, predictor, args.budget)
    ratio = (cost + cost_rest) / cost_none
    return fit / n_tokens + args.budget_weight * (ratio - args.target) ** 2, fit.detach().item()


def train_step(model, predictor, samples, args, tau, generator, skipped):
    """The forward and backward passes of one optimizer step over a batch, in micro-batches of
    --micro-batch-size: first the cheap part of each (prefix: layers < K) and the batch's cost ratio from the rates
    sampled there, then the expensive part of each (micro_batch_loss: layers >= K, teacher and student) and its
    backward. The gradient accumulates in the predictor. The Gumbel noise is drawn once for the whole batch, as one
    (B, T, n_rates) tensor, so the samples do not depend on the micro-batch size. Returns the batch's loss, fit and
    cost ratio (numbers), or None if no sample's image decoded."""
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
        share, mb_fit = micro_batch_loss(model, predictor, mb, args, tau, n_tokens, cost - mb.cost, cost_none)
        share.backward()
        fit += mb_fit
    ratio = cost / cost_none
    return fit / n_tokens + args.budget_weight * (ratio - args.target) ** 2, fit / n_tokens, ratio


# ----------------------------------------------------------------------------------------------------------------------
# evaluation through the real inference path


@torch.inference_mode()
def forced_decode(model, s, px, pruner, n_steps, tokens=None):
    """Decode one sample over the KV cache with a pruner. With `tokens` they are fed back (teacher forcing), else the
    greedy ones (stopping at EOS). Returns the logits of every step (n, V) and the tokens fed/chosen."""
    ids = torch.tensor([s.ids], device=px.device)
    caches = model.new_caches(1, n_steps)
    choose = None if tokens is None else (lambda t, logits: torch.tensor([tokens[t]], device=px.device))
    eos = None if tokens is not None else model.config.eos_token_id
    lengths = torch.tensor([len(s.ids)], device=px.device)
    steps = list(generate.decode(model, ids, lengths, px, caches, n_steps, pruner, choose, eos))
    return torch.stack([logits[0] for _, logits in steps]).float(), [int(token[0]) for token, _ in steps]


def reference(model, samples, args, log):
    """The unpruned model's greedy tokens and logits on each held-out sample, computed once: (sample, logits,
    tokens) triples. A sample whose image does not decode is left out and counted."""
    refs, skipped = [], Counter()
    for s in samples:
        kept, px = load_pixels([s], model, args, skipped)
        if kept:
            refs.append((s, *forced_decode(model, s, px, None, args.eval_max_new_tokens)))
    if skipped:
        log(f"held-out set: left out {skipped['unreadable image']} sample(s) whose image does not decode")
    return refs


def evaluate(model, refs, make_rule, k, args):
    """Hard decisions through the inference path with the rule make_rule(n_steps) at layer k, teacher-forced with the
    unpruned greedy tokens: each budget's achieved cost ratio (sum over samples / sum for none), top-1 agreement with
    those tokens, KL(unpruned || pruned) per token."""
    cfg, dev = model.config, torch.device(args.device)
    rows, agree, kl, count = [], 0, 0, 0
    for s, ref_logits, ref_tokens in refs:
        n = len(ref_tokens)
        pruner = dyrate.Pruner(make_rule(n), cfg.n_image_tokens, torch.tensor([s.start], device=dev),
                               torch.tensor([len(s.ids)], device=dev), k, stats=False)
        logits, _ = forced_decode(model, s, load_pixels([s], model, args, Counter())[1], pruner, n, ref_tokens)
        rows.append(dict(pruner.summary(0, n), prompt_len=len(s.ids)))
        agree += (logits.argmax(-1).cpu() == torch.tensor(ref_tokens, device="cpu")).sum().item()
        kl += F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="sum").item()
        count += n

    def ratio(budget):
        pairs = [dyrate.budget_cost(cfg, r["prompt_len"], r["kept_visual"], r["k"], budget, r["probes"],
                                    r["predictor_flops"]) for r in rows]
        return sum(c for c, _ in pairs) / sum(none for _, none in pairs)
    return dict({f"{budget}_ratio": ratio(budget) for budget in dyrate.BUDGETS}, agreement=agree / count, kl=kl / count)


# ----------------------------------------------------------------------------------------------------------------------
# training state: what OUT.state holds (safetensors + JSON, written atomically), kept in memory at each step boundary


def capture(it, held_out, predictor, optimizer, generator, args):
    """The whole training state after `it` steps as CPU tensors and JSON metadata (the predictor is tiny: a copy at
    every step boundary costs nothing)."""
    tensors = {f"predictor.{k}": v.detach().to("cpu", copy=True) for k, v in predictor.state_dict().items()}
    opt = optimizer.state_dict()
    for i, state in opt["state"].items():
        tensors.update({f"optimizer.{i}.{k}": torch.as_tensor(v, device="cpu").clone() for k, v in state.items()})
    tensors["generator"] = generator.get_state().cpu()
    return tensors, dict(iter=it, held_out=held_out, args=vars(args), param_groups=opt["param_groups"],
                         predictor=dict(n_heads=predictor.n_heads, rates=predictor.rates, k=predictor.k))


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
    """The predictor file (what generate.py reads; the predictor holds the state's weights) and OUT.state (what
    --resume reads), by rank 0."""
    if rank == 0:
        meta = state[1]
        predictor.save(args.out, dyrate.fingerprint(cfg), dict(trained_iters=meta["iter"], budget=args.budget,
                                                                target=args.target, held_out=meta["held_out"]))
        write_state(args.out + ".state", state)


# ----------------------------------------------------------------------------------------------------------------------
# the loop


def get_lr(it, args):
    """Linear warmup, then cosine decay to min_lr (nanoGPT's schedule)."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = min(1.0, (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def get_tau(it, args):
    """Gumbel temperature, annealed geometrically from tau_start to tau_end over the run."""
    return args.tau_start * (args.tau_end / args.tau_start) ** (it / max(1, args.max_iters - 1))


def batch_indices(it, n, batch, rank=0, world=1, seed=0):
    """This rank's share of global batch `it`: a slice of a permutation drawn from (seed, epoch) alone, so a resumed
    run at step `it` gets exactly the batch an uninterrupted one would."""
    per_epoch = max(1, n // (batch * world))
    epoch, i = divmod(it, per_epoch)
    order = torch.Generator("cpu").manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(n, generator=order, device="cpu").tolist()
    start = (i * world + rank) * batch
    return [perm[(start + j) % n] for j in range(batch)]


def optimizer_step(model, predictor, optimizer, batch, it, generator, args, skipped, world):
    """One step: the batch's gradient (train_step, micro-batch by micro-batch), averaged over the ranks once (the
    accumulating micro-batches communicate nothing, as DDP's no_sync), then AdamW. Returns (loss, fit, cost ratio)
    averaged over the ranks."""
    for group in optimizer.param_groups:
        group["lr"] = get_lr(it, args)
    optimizer.zero_grad(set_to_none=True)
    out = train_step(model, predictor, batch, args, get_tau(it, args), generator, skipped)
    stats = torch.tensor(out or (0.0, 0.0, 0.0), device=args.device)
    if world > 1:
        for p in predictor.parameters():
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            dist.all_reduce(p.grad)
            p.grad /= world
        dist.all_reduce(stats)
        stats /= world
    optimizer.step()
    return stats.tolist()


def train(model, predictor, samples, refs, args, log, rank=0, world=1, resumed=None):
    """The loop: AdamW with warmup and cosine decay, the Gumbel temperature annealed, a log line every
    --log-interval steps, a held-out evaluation and a checkpoint every --eval-interval. Ctrl-C, SIGTERM or running out
    of memory: the state of the last step boundary is saved, so a resume redoes the interrupted step exactly. Returns
    the latest held-out evaluation."""
    cfg = model.config
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
    skipped = Counter()
    generate.peak_memory(args.device, reset=True)
    boundary = capture(start, held_out, predictor, optimizer, generator, args)
    try:
        with cli.sigterm_raises_stop():
            for it in range(start, args.max_iters):
                t0 = time.perf_counter()
                batch = [samples[i] for i in batch_indices(it, len(samples), args.batch_size, rank, world, args.seed)]
                loss, fit, ratio = optimizer_step(model, predictor, optimizer, batch, it, generator, args, skipped,
                                                  world)
                if (it + 1) % args.log_interval == 0 or it == 0:  # the step's time (its stats synchronised) and peak
                    log(f"step {it + 1}/{args.max_iters}: loss {loss:.4f} | {args.loss} {fit:.4f} | {cost_name} "
                        f"ratio {ratio:.3f} (target {args.target}) | tau {get_tau(it, args):.3f} | lr "
                        f"{get_lr(it, args):.2e} | {(time.perf_counter() - t0) * 1e3:.0f} ms | peak memory "
                        f"{generate.peak_memory(args.device) / 2**30:.2f} GiB"
                        + (f" | skipped {skipped['unreadable image']} unreadable images" if skipped else ""))
                save = (it + 1) % args.eval_interval == 0 or it + 1 == args.max_iters
                if save and rank == 0:
                    held_out = evaluate(model, refs, lambda n: dyrate.Learned(predictor), args.k, args)
                    log(held_out_line(held_out, args, cost_name))
                boundary = capture(it + 1, held_out, predictor, optimizer, generator, args)
                if save:
                    save_checkpoint(boundary, predictor, args, cfg, rank)
                    if world > 1:
                        dist.barrier()
    except (*cli.INTERRUPTS, torch.OutOfMemoryError) as e:  # back to the last step boundary, saved
        it = restore(boundary, predictor, optimizer, generator)["iter"]
        save_checkpoint(boundary, predictor, args, cfg, rank)
        if isinstance(e, torch.OutOfMemoryError):
            sys.exit(f"error: out of memory at step {it + 1} (state saved to {args.out}.state): resume with "
                     f"--checkpoint and a smaller --micro-batch-size (docs/training.md gives the memory per setting)")
        log(f"\ninterrupted at step {it}: state saved to {args.out}.state; rerun with --resume to continue")
        sys.exit(143 if isinstance(e, cli.Stop) else 130)
    log(f"predictor written to {args.out}")
    return held_out


def held_out_line(r, args, cost_name):
    return (f"held-out, hard decisions: {cost_name} ratio {r[f'{args.budget}_ratio']:.3f} (target {args.target}) | "
            f"FLOPs {r['flops_ratio']:.3f}, mean KV {r['kv_ratio']:.3f}, no-cache FLOPs {r['nocache_ratio']:.3f} | "
            f"agreement with unpruned {r['agreement']:.3f} | KL/token {r['kl']:.4f}")


# ----------------------------------------------------------------------------------------------------------------------
# the command line


def number(kind, low, strict=False, high=math.inf, hint=""):
    """An argparse type: a finite int or float (kind) >= low (strict: > low) and <= high."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if strict else value >= low) and value <= high):
            bounds = f"in {'(' if strict else '['}{low}, {high}]" if high < math.inf else \
                f"{'>' if strict else '>='} {low}"
            raise argparse.ArgumentTypeError(f"must be a {'whole ' if kind is int else ''}number {bounds}, got "
                                             f"{text}{hint}")
        return value
    return parse


def parse_rates(text):
    """'start:stop:count' or a comma list -> increasing drop rates in [0, 1]."""
    try:
        if ":" in text:
            a, b, n = text.split(":")
            if int(n) < 2:
                raise ValueError
            rates = [float(a) + (float(b) - float(a)) * i / (int(n) - 1) for i in range(int(n))]
        else:
            rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'start:stop:count' (count >= 2, e.g. 0:1:9) or a comma list "
                                         f"of drop rates (e.g. 0,0.5,0.75,1).") from None
    if len(rates) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least two candidate rates for the predictor to choose "
                                         f"from.")
    if any(not 0 <= r <= 1 for r in rates) or sorted(set(rates)) != rates:
        raise argparse.ArgumentTypeError(f"{text!r}: the candidate rates must be distinct, increasing and in [0, 1].")
    return rates


def parse_args(argv=None):
    """The options, each number checked by its type (argparse names the flag in its error), before anything loads."""
    p = argparse.ArgumentParser(description="Train the DyRate rate predictor under a budget (the VLM frozen).")
    cli.add_model_args(p, default_model=None, required=True)
    whole, positive, nonnegative = number(int, 1), number(float, 0, strict=True), number(float, 0)
    g = cli.add_data_args(p, "the records {image, prompt, answer?}")
    g.add_argument("--val-data", default=None, help="held-out file (default: --val-size samples held out of --data)")
    g.add_argument("--val-size", type=whole, default=32, help="held-out samples taken from --data without --val-data")
    g.add_argument("--distill-max-new-tokens", type=whole, default=ANSWER_TOKENS, help="the length the answers were "
                   "self-distilled at (tools.distill --max-new-tokens): which distilled answers to train on")
    g = p.add_argument_group("predictor and objective")
    g.add_argument("--out", required=True, help="predictor file to write (generate.py --predictor reads it)")
    cli.add_k_arg(g)
    g.add_argument("--rates", type=lambda text: parse_rates(text) and text, default="0:1:9",
                   help="candidate drop rates: 'start:stop:count' or a comma list")
    g.add_argument("--step-feature", action="store_true", help="an extension: the predictor also sees the answer "
                   "step, besides the type shares (the paper's predictor sees the shares only)")
    g.add_argument("--budget", choices=dyrate.BUDGETS, default="flops", help="the cost the budget is on: "
                   "flops (with a KV cache), kv (mean KV-cache size over the steps) or nocache (FLOPs when every "
                   "step recomputes the kept sequence)")
    g.add_argument("--target", type=number(float, 0, strict=True, high=1, hint=" (a fraction of none's cost)"),
                   default=0.5, help="the budget as a fraction of none's cost")
    g.add_argument("--budget-weight", type=nonnegative, default=20.0, help="weight of (cost ratio - target)^2")
    g.add_argument("--loss", choices=["kl", "ce"], default="kl", help="KL to the unpruned model, or CE to the answer")
    g.add_argument("--tau-start", type=positive, default=1.0, help="Gumbel temperature at the start")
    g.add_argument("--tau-end", type=positive, default=0.1, help="Gumbel temperature at the end")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-iters", type=number(int, 1, hint=" (to evaluate a trained predictor: python -m "
                   "tools.compare)"), default=300, help="training steps")
    g.add_argument("--batch-size", type=whole, default=8, help="samples per step (per rank under torchrun)")
    g.add_argument("--micro-batch-size", type=whole, default=None, help="samples per forward/backward pass, their "
                   "gradients accumulated over the batch (default: the whole batch at once; 1 or 2 for 7B on 24 GB)")
    g.add_argument("--checkpoint", action="store_true", help="activation checkpointing of the layers >= K: each keeps "
                   "only its input for the backward pass and runs again there (less memory, more time)")
    g.add_argument("--lr", type=positive, default=0.05, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=nonnegative, default=0.005, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-iters", type=number(int, 0), default=10, help="linear warmup steps")
    g.add_argument("--weight-decay", type=nonnegative, default=0.0, help="AdamW weight decay")
    g.add_argument("--seed", type=int, default=0, help="data order and Gumbel noise")
    g.add_argument("--resume", action="store_true", help="continue from OUT.state exactly")
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=whole, default=10, help="steps between log lines")
    g.add_argument("--eval-interval", type=whole, default=100, help="steps between held-out evaluations (and saves)")
    g.add_argument("--eval-max-new-tokens", type=whole, default=32, help="answer length evaluated per held-out sample")
    return p.parse_args(argv)


# the options that decide what is trained: a resumed run must keep them (--micro-batch-size and --checkpoint only
# change how it is computed: a run that ran out of memory resumes with smaller ones)
SAME_ON_RESUME = ("model", "data", "val_data", "val_size", "image_folder", "conv", "pad", "distill_max_new_tokens",
                  "dtype", "k", "rates", "step_feature", "budget", "target", "budget_weight", "loss", "tau_start",
                  "tau_end", "max_iters", "batch_size", "lr", "min_lr", "warmup_iters", "weight_decay", "seed")


def check_files(files, image_folder=None):
    """Each (flag, path) names a file that exists, and --image-folder a folder: checked before the weights load."""
    for name, path in files:
        if path is not None and not os.path.isfile(path):
            folder = " (it is a folder)" if os.path.isdir(path) else ""
            raise FileNotFoundError(f"{name} {path!r} does not exist{folder}.")
    if image_folder is not None and not os.path.isdir(image_folder):
        raise FileNotFoundError(f"--image-folder {image_folder!r} is not a folder.")


def resumed_state(args):
    """With --resume: the saved state (tensors, metadata), if its options are the same as these (else those that
    differ are named); without: None."""
    if not args.resume:
        return None
    if not os.path.isfile(args.out + ".state"):
        raise FileNotFoundError(f"--resume but no training state at {args.out + '.state'}; drop --resume to start "
                                f"afresh.")
    try:
        state = read_state(args.out + ".state")
    except (SafetensorError, OSError, KeyError, TypeError) as e:
        raise ValueError(f"{args.out}.state is not a training state written by train.py ({e}).") from None
    saved = state[1]["args"]
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (the state has {saved.get(k)!r})"
               for k in SAME_ON_RESUME if saved.get(k) != getattr(args, k)]
    if changed:
        raise ValueError(f"--resume with other options than the run in {args.out}.state: {'; '.join(changed)}. "
                         f"Resume with the same options, or train afresh to another --out.")
    return state


def hold_out(samples, args, log):
    """A seeded random subset of the training samples for evaluation: --val-size of them, or a fifth of a small set."""
    n = len(samples)
    if n < 2:
        raise ValueError(f"{args.data} has {n} usable sample(s): at least 2 are needed (one to train on, one held "
                         f"out), or give --val-data.")
    size = args.val_size
    if size >= n:
        size = max(1, n // 5)
        log(f"only {n} samples: holding out {size} of them for evaluation (--val-size {args.val_size} would hold out "
            f"all; give --val-data for a separate held-out set)")
    order = torch.randperm(n, generator=torch.Generator("cpu").manual_seed(args.seed), device="cpu").tolist()
    return [samples[i] for i in order[size:]], [samples[i] for i in order[:size]]


def load_data(cfg, tok, args, log):
    """The training samples and the held-out ones (--val-data, or part of --data)."""
    samples = load_samples(args.data, cfg, tok, args, log)[0]
    if args.val_data:
        val = load_samples(args.val_data, cfg, tok, args, log)[0]
    else:
        samples, val = hold_out(samples, args, log)
    if not samples or not val:
        raise ValueError(f"need training and held-out samples: got {len(samples)} and {len(val)} usable ones")
    return samples, val


def make_predictor(args, cfg, samples):
    """A new predictor, its target checked against what dropping every image token reaches on this data."""
    torch.manual_seed(args.seed)
    predictor = dyrate.RatePredictor(cfg.text.num_attention_heads, parse_rates(args.rates), args.k,
                                     args.step_feature).to(args.device)
    floor = [dyrate.budget_cost(cfg, len(s.ids), [0] * len(s.answer), args.k, args.budget) for s in samples]
    floor = sum(c for c, _ in floor) / sum(none for _, none in floor)
    if not floor < args.target <= 1:
        raise ValueError(f"--target {args.target} is out of reach: dropping every image token gives {floor:.3f} of "
                         f"none's cost ({args.budget} budget) on this data; choose a target in ({floor:.3f}, 1].")
    return predictor


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors():  # every check that needs no weights (files, torchrun, the checkpoint, data, target) first
        check_files((("--data", args.data), ("--val-data", args.val_data)), args.image_folder)
        cli.check_writable_folder(args.out, "--out")
        rank, world, device = cli.distributed(cli.device(args.device))
        args.device = str(device)
        log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
        cfg, tok = cli.checkpoint(args.model)
        args.k = dyrate.pruning_layer(cfg.text.num_hidden_layers, args.k)
        resumed = resumed_state(args)
        samples, val = load_data(cfg, tok, args, log)
        predictor = make_predictor(args, cfg, samples)
        model = cli.load_model(args.model, device, cli.dtype(args.dtype, device), log)
    log(predictor.describe(cfg))
    log(f"unpruned references for {len(val)} held-out samples ...")
    refs = reference(model, val, args, log) if rank == 0 else None
    held_out = train(model, predictor, samples, refs, args, log, rank, world, resumed)
    if world > 1:
        dist.destroy_process_group()
    return predictor, held_out


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # during start-up: nothing of the user's to save yet (the loop saves its own state)
        sys.exit("interrupted before training started; nothing to save")
