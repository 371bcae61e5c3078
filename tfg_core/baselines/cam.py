"""Class-activation baselines on the predictor's ``feat`` layer: CAM, Grad-CAM and Score-CAM.

All three return (B, h, w) maps at the feature map's resolution for a batch of 2.5D stacks; ``slicewise_map``
brings them to the volume. Maps are the positive evidence for "nodule" (ReLU), never rescaled per slice:

- **CAM** (Zhou et al., CVPR 2016): the head's weights applied to the feature map, ``Σ_c w_c·A_c`` — exactly the
  map the head pools into its logit (:meth:`CamHead.cam`), also for LSE-pooled heads.
- **Grad-CAM** (Selvaraju et al., ICCV 2017): captum's ``LayerGradCam`` on ``feat`` — channel weights are the
  spatially averaged gradients of the logit. For our heads, which pool a 1×1-conv CAM (mean, or log-sum-exp whose
  spatial weights sum to 1), that average is ``w_c/(h·w)``, so Grad-CAM = CAM/(h·w) exactly and both give the same
  masks under a calibrated threshold; they differ for heads with hidden layers.
- **Score-CAM** (Wang et al., CVPR-W 2020): each feature channel, upsampled to the input and min-max scaled to
  [0, 1], masks the input; the channel's weight is how much the masked input raises the nodule probability over
  a fully masked one. Neither captum nor MONAI has it, so it is written here; the masked-out value is 0, the
  window minimum (−1000 HU, air). One forward pass per channel and slice makes it the costly CAM
  (``benchmarks/bench_baselines.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tfg_core.predictors.heads import Predictor


def _features(predictor: Predictor, stacks: torch.Tensor) -> torch.Tensor:
    return predictor.feat(predictor.features(predictor.normalize(stacks)))


@torch.no_grad()
def cam_maps(predictor: Predictor, stacks: torch.Tensor, centres: Sequence[int] | None = None) -> torch.Tensor:
    """CAM of each stack: ReLU(Σ_c w_c·feat_c), (B, h, w), bias left out (it is constant over space).

    Args:
        predictor: classifier with a :class:`~tfg_core.predictors.heads.CamHead`.
        stacks: (B, in_slices, H, W) in [0, 1].
        centres: unused (the slicewise interface passes it).
    """
    return predictor.class_activation(stacks).clamp_min(0)


def gradcam_maps(predictor: Predictor, stacks: torch.Tensor, centres: Sequence[int] | None = None) -> torch.Tensor:
    """Grad-CAM of each stack with captum's ``LayerGradCam`` on ``predictor.feat``, (B, h, w), ReLU applied.

    Args:
        predictor: classifier exposing ``feat``.
        stacks: (B, in_slices, H, W) in [0, 1].
        centres: unused.
    """
    from captum.attr import LayerGradCam

    # the predictor has one output per stack, so no target index is needed
    maps = LayerGradCam(predictor, predictor.feat).attribute(stacks, relu_attributions=True)
    return maps[:, 0].detach()


@torch.no_grad()
def scorecam_maps(predictor: Predictor, stacks: torch.Tensor, centres: Sequence[int] | None = None,
                  channel_batch: int = 64) -> torch.Tensor:
    """Score-CAM of each stack, (B, h, w): ReLU(Σ_k α_k·A_k), α_k = p(X ∘ H_k) − p(0).

    ``A_k`` is feature channel k, ``H_k`` the same channel bilinearly upsampled to the input and min-max scaled
    to [0, 1] per stack (a constant channel masks everything out), ``p`` the predicted nodule probability and
    ``0`` the fully masked input. With one sigmoid output the weights are probability gains, which is what the
    softmax score of the original paper is for a two-class problem.

    Args:
        predictor: classifier exposing ``feat``.
        stacks: (B, in_slices, H, W) in [0, 1].
        centres: unused.
        channel_batch: masked inputs per forward pass.
    """
    feats = _features(predictor, stacks)  # (B, C, h, w)
    b, c = feats.shape[:2]
    up = F.interpolate(feats, size=stacks.shape[-2:], mode="bilinear", align_corners=False)
    lo = up.amin(dim=(2, 3), keepdim=True)
    span = up.amax(dim=(2, 3), keepdim=True) - lo
    masks = torch.where(span > 0, (up - lo) / span.clamp_min(1e-12), torch.zeros_like(up))
    floor = torch.sigmoid(predictor(torch.zeros_like(stacks)))  # (B,)
    weights = torch.empty(b, c)
    for i in range(b):
        masked = stacks[i : i + 1] * masks[i, :, None]  # (C, in_slices, H, W): every slice of the stack masked alike
        probs = torch.cat([torch.sigmoid(predictor(masked[j : j + channel_batch]))
                           for j in range(0, c, channel_batch)])
        weights[i] = probs - floor[i]
    return torch.einsum("bc,bchw->bhw", weights, feats).clamp_min(0)
