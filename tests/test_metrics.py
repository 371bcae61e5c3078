"""Metrics on analytic shapes with anisotropic spacing, against independent computations."""

import math

import numpy as np
import pytest
from scipy import ndimage

from tfg_core.metrics import case_metrics, dice_score, mean_surface_distance


def _ball(shape, centre, radius_mm, spacing):
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2


def test_dice_of_overlapping_boxes_is_exact():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = True  # 64 voxels
    b[4:8, 2:6, 2:6] = True  # 64 voxels, 32 shared
    assert dice_score(a, b) == 2 * 32 / 128
    assert dice_score(a, a) == 1.0


def test_msd_of_shifted_slab_with_anisotropic_spacing():
    """Two half-spaces offset by k slices: every surface voxel is k·dz mm from the other surface."""
    spacing = (2.5, 0.7, 0.7)
    a = np.zeros((20, 8, 8), bool)
    b = np.zeros_like(a)
    a[5:15] = True
    b[7:17] = True
    # with full-width slabs the boundary is the top/bottom faces and the sides; an independent
    # computation with scipy's exact EDT of the other mask's surface:
    def surface(m):
        return m & ~ndimage.binary_erosion(m, border_value=0)
    def mean_dist(src, dst):
        edt = ndimage.distance_transform_edt(~surface(dst), sampling=spacing)
        return edt[surface(src)]
    expected = np.concatenate([mean_dist(a, b), mean_dist(b, a)]).mean()
    assert math.isclose(mean_surface_distance(a, b, spacing), expected, rel_tol=1e-5)


def test_msd_of_concentric_spheres_is_the_radius_gap():
    spacing = (1.0, 0.5, 0.5)
    shape = (60, 120, 120)
    centre = (30, 60, 60)
    inner = _ball(shape, centre, 10.0, spacing)
    outer = _ball(shape, centre, 14.0, spacing)
    msd = mean_surface_distance(inner, outer, spacing)
    assert abs(msd - 4.0) < 0.6  # 4 mm gap, up to voxelisation
    assert math.isclose(mean_surface_distance(inner, inner, spacing), 0.0, abs_tol=1e-6)


def test_empty_cases_are_flagged_not_hidden():
    gt = np.zeros((4, 4, 4), bool)
    gt[1:3, 1:3, 1:3] = True
    empty = np.zeros_like(gt)
    row = case_metrics(empty, gt, (1, 1, 1))
    assert row["dsc"] == 0.0 and row["msd_mm"] == math.inf and row["empty_pred"] and not row["both_empty"]
    both = case_metrics(empty, empty, (1, 1, 1))
    assert math.isnan(both["dsc"]) and math.isnan(both["msd_mm"]) and both["both_empty"]
    fp = case_metrics(gt, empty, (1, 1, 1))
    assert fp["dsc"] == 0.0 and fp["msd_mm"] == math.inf


def _lens_volume(r1, r2, d):
    """Volume shared by two balls of radii r1, r2 whose centres are d apart (|r1 − r2| < d < r1 + r2)."""
    return math.pi * (r1 + r2 - d) ** 2 * (d ** 2 + 2 * d * (r1 + r2) - 3 * (r1 - r2) ** 2) / (12 * d)


def test_dice_of_offset_spheres_matches_the_lens_volume_with_anisotropic_spacing():
    spacing = (0.6, 0.3, 0.3)
    shape = (40, 80, 80)
    r1, r2 = 6.0, 5.0
    centre = np.array([20.0, 40.0, 40.0])
    offset_mm = np.array([2.4, 1.5, -2.1])  # oblique, so every axis' spacing matters
    a = _ball(shape, centre, r1, spacing)
    b = _ball(shape, centre + offset_mm / np.array(spacing), r2, spacing)
    d = float(np.linalg.norm(offset_mm))
    expected = 2 * _lens_volume(r1, r2, d) / (4 / 3 * math.pi * (r1 ** 3 + r2 ** 3))
    assert 0.3 < expected < 0.7  # a genuine partial overlap
    assert abs(dice_score(a, b) - expected) < 0.01  # voxelisation error (~0.6 % of the ball volumes here)
    # the lens formula itself: limits of touching balls and of a small ball entering a big one
    assert math.isclose(_lens_volume(3.0, 2.0, 5.0), 0.0, abs_tol=1e-12)
    assert math.isclose(_lens_volume(3.0, 2.0, 1.0), 4 / 3 * math.pi * 2.0 ** 3, rel_tol=1e-12)


def test_msd_of_concentric_spheres_with_thick_slices():
    """CT-like spacing (2.5 mm slices): the mean surface distance is the radius gap, in mm, with (z, y, x) order."""
    spacing = (2.5, 0.7, 0.7)
    shape = (20, 64, 64)
    centre = (10.3, 32.4, 31.8)  # off the voxel grid
    inner = _ball(shape, centre, 8.0, spacing)
    outer = _ball(shape, centre, 14.0, spacing)
    msd = mean_surface_distance(inner, outer, spacing)
    # boundary voxel centres sit within a voxel of the true spheres; the thick slices bias by ≲ dz / 4
    assert abs(msd - 6.0) < 0.6
    # the spacing order matters: read as (x, y, z) it is far off
    assert abs(mean_surface_distance(inner, outer, spacing[::-1]) - 6.0) > 1.0


def test_msd_of_a_ball_and_an_offset_ellipsoid_against_scipy_edt():
    """Surfaces of different sizes: MONAI pools the distances of both directions (not the mean of two means)."""
    spacing = (1.5, 0.6, 0.8)
    shape = (24, 60, 48)
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, (12.4, 30.2, 23.7), spacing)],
                        indexing="ij")
    ellipsoid = (grids[0] / 9.0) ** 2 + (grids[1] / 12.0) ** 2 + (grids[2] / 7.0) ** 2 <= 1
    ball = _ball(shape, (10.0, 26.0, 27.0), 6.0, spacing)

    def surface(m):  # MONAI's edges: the mask minus its erosion by the 6-neighbourhood cross
        return m & ~ndimage.binary_erosion(m, border_value=0)

    def distances(src, dst):
        return ndimage.distance_transform_edt(~surface(dst), sampling=spacing)[surface(src)]

    d_ab, d_ba = distances(ball, ellipsoid), distances(ellipsoid, ball)
    pooled = np.concatenate([d_ab, d_ba]).mean()
    assert abs(pooled - (d_ab.mean() + d_ba.mean()) / 2) > 0.05  # the two definitions differ on this pair
    assert math.isclose(mean_surface_distance(ball, ellipsoid, spacing), pooled, rel_tol=1e-5)
    assert math.isclose(mean_surface_distance(ellipsoid, ball, spacing), pooled, rel_tol=1e-5)  # symmetric


def test_peak_distance_is_zero_inside_and_metric_outside():
    from tfg_core.metrics import peak_distance_mm

    gt = np.zeros((10, 12, 12), bool)
    gt[4:6, 4:6, 4:6] = True
    spacing = (2.5, 0.7, 0.7)
    score = np.zeros(gt.shape, np.float32)
    score[5, 5, 5] = 1.0
    assert peak_distance_mm(score, gt, spacing) == 0.0
    score[5, 5, 5] = 0.0
    score[8, 5, 9] = 2.0  # 3 slices above and 4 columns beside the nearest nodule voxel (5, 5, 5)
    assert math.isclose(peak_distance_mm(score, gt, spacing), math.hypot(3 * 2.5, 4 * 0.7), rel_tol=1e-6)
    assert math.isnan(peak_distance_mm(np.zeros(gt.shape), gt, spacing))  # nothing pointed at
    assert math.isnan(peak_distance_mm(score, np.zeros_like(gt), spacing))  # no nodule
    with pytest.raises(ValueError, match="shape"):
        peak_distance_mm(score[:-1], gt, spacing)
