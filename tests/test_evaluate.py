"""The per-fold evaluation protocol: calibrate on validation scans only, score test scans on their own grid."""

import zlib

import numpy as np
import pytest

import tfg_core.evaluate as evaluate
from tfg_core.data.folds import fold_split
from tfg_core.data.luna16 import build_manifest, read_annotations
from tfg_core.data.phantom import PhantomConfig, write_cohort
from tfg_core.errors import DataError


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = write_cohort(tmp_path_factory.mktemp("phantom"), PhantomConfig(n_cases=30))
    return root, build_manifest(root), read_annotations(root / "annotations.csv")


def test_protocol_with_oracle_like_maps(cohort, monkeypatch):
    """Maps = ground truth + noise ("good") or pure noise ("bad"): Dice ≈ 1 vs ≈ 0, thresholds from val only."""
    root, manifest, annotations = cohort
    seen = []

    def fake_maps(prepared, *args):
        seen.append(prepared.uid)
        rng = np.random.default_rng(zlib.crc32(prepared.uid.encode()))  # hash() varies per process
        noise = 0.2 * rng.random(prepared.gt_grid.shape)
        return {"good": prepared.gt_grid * 1.0 + noise, "bad": noise}

    monkeypatch.setattr(evaluate, "difference_maps", fake_maps)
    # a fold whose validation and test subsets both hold nodules (the small cohort has 3 scans per subset)
    with_nodules = set(annotations.seriesuid)
    split = next(s for s in (fold_split(manifest, k) for k in range(10))
                 if with_nodules & set(s.val) and with_nodules & set(s.test))
    # the calibration protocol on the thresholded maps themselves (refine="none"; the default refinement redraws
    # each component on the phantom's density, which these synthetic maps know nothing of)
    rows, thresholds = evaluate.evaluate_fold(root, manifest, annotations, split, flow=None, predictor=None,
                                              methods=("good", "bad"), refine="none")
    # validation first (the calibration: by default only the scans with a nodule), then test
    assert seen == [uid for uid in split.val if uid in with_nodules] + split.test
    assert 0.3 <= thresholds["good"] <= 0.9  # mid-plateau between the noise (< 0.2) and the nodules (≥ 1)
    assert set(rows.seriesuid) == set(split.test) and len(rows) == 2 * len(split.test)
    assert {"experiment", "fold", "seriesuid", "backbone", "method", "dsc", "msd_mm", "pred_voxels", "gt_voxels",
            "threshold", "val_dice", "params_hash"} <= set(rows.columns)
    # the calibration's validation Dice travels with the rows: one value per method, high for "good" only
    val_dice = rows.groupby("method").val_dice.agg(["min", "max"])
    assert (val_dice["min"] == val_dice["max"]).all()
    assert val_dice.loc["good", "min"] > 0.9 and val_dice.loc["bad", "min"] < 0.5
    summary = evaluate.summarise(rows).set_index("method")
    assert summary.loc["good", "dsc_mean"] > 0.95  # back on the scan grid the mask is the ground truth
    assert summary.loc["good", "msd_median_mm"] < 1.0
    assert summary.loc["bad", "dsc_mean"] < 0.3


def test_calibration_population_nodule_scans_or_all(cohort, monkeypatch):
    """Default: the threshold is set on the validation scans with a nodule; "all" also buys empty healthy scans."""
    root, manifest, annotations = cohort
    with_nodules = set(annotations.seriesuid)
    seen = []

    def fake_maps(prepared, *args):
        seen.append(prepared.uid)
        rng = np.random.default_rng(zlib.crc32(prepared.uid.encode()))
        blob = np.zeros(prepared.gt_grid.shape)
        if not prepared.gt_grid.any():  # a healthy scan: a spurious change of 0.7 in its lung
            lung = np.argwhere(prepared.lung_grid)
            z, y, x = lung[len(lung) // 2]
            blob[z - 1:z + 2, y - 2:y + 3, x - 2:x + 3] = 0.7
        return {"blob": np.maximum(prepared.gt_grid * 1.0, blob) + 0.2 * rng.random(blob.shape)}

    monkeypatch.setattr(evaluate, "difference_maps", fake_maps)
    split = next(s for s in (fold_split(manifest, k) for k in range(10))
                 if with_nodules & set(s.val) and set(s.val) - with_nodules and with_nodules & set(s.test)
                 and set(s.test) - with_nodules)
    calibrated = [uid for uid in split.val if uid in with_nodules]
    rows, thresholds = evaluate.evaluate_fold(root, manifest, annotations, split, None, None, methods=("blob",),
                                              refine="none")  # the thresholded maps (the refinement drops plain lung)
    assert seen == calibrated + split.test  # the healthy validation scans are never segmented
    assert 0.2 < thresholds["blob"] < 0.7  # between the noise and the spurious change: it never saw the latter
    assert set(rows.calibrate_on) == {"nodules"} and rows.val_dice.iloc[0] > 0.9
    healthy = rows[rows.gt_voxels == 0]
    assert (healthy.pred_voxels > 0).all()  # so the spurious change of a healthy test scan is segmented

    seen.clear()
    rows_all, thresholds_all = evaluate.evaluate_fold(root, manifest, annotations, split, None, None,
                                                      methods=("blob",), calibrate_on="all", refine="none")
    assert seen == split.val + split.test
    assert 0.9 < thresholds_all["blob"] < 1.0  # above the spurious change (< 0.9 with noise), below the nodules
    assert (rows_all[rows_all.gt_voxels == 0].pred_voxels == 0).all()
    assert set(rows_all.calibrate_on) == {"all"} and set(rows_all.params_hash).isdisjoint(rows.params_hash)
    # "all" is what rows written before the option meant: their parameter hash is unchanged
    assert "calibrate_on" not in evaluate.evaluation_params(calibrate_on="all")

    with pytest.raises(ValueError, match="calibrate_on"):
        evaluate.evaluate_fold(root, manifest, annotations, split, None, None, methods=("blob",),
                               calibrate_on="healthy")
    nodule_free = next(s for s in (fold_split(manifest, k) for k in range(10)) if not with_nodules & set(s.val))
    with pytest.raises(ValueError, match=f"fold {nodule_free.fold}: none of its"):
        evaluate.evaluate_fold(root, manifest, annotations, nodule_free, None, None, methods=("blob",))


def test_otsu_mode_needs_no_validation(cohort, monkeypatch):
    root, manifest, annotations = cohort
    seen = []

    def fake_maps(prepared, *args):
        seen.append(prepared.uid)
        return {"good": prepared.gt_grid * 1.0}

    monkeypatch.setattr(evaluate, "difference_maps", fake_maps)
    split = fold_split(manifest, fold=1)
    rows, thresholds = evaluate.evaluate_fold(root, manifest, annotations, split, None, None, methods=("good",),
                                              threshold_mode="otsu")
    assert thresholds == {} and seen == split.test and set(rows.threshold) == {"otsu"} and rows.val_dice.isna().all()
    with pytest.raises(ValueError, match="threshold_mode"):
        evaluate.evaluate_fold(root, manifest, annotations, split, None, None, threshold_mode="best-on-test")


class _IdentityAutoencoder:
    """encode/decode that change nothing: the oracle map is then the twin difference itself."""

    def encode(self, x):
        return x

    def decode(self, z):
        return z


def test_oracle_finds_the_nodules_through_a_perfect_autoencoder(cohort):
    root, manifest, annotations = cohort
    with_nodules = set(annotations.seriesuid)
    split = next(s for s in (fold_split(manifest, k) for k in range(10))
                 if with_nodules & set(s.val) and with_nodules & set(s.test))
    rows, thresholds = evaluate.evaluate_fold(root, manifest, annotations, split, _IdentityAutoencoder(), None,
                                              methods=(evaluate.ORACLE,))
    scored = rows[rows.gt_voxels > 0]
    assert len(scored) and scored.dsc.min() > 0.7, scored[["seriesuid", "dsc"]]  # soft edges cost a little
    assert thresholds[evaluate.ORACLE] > 0
    healthy = rows[rows.gt_voxels == 0]
    assert (healthy.pred_voxels == 0).all()  # no nodule: scan and twin are the same image


def test_oracle_needs_a_phantom_tree_of_the_same_cohort(cohort, tmp_path):
    root, manifest, annotations = cohort
    prepared = evaluate.prepare(evaluate.load_case(root, manifest.iloc[0], annotations))
    with pytest.raises(ValueError, match="no healthy twin"):
        evaluate.oracle_map(prepared, _IdentityAutoencoder())
    with pytest.raises(ValueError, match="cohort seed 0, not 5"):
        evaluate.attach_healthy_twin(prepared, PhantomConfig(seed=5))
    other = tmp_path / "not_a_phantom"
    other.mkdir()
    with pytest.raises(DataError, match="cohort.json"):
        evaluate.evaluate_fold(other, manifest, annotations, fold_split(manifest, 0), _IdentityAutoencoder(), None,
                               methods=(evaluate.ORACLE,))
