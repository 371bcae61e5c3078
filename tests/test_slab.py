"""Slab decoding (``tfg_core.flow.slab``): the decoded slab equals a whole-volume decode, its gradient equals autograd
through a whole-volume decode with the GroupNorm statistics held constant, and guidance gives the same segmentation.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tfg_core.flow.demo import IMAGE_SHAPE, load_demo_flow
from tfg_core.flow.maisi import (
    MaisiFlow,
    build_maisi_autoencoder,
    build_maisi_unet,
    load_maisi_config,
    reinit_zero_output,
)
from tfg_core.flow.slab import BlockReach, block_reach, decode_with_statistics, decoder_plan


@pytest.fixture(scope="module")
def demo_flow():
    return load_demo_flow()


def narrow_maisi(num_splits: int = 4) -> MaisiFlow:
    """MAISI-v2's decoder structure as published (2 residual blocks per level, trilinear upsampling, convolutions split
    in 4 along y) with 8 channels, so a CPU decodes it in a moment."""
    config = copy.deepcopy(load_maisi_config())
    config["autoencoder_def"].update(num_channels=[8, 8, 8], norm_num_groups=4, num_splits=num_splits)
    config["diffusion_unet_def"].update(num_channels=[32, 32, 32, 32], num_res_blocks=1, norm_num_groups=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow = MaisiFlow(build_maisi_autoencoder(config), reinit_zero_output(build_maisi_unet(config)), 1.7,
                         spacing_zyx_mm=(2.0, 1.5, 1.5))
    return flow.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def maisi():
    return narrow_maisi()


def latent_for(flow, z_len: int, yx: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(1, flow.latent_channels, z_len, *yx, generator=torch.Generator().manual_seed(seed))


def frozen_statistics_decode(flow, latent: torch.Tensor) -> torch.Tensor:
    """An independent reference: the plain whole-volume decode, every GroupNorm normalising with its own input's
    statistics *detached* (what slab decoding differentiates), written directly with torch ops."""

    def forward(norm, x):
        groups = x.float().reshape(x.shape[0], norm.num_groups, -1)
        mean = groups.mean(-1, keepdim=True).detach()
        var = groups.var(-1, unbiased=False, keepdim=True).detach()
        y = ((groups - mean) / torch.sqrt(var + norm.eps)).reshape(x.shape)
        return y * norm.weight.view(1, -1, 1, 1, 1) + norm.bias.view(1, -1, 1, 1, 1)

    norms = [m for b in flow.decoder_stages().blocks for m in b.modules() if isinstance(m, torch.nn.GroupNorm)]
    try:
        for norm in norms:
            norm.forward = lambda x, norm=norm: forward(norm, x)
        return flow.decode(latent)
    finally:
        for norm in norms:
            norm.__dict__.pop("forward", None)


# --- the decoder's reach ------------------------------------------------------------------------------------------


def test_published_maisi_decoder_reach():
    with torch.device("meta"):
        autoencoder = build_maisi_autoencoder()  # published sizes, no memory
    flow = MaisiFlow.__new__(MaisiFlow)
    torch.nn.Module.__init__(flow)
    flow.autoencoder, flow.scale_factor, flow.amp = autoencoder, 1.0, False
    plan = decoder_plan(flow.decoder_stages())
    assert plan.factor == 4
    # conv_in 1 + 2 res blocks x 2 convs at latent resolution, then two (trilinear x2 + conv, 2 res blocks) levels
    # and the output conv: 10.5 latent voxels, rounded up by the per-block bookkeeping to 11
    assert plan.halo() == 11
    assert BlockReach(2, 1, 1).input_range(10, 20, 100) == (3, 12)


def test_reach_is_tight_and_sufficient(maisi):
    """Perturbing the latent at the halo's edge changes the slab; one voxel further it cannot (statistics fixed)."""
    plan = decoder_plan(maisi.decoder_stages())
    latent = latent_for(maisi, 32, (12, 4))
    decoded = decode_with_statistics(maisi.decoder_stages(), latent)
    slab = slice(64, 68)  # image slices 64..67 = latent slice 16
    base = decoded.decode_slab(latent, slab.start, slab.stop)
    changes = {}
    for distance in (plan.halo() - 1, plan.halo(), plan.halo() + 1):
        moved = latent.clone()
        moved[:, :, 16 - distance] += 1.0
        changes[distance] = float((decoded.decode_slab(moved, slab.start, slab.stop) - base).abs().max())
    assert changes[plan.halo() - 1] > 1e-6 and changes[plan.halo() + 1] == 0.0, changes


def test_attention_blocks_are_refused():
    from monai.networks.blocks import SpatialAttentionBlock

    with pytest.raises(ValueError, match="attention"):
        block_reach(SpatialAttentionBlock(3, 8, norm_num_groups=4), axis=2)


# --- values and gradients -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["demo", "maisi"])
def test_slab_equals_the_whole_volume_decode(which, demo_flow, maisi):
    flow, latent = (demo_flow, latent_for(demo_flow, 8, (16, 16))) if which == "demo" else (
        maisi, latent_for(maisi, 32, (12, 4)))
    with torch.no_grad():
        full = flow.decode(latent)
    decoded = decode_with_statistics(flow.decoder_stages(), latent)
    assert torch.allclose(decoded.image, full, atol=1e-5)  # the recording decode is the decode
    depth = full.shape[2]
    for lo, hi in ((0, 9), (depth // 2 - 5, depth // 2 + 4), (depth - 9, depth), (0, depth)):
        slab = decoded.decode_slab(latent, lo, hi)
        assert slab.shape[2] == hi - lo
        assert torch.allclose(slab, full[:, :, lo:hi], atol=2e-5), (lo, hi, float((slab - full[:, :, lo:hi]).abs().max()))


def slab_gradient(depth: int, slices: slice, shape, seed: int = 1) -> torch.Tensor:
    g = torch.zeros(shape)
    g[:, :, slices] = torch.randn(g[:, :, slices].shape, generator=torch.Generator().manual_seed(seed))
    return g


@pytest.mark.parametrize("which", ["demo", "maisi"])
@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointed", "plain"])
def test_gradient_equals_autograd_with_statistics_held(which, checkpointing, demo_flow, maisi):
    flow, latent = (demo_flow, latent_for(demo_flow, 8, (16, 16))) if which == "demo" else (
        maisi, latent_for(maisi, 32, (12, 4)))
    decoded = decode_with_statistics(flow.decoder_stages(), latent, checkpointing=checkpointing)
    depth = decoded.image.shape[2]
    # two separate runs of slices, as two nodules give
    grad_image = slab_gradient(depth, slice(depth // 4, depth // 4 + 6), decoded.image.shape)
    grad_image += slab_gradient(depth, slice(depth - 5, depth), decoded.image.shape, seed=2)
    ours = decoded.vjp(grad_image)

    leaf = latent.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(frozen_statistics_decode(flow, leaf), leaf, grad_image)
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))

    # what holding the statistics costs: the exact gradient through a whole-volume decode points the same way
    leaf = latent.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(flow.decode(leaf), leaf, grad_image)
    cosine = float(F.cosine_similarity(ours.flatten(), exact.flatten(), dim=0))
    print(json.dumps({"flow": which, "cosine_to_exact": round(cosine, 5),
                      "relative_difference": round(float((ours - exact).norm() / exact.norm()), 4)}))
    # measured on these random latents: MAISI 0.994-0.997, the demo's x2 decoder 0.987
    assert cosine > {"demo": 0.98, "maisi": 0.99}[which]


def test_long_runs_are_split_without_changing_the_gradient(maisi):
    latent = latent_for(maisi, 32, (12, 4))
    grad_image = slab_gradient(128, slice(40, 70), (1, 1, 128, 48, 16))
    whole = decode_with_statistics(maisi.decoder_stages(), latent)
    split = decode_with_statistics(maisi.decoder_stages(), latent, slab_slices=8)
    assert whole.slabs(grad_image) == [(40, 70)]
    assert split.slabs(grad_image) == [(40, 48), (48, 56), (56, 64), (64, 70)]
    reference = whole.vjp(grad_image)
    assert torch.allclose(split.vjp(grad_image), reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


def test_runs_whose_halos_overlap_are_merged(maisi):
    latent = latent_for(maisi, 32, (12, 4))
    decoded = decode_with_statistics(maisi.decoder_stages(), latent)
    grad_image = torch.zeros(1, 1, 128, 48, 16)
    grad_image[:, :, 10:12] = 1.0
    grad_image[:, :, 20:22] = 1.0  # 2 latent voxels further: its latent range overlaps the first run's
    grad_image[:, :, 120:122] = 1.0  # far away: its own slab
    assert decoded.runs(grad_image) == [(10, 22), (120, 122)]
    assert decoded.runs(torch.zeros_like(grad_image)) == []
    assert torch.count_nonzero(decoded.vjp(torch.zeros_like(grad_image))) == 0
    with pytest.raises(ValueError, match="shape"):
        decoded.vjp(grad_image[:, :, :64])


def test_the_published_convolution_splitting_changes_nothing(maisi):
    """MAISI splits every convolution in 4 along y (its memory trick); slab decoding crops along z on top of it."""
    unsplit = narrow_maisi(num_splits=1)
    latent = latent_for(maisi, 32, (12, 4))
    grad_image = slab_gradient(128, slice(60, 69), (1, 1, 128, 48, 16))
    a = decode_with_statistics(maisi.decoder_stages(), latent)
    b = decode_with_statistics(unsplit.decoder_stages(), latent)
    assert torch.allclose(a.image, b.image, atol=1e-5)
    reference = b.vjp(grad_image)
    assert torch.allclose(a.vjp(grad_image), reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


def test_decoder_autocast_runs_in_bfloat16(maisi):
    """On a GPU the decoder runs under bf16 autocast; the same path forced on the CPU stays close to float32."""
    amp = copy.copy(maisi)
    amp.amp = True
    latent = latent_for(maisi, 8, (12, 4))
    with torch.no_grad():
        reference = maisi.decode(latent)
        half = amp.decode(latent)
    decoded = decode_with_statistics(amp.decoder_stages(), latent)
    assert half.dtype == torch.float32 and torch.allclose(half, reference, atol=0.05 * float(reference.abs().max()))
    assert torch.allclose(decoded.image, half, atol=0.05 * float(reference.abs().max()))


# --- guidance -----------------------------------------------------------------------------------------------------


def test_guided_segmentation_is_unchanged_by_slab_decoding(demo_flow):
    """The demo's nodule case through the whole loop with each decoder path: the same counterfactual, mask and Dice."""
    from tfg_core.data.phantom import generate_case
    from tfg_core.data.preprocess import mask_to_model_grid, to_model_grid
    from tfg_core.demo import load_shipped_predictor
    from tfg_core.guidance import GuidanceConfig, run_guidance
    from tfg_core.segment import dice, otsu_threshold

    case = generate_case(21)  # a 25.7 mm solid nodule (tests/test_demo_flow.py::NODULE_CASE)
    grid = to_model_grid(case.volume, shape=IMAGE_SHAPE)
    x = torch.from_numpy(grid.array)
    nodule = mask_to_model_grid(case.nodule_labels == 1, case.volume, grid) > 0.5
    lung = mask_to_model_grid(case.lung_mask, case.volume, grid) > 0.5
    predictor = load_shipped_predictor(case.subset).requires_grad_(False)
    maps = {mode: run_guidance(demo_flow, predictor, x, GuidanceConfig(decoder=mode)).difference.numpy()
            for mode in ("full", "slab")}
    threshold = otsu_threshold(maps["full"], lung)
    masks = {mode: (m > threshold) & lung for mode, m in maps.items()}
    agreement = dice(masks["slab"], masks["full"])
    scores = {mode: dice(masks[mode], nodule) for mode in masks}
    print(json.dumps({"mask_agreement": round(agreement, 4), "dice": scores,
                      "max_map_difference": float(np.abs(maps["slab"] - maps["full"]).max())}))
    assert nodule.any() and masks["full"].any()
    assert agreement > 0.95 and abs(scores["slab"] - scores["full"]) < 0.02


@pytest.mark.parametrize("which", ["demo", "maisi"])
def test_chunked_recording_equals_the_whole_volume_decode(which, demo_flow, maisi):
    """slab_slices bounds memory: every block runs a few voxels at a time, its GroupNorms' statistics gathered
    from the chunks first; the image, the statistics and the gradient stay those of the whole-volume pass."""
    flow, latent = (demo_flow, latent_for(demo_flow, 8, (16, 16))) if which == "demo" else (
        maisi, latent_for(maisi, 32, (12, 4)))
    whole = decode_with_statistics(flow.decoder_stages(), latent)
    chunked = decode_with_statistics(flow.decoder_stages(), latent, slab_slices=5)  # uneven on purpose
    assert torch.allclose(chunked.image, whole.image, atol=2e-5)
    assert whole.statistics.by_module.keys() == chunked.statistics.by_module.keys()
    for key, (mean, rstd) in whole.statistics.by_module.items():
        assert torch.allclose(chunked.statistics.by_module[key][0], mean, atol=1e-5)
        assert torch.allclose(chunked.statistics.by_module[key][1], rstd, rtol=1e-4)
    depth = whole.image.shape[2]
    grad_image = slab_gradient(depth, slice(depth // 2 - 6, depth // 2 + 6), whole.image.shape)
    reference = whole.vjp(grad_image)
    assert torch.allclose(chunked.vjp(grad_image), reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
