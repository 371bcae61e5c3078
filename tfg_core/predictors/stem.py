"""Inflating an RGB-pretrained first convolution to take a stack of grey slices."""

from __future__ import annotations

import copy

from torch import nn


def inflate_conv_in_channels(conv: nn.Conv2d, new_in: int = 9) -> nn.Conv2d:
    """A copy of ``conv`` that takes ``new_in`` channels and gives, on ``new_in`` identical slices,
    exactly the pretrained response to the grey image repeated over the original channels.

    Pretrained encoders saw grey CT as three equal RGB channels, so only the sum of the RGB kernels
    matters; spreading that sum evenly over the new channels keeps the response for identical slices
    and lets every slice of a 2.5D stack contribute equally at the start of fine-tuning.
    A conv that already has ``new_in`` channels is returned unchanged (its RGB kernels stay meaningful).

    Args:
        conv: first convolution of a pretrained backbone (``groups`` must be 1).
        new_in: number of input channels wanted, e.g. the slices of a 2.5D stack.
    """
    if conv.groups != 1:
        raise ValueError(f"cannot inflate a grouped convolution (groups={conv.groups})")
    if new_in < 1:
        raise ValueError(f"new_in must be positive, got {new_in}")
    if conv.in_channels == new_in:
        return conv
    summed = conv.weight.detach().sum(dim=1, keepdim=True)
    inflated = copy.deepcopy(conv)
    inflated.in_channels = new_in
    inflated.weight = nn.Parameter(summed.repeat(1, new_in, 1, 1) / new_in, requires_grad=conv.weight.requires_grad)
    return inflated

