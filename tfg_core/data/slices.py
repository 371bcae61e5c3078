"""2.5D stacks: each axial slice with its neighbours as channels, the predictors' input.

Written in torch on purpose: the guidance loop builds stacks from a decoded volume that carries gradients,
so stacking must be differentiable (an index gather) rather than a numpy copy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

N_SLICES = 9


def stack_indices(depth: int, centres: Sequence[int] | torch.Tensor, n_slices: int = N_SLICES) -> torch.Tensor:
    """Slice indices (N, n_slices) around each centre; edges replicate the first/last slice.

    Args:
        depth: number of axial slices in the volume.
        centres: centre slice index of each stack.
        n_slices: stack depth, odd (9 in the paper).
    """
    if n_slices % 2 != 1:
        raise ValueError(f"n_slices must be odd so the centre slice is defined, got {n_slices}")
    centres = torch.as_tensor(centres, dtype=torch.long).reshape(-1, 1)
    if centres.numel() and (centres.min() < 0 or centres.max() >= depth):
        raise IndexError(f"centre slices must lie in [0, {depth - 1}], got {centres.flatten().tolist()}")
    half = n_slices // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.long).reshape(1, -1)
    return (centres + offsets).clamp_(0, depth - 1)


def make_stacks(
    volume: torch.Tensor | np.ndarray,
    centres: Sequence[int] | torch.Tensor | None = None,
    n_slices: int = N_SLICES,
    size: int | None = None,
) -> torch.Tensor:
    """Build 2.5D stacks (N, n_slices, H, W) from a (z, y, x) volume in [0, 1].

    Args:
        volume: (z, y, x) array or tensor; gradients flow through when it is a tensor requiring grad.
        centres: centre slice of each stack; all slices when None.
        n_slices: slices per stack (channels), odd.
        size: resize each slice to ``size``×``size`` (bilinear) for the predictor; None keeps the grid.
    """
    vol = torch.as_tensor(volume, dtype=torch.float32) if not isinstance(volume, torch.Tensor) else volume
    if vol.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {tuple(vol.shape)}")
    depth = vol.shape[0]
    centres = torch.arange(depth) if centres is None else centres
    idx = stack_indices(depth, centres, n_slices).to(vol.device)
    stacks = vol[idx]  # (N, n_slices, y, x): advanced indexing keeps the autograd graph
    if size is not None and tuple(stacks.shape[-2:]) != (size, size):
        stacks = F.interpolate(stacks, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return stacks


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, h, w) maps to (B, *size), both grids covering the same field of view.

    ``align_corners=False`` matches how the stacks were resized for the predictor (``make_stacks``), so a
    feature cell lands on the pixels it was computed from.

    Args:
        maps: 2D maps.
        size: target (y, x).
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def slice_labels(nodule_mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """Weak label per axial slice: True when the slice holds any nodule voxel.

    Args:
        nodule_mask: (z, y, x) boolean ground-truth mask.
    """
    mask = np.asarray(nodule_mask)
    if mask.ndim != 3:
        raise ValueError(f"expected a (z, y, x) mask, got shape {mask.shape}")
    return mask.reshape(mask.shape[0], -1).any(axis=1)
