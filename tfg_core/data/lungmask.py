"""Lung masks: LUNA16's ``seg-lungs`` when the user has it, else a threshold + components fallback."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from tfg_core.data.volume import Volume

AIR_THRESHOLD_HU = -400.0  # lung parenchyma is ≈ −850 HU, soft tissue ≥ −100: any cut in between works


def threshold_lung_mask(volume: Volume, threshold_hu: float = AIR_THRESHOLD_HU, max_components: int = 2) -> np.ndarray:
    """Rough lung mask for scans without LUNA16's ``seg-lungs``.

    Air below ``threshold_hu`` that does not touch the in-plane border of the field of view (outside air)
    is split into 3D components; the ``max_components`` largest (the lungs, possibly joined) are kept,
    holes (vessels, nodules) are filled slice by slice and the result closed with a small ball so
    juxta-pleural nodules stay inside.

    Args:
        volume: HU volume.
        threshold_hu: air/tissue cut in HU.
        max_components: how many of the largest air components to keep.
    """
    air = np.asarray(volume.array) < threshold_hu
    labels, n = ndimage.label(air)
    if n == 0:
        return np.zeros(volume.shape, dtype=bool)
    # components touching the y/x border are the air around the body (and the table gap)
    border = np.unique(np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                                       labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    sizes = ndimage.sum_labels(air, labels, index=np.arange(1, n + 1))
    sizes[border[border > 0] - 1] = 0
    keep = np.argsort(sizes)[::-1][:max_components]
    keep = keep[sizes[keep] > 0] + 1
    mask = np.isin(labels, keep)
    # trachea/main bronchi are air too; they are small next to the lungs and harmless for a search mask
    mask = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    radius_vox = np.maximum(1, np.round(3.0 / np.asarray(volume.spacing))).astype(int)  # ≈3 mm closing
    structure = np.ones(tuple(2 * r + 1 for r in radius_vox), dtype=bool)
    # pad by replication so the closing does not eat the first/last slices of a cropped scan
    pad = [(r, r) for r in radius_vox]
    closed = ndimage.binary_closing(np.pad(mask, pad, mode="edge"), structure=structure)
    return closed[tuple(slice(r, r + n) for r, n in zip(radius_vox, mask.shape))]
