"""Aggregation and Table 1 on synthetic tidy rows, every number against a direct computation."""

import math
import os

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from tfg_core import report
from tfg_core.report import aggregate, table1, table1_markdown, write_report

FOLDS = (0, 1, 2)
UIDS = ("case0", "case1", "case2", "case3")  # the same uids in every fold: pairing must use the fold too
HEALTHY = "healthy"


def _row(fold, uid, backbone, method, dsc, msd, pred_voxels=100, gt_voxels=120, experiment="exp"):
    return {"experiment": experiment, "fold": fold, "seriesuid": uid, "backbone": backbone, "method": method,
            "dsc": dsc, "msd_mm": msd, "pred_voxels": pred_voxels, "gt_voxels": gt_voxels,
            "empty_pred": pred_voxels == 0, "both_empty": pred_voxels == 0 and gt_voxels == 0,
            "threshold": 0.5, "n_nodules": int(gt_voxels > 0), "params_hash": "abc"}


def _synthetic_rows(seed=0) -> pd.DataFrame:
    """Two backbones, 3 folds × (4 scans with a nodule + 1 without). WeakMedSAM on TinyViT only; one empty
    CAM prediction (MSD inf); Score-CAM mostly empty (median inf); both-empty healthy scans; a method with
    too few cases for a test and one identical to TFG."""
    rng = np.random.default_rng(seed)
    rows = []
    for backbone in ("tinyvit", "resnet50"):
        methods = ("tfg", "cam", "weakmedsam", "scorecam") if backbone == "tinyvit" else ("tfg", "cam", "no_prior")
        tfg = {}
        for method in methods:
            for fold in FOLDS:
                for i, uid in enumerate(UIDS):
                    dsc, msd = float(rng.uniform(0.1, 0.9)), float(rng.uniform(1.0, 9.0))
                    if method == "tfg":
                        tfg[fold, uid] = dsc, msd
                    if method == "no_prior":
                        dsc, msd = tfg[fold, uid]  # all differences zero
                    empty = (backbone, method, fold, uid) == ("tinyvit", "cam", 1, "case2") or \
                        (method == "scorecam" and i > 0)
                    rows.append(_row(fold, uid, backbone, method, 0.0, math.inf, pred_voxels=0) if empty
                                else _row(fold, uid, backbone, method, dsc, msd))
                # healthy scan: TFG predicts nothing (both empty), the others a false positive
                fp = 0 if method == "tfg" else 30
                rows.append(_row(fold, HEALTHY, backbone, method, math.nan if fp == 0 else 0.0,
                                 math.nan if fp == 0 else math.inf, pred_voxels=fp, gt_voxels=0))
        # unguided: only 4 scored cases (fewer than 6 pairs)
        for uid in UIDS:
            rows.append(_row(0, uid, backbone, "unguided", float(rng.uniform(0.1, 0.9)), 3.0))
    return pd.DataFrame(rows)


@pytest.fixture
def rows():
    return _synthetic_rows()


def _dsc_by_case(rows, backbone, method):
    g = rows[(rows.backbone == backbone) & (rows.method == method) & (rows.gt_voxels > 0)]
    return {(f, u): d for f, u, d in zip(g.fold, g.seriesuid, g.dsc)}


def test_every_aggregate_number_against_a_direct_computation(rows):
    agg = aggregate(rows)
    expected_keys = {("tinyvit", m) for m in ("tfg", "cam", "weakmedsam", "scorecam", "unguided")} | \
                    {("resnet50", m) for m in ("tfg", "cam", "no_prior", "unguided")}
    assert set(zip(agg.backbone, agg.method)) == expected_keys
    for r in agg.itertuples():
        group = rows[(rows.backbone == r.backbone) & (rows.method == r.method)]
        scored = group[group.gt_voxels > 0]
        dsc = scored.dsc.to_numpy()
        msd = scored.msd_mm.to_numpy()
        assert r.experiment == "exp"
        assert r.n == len(scored) and r.n_folds == scored.fold.nunique() and r.n_cohorts == 1
        assert math.isclose(r.dsc_mean, dsc.sum() / len(dsc))
        assert math.isclose(r.dsc_std, math.sqrt(((dsc - dsc.mean()) ** 2).sum() / (len(dsc) - 1)))  # ddof=1
        sorted_msd = np.sort(msd)
        k = len(sorted_msd)
        median = sorted_msd[k // 2] if k % 2 else (sorted_msd[k // 2 - 1] + sorted_msd[k // 2]) / 2
        assert r.msd_median_mm == median  # inf included, not dropped
        finite = np.sort(msd[np.isfinite(msd)])
        assert math.isclose(r.msd_median_finite_mm, float(np.median(finite)))
        assert r.n_empty_pred == int((scored.pred_voxels == 0).sum())
        assert r.n_both_empty_excluded == int(((group.pred_voxels == 0) & (group.gt_voxels == 0)).sum())
        assert r.n_no_gt_excluded == int((group.gt_voxels == 0).sum())

    by = agg.set_index(["backbone", "method"])
    assert by.loc[("tinyvit", "cam"), "n_empty_pred"] == 1
    assert math.isfinite(by.loc[("tinyvit", "cam"), "msd_median_mm"])
    assert by.loc[("tinyvit", "scorecam"), "msd_median_mm"] == math.inf  # 9 of 12 empty
    assert by.loc[("tinyvit", "scorecam"), "n_empty_pred"] == 9
    assert by.loc[("tinyvit", "tfg"), "n_both_empty_excluded"] == 3
    assert by.loc[("tinyvit", "cam"), "n_both_empty_excluded"] == 0
    assert by.loc[("tinyvit", "cam"), "n_no_gt_excluded"] == 3
    assert (by.loc["tinyvit"].n == [12, 12, 12, 12, 4]).all()


def test_wilcoxon_against_scipy_on_hand_paired_arrays(rows):
    agg = aggregate(rows).set_index(["backbone", "method"])
    for backbone, method in [("tinyvit", "cam"), ("tinyvit", "weakmedsam"), ("tinyvit", "scorecam"),
                             ("resnet50", "cam")]:
        ref, other = _dsc_by_case(rows, backbone, "tfg"), _dsc_by_case(rows, backbone, method)
        keys = sorted(ref)
        expected = wilcoxon([ref[k] for k in keys], [other[k] for k in keys]).pvalue
        r = agg.loc[(backbone, method)]
        assert r.n_pairs == 12
        assert math.isclose(r.wilcoxon_p, expected, rel_tol=1e-12)
        assert r.p_note == ""
    assert agg.loc[("tinyvit", "tfg"), "p_note"] == "reference" and math.isnan(agg.loc[("tinyvit", "tfg"), "wilcoxon_p"])
    few = agg.loc[("resnet50", "unguided")]
    assert few.n_pairs == 4 and math.isnan(few.wilcoxon_p) and "fewer than 6" in few.p_note
    same = agg.loc[("resnet50", "no_prior")]
    assert same.n_pairs == 12 and math.isnan(same.wilcoxon_p) and same.p_note == "all differences zero"


def test_pairing_is_by_fold_and_seriesuid_not_row_order(rows):
    expected = aggregate(rows).set_index(["backbone", "method"]).sort_index()
    shuffled = rows.sample(frac=1.0, random_state=3).reset_index(drop=True)
    # drop one CAM case: pairs must shrink to the shared cases, not shift
    shuffled = shuffled[~((shuffled.backbone == "tinyvit") & (shuffled.method == "cam") & (shuffled.fold == 2)
                          & (shuffled.seriesuid == "case0"))]
    got = aggregate(shuffled).set_index(["backbone", "method"]).sort_index()
    same = expected.drop(("tinyvit", "cam"))
    pd.testing.assert_frame_equal(got.drop(("tinyvit", "cam")), same)
    ref, cam = _dsc_by_case(rows, "tinyvit", "tfg"), _dsc_by_case(rows, "tinyvit", "cam")
    keys = sorted(set(ref) - {(2, "case0")})
    r = got.loc[("tinyvit", "cam")]
    assert r.n_pairs == 11
    assert math.isclose(r.wilcoxon_p, wilcoxon([ref[k] for k in keys], [cam[k] for k in keys]).pvalue)


def test_repeated_cases_and_mixed_experiments_are_refused(rows):
    with pytest.raises(ValueError, match="repeated"):
        aggregate(pd.concat([rows, rows.iloc[:1]]))
    other = rows.assign(experiment="exp2", dsc=rows.dsc * 0.5)
    mixed = pd.concat([rows, other])
    with pytest.raises(ValueError, match=r"exp.*exp2"):
        aggregate(mixed)
    chosen = aggregate(mixed, experiment="exp2")
    assert (chosen.experiment == "exp2").all()
    pd.testing.assert_frame_equal(chosen.drop(columns="experiment"), aggregate(other).drop(columns="experiment"))
    with pytest.raises(ValueError, match="nope"):
        aggregate(rows, experiment="nope")


def test_table1_layout_order_dash_and_extra_backbone(rows):
    tiny = rows[rows.backbone == "resnet50"].assign(backbone="tiny")
    agg = aggregate(pd.concat([rows, tiny]))
    table = table1(agg)
    assert list(table.index) == ["CAM", "Score-CAM", "WeakMedSAM", "TFG (ours)", "no-prior ablation",
                                 "unguided difference"]
    assert list(dict.fromkeys(table.columns.get_level_values(0))) == ["TinyViT", "ResNet-50", "tiny (CPU demo)"]
    assert table.loc["WeakMedSAM", ("ResNet-50", "DSC (mean ± std)")] == "–"
    assert table.loc["WeakMedSAM", ("ResNet-50", "MSD mm (median)")] == "–"
    assert table.loc["no-prior ablation", ("TinyViT", "n")] == "–"
    r = agg.set_index(["backbone", "method"]).loc[("tinyvit", "cam")]
    assert table.loc["CAM", ("TinyViT", "DSC (mean ± std)")] == f"{r.dsc_mean:.3f} ± {r.dsc_std:.3f}"
    assert table.loc["CAM", ("TinyViT", "n")] == "12"
    assert table.loc["Score-CAM", ("TinyViT", "MSD mm (median)")] == "∞"
    # a listed backbone without rows is left out rather than shown as all dashes
    only_tiny = table1(aggregate(tiny))
    assert list(dict.fromkeys(only_tiny.columns.get_level_values(0))) == ["tiny (CPU demo)"]


def test_markdown_bolds_the_best_dsc_per_backbone_and_states_n_and_p(rows):
    agg = aggregate(rows)
    text = table1_markdown(agg, title="Table 1")
    by = agg.set_index(["backbone", "method"])
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    for backbone, col in (("tinyvit", 1), ("resnet50", 4)):
        scores = by.loc[backbone].dsc_mean
        best = set(scores.index[scores == scores.max()])
        for method, r in by.loc[backbone].iterrows():
            cell = lines[report.METHOD_NAMES[method]].strip(" |").split(" | ")[col]
            plain = f"{r.dsc_mean:.3f} ± {r.dsc_std:.3f}"
            assert cell == (f"**{plain}**" if method in best else plain)
    # TinyViT has one best; on ResNet-50 the no-prior rows copy TFG's, a tie: both bold
    assert text.count("**") == 2 * 3
    weak = lines["WeakMedSAM"].strip(" |").split(" | ")
    assert weak[4:7] == ["–", "–", "–"]
    assert "n = 12 over 3 folds" in text
    # healthy scans: excluded from Dice, but how many got a mask is stated (TinyViT's TFG left all 3 empty, CAM none)
    assert "TFG (ours) 3 (3 left empty, 0 with a mask)" in text and "CAM 3 (0 left empty, 3 with a mask)" in text
    assert "TinyViT CAM 1" in text and "Score-CAM 9" in text  # empties stated
    p = by.loc[("tinyvit", "cam"), "wilcoxon_p"]
    assert f"TinyViT CAM: p = {p:.3f} (12 pairs)" in text
    assert "fewer than 6 pairs, 4 pairs" in text and "all differences zero" in text


def test_folds_of_pooled_phantom_cohorts_count_once_per_cohort():
    """Folds are numbered 0-9 in every cohort: two phantom cohorts pooled over the same three folds are six folds."""
    uid = "1.2.826.0.1.3680043.8.498.834.{}.{}".format  # tfg_core.data.phantom.series_uid's layout
    pooled = pd.DataFrame([_row(fold, uid(seed, 10 * fold + i), "tiny", method, 0.5, 2.0, experiment="pooled")
                           for seed in (2, 3) for fold in FOLDS for i in range(2) for method in ("tfg", "ig")])
    agg = aggregate(pooled).set_index("method")
    assert (agg.n == 12).all() and (agg.n_folds == 6).all() and (agg.n_cohorts == 2).all()
    assert "n = 12 over 6 folds of 2 cohorts" in table1_markdown(aggregate(pooled), title="T")
    assert report.cohort_of(uid(3, 7)) == "phantom seed 3" and report.cohort_of("1.3.6.1.4.1.14519.5.2.1") == ""
    one = aggregate(pooled[pooled.seriesuid.str.contains(r"\.834\.2\.")]).set_index("method")
    assert (one.n_folds == 3).all() and (one.n_cohorts == 1).all()


def test_write_report_files_are_complete(rows, tmp_path):
    paths = write_report(rows, tmp_path / "out", title="T1")
    assert set(paths) == {"table1_md", "table1_csv", "aggregate_csv"}
    assert sorted(os.listdir(tmp_path / "out")) == ["aggregate.csv", "table1.csv", "table1.md"]  # no temp files
    agg = aggregate(rows)
    back = pd.read_csv(paths["aggregate_csv"], keep_default_na=False, na_values=["", "NaN", "nan"])
    assert list(back.columns) == list(agg.columns)
    for col in ("n", "n_pairs", "dsc_mean", "dsc_std", "msd_median_mm", "wilcoxon_p"):
        np.testing.assert_allclose(back[col].to_numpy(float), agg[col].to_numpy(float), equal_nan=True)
    assert paths["table1_md"].read_text(encoding="utf-8") == table1_markdown(agg, title="T1")
    t1 = pd.read_csv(paths["table1_csv"])
    assert t1.columns[0] == "Method" and "TinyViT DSC (mean ± std)" in t1.columns and len(t1) == 6


def test_failed_write_leaves_old_files_untouched(rows, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_report(rows, out)
    old = {name: (out / name).read_bytes() for name in os.listdir(out)}

    # a writer killed half-way through a CSV: the old file stays, no temp file is left
    def half_then_fail(self, path, *args, **kwargs):
        with open(path, "w") as fh:
            fh.write("half,written\n")
        raise RuntimeError("killed")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    with pytest.raises(RuntimeError, match="killed"):
        write_report(rows.assign(dsc=rows.dsc * 0.5), out)
    monkeypatch.undo()
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == old

    # a failure before writing (mixed experiments) changes nothing either
    with pytest.raises(ValueError):
        write_report(pd.concat([rows, rows.assign(experiment="other")]), out)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == old


def test_where_the_maps_peak_is_aggregated_when_the_rows_carry_it(rows):
    rows = rows.copy()
    rng = np.random.default_rng(3)
    rows["peak_dist_mm"] = np.where(rows.gt_voxels > 0, rng.uniform(0, 20, len(rows)), np.nan)
    rows["peak_on_nodule"] = rows.peak_dist_mm <= 5.5
    agg = aggregate(rows).set_index(["backbone", "method"])
    for (backbone, method), g in rows[rows.gt_voxels > 0].groupby(["backbone", "method"]):
        assert agg.loc[(backbone, method), "peak_on_nodule_rate"] == pytest.approx(g.peak_on_nodule.mean())
        assert agg.loc[(backbone, method), "peak_dist_median_mm"] == pytest.approx(g.peak_dist_mm.median())
    assert "Map maximum on the nodule" in table1_markdown(agg.reset_index())
    assert aggregate(rows.drop(columns=["peak_dist_mm", "peak_on_nodule"])).peak_on_nodule_rate.isna().all()


def test_mean_dice_confidence_interval_is_a_seeded_bootstrap_of_the_scans(rows):
    from scipy.stats import bootstrap

    agg = aggregate(rows)
    for r in agg.itertuples():
        dsc = rows[(rows.backbone == r.backbone) & (rows.method == r.method) & (rows.gt_voxels > 0)].dsc.to_numpy()
        expected = bootstrap((np.sort(dsc),), np.mean, confidence_level=0.95, n_resamples=10_000, method="percentile",
                             rng=np.random.default_rng(0)).confidence_interval
        assert (r.dsc_ci_low, r.dsc_ci_high) == pytest.approx((expected.low, expected.high))
        assert r.dsc_ci_low < r.dsc_mean < r.dsc_ci_high
    assert aggregate(rows).equals(agg)  # seeded: the same table twice
    # the interval shrinks like 1/sqrt(n): sixteen copies of the scans give about a quarter of the width
    dsc = rows[(rows.backbone == "tinyvit") & (rows.method == "tfg") & (rows.gt_voxels > 0)].dsc.to_numpy()
    low, high = report.mean_ci(dsc)
    low16, high16 = report.mean_ci(np.tile(dsc, 16))
    assert 0.2 < (high16 - low16) / (high - low) < 0.3
    assert all(math.isnan(v) for v in report.mean_ci([0.5]))  # one scan: no interval
    assert report.mean_ci([0.0, 0.0, 0.0]) == (0.0, 0.0)  # no spread: the mean itself
    text = table1_markdown(agg)
    by = agg.set_index(["backbone", "method"])
    tfg = by.loc[("tinyvit", "tfg")]
    assert f"TinyViT TFG (ours) [{tfg.dsc_ci_low:.3f}, {tfg.dsc_ci_high:.3f}]" in text
