"""Where a batch's runs execute: a local process pool, or a cluster through submitit (SLURM job arrays).

Both hand :func:`tfg_core.batch.execute.execute_run` a :class:`~tfg_core.batch.plan.RunSpec` and get its outcome
back, so resuming, retrying and reporting behave the same on a laptop and on a cluster. Each local run gets a
process of its own: papermill changes the working directory while it executes (``cwd``), which threads would
share.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfg_core.batch.execute import describe_error, execute_run
from tfg_core.batch.plan import RunSpec

EXECUTORS = ("local", "slurm", "submitit-local")
Outcome = dict[str, Any]


def _failed(spec: RunSpec, error: str) -> Outcome:
    return {"run_id": spec.run_id, "fold": spec.fold, "state": "failed", "attempts": 0, "seconds": 0.0,
            "error": error, "notebooks": [], "params_hash": spec.params_hash}


def run_local(specs: Sequence[RunSpec], jobs: int = 1, on_outcome: Callable[[Outcome], None] | None = None,
              ) -> list[Outcome]:
    """Run in a pool of ``jobs`` processes (``jobs=1``: one after the other in a child process).

    Args:
        specs: the runs.
        jobs: concurrent runs.
        on_outcome: called with each outcome as it arrives (progress, logging).
    """
    outcomes: dict[str, Outcome] = {}
    # spawn: a fresh interpreter per worker, no inherited threads or open kernels from the caller
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_execute_logged, spec): spec for spec in specs}
        for future in as_completed(futures):
            spec = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker that died (killed, out of memory) fails its run only
                outcome = _failed(spec, f"worker died: {describe_error(exc)}")
            outcomes[spec.run_id] = outcome
            if on_outcome is not None:
                on_outcome(outcome)
    return [outcomes[s.run_id] for s in specs]


def _execute_logged(spec: RunSpec) -> Outcome:
    """:func:`execute_run` in a pool worker, with the worker's and its kernels' console output in ``run.log``."""
    log = Path(spec.run_dir) / "run.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:  # kernels inherit file descriptors 1 and 2: redirect those, not sys.stdout
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    return execute_run(spec)


@dataclass
class ClusterResources:
    """What each run asks the scheduler for (submitit's parameter names in brackets).

    Args:
        partition: SLURM partition [slurm_partition]; empty: the cluster's default.
        gpus: GPUs per run [gpus_per_node].
        cpus: CPU cores per run [cpus_per_task].
        mem_gb: memory per run [mem_gb].
        time_min: wall-time limit per run in minutes [timeout_min].
        array_parallelism: at most this many array tasks at once [slurm_array_parallelism].
        account: SLURM account [slurm_account]; empty: none.
        extra: further ``slurm_*`` parameters passed as they are (e.g. ``{"slurm_qos": "short"}``).
    """

    partition: str = ""
    gpus: int = 0
    cpus: int = 2
    mem_gb: int = 16
    time_min: int = 120
    array_parallelism: int = 10
    account: str = ""
    extra: dict[str, Any] | None = None

    def submitit_parameters(self, name: str) -> dict[str, Any]:
        params: dict[str, Any] = {"name": name, "timeout_min": self.time_min, "cpus_per_task": self.cpus,
                                  "mem_gb": self.mem_gb, "gpus_per_node": self.gpus, "tasks_per_node": 1,
                                  "slurm_array_parallelism": self.array_parallelism}
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.account:
            params["slurm_account"] = self.account
        params.update(self.extra or {})
        return params


def run_submitit(specs: Sequence[RunSpec], folder: str | os.PathLike, cluster: str = "slurm",
                 resources: ClusterResources | None = None,
                 on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Submit the runs as one submitit job array and wait for them.

    ``cluster="slurm"`` submits to SLURM (``sbatch`` must be on the PATH); ``"local"`` runs the same job array as
    local processes (all at once: keep the array small), which is how CI tests this path without a scheduler.
    Jobs' stdout/stderr and pickled results are in ``folder`` (``%j`` = job id).

    Args:
        specs: the runs.
        folder: submitit's log folder.
        cluster: ``"slurm"`` or ``"local"``.
        resources: what each run asks for.
        on_outcome: called with each outcome as it arrives.
    """
    try:
        import submitit
    except ImportError as exc:  # an optional dependency: say how to get it
        raise RuntimeError("the SLURM executor needs submitit: pip install submitit (or the [notebooks] extra)") from exc
    if not specs:
        return []
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise RuntimeError("--executor slurm needs SLURM's sbatch on the PATH: run tfg batch on the cluster's login "
                           "node (or use --executor local)")
    resources = resources or ClusterResources()
    executor = submitit.AutoExecutor(folder=str(Path(folder) / "%j"), cluster=cluster)
    params = resources.submitit_parameters(f"tfg-{specs[0].experiment}")
    if cluster == "local":  # the local executor knows neither memory nor CPU requests
        params = {k: v for k, v in params.items() if k in {"name", "timeout_min", "gpus_per_node", "tasks_per_node"}
                  or k.startswith("slurm_")}
    executor.update_parameters(**params)
    jobs = executor.map_array(execute_run, list(specs))
    print(f"submitted {len(jobs)} run(s) as job array {jobs[0].job_id.split('_')[0]} ({cluster}); logs in {folder}",
          flush=True)
    outcomes = []
    for spec, job in zip(specs, jobs):
        try:
            outcome = job.result()
        except Exception as exc:  # noqa: BLE001 - timeouts, preemption, node failures: this run fails, others go on
            outcome = _failed(spec, f"job {job.job_id}: {describe_error(exc).splitlines()[0][:300]}")
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return outcomes
