"""The README's Run command and the CLI's error handling."""

import numpy as np
import pandas as pd
import pytest

from tfg_core.cli import main
from tfg_core.data.folds import fold_split
from tfg_core.data.luna16 import build_manifest, read_annotations


def test_demo_runs_on_the_embedded_default(tmp_path, capsys):
    out = tmp_path / "demo"
    # cheap methods only: IG adds minutes per fold on two cores (the default runs it too; Score-CAM is opt-in)
    assert main(["demo", "--out", str(out), "--fold", "2", "--methods", "tfg", "unguided", "cam", "--quiet"]) == 0
    table = pd.read_csv(out / "fold2_cases.csv")
    assert len(table) == 10 and set(table.fold) == {2}
    assert (table.positive_slices > 0).sum() == (table.n_nodules > 0).sum()  # labels follow the ground truth
    assert (out / "fold2_overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "phantom" / "annotations.csv").is_file()
    printed = capsys.readouterr().out
    assert "fold 2: 80 train / 10 val / 10 test scans" in printed
    assert (out / "fold2_methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table1 = (out / "report" / "table1.md").read_text()
    assert "TFG (ours)" in table1 and "CAM" in table1 and "tiny (CPU demo)" in table1
    aggregate = pd.read_csv(out / "report" / "aggregate.csv").set_index("method")
    assert aggregate.loc["cam", "n_pairs"] == aggregate.loc["tfg", "n"]  # paired over the same scans
    # the same scans split by nodule size (the cohort's annotations): every scored scan in exactly one range
    by_size = pd.read_csv(out / "report" / "by_size.csv")
    assert by_size.query("method == 'tfg'").n.sum() == aggregate.loc["tfg", "n"]
    assert "by nodule size" in (out / "report" / "by_size.md").read_text()
    # (several folds pooled in one report, a finished fold read back and a baseline run alone:
    # test_demo_resumes_..., with CAM alone, since a second guided fold costs minutes of CI)
    cam = pd.read_csv(out / "all_folds_results.csv").query("method == 'cam'").reset_index(drop=True)
    assert len(cam) == 10 and set(cam.refine) == {"density_after"}  # the evaluation default
    # the protocol variants below rerun the fold in the same folder (other rows, the cases table reused);
    # the paper's protocol, the map thresholded and nothing redrawn: the same threshold (density_after calibrates
    # on the unrefined masks), other masks, its own hash
    assert main(["demo", "--out", str(out), "--fold", "2", "--methods", "cam",
                 "--refine", "none", "--quiet"]) == 0
    plain = pd.read_csv(out / "all_folds_results.csv")
    assert f"reused {out / 'fold2_cases.csv'}" in capsys.readouterr().out
    assert set(plain.refine) == {"none"} and set(plain.params_hash).isdisjoint(cam.params_hash)
    np.testing.assert_array_equal(plain.threshold.to_numpy(), cam.threshold.to_numpy())
    assert (plain.pred_voxels.to_numpy() != cam.pred_voxels.to_numpy()).any()
    # the refinement with a threshold calibrated on the refined masks: recorded in the rows, its own hash
    assert main(["demo", "--out", str(out), "--fold", "2", "--methods", "cam",
                 "--refine", "density", "--quiet"]) == 0
    refined = pd.read_csv(out / "all_folds_results.csv")
    assert set(refined.refine) == {"density"} and set(refined.params_hash).isdisjoint(cam.params_hash)
    # each map as a fraction of its scan's maximum: recorded in the rows, its own hash and threshold (a fraction)
    assert main(["demo", "--out", str(out), "--fold", "2", "--methods", "cam",
                 "--map-scale", "scan", "--quiet"]) == 0
    scaled = pd.read_csv(out / "all_folds_results.csv")
    assert set(scaled.map_scale) == {"scan"} and set(cam.map_scale) == {"absolute"}
    assert set(scaled.params_hash).isdisjoint(cam.params_hash) and 0 < scaled.threshold.iloc[0] < 1
    # calibrated on every validation scan instead of those with a nodule: recorded in the rows, its own hash
    root = tmp_path / "phantom"
    split = fold_split(build_manifest(root), 2)
    n, k = len(split.val), len(set(split.val) & set(read_annotations(root / "annotations.csv").seriesuid))
    assert 0 < k < n and f"thresholds calibrated on the {k} validation scans with a nodule, of {n}" in \
        capsys.readouterr().out
    assert main(["demo", "--out", str(out), "--fold", "2", "--methods", "cam",
                 "--calibrate-on", "all", "--quiet"]) == 0
    assert f"thresholds calibrated on all {n} validation scans" in capsys.readouterr().out
    on_all = pd.read_csv(out / "all_folds_results.csv")
    assert set(on_all.calibrate_on) == {"all"} and set(cam.calibrate_on) == {"nodules"}
    assert set(on_all.params_hash).isdisjoint(cam.params_hash)
    # a healthy validation scan counts 1 when left empty and 0 otherwise, so at one threshold the mean over all n
    # scans is (k * the nodule scans' mean + e) / n, e of the n - k healthy scans left empty
    val_all, val_nodules = on_all.val_dice.iloc[0], cam.val_dice.iloc[0]
    assert n * val_all >= k * val_nodules - 1e-9  # "all" maximises its own mean, which is >= this at any threshold
    if on_all.threshold.iloc[0] == cam.threshold.iloc[0]:
        left_empty = n * val_all - k * val_nodules
        assert abs(left_empty - round(left_empty)) < 1e-6 and 0 <= round(left_empty) <= n - k


def test_demo_resumes_finished_folds_and_reruns_anything_changed_or_unfinished(tmp_path, capsys, monkeypatch,
                                                                                 phantom_copy):
    import json

    import tfg_core.evaluate

    phantom_copy(tmp_path / "phantom")  # the cohort of an earlier run (its first-use write: the test above)
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--fold", "2", "--methods", "cam", "--quiet"]
    assert main(args) == 0
    first = pd.read_csv(out / "all_folds_results.csv")
    finished = out / "fold2_finished.json"
    key = json.loads(finished.read_text())
    assert key["methods"] == ["cam"] and key["fold"] == 2 and set(first.params_hash) == {key["params_hash"]}
    table = pd.read_csv(out / "fold2_cases.csv")

    # several folds: the finished one is read back, only fold 3 runs, and one report pools both
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--fold", "2", "3", "--methods", "cam", "--quiet"]) == 0
    assert pd.read_csv(out / "fold2_cases.csv").equals(table)
    pooled = pd.read_csv(out / "all_folds_results.csv")
    assert set(pooled.fold) == {2, 3} and set(pooled.method) == {"cam"} and len(pooled) == 20  # a row per test scan
    assert (pooled.seconds >= 0).all() and (out / "fold3_finished.json").is_file()
    pd.testing.assert_frame_equal(pooled[pooled.fold == 2].reset_index(drop=True), first)
    printed = capsys.readouterr().out
    assert "folds 2, 3" in printed and "fold 2: reusing" in printed and "fold 3: reusing" not in printed
    assert f"reused {out / 'fold2_cases.csv'}" in printed and f"wrote {out / 'fold3_cases.csv'}" in printed

    calls = []

    def must_not_run(*a, **k):
        calls.append(1)
        raise RuntimeError("evaluate_fold ran")

    monkeypatch.setattr(tfg_core.evaluate, "evaluate_fold", must_not_run)
    capsys.readouterr()
    assert main(args) == 0  # nothing changed: the fold is read back, not run
    assert "fold 2: reusing" in capsys.readouterr().out and not calls
    pd.testing.assert_frame_equal(pd.read_csv(out / "all_folds_results.csv"), first)

    # anything that decides the rows, --fresh, or a fold that never finished: it runs again (every option that
    # decides the rows enters params_hash, the test above; here one protocol option and two guidance parameters)
    for changed in (["--fresh"], ["--refine", "density"], ["--strength", "2"], ["--start-index", "20"]):
        capsys.readouterr()
        with pytest.raises(RuntimeError, match="evaluate_fold ran"):
            main(args + changed)
        # the cases table depends on the scans and the predictor only: --fresh alone builds it again
        built = f"wrote {out / 'fold2_cases.csv'}" in capsys.readouterr().out
        assert built == (changed == ["--fresh"]) and pd.read_csv(out / "fold2_cases.csv").equals(table)
    cases_key = out / "fold2_cases.json"
    made_with = json.loads(cases_key.read_text())
    assert made_with["predictor_sha256"] == key["predictor_sha256"] and made_with["cohort"]["seed"] == 0
    cases_key.write_text(json.dumps({**made_with, "predictor_sha256": "0" * 64}))  # as if another predictor had made it
    assert not finished.exists()  # the first rerun started over: the old rows no longer count as finished
    finished.write_text(json.dumps(key))
    capsys.readouterr()
    assert main(args) == 0
    assert f"wrote {out / 'fold2_cases.csv'}" in capsys.readouterr().out and json.loads(cases_key.read_text()) == made_with
    finished.write_text("{not json")  # e.g. the disk filled up mid-write of an older version
    with pytest.raises(RuntimeError):
        main(args)
    finished.write_text(json.dumps(key))
    (out / "fold2_results.csv").write_text(first.assign(method="ig").to_csv(index=False))  # rows not of this key
    with pytest.raises(RuntimeError):
        main(args)
    assert len(calls) == 6  # four changes and two untrustworthy records


def test_demo_replicates_on_a_fresh_cohort_and_refuses_the_training_one(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--fold", "4", "--methods", "cam", "--cohort-seed", "2", "--quiet"]) == 0
    rows = pd.read_csv(out / "all_folds_results.csv")
    # the fresh cohort sits beside the default one and shares no scan with it (the series uids carry the seed)
    fresh = build_manifest(tmp_path / "phantom_seed2")
    assert set(rows.seriesuid) == set(fold_split(fresh, 4).test) and len(rows) == 10
    assert not (tmp_path / "phantom").exists()
    assert "Fresh phantom cohort (seed 2)" in (out / "report" / "table1.md").read_text()
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--fold", "4", "--cohort-seed", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cohort seed 1" in err and "training cohort" in err and "Traceback" not in err


def test_cli_method_names_are_the_evaluation_methods():
    import inspect

    from tfg_core.cli import (ALL_DEMO_METHODS, CALIBRATION_SCANS, DENSITY_CHANGES, DIFFERENCES, GRADIENT_WEIGHTS,
                              MAP_SCALES, REFINEMENTS, build_parser)
    from tfg_core.cli import EVALUATION_REFINE as DEMO_REFINE
    from tfg_core.demo import DEFAULT_METHODS, run_demo, run_demo_folds
    from tfg_core.evaluate import ALL_METHODS, evaluate_fold
    from tfg_core.guidance import DENSITY_CHANGES as DIRECTIONS
    from tfg_core.guidance import GRADIENT_WEIGHTS as WEIGHTS
    from tfg_core.guidance import GuidanceConfig
    from tfg_core.pseudolabel import SegmentConfig
    from tfg_core.segment import DIFFERENCES as MAP_MODES
    from tfg_core.segment import CALIBRATION_SCANS as POPULATIONS
    from tfg_core.segment import MAP_SCALES as SCALES
    from tfg_core.segment import REFINEMENTS as POSTPROCESSING
    from tfg_core.segment import EVALUATION_REFINE

    assert set(ALL_DEMO_METHODS) == set(ALL_METHODS) and set(DEFAULT_METHODS) < set(ALL_METHODS)
    assert DIFFERENCES == MAP_MODES and GuidanceConfig().difference == DIFFERENCES[0]
    assert DENSITY_CHANGES == DIRECTIONS and GuidanceConfig().density_change == DENSITY_CHANGES[0]
    assert GRADIENT_WEIGHTS == WEIGHTS and GuidanceConfig().gradient_weight == GRADIENT_WEIGHTS[0]
    assert REFINEMENTS == POSTPROCESSING and SegmentConfig().refine == REFINEMENTS[0]
    # tfg demo and evaluate_fold default to the refinement after the map's own threshold; pseudo-labels do not
    assert EVALUATION_REFINE == DEMO_REFINE == "density_after"
    for function in (evaluate_fold, run_demo, run_demo_folds):
        assert inspect.signature(function).parameters["refine"].default == EVALUATION_REFINE
    assert build_parser().parse_args(["demo"]).refine == EVALUATION_REFINE
    # tfg demo starts guidance where the demo flow was measured to do best; tfg segment too with the demo flow, and
    # where GuidanceConfig (the paper) does with MAISI-v2 (resolved in _segment, like the grid)
    from tfg_core.cli import DEMO_START_INDEX as CLI_DEMO_START
    from tfg_core.cli import START_INDEX as CLI_START
    from tfg_core.demo import DEMO_START_INDEX

    assert CLI_DEMO_START == DEMO_START_INDEX == build_parser().parse_args(["demo"]).start_index
    assert CLI_START == GuidanceConfig().start_index
    assert build_parser().parse_args(["segment", "x", "--out", "o"]).start_index is None
    assert MAP_SCALES == SCALES and SegmentConfig().map_scale == MAP_SCALES[0]
    assert CALIBRATION_SCANS == POPULATIONS
    assert "map_scale" not in SegmentConfig().as_dict()
    assert SegmentConfig(map_scale="scan").as_dict()["map_scale"] == "scan"
    # the default leaves the resume hash of earlier runs as it was; the refinement enters it
    assert "refine" not in SegmentConfig().as_dict() and SegmentConfig(refine="density").as_dict()["refine"] == "density"


def test_cli_reports_data_errors_without_traceback(tmp_path, capsys):
    missing = tmp_path / "no_luna16_here"
    assert main(["manifest", str(missing), "--out", str(tmp_path / "m.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "m.csv").exists()


def test_report_pools_result_files(tmp_path, capsys):
    def rows(method, dsc, experiment):
        return pd.DataFrame({"experiment": experiment, "fold": [0] * 7, "seriesuid": [f"s{i}" for i in range(7)],
                             "backbone": "tiny", "method": method, "dsc": dsc, "msd_mm": 3.0, "pred_voxels": 9,
                             "gt_voxels": 10, "empty_pred": False, "both_empty": False})

    rows("tfg", [0.5, 0.6, 0.7, 0.8, 0.4, 0.9, 0.65], "demo").to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "more").mkdir()
    rows("cam", [0.1, 0.2, 0.3, 0.2, 0.1, 0.3, 0.25], "wms").to_csv(tmp_path / "more" / "b.csv", index=False)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "a.csv"), str(tmp_path / "more"), "--out", str(out), "--relabel", "x"]) == 0
    aggregate = pd.read_csv(out / "aggregate.csv").set_index("method")
    assert aggregate.loc["cam", "n_pairs"] == 7 and aggregate.loc["cam", "wilcoxon_p"] < 0.05
    assert "**0.650" in capsys.readouterr().out  # TFG's mean, bold as the best
    assert main(["report", str(tmp_path / "nothing.csv"), "--out", str(out)]) == 2
    assert "nothing.csv" in capsys.readouterr().err


def test_report_supersede_pools_a_rerun_with_an_earlier_run(tmp_path, capsys):
    def rows(method, dsc, params_hash):
        return pd.DataFrame({"experiment": "demo", "fold": [0] * 7, "seriesuid": [f"s{i}" for i in range(7)],
                             "backbone": "tiny", "method": method, "dsc": dsc, "msd_mm": 3.0, "pred_voxels": 9,
                             "gt_voxels": 10, "empty_pred": False, "both_empty": False, "params_hash": params_hash})

    pd.concat([rows("tfg", [0.1] * 7, "old"), rows("cam", [0.3] * 7, "old")]).to_csv(tmp_path / "1_old.csv", index=False)
    rows("tfg", [0.5] * 7, "new").to_csv(tmp_path / "2_rerun.csv", index=False)
    files = [str(tmp_path / "1_old.csv"), str(tmp_path / "2_rerun.csv")]
    # without it the two TFG rows of a case are refused (they would corrupt the pairing)
    assert main(["report", *files, "--out", str(tmp_path / "r0")]) == 2
    assert "7 repeated" in capsys.readouterr().err
    assert main(["report", *files, "--out", str(tmp_path / "r1"), "--supersede"]) == 0
    assert "superseded by later files: 7 rows (tfg 7)" in capsys.readouterr().out
    aggregate = pd.read_csv(tmp_path / "r1" / "aggregate.csv").set_index("method")
    assert aggregate.loc["tfg", "dsc_mean"] == pytest.approx(0.5) and aggregate.loc["cam", "dsc_mean"] == pytest.approx(0.3)


def test_segment_starts_guidance_where_its_flow_was_measured(monkeypatch):
    """Without --start-index, tfg segment starts where tfg demo does with the demo flow and at GuidanceConfig's
    (the paper's) step with MAISI-v2; an explicit value wins either way."""
    import pandas as pd

    import tfg_core.experiment
    import tfg_core.pseudolabel
    from tfg_core.demo import DEMO_START_INDEX
    from tfg_core.guidance import GuidanceConfig

    seen = []
    monkeypatch.setattr(tfg_core.experiment, "load_flow", lambda *a, **k: None)
    monkeypatch.setattr(tfg_core.experiment, "load_fold_predictor", lambda *a, **k: None)
    monkeypatch.setattr(tfg_core.pseudolabel, "segment_inputs",
                        lambda inputs, out, flow, predictor, config, *a, **k: seen.append(config.guidance.start_index)
                        or pd.DataFrame(columns=["state"]))
    for extra in ([], ["--flow", "maisi-v2"], ["--start-index", "20"], ["--flow", "maisi-v2", "--start-index", "20"]):
        main(["segment", "scan.mhd", "--out", "o", "--quiet", *extra])
    assert seen == [DEMO_START_INDEX, GuidanceConfig().start_index, 20, 20] and DEMO_START_INDEX != 15
