"""2.5D slice predictors: (B, in_slices, H, W) stacks in [0, 1] → logits (B,), with ``feat`` and ``head``.

``build_predictor(name)`` is the one entry point the guidance loop, training and baselines use:

- ``"tinyvit"``: LiteMedSAM's TinyViT encoder, 256×256, ``feat`` (B, 320, 64, 64), 1×1-conv CAM head.
- ``"resnet50"``: RadImageNet ResNet50, 224×224, ``feat`` (B, 2048, 7, 7), linear CAM head.
- ``"tiny"``: small CNN for the CPU demo, 64×64, ``feat`` (B, 64, 16, 16), LSE-pooled 1×1-conv CAM head; its
  "published backbone" is the shipped pretraining on an external phantom cohort.

:class:`EnsemblePredictor` combines fine-tunes of one backbone into a predictor with the same interface (``feat`` =
the members' maps side by side, CAM = their mean).
"""

from __future__ import annotations

import os
from typing import Callable

from tfg_core.predictors.ensemble import EnsembleCamHead, EnsemblePredictor
from tfg_core.predictors.heads import CamHead, ConvCamHead, LinearCamHead, Predictor, check_stacks
from tfg_core.predictors.resnet import ResNet50Predictor, load_radimagenet_resnet50
from tfg_core.predictors.stem import inflate_conv_in_channels
from tfg_core.predictors.tiny import TinyPredictor, load_tiny_pretrained
from tfg_core.predictors.tinyvit import TinyViTPredictor, load_litemedsam_encoder

# name → (constructor taking in_slices, loader of the backbone's published weights or None)
PREDICTORS: dict[str, tuple[Callable[[int], Predictor], Callable[[Predictor, os.PathLike], Predictor] | None]] = {
    "tinyvit": (TinyViTPredictor, load_litemedsam_encoder),
    "resnet50": (ResNet50Predictor, load_radimagenet_resnet50),
    "tiny": (TinyPredictor, load_tiny_pretrained),
}


def build_predictor(name: str, in_slices: int = 9, pretrained_path: str | os.PathLike | None = None) -> Predictor:
    """Build a predictor by name, optionally with its backbone's published weights.

    The returned module is in training mode (PyTorch's default); call ``.eval()`` for inference/guidance.
    The head is always freshly initialised: fine-tuned predictors are loaded by the training code.

    Args:
        name: ``"tinyvit"``, ``"resnet50"`` or ``"tiny"``.
        in_slices: slices per 2.5D stack (odd); pretrained stems are inflated to it.
        pretrained_path: published backbone weights (``lite_medsam.pth`` for tinyvit, RadImageNet
            ``ResNet50.pt`` for resnet50, a tiny predictor checkpoint such as the shipped
            ``tfg_core/assets/tiny_pretrained.pt`` for tiny); None leaves the backbone randomly initialised. For tinyvit
            the bundled asset is found with ``tinyvit.litemedsam_weights_path()``.
    """
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; expected one of {sorted(PREDICTORS)}")
    make, load = PREDICTORS[name]
    model = make(in_slices)
    if pretrained_path is not None:
        if load is None:
            raise ValueError(f"predictor {name!r} has no published pretrained backbone; got {pretrained_path}")
        load(model, pretrained_path)
    return model


__all__ = [
    "PREDICTORS",
    "CamHead",
    "ConvCamHead",
    "EnsembleCamHead",
    "EnsemblePredictor",
    "LinearCamHead",
    "Predictor",
    "ResNet50Predictor",
    "TinyPredictor",
    "TinyViTPredictor",
    "build_predictor",
    "check_stacks",
    "inflate_conv_in_channels",
    "load_litemedsam_encoder",
    "load_radimagenet_resnet50",
    "load_tiny_pretrained",
]
