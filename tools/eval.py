"""
The seed paper's benchmarks on local data, for every pruning method, with the field's scorers: captions (COCO-2017 val,
Flickr30k, NoCaps: CIDEr-D and BLEU-4 by pycocoevalcap, as lmms-eval and the papers compute them) and question sets
(GQA-style exact match, VQAv2/VizWiz-style soft accuracy, POPE yes/no, ScienceQA/MMBench-style multiple choice).

    python -m tools.eval --model llava-1.5-7b-hf --captions coco/annotations/captions_val2017.json \\
        --images coco/val2017 --methods none,fastv,dyrate --predictor predictor --out runs/coco
    python -m tools.eval --model llava-1.5-7b-hf --questions pope.jsonl --task yesno \\
        --images coco/val2014 --out runs/pope
    python -m tools.eval --captions data/shapes/test_captions.json --images data/shapes \\
        --methods none,vtw --out runs/shapes

Captions: COCO captions format, {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}, image
paths relative to --images. Questions: JSONL, one {"image", "question", "answers": [...]} per line ("choices": [...]
adds lettered options for --task choice; "id" optional). The prompts are LLaVA-1.5's evaluation prompts; greedy
decoding; the llava-hf template, or with --original the vicuna_v1 template and pad-to-square the papers' numbers use
(a learned predictor's own protocol by default: the one it was trained with). Each rule runs at its own settings,
named in every table and metrics file: FastV at K=2, VTW at its paper's layer (vtw:k=N sets one; vtw:k=match takes the
layer whose FLOPs match the method before it in --methods).

Long runs: predictions stream to OUT/predictions-METHOD.jsonl as they are made; --resume continues an interrupted run
(Ctrl-C, SIGTERM, a crash) where it stopped; a bad record (missing or unreadable image, empty question) is counted and
skipped with its reason; --limit N for a quick look. OUT/metrics-METHOD.json holds each run's scores and costs.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from collections import Counter

import numpy as np

import torch
import torch.distributed as dist

import cli
import dyrate
import generate
import processing
from tools import beam, costs, fast, viz

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."  # lmms-eval's for LLaVA-1.5
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's evaluation prompts
CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
TASKS = ("caption", "short", "vqa", "yesno", "choice")
LETTERS = "ABCDEFGHIJ"

# ----------------------------------------------------------------------------------------------------------------------
# data: records {id, image, prompt, refs}; what is wrong with a record is a reason to skip it, never a crash


def load_captions(path, images):
    """COCO captions JSON -> records with every reference caption of each image."""
    with open(path) as f:
        d = json.load(f)
    if not isinstance(d, dict) or not isinstance(d.get("images"), list) or not isinstance(d.get("annotations"), list):
        raise ValueError(f"{path} is not in COCO captions format ({{'images': [...], 'annotations': [...]}}).")
    refs = {}
    for a in d["annotations"]:
        if isinstance(a, dict) and isinstance(a.get("caption"), str):
            refs.setdefault(a.get("image_id"), []).append(a["caption"])
    return [dict(id=im.get("id"), image=os.path.join(images, str(im.get("file_name"))), prompt=CAPTION_PROMPT,
                 refs=refs.get(im.get("id"), [])) for im in d["images"] if isinstance(im, dict)]


def load_questions(path, images, task, suffix=None):
    """JSONL question records; a line that is not a JSON object becomes a record with the reason it is bad."""
    records = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                r = None
            if not isinstance(r, dict):
                records.append(dict(id=i, bad="not a JSON object"))
                continue
            question, answers = r.get("question"), r.get("answers", r.get("answer"))
            answers = [answers] if isinstance(answers, str) else answers
            rec = dict(id=r.get("id", i), image=os.path.join(images, str(r.get("image"))), refs=answers)
            if not isinstance(question, str) or not question.strip():
                rec["bad"] = "empty question"
            elif not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                rec["bad"] = "no reference answers"
            elif task == "choice":
                choices = r.get("choices") or []
                options = "".join(f"\n{LETTERS[j]}. {c}" for j, c in enumerate(choices[:len(LETTERS)]))
                rec["prompt"] = question.strip() + options + (CHOICE_SUFFIX if suffix is None else suffix)
            else:
                rec["prompt"] = question.strip() + (SHORT_SUFFIX if suffix is None else suffix)
            records.append(rec)
    return records


def check_record(r):
    """None if the record can be evaluated as far as can be told without decoding its image, else why it is skipped."""
    if r.get("bad"):
        return r["bad"]
    if not r.get("refs"):
        return "no reference captions" if r.get("prompt") == CAPTION_PROMPT else "no reference answers"
    if r.get("image") is None or not os.path.isfile(r["image"]):
        return "image not found"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# metrics


def tokenize_captions(captions):
    """{key: [text, ...]} -> the same, tokenised as the papers do: pycocoevalcap's PTB tokenizer (Java). Without Java,
    a fallback (lower case, punctuation removed, split on spaces) and a warning that the numbers are not comparable
    with published ones."""
    if shutil.which("java"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    print("warning: no Java found: captions are tokenised by a fallback, not by the PTB tokenizer; CIDEr and BLEU are "
          "not comparable with published numbers", file=sys.stderr)
    return {k: [" ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", c.lower())) for c in v] for k, v in captions.items()}


def caption_scores(refs, preds, tokenize=True):
    """CIDEr-D (pycocoevalcap's `Cider`, as lmms-eval and the papers) and BLEU-4 of preds {key: text} against refs
    {key: [text, ...]}; tokenize=False takes the texts as already tokenised."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    gts, res = {k: refs[k] for k in preds}, {k: [preds[k]] for k in preds}
    if tokenize:
        gts, res = tokenize_captions(gts), tokenize_captions(res)
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return dict(cider=float(cider), bleu4=float(bleu[3]))


# the standard VQA answer normalisation: VQAv2's official evaluation code (vqaEval.py), which EvalAI and lmms-eval use
CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "im": "i'm",
                "ive": "i've", "youre": "you're", "theyre": "they're", "thats": "that's", "whats": "what's",
                "hasnt": "hasn't", "havent": "haven't", "shouldnt": "shouldn't", "couldnt": "couldn't"}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
PERIOD_STRIP, COMMA_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)"), re.compile(r"(\d)(,)(\d)")


def normalize_answer(text):
    """VQAv2's processPunctuation then processDigitArticle: punctuation removed (or made a space), a period only when
    not part of a number, lower case, number words to digits, articles dropped, common contractions restored."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = PERIOD_STRIP.sub("", out)
    words = [NUMBERS.get(w, w) for w in out.lower().split() if NUMBERS.get(w, w) not in ("a", "an", "the")]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(pred, answers):
    """VQAv2/VizWiz soft accuracy: the mean over the references of min(1, matches among the other ones / 3)."""
    pred, answers = normalize_answer(pred), [normalize_answer(a) for a in answers]
    scores = [min(1.0, sum(a == pred for j, a in enumerate(answers) if j != i) / 3) for i in range(len(answers))]
    return sum(scores) / len(scores)


def yes_no(text):
    """POPE's reading of an answer (LLaVA's eval_pope): 'no' if its first sentence says no or not, else 'yes'."""
    words = re.findall(r"[a-z]+", text.split(".")[0].lower())
    return "no" if "no" in words or "not" in words else "yes"


def choice_letter(text):
    """The option letter an answer gives: the first standalone capital letter (A., (B), C), else its first word."""
    m = re.search(r"\b([A-J])\b", text)
    return m.group(1) if m else text.strip()[:1].upper()


def question_scores(task, preds, refs):
    """Scores of preds {key: text} against refs {key: [answers]} for a question task."""
    keys = list(preds)
    if task == "short":
        return dict(accuracy=sum(normalize_answer(preds[k]) == normalize_answer(refs[k][0]) for k in keys) / len(keys))
    if task == "vqa":
        return dict(accuracy=sum(vqa_accuracy(preds[k], refs[k]) for k in keys) / len(keys))
    if task == "choice":
        return dict(accuracy=sum(choice_letter(preds[k]) == refs[k][0].strip().upper()[:1] for k in keys) / len(keys))
    said, truth = [yes_no(preds[k]) for k in keys], [normalize_answer(refs[k][0]) for k in keys]
    tp = sum(s == t == "yes" for s, t in zip(said, truth))
    fp = sum(s == "yes" and t == "no" for s, t in zip(said, truth))
    fn = sum(s == "no" and t == "yes" for s, t in zip(said, truth))
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return dict(accuracy=sum(s == t for s, t in zip(said, truth)) / len(keys), precision=precision, recall=recall,
                f1=2 * precision * recall / max(precision + recall, 1e-12), yes_ratio=said.count("yes") / len(keys))


# ----------------------------------------------------------------------------------------------------------------------
# a run: one method over the records, streamed to a JSONL file


def prediction_files(out, method):
    """Every predictions file of a method in OUT: the merged one, and the shards of ranks of a run under torchrun."""
    name = f"predictions-{method}"
    return sorted(os.path.join(out, f) for f in os.listdir(out) if f.startswith(name + ".") and f.endswith(".jsonl"))


def read_done(out, method):
    """{record id: line} of what earlier runs wrote, merged or sharded, whatever their number of ranks
    (predictions, and records skipped on the way)."""
    return {json.dumps(p["id"]): p for path in prediction_files(out, method) for p in processing.read_lines(path)}


def progress(done, total, new, seconds, skipped):
    rate = new / max(seconds, 1e-9)
    eta = (total - done) / rate if rate > 0 else math.inf
    bar = "#" * int(30 * done / max(total, 1))
    print(f"\r[{bar:30}] {done}/{total} | {rate:.2f} records/s | ETA {eta / 60:.1f} min | skipped {skipped}",
          end="", file=sys.stderr, flush=True)


def predict(llava, tok, chunk, args, rule):
    """One batch of records -> their prediction lines (a record whose image does not decode: a skipped line)."""
    todo, images, lines = [], [], []
    for r in chunk:
        try:  # decoding is the only test of an image; it is read once and handed to generate()
            images.append(processing.load_image(r["image"]))
            todo.append(r)
        except (ValueError, OSError):
            lines.append(dict(id=r["id"], skipped="unreadable image"))
    if not todo:
        return lines
    prompts = [r["prompt"] for r in todo]
    out = beam.generate(llava, tok, images, prompts, args.max_new_tokens, args.num_beams, **options(args, rule)) \
        if args.num_beams > 1 else generate.generate(llava, tok, images, prompts, args.max_new_tokens,
                                                     **options(args, rule))
    for r, row in zip(todo, costs.add(out.rows, llava.config)):
        figures = {key: row[key] for key in row if key.removesuffix("_none").endswith(("flops", "bytes", "steps"))}
        lines.append(dict(id=r["id"], prediction=row["text"].strip(), new_tokens=len(row["token_ids"]),
                          kept_visual=row["kept_visual"], prefill_ms=out.prefill_ms,
                          decode_ms_per_token=out.decode_ms_per_token, batch=len(todo), **figures,
                          **(dict(type_shares=row["type_shares"]) if args.figure2 else {})))
    return lines


def run_method(llava, tok, records, method, args, rule, log, rank=0, world=1):
    """Predictions of one method for every record not done yet (--resume: by any earlier run), this rank's shard of
    them (records i with i % world == rank), streamed to its own file; then rank 0 merges every file in record order
    and scores them. Returns the scores (rank 0) or None."""
    done = read_done(args.out, method) if args.resume else {}
    usable = [r for r in records if not r["skip"]]
    mine = [r for i, r in enumerate(records) if i % world == rank and not r["skip"] and json.dumps(r["id"]) not in done]
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    rounds = collective_max(len(batches), args.device, world)  # every rank takes part in every round's count
    name = f"predictions-{method}.jsonl" if world == 1 else f"predictions-{method}.rank{rank}.jsonl"
    path = os.path.join(args.out, name)
    count = sum(json.dumps(r["id"]) in done for r in usable)
    t0, new, skipped = time.perf_counter(), 0, sum("skipped" in p for p in done.values())
    with open(path, "a") as f:
        for i in range(rounds):
            lines = predict(llava, tok, batches[i], args, rule) if i < len(batches) else []
            processing.append_lines(f, lines)
            counts = collective_sum([len(lines), sum("skipped" in line for line in lines)], args.device, world)
            count, skipped, new = count + counts[0], skipped + counts[1], new + counts[0]
            if rank == 0:
                progress(count, len(usable), new, time.perf_counter() - t0, skipped)
    if rank == 0:
        print(file=sys.stderr)
    if world > 1:
        dist.barrier()  # every shard is on disk
    if rank != 0:
        return None
    done = merge(args.out, method, records)
    tokens = sum(p.get("new_tokens", 0) for p in done.values())
    settings = dyrate.rule_spec(rule, dyrate.pruning_layer(llava.config.text.num_hidden_layers, args.k, rule))
    return summarize(method, records, done, args, tokens / max(time.perf_counter() - t0, 1e-9), log, settings)


def merge(out, method, records):
    """Every predictions file of the method into predictions-METHOD.jsonl, in record order (written atomically), the
    shards removed; returns {record id: line}."""
    done = read_done(out, method)
    lines = [done[json.dumps(r["id"])] for r in records if json.dumps(r["id"]) in done]
    path = os.path.join(out, f"predictions-{method}.jsonl")

    def write(tmp):
        with open(tmp, "w") as f:
            processing.append_lines(f, lines)
    processing.atomic_write(path, write)
    for shard in prediction_files(out, method):
        if shard != path:
            os.remove(shard)
    return done


def collective_sum(values, device, world):
    """values summed over the ranks (themselves with one process)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t)
    return t.tolist()


def collective_max(value, device, world):
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def summarize(method, records, done, args, tokens_per_s, log, settings=""):
    """Scores and costs of one method's predictions, written to OUT/metrics-METHOD.json (and, for captions, the COCO
    results file); one line on stdout."""
    skipped = Counter(r["skip"] for r in records if r["skip"])
    skipped.update(p["skipped"] for p in done.values() if "skipped" in p)
    kept = [r for r in records if not r["skip"] and "prediction" in done.get(json.dumps(r["id"]), {})]
    preds = {json.dumps(r["id"]): done[json.dumps(r["id"])]["prediction"] for r in kept}
    refs = {json.dumps(r["id"]): r["refs"] for r in kept}
    rows = [done[k] for k in preds]
    if not rows:
        raise ValueError(f"{method}: no record could be evaluated ({dict(skipped)}).")
    metrics = caption_scores(refs, preds) if args.task == "caption" else question_scores(args.task, preds, refs)
    ratios = {f"{budget}_ratio": costs.cost_ratio(rows, cost) for budget, cost in costs.COSTS.items()}
    per_batch = {}  # timings are per generate() call: count each batch once
    for p in rows:
        per_batch.setdefault((p["prefill_ms"], p["decode_ms_per_token"]), p)
    result = dict(method=method, settings=settings, protocol=dict(conv=args.conv, pad=args.pad), task=args.task,
                  records=len(preds), skipped=dict(skipped), **metrics, **ratios,
                  mean_kept_image_tokens=sum(sum(p["kept_visual"]) / len(p["kept_visual"]) for p in rows) / len(rows),
                  mean_kv_bytes=sum(p["mean_kv_bytes"] for p in rows) / len(rows),
                  prefill_ms=sum(p["prefill_ms"] for p in per_batch.values()) / len(per_batch),
                  decode_ms_per_token=sum(p["decode_ms_per_token"] for p in per_batch.values()) / len(per_batch),
                  tokens_per_s=tokens_per_s, batch_size=args.batch_size)
    if args.task == "caption":
        results = [dict(image_id=r["id"], caption=preds[json.dumps(r["id"])]) for r in kept]
        processing.write_json(os.path.join(args.out, f"results-{method}.json"), results)  # COCO results format
    processing.write_json(os.path.join(args.out, f"metrics-{method}.json"), result)
    score = " | ".join(f"{k} {result[k]:.4f}" for k in metrics)
    log(f"{settings}: {score} | FLOPs {ratios['flops_ratio']:.3f} (no-cache {ratios['nocache_ratio']:.3f}), mean KV "
        f"{ratios['kv_ratio']:.3f} of none | image tokens kept {result['mean_kept_image_tokens']:.1f} | prefill "
        f"{result['prefill_ms']:.1f} ms, decode {result['decode_ms_per_token']:.2f} ms/token | {len(preds)} records"
        + (f", skipped {sum(skipped.values())} ({', '.join(f'{n} {w}' for w, n in skipped.items())})" if skipped
           else ""))
    return result


# ----------------------------------------------------------------------------------------------------------------------
# the command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmarks on local data for every pruning method, with the field's "
                                            "scorers.")
    g = p.add_argument_group("data")
    g.add_argument("--captions", default=None, help="COCO captions format JSON (COCO-2017 val, Flickr30k, NoCaps)")
    g.add_argument("--questions", default=None, help="JSONL of {image, question, answers} records")
    g.add_argument("--task", choices=TASKS, default=None, help="the question set's kind: short (GQA exact match), "
                   "vqa (VQAv2/VizWiz soft accuracy), yesno (POPE), choice (ScienceQA/MMBench letters); "
                   "captions are 'caption'")
    g.add_argument("--images", required=True, help="the folder image paths are relative to")
    g.add_argument("--limit", type=int, default=None, help="only the first N records")
    cli.add_model_args(p)
    g = cli.add_pruning_args(p, several=True)
    g.add_argument("--original", action="store_true", help="the original LLaVA-1.5 evaluation settings: vicuna_v1 "
                   "template and pad-to-square (the papers' numbers; default: a predictor's own, else llava-hf's)")
    g.add_argument("--allow-protocol-mismatch", action="store_true", help="run a predictor under another protocol "
                   "than it was trained with, on purpose")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default 64 for captions (lmms-eval), 16 else")
    g.add_argument("--suffix", default=None, help="text after each question (default: LLaVA-1.5's evaluation "
                   "instruction for the task; '' for a model trained without one, such as the shapes model)")
    g.add_argument("--batch-size", type=int, default=8, help="records per generate() call (per rank under torchrun)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    g.add_argument("--figure2", action="store_true", help="the seed paper's Figure 2: the unpruned model's attention "
                   "on each token type at layer K-1 against the position in the answer (OUT/figure2.png, .json)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="folder for predictions-METHOD.jsonl, metrics-METHOD.json, results")
    g.add_argument("--resume", action="store_true", help="continue the runs whose predictions are in --out")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    args.task = "caption" if args.captions else args.task
    args.conv, args.pad = ("vicuna_v1", True) if args.original else (None, None)  # None: prompt_protocol's
    return args


def check_args(args):
    """What only the command line knows, checked before anything is read: the data files, flags, the output."""
    if (args.captions is None) == (args.questions is None):
        raise ValueError("give --captions FILE or --questions FILE (one of them)")
    if args.questions and args.task in (None, "caption"):
        raise ValueError("--questions needs --task short, vqa, yesno or choice")
    data = args.captions or args.questions
    if not os.path.isfile(data):
        raise FileNotFoundError(f"{'--captions' if args.captions else '--questions'} {data!r} does not exist.")
    if not os.path.isdir(args.images):
        raise FileNotFoundError(f"--images {args.images!r} is not a folder.")
    if args.figure2 and args.methods != ["none"]:
        raise ValueError("--figure2 measures the unpruned model: drop --methods (or give --methods none)")
    for name, value in (("--batch-size", args.batch_size), ("--limit", args.limit or 1),
                        ("--max-new-tokens", args.max_new_tokens or 1)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    args.max_new_tokens = args.max_new_tokens or (64 if args.task == "caption" else 16)
    os.makedirs(args.out, exist_ok=True)
    cli.check_writable_folder(os.path.join(args.out, "metrics.json"), "--out")
    costs.check_matches(args.methods)
    for m in args.methods:
        found = prediction_files(args.out, m)
        if found and not args.resume:
            raise ValueError(f"{found[0]} exists: pass --resume to continue that run, or another --out.")
    return data


def read_records(data, args, cfg, tok):
    """The records, each marked with why it is skipped (or None), and --limit applied."""
    try:
        records = load_captions(data, args.images) if args.captions else \
            load_questions(data, args.images, args.task, args.suffix)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{data} is not valid JSON ({e}).") from None
    records = records[:args.limit] if args.limit else records
    for r in records:
        r["skip"] = check_record(r)
        if not r["skip"] and len(tok.encode_prompt(r["prompt"], args.conv)[0]) + args.max_new_tokens > \
                cfg.text.max_position_embeddings:
            r["skip"] = "longer than the context"
    if not any(not r["skip"] for r in records):
        raise ValueError(f"{data}: none of its {len(records)} records can be evaluated "
                         f"({dict(Counter(r['skip'] for r in records))}).")
    return records


def options(args, rule):
    """generate()'s (and beam search's) arguments for one rule."""
    return dict(rule=rule, k=args.k, conv=args.conv, pad=args.pad, stats=args.figure2,
                allow_protocol_mismatch=args.allow_protocol_mismatch)


def matched_vtw(llava, tok, records, args, before, log, device, world):
    """VTW at the layer whose FLOPs ratio, over the lengths of the answers of the method `before` (its result, rank 0),
    is closest to that method's; every rank gets the same layer."""
    k = 0
    if before is not None:
        done = read_done(args.out, before["method"])
        lengths = [(len(tok.encode_prompt(r["prompt"], args.conv)[0]), done[json.dumps(r["id"])]["new_tokens"])
                   for r in records if "prediction" in done.get(json.dumps(r["id"]), {})]
        k = costs.matched_layer(llava.config, lengths, before["flops_ratio"])
        log(f"vtw:k=match: K={k}, the layer whose FLOPs ratio is closest to {before['method']}'s "
            f"{before['flops_ratio']:.3f}")
    return dyrate.VTW(k=collective_max(k, device, world))


def figure2(shares):
    """The seed paper's Figure 2 from the unpruned model's type shares (per answer, per step: system, image,
    instruction, response at layer K-1, averaged over heads): their mean at each answer position, and the image's
    mean share in the first and the last third of each answer."""
    width = max(len(s) for s in shares)
    by_position = [np.mean([s[t] for s in shares if len(s) > t], 0).tolist() for t in range(width)]
    thirds = []
    for s in shares:
        image, n = [step[1] for step in s], max(len(s) // 3, 1)
        thirds.append((np.mean(image[:n]), np.mean(image[-n:])))
    return dict(first_third=float(np.mean([a for a, _ in thirds])), last_third=float(np.mean([b for _, b in thirds])),
                by_position=by_position, answers=len(shares))


def write_figure2(out, records, log):
    """OUT/figure2.json and OUT/figure2.png from the merged predictions of --figure2 (method none)."""
    done = read_done(out, "none")
    shares = [done[json.dumps(r["id"])]["type_shares"] for r in records
              if "type_shares" in done.get(json.dumps(r["id"]), {})]
    result = figure2(shares)
    processing.write_json(os.path.join(out, "figure2.json"), result)
    viz.shares_plot(result["by_position"]).save(os.path.join(out, "figure2.png"))
    log(f"Figure 2 ({result['answers']} answers, layer K-1, none): image share {result['first_third']:.3f} in the "
        f"first third of the answer, {result['last_third']:.3f} in the last; wrote {out}/figure2.png and .json")
    return result


def table(results):
    """The methods side by side, when several ran, each with the settings it ran with, under their protocol."""
    keys = [k for k in ("cider", "bleu4", "accuracy", "f1") if k in results[0]]
    protocol = results[0]["protocol"]
    lines = [f"protocol: --conv {protocol['conv']} {'--pad' if protocol['pad'] else '--no-pad'}",
             "".join(f"{k:>10}" for k in keys) + f"{'FLOPs':>8}{'no-cache':>10}{'mean KV':>9}{'kept':>7}  settings"]
    for r in results:
        lines.append("".join(f"{r[k]:10.4f}" for k in keys) + f"{r['flops_ratio']:8.3f}{r['nocache_ratio']:10.3f}"
                     f"{r['kv_ratio']:9.3f}{r['mean_kept_image_tokens']:7.1f}  {r['settings']}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors():  # every check before the weights load; under torchrun, every rank checks alike
        rank, world, device = cli.distributed(cli.device(args.device))
        args.device = device
        log = print if rank == 0 else (lambda *a, **kw: None)
        data = check_args(args)
        if world > 1:
            dist.barrier()  # every rank has checked OUT before any writes to it
        cfg, tok = cli.checkpoint(args.model)
        rules = cli.rules(",".join(m.replace(costs.MATCH, "") for m in args.methods), args.predictor, cfg, device)
        args.conv, args.pad = generate.prompt_protocol(rules.values(), args.conv, args.pad,
                                                       args.allow_protocol_mismatch)
        records = read_records(data, args, cfg, tok)
        first = next(r for r in records if not r["skip"])
        if args.num_beams > 1:
            beam.check_options(args.num_beams, 1, 1.0)
        log(f"protocol: --conv {args.conv} {'--pad' if args.pad else '--no-pad'}")
        for rule in rules.values():  # every option checked on a real record before the weights load
            generate.make_batch(cfg, tok, [first["image"]], [first["prompt"]], args.max_new_tokens, device=device,
                                **options(args, rule))
        log(f"{len(records)} records ({data}), task {args.task}")
        llava = cli.load_model(args.model, device, cli.dtype(args.dtype, device), log)
        llava.cache_class = fast.FastKVCache  # decode-time drops compacted by moves (the same tokens, less work)
        try:
            with cli.sigterm_raises_stop():
                results = []
                for m in args.methods:
                    rule = matched_vtw(llava, tok, records, args, results[-1], log, device, world) if costs.MATCH in m \
                        else rules[m]
                    results.append(run_method(llava, tok, records, m, args, rule, log, rank, world))
        except cli.INTERRUPTS as e:
            print(file=sys.stderr)
            sys.exit(f"interrupted: the predictions so far are in {args.out}; rerun with --resume to continue"
                     if isinstance(e, KeyboardInterrupt) else "stopped by SIGTERM: rerun with --resume to continue")
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return None
    if args.figure2:
        results[0]["figure2"] = write_figure2(args.out, records, log)
    if len(results) > 1:
        log("\n" + table(results))
    return results


if __name__ == "__main__":
    main()
