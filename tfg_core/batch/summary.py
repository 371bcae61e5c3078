"""A batch's summary: one row per run (state, attempts, time, error, mean Dice per method) and all tidy rows.

Tidy result rows (``method``, ``dsc``, ``gt_voxels``, …, as :func:`tfg_core.evaluate.evaluate_fold` writes them)
found anywhere in a run's results folder are collected into ``results/<experiment>/rows.csv`` with the run's
swept parameters as extra columns, ready for an ablation plot or ``tfg report``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tfg_core.batch.plan import RunSpec
from tfg_core.io import atomic_write_text


def tidy_rows(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Every tidy result row under a run's results folder, each once (empty when there are none).

    Args:
        results_dir: the run's results folder.
    """
    from tfg_core.errors import DataError
    from tfg_core.report import read_result_rows

    try:
        return read_result_rows([results_dir], recursive=True)
    except DataError:
        return pd.DataFrame()


def summarise_batch(specs: Sequence[RunSpec], outcomes: Sequence[dict[str, Any]],
                    out_dir: str | os.PathLike) -> pd.DataFrame:
    """Write ``summary.csv`` and ``rows.csv`` to ``out_dir`` (atomically) and return the summary.

    Args:
        specs: the planned runs.
        outcomes: their outcomes, in the same order.
        out_dir: ``results/<experiment>/``.
    """
    out_dir = Path(out_dir)
    summary, collected = [], []
    for spec, outcome in zip(specs, outcomes):
        row = {"run_id": spec.run_id, "fold": spec.fold, **{k: _cell(v) for k, v in spec.grid_point.items()},
               "state": outcome["state"], "attempts": outcome["attempts"], "seconds": outcome["seconds"],
               "error": outcome.get("error", "")}
        rows = tidy_rows(spec.results_dir) if outcome["state"] in ("done", "skipped") else pd.DataFrame()
        if len(rows):
            scored = rows[rows.gt_voxels > 0]
            for method, dsc in scored.groupby("method", sort=False).dsc.mean().items():
                row[f"dsc_{method}"] = round(float(dsc), 4)
            rows.insert(0, "run_id", spec.run_id)
            for name, value in spec.grid_point.items():
                rows[name] = _cell(value)
            collected.append(rows)
        summary.append(row)
    table = pd.DataFrame(summary)
    atomic_write_text(out_dir / "summary.csv", table.to_csv(index=False))
    if collected:
        atomic_write_text(out_dir / "rows.csv", pd.concat(collected, ignore_index=True).to_csv(index=False))
    return table


def _cell(value: Any) -> Any:
    """Lists as text in a table cell."""
    return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else value
