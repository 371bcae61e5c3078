"""The phantom cohort: deterministic chest-like CT volumes with nodules, written as a LUNA16 tree.

Every CPU demo and test runs on it, and it trains the tiny flow prior and the tiny slice classifier. It is
written in LUNA16's layout so that the *same* reader path (``tfg_core.data.luna16``) loads it::

    root/subset{k}/{seriesuid}.mhd|.raw        int16 HU scans; case i is in subset i % 10 (fold k = subset k)
    root/annotations.csv                       seriesuid,coordX,coordY,coordZ,diameter_mm (LUNA16 columns)
    root/seg-lungs-LUNA16/{seriesuid}.mhd      uint8 lung masks (.zraw): 3 left lung, 4 right lung, 5 trachea/bronchi
    root/masks/{seriesuid}.mhd                 uint8 nodule masks (.zraw): nodule j has value j (1, 2, 3), 0 elsewhere
    root/nodules.csv                           the annotations plus subset, label, kind, n_voxels
    root/cases/{seriesuid}.json                per-case record (written before the scan; lets a rerun resume)
    root/cohort.json                           the config that made the tree

Geometry (defaults, :data:`DEFAULT_SHAPE`, :data:`DEFAULT_FOV_MM`): 32 × 64 × 64 voxels (z, y, x) over a
80 × 352 × 352 mm field of view, i.e. spacing 2.5 × 5.5 × 5.5 mm: a 64-voxel row spans a whole chest and
the slab covers 8 cm of mid-chest around the carina. A larger ``shape`` keeps the field of view, so the
anatomy (sampled in mm) scales with the grid and only gets sharper. Origins are LUNA16-like (centre near
x, y ≈ 0, z ≈ −100 … −250 mm); about ``flip_fraction`` of the scans are stored flipped
(``TransformMatrix = -1 0 0 0 -1 0 0 0 1``, origin at the opposite corner), as some LUNA16 scans are; the
anatomy and annotations are the same physical points either way.

Nodule diameters are the *mask's* equivalent diameter (6·V/π)^(1/3); centres are the mask centroid in world
mm. Sizes are drawn log-uniform in ``diameter_range_mm`` but never below the grid's resolution floor
(1.2 × mean voxel size: 5.4 mm at the default grid), so a "3 mm" nodule on a 5.5 mm grid is a few voxels.

Lung-mask values: LUNA16's ``seg-lungs-LUNA16`` uses 3 and 4 for the two lungs and 5 for the trachea/main
bronchi; its data page does not say which lung is which. We write 3 = patient's left lung (world +x),
4 = right lung, following the one public description found; readers should treat {3, 4} as "lung".

Determinism: case ``i`` of seed ``s`` comes from ``SeedSequence([s, i])`` alone (independent streams for
geometry, anatomy, nodules and noise), so it is identical whatever ``n_cases`` is and in whatever order
cases are generated; written files are byte-identical across runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from tfg_core.data.luna16 import ANNOTATION_COLUMNS, N_SUBSETS
from tfg_core.data.mhd import write_mhd
from tfg_core.data.phantom_shapes import (
    LABEL_AIRWAY, LABEL_LEFT_LUNG, LABEL_RIGHT_LUNG, NODULE_KINDS, Anatomy, Grid, blend, coverage,
    draw_anatomy, sample_nodule_shape,
)
from tfg_core.data.volume import Volume
from tfg_core.errors import DataError
from tfg_core.io import atomic_write_text

PathLike = str | os.PathLike

# ------------------------------------------------------------------------------------------ defaults
DEFAULT_SHAPE = (32, 64, 64)  # (z, y, x) voxels
DEFAULT_FOV_MM = (80.0, 352.0, 352.0)  # (z, y, x) mm → spacing 2.5 × 5.5 × 5.5 mm at the default shape
DEFAULT_N_CASES = 100  # 10 per LUNA16 subset
DEFAULT_SEED = 0
NODULE_PROBABILITY = 0.5  # share of cases with ≥ 1 nodule
NODULE_COUNT_WEIGHTS = (0.6, 0.3, 0.1)  # P(1, 2, 3 nodules | case has nodules)
DIAMETER_RANGE_MM = (3.0, 30.0)
KIND_WEIGHTS = (("solid", 0.22), ("part_solid", 0.13), ("ground_glass", 0.13),
                ("lobulated", 0.16), ("juxta_pleural", 0.18), ("vessel_attached", 0.18))
FLIP_FRACTION = 0.1
NOISE_HU_RANGE = (15.0, 30.0)
MIN_NODULE_VOXELS = 2
RESOLUTION_FLOOR = 1.2  # smallest nodule diameter, in mean voxel sizes
PLACEMENT_ATTEMPTS = 80
VESSEL_MASK_COVERAGE = 0.3  # a voxel is "vessel" from this partial-volume fraction (≈ +270 HU over lung)
# DICOM-style UID: pydicom's root for generated UIDs, then 834 ("TFG" on a keypad), seed, case index
UID_PREFIX = "1.2.826.0.1.3680043.8.498.834"
HU_CLIP = (-1024, 3071)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PhantomConfig:
    """Everything that determines a phantom cohort (the defaults above are the project's default dataset).

    Args:
        shape: (z, y, x) voxels.
        fov_mm: (z, y, x) field of view in mm; the spacing is ``fov_mm / shape`` unless ``spacing`` is given.
        spacing: explicit (z, y, x) spacing in mm (the field of view then follows from it); None = from ``fov_mm``.
        n_cases: number of cases.
        seed: non-negative cohort seed.
        nodule_probability: chance that a case has nodules.
        nodule_count_weights: relative chances of 1, 2, 3, … nodules in a case with nodules.
        diameter_range_mm: (min, max) sampled diameter (log-uniform), before the resolution floor.
        kind_weights: (kind, weight) pairs over :data:`~tfg_core.data.phantom_shapes.NODULE_KINDS`.
        flip_fraction: chance that a scan is stored with the flipped direction matrix.
        noise_hu_range: (min, max) of the per-case Gaussian noise σ in HU.
        min_nodule_voxels: smallest accepted nodule mask.
        n_subsets: LUNA16 subsets (folds) the cases are dealt into.
    """

    shape: tuple[int, int, int] = DEFAULT_SHAPE
    fov_mm: tuple[float, float, float] = DEFAULT_FOV_MM
    spacing: tuple[float, float, float] | None = None
    n_cases: int = DEFAULT_N_CASES
    seed: int = DEFAULT_SEED
    nodule_probability: float = NODULE_PROBABILITY
    nodule_count_weights: tuple[float, ...] = NODULE_COUNT_WEIGHTS
    diameter_range_mm: tuple[float, float] = DIAMETER_RANGE_MM
    kind_weights: tuple[tuple[str, float], ...] = KIND_WEIGHTS
    flip_fraction: float = FLIP_FRACTION
    noise_hu_range: tuple[float, float] = NOISE_HU_RANGE
    min_nodule_voxels: int = MIN_NODULE_VOXELS
    n_subsets: int = N_SUBSETS

    def __post_init__(self) -> None:
        # tuples, not lists, so the config stays hashable and compares equal after a JSON round trip
        for name in ("shape", "fov_mm", "nodule_count_weights", "diameter_range_mm", "noise_hu_range"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "kind_weights", tuple((str(k), float(w)) for k, w in self.kind_weights))
        if len(self.shape) != 3 or any(int(s) != s or s < 8 for s in self.shape):
            raise ValueError(f"shape must be three integers ≥ 8, got {self.shape}")
        if self.seed < 0 or self.n_cases < 0:
            raise ValueError(f"seed and n_cases must be ≥ 0, got seed={self.seed}, n_cases={self.n_cases}")
        if not 0.0 <= self.nodule_probability <= 1.0 or not 0.0 <= self.flip_fraction <= 1.0:
            raise ValueError("nodule_probability and flip_fraction must lie in [0, 1]")
        lo, hi = self.diameter_range_mm
        if not 0 < lo <= hi:
            raise ValueError(f"diameter_range_mm must be 0 < min ≤ max, got {self.diameter_range_mm}")
        unknown = [k for k, _ in self.kind_weights if k not in NODULE_KINDS]
        if unknown or not any(w > 0 for _, w in self.kind_weights):
            raise ValueError(f"kind_weights needs positive weights over {NODULE_KINDS}, got {self.kind_weights}")
        if not self.nodule_count_weights or min(self.nodule_count_weights) < 0 or sum(self.nodule_count_weights) <= 0:
            raise ValueError("nodule_count_weights must be non-negative with a positive sum, "
                             f"got {self.nodule_count_weights}")
        if self.n_subsets < 1:
            raise ValueError(f"n_subsets must be ≥ 1, got {self.n_subsets}")

    @property
    def voxel_spacing(self) -> tuple[float, float, float]:
        """The (z, y, x) spacing in mm actually used."""
        if self.spacing is not None:
            return self.spacing
        return tuple(f / s for f, s in zip(self.fov_mm, self.shape))  # type: ignore[return-value]

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class PhantomNodule:
    """One nodule of a phantom case, as LUNA16 would annotate it.

    Args:
        kind: one of ``solid, part_solid, ground_glass, lobulated, juxta_pleural, vessel_attached``.
        label: its value in the case's nodule label map (1, 2, …).
        centre_xyz: world centre (x, y, z) mm of the mask centroid.
        diameter_mm: equivalent diameter of the mask, (6·V/π)^(1/3).
        n_voxels: mask size in voxels.
    """

    kind: str
    label: int
    centre_xyz: tuple[float, float, float]
    diameter_mm: float
    n_voxels: int


@dataclass
class PhantomCase:
    """A generated case; every array is (z, y, x) on ``volume``'s grid (flipped with it).

    Args:
        index: case number in the cohort.
        subset: LUNA16 subset (= fold).
        volume: int16 HU scan with geometry and ``uid``.
        nodule_labels: uint8, nodule j has value j, 0 elsewhere.
        lung_labels: uint8 seg-lungs labels (3 left, 4 right, 5 trachea/main bronchi).
        vessel_mask: bool, voxels with ≥ 30 % vessel (kept for analysing false positives on vessels).
        nodules: the nodules in label order.
        noise_sigma_hu: σ of the Gaussian noise added to this case, in HU (drawn per case from
            ``noise_hu_range``; the healthy twin has the same noise).
    """

    index: int
    subset: int
    volume: Volume
    nodule_labels: np.ndarray
    lung_labels: np.ndarray
    vessel_mask: np.ndarray
    nodules: list[PhantomNodule] = field(default_factory=list)
    noise_sigma_hu: float = float("nan")

    @property
    def uid(self) -> str:
        return self.volume.uid

    @property
    def flipped(self) -> bool:
        return bool(np.any(np.diag(self.volume.direction) < 0))

    @property
    def nodule_mask(self) -> np.ndarray:
        """Union of all nodule masks (the ground truth), bool."""
        return self.nodule_labels > 0

    @property
    def lung_mask(self) -> np.ndarray:
        """Both lungs (airways excluded), bool."""
        return np.isin(self.lung_labels, (LABEL_LEFT_LUNG, LABEL_RIGHT_LUNG))


def series_uid(seed: int, index: int) -> str:
    """Deterministic DICOM-style series UID of case ``index`` of cohort ``seed``.

    Args:
        seed: cohort seed.
        index: case number.
    """
    return f"{UID_PREFIX}.{int(seed)}.{int(index)}"


# ------------------------------------------------------------------------------------------ nodules
def _centroid_is_inside(mask: np.ndarray, centroid: np.ndarray) -> bool:
    """Whether every nearest voxel of ``centroid`` (both, on an exact .5 tie) lies in ``mask``.

    Ties matter: a flipped scan rounds the mirrored index, so both candidates must be nodule voxels.
    """
    options = []
    for c in centroid:
        frac = c - np.floor(c)
        options.append({int(np.floor(c)), int(np.ceil(c))} if abs(frac - 0.5) < 1e-6 else {int(np.rint(c))})
    shape = np.asarray(mask.shape)
    for iz in options[0]:
        for iy in options[1]:
            for ix in options[2]:
                i = np.array([iz, iy, ix])
                if np.any(i < 0) or np.any(i >= shape) or not mask[iz, iy, ix]:
                    return False
    return True


def _touches_grid_border(body: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...]) -> bool:
    """Whether a shape evaluated on ``box`` reaches a face of the whole grid (so part of it may be cut off)."""
    for k, (s, n) in enumerate(zip(box, shape)):
        first, last = [slice(None)] * 3, [slice(None)] * 3
        first[k], last[k] = 0, -1
        if (s.start == 0 and body[tuple(first)].any()) or (s.stop == n and body[tuple(last)].any()):
            return True
    return False


def _sample_centre(rng: np.random.Generator, kind: str, radius: float, grid: Grid, anatomy: Anatomy,
                   inward: tuple[np.ndarray, ...]) -> np.ndarray | None:
    """A candidate nodule centre (centred mm) for ``kind``, or None if this attempt found none."""
    spacing = np.asarray(grid.spacing)
    depth = anatomy.depth_mm
    if kind == "vessel_attached":
        thick = [s for s in anatomy.segments if s.r1 >= max(1.5, 0.4 * grid.edge_mm)]
        if not thick:
            return None
        seg = thick[int(rng.integers(len(thick)))]
        t = rng.uniform(0.2, 0.8)
        d = seg.b - seg.a
        d = d / max(float(np.linalg.norm(d)), 1e-9)
        v = rng.standard_normal(3)
        v = v - (v @ d) * d
        v /= max(float(np.linalg.norm(v)), 1e-9)
        r_vessel = seg.r0 + t * (seg.r1 - seg.r0)
        return seg.a + t * (seg.b - seg.a) + v * (radius + 0.5 * r_vessel)
    if kind == "juxta_pleural":
        candidates = np.flatnonzero(anatomy.lung.ravel() & (depth.ravel() <= spacing.max() * 1.01))
    else:
        candidates = np.flatnonzero(depth.ravel() >= radius + 0.5 * grid.edge_mm)
    if len(candidates) == 0:
        return None
    voxel = np.array(np.unravel_index(candidates[int(rng.integers(len(candidates)))], grid.shape))
    centre = grid.to_mm(voxel + rng.uniform(-0.5, 0.5, 3))
    if kind == "juxta_pleural":
        # step in from the pleura so part of the ball is cut off by the lung wall
        n = np.array([g[tuple(voxel)] for g in inward])
        n = n / max(float(np.linalg.norm(n)), 1e-9)  # the depth map grows inwards
        centre = centre + n * rng.uniform(0.1, 0.5) * radius
    return centre


def _place_nodules(rng: np.random.Generator, grid: Grid, anatomy: Anatomy, hu: np.ndarray,
                   labels: np.ndarray, config: PhantomConfig) -> list[tuple[str, int, np.ndarray, int]]:
    """Draw the case's nodules into ``hu`` and ``labels`` (in place, canonical grid).

    Returns (kind, label, centroid index z y x, n_voxels) per accepted nodule.
    """
    if rng.random() >= config.nodule_probability:
        return []
    counts = np.asarray(config.nodule_count_weights, float)
    n_nodules = 1 + int(rng.choice(len(counts), p=counts / counts.sum()))
    kinds = [k for k, _ in config.kind_weights]
    weights = np.asarray([w for _, w in config.kind_weights], float)
    lung = anatomy.lung
    avoid = (anatomy.labels == LABEL_AIRWAY) | (anatomy.airway_occ > 0.3)
    vessel = anatomy.vessel_occ >= VESSEL_MASK_COVERAGE
    inward = np.gradient(anatomy.depth_mm, *grid.spacing)
    edge = grid.edge_mm
    d_min = max(config.diameter_range_mm[0], RESOLUTION_FLOOR * edge)
    d_max = max(config.diameter_range_mm[1], d_min)
    placed: list[tuple[str, int, np.ndarray, int]] = []
    for _ in range(n_nodules):
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        radius = float(np.exp(rng.uniform(np.log(d_min), np.log(d_max)))) / 2.0
        for _attempt in range(PLACEMENT_ATTEMPTS):
            centre = _sample_centre(rng, kind, radius, grid, anatomy, inward)
            if centre is None:
                continue
            shape = sample_nodule_shape(rng, kind, centre, radius)
            box = grid.box(centre, shape.reach_mm + 2.0 * edge)
            if box is None:
                continue
            coords = grid.box_coords(box)
            sd = shape.sdf(*coords)
            body = sd <= 0
            mask = body & lung[box]
            n_vox = int(mask.sum())
            if n_vox < config.min_nodule_voxels or _touches_grid_border(body, box, grid.shape):
                continue  # too small to see, or cut by the field of view (its centroid would not be its centre)
            near = sd <= edge
            if (near & (labels[box] > 0)).any() or (near & avoid[box]).any():
                continue  # keep clear of earlier nodules and of the airways
            if kind == "juxta_pleural":
                if not (body & ~lung[box]).any():
                    continue  # must actually reach the lung wall
            elif n_vox < 0.9 * body.sum():
                continue  # the others lie inside the lung
            if kind == "vessel_attached":
                ring = ndimage.binary_dilation(mask) & ~mask
                if not (ring & vessel[box]).any():
                    continue
            offset = np.array([s.start for s in box])
            centroid = np.argwhere(mask).mean(axis=0) + offset
            if not _centroid_is_inside(mask, centroid - offset):
                continue
            inside = lung[box].astype(np.float32)
            blend(hu[box], coverage(sd, edge * shape.soft_edge) * inside, shape.hu)
            core_sd = shape.core_sdf(*coords)
            if core_sd is not None:
                blend(hu[box], coverage(core_sd, edge) * inside, shape.core_hu)
            label = len(placed) + 1
            labels[box][mask] = label
            placed.append((kind, label, centroid, n_vox))
            break
    return placed


# --------------------------------------------------------------------------------------------- cases
def generate_case(index: int, config: PhantomConfig = PhantomConfig()) -> PhantomCase:
    """Generate case ``index`` of the cohort described by ``config``.

    Deterministic in (``config``, ``index``) and independent of ``n_cases`` and of other cases.

    Args:
        index: case number (0-based; may exceed ``config.n_cases``).
        config: the cohort config.
    """
    if index < 0:
        raise ValueError(f"index must be ≥ 0, got {index}")
    geo_rng, anatomy_rng, nodule_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([config.seed, index]).spawn(4))
    grid = Grid(tuple(int(s) for s in config.shape), config.voxel_spacing)  # type: ignore[arg-type]

    anatomy = draw_anatomy(anatomy_rng, grid)
    hu = anatomy.hu
    nodule_labels = np.zeros(grid.shape, dtype=np.uint8)
    placed = _place_nodules(nodule_rng, grid, anatomy, hu, nodule_labels, config)
    noise_sigma = float(noise_rng.uniform(*config.noise_hu_range))  # drawn before the noise, as always
    hu += noise_rng.normal(0.0, noise_sigma, grid.shape).astype(np.float32)
    array = np.clip(np.rint(hu), *HU_CLIP).astype(np.int16)

    # geometry: a LUNA16-like world position of the grid centre; canonical = identity direction
    spacing = np.asarray(grid.spacing)
    centre_xyz = np.array([geo_rng.uniform(-15, 15), geo_rng.uniform(-20, 40), geo_rng.uniform(-250, -100)])
    flipped = bool(geo_rng.random() < config.flip_fraction)
    half_xyz = ((np.asarray(grid.shape) - 1) / 2.0 * spacing)[::-1]
    origin = centre_xyz - half_xyz
    direction = np.eye(3)
    voxel_volume = float(np.prod(spacing))
    nodules = [PhantomNodule(kind=kind, label=label,
                             centre_xyz=tuple(float(v) for v in centre_xyz + grid.to_mm(c)[::-1]),  # type: ignore
                             diameter_mm=float((6.0 * n * voxel_volume / np.pi) ** (1.0 / 3.0)), n_voxels=n)
               for kind, label, c, n in placed]

    lung_labels, vessel_mask = anatomy.labels, anatomy.vessel_occ >= VESSEL_MASK_COVERAGE
    if flipped:
        # stored mirrored in x and y; origin is the world position of the new voxel 0 (the old far corner)
        flip = (slice(None), slice(None, None, -1), slice(None, None, -1))
        array, nodule_labels, lung_labels, vessel_mask = (
            np.ascontiguousarray(a[flip]) for a in (array, nodule_labels, lung_labels, vessel_mask))
        origin = origin + np.array([2 * half_xyz[0], 2 * half_xyz[1], 0.0])
        direction = np.diag([-1.0, -1.0, 1.0])
    uid = series_uid(config.seed, index)
    volume = Volume(array=array, spacing=tuple(spacing), origin=tuple(origin), direction=direction, uid=uid,
                    source=f"phantom(seed={config.seed}, index={index})", meta={"phantom_index": index})
    return PhantomCase(index=index, subset=index % config.n_subsets, volume=volume, nodule_labels=nodule_labels,
                       lung_labels=lung_labels, vessel_mask=vessel_mask, nodules=nodules,
                       noise_sigma_hu=noise_sigma)


def healthy_twin(index: int, config: PhantomConfig = PhantomConfig()) -> PhantomCase:
    """Case ``index`` exactly as generated, but without its nodules: the ideal counterfactual "healthy" scan.

    Anatomy, noise and geometry come from their own random streams, so only the nodules' voxels (and their soft
    edges) differ from :func:`generate_case`. The evaluation uses it as an oracle: a difference-of-reconstructions
    method can at best find what separates a case from its twin after the autoencoder.

    Args:
        index: case number.
        config: the cohort config (as in the tree's ``cohort.json``, see :func:`read_cohort_config`).
    """
    return generate_case(index, replace(config, nodule_probability=0.0))


def parse_series_uid(uid: str) -> tuple[int, int]:
    """(seed, index) of a phantom series UID made by :func:`series_uid`.

    Args:
        uid: series UID.

    Raises:
        ValueError: not a phantom UID.
    """
    prefix, _, rest = uid.rpartition(".")
    seed_prefix, _, seed = prefix.rpartition(".")
    if seed_prefix != UID_PREFIX or not seed.isdigit() or not rest.isdigit():
        raise ValueError(f"{uid!r} is not a phantom series UID ({UID_PREFIX}.<seed>.<index>)")
    return int(seed), int(rest)


def read_cohort_config(root: PathLike) -> PhantomConfig:
    """The :class:`PhantomConfig` a phantom tree was written with (its ``cohort.json``).

    Args:
        root: the tree's folder.

    Raises:
        DataError: no readable ``cohort.json`` (not a phantom tree).
    """
    path = Path(root) / "cohort.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return PhantomConfig(**meta["config"])
    except FileNotFoundError:
        raise DataError(path, "not a phantom cohort (no cohort.json): healthy twins exist for phantoms only") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(path, f"unreadable cohort description ({exc})") from None


def iter_cases(config: PhantomConfig = PhantomConfig(), progress: bool = False) -> Iterator[PhantomCase]:
    """Generate cases ``0 … n_cases − 1`` one at a time (memory stays one case).

    Args:
        config: the cohort config.
        progress: show a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    for index in tqdm(range(config.n_cases), desc="phantom cases", disable=not progress):
        yield generate_case(index, config)


# ------------------------------------------------------------------------------------------- writing
def _case_paths(root: Path, uid: str, subset: int) -> dict[str, Path]:
    return {
        "scan": root / f"subset{subset}" / f"{uid}.mhd",
        "lungs": root / "seg-lungs-LUNA16" / f"{uid}.mhd",
        "mask": root / "masks" / f"{uid}.mhd",
        "record": root / "cases" / f"{uid}.json",
    }


def _case_record(case: PhantomCase) -> dict:
    return {"seriesuid": case.uid, "index": case.index, "subset": case.subset, "flipped": case.flipped,
            "nodules": [asdict(n) for n in case.nodules]}


def _json_text(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _check_cohort_json(root: Path, config: PhantomConfig) -> None:
    """Write ``cohort.json``, or refuse to resume into a tree made with a different config."""
    path = root / "cohort.json"
    meta = {
        "format_version": FORMAT_VERSION,
        "generator": "tfg_core.data.phantom",
        "config": config.to_dict(),
        "spacing_mm_zyx": list(config.voxel_spacing),
        "seg_lungs_labels": {"left_lung": LABEL_LEFT_LUNG, "right_lung": LABEL_RIGHT_LUNG, "airway": LABEL_AIRWAY},
        "nodule_masks": "masks/<seriesuid>.mhd: uint8, nodule j (nodules.csv label) = j, background 0",
    }
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(path, f"unreadable cohort description ({exc}); delete the folder to regenerate") from None
        if existing != meta:
            raise DataError(path, "this folder holds a phantom cohort made with a different config or generator "
                                  "version; write to another folder or delete this one")
        return
    atomic_write_text(path, _json_text(meta))


def _write_case(case: PhantomCase, paths: dict[str, Path]) -> None:
    # scan header last: a visible subset*/<uid>.mhd means the masks and the record are already there
    # masks zlib-compressed (.zraw) as LUNA16 ships seg-lungs; scans plain .raw as LUNA16 ships them
    write_mhd(case.volume.with_array(case.nodule_labels), paths["mask"], compress=True)
    write_mhd(case.volume.with_array(case.lung_labels), paths["lungs"], compress=True)
    atomic_write_text(paths["record"], _json_text(_case_record(case)))
    write_mhd(case.volume, paths["scan"])


def _is_complete(paths: dict[str, Path]) -> bool:
    return all(p.is_file() for p in paths.values())


def _fmt(v: float) -> str:
    return f"{v:.6f}"


def write_cohort(root: PathLike, config: PhantomConfig = PhantomConfig(), progress: bool = False) -> Path:
    """Write the cohort as a LUNA16-shaped tree (layout in the module docstring).

    Resumable: a case whose files are all present is not regenerated or rewritten; each file is written
    atomically and the scan header last, so a run killed midway leaves no half case visible to a LUNA16
    reader. The tables (``annotations.csv``, ``nodules.csv``) are written once all cases exist.

    Args:
        root: destination folder (created).
        config: the cohort config.
        progress: show a tqdm progress bar.

    Raises:
        DataError: ``root`` already holds a cohort made with a different config.
    """
    from tqdm.auto import tqdm

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _check_cohort_json(root, config)
    records = []
    for index in tqdm(range(config.n_cases), desc="phantom cohort", disable=not progress):
        uid, subset = series_uid(config.seed, index), index % config.n_subsets
        paths = _case_paths(root, uid, subset)
        if _is_complete(paths):
            try:
                records.append(json.loads(paths["record"].read_text(encoding="utf-8")))
                continue
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass  # damaged record: regenerate the case
        case = generate_case(index, config)
        _write_case(case, paths)
        records.append(_case_record(case))

    annotations = [",".join(ANNOTATION_COLUMNS)]
    nodules = ["seriesuid,subset,label,kind,coordX,coordY,coordZ,diameter_mm,n_voxels"]
    for rec in records:
        for n in rec["nodules"]:
            xyz = ",".join(_fmt(v) for v in n["centre_xyz"])
            annotations.append(f"{rec['seriesuid']},{xyz},{_fmt(n['diameter_mm'])}")
            nodules.append(f"{rec['seriesuid']},{rec['subset']},{n['label']},{n['kind']},{xyz},"
                           f"{_fmt(n['diameter_mm'])},{n['n_voxels']}")
    atomic_write_text(root / "nodules.csv", "\n".join(nodules) + "\n")
    atomic_write_text(root / "annotations.csv", "\n".join(annotations) + "\n")
    return root


# ---------------------------------------------------------------------------------------- fold table
def phantom_fold_table(config: PhantomConfig = PhantomConfig(), cases: Iterable[PhantomCase] | None = None,
                       progress: bool = False) -> pd.DataFrame:
    """The cohort listing ``seriesuid, subset, n_nodules`` (one row per case, in index order).

    Args:
        config: the cohort config.
        cases: this config's cases if already generated (saves generating them again); None = generate.
        progress: show a tqdm progress bar while generating.
    """
    cases = iter_cases(config, progress) if cases is None else cases
    rows = [{"seriesuid": c.uid, "subset": c.subset, "n_nodules": len(c.nodules)} for c in cases]
    return pd.DataFrame(rows, columns=["seriesuid", "subset", "n_nodules"])


def write_fold_table(path: PathLike, config: PhantomConfig = PhantomConfig(), progress: bool = False) -> Path:
    """Write :func:`phantom_fold_table` as CSV, atomically (``data_manifest/phantom_folds.csv`` for the defaults).

    Args:
        path: destination CSV.
        config: the cohort config.
        progress: show a tqdm progress bar.
    """
    table = phantom_fold_table(config, progress=progress)
    return atomic_write_text(path, table.to_csv(index=False, lineterminator="\n"))
