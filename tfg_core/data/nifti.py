"""NIfTI output in the scan's own geometry (SimpleITK writes it; nibabel reads it back in tests)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tfg_core.data.volume import Volume
from tfg_core.errors import DataError
from tfg_core.io import atomic_write_with


def write_nifti(volume: Volume, path: str | os.PathLike) -> Path:
    """Write ``volume`` as ``.nii``/``.nii.gz`` atomically; spacing, origin and direction are preserved.

    SimpleITK converts our LPS world coordinates to NIfTI's RAS in the header, so any viewer places the
    mask exactly on the original scan.

    Args:
        volume: mask or map with the scan's geometry.
        path: destination ending in ``.nii`` or ``.nii.gz``.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ValueError(f"{path}: NIfTI files end in .nii or .nii.gz")
    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    image = volume.with_array(array).to_sitk()
    return atomic_write_with(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file into a :class:`Volume` (LPS world coordinates, (z, y, x) array).

    Args:
        path: the file.
    """
    import nibabel as nib
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such NIfTI file")
    try:
        image = sitk.ReadImage(str(path))
        stored = nib.load(str(path))
    except (RuntimeError, OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise DataError(path, f"unreadable NIfTI ({str(exc).strip().splitlines()[-1][:200]})") from None
    # ITK's NIfTI reader turns NaN into 0 without a word; look at the stored values of float images ourselves
    if np.issubdtype(stored.get_data_dtype(), np.floating):
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(stored.dataobj))))
        if bad:
            raise DataError(path, f"{bad} voxels are NaN or inf")
    return Volume.from_sitk(image, uid=path.name.split(".")[0], source=str(path))
