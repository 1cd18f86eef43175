"""
Tests of tools/compare.py on the tiny random LLaVA (conftest.py): the comparison table's rows (the learned predictor,
FastV, the ramp, the mass rule and VTW matched on its cost, and none), and bad inputs refused before the weights load.
"""
import json

import pytest

import dyrate
import model
from conftest import random_image
from test_dyrate import K
from tools import compare


@pytest.fixture(scope="module")
def held_out(ours, tmp_path_factory):
    """Four held-out questions without answers, and an untrained predictor file for the tiny model."""
    llava, _ = ours
    folder = tmp_path_factory.mktemp("held_out")
    rows = []
    for i in range(4):
        random_image(400 + i, (100 + 8 * i, 120)).save(folder / f"img{i}.png")
        rows.append(json.dumps({"image": f"img{i}.png", "prompt": ["Describe the picture.", "What is shown?"][i % 2]}))
    (folder / "val.jsonl").write_text("\n".join(rows) + "\n")
    predictor = dyrate.RatePredictor(llava.config.text.num_attention_heads, [i / 8 for i in range(9)], K)
    predictor.save(str(folder / "p"), dyrate.fingerprint(llava.config), dict(budget="kv"))
    return folder


def argv(ckpt, folder, *extra):
    return ["--model", ckpt[0], "--data", str(folder / "val.jsonl"), "--predictor", str(folder / "p"), "--device",
            "cpu", "--max-new-tokens", "6", *extra]


def test_the_table_sets_the_predictor_beside_the_baselines_at_its_cost(ckpt, held_out, capsys):
    rows = compare.main(argv(ckpt, held_out))
    log = capsys.readouterr().out
    assert "fastv R=" in log and "dyrate (learned)" in log and "vtw K=" in log and "mass rule eps=" in log
    assert "hand-set ramp" in log and "matched on the kv budget" in log  # the predictor's budget
    none = rows["none"]  # the unpruned model against its own greedy tokens
    assert none["agreement"] == 1 and none["kl"] < 1e-6
    assert all(none[f"{budget}_ratio"] == 1 for budget in dyrate.BUDGETS)
    assert len(rows) == 6 and all(0 <= r["kv_ratio"] <= 1 for r in rows.values())


def test_bad_inputs_fail_before_the_model_loads(ckpt, held_out, tmp_path, monkeypatch):
    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(model.Llava, "from_pretrained", no_load)
    for flag in ("--predictor", "--data"):
        args = argv(ckpt, held_out)
        args[args.index(flag) + 1] = str(tmp_path / "none")
        with pytest.raises(SystemExit, match=f"{flag} .* does not exist"):
            compare.main(args)
    other = dyrate.RatePredictor(8, [0.0, 1.0], K)
    other.save(str(tmp_path / "other"), "llava L32 H32", {})
    with pytest.raises(SystemExit, match="trained for a different model"):
        compare.main(argv(ckpt, held_out, "--predictor", str(tmp_path / "other")))
