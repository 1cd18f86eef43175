"""
tools/gpu_check.py: the verdict logic in-process, the deadline, and the dry run (every check's code path on the CPU at
tiny shapes) with planted faults: two dry runs, each planting a fault behind every other check, so that each check is
seen failing with its fault and passing beside the others' (the faults are the script's --plant self-test).
"""
import json
import os
import subprocess
import sys

import pytest

from tools import gpu_check

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
CHECKS = [name for names in gpu_check.checks_of(gpu_check.DRY).values() for name in names]


def dry_runs(*runs):
    """The script's dry runs [(out, flags)], started at once (a thread each: two take the CI's two cores), each with
    its temporary folders under a scratch folder of its own, which it must leave empty. Returns [(run, summary)]."""
    started = []
    for out, flags in runs:
        scratch = out.parent / f"{out.name}-tmp"
        scratch.mkdir(exist_ok=True)
        env = dict(os.environ, TMPDIR=str(scratch), **({"OMP_NUM_THREADS": "1"} if len(runs) > 1 else {}))
        started.append((subprocess.Popen([sys.executable, "-m", "tools.gpu_check", "--dry-run", "--out", str(out),
                                          *flags], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=env), out, scratch))
    results = []
    for process, out, scratch in started:
        stdout, stderr = process.communicate(timeout=900)
        assert not [n for n in os.listdir(scratch) if n.startswith("gpu-check-")], "its scratch folder was left behind"
        results.append((subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
                        json.loads((out / "summary.json").read_text())))
    return results


def dry_run(out, *flags):
    return dry_runs((out, flags))[0]


def test_plan_rejects_unknown_steps_and_plants():
    args = gpu_check.parse_args(["--out", "o", "--steps", "loading,dropping", "--plant", "kv-dropped"])
    assert gpu_check.plan_of(args, gpu_check.GPU) == {"loading": ["load-peak"], "dropping": ["kv-dropped"]}
    with pytest.raises(ValueError, match="--steps 'loading,speeed'"):
        gpu_check.plan_of(gpu_check.parse_args(["--out", "o", "--steps", "loading,speeed"]), gpu_check.GPU)
    with pytest.raises(ValueError, match="--plant train-peak: not a check of the steps run"):
        gpu_check.plan_of(gpu_check.parse_args(["--out", "o", "--steps", "loading", "--plant", "train-peak"]),
                          gpu_check.GPU)


def test_recorder_fails_a_figure_beyond_its_bound_and_nan(tmp_path):
    record = gpu_check.Recorder(tmp_path / "step.json", ["b"])
    record("a", 1.1, "<=", 1.1, "x")
    record("b", 1.2, "<=", 1.1, "x", note="planted")
    record("c", float("nan"), "<=", 1.1, "x")
    record("d", 0.5, ">=", 1.0, "of the tests")
    got = json.loads((tmp_path / "step.json").read_text())
    assert {k: v["status"] for k, v in got.items()} == dict(a="pass", b="fail", c="fail", d="fail")
    assert got["b"]["planted"] and not got["a"]["planted"] and got["b"]["note"] == "planted"


def test_a_step_killed_at_the_deadline_leaves_its_checks_not_run(tmp_path):
    """No process imports torch and loads a model in half a second: loading is killed, dropping never starts, and
    neither check may read as passed."""
    run, summary = dry_run(tmp_path, "--steps", "loading,dropping", "--deadline", "0.5")
    assert run.returncode == 3, run.stdout + run.stderr
    assert summary["steps"]["loading"]["status"] == "timed out"
    assert summary["steps"]["dropping"] == dict(status="not run", seconds=0, why="no time left before the deadline")
    assert {n: c["status"] for n, c in summary["checks"].items()} == {"load-peak": "not run", "kv-dropped": "not run"}
    assert "killed at the deadline" in summary["checks"]["load-peak"]["why"]


@pytest.fixture(scope="module")
def dry_runs_at_once(tmp_path_factory):
    """Three dry runs, at once: two whole ones, with a fault planted behind every even-numbered check and behind every
    odd-numbered one, and a clean one of the cheap steps."""
    outs, plants = [tmp_path_factory.mktemp(f"gpu-dry-{i}") for i in (0, 1, 2)], [CHECKS[i::2] for i in (0, 1)]
    runs = dry_runs(*[(out, [a for name in p for a in ("--plant", name)]) for out, p in zip(outs, plants)],
                    (outs[2], ["--steps", "loading,dropping"]))
    return [(out, p, run, summary) for out, p, (run, summary) in zip(outs, plants + [[]], runs)]


@pytest.fixture(scope="module")
def planted_runs(dry_runs_at_once):
    return dry_runs_at_once[:2]


@pytest.fixture(params=[0, 1], ids=["even-planted", "odd-planted"])
def planted_run(request, planted_runs):
    return planted_runs[request.param]


@pytest.mark.slow
def test_dry_run_fails_exactly_the_planted_checks(planted_run):
    out, plants, run, summary = planted_run
    checks = summary["checks"]
    assert list(checks) == CHECKS  # every check is listed, in order
    assert all(s["status"] == "done" for s in summary["steps"].values()), summary["steps"]
    for name, c in checks.items():
        assert isinstance(c["value"], (int, float)) and isinstance(c["threshold"], (int, float)), (name, c)
        assert c["planted"] == (name in plants)
        assert c["status"] == ("fail" if name in plants else "pass"), (name, c)
    assert run.returncode == 1, run.stdout + run.stderr


@pytest.mark.slow
def test_dry_run_writes_everything_into_one_folder(planted_run):
    out, _, run, summary = planted_run
    names = {p.name for p in out.iterdir()}
    for step in summary["steps"]:
        assert {f"{step}.log", f"{step}.json"} <= names
    runs = [f"compile-{m}" for m in ("none", "fastv", "dyrate")] + [f"speed-batch{B}" for B in (1, 2, 4)]
    bench = {f"bench-{r}.{e}" for r in runs for e in ("txt", "json")}  # tools/bench.py's tables and results
    assert {"summary.json", "summary.txt", "tests.xml"} | bench <= names
    table = (out / "summary.txt").read_text()
    assert all(name in table for name in CHECKS) and table in run.stdout  # the table is also what the run printed
    speed = json.loads((out / "bench-speed-batch4.json").read_text())
    assert {r["method"] for r in speed["results"]} == {"none", "fastv", "vtw", "dyrate"}
    assert summary["checks"]["kv-dropped"]["expected_ratio"] < 0.9  # the schedule did drop


@pytest.mark.slow
def test_clean_dry_run_of_the_cheap_steps_exits_zero(dry_runs_at_once):
    _, _, run, summary = dry_runs_at_once[2]
    assert run.returncode == 0, run.stdout + run.stderr
    assert {n: c["status"] for n, c in summary["checks"].items()} == {"load-peak": "pass", "kv-dropped": "pass"}
