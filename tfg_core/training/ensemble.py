"""Fine-tune several predictors of one recipe (seeds s, s+1, …) and combine them into one :class:`EnsemblePredictor`.

Why: on the phantom folds two seeds of the tiny recipe call different faint slices positive, and the guided
segmentation follows those calls; the mean of their class activation maps keeps what they agree on
(``docs/measurement_log.md``). The ensemble gets its own operating point, placed like a single predictor's where
F1 on the fold's validation slices is largest, so "positive" (logit ≥ 0) means the same thing for both.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from tfg_core.predictors.ensemble import EnsemblePredictor
from tfg_core.training.calibration import f1_optimal_shift
from tfg_core.training.checkpoint import load_predictor, save_predictor
from tfg_core.training.finetune import FinetuneConfig, _jsonable, finetune, metrics_from_logits, predict_bank
from tfg_core.training.slice_data import SliceBank, SliceCase


@torch.no_grad()
def combine_predictors(members: Sequence[torch.nn.Module], val_cases: Sequence[SliceCase],
                       device: str | torch.device = "cpu") -> tuple[EnsemblePredictor, dict[str, float]]:
    """The mean-CAM ensemble of ``members`` with its operating point placed where validation F1 is largest.

    Args:
        members: fine-tuned predictors of one backbone.
        val_cases: the fold's validation scans.
        device: where the members live.

    Returns:
        the ensemble (eval mode) and its validation metrics at that operating point (F1 is optimistic: it was
        chosen there), with the applied ``logit_shift``.
    """
    ensemble = EnsemblePredictor(list(members)).to(device).eval()
    bank = SliceBank(val_cases, size=int(ensemble.input_size), n_slices=ensemble.in_slices)
    labels = np.concatenate([c.labels for c in val_cases])
    logits = predict_bank(ensemble, bank, device=device, logits=True)
    shift = f1_optimal_shift(logits, labels)
    ensemble.head.offset.add_(shift)
    return ensemble, {**metrics_from_logits(logits + shift, labels), "logit_shift": shift}


def finetune_ensemble(
    train_cases: Sequence[SliceCase],
    val_cases: Sequence[SliceCase],
    config: FinetuneConfig,
    out_path: str | os.PathLike,
    members: int = 2,
    manifest_sha256: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``members`` predictors with seeds ``config.seed + i`` and write their ensemble to ``out_path``.

    Each member is :func:`~tfg_core.training.finetune.finetune` with the same configuration but its seed (its best
    validation checkpoint, at its own operating point); the members go to a scratch folder beside ``out_path``
    and only the ensemble checkpoint (all members' weights, written atomically) is kept.

    Args:
        train_cases: training scans (weak slice labels only).
        val_cases: the fold's validation scans.
        config: each member's training parameters; ``config.seed`` is the first member's seed.
        out_path: ensemble checkpoint destination.
        members: how many fine-tunes (≥ 2; one is :func:`~tfg_core.training.finetune.finetune` itself).
        manifest_sha256: data manifest hash recorded in the checkpoint.
        device: ``"cpu"`` or ``"cuda"``.
        progress: a tqdm bar per member.
    """
    if members < 2:
        raise ValueError(f"an ensemble needs members >= 2, got {members} (use finetune for one predictor)")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = [config.seed + i for i in range(members)]
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.stem}-members-") as scratch:
        runs = [finetune(train_cases, val_cases, replace(config, seed=seed), Path(scratch) / f"member{seed}.pt",
                         manifest_sha256=manifest_sha256, device=device, progress=progress) for seed in seeds]
        models = [load_predictor(run["checkpoint"], device=device)[0] for run in runs]
    ensemble, metrics = combine_predictors(models, val_cases, device=device)
    best = {**metrics, "iteration": [run["best"]["iteration"] for run in runs],
            "members": [{k: run["best"][k] for k in ("iteration", "f1", "auc")} for run in runs]}
    record = _jsonable({**asdict(config), "members": members, "seeds": seeds})
    save_predictor(out_path, ensemble, config.backbone, record, best, manifest_sha256)
    seconds = time.perf_counter() - started
    return {"best": best, "history": [run["history"] for run in runs], "checkpoint": str(out_path),
            "seconds": seconds, "iterations_per_second": members * config.iterations / seconds}
