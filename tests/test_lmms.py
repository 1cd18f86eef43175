"""
lmms.py, the lmms-eval model: a local shapes task run through lmms-eval's own evaluator agrees with eval.py on the
same records; lmms-eval's command line finds the model through the installed entry point, exits 0 and writes the score
and the pruning costs into its results file; two ranks under torchrun give one process's answers, score and costs;
model args are checked before the weights load; the prompt protocol is the predictor's, else the papers'; each rank
takes its own GPU; loglikelihood is refused with the tasks that asked for it. Skipped without the optional extra
(requirements-lmms.txt); the command-line tests also need the editable install (its entry point).
"""
import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (pip install --no-deps -r "
                                        "requirements-lmms.txt)")

import generate  # noqa: E402
from tools import beam, eval, lmms  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SHAPES = os.path.join(HERE, "models", "shapes")
PREDICTOR = os.path.join(SHAPES, "predictor-0.33")  # records its protocol: llava-hf's template, no padding
ENTRY_POINT = any(ep.name == "dyrate" for ep in importlib.metadata.entry_points(group="lmms_eval.models"))
needs_entry_point = pytest.mark.skipif(not ENTRY_POINT, reason="lmms-eval finds the model through the package's entry "
                                                               "point: pip install --no-deps -e .")

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


def lmms_evals(task, *runs):
    """lmms-eval's own command line on the local task, as a researcher runs it, for each (out, model_args, launcher,
    limit) in runs, started at once (one thread each: the CI's two cores take two): for each, the process, and the
    results and the per-record samples it wrote (None where it wrote none)."""
    started = []
    for out, model_args, launcher, limit in runs:
        cmd = [sys.executable, *launcher, "-m", "lmms_eval", "--model", "dyrate", "--model_args", model_args, "--tasks",
               "dyrate_shapes_short", "--include_path", str(task / "tasks"), "--batch_size", "4", "--limit", str(limit),
               "--log_samples", "--output_path", str(out)]
        started.append((subprocess.Popen(cmd, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"), text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE), cmd, out))
    return [finished(process, cmd, out) for process, cmd, out in started]


def finished(process, cmd, out):
    stdout, stderr = process.communicate(timeout=600)
    run = subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
    found = [glob.glob(os.path.join(out, "**", pattern), recursive=True)
             for pattern in ("*_results.json", "*_samples_dyrate_shapes_short.jsonl")]
    if not all(len(paths) == 1 for paths in found):
        return run, None, None
    with open(found[1][0]) as f:
        samples = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    with open(found[0][0]) as f:
        return run, json.load(f), samples


def cost_keys(results, method, conv, pad):
    """The pruning costs in lmms-eval's results file (its model-metrics section), by name."""
    prefix = f"avg_dyrate_shapes_short {method} conv={conv} pad={pad} "
    return {key[len(prefix):]: value for key, value in results["throughput"].items() if key.startswith(prefix)}


@pytest.fixture(scope="module")
def cli_runs(task, tmp_path_factory):
    """lmms-eval's command lines, run side by side: DyRate with a learned predictor on 7 records, in one process and
    in two under torchrun; VisionZip on 3; and a mistyped model arg."""
    learned, torchrun = f"method=dyrate,predictor={PREDICTOR}", ("-m", "torch.distributed.run", "--nproc_per_node=2",
                                                                  "--standalone")
    runs = {"one": (learned, (), 7), "two": (learned, torchrun, 7),
            "visionzip": ("method=visionzip,dominant=40", (), 3), "mistyped": ("method=fastv,raito=0.875", (), 7)}
    done = lmms_evals(task, *[(tmp_path_factory.mktemp(name), *run) for name, run in runs.items()])
    return dict(zip(runs, done))


@pytest.fixture(scope="module")
def one_process(cli_runs):
    return cli_runs["one"]


@pytest.mark.slow
def test_lmms_eval_scores_a_local_task_as_eval_py_does(task, tmp_path, capsys):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(task / "tasks"), include_defaults=False)
    for method, extra in (("none", {}), ("fastv", dict(ratio="0.75")), ("visionzip", dict(dominant="40")),
                          ("pdrop", dict(lam="0.25"))):
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
        assert (costs["flops_ratio"] < 1) == (method != "none")
        assert (costs["method"], costs["conv"], costs["pad"]) == (lm.method, "llava-hf", False)
        assert f"dyrate dyrate_shapes_short: {lm.method}" in capsys.readouterr().err
        assert cost_keys(res, lm.method, "llava-hf", "false")["flops_ratio"] == costs["flops_ratio"]


@pytest.mark.slow
@needs_entry_point
def test_the_lmms_eval_command_finds_the_model_and_writes_the_score_and_the_costs(task, one_process):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    run, results, samples = one_process
    assert run.returncode == 0 and results is not None, run.stdout[-3000:] + run.stderr[-3000:]
    score = results["results"]["dyrate_shapes_short"]["exact_match,none"]
    assert len(samples) == 7 and score == sum(s["exact_match"] for s in samples) / 7
    # the costs in the results file are those the model computes in process on the same records (that test above ties
    # to eval.py's), under a key naming the method with every setting and the predictor's protocol
    lm = lmms.DyRate(model=SHAPES, method="dyrate", predictor=PREDICTOR, batch_size=4)
    simple_evaluate(model=lm, tasks=["dyrate_shapes_short"], limit=7, bootstrap_iters=0,
                    task_manager=TaskManager(include_path=str(task / "tasks"), include_defaults=False))
    written = cost_keys(results, f"dyrate:predictor={PREDICTOR}:k=2", "llava-hf", "false")
    costs = lm.costs["dyrate_shapes_short"]
    assert set(written) == {"flops_ratio", "kv_ratio", "nocache_ratio", "mean_kept_image_tokens", "answers"}
    assert all(abs(written[key] - costs[key]) < 1e-12 for key in written) and written["answers"] == 7, written
    assert 0 < written["flops_ratio"] < 1 and written["mean_kept_image_tokens"] < 256


@pytest.mark.slow
@needs_entry_point
def test_the_lmms_eval_command_runs_visionzip(cli_runs):
    """--model_args method=visionzip,dominant=40: VisionZip's 40 + 10 tokens before the language model, scored and
    costed like the other rules."""
    run, results, samples = cli_runs["visionzip"]
    assert run.returncode == 0 and results is not None, run.stdout[-3000:] + run.stderr[-3000:]
    written = cost_keys(results, "visionzip:dominant=40:contextual=10:k=2", "vicuna_v1", "true")  # the papers' protocol
    assert written["mean_kept_image_tokens"] == 50 and written["answers"] == 3 and written["flops_ratio"] < 0.5


@pytest.mark.slow
@needs_entry_point
def test_two_ranks_under_torchrun_give_one_process_answers_score_and_costs(cli_runs, one_process):
    # 7 records: rank 0 answers 4, rank 1 answers 3 and one filler request that lmms-eval drops (and the costs skip)
    two, results, samples = cli_runs["two"]
    assert two.returncode == 0 and results is not None, two.stdout[-3000:] + two.stderr[-3000:]
    _, one_results, one_samples = one_process
    assert [s["filtered_resps"] for s in samples] == [s["filtered_resps"] for s in one_samples]
    assert results["results"]["dyrate_shapes_short"] == one_results["results"]["dyrate_shapes_short"]
    written, alone = (cost_keys(r, f"dyrate:predictor={PREDICTOR}:k=2", "llava-hf", "false")
                      for r in (results, one_results))
    assert written.keys() == alone.keys() and all(abs(written[key] - alone[key]) < 1e-12 for key in written), written


@pytest.mark.slow
@needs_entry_point
def test_the_lmms_eval_command_fails_on_a_mistyped_model_arg_naming_the_valid_ones(cli_runs):
    run, results, _ = cli_runs["mistyped"]
    assert run.returncode == 1 and results is None
    assert ("unknown model arg 'raito': the valid ones are model, method, k, predictor, conv, pad, dtype, device, "
            "batch_size, num_beams, allow_protocol_mismatch, fastv's own ratio, and every rule's stages, lam.") \
        in run.stderr


def test_model_args_are_checked_before_the_weights_load(tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(SHAPES, name), tmp_path)  # the shapes model without its weights

    def error(model_args, batch_size="4"):  # as lmms-eval builds the model: --model_args and its --batch_size
        with pytest.raises(SystemExit) as e:
            lmms.DyRate.create_from_arg_string(f"model={tmp_path}," + model_args, dict(batch_size=batch_size))
        return str(e.value)
    assert "unknown model arg 'raito'" in error("method=fastv,raito=0.875")
    assert "'ratio': the valid ones are model, method, k," in error("method=mass,ratio=0.5")
    assert ", mass's own eps, and every rule's stages, lam." in error("method=mass,ratio=0.5")
    assert ", random's own ratio, seed, and" in error("method=random,sed=1")
    assert "(vtw has no parameters of its own), and every rule's stages, lam." in error("method=vtw,ratio=0.5")
    assert "choose one of none, fastv" in error("method=fastvv")
    assert "ratio given twice" in error("method=fastv:ratio=0.5,ratio=0.75")
    assert "FastV's drop ratio must lie in [0, 1], got 2.0" in error("method=fastv,ratio=2")
    assert "pad must be true or false, got 'flase'" in error("pad=flase")
    assert "allow_protocol_mismatch must be true or false, got 'yes'" in error("allow_protocol_mismatch=yes")
    assert "conv must be one of llava-hf, vicuna_v1, got 'vicuna'" in error("conv=vicuna")
    assert "dtype must be one of float32, bfloat16, float16, got 'fp16'" in error("dtype=fp16")
    assert "batch_size must be a whole number >= 1, got 'auto'" in error("method=none", batch_size="auto")
    assert "num_beams must be a whole number >= 1, got 0" in error("num_beams=0")
    assert "K must lie in [1, 11]" in error("k=12")
    assert "given both in --model_args and as lmms-eval's --batch_size" in error("batch_size=2")
    assert "--predictor is used by --method dyrate only" in error(f"method=fastv,predictor={PREDICTOR}")
    # right args pass every check: what stops them is the missing weights file, the first thing that loads weights
    assert "model.safetensors" in error("method=fastv,ratio=0.875,pad=true,k=2,dtype=float32,num_beams=2")


def test_the_protocol_is_the_predictors_else_the_papers_and_a_mismatch_is_refused_unless_allowed():
    lm = lmms.DyRate(model=SHAPES, method="fastv", ratio=0.5)
    assert lm.protocol == dict(conv="vicuna_v1", pad=True) and lm.method == "fastv:ratio=0.5:k=2"
    lm = lmms.DyRate(model=SHAPES, method="dyrate", predictor=PREDICTOR)
    assert lm.protocol == dict(conv="llava-hf", pad=False) and lm.method == f"dyrate:predictor={PREDICTOR}:k=2"
    with pytest.raises(SystemExit, match="trained with --conv llava-hf --no-pad, and this run asks for --conv "
                                         "vicuna_v1 --no-pad"):
        lmms.DyRate(model=SHAPES, method="dyrate", predictor=PREDICTOR, conv="vicuna_v1")
    lm = lmms.DyRate(model=SHAPES, method="dyrate", predictor=PREDICTOR, conv="vicuna_v1", allow_protocol_mismatch=True)
    assert lm.protocol == dict(conv="vicuna_v1", pad=False)
    image = os.path.join(HERE, "assets", "examples", "1.png")  # what the model passes on runs, greedy and beams
    for out in (generate.generate(lm.llava, lm.tok, [image], ["What is in the image?"], 2, **lm.options),
                beam.generate(lm.llava, lm.tok, [image], ["What is in the image?"], 2, 2, **lm.options)):
        assert out.rows[0]["settings"] == lm.method


def test_each_rank_loads_on_its_own_gpu_and_knows_its_rank(monkeypatch):
    assert lmms.rank_device(None, 3, cuda=True) == "cuda:3"  # torchrun's LOCAL_RANK=3
    assert lmms.rank_device("cuda", 3, cuda=True) == "cuda:3"
    assert lmms.rank_device("cuda:0", 3, cuda=True) == "cuda:0"  # a device given in full is taken as given
    assert lmms.rank_device(None, 3, cuda=False) == lmms.rank_device("cpu", 3, cuda=True) == "cpu"
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    lm = lmms.DyRate(model=SHAPES, device="cpu")
    assert (lm.rank, lm.world_size, lm.device.type) == (1, 2, "cpu")


def test_loglikelihood_is_refused_naming_the_tasks():
    from lmms_eval.api.instance import Instance
    lm = lmms.DyRate(model=SHAPES)
    request = Instance(request_type="loglikelihood", arguments=("ctx", "target", None, 0, "seedbench_ppl", "test"),
                       idx=0, metadata={"task": "seedbench_ppl", "doc_id": 0, "repeats": 1, "split": "test"})
    with pytest.raises(NotImplementedError, match="seedbench_ppl"):
        lm.loglikelihood([request])
    with pytest.raises(SystemExit, match="needs --predictor"):
        lmms.DyRate(model=SHAPES, method="dyrate")


@needs_entry_point
def test_the_installed_entry_point_registers_the_model_by_name():
    from lmms_eval.models import MODEL_REGISTRY_V2
    assert MODEL_REGISTRY_V2.get_model_class("dyrate") is lmms.DyRate
