"""
Tests of eval.py: its caption scores against pycocoevalcap's scorers, each question metric on hand-made cases, an
interrupted run resumed exactly, bad records skipped and counted, clear errors, and the shapes stand-in end to end.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import generate
import model
import processing
from conftest import assert_close
from tools import eval

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SHAPES = os.path.join(HERE, "models", "shapes")


def test_caption_scores_equal_pycocoevalcap():
    """Pre-tokenised text (no Java): eval.py's CIDEr-D and BLEU-4 are pycocoevalcap's, and a caption identical to its
    references scores higher than the same words shuffled."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    refs = {"1": ["a red circle at the top left", "a red circle in the corner", "one red circle top left"],
            "2": ["two blue squares", "a pair of blue squares side by side", "blue squares two of them"],
            "3": ["a green triangle above a yellow circle", "green triangle over a yellow circle"]}
    preds = {"1": "a red circle at the top left", "2": "two squares that are blue", "3": "a triangle and a circle"}
    got = eval.caption_scores(refs, preds, tokenize=False)
    gts, res = {k: refs[k] for k in preds}, {k: [v] for k, v in preds.items()}
    assert abs(got["cider"] - Cider().compute_score(gts, res)[0]) <= 1e-9
    assert abs(got["bleu4"] - Bleu(4).compute_score(gts, res, verbose=0)[0][3]) <= 1e-9
    shuffled = dict(preds, **{"1": "left top the at circle red a"})
    worse = eval.caption_scores(refs, shuffled, tokenize=False)
    assert worse["cider"] < got["cider"] and worse["bleu4"] < got["bleu4"]


def test_without_java_a_fallback_tokenisation_and_a_warning(monkeypatch, capsys):
    monkeypatch.setattr(eval.shutil, "which", lambda name: None)
    got = eval.tokenize_captions({"1": ["A Red circle, at the top-left."]})
    assert got == {"1": ["a red circle at the top left"]}
    assert "not comparable with published numbers" in capsys.readouterr().err


def test_question_metrics_on_known_cases():
    assert eval.normalize_answer("  Two dogs.") == "2 dogs" and eval.normalize_answer("The Cat!") == "cat"
    assert eval.normalize_answer("3.5") == "3.5" and eval.normalize_answer("dont know") == "don't know"
    refs = ["yes"] * 3 + ["no"] * 7  # 10 annotators
    assert eval.vqa_accuracy("yes", refs) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)  # min(1, matches of 9 / 3)
    assert eval.vqa_accuracy("No.", refs) == 1.0 and eval.vqa_accuracy("maybe", refs) == 0.0
    short = eval.question_scores("short", {"a": "A red circle.", "b": "blue"}, {"a": ["red circle"], "b": ["green"]})
    assert short == dict(accuracy=0.5)
    pope = eval.question_scores("yesno", {"1": "Yes, there is.", "2": "No.", "3": "There is not a cat.", "4": "yes"},
                             {"1": ["yes"], "2": ["yes"], "3": ["no"], "4": ["no"]})
    # said yes, no, no, yes against yes, yes, no, no: tp 1, fp 1, fn 1
    assert pope == dict(accuracy=0.5, precision=0.5, recall=0.5, f1=pytest.approx(0.5), yes_ratio=0.5)
    assert eval.question_scores("choice", {"1": "B", "2": "The answer is (C).", "3": "A. red"},
                             {"1": ["B"], "2": ["D"], "3": ["A"]}) == dict(accuracy=pytest.approx(2 / 3))


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    from shapes import data
    folder = tmp_path_factory.mktemp("shapes")
    data.main(["--out", str(folder), "--train", "1", "--val", "1", "--test", "6"])
    return folder


def run(shapes_data, out, *extra):
    return eval.main(["--model", SHAPES, "--captions", str(shapes_data / "test_captions.json"), "--images",
                   str(shapes_data), "--out", str(out), "--batch-size", "2", *extra])


def predictions(out, method="none"):
    with open(os.path.join(out, f"predictions-{method}.jsonl")) as f:
        return [(p["id"], p.get("prediction"), p.get("skipped")) for p in map(json.loads, f)]


def test_interrupted_run_resumes_exactly(shapes_data, tmp_path, monkeypatch):
    run(shapes_data, tmp_path / "straight")
    real, calls = generate.generate, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(eval.generate, "generate", interrupted)
    with pytest.raises(SystemExit, match="rerun with --resume"):
        run(shapes_data, tmp_path / "cut")
    assert len(predictions(tmp_path / "cut")) == 2  # the first batch is on disk
    monkeypatch.setattr(eval.generate, "generate", real)
    with pytest.raises(SystemExit, match="exists: pass --resume"):
        run(shapes_data, tmp_path / "cut")
    with open(tmp_path / "cut" / "predictions-none.jsonl", "a") as f:
        f.write('{"id": 4, "predic')  # a line cut off by a kill
    result = run(shapes_data, tmp_path / "cut", "--resume")[0]
    assert predictions(tmp_path / "cut") == predictions(tmp_path / "straight") and result["records"] == 6
    assert json.loads((tmp_path / "cut" / "metrics-none.json").read_text())["cider"] == \
        json.loads((tmp_path / "straight" / "metrics-none.json").read_text())["cider"]


def test_bad_records_are_skipped_and_counted(shapes_data, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    lines = [json.dumps(dict(image="test/00000.png", question="How many shapes are there?", answers=["one"])),
             json.dumps(dict(image="gone.png", question="How many shapes are there?", answers=["one"])),
             json.dumps(dict(image="test/00001.png", question=" ", answers=["one"])), "{broken",
             json.dumps(dict(image="test/00002.png", question="How many shapes are there?")),
             json.dumps(dict(image=str(tmp_path / "notes.png"), question="How many shapes are there?",
                             answers=["one"]))]
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    result = eval.main(["--model", SHAPES, "--questions", str(tmp_path / "q.jsonl"), "--task", "short", "--suffix", "",
                     "--images", str(shapes_data), "--out", str(tmp_path / "o")])[0]
    assert result["records"] == 1 and result["skipped"] == {"image not found": 1, "empty question": 1,
                                                            "not a JSON object": 1, "no reference answers": 1,
                                                            "unreadable image": 1}


def test_clear_errors(shapes_data, tmp_path):
    for extra, message in ((["--captions", str(tmp_path / "none.json"), "--images", str(shapes_data)], "none.json"),
                           (["--captions", str(shapes_data / "test_captions.json"), "--images", str(tmp_path / "x")],
                            "--images .*x' is not a folder"),
                           (["--questions", str(shapes_data / "test_questions.jsonl"), "--images", str(shapes_data)],
                            "needs --task"),
                           (["--captions", str(shapes_data / "test.jsonl"), "--images", str(shapes_data)], "JSON"),
                           (["--captions", str(shapes_data / "test_captions.json"), "--images", str(shapes_data),
                             "--methods", "dyrate"], "needs --predictor")):
        with pytest.raises(SystemExit, match=message):
            eval.main(["--model", SHAPES, "--out", str(tmp_path / "o"), *extra])


def test_shapes_stand_in_end_to_end(shapes_data, tmp_path, capsys, placement):
    """The README's eval commands on a handful of records: captions (CIDEr) and questions (accuracy) for several
    methods, each at its own settings (VTW at its paper's layer, and at the layer matched to FastV's FLOPs), named in
    the table and the metrics with the prompt protocol, and the files."""
    where = ["--device", placement[0], "--dtype", str(placement[1]).removeprefix("torch.")]
    results = run(shapes_data, tmp_path / "c", "--methods", "none,vtw,fastv:ratio=0.75,vtw:k=match", *where)
    by = {r["method"]: r for r in results}
    assert [r["settings"] for r in results] == ["none", "vtw:k=6", "fastv:ratio=0.75:k=2", "vtw:k=4"]
    assert by["none"]["cider"] > by["vtw:k=match"]["cider"] and by["vtw"]["flops_ratio"] < 1
    assert by["fastv:ratio=0.75"]["mean_kept_image_tokens"] == 64 and by["none"]["flops_ratio"] == 1.0
    gaps = {k: abs(r - by["fastv:ratio=0.75"]["flops_ratio"]) for k, r in ((6, by["vtw"]["flops_ratio"]),
                                                                         (4, by["vtw:k=match"]["flops_ratio"]))}
    assert gaps[4] < gaps[6]  # the matched layer is the nearer in FLOPs
    out = capsys.readouterr().out
    assert "protocol: --conv llava-hf --no-pad" in out and "fastv:ratio=0.75:k=2" in out.splitlines()[-2]
    metrics = json.loads((tmp_path / "c" / "metrics-vtw.json").read_text())
    assert metrics["settings"] == "vtw:k=6" and metrics["protocol"] == dict(conv="llava-hf", pad=False)
    coco = json.loads((tmp_path / "c" / "results-none.json").read_text())
    assert len(coco) == 6 and set(coco[0]) == {"image_id", "caption"}
    q = eval.main(["--model", SHAPES, "--questions", str(shapes_data / "test_questions.jsonl"), "--task", "short",
                "--suffix", "", "--images", str(shapes_data), "--out", str(tmp_path / "q"), "--limit", "8",
                "--methods", "none,vtw", *where])
    assert q[0]["records"] == 8 and q[0]["accuracy"] >= q[1]["accuracy"]


def test_a_predictor_is_evaluated_under_its_own_protocol(shapes_data, tmp_path):
    """The shipped predictors were trained with llava-hf's template, unpadded: eval.py uses it unasked, refuses
    --original (vicuna_v1, padded) naming both, and runs it with --allow-protocol-mismatch."""
    predictor = ["--methods", "none,dyrate", "--predictor", os.path.join(SHAPES, "predictor-kv-0.3"), "--limit", "2"]
    result = run(shapes_data, tmp_path / "own", *predictor)
    assert [r["protocol"] for r in result] == [dict(conv="llava-hf", pad=False)] * 2
    with pytest.raises(SystemExit, match="trained with --conv llava-hf --no-pad, and this run asks for --conv "
                                         "vicuna_v1 --pad"):
        run(shapes_data, tmp_path / "other", *predictor, "--original")
    result = run(shapes_data, tmp_path / "other", *predictor, "--original", "--allow-protocol-mismatch")
    assert result[1]["protocol"] == dict(conv="vicuna_v1", pad=True) and result[1]["records"] == 2
    with pytest.raises(SystemExit, match="only vtw takes k=match, after"):
        run(shapes_data, tmp_path / "m", "--methods", "vtw:k=match,none")


# ----------------------------------------------------------------------------------------------------------------------
# torchrun: shards per rank, merged by rank 0, resumable whatever the number of ranks; Figure 2 on any model


def torchrun(args, ranks=2):
    """eval.py under torchrun on the CPU (gloo), a process per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone", "-m",
            "tools.eval",
            *args], env


def same_predictions(a, b):
    """The predictions files of two runs, without what depends on how they were batched (timings, batch size)."""
    def lines(out):
        return [{k: v for k, v in json.loads(line).items() if k not in ("prefill_ms", "decode_ms_per_token", "batch")}
                for line in open(os.path.join(out, "predictions-fastv:ratio=0.75.jsonl"))]
    return lines(a) == lines(b)


@pytest.mark.slow
def test_two_ranks_give_one_process_predictions_and_metrics_and_resume_with_one(shapes_data, tmp_path):
    common = ["--model", SHAPES, "--captions", str(shapes_data / "test_captions.json"), "--images", str(shapes_data),
              "--methods", "fastv:ratio=0.75", "--batch-size", "1", "--device", "cpu"]
    eval.main(common + ["--out", str(tmp_path / "one")])
    cmd, env = torchrun(common + ["--out", str(tmp_path / "two")])
    run = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert same_predictions(tmp_path / "one", tmp_path / "two")
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))  # the shards merged away
    metrics = [json.loads((tmp_path / d / "metrics-fastv:ratio=0.75.json").read_text()) for d in ("one", "two")]
    timing = ("prefill_ms", "decode_ms_per_token", "tokens_per_s")
    assert [{k: v for k, v in m.items() if k not in timing} for m in metrics][0] == \
        [{k: v for k, v in m.items() if k not in timing} for m in metrics][1]
    # a 2-rank run stopped after its first predictions, resumed by one process: the same predictions again
    cmd, env = torchrun(common + ["--out", str(tmp_path / "cut")])
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        shards = [f for f in os.listdir(tmp_path / "cut")] if os.path.isdir(tmp_path / "cut") else []
        if any(os.path.getsize(tmp_path / "cut" / f) for f in shards if f.endswith(".jsonl")):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    proc.wait(timeout=120)
    cut = eval.read_done(str(tmp_path / "cut"), "fastv:ratio=0.75")
    assert 1 <= len(cut) < 6 or proc.returncode == 0
    eval.main(common + ["--out", str(tmp_path / "cut"), "--resume"])
    assert same_predictions(tmp_path / "one", tmp_path / "cut")


def test_figure2_on_any_model_equals_the_shapes_experiments(shapes_data, tmp_path):
    """eval.py --figure2 on the detailed descriptions: the shapes experiment's Figure 2 numbers and plot."""
    from shapes import experiment
    result = eval.main(["--model", SHAPES, "--questions", str(shapes_data / "test_details.jsonl"), "--task", "short",
                        "--suffix", "", "--images", str(shapes_data), "--figure2", "--max-new-tokens", "64",
                        "--out", str(tmp_path / "f")])[0]["figure2"]
    llava = model.Llava.from_pretrained(SHAPES)
    tok = processing.Tokenizer(SHAPES, llava.config)
    records = experiment.task_records(str(shapes_data / "test.jsonl"))["detail"]
    os.makedirs(tmp_path / "e")
    ref = experiment.figure2(llava, tok, records, str(tmp_path / "e"), lambda msg: None)
    assert result["answers"] == ref["answers"] == 6
    for key in ("first_third", "last_third"):
        assert abs(result[key] - ref[key]) < 1e-5, key
    assert_close(torch.tensor(result["by_position"]), torch.tensor(ref["by_position"]), 1e-5, "by position")
    assert json.loads((tmp_path / "f" / "figure2.json").read_text())["answers"] == 6
    assert (tmp_path / "f" / "figure2.png").stat().st_size > 1000
