"""Intensity and grid preprocessing shared by the predictors and the flow models.

- MAISI's intensity convention: HU clipped to [-1000, 1000] and mapped linearly to [0, 1].
- The flow works on a grid whose every dimension is a multiple of 32 (MAISI's VAE downsamples ×4 and
  its UNet ×8 more); resizing keeps the physical extent, so the spacing changes by old/new shape.
- Before resizing, the array is reoriented to LPS (identity direction: +x to the patient's left, +y posterior,
  +z superior), so every model sees anatomy the same way round, whatever the scanner stored (LUNA16 has
  scans stored flipped, ``TransformMatrix = -1 0 0 0 -1 0 0 0 1``). MAISI's networks expect this layout.
- Results go back to the scan's own grid with the inverse resize and orientation, so masks keep the
  original geometry.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.transforms import Resize, ScaleIntensityRange

from tfg_core.data.volume import Volume
from tfg_core.errors import DataError

HU_MIN = -1000.0
HU_MAX = 1000.0
GRID_MULTIPLE = 32


def hu_to_unit(hu: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Clip HU to [-1000, 1000] and scale to [0, 1] (MAISI's CT convention).

    Args:
        hu: array or tensor of Hounsfield units.
    """
    transform = ScaleIntensityRange(a_min=HU_MIN, a_max=HU_MAX, b_min=0.0, b_max=1.0, clip=True)
    out = transform(hu.float() if isinstance(hu, torch.Tensor) else np.asarray(hu, dtype=np.float32))
    return out.as_tensor() if hasattr(out, "as_tensor") else out


def unit_to_hu(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Map [0, 1] intensities back to HU (x·2000 − 1000).

    Args:
        x: array or tensor in MAISI's [0, 1] convention.
    """
    return x * (HU_MAX - HU_MIN) + HU_MIN


def check_finite(volume: Volume) -> Volume:
    """Raise if the volume holds NaN or inf voxels (they poison every later gradient).

    Args:
        volume: the volume to check.
    """
    if np.issubdtype(volume.array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(volume.array)))
        if bad:
            raise DataError(volume.source or volume.uid, f"{bad} voxels are NaN or inf")
    return volume


CANONICAL_ORIENTATION = "LPS"


def orientation_code(volume: Volume) -> str:
    """Three-letter DICOM orientation of the volume's index axes (i, j, k), e.g. ``"LPS"`` or ``"RAS"``.

    Args:
        volume: any volume.
    """
    import SimpleITK as sitk

    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(tuple(volume.direction.ravel()))


def reorient(volume: Volume, code: str = CANONICAL_ORIENTATION) -> Volume:
    """Permute/flip the array so its index axes point along ``code``; the world geometry is unchanged.

    Args:
        volume: the volume to reorient.
        code: target orientation (SimpleITK's ``DICOMOrient`` convention).
    """
    import SimpleITK as sitk

    if orientation_code(volume) == code:
        return volume
    image = sitk.DICOMOrient(volume.to_sitk(), code)
    return Volume.from_sitk(image, uid=volume.uid, source=volume.source, **volume.meta)


def model_grid_shape(shape: Sequence[int], multiple: int = GRID_MULTIPLE) -> tuple[int, int, int]:
    """The nearest grid whose every dimension is a positive multiple of ``multiple``.

    Args:
        shape: (z, y, x) voxel counts of the scan.
        multiple: required divisor of each dimension.
    """
    return tuple(max(multiple, int(round(s / multiple)) * multiple) for s in shape)  # type: ignore[return-value]


def resize_volume(
    volume: Volume, shape: Sequence[int], mode: str = "trilinear", anti_aliasing: bool = True
) -> Volume:
    """Resize a volume to ``shape`` (z, y, x) keeping its physical extent; spacing becomes old·n_old/n_new.

    The origin is moved so the resized grid covers the same box: voxel centres shift by half the change in
    spacing along each index axis (in the scan's own direction).

    Args:
        volume: the input volume (HU or [0, 1]).
        shape: target (z, y, x).
        mode: ``"trilinear"`` / ``"area"`` for images, ``"nearest"`` for label masks.
        anti_aliasing: smooth before downsampling images (ignored for ``"nearest"``).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(volume.source or volume.uid, f"cannot resize to {shape}")
    is_label = mode in ("nearest", "nearest-exact")
    # torch's "nearest" floors (a half-voxel shift on up/down sampling); "nearest-exact" is centre-aligned
    resize = Resize(spatial_size=shape, mode="nearest-exact" if is_label else mode,
                    anti_aliasing=anti_aliasing and not is_label)
    data = torch.as_tensor(np.asarray(volume.array, dtype=np.float32))[None]
    out = resize(data)
    out = np.asarray(out.as_tensor() if hasattr(out, "as_tensor") else out)[0]
    if is_label:
        out = out.astype(volume.array.dtype)
    old = np.asarray(volume.shape, dtype=np.float64)
    new_spacing = np.asarray(volume.spacing) * old / np.asarray(shape)
    # corner of the box stays put: origin moves by (new − old)/2 spacing along each axis (x, y, z order)
    shift_ijk = ((new_spacing - np.asarray(volume.spacing)) / 2.0)[::-1]
    new_origin = np.asarray(volume.origin) + volume.direction @ shift_ijk
    return volume.with_array(out, spacing=tuple(new_spacing), origin=tuple(new_origin))


def to_model_grid(volume: Volume, multiple: int = GRID_MULTIPLE, shape: Sequence[int] | None = None) -> Volume:
    """HU volume → [0, 1] volume on a grid of multiples of ``multiple`` (the flow model's input).

    Args:
        volume: HU volume from any reader.
        multiple: divisor for each dimension (32 for MAISI).
        shape: explicit target grid; defaults to :func:`model_grid_shape`.
    """
    check_finite(volume)
    volume = reorient(volume)
    target = tuple(shape) if shape is not None else model_grid_shape(volume.shape, multiple)
    if any(t % multiple for t in target):
        raise DataError(volume.source or volume.uid, f"model grid {target} is not a multiple of {multiple}")
    unit = volume.with_array(np.asarray(hu_to_unit(volume.array), dtype=np.float32))
    return unit if unit.shape == target else resize_volume(unit, target)


def mask_to_model_grid(mask: np.ndarray, scan: Volume, grid: Volume) -> np.ndarray:
    """A label mask on the scan's grid → the model grid of ``grid`` (same reorientation, nearest resize).

    Args:
        mask: (z, y, x) labels on the scan's voxel grid.
        scan: the scan the mask belongs to.
        grid: the scan's :func:`to_model_grid` output.
    """
    labels = reorient(scan.with_array(np.asarray(mask).astype(np.uint8)))
    if labels.shape != grid.shape:
        labels = resize_volume(labels, grid.shape, mode="nearest")
    return labels.array


def to_scan_grid(array: np.ndarray, scan: Volume, mode: str = "trilinear") -> np.ndarray:
    """Bring a model-grid array (e.g. a difference map or mask) back to the scan's voxel grid and orientation.

    Args:
        array: (z, y, x) array on the model grid (canonical orientation, see :func:`to_model_grid`).
        scan: the original volume whose grid is the target.
        mode: ``"trilinear"`` for maps, ``"nearest"`` for masks.
    """
    code = orientation_code(scan)
    # the scan's geometry in canonical orientation (a uint8 placeholder: only the geometry is used)
    canonical = reorient(scan.with_array(np.zeros(scan.shape, np.uint8)))
    out = canonical.with_array(np.asarray(array))
    if out.shape != canonical.shape:
        out = resize_volume(Volume(array=np.asarray(array), spacing=(1.0, 1.0, 1.0)), canonical.shape,
                            mode=mode, anti_aliasing=False)
        out = canonical.with_array(out.array)
    return reorient(out, code).array
