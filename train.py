"""
Train the DyRate rate predictor end to end under a budget (FLOPs, mean KV-cache size or no-cache FLOPs); the VLM
stays frozen and only the predictor (1161 parameters for LLaVA-1.5-7B) learns.

    python train.py --model DIR --data train.jsonl --out predictor --target 0.5                # a FLOPs budget
    python train.py --model DIR --data train.jsonl --out predictor --budget kv --target 0.4    # a mean KV-cache budget
    python train.py --model llava-1.5-7b-hf --data train.jsonl --out predictor --dtype bfloat16 \\
        --micro-batch-size 1 --checkpoint                                                       # 7B on one 24 GB GPU
    torchrun --nproc_per_node=8 train.py --model DIR --data train.jsonl --out predictor --target 0.5
    python train.py --model DIR --data train.jsonl --out predictor --eval-only     # the comparison table only

Data: JSONL records {"image": path, "prompt": text, "answer": text (optional)} (paths relative to the file's folder),
or LLaVA's conversation JSON (a list of {"image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", ...}]}). Records without an answer are answered by the frozen unpruned model itself (greedy,
self-distillation, in batches, sharded over torchrun's ranks), once: the answers are appended to DATA.answers.jsonl
as each batch finishes. Images are decoded when first used; bad records are skipped and counted.

A step (train_step): for each micro-batch, the vision tower and layers < K run once without autograd (the teacher
and the student compute the same thing there) and layer K-1's statistics give each row's sampled rate; then, micro-
batch by micro-batch, the student's layers >= K (with the keep mask; --checkpoint: recomputed in the backward pass)
and the teacher's, the loss KL(unpruned || pruned) over the response tokens (--loss ce: cross-entropy to the answer)
plus --budget-weight * (cost ratio - target)^2 over the whole batch, and its backward. The cost ratio is counted by
dyrate.costs from the straight-through kept counts, so its gradient reaches the predictor. Every --eval-interval
steps the held-out set runs through the real inference path with hard decisions. The training state is saved
atomically (safetensors + JSON, never a pickle) to OUT.state; --resume continues exactly; Ctrl-C and SIGTERM save the
state of the last step boundary first.
"""
import argparse
import copy
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
from tools import memory
import processing

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


def answers_file(data, rank=0):
    """Where a rank appends the answers it distils (one file per rank: no two processes write one file)."""
    return f"{data}.answers.jsonl" if rank == 0 else f"{data}.answers.rank{rank}.jsonl"


def read_answers(data):
    """{key: answer ids, or None for a sample whose image did not decode} from every rank's answers file."""
    folder, name = os.path.split(os.path.abspath(data))
    answers = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith(name + ".answers") and f.endswith(".jsonl"):
            answers.update((line["key"], line.get("answer")) for line in processing.read_lines(os.path.join(folder, f)))
    return answers


def load_samples(path, model, tok, args, log, rank=0, world=1):
    """Tokenised samples and a Counter of the records skipped. Records without an answer get the unpruned model's
    greedy answer (distil), kept in the answers cache next to the data and keyed by model, template and prompt, so a
    rerun does not regenerate it. Images are only checked to exist here: they are decoded when first used."""
    records, skipped = read_records(path, args.image_folder)
    cfg, limit = model.config, model.config.text.max_position_embeddings
    samples = []
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
        samples.append(Sample(image, prompt, ids, start, answer_ids, key))
    answers = read_answers(path)
    todo = [s for s in samples if s.answer is None and s.key not in answers]
    distill(model, tok, todo[rank::world], answers_file(path, rank), args, log)
    if world > 1:
        dist.barrier()  # every rank's share is on disk
    answers = read_answers(path)
    for s in samples:
        if s.answer is None:
            s.answer = answers[s.key]
    skipped["unreadable image"] += sum(s.answer is None for s in samples)
    samples = [s for s in samples if s.answer is not None]
    skipped = Counter({why: n for why, n in skipped.items() if n})
    log(f"{path}: {len(samples)} samples" + (f", skipped {sum(skipped.values())}: " +
        ", ".join(f"{n} {why}" for why, n in skipped.items()) if skipped else ""))
    return samples, skipped


def distill(model, tok, todo, path, args, log):
    """The unpruned model's greedy answers for `todo`, in batches through generate(), each batch appended to `path`
    when it finishes (an interrupt loses at most one batch); a sample whose image does not decode is recorded as
    such. A progress line (done/total, samples/s, ETA) every 10 s."""
    t0 = last = time.perf_counter()
    with open(path, "a") as f:
        for i in range(0, len(todo), args.distill_batch_size):
            chunk, images, lines = [], [], []
            for s in todo[i:i + args.distill_batch_size]:
                try:
                    images.append(processing.load_image(s.image))
                    chunk.append(s)
                except (ValueError, OSError):
                    lines.append(dict(key=s.key, skipped="unreadable image"))
            if chunk:
                rows = generate.generate(model, tok, images, [s.prompt for s in chunk], args.distill_max_new_tokens,
                                         conv=args.conv, pad=args.pad, stats=False).rows
                lines += [dict(key=s.key, answer=row["token_ids"]) for s, row in zip(chunk, rows)]
            processing.append_lines(f, lines)
            done, now = min(i + args.distill_batch_size, len(todo)), time.perf_counter()
            if now - last >= 10 or done == len(todo):
                rate = done / (now - t0)
                log(f"distilled {done}/{len(todo)} answers with the unpruned model | {rate:.2f} samples/s | ETA "
                    f"{(len(todo) - done) / rate / 60:.1f} min")
                last = now


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
    """Σ over the rows of the budget's cost (dyrate.costs) of each response step's straight-through kept count: a
    tensor the predictor's gradient flows through; and Σ of none's, a number."""
    rows = []
    for b in range(len(lengths)):
        L, n = int(lengths[b]), int(n_answer[b])
        rows.append(dyrate.costs(cfg, L, kept_count[b, L - 1:L - 1 + n], predictor.k, n, predictor.flops()))
    key = dyrate.COSTS[budget]
    return sum(r[key] for r in rows), sum(r[f"{key}_none"] for r in rows)


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


def evaluate(model, refs, make_pruner, args):
    """Hard decisions through the inference path, teacher-forced with the unpruned greedy tokens: achieved cost
    ratios (sum over samples / sum for none), top-1 agreement with those tokens, KL(unpruned || pruned) per token."""
    rows, agree, kl, count = [], 0, 0, 0
    for s, ref_logits, ref_tokens in refs:
        dev = torch.device(args.device)
        pruner = make_pruner(torch.tensor([s.start], device=dev), torch.tensor([len(s.ids)], device=dev),
                             len(ref_tokens))
        px = load_pixels([s], model, args, Counter())[1]
        logits, _ = forced_decode(model, s, px, pruner, len(ref_tokens), ref_tokens)
        rows.append(pruner.row_summary(0, len(ref_tokens), model.config, len(s.ids)))
        agree += (logits.argmax(-1).cpu() == torch.tensor(ref_tokens, device="cpu")).sum().item()
        kl += F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="sum").item()
        count += len(ref_tokens)
    ratios = {f"{budget}_ratio": dyrate.cost_ratio(rows, cost) for budget, cost in dyrate.COSTS.items()}
    return dict(ratios, agreement=agree / count, kl=kl / count)  # flops_ratio, kv_ratio, nocache_ratio


def pruner_factory(model, method, k, ramp_from=None, **kw):
    """make(start, length, n_steps) -> a Pruner for one sample; ramp_from: a hand-set schedule over its n steps."""
    N = model.config.n_image_tokens
    if ramp_from is not None:
        return lambda start, length, n: dyrate.Pruner("dyrate", N, start, length, k,
                                                      schedule=dyrate.ramp_rates(ramp_from, n), stats=False)
    return lambda start, length, n: dyrate.Pruner(method, N, start, length, k, stats=False, **kw)


def matched_mass(model, refs, target, budget, args, k, tries=10):
    """The mass rule's eps whose held-out cost ratio (the budget's) is closest to `target`, by bisection over log eps
    in [1e-8, 1] (the cost falls as eps grows), and its evaluation."""
    lo, hi, best = -8.0, 0.0, None
    for _ in range(tries):
        eps = 10 ** ((lo + hi) / 2)
        r = evaluate(model, refs, pruner_factory(model, "mass", k, mass=eps), args)
        if best is None or abs(r[f"{budget}_ratio"] - target) < abs(best[1][f"{budget}_ratio"] - target):
            best = (eps, r)
        lo, hi = (lo, (lo + hi) / 2) if r[f"{budget}_ratio"] < target else ((lo + hi) / 2, hi)
    return best


def compare(model, predictor, refs, args, log, budget=None):
    """The README table: the learned predictor against FastV, a hand-set ramp, the mass rule and VTW (its layer)
    matched on the same cost (the predictor's budget), and none; every row with all three cost ratios."""
    N, k = model.config.n_image_tokens, predictor.k
    budget = budget or getattr(predictor, "meta", {}).get("budget", args.budget)
    rows = {"none": evaluate(model, refs, pruner_factory(model, "none", k), args)}
    rows["dyrate (learned)"] = evaluate(model, refs, pruner_factory(model, "dyrate", k, predictor=predictor),
                                        args)
    target = rows["dyrate (learned)"][f"{budget}_ratio"]
    lengths = [(len(s.ids), len(tokens)) for s, _, tokens in refs]
    keep = dyrate.matched_keep(model.config, lengths, target, k, cost=dyrate.COSTS[budget])
    rows[f"fastv R={1 - keep / N:.3f} (= constant-rate dyrate)"] = evaluate(
        model, refs, pruner_factory(model, "fastv", k, ratio=1 - keep / N), args)
    start = dyrate.matched_keep(model.config, lengths, target, k, ramp=True, cost=dyrate.COSTS[budget])
    rows[f"dyrate hand-set ramp {1 - start / N:.3f} -> 1"] = evaluate(
        model, refs, pruner_factory(model, "dyrate", k, ramp_from=1 - start / N), args)
    eps, mass = matched_mass(model, refs, target, budget, args, k)
    rows[f"mass rule eps={eps:.2g}"] = mass
    layer = dyrate.matched_layer(model.config, lengths, target, cost=dyrate.COSTS[budget])
    rows[f"vtw K={layer}"] = evaluate(model, refs, pruner_factory(model, "vtw", layer), args)
    rows = {name + ("*" if name != "none" and abs(r[f"{budget}_ratio"] - target) > 0.01 else ""): r
            for name, r in rows.items()}
    log(f"matched on the {budget} budget; ratios to none ({len(refs)} held-out samples; *: more than 0.01 off, the "
        f"nearest its parameter reaches)")
    log(f"{'method':42}{'FLOPs':>8}{'mean KV':>9}{'no-cache':>9}{'agreement':>11}{'KL/token':>10}")
    for name, r in rows.items():
        log(f"{name:42}{r['flops_ratio']:8.3f}{r['kv_ratio']:9.3f}{r['nocache_ratio']:9.3f}{r['agreement']:11.3f}"
            f"{r['kl']:10.4f}")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# training state: safetensors + JSON, written atomically


def save_state(path, predictor, optimizer, generator, it, args, held_out):
    tensors = {f"predictor.{k}": v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()}
    opt = optimizer.state_dict()
    for i, state in opt["state"].items():
        tensors.update({f"optimizer.{i}.{k}": torch.as_tensor(v, device="cpu").contiguous() for k, v in state.items()})
    tensors["generator"] = generator.get_state().cpu()
    meta = dict(iter=it, args=vars(args), param_groups=opt["param_groups"], held_out=held_out,
                predictor=dict(n_heads=predictor.n_heads, rates=predictor.rates, k=predictor.k))
    processing.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"train_state": json.dumps(meta)}))


def load_state(path, predictor, optimizer, generator):
    with safe_open(path, framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["train_state"]), {k: f.get_tensor(k) for k in f.keys()}
    predictor.load_state_dict({k[len("predictor."):]: v for k, v in tensors.items() if k.startswith("predictor.")})
    state = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v.to(predictor.linear.weight.device) if name != "step" else v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    generator.set_state(tensors["generator"])
    return meta


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


@dataclass
class Progress:
    """Where training stands: what a checkpoint saves and an interrupt goes back to."""
    it: int = 0  # optimizer steps done
    held_out: dict | None = None  # the latest held-out evaluation (evaluate())


def snapshot(progress, predictor, optimizer, generator):
    """The whole training state at a step boundary (the predictor is tiny: a copy costs nothing)."""
    return (copy.deepcopy(progress), {k: v.clone() for k, v in predictor.state_dict().items()},
            copy.deepcopy(optimizer.state_dict()), generator.get_state())


def restore(state, predictor, optimizer, generator):
    progress, weights, opt_state, rng = state
    predictor.load_state_dict(weights)
    optimizer.load_state_dict(opt_state)
    generator.set_state(rng)
    return progress


def save_checkpoint(progress, predictor, optimizer, generator, args, cfg, rank):
    """The predictor file (what generate.py reads) and the training state (what --resume reads), by rank 0."""
    if rank == 0:
        predictor.save(args.out, dyrate.fingerprint(cfg), dict(trained_iters=progress.it, budget=args.budget,
                                                                target=args.target, held_out=progress.held_out))
        save_state(args.out + ".state", predictor, optimizer, generator, progress.it, args, progress.held_out)


class Meter:
    """Samples/s and the peak memory of the training steps, for the log: CUDA, the allocator's peak; CPU, the process's
    peak resident set since training started and what a GPU would hold: the weights plus the peak of the live tensors
    of a step (memory.LiveTensors, tracked on the steps that are logged: its per-op bookkeeping costs time)."""

    def __init__(self, model, device):
        self.device, self.cpu = device, torch.device(device).type == "cpu"
        self.weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        self.samples, self.seconds, self.live_peak = 0, 0.0, 0
        memory.reset_peak(device)

    def measure(self, step, n_samples, track):
        """Run step() and count it: its time, its samples and (track, on CPU) its live tensors."""
        t0 = time.perf_counter()
        if self.cpu and track:
            with memory.LiveTensors() as live:
                out = step()
            self.live_peak = max(self.live_peak, live.peak)
        else:
            out = step()
        generate.sync(self.device)
        self.samples, self.seconds = self.samples + n_samples, self.seconds + time.perf_counter() - t0
        return out

    def line(self):
        """samples/s since the last line, and the peak memory so far."""
        gpu = f" (a GPU would hold {(self.weights + self.live_peak) / 2**30:.2f})" if self.cpu else ""
        text = (f"{self.samples / max(self.seconds, 1e-9):.2f} samples/s | peak memory "
                f"{memory.peak(self.device) / 2**30:.2f} GiB{gpu}")
        self.samples, self.seconds = 0, 0.0
        return text


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


def train(model, predictor, samples, refs, args, log, rank=0, world=1, meta=None):
    """The loop: AdamW with warmup and cosine decay, the Gumbel temperature annealed, a log line every
    --log-interval steps, a held-out evaluation and a checkpoint every --eval-interval. Ctrl-C or SIGTERM: the state
    of the last step boundary is saved, so a resume redoes the interrupted step exactly. Returns the latest held-out
    evaluation."""
    cfg = model.config
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator(args.device).manual_seed(args.seed * 1000 + rank)
    progress = Progress()
    if meta is not None:
        progress = Progress(load_state(args.out + ".state", predictor, optimizer, generator)["iter"],
                            meta.get("held_out"))
        log(f"resumed from {args.out}.state at step {progress.it}")
    if progress.it >= args.max_iters:
        log(f"the state at {args.out}.state is already at step {progress.it} of {args.max_iters}: nothing to train")
        return progress.held_out
    cost_name = {"flops": "FLOPs", "kv": "mean KV", "nocache": "no-cache FLOPs"}[args.budget]
    skipped, meter = Counter(), Meter(model, args.device)
    boundary = snapshot(progress, predictor, optimizer, generator)
    try:
        with cli.sigterm_raises_stop():
            while progress.it < args.max_iters:
                it, t0 = progress.it, time.perf_counter()
                batch = [samples[i] for i in batch_indices(it, len(samples), args.batch_size, rank, world, args.seed)]
                logged = (it + 1) % args.log_interval == 0 or it == 0
                loss, fit, ratio = meter.measure(lambda: optimizer_step(
                    model, predictor, optimizer, batch, it, generator, args, skipped, world), len(batch), logged)
                progress.it += 1
                if logged:
                    log(f"step {progress.it}/{args.max_iters}: loss {loss:.4f} | {args.loss} {fit:.4f} | {cost_name} "
                        f"ratio {ratio:.3f} (target {args.target}) | tau {get_tau(it, args):.3f} | lr "
                        f"{get_lr(it, args):.2e} | {(time.perf_counter() - t0) * 1e3:.0f} ms | {meter.line()}"
                        + (f" | skipped {skipped['unreadable image']} unreadable images" if skipped else ""))
                if progress.it % args.eval_interval == 0 or progress.it == args.max_iters:
                    if rank == 0:
                        progress.held_out = evaluate(model, refs, pruner_factory(model, "dyrate", args.k,
                                                                                 predictor=predictor), args)
                        log(held_out_line(progress.held_out, args, cost_name))
                    save_checkpoint(progress, predictor, optimizer, generator, args, cfg, rank)
                    if world > 1:
                        dist.barrier()
                boundary = snapshot(progress, predictor, optimizer, generator)
    except (*cli.INTERRUPTS, torch.OutOfMemoryError) as e:  # back to the last step boundary, saved
        progress = restore(boundary, predictor, optimizer, generator)
        save_checkpoint(progress, predictor, optimizer, generator, args, cfg, rank)
        if isinstance(e, torch.OutOfMemoryError):
            sys.exit(f"error: out of memory at step {progress.it + 1} (state saved to {args.out}.state): resume with "
                     f"--checkpoint and a smaller --micro-batch-size (docs/training.md gives the memory per setting)")
        log(f"\ninterrupted at step {progress.it}: state saved to {args.out}.state; rerun with --resume to continue")
        sys.exit(143 if isinstance(e, cli.Stop) else 130)
    log(f"predictor written to {args.out}")
    return progress.held_out


def held_out_line(r, args, cost_name):
    return (f"held-out, hard decisions: {cost_name} ratio {r[f'{args.budget}_ratio']:.3f} (target {args.target}) | "
            f"FLOPs {r['flops_ratio']:.3f}, mean KV {r['kv_ratio']:.3f}, no-cache FLOPs {r['nocache_ratio']:.3f} | "
            f"agreement with unpruned {r['agreement']:.3f} | KL/token {r['kl']:.4f}")


# ----------------------------------------------------------------------------------------------------------------------
# the command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the DyRate rate predictor under a budget (the VLM frozen).")
    cli.add_model_args(p, default_model=None, required=True)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="JSONL ({image, prompt, answer?}) or LLaVA conversation JSON")
    g.add_argument("--val-data", default=None, help="held-out file (default: --val-size samples held out of --data)")
    g.add_argument("--val-size", type=int, default=32, help="held-out samples taken from --data without --val-data")
    g.add_argument("--image-folder", default=None, help="folder image paths are relative to (default: the data file's)")
    g.add_argument("--conv", choices=sorted(processing.TEMPLATES), default="llava-hf", help="prompt template")
    g.add_argument("--pad", action="store_true", help="pad images to a square first (original LLaVA)")
    g.add_argument("--distill-max-new-tokens", type=int, default=64, help="length of self-distilled answers")
    g.add_argument("--distill-batch-size", type=int, default=8, help="samples per generate() call when distilling")
    g = p.add_argument_group("predictor and objective")
    g.add_argument("--out", required=True, help="predictor file to write (generate.py --predictor reads it)")
    cli.add_k_arg(g)
    g.add_argument("--rates", default="0:1:9", help="candidate drop rates: 'start:stop:count' or a comma list")
    g.add_argument("--step-feature", action="store_true", help="an extension: the predictor also sees the answer "
                   "step, besides the type shares (the paper's predictor sees the shares only)")
    g.add_argument("--budget", choices=sorted(dyrate.COSTS), default="flops", help="the cost the budget is on: "
                   "flops (with a KV cache), kv (mean KV-cache size over the steps) or nocache (FLOPs when every "
                   "step recomputes the kept sequence)")
    g.add_argument("--target", type=float, default=0.5, help="the budget as a fraction of none's cost")
    g.add_argument("--budget-weight", type=float, default=20.0, help="weight of (cost ratio - target)^2")
    g.add_argument("--loss", choices=["kl", "ce"], default="kl", help="KL to the unpruned model, or CE to the answer")
    g.add_argument("--tau-start", type=float, default=1.0, help="Gumbel temperature at the start")
    g.add_argument("--tau-end", type=float, default=0.1, help="Gumbel temperature at the end")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-iters", type=int, default=300, help="training steps")
    g.add_argument("--batch-size", type=int, default=8, help="samples per step (per rank under torchrun)")
    g.add_argument("--micro-batch-size", type=int, default=None, help="samples per forward/backward pass, their "
                   "gradients accumulated over the batch (default: the whole batch at once; 1 or 2 for 7B on 24 GB)")
    g.add_argument("--checkpoint", action="store_true", help="activation checkpointing of the layers >= K: each keeps "
                   "only its input for the backward pass and runs again there (less memory, more time)")
    g.add_argument("--lr", type=float, default=0.05, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=0.005, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-iters", type=int, default=10, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--seed", type=int, default=0, help="data order and Gumbel noise")
    g.add_argument("--resume", action="store_true", help="continue from OUT.state exactly")
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10, help="steps between log lines")
    g.add_argument("--eval-interval", type=int, default=100, help="steps between held-out evaluations (and saves)")
    g.add_argument("--eval-max-new-tokens", type=int, default=32, help="answer length evaluated per held-out sample")
    g.add_argument("--compare", action="store_true", help="at the end: learned vs FastV and a hand-set ramp at the "
                   "same cost, VTW and none, on the held-out set")
    g.add_argument("--eval-only", action="store_true", help="no training: the comparison for the predictor at --out")
    return p.parse_args(argv)


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
        raise ValueError(f"--rates {text!r}: give 'start:stop:count' (count >= 2, e.g. 0:1:9) or a comma list of "
                         f"drop rates (e.g. 0,0.5,0.75,1).") from None
    if len(rates) < 2:
        raise ValueError(f"--rates {text!r}: give at least two candidate rates for the predictor to choose from.")
    if any(not 0 <= r <= 1 for r in rates) or sorted(set(rates)) != rates:
        raise ValueError(f"--rates {text!r}: the candidate rates must be distinct, increasing and in [0, 1].")
    return rates


# the options that decide what is trained: a resumed run must keep them (--micro-batch-size and --checkpoint only
# change how it is computed: a run that ran out of memory resumes with smaller ones)
SAME_ON_RESUME = ("model", "data", "val_data", "val_size", "image_folder", "conv", "pad", "distill_max_new_tokens",
                  "dtype", "k", "rates", "step_feature", "budget", "target", "budget_weight", "loss", "tau_start",
                  "tau_end", "max_iters", "batch_size", "lr", "min_lr", "warmup_iters", "weight_decay", "seed")


def check_args(args):
    """Every check that needs no model weights, before they load (minutes for a 7B model)."""
    for name, path in (("--data", args.data), ("--val-data", args.val_data)):
        if path is not None and not os.path.isfile(path):
            folder = " (it is a folder)" if os.path.isdir(path) else ""
            raise FileNotFoundError(f"{name} {path!r} does not exist{folder}.")
    if args.image_folder is not None and not os.path.isdir(args.image_folder):
        raise FileNotFoundError(f"--image-folder {args.image_folder!r} is not a folder.")
    cli.check_writable_folder(args.out, "--out")
    if args.eval_only:
        if not os.path.isfile(args.out):
            raise FileNotFoundError(f"--eval-only evaluates the predictor at --out, but {args.out!r} does not exist.")
        return
    for name, value, low in (("--max-iters", args.max_iters, 1), ("--batch-size", args.batch_size, 1),
                             ("--micro-batch-size", args.micro_batch_size or 1, 1),
                             ("--warmup-iters", args.warmup_iters, 0), ("--log-interval", args.log_interval, 1),
                             ("--eval-interval", args.eval_interval, 1), ("--val-size", args.val_size, 1),
                             ("--eval-max-new-tokens", args.eval_max_new_tokens, 1),
                             ("--distill-max-new-tokens", args.distill_max_new_tokens, 1),
                             ("--distill-batch-size", args.distill_batch_size, 1)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}" + (
                " (to evaluate an existing predictor use --eval-only)" if name == "--max-iters" else "") + ".")
    for name, value in (("--lr", args.lr), ("--tau-start", args.tau_start), ("--tau-end", args.tau_end)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value}.")
    for name, value in (("--min-lr", args.min_lr), ("--budget-weight", args.budget_weight),
                        ("--weight-decay", args.weight_decay)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {value}.")
    if not 0 < args.target <= 1:
        raise ValueError(f"--target is a fraction of none's cost in (0, 1], got {args.target}.")
    parse_rates(args.rates)
    if args.resume and not os.path.isfile(args.out + ".state"):
        raise FileNotFoundError(f"--resume but no training state at {args.out + '.state'}; drop --resume to start "
                                f"afresh.")


def resumed_state(args):
    """With --resume: the saved state's metadata, if its options are the same as these (else the ones that differ
    are named); without: None."""
    if not args.resume:
        return None
    try:
        with safe_open(args.out + ".state", framework="pt") as f:
            meta = json.loads(f.metadata()["train_state"])
    except (SafetensorError, OSError, KeyError, TypeError) as e:
        raise ValueError(f"{args.out}.state is not a training state written by train.py ({e}).") from None
    saved = meta["args"]
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (the state has {saved.get(k)!r})"
               for k in SAME_ON_RESUME if saved.get(k) != getattr(args, k)]
    if changed:
        raise ValueError(f"--resume with other options than the run in {args.out}.state: {'; '.join(changed)}. "
                         f"Resume with the same options, or train afresh to another --out.")
    return meta


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


def load_data(model, tok, args, log, rank, world):
    """The training samples and the held-out ones (--val-data, or part of --data)."""
    samples = load_samples(args.data, model, tok, args, log, rank, world)[0]
    if args.val_data:
        val = load_samples(args.val_data, model, tok, args, log, rank, world)[0]
    else:
        samples, val = hold_out(samples, args, log)
    if not samples or not val:
        raise ValueError(f"need training and held-out samples: got {len(samples)} and {len(val)} usable ones")
    return samples, val


def make_predictor(args, cfg, samples):
    """The predictor at --out (--eval-only), or a new one, its target checked against what dropping every image
    token reaches on this data."""
    if args.eval_only:
        return dyrate.RatePredictor.load(args.out, cfg, args.device)
    predictor = dyrate.RatePredictor(cfg.text.num_attention_heads, parse_rates(args.rates), args.k,
                                     args.step_feature).to(args.device)
    floor = dyrate.cost_ratio([dyrate.costs(cfg, len(s.ids), [0] * len(s.answer), args.k) for s in samples],
                              dyrate.COSTS[args.budget])
    if not floor < args.target <= 1:
        raise ValueError(f"--target {args.target} is out of reach: dropping every image token gives {floor:.3f} of "
                         f"none's cost ({args.budget} budget) on this data; choose a target in ({floor:.3f}, 1].")
    return predictor


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors():  # set up: every check that needs no weights, then torchrun, then the checkpoint's files
        check_args(args)
        rank, world, device = cli.distributed(cli.device(args.device))
        args.device = str(device)
        cfg, tok = cli.checkpoint(args.model)
        args.k = dyrate.pruning_layer(cfg.text.num_hidden_layers, args.k)
        meta = resumed_state(args)
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    with cli.user_errors():  # load: the weights, the data (self-distilled where needed), the predictor
        torch.manual_seed(args.seed)
        model = cli.load_model(args.model, device, cli.dtype(args.dtype, device), log)
        samples, val = load_data(model, tok, args, log, rank, world)
        predictor = make_predictor(args, cfg, samples)
    log(predictor.describe(cfg))
    log(f"unpruned references for {len(val)} held-out samples ...")
    refs = reference(model, val, args, log) if rank == 0 else None
    if args.eval_only:
        return compare(model, predictor, refs, args, log)
    held_out = train(model, predictor, samples, refs, args, log, rank, world, meta)
    if args.compare and rank == 0:
        compare(model, predictor, refs, args, log)
    if world > 1:
        dist.destroy_process_group()
    return predictor, held_out


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # during start-up: nothing of the user's to save yet (the loop saves its own state)
        sys.exit("interrupted before training started; nothing to save")
