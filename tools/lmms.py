"""
This implementation as an lmms-eval model, so that the field's own harness (lmms-eval 0.7) runs its tasks on
LLaVA-1.5 with any pruning method of dyrate.py. The one file that imports lmms-eval, an optional extra:

    pip install --no-deps -r requirements-lmms.txt
    python -m tools.lmms --model dyrate --tasks pope --batch_size 8 --output_path runs/lmms \
        --model_args model=llava-1.5-7b-hf,method=fastv,ratio=0.5,conv=vicuna_v1,pad=true   # lmms-eval's CLI

or from Python, an instance handed to lmms-eval's evaluator (no registration needed):

    from lmms_eval.evaluator import simple_evaluate
    simple_evaluate(model=DyRate(model="llava-1.5-7b-hf", method="dyrate", predictor="predictor"), tasks=["pope"])

Model args: everything generate.py takes (model, method, k, ratio, mass, predictor, conv, pad, dtype, device,
num_beams) and batch_size. generate_until runs generate() in batches of requests that share their generation
arguments, honouring each request's max_new_tokens, temperature, top_p, num_beams and `until` (the text is cut at the
first stop string). The pruning costs of each task (FLOPs, mean KV-cache and no-cache FLOPs ratios to none, image
tokens kept) are logged at the end and kept in `.costs`. loglikelihood is refused: see its message.
"""
import gc
import os
import sys
from collections import defaultdict
from dataclasses import fields

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

import cli
import dyrate
import generate
from tools import beam, costs, fast

MANIFEST = ModelManifest(model_id="dyrate", simple_class_path="tools.lmms.DyRate")


def flag(value):
    """A model_args value as lmms-eval passes it (a string) or as Python does."""
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


class DyRate(lmms):
    """LLaVA-1.5 (model.py) with a visual-token pruning method (dyrate.py), for lmms-eval's simple tasks."""
    is_simple = True

    def __init__(self, model=cli.SHAPES_MODEL, method="none", k=None, predictor=None, conv="vicuna_v1", pad=True,
                 dtype=None, device=None, batch_size=1, num_beams=1, **params):
        super().__init__()
        with cli.user_errors():  # the command line's errors: one line, before anything loads
            self._device = cli.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.cfg, self.tok = cli.checkpoint(model)
            rule_params = {key: value for key, value in params.items()  # e.g. method=fastv,ratio=0.75
                           if key in {f.name for f in fields(dyrate.RULES.get(method.split(":")[0], dyrate.Rule))}}
            spec = method + "".join(f":{key}={value}" for key, value in rule_params.items())
            self.options = dict(rule=cli.rule(spec, predictor, self.cfg, self._device), conv=conv, pad=flag(pad),
                                k=None if k is None else int(k), stats=False)
            self.method = spec
            self.batch_size_per_gpu, self.num_beams = int(batch_size), int(num_beams)
            self.llava = cli.load_model(model, self._device, cli.dtype(dtype, self._device))
            self.llava.cache_class = fast.FastKVCache  # as tools/eval.py: the same tokens, less work
        self.costs = {}  # task -> its pruning costs, after generate_until

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def generate_until(self, requests):
        """The answers to lmms-eval's generate_until requests, in their order."""
        answers, rows = [None] * len(requests), defaultdict(list)
        groups = defaultdict(list)  # requests that share their generation arguments share a batch
        for i, req in enumerate(requests):
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            groups[repr(sorted(gen_kwargs.items()))].append(i)
        for indices in groups.values():
            for j in range(0, len(indices), self.batch_size):
                batch = indices[j:j + self.batch_size]
                texts, got = self.answer([requests[i].args for i in batch])
                for i, text, row in zip(batch, texts, got):
                    answers[i] = text
                    rows[requests[i].args[4]].append(row)
        self.log_costs(rows)
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

    def log_costs(self, rows):
        """Each task's pruning costs over its answers, as ratios to none's, in `.costs` and on stderr."""
        for task, task_rows in rows.items():
            self.costs[task] = dict({f"{b}_ratio": costs.cost_ratio(task_rows, c) for b, c in costs.COSTS.items()},
                                    mean_kept_image_tokens=sum(sum(r["kept_visual"]) / len(r["kept_visual"])
                                                               for r in task_rows) / len(task_rows),
                                    answers=len(task_rows), method=self.method)
            c = self.costs[task]
            print(f"dyrate {task}: {c['method']} | FLOPs {c['flops_ratio']:.3f} | mean KV {c['kv_ratio']:.3f} | "
                  f"no-cache FLOPs {c['nocache_ratio']:.3f} of none | image tokens kept "
                  f"{c['mean_kept_image_tokens']:.1f} | {c['answers']} answers", file=sys.stderr)

    def loglikelihood(self, requests):
        tasks = sorted({req.task_name or req.args[4] for req in requests})
        raise NotImplementedError(
            f"tools.lmms.DyRate generates answers; it does not score given continuations, which {', '.join(tasks)} "
            f"ask for (output_type loglikelihood or multiple_choice). The seed paper's benchmarks are generate_until "
            f"tasks: coco2017_cap_val, flickr30k_test, nocaps_val, gqa, vizwiz_vqa_val, scienceqa_img, pope, "
            f"mmbench_en_dev, mme.")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("tools.lmms.DyRate answers single-turn questions (generate_until) only.")

    def clean(self):
        """lmms-eval calls this after each evaluation and would delete the model: keep it, so one instance serves
        several simple_evaluate calls."""
        gc.collect()


def register():
    """Make lmms-eval's command line and simple_evaluate(model="dyrate", model_args=...) find this model."""
    from lmms_eval.models import MODEL_REGISTRY_V2
    MODEL_REGISTRY_V2.register_manifest(MANIFEST, overwrite=True)


if __name__ == "__main__":  # lmms-eval's own command line, with this model registered as "dyrate"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    register()
    from lmms_eval.__main__ import cli_evaluate
    cli_evaluate()
