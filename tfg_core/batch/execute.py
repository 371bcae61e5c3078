"""Execute one planned run: its notebook chain under papermill, resumable and retried once.

``runs/<experiment>/<run_id>/status.json`` is the run's memory: which notebooks of the chain finished with which
parameters. A rerun skips a finished run (or a finished first half of a chain); a killed run has no "done" in
its status and starts again. Every status and parameter file is written atomically. This function never
raises for a failing notebook: it reports it, so the rest of the batch goes on.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from tfg_core.batch.plan import RunSpec
from tfg_core.io import atomic_write_text

STATUS = "status.json"
PARAMS = "params.json"
# papermill hands the kernel our environment: these cap the threads of the numeric libraries in it
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def kernel_socket_base() -> str:
    """A fresh, unique base name for one kernel's Unix-domain sockets (the kernel appends "-<n>" per socket).

    On Linux a name in the abstract namespace (leading "@", no file behind it): the sockets vanish with the
    kernel, also when a batch is killed with SIGKILL and nothing gets to clean up. Elsewhere on POSIX a path in
    the temporary directory, whose files jupyter_client removes when the kernel is shut down normally.
    """
    name = f"tfg-kernel-{uuid.uuid4().hex[:16]}"
    return f"@{name}" if sys.platform.startswith("linux") else os.path.join(tempfile.gettempdir(), name)


def kernel_manager_class() -> type | None:
    """A Jupyter kernel manager whose kernel talks over Unix-domain sockets with a unique name, on POSIX.

    With TCP, jupyter_client picks five free ports and the kernel binds them a moment later; runs started in
    parallel on one machine (``submitit-local``, a local process pool) can pick the same port in that moment, and the
    kernel dies with "ZMQError: Address already in use" (seen in CI). Sockets named per kernel
    (:func:`kernel_socket_base`) cannot collide. None (papermill's default TCP manager) on Windows, which has no IPC
    transport.
    """
    if os.name != "posix":
        return None
    from jupyter_client import AsyncKernelManager

    class IpcKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = kernel_socket_base()

    return IpcKernelManager


def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``status.json`` (empty when absent or unreadable: the run then counts as not started).

    Args:
        run_dir: the run's folder under ``runs/``.
    """
    path = Path(run_dir) / STATUS
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def is_finished(spec: RunSpec) -> bool:
    """True when the run finished earlier with the same notebooks and parameters.

    Args:
        spec: the planned run.
    """
    status = read_status(spec.run_dir)
    return status.get("state") == "done" and status.get("params_hash") == spec.params_hash


def describe_error(exc: BaseException) -> str:
    """One line naming what failed: the notebook cell's exception for papermill errors, else the exception.

    Args:
        exc: the exception.
    """
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        where = f"cell {exc.exec_count}: " if getattr(exc, "exec_count", None) else ""
        return f"{where}{ename}: {evalue}".strip()
    return f"{type(exc).__name__}: {exc}".strip()


def execute_run(spec: RunSpec) -> dict[str, Any]:
    """Run a planned run's notebook chain (skipping what already finished) and report the outcome.

    Returns a dict with ``run_id``, ``fold``, ``state`` (``done`` | ``skipped`` = finished before | ``failed``),
    ``attempts``, ``seconds``, ``error`` and the executed notebooks' paths.

    Args:
        spec: the planned run (from :func:`tfg_core.batch.plan.plan_runs`).
    """
    import papermill as pm

    run_dir, results_dir = Path(spec.run_dir), Path(spec.results_dir)
    outcome: dict[str, Any] = {"run_id": spec.run_id, "fold": spec.fold, "state": "skipped", "attempts": 0,
                               "seconds": 0.0, "error": "", "notebooks": [], "params_hash": spec.params_hash}
    status = read_status(run_dir)
    if status.get("params_hash") != spec.params_hash:
        status = {}  # never run, or run with other parameters: nothing of it is reused
    if status.get("state") == "done":
        outcome.update(seconds=status.get("seconds", 0.0), attempts=status.get("attempts", 0),
                       notebooks=status.get("notebooks", []))
        return outcome

    if spec.threads:
        for name in _THREAD_VARIABLES:
            os.environ[name] = str(spec.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    record = {"experiment": spec.experiment, "run_id": spec.run_id, "fold": spec.fold, "grid": spec.grid_point,
              "notebooks": [{"notebook": nb, "parameters": p} for nb, p in zip(spec.notebooks, spec.parameters)],
              "params_hash": spec.params_hash}
    atomic_write_text(results_dir / PARAMS, json.dumps(record, indent=2, default=str))
    finished_steps: list[str] = list(status.get("finished_steps", []))
    started = time.perf_counter()
    executed = [str(run_dir / Path(nb).name) for nb in spec.notebooks]

    def save(state: str, attempt: int, error: str = "") -> None:
        atomic_write_text(run_dir / STATUS, json.dumps(
            {"state": state, "params_hash": spec.params_hash, "finished_steps": finished_steps, "attempts": attempt,
             "seconds": round(time.perf_counter() - started, 3), "error": error, "notebooks": executed,
             "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))

    manager = {"kernel_manager_class": cls} if (cls := kernel_manager_class()) is not None else {}
    for attempt in range(1, spec.retries + 2):
        save("running", attempt)
        try:
            for notebook, parameters, output in zip(spec.notebooks, spec.parameters, executed):
                step = Path(notebook).name
                if step in finished_steps:
                    continue  # this part of the chain finished in an earlier attempt or batch
                pm.execute_notebook(notebook, output, parameters=parameters, kernel_name=spec.kernel_name,
                                    progress_bar=False, log_output=False, cwd=str(results_dir), **manager)
                finished_steps.append(step)
                save("running", attempt)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the batch goes on
            error = f"{Path(notebook).name}: {describe_error(exc)}"
            save("failed", attempt, error)
            outcome.update(state="failed", attempts=attempt, error=error,
                           traceback=traceback.format_exc(limit=3))
            continue
        save("done", attempt)
        outcome.update(state="done", attempts=attempt, error="")
        outcome.pop("traceback", None)
        break
    outcome.update(seconds=round(time.perf_counter() - started, 3), notebooks=executed)
    return outcome
