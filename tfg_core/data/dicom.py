"""Read one CT series from a folder of DICOM slices into a :class:`Volume` in Hounsfield units.

Headers are read first with pydicom (large values deferred, so this is cheap) to pick the series, sort the
slices along the slice normal and check the spacing with error messages that say which file or position is
wrong; the pixels are then decoded and rescaled to HU by SimpleITK's ``ImageSeriesReader``.

Padding outside the scanner's field of view (``PixelPaddingValue``, or the usual -2048 / -3024 fill) is set to
air (-1000 HU) so that later HU windowing and the model see air, not an impossible value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfg_core.data.volume import Volume
from tfg_core.errors import DataError

AIR_HU = -1000
# Fill values that scanners write outside the circular field of view, as HU or as stored values.
PADDING_VALUES = (-2048, -3024)
# Real tissue and air never go below this; a padding rule only fires under it unless the header declares it.
_MIN_REAL_HU = -1024


@dataclass
class _Slice:
    """The header fields of one file that this reader needs."""

    path: Path
    series_uid: str
    has_pixels: bool
    sop_class: str
    position: np.ndarray | None = None  # ImagePositionPatient (x, y, z) mm
    orientation: np.ndarray | None = None  # ImageOrientationPatient (row cosines, column cosines)
    shape: tuple[int, int] | None = None  # (Rows, Columns)
    slope: float = 1.0
    intercept: float = 0.0
    padding_value: float | None = None
    padding_limit: float | None = None


def _read_header(path: Path) -> _Slice | None:
    """Header of ``path``, or None when it is not a DICOM file (LIDC folders also hold XML annotations)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # defer_size skips the pixel bytes but still records that PixelData is present
        ds = pydicom.dcmread(path, defer_size=1024)
    except (InvalidDicomError, EOFError, OSError):
        return None
    except Exception as exc:  # a truncated or corrupt file that claims to be DICOM
        raise DataError(path, f"unreadable DICOM file ({type(exc).__name__}: {exc})") from exc

    def number(keyword: str, default: float | None) -> float | None:
        value = ds.get(keyword)
        return default if value is None or value == "" else float(value)

    item = _Slice(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "")).strip(),
        has_pixels="PixelData" in ds,
        sop_class=str(ds.get("SOPClassUID", "unknown")),
    )
    if item.has_pixels:
        try:
            item.position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
            item.orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
            item.shape = (int(ds.Rows), int(ds.Columns))
        except (AttributeError, TypeError, ValueError) as exc:
            raise DataError(path, f"image slice lacks usable ImagePositionPatient/ImageOrientationPatient/Rows/Columns ({exc})") from exc
        item.slope = number("RescaleSlope", 1.0)
        item.intercept = number("RescaleIntercept", 0.0)
        item.padding_value = number("PixelPaddingValue", None)
        item.padding_limit = number("PixelPaddingRangeLimit", None)
    return item


def _scan_folder(folder: Path) -> list[_Slice]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    headers = [h for h in (_read_header(p) for p in files) if h is not None]
    if not headers:
        subdirs = [p.name for p in folder.iterdir() if p.is_dir()]
        hint = f" (it has {len(subdirs)} subfolder(s); pass the folder that holds the slices)" if subdirs else ""
        raise DataError(folder, f"no DICOM files in this folder{hint}")
    return headers


def _select_series(folder: Path, headers: list[_Slice], series_uid: str | None) -> list[_Slice]:
    images = [h for h in headers if h.has_pixels]
    if not images:
        classes = sorted({h.sop_class for h in headers})
        raise DataError(folder, f"only non-image DICOM objects here (no PixelData; SOP classes {classes})")
    uids = sorted({h.series_uid for h in images})
    if series_uid is None:
        if len(uids) > 1:
            raise DataError(folder, f"{len(uids)} image series in one folder; pass series_uid= one of {uids}")
        series_uid = uids[0]
    elif series_uid not in uids:
        raise DataError(folder, f"series {series_uid} not found; image series here: {uids}")
    # A non-image object (SR, presentation state) claiming to be part of the CT series means the series is not
    # what we think it is; name it rather than silently skipping it.
    for h in headers:
        if h.series_uid == series_uid and not h.has_pixels:
            raise DataError(h.path, f"non-image DICOM object (no PixelData, SOP class {h.sop_class}) inside series {series_uid}")
    return [h for h in images if h.series_uid == series_uid]


def _sort_and_space(folder: Path, slices: list[_Slice], spacing_tolerance: float) -> tuple[list[_Slice], np.ndarray, float]:
    """Sort slices along the slice normal; return them, their positions along it (mm) and the slice spacing."""
    ref = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.orientation, ref.orientation, atol=1e-4):
            raise DataError(s.path, f"ImageOrientationPatient {s.orientation.tolist()} differs from {ref.path.name}'s {ref.orientation.tolist()}")
        if s.shape != ref.shape:
            raise DataError(s.path, f"slice size {s.shape} differs from {ref.path.name}'s {ref.shape}")
    normal = np.cross(ref.orientation[:3], ref.orientation[3:])
    heights = np.array([float(s.position @ normal) for s in slices])
    order = np.argsort(heights, kind="stable")
    slices = [slices[i] for i in order]
    heights = heights[order]
    if len(slices) == 1:
        return slices, heights, float("nan")
    steps = np.diff(heights)
    duplicate = np.flatnonzero(steps < 1e-6)
    if duplicate.size:
        i = int(duplicate[0])
        raise DataError(folder, f"two slices at the same position {heights[i]:.3f} mm: {slices[i].path.name}, {slices[i + 1].path.name}")
    spacing = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - spacing) > spacing_tolerance * spacing)
    if bad.size:
        gaps = ", ".join(f"{heights[i]:.3f}→{heights[i + 1]:.3f} mm ({steps[i]:.3f} mm)" for i in bad[:5])
        more = f" and {bad.size - 5} more" if bad.size > 5 else ""
        raise DataError(folder, f"inconsistent slice spacing (median {spacing:.3f} mm): gaps at {gaps}{more}")
    return slices, heights, spacing


def _padding_mask(hu: np.ndarray, s: _Slice) -> np.ndarray:
    """Voxels of one slice that are padding, whichever way the file stored it."""

    def to_hu(raw: float) -> float:
        return raw * s.slope + s.intercept

    mask = np.isin(hu, PADDING_VALUES)  # padding written as HU
    for raw in PADDING_VALUES:  # padding written as a stored value, before rescale
        if to_hu(raw) < _MIN_REAL_HU:
            mask |= hu == to_hu(raw)
    if s.padding_value is not None:  # the header's own declaration, a stored value by the DICOM standard
        if s.padding_limit is None:
            mask |= hu == to_hu(s.padding_value)
        else:
            lo, hi = sorted((to_hu(s.padding_value), to_hu(s.padding_limit)))
            mask |= (hu >= lo) & (hu <= hi)
    return mask


def read_dicom_series(
    folder: str | os.PathLike, series_uid: str | None = None, spacing_tolerance: float = 0.01
) -> Volume:
    """Read the CT series in ``folder`` (one file per slice) as an int16 HU volume.

    Files that are not DICOM are ignored. Slices are sorted along the slice normal; the slice spacing comes
    from their positions (not from SliceThickness). Padding voxels become -1000 HU and are counted in
    ``meta["padding_voxels"]``.

    Args:
        folder: the folder holding the slice files (not searched recursively).
        series_uid: SeriesInstanceUID to read when the folder holds several series.
        spacing_tolerance: largest allowed deviation of one slice step from the median step, as a fraction
            of the median; larger deviations (missing or extra slices) raise :class:`DataError`.

    Raises:
        DataError: the folder is missing or holds no DICOM, holds several series and ``series_uid`` is not
            given, a non-image object sits in the series, or the slices overlap or have gaps.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder")
    slices = _select_series(folder, _scan_folder(folder), series_uid)
    slices, heights, dz = _sort_and_space(folder, slices, spacing_tolerance)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in slices])
    try:
        image = reader.Execute()  # applies each file's RescaleSlope/Intercept
    except RuntimeError as exc:
        raise DataError(folder, f"SimpleITK could not decode the series: {str(exc).strip().splitlines()[-1]}") from exc
    if not np.isfinite(dz):  # one slice: nothing to measure, fall back to the header
        dz = float(image.GetSpacing()[2])

    hu = sitk.GetArrayFromImage(image)
    if not np.issubdtype(hu.dtype, np.integer):
        hu = np.rint(hu)
    padding = np.stack([_padding_mask(hu[k], s) for k, s in enumerate(slices)])
    hu = np.where(padding, AIR_HU, hu)
    lo, hi = np.iinfo(np.int16).min, np.iinfo(np.int16).max
    if hu.min() < lo or hu.max() > hi:
        raise DataError(folder, f"HU values {hu.min()}..{hu.max()} do not fit int16; check RescaleSlope/Intercept")

    sy, sx = image.GetSpacing()[1], image.GetSpacing()[0]
    return Volume(
        array=hu.astype(np.int16),
        spacing=(dz, sy, sx),
        origin=tuple(slices[0].position),
        direction=np.asarray(image.GetDirection()).reshape(3, 3),
        uid=slices[0].series_uid,
        source=str(folder),
        meta={
            "padding_voxels": int(padding.sum()),
            "slice_positions_mm": [float(h) for h in heights],
            "files": [s.path.name for s in slices],
        },
    )
