"""Drawing the phantom chest: anatomy, vessel trees and nodule shapes, in millimetres.

Everything here works on a canonical grid: arrays (z, y, x), coordinates in mm relative to the
field-of-view centre, +x towards the patient's left, +y posterior, +z superior (LPS, identity direction).
Shapes are signed distance fields (negative inside, in mm); a shape becomes an image through
:func:`coverage`, a cheap partial-volume model, so structures thinner than a voxel (small vessels,
airway walls, tiny nodules) still show as fainter blobs instead of vanishing or aliasing.
:mod:`tfg_core.data.phantom` turns these pieces into cases with geometry, files and annotations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

# ---------------------------------------------------------------------------------------- tissue HU
HU_AIR = -1000.0
HU_FAT = -100.0
HU_MEDIASTINAL_FAT = -85.0
HU_MUSCLE = 45.0
HU_BLOOD = 40.0
HU_LIVER = 55.0
HU_VESSEL = 40.0
HU_AIRWAY_WALL = 30.0
HU_BONE_RIB = 450.0
HU_BONE_TRABECULAR = 250.0
HU_BONE_CORTICAL = 650.0
HU_LUNG = -865.0  # parenchyma mean; ± a dependent (posterior) gradient and texture below
LUNG_GRADIENT_HU = 25.0  # posterior lung is denser (gravity), front-to-back swing of about 2× this
LUNG_TEXTURE_HU = 20.0
TISSUE_TEXTURE_HU = 8.0

# seg-lungs-LUNA16 values (see phantom.py for the convention)
LABEL_LEFT_LUNG = 3
LABEL_RIGHT_LUNG = 4
LABEL_AIRWAY = 5

# nodule kinds and their intensities (HU ranges sampled per nodule)
NODULE_KINDS = ("solid", "part_solid", "ground_glass", "lobulated", "juxta_pleural", "vessel_attached")
SOLID_HU = (20.0, 60.0)
GROUND_GLASS_HU = (-600.0, -300.0)
CORE_HU = (10.0, 50.0)


# ------------------------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class Grid:
    """A canonical voxel grid in mm around the field-of-view centre.

    Args:
        shape: (z, y, x) voxels.
        spacing: (z, y, x) mm.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def axis(self, k: int) -> np.ndarray:
        """Voxel-centre coordinates (mm, float32) along array axis ``k``, zero at the grid centre."""
        n = self.shape[k]
        return ((np.arange(n) - (n - 1) / 2.0) * self.spacing[k]).astype(np.float32)

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (z, y, x) coordinate arrays of shapes (n,1,1), (1,n,1), (1,1,n)."""
        return self.axis(0)[:, None, None], self.axis(1)[None, :, None], self.axis(2)[None, None, :]

    @property
    def edge_mm(self) -> float:
        """Width of the partial-volume ramp: the mean voxel size."""
        return float(np.mean(self.spacing))

    def to_index(self, point_mm: np.ndarray) -> np.ndarray:
        """Continuous (z, y, x) voxel index of a point given in centred mm."""
        return np.asarray(point_mm, dtype=np.float64) / np.asarray(self.spacing) + (np.asarray(self.shape) - 1) / 2.0

    def to_mm(self, index: np.ndarray) -> np.ndarray:
        """Centred mm of a (continuous) (z, y, x) voxel index."""
        return (np.asarray(index, dtype=np.float64) - (np.asarray(self.shape) - 1) / 2.0) * np.asarray(self.spacing)

    def box(self, centre_mm: np.ndarray, half_mm: float) -> tuple[slice, slice, slice] | None:
        """Index slices of the axis-aligned box ``centre ± half_mm`` clipped to the grid (None if outside)."""
        lo = np.floor(self.to_index(np.asarray(centre_mm) - half_mm)).astype(int)
        hi = np.ceil(self.to_index(np.asarray(centre_mm) + half_mm)).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]

    def box_coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinate arrays of a sub-box."""
        z, y, x = (self.axis(k)[box[k]] for k in range(3))
        return z[:, None, None], y[None, :, None], x[None, None, :]


def coverage(sd_mm: np.ndarray, edge_mm: float, thickness_mm: float | np.ndarray | None = None) -> np.ndarray:
    """Partial-volume fraction of a shape from its signed distance (linear ramp one voxel wide).

    Args:
        sd_mm: signed distance to the surface, negative inside.
        edge_mm: width of the ramp (≈ voxel size).
        thickness_mm: the structure's radius if it can be thinner than a voxel; its coverage is then
            scaled by ``2·r/edge`` so a sub-voxel vessel is faint instead of half-filling its voxel.
    """
    occ = np.clip(0.5 - sd_mm / edge_mm, 0.0, 1.0)
    if thickness_mm is not None:
        occ = occ * np.minimum(1.0, 2.0 * np.asarray(thickness_mm) / edge_mm)
    return occ.astype(np.float32, copy=False)


def blend(image: np.ndarray, occ: np.ndarray, value: float | np.ndarray) -> None:
    """Paint ``value`` over ``image`` in place with partial-volume weights ``occ``."""
    image += occ * (value - image)


def smooth_noise(rng: np.random.Generator, grid: Grid, sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field on ``grid`` (white noise through a Gaussian filter).

    The width is physical, so the texture looks the same at every grid size.

    Args:
        rng: random generator.
        grid: the grid (shape and spacing).
        sigma_mm: Gaussian width in mm.
    """
    sigma_vox = tuple(sigma_mm / s for s in grid.spacing)
    white = rng.standard_normal(grid.shape, dtype=np.float32)
    field_ = ndimage.gaussian_filter(white, sigma_vox, mode="wrap", truncate=3.0)
    return field_ / max(float(field_.std()), 1e-6)


def lattice_noise(rng: np.random.Generator, grid: Grid, cell_mm: float) -> np.ndarray:
    """Unit-std smooth random field drawn on a fixed-mm lattice and interpolated onto ``grid``.

    The lattice depends only on the field of view, so the field (e.g. the wobble of the lung border) is the
    same physical shape at every grid size; only its sampling changes.

    Args:
        rng: random generator.
        grid: the grid (its field of view sets the lattice).
        cell_mm: lattice step in mm (the size of the smallest bumps).
    """
    fov = np.asarray(grid.shape) * np.asarray(grid.spacing)
    n = np.ceil(fov / cell_mm - 1e-6).astype(int) + 4  # 2 cells of margin each side for the cubic spline
    lattice = ndimage.gaussian_filter(rng.standard_normal(tuple(n)), 0.7, mode="wrap")
    lattice /= max(float(lattice.std()), 1e-9)
    # separable cubic-spline weights (voxel × lattice) per axis: the grid is rectilinear, so three small
    # matrix products replace a per-voxel 3D spline evaluation (map_coordinates is ~20× slower here)
    weights = [CubicSpline(np.arange(n[k]), np.eye(n[k]))(grid.axis(k) / cell_mm + (n[k] - 1) / 2.0)
               for k in range(3)]
    return np.einsum("ia,jb,kc,abc->ijk", *weights, lattice, optimize=True).astype(np.float32)


def ellipse_sd(a: np.ndarray, b: np.ndarray, ra: float | np.ndarray, rb: float | np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipse/ellipsoid slice.

    First-order ``(f − 1)/|∇f|`` with ``f`` the normalised radius: exact on the boundary, which is all the
    partial-volume ramp needs.

    Args:
        a, b: coordinates relative to the centre (broadcastable).
        ra, rb: semi-axes along ``a`` and ``b`` (may vary, e.g. with z).
    """
    f = np.sqrt((a / ra) ** 2 + (b / rb) ** 2)
    grad = np.sqrt((a / ra**2) ** 2 + (b / rb**2) ** 2) / np.maximum(f, 1e-6)
    return (f - 1.0) / np.maximum(grad, 1e-6)


def ellipsoid_sd(p: tuple[np.ndarray, np.ndarray, np.ndarray], radii: tuple[float, float, float]) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid centred at the origin of ``p``."""
    f = np.sqrt(sum((c / r) ** 2 for c, r in zip(p, radii)))
    grad = np.sqrt(sum((c / r**2) ** 2 for c, r in zip(p, radii))) / np.maximum(f, 1e-6)
    return (f - 1.0) / np.maximum(grad, 1e-6)


# ----------------------------------------------------------------------------------------- vessels
@dataclass(frozen=True)
class Segment:
    """A tapered tube from ``a`` to ``b`` (centred mm, z y x) with radii ``r0`` → ``r1``."""

    a: np.ndarray
    b: np.ndarray
    r0: float
    r1: float


def segment_sd(seg: Segment, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance to a tapered segment and the local radius, on broadcastable coordinates."""
    d = seg.b - seg.a
    length2 = max(float(d @ d), 1e-9)
    pz, py, px = z - seg.a[0], y - seg.a[1], x - seg.a[2]
    t = np.clip((pz * d[0] + py * d[1] + px * d[2]) / length2, 0.0, 1.0)
    dist = np.sqrt((pz - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (px - t * d[2]) ** 2)
    radius = seg.r0 + t * (seg.r1 - seg.r0)
    return dist - radius, radius


def draw_segments(occ: np.ndarray, grid: Grid, segments: list[Segment]) -> None:
    """Max-composite the coverage of tubes into ``occ`` (in place), each on its bounding box only."""
    edge = grid.edge_mm
    for seg in segments:
        reach = max(seg.r0, seg.r1) + edge
        lo = np.minimum(seg.a, seg.b) - reach
        hi = np.maximum(seg.a, seg.b) + reach
        lo_i = np.maximum(np.floor(grid.to_index(lo)).astype(int), 0)
        hi_i = np.minimum(np.ceil(grid.to_index(hi)).astype(int) + 1, grid.shape)
        if np.any(hi_i <= lo_i):
            continue
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo_i, hi_i))
        sd, radius = segment_sd(seg, *grid.box_coords(box))
        np.maximum(occ[box], coverage(sd, edge, radius), out=occ[box])


def _rotate(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of ``v`` about the unit ``axis``."""
    cross = np.array([axis[1] * v[2] - axis[2] * v[1], axis[2] * v[0] - axis[0] * v[2],
                      axis[0] * v[1] - axis[1] * v[0]])  # np.cross is ~10× slower on 3-vectors
    return v * np.cos(angle) + cross * np.sin(angle) + axis * (axis @ v) * (1 - np.cos(angle))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to ``d``."""
    v = rng.standard_normal(3)
    return _unit(v - (v @ d) * d)


def grow_tree(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, radius: float,
              depth_at, r_min: float, max_segments: int, z_limit_mm: float) -> list[Segment]:
    """Grow a bifurcating vessel tree that tapers from ``radius`` and stays inside the lung.

    Each segment is 5–9 radii long and tapers by 10 %; it splits into two coplanar children
    (radius ×0.72–0.85, 20–45° off the parent, nudged away from the root so the tree fans out).
    A child is shortened once, then dropped, if its end leaves the lung (depth < its radius).

    Args:
        rng: random generator.
        start: root point (centred mm, z y x), may lie in the mediastinum (the hilum).
        direction: initial direction.
        radius: root radius (mm).
        depth_at: function point → distance (mm) inside the lung (0 outside).
        r_min: branches thinner than this are not grown.
        max_segments: cap on the tree size.
        z_limit_mm: stop branches that have left the slab by more than this (|z| beyond).
    """
    segments: list[Segment] = []
    stack = [(np.asarray(start, float), _unit(np.asarray(direction, float)), float(radius), True)]
    while stack and len(segments) < max_segments:
        a, d, r, is_root = stack.pop(0)  # breadth first: thick branches before thin ones under the cap
        length = r * rng.uniform(5.0, 9.0) * (1.6 if is_root else 1.0)
        r_end = 0.9 * r
        b = a + d * length
        if depth_at(b) < r_end:
            b = a + d * length * 0.5
            if depth_at(b) < r_end:
                continue
        segments.append(Segment(a, b, r, r_end))
        r_child = r_end * rng.uniform(0.72, 0.85)
        if r_child < r_min or abs(b[0]) > z_limit_mm:
            continue
        axis = _perpendicular(rng, d)
        outward = _unit(b - start)
        for sign in (1.0, -1.0):
            angle = sign * np.deg2rad(rng.uniform(20.0, 45.0))
            child = _unit(_rotate(d, axis, angle) + 0.25 * outward)
            stack.append((b, child, r_child * rng.uniform(0.9, 1.1), False))
    return segments


def airway_tree(rng: np.random.Generator, carina: np.ndarray,
                trachea_length_mm: float) -> tuple[list[Segment], list[Segment]]:
    """Airway lumen tubes: (trachea + main bronchi, lobar bronchi).

    The right main bronchus is short and steep, the left long and shallow, as in adults; each splits
    into an upper and a lower lobar bronchus.

    Args:
        rng: random generator.
        carina: the bifurcation point (centred mm, z y x).
        trachea_length_mm: how far the trachea runs up from the carina.
    """
    trachea_r = rng.uniform(7, 9)
    trachea = Segment(carina, carina + np.array([trachea_length_mm, 0, 0]), trachea_r, trachea_r)
    main_bronchi, lobar = [], []
    for side, steep, length, r in ((-1, 0.8, rng.uniform(22, 30), 6.0), (1, 0.55, rng.uniform(38, 48), 5.5)):
        d = _unit(np.array([-steep, 0.1, side * np.sqrt(1 - steep**2)]))
        main_bronchi.append(Segment(carina, carina + d * length, r, r * 0.9))
    for mb in main_bronchi:
        side = np.sign(mb.b[2] - mb.a[2])
        for up in (1.0, -1.0):
            child = _unit(np.array([up * 0.7, rng.uniform(-0.3, 0.3), side * 0.7]))
            lobar.append(Segment(mb.b, mb.b + child * rng.uniform(18, 28), 3.8, 3.0))
    return [trachea, *main_bronchi], lobar


# hilar trunk directions (z, y, x with x towards the lung's side): up, down, lateral, front, back, back-down;
# the up/down trunks run through-plane, so their branches cut axial slices as round blobs like nodules
TRUNK_DIRECTIONS = ((0.85, 0.1, 0.45), (-0.85, 0.2, 0.45), (0.0, 0.1, 1.0), (0.1, -0.55, 0.8),
                    (-0.1, 0.55, 0.8), (-0.6, 0.6, 0.5))


def vessel_trees(rng: np.random.Generator, hilum: np.ndarray, side: float, depth_at, r_min: float,
                 max_segments: int, z_limit_mm: float) -> list[Segment]:
    """All vessel trees of one lung, grown from its hilum (see :func:`grow_tree`).

    Args:
        rng: random generator.
        hilum: root point (centred mm, z y x).
        side: −1 for the right lung (−x), +1 for the left.
        depth_at: function point → distance (mm) inside the lung.
        r_min: thinnest vessel grown.
        max_segments: cap per trunk.
        z_limit_mm: see :func:`grow_tree`.
    """
    segments: list[Segment] = []
    for d in TRUNK_DIRECTIONS:
        direction = _unit(np.array([d[0], d[1], side * d[2]]) + 0.15 * rng.standard_normal(3))
        segments += grow_tree(rng, hilum, direction, rng.uniform(3.5, 5.5), depth_at, r_min, max_segments, z_limit_mm)
    return segments


# ------------------------------------------------------------------------------------------ anatomy
@dataclass
class Anatomy:
    """A nodule-free chest on the canonical grid.

    Args:
        hu: float32 HU (z, y, x), without acquisition noise.
        labels: uint8 seg-lungs labels (0, 3 left lung, 4 right lung, 5 trachea/main bronchi).
        depth_mm: float32 distance (mm) of each lung voxel to the nearest non-lung voxel (0 outside).
        vessel_occ: float32 vessel coverage in [0, 1].
        airway_occ: float32 coverage of airway lumen + wall (nodules avoid it).
        segments: the vessel tubes (for vessel-attached nodules).
    """

    hu: np.ndarray
    labels: np.ndarray
    depth_mm: np.ndarray
    vessel_occ: np.ndarray
    airway_occ: np.ndarray
    segments: list[Segment] = field(default_factory=list)

    @property
    def lung(self) -> np.ndarray:
        """Boolean lung mask (both lungs, airways excluded)."""
        return (self.labels == LABEL_LEFT_LUNG) | (self.labels == LABEL_RIGHT_LUNG)


def draw_anatomy(rng: np.random.Generator, grid: Grid, vessel_r_min_mm: float = 0.8,
                 max_vessel_segments: int = 90) -> Anatomy:
    """Draw one chest: body, fat, ribs, spine, mediastinum, heart, lungs, vessel trees and airways.

    Sizes are sampled per case from adult-like ranges (mm); see the inline numbers. Noise is not added
    here (the caller adds it after the nodules so they share it).

    Args:
        rng: the case's anatomy generator.
        grid: the canonical grid.
        vessel_r_min_mm: thinnest vessel grown.
        max_vessel_segments: cap per vessel trunk.
    """
    Z, Y, X = grid.coords()
    # noise fields draw grid-size many numbers: a stream of their own keeps the size/position parameters
    # the same at any grid size, so a larger grid shows the same chest, only sharper (vessel trees may
    # branch a little differently, as their growth checks the voxelised lung)
    fields = np.random.default_rng(rng.integers(0, 2**63))
    edge = grid.edge_mm
    z_half = grid.shape[0] * grid.spacing[0] / 2.0
    zn = Z / max(z_half, 1e-6)  # −1 (bottom of the slab) … +1 (top)

    # body: an ellipse with a fat layer, then muscle, then the chest cavity that tapers upwards
    body_x, body_y = rng.uniform(135, 165), rng.uniform(95, 120)
    cy = rng.uniform(-8, 8)
    fat = rng.uniform(6, 22)
    muscle = rng.uniform(12, 18)
    taper = rng.uniform(0.03, 0.10)
    scale = 1.0 - taper * (zn + 1.0) / 2.0  # narrower towards the apex
    body_sd = ellipse_sd(X, Y - cy, body_x, body_y)
    inner_sd = ellipse_sd(X, Y - cy, body_x - fat, body_y - fat)
    cav_x, cav_y = (body_x - fat - muscle) * scale, (body_y - fat - muscle) * scale
    cavity_sd = ellipse_sd(X, Y - cy, cav_x, cav_y)

    hu = np.full(grid.shape, HU_AIR, dtype=np.float32)
    blend(hu, coverage(np.broadcast_to(body_sd, grid.shape), edge), HU_FAT)
    muscle_hu = HU_MUSCLE + TISSUE_TEXTURE_HU * smooth_noise(fields, grid, 5.0)
    blend(hu, coverage(np.broadcast_to(inner_sd, grid.shape), edge), muscle_hu)

    # spine: vertebral body bulging into the back of the cavity, canal and lamina behind it
    vert_r = rng.uniform(14, 18)
    spine_y = cy + cav_y.min() - vert_r - rng.uniform(0, 6)
    vert_sd = ellipse_sd(X, Y - spine_y, vert_r, vert_r)
    canal_y = spine_y + vert_r + 7
    lamina_sd = ellipse_sd(X, Y - canal_y, 11.0, 9.0)
    canal_sd = ellipse_sd(X, Y - canal_y, 6.0, 5.0)

    # mediastinum: central strip, heart low in the slab, great vessels, descending aorta
    med_w = rng.uniform(20, 28)
    strip_sd = np.abs(X - rng.uniform(-3, 3)) - med_w + 0 * Y
    heart_c = (-z_half - rng.uniform(-10, 25), cy - 0.25 * cav_y.mean() - rng.uniform(0, 15), rng.uniform(12, 28))
    heart_r = (rng.uniform(55, 75), rng.uniform(40, 52), rng.uniform(48, 62))
    heart_sd = ellipsoid_sd((Z - heart_c[0], Y - heart_c[1], X - heart_c[2]), heart_r)
    aorta_y = spine_y - vert_r - rng.uniform(4, 10)
    aorta_sd = ellipse_sd(X - rng.uniform(14, 24), Y - aorta_y, *(2 * [rng.uniform(10, 13)]))
    front = cy - 0.35 * body_y
    # ascending aorta, pulmonary trunk, superior vena cava: vertical tubes in front of the trachea
    great = [ellipse_sd(X - rng.uniform(-16, -8), Y - front - rng.uniform(5, 15), *(2 * [rng.uniform(12, 15)])),
             ellipse_sd(X - rng.uniform(10, 20), Y - front - rng.uniform(0, 8), *(2 * [rng.uniform(11, 14)])),
             ellipse_sd(X - rng.uniform(-34, -26), Y - front - rng.uniform(10, 20), *(2 * [rng.uniform(8, 10)]))]
    great_sd = np.minimum.reduce([np.broadcast_to(g, (1,) + grid.shape[1:]) for g in great])

    # diaphragm domes (right higher, over the liver): below them the cavity is liver/spleen, not lung
    dome_top = rng.uniform(-75, -35)
    domes = []
    for side, lift in ((-1, 0.0), (1, -rng.uniform(5, 15))):
        r2 = (X - side * 0.45 * cav_x) ** 2 + (Y - cy) ** 2
        domes.append(dome_top + lift - r2 / rng.uniform(140, 200))
    dome = np.where(X < 0, domes[0], domes[1])
    below_dome_sd = dome - Z  # > 0 below the dome surface (crude distance, fine for a ramp)

    # fill the cavity: mediastinal fat, then organs; the lungs take what is left
    cavity_occ = coverage(np.broadcast_to(cavity_sd, grid.shape), edge)
    blend(hu, cavity_occ, HU_MEDIASTINAL_FAT)
    blend(hu, coverage(np.broadcast_to(np.maximum(cavity_sd, -below_dome_sd), grid.shape), edge), HU_LIVER)
    blend(hu, coverage(np.broadcast_to(great_sd, grid.shape), edge), HU_BLOOD)
    blend(hu, coverage(np.broadcast_to(aorta_sd, grid.shape), edge), HU_BLOOD)
    blend(hu, coverage(heart_sd - 3.0, edge), HU_MEDIASTINAL_FAT)
    blend(hu, coverage(heart_sd, edge), HU_BLOOD)
    blend(hu, coverage(np.broadcast_to(lamina_sd, grid.shape), edge), HU_BONE_CORTICAL)
    blend(hu, coverage(np.broadcast_to(canal_sd, grid.shape), edge), HU_MUSCLE - 25)
    blend(hu, coverage(np.broadcast_to(vert_sd, grid.shape), edge), HU_BONE_CORTICAL)
    blend(hu, coverage(np.broadcast_to(vert_sd + 2.5, grid.shape), edge), HU_BONE_TRABECULAR)

    # lungs: cavity minus everything else, with a smooth per-case wobble of the border
    blocked_sd = np.minimum.reduce([
        np.broadcast_to(strip_sd, grid.shape), heart_sd - 3.0, np.broadcast_to(great_sd - 3.0, grid.shape),
        np.broadcast_to(aorta_sd - 3.0, grid.shape), np.broadcast_to(vert_sd - 8.0, grid.shape),
    ])
    lung_sd = np.maximum.reduce([
        np.broadcast_to(cavity_sd, grid.shape) + 5.0 * lattice_noise(rng, grid, 20.0),
        -blocked_sd, np.broadcast_to(below_dome_sd, grid.shape),
    ])
    lung_hu = (HU_LUNG + LUNG_GRADIENT_HU * (Y - cy) / body_y
               + LUNG_TEXTURE_HU * smooth_noise(fields, grid, 4.0))
    blend(hu, coverage(lung_sd, edge), lung_hu)
    lung = lung_sd <= 0
    labels = np.zeros(grid.shape, dtype=np.uint8)
    labels[lung & (X >= 0)] = LABEL_LEFT_LUNG  # +x is the patient's left (LPS)
    labels[lung & (X < 0)] = LABEL_RIGHT_LUNG
    depth = ndimage.distance_transform_edt(lung, sampling=grid.spacing).astype(np.float32)

    # ribs: oblique bands in the chest wall (posterior end higher), none at the sternum or spine
    period, phase, slope = rng.uniform(22, 28), rng.uniform(0, 1), rng.uniform(0.25, 0.45)
    u = (Z + slope * (Y - cy)) / period + phase
    rib_z_sd = np.abs(u - np.round(u)) * period - rng.uniform(4.0, 5.5)
    rib_ring_sd = np.abs(cavity_sd - muscle * 0.45) - 4.0
    gap = ((np.abs(X) < 35) & (Y < cy)) | (np.abs(X) < 22)
    rib_sd = np.where(gap, 50.0, np.maximum(rib_ring_sd, rib_z_sd))
    blend(hu, coverage(rib_sd, edge), HU_BONE_RIB)
    sternum_sd = ellipse_sd(X, Y - (cy - body_y + fat + 0.6 * muscle), 14.0, 5.0)
    blend(hu, coverage(np.broadcast_to(sternum_sd, grid.shape), edge), HU_BONE_RIB)

    # depth lookup for growing trees: z is clamped so trunks may leave the slab like real vessels do
    def depth_at(p: np.ndarray) -> float:
        i = np.rint(grid.to_index(p)).astype(int)
        i[0] = min(max(i[0], 0), grid.shape[0] - 1)
        if np.any(i[1:] < 0) or np.any(i[1:] >= np.asarray(grid.shape[1:])):
            return 0.0
        return float(depth[tuple(i)])

    carina = np.array([rng.uniform(-0.1, 0.45) * z_half, aorta_y - rng.uniform(18, 26), rng.uniform(-3, 3)])
    airway_lumen, lobar = airway_tree(rng, carina, 3 * z_half)
    wall = [Segment(s.a, s.b, s.r0 + 2.0, s.r1 + 2.0) for s in airway_lumen + lobar]

    vessel_occ = np.zeros(grid.shape, dtype=np.float32)
    segments: list[Segment] = []
    for side in (-1.0, 1.0):
        hilum = np.array([carina[0] - rng.uniform(5, 15), carina[1] + rng.uniform(0, 10), side * (med_w - 4)])
        segments += vessel_trees(rng, hilum, side, depth_at, vessel_r_min_mm, max_vessel_segments, z_half + 20.0)
    draw_segments(vessel_occ, grid, segments)
    # trees are grown by their end points; keep the tubes themselves inside the cavity and out of the spine
    vessel_occ *= cavity_occ * coverage(np.broadcast_to(-vert_sd, grid.shape), edge)
    blend(hu, vessel_occ, HU_VESSEL)

    # airways go over the vessels (walls as tissue, lumen as air); the lumen of trachea + main bronchi is label 5
    airway_occ = np.zeros(grid.shape, dtype=np.float32)
    draw_segments(airway_occ, grid, wall)
    blend(hu, airway_occ, HU_AIRWAY_WALL)
    lumen_occ = np.zeros(grid.shape, dtype=np.float32)
    draw_segments(lumen_occ, grid, airway_lumen + lobar)
    lumen_occ *= coverage(np.broadcast_to(inner_sd, grid.shape), edge)  # the trachea stays inside the body
    blend(hu, lumen_occ, HU_AIR)
    big_lumen = np.zeros(grid.shape, dtype=np.float32)
    draw_segments(big_lumen, grid, airway_lumen)
    labels[(big_lumen >= 0.5) & (np.broadcast_to(inner_sd, grid.shape) < 0)] = LABEL_AIRWAY
    depth[labels == LABEL_AIRWAY] = 0.0
    return Anatomy(hu=hu, labels=labels, depth_mm=depth, vessel_occ=vessel_occ,
                   airway_occ=airway_occ, segments=segments)


# ------------------------------------------------------------------------------------------ nodules
@dataclass
class NoduleShape:
    """A nodule as a signed distance field around ``centre`` (centred mm, z y x).

    Args:
        kind: one of :data:`NODULE_KINDS`.
        centre: centre (mm).
        radius: nominal radius (mm).
        hu: intensity of the nodule (ground glass for part-solid).
        rotation: 3×3 rotation of the ellipsoid axes.
        axes: ellipsoid semi-axis factors (× radius).
        bumps: (k, 5) rows (unit vector z y x, frequency, amplitude) of the radial perturbation.
        lobes: (k, 4) rows (offset z y x mm, radius mm) of spheres united with the body (lobulated).
        core: (4,) offset z y x and radius (mm) of the solid core (part-solid), or None.
        core_hu: the core's intensity.
        soft_edge: ramp width factor (ground glass fades out more gently).
    """

    kind: str
    centre: np.ndarray
    radius: float
    hu: float
    rotation: np.ndarray
    axes: np.ndarray
    bumps: np.ndarray
    lobes: np.ndarray
    core: np.ndarray | None = None
    core_hu: float = 0.0
    soft_edge: float = 1.0

    @property
    def reach_mm(self) -> float:
        """Half-width of a box that certainly holds the nodule."""
        lobe_reach = 0.0
        if len(self.lobes):
            lobe_reach = float(np.max(np.linalg.norm(self.lobes[:, :3], axis=1) + self.lobes[:, 3]))
        bump = 1.0 + float(np.abs(self.bumps[:, 4]).sum()) if len(self.bumps) else 1.0
        return max(self.radius * float(self.axes.max()) * bump, lobe_reach)

    def sdf(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Signed distance (mm, approximate away from the surface) on broadcastable coordinates."""
        p = [z - self.centre[0], y - self.centre[1], x - self.centre[2]]
        # ellipsoid in its own frame, radius perturbed by smooth bumps along a few directions
        q = [sum(self.rotation[j, i] * p[j] for j in range(3)) for i in range(3)]
        r = np.sqrt(sum(c * c for c in q)) + 1e-6
        rho = np.sqrt(sum((c / (a * self.radius)) ** 2 for c, a in zip(q, self.axes)))
        wobble = 1.0
        for vz, vy, vx, freq, amp in self.bumps:
            wobble = wobble + amp * np.cos(freq * np.pi * (vz * p[0] + vy * p[1] + vx * p[2]) / r)
        sd = (rho / wobble - 1.0) * (r / np.maximum(rho, 1e-6))
        for oz, oy, ox, lr in self.lobes:
            sd = np.minimum(sd, np.sqrt((p[0] - oz) ** 2 + (p[1] - oy) ** 2 + (p[2] - ox) ** 2) - lr)
        return sd

    def core_sdf(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray | None:
        """Signed distance to the solid core, or None if there is none."""
        if self.core is None:
            return None
        c = self.centre + self.core[:3]
        return np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) - self.core[3]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def sample_nodule_shape(rng: np.random.Generator, kind: str, centre: np.ndarray, radius: float) -> NoduleShape:
    """Random shape and intensity of a nodule of the given kind.

    Args:
        rng: the case's nodule generator.
        kind: one of :data:`NODULE_KINDS`.
        centre: centre (centred mm, z y x).
        radius: nominal radius (mm).
    """
    if kind not in NODULE_KINDS:
        raise ValueError(f"unknown nodule kind {kind!r}; expected one of {NODULE_KINDS}")
    n_bumps = 3
    bump_amp = {"lobulated": 0.12, "ground_glass": 0.10}.get(kind, 0.06)
    dirs = rng.standard_normal((n_bumps, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bumps = np.column_stack([dirs, rng.uniform(1.0, 3.0, n_bumps), rng.uniform(0.3, 1.0, n_bumps) * bump_amp])
    axes = rng.uniform(0.85, 1.15, 3)
    lobes = np.zeros((0, 4))
    if kind == "lobulated":
        k = int(rng.integers(3, 6))
        offs = rng.standard_normal((k, 3))
        offs = offs / np.linalg.norm(offs, axis=1, keepdims=True) * radius * rng.uniform(0.5, 0.75, (k, 1))
        lobes = np.column_stack([offs, radius * rng.uniform(0.4, 0.6, k)])
        axes = axes * 0.85
    hu = float(rng.uniform(*SOLID_HU))
    core, core_hu, soft = None, 0.0, 1.0
    if kind in ("ground_glass", "part_solid"):
        hu, soft = float(rng.uniform(*GROUND_GLASS_HU)), 1.5
    if kind == "part_solid":
        core_r = radius * rng.uniform(0.3, 0.55)
        core = np.concatenate([rng.uniform(-0.2, 0.2, 3) * radius, [core_r]])
        core_hu = float(rng.uniform(*CORE_HU))
    return NoduleShape(kind=kind, centre=np.asarray(centre, float), radius=float(radius), hu=hu,
                       rotation=_random_rotation(rng), axes=axes, bumps=bumps, lobes=lobes,
                       core=core, core_hu=core_hu, soft_edge=soft)
