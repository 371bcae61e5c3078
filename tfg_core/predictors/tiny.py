"""A small CNN slice classifier for the CPU demo on 64×64 phantom slices (~0.1 M parameters).

Strided stem to 32×32, one strided residual unit to 16×16, one residual unit at 16×16; ``feat`` sees
(B, 64, 16, 16), so a CAM has 4-pixel cells, fine enough for phantom nodules of a few pixels.
SiLU instead of ReLU keeps input gradients smooth, which the guidance step differentiates through.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from tfg_core.predictors.heads import ConvCamHead, Predictor

IMAGE_SIZE = 64
CHANNELS = (32, 48, 64)
ACT = "SWISH"  # MONAI's name for SiLU
NORM = "BATCH"


class TinyPredictor(Predictor):
    """Conv stem + two MONAI residual units + pooled 1×1-conv head.

    Args:
        in_slices: slices per 2.5D stack.
        input_size: slice side (64 for the phantoms).
        channels: widths of the stem and the two residual units.
    """

    def __init__(self, in_slices: int = 9, input_size: int = IMAGE_SIZE, channels: tuple[int, int, int] = CHANNELS):
        super().__init__(in_slices, input_size)
        c0, c1, c2 = channels
        self.encoder = nn.Sequential(
            Convolution(2, in_slices, c0, strides=2, kernel_size=3, act=ACT, norm=NORM),
            ResidualUnit(2, c0, c1, strides=2, kernel_size=3, subunits=2, act=ACT, norm=NORM),
            ResidualUnit(2, c1, c2, strides=1, kernel_size=3, subunits=2, act=ACT, norm=NORM),
        )
        self.head = ConvCamHead(c2)

    def normalize(self, stacks: torch.Tensor) -> torch.Tensor:
        return stacks * 2.0 - 1.0  # centre [0, 1] so the stem sees zero-mean inputs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)
