"""The CPU demo flow: a tiny latent rectified-flow prior of the phantom cohort, built from MONAI networks.

It mirrors MAISI-v2's structure at toy scale, so the guidance loop exercises the same path as on real CT:

- ``AutoencoderKL`` (3D, 1 -> 4 latent channels like MAISI, one downsampling = x2 where MAISI has x4; see
  ``LATENT_FACTOR`` for why): a 32x64x64 (z, y, x) phantom becomes a 4x16x32x32 latent. ``encode``
  is the posterior mean times ``scale_factor`` (1 / std of the training latents, as in latent diffusion and MAISI);
  ``decode`` is differentiable.
- ``DiffusionModelUNet`` (3D, 4 -> 4 channels) predicts the velocity ``v = x0 - eps`` on *whole-volume* latents, so
  every voxel of the velocity sees the whole chest (global context is what makes it a generative prior rather than
  a near-identity map; see ``tfg_core.flow.train_demo``).
- Time follows MONAI's ``RFlowScheduler`` (``tfg_core.flow.schedule``). Training draws ``t`` uniformly in
  [0, 1000] without MONAI's resolution-dependent shift, so sampling uses the plain uniform grid
  (``rflow_timesteps(..., use_timestep_transform=False)``): the transform is calibrated for MAISI's 32^3-and-larger
  latents and would only move steps for a 16k-voxel latent that the model never saw weighted that way.

Networks see this project's layout ``(B, C, z, y, x)`` directly (they were trained on it; no MAISI reorientation),
on images from ``tfg_core.data.preprocess.to_model_grid`` (LPS-oriented, HU [-1000, 1000] -> [0, 1]).

The shipped weights (``tfg_core/assets/demo_flow.pt``) were trained on phantoms of a cohort seed disjoint from the
evaluation cohort (seed 0); ``tfg_core/assets/flow_assets.json`` records their sha256, the retraining command,
training time and metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from torch import nn

from tfg_core.checkpoints import load_checkpoint, load_state_dict_strict, verify_sha256
from tfg_core.errors import CheckpointError, DataError
from tfg_core.flow.base import FlowModel, check_layout
from tfg_core.flow.schedule import NUM_TRAIN_TIMESTEPS, rflow_timesteps
from tfg_core.flow.slab import DecoderStages

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
DEMO_FLOW_PATH = ASSETS_DIR / "demo_flow.pt"
FLOW_ASSETS_PATH = ASSETS_DIR / "flow_assets.json"
ASSET_NAME = "demo_flow"
FORMAT = "tfg-demo-flow-v1"

IMAGE_SHAPE = (32, 64, 64)  # (z, y, x): the phantom cohort's default grid
# What has to mirror MAISI is the nodule's size in latent voxels, not the factor: MAISI's x4 on 0.7-1.5 mm CT makes a
# latent voxel 3-6 mm, at most about a nodule's size; x4 on the phantoms' 5.5 mm voxels made it 22 mm, larger than
# most nodules. With that x4 latent (8 channels) even a perfect counterfactual (the scan against its nodule-free twin,
# both through the autoencoder) reached only Dice 0.43 on the ten phantom folds; through this x2 one 0.62 after 500
# training steps and 0.72 after 1200 (README). The factor follows from the autoencoder's levels (LATENT_FACTOR below).
# 4 channels as MAISI: 8 reconstructed a little better (held-out 27 against 30 HU, oracle 0.76 against 0.72) but its
# flow, trained as long, was a weaker prior and guided worse (docs/measurement_log.md).
LATENT_CHANNELS = 4

# Small on purpose: trains in about 50 minutes on one CPU core, file of a few MB.
AUTOENCODER_KWARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "channels": (8, 16),  # two levels = one downsampling = x2
    # no residual block at full resolution: CPU conv3d backward with few channels on 131k voxels is what made a
    # (16, 32, 32) x (1, 1, 1) autoencoder take ~30 s per batch of 4 here; this one takes ~1 s
    "num_res_blocks": (0, 1),
    "use_convtranspose": True,  # learned upsampling, also ~1.5x faster than nearest + conv on CPU
    "attention_levels": (False, False),
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 4,
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
}
LATENT_FACTOR = 2 ** (len(AUTOENCODER_KWARGS["channels"]) - 1)  # one source of truth: the encoder's levels
UNET_KWARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "channels": (8, 16, 32, 64),  # 16x32x32 -> 8x16x16 -> 4x8x8 -> 2x4x4; narrow on top, where a CPU call costs most
    "num_res_blocks": 1,
    "attention_levels": (False, False, False, True),  # global mixing at the lowest level only (32 tokens)
    "num_head_channels": 32,
    "norm_num_groups": 8,
}
SCHEDULE: dict[str, Any] = {  # how t was drawn in training; the sampling grid must match it
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "sample_method": "uniform",
    "use_timestep_transform": False,
}


def build_demo_autoencoder(**overrides: Any) -> AutoencoderKL:
    """MONAI ``AutoencoderKL`` with the demo's architecture (random weights).

    Args:
        overrides: constructor arguments that replace the defaults (tests use smaller nets).
    """
    return AutoencoderKL(**{**AUTOENCODER_KWARGS, **overrides})


def build_demo_unet(**overrides: Any) -> DiffusionModelUNet:
    """MONAI ``DiffusionModelUNet`` with the demo's architecture (random weights; its last conv starts at zero).

    Args:
        overrides: constructor arguments that replace the defaults.
    """
    return DiffusionModelUNet(**{**UNET_KWARGS, **overrides})


class DemoFlow(FlowModel, nn.Module):
    """The demo latent rectified flow as a ``FlowModel``; tensors are ``(B, C, z, y, x)``.

    Args:
        autoencoder: the trained ``AutoencoderKL``.
        unet: the trained velocity ``DiffusionModelUNet`` (the EMA weights).
        scale_factor: latent scale factor (1 / std of the training posterior means).
    """

    # a 32x64x64 volume back-propagates through the whole decoder in megabytes, so the demo keeps the exact gradient
    # (slab decoding holds the GroupNorm statistics constant; tests/test_slab.py measures what that changes)
    default_decoder = "full"

    def __init__(self, autoencoder: AutoencoderKL, unet: DiffusionModelUNet, scale_factor: float | torch.Tensor):
        nn.Module.__init__(self)
        self.autoencoder = autoencoder
        self.unet = unet
        self.scale_factor = float(scale_factor)
        self.latent_channels = int(autoencoder.latent_channels)
        self.vae_factor = 2 ** (len(autoencoder.encoder.channels) - 1)
        self.unet_factor = 2 ** (len(unet.block_out_channels) - 1)

    _check = staticmethod(check_layout)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, 1, z, y, x)`` in [0, 1] -> ``z_mu * scale_factor``, ``(B, C, z/f, y/f, x/f)``, f = ``vae_factor``.

        Args:
            x: image batch; spatial sizes divisible by ``vae_factor`` (and by ``vae_factor * unet_factor`` for
                ``velocity`` on its latent).
        """
        self._check(x, 1, self.vae_factor, "image")
        z_mu, _ = self.autoencoder.encode(x)  # the mean, not a sample: inversion must be deterministic
        return z_mu * self.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, C, z', y', x')`` -> image ``(B, 1, f z', f y', f x')``. Differentiable.

        Args:
            z: latent batch.
        """
        self._check(z, self.latent_channels, 1, "latent")
        return self.autoencoder.decode(z / self.scale_factor)

    def decoder_stages(self) -> DecoderStages:
        """``AutoencoderKL.decode`` as blocks for slab decoding: the 1x1 ``post_quant_conv`` then the decoder's
        blocks, all in this project's layout (z is dim 2)."""
        ae = self.autoencoder
        return DecoderStages(prepare=lambda z: z / self.scale_factor, blocks=[ae.post_quant_conv, *ae.decoder.blocks],
                             finish=lambda x: x, axis=2)

    def velocity(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """UNet velocity ``v = x0 - eps`` at latent ``z`` and time ``t`` in [0, 1000] (scalar or ``(B,)``).

        Args:
            z: latent batch, spatial sizes divisible by ``unet_factor``.
            t: time.
        """
        self._check(z, self.latent_channels, self.unet_factor, "latent")
        b = z.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=z.device)
        timesteps = t.reshape(1).expand(b) if t.ndim == 0 else t.reshape(b)
        return self.unet(z, timesteps)

    def timesteps(self, num_steps: int = 30, latent_shape: Sequence[int] | None = None) -> torch.Tensor:
        """The uniform float grid the demo was trained for (no resolution-dependent transform; ``latent_shape``
        is accepted for the interface and ignored).

        Args:
            num_steps: number of sampling steps.
            latent_shape: unused.
        """
        return rflow_timesteps(num_steps, None, num_train_timesteps=self.num_train_timesteps,
                               use_timestep_transform=False)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """``(z, y, x)`` -> ``(C, z/f, y/f, x/f)``; ``(B, 1, z, y, x)`` -> ``(B, C, z/f, y/f, x/f)``.

        Args:
            image_shape: the image's shape.
        """
        shape = tuple(int(s) for s in image_shape)
        if len(shape) not in (3, 5) or (len(shape) == 5 and shape[1] != 1):
            raise ValueError(f"image shape must be (z, y, x) or (B, 1, z, y, x), got {shape}")
        spatial = shape[-3:]
        if any(s % self.vae_factor for s in spatial):
            raise ValueError(f"image shape {shape} must be divisible by {self.vae_factor}")
        latent = (self.latent_channels, *(s // self.vae_factor for s in spatial))
        return latent if len(shape) == 3 else (shape[0], *latent)


def demo_flow_payload(autoencoder: nn.Module, unet: nn.Module, scale_factor: float,
                      meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The asset's content: both state dicts, the scale factor, the architecture and schedule they belong to.

    Args:
        autoencoder: trained autoencoder.
        unet: trained (EMA) velocity UNet.
        scale_factor: latent scale factor.
        meta: JSON-able extras (training config, metrics).
    """
    return {
        "format": FORMAT,
        "autoencoder_state_dict": {k: v.detach().cpu().clone() for k, v in autoencoder.state_dict().items()},
        "unet_state_dict": {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()},
        "scale_factor": float(scale_factor),
        "autoencoder_kwargs": json.loads(json.dumps(AUTOENCODER_KWARGS)),
        "unet_kwargs": json.loads(json.dumps(UNET_KWARGS)),
        "schedule": dict(SCHEDULE),
        "meta": json.loads(json.dumps(dict(meta or {}))),
    }


def flow_assets(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Entries of ``tfg_core/assets/flow_assets.json`` (sha256, command, training time, metrics), by name.

    Args:
        path: the JSON file; defaults to the shipped one.
    """
    path = Path(path) if path is not None else FLOW_ASSETS_PATH
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"unreadable flow asset list ({exc})") from exc


def load_demo_flow(path: str | os.PathLike | None = None, sha256: str | None = None,
                   device: str | torch.device = "cpu") -> DemoFlow:
    """Load the demo flow: sha256 check, ``torch.load(weights_only=True)``, strict state-dict loads; frozen, eval.

    Args:
        path: checkpoint; defaults to the shipped ``tfg_core/assets/demo_flow.pt``.
        sha256: expected hash; defaults to the ``demo_flow`` entry of ``flow_assets.json`` when loading the shipped
            file (a file given by path is checked only when ``sha256`` is given).
        device: where to put the networks.
    """
    path = Path(path) if path is not None else DEMO_FLOW_PATH
    if sha256 is None and path.resolve() == DEMO_FLOW_PATH.resolve():
        sha256 = flow_assets().get(ASSET_NAME, {}).get("sha256")
        if sha256 is None:
            raise CheckpointError(f"{FLOW_ASSETS_PATH}: no sha256 recorded for {ASSET_NAME!r}")
    if not path.is_file():
        raise CheckpointError(f"{path}: demo flow weights do not exist; run scripts/train_demo_flow.py")
    verify_sha256(path, sha256)
    payload = load_checkpoint(path)
    keys = {"format", "autoencoder_state_dict", "unet_state_dict", "scale_factor", "autoencoder_kwargs",
            "unet_kwargs"}
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT or not keys <= set(payload):
        raise CheckpointError(f"{path}: not a demo flow checkpoint (expected format {FORMAT!r} with {sorted(keys)})")
    # rebuild from the recorded architecture so a retrained asset with other sizes still loads
    autoencoder = AutoencoderKL(**_tuples(payload["autoencoder_kwargs"]))
    unet = DiffusionModelUNet(**_tuples(payload["unet_kwargs"]))
    load_state_dict_strict(autoencoder, payload["autoencoder_state_dict"], f"{path} [autoencoder]")
    load_state_dict_strict(unet, payload["unet_state_dict"], f"{path} [unet]")
    schedule = payload.get("schedule", SCHEDULE)
    if schedule.get("use_timestep_transform") or int(schedule.get("num_train_timesteps", 0)) != NUM_TRAIN_TIMESTEPS:
        raise CheckpointError(f"{path}: trained with schedule {schedule}, DemoFlow samples on {SCHEDULE}")
    flow = DemoFlow(autoencoder, unet, payload["scale_factor"]).to(device).eval()
    flow.requires_grad_(False)  # guidance differentiates w.r.t. latents only
    return flow


def _tuples(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """JSON lists back to tuples (MONAI checks some arguments' types)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
