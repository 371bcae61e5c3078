"""A hand-made 2.5D "nodule" classifier for guidance tests: it only sees bright voxels of the centre slice.

Shared by ``test_guidance.py`` and ``test_viz_trajectory.py`` (pytest puts this folder on ``sys.path``).
"""

import torch
import torch.nn.functional as F

from tfg_core.predictors.heads import ConvCamHead, Predictor


class BlobDetector(Predictor):
    """logit = mean over the centre slice of 640 · relu(x − 0.5)² − 0.02: only bright voxels count."""

    def __init__(self, in_slices: int = 3, input_size: int = 16):
        super().__init__(in_slices, input_size)
        self.head = ConvCamHead(1)
        with torch.no_grad():
            self.head.conv.weight.fill_(1.0)
            self.head.conv.bias.fill_(-0.02)

    def normalize(self, stacks: torch.Tensor) -> torch.Tensor:
        return stacks

    def features(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1]
        return 640.0 * F.relu(centre - 0.5) ** 2
