"""Metrics on analytic shapes with anisotropic spacing, against independent computations."""

import math

import numpy as np
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
