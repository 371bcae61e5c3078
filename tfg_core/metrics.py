"""Per-case segmentation metrics: Dice and symmetric mean surface distance in mm (MONAI's implementations).

Edge cases are reported, never hidden: an empty prediction against a non-empty ground truth scores
Dice 0 and MSD = inf; a case where both are empty has no defined Dice/MSD (NaN) and is flagged so tables
can exclude and count it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(mask, dtype=bool), dtype=torch.float32)[None, None]


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean (z, y, x) masks; 0 when only one is empty, NaN when both are.

    Args:
        pred: predicted mask.
        gt: ground-truth mask.
    """
    if not np.any(pred) and not np.any(gt):
        return math.nan
    return float(compute_dice(_as_batch(pred), _as_batch(gt), include_background=True, ignore_empty=False)[0, 0])


def mean_surface_distance(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Symmetric mean surface distance in mm with the scan's (anisotropic) spacing.

    Args:
        pred: predicted mask (z, y, x).
        gt: ground-truth mask (z, y, x).
        spacing_zyx: voxel size (z, y, x) in mm.
    """
    pred_any, gt_any = bool(np.any(pred)), bool(np.any(gt))
    if not pred_any and not gt_any:
        return math.nan
    if not pred_any or not gt_any:
        return math.inf
    value = compute_average_surface_distance(_as_batch(pred), _as_batch(gt), include_background=True, symmetric=True,
                                             spacing=[float(s) for s in spacing_zyx])
    return float(value[0, 0])


def case_metrics(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]) -> dict[str, float | int | bool]:
    """One tidy row of metrics for a case.

    Args:
        pred: predicted mask (z, y, x).
        gt: ground-truth mask (z, y, x).
        spacing_zyx: voxel size (z, y, x) in mm.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    return {
        "dsc": dice_score(pred, gt),
        "msd_mm": mean_surface_distance(pred, gt, spacing_zyx),
        "pred_voxels": int(pred.sum()),
        "gt_voxels": int(gt.sum()),
        "empty_pred": not pred.any(),
        "both_empty": not pred.any() and not gt.any(),
    }
