"""The one volume type every reader returns and every later stage consumes.

Conventions (see README, "Conventions"):
- ``array`` is indexed (z, y, x); ``spacing`` is (z, y, x) in mm.
- ``origin`` and ``direction`` stay in ITK's world order (x, y, z), because world coordinates
  (LUNA16 annotations, DICOM positions) are (x, y, z) in patient LPS millimetres.
  ``direction`` is ITK's 3×3 matrix whose column j is the world direction of index axis j (i=x, j=y, k=z).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A CT volume in Hounsfield units with its physical geometry.

    Args:
        array: voxel values indexed (z, y, x); int16 HU from readers, float after preprocessing.
        spacing: voxel size (z, y, x) in mm, every entry > 0.
        origin: world position (x, y, z) in mm of voxel (0, 0, 0).
        direction: 3×3 ITK direction cosines (world x, y, z rows; index i, j, k columns).
        uid: series identifier (LUNA16 seriesuid / DICOM SeriesInstanceUID / file stem).
        source: where it was read from, for error messages and reports.
        meta: free-form extras (e.g. reader-specific tags).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    uid: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from tfg_core.errors import DataError

        if self.array.ndim != 3:
            raise DataError(self.source or self.uid, f"expected a 3D (z, y, x) array, got shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if len(self.spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise DataError(self.source or self.uid, f"spacing must be three positive finite mm values, got {self.spacing}")
        if not np.all(np.isfinite(self.origin)):
            raise DataError(self.source or self.uid, f"origin is not finite: {self.origin}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        return self.spacing[::-1]  # type: ignore[return-value]

    def world_to_voxel(self, points_xyz: np.ndarray) -> np.ndarray:
        """Map world points (x, y, z) mm to continuous voxel indices (z, y, x).

        Uses the image's own physical-point transform (origin, direction, spacing), so flipped scans
        (LUNA16 ``TransformMatrix = -1 0 0 0 -1 0 0 0 1``) come out right.

        Args:
            points_xyz: array (..., 3) of world coordinates.
        """
        p = np.asarray(points_xyz, dtype=np.float64)
        scaled = (p - np.asarray(self.origin)) @ np.linalg.inv(self.direction).T  # index * spacing, (i, j, k)
        ijk = scaled / np.asarray(self.spacing_xyz)
        return ijk[..., ::-1]

    def voxel_to_world(self, index_zyx: np.ndarray) -> np.ndarray:
        """Map continuous voxel indices (z, y, x) to world points (x, y, z) mm.

        Args:
            index_zyx: array (..., 3) of voxel indices.
        """
        ijk = np.asarray(index_zyx, dtype=np.float64)[..., ::-1]
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing_xyz)) @ self.direction.T

    def with_array(self, array: np.ndarray, **changes: Any) -> "Volume":
        """A copy with a new array (same geometry unless ``changes`` say otherwise).

        Args:
            array: the new (z, y, x) array.
            changes: other fields to replace (e.g. ``spacing`` after a resize).
        """
        return replace(self, array=array, **changes)

    def to_sitk(self):
        """This volume as a ``SimpleITK.Image`` (SimpleITK speaks x, y, z; converted here and only here)."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(self.spacing_xyz)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))
        return image

    @classmethod
    def from_sitk(cls, image, uid: str = "", source: str = "", **meta: Any) -> "Volume":
        """Build a volume from a ``SimpleITK.Image``.

        Args:
            image: a 3D SimpleITK image.
            uid: series identifier.
            source: file or folder it came from.
            meta: extras stored in ``meta``.
        """
        import SimpleITK as sitk

        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=tuple(image.GetSpacing())[::-1],
            origin=tuple(image.GetOrigin()),
            direction=np.asarray(image.GetDirection()).reshape(3, 3),
            uid=uid,
            source=source,
            meta=dict(meta),
        )
