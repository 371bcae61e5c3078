"""From a difference map to a nodule mask: threshold (validation-calibrated or Otsu), post-process, scan grid.

A voxel is foreground when its map value is strictly above the threshold. The threshold is either calibrated on
a fold's validation cases (``calibrate_threshold``: the candidate with the best mean Dice; the same function serves
the baselines, so every method gets the same protocol) or chosen without labels by Otsu inside the lung mask.
Post-processing keeps the lung, optionally redraws each detected component on the input's density
(``refine="density"`` or ``"density_after"``: the map says where, the scan says how far; the second keeps the
threshold calibrated on the map's own masks, the evaluation default), and drops connected components smaller than
a size, on the model grid; the mask goes back to the scan's grid last, with nearest-neighbour resampling.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from tfg_core.data.preprocess import to_scan_grid
from tfg_core.data.volume import Volume

ArrayLike = np.ndarray | torch.Tensor


def _numpy(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


DIFFERENCES = ("absolute", "removed")  # the first is the default everywhere


def difference_map(x_cf: ArrayLike, x_ref: ArrayLike, mode: str = "absolute") -> np.ndarray:
    """The change from ``x_ref`` to ``x_cf`` as a float32 ``(z, y, x)`` map.

    Args:
        x_cf: counterfactual (guided) image, ``(z, y, x)`` or with singleton batch/channel axes.
        x_ref: reference (unguided reconstruction, or the input), same shape.
        mode: ``"absolute"``: ``|x_cf - x_ref|`` (the paper's map); ``"removed"``: ``max(x_ref - x_cf, 0)``, the
            density the counterfactual took away (removing a nodule lowers intensities; a rise is not a nodule).
    """
    if mode not in DIFFERENCES:
        raise ValueError(f"difference mode must be one of {DIFFERENCES}, got {mode!r}")
    a, b = np.squeeze(_numpy(x_cf)), np.squeeze(_numpy(x_ref))
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two (z, y, x) images of the same shape, got {a.shape} and {b.shape}")
    change = a.astype(np.float32) - b.astype(np.float32)
    return np.abs(change) if mode == "absolute" else np.maximum(-change, 0.0)


MAP_SCALES = ("absolute", "scan")  # the first is the default everywhere
# which validation scans a threshold is calibrated on (tfg_core.evaluate.evaluate_fold); the first is the default:
# the scans with a nodule, the population whose Dice the tables report
CALIBRATION_SCANS = ("nodules", "all")


def scale_map(diff: ArrayLike, lung_mask: np.ndarray | None = None, scale: str = "absolute") -> np.ndarray:
    """A map on the scale its threshold is read on: as it is, or as a fraction of the scan's own maximum.

    ``"absolute"`` keeps the values (the paper's protocol: one threshold in map units for every scan of a fold).
    ``"scan"`` divides by the map's maximum inside the lung mask, so a threshold means "this fraction of the
    strongest change in this scan" and a scan whose map is weak overall is not emptied by a threshold set on
    strong ones; a map with no positive value there is returned as zeros (a healthy scan the classifier left
    alone stays empty).

    Args:
        diff: any method's non-negative map ``(z, y, x)``.
        lung_mask: voxels whose maximum sets the scale (the whole map when None).
        scale: one of :data:`MAP_SCALES`.
    """
    if scale not in MAP_SCALES:
        raise ValueError(f"map scale must be one of {MAP_SCALES}, got {scale!r}")
    values = _numpy(diff).astype(np.float32, copy=False)
    if scale == "absolute":
        return values
    if lung_mask is not None and np.shape(lung_mask) != values.shape:
        raise ValueError(f"lung mask shape {np.shape(lung_mask)} differs from the map's {values.shape}")
    inside = values[np.asarray(lung_mask, bool)] if lung_mask is not None else values.ravel()
    peak = float(inside.max()) if inside.size else 0.0
    if not np.isfinite(peak):
        raise ValueError("the map has non-finite values: cannot scale it")
    return values / peak if peak > 0 else np.zeros_like(values)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (nothing to find, nothing found).

    Args:
        pred: predicted mask.
        gt: ground-truth mask, same shape.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & gt)) / total


def postprocess(
    mask: np.ndarray, lung_mask: np.ndarray | None = None, min_component_voxels: int = 0, connectivity: int = 3
) -> np.ndarray:
    """Keep the voxels inside the lung mask, then drop connected components smaller than a size.

    Args:
        mask: boolean ``(z, y, x)`` mask.
        lung_mask: boolean mask on the same grid, or None.
        min_component_voxels: components with fewer voxels are removed (0 keeps all).
        connectivity: 1 = faces, 2 = + edges, 3 = + corners (``scipy.ndimage.generate_binary_structure``).
    """
    out = np.asarray(mask, dtype=bool)
    if lung_mask is not None:
        lung = np.asarray(lung_mask, dtype=bool)
        if lung.shape != out.shape:
            raise ValueError(f"lung mask shape {lung.shape} differs from the mask's {out.shape}")
        out = out & lung
    if min_component_voxels > 0 and out.any():
        labels, _ = ndimage.label(out, structure=ndimage.generate_binary_structure(out.ndim, connectivity))
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_component_voxels
        keep[0] = False  # background
        out = keep[labels]
    return out


# post-processing of a thresholded map; the first is the default of segment() and pseudo-labels (the paper's
# protocol). "density" and "density_after" redraw each component on the scan's density alike; they differ in how a
# calibrated threshold is chosen: on the refined masks, or on the map's own (unrefined) masks, the refinement
# applied after it (calibrate_threshold)
REFINEMENTS = ("none", "density", "density_after")
# the evaluation protocol's default (evaluate_fold, tfg demo): measured on two phantom cohorts, the second fresh
# (docs/measurement_log.md)
EVALUATION_REFINE = "density_after"


def refine_by_density(
    mask: np.ndarray,
    image: ArrayLike,
    lung_mask: np.ndarray | None = None,
    fraction: float = 0.5,
    margin_voxels: int = 1,
    min_contrast: float = 0.05,
    connectivity: int = 3,
) -> np.ndarray:
    """Redraw each detected component's outline on the input's density (label-free delineation).

    A thresholded difference map says *where* something changed, but its outline is the decoder's blur and the
    threshold's: on the demo's 5.5 mm grid a 3-voxel nodule's map spreads over its neighbours, or only its core
    passes a high threshold. The scan itself says where the dense tissue is. For every connected component ``C``
    of ``mask``: the peak ``p`` is the largest value of ``image`` in ``C`` and its direct neighbours, the lung
    level ``b`` the median of a two-voxel ring just outside ``C`` grown by ``margin_voxels``, and the refined
    component is the dense tissue (``image > b + fraction·(p − b)``, half maximum at the default) connected to
    ``C``'s neighbourhood, grown at most ``margin_voxels`` steps from ``C`` (so a nodule on a vessel does not
    run along it). All inside the lung mask. A component whose peak is less than ``min_contrast`` above the
    lung has no dense structure to outline and is dropped.

    Args:
        mask: boolean ``(z, y, x)`` mask from a thresholded map.
        image: the input scan on the same grid, in [0, 1] (MAISI's intensity convention: HU −1000…1000).
        lung_mask: boolean lung mask on the grid (nodules included), or None for no restriction.
        fraction: where between lung level and peak the outline is drawn (0.5 = half maximum).
        margin_voxels: how far (steps in the ``connectivity`` neighbourhood) a component may grow. The demo's
            maps are blurred wider than the nodules, so one step is enough there (phantom folds 0–9: mean Dice
            over all methods higher with 1 than with 3; docs/measurement_log.md).
        min_contrast: components whose peak is less than this above the lung level are dropped
            (0.05 = 100 HU in [0, 1] units).
        connectivity: 1 = faces, 2 = + edges, 3 = + corners.
    """
    seeds = np.asarray(mask, dtype=bool)
    values = np.asarray(_numpy(image), dtype=np.float32)  # no copy per call on the calibration path
    if values.shape != seeds.shape:
        raise ValueError(f"image shape {values.shape} differs from the mask's {seeds.shape}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if margin_voxels < 0:
        raise ValueError(f"margin_voxels must be ≥ 0, got {margin_voxels}")
    if not np.isfinite(values).all():
        raise ValueError("image has non-finite values; refinement needs the scan's densities")
    lung = np.ones_like(seeds) if lung_mask is None else np.asarray(lung_mask, dtype=bool)
    if lung.shape != seeds.shape:
        raise ValueError(f"lung mask shape {lung.shape} differs from the mask's {seeds.shape}")
    structure = ndimage.generate_binary_structure(seeds.ndim, connectivity)
    labels, _ = ndimage.label(seeds, structure=structure)
    refined = np.zeros_like(seeds)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        # work on the component's bounding box, padded by what growing and the ring can reach
        pad = margin_voxels + 3
        sub = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, size)) for s, size in zip(box, labels.shape))
        component, inside, local = labels[sub] == index, lung[sub], values[sub]
        near = ndimage.binary_dilation(component, structure) & inside
        # (scipy dilates until nothing changes when iterations=0, hence the explicit case)
        grown = ndimage.binary_dilation(component, structure, iterations=margin_voxels) if margin_voxels else component
        reach = grown & inside
        ring = ndimage.binary_dilation(reach, structure, iterations=2) & ~reach & inside
        if not near.any() or not ring.any():
            continue
        level, peak = float(np.median(local[ring])), float(local[near].max())
        if peak - level < min_contrast:
            continue
        dense = reach & (local > level + fraction * (peak - level))
        # geodesic growth: dense voxels connected to the component's neighbourhood, within ``reach``
        refined[sub] |= ndimage.binary_propagation(near & dense, structure=structure, mask=dense)
    return refined


def _refined(mask: np.ndarray, refine: str, image: ArrayLike | None, lung_mask: np.ndarray | None) -> np.ndarray:
    """``mask`` after the named refinement (:data:`REFINEMENTS`)."""
    if refine not in REFINEMENTS:
        raise ValueError(f"refine must be one of {REFINEMENTS}, got {refine!r}")
    if refine == "none":
        return mask
    if image is None:
        raise ValueError(f"refine={refine!r} needs the input image on the map's grid")
    return refine_by_density(mask, image, lung_mask)


def otsu_threshold(diff: ArrayLike, lung_mask: np.ndarray | None = None, bins: int = 256) -> float:
    """Otsu's threshold of the map's values inside the lung mask (label-free).

    Neither scipy nor MONAI has one without scikit-image (not a dependency), hence this short histogram version.
    Returns the upper edge of the last background bin, so ``diff > threshold`` is the bright class.

    Args:
        diff: difference map ``(z, y, x)``.
        lung_mask: only these voxels count (all when None).
        bins: histogram bins.
    """
    values = _numpy(diff)
    values = values[np.asarray(lung_mask, bool)] if lung_mask is not None else values.ravel()
    if values.size == 0:
        raise ValueError("no voxels to threshold (empty lung mask)")
    if values.min() == values.max():
        return float(values.max())  # one value: nothing is brighter than the rest
    hist, edges = np.histogram(values.astype(np.float64), bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1].astype(np.float64)  # background = bins 0..k, for k = 0..bins-2
    w1 = hist.sum() - w0
    s0 = np.cumsum(hist * centres)[:-1]
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (np.sum(hist * centres) - s0) / np.maximum(w1, 1)
    between = np.where((w0 > 0) & (w1 > 0), w0 * w1 * (mu0 - mu1) ** 2, -1.0)
    # empty bins between two modes give a plateau; its middle is the least arbitrary cut
    best = np.flatnonzero(between >= between.max() * (1 - 1e-12))
    k = best[len(best) // 2]
    return float(edges[k + 1])


def default_candidates(
    maps: Sequence[ArrayLike], lung_masks: Sequence[np.ndarray | None] | None = None,
    n_values: int = 101, n_quantiles: int = 61,
) -> np.ndarray:
    """Threshold candidates for calibration: an even grid over the pooled values plus high quantiles.

    Nodules cover a tiny fraction of a scan, so the useful thresholds sit at quantiles like 0.999; the
    log-spaced quantile levels (1 - 10^-6 ... 1 - 10^-0.5) cover that tail, the even grid the rest.

    Args:
        maps: difference maps.
        lung_masks: per-map masks restricting the voxels considered (None entries for none).
        n_values: points of the even grid between the pooled minimum and maximum.
        n_quantiles: number of high quantile levels.
    """
    lungs = lung_masks if lung_masks is not None else [None] * len(maps)
    pooled = np.concatenate([_numpy(m)[np.asarray(l, bool)] if l is not None else _numpy(m).ravel()
                             for m, l in zip(maps, lungs)])
    if pooled.size == 0:
        raise ValueError("no voxels to calibrate on")
    even = np.linspace(pooled.min(), pooled.max(), n_values)
    tail = np.quantile(pooled, 1.0 - np.logspace(-6, -0.5, n_quantiles))
    return np.unique(np.concatenate([even, tail]))


def threshold_dice_curve(
    maps: Sequence[ArrayLike],
    gt_masks: Sequence[np.ndarray],
    candidates: Sequence[float] | None = None,
    lung_masks: Sequence[np.ndarray | None] | None = None,
    min_component_voxels: int = 0,
    refine: str = "none",
    images: Sequence[ArrayLike] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean Dice over cases of ``segment(map, threshold, lung_mask, min_component_voxels, …)`` for each candidate.

    Without component filtering or refinement, Dice at every candidate comes from sorted values (two
    ``searchsorted`` per case); with either, each candidate is segmented in full.

    Args:
        maps: difference maps on the grid of the masks.
        gt_masks: ground-truth masks (bool), one per map.
        candidates: thresholds to try (``default_candidates`` when None).
        lung_masks: lung masks (or None entries) for the post-processing.
        min_component_voxels: post-processing component size.
        refine: post-processing refinement (:data:`REFINEMENTS`).
        images: the inputs, one per map (needed by a refinement).

    Returns:
        ``(candidates, mean_dice)``, candidates sorted ascending.
    """
    if len(maps) != len(gt_masks) or not maps:
        raise ValueError(f"need one ground-truth mask per map, got {len(maps)} maps and {len(gt_masks)} masks")
    lungs = list(lung_masks) if lung_masks is not None else [None] * len(maps)
    if refine not in REFINEMENTS:
        raise ValueError(f"refine must be one of {REFINEMENTS}, got {refine!r}")
    if refine != "none" and (images is None or len(images) != len(maps)):
        raise ValueError(f"refine={refine!r} needs one input image per map")
    inputs = list(images) if images is not None else [None] * len(maps)
    cands = np.sort(np.asarray(candidates if candidates is not None else default_candidates(maps, lungs), float))
    scores = np.zeros((len(maps), len(cands)))
    for c, (m, gt, lung, image) in enumerate(zip(maps, gt_masks, lungs, inputs)):
        m, gt = _numpy(m), np.asarray(gt, bool)
        if m.shape != gt.shape:
            raise ValueError(f"case {c}: map shape {m.shape} differs from its mask's {gt.shape}")
        if min_component_voxels > 0 or refine != "none":
            scores[c] = [dice(segment(m, thr, lung, min_component_voxels, refine=refine, image=image), gt)
                         for thr in cands]
            continue
        inside = np.asarray(lung, bool) if lung is not None else np.ones(m.shape, bool)
        values, hits = np.sort(m[inside]), np.sort(m[inside & gt])
        predicted = values.size - np.searchsorted(values, cands, side="right")  # voxels with value > threshold
        true_pos = hits.size - np.searchsorted(hits, cands, side="right")
        total = predicted + gt.sum()
        scores[c] = np.where(total > 0, 2.0 * true_pos / np.maximum(total, 1), 1.0)
    return cands, scores.mean(axis=0)


def calibrate_threshold(
    maps: Sequence[ArrayLike],
    gt_masks: Sequence[np.ndarray],
    candidates: Sequence[float] | None = None,
    lung_masks: Sequence[np.ndarray | None] | None = None,
    min_component_voxels: int = 0,
    refine: str = "none",
    images: Sequence[ArrayLike] | None = None,
) -> float:
    """The threshold with the best mean Dice over validation cases.

    When neighbouring candidates tie (a plateau of equal Dice), the midpoint *in value* of the plateau that
    holds the first maximum is returned: the candidates are dense in the tail, so the middle *index* would
    sit at the plateau's edge, one noise voxel away from a worse threshold.

    Args:
        maps: validation difference maps (or any method's score maps).
        gt_masks: their ground-truth masks.
        candidates: thresholds to try (``default_candidates`` when None).
        lung_masks: lung masks used by the post-processing (None entries for none).
        min_component_voxels: post-processing component size, as it will be used at test time.
        refine: post-processing refinement (:data:`REFINEMENTS`), as it will be used at test time.
        images: the validation inputs, one per map (needed by a refinement).

    With ``refine="density_after"`` the Dice is that of the unrefined masks: the threshold is the map's own, and
    the refinement only redraws what it detects. Calibrating on refined masks instead (``"density"``) makes the
    Dice blind to a component's extent, so a handful of validation scans picks the threshold by which components
    survive, and it overfits them (phantom folds: validation Dice up, test Dice down; docs/measurement_log.md).
    """
    calibrated_on = "none" if refine == "density_after" else refine  # an unknown name fails in the curve
    cands, mean_dice = threshold_dice_curve(maps, gt_masks, candidates, lung_masks, min_component_voxels,
                                            calibrated_on, images)
    is_best = mean_dice >= mean_dice.max() - 1e-12
    first = int(np.argmax(is_best))
    last = first
    while last + 1 < len(cands) and is_best[last + 1]:
        last += 1
    return float(0.5 * (cands[first] + cands[last]))


def segment(
    diff: ArrayLike,
    threshold: float | str,
    lung_mask: np.ndarray | None = None,
    min_component_voxels: int = 0,
    scan: Volume | None = None,
    refine: str = "none",
    image: ArrayLike | None = None,
) -> np.ndarray:
    """Threshold a difference map, post-process it, and optionally bring it to the scan's grid.

    Order: threshold → lung mask → (a refinement: :func:`refine_by_density` on ``image``) → components.

    Args:
        diff: difference map ``(z, y, x)`` on the model grid.
        threshold: a value (foreground is ``diff > threshold``) or ``"otsu"`` (inside ``lung_mask``).
        lung_mask: boolean mask on the model grid, or None.
        min_component_voxels: drop components smaller than this (model-grid voxels).
        scan: when given, the mask is resampled (nearest) to this volume's voxel grid and orientation
            (``to_scan_grid``; the model grid is the canonical orientation of ``to_model_grid``).
        refine: one of :data:`REFINEMENTS`; ``"density"`` and ``"density_after"`` (the same here; they differ in
            calibration) redraw each component on the input's density.
        image: the input on the model grid in [0, 1] (needed by either refinement).
    """
    values = _numpy(diff)
    if threshold == "otsu":
        threshold = otsu_threshold(values, lung_mask)
    elif isinstance(threshold, str):
        raise ValueError(f"threshold must be a number or 'otsu', got {threshold!r}")
    mask = postprocess(values > float(threshold), lung_mask)
    mask = _refined(mask, refine, image, lung_mask)
    mask = postprocess(mask, None, min_component_voxels)
    if scan is None:
        return mask
    # uint8 on the way: the reorientation goes through SimpleITK, which has no boolean pixel type
    return to_scan_grid(mask.astype(np.uint8), scan, mode="nearest").astype(bool)


def on_scan(array: ArrayLike, scan: Volume, is_mask: bool) -> Volume:
    """A model-grid map or mask as a ``Volume`` with the scan's grid and geometry (for writing NIfTI).

    Args:
        array: ``(z, y, x)`` array on the model grid (or already on the scan grid).
        scan: the original scan.
        is_mask: nearest-neighbour for masks, trilinear for maps.
    """
    a = _numpy(array)
    out = to_scan_grid(a.astype(np.float32) if not is_mask else a.astype(np.uint8), scan,
                       mode="nearest" if is_mask else "trilinear")
    return scan.with_array(np.asarray(out, dtype=np.uint8 if is_mask else np.float32), meta=dict(scan.meta))
