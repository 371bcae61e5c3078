"""Evaluate difference-map methods on one fold: calibrate on the validation scans, score the test scans.

Methods produce a difference map per scan on the model grid; every method is thresholded by the same
protocol (threshold maximising mean Dice on the fold's validation scans, or Otsu inside the lung) and scored
on the scan's own grid against its ground truth. Rows are tidy: one per (fold, scan, method).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from tfg_core.baselines import BASELINES, BaselineConfig, WeakMedSam, baseline_map
from tfg_core.data.cases import Case, load_case
from tfg_core.data.phantom import PhantomConfig, healthy_twin, parse_series_uid, read_cohort_config
from tfg_core.data.preprocess import mask_to_model_grid, to_model_grid, to_scan_grid
from tfg_core.data.volume import Volume
from tfg_core.flow.base import FlowModel
from tfg_core.flow.noprior import NoPriorFlow
from tfg_core.guidance import GuidanceConfig, run_guidance
from tfg_core.metrics import case_metrics, peak_distance_mm
from tfg_core.segment import (CALIBRATION_SCANS, EVALUATION_REFINE, MAP_SCALES, REFINEMENTS, calibrate_threshold,
                              difference_map, scale_map, segment, threshold_dice_curve)

METHODS = ("tfg", "no_prior", "unguided")  # the guidance and its two ablations
# the ideal counterfactual (phantoms only): the same scan without its nodules, through the same autoencoder
ORACLE = "oracle"
ALL_METHODS = METHODS + BASELINES + (ORACLE,)


@dataclass
class PreparedCase:
    """A scan on the model grid with its masks there and on its own grid.

    Args:
        case: the scan as read (original geometry, ground truth on the scan grid).
        grid: [0, 1] volume on the model grid (canonical orientation).
        gt_grid: ground truth on the model grid (for calibration).
        lung_grid: lung mask on the model grid.
        healthy_grid: the scan's healthy twin on the model grid (phantoms; :func:`attach_healthy_twin`), or None.
    """

    case: Case
    grid: Volume
    gt_grid: np.ndarray
    lung_grid: np.ndarray
    healthy_grid: Volume | None = None

    @property
    def uid(self) -> str:
        return self.case.uid


def prepare(case: Case) -> PreparedCase:
    """Bring a case to the model grid (image, ground truth and lung mask alike).

    Args:
        case: a loaded scan.
    """
    grid = to_model_grid(case.volume)
    return PreparedCase(case, grid, mask_to_model_grid(case.nodule_mask, case.volume, grid) > 0,
                        mask_to_model_grid(case.lung_mask, case.volume, grid) > 0)


def score_on_scan(mask: np.ndarray, prepared: PreparedCase) -> dict[str, float | int | bool]:
    """Dice, MSD and counts of a model-grid mask against the scan's ground truth, on the scan's own grid.

    Args:
        mask: boolean mask on the model grid.
        prepared: the scan it was segmented on.
    """
    # uint8 on the way back: the reorientation goes through SimpleITK, which has no boolean pixels
    on_scan = to_scan_grid(np.asarray(mask).astype(np.uint8), prepared.case.volume, mode="nearest").astype(bool)
    return case_metrics(on_scan, prepared.case.nodule_mask, prepared.case.volume.spacing)


def attach_healthy_twin(prepared: PreparedCase, cohort: PhantomConfig) -> PreparedCase:
    """Add the scan's healthy twin (the same phantom without nodules) on the model grid, for the oracle method.

    Args:
        prepared: a phantom scan on the model grid.
        cohort: the config its tree was written with (:func:`tfg_core.data.phantom.read_cohort_config`).

    Raises:
        ValueError: the scan is not a case of that cohort.
    """
    seed, index = parse_series_uid(prepared.uid)
    if seed != cohort.seed:
        raise ValueError(f"{prepared.uid} belongs to phantom cohort seed {seed}, not {cohort.seed}")
    twin = healthy_twin(index, cohort).volume
    if twin.shape != prepared.case.volume.shape:
        raise ValueError(f"{prepared.uid}: the healthy twin's shape {twin.shape} differs from the scan's "
                         f"{prepared.case.volume.shape} (a tree written with another generator version?)")
    prepared.healthy_grid = to_model_grid(twin, shape=prepared.grid.shape)
    return prepared


def oracle_map(prepared: PreparedCase, flow: FlowModel, difference: str = "absolute") -> np.ndarray:
    """What a perfect counterfactual would show through ``flow``'s autoencoder: the scan against its healthy twin.

    The unguided reconstruction of the demo flow is the autoencoder's own (mean inside the nodules within about 1 %
    on fold 0), so encode -> decode of both images is the ceiling of any method that compares two reconstructions.

    Args:
        prepared: the scan with :func:`attach_healthy_twin` applied.
        flow: the flow whose autoencoder the guidance decodes through.
        difference: ``"absolute"`` or ``"removed"`` (``segment.difference_map``).
    """
    if prepared.healthy_grid is None:
        raise ValueError(f"{prepared.uid}: no healthy twin attached (the oracle exists for phantom cohorts only)")
    with torch.no_grad():
        recon = [flow.decode(flow.encode(torch.as_tensor(v.array, dtype=torch.float32)[None, None]))[0, 0]
                 for v in (prepared.grid, prepared.healthy_grid)]
    return difference_map(recon[1], recon[0], difference)


def difference_maps(prepared: PreparedCase, flow: FlowModel, predictor: torch.nn.Module, config: GuidanceConfig,
                    methods: Sequence[str] = METHODS, baseline_config: BaselineConfig | None = None,
                    weakmedsam: WeakMedSam | None = None, seconds: dict[str, float] | None = None,
                    ) -> dict[str, np.ndarray]:
    """Maps of the requested methods for one scan, all on the model grid.

    ``tfg``: guided against unguided reconstruction (shared inversion); ``unguided``: unguided reconstruction
    against the input (what the prior alone changes); ``no_prior``: the same classifier steps applied to the image
    (velocity 0) — these three by ``config.difference``; any of :data:`tfg_core.baselines.BASELINES`: that
    attribution map of the same predictor; ``oracle``: :func:`oracle_map` (needs the healthy twin).

    Args:
        prepared: the scan on the model grid.
        flow: the rectified-flow prior.
        predictor: slice classifier in eval mode.
        config: guidance parameters (shared by ``tfg`` and ``no_prior``).
        methods: which maps to compute.
        baseline_config: baseline parameters.
        weakmedsam: prepared WeakMedSAM refiner (needed when ``"weakmedsam"`` is requested).
        seconds: when given, filled with each method's wall time (the shared guided run counts for ``tfg``).
    """
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {ALL_METHODS}")
    x = torch.as_tensor(prepared.grid.array, dtype=torch.float32)
    maps: dict[str, np.ndarray] = {}
    timer = seconds if seconds is not None else {}
    started = time.perf_counter()
    if "tfg" in methods or "unguided" in methods:
        result = run_guidance(flow, predictor, x, config)
        maps["tfg"] = result.difference.numpy()
        maps["unguided"] = difference_map(result.x_reference, result.x_input, config.difference)
        maps["_counterfactual"] = result.x_counterfactual.numpy()
        maps["_reference"] = result.x_reference.numpy()
        timer["tfg"] = timer["unguided"] = time.perf_counter() - started
    if "no_prior" in methods:
        started = time.perf_counter()
        maps["no_prior"] = run_guidance(NoPriorFlow(), predictor, x, config).difference.numpy()
        timer["no_prior"] = time.perf_counter() - started
    if ORACLE in methods:
        started = time.perf_counter()
        maps[ORACLE] = oracle_map(prepared, flow, config.difference)
        timer[ORACLE] = time.perf_counter() - started
    for name in (m for m in methods if m in BASELINES):
        started = time.perf_counter()
        maps[name] = baseline_map(name, predictor, x, baseline_config, weakmedsam)
        timer[name] = time.perf_counter() - started
    return maps


def params_hash(params: Mapping) -> str:
    """Short stable hash of a parameter dict (for result rows).

    Args:
        params: JSON-able parameters.
    """
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def evaluation_params(config: GuidanceConfig | None = None, threshold_mode: str | Sequence[str] = "calibrated",
                      min_component_voxels: int = 0, refine: str = EVALUATION_REFINE, map_scale: str = "absolute",
                      baseline_config: BaselineConfig | None = None, calibrate_on: str = CALIBRATION_SCANS[0]) -> dict:
    """Everything besides the networks and the data that decides :func:`evaluate_fold`'s rows; their
    ``params_hash`` is :func:`params_hash` of this.

    Args:
        config: guidance parameters (None = the defaults).
        threshold_mode: as in :func:`evaluate_fold`.
        min_component_voxels: as in :func:`evaluate_fold`.
        refine: as in :func:`evaluate_fold`.
        map_scale: as in :func:`evaluate_fold`.
        baseline_config: as in :func:`evaluate_fold`.
        calibrate_on: as in :func:`evaluate_fold`.
    """
    return {"guidance": asdict(config if config is not None else GuidanceConfig()),
            "threshold_mode": threshold_mode if isinstance(threshold_mode, str) else list(threshold_mode),
            "min_component_voxels": min_component_voxels,
            **({"refine": refine} if refine != "none" else {}),  # absent = none: older rows keep their hash
            **({"map_scale": map_scale} if map_scale != "absolute" else {}),
            # absent = all: rows written before the option existed were calibrated on every validation scan
            **({"calibrate_on": calibrate_on} if calibrate_on != "all" else {}),
            "baselines": asdict(baseline_config or BaselineConfig())}


def evaluate_fold(
    root: str | os.PathLike,
    manifest: pd.DataFrame,
    annotations: pd.DataFrame,
    split,
    flow: FlowModel,
    predictor: torch.nn.Module,
    config: GuidanceConfig | None = None,
    methods: Sequence[str] = METHODS,
    threshold_mode: str | Sequence[str] = "calibrated",
    min_component_voxels: int = 0,
    refine: str = EVALUATION_REFINE,
    map_scale: str = "absolute",
    backbone: str = "tiny",
    experiment: str = "demo",
    on_test_case: Callable[[PreparedCase, dict[str, np.ndarray], dict[str, np.ndarray]], None] | None = None,
    progress: bool = False,
    baseline_config: BaselineConfig | None = None,
    weakmedsam: WeakMedSam | None = None,
    calibrate_on: str = CALIBRATION_SCANS[0],
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Calibrate thresholds on ``split.val`` and score ``split.test`` for each method.

    Args:
        root: LUNA16-shaped root.
        manifest: its manifest.
        annotations: its annotation table.
        split: a :class:`tfg_core.data.folds.FoldSplit`.
        flow: the rectified-flow prior.
        predictor: fine-tuned slice classifier (eval mode).
        config: guidance parameters.
        methods: which methods to run (:data:`ALL_METHODS`).
        threshold_mode: ``"calibrated"`` (validation Dice) or ``"otsu"`` (label-free, per scan, inside the lung), or
            both as a sequence: each map is then scored both ways (rows differ in ``threshold_mode``).
        min_component_voxels: post-processing: drop smaller components (model-grid voxels).
        refine: post-processing of every method's mask alike (:data:`tfg_core.segment.REFINEMENTS`):
            ``"density_after"`` (default) redraws each component of the mask at the map's own calibrated threshold on
            the input's density (:func:`tfg_core.segment.refine_by_density`); ``"density"`` does the same with a
            threshold calibrated on the refined masks; ``"none"`` keeps the thresholded map (the paper's protocol).
        map_scale: ``"scan"`` reads every map as a fraction of its own maximum in the lung before calibration and
            thresholding (:func:`tfg_core.segment.scale_map`), for every method alike; ``"absolute"`` (default) not.
        backbone: predictor name for the rows.
        experiment: experiment name for the rows.
        on_test_case: called with (prepared case, maps, masks on the model grid) for each test scan (figures, NIfTI).
        progress: progress bars.
        baseline_config: baseline parameters (defaults of :class:`~tfg_core.baselines.BaselineConfig`).
        weakmedsam: WeakMedSAM refiner for ``predictor``; built from LiteMedSAM's weights when needed and None.
        calibrate_on: which validation scans the threshold is calibrated on (:data:`CALIBRATION_SCANS`):
            ``"nodules"`` (default) the scans with a ground-truth nodule on the model grid — the population the
            test Dice is reported on; ``"all"`` every validation scan, a nodule-free scan counting Dice 1 when its
            mask is empty and 0 otherwise (the threshold then also buys masks left empty on healthy scans).

    Returns:
        One row per (test scan, method, threshold mode) — Dice, MSD, the threshold and ``val_dice``, the mean Dice
        over the validation scans at the calibrated threshold (NaN for Otsu rows) — and the calibrated thresholds.
    """
    config = config if config is not None else GuidanceConfig()
    if "weakmedsam" in methods and weakmedsam is None:
        pam = baseline_config.pam if baseline_config is not None else None
        weakmedsam = WeakMedSam.from_litemedsam(predictor, config=pam)
    if map_scale not in MAP_SCALES:
        raise ValueError(f"map_scale must be one of {MAP_SCALES}, got {map_scale!r}")
    if calibrate_on not in CALIBRATION_SCANS:
        raise ValueError(f"calibrate_on must be one of {CALIBRATION_SCANS}, got {calibrate_on!r}")

    def compute(prepared: PreparedCase, seconds: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        maps = difference_maps(prepared, flow, predictor, config, methods, baseline_config, weakmedsam, seconds)
        return {m: scale_map(a, prepared.lung_grid, map_scale) for m, a in maps.items()}

    rows_by_uid = manifest.set_index("seriesuid", drop=False)
    cohort = read_cohort_config(root) if ORACLE in methods else None

    def load(uid: str) -> PreparedCase:
        prepared = prepare(load_case(root, rows_by_uid.loc[uid], annotations))
        return attach_healthy_twin(prepared, cohort) if cohort is not None else prepared

    modes = (threshold_mode,) if isinstance(threshold_mode, str) else tuple(threshold_mode)
    bad = [m for m in modes if m not in ("calibrated", "otsu")] or ([] if modes else ["(none)"])
    if bad:
        raise ValueError(f"threshold_mode must be 'calibrated' or 'otsu', got {bad}")
    if refine not in REFINEMENTS:
        raise ValueError(f"refine must be one of {REFINEMENTS}, got {refine!r}")
    thresholds: dict[str, float] = {}
    val_dice: dict[str, float] = {}
    if "calibrated" in modes:
        val_maps: dict[str, list[np.ndarray]] = {m: [] for m in methods}
        gts, lungs, images = [], [], []
        for uid in tqdm(split.val, disable=not progress, desc=f"fold {split.fold} validation"):
            prepared = load(uid)
            if calibrate_on == "nodules" and not prepared.gt_grid.any():
                continue  # not in the calibration: its maps are never computed
            maps = compute(prepared)
            for m in methods:
                val_maps[m].append(maps[m])
            gts.append(prepared.gt_grid)
            lungs.append(prepared.lung_grid)
            images.append(prepared.grid.array)
        if not gts:
            raise ValueError(f"fold {split.fold}: none of its {len(split.val)} validation scans has a nodule on the "
                             "model grid to calibrate a threshold on; use calibrate_on='all' or threshold_mode='otsu'")
        for m in methods:
            thresholds[m] = calibrate_threshold(val_maps[m], gts, lung_masks=lungs,
                                                min_component_voxels=min_component_voxels, refine=refine, images=images)
            # the validation Dice of the masks as the test scans get them (with "density_after" refined, though the
            # threshold was chosen on the unrefined ones): lets recipes (predictors, guidance options) be compared on
            # the validation scans, without looking at the test scans
            _, at_threshold = threshold_dice_curve(val_maps[m], gts, [thresholds[m]], lungs, min_component_voxels,
                                                   refine, images)
            val_dice[m] = float(at_threshold[0])

    phash = params_hash(evaluation_params(config, threshold_mode, min_component_voxels, refine, map_scale,
                                          baseline_config, calibrate_on))
    rows = []
    for uid in tqdm(split.test, disable=not progress, desc=f"fold {split.fold} test"):
        prepared = load(uid)
        seconds: dict[str, float] = {}
        maps = compute(prepared, seconds)
        masks = {}
        for m in methods:
            # where the map's maximum sits, before any threshold: on the nodule = inside or one voxel away
            peak = peak_distance_mm(maps[m], prepared.gt_grid, prepared.grid.spacing)
            for mode in modes:
                threshold = thresholds[m] if mode == "calibrated" else "otsu"
                mask = segment(maps[m], threshold, prepared.lung_grid, min_component_voxels, refine=refine,
                               image=prepared.grid.array)
                masks.setdefault(m, mask)  # the first mode's mask goes to on_test_case
                metrics = score_on_scan(mask, prepared)
                rows.append({"experiment": experiment, "fold": split.fold, "seriesuid": uid, "backbone": backbone,
                             "method": m, **metrics, "threshold_mode": mode, "refine": refine,
                             "map_scale": map_scale,
                             "calibrate_on": calibrate_on if mode == "calibrated" else "",
                             "threshold": threshold if isinstance(threshold, str) else float(threshold),
                             "val_dice": val_dice[m] if mode == "calibrated" else float("nan"),
                             "n_nodules": len(prepared.case.annotations),
                             "peak_dist_mm": peak, "peak_on_nodule": bool(peak <= max(prepared.grid.spacing)),
                             "seconds": round(seconds.get(m, float("nan")), 3),
                             "params_hash": phash})
        if on_test_case is not None:
            on_test_case(prepared, maps, masks)
    return pd.DataFrame.from_records(rows), thresholds


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-method summary over scans with a nodule: mean ± std Dice, median MSD, counts (empties stated).

    Args:
        rows: tidy rows from :func:`evaluate_fold` (any number of folds).
    """
    scored = rows[rows.gt_voxels > 0]
    out = []
    for method, g in scored.groupby("method", sort=False):
        finite = g.msd_mm[np.isfinite(g.msd_mm)]
        out.append({"method": method, "n": len(g), "dsc_mean": g.dsc.mean(), "dsc_std": g.dsc.std(ddof=0),
                    "msd_median_mm": float(np.median(g.msd_mm)) if len(g) else np.nan,
                    "msd_mean_finite_mm": finite.mean() if len(finite) else np.nan,
                    "n_empty_pred": int(g.empty_pred.sum()),
                    "fp_voxels_on_healthy": int(rows[(rows.method == method) & (rows.gt_voxels == 0)].pred_voxels.sum())})
    return pd.DataFrame(out)
