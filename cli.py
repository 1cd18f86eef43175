"""
What the command lines (generate.py, train.py, eval.py, bench.py) share: the model, device, dtype and pruning flags,
the checks only a command line knows (flag combinations, files and folders), loading a checkpoint with the hint on how
to get one, user mistakes printed as one line, SIGTERM handled like Ctrl-C, and torchrun's set-up.

The library (model.py, dyrate.py, generate.generate) checks its own arguments and raises ValueError in its own terms;
a command line runs its steps inside `user_errors()`, which prints those errors and exits.
"""
import argparse
import contextlib
import math
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

import dyrate
import model
import processing

SHAPES_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "shapes")
GET_WEIGHTS = ("Download a checkpoint with `hf download llava-hf/llava-1.5-7b-hf --local-dir DIR` "
               "(or llava-hf/llava-1.5-13b-hf) and pass that DIR.")
DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------------------------------
# flags


def add_model_args(p, default_model=SHAPES_MODEL, required=False, default_device=None,
                   dtype_help="default: float16 on CUDA, float32 on CPU (bfloat16 for 7B on CPU: ~14 GB)"):
    """--model, --device, --dtype, in a group of their own."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model, required=required,
                   help="llava-hf checkpoint folder (config.json, safetensors, tokenizer.json)"
                   + (", default: the shipped shapes model (models/shapes)" if default_model == SHAPES_MODEL else ""))
    g.add_argument("--device", default=default_device or ("cuda" if torch.cuda.is_available() else "cpu"),
                   help="cuda, cuda:1, cpu, ...")
    g.add_argument("--dtype", choices=DTYPES, default=None, help=dtype_help)
    return g


def add_pruning_args(p, several=False):
    """--method (several=True: --methods, comma-separated), --k, --predictor."""
    g = p.add_argument_group("visual-token pruning (dyrate.py)")
    names = ", ".join(dyrate.RULES)
    if several:
        g.add_argument("--methods", default="none", help=f"comma-separated rules with their parameters ({names})")
    else:
        g.add_argument("--method", default="none", help=f"the pruning rule, NAME or NAME:key=value:... ({names}): "
                       "e.g. fastv:ratio=0.75 drops 75%% of the image tokens at the prefill; mass:eps=1e-5 drops the "
                       "least attended at every step; dyrate needs --predictor")
    add_k_arg(g)
    g.add_argument("--predictor", default=None, help="DyRate rate predictor file written by train.py (--method dyrate)")
    return g


def add_data_args(p, what, evaluate=False):
    """--data (`what` it holds), --image-folder, --conv, --pad: the records and the protocol they are prompted in
    (evaluate=True: a predictor's, add_protocol_args)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help=f"{what}: JSONL or LLaVA conversation JSON")
    g.add_argument("--image-folder", default=None, help="folder image paths are relative to (default: the data file's)")
    if evaluate:
        add_protocol_args(g)
    else:
        g.add_argument("--conv", choices=sorted(processing.TEMPLATES), default="llava-hf", help="prompt template "
                       "(recorded in the predictor; evaluate it with the same: vicuna_v1 for the papers' numbers)")
        g.add_argument("--pad", action="store_true", help="pad images to a square first (original LLaVA; recorded)")
    return g


def add_protocol_args(g):
    """--conv, --pad/--no-pad, --allow-protocol-mismatch: how the prompt is made, by default as the predictor's was."""
    g.add_argument("--conv", choices=sorted(processing.TEMPLATES), default=None, help="prompt template: llava-hf's "
                   "'USER: <image>\\n... ASSISTANT:' or the original vicuna_v1 with a system prompt (default: the "
                   "predictor's, else llava-hf)")
    g.add_argument("--pad", action=argparse.BooleanOptionalAction, default=None, help="pad the image to a square "
                   "first, as the original LLaVA evaluation (default: as the predictor was trained, else not)")
    g.add_argument("--allow-protocol-mismatch", action="store_true", help="run a predictor under another --conv or "
                   "--pad than it was trained with, on purpose")


def add_k_arg(group):
    group.add_argument("--k", type=int, default=None, help=f"pruning layer K of every rule: layers >= K see only the "
                       f"kept image tokens (default: each rule's own, 'vtw:k=15'; else the predictor's, VTW's paper "
                       f"layer, or {dyrate.DEFAULT_K})")


def number(kind, low, strict=False, high=math.inf, hint=""):
    """An argparse type: a finite int or float (kind) >= low (strict: > low) and <= high."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and (value > low if strict else value >= low) and value <= high:
            return value
        bounds = f"in {'(' if strict else '['}{low}, {high}]" if high < math.inf else f"{'>' if strict else '>='} {low}"
        raise argparse.ArgumentTypeError(f"must be a {'whole ' if kind is int else ''}number {bounds}, got {text}"
                                         + hint)
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


def check_files(files, image_folder=None):
    """Each (flag, path) names a file that exists, and --image-folder a folder: checked before the weights load."""
    for name, path in files:
        if path is not None and not os.path.isfile(path):
            folder = " (it is a folder)" if os.path.isdir(path) else ""
            raise FileNotFoundError(f"{name} {path!r} does not exist{folder}.")
    if image_folder is not None and not os.path.isdir(image_folder):
        raise FileNotFoundError(f"--image-folder {image_folder!r} is not a folder.")


def rule(spec, predictor, cfg, dev):
    """--method (and --predictor, the learned rule's file) as a dyrate rule."""
    if predictor is not None:
        if spec.split(":")[0] != "dyrate":
            raise ValueError(f"--predictor is used by --method dyrate only, not by {spec!r}")
        spec = f"dyrate:predictor={predictor}"
    return dyrate.parse_rule(spec, cfg, dev)


def rules(specs, predictor, cfg, dev):
    """--methods as {spec: rule}, in order."""
    return {spec: rule(spec, predictor if spec.split(":")[0] == "dyrate" else None, cfg, dev)
            for spec in specs.split(",")}


# ----------------------------------------------------------------------------------------------------------------------
# what a command line loads, with the command line's words around the library's errors


@contextlib.contextmanager
def user_errors():
    """A user mistake (ValueError, FileNotFoundError from any step) becomes one line on stderr and exit status 1."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def device(name):
    """--device as a torch.device this machine has."""
    try:
        return model.check_device(name)
    except ValueError as e:
        raise ValueError(f"--device {name}: {e}") from None


def dtype(name, dev):
    """--dtype, or float16 on CUDA and float32 on CPU."""
    return getattr(torch, name or ("float16" if dev.type == "cuda" else "float32"))


@contextlib.contextmanager
def hint_on_missing_files():
    try:
        yield
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} {GET_WEIGHTS}") from None


def config(folder):
    """The checkpoint's config (no weights read), or an error with the hint on how to get a checkpoint."""
    with hint_on_missing_files():
        return model.read_config(folder)


def checkpoint(folder):
    """The checkpoint's config and tokenizer (no weights read), or an error with the hint on how to get one."""
    cfg = config(folder)
    with hint_on_missing_files():
        return cfg, processing.Tokenizer(folder, cfg)


def load_model(folder, dev, dt, log=None):
    """The weights (minutes for 7B), or an error with the hint on how to get them."""
    if log:
        log(f"loading {folder} on {dev} in {dt} ...")
    try:
        return model.Llava.from_pretrained(folder, device=dev, dtype=dt)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{e} {GET_WEIGHTS}") from None


def load_predictor(path, cfg, dev):
    """--predictor as a RatePredictor, or None."""
    return None if path is None else dyrate.RatePredictor.load(path, cfg, dev)


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


# ----------------------------------------------------------------------------------------------------------------------
# long runs: interrupts and torchrun


class Stop(Exception):
    """SIGTERM (what cluster schedulers send before they kill a job), raised like Ctrl-C's KeyboardInterrupt."""


INTERRUPTS = (KeyboardInterrupt, Stop)


@contextlib.contextmanager
def sigterm_raises_stop():
    """Inside: SIGTERM raises Stop, so a long run saves its work as it does on Ctrl-C (main thread only: signal
    handlers can be set nowhere else)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stop
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def distributed(dev):
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on CUDA, one GPU per rank; gloo on CPU).
    Returns (rank, world size, this rank's device)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev
