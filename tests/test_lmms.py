"""
lmms.py, the lmms-eval model: a local shapes task run through lmms-eval's own evaluator agrees with eval.py on
the same records, each task's pruning costs are logged, loglikelihood is refused with the tasks that asked for it, and
the model is found by name once registered. Skipped without the optional extra (requirements-lmms.txt).
"""
import json
import os

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (pip install --no-deps -r "
                                        "requirements-lmms.txt)")

from tools import eval, lmms  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SHAPES = os.path.join(HERE, "models", "shapes")

TASK = """task: dyrate_shapes_short
dataset_path: json
dataset_kwargs:
  data_files:
    test: questions.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

UTILS = f"""import sys
sys.path.insert(0, {HERE!r})
from PIL import Image
from tools import eval


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):  # eval.py's exact match (--task short)
    return {{"exact_match": float(eval.normalize_answer(results[0]) == eval.normalize_answer(doc["answer"]))}}
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A local lmms-eval task of 8 shapes short questions, and the same records as an eval.py questions file."""
    from shapes import data
    folder = tmp_path_factory.mktemp("lmms")
    data.main(["--out", str(folder / "data"), "--train", "1", "--val", "1", "--test", "3"])
    rows = [json.loads(line) for line in open(folder / "data" / "test_questions.jsonl")][:8]
    os.makedirs(folder / "tasks" / "dyrate_shapes_short")
    with open(folder / "tasks" / "dyrate_shapes_short" / "questions.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(dict(image=str(folder / "data" / r["image"]), question=r["question"],
                                    answer=r["answers"][0])) + "\n")
    (folder / "tasks" / "dyrate_shapes_short" / "dyrate_shapes_short.yaml").write_text(TASK)
    (folder / "tasks" / "dyrate_shapes_short" / "utils.py").write_text(UTILS)
    with open(folder / "questions.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return folder


@pytest.mark.slow
def test_lmms_eval_scores_a_local_task_as_eval_py_does(task, tmp_path, capsys):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(task / "tasks"), include_defaults=False)
    for method, extra in (("none", {}), ("fastv", dict(ratio="0.75"))):
        lm = lmms.DyRate(model=SHAPES, method=method, conv="llava-hf", pad="false", batch_size="4", **extra)
        res = simple_evaluate(model=lm, tasks=["dyrate_shapes_short"], task_manager=manager, bootstrap_iters=0,
                              log_samples=True)
        ours = eval.main(["--model", SHAPES, "--questions", str(task / "questions.jsonl"), "--task", "short",
                          "--suffix", "", "--images", str(task / "data"), "--methods", lm.method,
                          "--out", str(tmp_path / method)])[0]
        harness = res["results"]["dyrate_shapes_short"]["exact_match,none"]
        assert harness == ours["accuracy"] and ours["records"] == 8, (method, harness, ours["accuracy"])
        answers = [s["filtered_resps"][0] for s in sorted(res["samples"]["dyrate_shapes_short"],
                                                          key=lambda s: s["doc_id"])]
        with open(tmp_path / method / f"predictions-{lm.method}.jsonl") as f:
            assert answers == [json.loads(line)["prediction"] for line in f]
        costs = lm.costs["dyrate_shapes_short"]
        assert costs["answers"] == 8 and abs(costs["flops_ratio"] - ours["flops_ratio"]) < 1e-12
        assert (costs["flops_ratio"] < 1) == (method == "fastv")
        assert f"dyrate dyrate_shapes_short: {lm.method}" in capsys.readouterr().err


@pytest.mark.slow
def test_loglikelihood_is_refused_naming_the_tasks_and_the_model_is_found_by_name():
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import MODEL_REGISTRY_V2
    lm = lmms.DyRate(model=SHAPES)
    request = Instance(request_type="loglikelihood", arguments=("ctx", "target", None, 0, "seedbench_ppl", "test"),
                       idx=0, metadata={"task": "seedbench_ppl", "doc_id": 0, "repeats": 1, "split": "test"})
    with pytest.raises(NotImplementedError, match="seedbench_ppl"):
        lm.loglikelihood([request])
    lmms.register()
    assert MODEL_REGISTRY_V2.get_model_class("dyrate", force_simple=True) is lmms.DyRate
    with pytest.raises(SystemExit, match="needs --predictor"):
        lmms.DyRate(model=SHAPES, method="dyrate")
