"""MetaImage reading/writing: round trips, atomic deterministic writes, and a named error for every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tfg_core.data.mhd import read_mhd, read_mhd_header, read_mhd_info, write_mhd
from tfg_core.data.volume import Volume
from tfg_core.errors import DataError

FLIP = np.diag([-1.0, -1.0, 1.0])


def make_volume(rng: np.random.Generator, dtype=np.int16, shape=(4, 5, 6)) -> Volume:
    array = rng.integers(-1024, 1500, size=shape).astype(dtype)
    return Volume(array=array, spacing=(2.5, 0.7, 0.65), origin=(171.3, 180.6, -330.25), direction=FLIP)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to prove a failure changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_pair(folder: Path, name: str, header: dict[str, str], data: bytes | None) -> Path:
    """A hand-written .mhd (keys in MetaIO order) and, if ``data`` is given, its .raw."""
    path = folder / f"{name}.mhd"
    path.write_text("".join(f"{k} = {v}\n" for k, v in header.items()))
    if data is not None:
        (folder / f"{name}.raw").write_bytes(data)
    return path


def base_header(name: str, element_type: str = "MET_SHORT") -> dict[str, str]:
    return {
        "ObjectType": "Image", "NDims": "3", "BinaryData": "True", "BinaryDataByteOrderMSB": "False",
        "CompressedData": "False", "TransformMatrix": "-1 0 0 0 -1 0 0 0 1", "Offset": "171.3 180.6 -330.25",
        "ElementSpacing": "0.65 0.7 2.5", "DimSize": "6 5 4", "ElementType": element_type,
        "ElementDataFile": f"{name}.raw",
    }


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_preserves_array_and_geometry(tmp_path, rng, compress):
    volume = make_volume(rng)
    path = write_mhd(volume, tmp_path / "scan.mhd", compress=compress)
    back = read_mhd(path)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, volume.spacing)
    np.testing.assert_allclose(back.origin, volume.origin)
    np.testing.assert_array_equal(back.direction, FLIP)
    assert back.uid == "scan" and back.source == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.mhd", "scan.zraw" if compress else "scan.raw"]


def test_hand_written_luna16_header_geometry(tmp_path, rng):
    """A header not written by SimpleITK: TransformMatrix/Offset/ElementSpacing come through, array not flipped."""
    array = rng.integers(-1000, 400, size=(4, 5, 6)).astype("<i2")
    path = write_pair(tmp_path, "1.2.3", base_header("1.2.3"), array.tobytes())
    volume = read_mhd(path)
    np.testing.assert_array_equal(volume.array, array)
    assert volume.spacing == (2.5, 0.7, 0.65)
    assert volume.origin == (171.3, 180.6, -330.25)
    np.testing.assert_array_equal(volume.direction, FLIP)
    assert volume.uid == "1.2.3"  # LUNA16 uids contain dots: only ".mhd" is stripped
    info = read_mhd_info(path)
    assert info.shape == volume.shape and info.spacing == volume.spacing and info.origin == volume.origin
    np.testing.assert_array_equal(info.direction, volume.direction)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_integer_types_become_int16(tmp_path, rng, dtype):
    array = rng.integers(0, 200, size=(3, 4, 5)).astype(dtype)
    path = write_mhd(Volume(array=array, spacing=(1, 1, 1)), tmp_path / "m.mhd")
    back = read_mhd(path)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, array.astype(np.int16))


def test_integer_out_of_int16_range_is_refused(tmp_path):
    array = np.zeros((2, 3, 4), dtype=np.int32)
    array[1, 2, 3] = 40000
    path = write_mhd(Volume(array=array, spacing=(1, 1, 1)), tmp_path / "big.mhd")
    with pytest.raises(DataError, match=r"big\.mhd.*\[0, 40000\].*int16"):
        read_mhd(path)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_kept_float32(tmp_path, rng, dtype):
    array = rng.normal(size=(3, 4, 5)).astype(dtype)
    back = read_mhd(write_mhd(Volume(array=array, spacing=(1, 2, 3)), tmp_path / "f.mhd"))
    assert back.array.dtype == np.float32
    np.testing.assert_allclose(back.array, array.astype(np.float32))


def test_bool_mask_written_as_uchar(tmp_path):
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 2, 3] = True
    path = write_mhd(Volume(array=mask, spacing=(1, 1, 1)), tmp_path / "mask.mhd")
    assert read_mhd_header(path).element_type == "MET_UCHAR"
    np.testing.assert_array_equal(read_mhd(path).array, mask.astype(np.int16))


def test_local_mha_is_read_and_size_checked(tmp_path, rng):
    volume = make_volume(rng)
    path = tmp_path / "scan.mha"
    sitk.WriteImage(volume.to_sitk(), str(path))  # ElementDataFile = LOCAL: voxels follow the header
    np.testing.assert_array_equal(read_mhd(path).array, volume.array)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"scan\.mha.*truncated: expected 240 bytes, found 230"):
        read_mhd(path)


# ---------------------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("compress", [False, True])
def test_write_is_deterministic(tmp_path, rng, compress):
    volume = make_volume(rng)
    first = snapshot(write_mhd(volume, tmp_path / "a" / "scan.mhd", compress=compress).parent)
    second = snapshot(write_mhd(volume, tmp_path / "b" / "scan.mhd", compress=compress).parent)
    assert first == second and len(first) == 2
    # rewriting over an existing pair gives the same bytes again and leaves no temporary folder
    write_mhd(volume, tmp_path / "a" / "scan.mhd", compress=compress)
    assert snapshot(tmp_path / "a") == first


def test_header_names_final_data_file(tmp_path, rng):
    path = write_mhd(make_volume(rng), tmp_path / "1.3.6.1.mhd")
    assert read_mhd_header(path).fields["ElementDataFile"] == "1.3.6.1.raw"


def test_failed_write_leaves_existing_pair_untouched(tmp_path, rng, monkeypatch):
    path = write_mhd(make_volume(rng), tmp_path / "scan.mhd")
    before = snapshot(tmp_path)

    def broken_write(image, file_name, *args, **kwargs):
        Path(file_name).with_suffix(".raw").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        write_mhd(make_volume(np.random.default_rng(1)), path)
    assert snapshot(tmp_path) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_refuses_other_extensions(tmp_path, rng):
    with pytest.raises(ValueError, match=r"\.mhd"):
        write_mhd(make_volume(rng), tmp_path / "scan.nii.gz")


# ------------------------------------------------------------------------------------------- bad inputs
N_BYTES = 6 * 5 * 4 * 2


def _bad_truncated(folder):
    return write_pair(folder, "bad", base_header("bad"), bytes(N_BYTES - 20)), \
        rf"truncated: expected {N_BYTES} bytes, found {N_BYTES - 20}"


def _bad_oversized(folder):
    # SimpleITK itself would read the first N bytes of this file without complaint
    return write_pair(folder, "bad", base_header("bad"), bytes(N_BYTES + 2 * 6 * 5)), \
        r"DimSize 6 5 4 .*inconsistent with data size.*has 300"


def _bad_no_datafile_key(folder):
    header = base_header("bad")
    del header["ElementDataFile"]
    return write_pair(folder, "bad", header, bytes(N_BYTES)), "ElementDataFile missing"


def _bad_missing_raw(folder):
    return write_pair(folder, "bad", base_header("bad"), None), r"data file bad\.raw not found"


def _bad_nan(folder):
    array = np.zeros((4, 5, 6), dtype="<f4")
    array[0, 0, 0], array[1, 2, 3], array[3, 4, 5] = np.nan, np.inf, -np.inf
    return write_pair(folder, "bad", base_header("bad", "MET_FLOAT"), array.tobytes()), \
        r"3 non-finite voxels \(NaN/inf\)"


def _bad_spacing(value):
    def make(folder):
        header = base_header("bad")
        header["ElementSpacing"] = value
        return write_pair(folder, "bad", header, bytes(N_BYTES)), r"ElementSpacing = .*positive finite"
    return make


def _bad_ndims(folder):
    header = base_header("bad")
    header["NDims"] = "2"
    return write_pair(folder, "bad", header, bytes(N_BYTES)), r"NDims = 2, expected 3"


def _bad_element_type(folder):
    return write_pair(folder, "bad", base_header("bad", "MET_SHORT_ARRAY"), bytes(N_BYTES)), \
        r"ElementType MET_SHORT_ARRAY is not a supported"


def _bad_spacing_count(folder):
    header = base_header("bad")
    header["ElementSpacing"] = "0.7 0.7"
    return write_pair(folder, "bad", header, bytes(N_BYTES)), r"ElementSpacing = '0.7 0.7' has 2 values"


def _bad_compressed_size(folder):
    header = base_header("bad")
    header["CompressedData"] = "True"
    header = {**{k: v for k, v in header.items() if k != "ElementDataFile"}, "CompressedDataSize": "500",
              "ElementDataFile": header["ElementDataFile"]}  # MetaIO stops reading at ElementDataFile
    return write_pair(folder, "bad", header, bytes(100)), r"truncated: expected 500 bytes, found 100"


def _compressed_pair(folder, cut_header_size: bool):
    """A SimpleITK .zraw pair; with ``cut_header_size`` the CompressedDataSize line is dropped (older writers)."""
    path = folder / "bad.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(120, dtype=np.int16).reshape(4, 5, 6)), str(path), True)
    if cut_header_size:
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(ln for ln in lines if not ln.startswith("CompressedDataSize")))
    return path


def _bad_zraw_truncated(folder):
    # without CompressedDataSize only the zlib stream can tell; SimpleITK prints "Uncompress failed" and returns zeros
    path = _compressed_pair(folder, cut_header_size=True)
    zraw = folder / "bad.zraw"
    zraw.write_bytes(zraw.read_bytes()[: zraw.stat().st_size // 2])
    return path, r"compressed data file bad\.zraw truncated: expected 240 bytes"


def _bad_zraw_corrupt(folder):
    path = _compressed_pair(folder, cut_header_size=True)
    zraw = folder / "bad.zraw"
    zraw.write_bytes(b"not zlib" + zraw.read_bytes())
    return path, r"compressed data file bad\.zraw is corrupt"


def _bad_zraw_oversized(folder):
    path = folder / "bad.mhd"
    _compressed_pair(folder, cut_header_size=True)
    path.write_text(path.read_text().replace("DimSize = 6 5 4", "DimSize = 6 5 2"))
    return path, r"DimSize 6 5 2 .*inconsistent with data size"


BAD_INPUTS = {
    "truncated_raw": _bad_truncated,
    "dimsize_inconsistent": _bad_oversized,
    "missing_elementdatafile": _bad_no_datafile_key,
    "missing_data_file": _bad_missing_raw,
    "nan_inf_voxels": _bad_nan,
    "zero_spacing": _bad_spacing("0 0.7 2.5"),
    "negative_spacing": _bad_spacing("0.65 -0.7 2.5"),
    "nan_spacing": _bad_spacing("0.65 nan 2.5"),
    "ndims_2": _bad_ndims,
    "vector_element_type": _bad_element_type,
    "two_spacing_values": _bad_spacing_count,
    "compressed_truncated": _bad_compressed_size,
    "zraw_truncated_stream": _bad_zraw_truncated,
    "zraw_corrupt_stream": _bad_zraw_corrupt,
    "zraw_dimsize_inconsistent": _bad_zraw_oversized,
}
# only visible once voxels are read; read_mhd_info reads the header only
VOXEL_CASES = {"nan_inf_voxels", "zraw_truncated_stream", "zraw_corrupt_stream", "zraw_dimsize_inconsistent"}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_and_problem(tmp_path, case):
    (tmp_path / "luna16_manifest.csv").write_text("seriesuid,subset\nx,0\n")  # a file that must survive
    path, problem = BAD_INPUTS[case](tmp_path)
    before = snapshot(tmp_path)
    readers = (read_mhd,) if case in VOXEL_CASES else (read_mhd, read_mhd_info)
    for reader in readers:
        with pytest.raises(DataError, match=problem) as info:
            reader(path)
        assert "bad.mhd" in str(info.value) and info.value.path == str(path)
    assert snapshot(tmp_path) == before


def test_missing_header_file(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.mhd: file not found"):
        read_mhd(tmp_path / "nothing.mhd")


def test_non_metaimage_file(tmp_path):
    path = tmp_path / "noise.mhd"
    path.write_bytes(bytes(range(256)).replace(b"=", b"") * 4)
    with pytest.raises(DataError, match="not a MetaImage header"):
        read_mhd(path)
