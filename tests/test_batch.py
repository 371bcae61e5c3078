"""`tfg batch`: planning, the local pool and submitit's local executor, retry, resume after a kill, summaries."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from tfg_core.batch import (expand_grid, is_finished, parse_assignments, parse_folds, plan_runs, read_status,
                            run_batch)
from tfg_core.batch.execute import kernel_manager_class
from tfg_core.batch.plan import run_id_for

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "fixtures" / "batch_probe.ipynb"  # writes one tidy row; can sleep and fail on purpose
NOTEBOOKS = ROOT / "notebooks"


def test_parsing_folds_values_and_grids():
    assert parse_folds("0-9") == list(range(10)) and parse_folds("0-2,7") == [0, 1, 2, 7] and parse_folds([3]) == [3]
    for bad in ("10", "a", "3-x", ""):
        with pytest.raises(ValueError, match="folds"):
            parse_folds(bad)
    assert parse_assignments(["a=1", "b=text", "c=[1, 2]", "d=true", "e={fold}.pt"]) == {
        "a": 1, "b": "text", "c": [1, 2], "d": True, "e": "{fold}.pt"}
    assert parse_assignments(["s=0.5,1,2", "l=[\"bce\", \"logit\"]"], as_list=True) == {"s": [0.5, 1, 2], "l": ["bce", "logit"]}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_assignments(["novalue"])
    points = expand_grid({"a": [1, 2], "b": ["x", "y"]})
    assert len(points) == 4 and {"a": 2, "b": "y"} in points
    assert expand_grid(None, [{"a": 1}, {"b": 2}, {"a": 1}]) == [{"a": 1}, {"b": 2}]  # duplicates run once
    assert run_id_for(3, {}) == "fold3" and run_id_for(3, {"strength": 2.0, "loss": "bce"}) == "fold3_loss-bce_strength-2.0"
    assert len(run_id_for(0, {"methods": ["x" * 30] * 5})) < 40  # hashed when too long for a folder name


def test_plan_injects_fold_folders_and_templates(tmp_path):
    specs = plan_runs([PROBE], "1,4", "exp", fixed={"sleep_s": 0.0}, grid={"value": [0.1, 0.9]},
                      runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    assert [s.run_id for s in specs] == ["fold1_value-0.1", "fold1_value-0.9", "fold4_value-0.1", "fold4_value-0.9"]
    params = specs[2].parameters[0]
    assert params == {"fold": 4, "results_dir": str(tmp_path / "results" / "exp" / "fold4_value-0.1"),
                      "progress": False, "sleep_s": 0.0, "value": 0.1}
    templated = plan_runs([PROBE], "2", "exp", fixed={"results_dir": "{run_dir}/r{fold}"}, runs_root=tmp_path)
    assert templated[0].parameters[0]["results_dir"] == str(tmp_path / "exp" / "fold2" / "r2")
    with pytest.raises(ValueError, match="declares \\['valeu'\\]"):  # a typo is an error, not a silent default
        plan_runs([PROBE], "0", "exp", fixed={"valeu": 1})
    with pytest.raises(ValueError, match="both fixed and swept"):
        plan_runs([PROBE], "0", "exp", fixed={"value": 1}, grid={"value": [1, 2]})
    with pytest.raises(ValueError, match="experiment name"):
        plan_runs([PROBE], "0", "a/b")
    with pytest.raises(ValueError, match="only"):
        plan_runs([PROBE], "0", "exp", fixed={"results_dir": "{nope}"})
    assert specs[0].params_hash != specs[1].params_hash


def test_local_batch_retries_reports_failures_and_resumes(tmp_path):
    kwargs = dict(notebooks=[PROBE], folds="0,1", experiment="probe", runs_root=tmp_path / "runs",
                  results_root=tmp_path / "results", jobs=2, progress=False)
    table = run_batch(**kwargs, grid={"fail_attempts": [1, 5]})
    table = table.set_index("run_id")
    # failing once: the retry succeeds; failing always: reported after two attempts, the other runs finish
    assert list(table.loc[["fold0_fail_attempts-1", "fold1_fail_attempts-1"], "state"]) == ["done", "done"]
    assert list(table.loc[["fold0_fail_attempts-1", "fold1_fail_attempts-1"], "attempts"]) == [2, 2]
    failed = table.loc["fold1_fail_attempts-5"]
    assert failed.state == "failed" and failed.attempts == 2 and "probe failure on attempt 2" in failed.error
    assert table.loc["fold0_fail_attempts-1", "dsc_probe"] == 0.5
    summary = pd.read_csv(tmp_path / "results" / "probe" / "summary.csv")
    assert len(summary) == 4 and set(summary.state) == {"done", "failed"}
    rows = pd.read_csv(tmp_path / "results" / "probe" / "rows.csv")
    assert sorted(rows.run_id) == ["fold0_fail_attempts-1", "fold1_fail_attempts-1"] and set(rows.fail_attempts) == {1}
    assert set(rows.threads.astype(str)) == {str(max(1, (os.cpu_count() or 1) // 2))}  # cores shared among jobs
    params = json.loads((tmp_path / "results" / "probe" / "fold0_fail_attempts-1" / "params.json").read_text())
    assert params["notebooks"][0]["parameters"]["fail_attempts"] == 1
    executed = tmp_path / "runs" / "probe" / "fold1_fail_attempts-5" / "batch_probe.ipynb"
    assert "probe failure" in executed.read_text()  # the failed notebook is kept, with its traceback

    finished = tmp_path / "runs" / "probe" / "fold0_fail_attempts-1" / "batch_probe.ipynb"
    mtime = finished.stat().st_mtime_ns
    again = run_batch(**kwargs, grid={"fail_attempts": [1, 5]}).set_index("run_id")
    assert finished.stat().st_mtime_ns == mtime, "a finished run must not be recomputed"
    assert again.loc["fold0_fail_attempts-1", "state"] == "skipped"
    assert again.loc["fold0_fail_attempts-5", "state"] == "failed"  # failed runs are tried again on rerun
    # other parameters: the run is not the one that finished, so it runs again
    changed = run_batch(**kwargs, grid={"fail_attempts": [1]}, fixed={"value": 0.7}).set_index("run_id")
    assert changed.loc["fold0_fail_attempts-1", "state"] == "done" and changed.loc["fold0_fail_attempts-1", "dsc_probe"] == 0.7


def _kernel_socket_files() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("tfg-kernel-*")}


def test_killed_batch_resumes_without_recomputing_finished_folds(tmp_path):
    sockets_before = _kernel_socket_files()
    command = [sys.executable, "-m", "tfg_core.cli", "batch", str(PROBE), "-e", "killed", "--folds", "0-3",
               "-p", "sleep_s=2", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--quiet"]
    runs = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and read_status(runs / "fold1").get("state") != "done":
            time.sleep(0.2)
        assert read_status(runs / "fold1").get("state") == "done", "the batch did not get through two folds"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as an out-of-memory kill or a closed laptop would
        proc.wait()
    finished = {f: (runs / f / "batch_probe.ipynb").stat().st_mtime_ns for f in ("fold0", "fold1")}
    assert read_status(runs / "fold3").get("state") != "done"

    result = subprocess.run(command[:-1], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 finished earlier (skipped), 2 to run" in result.stdout
    assert {f: (runs / f / "batch_probe.ipynb").stat().st_mtime_ns for f in finished} == finished
    summary = pd.read_csv(tmp_path / "results" / "killed" / "summary.csv").set_index("run_id")
    assert list(summary.state) == ["skipped", "skipped", "done", "done"]
    for fold in ("fold0", "fold1"):  # each finished fold's notebook ran exactly once
        assert (tmp_path / "results" / "killed" / fold / "attempts.txt").read_text() == "1"
    if sys.platform.startswith("linux"):  # the killed kernel left no socket files behind
        assert _kernel_socket_files() <= sockets_before


def test_submitit_local_executor(tmp_path):
    pytest.importorskip("submitit")
    table = run_batch([PROBE], "0,1", "sub", executor="submitit-local", runs_root=tmp_path / "runs",
                      results_root=tmp_path / "results", grid={"fail_attempts": [0, 1]}, progress=False)
    assert list(table.state) == ["done"] * 4 and list(table.attempts) == [1, 2, 1, 2]
    assert (tmp_path / "runs" / "sub" / "submitit").is_dir()
    assert all(is_finished(s) for s in plan_runs([PROBE], "0,1", "sub", grid={"fail_attempts": [0, 1]},
                                                   runs_root=tmp_path / "runs", results_root=tmp_path / "results"))


def test_cli_dry_run_and_errors(tmp_path, capsys, monkeypatch):
    from tfg_core.cli import main

    assert main(["batch", str(PROBE), "-e", "dry", "--folds", "0-1", "-g", "value=0.1,0.2", "--dry-run",
                 "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "4 run(s)" in out and "fold1_value-0.2" in out and not (tmp_path / "runs").exists()
    assert main(["batch", str(PROBE), "-e", "dry", "-p", "strenght=2", "--dry-run"]) == 2
    assert "strenght" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "missing.ipynb"), "-e", "dry", "--dry-run"]) == 2
    assert "no such notebook" in capsys.readouterr().err
    monkeypatch.setattr("shutil.which", lambda name: None)  # a machine without SLURM
    assert main(["batch", str(PROBE), "-e", "slurm", "--executor", "slurm", "--runs", str(tmp_path / "runs"),
                 "--results", str(tmp_path / "results"), "--quiet"]) == 2
    assert "sbatch" in capsys.readouterr().err


@pytest.mark.slow
def test_chain_of_real_notebooks_hands_results_on(tmp_path, phantom_copy):
    """05 (baselines of a fold) then 06 (the report of the run's own results) for one fold, as one run."""
    phantom_copy(tmp_path / "phantom")
    table = run_batch([NOTEBOOKS / "05_baselines.ipynb", NOTEBOOKS / "06_report.ipynb"], "2", "chain",
                      fixed={"data_root": str(tmp_path / "phantom"), "methods": ["cam"], "results": ["{results_dir}"],
                             "relabel_experiment": "chain"},
                      runs_root=tmp_path / "runs", results_root=tmp_path / "results", progress=False)
    assert list(table.state) == ["done"], table.error.tolist()
    run = tmp_path / "results" / "chain" / "fold2"
    assert (run / "fold2_tiny_baselines.csv").is_file() and "CAM" in (run / "table1.md").read_text()
    assert table.loc[0, "dsc_cam"] >= 0
    assert [p.name for p in sorted((tmp_path / "runs" / "chain" / "fold2").glob("*.ipynb"))] == [
        "05_baselines.ipynb", "06_report.ipynb"]


@pytest.mark.skipif(os.name != "posix", reason="IPC sockets are POSIX-only; elsewhere papermill's TCP default is kept")
def test_parallel_runs_get_kernels_on_distinct_sockets():
    """Runs started in parallel must not race for TCP ports (a kernel died with "Address already in use" in CI):
    every kernel manager talks over Unix-domain sockets under a name of its own."""
    managers = [kernel_manager_class()() for _ in range(2)]
    assert [m.transport for m in managers] == ["ipc", "ipc"]
    assert managers[0].ip != managers[1].ip and all(len(m.ip) < 90 for m in managers)  # sun_path holds 107 bytes
    if sys.platform.startswith("linux"):  # abstract names: nothing on disk to leave behind
        assert all(m.ip.startswith("@tfg-kernel-") for m in managers)
