"""Slice-level training data: 2.5D stacks with weak labels, balanced sampling and the paper's augmentation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.networks.layers import AffineTransform

from tfg_core.data.slices import N_SLICES, make_stacks


@dataclass
class SliceCase:
    """One scan prepared for the slice classifier.

    Args:
        uid: series identifier.
        volume: (z, y, x) float32 in [0, 1] (MAISI window).
        labels: (z,) bool, centre slice holds a nodule voxel.
        nodule_voxels: (z,) int, nodule voxels in each slice on the model grid (for error analysis; None when
            only the labels are known).
    """

    uid: str
    volume: np.ndarray
    labels: np.ndarray
    nodule_voxels: np.ndarray | None = None


@dataclass(frozen=True)
class AugmentConfig:
    """The paper's augmentation: flip, rotation, translation, zoom with probabilities 0.5, 0.5, 1.0, 0.95.

    Ranges (rotation ±15°, translation ±10 % of the width, zoom 0.9–1.1) are ours: the paper gives only the
    probabilities. ``mode`` is the resampling interpolation: ``"bilinear"`` (default) or ``"nearest"``, which
    copies voxels instead of averaging them, so the noise texture and one-voxel details survive augmentation.
    """

    p_flip: float = 0.5
    p_rotate: float = 0.5
    p_translate: float = 1.0
    p_zoom: float = 0.95
    max_rotation_deg: float = 15.0
    max_translation_frac: float = 0.1
    zoom_range: tuple[float, float] = (0.9, 1.1)
    mode: str = "bilinear"

    def __post_init__(self) -> None:
        if self.mode not in ("bilinear", "nearest"):
            raise ValueError(f"augmentation mode must be 'bilinear' or 'nearest', got {self.mode!r}")


class BatchAugment:
    """Random flip, rotation, translation and zoom for a whole batch of stacks in one resampling pass.

    Each stack draws its own parameters (each component switched on with its own probability); the four
    are composed into one 2×3 affine per stack and applied with MONAI's batched ``AffineTransform``, so
    the nine slices of a stack move together and the image is interpolated once, not four times.
    (Per-sample MONAI array transforms cost ≈75 ms per stack on a CPU — more than the training step.)

    Args:
        cfg: probabilities and ranges.
        seed: RNG seed.
    """

    def __init__(self, cfg: AugmentConfig, seed: int = 0):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.warp = AffineTransform(normalized=True, reverse_indexing=False, padding_mode="border",
                                    align_corners=False, mode=cfg.mode)

    def matrices(self, n: int) -> torch.Tensor:
        """(n, 2, 3) pull-direction affines in normalised (x, y) coordinates.

        Args:
            n: batch size.
        """
        cfg, rng = self.cfg, self.rng
        on = lambda p: rng.random(n) < p  # noqa: E731
        flip = np.where(on(cfg.p_flip), -1.0, 1.0)
        angle = np.where(on(cfg.p_rotate), rng.uniform(-1, 1, n) * math.radians(cfg.max_rotation_deg), 0.0)
        shift = np.where(on(cfg.p_translate)[:, None], rng.uniform(-1, 1, (n, 2)) * 2 * cfg.max_translation_frac, 0.0)
        zoom = np.where(on(cfg.p_zoom), rng.uniform(*cfg.zoom_range, n), 1.0)
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom  # sampling at p/zoom magnifies by zoom
        theta = np.zeros((n, 2, 3))
        theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
        theta[:, :, 2] = shift
        return torch.as_tensor(theta, dtype=torch.float32)

    def __call__(self, stacks: torch.Tensor) -> torch.Tensor:
        """Augment (B, n_slices, H, W) stacks.

        Args:
            stacks: the batch.
        """
        return self.warp(stacks, self.matrices(stacks.shape[0]).to(stacks.device))


class BalancedSliceSampler:
    """Draws (case, slice) pairs, positives and negatives with equal probability.

    Args:
        cases: the training scans.
        seed: RNG seed (the sampler and MONAI's transforms are seeded from it).
    """

    def __init__(self, cases: Sequence[SliceCase], seed: int = 0):
        self.cases = list(cases)
        pairs = np.asarray([(c, z, bool(lab)) for c, case in enumerate(self.cases) for z, lab in enumerate(case.labels)],
                           dtype=np.int64).reshape(-1, 3)
        self.positives = pairs[pairs[:, 2] == 1, :2]
        self.negatives = pairs[pairs[:, 2] == 0, :2]
        if not len(self.positives) or not len(self.negatives):
            raise ValueError(
                f"balanced sampling needs both classes; got {len(self.positives)} positive and "
                f"{len(self.negatives)} negative slices"
            )
        self.rng = np.random.default_rng(seed)

    def draw(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Pick ``batch_size`` (case, slice) pairs, each positive with probability 1/2, and their labels.

        Args:
            batch_size: number of stacks.

        Returns:
            picks (batch_size, 2) of (case index, centre slice) and labels (batch_size,) float32 0/1.
        """
        is_pos = self.rng.random(batch_size) < 0.5
        pos = self.positives[self.rng.integers(len(self.positives), size=batch_size)]
        neg = self.negatives[self.rng.integers(len(self.negatives), size=batch_size)]
        return np.where(is_pos[:, None], pos, neg), is_pos.astype(np.float32)


class SliceBank:
    """Every slice of the training scans in one tensor, so a batch of stacks is a single gather.

    Building stacks per pick (``make_stacks`` per (case, slice)) costs more than the tiny predictor's
    training step; here the slices are resized to the predictor's input once, concatenated along z, and a
    batch is ``bank[offset[case] + clamp(z + k)]`` — the same edge replication as :func:`make_stacks`.
    Memory: one float32 copy of all slices at ``size``×``size`` (42 MB for the 80 training phantoms).

    Args:
        cases: the scans (any depths; every slice is resized to ``size``).
        size: predictor input size.
        n_slices: slices per stack (odd).
    """

    def __init__(self, cases: Sequence[SliceCase], size: int, n_slices: int = N_SLICES):
        if n_slices % 2 != 1:
            raise ValueError(f"n_slices must be odd so the centre slice is defined, got {n_slices}")
        # make_stacks with n_slices=1 is exactly the per-slice resize the predictors see at inference
        self.slices = torch.cat([make_stacks(c.volume, n_slices=1, size=size)[:, 0] for c in cases])
        depths = torch.as_tensor([len(c.labels) for c in cases], dtype=torch.long)
        self.depths = depths
        self.offsets = torch.cumsum(depths, 0) - depths
        self.offsets_k = torch.arange(-(n_slices // 2), n_slices // 2 + 1, dtype=torch.long)
        self.n_slices, self.size = n_slices, size

    def stacks(self, case_idx: np.ndarray | torch.Tensor, centres: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Stacks (N, n_slices, size, size) centred on ``centres`` of scans ``case_idx``.

        Args:
            case_idx: (N,) index of each stack's scan in ``cases``.
            centres: (N,) centre slice of each stack.
        """
        c = torch.as_tensor(case_idx, dtype=torch.long).reshape(-1, 1)
        z = torch.as_tensor(centres, dtype=torch.long).reshape(-1, 1)
        if len(z) and ((z < 0).any() or (z >= self.depths[c]).any()):
            raise IndexError("centre slice outside its scan")
        z = torch.minimum((z + self.offsets_k).clamp_(min=0), self.depths[c] - 1)
        return self.slices[self.offsets[c] + z]


def all_stacks(case: SliceCase, size: int, n_slices: int = N_SLICES) -> torch.Tensor:
    """Every slice of one scan as a stack (for validation and inference).

    Args:
        case: the scan.
        size: predictor input size.
        n_slices: slices per stack.
    """
    return make_stacks(case.volume, n_slices=n_slices, size=size)


def slice_case_from(case, grid_multiple: int = 32) -> SliceCase:
    """A :class:`tfg_core.data.cases.Case` on the model grid, with weak slice labels from its mask.

    Labels are computed on the model grid (nearest-neighbour resize of the ground truth), so a label
    says exactly what the classifier sees in that slice.

    Args:
        case: scan + ground truth.
        grid_multiple: the flow model's grid divisor.
    """
    from tfg_core.data.preprocess import mask_to_model_grid, to_model_grid
    from tfg_core.data.slices import slice_labels

    grid = to_model_grid(case.volume, multiple=grid_multiple)
    mask = mask_to_model_grid(case.nodule_mask, case.volume, grid)  # same reorientation + resize as the image
    mask = mask > 0
    return SliceCase(uid=case.uid, volume=grid.array.astype(np.float32), labels=slice_labels(mask),
                     nodule_voxels=mask.reshape(mask.shape[0], -1).sum(axis=1))
