"""Where a slice classifier's errors sit relative to the nodules: at a nodule's first or last slice, or elsewhere.

A weak slice label says "the centre slice holds at least one nodule voxel". At a nodule's top and bottom that
voxel is often a partial-volume sliver (one or two voxels, a faint excess over the lung), and the slice next to
it, labelled negative, holds a fainter one. Errors there ask how small a signal the classifier can read; errors
away from any nodule are confusions with anatomy. :func:`slice_error_table` lists every slice with its nodule
context and :func:`summarize_slice_errors` counts the four kinds, so a notebook can show which kind dominates.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from tfg_core.training.slice_data import SliceCase

# distance (in slices) to the nearest positive slice when a scan has none
NO_NODULE = -1
ERROR_KINDS = ("FN edge", "FN inside", "FP next to nodule", "FP elsewhere")


def _distance_to_positive(labels: np.ndarray) -> np.ndarray:
    positives = np.flatnonzero(labels)
    if not len(positives):
        return np.full(len(labels), NO_NODULE)
    return np.abs(np.arange(len(labels))[:, None] - positives[None, :]).min(axis=1)


def slice_error_table(cases: Sequence[SliceCase], probs: np.ndarray | Sequence[np.ndarray],
                      threshold: float = 0.5) -> pd.DataFrame:
    """One row per slice: label, probability, call, its nodule context and the kind of error.

    Args:
        cases: scans, each with ``labels`` (and ``nodule_voxels`` when known).
        probs: positive probabilities, one array per case or all slices concatenated in case order.
        threshold: the call is positive at ``prob >= threshold``.

    Returns:
        columns ``uid``, ``z``, ``label``, ``prob``, ``call``, ``nodule_voxels`` (−1 when unknown), ``edge`` (a
        positive slice whose neighbour above or below is negative or outside the scan), ``distance`` (slices to
        the nearest positive slice, −1 in a scan without nodules) and ``kind``: ``TP``, ``TN``, ``FN edge``,
        ``FN inside``, ``FP next to nodule`` (distance 1) or ``FP elsewhere``.
    """
    depths = [len(c.labels) for c in cases]
    if isinstance(probs, np.ndarray) and probs.ndim == 1:
        if len(probs) != sum(depths):
            raise ValueError(f"{len(probs)} probabilities for {sum(depths)} slices")
        probs = np.split(probs, np.cumsum(depths)[:-1])
    if len(probs) != len(cases):
        raise ValueError(f"{len(probs)} probability arrays for {len(cases)} cases")
    frames = []
    for case, p in zip(cases, probs):
        labels = np.asarray(case.labels, bool)
        p = np.asarray(p, float)
        if p.shape != labels.shape:
            raise ValueError(f"{case.uid}: {p.shape[0]} probabilities for {labels.shape[0]} slices")
        padded = np.pad(labels, 1)
        edge = labels & ~(padded[:-2] & padded[2:])
        voxels = np.full(len(labels), -1) if case.nodule_voxels is None else np.asarray(case.nodule_voxels, int)
        frames.append(pd.DataFrame({"uid": case.uid, "z": np.arange(len(labels)), "label": labels, "prob": p,
                                    "call": p >= threshold, "nodule_voxels": voxels, "edge": edge,
                                    "distance": _distance_to_positive(labels)}))
    table = pd.concat(frames, ignore_index=True)
    kind = np.where(table.label, np.where(table.call, "TP", np.where(table.edge, "FN edge", "FN inside")),
                    np.where(~table.call, "TN", np.where(table.distance == 1, "FP next to nodule", "FP elsewhere")))
    return table.assign(kind=kind)


def summarize_slice_errors(table: pd.DataFrame) -> pd.Series:
    """Counts of each error kind in a :func:`slice_error_table`, the F1 they make, and the share of the errors
    that touch a nodule's boundary (``FN edge`` + ``FP next to nodule``).

    Args:
        table: output of :func:`slice_error_table`.
    """
    counts = table.kind.value_counts().to_dict()
    n = {kind: int(counts.get(kind, 0)) for kind in ERROR_KINDS + ("TP",)}
    fn, fp = n["FN edge"] + n["FN inside"], n["FP next to nodule"] + n["FP elsewhere"]
    errors = fn + fp
    return pd.Series({
        "positive slices": n["TP"] + fn, "TP": n["TP"], **{kind: n[kind] for kind in ERROR_KINDS},
        "F1": 2 * n["TP"] / (2 * n["TP"] + errors) if n["TP"] + errors else float("nan"),
        "boundary share of errors": (n["FN edge"] + n["FP next to nodule"]) / errors if errors else float("nan"),
    })
