"""Ablations of the guidance: one parameter at a time around the defaults, plus the no-prior ablation.

Each setting is a :class:`~tfg_core.guidance.GuidanceConfig` that differs from the base in one field (start index,
guided steps, strength, inner iterations, loss); the no-prior setting runs the base config with the velocity set
to 0 (the classifier's gradient applied to the image itself). Every setting is scored on the same fold with
every requested threshold mode, so the rows say what each choice is worth on its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from tfg_core.data.folds import FoldSplit
from tfg_core.guidance import GuidanceConfig
from tfg_core.segment import EVALUATION_REFINE

# What 04_ablations sweeps by default (its `sweep` parameter; a test keeps them equal): values around the defaults
DEFAULT_SWEEP: dict[str, list[Any]] = {
    "start_index": [15, 20, 24, 25],  # the paper's 15 (MAISI-v2), the demo's 24; 25: the last with 5 guided steps
    "guided_steps": [1, 3, 5, 6],  # 6: every step left after the demo's start (24 of 30)
    "strength": [0.25, 0.5, 1.0, 2.0, 4.0],
    "inner_iterations": [1, 2, 4],
    "loss": ["logit", "bce"],
    "density_change": ["any", "decrease"],
    "gradient_weight": ["none", "cam"],
}


@dataclass(frozen=True)
class AblationSetting:
    """One point of the sweep.

    Args:
        parameter: the varied field (``"default"`` for the base, ``"no_prior"`` for the velocity-0 ablation).
        value: its value in this setting.
        config: the full guidance config.
        method: ``"tfg"`` or ``"no_prior"``.
    """

    parameter: str
    value: Any
    config: GuidanceConfig
    method: str = "tfg"


def one_at_a_time(base: GuidanceConfig, sweep: Mapping[str, Sequence[Any]] | None = None, no_prior: bool = True
                  ) -> list[AblationSetting]:
    """The base setting, each swept value that differs from the base (one field changed), and the no-prior run.

    Args:
        base: the guidance defaults the sweep is centred on.
        sweep: field name -> values (default :data:`DEFAULT_SWEEP`).
        no_prior: add the velocity-0 ablation (base config).

    Raises:
        ValueError: an unknown field, or a value the config rejects (e.g. more guided steps than remain).
    """
    sweep = DEFAULT_SWEEP if sweep is None else sweep
    fields = set(GuidanceConfig.__dataclass_fields__)
    unknown = sorted(set(sweep) - fields)
    if unknown:
        raise ValueError(f"unknown guidance parameters {unknown}; sweepable: {sorted(fields)}")
    settings = [AblationSetting("default", "", base)]
    for name, values in sweep.items():
        for value in values:
            if value == getattr(base, name):
                continue
            try:
                settings.append(AblationSetting(name, value, replace(base, **{name: value})))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"ablation {name}={value!r}: {exc}") from None
    if no_prior:
        settings.append(AblationSetting("no_prior", "velocity 0", base, method="no_prior"))
    return settings


def subsample_split(split: FoldSplit, annotations: pd.DataFrame, max_val: int = 0, max_test: int = 0) -> FoldSplit:
    """A smaller split for quick runs: at most ``max_val``/``max_test`` scans (0 = all), scans with nodules first.

    Args:
        split: the fold's split.
        annotations: the nodule table (which scans have nodules).
        max_val: validation scans kept.
        max_test: test scans kept.
    """
    with_nodule = set(annotations.seriesuid)

    def pick(uids: list[str], n: int) -> list[str]:
        ordered = [u for u in uids if u in with_nodule] + [u for u in uids if u not in with_nodule]
        return ordered[:n] if n else list(uids)

    return replace(split, val=pick(split.val, max_val), test=pick(split.test, max_test))


def run_ablation(root: str | os.PathLike, manifest: pd.DataFrame, annotations: pd.DataFrame, split: FoldSplit,
                 flow, predictor, settings: Sequence[AblationSetting],
                 threshold_modes: Sequence[str] = ("calibrated", "otsu"), backbone: str = "tiny",
                 experiment: str = "ablation", progress: bool = False, calibrate_on: str = "nodules",
                 refine: str = EVALUATION_REFINE) -> pd.DataFrame:
    """Score every setting on one fold; tidy rows with ``parameter``, ``value`` and ``threshold_mode`` columns.

    Args:
        root: LUNA16-shaped root.
        manifest: its manifest.
        annotations: its annotation table.
        split: the fold (possibly :func:`subsample_split`).
        flow: the rectified-flow prior.
        predictor: the fold's slice classifier (eval mode).
        settings: from :func:`one_at_a_time`.
        threshold_modes: ``"calibrated"`` and/or ``"otsu"``; each map is scored with each.
        backbone: predictor name for the rows.
        experiment: experiment name for the rows.
        progress: one bar over the settings.
        calibrate_on: validation scans the calibrated thresholds are set on
            (:data:`tfg_core.segment.CALIBRATION_SCANS`: those with a nodule, or all).
        refine: post-processing of every mask (:data:`tfg_core.segment.REFINEMENTS`; default the evaluation's).
    """
    from tfg_core.evaluate import evaluate_fold

    frames = []
    for setting in tqdm(settings, disable=not progress, desc=f"fold {split.fold} ablations"):
        rows, _ = evaluate_fold(root, manifest, annotations, split, flow, predictor, setting.config,
                                methods=[setting.method], threshold_mode=threshold_modes, backbone=backbone,
                                experiment=experiment, calibrate_on=calibrate_on, refine=refine)
        frames.append(rows.assign(parameter=setting.parameter, value=str(setting.value)))
    return pd.concat(frames, ignore_index=True)


def ablation_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std Dice, median MSD and empty predictions per (parameter, value, threshold mode), scans with a nodule.

    Args:
        rows: from :func:`run_ablation` (any number of folds).
    """
    scored = rows[rows.gt_voxels > 0]
    keys = ["parameter", "value", "threshold_mode"]
    table = scored.groupby(keys, sort=False).agg(
        n=("dsc", "size"), dsc_mean=("dsc", "mean"), dsc_std=("dsc", "std"),
        msd_median_mm=("msd_mm", "median"), empty=("empty_pred", "sum"),
        peak_on_nodule=("peak_on_nodule", "mean")).reset_index()
    return table.round({"dsc_mean": 3, "dsc_std": 3, "msd_median_mm": 2, "peak_on_nodule": 2})


def sweep_values(rows: pd.DataFrame, parameter: str) -> list[str]:
    """The values of ``parameter`` in the rows, with the default's value put in its place, in sweep order.

    Args:
        rows: ablation rows.
        parameter: a swept field.
    """
    values = list(dict.fromkeys(rows.loc[rows.parameter == parameter, "value"]))
    try:
        return sorted(values, key=float)
    except ValueError:
        return values
