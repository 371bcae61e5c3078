"""Batches of notebook runs over folds and parameter grids: ``tfg batch`` (local pool or SLURM via submitit).

Layout::

    runs/<experiment>/<run_id>/<notebook>.ipynb     executed notebooks (outputs kept), status.json
    results/<experiment>/<run_id>/                   what the notebooks write, params.json
    results/<experiment>/summary.csv, rows.csv       one row per run; all tidy result rows with the grid columns
    results/<experiment>/batch.json                  the invocation

Finished runs are skipped on rerun (same notebooks and parameters), a failed run is retried once and reported,
the others go on.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tfg_core.batch.execute import execute_run, is_finished, read_status
from tfg_core.batch.executors import EXECUTORS, ClusterResources, run_local, run_submitit
from tfg_core.batch.plan import RunSpec, expand_grid, parse_assignments, parse_folds, plan_runs
from tfg_core.batch.summary import summarise_batch, tidy_rows
from tfg_core.io import atomic_write_text

__all__ = ["EXECUTORS", "ClusterResources", "RunSpec", "execute_run", "expand_grid", "is_finished",
           "parse_assignments", "parse_folds", "plan_runs", "prepare_phantom_cohorts", "read_status", "run_batch",
           "summarise_batch", "tidy_rows"]


def prepare_phantom_cohorts(specs: Sequence[RunSpec]) -> list[Path]:
    """Write the phantom cohort(s) the runs will read, once, before they start in parallel.

    A notebook opens (and on first use writes) the phantom tree named by its ``data_root``; ten runs starting
    together would all write the same files. Cohorts of ``dataset="luna16"`` runs are left alone.

    Args:
        specs: the planned runs.
    """
    from tfg_core.batch.plan import notebook_parameters
    from tfg_core.experiment import open_cohort, resolve_path

    roots: set[Path] = set()
    for notebook in {nb for s in specs for nb in s.notebooks}:
        declared = notebook_parameters(notebook)
        if "data_root" not in declared:
            continue
        default = {k: _literal(v.get("default")) for k, v in declared.items()}
        for spec in specs:
            params = {**default, **spec.parameters[spec.notebooks.index(notebook)]}
            if params.get("dataset", "phantom") == "phantom":
                roots.add(resolve_path(params["data_root"]))
    for root in sorted(roots):
        open_cohort("phantom", root)
    return sorted(roots)


def _literal(text: Any) -> Any:
    try:
        return ast.literal_eval(text) if isinstance(text, str) else text
    except (ValueError, SyntaxError):
        return text


def run_batch(notebooks: Sequence[str | os.PathLike], folds: str | Sequence[int], experiment: str,
              fixed: Mapping[str, Any] | None = None, grid: Mapping[str, Sequence[Any]] | None = None,
              sets: Sequence[Mapping[str, Any]] | None = None, executor: str = "local", jobs: int = 1,
              runs_root: str | os.PathLike = "runs", results_root: str | os.PathLike = "results",
              retries: int = 1, threads: int | None = None, resources: ClusterResources | None = None,
              dry_run: bool = False, progress: bool = True) -> pd.DataFrame:
    """Plan, run (skipping finished runs) and summarise a batch; returns the summary table.

    Args:
        notebooks: the notebook chain each run executes, in order.
        folds: held-out folds (``"0-9"``, ``"0,3"`` or ints).
        experiment: experiment name (folder under ``runs/`` and ``results/``).
        fixed: parameters shared by all runs.
        grid: parameters to sweep (full product).
        sets: explicit parameter sets (e.g. a one-at-a-time ablation list).
        executor: ``"local"`` (process pool), ``"slurm"`` or ``"submitit-local"`` (submitit's local executor).
        jobs: concurrent local runs.
        runs_root: root of the executed notebooks.
        results_root: root of the results.
        retries: restarts of a failed run.
        threads: ``OMP_NUM_THREADS`` per run; None: the machine's cores shared among ``jobs`` (local), 0: inherit.
        resources: cluster resources per run (SLURM).
        dry_run: only print the plan.
        progress: print one line per finished run and a progress bar.
    """
    from tqdm.auto import tqdm

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, jobs)) if executor == "local" else 0
    specs = plan_runs(notebooks, parse_folds(folds), experiment, fixed, grid, sets, runs_root, results_root,
                      retries, threads)
    finished = [is_finished(s) for s in specs]
    done = [s for s, f in zip(specs, finished) if f]
    todo = [s for s, f in zip(specs, finished) if not f]
    out_dir = Path(results_root).resolve() / experiment
    print(f"batch {experiment}: {len(specs)} run(s) of {' → '.join(Path(n).name for n in specs[0].notebooks)}; "
          f"{len(done)} finished earlier (skipped), {len(todo)} to run ({executor}"
          f"{f', {jobs} at a time' if executor == 'local' else ''})", flush=True)
    if dry_run:
        for spec in specs:
            state = "finished" if spec in done else "to run"
            print(f"  {spec.run_id:<40} {state:<9} " + " | ".join(json.dumps(p, default=str) for p in spec.parameters))
        return pd.DataFrame([{"run_id": s.run_id, "fold": s.fold, **s.grid_point,
                              "state": "finished" if s in done else "planned"} for s in specs])

    atomic_write_text(out_dir / "batch.json", json.dumps({
        "experiment": experiment, "notebooks": [str(n) for n in specs[0].notebooks], "folds": sorted({s.fold for s in specs}),
        "fixed": dict(fixed or {}), "grid": dict(grid or {}), "sets": list(sets or []), "executor": executor,
        "jobs": jobs, "retries": retries, "threads": threads, "command": sys.argv, "commit": _git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2, default=str))
    prepare_phantom_cohorts(todo)

    bar = tqdm(total=len(todo), disable=not progress or not todo, desc=f"batch {experiment}", unit="run")

    def report(outcome: dict[str, Any]) -> None:
        bar.update(1)
        if progress:
            note = f" after {outcome['attempts']} attempts" if outcome["attempts"] > 1 else ""
            line = f"  {outcome['run_id']}: {outcome['state']}{note} ({outcome['seconds']:.0f} s)"
            bar.write(line + (f" — {outcome['error']}" if outcome["error"] else ""))

    if executor == "local":
        ran = run_local(todo, jobs, report)
    else:
        cluster = "slurm" if executor == "slurm" else "local"
        ran = run_submitit(todo, Path(runs_root).resolve() / experiment / "submitit", cluster, resources, report)
    bar.close()
    by_id = {o["run_id"]: o for o in ran}
    outcomes = [by_id.get(s.run_id) or execute_run(s) for s in specs]  # finished earlier: read from its status
    table = summarise_batch(specs, outcomes, out_dir)
    if progress:
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 60):
            print(table.drop(columns=["error"] if not table.error.astype(bool).any() else []).to_string(index=False))
        failed = table[table.state == "failed"]
        print(f"{len(table) - len(failed)} of {len(table)} run(s) finished"
              + (f"; FAILED: {', '.join(failed.run_id)} (executed notebooks in {Path(runs_root) / experiment})"
                 if len(failed) else "") + f"; summary in {out_dir / 'summary.csv'}")
    return table


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
