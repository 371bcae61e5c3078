"""The ensemble predictor: one CAM (the members' mean), the logit from it, one copy of each weight, round trip."""

from __future__ import annotations

import pytest
import torch

from tfg_core.errors import CheckpointError
from tfg_core.predictors import EnsemblePredictor, TinyPredictor
from tfg_core.predictors.heads import ConvCamHead
from tfg_core.training.calibration import bias_shifted
from tfg_core.training.checkpoint import load_predictor, save_predictor


def _members(n: int, seed: int = 0, head=None) -> list[TinyPredictor]:
    torch.manual_seed(seed)
    members = []
    for _ in range(n):
        model = TinyPredictor()
        if head is not None:
            model.head = head(64)
        with torch.no_grad():  # a fresh head is zero: give the CAMs something to differ in
            model.head.weight.normal_(std=20.0)  # views of the conv's / linear layer's parameters
            model.head.bias.normal_()
        members.append(model.eval())
    return members


def _stacks(batch: int = 3) -> torch.Tensor:
    """Noise with a bright square in a different place per stack, so the CAMs vary over space."""
    x = 0.2 * torch.rand(batch, 9, 64, 64, generator=torch.Generator().manual_seed(1))
    for b in range(batch):
        x[b, :, 8 + 16 * b:16 + 16 * b, 10:20] = 1.0
    return x


@torch.no_grad()
def test_ensemble_cam_is_the_members_mean_and_its_logit_pools_that_cam():
    members = _members(3)
    ensemble = EnsemblePredictor(members).eval()
    x = _stacks()
    mean_cam = torch.stack([m.class_activation(x) for m in members]).mean(0)
    torch.testing.assert_close(ensemble.class_activation(x), mean_cam)
    # the logit is the members' pooling of that CAM plus one bias, the mean of the members' biases to start with
    mean_bias = torch.stack([m.head.bias for m in members]).mean()
    torch.testing.assert_close(ensemble(x), members[0].head.pool_cam(mean_cam) + mean_bias)
    # an LSE of the mean is not the mean of the LSEs: the ensemble is not a plain logit average for LSE heads
    assert not torch.allclose(ensemble(x), torch.stack([m(x) for m in members]).mean(0), atol=1e-3)
    # feat sees every member's map side by side, so hooks (CAM, Grad-CAM, Score-CAM) see all of them
    seen = {}
    ensemble.feat.register_forward_hook(lambda mod, inp, out: seen.setdefault("feat", out))
    ensemble(x)
    assert seen["feat"].shape == (3, 3 * 64, 16, 16)


@torch.no_grad()
def test_ensemble_of_mean_pooling_heads_averages_the_members_logits():
    members = _members(2, head=ConvCamHead)
    ensemble = EnsemblePredictor(members).eval()
    x = _stacks()
    torch.testing.assert_close(ensemble(x), torch.stack([m(x) for m in members]).mean(0))


def test_ensemble_bias_is_its_own_operating_point_and_gradients_reach_the_input():
    members = _members(2)
    ensemble = EnsemblePredictor(members, bias=0.0).eval()
    x = _stacks()
    with torch.no_grad():
        before = ensemble(x)
        with bias_shifted(ensemble, 1.5):  # what fine-tuning does to place the operating point
            torch.testing.assert_close(ensemble(x), before + 1.5)
        torch.testing.assert_close(ensemble(x), before)
        member_bias = members[0].head.bias.clone()
    assert torch.equal(members[0].head.bias, member_bias)  # the members' own biases are not the ensemble's
    x.requires_grad_(True)
    ensemble(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_ensemble_state_dict_holds_each_weight_once_and_round_trips(tmp_path):
    members = _members(2)
    ensemble = EnsemblePredictor(members, bias=-0.25).eval()
    keys = list(ensemble.state_dict())
    assert "head.offset" in keys
    assert all(k.startswith(("members.0.", "members.1.")) for k in keys if k != "head.offset")
    assert len(keys) == 1 + 2 * len(TinyPredictor().state_dict())
    path = save_predictor(tmp_path / "ens.pt", ensemble, "tiny", {}, {"f1": 0.9}, None)
    loaded, payload = load_predictor(path)
    assert payload["members"] == 2 and isinstance(loaded, EnsemblePredictor)
    x = _stacks()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ensemble(x))
    # a checkpoint that says it has three members but holds two fails with the key diff
    payload["members"] = 3
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="members.2"):
        load_predictor(tmp_path / "bad.pt")


def test_ensemble_refuses_members_that_do_not_fit_together():
    with pytest.raises(ValueError, match="at least one member"):
        EnsemblePredictor([])
    with pytest.raises(ValueError, match="same stacks"):
        EnsemblePredictor([TinyPredictor(in_slices=9), TinyPredictor(in_slices=7)])
    with pytest.raises(ValueError, match="pool their CAMs the same way"):
        EnsemblePredictor([TinyPredictor(), TinyPredictor(sharpness=2.0)])


def test_weakmedsam_takes_an_ensemble_of_conv_cam_heads_and_refuses_one_of_linear_heads():
    # its box prompts come from a 1×1-conv CAM; the mean of such CAMs is one, a mean of linear-head maps is not
    from tfg_core.baselines.weakmedsam import WeakMedSam
    from tfg_core.predictors.heads import LinearCamHead

    ensemble = EnsemblePredictor(_members(2))
    assert WeakMedSam(ensemble, image_encoder=None, prompt_head=None).predictor is ensemble
    with pytest.raises(ValueError, match="1x1-conv CAM head.*LinearCamHead"):
        WeakMedSam(EnsemblePredictor(_members(2, head=LinearCamHead)), image_encoder=None, prompt_head=None)
