"""
Self-distillation, the step before training (as nanoGPT's data/*/prepare.py precedes its train.py): the frozen
unpruned model's greedy answer for every record that has none, appended batch by batch to DATA.answers.jsonl (one
file per torchrun rank, DATA.answers.rankR.jsonl), keyed by model, template, answer length and prompt, where
train.py finds them. A rerun answers only what is missing; an interrupt loses one batch at most; a record whose image
does not decode, or that is longer than the context, is recorded as such (train.py skips and counts it). With
--max-samples N (and --seed) it distils the very subset train.py's --max-samples N draws.

    python -m tools.distill --model DIR --data train.jsonl                  # then: python train.py --data train.jsonl
    torchrun --nproc_per_node=8 -m tools.distill --model DIR --data train.jsonl --batch-size 16 --max-samples 20000
"""
import argparse
import dataclasses
import sys
import time
from collections import Counter

import torch.distributed as dist

import cli
import generate
import processing
import train


def answers_file(data, rank=0):
    """Where a rank appends the answers it distils (one file per rank: no two processes write one file)."""
    return f"{data}.answers.jsonl" if rank == 0 else f"{data}.answers.rank{rank}.jsonl"


def distill(model, tok, todo, path, args, log):
    """The unpruned model's greedy answers for the samples `todo`, in batches through generate(), each batch appended
    to `path` when it finishes; a sample whose image does not decode, or that is longer than the context, is recorded
    as such. A progress line (done/total, samples/s, ETA) every 10 s."""
    t0 = last = time.perf_counter()
    with open(path, "a") as f:
        for i in range(0, len(todo), args.batch_size):
            part = [dataclasses.replace(s) for s in todo[i:i + args.batch_size]]  # copies: their tokens are dropped
            chunk, images = [], []
            for s in train.tokenise(part, model.config, tok, args, Counter()):
                try:
                    images.append(processing.load_image(s.image))
                    chunk.append(s)
                except (ValueError, OSError):
                    s.bad = "unreadable image"
            lines = [dict(key=s.key, skipped=s.bad) for s in part if s.bad]
            if chunk:
                rows = generate.generate(model, tok, images, [s.prompt for s in chunk], args.distill_max_new_tokens,
                                         conv=args.conv, pad=args.pad, stats=False).rows
                lines += [dict(key=s.key, answer=row["token_ids"]) for s, row in zip(chunk, rows)]
            processing.append_lines(f, lines)
            done, now = min(i + args.batch_size, len(todo)), time.perf_counter()
            if now - last >= 10 or done == len(todo):
                rate = done / (now - t0)
                log(f"distilled {done}/{len(todo)} answers with the unpruned model | {rate:.2f} samples/s | ETA "
                    f"{(len(todo) - done) / rate / 60:.1f} min")
                last = now


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Answer the records that have no answer with the unpruned model (greedy), "
                                            "for train.py.")
    cli.add_model_args(p, default_model=None, required=True)
    g = cli.add_data_args(p, "the records {image, prompt, answer?}; those without an answer get one")
    g.add_argument("--max-samples", type=cli.number(int, 1), default=None, help="only the random N of the records "
                   "that train.py --max-samples N (with the same --seed) uses")
    g.add_argument("--seed", type=int, default=0, help="the --max-samples subset (train.py's --seed)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", dest="distill_max_new_tokens", type=cli.number(int, 1),
                   default=train.ANSWER_TOKENS, help="answer length (train.py --distill-max-new-tokens, if not this "
                   "default)")
    g.add_argument("--batch-size", type=cli.number(int, 1), default=8, help="samples per generate() call")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors():  # every check that needs no weights, then torchrun, the data, and the weights if needed
        cli.check_files((("--data", args.data),), args.image_folder)
        rank, world, device = cli.distributed(cli.device(args.device))
        log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
        cfg, tok = cli.checkpoint(args.model)
        seed = args.seed if args.max_samples else None  # all records: in the file's order
        samples, skipped = train.usable_samples(args.data, cfg, args, False, args.max_samples, seed)
        todo = [s for s in samples if s.answer is None]
        subset = f" (--max-samples: a random {args.max_samples} of its records)" if args.max_samples else ""
        log(f"{args.data}{subset}: {len(samples)} samples, {len(todo)} without an answer" + train.skip_note(skipped))
        model = cli.load_model(args.model, device, cli.dtype(args.dtype, device), log) if todo else None
    if todo:
        distill(model, tok, todo[rank::world], answers_file(args.data, rank), args, log)
    if world > 1:
        dist.barrier()  # every rank's share is on disk
        dist.destroy_process_group()
    log(f"{len(todo)} answers written next to {args.data}; train.py reads them" if todo else
        f"nothing to distil: every record of {args.data} has an answer")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: the answers of the finished batches are saved; rerun to distil the rest")
