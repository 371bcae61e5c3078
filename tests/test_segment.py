"""Difference map -> threshold (calibrated | Otsu) -> post-processing -> scan grid, on synthetic maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tfg_core.data.volume import Volume
from tfg_core.segment import (
    calibrate_threshold,
    default_candidates,
    dice,
    difference_map,
    on_scan,
    otsu_threshold,
    postprocess,
    refine_by_density,
    scale_map,
    segment,
    threshold_dice_curve,
)

SHAPE = (12, 12, 12)


def cube(corner, size=4, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(c, c + size) for c in corner)] = True
    return mask


def case(rng, corner, background_max=0.4, nodule=(0.6, 1.0)):
    """A map: background uniform in [0, background_max], the nodule cube uniform in ``nodule``."""
    gt = cube(corner)
    m = rng.uniform(0, background_max, SHAPE)
    m[gt] = rng.uniform(*nodule, gt.sum())
    return m.astype(np.float32), gt


def test_difference_map_and_dice():
    a, b = torch.rand(1, 1, *SHAPE), torch.rand(*SHAPE)
    assert np.allclose(difference_map(a, b), (a[0, 0] - b).abs().numpy())
    assert difference_map(a, b).dtype == np.float32 and difference_map(a, b).shape == SHAPE
    with pytest.raises(ValueError, match="same shape"):
        difference_map(a, b[:-1])
    # "removed": what the counterfactual took away from the reference; a rise (cf > ref) is not a nodule
    ref = np.full(SHAPE, 0.5, np.float32)
    cf = ref.copy()
    cf[1, 1, 1], cf[2, 2, 2] = 0.2, 0.9
    removed = difference_map(cf, ref, "removed")
    assert removed[1, 1, 1] == pytest.approx(0.3) and removed[2, 2, 2] == 0 and np.count_nonzero(removed) == 1
    assert difference_map(cf, ref, "absolute")[2, 2, 2] == pytest.approx(0.4)
    assert np.array_equal(difference_map(a, b, "removed"), np.maximum((b - a[0, 0]).numpy(), 0))
    with pytest.raises(ValueError, match="difference mode"):
        difference_map(cf, ref, "signed")
    gt = cube((2, 2, 2))
    assert dice(gt, gt) == 1.0 and dice(~gt, gt) == 0.0 and dice(np.zeros(SHAPE), np.zeros(SHAPE)) == 1.0
    assert dice(cube((2, 2, 4)), gt) == pytest.approx(0.5)


def test_calibration_finds_the_threshold_that_separates(rng):
    cases = [case(rng, (1, 1, 1)), case(rng, (6, 5, 4)), case(rng, (3, 7, 2))]
    maps, gts = [c[0] for c in cases], [c[1] for c in cases]
    maps[0][0, 0, :5] = 0.5  # background voxels at 0.5: only thresholds in [0.5, 0.6) are perfect
    threshold = calibrate_threshold(maps, gts)
    assert 0.5 <= threshold < min(m[g].min() for m, g in zip(maps, gts))
    assert all(dice(segment(m, threshold), g) == 1.0 for m, g in zip(maps, gts))
    assert calibrate_threshold(maps, gts, candidates=[0.1, 0.45, 0.55, 0.7]) == 0.55


def test_fast_dice_curve_equals_segmenting_each_candidate(rng):
    cases = [case(rng, (1, 1, 1), background_max=0.7), case(rng, (6, 5, 4), background_max=0.7)]
    maps, gts = [c[0] for c in cases], [c[1] for c in cases]
    lungs = [cube((0, 0, 0), size=9), None]  # the first case's lung cuts through its nodule and background
    candidates = np.linspace(0, 1, 41)
    fast = threshold_dice_curve(maps, gts, candidates, lungs)[1]
    # min_component_voxels=1 removes nothing but takes the segment-every-candidate path
    slow = threshold_dice_curve(maps, gts, candidates, lungs, min_component_voxels=1)[1]
    explicit = [np.mean([dice(segment(m, t, lung), g) for m, g, lung in zip(maps, gts, lungs)]) for t in candidates]
    assert np.allclose(fast, explicit) and np.allclose(slow, explicit)
    assert fast.max() > fast.min()  # the curve is not flat, so the equality is informative


def test_calibration_with_component_filtering(rng):
    m, gt = case(rng, (4, 4, 4), background_max=0.3)
    isolated = np.zeros(SHAPE, bool)
    isolated[::2, ::2, ::2] = True  # no two are 26-neighbours: every one is its own component
    isolated[3:9, 3:9, 3:9] = False  # off the nodule and its border, or they would join its component
    m[isolated] = 0.8
    gt_dim = gt & (m < 0.8)
    assert isolated.sum() > 2 * gt.sum() and gt_dim.any()
    # without filtering, the bright singles cost more Dice than missing the nodule's dim half
    assert calibrate_threshold([m], [gt]) >= 0.8
    # with filtering they vanish, so the threshold that keeps the whole nodule wins
    threshold = calibrate_threshold([m], [gt], min_component_voxels=2)
    assert 0.3 <= threshold < 0.6
    assert dice(segment(m, threshold, min_component_voxels=2), gt) == 1.0


def test_default_candidates_cover_the_range_and_the_tail(rng):
    m = rng.uniform(0, 1, (20, 20, 20))
    c = default_candidates([m])
    assert c.min() == pytest.approx(m.min()) and c.max() == pytest.approx(m.max())
    assert np.all(np.diff(c) > 0) and (c > np.quantile(m, 0.999)).sum() >= 5  # dense where nodules live


def test_otsu_on_a_bimodal_map(rng):
    lung = np.zeros((20, 20, 20), bool)
    lung[:, :, :15] = True
    m = rng.normal(0.2, 0.03, lung.shape)
    bright = lung & (rng.uniform(size=lung.shape) < 0.2)
    m[bright] = rng.normal(0.8, 0.03, bright.sum())
    m[~lung] = 5.0  # outside the lung: a third mode that must not count
    threshold = otsu_threshold(m, lung)
    assert m[lung & ~bright].max() < threshold < m[bright].min()
    assert otsu_threshold(m) > m[bright].max()  # without the mask the outside mode wins
    assert np.array_equal(segment(m, "otsu", lung), bright)
    assert otsu_threshold(np.full(SHAPE, 0.3)) == pytest.approx(0.3)  # constant map: nothing above
    with pytest.raises(ValueError, match="empty"):
        otsu_threshold(m, np.zeros(m.shape, bool))
    with pytest.raises(ValueError, match="otsu"):
        segment(m, "mean")


def test_postprocess_keeps_lung_and_large_components():
    mask = cube((1, 1, 1), size=3) | cube((8, 8, 8), size=1)  # 27 voxels + a single voxel
    mask[6, 0, 0] = True  # a voxel outside the lung
    lung = np.ones(SHAPE, bool)
    lung[6:, :2, :2] = False
    out = postprocess(mask, lung, min_component_voxels=2)
    assert np.array_equal(out, cube((1, 1, 1), size=3))
    assert np.array_equal(postprocess(mask), mask)
    corners = np.zeros(SHAPE, bool)
    corners[0, 0, 0] = corners[1, 1, 1] = True  # touching by a corner only
    assert postprocess(corners, min_component_voxels=2).sum() == 2
    assert postprocess(corners, min_component_voxels=2, connectivity=1).sum() == 0
    with pytest.raises(ValueError, match="lung mask shape"):
        postprocess(mask, lung[:-1])


def test_masks_and_maps_go_back_to_the_scan_grid():
    scan = Volume(array=np.zeros((10, 24, 20), np.int16), spacing=(2.5, 0.7, 0.8), origin=(-10.0, 5.0, 30.0),
                  uid="scan")
    diff = np.zeros((16, 32, 32), np.float32)
    diff[8:12, 8:16, 16:24] = 1.0  # a box covering the same physical region on both grids
    mask = segment(diff, 0.5, scan=scan)
    assert mask.shape == scan.shape and mask.dtype == bool
    expected = np.zeros(scan.shape, bool)
    expected[5:7, 6:12, 10:15] = True  # the scan voxels whose centres lie inside the box
    # > 0.75, not 1: MONAI's Resize(mode="nearest") is torch's floor-based "nearest", half a voxel off centre
    # alignment ("nearest-exact"), so the mask gains slice 7 here (reported, preprocess.py is not ours)
    assert dice(mask, expected) > 0.75 and mask[expected].all()
    # a scan stored with flipped x and y (LUNA16's TransformMatrix -1 0 0 0 -1 0 0 0 1): same box, flipped array
    flipped = Volume(array=scan.array, spacing=scan.spacing, origin=scan.origin, direction=np.diag([-1.0, -1.0, 1.0]))
    assert np.array_equal(segment(diff, 0.5, scan=flipped), mask[:, ::-1, ::-1])
    volume = on_scan(diff, flipped, is_mask=False)
    assert volume.shape == scan.shape and volume.array.dtype == np.float32
    assert volume.spacing == flipped.spacing and volume.origin == flipped.origin
    assert np.array_equal(volume.direction, flipped.direction)
    assert np.array_equal(on_scan(mask, scan, is_mask=True).array, mask.astype(np.uint8))


def _lung_scene(rng, shape=(16, 24, 24)):
    """[0, 1] image: lung at 0.07 (≈ −860 HU) with noise, a ball nodule (0.5) and a vessel (0.45) from it."""
    zz, yy, xx = np.indices(shape)
    image = 0.07 + 0.005 * rng.standard_normal(shape)
    ball = (zz - 8) ** 2 + (yy - 8) ** 2 + (xx - 8) ** 2 <= 9  # radius 3
    vessel = (np.abs(zz - 8) <= 0) & (np.abs(yy - 8) <= 0) & (xx >= 8)  # a one-voxel line running to the border
    image[ball] = 0.5
    image[vessel] = 0.45
    lung = np.ones(shape, bool)
    lung[:, :, -2:] = False  # the chest wall at the right border
    return image.astype(np.float32), ball, vessel, lung


def test_density_refinement_redraws_a_component_on_the_nodule(rng):
    image, ball, vessel, lung = _lung_scene(rng)
    seed = np.zeros_like(ball)
    seed[8, 7:9, 8] = True  # two voxels at the centre: a high threshold's core
    refined = refine_by_density(seed, image, lung, margin_voxels=3)
    assert dice(refined & ~vessel, ball) > 0.95  # the whole ball, from its core
    # the vessel is followed only ``margin_voxels`` steps beyond the seed, not to the border
    assert refined[vessel & ~ball].sum() <= 3 and not refined[8, 8, 15:].any()
    assert refined[vessel].sum() > 0
    wider = refine_by_density(seed, image, lung, margin_voxels=6)
    assert refined[vessel & ~ball].sum() < wider[vessel & ~ball].sum() <= 6
    # the default grows one step: the core and its dense neighbours, inside the ball
    one_step = refine_by_density(seed, image, lung)
    assert seed.sum() < one_step.sum() < refined.sum() and not (one_step & ~ball).any()
    # a component beside the nodule moves onto it (as far as the margin reaches); a too-large one shrinks onto it
    offset = np.zeros_like(ball)
    offset[8, 8, 3:5] = True  # just outside the ball (|x − 8| = 4, 5)
    moved = refine_by_density(offset, image, lung, margin_voxels=3)
    assert moved.sum() >= 20 and not (moved & ~ball).any()
    blurred = (np.indices(ball.shape) - 8.0) ** 2
    blurred = blurred.sum(0) <= 25  # radius 5: 4× the ball's volume
    assert dice(refine_by_density(blurred, image, lung, margin_voxels=0) & ~vessel, ball) > 0.95


def test_density_refinement_drops_components_without_dense_tissue(rng):
    image, ball, _, lung = _lung_scene(rng)
    lone = np.zeros_like(ball)
    lone[2:4, 18:20, 4:6] = True  # plain lung: only noise to outline
    assert not refine_by_density(lone, image, lung).any()
    assert refine_by_density(lone, image, lung, min_contrast=0.0).any()  # the contrast floor did it
    outside = np.zeros_like(ball)
    outside[8, 8, -1] = True  # outside the lung mask: nothing there to grow
    assert not refine_by_density(outside, image, lung).any()


def test_density_refinement_in_segment_and_calibration(rng):
    image, ball, vessel, lung = _lung_scene(rng)
    blurred = np.exp(-((np.indices(ball.shape) - 8.0) ** 2).sum(0) / 18.0).astype(np.float32)  # wider than the ball
    plain = segment(blurred, 0.3, lung)  # radius ≈ 4.7 around a radius-3 ball
    refined = segment(blurred, 0.3, lung, refine="density", image=image)
    assert dice(refined & ~vessel, ball) > dice(plain, ball) + 0.2
    # calibration segments each candidate with the refinement: refined masks are the ball at most thresholds
    cands, curve_r = threshold_dice_curve([blurred], [ball | vessel], lung_masks=[lung], refine="density",
                                          images=[image])
    cands, curve = threshold_dice_curve([blurred], [ball | vessel], cands, lung_masks=[lung])
    assert (curve_r > 0.8).mean() > 2 * (curve > 0.8).mean()
    threshold = calibrate_threshold([blurred], [ball], lung_masks=[lung], refine="density", images=[image])
    assert dice(segment(blurred, threshold, lung, refine="density", image=image) & ~vessel, ball) > 0.95
    with pytest.raises(ValueError, match="input image"):
        segment(blurred, 0.5, lung, refine="density")
    with pytest.raises(ValueError, match="refine must be one of"):
        segment(blurred, 0.5, lung, refine="crf", image=image)
    with pytest.raises(ValueError, match="one input image per map"):
        threshold_dice_curve([blurred], [ball], refine="density")
    with pytest.raises(ValueError, match="image shape"):
        refine_by_density(ball, image[:-1])
    bad = image.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        refine_by_density(ball, bad)


def test_density_after_keeps_the_maps_own_threshold_and_refines_what_it_detects(rng):
    """``density_after`` (the evaluation default): calibrated like the plain map, segmented like ``density``."""
    image, ball, vessel, lung = _lung_scene(rng)
    blurred = np.exp(-((np.indices(ball.shape) - 8.0) ** 2).sum(0) / 18.0).astype(np.float32)
    noisy = (blurred + rng.uniform(0, 0.05, blurred.shape)).astype(np.float32)
    maps, gts = [blurred, noisy], [ball, ball]
    plain = calibrate_threshold(maps, gts, lung_masks=[lung, lung])
    after = calibrate_threshold(maps, gts, lung_masks=[lung, lung], refine="density_after", images=[image, image])
    joint = calibrate_threshold(maps, gts, lung_masks=[lung, lung], refine="density", images=[image, image])
    assert after == plain and joint != plain  # the refinement does not move the threshold: it only redraws
    for m in maps:
        a = segment(m, after, lung, refine="density_after", image=image)
        np.testing.assert_array_equal(a, segment(m, after, lung, refine="density", image=image))
        assert dice(a & ~vessel, ball) > 0.95
    # the Dice curve of density_after is that of the refined masks (what the test scans get)
    cands, curve_after = threshold_dice_curve(maps, gts, lung_masks=[lung, lung], refine="density_after",
                                              images=[image, image])
    _, curve_joint = threshold_dice_curve(maps, gts, cands, lung_masks=[lung, lung], refine="density",
                                          images=[image, image])
    np.testing.assert_allclose(curve_after, curve_joint)
    with pytest.raises(ValueError, match="input image"):
        segment(blurred, 0.5, lung, refine="density_after")
    with pytest.raises(ValueError, match="refine must be one of"):
        calibrate_threshold(maps, gts, refine="crf")


def test_scan_scale_reads_each_map_as_a_fraction_of_its_own_maximum(rng):
    """A weak and a strong map of the same nodule: one absolute threshold loses the weak one, one fraction does not."""
    strong, gt = case(rng, (2, 2, 2))
    weak = 0.2 * strong  # the same map, a fifth of the amplitude
    lung = np.ones(SHAPE, bool)
    lung[0] = False
    strong[0] = 5.0  # outside the lung: does not set the scale
    np.testing.assert_allclose(scale_map(strong, lung, "scan")[lung], strong[lung] / strong[lung].max(), rtol=1e-6)
    np.testing.assert_array_equal(scale_map(strong, lung), strong)  # "absolute": as it is
    assert scale_map(strong, lung, "scan").dtype == np.float32
    # inside the lung the weak map scales to the strong one (outside, only the strong map has the bright slab)
    np.testing.assert_allclose(scale_map(weak, lung, "scan")[lung], scale_map(strong, lung, "scan")[lung], rtol=1e-5)
    # one threshold calibrated on the strong map: absolute loses the weak scan, the scan scale finds both
    threshold = calibrate_threshold([strong], [gt], lung_masks=[lung])
    assert dice(segment(strong, threshold, lung), gt) == 1.0 and not segment(weak, threshold, lung).any()
    fraction = calibrate_threshold([scale_map(strong, lung, "scan")], [gt], lung_masks=[lung])
    assert dice(segment(scale_map(weak, lung, "scan"), fraction, lung), gt) == 1.0
    # a map with nothing in the lung (a scan the classifier left alone) stays empty, without dividing by zero
    silent = np.zeros(SHAPE, np.float32)
    silent[0] = 1.0
    assert not scale_map(silent, lung, "scan").any() and not scale_map(np.zeros(SHAPE), None, "scan").any()
    assert scale_map(strong, None, "scan").max() == pytest.approx(1.0)  # no lung mask: the whole map's maximum
    with pytest.raises(ValueError, match="map scale must be one of"):
        scale_map(strong, lung, "zscore")
    with pytest.raises(ValueError, match="lung mask shape"):
        scale_map(strong, lung[:-1], "scan")
    bad = strong.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        scale_map(bad, lung, "scan")
