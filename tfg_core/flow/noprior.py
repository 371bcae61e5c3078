"""The no-prior ablation: the classifier's gradient steps applied to the image itself, velocity 0.

Same loop, same steps, same classifier and strength as TFG, but no generative model: encode and decode
are the identity and the velocity field is zero, so the "counterfactual" is just the input pushed along
the classifier's gradient. If TFG does not beat this, the flow prior is not doing the work.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tfg_core.flow.base import FlowModel
from tfg_core.flow.schedule import rflow_timesteps


class NoPriorFlow(FlowModel):
    """Identity "autoencoder" with a zero velocity field (image space is the latent space)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def velocity(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return torch.zeros_like(z)

    def timesteps(self, num_steps: int, latent_shape: Sequence[int] | None = None) -> torch.Tensor:
        return rflow_timesteps(num_steps)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(image_shape) if len(image_shape) != 3 else (1, *image_shape)
