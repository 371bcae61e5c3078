"""RadImageNet ResNet50 as a 2.5D slice classifier.

The backbone is MONAI's ResNet50 configured so that its ``state_dict()`` is key- and shape-identical to
torchvision's ``resnet50`` (7×7 stride-2 stem, max-pool, bottlenecks with the stride on the 3×3 conv,
1×1 bias-free projection shortcuts ``downsample.0/1``); torchvision itself is not needed.

RadImageNet's published PyTorch checkpoint (``ResNet50.pt``) is the state dict of a module whose
``backbone`` is ``nn.Sequential(*list(torchvision.models.resnet50().children())[:9])``, so
``backbone.0`` = conv1, ``backbone.1`` = bn1, ``backbone.4..7`` = layer1..4 (2, 3, 8 are ReLU, max-pool,
avg-pool: no tensors), and there is no ``fc``. RadImageNet trained on images scaled as
(pixel − 127.5)·2/255, i.e. [0, 1] → [−1, 1], with grey images read as three equal channels.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from monai.networks.nets import ResNet, resnet50
from torch import nn

from tfg_core.checkpoints import load_checkpoint, load_state_dict_strict, resolve_weights
from tfg_core.predictors.heads import LinearCamHead, Predictor
from tfg_core.predictors.stem import inflate_conv_in_channels

IMAGE_SIZE = 224
FEATURE_CHANNELS = 2048
WEIGHTS_NAME = "radimagenet_resnet50"


def torchvision_resnet50(in_channels: int = 3, num_classes: int = 1000, feed_forward: bool = True) -> ResNet:
    """MONAI 2D ResNet50 whose state dict matches torchvision's ``resnet50`` key for key.

    Args:
        in_channels: input channels of ``conv1``.
        num_classes: outputs of ``fc`` (1000 as in torchvision).
        feed_forward: keep ``fc``; False drops it (the predictor has its own head).
    """
    return resnet50(
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,  # torchvision's projection shortcut has no bias
        num_classes=num_classes,
        feed_forward=feed_forward,
    )


class RadImageNetView(nn.Module):
    """RadImageNet's naming of a torchvision-layout ResNet: ``backbone`` = its first nine children in order.

    The view *shares* the ResNet's modules, so loading a RadImageNet checkpoint strictly into the view
    fills the ResNet, and any key error names the keys as they are written in the file.

    Args:
        resnet: a ResNet from ``torchvision_resnet50``.
    """

    def __init__(self, resnet: ResNet):
        super().__init__()
        r = resnet
        children = (r.conv1, r.bn1, r.act, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4, r.avgpool)
        self.backbone = nn.Sequential(*children)


class ResNet50Predictor(Predictor):
    """RadImageNet ResNet50 + pooled linear head on layer4; ``feat`` sees (B, 2048, H/32, W/32).

    Args:
        in_slices: slices per 2.5D stack; ``conv1`` is inflated from 3 to this many channels.
        input_size: slice side (RadImageNet used 224).
    """

    def __init__(self, in_slices: int = 9, input_size: int = IMAGE_SIZE):
        super().__init__(in_slices, input_size)
        self.backbone = torchvision_resnet50(in_channels=3, feed_forward=False)
        self.backbone.conv1 = inflate_conv_in_channels(self.backbone.conv1, in_slices)
        self.head = LinearCamHead(FEATURE_CHANNELS)

    def normalize(self, stacks: torch.Tensor) -> torch.Tensor:
        return stacks * 2.0 - 1.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.act(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))


def load_radimagenet_state(
    model: ResNet50Predictor,
    state_dict: Mapping[str, torch.Tensor],
    source: str | os.PathLike = "RadImageNet state dict",
) -> ResNet50Predictor:
    """Fill ``model.backbone`` from a RadImageNet-layout state dict, then inflate ``conv1``.

    The tensors are loaded strictly into a 3-channel backbone (seen through ``RadImageNetView``); any
    missing, unexpected or mis-shaped key raises ``CheckpointError`` listing all of them in the file's
    own names. The stem is inflated afterwards; the head is untouched.

    Args:
        model: the predictor to fill.
        state_dict: RadImageNet checkpoint contents (``backbone.0.weight`` … ``backbone.7.2.bn3.*``).
        source: file name for error messages.
    """
    pretrained = torchvision_resnet50(in_channels=3, feed_forward=False)
    load_state_dict_strict(RadImageNetView(pretrained), state_dict, f"{source} (RadImageNet layout)")
    pretrained.conv1 = inflate_conv_in_channels(pretrained.conv1, model.in_slices)
    inflated = f"{source} (inflated to {model.in_slices} channels)"
    load_state_dict_strict(model.backbone, pretrained.state_dict(), inflated)
    return model


def load_radimagenet_resnet50(model: ResNet50Predictor, path: str | os.PathLike | None = None) -> ResNet50Predictor:
    """Load RadImageNet's ``ResNet50.pt`` into ``model`` (weights-only; sha256-checked once it is in the manifest).

    Args:
        model: the predictor to fill.
        path: checkpoint file; default ``$TFG_RADIMAGENET_RESNET50`` when the manifest names that variable.
    """
    path = resolve_weights(WEIGHTS_NAME, path)
    return load_radimagenet_state(model, load_checkpoint(path, WEIGHTS_NAME), path)
