"""The selectable ground truth through the exact LUNA16 code path, on phantom and on real LIDC slices."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tfg_core.data.cases import load_case
from tfg_core.data.dicom import read_dicom_series
from tfg_core.data.luna16 import build_manifest, read_annotations
from tfg_core.data.mhd import write_mhd
from tfg_core.data.phantom import PhantomConfig, write_cohort
from tfg_core.errors import DataError

UID_0003 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.170706757615202213033480003264"


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    return write_cohort(root, PhantomConfig(n_cases=10))


def test_phantom_voxel_masks_and_spheres_agree(phantom_root):
    manifest = build_manifest(phantom_root)
    annotations = read_annotations(phantom_root / "annotations.csv")
    with_nodules = manifest[manifest.seriesuid.isin(annotations.seriesuid)]
    assert len(with_nodules) >= 2
    for _, row in with_nodules.iterrows():
        mask_case = load_case(phantom_root, row, annotations, ground_truth="auto")
        sphere_case = load_case(phantom_root, row, annotations, ground_truth="sphere")
        assert mask_case.ground_truth == "mask" and sphere_case.ground_truth == "sphere"
        a, b = mask_case.nodule_mask, sphere_case.nodule_mask
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.4, f"{row.seriesuid}: sphere GT should overlap the voxel GT (Dice {dice:.2f})"
        assert mask_case.lung_mask.any() and (mask_case.nodule_mask & mask_case.lung_mask).sum() > 0.8 * a.sum()
    empty = manifest[~manifest.seriesuid.isin(annotations.seriesuid)].iloc[0]
    assert not load_case(phantom_root, empty, annotations).nodule_mask.any()


def test_missing_voxel_mask_is_named(phantom_root, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(phantom_root, root)
    manifest = build_manifest(root)
    row = manifest.iloc[0]
    (root / "masks" / f"{row.seriesuid}.mhd").unlink()
    with pytest.raises(DataError, match=f"{row.seriesuid}.mhd.*does not exist"):
        load_case(root, row, read_annotations(root / "annotations.csv"), ground_truth="mask")


def test_real_lidc_scan_as_luna16_tree_lidc_and_sphere_gt(shared_data, tmp_path):
    """LIDC-IDRI-0003 written as a LUNA16 .mhd: LIDC consensus GT and the LUNA16 sphere land on the same nodule."""
    folder = next((shared_data / "lidc_idri_slices" / "LIDC-IDRI-0003").glob("*/*"))
    volume = read_dicom_series(folder)
    write_mhd(volume, tmp_path / "subset3" / f"{UID_0003}.mhd")
    table = pd.read_csv(shared_data / "luna16_annotations_partial.csv")
    inside = []
    for _, r in table[table.seriesuid == UID_0003].iterrows():
        zyx = volume.world_to_voxel(np.array([r.coordX, r.coordY, r.coordZ]))
        if np.all((zyx >= -0.5) & (zyx <= np.array(volume.shape) - 0.5)):
            inside.append(r)
    assert len(inside) == 1  # the data README: one LUNA16 nodule lies inside these slices
    pd.DataFrame(inside).to_csv(tmp_path / "annotations.csv", index=False)
    manifest = build_manifest(tmp_path)
    row = manifest.iloc[0]
    assert row.subset == 3
    annotations = read_annotations(tmp_path / "annotations.csv")
    lidc = load_case(tmp_path, row, annotations, ground_truth="lidc")
    sphere = load_case(tmp_path, row, annotations, ground_truth="sphere")
    assert lidc.nodule_mask.sum() > 100 and sphere.nodule_mask.sum() > 100
    overlap = (lidc.nodule_mask & sphere.nodule_mask).sum() / lidc.nodule_mask.sum()
    assert overlap > 0.5
    # the lung fallback (no seg-lungs here) covers the nodule's surroundings
    assert lidc.lung_mask.any()
