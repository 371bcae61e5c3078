"""MAISI-v2 networks from the published config, strict checkpoint loading and the MaisiFlow wrapper (CPU, random
weights; the full-size networks run only on tiny inputs)."""

from __future__ import annotations

import copy
import json
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D
from monai.bundle import ConfigParser
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

from tfg_core.checkpoints import weights_manifest
from tfg_core.data.volume import Volume
from tfg_core.errors import CheckpointError, DataError
from tfg_core.flow.base import FlowModel
from tfg_core.flow.maisi import (
    CONFIG_PATH,
    MaisiFlow,
    build_maisi_autoencoder,
    build_maisi_unet,
    from_maisi_layout,
    load_maisi_config,
    load_maisi_v2,
    maisi_grid_problems,
    reinit_zero_output,
    replace_maisi_group_norm,
    use_sdpa_attention,
    to_maisi_layout,
)
from tfg_core.flow.schedule import rflow_timesteps

SECTIONS = {"autoencoder": "autoencoder_def", "unet": "diffusion_unet_def"}
BUILDERS = {"autoencoder": build_maisi_autoencoder, "unet": build_maisi_unet}
SPACING_ZYX = (2.5, 0.7, 0.8)


def signature(module: torch.nn.Module) -> dict[str, tuple]:
    """Names, shapes and dtypes of everything a state dict holds."""
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def on_meta_with_cuda(fn):
    """Build on the meta device (no memory) while pretending CUDA exists, so the published flash-attention flag
    passes MONAI's constructor check."""
    with torch.device("meta"), mock.patch("torch.cuda.is_available", return_value=True):
        return fn()


@pytest.fixture(scope="module")
def reference_config(shared_reference):
    return json.loads((shared_reference / "maisi_v2_config_network_rflow.json").read_text())


@pytest.fixture(scope="module")
def reference_signatures(reference_config):
    """The ground truth: MONAI's ConfigParser instantiating ``_target_`` from the published file, flags as published."""
    parser = ConfigParser(copy.deepcopy(reference_config))
    return {
        name: signature(on_meta_with_cuda(lambda s=section: parser.get_parsed_content(s, instantiate=True)))
        for name, section in SECTIONS.items()
    }


@pytest.fixture(scope="module")
def flow():
    """Full-size MAISI-v2 with random weights; records the fresh UNet's output before re-initialising its last conv."""
    torch.manual_seed(0)
    model = MaisiFlow(build_maisi_autoencoder(), build_maisi_unet(), scale_factor=1.7, spacing_zyx_mm=SPACING_ZYX)
    model.eval().requires_grad_(False)
    z = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        model.fresh_velocity = model.velocity(z, 500.0)
    reinit_zero_output(model.unet, seed=0)
    return model


@pytest.fixture(scope="module")
def tiny_flow():
    """MAISI-v2's classes with narrow channels, for tests that need gradients."""
    torch.manual_seed(0)
    config = tiny_config()
    model = MaisiFlow(build_maisi_autoencoder(config), build_maisi_unet(config), 1.7, spacing_zyx_mm=SPACING_ZYX)
    return model.eval().requires_grad_(False)


def tiny_config() -> dict:
    """The shipped config with narrow channels: same classes and code paths, small enough to save and load fast."""
    config = copy.deepcopy(load_maisi_config())
    # num_splits only chunks the convolutions (state dict unchanged); 1 lets tiny images through
    config["autoencoder_def"].update(num_channels=[32, 32, 32], num_res_blocks=[1, 1, 1], num_splits=1)
    config["diffusion_unet_def"].update(num_channels=[32, 32, 32, 32], num_res_blocks=1)
    return config


@pytest.fixture
def tiny_files(tmp_path):
    """An autoencoder state dict and a UNet checkpoint in NVIDIA's layout, written by the test."""
    config = tiny_config()
    ae = build_maisi_autoencoder(config)
    unet = reinit_zero_output(build_maisi_unet(config), seed=3)
    ae_path, unet_path = tmp_path / "autoencoder_v1.pt", tmp_path / "diff_unet_3d_rflow-ct.pt"
    torch.save(ae.state_dict(), ae_path)
    unet_ckpt = {
        "epoch": 7,
        "loss": torch.tensor(0.1),
        "num_train_timesteps": 1000,
        "scale_factor": torch.tensor(1.2345),
        "unet_state_dict": unet.state_dict(),
    }
    torch.save(unet_ckpt, unet_path)
    return config, ae, unet, ae_path, unet_path, unet_ckpt


# --- config and architecture -------------------------------------------------------------------------------------


def test_shipped_config_is_a_verbatim_copy_of_the_published_sections(reference_config):
    shipped = load_maisi_config()
    copied = [k for k in shipped if not k.startswith("_")]
    assert {"autoencoder_def", "diffusion_unet_def", "spatial_dims", "latent_channels"} <= set(copied)
    assert {k: shipped[k] for k in copied} == {k: reference_config[k] for k in copied}
    assert "NV-Generate-CTMR" in shipped["_source"] and "Apache-2.0" in shipped["_license"]
    assert CONFIG_PATH.parent.name == "configs" and CONFIG_PATH.is_file()


@pytest.mark.parametrize("name", ["autoencoder", "unet"])
@pytest.mark.parametrize("cpu", [True, False], ids=["cpu-flags", "published-flags"])
def test_builders_match_the_published_architecture(reference_signatures, name, cpu):
    ours = signature(on_meta_with_cuda(lambda: BUILDERS[name](cpu=cpu)))
    assert ours == reference_signatures[name]  # same names, shapes and dtypes, whichever flags


def test_cpu_builders_turn_off_cuda_only_features(flow):
    from monai.networks.blocks import SABlock

    # built without MONAI's CUDA-only flag, then switched to SDPA attention, which CPUs run too
    attention = [m for m in flow.unet.modules() if isinstance(m, SABlock)]
    assert attention and all(m.use_flash_attention for m in attention)
    norms = [m for m in flow.autoencoder.modules() if isinstance(m, MaisiGroupNorm3D)]
    assert norms and not any(m.norm_float16 for m in norms)
    published = on_meta_with_cuda(lambda: (build_maisi_autoencoder(cpu=False), build_maisi_unet(cpu=False)))
    assert all(m.norm_float16 for m in published[0].modules() if isinstance(m, MaisiGroupNorm3D))
    assert any(getattr(m, "use_flash_attention", False) for m in published[1].modules())


def test_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        load_maisi_config(bad)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"autoencoder_def": {}}))
    with pytest.raises(DataError, match="diffusion_unet_def"):
        load_maisi_config(partial)
    config = tiny_config()
    config["diffusion_unet_def"]["_target_"] = "torch.nn.Identity"
    with pytest.raises(DataError, match="Identity"):
        build_maisi_unet(config)


# --- the UNet and the velocity call --------------------------------------------------------------------------------


def test_fresh_unet_outputs_exactly_zero(flow):
    # the velocity after reinit_zero_output is checked to be non-zero in the kwargs test below
    assert flow.fresh_velocity.shape == (1, 4, 8, 8, 8) and torch.count_nonzero(flow.fresh_velocity) == 0


def test_reinit_is_seeded_and_leaves_global_rng_alone():
    small = build_maisi_unet(tiny_config())
    state = torch.random.get_rng_state()
    a = reinit_zero_output(small, seed=1).out[-1].conv.weight.clone()
    b = reinit_zero_output(small, seed=1).out[-1].conv.weight.clone()
    c = reinit_zero_output(small, seed=2).out[-1].conv.weight.clone()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.abs().sum() > 0


def test_velocity_passes_maisi_kwargs_in_maisi_layout(flow):
    seen = {}

    def spy(module, args, kwargs):
        seen.update(kwargs)

    z = torch.randn(2, 4, 8, 8, 8)  # (B, C, z, y, x); random values, so a wrong axis order cannot match below
    handle = flow.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            v = flow.velocity(z, torch.tensor(700.0))
    finally:
        handle.remove()
    assert v.shape == z.shape and torch.isfinite(v).all() and v.abs().mean() > 0  # non-zero after reinit
    assert torch.equal(seen["x"], to_maisi_layout(z))
    assert torch.equal(seen["timesteps"], torch.tensor([700.0, 700.0]))
    # spacing in mm x 100, (x, y, z) order
    assert torch.allclose(seen["spacing_tensor"], torch.tensor([[80.0, 70.0, 250.0]] * 2))
    assert seen["class_labels"].dtype == torch.long and seen["class_labels"].tolist() == [1, 1]
    assert "top_region_index_tensor" not in seen and "bottom_region_index_tensor" not in seen


def test_velocity_input_checks(flow):
    with pytest.raises(ValueError, match="divisible by 8"):
        flow.velocity(torch.zeros(1, 4, 8, 8, 12), 10.0)
    with pytest.raises(ValueError, match=r"\(B, 4"):
        flow.velocity(torch.zeros(1, 3, 8, 8, 8), 10.0)
    unset = MaisiFlow(flow.autoencoder, flow.unet, 1.0)
    with pytest.raises(ValueError, match="spacing"):
        unset.velocity(torch.zeros(1, 4, 8, 8, 8), 10.0)


# --- layout, encode/decode -----------------------------------------------------------------------------------------


def test_layout_is_monai_ras_loading_of_an_lps_volume(tmp_path):
    array = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)  # (z, y, x)
    path = tmp_path / "lps.nii.gz"
    sitk.WriteImage(Volume(array=array, spacing=(3.0, 2.0, 1.0)).to_sitk(), str(path))
    ras = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
    loaded = Compose([LoadImage(reader="NibabelReader", image_only=True), EnsureChannelFirst(), ras])(str(path))
    ours = to_maisi_layout(torch.from_numpy(array)[None])
    assert torch.equal(torch.as_tensor(loaded.as_tensor()), ours)
    assert tuple(float(s) for s in loaded.pixdim) == (1.0, 2.0, 3.0)  # MAISI's spacing order is (x, y, z)
    assert torch.equal(from_maisi_layout(ours), torch.from_numpy(array)[None])


def test_encode_is_the_scaled_posterior_mean(flow):
    # (y >= 48: the published num_splits=4 splits y and needs a few voxels per split at the deepest level)
    x = torch.rand(1, 1, 16, 48, 16, generator=torch.Generator().manual_seed(0))
    seen = {}
    real_encode = flow.autoencoder.encode

    def spy(image):
        seen["input"], seen["output"] = image, real_encode(image)
        return seen["output"]

    with torch.no_grad(), mock.patch.object(flow.autoencoder, "encode", spy):
        z = flow.encode(x)
    mu, sigma = seen["output"]
    assert torch.equal(seen["input"], to_maisi_layout(x))
    assert z.shape == flow.latent_shape(x.shape) == (1, 4, 4, 12, 4)
    assert torch.equal(z, from_maisi_layout(mu) * 1.7)  # posterior mean times the scale factor, no sampling
    assert not torch.equal(mu, sigma)


def test_decode_undoes_the_scale_factor(flow):
    latent = torch.randn(1, 4, 4, 12, 4, generator=torch.Generator().manual_seed(1))
    seen = {}
    real_decode = flow.autoencoder.decode

    def spy(z):
        seen["input"], seen["output"] = z, real_decode(z)
        return seen["output"]

    with torch.no_grad(), mock.patch.object(flow.autoencoder, "decode", spy):
        image = flow.decode(latent)
    assert torch.equal(seen["input"], to_maisi_layout(latent) / 1.7)
    assert torch.equal(image, from_maisi_layout(seen["output"]))
    assert image.shape == (1, 1, 16, 48, 16)


def decoded_slice_gradient(model: MaisiFlow, latent_zyx=(2, 4, 2)) -> torch.Tensor:
    """What guidance needs: the gradient of a loss on some decoded slices w.r.t. the latent."""
    latent = torch.randn(1, 4, *latent_zyx, generator=torch.Generator().manual_seed(2), requires_grad=True)
    model.decode(latent)[:, :, latent_zyx[0] * 2 :].mean().backward()
    return latent.grad


def test_decode_is_differentiable(tiny_flow):
    grad = decoded_slice_gradient(tiny_flow)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.slow
def test_full_size_decode_is_differentiable(flow):
    grad = decoded_slice_gradient(flow, (4, 12, 4))  # y >= 48 image voxels for the published num_splits=4
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_torch_group_norm_is_a_drop_in_replacement(tiny_flow):
    original = tiny_flow.autoencoder
    swapped = replace_maisi_group_norm(copy.deepcopy(original))
    assert not any(isinstance(m, MaisiGroupNorm3D) for m in swapped.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in swapped.modules()) == sum(
        isinstance(m, MaisiGroupNorm3D) for m in original.modules()
    )
    assert_same_weights(swapped, original.state_dict())
    assert not any(p.requires_grad for p in swapped.parameters())
    faster = MaisiFlow(swapped, tiny_flow.unet, tiny_flow.scale_factor)
    latent = torch.randn(1, 4, 2, 4, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(faster.decode(latent), tiny_flow.decode(latent), atol=1e-5)
    assert torch.allclose(decoded_slice_gradient(faster), decoded_slice_gradient(tiny_flow), atol=1e-6)


def test_shapes_grid_and_problems(flow):
    assert isinstance(flow, FlowModel)
    assert flow.latent_shape((32, 64, 96)) == (4, 8, 16, 24)
    assert flow.latent_shape((2, 1, 32, 64, 96)) == (2, 4, 8, 16, 24)
    with pytest.raises(ValueError):
        flow.latent_shape((30, 64, 64))
    assert torch.equal(flow.timesteps(30, (1, 4, 32, 64, 64)), rflow_timesteps(30, 32 * 64 * 64))
    with pytest.raises(ValueError, match="latent_shape"):
        flow.timesteps(30)
    assert maisi_grid_problems((128, 256, 256), (2.0, 1.5, 1.5)) == []
    assert len(maisi_grid_problems((100, 256, 200), (6.0, 0.4, 0.4))) == 4


# --- loading ---------------------------------------------------------------------------------------------------------


def test_manifest_lists_maisi_weights_without_invented_hashes():
    manifest = weights_manifest()
    assert manifest["lite_medsam"]["sha256"]  # untouched
    for name, filename, env in [
        ("maisi_autoencoder", "autoencoder_v1.pt", "TFG_MAISI_AUTOENCODER"),
        ("maisi_diffusion_unet", "diff_unet_3d_rflow-ct.pt", "TFG_MAISI_UNET"),
    ]:
        entry = manifest[name]
        assert entry["filename"] == filename and entry["env"] == env and entry["sha256"] is None
        assert "nvidia/NV-Generate-CT" in entry["source"]


def assert_same_weights(module, state_dict):
    loaded = module.state_dict()
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)


def test_strict_loading_round_trips(tiny_files):
    config, ae, unet, ae_path, unet_path, _ = tiny_files
    model = load_maisi_v2(ae_path, unet_path, config=config)
    assert_same_weights(model.autoencoder, ae.state_dict())
    assert_same_weights(model.unet, unet.state_dict())
    assert model.scale_factor == pytest.approx(1.2345)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_environment_variables_and_wrapped_autoencoder(tiny_files, monkeypatch, tmp_path):
    config, ae, _, _, unet_path, _ = tiny_files
    wrapped = tmp_path / "wrapped_autoencoder.pt"
    torch.save({"unet_state_dict": ae.state_dict()}, wrapped)  # NVIDIA's loaders accept this wrapper too
    monkeypatch.setenv("TFG_MAISI_AUTOENCODER", str(wrapped))
    monkeypatch.setenv("TFG_MAISI_UNET", str(unet_path))
    assert_same_weights(load_maisi_v2(config=config).autoencoder, ae.state_dict())


def test_missing_files_name_the_environment_variable(tiny_files, monkeypatch, tmp_path):
    config, _, _, ae_path, _, _ = tiny_files
    monkeypatch.delenv("TFG_MAISI_AUTOENCODER", raising=False)
    monkeypatch.delenv("TFG_MAISI_UNET", raising=False)
    with pytest.raises(CheckpointError, match="TFG_MAISI_AUTOENCODER") as err:
        load_maisi_v2(config=config)
    assert "NV-Generate-CT" in str(err.value)
    with pytest.raises(CheckpointError, match="TFG_MAISI_UNET"):
        load_maisi_v2(ae_path, config=config)
    monkeypatch.setenv("TFG_MAISI_UNET", str(tmp_path / "nowhere.pt"))
    with pytest.raises(CheckpointError, match="nowhere.pt"):
        load_maisi_v2(ae_path, config=config)


def test_state_dict_that_does_not_fit_lists_every_key(tiny_files, tmp_path):
    config, _, _, ae_path, _, unet_ckpt = tiny_files
    sd = dict(unet_ckpt["unet_state_dict"])
    sd["conv_in.renamed_weight"] = sd.pop("conv_in.conv.weight")
    sd["spacing_layer.0.weight"] = torch.zeros(128, 4)  # the published layer is (128, 3)
    bad = tmp_path / "bad_unet.pt"
    torch.save({**unet_ckpt, "unet_state_dict": sd}, bad)
    with pytest.raises(CheckpointError) as err:
        load_maisi_v2(ae_path, bad, config=config)
    message = str(err.value)
    assert "bad_unet.pt" in message
    assert "conv_in.conv.weight" in message and "conv_in.renamed_weight" in message
    assert "spacing_layer.0.weight: checkpoint (128, 4) vs model (128, 3)" in message


@pytest.mark.parametrize(
    "change",
    [{"scale_factor": None}, {"num_train_timesteps": 500}],
    ids=["no-scale-factor", "other-time-axis"],
)
def test_unet_checkpoint_layout_is_checked(tiny_files, tmp_path, change):
    config, _, _, ae_path, _, unet_ckpt = tiny_files
    ckpt = {k: v for k, v in {**unet_ckpt, **change}.items() if v is not None}
    path = tmp_path / "odd_unet.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="odd_unet.pt"):
        load_maisi_v2(ae_path, path, config=config)


@pytest.mark.slow
def test_full_size_checkpoints_round_trip_strictly(flow, tmp_path):
    ae_path, unet_path = tmp_path / "autoencoder_v1.pt", tmp_path / "diff_unet_3d_rflow-ct.pt"
    torch.save(flow.autoencoder.state_dict(), ae_path)
    torch.save({"unet_state_dict": flow.unet.state_dict(), "scale_factor": torch.tensor(1.7)}, unet_path)
    model = load_maisi_v2(ae_path, unet_path)
    assert_same_weights(model.autoencoder, flow.autoencoder.state_dict())
    assert_same_weights(model.unet, flow.unet.state_dict())


def test_sdpa_attention_computes_the_same_velocity(tiny_flow):
    from monai.networks.blocks import SABlock

    explicit = copy.deepcopy(tiny_flow)
    for m in explicit.unet.modules():
        if isinstance(m, SABlock):
            m.use_flash_attention = False
    reinit_zero_output(explicit.unet, seed=1)
    sdpa = copy.deepcopy(explicit)
    use_sdpa_attention(sdpa.unet)
    assert sum(isinstance(m, SABlock) and m.use_flash_attention for m in sdpa.unet.modules()) > 0
    z = torch.randn(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(0))  # 2x2x2 at the deepest level
    with torch.no_grad():
        a, b = explicit.velocity(z, 400.0), sdpa.velocity(z, 400.0)
    assert a.abs().max() > 0 and torch.allclose(a, b, atol=1e-5 * float(a.abs().max()))
