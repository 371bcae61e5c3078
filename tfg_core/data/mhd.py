"""MetaImage (``.mhd`` + ``.raw``/``.zraw``) reading and writing, the format LUNA16 ships its scans in.

The header is checked here before SimpleITK sees it: SimpleITK's own errors on a bad pair are cryptic
("File cannot be read ... No such file or directory" for a truncated ``.raw``), while a ``.raw`` larger than
the header says, or a short ``.zraw`` zlib stream, is read without complaint, i.e. silently wrong.
Geometry (``TransformMatrix``/``Offset``) is left to SimpleITK and never re-derived here.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfg_core.data.volume import Volume
from tfg_core.errors import DataError

PathLike = str | os.PathLike

# bytes per voxel of the scalar MetaIO element types (MET_LONG is 32-bit in MetaIO, like MET_INT)
ELEMENT_BYTES: dict[str, int] = {
    "MET_CHAR": 1, "MET_UCHAR": 1,
    "MET_SHORT": 2, "MET_USHORT": 2,
    "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4,
    "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
MAX_HEADER_BYTES = 1 << 16  # a real header is < 1 KiB; stops a binary file passed by mistake from being scanned


@dataclass(frozen=True)
class MhdHeader:
    """A validated MetaImage header.

    Args:
        fields: every ``key = value`` pair, as written.
        dims_xyz: ``DimSize`` (x, y, z).
        element_type: ``ElementType`` (e.g. ``MET_SHORT``).
        data_path: the file holding the voxels (the header itself for ``LOCAL``).
        data_offset: where the voxels start in ``data_path`` (after the header for ``LOCAL``).
        compressed: whether ``CompressedData`` is true (zlib).
    """

    fields: dict[str, str]
    dims_xyz: tuple[int, int, int]
    element_type: str
    data_path: Path
    data_offset: int
    compressed: bool


@dataclass(frozen=True)
class MhdInfo:
    """Geometry of a ``.mhd`` scan read from its header only (no voxels).

    Args:
        shape: array shape (z, y, x).
        spacing: voxel size (z, y, x) mm.
        origin: world position (x, y, z) mm of voxel (0, 0, 0).
        direction: 3×3 ITK direction matrix.
        element_type: MetaIO element type.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    element_type: str


def _is_true(value: str) -> bool:
    return value.strip()[:1] in ("T", "t", "1")


def _numbers(path: Path, fields: dict[str, str], key: str, count: int) -> list[float]:
    try:
        values = [float(v) for v in fields[key].split()]
    except ValueError:
        raise DataError(path, f"{key} = {fields[key]!r} is not {count} numbers") from None
    if len(values) != count:
        raise DataError(path, f"{key} = {fields[key]!r} has {len(values)} values, expected {count}")
    return values


def _parse_fields(path: Path) -> tuple[dict[str, str], int]:
    """``key = value`` pairs up to ``ElementDataFile`` (MetaIO's last key) and the byte offset just after it."""
    fields: dict[str, str] = {}
    offset = 0
    with open(path, "rb") as fh:
        while offset < MAX_HEADER_BYTES:
            line = fh.readline(MAX_HEADER_BYTES)
            if not line:
                break
            offset += len(line)
            key, sep, value = line.decode("latin-1").partition("=")
            if sep:
                fields[key.strip()] = value.strip()
                if key.strip() == "ElementDataFile":
                    break
    return fields, offset


def read_mhd_header(path: PathLike) -> MhdHeader:
    """Parse and validate a MetaImage header, and check the data file holds exactly the voxels it promises.

    Args:
        path: the ``.mhd`` (or ``.mha``) file.

    Raises:
        DataError: naming the file and what is wrong (missing keys, bad spacing, missing/truncated/oversized data).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    fields, header_end = _parse_fields(path)
    if not fields:
        raise DataError(path, "not a MetaImage header (no 'Key = Value' lines)")

    if "NDims" not in fields:
        raise DataError(path, "NDims missing")
    if fields["NDims"] != "3":
        raise DataError(path, f"NDims = {fields['NDims']}, expected 3 (a 3D volume)")
    if "DimSize" not in fields:
        raise DataError(path, "DimSize missing")
    dims = _numbers(path, fields, "DimSize", 3)
    if not all(d == int(d) and d > 0 for d in dims):
        raise DataError(path, f"DimSize = {fields['DimSize']!r} must be 3 positive integers")
    dims_xyz = tuple(int(d) for d in dims)

    element_type = fields.get("ElementType")
    if element_type is None:
        raise DataError(path, "ElementType missing")
    if element_type not in ELEMENT_BYTES:
        raise DataError(path, f"ElementType {element_type} is not a supported scalar type ({', '.join(ELEMENT_BYTES)})")
    channels = fields.get("ElementNumberOfChannels", "1")
    if channels != "1":
        raise DataError(path, f"ElementNumberOfChannels = {channels}, expected 1 (a scalar CT volume)")

    # ITK takes ElementSpacing, falling back to ElementSize; check whichever is written
    spacing_keys = [k for k in ("ElementSpacing", "ElementSize") if k in fields]
    if not spacing_keys:
        raise DataError(path, "ElementSpacing missing (no ElementSpacing or ElementSize)")
    for key in spacing_keys:
        values = _numbers(path, fields, key, 3)
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise DataError(path, f"{key} = {fields[key]!r}: spacing must be 3 positive finite numbers "
                                  "(zero or negative spacing)")

    data_name = fields.get("ElementDataFile")
    if data_name is None:
        raise DataError(path, "ElementDataFile missing")
    if data_name == "LOCAL":
        data_path, data_offset = path, header_end
    elif data_name.startswith("LIST") or "%" in data_name:
        raise DataError(path, f"ElementDataFile = {data_name!r}: multi-file data is not supported")
    else:
        data_path, data_offset = path.parent / data_name, 0
        if not data_path.is_file():
            raise DataError(path, f"data file {data_path.name} not found "
                                  f"(ElementDataFile = {data_name}, looked in {data_path.parent})")

    compressed = _is_true(fields.get("CompressedData", "False"))
    found = data_path.stat().st_size - data_offset
    if compressed:
        # zlib size is only known if the header states it; SimpleITK decompresses and checks the rest
        stated = fields.get("CompressedDataSize")
        if stated is not None:
            expected = int(_numbers(path, fields, "CompressedDataSize", 1)[0])
            _check_size(path, data_path, expected, found, f"CompressedDataSize {expected}")
    else:
        expected = math.prod(dims_xyz) * ELEMENT_BYTES[element_type]
        skip = int(_numbers(path, fields, "HeaderSize", 1)[0]) if "HeaderSize" in fields else 0
        if skip == -1:  # MetaIO: the voxels are the last bytes of the file, anything before is skipped
            if found < expected:
                raise DataError(path, f"data file {data_path.name} truncated: expected {expected} bytes, found {found}")
        else:
            _check_size(path, data_path, skip + expected, found,
                        f"DimSize {' '.join(map(str, dims_xyz))} × {element_type}")
    return MhdHeader(fields, dims_xyz, element_type, data_path, data_offset, compressed)  # type: ignore[arg-type]


def _check_size(path: Path, data_path: Path, expected: int, found: int, what: str) -> None:
    if found < expected:
        raise DataError(path, f"data file {data_path.name} truncated: expected {expected} bytes, found {found}")
    if found > expected:
        raise DataError(path, f"{what} inconsistent with data size: expected {expected} bytes, "
                              f"data file {data_path.name} has {found}")


def _check_compressed_stream(path: Path, header: MhdHeader, chunk_size: int = 1 << 22) -> None:
    """Inflate the zlib stream without keeping it, to count its bytes: on a short or corrupt stream SimpleITK
    only prints "Uncompress failed" and returns an image anyway."""
    expected = math.prod(header.dims_xyz) * ELEMENT_BYTES[header.element_type]
    inflater, found = zlib.decompressobj(), 0
    try:
        with open(header.data_path, "rb") as fh:
            fh.seek(header.data_offset)
            for chunk in iter(lambda: fh.read(chunk_size), b""):
                found += len(inflater.decompress(chunk))
                if found > expected:
                    break
            found += len(inflater.flush())
    except zlib.error as exc:
        raise DataError(path, f"compressed data file {header.data_path.name} is corrupt: {exc}") from None
    if found < expected or not inflater.eof:
        raise DataError(path, f"compressed data file {header.data_path.name} truncated: expected {expected} bytes, "
                              f"found {found} after decompression")
    _check_size(path, header.data_path, expected, found,
                f"DimSize {' '.join(map(str, header.dims_xyz))} × {header.element_type}")


def _reader(path: Path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("MetaImageIO")  # by content, not by extension
    reader.SetFileName(str(path))
    return reader


def read_mhd_info(path: PathLike) -> MhdInfo:
    """Validate a ``.mhd`` and read its geometry without reading the voxels (fast manifest scans).

    Args:
        path: the ``.mhd`` file.
    """
    path = Path(path)
    header = read_mhd_header(path)
    reader = _reader(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataError(path, f"SimpleITK could not read the header: {_first_line(exc)}") from None
    return MhdInfo(
        shape=tuple(int(s) for s in reader.GetSize())[::-1],  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in reader.GetSpacing())[::-1],  # type: ignore[arg-type]
        origin=tuple(float(o) for o in reader.GetOrigin()),  # type: ignore[arg-type]
        direction=np.asarray(reader.GetDirection(), dtype=np.float64).reshape(3, 3),
        element_type=header.element_type,
    )


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # SimpleITK puts the build path first and ITK's reason after "ITK ERROR:"
    useful = [ln for ln in lines if "ERROR" in ln or "Reason" in ln]
    return " ".join(useful or lines[:1])


def read_mhd(path: PathLike) -> Volume:
    """Read a 3D MetaImage scan as a :class:`Volume`.

    Integer CT comes back as int16 HU (refused if its values do not fit int16); float data as float32 and
    refused if any voxel is NaN/inf. ``uid`` is the file stem (LUNA16 names files ``<seriesuid>.mhd``).

    Args:
        path: the ``.mhd`` file.

    Raises:
        DataError: naming the file and the problem.
    """
    path = Path(path)
    header = read_mhd_header(path)
    if header.compressed:
        _check_compressed_stream(path, header)
    try:
        image = _reader(path).Execute()
    except RuntimeError as exc:
        raise DataError(path, f"SimpleITK could not read it: {_first_line(exc)}") from None
    volume = Volume.from_sitk(image, uid=path.stem, source=str(path), element_type=header.element_type)
    array = volume.array
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise DataError(path, f"{bad} non-finite voxels (NaN/inf)")
        return volume.with_array(array.astype(np.float32, copy=False))
    if array.dtype != np.int16:
        info = np.iinfo(np.int16)
        lo, hi = int(array.min()), int(array.max())
        if lo < info.min or hi > info.max:
            raise DataError(path, f"{header.element_type} values [{lo}, {hi}] do not fit int16 HU")
        return volume.with_array(array.astype(np.int16))
    return volume


def write_mhd(volume: Volume, path: PathLike, compress: bool = False) -> Path:
    """Write a volume as ``<name>.mhd`` + ``<name>.raw`` (``.zraw`` if compressed), atomically.

    Both files are written into a temporary folder beside ``path`` under their final names (the header
    names its data file, so they cannot be renamed independently), then the data file is moved into place
    first and the header last: a visible header means a complete pair. Output bytes are a pure function of
    the volume (SimpleITK's MetaImage writer embeds no date or random id). Boolean arrays are written as
    ``MET_UCHAR``.

    Args:
        volume: the volume to write.
        path: destination ``.mhd`` file.
        compress: zlib-compress the voxels (``CompressedData = True``, ``.zraw``).
    """
    import SimpleITK as sitk

    path = Path(path)
    if path.suffix.lower() != ".mhd":
        raise ValueError(f"write_mhd writes .mhd files, got {path}")
    if volume.array.dtype == bool:
        volume = volume.with_array(volume.array.astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp_header = tmp_dir / path.name
        sitk.WriteImage(volume.to_sitk(), str(tmp_header), useCompression=compress)
        data_name = read_mhd_header(tmp_header).fields["ElementDataFile"]
        for name in (data_name, path.name):  # data first, header last
            with open(tmp_dir / name, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_dir / name, path.parent / name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
