"""The phantom cohort: determinism, LUNA16 layout, nodule ground truth, anatomy sanity, committed fold table."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from tfg_core.data.luna16 import build_manifest, read_annotations, read_lung_mask
from tfg_core.data.mhd import read_mhd
from tfg_core.data.phantom import (
    PhantomConfig, generate_case, healthy_twin, iter_cases, parse_series_uid, phantom_fold_table, read_cohort_config,
    series_uid, write_cohort,
)
from tfg_core.data.phantom_shapes import LABEL_AIRWAY, LABEL_LEFT_LUNG, LABEL_RIGHT_LUNG, NODULE_KINDS
from tfg_core.errors import DataError

REPO = Path(__file__).resolve().parents[1]
FOLD_TABLE = REPO / "data_manifest" / "phantom_folds.csv"
SMALL = PhantomConfig(n_cases=3)


@pytest.fixture(scope="module")
def cohort():
    """The default cohort (100 cases, 32×64×64), generated once for this module."""
    return list(iter_cases(PhantomConfig()))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------- determinism
def test_case_depends_only_on_seed_and_index(cohort):
    again = generate_case(37, replace(PhantomConfig(), n_cases=40))  # alone, other n_cases
    first = cohort[37]  # generated after 37 others
    assert again.uid == first.uid == series_uid(0, 37)
    np.testing.assert_array_equal(again.volume.array, first.volume.array)
    np.testing.assert_array_equal(again.nodule_labels, first.nodule_labels)
    np.testing.assert_array_equal(again.lung_labels, first.lung_labels)
    assert again.nodules == first.nodules
    assert again.volume.origin == first.volume.origin


def test_healthy_twin_differs_only_at_the_nodules(cohort):
    with_nodules = [c for c in cohort if c.nodules][:6]
    for case in with_nodules:
        twin = healthy_twin(case.index)
        assert not twin.nodules and not twin.nodule_mask.any() and twin.uid == case.uid
        np.testing.assert_array_equal(twin.lung_labels, case.lung_labels)
        assert twin.volume.origin == case.volume.origin and np.array_equal(twin.volume.direction, case.volume.direction)
        changed = twin.volume.array != case.volume.array
        # the nodules and their soft edges (one voxel), nothing else; inside the nodule the twin is lung
        assert changed[case.nodule_mask].mean() > 0.9, case.uid
        assert not (changed & ~ndimage.binary_dilation(case.nodule_mask, iterations=2)).any(), case.uid
        lung = case.lung_mask & ~ndimage.binary_dilation(case.nodule_mask, iterations=3)
        assert np.median(twin.volume.array[case.nodule_mask]) < np.median(case.volume.array[lung]) + 150
    case = next(c for c in cohort if not c.nodules)  # no nodule: the twin is the case
    np.testing.assert_array_equal(healthy_twin(case.index).volume.array, case.volume.array)


def test_uid_and_cohort_config_round_trip(tmp_path):
    assert parse_series_uid(series_uid(3, 41)) == (3, 41)
    for bad in ("1.2.3.4", series_uid(0, 1) + "x", "1.2.826.0.1.3680043.8.498.999.0.1"):
        with pytest.raises(ValueError, match="not a phantom series UID"):
            parse_series_uid(bad)
    root = write_cohort(tmp_path / "tree", replace(SMALL, n_cases=1, seed=4))
    assert read_cohort_config(root) == replace(SMALL, n_cases=1, seed=4)
    with pytest.raises(DataError, match="no cohort.json"):
        read_cohort_config(tmp_path)
    (tmp_path / "cohort.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        read_cohort_config(tmp_path)


def test_different_seeds_differ():
    a = generate_case(0, PhantomConfig(seed=0))
    b = generate_case(0, PhantomConfig(seed=1))
    assert a.uid != b.uid
    assert np.mean(a.volume.array != b.volume.array) > 0.5


def test_written_tree_is_byte_identical(tmp_path):
    a = _tree_bytes(write_cohort(tmp_path / "a", SMALL))
    b = _tree_bytes(write_cohort(tmp_path / "b", SMALL))
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    # the tree has what LUNA16 has, plus our masks and records
    uid = series_uid(0, 1)
    for name in (f"subset1/{uid}.mhd", f"subset1/{uid}.raw", f"seg-lungs-LUNA16/{uid}.mhd",
                 f"seg-lungs-LUNA16/{uid}.zraw", f"masks/{uid}.mhd", f"cases/{uid}.json",
                 "annotations.csv", "nodules.csv", "cohort.json"):
        assert name in a, name
    other = _tree_bytes(write_cohort(tmp_path / "c", replace(SMALL, seed=1)))
    assert f"subset0/{series_uid(1, 0)}.raw" in other
    assert other[f"subset0/{series_uid(1, 0)}.raw"] != a[f"subset0/{series_uid(0, 0)}.raw"]


def test_write_resumes_without_rewriting_complete_cases(tmp_path):
    root = write_cohort(tmp_path / "tree", SMALL)
    before = _tree_bytes(root)
    stats = {p: os.stat(root / p) for p in before}
    # a run killed before case 1's scan header appeared: its header is missing, its data file half-written
    uid1 = series_uid(0, 1)
    (root / f"subset1/{uid1}.mhd").unlink()
    (root / f"subset1/{uid1}.raw").write_bytes(b"partial")
    write_cohort(root, SMALL)
    assert _tree_bytes(root) == before
    for name, st in stats.items():
        if uid1 in name or name.endswith(".csv"):
            continue
        now = os.stat(root / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{name} was rewritten"


def test_write_refuses_a_tree_of_another_config(tmp_path):
    root = write_cohort(tmp_path / "tree", replace(SMALL, n_cases=1))
    with pytest.raises(DataError, match="cohort.json"):
        write_cohort(root, replace(SMALL, n_cases=1, seed=5))


# ------------------------------------------------------------------------------- LUNA16 reader path
def test_luna16_reader_reads_the_tree(tmp_path):
    config = PhantomConfig(n_cases=10, nodule_probability=1.0, flip_fraction=0.5)
    root = write_cohort(tmp_path / "luna", config)
    manifest = build_manifest(root)
    assert sorted(manifest["subset"]) == list(range(10))
    assert 0 < manifest["flipped"].sum() < 10
    annotations = read_annotations(root / "annotations.csv")
    assert list(annotations.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    assert set(annotations["seriesuid"]) == set(manifest["seriesuid"])
    # one flipped and one plain scan compared voxel for voxel with a fresh generation (keeps the test fast)
    compare = {manifest.loc[manifest["flipped"] == f, "seriesuid"].iloc[0] for f in (True, False)}
    for _, row in manifest.iterrows():
        scan = read_mhd(root / row["path"])
        lungs = read_lung_mask(root / row["lung_mask_path"], scan)
        labels = read_mhd(root / "masks" / f"{scan.uid}.mhd").array
        assert lungs[labels > 0].all()
        if scan.uid in compare:
            case = generate_case(int(scan.uid.rsplit(".", 1)[1]), config)
            np.testing.assert_array_equal(scan.array, case.volume.array)
            np.testing.assert_allclose(scan.direction, case.volume.direction)
            np.testing.assert_allclose(scan.origin, case.volume.origin)
            np.testing.assert_array_equal(lungs, case.lung_mask)
            np.testing.assert_array_equal(labels, case.nodule_labels)
        for j, ann in enumerate(annotations[annotations["seriesuid"] == scan.uid].itertuples(), start=1):
            z, y, x = np.rint(scan.world_to_voxel(np.array([ann.coordX, ann.coordY, ann.coordZ]))).astype(int)
            assert labels[z, y, x] == j


# ---------------------------------------------------------------------------------- default cohort
def test_about_half_the_cases_have_nodules(cohort):
    share = np.mean([len(c.nodules) > 0 for c in cohort])
    assert 0.35 <= share <= 0.65
    assert max(len(c.nodules) for c in cohort) <= 3


def test_every_nodule_kind_occurs(cohort):
    kinds = Counter(n.kind for c in cohort for n in c.nodules)
    assert set(kinds) == set(NODULE_KINDS), kinds


def test_nodules_lie_in_the_lungs_and_touch_what_their_kind_says(cohort):
    for case in cohort:
        for n in case.nodules:
            own = case.nodule_labels == n.label
            assert own.sum() == n.n_voxels >= 2
            assert (own & case.lung_mask).sum() >= 0.9 * own.sum(), (case.uid, n)
            faces = [own[0], own[-1], own[:, 0], own[:, -1], own[:, :, 0], own[:, :, -1]]
            assert not any(f.any() for f in faces), (case.uid, n)  # wholly inside the field of view
            ring = ndimage.binary_dilation(own) & ~own
            if n.kind == "juxta_pleural":
                assert (ring & ~case.lung_mask).any(), (case.uid, n)
            if n.kind == "vessel_attached":
                assert (ring & case.vessel_mask).any(), (case.uid, n)
        assert set(np.unique(case.nodule_labels)) == {0, *[n.label for n in case.nodules]}


def test_annotation_centres_fall_in_their_own_nodule(cohort):
    flipped_with_nodules = 0
    for case in cohort:
        flipped_with_nodules += case.flipped and bool(case.nodules)
        for n in case.nodules:
            z, y, x = np.rint(case.volume.world_to_voxel(np.array(n.centre_xyz))).astype(int)
            assert case.nodule_labels[z, y, x] == n.label, (case.uid, case.flipped, n)
            # and the centre is the mask centroid in world mm
            centroid = np.argwhere(case.nodule_labels == n.label).mean(axis=0)
            np.testing.assert_allclose(case.volume.voxel_to_world(centroid), n.centre_xyz, atol=1e-6)
    assert flipped_with_nodules >= 1


def test_diameter_is_the_mask_equivalent_diameter(cohort):
    config = PhantomConfig()
    voxel_mm3 = float(np.prod(config.voxel_spacing))
    diameters = []
    for case in cohort:
        for n in case.nodules:
            expected = (6.0 * n.n_voxels * voxel_mm3 / np.pi) ** (1 / 3)
            assert n.diameter_mm == pytest.approx(expected)
            diameters.append(n.diameter_mm)
    assert 5.0 <= min(diameters) and max(diameters) <= 40.0
    assert np.ptp(diameters) > 10.0  # sizes actually vary


def test_geometry_is_chest_ct_like_and_some_scans_are_flipped(cohort):
    flipped = 0
    for case in cohort:
        v = case.volume
        assert v.array.dtype == np.int16 and v.shape == (32, 64, 64)
        assert v.spacing == (2.5, 5.5, 5.5)
        if case.flipped:
            flipped += 1
            np.testing.assert_array_equal(v.direction, np.diag([-1.0, -1.0, 1.0]))
        else:
            np.testing.assert_array_equal(v.direction, np.eye(3))
        centre = v.voxel_to_world((np.asarray(v.shape) - 1) / 2.0)
        assert abs(centre[0]) < 20 and -30 < centre[1] < 50 and -260 < centre[2] < -90
    assert 1 <= flipped <= 25


def test_patient_left_lung_is_label_3_in_world_space(cohort):
    for case in cohort[:20]:
        assert (case.lung_labels == LABEL_AIRWAY).any()
        x_of = {}
        for label in (LABEL_LEFT_LUNG, LABEL_RIGHT_LUNG):
            x_of[label] = case.volume.voxel_to_world(np.argwhere(case.lung_labels == label))[:, 0].mean()
        assert x_of[LABEL_LEFT_LUNG] > x_of[LABEL_RIGHT_LUNG] + 50, (case.uid, case.flipped, x_of)


def test_hu_ranges_are_plausible(cohort):
    for case in cohort:
        hu = case.volume.array
        corners = np.concatenate([hu[:, :4, :4].ravel(), hu[:, -4:, -4:].ravel()])
        assert abs(corners.mean() + 1000) < 10  # air outside the body
        lung = case.lung_mask & ~case.nodule_mask
        assert -950 <= hu[lung].mean() <= -700
        # body tissue away from the lungs: between fat and muscle, a little bone
        tissue = (hu > -500) & ~ndimage.binary_dilation(case.lung_mask, iterations=2)
        assert -120 <= np.median(hu[tissue]) <= 80
        assert 0.005 < np.mean(hu[tissue] > 200) < 0.2
        assert hu.min() >= -1024 and hu.max() < 1500


def test_lung_volume_fraction(cohort):
    fractions = np.array([c.lung_mask.mean() for c in cohort])
    assert fractions.min() >= 0.06 and fractions.max() <= 0.32  # measured 0.086 … 0.231 for the default cohort
    assert fractions.std() > 0.01  # lungs vary between cases


def test_larger_grid_shows_the_same_chest():
    small = generate_case(3, PhantomConfig())
    large = generate_case(3, PhantomConfig(shape=(48, 96, 96)))
    assert large.volume.spacing == (80 / 48, 352 / 96, 352 / 96)
    assert large.lung_mask.mean() == pytest.approx(small.lung_mask.mean(), rel=0.08)
    # same world position of the grid centre: the geometry does not depend on the grid size either
    centre = {c.volume.shape: c.volume.voxel_to_world((np.asarray(c.volume.shape) - 1) / 2.0) for c in (small, large)}
    np.testing.assert_allclose(*centre.values())


# --------------------------------------------------------------------------------------- fold table
def test_fold_table_matches_the_committed_manifest(cohort):
    table = phantom_fold_table(PhantomConfig(), cases=cohort)
    committed = pd.read_csv(FOLD_TABLE, dtype={"seriesuid": str})
    pd.testing.assert_frame_equal(table, committed, check_dtype=False)
    assert sorted(table["subset"].unique()) == list(range(10))
    assert table.groupby("subset").size().tolist() == [10] * 10


def test_fold_table_without_cases_generates_them():
    config = PhantomConfig(n_cases=3, seed=2)
    table = phantom_fold_table(config)
    assert table["seriesuid"].tolist() == [series_uid(2, i) for i in range(3)]
    assert table["subset"].tolist() == [0, 1, 2]
    assert table["n_nodules"].tolist() == [len(generate_case(i, config).nodules) for i in range(3)]


@pytest.mark.parametrize("bad", [
    {"shape": (4, 64, 64)}, {"seed": -1}, {"nodule_probability": 1.5},
    {"diameter_range_mm": (10.0, 5.0)}, {"kind_weights": (("cyst", 1.0),)},
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        PhantomConfig(**bad)
