"""LUNA16: the scan manifest, the annotation tables, sphere ground truth and the ``seg-lungs`` masks.

Expected layout (as the official zips unpack)::

    root/subset0/<seriesuid>.mhd (+ .raw) … root/subset9/…   subset k is fold k
    root/seg-lungs-LUNA16/<seriesuid>.mhd                     optional lung masks
    root/candidates_V2.csv | root/candidates_V2/candidates_V2.csv   optional

LUNA16's reference standard gives each nodule as a world centre (x, y, z) mm and a diameter, so the
voxel ground truth is a sphere in *physical* space around that centre, and the centre is mapped with the
scan's own direction matrix (some scans are stored flipped, ``TransformMatrix = -1 0 0 0 -1 0 0 0 1``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tfg_core.data.mhd import read_mhd, read_mhd_info
from tfg_core.data.volume import Volume
from tfg_core.errors import DataError
from tfg_core.io import atomic_write_text

PathLike = str | os.PathLike

N_SUBSETS = 10
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
MANIFEST_COLUMNS = (
    "seriesuid", "subset", "path",
    "shape_z", "shape_y", "shape_x", "spacing_z", "spacing_y", "spacing_x",
    "origin_x", "origin_y", "origin_z", "direction", "flipped",
    "lung_mask_path", "candidates_csv",
)
# seg-lungs-LUNA16 labels: 3 and 4 are the two lungs, 5 the trachea/main bronchi. LUNA16's data page only says
# the masks were "computed using automatic algorithms"; the values are the ones every LUNA16 pipeline uses.
LUNG_LABELS = (3, 4)
LUNG_MASK_DIRS = ("seg-lungs-LUNA16", "seg-lungs-LUNA16/seg-lungs-LUNA16")
CANDIDATE_FILES = ("candidates_V2.csv", "candidates_V2/candidates_V2.csv")
# geometry tolerances when comparing a mask's header to its scan's (headers print ~17 digits; mm)
GEOMETRY_ATOL_MM = 1e-3


# ----------------------------------------------------------------------------------------------- manifest
def _first_existing(root: Path, candidates: Sequence[str]) -> Path | None:
    return next((root / c for c in candidates if (root / c).is_file()), None)


def _direction_text(direction: np.ndarray) -> str:
    # + 0.0 turns -0.0 into 0.0 so identical geometry always prints identically
    return " ".join(f"{float(v) + 0.0:.17g}" for v in np.asarray(direction).ravel())


def build_manifest(root: PathLike, out_csv: PathLike | None = None, progress: bool = False) -> pd.DataFrame:
    """One row per scan of a LUNA16 tree, from the headers only.

    Columns: ``seriesuid, subset, path`` (relative to ``root``), ``shape_z/y/x``, ``spacing_z/y/x`` (mm),
    ``origin_x/y/z`` (mm), ``direction`` (9 numbers, row-major, space-separated), ``flipped`` (any negative
    diagonal entry), ``lung_mask_path`` (relative, empty if none), ``candidates_csv`` (relative, empty if none).
    Rows are sorted by (subset, seriesuid). A partial download (only some subsets) is fine.

    Args:
        root: the LUNA16 folder holding ``subset0`` … ``subset9``.
        out_csv: if given, the manifest is also written there atomically.
        progress: show a tqdm progress bar.

    Raises:
        DataError: no subset folder under ``root``, a bad ``.mhd`` (named), or a seriesuid in two subsets.
    """
    from tqdm.auto import tqdm

    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "LUNA16 root folder not found")
    subsets = [k for k in range(N_SUBSETS) if (root / f"subset{k}").is_dir()]
    if not subsets:
        raise DataError(root, f"no subset0 … subset{N_SUBSETS - 1} folders: not a LUNA16 root")
    files = [(k, f) for k in subsets for f in sorted((root / f"subset{k}").glob("*.mhd"))]
    candidates = _first_existing(root, CANDIDATE_FILES)
    candidates_rel = candidates.relative_to(root).as_posix() if candidates else ""

    rows, seen = [], {}
    for subset, mhd in tqdm(files, desc="LUNA16 headers", disable=not progress):
        uid = mhd.stem
        if uid in seen:
            raise DataError(root, f"seriesuid {uid} is in both subset{seen[uid]} and subset{subset}")
        seen[uid] = subset
        info = read_mhd_info(mhd)
        mask = _first_existing(root, [f"{d}/{uid}.mhd" for d in LUNG_MASK_DIRS])
        rows.append({
            "seriesuid": uid, "subset": subset, "path": mhd.relative_to(root).as_posix(),
            "shape_z": info.shape[0], "shape_y": info.shape[1], "shape_x": info.shape[2],
            "spacing_z": info.spacing[0], "spacing_y": info.spacing[1], "spacing_x": info.spacing[2],
            "origin_x": info.origin[0], "origin_y": info.origin[1], "origin_z": info.origin[2],
            "direction": _direction_text(info.direction),
            "flipped": bool(np.any(np.diag(info.direction) < 0)),
            "lung_mask_path": mask.relative_to(root).as_posix() if mask else "",
            "candidates_csv": candidates_rel,
        })
    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    manifest = manifest.sort_values(["subset", "seriesuid"], kind="stable").reset_index(drop=True)
    manifest.attrs["root"] = str(root)
    if out_csv is not None:
        atomic_write_text(out_csv, manifest.to_csv(index=False, lineterminator="\n"))
    return manifest


def read_manifest(csv_path: PathLike) -> pd.DataFrame:
    """Read a manifest written by :func:`build_manifest` (empty paths stay ``""``, not NaN).

    Args:
        csv_path: the manifest CSV.
    """
    csv_path = Path(csv_path)
    table = _read_csv_as_text(csv_path)
    _require_columns(csv_path, table, MANIFEST_COLUMNS)
    numeric = [c for c in MANIFEST_COLUMNS if c.startswith(("shape_", "spacing_", "origin_"))] + ["subset"]
    _to_numbers(csv_path, table, numeric)
    for col in ("subset", "shape_z", "shape_y", "shape_x"):
        table[col] = table[col].astype(np.int64)
    table["flipped"] = table["flipped"].map({"True": True, "False": False})
    if table["flipped"].isna().any():
        raise DataError(csv_path, "column flipped must hold True/False")
    table["flipped"] = table["flipped"].astype(bool)
    table.attrs["source"] = str(csv_path)
    return table


# --------------------------------------------------------------------------------------- annotation tables
def _read_csv_as_text(csv_path: Path) -> pd.DataFrame:
    if not csv_path.is_file():
        raise DataError(csv_path, "file not found")
    try:
        # as text first, so a bad cell can be reported with its line instead of a dtype error
        return pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(csv_path, f"not a readable CSV: {exc}") from None


def _require_columns(csv_path: Path, table: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(csv_path, f"missing columns {missing} (found {list(table.columns)})")


def _line(index: int) -> int:
    return int(index) + 2  # 1-based file line, after the header line


def _to_numbers(csv_path: Path, table: pd.DataFrame, columns: Sequence[str]) -> None:
    for col in columns:
        values = pd.to_numeric(table[col].str.strip(), errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=np.float64))
        if bad.any():
            i = table.index[bad][0]
            raise DataError(csv_path, f"line {_line(i)}: {col} = {table.at[i, col]!r} is not a finite number")
        table[col] = values.astype(np.float64)


def _read_table(csv_path: PathLike, columns: Sequence[str], numeric: Sequence[str]) -> pd.DataFrame:
    csv_path = Path(csv_path)
    table = _read_csv_as_text(csv_path)
    _require_columns(csv_path, table, columns)
    table["seriesuid"] = table["seriesuid"].str.strip()
    empty = table["seriesuid"] == ""
    if empty.any():
        raise DataError(csv_path, f"line {_line(table.index[empty][0])}: empty seriesuid")
    _to_numbers(csv_path, table, numeric)
    table.attrs["source"] = str(csv_path)
    return table


def read_annotations(csv_path: PathLike) -> pd.DataFrame:
    """Read LUNA16 ``annotations.csv``: ``seriesuid, coordX, coordY, coordZ`` (world mm), ``diameter_mm``.

    Args:
        csv_path: the annotation table.

    Raises:
        DataError: naming the csv (and the line) for missing columns, non-numeric cells or diameter ≤ 0.
    """
    table = _read_table(csv_path, ANNOTATION_COLUMNS, ANNOTATION_COLUMNS[1:])
    bad = table["diameter_mm"] <= 0
    if bad.any():
        i = table.index[bad][0]
        raise DataError(csv_path, f"line {_line(i)}: diameter_mm = {table.at[i, 'diameter_mm']} must be positive")
    return table


def read_candidates(csv_path: PathLike) -> pd.DataFrame:
    """Read LUNA16 ``candidates.csv`` / ``candidates_V2.csv``: ``seriesuid, coordX, coordY, coordZ, class`` (0/1).

    Args:
        csv_path: the candidate table.

    Raises:
        DataError: naming the csv (and the line) for missing columns, non-numeric cells or a class not 0/1.
    """
    table = _read_table(csv_path, CANDIDATE_COLUMNS, CANDIDATE_COLUMNS[1:])
    bad = ~table["class"].isin([0.0, 1.0])
    if bad.any():
        i = table.index[bad][0]
        raise DataError(csv_path, f"line {_line(i)}: class = {table.at[i, 'class']} must be 0 or 1")
    table["class"] = table["class"].astype(np.int64)
    return table


def check_annotations(annotations: pd.DataFrame, manifest: pd.DataFrame, csv_path: PathLike | None = None) -> None:
    """Every annotated seriesuid must be a scan of the manifest (catches a wrong root or a partial download).

    Args:
        annotations: from :func:`read_annotations` (or candidates).
        manifest: from :func:`build_manifest`.
        csv_path: the annotation file, for the message (defaults to the table's ``attrs["source"]``).

    Raises:
        DataError: naming the csv and the first unknown seriesuid.
    """
    source = csv_path if csv_path is not None else annotations.attrs.get("source")
    unknown = ~annotations["seriesuid"].isin(set(manifest["seriesuid"]))
    if unknown.any():
        i = annotations.index[unknown][0]
        raise DataError(source, f"line {_line(i)}: seriesuid {annotations.at[i, 'seriesuid']} is not in the manifest "
                                f"({int(unknown.sum())} annotation(s) of unknown scans, {len(manifest)} scans listed)")


# ------------------------------------------------------------------------------------------ voxel geometry
def _geometry_of(volume_or_row: Volume | Mapping) -> Volume:
    """A :class:`Volume` for a manifest row: the right geometry over a zero-stride dummy array (no voxels read)."""
    if isinstance(volume_or_row, Volume):
        return volume_or_row
    row = volume_or_row
    shape = (int(row["shape_z"]), int(row["shape_y"]), int(row["shape_x"]))
    return Volume(
        array=np.broadcast_to(np.int16(0), shape),
        spacing=(row["spacing_z"], row["spacing_y"], row["spacing_x"]),
        origin=(row["origin_x"], row["origin_y"], row["origin_z"]),
        direction=np.array([float(v) for v in str(row["direction"]).split()]).reshape(3, 3),
        uid=str(row["seriesuid"]),
        source=str(row.get("path", "")),
    )


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):.2f}" for v in values) + ")"


def annotations_for(volume_or_row: Volume | Mapping, annotations: pd.DataFrame,
                    manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """The annotations of one scan, with their centres as continuous voxel indices.

    Adds ``voxel_z, voxel_y, voxel_x`` (continuous index, from :meth:`Volume.world_to_voxel`, i.e. the
    scan's own origin/direction/spacing) to the rows whose ``seriesuid`` is the scan's uid.

    Args:
        volume_or_row: the scan, or its manifest row (geometry from the header, no voxels read).
        annotations: from :func:`read_annotations`.
        manifest: if given, first run :func:`check_annotations` on the whole table.

    Raises:
        DataError: an unknown seriesuid (with ``manifest``), or a centre outside the scan (naming scan and annotation).
    """
    if manifest is not None:
        check_annotations(annotations, manifest)
    geometry = _geometry_of(volume_or_row)
    rows = annotations[annotations["seriesuid"] == geometry.uid].copy()
    world = rows[["coordX", "coordY", "coordZ"]].to_numpy(dtype=np.float64).reshape(-1, 3)
    voxels = geometry.world_to_voxel(world)
    # a centre belongs to the volume if it lies in some voxel's extent, i.e. index in [-0.5, n - 0.5]
    shape = np.asarray(geometry.shape)
    outside = np.any((voxels < -0.5) | (voxels > shape - 0.5), axis=1)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        i = rows.index[k]
        raise DataError(geometry.source or geometry.uid,
                        f"annotation {i} (line {_line(i)} of {annotations.attrs.get('source', 'the table')}: "
                        f"world x,y,z = {_fmt(world[k])} mm) maps to voxel z,y,x = {_fmt(voxels[k])}, "
                        f"outside the volume of shape {geometry.shape}")
    rows["voxel_z"], rows["voxel_y"], rows["voxel_x"] = voxels[:, 0], voxels[:, 1], voxels[:, 2]
    return rows


def sphere_mask(volume: Volume, centres_xyz: np.ndarray, diameters_mm: np.ndarray) -> np.ndarray:
    """LUNA16 ground truth: voxels whose physical distance from a nodule centre is ≤ its radius.

    Each sphere is evaluated only on its bounding box in index space, so cost scales with nodule size,
    not with the number of nodules × scan size. Distances are in world mm (anisotropic spacing and any
    direction matrix are honoured); spheres partly outside the scan are clipped.

    Args:
        volume: the scan (only its geometry is used).
        centres_xyz: (N, 3) world centres (x, y, z) mm.
        diameters_mm: (N,) diameters in mm, > 0.

    Returns:
        bool array (z, y, x) of the volume's shape.
    """
    centres = np.asarray(centres_xyz, dtype=np.float64).reshape(-1, 3)
    diameters = np.asarray(diameters_mm, dtype=np.float64).reshape(-1)
    if len(centres) != len(diameters):
        raise ValueError(f"{len(centres)} centres but {len(diameters)} diameters")
    if not np.all(np.isfinite(diameters) & (diameters > 0)):
        raise ValueError(f"diameters must be positive, got {diameters}")
    mask = np.zeros(volume.shape, dtype=bool)
    shape = np.asarray(volume.shape)
    # index offset per mm of world offset; row k's norm bounds |Δindex_k| over a ball of radius 1 mm
    world_to_index = np.linalg.inv(volume.direction @ np.diag(volume.spacing_xyz))[::-1]  # rows (k, j, i) = (z, y, x)
    reach = np.linalg.norm(world_to_index, axis=1)
    for centre, diameter in zip(centres, diameters):
        radius = diameter / 2.0
        c = volume.world_to_voxel(centre)
        lo = np.maximum(np.floor(c - radius * reach).astype(int), 0)
        hi = np.minimum(np.ceil(c + radius * reach).astype(int), shape - 1)
        if np.any(hi < lo):
            continue
        grid = np.stack(np.meshgrid(*(np.arange(a, b + 1) for a, b in zip(lo, hi)), indexing="ij"), axis=-1)
        inside = np.linalg.norm(volume.voxel_to_world(grid) - centre, axis=-1) <= radius
        mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] |= inside
    return mask


# ------------------------------------------------------------------------------------------- lung masks
def read_lung_mask(path: PathLike, like: Volume) -> np.ndarray:
    """Read a ``seg-lungs-LUNA16`` mask as a boolean lung mask on ``like``'s grid.

    Labels 3 and 4 (the lungs) become True; 5 (trachea) and 0 become False.

    Args:
        path: the mask's ``.mhd``.
        like: the scan it belongs to; shape, spacing, origin and direction must match.

    Raises:
        DataError: unreadable mask, different geometry, or no lung label at all.
    """
    mask = read_mhd(path)
    problems = []
    if mask.shape != like.shape:
        problems.append(f"shape {mask.shape} vs {like.shape}")
    else:
        if not np.allclose(mask.spacing, like.spacing, rtol=0, atol=GEOMETRY_ATOL_MM):
            problems.append(f"spacing {mask.spacing} vs {like.spacing}")
        if not np.allclose(mask.origin, like.origin, rtol=0, atol=GEOMETRY_ATOL_MM):
            problems.append(f"origin {mask.origin} vs {like.origin}")
        if not np.allclose(mask.direction, like.direction, rtol=0, atol=1e-6):
            problems.append(f"direction {mask.direction.ravel().tolist()} vs {like.direction.ravel().tolist()}")
    if problems:
        raise DataError(path, f"geometry differs from scan {like.source or like.uid}: " + "; ".join(problems))
    lungs = np.isin(mask.array, LUNG_LABELS)
    if not lungs.any() and np.any(mask.array != 0):
        values = np.unique(mask.array)[:10].tolist()
        raise DataError(path, f"no lung label {LUNG_LABELS} found (values present: {values}); "
                              "not a LUNA16 seg-lungs mask?")
    return lungs


# --------------------------------------------------------------------------------------------- one case
def load_case(root: PathLike, manifest_row: Mapping, annotations: pd.DataFrame) -> tuple[Volume, pd.DataFrame]:
    """Read one scan of the manifest and its annotations in voxel coordinates.

    Args:
        root: the LUNA16 root the manifest paths are relative to.
        manifest_row: one row of :func:`build_manifest` / :func:`read_manifest`.
        annotations: from :func:`read_annotations` (other scans' rows are ignored).

    Raises:
        DataError: the file changed since the manifest was built, or an annotation lies outside the scan.
    """
    path = Path(root) / str(manifest_row["path"])
    volume = read_mhd(path)
    expected = _geometry_of(manifest_row)
    if volume.uid != expected.uid or volume.shape != expected.shape or not np.allclose(
            volume.spacing, expected.spacing, rtol=0, atol=GEOMETRY_ATOL_MM):
        raise DataError(path, f"does not match its manifest row (uid {expected.uid}, shape {expected.shape}, "
                              f"spacing {expected.spacing}); rebuild the manifest")
    return volume, annotations_for(volume, annotations)
