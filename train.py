"""
Train the DyRate rate predictor end to end under a FLOPs budget; the VLM stays frozen.

    python train.py --model DIR --data train.jsonl --out predictor --target 0.5                # a FLOPs budget
    python train.py --model DIR --data train.jsonl --out predictor --budget kv --target 0.4    # a mean KV-cache budget
    torchrun --nproc_per_node=8 train.py --model DIR --data train.jsonl --out predictor --target 0.5
    python train.py --model DIR --data train.jsonl --out predictor --compare     # the evaluation table only

Data: JSONL records {"image": path, "prompt": text, "answer": text (optional)} (paths relative to the file's folder),
or LLaVA's conversation JSON (a list of {"image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", ...}]}). Records without an answer are answered by the frozen unpruned model itself (greedy,
self-distillation), once: the answers are cached next to the data. Bad records are skipped and counted.

Loss per batch: KL(unpruned || pruned) over the response tokens (or --loss ce: cross-entropy to the answer), plus
--budget-weight * (cost ratio - target)^2, the cost ratio (--budget: FLOPs with a KV cache, mean KV-cache size, or
no-cache FLOPs, each / none's) counted by dyrate.costs from the kept counts sampled by the straight-through
Gumbel-Softmax (so its gradient reaches the predictor). The Gumbel temperature anneals from
--tau-start to --tau-end. Every --eval-interval steps the held-out set runs through the real inference path with hard
decisions: achieved cost ratios, agreement of the greedy tokens with the unpruned model, KL. The training state is
saved atomically (safetensors + JSON, never a pickle) to OUT.state, --resume continues exactly, Ctrl-C saves first.
"""
import argparse
import copy
import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import dyrate
from generate import check_writable_folder, decode, default_dtype
from model import Llava, check_device, read_config
from processing import Tokenizer, atomic_write, preprocess


# ----------------------------------------------------------------------------------------------------------------------
# data


@dataclass
class Sample:
    image: str  # absolute path
    prompt: str
    ids: list  # prompt ids, image tokens expanded
    start: int  # index of the first image token
    answer: list  # answer ids, EOS included


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


def load_samples(path, model, tok, args, log):
    """Tokenised samples; records without an answer get the unpruned model's greedy answer, cached next to the data
    (PATH.answers.json, keyed by model, template and prompt) so a rerun does not regenerate it."""
    records, skipped = read_records(path, args.image_folder)
    cache_path = path + ".answers.json"
    cache = json.load(open(cache_path)) if os.path.isfile(cache_path) else {}
    samples, todo, limit = [], [], model.config.text.max_position_embeddings
    for image, prompt, answer in records:
        if not os.path.isfile(image):
            skipped["image not found"] += 1
            continue
        try:
            preprocess(image, model.config.vision.image_size, args.pad)
        except (ValueError, OSError):
            skipped["unreadable image"] += 1
            continue
        try:
            ids, start = tok.encode_prompt(prompt, args.conv)
        except ValueError as e:
            skipped[f"bad prompt ({e})"] += 1
            continue
        answer_ids = None
        if answer:
            answer_ids = tok.tok.encode(answer, add_special_tokens=False).ids + [model.config.eos_token_id]
        if len(ids) + (len(answer_ids) if answer_ids else args.distill_max_new_tokens) > limit:
            skipped[f"longer than the context ({limit})"] += 1
            continue
        samples.append(Sample(image, prompt, ids, start, answer_ids))
        if answer_ids is None:
            key = json.dumps([dyrate.fingerprint(model.config), args.conv, args.pad, args.distill_max_new_tokens, image,
                              prompt])
            todo.append((samples[-1], key))
    new = [(s, key) for s, key in todo if key not in cache]
    for i, (s, key) in enumerate(new):
        cache[key] = unpruned_answer(model, s, args)
        if i % 10 == 9 or i == len(new) - 1:
            log(f"distilled {i + 1}/{len(new)} answers with the unpruned model")
            atomic_json(cache, cache_path)
    for s, key in todo:
        s.answer = cache[key]
    log(f"{path}: {len(samples)} samples" + (f", skipped {sum(skipped.values())}: " +
        ", ".join(f"{n} {why}" for why, n in skipped.items()) if skipped else ""))
    return samples, skipped


def pixels(samples, model, args):
    dtype = model.language_model.lm_head.weight.dtype
    px = torch.stack([preprocess(s.image, model.config.vision.image_size, args.pad) for s in samples])
    return px.to(args.device, dtype)  # (B, 3, S, S)


@torch.inference_mode()
def unpruned_answer(model, s, args):
    """Greedy answer ids of the frozen unpruned model (EOS included if reached)."""
    logits, tokens = forced_decode(model, s, pixels([s], model, args), None, args.distill_max_new_tokens)
    return tokens


# ----------------------------------------------------------------------------------------------------------------------
# the training step


def batch_tensors(samples, model, args):
    """input ids (B, T) padded at the end, prompt lengths, image starts, answer lengths (B,)."""
    seqs = [s.ids + s.answer for s in samples]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), model.config.pad_token_id, dtype=torch.long)
    for b, seq in enumerate(seqs):
        ids[b, :len(seq)] = torch.tensor(seq)
    as_tensor = lambda values: torch.tensor(values, device=args.device)  # noqa: E731
    return (ids.to(args.device), as_tensor([len(s.ids) for s in samples]), as_tensor([s.start for s in samples]),
            as_tensor([len(s.answer) for s in samples]))


def response_logits(model, ids, px, lengths, n_answer, pruner=None):
    """Logits (B, R, V) of the rows that predict the answer tokens (row L-1+i predicts answer token i) and a (B, R)
    mask of the real ones; the LM head runs on those rows only."""
    B, T = ids.shape
    h, _ = model.language_model.model(model.embed(ids, px), torch.arange(T, device=ids.device).expand(B, T),
                                      pruner=pruner)
    R = int(n_answer.max())
    rows = (lengths - 1)[:, None] + torch.arange(R, device=ids.device)  # (B, R)
    valid = torch.arange(R, device=ids.device) < n_answer[:, None]
    h = h.gather(1, rows.clamp(max=T - 1)[..., None].expand(-1, -1, h.shape[2]))  # (B, R, C)
    return model.language_model.lm_head(h).float(), valid


def train_loss(model, predictor, samples, args, tau, generator):
    cfg, N = model.config, model.config.n_image_tokens
    ids, lengths, starts, n_answer = batch_tensors(samples, model, args)
    px = pixels(samples, model, args)
    pruner = dyrate.TrainMask(predictor, N, starts, lengths, tau, generator)
    logits, valid = response_logits(model, ids, px, lengths, n_answer, pruner)
    if args.loss == "kl":
        with torch.no_grad():
            teacher, _ = response_logits(model, ids, px, lengths, n_answer)
        per_token = F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    else:
        answer_rows = lengths[:, None] + torch.arange(logits.shape[1], device=ids.device)  # (B, R)
        targets = ids.gather(1, answer_rows.clamp(max=ids.shape[1] - 1))
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    fit = (per_token * valid).sum() / valid.sum()
    rows = []  # the straight-through kept count of each response step: the FLOPs term's gradient reaches the predictor
    for b in range(len(samples)):
        L, n = int(lengths[b]), int(n_answer[b])
        rows.append(dyrate.costs(cfg, L, pruner.kept_count[b, L - 1:L - 1 + n], predictor.k, n, predictor.flops()))
    ratio = dyrate.cost_ratio(rows, dyrate.COSTS[args.budget])
    return fit + args.budget_weight * (ratio - args.target) ** 2, fit, ratio


# ----------------------------------------------------------------------------------------------------------------------
# evaluation through the real inference path


@torch.inference_mode()
def forced_decode(model, s, px, pruner, n_steps, tokens=None):
    """Decode one sample over the KV cache with a pruner. With `tokens` they are fed back (teacher forcing), else the
    greedy ones (stopping at EOS). Returns the logits of every step (n, V) and the tokens fed/chosen."""
    ids = torch.tensor([s.ids], device=px.device)
    caches = model.new_caches(1, n_steps)
    choose = None if tokens is None else (lambda t, logits: torch.tensor([tokens[t]], device=px.device))
    steps = list(decode(model, ids, torch.tensor([len(s.ids)], device=px.device), px, caches, n_steps, pruner, choose,
                        None if tokens is not None else model.config.eos_token_id))
    return torch.stack([logits[0] for _, logits in steps]).float(), [int(token[0]) for token, _ in steps]


def reference(model, samples, args):
    """The unpruned model's greedy tokens and logits on each held-out sample (computed once)."""
    return [forced_decode(model, s, pixels([s], model, args), None, args.eval_max_new_tokens) for s in samples]


def evaluate(model, samples, refs, make_pruner, args):
    """Hard decisions through the inference path, teacher-forced with the unpruned greedy tokens: achieved FLOPs ratio
    (sum over samples / sum for none), top-1 agreement with those tokens, KL(unpruned || pruned) per token."""
    rows, agree, kl, count = [], 0, 0, 0
    for s, (ref_logits, ref_tokens) in zip(samples, refs):
        dev = torch.device(args.device)
        pruner = make_pruner(torch.tensor([s.start], device=dev), torch.tensor([len(s.ids)], device=dev),
                             len(ref_tokens))
        logits, _ = forced_decode(model, s, pixels([s], model, args), pruner, len(ref_tokens), ref_tokens)
        rows.append(pruner.row_summary(0, len(ref_tokens), model.config, len(s.ids)))
        agree += (logits.argmax(-1).cpu() == torch.tensor(ref_tokens)).sum().item()
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


def compare(model, predictor, samples, refs, args, log, budget=None):
    """The README table: the learned predictor against FastV and a hand-set ramp at the same cost (the predictor's
    budget), VTW, none; every row with all three cost ratios."""
    N, k = model.config.n_image_tokens, predictor.k
    budget = budget or getattr(predictor, "meta", {}).get("budget", args.budget)
    rows = {"none": evaluate(model, samples, refs, pruner_factory(model, "none", k), args)}
    rows["dyrate (learned)"] = evaluate(model, samples, refs, pruner_factory(model, "dyrate", k, predictor=predictor),
                                        args)
    target = rows["dyrate (learned)"][f"{budget}_ratio"]
    lengths = [(len(s.ids), len(tokens)) for s, (_, tokens) in zip(samples, refs)]
    keep = dyrate.matched_keep(model.config, lengths, target, k, cost=dyrate.COSTS[budget])
    rows[f"fastv R={1 - keep / N:.3f} (= constant-rate dyrate)"] = evaluate(
        model, samples, refs, pruner_factory(model, "fastv", k, ratio=1 - keep / N), args)
    start = dyrate.matched_keep(model.config, lengths, target, k, ramp=True, cost=dyrate.COSTS[budget])
    rows[f"dyrate hand-set ramp {1 - start / N:.3f} -> 1"] = evaluate(
        model, samples, refs, pruner_factory(model, "dyrate", k, ramp_from=1 - start / N), args)
    rows["vtw"] = evaluate(model, samples, refs, pruner_factory(model, "vtw", k), args)
    log(f"matched on the {budget} budget; ratios to none ({len(samples)} held-out samples)")
    log(f"{'method':42}{'FLOPs':>8}{'mean KV':>9}{'no-cache':>9}{'agreement':>11}{'KL/token':>10}")
    for name, r in rows.items():
        log(f"{name:42}{r['flops_ratio']:8.3f}{r['kv_ratio']:9.3f}{r['nocache_ratio']:9.3f}{r['agreement']:11.3f}"
            f"{r['kl']:10.4f}")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# training state: safetensors + JSON, written atomically


def atomic_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f)
    atomic_write(path, write)


def save_state(path, predictor, optimizer, generator, it, args, best):
    tensors = {f"predictor.{k}": v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()}
    opt = optimizer.state_dict()
    for i, state in opt["state"].items():
        tensors.update({f"optimizer.{i}.{k}": torch.as_tensor(v).cpu().contiguous() for k, v in state.items()})
    tensors["generator"] = generator.get_state().cpu()
    meta = dict(iter=it, args=vars(args), param_groups=opt["param_groups"], best=best,
                predictor=dict(n_heads=predictor.n_heads, rates=predictor.rates, k=predictor.k))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"train_state": json.dumps(meta)}))


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
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
    start = (i * world + rank) * batch
    return [perm[(start + j) % n] for j in range(batch)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the DyRate rate predictor under a FLOPs budget (the VLM frozen).")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="llava-hf checkpoint folder")
    g.add_argument("--data", required=True, help="JSONL ({image, prompt, answer?}) or LLaVA conversation JSON")
    g.add_argument("--val-data", default=None, help="held-out file (default: --val-size samples held out of --data)")
    g.add_argument("--val-size", type=int, default=32, help="held-out samples taken from --data without --val-data")
    g.add_argument("--image-folder", default=None, help="folder image paths are relative to (default: the data file's)")
    g.add_argument("--conv", choices=["llava-hf", "vicuna_v1"], default="llava-hf", help="prompt template")
    g.add_argument("--pad", action="store_true", help="pad images to a square first (original LLaVA)")
    g.add_argument("--distill-max-new-tokens", type=int, default=64, help="length of self-distilled answers")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="model dtype")
    g = p.add_argument_group("predictor and objective")
    g.add_argument("--out", required=True, help="predictor file to write (generate.py --predictor reads it)")
    g.add_argument("--k", type=int, default=2, help="pruning layer K")
    g.add_argument("--rates", default="0:1:9", help="candidate drop rates: 'start:stop:count' or a comma list")
    g.add_argument("--budget", choices=sorted(dyrate.COSTS), default="flops", help="the cost the budget is on: "
                   "flops (with a KV cache), kv (mean KV-cache size over the steps) or nocache (FLOPs when every "
                   "step recomputes the kept sequence)")
    g.add_argument("--target", "--target-flops", type=float, default=0.5, dest="target",
                   help="the budget as a fraction of none's cost")
    g.add_argument("--budget-weight", "--flops-weight", type=float, default=20.0, dest="budget_weight",
                   help="weight of (cost ratio - target)^2")
    g.add_argument("--loss", choices=["kl", "ce"], default="kl", help="KL to the unpruned model, or CE to the answer")
    g.add_argument("--tau-start", type=float, default=1.0, help="Gumbel temperature at the start")
    g.add_argument("--tau-end", type=float, default=0.1, help="Gumbel temperature at the end")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-iters", type=int, default=300, help="training steps")
    g.add_argument("--batch-size", type=int, default=8, help="samples per step (per rank under torchrun)")
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
                   "same FLOPs, VTW and none, on the held-out set")
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


# the options that decide what is trained: a resumed run must keep them
SAME_ON_RESUME = ("model", "data", "val_data", "val_size", "image_folder", "conv", "pad", "distill_max_new_tokens",
                  "dtype", "k", "rates", "budget", "target", "budget_weight", "loss", "tau_start", "tau_end",
                  "max_iters", "batch_size", "lr", "min_lr", "warmup_iters", "weight_decay", "seed")


def check_args(args):
    """Every check that needs no model weights, before they load (minutes for a 7B model)."""
    for name, path in (("--data", args.data), ("--val-data", args.val_data)):
        if path is not None and not os.path.isfile(path):
            folder = " (it is a folder)" if os.path.isdir(path) else ""
            raise FileNotFoundError(f"{name} {path!r} does not exist{folder}.")
    if args.image_folder is not None and not os.path.isdir(args.image_folder):
        raise FileNotFoundError(f"--image-folder {args.image_folder!r} is not a folder.")
    check_writable_folder(args.out, "--out")
    if args.eval_only:
        if not os.path.isfile(args.out):
            raise FileNotFoundError(f"--eval-only evaluates the predictor at --out, but {args.out!r} does not exist.")
        return
    for name, value, low in (("--max-iters", args.max_iters, 1), ("--batch-size", args.batch_size, 1),
                             ("--warmup-iters", args.warmup_iters, 0), ("--log-interval", args.log_interval, 1),
                             ("--eval-interval", args.eval_interval, 1), ("--val-size", args.val_size, 1),
                             ("--eval-max-new-tokens", args.eval_max_new_tokens, 1),
                             ("--distill-max-new-tokens", args.distill_max_new_tokens, 1)):
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


def check_resume(meta, args):
    """Refuse a resume whose options change what is being trained, naming them."""
    saved = meta["args"]
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (the state has {saved.get(k)!r})"
               for k in SAME_ON_RESUME if saved.get(k) != getattr(args, k)]
    if changed:
        raise ValueError(f"--resume with other options than the run in {args.out}.state: {'; '.join(changed)}. "
                         f"Resume with the same options, or train afresh to another --out.")


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
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
    return [samples[i] for i in order[size:]], [samples[i] for i in order[:size]]


class Stop(Exception):
    """SIGTERM (what cluster schedulers send before they kill a job), handled like Ctrl-C."""


def on_sigterm(signum, frame):
    raise Stop


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        check_device(args.device)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:  # torchrun: every rank holds a frozen model copy; only the predictor's gradients are all-reduced
        cuda = torch.cuda.is_available() and args.device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    state_path = args.out + ".state"
    try:
        cfg = read_config(args.model)
        layers = cfg.text.num_hidden_layers
        if not args.eval_only and not 1 <= args.k <= max(1, layers - 1):
            raise ValueError(f"--k must lie in [1, {max(1, layers - 1)}] for this {layers}-layer model.")
        meta = None
        if args.resume:
            meta = json.loads(safe_open(state_path, framework="pt").metadata()["train_state"])
            check_resume(meta, args)
        torch.manual_seed(args.seed)
        model = Llava.from_pretrained(args.model, args.device, getattr(torch, args.dtype or default_dtype(args.device)))
        tok = Tokenizer(args.model, model.config)
        if rank != 0:
            dist.barrier()  # rank 0 distils the missing answers first; the others then read its cache
        samples, _ = load_samples(args.data, model, tok, args, log)
        val = load_samples(args.val_data, model, tok, args, log)[0] if args.val_data else None
        if rank == 0 and world > 1:
            dist.barrier()
        if val is None:
            samples, val = hold_out(samples, args, log)
        if not samples or not val:
            raise ValueError(f"need training and held-out samples: got {len(samples)} and {len(val)} usable ones")
        if args.eval_only:
            predictor = dyrate.RatePredictor.load(args.out, cfg, args.device)
        else:
            predictor = dyrate.RatePredictor(cfg.text.num_attention_heads, parse_rates(args.rates), args.k)
            predictor = predictor.to(args.device)
            floor = dyrate.cost_ratio([dyrate.costs(cfg, len(s.ids), [0] * len(s.answer), args.k) for s in samples],
                                      dyrate.COSTS[args.budget])
            if not floor < args.target <= 1:
                raise ValueError(f"--target {args.target} is out of reach: dropping every image token gives "
                                 f"{floor:.3f} of none's cost ({args.budget} budget) on this data; choose a target in "
                                 f"({floor:.3f}, 1].")
        log(predictor.describe(cfg))
    except (ValueError, FileNotFoundError, SafetensorError) as e:
        sys.exit(f"error: {e}")
    log(f"unpruned references for {len(val)} held-out samples ...")
    refs = reference(model, val, args) if rank == 0 else None
    if args.eval_only:
        return compare(model, predictor, val, refs, args, log)

    optimizer = torch.optim.AdamW(predictor.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator(args.device).manual_seed(args.seed * 1000 + rank)
    it, best = 0, None
    if meta is not None:
        it, best = load_state(state_path, predictor, optimizer, generator)["iter"], meta.get("best")
        log(f"resumed from {state_path} at step {it}")

    def snapshot():  # the whole training state at a step boundary (the predictor is tiny: a copy costs nothing)
        return (it, {k: v.clone() for k, v in predictor.state_dict().items()}, copy.deepcopy(optimizer.state_dict()),
                generator.get_state(), best)

    def checkpoint():
        if rank == 0:
            predictor.save(args.out, dyrate.fingerprint(cfg), dict(trained_iters=it, budget=args.budget,
                                                                     target=args.target, held_out=best))
            save_state(state_path, predictor, optimizer, generator, it, args, best)

    if it >= args.max_iters:
        log(f"the state at {state_path} is already at step {it} of {args.max_iters}: nothing to train")
        return predictor, best
    cost_name = {"flops": "FLOPs", "kv": "mean KV", "nocache": "no-cache FLOPs"}[args.budget]
    previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    boundary = snapshot()
    try:
        while it < args.max_iters:
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = get_lr(it, args)
            tau = get_tau(it, args)
            batch = [samples[i] for i in batch_indices(it, len(samples), args.batch_size, rank, world, args.seed)]
            loss, fit, ratio = train_loss(model, predictor, batch, args, tau, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stats = torch.stack([loss.detach(), fit.detach(), ratio.detach()]).float()
            if world > 1:
                for p in predictor.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
                dist.all_reduce(stats)
                stats /= world
            optimizer.step()
            it += 1
            if it % args.log_interval == 0 or it == 1:
                log(f"step {it}/{args.max_iters}: loss {stats[0]:.4f} | {args.loss} {stats[1]:.4f} | {cost_name} ratio "
                    f"{stats[2]:.3f} (target {args.target}) | tau {tau:.3f} | lr {get_lr(it - 1, args):.2e} | "
                    f"{(time.perf_counter() - t0) * 1e3:.0f} ms")
            if it % args.eval_interval == 0 or it == args.max_iters:
                if rank == 0:
                    learned = pruner_factory(model, "dyrate", args.k, predictor=predictor)
                    best = evaluate(model, val, refs, learned, args)
                    log(f"held-out, hard decisions: {cost_name} ratio {best[f'{args.budget}_ratio']:.3f} (target "
                        f"{args.target}) | FLOPs {best['flops_ratio']:.3f}, mean KV {best['kv_ratio']:.3f}, no-cache "
                        f"FLOPs {best['nocache_ratio']:.3f} | agreement with unpruned {best['agreement']:.3f} | "
                        f"KL/token {best['kl']:.4f}")
                checkpoint()
                if world > 1:
                    dist.barrier()
            boundary = snapshot()
    except (KeyboardInterrupt, Stop) as e:  # back to the last step boundary: a resume redoes the step exactly
        it, weights, opt_state, rng, best = boundary
        predictor.load_state_dict(weights)
        optimizer.load_state_dict(opt_state)
        generator.set_state(rng)
        checkpoint()
        log(f"\ninterrupted at step {it}: state saved to {state_path}; rerun with --resume to continue")
        sys.exit(143 if isinstance(e, Stop) else 130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    log(f"predictor written to {args.out}")
    if args.compare and rank == 0:
        compare(model, predictor, val, refs, args, log)
    if world > 1:
        dist.destroy_process_group()
    return predictor, best


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # during start-up: nothing of the user's to save yet (the loop saves its own state)
        sys.exit("interrupted before training started; nothing to save")
