"""Making a slice classifier trained on balanced batches say the right thing at validation and after.

Two effects bend the probabilities of a classifier fine-tuned the paper's way, and both are undone here
without looking at the validation labels:

- **Class prior.** Positives and negatives are drawn with equal probability, so the trained logit assumes a
  50 % prior, while a scan has far fewer nodule slices (13–18 % on the phantoms). The standard correction
  for a known prior shift (Saerens et al., Neural Computation 14(1), 2002) adds log(π/(1−π)) to the logit,
  π = the training split's share of positive slices. It is folded into the head's bias, so the saved
  checkpoint, its CAM and the guidance all use the corrected logit.
- **Operating point.** Even a calibrated classifier is not at its best F1 at p = 0.5 (for calibrated scores the
  F1-optimal threshold is F1*/2, below 0.5; Lipton et al., arXiv:1402.1892), and a small model fine-tuned for
  minutes is not calibrated: on the phantoms the prior-corrected tiny predictors had precision ≈ 0.95 at recall
  ≈ 0.5. :func:`f1_optimal_shift` finds the logit offset that maximises F1 on the validation split — the split
  the checkpoint is already chosen on, as every segmentation threshold of this project is calibrated there — so
  the saved classifier calls positive what its F1 says it should. Validation F1 at that offset is optimistic by
  construction; the held-out test fold gives the honest number.
- **BatchNorm running statistics.** They are exponential averages over past batches, taken while the
  weights moved; at a learning rate that trains a small model in minutes they lag far enough that the
  validation F1 at p = 0.5 jumps between "all positive" and "all negative" from one check to the next
  while the ranking (AUC) barely changes. Recomputing them as exact averages over a few fresh training
  batches with the current weights ("precise BN", Wu & Johnson, arXiv:2105.07576) removes the jumps.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn


def prior_logit(labels: np.ndarray) -> float:
    """log(π/(1−π)) for the share π of positive slices in ``labels`` (what balanced sampling hid).

    Args:
        labels: every training slice label (bool or 0/1).
    """
    labels = np.asarray(labels).astype(bool)
    pi = float(labels.mean()) if labels.size else 0.0
    if not 0.0 < pi < 1.0:
        raise ValueError(f"the training labels need both classes to define a prior, got positive share {pi}")
    return math.log(pi / (1.0 - pi))


def f1_optimal_shift(logits: np.ndarray, labels: np.ndarray) -> float:
    """The offset to add to ``logits`` so that "logit + offset ≥ 0" has the largest F1 on ``labels``.

    Predicting the k highest logits positive gives F1 = 2·TP_k / (k + P); the offset puts the decision boundary
    half-way between the k-th and (k+1)-th distinct logits of the best k (ties move together). Without any
    positive label F1 is 0 for every offset and 0.0 is returned.

    Args:
        logits: (N,) scores of the validation slices (any offset already applied, e.g. the prior's).
        labels: (N,) true labels (bool or 0/1).
    """
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if z.shape != y.shape:
        raise ValueError(f"logits {z.shape} and labels {y.shape} differ in shape")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits must be finite to place an operating point")
    if not y.any():
        return 0.0
    values, inverse = np.unique(-z, return_inverse=True)  # distinct logits, highest first
    tp = np.cumsum(np.bincount(inverse, weights=y, minlength=len(values)))
    k = np.cumsum(np.bincount(inverse, minlength=len(values)))
    f1 = 2.0 * tp / (k + y.sum())
    best = int(np.argmax(f1))  # first maximum: the highest threshold among equals, the fewest positives
    lowest_in = -values[best]
    below = -values[best + 1] if best + 1 < len(values) else lowest_in - 2.0
    return float(-0.5 * (lowest_in + below))  # a Python float: checkpoints are read with weights_only=True


@contextlib.contextmanager
def bias_shifted(model: nn.Module, delta: float) -> Iterator[nn.Module]:
    """Temporarily add ``delta`` to the predictor head's bias (restored exactly on exit).

    Args:
        model: a :class:`~tfg_core.predictors.heads.Predictor` (its ``head.bias`` is a view of a parameter).
        delta: logit offset, e.g. :func:`prior_logit`.
    """
    bias = model.head.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.add_(delta)
    try:
        yield model
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def recalibrate_batchnorm(model: nn.Module, batches: Callable[[], torch.Tensor], n_batches: int) -> int:
    """Replace every BatchNorm layer's running statistics by their exact average over ``n_batches`` batches.

    A thin wrapper of ``torch.optim.swa_utils.update_bn`` (training-mode forward passes without gradients,
    cumulative averages; the training flag and each layer's momentum restored afterwards) that draws its
    batches from a callable. Returns the number of BatchNorm layers recalibrated.

    Args:
        model: any module.
        batches: returns one input batch per call (e.g. augmented training stacks).
        n_batches: how many batches to average over; 0 leaves the model untouched.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if n_batches <= 0 or not layers:
        return 0
    update_bn((batches() for _ in range(n_batches)), model)
    return len(layers)
