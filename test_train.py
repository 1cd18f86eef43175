"""
Tests of train.py on a tiny random LLaVA (conftest.py): data reading and skipping, self-distillation cache, the loss
and the FLOPs ratio moving toward the target, checkpoint round trip, exact resume after Ctrl-C, the predictor in
generate.py, and a two-process torchrun. CPU, about 20 s.
"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import dyrate
import generate
import model
import train
from conftest import random_image

N_TRAIN = 24


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """24 usable records (every third with an answer, the rest to self-distil) and eight bad ones."""
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
    return folder


def argv(ckpt, data, out, *extra):
    return ["--model", ckpt[0], "--data", str(data / "train.jsonl"), "--out", str(out), "--batch-size", "4",
            "--val-size", "6", "--distill-max-new-tokens", "8", "--eval-max-new-tokens", "8", "--log-interval", "1",
            "--eval-interval", "1000", "--device", "cpu", "--target", "0.78", *extra]


def test_records_are_read_skipped_and_distilled_once(ckpt, ours, data, capsys):
    llava, tok = ours
    args = train.parse_args(argv(ckpt, data, data / "p"))
    samples, skipped = train.load_samples(str(data / "train.jsonl"), llava, tok, args, print)
    assert len(samples) == N_TRAIN
    assert skipped == {"image not found": 1, "empty prompt": 1, "bad JSON line": 1, "longer than the context (512)": 1,
                       "unreadable image": 1, "no image path": 1, "answer is not text": 1, "prompt is not text": 1}
    assert all(s.answer and (i % 3 == 0 or len(s.answer) <= 8) for i, s in enumerate(samples))
    answered = samples[0]  # img0 carries its own answer: tokenised, EOS appended
    assert answered.answer == tok.tok.encode("A red circle and a blue square.", add_special_tokens=False).ids + [2]
    cache = json.loads((data / "train.jsonl.answers.json").read_text())
    assert len(cache) == N_TRAIN - N_TRAIN // 3
    first = generate.generate(llava, tok, [samples[1].image], [samples[1].prompt],
                              max_new_tokens=8).rows[0]["token_ids"]
    assert samples[1].answer == first  # the unpruned model's own greedy answer
    capsys.readouterr()
    again, _ = train.load_samples(str(data / "train.jsonl"), llava, tok, args, print)
    assert "distilled" not in capsys.readouterr().out and [s.answer for s in again] == [s.answer for s in samples]


def test_llava_conversation_json(tmp_path):
    random_image(0).save(tmp_path / "a.jpg")
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "1", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Two shapes."},
        {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]}]))
    records, skipped = train.read_records(str(tmp_path / "llava.json"))
    assert records == [(str(tmp_path / "a.jpg"), "What is shown?", "Two shapes.")] and not skipped


def test_training_moves_flops_to_target_and_loss_down(ckpt, data, tmp_path, capsys):
    predictor, best = train.main(argv(ckpt, data, tmp_path / "p", "--max-iters", "40", "--compare"))
    log = capsys.readouterr().out
    steps = [line for line in log.splitlines() if line.startswith("step ")]
    losses = [float(line.split("loss ")[1].split()[0]) for line in steps]
    ratios = [float(line.split("FLOPs ratio ")[1].split()[0]) for line in steps]
    assert len(steps) == 40
    assert sum(losses[-10:]) < sum(losses[:10])
    assert abs(sum(ratios[-10:]) / 10 - 0.78) < abs(sum(ratios[:10]) / 10 - 0.78)
    assert abs(best["flops_ratio"] - 0.78) < 0.03  # held out, hard decisions, real inference path
    assert "fastv R=" in log and "dyrate (learned)" in log and "vtw" in log


def test_state_round_trip(tmp_path):
    predictor = dyrate.RatePredictor(4, [0.0, 0.5, 1.0])
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(3)
    predictor(torch.rand(2, 4, 4)).sum().backward()
    optimizer.step()
    torch.rand(5, generator=generator)
    args = train.parse_args(["--model", "m", "--data", "d", "--out", "o"])
    train.save_state(str(tmp_path / "s"), predictor, optimizer, generator, 7, args, {"agreement": 0.5})
    p2, g2 = dyrate.RatePredictor(4, [0.0, 0.5, 1.0]), torch.Generator()
    o2 = torch.optim.AdamW(p2.parameters(), lr=0.1)
    meta = train.load_state(str(tmp_path / "s"), p2, o2, g2)
    assert meta["iter"] == 7 and meta["best"] == {"agreement": 0.5}
    assert all(torch.equal(a, b) for a, b in zip(predictor.state_dict().values(), p2.state_dict().values()))
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(optimizer.state_dict()["state"][0][key], o2.state_dict()["state"][0][key])
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=g2))


@pytest.mark.parametrize("when,signal_name", [("before", None), ("after", None), ("after", "SIGTERM")])
def test_interrupt_saves_and_resume_is_exact(ckpt, data, tmp_path, monkeypatch, when, signal_name):
    """Ctrl-C (or SIGTERM, what cluster schedulers send) before a step's loss or after it drew the step's Gumbel
    noise: the state of the last step boundary is saved, and --resume gives the uninterrupted run's predictor."""
    straight, _ = train.main(argv(ckpt, data, tmp_path / "a", "--max-iters", "6"))
    real, calls = train.train_loss, []

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
    monkeypatch.setattr(train, "train_loss", interrupted)
    with pytest.raises(SystemExit) as stop:
        train.main(argv(ckpt, data, tmp_path / "b", "--max-iters", "6"))
    assert stop.value.code == (143 if signal_name else 130)
    assert os.path.isfile(tmp_path / "b.state") and os.path.isfile(tmp_path / "b")
    monkeypatch.setattr(train, "train_loss", real)
    resumed, _ = train.main(argv(ckpt, data, tmp_path / "b", "--max-iters", "6", "--resume"))
    assert torch.equal(straight.linear.weight, resumed.linear.weight)
    assert torch.equal(straight.linear.bias, resumed.linear.bias)


def test_resume_refuses_other_options_and_nothing_to_train(ckpt, data, tmp_path, capsys):
    train.main(argv(ckpt, data, tmp_path / "p", "--max-iters", "2"))
    for extra, named in ((["--k", "3"], "--k 3"), (["--rates", "0,0.5,1"], "--rates '0,0.5,1'"),
                         (["--target", "0.9"], "--target 0.9")):
        with pytest.raises(SystemExit, match=f"error: --resume with other options.*{re.escape(named)}"):
            train.main(argv(ckpt, data, tmp_path / "p", "--max-iters", "2", "--resume", *extra))
    capsys.readouterr()
    train.main(argv(ckpt, data, tmp_path / "p", "--max-iters", "2", "--resume"))
    out = capsys.readouterr().out
    assert "already at step 2 of 2: nothing to train" in out and "predictor written" not in out


def test_bad_options_fail_before_the_model_loads(ckpt, data, tmp_path, monkeypatch):
    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(train.Llava, "from_pretrained", no_load)
    for extra, message in ((["--max-iters", "0"], "--max-iters must be at least 1.*--eval-only"),
                           (["--rates", "1:0"], "--rates '1:0'"), (["--rates", "0,1,0.5"], "increasing"),
                           (["--target", "0"], "--target"), (["--lr", "nan"], "--lr"),
                           (["--device", "cuda:7"], "--device cuda:7"), (["--resume"], "no training state"),
                           (["--eval-only"], "does not exist")):
        with pytest.raises(SystemExit, match=message):
            train.main(argv(ckpt, data, tmp_path / "p", *extra))
    for out, message in ((tmp_path / "missing" / "p", "does not exist; create it first"), (tmp_path, "is a folder")):
        with pytest.raises(SystemExit, match=message):
            train.main(argv(ckpt, data, out))
    with pytest.raises(SystemExit, match="--data .* does not exist"):
        train.main(["--model", ckpt[0], "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "p")])
    assert not os.path.exists(tmp_path / "p")


def test_small_data_gets_a_proportional_held_out_split(ckpt, data, tmp_path, capsys):
    lines = (data / "train.jsonl").read_text().splitlines()[:6]
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
    assert got["method"] == "dyrate" and len(got["rates"]) == len(got["token_ids"])
    assert all(r in [i / 8 for i in range(9)] for r in got["rates"])
    with pytest.raises(ValueError, match="trained for a different model"):
        dyrate.RatePredictor.load(tmp_path / "p", model.LlavaConfig())
    with pytest.raises(SystemExit, match="out of reach"):
        train.main(argv(ckpt, data, tmp_path / "q", "--max-iters", "1", "--target", "0.3"))


def test_torchrun_two_processes(ckpt, data, tmp_path):
    """DDP on CPU (gloo): two ranks, each a frozen model copy, the predictor's gradients all-reduced."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          "train.py", *argv(ckpt, data, tmp_path / "ddp", "--max-iters", "3", "--batch-size", "2")],
                         capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)),
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("step 3/3") == 1  # only rank 0 logs
    assert dyrate.RatePredictor.load(tmp_path / "ddp",
                                     model.Llava.from_pretrained(ckpt[0]).config).meta["trained_iters"] == 3
