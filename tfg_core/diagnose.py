"""Why a guided segmentation failed on a scan: the stage of the pipeline where the nodule was lost.

TFG finds a nodule only if four things happen in turn, and each can be checked on its own map:

1. the slice classifier calls a slice through the nodule positive on the input (else guidance never acts there);
2. its gradient — the no-prior map: the same classifier steps applied to the image, velocity 0 — peaks on the
   nodule (else guidance pushes on something else);
3. the flow turns that push into a change of the nodule: the guided − reference map is larger on the nodule than
   anywhere else in the lung (else the prior moved other tissue or smoothed the push away);
4. that change passes the fold's calibrated threshold.

:func:`failure_stage` names the first step that did not happen; :func:`diagnose_case` measures the four on one
scan; :func:`diagnose_rows` does it for result rows of :func:`tfg_core.evaluate.evaluate_fold` (e.g. every TFG
row with a low Dice) and recomputes each row's Dice from the same maps, so a table that does not reproduce its
rows is seen at once. "On the nodule" means inside the ground truth or one voxel from it, as
``peak_on_nodule`` in the result rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from numpy.typing import ArrayLike
from scipy import ndimage
from tqdm.auto import tqdm

from tfg_core.data.cases import load_case
from tfg_core.data.phantom_signal import NoduleSignal
from tfg_core.evaluate import (PreparedCase, difference_maps, evaluation_params, params_hash, prepare,
                               score_on_scan)
from tfg_core.guidance import GuidanceConfig, slice_logits
from tfg_core.segment import scale_map, segment

FAILURE_STAGES = ("classifier_missed", "classifier_elsewhere", "prior_elsewhere", "below_threshold", "segmented")
"""Where a nodule is lost, in pipeline order; ``segmented``: its change passes the threshold (a low Dice then comes
from the mask's extent or extra components, not from detection)."""


def failure_stage(positive_slices_on_nodule: int, classifier_on_nodule: bool, change_on_nodule: float,
                  change_elsewhere: float, threshold: float) -> str:
    """The first step of the pipeline that did not happen (:data:`FAILURE_STAGES`).

    Args:
        positive_slices_on_nodule: slices through the nodule the classifier calls positive on the input.
        classifier_on_nodule: the no-prior map's maximum lies on the nodule.
        change_on_nodule: the largest value of the (scaled) TFG map on the nodule.
        change_elsewhere: its largest value in the rest of the lung.
        threshold: the calibrated threshold the map was cut at.
    """
    if positive_slices_on_nodule == 0:
        return "classifier_missed"
    if not classifier_on_nodule:
        return "classifier_elsewhere"
    if change_on_nodule <= change_elsewhere and change_on_nodule <= threshold:
        return "prior_elsewhere"
    if change_on_nodule <= threshold:
        return "below_threshold"
    return "segmented"


def _slice_probabilities(prepared: PreparedCase, predictor: torch.nn.Module,
                         slice_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Every slice's probability on the input, and the indices of the slices the ground truth touches."""
    x = torch.as_tensor(prepared.grid.array, dtype=torch.float32)
    with torch.no_grad():
        probs = torch.sigmoid(slice_logits(predictor, x, range(x.shape[0]), slice_batch)).numpy()
    gt = prepared.gt_grid.astype(bool)
    return probs, np.flatnonzero(gt.reshape(len(gt), -1).any(axis=1))


def _peak(values: np.ndarray, where: np.ndarray) -> float:
    return float(values[where].max()) if where.any() else 0.0


def diagnose_case(prepared: PreparedCase, flow, predictor: torch.nn.Module, threshold: float,
                  config: GuidanceConfig | None = None, map_scale: str = "absolute", refine: str = "none",
                  min_component_voxels: int = 0, maps: Mapping[str, ArrayLike] | None = None) -> dict:
    """Measure the four steps on one scan with a nodule and name where it was lost.

    Args:
        prepared: the scan on the model grid (:func:`tfg_core.evaluate.prepare`).
        flow: the rectified-flow prior the rows were made with.
        predictor: the fold's slice classifier (eval mode).
        threshold: the fold's calibrated TFG threshold (the rows' ``threshold``).
        config: guidance parameters (None = defaults).
        map_scale: as in :func:`tfg_core.evaluate.evaluate_fold` (the threshold is on the scaled map).
        refine: as in :func:`tfg_core.evaluate.evaluate_fold` (only for the recomputed Dice).
        min_component_voxels: as in :func:`tfg_core.evaluate.evaluate_fold` (only for the recomputed Dice).
        maps: the scan's unscaled ``"tfg"`` and/or ``"no_prior"`` maps when already computed with ``config`` (e.g.
            a recorded trajectory's difference); the missing ones are computed.

    Returns:
        ``nodule_voxels``, ``nodule_slices``, ``positive_slices`` (whole scan), ``positive_slices_on_nodule``,
        ``max_p_on_nodule``, ``classifier_peak_mm`` (no-prior maximum to the nodule), ``change_on_nodule``,
        ``change_elsewhere``, ``threshold``, ``stage`` and ``dsc_again`` (the TFG Dice recomputed from these maps).
    """
    config = config if config is not None else GuidanceConfig()
    gt, lung = prepared.gt_grid.astype(bool), prepared.lung_grid.astype(bool)
    if not gt.any():
        raise ValueError(f"{prepared.uid}: no nodule on the model grid, nothing to diagnose")
    probs, nodule_slices = _slice_probabilities(prepared, predictor, config.slice_batch)
    positive = probs >= config.positive_threshold
    given = {name: np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value, dtype=np.float32)
             for name, value in (maps or {}).items() if name in ("tfg", "no_prior")}
    missing = tuple(m for m in ("tfg", "no_prior") if m not in given)
    maps = {**(difference_maps(prepared, flow, predictor, config, methods=missing) if missing else {}), **given}
    if maps["tfg"].shape != gt.shape:
        raise ValueError(f"{prepared.uid}: TFG map shape {maps['tfg'].shape} differs from the model grid's {gt.shape}")
    tfg = scale_map(maps["tfg"], lung, map_scale)
    spacing = [float(s) for s in prepared.grid.spacing]
    # the rows' peak_on_nodule reading of "on the nodule": within one (largest) voxel size of the ground truth
    distance_mm = ndimage.distance_transform_edt(~gt, sampling=spacing)
    near = distance_mm <= max(spacing)
    no_prior = np.where(lung, maps["no_prior"], 0.0)
    classifier_peak_mm = (float(distance_mm[np.unravel_index(int(no_prior.argmax()), no_prior.shape)])
                          if no_prior.max() > 0 else float("nan"))
    on_nodule, elsewhere = _peak(tfg, near), _peak(tfg, lung & ~near)
    mask = segment(tfg, threshold, lung, min_component_voxels, refine=refine, image=prepared.grid.array)
    dsc_again = score_on_scan(mask, prepared)["dsc"]
    n_on_nodule = int(positive[nodule_slices].sum())
    classifier_on = bool(classifier_peak_mm <= max(spacing))  # NaN (no push at all) compares False
    return {"nodule_voxels": int(gt.sum()), "nodule_slices": len(nodule_slices),
            "positive_slices": int(positive.sum()), "positive_slices_on_nodule": n_on_nodule,
            "max_p_on_nodule": float(probs[nodule_slices].max()), "classifier_peak_mm": classifier_peak_mm,
            "change_on_nodule": on_nodule, "change_elsewhere": elsewhere, "threshold": float(threshold),
            "stage": failure_stage(n_on_nodule, classifier_on, on_nodule, elsewhere, threshold),
            "dsc_again": float(dsc_again)}


def diagnose_rows(rows: pd.DataFrame, root: str | os.PathLike, manifest: pd.DataFrame, annotations: pd.DataFrame,
                  flow, load_predictor: Callable[[int], torch.nn.Module], config: GuidanceConfig | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """:func:`diagnose_case` for each TFG result row (calibrated threshold, a nodule in the scan).

    Args:
        rows: result rows of :func:`tfg_core.evaluate.evaluate_fold` / ``tfg demo``, already filtered to the scans
            to diagnose (e.g. ``rows[rows.dsc < 0.3]``); rows of other methods, Otsu rows and nodule-free scans are
            skipped.
        root: the cohort the rows were made on.
        manifest: its manifest.
        annotations: its annotations.
        flow: the prior the rows were made with.
        load_predictor: fold → the fold's predictor the rows were made with (e.g.
            :func:`tfg_core.experiment.load_fold_predictor`).
        config: the guidance parameters the rows were made with (None = defaults); checked against the rows'
            ``params_hash``.
        progress: a bar over the scans.

    Returns:
        One row per diagnosed scan, fold by fold: ``fold``, ``seriesuid``, ``dsc`` (as in the rows) and
        :func:`diagnose_case`'s columns.
    """
    config = config if config is not None else GuidanceConfig()
    todo = rows[(rows.method == "tfg") & (rows.threshold_mode == "calibrated") & (rows.gt_voxels > 0)]
    protocol = {}
    for row in todo.itertuples(index=False):  # every row checked before any scan is diagnosed
        refine = getattr(row, "refine", "none") or "none"
        map_scale = getattr(row, "map_scale", "absolute") or "absolute"
        calibrate_on = getattr(row, "calibrate_on", "all") or "all"
        expected = params_hash(evaluation_params(config, "calibrated", 0, refine, map_scale, None, calibrate_on))
        if row.params_hash != expected:
            raise ValueError(f"fold {row.fold} scan {row.seriesuid}: its row was made with other parameters "
                             f"(params_hash {row.params_hash}, these guidance parameters give {expected}); pass the "
                             "GuidanceConfig it was run with")
        protocol[row.fold, row.seriesuid] = (map_scale, refine)
    out = []
    for row, prepared, predictor in _scans_of(todo, root, manifest, annotations, load_predictor, progress,
                                              "diagnosing"):
        map_scale, refine = protocol[row.fold, row.seriesuid]
        found = diagnose_case(prepared, flow, predictor, float(row.threshold), config, map_scale, refine)
        out.append({"fold": int(row.fold), "seriesuid": row.seriesuid, "dsc": float(row.dsc), **found})
    return pd.DataFrame.from_records(out)


def _scans_of(rows: pd.DataFrame, root, manifest: pd.DataFrame, annotations: pd.DataFrame,
              load_predictor: Callable[[int], torch.nn.Module], progress: bool, desc: str):
    """Each row with its scan on the model grid and its fold's predictor, fold by fold (one predictor in memory,
    each loaded once even when the rows of a fold are not together, e.g. several result files concatenated)."""
    by_uid = manifest.set_index("seriesuid", drop=False)
    loaded_fold, predictor = None, None
    in_fold_order = rows.sort_values("fold", kind="stable")  # stable: a fold's rows keep their order
    for row in tqdm(list(in_fold_order.itertuples(index=False)), disable=not progress, desc=desc):
        if row.fold != loaded_fold:
            loaded_fold, predictor = row.fold, load_predictor(int(row.fold)).eval()
        yield row, prepare(load_case(root, by_uid.loc[row.seriesuid], annotations)), predictor


def slice_evidence(prepared: PreparedCase, predictor: torch.nn.Module, threshold: float = 0.5,
                   slice_batch: int = 16) -> dict:
    """What the slice classifier says about one scan before any guidance, nodule or not.

    Asks the question a fallback rule would depend on ("when no slice is positive, guide on the most probable one"):
    does the most probable slice lie on the nodule, and do healthy scans have a most probable slice as probable?

    Args:
        prepared: the scan on the model grid (:func:`tfg_core.evaluate.prepare`).
        predictor: the fold's slice classifier (eval mode).
        threshold: the guidance's positive threshold (``GuidanceConfig.positive_threshold``).
        slice_batch: stacks per classifier call.

    Returns:
        ``nodule_voxels`` (0: healthy), ``positive_slices``, ``max_p`` (the most probable slice's probability),
        ``top_slice``, ``top_slice_on_nodule`` (False on a healthy scan) and ``max_p_on_nodule`` (NaN on a healthy
        scan).
    """
    probs, nodule_slices = _slice_probabilities(prepared, predictor, slice_batch)
    top = int(probs.argmax())
    return {"nodule_voxels": int(prepared.gt_grid.astype(bool).sum()),
            "positive_slices": int((probs >= threshold).sum()),
            "max_p": float(probs[top]), "top_slice": top, "top_slice_on_nodule": bool(top in set(nodule_slices)),
            "max_p_on_nodule": float(probs[nodule_slices].max()) if len(nodule_slices) else float("nan")}


def slice_evidence_rows(rows: pd.DataFrame, root: str | os.PathLike, manifest: pd.DataFrame,
                        annotations: pd.DataFrame, load_predictor: Callable[[int], torch.nn.Module],
                        threshold: float = 0.5, progress: bool = True) -> pd.DataFrame:
    """:func:`slice_evidence` for every scan of TFG result rows (one row per fold and scan, healthy ones included).

    Args:
        rows: result rows of :func:`tfg_core.evaluate.evaluate_fold` / ``tfg demo``; only the TFG rows are read.
        root: the cohort the rows were made on.
        manifest: its manifest.
        annotations: its annotations.
        load_predictor: fold → the fold's predictor the rows were made with.
        threshold: the guidance's positive threshold.
        progress: a bar over the scans.

    Returns:
        One row per scan, fold by fold: ``fold``, ``seriesuid``, ``dsc`` (the row's TFG Dice; NaN on healthy scans)
        and :func:`slice_evidence`'s columns.
    """
    todo = rows[rows.method == "tfg"]
    if "threshold_mode" in todo:  # the calibrated row's Dice, not the Otsu one's
        todo = todo[todo.threshold_mode == "calibrated"]
    todo = todo.drop_duplicates(["fold", "seriesuid"])
    out = []
    for row, prepared, predictor in _scans_of(todo, root, manifest, annotations, load_predictor, progress,
                                              "slice evidence"):
        found = slice_evidence(prepared, predictor, threshold)
        out.append({"fold": int(row.fold), "seriesuid": row.seriesuid, "dsc": float(row.dsc), **found})
    return pd.DataFrame.from_records(out)


def detection_table(evidence: pd.DataFrame, rows: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Per nodule scan: did the classifier call a slice through the nodule positive, and each method's Dice.

    Step 1 of the module docstring decides the rest: on a scan where no slice through the nodule is positive, the
    guidance never pushes on the nodule. Joining :func:`slice_evidence_rows` with the result rows of every method
    shows how much of a method's mean Dice sits on the scans TFG can reach at all, and what TFG could reach if it did
    as well as a reference (the oracle) on those (:func:`detection_ceiling`).

    Args:
        evidence: :func:`slice_evidence_rows` output (``fold``, ``seriesuid``, ``nodule_voxels``,
            ``max_p_on_nodule``, …).
        rows: result rows of the same scans (``method``, ``fold``, ``seriesuid``, ``dsc``; calibrated rows are read
            when ``threshold_mode`` is present). A scan scored by a method in several rows keeps the last one.
        threshold: the guidance's positive threshold the evidence was read at.

    Returns:
        One row per nodule scan: ``fold``, ``seriesuid``, ``nodule_voxels``, ``max_p_on_nodule``, ``detected``
        (``max_p_on_nodule >= threshold``) and one Dice column per method found in ``rows``.
    """
    nodules = evidence[evidence.nodule_voxels > 0]
    if nodules.empty:
        raise ValueError("the slice evidence holds no scan with a nodule")
    scored = rows[rows.threshold_mode == "calibrated"] if "threshold_mode" in rows else rows
    dice = (scored.drop_duplicates(["method", "fold", "seriesuid"], keep="last")
            .pivot(index=["fold", "seriesuid"], columns="method", values="dsc"))
    dice.columns = [str(c) for c in dice.columns]
    table = nodules[["fold", "seriesuid", "nodule_voxels", "max_p_on_nodule"]].copy()
    table["detected"] = table.max_p_on_nodule >= threshold
    table = table.merge(dice.reset_index(), on=["fold", "seriesuid"], how="left")
    unscored = table[list(dice.columns)].isna().all(axis=1)
    if unscored.any():
        first = table[unscored].iloc[0]
        raise ValueError(f"{int(unscored.sum())} nodule scan(s) of the evidence have no result row, e.g. fold "
                         f"{first.fold} {first.seriesuid}: evidence and rows come from different runs or cohorts")
    return table


# dict.fromkeys: the signal's fields repeat seriesuid and nodule_voxels; keep each column once, in order
DETECTION_FACT_COLUMNS = tuple(dict.fromkeys(("cohort", "fold", "seriesuid", "nodule_voxels", "max_p_on_nodule",
                                              "detected", *NoduleSignal.__dataclass_fields__)))
"""Columns of a detection table that describe the scan (:func:`detection_table`, the cohort and
:class:`~tfg_core.data.phantom_signal.NoduleSignal`); every other column is a method's Dice."""


def detection_ceiling(table: pd.DataFrame, reference: str = "oracle") -> pd.DataFrame:
    """Each method's mean Dice on all nodule scans, on those the classifier detects and on the rest, and two bounds.

    Args:
        table: :func:`detection_table` output (several cohorts may be concatenated).
        reference: the method whose Dice on the detected scans (0 on the rest) bounds what TFG could reach with
            this classifier; the healthy-twin oracle is the ceiling of any method comparing two reconstructions.

    Returns:
        One row per method (``method``, ``n``, ``detected``, ``mean``, ``mean_detected``, ``mean_missed``), then
        the row ``ceiling: Dice 1 where detected`` (the share of detected scans) and, when ``reference`` was scored
        on every scan, ``ceiling: <reference> where detected``. ``n`` and ``detected`` count the scans the method
        was scored on (runs of several methods pooled may cover different scans).
    """
    methods = [c for c in table.columns if c not in DETECTION_FACT_COLUMNS]
    detected = table.detected.astype(bool)
    records = []
    for method in methods:
        scored = table[method].notna()
        d = table[method]
        records.append({"method": method, "n": int(scored.sum()), "detected": int((scored & detected).sum()),
                        "mean": float(d[scored].mean()), "mean_detected": float(d[scored & detected].mean()),
                        "mean_missed": float(d[scored & ~detected].mean())})
    records.append({"method": "ceiling: Dice 1 where detected", "n": len(table), "detected": int(detected.sum()),
                    "mean": float(detected.mean()), "mean_detected": 1.0, "mean_missed": 0.0})
    if reference in table and table[reference].notna().all():
        bound = table[reference].where(detected, 0.0)
        records.append({"method": f"ceiling: {reference} where detected", "n": len(table),
                        "detected": int(detected.sum()), "mean": float(bound.mean()),
                        "mean_detected": float(table[reference][detected].mean()), "mean_missed": 0.0})
    return pd.DataFrame.from_records(records)


def misses_by_kind(table: pd.DataFrame, small_voxels: int = 6) -> pd.DataFrame:
    """Detected and missed nodule scans by nodule kind and size, with how far their nodules stand above the noise.

    Tells whether the scans the classifier misses are lost in the noise (a low ``peak_snr``) or in the anatomy (as
    far above the noise as the detected ones, but of kinds that sit against the chest wall or look like a vessel).

    Args:
        table: :func:`detection_table` output joined with
            :func:`~tfg_core.data.phantom_signal.nodule_signal_rows` (``kind``, ``peak_snr``) on ``seriesuid``.
        small_voxels: a scan is "small" when all its nodules together have at most this many model-grid voxels.

    Returns:
        One row per (kind, size) present, then an ``all`` row per size: ``kind``, ``size``, ``n``, ``detected``,
        ``missed``, ``miss_rate`` and the median ``peak_snr`` of the detected and of the missed scans.
    """
    missing = {"kind", "peak_snr", "detected", "nodule_voxels"} - set(table.columns)
    if missing:
        raise ValueError(f"the detection table lacks {sorted(missing)}: join nodule_signal_rows to it first")
    sized = table.assign(size=np.where(table.nodule_voxels <= small_voxels, f"<= {small_voxels} voxels",
                                       f"> {small_voxels} voxels"), detected=table.detected.astype(bool))

    def summary(group: pd.DataFrame) -> dict:
        found = group.detected
        return {"n": len(group), "detected": int(found.sum()), "missed": int((~found).sum()),
                "miss_rate": float((~found).mean()), "peak_snr_detected": float(group.peak_snr[found].median()),
                "peak_snr_missed": float(group.peak_snr[~found].median())}

    records = [{"kind": kind, "size": size, **summary(group)}
               for (kind, size), group in sized.groupby(["kind", "size"], sort=True)]
    records += [{"kind": "all", "size": size, **summary(group)} for size, group in sized.groupby("size", sort=True)]
    return pd.DataFrame.from_records(records)


def add_slice_evidence_arguments(parser, results_nargs: str = "+") -> None:
    """Declare the arguments of the scripts that read ``tfg demo`` rows of a phantom cohort and ask its fold pairs.

    ``results`` (result CSVs), ``--root`` (the cohort's tree), ``--cohort-seed`` and ``--threshold`` (the guidance's
    positive threshold), as :func:`slice_evidence_of_runs` takes them.

    Args:
        parser: an ``argparse.ArgumentParser``.
        results_nargs: ``nargs`` of the positional result CSVs (``"*"`` when the script has another input mode).
    """
    from pathlib import Path

    parser.add_argument("results", nargs=results_nargs, type=Path,
                        help="all_folds_results.csv of tfg demo runs of one cohort")
    parser.add_argument("--root", type=Path, default=Path("outputs/phantom"), help="the phantom cohort's tree")
    parser.add_argument("--cohort-seed", type=int, default=0,
                        help="phantom cohort seed the rows were made on (tfg demo --cohort-seed; 0 = evaluation)")
    parser.add_argument("--threshold", type=float, default=0.5, help="the guidance's positive threshold")


def slice_evidence_of_runs(results, root: str | os.PathLike, cohort_seed: int = 0,
                           threshold: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The result rows of ``tfg demo`` runs on one phantom cohort and :func:`slice_evidence_rows` of their scans.

    Args:
        results: result CSV paths (concatenated in this order).
        root: the cohort's LUNA16-shaped tree.
        cohort_seed: the phantom seed the rows were made on.
        threshold: the guidance's positive threshold.
    """
    from tfg_core.experiment import load_fold_predictor, open_cohort

    rows = pd.concat([pd.read_csv(p) for p in results], ignore_index=True)
    cohort = open_cohort("phantom", root, phantom_seed=cohort_seed)
    evidence = slice_evidence_rows(rows, cohort.root, cohort.manifest, cohort.annotations, load_fold_predictor,
                                   threshold)
    return rows, evidence
