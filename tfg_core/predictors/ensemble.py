"""An ensemble of fine-tuned predictors that is itself a predictor: the members' feature maps side by side, one CAM.

Why: a predictor fine-tuned from the same backbone with another seed calls other faint slices positive, and the
guided segmentation follows those calls (two seeds of the demo's recipe moved TFG by more than the gap to its
target, ``docs/measurement_log.md``). Averaging the members' class activation maps keeps what they agree on.

The ensemble keeps the three names every consumer relies on (:mod:`tfg_core.predictors.heads`):

- ``feat`` sees the members' feature maps concatenated over channels, (B, Σ C_i, h, w);
- ``head.weight`` is the members' CAM weights concatenated and divided by their number, so
  ``head.cam(feat) = mean_i cam_i`` — the mean of the members' class activation maps;
- the logit is that mean CAM pooled the members' way plus the ensemble's own bias. For mean-pooling heads this is
  exactly the mean of the members' logits (up to the bias); for the tiny predictor's LSE head it is the LSE of the
  mean CAM. The bias is the ensemble's operating point, fitted like a single predictor's
  (:func:`tfg_core.training.ensemble.finetune_ensemble`), so "positive" means logit ≥ 0 as for any predictor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tfg_core.predictors.heads import CamHead, Predictor


class EnsembleCamHead(CamHead):
    """The mean of the member heads' CAMs, pooled like theirs, plus one bias.

    The member heads are read, not owned (their parameters live under ``members.*`` of the ensemble), so the
    state dict holds each weight once.

    Args:
        heads: the members' heads; same class and pooling (e.g. the same LSE sharpness).
        bias: the starting bias (default: the mean of the members' biases).
    """

    def __init__(self, heads: Sequence[CamHead], bias: float | None = None):
        super().__init__()
        if not heads:
            raise ValueError("an ensemble needs at least one member")
        kinds = {(type(h).__name__, getattr(h, "sharpness", None)) for h in heads}
        if len(kinds) > 1:
            raise ValueError(f"ensemble members must pool their CAMs the same way, got heads {sorted(map(str, kinds))}")
        self._heads = tuple(heads)  # a tuple, not a ModuleList: not registered twice
        start = float(torch.stack([h.bias.detach() for h in heads]).mean()) if bias is None else float(bias)
        self.offset = nn.Parameter(torch.tensor([start]))

    @property
    def member_heads(self) -> tuple[CamHead, ...]:
        """The members' heads, in member order."""
        return self._heads

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([h.weight for h in self._heads]) / len(self._heads)

    @property
    def bias(self) -> torch.Tensor:
        return self.offset[0]

    def pool_cam(self, cam: torch.Tensor) -> torch.Tensor:
        return self._heads[0].pool_cam(cam)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.pool_cam(self.cam(features)) + self.bias


class EnsemblePredictor(Predictor):
    """Predictors of one kind (same slices, input size, feature-map size and head) combined by their mean CAM.

    Each member normalises its own input, so the ensemble's ``normalize`` is the identity.

    Args:
        members: fine-tuned predictors, e.g. one backbone fine-tuned with several seeds.
        bias: the ensemble's logit bias (default: the mean of the members'); the fitted operating point is loaded
            with the state dict.
    """

    def __init__(self, members: Sequence[Predictor], bias: float | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        shapes = {(m.in_slices, m.input_size) for m in members}
        if len(shapes) > 1:
            raise ValueError(f"ensemble members must take the same stacks (in_slices, input_size), "
                             f"got {sorted(shapes)}")
        (in_slices, input_size), = shapes
        super().__init__(in_slices, input_size)
        self.members = nn.ModuleList(members)
        self.head = EnsembleCamHead([m.head for m in members], bias)

    def normalize(self, stacks: torch.Tensor) -> torch.Tensor:
        return stacks

    def features(self, x: torch.Tensor) -> torch.Tensor:
        maps = [m.features(m.normalize(x)) for m in self.members]
        if len({tuple(f.shape[2:]) for f in maps}) > 1:
            raise ValueError(f"ensemble members' feature maps differ in size: {[tuple(f.shape[1:]) for f in maps]}")
        return torch.cat(maps, dim=1)
