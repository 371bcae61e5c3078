"""What every 2.5D slice predictor shares: the input check, the CAM heads and the ``Predictor`` base class.

A predictor maps a stack of ``in_slices`` neighbouring axial slices, intensities in MAISI's [0, 1]
convention, shape (B, in_slices, H, W), to one logit per stack: "the centre slice contains a nodule".
The guidance loop and every attribution method (CAM, Grad-CAM, Score-CAM, IG) rely on three names only:

- ``feat``: an ``nn.Identity`` on the pre-pool feature map (B, C, h, w), so a forward hook can grab it;
- ``head``: pooled features → one logit; its ``weight`` (C,) and ``bias`` () define the CAM;
- ``input_size`` and ``in_slices``: the (H, W) = (input_size, input_size) and channel count it accepts.

Each backbone normalises intensities inside ``forward``, so callers always pass [0, 1] stacks.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def check_stacks(stacks: torch.Tensor, in_slices: int, input_size: int) -> None:
    """Raise a ``ValueError`` that names expected vs got when ``stacks`` is not (B, in_slices, size, size).

    Args:
        stacks: the tensor a predictor was called with.
        in_slices: number of slices (channels) the predictor was built for.
        input_size: height and width the predictor was built for (resizing is the caller's job).
    """
    if not isinstance(stacks, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor of 2.5D stacks, got {type(stacks).__name__}")
    expected = f"(B, {in_slices}, {input_size}, {input_size})"
    if stacks.ndim != 4:
        raise ValueError(f"expected 2.5D stacks of shape {expected}, got {stacks.ndim}-D tensor {tuple(stacks.shape)}")
    if stacks.shape[1] != in_slices:
        raise ValueError(
            f"expected {in_slices} slices per stack, shape {expected}; got {stacks.shape[1]} slices "
            f"(shape {tuple(stacks.shape)})"
        )
    if tuple(stacks.shape[2:]) != (input_size, input_size):
        raise ValueError(
            f"expected slices of {input_size}x{input_size}, shape {expected}; got {tuple(stacks.shape[2:])} "
            "(resize the stacks before calling the predictor)"
        )
    if not stacks.is_floating_point():
        raise ValueError(f"expected floating-point stacks in [0, 1], got dtype {stacks.dtype}")


class CamHead(nn.Module):
    """Global average pool → affine map to one logit; the affine map's weights define the CAM.

    Because pooling and the affine map commute, ``pool_cam(cam(f)) + bias == forward(f)``:
    the logit is exactly the pooled class activation map plus the bias (``pool_cam`` is the spatial mean
    here; :class:`LseCamHead` pools with log-sum-exp instead). Subclasses store the affine map as a 1×1 conv
    or a linear layer (to keep published layouts); both expose ``weight`` (C,) and ``bias`` () so CAM code
    does not care which.
    """

    @property
    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def bias(self) -> torch.Tensor:
        raise NotImplementedError

    def cam(self, features: torch.Tensor) -> torch.Tensor:
        """Class activation map (B, h, w) = Σ_c weight_c · features_c, without the bias.

        Args:
            features: pre-pool feature map (B, C, h, w), as seen by the ``feat`` hook.
        """
        return torch.einsum("bchw,c->bhw", features, self.weight)

    def pool_cam(self, cam: torch.Tensor) -> torch.Tensor:
        """The logit without its bias, from a CAM (B, h, w): the spatial mean for average-pooling heads.

        Args:
            cam: class activation map from :meth:`cam`.
        """
        return cam.mean(dim=(1, 2))


class ConvCamHead(CamHead):
    """Adaptive average pool, then a 1×1 conv to one channel (WeakMedSAM's classification head).

    Args:
        in_channels: channels of the feature map.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=1)

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight.flatten()

    @property
    def bias(self) -> torch.Tensor:
        return self.conv.bias[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(features)).flatten()


class LinearCamHead(CamHead):
    """Adaptive average pool, then a linear layer to one logit (the torchvision-style ResNet head).

    Args:
        in_channels: channels of the feature map.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, 1)

    @property
    def weight(self) -> torch.Tensor:
        return self.fc.weight.flatten()

    @property
    def bias(self) -> torch.Tensor:
        return self.fc.bias[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(features).flatten(1)).flatten()


class LseCamHead(ConvCamHead):
    """The 1×1 conv of :class:`ConvCamHead` applied first, then log-sum-exp pooling of the CAM over space
    (Pinheiro & Collobert, CVPR 2015); same state-dict keys as :class:`ConvCamHead`.

    ``LSE_r(m) = log(mean(exp(r·m))) / r`` runs from the mean (r → 0) to the max (r → ∞). A nodule covers a
    few cells of the feature map; under an average the evidence of those cells is divided by the map's
    area and the classifier learns slowly and poorly, while an LSE logit follows the strongest cells and
    keeps a gradient on every cell. The CAM stays exact: ``forward(f) == pool_cam(cam(f)) + bias``.

    Args:
        in_channels: channels of the feature map.
        sharpness: r; larger is closer to max pooling.
    """

    def __init__(self, in_channels: int, sharpness: float = 5.0):
        super().__init__(in_channels)
        if sharpness <= 0:
            raise ValueError(f"sharpness must be > 0, got {sharpness}")
        self.sharpness = float(sharpness)
        self.pool = None  # pooling happens after the conv, in pool_cam

    def pool_cam(self, cam: torch.Tensor) -> torch.Tensor:
        r, flat = self.sharpness, cam.flatten(1)
        return (torch.logsumexp(r * flat, dim=1) - math.log(flat.shape[1])) / r

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.pool_cam(self.cam(features)) + self.bias


class Predictor(nn.Module):
    """Base class: check input → backbone normalisation → features → ``feat`` → ``head`` → logits (B,).

    Subclasses set ``self.head`` and implement ``normalize`` and ``features``.

    Args:
        in_slices: slices per 2.5D stack (odd, so there is a centre slice).
        input_size: height and width of each slice.
    """

    head: CamHead

    def __init__(self, in_slices: int, input_size: int):
        super().__init__()
        if in_slices < 1 or in_slices % 2 == 0:
            raise ValueError(f"in_slices must be a positive odd number (a centre slice is needed), got {in_slices}")
        self.in_slices = int(in_slices)
        self.input_size = int(input_size)
        self.feat = nn.Identity()

    def normalize(self, stacks: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] stacks to the intensity convention the backbone was pretrained with."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-pool feature map (B, C, h, w) of normalised stacks."""
        raise NotImplementedError

    def forward(self, stacks: torch.Tensor) -> torch.Tensor:
        """Logits (B,) for stacks (B, in_slices, input_size, input_size) in [0, 1].

        Args:
            stacks: 2.5D stacks in MAISI's [0, 1] intensity convention.
        """
        check_stacks(stacks, self.in_slices, self.input_size)
        return self.head(self.feat(self.features(self.normalize(stacks))))

    def class_activation(self, stacks: torch.Tensor) -> torch.Tensor:
        """Class activation map (B, h, w) of stacks in [0, 1]: the head's weights on ``feat``, bias left out.

        Args:
            stacks: 2.5D stacks (B, in_slices, H, W) in MAISI's [0, 1] intensity convention.
        """
        if not callable(getattr(self.head, "cam", None)):
            raise TypeError(f"{type(self).__name__}'s head {type(self.head).__name__} computes no class activation "
                            f"map (it needs a CamHead)")
        return self.head.cam(self.feat(self.features(self.normalize(stacks))))
