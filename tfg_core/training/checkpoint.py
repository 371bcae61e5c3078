"""Fine-tuned predictor checkpoints: weights + the config that built them + validation metrics + data hash."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tfg_core.checkpoints import load_checkpoint, load_state_dict_strict
from tfg_core.errors import CheckpointError
from tfg_core.io import atomic_write_with
from tfg_core.predictors.ensemble import EnsemblePredictor

FORMAT = "tfg-predictor-v1"


def save_predictor(path: str | os.PathLike, model: torch.nn.Module, backbone: str, config: dict[str, Any],
                   metrics: dict[str, Any], manifest_sha256: str | None) -> Path:
    """Write a predictor checkpoint atomically (a killed run never leaves half a file).

    Args:
        path: destination ``.pt``.
        model: the trained predictor.
        backbone: registry name used to rebuild it (``tiny`` | ``tinyvit`` | ``resnet50``); for an
            :class:`~tfg_core.predictors.ensemble.EnsemblePredictor`, its members' backbone.
        config: JSON-able training configuration.
        metrics: validation metrics of this checkpoint.
        manifest_sha256: hash of the data manifest the model was trained on.
    """
    payload = {
        "format": FORMAT,
        "backbone": backbone,
        "in_slices": int(getattr(model, "in_slices", 9)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config,
        "metrics": metrics,
        "manifest_sha256": manifest_sha256,
    }
    if isinstance(model, EnsemblePredictor):
        payload["members"] = len(model.members)
    return atomic_write_with(path, lambda tmp: torch.save(payload, tmp))


def load_predictor(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a fine-tuned predictor from its checkpoint (``weights_only=True``, strict keys).

    Args:
        path: checkpoint written by :func:`save_predictor`.
        device: where to put the model.
    """
    from tfg_core.predictors import build_predictor

    payload = load_checkpoint(path, map_location="cpu")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tfg predictor checkpoint (expected format {FORMAT!r})")
    members = payload.get("members")
    if members:  # an ensemble of fine-tunes of one backbone: rebuilt empty, then filled by the strict load
        model = EnsemblePredictor([build_predictor(payload["backbone"], in_slices=payload["in_slices"])
                                   for _ in range(int(members))])
    else:
        model = build_predictor(payload["backbone"], in_slices=payload["in_slices"])
    load_state_dict_strict(model, payload["state_dict"], source=path)
    return model.to(device).eval(), payload
