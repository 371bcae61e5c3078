"""Per-case segmentation metrics: Dice and symmetric mean surface distance in mm (MONAI's implementations).

Edge cases are reported, never hidden: an empty prediction against a non-empty ground truth scores
Dice 0 and MSD = inf; a case where both are empty has no defined Dice/MSD (NaN) and is flagged so tables
can exclude and count it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

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
    with warnings.catch_warnings():  # MONAI 1.6 warns about an argument it passes to itself; nothing for users to do
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_average_surface_distance(_as_batch(pred), _as_batch(gt), include_background=True,
                                                 symmetric=True, spacing=[float(s) for s in spacing_zyx])
    return float(value[0, 0])


def peak_distance_mm(score_map: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Distance in mm from the map's maximum to the nearest ground-truth voxel (0 inside; NaN without a nodule
    or without any positive value in the map, i.e. nothing was pointed at).

    A resolution-free check of where a method looks, before any threshold: "is the strongest evidence on the
    nodule?" Ties of the maximum take the first voxel in C order.

    Args:
        score_map: (z, y, x) map, larger = more nodule-like.
        gt: (z, y, x) ground truth on the same grid.
        spacing_zyx: voxel size (z, y, x) in mm.
    """
    from scipy import ndimage

    score_map, gt = np.asarray(score_map), np.asarray(gt, dtype=bool)
    if score_map.shape != gt.shape:
        raise ValueError(f"map shape {score_map.shape} differs from the ground truth's {gt.shape}")
    if not gt.any() or not np.nanmax(score_map) > 0:
        return math.nan
    peak = np.unravel_index(int(np.nanargmax(score_map)), score_map.shape)
    return float(ndimage.distance_transform_edt(~gt, sampling=[float(s) for s in spacing_zyx])[peak])


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
