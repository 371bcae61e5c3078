"""Prior-shift correction and precise BatchNorm statistics for classifiers trained on balanced batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tfg_core.predictors import build_predictor
from tfg_core.training.calibration import bias_shifted, f1_optimal_shift, prior_logit, recalibrate_batchnorm


def test_prior_logit_is_the_log_odds_of_the_positive_share():
    labels = np.array([1] * 13 + [0] * 87, dtype=bool)
    assert prior_logit(labels) == pytest.approx(math.log(0.13 / 0.87))
    assert prior_logit(np.array([1, 0])) == 0.0  # a balanced split needs no shift
    for one_class in (np.zeros(5, bool), np.ones(5, bool), np.zeros(0, bool)):
        with pytest.raises(ValueError, match="both classes"):
            prior_logit(one_class)


def test_bias_shifted_moves_every_logit_and_restores_the_bias_exactly():
    torch.manual_seed(0)
    model = build_predictor("tiny").eval()
    stacks = torch.rand(3, 9, 64, 64)
    before = model(stacks).detach()
    bias = model.head.bias.detach().clone()
    with bias_shifted(model, -1.9):
        torch.testing.assert_close(model(stacks).detach(), before - 1.9, atol=1e-5, rtol=0)
    assert torch.equal(model.head.bias.detach(), bias)  # bit-exact, not bias - 1.9 + 1.9
    with pytest.raises(RuntimeError), bias_shifted(model, 2.0):
        raise RuntimeError("validation failed")
    assert torch.equal(model.head.bias.detach(), bias)  # restored on errors too


def test_recalibrated_statistics_are_the_exact_average_over_the_batches():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, momentum=0.1), nn.ReLU()).eval()
    model[1].running_mean.fill_(7.0)  # stale statistics, as after fast training
    batches = [torch.randn(5, 2, 6, 6) * 3 + 1 for _ in range(4)]
    feed = iter(batches)
    assert recalibrate_batchnorm(model, lambda: next(feed), n_batches=4) == 1
    with torch.no_grad():
        per_batch = [model[0](b) for b in batches]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in per_batch]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in per_batch]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_var, var, atol=1e-5, rtol=1e-5)
    assert model[1].momentum == 0.1 and not model.training  # momentum and eval mode restored


def test_recalibration_with_zero_batches_changes_nothing():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    model[1].running_mean.fill_(3.0)
    assert recalibrate_batchnorm(model, lambda: torch.randn(2, 1, 4, 4), n_batches=0) == 0
    assert torch.equal(model[1].running_mean, torch.full((2,), 3.0)) and model.training


def _f1_at(logits, labels, offset):
    from tfg_core.training.finetune import binary_metrics

    return binary_metrics((np.asarray(logits) + offset >= 0).astype(float), labels)["f1"]


def test_f1_optimal_shift_places_the_boundary_between_the_best_cut_and_beats_every_other_offset():
    # descending logits 3, 2, 1, 0, -1 with labels 1, 1, 0, 1, 0: cuts k = 1..5 give F1 = 2/4, 4/5, 4/6, 6/7, 6/8
    logits, labels = np.array([1.0, 3.0, -1.0, 0.0, 2.0]), np.array([0, 1, 0, 1, 1])
    offset = f1_optimal_shift(logits, labels)
    assert type(offset) is float  # not a NumPy scalar: it ends up in checkpoints read with weights_only=True
    assert offset == pytest.approx(0.5)  # boundary half-way between 0 (last positive) and -1
    assert _f1_at(logits, labels, offset) == pytest.approx(6 / 7)
    rng = np.random.default_rng(0)
    for _ in range(20):  # exhaustive check on random scores, ties included
        z = rng.integers(-5, 6, 40).astype(float)
        y = rng.random(40) < 0.3
        best = max(_f1_at(z, y, -t) for t in np.concatenate([z, [z.max() + 1]]))
        assert _f1_at(z, y, f1_optimal_shift(z, y)) == pytest.approx(best)


def test_f1_optimal_shift_edge_cases():
    assert f1_optimal_shift(np.array([0.3, -2.0]), np.array([0, 0])) == 0.0  # no positive: nothing to gain
    assert f1_optimal_shift(np.array([-4.0, -5.0]), np.array([1, 1])) > 5.0  # all positive: every slice called
    with pytest.raises(ValueError, match="finite"):
        f1_optimal_shift(np.array([np.inf, 0.0]), np.array([1, 0]))
    with pytest.raises(ValueError, match="shape"):
        f1_optimal_shift(np.zeros(3), np.zeros(2))
