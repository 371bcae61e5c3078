"""MAISI-v2 CT ("rflow-ct"): MONAI's networks built from the published config, strict weight loading, ``MaisiFlow``.

Facts this module relies on (NVIDIA-Medtech/NV-Generate-CTMR, scripts/diff_model_infer.py and diff_model_train.py):

- Training volumes are loaded with MONAI (``LoadImaged`` -> ``EnsureChannelFirstd`` -> ``Orientationd("RAS")``), so the
  networks see arrays ``(B, C, x, y, z)`` in RAS orientation. This project's arrays are ``(z, y, x)`` from SimpleITK;
  ``to_maisi_layout``/``from_maisi_layout`` convert, and ``MaisiFlow`` applies them inside every call, so its
  latents are ``(B, 4, z/4, y/4, x/4)`` in our order.
- The UNet is called as ``unet(x=z, timesteps=(B,), spacing_tensor=(B, 3), class_labels=(B,))``: spacing in mm times
  100 in (x, y, z) order, class label 1 = "ct" (configs/modality_mapping.json); MAISI-v2 CT has no body-region inputs.
- The UNet file is ``{"unet_state_dict", "scale_factor", "num_train_timesteps", "epoch", "loss"}``; NVIDIA's loaders
  also accept an autoencoder file wrapped as ``{"unet_state_dict": ...}``. NVIDIA loads the UNet with
  ``strict=False``; we load strictly and report every differing key.
- Inference runs under CUDA autocast (fp16); the published autoencoder uses ``norm_float16=True`` and the UNet
  ``use_flash_attention=True`` (a constructor check refuses that without CUDA). Neither flag changes the state dict,
  so on CPU both are turned off.
- NVIDIA encoded its training latents with ``encode_stage_2_inputs`` (a posterior *sample*); ``MaisiFlow.encode``
  uses the posterior mean so that inversion is deterministic.
- The published autoencoder splits every convolution into ``num_splits=4`` chunks along y (memory); each chunk needs
  a few voxels at the deepest level, so images need y >= 48 (real CT grids are far larger).
- The supported image grid is x = y in {256, 384, 512} voxels, z in {128, ..., 768}, spacing x = y in [0.5, 3] mm and
  z in [0.5, 5] mm (``check_input_ct``); see ``maisi_grid_problems``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
    AutoencoderKlMaisi,
    MaisiDownsample,
    MaisiGroupNorm3D,
)
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.bundle import ConfigParser
from monai.networks.blocks import SABlock
from torch import nn

from tfg_core.checkpoints import load_checkpoint, load_state_dict_strict, resolve_weights
from tfg_core.errors import CheckpointError, DataError
from tfg_core.flow.base import FlowModel, check_layout
from tfg_core.flow.schedule import NUM_TRAIN_TIMESTEPS, rflow_timesteps
from tfg_core.flow.slab import DecoderStages

CONFIG_PATH = Path(__file__).resolve().parent / "configs" / "maisi_v2_config_network_rflow.json"
AUTOENCODER_WEIGHTS = "maisi_autoencoder"  # data_manifest/weights.json keys
UNET_WEIGHTS = "maisi_diffusion_unet"
CT_MODALITY = 1  # "ct" in NV-Generate-CTMR configs/modality_mapping.json
_SECTIONS = {"autoencoder_def": AutoencoderKlMaisi, "diffusion_unet_def": DiffusionModelUNetMaisi}


def load_maisi_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The MAISI-v2 network config (``autoencoder_def``, ``diffusion_unet_def`` and the fields they reference).

    Args:
        path: a config JSON; defaults to the copy shipped in ``tfg_core/flow/configs``.
    """
    path = Path(path) if path is not None else CONFIG_PATH
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(path, f"cannot read the MAISI network config ({exc})") from exc
    missing = [key for key in _SECTIONS if not isinstance(config.get(key), dict)]
    if missing:
        raise DataError(path, f"MAISI network config lacks section(s) {missing}")
    return config


def _network_kwargs(config: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Constructor arguments of ``section`` with ``@`` references resolved (MONAI's ConfigParser does the resolving;
    we instantiate the expected class ourselves so a config cannot name an arbitrary ``_target_``)."""
    item = ConfigParser(dict(config)).get_parsed_content(section, instantiate=False)
    cls = _SECTIONS[section]
    target = item.resolve_module_name()
    if target.rsplit(".", 1)[-1] != cls.__name__:
        raise DataError(None, f"MAISI config section {section!r} targets {target}, expected {cls.__name__}")
    return dict(item.resolve_args())


def build_maisi_autoencoder(config: Mapping[str, Any] | None = None, cpu: bool = True) -> AutoencoderKlMaisi:
    """MONAI's ``AutoencoderKlMaisi`` as ``autoencoder_def`` describes it (random weights).

    Args:
        config: network config (``load_maisi_config()`` when None).
        cpu: turn off ``norm_float16`` and flash attention, which need CUDA autocast; the state dict is unchanged.
    """
    kwargs = _network_kwargs(config if config is not None else load_maisi_config(), "autoencoder_def")
    if cpu:
        kwargs.update(norm_float16=False, use_flash_attention=False)
    return AutoencoderKlMaisi(**kwargs)


def build_maisi_unet(config: Mapping[str, Any] | None = None, cpu: bool = True) -> DiffusionModelUNetMaisi:
    """MONAI's ``DiffusionModelUNetMaisi`` as ``diffusion_unet_def`` describes it (random weights).

    A fresh UNet outputs exactly zero (MONAI zero-initialises its last convolution); see ``reinit_zero_output``.

    Args:
        config: network config (``load_maisi_config()`` when None).
        cpu: build without the ``use_flash_attention`` flag (MONAI's constructor refuses it without CUDA), then
            switch the attention blocks to ``scaled_dot_product_attention`` anyway (``use_sdpa_attention``), which
            runs on CPUs too; the state dict is unchanged.
    """
    kwargs = _network_kwargs(config if config is not None else load_maisi_config(), "diffusion_unet_def")
    if cpu:
        sdpa = bool(kwargs.get("use_flash_attention", False))
        kwargs.update(use_flash_attention=False)
        return use_sdpa_attention(DiffusionModelUNetMaisi(**kwargs)) if sdpa else DiffusionModelUNetMaisi(**kwargs)
    return DiffusionModelUNetMaisi(**kwargs)


def use_sdpa_attention(network: nn.Module) -> nn.Module:
    """Make every MONAI self-attention block use ``torch.nn.functional.scaled_dot_product_attention`` (the path MONAI
    calls "flash attention": fused kernels, no attention matrix kept for the backward pass) instead of an explicit
    einsum + softmax; same function, same parameters.

    Args:
        network: the network to modify in place.
    """
    for block in network.modules():
        if isinstance(block, SABlock) and not block.save_attn and block.rel_positional_embedding is None:
            block.use_flash_attention = True
    return network


def reinit_zero_output(unet: DiffusionModelUNetMaisi, seed: int = 0) -> DiffusionModelUNetMaisi:
    """Give the zero-initialised output convolution PyTorch's default random init, so a random-weight UNet
    produces a non-zero velocity (for tests and benchmarks; never after loading real weights).

    Args:
        unet: the UNet to modify in place.
        seed: seed of the re-initialisation (the global RNG state is left untouched).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.out[-1].conv.reset_parameters()
    return unet


def replace_maisi_group_norm(autoencoder: AutoencoderKlMaisi) -> AutoencoderKlMaisi:
    """Swap every ``MaisiGroupNorm3D`` for ``torch.nn.GroupNorm`` with the same weights (same state dict keys).

    Same arithmetic (per-group biased variance, same eps, affine), but one fused kernel instead of a Python loop
    over 32 group slices, whose backward fills and adds a full-size tensor per group: decoding with gradients runs
    2-3x faster on CPU. What is lost is ``norm_float16`` (fp16 outputs to save memory) and the CUDA cache emptying.

    Args:
        autoencoder: the autoencoder to modify in place.
    """
    for parent in list(autoencoder.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MaisiGroupNorm3D):
                norm = nn.GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
                norm.load_state_dict(child.state_dict())
                if child.affine:
                    norm.to(child.weight.device, child.weight.dtype).requires_grad_(child.weight.requires_grad)
                setattr(parent, name, norm)
    return autoencoder


def to_maisi_layout(a: torch.Tensor) -> torch.Tensor:
    """``(..., z, y, x)`` of an LPS-oriented volume -> MAISI's ``(..., x, y, z)`` in RAS orientation.

    LPS is SimpleITK's identity direction (x towards the patient's left, y posterior, z superior); RAS flips x and
    y. This equals MONAI's ``LoadImage`` -> ``EnsureChannelFirst`` -> ``Orientation("RAS")`` used to train MAISI.

    Args:
        a: tensor whose last three axes are (z, y, x).
    """
    n = a.ndim
    return a.flip(-1, -2).permute(*range(n - 3), n - 1, n - 2, n - 3)


def from_maisi_layout(a: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_maisi_layout``: ``(..., x, y, z)`` RAS -> ``(..., z, y, x)`` LPS.

    Args:
        a: tensor whose last three axes are MAISI's (x, y, z).
    """
    n = a.ndim
    return a.permute(*range(n - 3), n - 1, n - 2, n - 3).flip(-1, -2)


def maisi_grid_problems(image_shape_zyx: Sequence[int], spacing_zyx_mm: Sequence[float]) -> list[str]:
    """Ways an image grid falls outside what MAISI-v2 CT supports (empty when it fits).

    Args:
        image_shape_zyx: image size in voxels, (z, y, x).
        spacing_zyx_mm: voxel spacing in mm, (z, y, x).
    """
    (nz, ny, nx), (sz, sy, sx) = image_shape_zyx, spacing_zyx_mm
    problems = []
    if nx != ny or nx not in (256, 384, 512):
        problems.append(f"x and y size must be equal and one of 256, 384, 512 (got {nx}, {ny})")
    if nz not in (128, 256, 384, 512, 640, 768):
        problems.append(f"z size must be one of 128, 256, ..., 768 (got {nz})")
    if sx != sy or not 0.5 <= sx <= 3.0:
        problems.append(f"x and y spacing must be equal and in [0.5, 3] mm (got {sx}, {sy})")
    if not 0.5 <= sz <= 5.0:
        problems.append(f"z spacing must be in [0.5, 5] mm (got {sz})")
    return problems


class MaisiFlow(FlowModel, nn.Module):
    """MAISI-v2 as a ``FlowModel``: VAE encode/decode, the rectified-flow UNet's velocity and its time grid.

    Inputs and outputs use this project's layout ``(B, C, z, y, x)`` (LPS-oriented volumes, image intensities in
    [0, 1] from HU [-1000, 1000]); the conversion to MAISI's RAS ``(x, y, z)`` happens inside every call. Nothing here
    disables autograd: run ``velocity`` under ``torch.no_grad()`` and differentiate through ``decode`` as needed.

    Args:
        autoencoder: MAISI ``AutoencoderKlMaisi``.
        unet: MAISI ``DiffusionModelUNetMaisi``.
        scale_factor: latent scale factor stored with the UNet weights.
        spacing_zyx_mm: spacing of the grid the model sees, (z, y, x) mm; set it per volume before ``velocity``.
        modality: class label given to the UNet (1 = CT).
        amp: run under autocast; None means "when on CUDA".
        amp_dtype: autocast dtype of the UNet and the encoder (float16, as NVIDIA's inference).
        decoder_amp_dtype: autocast dtype of the decoder (bfloat16: the guided step back-propagates through it, and
            bf16 has float32's range, so gradients cannot overflow without loss scaling; half the memory of fp32).
    """

    # whole-volume backprop through this decoder needs ~9 GB at 128x128x64 and ~74 GB at 256x256x128
    default_decoder = "slab"

    def __init__(
        self,
        autoencoder: AutoencoderKlMaisi,
        unet: DiffusionModelUNetMaisi,
        scale_factor: float | torch.Tensor,
        spacing_zyx_mm: Sequence[float] | None = None,
        modality: int = CT_MODALITY,
        amp: bool | None = None,
        amp_dtype: torch.dtype = torch.float16,
        decoder_amp_dtype: torch.dtype = torch.bfloat16,
    ):
        nn.Module.__init__(self)
        self.autoencoder = autoencoder
        self.unet = unet
        self.scale_factor = float(scale_factor)
        self.spacing_zyx_mm = None if spacing_zyx_mm is None else tuple(float(s) for s in spacing_zyx_mm)
        self.modality = int(modality)
        self.amp = amp
        self.amp_dtype = amp_dtype
        self.decoder_amp_dtype = decoder_amp_dtype
        self.latent_channels = int(autoencoder.latent_channels)
        self.vae_factor = 2 ** sum(isinstance(m, MaisiDownsample) for m in autoencoder.encoder.modules())
        self.unet_factor = 2 ** (len(unet.block_out_channels) - 1)
        if unet.include_top_region_index_input or unet.include_bottom_region_index_input:
            raise ValueError("body-region conditioning is not supported (MAISI-v2 CT does not use it)")

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _autocast(self, dtype: torch.dtype | None = None) -> torch.autocast:
        device = self.device
        enabled = device.type == "cuda" if self.amp is None else bool(self.amp)
        return torch.autocast(device_type=device.type, dtype=dtype or self.amp_dtype, enabled=enabled)

    def _decoder_autocast(self) -> torch.autocast:
        return self._autocast(self.decoder_amp_dtype)

    _check = staticmethod(check_layout)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, 1, z, y, x)`` in [0, 1] -> posterior mean ``z_mu * scale_factor``, ``(B, 4, z/4, y/4, x/4)``.

        Args:
            x: image batch; spatial sizes divisible by 4.
        """
        self._check(x, 1, self.vae_factor, "image")
        with self._autocast():
            z_mu, _ = self.autoencoder.encode(to_maisi_layout(x))  # (mu, sigma); the mean makes encode deterministic
        return from_maisi_layout(z_mu.float() * self.scale_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, 4, z', y', x')`` -> image ``(B, 1, 4z', 4y', 4x')``: ``autoencoder.decode(z / scale_factor)``.

        This is NVIDIA's ``ReconModel`` (``decode_stage_2_outputs`` is the same call) without its sliding window
        (roi 80^3 latent voxels, gaussian blending); decode slabs, or use MONAI's ``SlidingWindowInferer``, for
        volumes that do not fit in memory.

        Args:
            z: latent batch.
        """
        self._check(z, self.latent_channels, 1, "latent")
        with self._decoder_autocast():
            x = self.autoencoder.decode(to_maisi_layout(z) / self.scale_factor)
        return from_maisi_layout(x.float())

    def decoder_stages(self) -> DecoderStages:
        """``decode`` as blocks for slab decoding: layout change and scale factor, the 1x1 ``post_quant_conv``, then
        the decoder's blocks, in MAISI's layout (this project's z is MAISI's last axis, dim 4)."""
        ae = self.autoencoder
        return DecoderStages(
            prepare=lambda z: to_maisi_layout(z) / self.scale_factor,
            blocks=[ae.post_quant_conv, *ae.decoder.blocks],
            finish=lambda x: from_maisi_layout(x.float()),
            axis=4,
            autocast=self._decoder_autocast,
        )

    def spacing_tensor(self, batch: int) -> torch.Tensor:
        """The UNet's ``spacing_tensor``: spacing in mm x 100, (x, y, z) order, shape ``(batch, 3)``.

        Args:
            batch: batch size.
        """
        if self.spacing_zyx_mm is None:
            raise ValueError("MaisiFlow.spacing_zyx_mm is not set: assign the model-grid spacing (z, y, x) in mm")
        xyz = torch.tensor(self.spacing_zyx_mm[::-1], dtype=torch.float32, device=self.device) * 100.0
        return xyz.expand(batch, 3)

    def velocity(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """UNet velocity ``v = x0 - eps`` at latent ``z`` (``(B, 4, z', y', x')``, sizes divisible by 8) and time ``t``.

        Args:
            z: latent batch.
            t: time in [0, 1000], scalar or ``(B,)``.
        """
        self._check(z, self.latent_channels, self.unet_factor, "latent")
        b = z.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=z.device)
        timesteps = t.reshape(1).expand(b) if t.ndim == 0 else t.reshape(b)
        labels = torch.full((b,), self.modality, dtype=torch.long, device=z.device)
        with self._autocast():
            v = self.unet(
                x=to_maisi_layout(z),
                timesteps=timesteps,
                spacing_tensor=self.spacing_tensor(b),
                class_labels=labels,
            )
        return from_maisi_layout(v).to(z.dtype)

    def timesteps(self, num_steps: int = 30, latent_shape: Sequence[int] | None = None) -> torch.Tensor:
        """MAISI-v2's float sampling grid for a latent of ``latent_shape`` (the transform depends on its size).

        Args:
            num_steps: number of sampling steps.
            latent_shape: shape of the latent (last three entries spatial); required.
        """
        if latent_shape is None:
            raise ValueError("MAISI-v2's time grid depends on the latent size: pass latent_shape")
        nz, ny, nx = latent_shape[-3:]
        return rflow_timesteps(num_steps, latent_numel=nz * ny * nx)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """``(z, y, x)`` -> ``(4, z/4, y/4, x/4)``; ``(B, 1, z, y, x)`` -> ``(B, 4, z/4, y/4, x/4)``.

        Args:
            image_shape: spatial or full image shape; spatial sizes divisible by 4.
        """
        spatial = tuple(int(s) for s in image_shape[-3:])
        if len(image_shape) not in (3, 5) or any(s % self.vae_factor for s in spatial):
            raise ValueError(f"image shape {tuple(image_shape)} must be (z, y, x) or (B, C, z, y, x), divisible by 4")
        latent = (self.latent_channels, *(s // self.vae_factor for s in spatial))
        return latent if len(image_shape) == 3 else (int(image_shape[0]), *latent)


def _autoencoder_state_dict(checkpoint: Any, source: Path) -> Mapping[str, torch.Tensor]:
    """The autoencoder file is a plain state dict; NVIDIA's loaders also unwrap ``{"unet_state_dict": ...}``."""
    if isinstance(checkpoint, Mapping) and "unet_state_dict" in checkpoint:
        checkpoint = checkpoint["unet_state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f"{source}: expected an autoencoder state dict (name -> tensor)")
    return checkpoint


def _unet_checkpoint(checkpoint: Any, source: Path) -> tuple[Mapping[str, torch.Tensor], float]:
    """``unet_state_dict`` and ``scale_factor`` from the UNet file, checking its time axis when recorded."""
    if not isinstance(checkpoint, Mapping) or not {"unet_state_dict", "scale_factor"} <= set(checkpoint):
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(f"{source}: expected a dict with 'unet_state_dict' and 'scale_factor', got {keys}")
    steps = checkpoint.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS)
    if int(steps) != NUM_TRAIN_TIMESTEPS:
        raise CheckpointError(f"{source}: trained with {int(steps)} timesteps, this code assumes {NUM_TRAIN_TIMESTEPS}")
    return checkpoint["unet_state_dict"], float(checkpoint["scale_factor"])


def load_maisi_v2(
    autoencoder_path: str | os.PathLike | None = None,
    unet_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    config: Mapping[str, Any] | None = None,
) -> MaisiFlow:
    """Build MAISI-v2 and load its weights strictly; frozen, in eval mode, on ``device``.

    Files come from the arguments or ``$TFG_MAISI_AUTOENCODER`` / ``$TFG_MAISI_UNET`` (see
    ``data_manifest/weights.json``), are sha256-checked when the manifest knows the hash, and are read with
    ``torch.load(weights_only=True)``.

    Args:
        autoencoder_path: ``autoencoder_v1.pt``.
        unet_path: ``diff_unet_3d_rflow-ct.pt``.
        device: where to put the networks.
        config: network config (the shipped MAISI-v2 one when None).
    """
    device = torch.device(device)
    ae_file = resolve_weights(AUTOENCODER_WEIGHTS, autoencoder_path)
    unet_file = resolve_weights(UNET_WEIGHTS, unet_path)
    config = config if config is not None else load_maisi_config()
    cpu = device.type != "cuda"

    autoencoder = build_maisi_autoencoder(config, cpu=cpu)
    ae_sd = _autoencoder_state_dict(load_checkpoint(ae_file, AUTOENCODER_WEIGHTS), ae_file)
    load_state_dict_strict(autoencoder, ae_sd, ae_file)
    del ae_sd

    unet = build_maisi_unet(config, cpu=cpu)
    unet_sd, scale_factor = _unet_checkpoint(load_checkpoint(unet_file, UNET_WEIGHTS), unet_file)
    load_state_dict_strict(unet, unet_sd, unet_file)
    del unet_sd

    flow = MaisiFlow(autoencoder, unet, scale_factor).to(device).eval()
    flow.requires_grad_(False)  # guidance differentiates w.r.t. latents only
    return flow
