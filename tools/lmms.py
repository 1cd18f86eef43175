"""
This implementation as an lmms-eval model, so that the field's own harness (lmms-eval 0.7) runs its tasks on
LLaVA-1.5 with any pruning method of dyrate.py. The one file that imports lmms-eval, an optional extra; the editable
install registers it as "dyrate" (pyproject.toml's lmms_eval.models entry point), so lmms-eval's own command finds it:

    pip install --no-deps -r requirements-lmms.txt && pip install --no-deps -e .
    lmms-eval --model dyrate --tasks pope --batch_size 8 --output_path runs/lmms \
        --model_args model=llava-1.5-7b-hf,method=fastv,ratio=0.5,dtype=float16
    torchrun --nproc_per_node 8 -m lmms_eval --model dyrate ...     # one GPU per rank, lmms-eval shards the requests

or from Python, an instance handed to lmms-eval's evaluator:

    from lmms_eval.evaluator import simple_evaluate
    simple_evaluate(model=DyRate(model="llava-1.5-7b-hf", method="dyrate", predictor="predictor"), tasks=["pope"])

Model args: DyRate.__init__'s parameters and the rule's own (method=fastv,ratio=0.75; method=mass,eps=1e-5), checked
before the weights load: an unknown key or a bad value is an error naming the valid ones. conv and pad default to the
predictor's recorded protocol, else the papers' (vicuna_v1, padded to a square). generate_until runs generate() in
batches of one task's requests that share their generation arguments, honouring each request's max_new_tokens,
temperature, top_p, num_beams and `until` (the text is cut at the first stop string). Each task's pruning costs (FLOPs,
mean KV-cache and no-cache FLOPs ratios to none, image tokens kept), over every rank's answers, go into lmms-eval's
results file through its model-metrics hook, under keys naming the task, the method with all its settings and the
protocol; they are also printed and kept in `.costs`. loglikelihood is refused: see its message.
"""
import gc
import inspect
import os
import sys
import time
from collections import defaultdict
from dataclasses import fields

import torch
import torch.distributed as dist
from lmms_eval import utils
from lmms_eval.api.model import lmms

import cli
import dyrate
import generate
import processing
from tools import beam, costs, fast

PAPERS_PROTOCOL = ("vicuna_v1", True)  # the original LLaVA-1.5 evaluation: system prompt, images padded to a square


def manifest():
    """The model's registration, which lmms-eval's registry loads through pyproject.toml's entry point.
    NOTE: lmms_eval.models is imported here and in report_costs, not above: building its registry imports this module,
    which must then be whole."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id="dyrate", simple_class_path="tools.lmms.DyRate")


def flag(key, value):
    """A true/false model arg: lmms-eval passes true and false as bools; Python callers may write the words."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}.")
    return value


def whole(key, value):
    """A whole-number model arg >= 1 (lmms-eval's --batch_size arrives as text)."""
    value = int(value) if isinstance(value, str) and value.isdigit() else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a whole number >= 1, got {value!r}.")
    return value


def rank_device(device, local_rank, cuda):
    """The device of this process: `device`, except that none given or plain `cuda` means the GPU of this rank,
    cuda:LOCAL_RANK (torchrun and accelerate launch set LOCAL_RANK), and the CPU where there is no GPU."""
    if device is None and not cuda:
        return "cpu"
    return f"cuda:{local_rank}" if device in (None, "cuda") else device


class DyRate(lmms):
    """LLaVA-1.5 (model.py) with a visual-token pruning method (dyrate.py), for lmms-eval's simple tasks."""
    is_simple = True

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        """lmms-eval's --model_args with its --batch_size and --device: a key given both ways is a user error (lmms-eval
        itself would fail with a TypeError)."""
        args = utils.simple_parse_args_string(arg_string)
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None}
        with cli.user_errors():
            twice = sorted(set(args) & set(extra))
            if twice:
                raise ValueError(f"{twice[0]} is given both in --model_args and as lmms-eval's --{twice[0]}: give it "
                                 f"once, as --{twice[0]}.")
        return cls(**args, **extra)

    def __init__(self, model=cli.SHAPES_MODEL, method="none", k=None, predictor=None, conv=None, pad=None,
                 dtype=None, device=None, batch_size=1, num_beams=1, allow_protocol_mismatch=False, **params):
        super().__init__()
        # NOTE: lmms-eval catches any Exception of a run, prints it and exits 0; a SystemExit (cli.user_errors: one
        # line, status 1) is what makes its command line fail on a mistyped model arg
        with cli.user_errors():  # every model arg checked before the weights load
            spec = self.method_spec(method, params)
            allow = flag("allow_protocol_mismatch", allow_protocol_mismatch)
            pad = None if pad is None else flag("pad", pad)
            if conv is not None and conv not in processing.TEMPLATES:
                raise ValueError(f"conv must be one of {', '.join(processing.TEMPLATES)}, got {conv!r}.")
            if dtype is not None and dtype not in cli.DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(cli.DTYPES)}, got {dtype!r}.")
            self.batch_size_per_gpu, self.num_beams = whole("batch_size", batch_size), whole("num_beams", num_beams)
            self._rank, self._world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            self._device = cli.device(rank_device(device, int(os.environ.get("LOCAL_RANK", 0)),
                                                  torch.cuda.is_available()))
            self.cfg, self.tok = cli.checkpoint(model)
            rule = cli.rule(spec, predictor, self.cfg, self._device)
            k_used = dyrate.pruning_layer(self.cfg.text.num_hidden_layers, k, rule)
            # the predictor's recorded protocol, else the papers'; a predictor prompted otherwise: refused now
            conv, pad = generate.prompt_protocol([rule], conv, pad, allow, default=PAPERS_PROTOCOL)
            self.options = dict(rule=rule, k=k, conv=conv, pad=pad, allow_protocol_mismatch=allow, stats=False)
            self.method, self.protocol = dyrate.rule_spec(rule, k_used), dict(conv=conv, pad=pad)
            if self._device.type == "cuda":
                torch.cuda.set_device(self._device)  # lmms-eval's NCCL collectives run on the current device
            self.llava = cli.load_model(model, self._device, cli.dtype(dtype, self._device))
            self.llava.cache_class = fast.FastKVCache  # as tools/eval.py: the same tokens, less work
        self.costs = {}  # task -> its pruning costs, after generate_until

    @classmethod
    def method_spec(cls, method, params):
        """method=NAME or NAME:key=value:... and the rule's parameters given as model args of their own, as one rule
        spec ('fastv:ratio=0.75'); any other model arg is an error naming the valid ones."""
        name = str(method).split(":")[0]
        if name not in dyrate.RULES:
            raise ValueError(f"method={method!r}: choose one of {', '.join(dyrate.RULES)}.")
        common = [f.name for f in fields(dyrate.Rule) if f.name != "k"]  # every rule's stages, lam (k is an arg)
        own = [f.name for f in fields(dyrate.RULES[name]) if f.name not in ("k", "predictor", *common)]
        unknown = [key for key in params if key not in own + common]
        if unknown:
            args = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
            raise ValueError(f"unknown model arg {', '.join(map(repr, unknown))}: the valid ones are {', '.join(args)}"
                             + (f", {name}'s own {', '.join(own)}" if own else f" ({name} has no parameters of its "
                                f"own)") + f", and every rule's {', '.join(common)}.")
        twice = [key for key in params if key in {p.partition("=")[0] for p in str(method).split(":")[1:]}]
        if twice:
            raise ValueError(f"{', '.join(twice)} given twice, in method={method!r} and as a model arg of its own.")
        return ":".join([str(method)] + [f"{key}={value}" for key, value in params.items()])

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def generate_until(self, requests):
        """The answers to lmms-eval's generate_until requests, in their order."""
        answers, rows, seconds = [""] * len(requests), defaultdict(list), defaultdict(float)
        groups = defaultdict(list)  # one task's requests that share their generation arguments share a batch
        for i, req in enumerate(requests):
            if req.metadata.get("__padding_only__"):  # lmms-eval's filler for a shorter shard: its answer is dropped
                continue
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            groups[task, repr(sorted(gen_kwargs.items()))].append(i)
        for (task, _), indices in groups.items():
            for j in range(0, len(indices), self.batch_size):
                batch = indices[j:j + self.batch_size]
                t0 = time.perf_counter()
                texts, got = self.answer([requests[i].args for i in batch])
                seconds[task] += time.perf_counter() - t0
                for i, text in zip(batch, texts):
                    answers[i] = text
                rows[task] += got
        self.report_costs(rows, seconds)
        return answers

    def answer(self, args):
        """One batch of requests' (ctx, gen_kwargs, doc_to_visual, doc_id, task, split): their texts and rows."""
        gen_kwargs = dict(args[0][1])
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else until
        images = []
        for ctx, _, doc_to_visual, doc_id, task, split in args:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            if len(visuals) != 1:
                raise ValueError(f"{task}: LLaVA-1.5 takes one image per question, got {len(visuals)}")
            images.append(visuals[0])
        prompts = [ctx.replace("<image>", "").strip() for ctx, *_ in args]  # the template places the image
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        max_new, num_beams = int(gen_kwargs.get("max_new_tokens") or 1024), int(gen_kwargs.get("num_beams") or
                                                                                 self.num_beams)
        if num_beams > 1:
            out = beam.generate(self.llava, self.tok, images, prompts, max_new, num_beams, **self.options)
        else:
            out = generate.generate(self.llava, self.tok, images, prompts, max_new, **self.options,
                                    temperature=temperature if gen_kwargs.get("do_sample", temperature > 0) else 0.0,
                                    top_p=float(gen_kwargs.get("top_p") or 1.0))
        costs.add(out.rows, self.cfg)
        texts = []
        for row in out.rows:
            text = row["text"]
            for stop in until:
                text = text.split(stop)[0] if stop else text
            texts.append(text.strip())
        return texts, out.rows

    def report_costs(self, rows, seconds):
        """Each task's pruning costs over every rank's answers (ratios to none's), into lmms-eval's results file
        (results["throughput"], its model-metrics hook: numbers only, so the key names the method and protocol), into
        `.costs` and on stderr."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics
        keys = [key for c in costs.COSTS.values() for key in (c, f"{c}_none")]
        sums = {task: dict({key: sum(r[key] for r in task_rows) for key in keys}, answers=len(task_rows),
                           seconds=seconds[task], tokens=sum(len(r["token_ids"]) for r in task_rows),
                           kept=sum(sum(r["kept_visual"]) / len(r["kept_visual"]) for r in task_rows))
                for task, task_rows in rows.items()}
        every = [sums]
        # NOTE: without --use_cache every rank calls generate_until once per evaluation; lmms-eval's response cache
        # answers from disk without the model (no costs), and a rank with nothing left to run would leave this waiting
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            every = [None] * self.world_size
            dist.all_gather_object(every, sums)
        total = defaultdict(lambda: defaultdict(float))
        for rank_sums in every:
            for task, task_sums in rank_sums.items():
                for key, value in task_sums.items():
                    total[task][key] += value
        for task, s in total.items():
            self.costs[task] = c = dict({f"{b}_ratio": s[key] / s[f"{key}_none"] for b, key in costs.COSTS.items()},
                                        mean_kept_image_tokens=s["kept"] / s["answers"], answers=int(s["answers"]),
                                        method=self.method, **self.protocol)
            if self.rank != 0:
                continue
            name = f"{task} {self.method} conv={c['conv']} pad={str(c['pad']).lower()}"
            log_metrics(s["seconds"], int(s["tokens"]), s["tokens"] / max(s["seconds"], 1e-9),
                        dict({f"{name} {key}": c[key] for key in ("flops_ratio", "kv_ratio", "nocache_ratio",
                                                                  "mean_kept_image_tokens", "answers")},
                             total_requests=c["answers"]))
            print(f"dyrate {task}: {c['method']} | conv {c['conv']}, pad {c['pad']} | FLOPs {c['flops_ratio']:.3f} | "
                  f"mean KV {c['kv_ratio']:.3f} | no-cache FLOPs {c['nocache_ratio']:.3f} of none | image tokens kept "
                  f"{c['mean_kept_image_tokens']:.1f} | {c['answers']} answers", file=sys.stderr)

    def loglikelihood(self, requests):
        tasks = sorted({req.task_name or req.args[4] for req in requests})
        raise NotImplementedError(
            f"tools.lmms.DyRate generates answers; it does not score given continuations, which {', '.join(tasks)} "
            f"ask for (output_type loglikelihood or multiple_choice). The seed paper's benchmarks are generate_until "
            f"tasks: coco2017_cap_val, flickr30k_test, nocaps_val, gqa, vqav2_val, vizwiz_vqa_val, scienceqa_img, "
            f"pope, mmbench_en_dev, mme.")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("tools.lmms.DyRate answers single-turn questions (generate_until) only.")

    def clean(self):
        """lmms-eval calls this after each evaluation and would delete the model: keep it, so one instance serves
        several simple_evaluate calls."""
        gc.collect()
