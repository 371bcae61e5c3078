"""LUNA16: manifest of a fake tree, annotation tables (real partial annotations.csv), world→voxel on flipped
scans, sphere ground truth, seg-lungs masks, and named errors that leave existing files untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from tfg_core.data.luna16 import (
    MANIFEST_COLUMNS,
    annotations_for,
    build_manifest,
    check_annotations,
    load_case,
    read_annotations,
    read_candidates,
    read_lung_mask,
    read_manifest,
    sphere_mask,
)
from tfg_core.data.mhd import write_mhd
from tfg_core.data.volume import Volume
from tfg_core.errors import DataError

FLIP = np.diag([-1.0, -1.0, 1.0])
UID_A, UID_B, UID_C = "1.3.6.1.4.1.9328.50.1.111", "1.3.6.1.4.1.9328.50.1.222", "1.3.6.1.4.1.9328.50.1.333"
LIDC_0003 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.170706757615202213033480003264"
BLOB_ZYX = (5, 9, 13)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def blob_volume(direction=FLIP, uid: str = UID_B) -> Volume:
    """Air-like background with a bright 3×3×3 blob centred on ``BLOB_ZYX``; flipped like some LUNA16 scans."""
    array = np.full((12, 16, 20), -800, dtype=np.int16)
    z, y, x = BLOB_ZYX
    array[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2] = 60
    return Volume(array=array, spacing=(2.5, 0.7, 0.6), origin=(171.3, 180.6, -330.25), direction=direction, uid=uid)


def fake_luna16(root: Path) -> Path:
    """subset0: an axis-aligned scan (with a seg-lungs mask) and a flipped one; subset3: a third scan."""
    plain = Volume(array=np.full((6, 8, 10), -1000, dtype=np.int16), spacing=(1.25, 0.8, 0.8),
                   origin=(-150.0, -160.0, -300.0))
    write_mhd(plain, root / "subset0" / f"{UID_A}.mhd")
    write_mhd(blob_volume(), root / "subset0" / f"{UID_B}.mhd")
    thick = plain.with_array(np.zeros((3, 8, 10), np.int16), spacing=(2.5, 0.8, 0.8))
    write_mhd(thick, root / "subset3" / f"{UID_C}.mhd")
    labels = np.zeros(plain.shape, dtype=np.uint8)
    labels[1:5, 1:4, 1:9], labels[1:5, 5:7, 1:9], labels[0, 3:5, 4:6] = 3, 4, 5
    write_mhd(plain.with_array(labels), root / "seg-lungs-LUNA16" / f"{UID_A}.mhd", compress=True)
    (root / "candidates_V2").mkdir()
    (root / "candidates_V2" / "candidates_V2.csv").write_text(
        f"seriesuid,coordX,coordY,coordZ,class\n{UID_A},-148,-158,-297,0\n")
    (root / "subset0" / "notes.txt").write_text("not a scan")
    return root


def blob_annotation(volume: Volume, diameter: float = 4.0) -> pd.DataFrame:
    """The blob centre in world mm, computed by SimpleITK (independent of Volume.voxel_to_world)."""
    centre = volume.to_sitk().TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in BLOB_ZYX[::-1]))
    return pd.DataFrame({"seriesuid": [volume.uid], "coordX": [centre[0]], "coordY": [centre[1]],
                         "coordZ": [centre[2]], "diameter_mm": [diameter]})


def brute_force_sphere(volume: Volume, centre_xyz, diameter: float) -> np.ndarray:
    """Every voxel's world point from SimpleITK, distance ≤ radius: the slow reference for sphere_mask."""
    image = volume.to_sitk()
    out = np.zeros(volume.shape, dtype=bool)
    for z, y, x in np.ndindex(*volume.shape):
        point = np.asarray(image.TransformIndexToPhysicalPoint((x, y, z)))
        out[z, y, x] = np.linalg.norm(point - np.asarray(centre_xyz)) <= diameter / 2
    return out


# -------------------------------------------------------------------------------------------- manifest
def test_manifest_of_fake_tree(tmp_path):
    root = fake_luna16(tmp_path / "luna")
    manifest = build_manifest(root)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert manifest["seriesuid"].tolist() == [UID_A, UID_B, UID_C]
    assert manifest["subset"].tolist() == [0, 0, 3]
    assert manifest["path"].tolist() == [f"subset0/{UID_A}.mhd", f"subset0/{UID_B}.mhd", f"subset3/{UID_C}.mhd"]
    assert manifest["flipped"].tolist() == [False, True, False]
    b = manifest.iloc[1]
    assert (b.shape_z, b.shape_y, b.shape_x) == (12, 16, 20)
    assert (b.spacing_z, b.spacing_y, b.spacing_x) == (2.5, 0.7, 0.6)
    assert (b.origin_x, b.origin_y, b.origin_z) == (171.3, 180.6, -330.25)
    assert b.direction == "-1 0 0 0 -1 0 0 0 1"
    assert manifest.iloc[0].direction == "1 0 0 0 1 0 0 0 1"
    assert manifest["lung_mask_path"].tolist() == [f"seg-lungs-LUNA16/{UID_A}.mhd", "", ""]
    assert set(manifest["candidates_csv"]) == {"candidates_V2/candidates_V2.csv"}


def test_manifest_csv_is_atomic_deterministic_and_reads_back(tmp_path):
    root = fake_luna16(tmp_path / "luna")
    out = tmp_path / "data_manifest" / "luna16_manifest.csv"
    manifest = build_manifest(root, out_csv=out, progress=True)
    first = out.read_bytes()
    assert first.decode() == manifest.to_csv(index=False, lineterminator="\n")
    build_manifest(root, out_csv=out)
    assert out.read_bytes() == first
    assert [p.name for p in out.parent.iterdir()] == ["luna16_manifest.csv"]  # no temporary left behind
    back = read_manifest(out)
    pd.testing.assert_frame_equal(back, manifest, check_dtype=False)
    assert back["flipped"].dtype == bool and back["lung_mask_path"].iloc[2] == ""


def test_manifest_bad_scan_names_it_and_keeps_old_csv(tmp_path):
    root = fake_luna16(tmp_path / "luna")
    out = tmp_path / "luna16_manifest.csv"
    build_manifest(root, out_csv=out)
    raw = root / "subset3" / f"{UID_C}.raw"
    raw.write_bytes(raw.read_bytes()[:-100])
    before = snapshot(tmp_path)
    problem = rf"{UID_C}\.mhd: data file {UID_C}\.raw truncated: expected 480 bytes, found 380"
    with pytest.raises(DataError, match=problem):
        build_manifest(root, out_csv=out)
    assert snapshot(tmp_path) == before


def test_manifest_without_subsets_names_root(tmp_path):
    (tmp_path / "luna").mkdir()
    (tmp_path / "luna16_manifest.csv").write_text("old\n")
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=r"luna: no subset0 … subset9 folders"):
        build_manifest(tmp_path / "luna", out_csv=tmp_path / "luna16_manifest.csv")
    with pytest.raises(DataError, match=r"missing: LUNA16 root folder not found"):
        build_manifest(tmp_path / "missing")
    assert snapshot(tmp_path) == before


def test_manifest_duplicate_uid(tmp_path):
    root = fake_luna16(tmp_path / "luna")
    write_mhd(blob_volume(), root / "subset7" / f"{UID_B}.mhd")
    with pytest.raises(DataError, match=rf"seriesuid {UID_B} is in both subset0 and subset7"):
        build_manifest(root)


# ---------------------------------------------------------------------------------- annotation tables
def test_real_partial_annotations(shared_data):
    table = read_annotations(shared_data / "luna16_annotations_partial.csv")
    assert len(table) == 1117
    assert list(table.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    assert (table["diameter_mm"] > 0).all()
    rows = table[table["seriesuid"] == LIDC_0003]
    hit = rows[np.isclose(rows["coordX"], 72.29, atol=0.01)]
    assert len(hit) == 1
    row = hit.iloc[0]
    np.testing.assert_allclose([row.coordY, row.coordZ, row.diameter_mm], [76.90, -190.46, 21.45], atol=0.01)
    assert table.attrs["source"].endswith("luna16_annotations_partial.csv")


GOOD_CSV = "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,1.0,2.0,3.0,5.5\n1.2.4,-1.0,-2.0,-3.0,7.0\n"
BAD_TABLES = {
    "missing_column": (GOOD_CSV.replace(",diameter_mm", ""), r"missing columns \['diameter_mm'\]"),
    "non_numeric": (GOOD_CSV.replace("-2.0", "abc"), r"line 3: coordY = 'abc' is not a finite number"),
    "empty_cell": (GOOD_CSV.replace(",3.0,", ",,"), r"line 2: coordZ = '' is not a finite number"),
    "zero_diameter": (GOOD_CSV.replace("7.0", "0"), r"line 3: diameter_mm = 0.0 must be positive"),
    "negative_diameter": (GOOD_CSV.replace("5.5", "-5.5"), r"line 2: diameter_mm = -5.5 must be positive"),
    "empty_uid": (GOOD_CSV.replace("1.2.4", ""), r"line 3: empty seriesuid"),
    "empty_file": ("", r"not a readable CSV"),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_annotation_table(tmp_path, case):
    text, problem = BAD_TABLES[case]
    csv = tmp_path / "annotations.csv"
    csv.write_text(text)
    (tmp_path / "luna16_manifest.csv").write_text("seriesuid\n1.2.3\n")
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=rf"annotations\.csv: {problem}"):
        read_annotations(csv)
    assert snapshot(tmp_path) == before


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match=r"annotations\.csv: file not found"):
        read_annotations(tmp_path / "annotations.csv")


def test_candidates(tmp_path):
    csv = tmp_path / "candidates_V2.csv"
    csv.write_text("seriesuid,coordX,coordY,coordZ,class\n1.2.3,1,2,3,0\n1.2.3,4,5,6,1\n")
    table = read_candidates(csv)
    assert table["class"].tolist() == [0, 1] and table["coordZ"].tolist() == [3.0, 6.0]
    csv.write_text("seriesuid,coordX,coordY,coordZ,class\n1.2.3,1,2,3,0\n1.2.3,4,5,6,2\n")
    with pytest.raises(DataError, match=r"candidates_V2\.csv: line 3: class = 2.0 must be 0 or 1"):
        read_candidates(csv)
    csv.write_text("seriesuid,coordX,coordY,coordZ\n1.2.3,1,2,3\n")
    with pytest.raises(DataError, match=r"candidates_V2\.csv: missing columns \['class'\]"):
        read_candidates(csv)


# ------------------------------------------------------------------------------- world → voxel, spheres
def test_flipped_scan_annotation_maps_to_blob(tmp_path):
    path = write_mhd(blob_volume(), tmp_path / f"{UID_B}.mhd")
    from tfg_core.data.mhd import read_mhd

    volume = read_mhd(path)
    table = blob_annotation(volume)
    rows = annotations_for(volume, table)
    voxel = rows[["voxel_z", "voxel_y", "voxel_x"]].to_numpy()[0]
    np.testing.assert_allclose(voxel, BLOB_ZYX, atol=1e-9)
    # cross-check with SimpleITK's own inverse transform (it answers x, y, z)
    world = rows[["coordX", "coordY", "coordZ"]].to_numpy()[0]
    sitk_index = sitk.ReadImage(str(path)).TransformPhysicalPointToContinuousIndex(tuple(world))
    np.testing.assert_allclose(voxel, sitk_index[::-1], atol=1e-9)
    np.testing.assert_array_equal(np.argwhere(volume.array == 60).mean(axis=0), BLOB_ZYX)  # array not flipped
    # ignoring the flip (what naive (world - origin) / spacing code does) lands elsewhere
    naive = ((world - np.asarray(volume.origin)) / np.asarray(volume.spacing_xyz))[::-1]
    assert np.abs(naive - BLOB_ZYX).max() > 5

    mask = sphere_mask(volume, world[None], [4.0])
    np.testing.assert_allclose(np.argwhere(mask).mean(axis=0), BLOB_ZYX, atol=1e-9)
    np.testing.assert_array_equal(mask, brute_force_sphere(volume, world, 4.0))
    small = sphere_mask(volume, world[None], [1.5])  # fits inside the 3-voxel blob
    assert small[BLOB_ZYX] and small.sum() == 5 and volume.array[small].min() == 60


def test_manifest_row_gives_same_voxels_as_volume(tmp_path):
    root = fake_luna16(tmp_path / "luna")
    manifest = build_manifest(root)
    volume, rows = load_case(root, manifest.iloc[1], blob_annotation(blob_volume()))
    from_row = annotations_for(manifest.iloc[1], blob_annotation(blob_volume()))
    np.testing.assert_allclose(from_row[["voxel_z", "voxel_y", "voxel_x"]], rows[["voxel_z", "voxel_y", "voxel_x"]])
    np.testing.assert_allclose(rows[["voxel_z", "voxel_y", "voxel_x"]].to_numpy()[0], BLOB_ZYX, atol=1e-9)
    assert volume.uid == UID_B and volume.array.dtype == np.int16
    # other scans' annotations are not returned
    assert annotations_for(manifest.iloc[0], blob_annotation(blob_volume())).empty


def test_sphere_mask_matches_brute_force_rotated_and_clipped():
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    volume = blob_volume(direction=rotation @ FLIP)
    inside = volume.voxel_to_world(np.array([6.3, 8.2, 10.7]))
    edge = volume.voxel_to_world(np.array([0.0, 1.0, 19.0]))  # half of this sphere is outside the scan
    mask = sphere_mask(volume, np.stack([inside, edge]), [6.0, 5.0])
    expected = brute_force_sphere(volume, inside, 6.0) | brute_force_sphere(volume, edge, 5.0)
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() > 20
    far = volume.voxel_to_world(np.array([-50.0, 0.0, 0.0]))
    assert not sphere_mask(volume, far[None], [5.0]).any()
    with pytest.raises(ValueError, match="positive"):
        sphere_mask(volume, inside[None], [0.0])


def test_annotation_uid_not_in_manifest(tmp_path):
    root = fake_luna16(tmp_path / "luna")
    out = tmp_path / "luna16_manifest.csv"
    manifest = build_manifest(root, out_csv=out)
    csv = tmp_path / "annotations.csv"
    csv.write_text(f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{UID_A},-148,-158,-297,4\n9.9.9,1,2,3,4\n")
    table = read_annotations(csv)
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=r"annotations\.csv: line 3: seriesuid 9\.9\.9 is not in the manifest"):
        check_annotations(table, manifest, csv)
    with pytest.raises(DataError, match=r"annotations\.csv: .*9\.9\.9"):  # csv path from the table itself
        annotations_for(manifest.iloc[0], table, manifest=manifest)
    assert snapshot(tmp_path) == before
    check_annotations(table.iloc[:1], manifest)  # known uids pass


def test_annotation_centre_outside_volume(tmp_path):
    root = fake_luna16(tmp_path / "luna")
    out = tmp_path / "luna16_manifest.csv"
    manifest = build_manifest(root, out_csv=out)
    csv = tmp_path / "annotations.csv"
    # x = -100 mm is 62 voxels from the origin along x, the scan has 10
    csv.write_text(f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{UID_A},-148,-158,-297,4\n{UID_A},-100,-158,-297,4\n")
    table = read_annotations(csv)
    before = snapshot(tmp_path)
    problem = (rf"subset0/{UID_A}\.mhd: annotation 1 \(line 3 of .*annotations\.csv: "
               r"world x,y,z = \(-100\.00, -158\.00, -297\.00\) mm\) maps to voxel z,y,x = \(2\.40, 2\.50, 62\.50\), "
               r"outside the volume of shape \(6, 8, 10\)")
    with pytest.raises(DataError, match=problem):
        load_case(root, manifest.iloc[0], table)
    with pytest.raises(DataError, match=r"annotation 1 .*outside the volume"):
        annotations_for(manifest.iloc[0], table)
    assert snapshot(tmp_path) == before
    rows = annotations_for(manifest.iloc[0], table.iloc[:1])
    np.testing.assert_allclose(rows[["voxel_z", "voxel_y", "voxel_x"]].to_numpy()[0], [3 / 1.25, 2.5, 2.5])


def test_load_case_detects_stale_manifest(tmp_path):
    root = fake_luna16(tmp_path / "luna")
    row = build_manifest(root).iloc[2].copy()
    row["shape_z"] = 4
    with pytest.raises(DataError, match=rf"{UID_C}\.mhd: does not match its manifest row.*rebuild the manifest"):
        load_case(root, row, blob_annotation(blob_volume()))


# ------------------------------------------------------------------------------------------ lung masks
def test_lung_mask_labels(tmp_path):
    root = fake_luna16(tmp_path / "luna")
    manifest = build_manifest(root)
    volume, _ = load_case(root, manifest.iloc[0], blob_annotation(blob_volume()))
    lungs = read_lung_mask(root / manifest.iloc[0].lung_mask_path, like=volume)
    assert lungs.dtype == bool and lungs.shape == volume.shape
    assert lungs.sum() == 4 * 3 * 8 + 4 * 2 * 8  # labels 3 and 4
    assert not lungs[0, 3:5, 4:6].any()  # label 5, the trachea, is not lung


def test_lung_mask_geometry_mismatch(tmp_path):
    root = fake_luna16(tmp_path / "luna")
    manifest = build_manifest(root)
    scan, _ = load_case(root, manifest.iloc[0], blob_annotation(blob_volume()))
    mask_path = root / manifest.iloc[0].lung_mask_path
    before = snapshot(tmp_path)
    shifted = scan.with_array(scan.array, origin=(scan.origin[0] + 0.5, scan.origin[1], scan.origin[2]))
    with pytest.raises(DataError, match=rf"{UID_A}\.mhd: geometry differs from scan .*origin"):
        read_lung_mask(mask_path, like=shifted)
    other, _ = load_case(root, manifest.iloc[2], blob_annotation(blob_volume()))
    with pytest.raises(DataError, match=r"geometry differs from scan .*shape \(6, 8, 10\) vs \(3, 8, 10\)"):
        read_lung_mask(mask_path, like=other)
    assert snapshot(tmp_path) == before


def test_binary_mask_is_not_a_seg_lungs_mask(tmp_path):
    scan = blob_volume(direction=np.eye(3))
    path = write_mhd(scan.with_array((scan.array > 0).astype(np.uint8)), tmp_path / "binary.mhd")
    with pytest.raises(DataError, match=r"binary\.mhd: no lung label \(3, 4\) found \(values present: \[0, 1\]\)"):
        read_lung_mask(path, like=scan)
