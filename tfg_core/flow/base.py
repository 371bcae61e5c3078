"""The small interface the guidance loop talks to; MAISI-v2 (GPU) and the CPU demo flow both implement it.

Tensors are channel-first with spatial axes in this project's order, ``(B, C, z, y, x)``; a model whose networks
expect another layout converts inside its own methods. Time follows ``tfg_core.flow.schedule`` (MONAI's
``RFlowScheduler``): ``t`` in [0, 1000], 0 = data, 1000 = noise, ``v = x0 - eps``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tfg_core.flow.slab import DecoderStages


class FlowModel(abc.ABC):
    """A latent rectified-flow model: an encoder/decoder pair, a velocity field and its sampling time grid."""

    #: length of the time axis that ``velocity`` and the grid are expressed in
    num_train_timesteps: int = 1000
    #: how ``GuidanceConfig(decoder="auto")`` back-propagates through this flow's decoder ("full" or "slab")
    default_decoder: str = "full"

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, C_img, z, y, x)`` in model intensity units -> latent at ``t = 0``.

        Deterministic (posterior mean), already multiplied by the model's latent scale factor.

        Args:
            x: image batch.
        """

    @abc.abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, C_lat, z', y', x')`` -> image (undoes the scale factor first). Differentiable.

        Args:
            z: latent batch (typically a clean estimate).
        """

    @abc.abstractmethod
    def velocity(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Predicted velocity ``v = x0 - eps`` at latent ``z`` and time ``t``; same shape as ``z``.

        Args:
            z: latent batch at time ``t``.
            t: time in [0, num_train_timesteps]: a scalar (0-dim tensor or float) or one value per batch item.
        """

    @abc.abstractmethod
    def timesteps(self, num_steps: int, latent_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Descending 1D float sampling grid (see ``tfg_core.flow.schedule.rflow_timesteps``).

        Args:
            num_steps: number of sampling steps.
            latent_shape: shape of the latent being sampled (its last three entries are spatial); models whose
                grid depends on the latent size (MAISI-v2) require it.
        """

    @abc.abstractmethod
    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Latent shape for an image shape: spatial ``(z, y, x)`` -> ``(C_lat, z', y', x')``;
        ``(B, C_img, z, y, x)`` -> ``(B, C_lat, z', y', x')``.

        Args:
            image_shape: the image's shape.
        """

    def decoder_stages(self) -> DecoderStages | None:
        """The decoder split into blocks for slab decoding (``tfg_core.flow.slab``); None when the flow cannot
        decode by slabs, and the guidance then back-propagates through a whole-volume ``decode``."""
        return None


def check_layout(a: torch.Tensor, channels: int, factor: int, what: str) -> None:
    """Raise unless ``a`` is ``(B, channels, z, y, x)`` with spatial sizes divisible by ``factor``.

    Args:
        a: image or latent batch.
        channels: expected channel count.
        factor: required divisor of each spatial size (the network's downsampling).
        what: name for the message (``"image"``, ``"latent"``).
    """
    if a.ndim != 5 or a.shape[1] != channels:
        raise ValueError(f"{what} must be (B, {channels}, z, y, x), got {tuple(a.shape)}")
    if any(s % factor for s in a.shape[2:]):
        raise ValueError(f"{what} spatial size {tuple(a.shape[2:])} must be divisible by {factor}")
