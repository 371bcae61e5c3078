"""Training the demo flow (``tfg_core.flow.demo``): phantom data, autoencoder, then latent rectified flow.

Three phases, each resumable from atomic checkpoints in a work directory (a killed run continues where it was):

1. data: ``n_cases`` phantoms of cohort ``seed`` through ``to_model_grid`` (LPS, [0, 1]); cached as float16.
   The seed must differ from the evaluation cohort's (0): the demo prior must not have seen any evaluation scan.
   Cases with and without nodules are both kept: the prior models the cohort; guidance is what removes nodules.
2. autoencoder: MONAI ``AutoencoderKL`` on whole volumes, L1 on the reconstruction of a posterior sample + a small
   KL weight (as MAISI/latent diffusion), the L1 weighted up where the image has fine detail (``detail_weights``).
   Then ``scale_factor = 1 / std`` of the training posterior means.
3. flow: MONAI ``DiffusionModelUNet`` on whole-volume latents with ``RFlowScheduler``'s convention
   (``x_t = (1 - t/1000) x0 + (t/1000) eps``, ``t`` uniform in [0, 1000], target ``v = x0 - eps``), AdamW with cosine
   decay, and an EMA of the weights (``torch.optim.swa_utils.AveragedModel``) that is what gets shipped.

``describe_phantom`` measures how phantom-like an image is (body outline, two lungs, lung fraction); the tests and
the training report use it on samples from noise.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import RFlowScheduler
from scipy import ndimage
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from tfg_core.checkpoints import load_checkpoint
from tfg_core.data.phantom import PhantomConfig, generate_case
from tfg_core.data.preprocess import to_model_grid, unit_to_hu
from tfg_core.flow.demo import (
    IMAGE_SHAPE, SCHEDULE, DemoFlow, build_demo_autoencoder, build_demo_unet, demo_flow_payload,
)
from tfg_core.flow.schedule import run_to_end, sample
from tfg_core.io import atomic_write_with

EVAL_SEED = 0  # the evaluation cohort; never trained on


@dataclass(frozen=True)
class DemoTrainConfig:
    """Everything that determines the shipped weights (with the code and the torch build).

    Args:
        seed: cohort seed of the training phantoms (must not be the evaluation seed 0).
        n_cases: number of training phantoms.
        ae_steps: autoencoder optimiser steps.
        ae_batch: volumes per autoencoder step.
        ae_lr: autoencoder peak learning rate (cosine decay to 10 %).
        ae_detail_weight: lambda of the detail-weighted L1 (:func:`detail_weights`); 0 = plain L1.
        kl_weight: weight of the KL term (tiny: with 1e-6 the posterior std stayed ~0.8 against a mean std of 0.6,
            the decoder learnt to ignore detail and held-out MAE was 73 HU).
        flow_steps: velocity-UNet optimiser steps.
        flow_batch: latents per flow step.
        flow_lr: UNet peak learning rate (cosine decay to 10 %).
        ema_decay: EMA decay of the UNet weights used for sampling.
        torch_seed: seed of initialisation, batches, noise and times.
        checkpoint_every: steps between resumable checkpoints.
    """

    seed: int = 1
    n_cases: int = 500
    ae_steps: int = 1200
    ae_batch: int = 4
    ae_lr: float = 2e-3
    ae_detail_weight: float = 10.0
    kl_weight: float = 1e-8
    flow_steps: int = 1500
    flow_batch: int = 16
    flow_lr: float = 1e-3
    ema_decay: float = 0.99
    torch_seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.seed == EVAL_SEED:
            raise ValueError(f"seed {EVAL_SEED} is the evaluation cohort; train the demo flow on another seed")


# ------------------------------------------------------------------------------------------------ data
def phantom_training_images(config: DemoTrainConfig, cache: str | os.PathLike | None = None,
                            progress: bool = False) -> torch.Tensor:
    """The training phantoms as ``(N, 1, z, y, x)`` float32 in [0, 1] on the model grid (cached as float16).

    Args:
        config: training config (``seed``, ``n_cases``).
        cache: file to read/write the stacked images; None = no cache.
        progress: show a tqdm bar.
    """
    if cache is not None and Path(cache).is_file():
        return load_checkpoint(cache).float()
    phantoms = PhantomConfig(seed=config.seed, n_cases=config.n_cases)
    images = torch.empty((config.n_cases, 1, *IMAGE_SHAPE), dtype=torch.float16)
    for i in tqdm(range(config.n_cases), desc="phantoms", disable=not progress):
        images[i, 0] = torch.from_numpy(to_model_grid(generate_case(i, phantoms).volume, shape=IMAGE_SHAPE).array)
    if cache is not None:
        atomic_write_with(cache, lambda tmp: torch.save(images, tmp))
    return images.float()


# ----------------------------------------------------------------------------------------- checkpoints
def _save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_with(path, lambda tmp: torch.save(state, tmp))


def _load_state(path: Path) -> dict[str, Any] | None:
    return load_checkpoint(path) if path.is_file() else None


def _checkpoint(path: Path, parts: dict[str, Any], gen: torch.Generator, step: int, losses: list[float],
                seconds: float) -> None:
    """Save every ``state_dict`` in ``parts`` plus both RNG states and the progress counters."""
    _save_state(path, {**{k: v.state_dict() for k, v in parts.items()}, "generator": gen.get_state(),
                       "rng": torch.get_rng_state(), "step": step, "losses": losses, "seconds": seconds})


def _resume(path: Path, parts: dict[str, Any], gen: torch.Generator) -> tuple[int, list[float], float]:
    """Restore what :func:`_checkpoint` saved; ``(0, [], 0.0)`` when there is no checkpoint yet."""
    state = _load_state(path)
    if state is None:
        return 0, [], 0.0
    for key, part in parts.items():
        part.load_state_dict(state[key])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["losses"], state["seconds"]


def _cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))


def detail_weights(images: torch.Tensor, detail_weight: float) -> torch.Tensor:
    """Per-voxel L1 weights ``1 + lambda * |x - mean_3x3x3(x)|``: more weight on small, high-contrast structures.

    A plain L1 is dominated by the large smooth regions; a nodule a few voxels across costs it almost nothing, and
    the autoencoder trained on it turned nodules into faint ground glass. With lambda = 10 a one-voxel solid
    nodule's centre weighs about 5, a body edge about 3.

    Args:
        images: ``(B, 1, z, y, x)`` in [0, 1].
        detail_weight: lambda; 0 gives uniform weights.
    """
    local_mean = torch.nn.functional.avg_pool3d(images, 3, stride=1, padding=1, count_include_pad=False)
    return 1.0 + detail_weight * (images - local_mean).abs()


def _kl(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent voxels, averaged over the batch (MONAI's AE recipe)."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2)) - 1)
    return kl.flatten(1).sum(1).mean()


# ---------------------------------------------------------------------------------------- autoencoder
def train_autoencoder(images: torch.Tensor, config: DemoTrainConfig, workdir: Path,
                      progress: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Phase 2: train (or resume, or just load) the autoencoder; checkpoints in ``workdir/autoencoder.pt``.

    Args:
        images: training images ``(N, 1, z, y, x)`` in [0, 1].
        config: training config.
        workdir: folder of the resumable checkpoints.
        progress: show a tqdm bar.
    """
    path = workdir / "autoencoder.pt"
    torch.manual_seed(config.torch_seed)  # reproducible initialisation
    ae = build_demo_autoencoder()
    optimizer = torch.optim.AdamW(ae.parameters(), lr=config.ae_lr)
    scheduler = _cosine(optimizer, config.ae_steps)
    gen = torch.Generator().manual_seed(config.torch_seed)
    parts = {"model": ae, "optimizer": optimizer, "scheduler": scheduler}
    step, losses, seconds = _resume(path, parts, gen)
    ae.train()
    bar = tqdm(total=config.ae_steps, initial=step, desc="autoencoder", disable=not progress)
    start = time.monotonic() - seconds
    while step < config.ae_steps:
        batch = images[torch.randint(len(images), (config.ae_batch,), generator=gen)]
        recon, mu, sigma = ae(batch)
        error = (recon - batch).abs()
        l1 = error.mean()
        loss = (detail_weights(batch, config.ae_detail_weight) * error).mean() + config.kl_weight * _kl(mu, sigma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(float(l1.detach()))
        bar.update(1)
        bar.set_postfix(l1=f"{np.mean(losses[-20:]):.4f}")
        if step % config.checkpoint_every == 0 or step == config.ae_steps:
            _checkpoint(path, parts, gen, step, losses, time.monotonic() - start)
    bar.close()
    state = _load_state(path)
    ae.load_state_dict(state["model"])
    return ae.eval().requires_grad_(False), {"steps": step, "l1_curve": _curve(state["losses"]),
                                            "seconds": round(state["seconds"], 1)}


@torch.no_grad()
def posterior_means(ae: torch.nn.Module, images: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Posterior means ``z_mu`` of ``images`` (unscaled).

    Args:
        ae: trained autoencoder.
        images: ``(N, 1, z, y, x)``.
        batch: volumes per call.
    """
    return torch.cat([ae.encode(images[i : i + batch])[0] for i in range(0, len(images), batch)])


# ------------------------------------------------------------------------------------------------ flow
def train_flow(latents: torch.Tensor, config: DemoTrainConfig, workdir: Path,
               progress: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Phase 3: train (or resume) the velocity UNet on scaled latents; returns the EMA UNet.

    Args:
        latents: ``(N, 4, z', y', x')`` training latents already multiplied by the scale factor.
        config: training config.
        workdir: folder of the resumable checkpoints (``flow.pt``).
        progress: show a tqdm bar.
    """
    path = workdir / "flow.pt"
    torch.manual_seed(config.torch_seed + 1)
    unet = build_demo_unet()
    ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.flow_lr)
    scheduler = _cosine(optimizer, config.flow_steps)
    rflow = RFlowScheduler(num_train_timesteps=SCHEDULE["num_train_timesteps"], use_discrete_timesteps=False,
                           sample_method=SCHEDULE["sample_method"],
                           use_timestep_transform=SCHEDULE["use_timestep_transform"])
    gen = torch.Generator().manual_seed(config.torch_seed + 1)
    parts = {"model": unet, "ema": ema, "optimizer": optimizer, "scheduler": scheduler}
    step, losses, seconds = _resume(path, parts, gen)
    unet.train()
    bar = tqdm(total=config.flow_steps, initial=step, desc="flow", disable=not progress)
    start = time.monotonic() - seconds
    while step < config.flow_steps:
        x0 = latents[torch.randint(len(latents), (config.flow_batch,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = rflow.sample_timesteps(x0)  # uniform in [0, 1000) (global RNG, checkpointed)
        xt = rflow.add_noise(x0, noise, t)  # (1 - t/1000) x0 + (t/1000) noise
        loss = torch.nn.functional.mse_loss(unet(xt, t), x0 - noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update_parameters(unet)
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(mse=f"{np.mean(losses[-20:]):.4f}")
        if step % config.checkpoint_every == 0 or step == config.flow_steps:
            _checkpoint(path, parts, gen, step, losses, time.monotonic() - start)
    bar.close()
    state = _load_state(path)
    ema.load_state_dict(state["ema"])
    return ema.module.eval().requires_grad_(False), {"steps": step, "mse_curve": _curve(state["losses"]),
                                                     "seconds": round(state["seconds"], 1)}


def _curve(losses: list[float], points: int = 8) -> list[list[float]]:
    """``[step, mean loss of the window ending there]`` at a few points: a loss curve small enough for JSON."""
    if not losses:
        return []
    ends = np.unique(np.linspace(len(losses) // points or 1, len(losses), points).astype(int))
    window = max(1, len(losses) // (2 * points))
    return [[int(e), round(float(np.mean(losses[max(0, e - window) : e])), 5)] for e in ends]


# ------------------------------------------------------------------------------------------ evaluation
def describe_phantom(image: np.ndarray | torch.Tensor, air_hu: float = -500.0) -> dict[str, Any]:
    """How phantom-like an image ``(z, y, x)`` in [0, 1] is.

    Outside air is the low-HU region connected to the in-plane border; the body is the rest (holes filled); lungs
    are the low-HU voxels inside the body, split into components after one erosion (which cuts the thin airways
    joining them). Returns ``body_fraction``, ``edge_air_fraction`` (air share of the in-plane border),
    ``ring_median_hu`` (median HU of the body's outer 2-voxel ring: soft tissue), ``lung_fraction`` (low-HU share of
    the grid inside the body), ``lung_components`` (voxels of the two largest eroded components, largest first)
    and ``lung_centroids_x`` (their mean x index) and ``body_centre_x``.

    Args:
        image: image in [0, 1] (MAISI convention).
        air_hu: HU below which a voxel counts as air/lung.
    """
    hu = np.asarray(unit_to_hu(torch.as_tensor(image).detach().float().cpu()).numpy())
    air = hu < air_hu
    labels, _ = ndimage.label(air)
    edges = np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                            labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    outside = np.isin(labels, np.unique(edges[edges > 0]))
    body = ndimage.binary_fill_holes(~outside)
    inner = air & body
    eroded = ndimage.binary_erosion(inner)
    comp, n = ndimage.label(eroded)
    sizes = ndimage.sum(eroded, comp, range(1, n + 1)) if n else np.zeros(0)
    order = np.argsort(sizes)[::-1][:2]
    centroids = [float(np.argwhere(comp == k + 1)[:, 2].mean()) for k in order]
    ring = body & ~ndimage.binary_erosion(body, iterations=2)
    border = np.concatenate([air[:, 0, :].ravel(), air[:, -1, :].ravel(), air[:, :, 0].ravel(), air[:, :, -1].ravel()])
    return {
        "body_fraction": float(body.mean()),
        "edge_air_fraction": float(border.mean()),
        "ring_median_hu": float(np.median(hu[ring])) if ring.any() else float("nan"),
        "lung_fraction": float(inner.mean()),
        "lung_components": [int(sizes[k]) for k in order],
        "lung_centroids_x": centroids,
        "body_centre_x": float(np.argwhere(body)[:, 2].mean()) if body.any() else float("nan"),
    }


@torch.no_grad()
def sample_images(flow: DemoFlow, n: int, num_steps: int = 30, seed: int = 0) -> torch.Tensor:
    """``n`` images ``(n, 1, z, y, x)`` sampled from pure noise with plain Euler steps on the flow's grid.

    Args:
        flow: the demo flow.
        n: number of samples.
        num_steps: Euler steps.
        seed: seed of the noise.
    """
    shape = flow.latent_shape((n, 1, *IMAGE_SHAPE))
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    grid = flow.timesteps(num_steps, shape)
    return flow.decode(run_to_end(sample(flow.velocity, z, grid, 0), z)).clamp(0, 1)


@torch.no_grad()
def evaluate(flow: DemoFlow, n_heldout: int = 10, n_samples: int = 8) -> dict[str, Any]:
    """Held-out reconstruction error (evaluation cohort, seed 0) and phantom-likeness of samples from noise.

    Args:
        flow: the demo flow.
        n_heldout: evaluation-cohort cases to reconstruct.
        n_samples: samples from noise to describe.
    """
    images = torch.stack([torch.from_numpy(to_model_grid(generate_case(i).volume, shape=IMAGE_SHAPE).array)
                          for i in range(n_heldout)])[:, None]
    recon = flow.decode(flow.encode(images)).clamp(0, 1)
    mae_hu = float(unit_to_hu(recon).sub(unit_to_hu(images)).abs().mean())
    described = [describe_phantom(s[0]) for s in sample_images(flow, n_samples)]
    return {
        "heldout_recon_mae_hu": round(mae_hu, 2),
        "samples_lung_fraction": [round(d["lung_fraction"], 4) for d in described],
        "samples_two_lungs": sum(len(d["lung_components"]) == 2 and min(d["lung_components"]) > 500
                                 for d in described),
    }


def train_demo_flow(config: DemoTrainConfig, workdir: str | os.PathLike, output: str | os.PathLike,
                    progress: bool = False) -> dict[str, Any]:
    """All phases, then the shipped asset (``demo_flow_payload``) written atomically to ``output``.

    Args:
        config: training config.
        workdir: folder for the data cache and resumable checkpoints (rerunning resumes).
        output: the asset file to write.
        progress: show tqdm bars.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.torch_seed)
    t0 = time.monotonic()
    images = phantom_training_images(config, workdir / f"phantoms_seed{config.seed}_n{config.n_cases}.pt", progress)
    data_seconds = time.monotonic() - t0
    ae, ae_report = train_autoencoder(images, config, workdir, progress)
    mu = posterior_means(ae, images)
    scale_factor = float(1.0 / mu.std())
    unet, flow_report = train_flow(mu * scale_factor, config, workdir, progress)
    flow = DemoFlow(ae, unet, scale_factor).eval()
    report = {"config": asdict(config), "scale_factor": scale_factor, "data_seconds": round(data_seconds, 1),
              "autoencoder": ae_report, "flow": flow_report}
    report["metrics"] = evaluate(flow)
    atomic_write_with(output, lambda tmp: torch.save(demo_flow_payload(ae, unet, scale_factor, report), tmp))
    return report
