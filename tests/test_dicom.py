"""read_dicom_series on the shared LIDC slices and on broken copies of them built in tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tfg_core.data.dicom import read_dicom_series
from tfg_core.errors import DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lidc_idri_slices"
# case -> (slices, in-plane spacing mm, slice spacing mm), from the data README
CASES = {"LIDC-IDRI-0002": (12, 0.681641, 1.25), "LIDC-IDRI-0003": (11, 0.820312, 2.5)}


def series_dir(case: str) -> Path:
    (folder,) = (DATA / case).glob("*/*")
    return folder


def sorted_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"), key=lambda p: float(p.stem))  # file name = slice z in mm


def copy_slices(files: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, dest / f.name)
    return dest


def expected_hu(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """HU straight from pydicom and where the padding is (raw == PixelPaddingValue or HU at -2048/-3024)."""
    hu, pad = [], []
    for f in files:
        ds = pydicom.dcmread(f)
        raw = ds.pixel_array.astype(np.int32)
        h = raw * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        hu.append(h)
        pad.append((raw == int(ds.PixelPaddingValue)) | np.isin(h, (-2048, -3024)))
    return np.stack(hu), np.stack(pad)


@pytest.mark.parametrize("case", sorted(CASES))
def test_reads_real_series(case):
    n, pixel, dz = CASES[case]
    folder = series_dir(case)
    files = sorted_files(folder)
    vol = read_dicom_series(folder)

    assert vol.shape == (n, 512, 512)
    assert vol.array.dtype == np.int16
    assert vol.spacing == pytest.approx((dz, pixel, pixel), abs=1e-5)
    assert vol.uid == folder.name  # SeriesInstanceUID = LUNA16 seriesuid = folder name
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert vol.origin == pytest.approx([float(v) for v in first.ImagePositionPatient])
    # slice k sits at the k-th file's z: sorting and direction agree
    world_z = vol.voxel_to_world(np.c_[np.arange(n), np.zeros(n), np.zeros(n)])[:, 2]
    assert world_z == pytest.approx([float(f.stem) for f in files])

    hu, pad = expected_hu(files)
    assert pad.any() and vol.meta["padding_voxels"] == int(pad.sum())
    assert np.all(vol.array[pad] == -1000)
    assert np.array_equal(vol.array[~pad], hu[~pad])
    assert vol.array.min() > -1100  # CT noise dips a little below -1024, padding would not


def _rewrite(path: Path, edit) -> None:
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)


def _set_pixels(ds, raw: np.ndarray) -> None:
    ds.PixelData = raw.astype(np.int16).tobytes()


def test_padding_as_hu_without_rescale(tmp_path):
    """A writer that stores HU directly (intercept 0): padding at -3024 is caught after rescale too."""
    src = sorted_files(series_dir("LIDC-IDRI-0002"))[:3]
    folder = copy_slices(src, tmp_path / "s")

    def to_hu(ds):
        raw = ds.pixel_array.astype(np.int32)
        _set_pixels(ds, raw * int(ds.RescaleSlope) + int(ds.RescaleIntercept))
        ds.RescaleIntercept = 0
        del ds[0x00280120]  # PixelPaddingValue: only the -3024 value tells us now

    for f in folder.iterdir():
        _rewrite(f, to_hu)
    hu, pad = expected_hu(src)
    vol = read_dicom_series(folder)
    assert vol.meta["padding_voxels"] == int(pad.sum()) > 0
    assert np.array_equal(vol.array, np.where(pad, -1000, hu))


def test_padding_declared_only_by_pixel_padding_value(tmp_path):
    """Padding at an unusual stored value counts only because PixelPaddingValue names it."""
    src = sorted_files(series_dir("LIDC-IDRI-0003"))[:3]
    _, pad = expected_hu(src)

    def odd_padding(ds, declare: bool):
        raw = ds.pixel_array.astype(np.int32)
        fov = raw == -1024  # this series pads with stored -1024 (HU -2048)
        _set_pixels(ds, np.where(fov, -1500, raw))  # HU -2524: not one of the usual values
        if declare:
            ds.PixelPaddingValue = -1500
        else:
            del ds[0x00280120]

    for declare in (True, False):
        folder = copy_slices(src, tmp_path / str(declare))
        for f in folder.iterdir():
            _rewrite(f, lambda ds: odd_padding(ds, declare))
        vol = read_dicom_series(folder)
        if declare:
            assert vol.meta["padding_voxels"] == int(pad.sum()) > 0
            assert np.all(vol.array[pad] == -1000)
        else:
            assert vol.meta["padding_voxels"] == 0
            assert np.all(vol.array[pad] == -2524)


def test_padding_stored_raw_at_usual_value(tmp_path):
    """Stored -2048 with intercept -1024 (HU -3072) and no PixelPaddingValue is still padding."""
    src = sorted_files(series_dir("LIDC-IDRI-0003"))[:2]
    _, pad = expected_hu(src)
    folder = copy_slices(src, tmp_path / "s")

    def edit(ds):
        raw = ds.pixel_array.astype(np.int32)
        _set_pixels(ds, np.where(raw == -1024, -2048, raw))
        del ds[0x00280120]

    for f in folder.iterdir():
        _rewrite(f, edit)
    vol = read_dicom_series(folder)
    assert vol.meta["padding_voxels"] == int(pad.sum()) > 0


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no DICOM files") as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_folder_without_dicom_files(tmp_path):
    (tmp_path / "069.xml").write_text("<LidcReadMessage/>")
    with pytest.raises(DataError, match="no DICOM files"):
        read_dicom_series(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        read_dicom_series(tmp_path / "nope")


def test_non_dicom_files_are_ignored(tmp_path):
    src = sorted_files(series_dir("LIDC-IDRI-0003"))[:4]
    folder = copy_slices(src, tmp_path / "s")
    (folder / "069.xml").write_text("<LidcReadMessage/>")
    assert read_dicom_series(folder).shape == (4, 512, 512)


def test_mixed_series(tmp_path):
    src = sorted_files(series_dir("LIDC-IDRI-0003"))[:5]
    folder = copy_slices(src, tmp_path / "s")
    original = pydicom.dcmread(src[0], stop_before_pixels=True).SeriesInstanceUID
    other = "1.2.826.0.1.3680043.8.498.1"
    _rewrite(folder / src[-1].name, lambda ds: setattr(ds, "SeriesInstanceUID", other))

    with pytest.raises(DataError, match="2 image series") as err:
        read_dicom_series(folder)
    assert original in str(err.value) and other in str(err.value)
    assert read_dicom_series(folder, series_uid=original).shape == (4, 512, 512)
    assert read_dicom_series(folder, series_uid=other).shape == (1, 512, 512)
    with pytest.raises(DataError, match="not found"):
        read_dicom_series(folder, series_uid="1.2.3")


def test_gap_in_slices(tmp_path):
    src = sorted_files(series_dir("LIDC-IDRI-0003"))[:6]
    folder = copy_slices(src[:3] + src[4:], tmp_path / "s")  # drop the slice at src[3]
    with pytest.raises(DataError, match="inconsistent slice spacing") as err:
        read_dicom_series(folder)
    # the message names the positions around the hole
    assert f"{float(src[2].stem):.3f}" in str(err.value) and f"{float(src[4].stem):.3f}" in str(err.value)


def test_duplicate_slice_position(tmp_path):
    src = sorted_files(series_dir("LIDC-IDRI-0003"))[:3]
    folder = copy_slices(src, tmp_path / "s")
    shutil.copy(src[1], folder / "copy.dcm")
    _rewrite(folder / "copy.dcm", lambda ds: setattr(ds, "SOPInstanceUID", "1.2.826.0.1.3680043.8.498.2"))
    with pytest.raises(DataError, match="same position"):
        read_dicom_series(folder)


def _strip_pixels(ds) -> None:
    del ds.PixelData
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR


def test_non_image_dicom_in_series(tmp_path):
    src = sorted_files(series_dir("LIDC-IDRI-0003"))[:3]
    folder = copy_slices(src, tmp_path / "s")
    shutil.copy(src[0], folder / "report.dcm")
    _rewrite(folder / "report.dcm", _strip_pixels)
    with pytest.raises(DataError, match="non-image DICOM") as err:
        read_dicom_series(folder)
    assert err.value.path.endswith("report.dcm")


def test_only_non_image_dicom(tmp_path):
    src = sorted_files(series_dir("LIDC-IDRI-0003"))[:1]
    folder = copy_slices(src, tmp_path / "s")
    _rewrite(folder / src[0].name, _strip_pixels)
    with pytest.raises(DataError, match="non-image"):
        read_dicom_series(folder)
