"""An analytic ``FlowModel`` for tests: identity autoencoder, exact velocity of a Gaussian "healthy" distribution.

The data distribution is independent per voxel, ``x0 ~ N(h, sigma^2)`` around a healthy image ``h``. Under the
rectified-flow path ``z_t = a x0 + r eps`` (``r = t/1000``, ``a = 1 - r``) the optimal velocity
``E[x0 - eps | z_t]`` is linear in ``z_t`` and known in closed form (Gaussian conditioning):

    v(z, t) = m + (a q - r) / (a^2 q + r^2) * (z - a m),   m = s h,  q = (s sigma)^2

in latent units (``s`` = ``scale_factor``), and the clean estimate ``z + v r`` is ``E[x0 | z_t]``, which pulls
deviations from ``h`` towards it by the factor ``a q / (a^2 q + r^2)``. So the model "knows" what healthy looks
like, runs in microseconds, and its Jacobians are known for checking gradients.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tfg_core.flow.base import FlowModel
from tfg_core.flow.schedule import rflow_timesteps


class GaussianToyFlow(FlowModel):
    """Identity encoder/decoder (times ``scale_factor``) and the exact velocity towards ``N(healthy, sigma^2)``.

    Latents are ``(B, 1, z, y, x)``: the image itself, scaled. The time grid is the untransformed uniform grid.

    Args:
        healthy: the healthy mean image ``h``, ``(z, y, x)``, model intensities.
        sigma: per-voxel standard deviation of the healthy distribution (image units); small values make the clean
            estimate snap to ``h`` early in sampling, large values keep it close to ``z``.
        scale_factor: latent scale factor (as MAISI multiplies its posterior mean), to exercise the bookkeeping.
    """

    def __init__(self, healthy: torch.Tensor, sigma: float = 0.5, scale_factor: float = 1.0):
        if healthy.ndim != 3:
            raise ValueError(f"healthy must be a (z, y, x) image, got shape {tuple(healthy.shape)}")
        if sigma <= 0 or scale_factor <= 0:
            raise ValueError(f"sigma and scale_factor must be positive, got {sigma}, {scale_factor}")
        self.healthy = healthy.float()
        self.sigma = float(sigma)
        self.scale_factor = float(scale_factor)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale_factor

    def coefficient(self, t: torch.Tensor | float) -> torch.Tensor:
        """``(a q - r) / (a^2 q + r^2)``: the slope ``dv/dz`` at time ``t`` (a scalar tensor).

        Args:
            t: time in [0, 1000], a scalar.
        """
        r = torch.as_tensor(t, dtype=torch.float64) / self.num_train_timesteps
        a, q = 1.0 - r, (self.scale_factor * self.sigma) ** 2
        return (a * q - r) / (a * a * q + r * r)

    def velocity(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        if torch.as_tensor(t).ndim != 0:
            raise ValueError("GaussianToyFlow.velocity takes one time for the whole batch")
        r = float(torch.as_tensor(t, dtype=torch.float64)) / self.num_train_timesteps
        m = (self.scale_factor * self.healthy).to(z.device, z.dtype)
        return m + self.coefficient(t).to(z.dtype).item() * (z - (1.0 - r) * m)

    def timesteps(self, num_steps: int, latent_shape: Sequence[int] | None = None) -> torch.Tensor:
        return rflow_timesteps(num_steps, None, num_train_timesteps=self.num_train_timesteps)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in image_shape)
        if len(shape) == 3:
            return (1, *shape)
        if len(shape) == 5 and shape[1] == 1:
            return shape
        raise ValueError(f"image shape must be (z, y, x) or (B, 1, z, y, x), got {shape}")
