"""From per-slice 2D attribution maps to one 3D map on the volume's grid.

Every baseline explains the 2.5D classifier one centre slice at a time. This module does the part they share:
pick the slices to explain (by default the ones the classifier calls positive — the same gate the guidance uses
to choose where to push), build their stacks at the predictor's input size, call the method on batches of
stacks, bring each 2D map back to the slice's (y, x) grid and place it at its z. Slices that are not explained
stay 0, and no per-slice rescaling happens here, so magnitudes stay comparable across a volume's slices and
one threshold means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tfg_core.data.slices import make_stacks, resize_maps
from tfg_core.guidance import positive_slices
from tfg_core.predictors.heads import Predictor

# stacks (B, in_slices, H, W) → maps (B, h, w) at any resolution covering the same field of view
SliceMapFn = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


def explained_slices(predictor: Predictor, volume: torch.Tensor, gate: float | None = 0.5,
                     slice_batch: int = 16) -> list[int]:
    """Slices to explain: those with ``sigmoid(logit) >= gate``, or every slice when ``gate`` is None.

    Args:
        predictor: slice classifier in eval mode.
        volume: (z, y, x) in [0, 1].
        gate: probability threshold, or None for all slices.
        slice_batch: stacks per classifier call.
    """
    if gate is None:
        return list(range(volume.shape[0]))
    return list(positive_slices(predictor, volume, gate, slice_batch)[0])


def slicewise_map(
    predictor: Predictor,
    volume: torch.Tensor | np.ndarray,
    method: SliceMapFn,
    gate: float | None = 0.5,
    slice_batch: int = 16,
    progress: bool = False,
    desc: str = "slices",
) -> np.ndarray:
    """Apply a 2D attribution ``method`` to the stacks of the explained slices and assemble a (z, y, x) map.

    Args:
        predictor: slice classifier in eval mode.
        volume: (z, y, x) in [0, 1] on the model grid.
        method: ``method(stacks, centres)`` → (B, h, w) maps for the stacks centred on ``centres``.
        gate: explain only slices with probability ≥ gate (None: all slices).
        slice_batch: stacks per call of ``method``.
        progress: progress bar over batches.
        desc: progress-bar label.
    """
    vol = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume,
                          dtype=torch.float32).detach()
    if vol.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {tuple(vol.shape)}")
    out = torch.zeros(vol.shape, dtype=torch.float32)
    slices = explained_slices(predictor, vol, gate, slice_batch)
    batches = [slices[i : i + slice_batch] for i in range(0, len(slices), slice_batch)]
    for centres in tqdm(batches, disable=not progress, desc=desc):
        stacks = make_stacks(vol, centres, n_slices=predictor.in_slices, size=predictor.input_size)
        maps = method(stacks, centres).detach().float()
        out[centres] = resize_maps(maps, tuple(vol.shape[1:]))
    return out.numpy()
