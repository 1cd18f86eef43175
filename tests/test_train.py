"""
Tests of train.py and tools/distill.py on a tiny random LLaVA (conftest.py): data reading and skipping, the
self-distilled answers' cache, --max-samples' subset (tokenised only when used) and --max-answer-tokens, the loss and
the FLOPs ratio moving toward the target, checkpoint round trip, exact resume after Ctrl-C, the resume check (options,
WORLD_SIZE), the predictor in generate.py, and two-process torchruns (one with a failure on rank 1). CPU, a few minutes
with the slow ones (-m "not slow" leaves out the torchruns).
"""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import cli
import dyrate
import generate
import model
import processing
import train
from conftest import TOLERANCE, assert_close, random_image
from test_dyrate import K, N_IMAGE
from tools import distill

N_TRAIN = 24

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def distill_argv(ckpt, folder, *extra):
    return ["--model", ckpt[0], "--data", str(folder / "train.jsonl"), "--max-new-tokens", "8", "--device", "cpu",
            *extra]


@pytest.fixture(scope="session")
def data(ckpt, tmp_path_factory):
    """24 usable records (every third with an answer, the rest self-distilled by tools.distill) and eight bad ones."""
    folder = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(N_TRAIN):
        random_image(200 + i, (96 + 4 * i, 112)).save(folder / f"img{i}.png")
        row = {"image": f"img{i}.png", "prompt": ["Describe the picture.", "How many shapes are there?"][i % 2]}
        if i % 3 == 0:
            row["answer"] = "A red circle and a blue square."
        rows.append(json.dumps(row))
    (folder / "notes.png").write_text("not an image")
    rows += [json.dumps({"image": "gone.png", "prompt": "Hi"}), json.dumps({"image": "img0.png", "prompt": "  "}),
             json.dumps({"image": "notes.png", "prompt": "Hi"}), "{broken",
             json.dumps({"image": "img1.png", "prompt": "word " * 600}), json.dumps({"image": None, "prompt": "Hi"}),
             json.dumps({"image": "img2.png", "prompt": "Hi", "answer": 7}), json.dumps({"image": "img3.png",
                                                                                         "prompt": ["Hi"]})]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    distill.main(distill_argv(ckpt, folder))
    return folder


def argv(ckpt, data, out, *extra):
    return ["--model", ckpt[0], "--data", str(data / "train.jsonl"), "--out", str(out), "--batch-size", "4",
            "--val-size", "6", "--distill-max-new-tokens", "8", "--eval-max-new-tokens", "8", "--log-interval", "1",
            "--eval-interval", "1000", "--device", "cpu", "--target", "0.78", *extra]


def no_load(*a, **kw):
    raise AssertionError("the model was loaded before the options were checked")


def test_records_are_read_skipped_and_distilled_once(ckpt, ours, data, tmp_path, monkeypatch, capsys):
    llava, tok = ours
    args = train.parse_args(argv(ckpt, data, data / "p"))
    samples, skipped = train.load_samples(str(data / "train.jsonl"), llava.config, tok, args, print)
    assert len(samples) == N_TRAIN
    assert skipped == {"image not found": 1, "empty prompt": 1, "bad JSON line": 1, "longer than the context (512)": 1,
                       "unreadable image": 1, "no image path": 1, "answer is not text": 1, "prompt is not text": 1}
    assert all(s.answer and (i % 3 == 0 or len(s.answer) <= 8) for i, s in enumerate(samples))
    answered = samples[0]  # img0 carries its own answer: tokenised, EOS appended
    assert answered.answer == tok.tok.encode("A red circle and a blue square.", add_special_tokens=False).ids + [2]
    cache = train.read_answers(str(data / "train.jsonl"))
    assert len(cache) == N_TRAIN - N_TRAIN // 3 + 2  # the distilled answers, the image that did not decode, the record
    assert sorted(v for v in cache.values() if isinstance(v, str)) == [  # longer than the context: why, recorded
        "longer than the context (512)", "unreadable image"]
    first = generate.generate(llava, tok, [samples[1].image], [samples[1].prompt],
                              max_new_tokens=8).rows[0]["token_ids"]
    assert samples[1].answer == first  # the unpruned model's own greedy answer
    capsys.readouterr()
    distill.main(distill_argv(ckpt, data))  # a rerun distils nothing
    assert "distilled" not in capsys.readouterr().out and train.read_answers(str(data / "train.jsonl")) == cache
    again, _ = train.load_samples(str(data / "train.jsonl"), llava.config, tok, args, print)
    assert [s.answer for s in again] == [s.answer for s in samples]
    # without the answers, train.py stops before the weights load and names the command that distils them
    shutil.copytree(data, tmp_path / "raw", ignore=shutil.ignore_patterns("*.answers*"))
    monkeypatch.setattr(model.Llava, "from_pretrained", no_load)
    command = rf"`python -m tools.distill --model {re.escape(ckpt[0])} --data .*raw.* --max-new-tokens 8`"
    with pytest.raises(SystemExit, match=rf"{N_TRAIN - N_TRAIN // 3 + 2} record\(s\) have no answer.*{command}"):
        train.main(argv(ckpt, tmp_path / "raw", tmp_path / "p"))


def test_llava_conversation_json(tmp_path):
    random_image(0).save(tmp_path / "a.jpg")
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "1", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Two shapes."},
        {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]}]))
    records, skipped = train.read_records(str(tmp_path / "llava.json"))
    assert records == [(str(tmp_path / "a.jpg"), "What is shown?", "Two shapes.")] and not skipped


def test_training_moves_flops_to_target_and_loss_down(ckpt, data, tmp_path, capsys):
    predictor, held_out = train.main(argv(ckpt, data, tmp_path / "p", "--max-iters", "40"))
    log = capsys.readouterr().out
    steps = [line for line in log.splitlines() if line.startswith("step ")]
    losses = [float(line.split("loss ")[1].split()[0]) for line in steps]
    ratios = [float(line.split("FLOPs ratio ")[1].split()[0]) for line in steps]
    assert len(steps) == 40
    assert sum(losses[-10:]) < sum(losses[:10])
    assert abs(sum(ratios[-10:]) / 10 - 0.78) < abs(sum(ratios[:10]) / 10 - 0.78)
    assert abs(held_out["flops_ratio"] - 0.78) < 0.03  # held out, hard decisions, real inference path


def test_state_round_trip(tmp_path):
    predictor = dyrate.RatePredictor(4, [0.0, 0.5, 1.0])
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(3)
    predictor(torch.rand(2, 4, 4)).sum().backward()
    optimizer.step()
    torch.rand(5, generator=generator)
    args = train.parse_args(["--model", "m", "--data", "d", "--out", "o"])
    train.write_state(str(tmp_path / "s"), train.capture(7, {"agreement": 0.5}, predictor, optimizer, generator, args))
    p2, g2 = dyrate.RatePredictor(4, [0.0, 0.5, 1.0]), torch.Generator()
    o2 = torch.optim.AdamW(p2.parameters(), lr=0.1)
    meta = train.restore(train.read_state(str(tmp_path / "s")), p2, o2, g2)
    assert meta["iter"] == 7 and meta["held_out"] == {"agreement": 0.5}
    assert all(torch.equal(a, b) for a, b in zip(predictor.state_dict().values(), p2.state_dict().values()))
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(optimizer.state_dict()["state"][0][key], o2.state_dict()["state"][0][key])
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=g2))


@pytest.mark.parametrize("when,signal_name", [("before", None), ("after", None), ("after", "SIGTERM")])
def test_interrupt_saves_and_resume_is_exact(ckpt, data, tmp_path, monkeypatch, when, signal_name):
    """Ctrl-C (or SIGTERM, what cluster schedulers send) before a step's loss or after it drew the step's Gumbel
    noise: the state of the last step boundary is saved, and --resume gives the uninterrupted run's predictor."""
    straight, _ = train.main(argv(ckpt, data, tmp_path / "a", "--max-iters", "6"))
    real, calls = train.train_step, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 4 and when == "before":
            raise KeyboardInterrupt
        out = real(*a, **kw)
        if len(calls) == 4:  # the noise of step 4 is drawn
            if signal_name:
                os.kill(os.getpid(), getattr(signal, signal_name))
            else:
                raise KeyboardInterrupt
        return out
    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(SystemExit) as stop:
        train.main(argv(ckpt, data, tmp_path / "b", "--max-iters", "6"))
    assert stop.value.code == (143 if signal_name else 130)
    assert os.path.isfile(tmp_path / "b.state") and os.path.isfile(tmp_path / "b")
    monkeypatch.setattr(train, "train_step", real)
    resumed, _ = train.main(argv(ckpt, data, tmp_path / "b", "--max-iters", "6", "--resume"))
    assert torch.equal(straight.linear.weight, resumed.linear.weight)
    assert torch.equal(straight.linear.bias, resumed.linear.bias)


def test_resume_refuses_other_options_and_nothing_to_train(ckpt, data, tmp_path, monkeypatch, capsys):
    train.main(argv(ckpt, data, tmp_path / "p", "--max-iters", "2"))
    for extra, named in ((["--k", "3"], "--k 3"), (["--rates", "0,0.5,1"], "--rates '0,0.5,1'"),
                         (["--target", "0.9"], "--target 0.9"), (["--max-samples", "20"], "--max-samples 20"),
                         (["--dtype", "bfloat16"], "--dtype 'bfloat16' (the state has 'float32')")):
        with pytest.raises(SystemExit, match=f"error: --resume with other options.*{re.escape(named)}"):
            train.main(argv(ckpt, data, tmp_path / "p", "--max-iters", "2", "--resume", *extra))
    with monkeypatch.context() as m:  # as under torchrun with two processes (refused before the process group forms)
        m.setattr(cli, "distributed", lambda device: (0, 2, device))
        with pytest.raises(SystemExit, match=r"--resume with other options.*WORLD_SIZE 2 \(the state has 1\)"):
            train.main(argv(ckpt, data, tmp_path / "p", "--max-iters", "2", "--resume"))
    capsys.readouterr()
    train.main(argv(ckpt, data, tmp_path / "p", "--max-iters", "2", "--resume"))
    out = capsys.readouterr().out
    assert "already at step 2 of 2: nothing to train" in out and "predictor written" not in out


def failure(args, capsys):
    """What train.py says when it refuses its options: main()'s error, or argparse's (on stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(args)
    return f"{stop.value.code} {capsys.readouterr().err}"


def test_bad_options_fail_before_the_model_loads(ckpt, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(model.Llava, "from_pretrained", no_load)
    for extra, message in ((["--max-iters", "0"], "--max-iters: must be a whole number >= 1, got 0.*tools.compare"),
                           (["--rates", "1:0"], "--rates: '1:0'"), (["--rates", "0,1,0.5"], "--rates: .*increasing"),
                           (["--target", "0"], r"--target: must be a number in \(0, 1\]"),
                           (["--lr", "nan"], "--lr: must be a number > 0, got nan"),
                           (["--device", "cuda:7"], "--device cuda:7"), (["--resume"], "no training state"),
                           (["--dtype", "float16"], "--dtype float16 does not train.*no loss scaling.*bfloat16"),
                           (["--max-samples", "0"], "--max-samples: must be a whole number >= 1")):
        assert re.search(message, failure(argv(ckpt, data, tmp_path / "p", *extra), capsys)), extra
    for out, message in ((tmp_path / "missing" / "p", "does not exist; create it first"), (tmp_path, "is a folder")):
        with pytest.raises(SystemExit, match=message):
            train.main(argv(ckpt, data, out))
    with pytest.raises(SystemExit, match="--data .* does not exist"):
        train.main(["--model", ckpt[0], "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "p")])
    assert not os.path.exists(tmp_path / "p")
    assert [train.training_dtype(None, torch.device(d)) for d in ("cpu", "cuda")] == ["float32", "bfloat16"]


def test_small_data_gets_a_proportional_held_out_split(ckpt, data, tmp_path, capsys):
    lines = [line for line in (data / "train.jsonl").read_text().splitlines() if '"answer": "' in line][:6]
    (data / "six.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--model", ckpt[0], "--data", str(data / "six.jsonl"), "--out", str(tmp_path / "p"), "--max-iters", "1",
            "--batch-size", "2", "--distill-max-new-tokens", "8", "--eval-max-new-tokens", "4", "--target", "0.9"]
    train.main(args)
    assert "only 6 samples: holding out 1 of them" in capsys.readouterr().out
    (data / "one.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(SystemExit, match="1 usable sample"):
        train.main([a if a != str(data / "six.jsonl") else str(data / "one.jsonl") for a in args])


def test_predictor_file_works_in_generate_and_mismatch_is_refused(ckpt, data, tmp_path, capsys):
    train.main(argv(ckpt, data, tmp_path / "p", "--max-iters", "3"))
    image = tmp_path / "x.png"
    random_image(1).save(image)
    capsys.readouterr()
    generate.main(["--image", str(image), "--model", ckpt[0], "--method", "dyrate", "--predictor", str(tmp_path / "p"),
            "--json", "--max-new-tokens", "4"])
    got = json.loads(capsys.readouterr().out)
    assert got["rule"] == "dyrate" and len(got["rates"]) == len(got["token_ids"])
    assert all(r in [i / 8 for i in range(9)] for r in got["rates"])
    with pytest.raises(ValueError, match="trained for a different model"):
        dyrate.RatePredictor.load(tmp_path / "p", model.LlavaConfig())
    with pytest.raises(SystemExit, match="out of reach"):
        train.main(argv(ckpt, data, tmp_path / "q", "--max-iters", "1", "--target", "0.3"))


def test_a_predictor_trained_under_one_template_is_refused_under_the_other(ckpt, data, tmp_path, capsys):
    """Trained with vicuna_v1 and padding (the papers' evaluation protocol), the predictor records them: generate.py and
    tools.eval use them unasked, refuse llava-hf's template naming both, and run it with --allow-protocol-mismatch."""
    answered = [line for line in (data / "train.jsonl").read_text().splitlines() if '"answer": "' in line]
    (data / "answered.jsonl").write_text("\n".join(answered) + "\n")  # no distilled answers needed
    options = argv(ckpt, data, tmp_path / "p", "--max-iters", "2", "--conv", "vicuna_v1", "--pad", "--val-size", "2")
    options[options.index("--data") + 1] = str(data / "answered.jsonl")
    train.main(options)
    assert dyrate.protocol(dyrate.parse_rule(f"dyrate:predictor={tmp_path / 'p'}", model.read_config(ckpt[0]))) == \
        ("vicuna_v1", True)
    image = tmp_path / "x.png"
    random_image(2).save(image)
    run = ["--image", str(image), "--model", ckpt[0], "--method", "dyrate", "--predictor", str(tmp_path / "p"),
           "--json", "--max-new-tokens", "3", "--prompt", "Hi"]
    tok = processing.Tokenizer(ckpt[0], model.read_config(ckpt[0]))
    assert generate.main(run).rows[0]["prompt_tokens"] == len(tok.encode_prompt("Hi", "vicuna_v1")[0])
    with pytest.raises(SystemExit, match="trained with --conv vicuna_v1 --pad, and this run asks for --conv llava-hf "
                                         "--pad.*--allow-protocol-mismatch"):
        generate.main(run + ["--conv", "llava-hf"])
    mismatched = generate.main(run + ["--conv", "llava-hf", "--allow-protocol-mismatch"]).rows[0]
    assert mismatched["prompt_tokens"] == len(tok.encode_prompt("Hi", "llava-hf")[0])
    capsys.readouterr()


def test_max_samples_tokenises_only_its_subset_and_distill_answers_the_same(ckpt, ours, tmp_path, monkeypatch):
    """--max-samples 12 of 40 records (half of them without an answer): tools.distill with the same --max-samples and
    --seed answers the subset's records and no other, train.py then tokenises the subset's prompts only (counted at
    the tokenizer; the held-out ones before training, the rest when a batch needs them), the held-out split is the same
    for another --max-samples, and the predictor records the prompt protocol it was trained with."""
    llava, tok = ours
    for i in range(4):
        random_image(400 + i).save(tmp_path / f"img{i}.png")
    rows = [dict(image=f"img{i % 4}.png", prompt=f"Describe picture {i}.") for i in range(40)]
    for row in rows[1::2]:
        row["answer"] = "A red circle."
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    protocol, subset = ["--conv", "vicuna_v1", "--pad"], ["--max-samples", "12", "--seed", "3"]
    distill.main(["--model", ckpt[0], "--data", str(path), "--max-new-tokens", "8", "--device", "cpu", *protocol,
                  *subset])
    common = ["--model", ckpt[0], "--data", str(path), "--out", str(tmp_path / "p"), "--batch-size", "4", "--val-size",
              "4", "--distill-max-new-tokens", "8", "--eval-max-new-tokens", "4", "--device", "cpu", "--target", "0.8",
              *protocol]
    args = train.parse_args(common + subset)
    chosen, _ = train.usable_samples(str(path), llava.config, args, True, 12, 3)  # every answer there: no error
    unanswered = {row["prompt"] for row in rows[0::2]}
    assert len(chosen) == 12 and set(train.read_answers(str(path))) == {s.key for s in chosen if s.prompt in unanswered}
    prompts, real = [], processing.Tokenizer.encode_prompt
    monkeypatch.setattr(processing.Tokenizer, "encode_prompt", lambda self, q, conv: prompts.append(q) or real(self, q,
                                                                                                              conv))
    samples, val = train.load_data(llava.config, tok, args, print)
    assert prompts == [s.prompt for s in val] == [s.prompt for s in chosen[:4]] and len(samples) == 8
    other = train.parse_args(common + ["--max-samples", "20", "--seed", "3"])
    with pytest.raises(ValueError, match="have no answer.*--max-samples 20 --seed 3"):  # 8 more records: undistilled
        train.load_data(llava.config, tok, other, print)
    other.max_samples = 5
    assert [(s.image, s.prompt) for s in train.load_data(llava.config, tok, other, print)[1]] == [(s.image, s.prompt)
                                                                                                  for s in val]
    prompts.clear()
    train.main(common + subset + ["--max-iters", "3"])
    assert set(prompts) <= {s.prompt for s in chosen} and len(set(prompts)) > 4  # not the other 28 records
    meta = dyrate.RatePredictor.load(tmp_path / "p", llava.config).meta
    assert (meta["conv"], meta["pad"]) == ("vicuna_v1", True)


def test_answers_are_cut_to_max_answer_tokens_and_what_is_too_long_is_counted_once(ours):
    llava, tok = ours
    args = train.parse_args(["--model", "m", "--data", "d", "--out", "o"])
    text = "A red circle and a blue square."
    full = tok.tok.encode(text, add_special_tokens=False).ids + [2]  # EOS ends a given answer
    for cap, want in ((None, full), (len(full), full), (3, full[:3])):  # cut: no EOS, the answer does not end there
        s = train.Sample("x.png", "Describe the picture.", None, None, text)
        assert train.tokenise([s], llava.config, tok, args, Counter(), cap)[0].answer == want
    skipped = Counter()
    for cap in (None, None, 8):  # an answer that fits the 512-token context only when cut
        s = train.Sample("x.png", "Describe the picture.", None, None, "word " * 500)
        assert len(train.tokenise([s], llava.config, tok, args, skipped, cap)) == (cap is not None)
    too_long = train.Sample("x.png", "word " * 600, None, None, text)
    assert train.tokenise([too_long], llava.config, tok, args, skipped) == []
    assert train.tokenise([too_long], llava.config, tok, args, skipped) == []  # marked: counted once
    assert skipped == {"longer than the context (512)": 3}


def side_by_side(*commands):
    """Run each command (a thread per process) at once; returns their CompletedProcesses."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=ROOT)) for cmd in commands]
    outputs = [(cmd, p.communicate(timeout=180), p) for cmd, p in started]
    return [subprocess.CompletedProcess(cmd, p.returncode, *out) for cmd, out, p in outputs]


@pytest.fixture(scope="module")
def torchruns(ckpt, data, tmp_path_factory):
    """The two-process torchrun runs (gloo) of the tests below, two at a time: a failure injected on rank 1 beside a
    sharded distillation, then the failed run resumed beside a training on the distilled answers."""
    tmp = tmp_path_factory.mktemp("torchrun")
    inject = ("import os, sys, train\n"
              "real, calls = train.train_step, []\n"
              "def failing(*a, **kw):\n"
              "    calls.append(1)\n"
              "    if os.environ['RANK'] == '1' and len(calls) == 3:\n"
              "        raise RuntimeError('injected on rank 1')\n"
              "    return real(*a, **kw)\n"
              "train.train_step = failing\n"
              "train.main(sys.argv[1:])\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    common = argv(ckpt, data, tmp / "p", "--max-iters", "4", "--batch-size", "2")
    shutil.copytree(data, tmp / "raw", ignore=shutil.ignore_patterns("*.answers*"))
    failed, distilled = side_by_side([*torchrun, "--no-python", sys.executable, "-c", inject, *common],
                                     [*torchrun, "-m", "tools.distill", *distill_argv(ckpt, tmp / "raw")])
    state = train.read_state(str(tmp / "p.state"))[1]["iter"] if os.path.isfile(tmp / "p.state") else None
    resumed, trained = side_by_side([*torchrun, "train.py", *common, "--resume"],
                                    [*torchrun, "train.py", *argv(ckpt, tmp / "raw", tmp / "ddp", "--max-iters", "3",
                                                                  "--batch-size", "2")])
    return dict(tmp=tmp, failed=failed, state=state, resumed=resumed, distilled=distilled, trained=trained)


@pytest.mark.slow
def test_a_failure_on_one_rank_saves_the_state_and_stops_every_rank(torchruns):
    """Rank 1 of a two-process torchrun (gloo) raises in step 3: both ranks learn it at that step's all-reduce and
    exit non-zero naming rank 1 and its error (none waits for a collective's timeout), rank 0 having saved step 2's
    state, from which --resume under torchrun finishes the run."""
    run = torchruns["failed"]
    assert run.returncode != 0
    stops = re.findall(r"error: step 3 failed \(rank 1: RuntimeError: injected on rank 1\); the state of step 2 is "
                       r"saved", run.stderr)
    assert len(stops) == 2, run.stderr[-3000:]  # each rank's own
    assert torchruns["state"] == 2
    run = torchruns["resumed"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from" in run.stdout and run.stdout.count("step 4/4") == 1


@pytest.mark.slow
def test_torchrun_two_processes(ckpt, data, torchruns):
    """DDP on CPU (gloo): two ranks distil each its share of the answers (one answers file each, read together), then
    train, each with a frozen model copy, the predictor's gradients all-reduced."""
    tmp, run = torchruns["tmp"], torchruns["distilled"]
    assert run.returncode == 0, run.stderr[-2000:]
    assert os.path.isfile(tmp / "raw" / "train.jsonl.answers.rank1.jsonl")
    sharded = train.read_answers(str(tmp / "raw" / "train.jsonl"))  # keyed by image path: the folders differ
    assert {k.replace(str(tmp / "raw"), str(data)): v for k, v in sharded.items()} == \
        train.read_answers(str(data / "train.jsonl"))
    run = torchruns["trained"]
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("step 3/3") == 1  # only rank 0 logs
    assert dyrate.RatePredictor.load(tmp / "ddp",
                                     model.Llava.from_pretrained(ckpt[0]).config).meta["trained_iters"] == 3


# ----------------------------------------------------------------------------------------------------------------------
# the memory-bounded step: layers < K once without autograd, checkpointing, micro-batches


@pytest.fixture(scope="module")
def four(ours, tmp_path_factory):
    """Four answered samples of different lengths."""
    llava, tok = ours
    folder = tmp_path_factory.mktemp("four")
    prompts = ["Describe the picture.", "How many shapes are there?", "What is in the image?", "Describe the picture."]
    answers = ["A red circle and a blue square.", "Two.", "A green triangle above a yellow circle on white.", "Shapes."]
    samples = []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        random_image(300 + i, (100 + 10 * i, 120)).save(folder / f"img{i}.png")
        ids, start = tok.encode_prompt(p)
        samples.append(train.Sample(str(folder / f"img{i}.png"), p, ids, start,
                                    tok.tok.encode(a, add_special_tokens=False).ids + [2]))
    return samples


def step_gradient(llava, samples, *extra, budget="kv", device="cpu"):
    """train_step's loss, fit, ratio and the predictor's gradient, for a predictor with varied rates and fixed noise."""
    args = train.parse_args(["--model", "m", "--data", "d", "--out", "o", "--device", str(device), "--budget", budget,
                             "--target", "0.5", "--k", "2", *extra])
    torch.manual_seed(0)
    predictor = dyrate.RatePredictor(4, [i / 8 for i in range(9)], 2)
    with torch.no_grad():
        predictor.linear.weight.normal_(0, 3.0)
    predictor = predictor.to(device)
    out = train.train_step(llava, predictor, samples, args, 0.7, torch.Generator(device).manual_seed(5), Counter())
    return out, predictor.linear.weight.grad, predictor.linear.bias.grad


def test_gradient_is_the_same_with_checkpointing_and_micro_batches(four, placement, placed):
    """One batch of 4 against checkpointing and micro-batches of 1, 2 and 4 (their gradients accumulated), with the
    same Gumbel draws: the same predictor gradient, to fp32 rounding (exactly, where the arithmetic is the same; off
    the CPU and in half precision, within the dtype's tolerance)."""
    device, dtype = placement
    llava, _ = placed(placement)
    exact = placement == ("cpu", torch.float32)
    rtol = 1e-6 if exact else TOLERANCE[dtype]
    (loss, fit, ratio), w, b = step_gradient(llava, four, device=device)
    assert w.abs().max() > 1e-3 and 0 < ratio < 1
    for extra in (["--checkpoint"], ["--micro-batch-size", "4"], ["--micro-batch-size", "4", "--checkpoint"]):
        (l2, _, r2), w2, b2 = step_gradient(llava, four, *extra, device=device)
        if exact:
            assert torch.equal(w2, w) and torch.equal(b2, b) and (l2, r2) == (loss, ratio), extra
        else:
            assert_close(w2, w, rtol * float(w.abs().max()), f"weight gradient {extra} {placement}")
    for extra in (["--micro-batch-size", "1"], ["--micro-batch-size", "2"], ["--micro-batch-size", "2", "--checkpoint"],
                  ["--micro-batch-size", "3"]):
        (l2, f2, r2), w2, b2 = step_gradient(llava, four, *extra, device=device)
        assert_close(w2, w, rtol * float(w.abs().max()), f"weight gradient {extra} {placement}")
        assert_close(b2, b, rtol * float(b.abs().max()), f"bias gradient {extra} {placement}")
        assert abs(l2 - loss) < rtol * loss and abs(r2 - ratio) < rtol and abs(f2 - fit) < 1e-7 + rtol * fit, extra


def test_layers_below_k_run_once_without_autograd_and_the_loss_is_the_full_forwards(ours, four):
    """Layers < K run once per micro-batch, without autograd, for teacher and student alike; layers >= K run twice
    (the student with autograd, the teacher without). The loss and gradient equal those of the plain path: a full
    forward of the student with the TrainMask hook (autograd everywhere) and a full forward of the teacher."""
    llava, _ = ours
    lm, calls = llava.language_model.model, []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append((i, torch.is_grad_enabled())))
             for i, layer in enumerate(lm.layers)]
    try:
        (loss, fit, ratio), w, b = step_gradient(llava, four, "--micro-batch-size", "2", budget="flops")
    finally:
        for h in hooks:
            h.remove()
    for i in range(len(lm.layers)):
        grads = [g for j, g in calls if j == i]
        assert grads == ([False, False] if i < K else [True, False, True, False]), (i, grads)
    # the plain path: every layer of the student with autograd, the teacher's every layer again
    args = train.parse_args(["--model", "m", "--data", "d", "--out", "o", "--budget", "flops", "--target", "0.5"])
    torch.manual_seed(0)
    predictor = dyrate.RatePredictor(4, [i / 8 for i in range(9)], 2)
    with torch.no_grad():
        predictor.linear.weight.normal_(0, 3.0)
    ids, lengths, starts, n_answer = train.batch_tensors(four, llava.config.pad_token_id, "cpu")
    B, T = ids.shape
    noise = torch.rand((B, T, 9), generator=torch.Generator().manual_seed(5))
    px = train.load_pixels(four, llava, args, Counter())[1]
    positions = torch.arange(T).expand(B, T)
    mask = dyrate.TrainMask(predictor, N_IMAGE, starts, lengths, 0.7, noise)
    rows = (lengths - 1)[:, None] + torch.arange(int(n_answer.max()))
    valid = torch.arange(int(n_answer.max())) < n_answer[:, None]

    def logits(pruner):
        h, _ = lm(llava.embed(ids, px), positions, pruner=pruner)
        return llava.language_model.lm_head(h.gather(1, rows.clamp(max=T - 1)[..., None].expand(-1, -1, 64))).float()
    student = logits(mask)
    with torch.no_grad():
        teacher = logits(None)
    per_token = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    plain_fit = (per_token * valid).sum() / valid.sum()
    cost, none = train.budget_cost(llava.config, mask.kept_count, lengths, n_answer, predictor, "flops")
    plain = plain_fit + args.budget_weight * (cost / none - args.target) ** 2
    plain.backward()
    assert abs(plain.detach().item() - loss) < 1e-6 * loss and abs((cost / none).detach().item() - ratio) < 1e-6
    assert_close(predictor.linear.weight.grad, w, 1e-6 * float(w.abs().max()), "gradient against the plain path")


def test_resume_is_exact_after_an_interrupt_inside_an_accumulation(ckpt, data, tmp_path, monkeypatch):
    """Ctrl-C in the second of two micro-batches of step 3: the state of step 2's end is saved and the resumed run
    ends with the uninterrupted run's predictor."""
    common = ("--max-iters", "5", "--micro-batch-size", "2", "--checkpoint")
    straight, _ = train.main(argv(ckpt, data, tmp_path / "a", *common))
    real, calls = train.micro_batch_loss, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 6:  # step 3, micro-batch 2: micro-batch 1's gradient is accumulated already
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(train, "micro_batch_loss", interrupted)
    with pytest.raises(SystemExit):
        train.main(argv(ckpt, data, tmp_path / "b", *common))
    monkeypatch.setattr(train, "micro_batch_loss", real)
    resumed, _ = train.main(argv(ckpt, data, tmp_path / "b", *common, "--resume"))
    assert torch.equal(straight.linear.weight, resumed.linear.weight)
    assert torch.equal(straight.linear.bias, resumed.linear.bias)


def test_batched_distillation_streams_to_the_cache_and_survives_an_interrupt(ckpt, ours, data, tmp_path,
                                                                             monkeypatch, capsys):
    """Distilling in batches of 5 gives the answers of one at a time; an interrupt after two batches leaves their
    answers in the cache, and the rerun distils only the rest; the unreadable image is skipped and counted."""
    llava, tok = ours
    for name in ("one", "five"):
        shutil.copytree(data, tmp_path / name, ignore=shutil.ignore_patterns("*.answers*"))
    distill.main(distill_argv(ckpt, tmp_path / "one", "--batch-size", "1"))
    one = train.load_samples(str(tmp_path / "one" / "train.jsonl"), llava.config, tok,
                             train.parse_args(argv(ckpt, tmp_path / "one", tmp_path / "p")), print)[0]
    real, calls = generate.generate, []

    def interrupted(*a, **kw):
        calls.append(len(a[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(generate, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill.main(distill_argv(ckpt, tmp_path / "five", "--batch-size", "5"))
    assert len(train.read_answers(str(tmp_path / "five" / "train.jsonl"))) == 10  # two batches of 5, on disk
    calls.clear()
    capsys.readouterr()
    monkeypatch.setattr(generate, "generate", lambda *a, **kw: calls.append(len(a[2])) or real(*a, **kw))
    distill.main(distill_argv(ckpt, tmp_path / "five", "--batch-size", "5"))
    assert sum(calls) == N_TRAIN - N_TRAIN // 3 - 10  # the rest only: the unreadable image and the record longer
    assert "distilled 8/8 answers" in capsys.readouterr().out  # than the context are recorded, never generated
    five, skipped = train.load_samples(str(tmp_path / "five" / "train.jsonl"), llava.config, tok,
                                       train.parse_args(argv(ckpt, tmp_path / "five", tmp_path / "p")), print)
    assert [s.answer for s in five] == [s.answer for s in one] and len(five) == N_TRAIN
    assert skipped["unreadable image"] == 1


def test_an_image_that_does_not_decode_is_left_out_when_first_used(ours, four, tmp_path):
    llava, _ = ours
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    broken = dataclasses.replace(four[0], image=str(tmp_path / "broken.png"))
    args = train.parse_args(["--model", "m", "--data", "d", "--out", "o", "--k", "2"])
    skipped = Counter()
    for _ in range(2):
        kept, px = train.load_pixels([broken, *four[1:]], llava, args, skipped)
        assert kept == list(four[1:]) and px.shape[0] == 3
    assert skipped == {"unreadable image": 1} and broken.bad
