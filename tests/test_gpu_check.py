"""
tools/gpu_check.py's dry run: every step of the GPU check on the CPU with every geometry shrunk, so that a mistake in
the script is found here and not on a GPU machine's clock.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    run = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--out", str(tmp_path), "--dry-run"], cwd=HERE,
                         capture_output=True, text=True, timeout=600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert run.returncode == 0 and all(s["ok"] for s in summary["steps"].values()), (run.stdout, summary)
    assert set(summary["steps"]) == {"pytest", "bench", "generate", "train"}
    bench = json.loads((tmp_path / "bench-7b.json").read_text())
    assert {r["method"] for r in bench["results"]} == {"none", "none+compile", "fastv", "dyrate", "dyrate+compile",
                                                       "ramp", "ramp+compile", "transformers"}
    generated = json.loads((tmp_path / "generate-7b.json").read_text())
    assert set(generated["runs"]) == {"none", "fastv", "ramp"} and generated["load_s"] > 0
    assert generated["runs"]["fastv"]["kept_visual"] == [288, 288]
    trained = json.loads((tmp_path / "train-7b.json").read_text())
    assert trained["live_peak"] > 0 and trained["batch"] == 2
    assert "passed" in (tmp_path / "pytest.txt").read_text()
    assert not os.path.exists(tmp_path / "work")  # the random checkpoint went to a scratch folder, removed
