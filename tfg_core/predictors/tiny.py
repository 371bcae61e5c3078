"""A small CNN slice classifier for the CPU demo on 64×64 phantom slices (~0.1 M parameters).

Phantom nodules are a few voxels across (5.5 mm in-plane voxels) and look like vessel cross-sections
in any single slice; what tells them apart is a small bright blob that starts and ends within the
9-slice stack. Three choices follow, each found in development runs on phantom fold 0 (the design before
them, a strided stem with a mean-pooled head, stayed near chance); ``tests/test_tiny_assets.py`` fine-tunes
fold 0 with the defaults and checks the result:

- the first convolution runs at full resolution: a strided stem mixes a one-voxel nodule with its
  surroundings before any feature sees it;
- downsampling by max pooling, which keeps a small bright response instead of averaging it away;
- an LSE-pooled CAM head (:class:`~tfg_core.predictors.heads.LseCamHead`): a nodule covers a few cells
  of the 16×16 map, so a mean over the map drowns it.

``feat`` sees (B, 64, 16, 16), so a CAM has 4-pixel cells. SiLU instead of ReLU keeps input gradients
smooth, which the guidance step differentiates through.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from monai.networks.blocks import Convolution
from torch import nn

from tfg_core.predictors.heads import LseCamHead, Predictor

# the shipped pretrained tiny predictor (scripts/pretrain_tiny_predictor.py): the demo's stand-in for a published
# backbone, trained on an external phantom cohort (seed 1) that shares no case with the evaluation cohort
PRETRAINED_PATH = Path(__file__).resolve().parents[1] / "assets" / "tiny_pretrained.pt"
IMAGE_SIZE = 64
CHANNELS = (32, 48, 64)
# torch's fused SiLU: the same function as MONAI's "SWISH" (x·sigmoid(x) as three ops, whose mul and sigmoid took
# about a quarter of a profiled CPU training step); end-to-end step times differed by less than their noise
ACT = (nn.SiLU, {})
NORM = "BATCH"
LSE_SHARPNESS = 5.0


class TinyPredictor(Predictor):
    """Two full-resolution convs, max pool, two convs, max pool, two convs, LSE-pooled 1×1-conv CAM head.

    Args:
        in_slices: slices per 2.5D stack.
        input_size: slice side (64 for the phantoms; any multiple of 4).
        channels: widths at full, half and quarter resolution.
        sharpness: the LSE head's r (mean as r → 0, max as r → ∞).
    """

    def __init__(self, in_slices: int = 9, input_size: int = IMAGE_SIZE, channels: tuple[int, int, int] = CHANNELS,
                 sharpness: float = LSE_SHARPNESS):
        super().__init__(in_slices, input_size)
        c0, c1, c2 = channels

        def conv(cin: int, cout: int) -> Convolution:
            return Convolution(2, cin, cout, kernel_size=3, act=ACT, norm=NORM)

        self.encoder = nn.Sequential(
            conv(in_slices, c0), conv(c0, c0), nn.MaxPool2d(2),
            conv(c0, c1), conv(c1, c1), nn.MaxPool2d(2),
            conv(c1, c2), conv(c2, c2),
        )
        self.head = LseCamHead(c2, sharpness)

    def normalize(self, stacks: torch.Tensor) -> torch.Tensor:
        return stacks * 2.0 - 1.0  # centre [0, 1] so the first conv sees zero-mean inputs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def load_tiny_pretrained(model: TinyPredictor, path: str | os.PathLike = PRETRAINED_PATH) -> TinyPredictor:
    """Fill ``model``'s backbone (``encoder.*``) from a tiny predictor checkpoint; the head stays as built.

    Like the published backbones of the other predictors, only the feature extractor is transferred: fine-tuning
    starts from a fresh head. The checkpoint is read with ``weights_only=True`` and its backbone loaded strictly
    (any missing, unexpected or mis-shaped key is listed in the error).

    Args:
        model: a freshly built :class:`TinyPredictor`.
        path: a checkpoint written by :func:`tfg_core.training.checkpoint.save_predictor` for backbone ``tiny``
            (default: the shipped ``tfg_core/assets/tiny_pretrained.pt``).
    """
    import json

    from tfg_core.checkpoints import load_checkpoint, load_state_dict_strict, verify_sha256
    from tfg_core.errors import CheckpointError
    from tfg_core.training.checkpoint import FORMAT

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no pretrained tiny predictor there; "
                              "`python scripts/pretrain_tiny_predictor.py` makes it")
    listing = path.parent / "assets.json"  # shipped assets carry their sha256 there
    if listing.is_file() and path.name in (entries := json.loads(listing.read_text())):
        verify_sha256(path, entries[path.name]["sha256"])
    payload = load_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("backbone") != "tiny":
        raise CheckpointError(f"{path}: not a tiny predictor checkpoint (expected format {FORMAT!r}, backbone 'tiny')")
    backbone = {k[len("encoder."):]: v for k, v in payload["state_dict"].items() if k.startswith("encoder.")}
    load_state_dict_strict(model.encoder, backbone, source=path)
    return model
