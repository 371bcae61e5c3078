"""Rectified-flow time grid, Euler steps and inversion, in MONAI's ``RFlowScheduler`` convention.

Convention (same as ``monai.networks.schedulers.RFlowScheduler``):

- ``t`` runs over [0, 1000]; ``t = 0`` is data, ``t = 1000`` is noise (the paper's ``tau = 1 - t/1000``).
- Noising is ``z_t = (1 - t/1000) * x0 + (t/1000) * eps`` (``RFlowScheduler.add_noise``) and the network predicts
  the velocity ``v = x0 - eps`` (MAISI trains on ``images - noise``), so ``z_t + v * t/1000 = x0`` on the path.
- A sampling step from ``t_from`` to a smaller ``t_to`` is ``z + v * (t_from - t_to)/1000`` (``RFlowScheduler.step``).

The grid (``rflow_timesteps``) is MONAI's ``set_timesteps`` grid: ``num_steps`` values running *down* from 1000
towards 0, not including 0; the sampler's last step goes from ``grid[-1]`` to 0. Step ``i`` of sampling goes from
``grid[i]`` to ``grid[i + 1]`` (0 after the last). A start index ``s`` counts steps along that sampling grid:
inversion brings data to ``t = grid[s]`` and sampling then runs the last ``num_steps - s`` steps (default 15 of 30).

Two deliberate differences from MONAI (documented because MAISI's own sampler inherits them):

- ``RFlowScheduler.set_timesteps`` casts the grid to ``float16`` (and to int64 with discrete timesteps); we keep the
  float values computed before that cast (MONAI's grid equals ours cast to ``float16``).
- ``RFlowScheduler.step`` truncates ``next_timestep`` with ``int()``, so its step sizes do not telescope (on a
  64x64x32 latent with 30 steps the sampler integrates about 1.0098 instead of 1.0 of the path). We use the float
  values on both sides, which is what makes ``invert`` and ``sample`` exact mirrors of each other.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from monai.networks.schedulers.rectified_flow import timestep_transform
from tqdm.auto import tqdm

NUM_TRAIN_TIMESTEPS = 1000

# MAISI-v2 CT ("rflow-ct") scheduler, `noise_scheduler` of NVIDIA-Medtech/NV-Generate-CTMR
# configs/config_network_rflow.json (also tfg_core/flow/configs/maisi_v2_config_network_rflow.json). The config sets no
# base_img_size_numel, so MONAI's default 32**3 applies; its "scale": 1.4 is the logit-normal training parameter,
# unused with sample_method="uniform", and MONAI 1.6's set_timesteps does not pass transform_scale to the transform.
MAISI_V2_SCHEDULER = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "use_discrete_timesteps": False,
    "use_timestep_transform": True,
    "sample_method": "uniform",
    "scale": 1.4,
}
BASE_IMG_SIZE_NUMEL = 32 * 32 * 32

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rflow_timesteps(
    num_steps: int = 30,
    latent_numel: int | None = None,
    *,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    use_timestep_transform: bool = True,
    base_img_size_numel: int = BASE_IMG_SIZE_NUMEL,
    spatial_dim: int = 3,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The sampling grid of ``RFlowScheduler.set_timesteps(num_steps, input_img_size_numel=latent_numel)``, as floats.

    Values run from ``num_train_timesteps`` down towards 0 (0 itself is not included). The resolution-dependent
    transform (``monai...rectified_flow.timestep_transform``) moves steps towards the noisy end for latents larger than
    ``base_img_size_numel``.

    Args:
        num_steps: number of sampling steps (MAISI-v2 uses 30).
        latent_numel: number of spatial latent voxels (e.g. 64*64*32); None gives the untransformed uniform grid.
        num_train_timesteps: length of the training time axis (1000 for MAISI-v2).
        use_timestep_transform: apply MONAI's resolution-dependent transform (True for MAISI-v2).
        base_img_size_numel: reference latent size of the transform (MONAI's default, unchanged by MAISI-v2).
        spatial_dim: number of spatial dimensions.
        dtype: dtype of the returned grid; values are computed in float64 first.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    # Same list as set_timesteps builds, before its float16 cast.
    grid = [(1.0 - i / num_steps) * num_train_timesteps for i in range(num_steps)]
    if use_timestep_transform and latent_numel is not None:
        grid = [
            timestep_transform(
                t,
                input_img_size_numel=int(latent_numel),
                base_img_size_numel=base_img_size_numel,
                num_train_timesteps=num_train_timesteps,
                spatial_dim=spatial_dim,
            )
            for t in grid
        ]
    return torch.tensor(grid, dtype=torch.float64).to(dtype)


def next_timesteps(grid: torch.Tensor) -> torch.Tensor:
    """Where each sampling step of ``grid`` ends: ``grid[1:]`` followed by 0 (as MAISI's sampler builds it).

    Args:
        grid: descending 1D grid from ``rflow_timesteps``.
    """
    return torch.cat((grid[1:], grid.new_zeros(1)))


def sampling_steps(grid: torch.Tensor, start_index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(t_from, t_to)`` of the sampling steps run from ``start_index``, in sampling order (noise towards data).

    Args:
        grid: descending 1D grid from ``rflow_timesteps``.
        start_index: first sampling step to run; 0 runs all steps, ``len(grid)`` none.
    """
    if not 0 <= start_index <= len(grid):
        raise ValueError(f"start_index must be in [0, {len(grid)}], got {start_index}")
    ends = next_timesteps(grid)
    return [(grid[i], ends[i]) for i in range(start_index, len(grid))]


def _as_time(t: torch.Tensor | float, ref: torch.Tensor) -> torch.Tensor:
    """``t`` on ``ref``'s device and dtype, shaped to broadcast against it (a scalar or one value per batch item)."""
    t = torch.as_tensor(t, device=ref.device, dtype=ref.dtype)
    if t.ndim == 1 and ref.ndim > 1:  # (B,) -> (B, 1, 1, ...)
        t = t.reshape(-1, *([1] * (ref.ndim - 1)))
    return t


def clean_estimate(
    z: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """One-step estimate of the data point: ``x0_hat = z + v * t / 1000`` (``RFlowScheduler.step``'s second output).

    Args:
        z: latent at time ``t``.
        v: velocity predicted at ``(z, t)``.
        t: time in [0, num_train_timesteps]; a scalar or one value per batch item.
        num_train_timesteps: length of the time axis.
    """
    return z + v * (_as_time(t, z) / num_train_timesteps)


def euler_step(
    z: torch.Tensor,
    v: torch.Tensor,
    t_from: torch.Tensor | float,
    t_to: torch.Tensor | float,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """Euler step ``z + v * (t_from - t_to) / 1000``; denoising when ``t_to < t_from``, noising when ``t_to > t_from``.

    Args:
        z: latent at ``t_from``.
        v: velocity to move along.
        t_from: current time.
        t_to: target time.
        num_train_timesteps: length of the time axis.
    """
    return z + v * ((_as_time(t_from, z) - _as_time(t_to, z)) / num_train_timesteps)


def invert(
    velocity_fn: VelocityFn,
    z0: torch.Tensor,
    grid: torch.Tensor,
    start_index: int,
    progress: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Bring a data latent (``t = 0``) to ``t = grid[start_index]`` by running the sampling steps backwards.

    Each sampling step ``i`` (``grid[i] -> end_i``) is undone by ``z <- z - v(z, grid[i]) * (grid[i] - end_i)/1000``,
    last step first: the velocity is taken at the time the sampler will use for that step (and, since the sampler's
    input is not known yet, at the current latent). Hence inversion followed by ``sample`` returns the input exactly
    (to float rounding) whenever ``v`` does not depend on ``z``, and to first order in the step size otherwise.

    Args:
        velocity_fn: ``v = velocity_fn(z, t)`` with ``t`` a 0-dim tensor from ``grid``.
        z0: data latent at ``t = 0``.
        grid: descending sampling grid from ``rflow_timesteps``.
        start_index: sampling step at which the later sampling starts; 0 inverts all the way to ``grid[0]``.
        progress: show a tqdm bar.

    Yields:
        ``(t, z)`` after every step, ending with ``(grid[start_index], z_start)``.
    """
    steps = sampling_steps(grid, start_index)[::-1]
    z = z0
    for t_sampler, t_end in tqdm(steps, desc="invert", disable=not progress):
        v = velocity_fn(z, t_sampler)
        z = euler_step(z, v, t_end, t_sampler)  # from t_end up to t_sampler
        yield t_sampler, z


def sample(
    velocity_fn: VelocityFn,
    z: torch.Tensor,
    grid: torch.Tensor,
    start_index: int,
    progress: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Plain Euler sampling from ``t = grid[start_index]`` to ``t = 0`` along ``grid`` (the mirror of ``invert``).

    Args:
        velocity_fn: ``v = velocity_fn(z, t)`` with ``t`` a 0-dim tensor from ``grid``.
        z: latent at ``t = grid[start_index]`` (pure noise when ``start_index == 0``).
        grid: descending sampling grid from ``rflow_timesteps``.
        start_index: first sampling step to run.
        progress: show a tqdm bar.

    Yields:
        ``(t, z)`` after every step, ending with ``(0, x0_latent)``.
    """
    for t_from, t_to in tqdm(sampling_steps(grid, start_index), desc="sample", disable=not progress):
        z = euler_step(z, velocity_fn(z, t_from), t_from, t_to)
        yield t_to, z


def run_to_end(steps: Iterator[tuple[torch.Tensor, torch.Tensor]], z: torch.Tensor | None = None) -> torch.Tensor:
    """Exhaust an ``invert``/``sample`` generator and return its last latent (``z`` if it yields nothing).

    Args:
        steps: the generator.
        z: value to return when the generator runs no step (e.g. ``start_index == len(grid)``).
    """
    for _, z in steps:
        pass
    if z is None:
        raise ValueError("the generator ran no step and no fallback latent was given")
    return z
