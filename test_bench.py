"""
bench.py end to end on a tiny checkpoint (no timing asserted: benchmarks print figures, tests check what they report).
"""
import json

from test_dyrate import N_IMAGE


def test_bench_runs_every_method_on_a_checkpoint(ckpt, tmp_path, capsys):
    """bench.py end to end on a checkpoint folder (no timing asserted: benchmarks print figures): ours and
    transformers produce the same tokens, each method keeps what it should, memory and FLOPs are reported."""
    import bench
    rows = bench.main(["--model", ckpt[0], "--methods", "none,fastv,vtw,dyrate,dyrate-ramp,transformers",
                       "--new-tokens", "5", "--repeats", "1", "--batch-sizes", "1,2", "--memory-gib", "1",
                       "--out", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    by = {(r["method"], r["batch"]): r for r in rows}
    assert len(rows) == 12 and json.loads((tmp_path / "b.json").read_text())["results"][0]["method"] == "none"
    for B in (1, 2):
        assert by[("none", B)]["tokens"] == by[("transformers", B)]["tokens"]
        assert by[("fastv", B)]["kept_visual"] == by[("dyrate", B)]["kept_visual"] == [N_IMAGE // 2] * 5
        assert by[("vtw", B)]["kept_visual"] == [0] * 5 and by[("dyrate-ramp", B)]["kept_visual"][-1] == 0
        assert by[("vtw", B)]["tflops"] < by[("fastv", B)]["tflops"] < by[("none", B)]["tflops"]
    assert by[("none", 2)]["peak_memory_bytes"] > by[("none", 1)]["peak_memory_bytes"]
    assert by[("fastv", 2)]["kv_cache_bytes"] < by[("none", 2)]["kv_cache_bytes"] == 2 * by[("none",
                                                                                             1)]["kv_cache_bytes"]
    assert "same tokens True" in out and "DyRate per-step overhead" in out and "largest batch in 1 GiB" in out
