"""
Tests of the shapes model (shapes.py): the data generator is deterministic, the shipped checkpoint loads through the
real from_pretrained path and answers the example questions, and DyRate with the shipped predictor keeps accuracy.
CPU, seconds.
"""
import json
import os
import random

import numpy as np
import pytest

import dyrate as D
import generate as G
import model as M
import processing as P
import shapes as S

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(HERE, "models", "shapes")
EXAMPLES = os.path.join(HERE, "assets", "examples")


def test_data_generator_is_deterministic(tmp_path):
    a, b = random.Random(7), random.Random(7)
    for _ in range(20):
        sa, sb = S.sample(a), S.sample(b)
        assert sa == sb
        assert np.array_equal(np.asarray(S.draw(sa[0])), np.asarray(S.draw(sb[0])))
    S.write_dataset(str(tmp_path / "x"), 5, 3, "test")
    S.write_dataset(str(tmp_path / "y"), 5, 3, "test")
    assert (tmp_path / "x" / "test.jsonl").read_text() == (tmp_path / "y" / "test.jsonl").read_text()
    for i in range(5):
        assert (tmp_path / "x" / f"test/{i:05d}.png").read_bytes() == (tmp_path / "y" / f"test/{i:05d}.png").read_bytes()
    assert (tmp_path / "x" / "test.jsonl").read_text() != (S.write_dataset(str(tmp_path / "z"), 5, 4, "test") or
                                                            (tmp_path / "z" / "test.jsonl").read_text())


def test_scene_text_and_patch_labels():
    scene = dict(items=[dict(shape="circle", colour="orange", size="small", cell=0, dx=0, dy=0),
                        dict(shape="square", colour="red", size="large", cell=4, dx=0, dy=0)],
                 background=0, texture=False, seed=0)
    qa = S.questions(scene)
    answers = dict(qa)
    assert answers[S.CAPTION_PROMPT] == "An orange circle at the top left and a red square at the middle center."
    assert answers["How many shapes are there?"] == "two" and answers["What color is the square?"] == "red"
    assert answers["What is at the middle center?"] == "a red square" and answers["What is at the top left?"] == "an orange circle"
    assert [q for q, _ in qa if q.startswith("What is at")] == ["What is at the top left?", "What is at the middle center?"]
    kind, row, col = S.patch_labels(scene).reshape(3, 16, 16)
    orange_circle, red_square = S.item_label(scene["items"][0])[0], S.item_label(scene["items"][1])[0]
    assert orange_circle == 1 + 0 * 6 + list(S.COLOURS).index("orange") and red_square == 1 + 1 * 6 + 0
    assert (kind[2:4, 2:4] == orange_circle).all() and (kind[7:10, 7:10] == red_square).all()  # 2 x 2 and 3 x 3 patches
    assert (kind > 0).sum() == 13
    assert (row[2:4, 2:4] == 0).all() and (col[2:4, 2:4] == 0).all() and (row[7:10, 7:10] == 1).all()
    assert (col[7:10, 7:10] == 1).all() and ((row == 3) == (kind == 0)).all() and ((col == 3) == (kind == 0)).all()
    assert S.item_label(scene["items"][1]) == (red_square, 1, 1)


# ----------------------------------------------------------------------------------------------------------------------
# the shipped checkpoint and predictors (models/shapes, made by the commands in the README)


@pytest.fixture(scope="module")
def shipped():
    model = M.Llava.from_pretrained(SHIPPED)  # the real loader: llava-hf layout, config.json, tokenizer.json
    return model, P.Tokenizer(SHIPPED, model.config)


def test_shipped_model_answers_the_examples(shipped):
    model, tok = shipped
    with open(os.path.join(EXAMPLES, "examples.json")) as f:
        examples = json.load(f)
    assert len(examples) >= 8 and {S.task(e["prompt"]) for e in examples} == {"caption", "colour", "count", "position"}
    rows = G.generate(model, tok, [os.path.join(EXAMPLES, e["image"]) for e in examples],
                      [e["prompt"] for e in examples], max_new_tokens=48, stats=False).rows
    assert [r["text"] for r in rows] == [e["answer"] for e in examples]


def test_cli_runs_the_shipped_model_by_default(capsys):
    image = os.path.join(EXAMPLES, "0.png")
    G.main(["--image", image, "--json"])  # no --model: the shipped shapes model
    with open(os.path.join(EXAMPLES, "examples.json")) as f:
        caption = next(e["answer"] for e in json.load(f) if e["image"] == "0.png" and e["prompt"] == S.CAPTION_PROMPT)
    assert json.loads(capsys.readouterr().out)["text"] == caption


def held_out(n, seed=12345):
    """A small fixed held-out set drawn by seed (not the training stream's seed)."""
    rng = random.Random(seed)
    return [dict(image=S.draw(scene), prompt=q, answer=a) for scene, q, a in (S.sample(rng) for _ in range(n))]


@pytest.fixture(scope="module")
def unpruned(shipped):
    """The small fixed held-out set and the unpruned model's exact-match accuracy on it."""
    records = held_out(96)
    return records, S.evaluate_answers(*shipped, records)[0]


def dyrate_on_held_out(shipped, budget):
    model, tok = shipped
    cfg, records = model.config, held_out(96)
    predictor = D.RatePredictor.load(os.path.join(SHIPPED, f"predictor-{budget}"), cfg)
    accuracy, rows = S.evaluate_answers(model, tok, records, method="dyrate", predictor=predictor)
    none = sum(D.generation_flops(cfg, r["prompt_tokens"], [cfg.n_image_tokens] * len(r["token_ids"]), r["k"])["total"]
               for r in rows)
    return accuracy, sum(r["flops"] for r in rows) / none


@pytest.mark.xfail(strict=True, reason="not met (README, 'The shapes model'): pruning with the layer-1 attention "
                   "ranking loses 8-11 points on this model even at 0.73-0.55 of the FLOPs")
def test_dyrate_keeps_accuracy_at_its_budget(shipped, unpruned):
    """The shapes issue's goal: DyRate with a shipped predictor within 2 points of unpruned accuracy at its budget. It
    fails today (strict xfail: the day it passes, pytest says so and the marker goes)."""
    accuracy, ratio = dyrate_on_held_out(shipped, "0.75")
    assert unpruned[1] >= 0.95 and ratio <= 0.75 + 0.03
    assert accuracy >= unpruned[1] - 0.02, f"dyrate at 0.75: {accuracy:.3f} vs unpruned {unpruned[1]:.3f}"


def test_unpruned_shipped_model_is_accurate(unpruned):
    assert unpruned[1] >= 0.95  # exact match on the small fixed held-out set (0.979 when shipped)


@pytest.mark.parametrize("budget", ["0.75", "0.55", "0.33"])
def test_predictors_hold_their_budgets(shipped, budget):
    accuracy, ratio = dyrate_on_held_out(shipped, budget)
    assert abs(ratio - float(budget)) <= 0.03, f"FLOPs ratio {ratio:.3f} for the budget {budget}"
    assert accuracy > 0.5  # far above guessing, below unpruned: the README's table gives the figures


def test_experiment_command_end_to_end(tmp_path):
    S.write_dataset(str(tmp_path), 6, 99, "test")
    table = S.experiment(SHIPPED, str(tmp_path / "test.jsonl"), [os.path.join(SHIPPED, "predictor-0.55")],
                         str(tmp_path / "out"), n_timed=1, log=lambda msg: None)
    assert set(table) == {"none", "vtw", "predictor-0.55"}
    assert set(table["predictor-0.55"]) == {"learned", "fastv", "ramp"}
    assert table["vtw"]["flops_ratio"] < table["predictor-0.55"]["learned"]["flops_ratio"] < 1 == table["none"]["flops_ratio"]
    assert abs(table["predictor-0.55"]["fastv"]["flops_ratio"] - table["predictor-0.55"]["learned"]["flops_ratio"]) < 0.05
    assert (tmp_path / "out" / "experiment.json").exists() and list((tmp_path / "out").glob("example0*.gif"))
