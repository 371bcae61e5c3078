"""Integrated Gradients (Sundararajan et al., ICML 2017) with captum, as a centre-slice map.

The baseline image is the window minimum (0 in MAISI's [0, 1] convention, i.e. −1000 HU: air), the path is the
straight line to the input, and the attributions of the 9 input slices are summed, because all of them speak
for the centre slice's label. Only positive attributions are kept (evidence for "nodule").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tfg_core.predictors.heads import Predictor

BASELINE_VALUE = 0.0  # window minimum: −1000 HU after the [−1000, 1000] → [0, 1] window


def ig_maps(predictor: Predictor, stacks: torch.Tensor, centres: Sequence[int] | None = None, n_steps: int = 50,
            internal_batch_size: int = 64) -> torch.Tensor:
    """Integrated Gradients of the logit, summed over the stack's slices, positive part, (B, H, W).

    Args:
        predictor: slice classifier in eval mode.
        stacks: (B, in_slices, H, W) in [0, 1].
        centres: unused (the slicewise interface passes it).
        n_steps: Riemann steps along the path (captum's default 50; cost grows linearly).
        internal_batch_size: path points per forward/backward pass (bounds memory).
    """
    from captum.attr import IntegratedGradients

    attributions = IntegratedGradients(predictor).attribute(
        stacks, baselines=torch.full_like(stacks, BASELINE_VALUE), n_steps=n_steps,
        internal_batch_size=internal_batch_size, method="gausslegendre")
    return attributions.sum(dim=1).clamp_min(0).detach()
