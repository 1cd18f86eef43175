"""
bench.py end to end on a tiny checkpoint (no timing asserted: benchmarks print figures, tests check what they report).
"""
import json

import pytest
import torch
from PIL import Image

from test_dyrate import N_IMAGE
from tools import bench, memory


def test_bench_runs_every_method_on_a_checkpoint(ckpt, tmp_path, capsys):
    """bench.py end to end on a checkpoint folder (no timing asserted: benchmarks print figures): ours and
    transformers produce the same tokens, each method keeps what it should (VisionZip: a shorter prompt), memory and
    FLOPs are reported."""
    methods = "none,fastv,vtw,dyrate,ramp,transformers,pdrop,visionzip:dominant=12:contextual=4"
    rows = bench.main(["--model", ckpt[0], "--methods", methods,
                       "--new-tokens", "5", "--repeats", "1", "--batch-sizes", "1,2", "--out", str(tmp_path / "b.json"),
                       "--plot", str(tmp_path / "t.png")])
    out = capsys.readouterr().out
    by = {(r["method"], r["batch"]): r for r in rows}
    assert len(rows) == 16 and json.loads((tmp_path / "b.json").read_text())["results"][0]["method"] == "none"
    for B in (1, 2):
        assert by[("none", B)]["tokens"] == by[("transformers", B)]["tokens"]
        assert by[("fastv", B)]["kept_visual"] == by[("dyrate", B)]["kept_visual"] == [N_IMAGE // 2] * 5
        assert by[("vtw", B)]["kept_visual"] == [0] * 5 and by[("ramp", B)]["kept_visual"][-1] == 0
        assert by[("vtw", B)]["tflops"] < by[("fastv", B)]["tflops"] < by[("none", B)]["tflops"]
        assert by[("pdrop", B)]["kept_visual"] == [N_IMAGE // 2] * 5 and by[("pdrop", B)]["k"] == 1
        zipped = by[("visionzip:dominant=12:contextual=4", B)]
        assert zipped["kept_visual"] == [16] * 5 and zipped["tflops"] < by[("fastv", B)]["tflops"]
    assert all(r["peak_memory_bytes"] > r["kv_cache_bytes"] for r in rows)  # measured: the whole process
    assert Image.open(tmp_path / "t.png").size == (720, 420)
    kv = {key: r["kv_cache_bytes"] for key, r in by.items()}
    assert kv[("fastv", 2)] < kv[("none", 2)] == 2 * kv[("none", 1)]
    assert "same tokens True" in out and "DyRate per-step overhead" in out


def test_largest_batch_is_found_by_running_it(ckpt, tmp_path, capsys):
    """--memory-gib: a budget a little above the measured peak at batch 2 (caches for 100 new tokens, ~0.25 MiB a row):
    the search returns a batch whose measured run fits and, tried too, the next one that does not; the largest batch
    is timed as well; nothing extrapolated."""
    common = ["--model", ckpt[0], "--methods", "none,vtw", "--new-tokens", "100", "--prompt-tokens", "5",
              "--repeats", "1", "--out", str(tmp_path / "b.json")]
    first = bench.main(common + ["--batch-sizes", "2"])
    budget = max(r["peak_memory_bytes"] for r in first) + 3 * 2**20
    rows = bench.main(common + ["--batch-sizes", "1,2", "--memory-gib", f"{budget / 2**30:.6f}"])
    found = json.loads((tmp_path / "b.json").read_text())["largest_batch"]
    assert set(found) == {"none", "vtw"}
    for m, s in found.items():
        B, tried = s["largest"], {int(b): p for b, p in s["tried"].items()}
        assert 2 <= B <= 200 and tried[B] <= budget < 2**31, (m, tried)
        assert tried[B + 1] == "out of memory" or tried[B + 1] > budget, (m, tried)
        timed = [r for r in rows if r["method"] == m and r["batch"] == B]
        assert len(timed) == 1 and len(timed[0]["tokens"]) == 100
    assert "largest batch in" in capsys.readouterr().out


def test_bench_compares_like_with_like_on_a_checkpoint_that_emits_eos(ckpt, tmp_path, capsys):
    """With EOS = the token the model emits, ours and transformers both generate every token (neither stops at EOS
    nor masks it), so they produce the same tokens."""
    import shutil
    folder = tmp_path / "eos"
    shutil.copytree(ckpt[0], folder)
    first = bench.main(["--model", str(folder), "--methods", "none", "--new-tokens", "3", "--repeats", "1",
                        "--out", str(tmp_path / "a.json")])[0]["tokens"]
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["eos_token_id"] = config["eos_token_id"] = first[1]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").unlink(missing_ok=True)
    capsys.readouterr()
    rows = bench.main(["--model", str(folder), "--methods", "none,transformers", "--new-tokens", "5", "--repeats", "1",
                       "--out", str(tmp_path / "b.json")])
    assert rows[0]["tokens"] == rows[1]["tokens"] and len(rows[1]["tokens"]) == 5
    assert "same tokens True" in capsys.readouterr().out


def test_bench_checks_its_arguments_before_building_anything(ckpt, tmp_path, monkeypatch):
    def no_build(*a, **kw):
        raise AssertionError("a model was built before the arguments were checked")
    monkeypatch.setattr(bench, "random_models", no_build)
    monkeypatch.setattr(bench, "checkpoint_models", no_build)
    (tmp_path / "a_file").write_text("")
    for extra, message in ((["--methods", "none,fast"], "Unknown rule 'fast'"),
                           (["--batch-sizes", "1,x"], "--batch-sizes"), (["--batch-sizes", "0"], "--batch-sizes"),
                           (["--new-tokens", "1"], "--new-tokens must be at least 2"),
                           (["--repeats", "0"], "--repeats"), (["--rate", "2"], "--rate"),
                           (["--methods", "fastv:eps=1"], "fastv takes ratio="),
                           (["--methods", "none,vtw:k=match"], "only vtw takes k=match, after the pruned method"),
                           (["--k", "40"], r"K must lie in \[1, 7\] for this 8-layer model"),
                           (["--memory-gib", "-1"], "--memory-gib"),
                           (["--out", str(tmp_path / "a_file" / "b.json")], "cannot make the folder"),
                           (["--device", "cuda:5"], "--device"), (["--predictor", str(tmp_path / "none")], "not a"),
                           (["--new-tokens", "4000"], "exceed the model's context of 4096"),
                           (["--layers", "1"], "--layers 1: the decoder depth of a --geometry, at least 2"),
                           (["--model", ckpt[0], "--layers", "3"], r"at least 2 \(a --model has its own\)")):
        with pytest.raises(SystemExit, match=f"error: .*{message}"):
            bench.main(extra)
    with pytest.raises(SystemExit, match="No LLaVA checkpoint"):
        bench.main(["--model", str(tmp_path)])


def test_profile_beams_mass_and_chunked_prefill(ckpt, tmp_path, capsys):
    """--profile splits each decode step's time into attention, MLP/projections, DyRate's own work and the rest, which
    add up to the step time measured around them (within 10%); beam search (+beam2), the mass rule and chunked
    prefills run like the other methods; each row says its bytes-read limit."""
    n = 16  # steps enough that the profiler's start-up in the first run (~1.5 ms, unlabelled) stays under 10%
    rows = bench.main(["--model", ckpt[0], "--methods", "none,dyrate,fastv+beam2,mass", "--new-tokens", str(n),
                       "--repeats", "1", "--batch-sizes", "2", "--profile", "--prefill-rows", "1",
                       "--out", str(tmp_path / "b.json")])
    by = {r["method"]: r for r in rows}
    for m, r in by.items():
        p = r["profile"]
        parts = sum(p[f"{k}_ms"] for k in ("attention", "mlp/projections", "dyrate", "rest"))
        assert abs(parts - p["step_ms"]) <= 0.1 * p["step_ms"], (m, parts, p["step_ms"])
        assert p["attention_ms"] > 0 and p["mlp/projections_ms"] > 0
    assert by["none"]["profile"]["dyrate_ms"] == 0 < by["dyrate"]["profile"]["dyrate_ms"]
    assert by["fastv+beam2"]["kept_visual"] == [N_IMAGE // 2] * n and by["mass"]["kept_visual"][0] <= N_IMAGE
    assert by["none"]["bytes_read_limit"] == 1.0 and by["fastv+beam2"]["bytes_read_limit"] < 1
    out = capsys.readouterr().out
    assert "decode ms/token, profiled" in out and "limit" in out


def test_random_models_are_built_in_the_target_dtype_once(tmp_path):
    """bfloat16 random weights are created in bfloat16 (no float32 copy: that would be 3x the weights at the peak),
    ours shares every one of transformers' tensors, --layers sets the decoder's depth, and the logits are finite."""
    with memory.LiveTensors() as live:
        hf, ours = bench.random_models("tiny", "cpu", torch.bfloat16, layers=3)
    weights = {p.data_ptr(): p.nbytes for p in hf.parameters()}
    assert {p.dtype for p in hf.parameters()} == {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert {p.data_ptr() for p in ours.parameters()} == set(weights) and len(ours.state_dict()) == len(weights)
    assert sum(weights.values()) <= live.peak <= 1.05 * sum(weights.values()), (live.peak, sum(weights.values()))
    assert len(ours.language_model.model.layers) == 3 == bench.geometry_config("7b", 3).text.num_hidden_layers
    N = ours.config.n_image_tokens
    ids = torch.tensor([[1, 5, 6] + [ours.config.image_token_index] * N + [7, 8]])
    with torch.inference_mode():
        logits = ours(ids, torch.randn(1, 3, 336, 336, dtype=torch.bfloat16))
    assert logits.dtype == torch.bfloat16 and bool(logits.isfinite().all()) and logits.float().std() > 0


def test_transformers_is_left_out_where_its_copy_of_the_weights_does_not_fit(ckpt, ours, tmp_path, capsys):
    """With --model, transformers loads a second copy of the weights: given less memory than two copies and the
    caches, the default methods leave it out with one line saying so; named in --methods, it runs while the two copies
    alone fit, and is an error before anything loads where they do not."""
    weights = sum(p.nbytes for p in ours[0].parameters())  # float32, as bench loads on the CPU by default

    def methods(available, *extra):
        return bench.check_args(bench.parse_args(["--model", ckpt[0], "--out", str(tmp_path / "b.json"), *extra]),
                                available)[0]
    assert methods(2**40) == bench.DEFAULT_METHODS.split(",") and capsys.readouterr().err == ""
    assert methods(2 * weights + 1) == ["none", "fastv", "vtw", "dyrate", "ramp"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transformers left out" in err and "name it in --methods to run it anyway" in err
    assert methods(2 * weights + 1, "--methods", "none,transformers") == ["none", "transformers"]
    with pytest.raises(ValueError, match="drop transformers from --methods or use a smaller --dtype"):
        methods(2 * weights - 1, "--methods", "none,transformers")


def test_each_rule_prunes_at_its_own_layer_unless_k_is_given(tmp_path):
    """Without --k, each rule runs at its own K (fastv 2, VTW at its paper's depth: 15 of 32 layers, 4 of 8; vtw:k=5
    at 5); --k sets it for the rules that do not name their own."""
    common = ["--geometry", "tiny", "--layers", "8", "--methods", "fastv,vtw,vtw:k=5", "--new-tokens", "2",
              "--repeats", "1", "--out", str(tmp_path / "b.json")]
    for extra, ks in (([], [2, 4, 5]), (["--k", "3"], [3, 3, 5])):
        rows = bench.main(common + extra)
        assert [r["k"] for r in rows] == ks and [r["kept_visual"] for r in rows] == [[288] * 2, [0] * 2, [0] * 2]
        assert rows[1]["tflops"] < rows[2]["tflops"]  # VTW's FLOPs grow with its layer


def test_vtw_matched_on_flops_to_the_method_before_it(tmp_path, capsys):
    """vtw:k=match takes the layer whose FLOPs are closest to the method before it (no other layer's are closer) and
    its row names the layer it ran at."""
    common = ["--geometry", "tiny", "--layers", "8", "--new-tokens", "3", "--repeats", "1"]
    fastv, vtw = bench.main(common + ["--methods", "fastv:ratio=0.75,vtw:k=match", "--out", str(tmp_path / "b.json")])
    assert vtw["method"] == "vtw:k=match" and vtw["kept_visual"] == [0] * 3 and 1 <= vtw["k"] <= 7
    assert f"vtw:k=match: K={vtw['k']}, the layer whose FLOPs ratio is closest to fastv:ratio=0.75's" in \
        capsys.readouterr().err
    others = bench.main(common + ["--methods", ",".join(f"vtw:k={k}" for k in range(1, 8)),
                                  "--out", str(tmp_path / "k.json")])
    gaps = [abs(r["tflops"] - fastv["tflops"]) for r in others]
    assert abs(vtw["tflops"] - fastv["tflops"]) == min(gaps) == gaps[vtw["k"] - 1]
