"""A cohort's inventory: every scan read once through the full data path, one row of facts (or the error) each.

What preprocessing does to a scan (reorient to LPS, resample to the model grid, HU → [0, 1], lung mask, ground
truth, weak slice labels) is done lazily by the readers; this module runs it over a whole cohort up front so a
corrupt ``.mhd``, a wrong spacing or an annotation outside its scan shows up as one named row of a table instead
of as a crash in fold 7 of a batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from tfg_core.data.cases import Case, load_case
from tfg_core.errors import TfgError

SPACING_RANGE_MM = (0.3, 10.0)  # LUNA16 has 0.46–0.98 mm in-plane, 0.45–2.5 mm between slices


def scan_record(case: Case, sliced=None, grid_multiple: int = 32) -> dict[str, Any]:
    """Facts about one loaded scan: geometry, the model grid it goes to, nodules, weak slice labels, lung share.

    Args:
        case: a loaded scan.
        sliced: its :class:`~tfg_core.training.slice_data.SliceCase` when already made (else made here).
        grid_multiple: the model grid's side multiple.
    """
    from tfg_core.training.slice_data import slice_case_from

    if sliced is None:
        sliced = slice_case_from(case, grid_multiple)  # the model-grid volume and its weak slice labels
    volume = case.volume
    hu = volume.array
    return {
        "seriesuid": case.uid, "subset": case.subset, "ground_truth": case.ground_truth,
        "shape": "x".join(map(str, volume.shape)), "model_grid": "x".join(map(str, sliced.volume.shape)),
        "spacing_mm": "x".join(f"{s:g}" for s in volume.spacing),
        "hu_min": float(np.min(hu)), "hu_max": float(np.max(hu)),
        "n_nodules": len(case.annotations), "nodule_voxels": int(case.nodule_mask.sum()),
        "positive_slices": int(sliced.labels.sum()), "slices": int(len(sliced.labels)),
        "lung_fraction": round(float(case.lung_mask.mean()), 3),
        "warning": _warnings(case), "error": "",
    }


def _warnings(case: Case) -> str:
    """Things that load but deserve a look (empty masks, odd spacing, an annotation with no voxel)."""
    notes = []
    low, high = SPACING_RANGE_MM
    if any(not low <= s <= high for s in case.volume.spacing):
        notes.append(f"spacing {case.volume.spacing} mm outside {low}–{high} mm")
    if not case.lung_mask.any():
        notes.append("empty lung mask")
    if len(case.annotations) and not case.nodule_mask.any():
        notes.append(f"{len(case.annotations)} annotation(s) but no nodule voxel")
    return "; ".join(notes)


def inventory(root: str | os.PathLike, manifest: pd.DataFrame, annotations: pd.DataFrame,
              uids: Sequence[str] | None = None, ground_truth: str = "auto", on_error: str = "record",
              progress: bool = False) -> pd.DataFrame:
    """Read every scan (or ``uids``) and tabulate :func:`scan_record`; unreadable scans get an ``error`` row.

    Args:
        root: LUNA16-shaped root.
        manifest: its manifest.
        annotations: its annotation table.
        uids: which scans (default: the whole manifest, in order).
        ground_truth: ``auto`` | ``sphere`` | ``mask`` | ``lidc``.
        on_error: ``"record"`` (an error row naming the file and the problem, then go on) or ``"raise"``.
        progress: progress bar.
    """
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    rows = manifest.set_index("seriesuid", drop=False)
    uids = list(manifest.seriesuid) if uids is None else list(uids)
    records = []
    for uid in tqdm(uids, disable=not progress, desc="inventory"):
        row = rows.loc[uid]
        try:
            records.append(scan_record(load_case(root, row, annotations, ground_truth=ground_truth)))
        except (TfgError, OSError, RuntimeError, ValueError) as exc:
            if on_error == "raise":
                raise
            records.append({"seriesuid": uid, "subset": int(row["subset"]),
                            "error": f"{Path(str(row['path'])).name}: {exc}"})
    return pd.DataFrame.from_records(records)


def fold_table(table: pd.DataFrame, fold: int, val_offset: int = 1) -> pd.DataFrame:
    """Scans, scans with nodules, nodules and positive/negative slices per role (train / val / test) of a fold.

    Args:
        table: an :func:`inventory`.
        fold: the held-out fold (test = subset ``fold``, validation = the next subset).
        val_offset: validation subset offset (as :func:`tfg_core.data.folds.fold_split`).
    """
    from tfg_core.data.folds import fold_split

    split = fold_split(table, fold, val_offset)  # the one place that says which subset plays which role
    role = {**{u: "train" for u in split.train}, **{u: "val" for u in split.val}, **{u: "test" for u in split.test}}
    ok = table.assign(role=table.seriesuid.map(role))[table.get("error", pd.Series("", index=table.index)).fillna("") == ""]
    out = ok.groupby("role").agg(scans=("seriesuid", "size"), scans_with_nodules=("n_nodules", lambda n: int((n > 0).sum())),
                                 nodules=("n_nodules", "sum"), positive_slices=("positive_slices", "sum"),
                                 slices=("slices", "sum"))
    out["negative_slices"] = out.slices - out.positive_slices
    out["positive_share"] = (out.positive_slices / out.slices).round(3)
    return out.reindex(["train", "val", "test"]).drop(columns="slices")


def compare_to_pinned(table: pd.DataFrame, pinned_csv: str | os.PathLike) -> pd.DataFrame:
    """Scans whose subset or nodule count differs from a pinned list (``data_manifest/*.csv``), or are missing.

    Returns one row per disagreement (``seriesuid``, ``problem``); empty when the data is the pinned data.

    Args:
        table: an :func:`inventory` (or a manifest with ``n_nodules``).
        pinned_csv: CSV with ``seriesuid``, ``subset`` and ``n_nodules``.
    """
    pinned = pd.read_csv(pinned_csv, dtype={"seriesuid": str}).set_index("seriesuid")
    have = table.set_index("seriesuid")
    problems = [{"seriesuid": u, "problem": "missing from the data"} for u in pinned.index.difference(have.index)]
    problems += [{"seriesuid": u, "problem": "not in the pinned list"} for u in have.index.difference(pinned.index)]
    for uid in pinned.index.intersection(have.index):
        for column in ("subset", "n_nodules"):
            if column in have and pd.notna(have.at[uid, column]) and int(have.at[uid, column]) != int(pinned.at[uid, column]):
                problems.append({"seriesuid": uid, "problem": f"{column} {int(have.at[uid, column])}, pinned "
                                                              f"{int(pinned.at[uid, column])}"})
    return pd.DataFrame(problems, columns=["seriesuid", "problem"])
