"""Fine-tune one fold end to end: manifest → fold split → weak slice labels → :func:`finetune`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from tqdm.auto import tqdm

from tfg_core.data.cases import load_case
from tfg_core.data.folds import fold_split
from tfg_core.data.luna16 import build_manifest, read_annotations, read_manifest
from tfg_core.flow.base import FlowModel
from tfg_core.io import sha256_file
from tfg_core.training.ensemble import finetune_ensemble
from tfg_core.training.finetune import config_for, finetune
from tfg_core.training.flow_views import clean_estimate_cases
from tfg_core.training.slice_data import SliceCase, slice_case_from

MANIFEST_NAME = "manifest.csv"


def ensure_manifest(root: str | os.PathLike, progress: bool = False) -> tuple[pd.DataFrame, Path]:
    """The tree's manifest, built once and cached as ``root/manifest.csv``.

    Args:
        root: LUNA16-shaped root.
        progress: progress bar while scanning headers.
    """
    path = Path(root) / MANIFEST_NAME
    if path.is_file():
        return read_manifest(path), path
    return build_manifest(root, out_csv=path, progress=progress), path


def load_slice_cases(root: str | os.PathLike, manifest: pd.DataFrame, uids: Sequence[str],
                     ground_truth: str = "auto", progress: bool = False) -> list[SliceCase]:
    """Read the given scans and turn them into model-grid volumes with weak slice labels.

    Args:
        root: LUNA16-shaped root.
        manifest: its manifest.
        uids: which scans.
        ground_truth: ``auto`` | ``sphere`` | ``mask`` | ``lidc`` (see :mod:`tfg_core.data.cases`).
        progress: progress bar.
    """
    annotations = read_annotations(Path(root) / "annotations.csv")
    rows = manifest.set_index("seriesuid", drop=False).loc[list(uids)]
    return [slice_case_from(load_case(root, row, annotations, ground_truth=ground_truth))
            for _, row in tqdm(rows.iterrows(), total=len(rows), disable=not progress, desc="load scans")]


def finetune_fold(root: str | os.PathLike, fold: int, backbone: str = "tiny", out: str | os.PathLike | None = None,
                  progress: bool = True, device: str = "cpu", ground_truth: str = "auto", members: int = 1,
                  flow: FlowModel | None = None, view_cache: dict[str, SliceCase] | None = None,
                  **config: Any) -> dict[str, Any]:
    """Fine-tune ``backbone`` with test = subset ``fold``, validation = the next subset, training = the rest.

    Args:
        root: LUNA16-shaped root (the phantom cohort or real LUNA16).
        fold: test subset 0–9 (never touched here).
        backbone: ``tiny`` | ``tinyvit`` | ``resnet50``.
        out: checkpoint path; default ``runs/finetune/<backbone>_fold<k>.pt``.
        progress: progress bars.
        device: ``cpu`` | ``cuda``.
        ground_truth: which masks define the slice labels.
        members: 1 = one predictor; more = that many fine-tunes (seeds ``seed``, ``seed + 1``, …) combined into
            one :class:`~tfg_core.predictors.ensemble.EnsemblePredictor`
            (:func:`~tfg_core.training.ensemble.finetune_ensemble`).
        flow: the prior whose clean estimates are added to the training scans when the config names
            ``clean_estimate_steps`` (default: the shipped demo flow, whose grid is the phantoms'; pass MAISI-v2 for
            real CT).
        view_cache: clean-estimate views computed for earlier folds of the same cohort and flow (filled here).
        config: any :class:`FinetuneConfig` field (iterations, batch_size, lr, …); None = the backbone's default
            (:data:`~tfg_core.training.finetune.TINY_DEFAULTS` for ``tiny``, the paper's otherwise).
    """
    if members < 1:
        raise ValueError(f"members must be >= 1 (1 = one predictor), got {members}")
    cfg = config_for(backbone, **config)  # first: a missing published backbone fails before any data is read
    manifest, manifest_path = ensure_manifest(root, progress=progress)
    split = fold_split(manifest, fold)
    train = load_slice_cases(root, manifest, split.train, ground_truth, progress)
    val = load_slice_cases(root, manifest, split.val, ground_truth, progress)
    if cfg.clean_estimate_steps:  # x̂ views of the training scans only: validation stays on inputs
        if flow is None:
            from tfg_core.flow.demo import load_demo_flow

            flow = load_demo_flow(device=device)
        train = train + clean_estimate_cases(train, flow, cfg.clean_estimate_steps, seed=cfg.seed, cache=view_cache,
                                             device=device, progress=progress)
    out = Path(out) if out is not None else Path("runs/finetune") / f"{backbone}_fold{fold}.pt"
    digest = sha256_file(manifest_path)
    if members > 1:
        result = finetune_ensemble(train, val, cfg, out, members=members, manifest_sha256=digest, device=device,
                                   progress=progress)
    else:
        result = finetune(train, val, cfg, out, manifest_sha256=digest, device=device, progress=progress)
    result.update(fold=fold, n_train=len(train), n_val=len(val))
    return result
