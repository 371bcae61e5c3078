"""Failure diagnosis of guided segmentations: the stage rule, each stage on constructed maps, and the real pipeline
reproducing its own result rows."""

import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import tfg_core.diagnose as diagnose
from tfg_core.ablation import subsample_split
from tfg_core.data.cases import load_case
from tfg_core.data.folds import fold_split
from tfg_core.data.luna16 import build_manifest, read_annotations
from tfg_core.diagnose import FAILURE_STAGES, diagnose_case, diagnose_rows, failure_stage
from tfg_core.demo import DEMO_START_INDEX
from tfg_core.evaluate import evaluate_fold, prepare
from tfg_core.guidance import GuidanceConfig


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, phantom_copy):
    """The demo's default cohort: the shipped fold predictors were fine-tuned on its splits."""
    root = phantom_copy(tmp_path_factory.mktemp("cohort") / "phantom")
    return root, build_manifest(root), read_annotations(root / "annotations.csv")


def test_stage_is_the_first_step_that_did_not_happen():
    assert failure_stage(0, True, 0.9, 0.1, 0.5) == "classifier_missed"  # nothing else matters then
    assert failure_stage(2, False, 0.9, 0.1, 0.5) == "classifier_elsewhere"
    assert failure_stage(2, True, 0.2, 0.3, 0.5) == "prior_elsewhere"
    assert failure_stage(2, True, 0.4, 0.3, 0.5) == "below_threshold"
    assert failure_stage(2, True, 0.6, 0.3, 0.5) == "segmented"
    assert failure_stage(2, True, 0.6, 0.9, 0.5) == "segmented"  # found, with a larger change elsewhere as well
    assert set(FAILURE_STAGES) == {"classifier_missed", "classifier_elsewhere", "prior_elsewhere", "below_threshold",
                                   "segmented"}


def _nodule_case(cohort):
    root, manifest, annotations = cohort
    uid = annotations.seriesuid.iloc[0]
    return prepare(load_case(root, manifest.set_index("seriesuid", drop=False).loc[uid], annotations))


@pytest.mark.parametrize("scenario", ["missed", "classifier_elsewhere", "prior_elsewhere", "below", "found"])
def test_each_stage_on_constructed_maps(cohort, monkeypatch, scenario):
    prepared = _nodule_case(cohort)
    gt, lung = prepared.gt_grid, prepared.lung_grid
    far = np.zeros_like(gt)
    z, y, x = np.argwhere(lung & ~gt)[np.argmax(np.linalg.norm(np.argwhere(lung & ~gt) - np.argwhere(gt).mean(0),
                                                                  axis=1))]
    far[z, y, x] = True  # the lung voxel farthest from the nodule
    nodule_slices = np.flatnonzero(gt.any(axis=(1, 2)))
    logits = torch.full((gt.shape[0],), -5.0)
    if scenario != "missed":
        logits[nodule_slices] = 5.0

    def fake_logits(predictor, image, slices, batch):
        return logits[list(slices)]

    tfg = {"missed": 0.0 * gt, "classifier_elsewhere": 0.9 * gt, "prior_elsewhere": 0.2 * gt + 0.8 * far,
           "below": 0.4 * gt + 0.1 * far, "found": 0.9 * gt + 0.1 * far}[scenario]
    no_prior = (far if scenario == "classifier_elsewhere" else gt) * 1.0

    def fake_maps(prepared, flow, predictor, config, methods):
        assert tuple(methods) == ("tfg", "no_prior")
        return {"tfg": tfg.astype(np.float32), "no_prior": no_prior.astype(np.float32)}

    def no_prior_only(prepared, flow, predictor, config, methods):
        assert tuple(methods) == ("no_prior",)  # the given TFG map is not computed again
        return {"no_prior": no_prior.astype(np.float32)}

    monkeypatch.setattr(diagnose, "slice_logits", fake_logits)
    monkeypatch.setattr(diagnose, "difference_maps", fake_maps)
    found = diagnose_case(prepared, flow=None, predictor=None, threshold=0.5)
    expected = {"missed": "classifier_missed", "below": "below_threshold", "found": "segmented"}.get(scenario, scenario)
    assert found["stage"] == expected
    assert found["nodule_voxels"] == gt.sum() and found["nodule_slices"] == len(nodule_slices)
    assert found["positive_slices_on_nodule"] == (0 if scenario == "missed" else len(nodule_slices))
    if scenario == "classifier_elsewhere":
        assert found["classifier_peak_mm"] > 20
    elif scenario != "missed":
        assert found["classifier_peak_mm"] == 0
    # the mask of the "found" map is the nodule itself (0.9 > 0.5 > 0.1): its recomputed Dice is high
    assert (found["dsc_again"] > 0.5) == (scenario in ("found", "classifier_elsewhere"))
    # a map already computed (a notebook's trajectory) is used as given, as an array or a tensor
    monkeypatch.setattr(diagnose, "difference_maps", no_prior_only)
    again = diagnose_case(prepared, flow=None, predictor=None, threshold=0.5, maps={"tfg": torch.as_tensor(tfg)})
    assert again == found
    with pytest.raises(ValueError, match="TFG map shape"):
        diagnose_case(prepared, flow=None, predictor=None, threshold=0.5, maps={"tfg": tfg[1:]})


def test_refuses_a_scan_without_nodule_and_rows_of_other_parameters(cohort):
    root, manifest, annotations = cohort
    healthy = next(u for u in manifest.seriesuid if u not in set(annotations.seriesuid))
    prepared = prepare(load_case(root, manifest.set_index("seriesuid", drop=False).loc[healthy], annotations))
    with pytest.raises(ValueError, match="no nodule on the model grid"):
        diagnose_case(prepared, flow=None, predictor=None, threshold=0.5)
    row = {"method": "tfg", "threshold_mode": "calibrated", "gt_voxels": 10, "fold": 0, "seriesuid": healthy,
           "dsc": 0.0, "threshold": 0.1, "refine": "none", "map_scale": "absolute", "calibrate_on": "nodules",
           "params_hash": "0123456789ab"}
    with pytest.raises(ValueError, match=f"fold 0 scan {healthy}: its row was made with other parameters"):
        diagnose_rows(pd.DataFrame([row]), root, manifest, annotations, None, lambda fold: None, progress=False)


def test_the_shipped_pipeline_reproduces_its_rows(cohort, tmp_path, capsys):
    """evaluate_fold with the shipped flow and fold predictor, then the diagnosis of its rows: the same maps again."""
    from tfg_core.experiment import load_fold_predictor
    from tfg_core.flow.demo import load_demo_flow

    root, manifest, annotations = cohort
    torch.manual_seed(0)
    split = subsample_split(fold_split(manifest, 0), annotations, max_val=1, max_test=1)  # a nodule scan first
    flow, predictor = load_demo_flow(), load_fold_predictor(0)
    config = GuidanceConfig(start_index=DEMO_START_INDEX)  # as tfg demo makes its rows
    rows, thresholds = evaluate_fold(root, manifest, annotations, split, flow, predictor, config, methods=("tfg",))
    table = diagnose_rows(rows, root, manifest, annotations, flow, load_fold_predictor, config, progress=False)
    scored = rows[rows.gt_voxels > 0]
    assert len(table) == len(scored) > 0 and list(table.seriesuid) == list(scored.seriesuid)
    assert np.allclose(table.dsc_again, scored.dsc, atol=1e-6)
    assert (table.threshold == thresholds["tfg"]).all() and set(table.stage) <= set(FAILURE_STAGES)
    assert (table.positive_slices_on_nodule <= table.nodule_slices).all()
    with pytest.raises(ValueError, match="other parameters"):
        diagnose_rows(rows, root, manifest, annotations, flow, load_fold_predictor, GuidanceConfig(), progress=False)
    # the script over the same rows (every scan: Dice below 1.01), as the README runs it
    results = tmp_path / "all_folds_results.csv"
    rows.to_csv(results, index=False)
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "diagnose_tfg_failures.py"))
    capsys.readouterr()
    assert script["main"]([str(results), "--root", str(root), "--max-dice", "1.01"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(scored)} of {len(scored)} TFG scans with a nodule have Dice < 1.01" in printed
    assert "largest |Dice recomputed − Dice in the rows|: 0.0000" in printed
    written = pd.read_csv(tmp_path / "tfg_failures.csv")
    assert list(written.seriesuid) == list(table.seriesuid) and list(written.stage) == list(table.stage)
    with pytest.raises(SystemExit):  # a misspelt guidance field is not silently dropped
        script["main"]([str(results), "--root", str(root), "--max-dice", "1.01", "--guidance", '{"strenght": 2}'])
    assert "strenght" in capsys.readouterr().err


def test_the_script_opens_the_cohort_seed_the_rows_were_made_on(tmp_path, monkeypatch):
    """Rows of `tfg demo --cohort-seed 2` are diagnosed on that cohort: the seed reaches the cohort writer, whose
    refusal of a folder written with another seed is the error a user of the default would otherwise meet."""
    import tfg_core.data.phantom as phantom
    from tfg_core.errors import DataError

    seeds = []

    def record(root, config, progress=False):
        seeds.append(config.seed)
        raise DataError(Path(root) / "cohort.json", "stopped by the test after the seed was read")

    monkeypatch.setattr(phantom, "write_cohort", record)
    results = tmp_path / "all_folds_results.csv"
    pd.DataFrame([{"method": "tfg", "gt_voxels": 5, "dsc": 0.0, "fold": 0, "seriesuid": "x"}]).to_csv(results)
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "diagnose_tfg_failures.py"))
    for argv, seed in (([], 0), (["--cohort-seed", "2"], 2)):
        with pytest.raises(DataError, match="stopped by the test"):
            script["main"]([str(results), "--root", str(tmp_path / "cohort"), *argv])
        assert seeds[-1] == seed


def test_slice_evidence_names_the_most_probable_slice_on_nodule_and_healthy_scans(cohort, monkeypatch):
    root, manifest, annotations = cohort
    prepared = _nodule_case(cohort)
    nodule_slices = np.flatnonzero(prepared.gt_grid.any(axis=(1, 2)))
    off = (int(nodule_slices.max()) + 3) % prepared.gt_grid.shape[0]  # a slice away from the nodule
    logits = torch.full((prepared.gt_grid.shape[0],), -4.0)
    monkeypatch.setattr(diagnose, "slice_logits", lambda predictor, image, slices, batch: logits[list(slices)])
    logits[off] = -1.0  # nothing positive; the most probable slice misses the nodule
    found = diagnose.slice_evidence(prepared, predictor=None)
    assert found["positive_slices"] == 0 and found["top_slice"] == off and not found["top_slice_on_nodule"]
    assert found["max_p"] == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item())
    assert found["max_p_on_nodule"] == pytest.approx(torch.sigmoid(torch.tensor(-4.0)).item())
    logits[nodule_slices[0]] = 2.0  # one positive slice, on the nodule
    found = diagnose.slice_evidence(prepared, predictor=None)
    assert found["positive_slices"] == 1 and found["top_slice_on_nodule"] and found["nodule_voxels"] > 0
    healthy_uid = next(u for u in manifest.seriesuid if u not in set(annotations.seriesuid))
    healthy = prepare(load_case(root, manifest.set_index("seriesuid", drop=False).loc[healthy_uid], annotations))
    found = diagnose.slice_evidence(healthy, predictor=None)
    assert found["nodule_voxels"] == 0 and not found["top_slice_on_nodule"] and np.isnan(found["max_p_on_nodule"])


def test_scans_without_positive_slices_summary_counts_hits_and_healthy_pushes():
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "scans_without_positive_slices.py"))
    table = pd.DataFrame({
        "fold": [0, 0, 1, 1, 2, 2],
        "nodule_voxels": [5, 3, 0, 0, 0, 9],
        "positive_slices": [0, 0, 0, 0, 2, 4],
        "max_p": [0.40, 0.20, 0.30, 0.45, 0.9, 0.95],
        "top_slice_on_nodule": [True, False, False, False, False, True],
    })
    lines = script["summarise"](table)
    assert lines[0] == "nodule scans without a positive slice: 2 of 3; their most probable slice lies on the nodule in 1"
    assert "0.20, 0.40 (on the nodule: 0.40)" in lines[1]
    assert lines[2] == "healthy scans without a positive slice: 2 of 3"
    assert "min 0.30, median 0.38, max 0.45" in lines[3]
    assert lines[4] == "  a floor at 0.40 (fold 0's hit) would also push on 1 of those healthy scans"


def test_slice_evidence_rows_reads_each_scans_calibrated_tfg_row_once(cohort, monkeypatch):
    root, manifest, annotations = cohort
    nodule_uid = annotations.seriesuid.iloc[0]
    healthy_uid = next(u for u in manifest.seriesuid if u not in set(annotations.seriesuid))
    monkeypatch.setattr(diagnose, "slice_logits",
                        lambda predictor, image, slices, batch: torch.linspace(-3, 1, len(list(slices))))
    rows = pd.DataFrame([
        {"method": "tfg", "threshold_mode": "calibrated", "fold": 3, "seriesuid": nodule_uid, "dsc": 0.25},
        {"method": "tfg", "threshold_mode": "otsu", "fold": 3, "seriesuid": nodule_uid, "dsc": 0.75},
        {"method": "cam", "threshold_mode": "calibrated", "fold": 3, "seriesuid": nodule_uid, "dsc": 0.5},
        {"method": "tfg", "threshold_mode": "calibrated", "fold": 3, "seriesuid": healthy_uid, "dsc": np.nan},
    ])
    folds = []
    table = diagnose.slice_evidence_rows(rows, root, manifest, annotations,
                                         lambda fold: folds.append(fold) or torch.nn.Identity(), progress=False)
    assert list(table.seriesuid) == [nodule_uid, healthy_uid] and folds == [3]  # one predictor load per fold
    assert table.dsc.iloc[0] == 0.25 and np.isnan(table.dsc.iloc[1])
    assert (table.nodule_voxels > 0).tolist() == [True, False]
    assert (table.positive_slices > 0).all() and (table.top_slice == table.top_slice.iloc[0]).all()
    # result files concatenated: a fold's rows apart from each other still load its predictor once, fold by fold
    interleaved = pd.DataFrame([{"method": "tfg", "threshold_mode": "calibrated", "fold": f, "seriesuid": u, "dsc": d}
                                for f, u, d in ((3, nodule_uid, 0.25), (1, healthy_uid, np.nan), (3, healthy_uid, 0.0),
                                                (1, nodule_uid, 0.5))])
    folds.clear()
    table = diagnose.slice_evidence_rows(interleaved, root, manifest, annotations,
                                         lambda fold: folds.append(fold) or torch.nn.Identity(), progress=False)
    assert folds == [1, 3] and list(zip(table.fold, table.seriesuid)) == [
        (1, healthy_uid), (1, nodule_uid), (3, nodule_uid), (3, healthy_uid)]


def _evidence_and_rows():
    """Four nodule scans (two detected) and a healthy one; TFG, the oracle and IG scored on them."""
    evidence = pd.DataFrame({
        "fold": [0, 0, 1, 1, 1], "seriesuid": ["a", "b", "c", "d", "h"], "dsc": [0.8, 0.0, 0.4, 0.1, np.nan],
        "nodule_voxels": [20, 3, 40, 2, 0], "positive_slices": [3, 0, 2, 1, 0],
        "max_p_on_nodule": [0.9, 0.2, 0.5, 0.49, np.nan]})
    dice = {"tfg": [0.8, 0.0, 0.4, 0.1, np.nan], "oracle": [0.9, 0.6, 0.7, 0.5, np.nan],
            "ig": [0.7, 0.3, 0.5, 0.2, np.nan]}
    rows = pd.DataFrame([{"method": m, "threshold_mode": "calibrated", "fold": f, "seriesuid": u, "dsc": d}
                         for m, values in dice.items()
                         for f, u, d in zip(evidence.fold, evidence.seriesuid, values)])
    return evidence, rows


def test_detection_ceiling_bounds_tfg_by_the_scans_the_classifier_detects():
    evidence, rows = _evidence_and_rows()
    # an Otsu row and an earlier duplicate must not be read
    extra = pd.DataFrame([{"method": "tfg", "threshold_mode": "otsu", "fold": 0, "seriesuid": "b", "dsc": 0.9},
                          {"method": "ig", "threshold_mode": "calibrated", "fold": 1, "seriesuid": "d", "dsc": 0.9}])
    table = diagnose.detection_table(evidence, pd.concat([extra, rows], ignore_index=True))
    assert list(table.seriesuid) == ["a", "b", "c", "d"]  # nodule scans only
    assert table.detected.tolist() == [True, False, True, False]  # p >= 0.5 on a slice through the nodule
    assert table.set_index("seriesuid").loc["b", "tfg"] == 0.0 and table.set_index("seriesuid").loc["d", "ig"] == 0.2
    summary = diagnose.detection_ceiling(table).set_index("method")
    assert summary.loc["tfg", "mean"] == pytest.approx(0.325)
    assert summary.loc["tfg", "mean_detected"] == pytest.approx(0.6)
    assert summary.loc["tfg", "mean_missed"] == pytest.approx(0.05)
    assert summary.loc["ig", "mean_missed"] == pytest.approx(0.25)
    assert (summary.detected == 2).all() and (summary.n == 4).all()
    assert summary.loc["ceiling: Dice 1 where detected", "mean"] == pytest.approx(0.5)
    assert summary.loc["ceiling: oracle where detected", "mean"] == pytest.approx((0.9 + 0.7) / 4)
    # without the oracle on every scan there is no oracle bound
    partial = table.assign(oracle=[0.9, np.nan, 0.7, 0.5])
    partial_summary = diagnose.detection_ceiling(partial).set_index("method")
    assert "ceiling: oracle where detected" not in partial_summary.index
    assert tuple(partial_summary.loc["oracle", ["n", "detected"]]) == (3, 2)  # counted where it was scored
    # a lower positive threshold counts more scans as detected
    assert diagnose.detection_table(evidence, rows, threshold=0.4).detected.sum() == 3


def test_detection_table_refuses_rows_of_another_run():
    evidence, rows = _evidence_and_rows()
    with pytest.raises(ValueError, match="no result row, e.g. fold 1 c"):
        diagnose.detection_table(evidence, rows[rows.seriesuid != "c"])
    with pytest.raises(ValueError, match="no scan with a nodule"):
        diagnose.detection_table(evidence[evidence.nodule_voxels == 0], rows)


def test_detection_ceiling_script_pools_written_tables(tmp_path, capsys):
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "detection_ceiling.py"))
    evidence, rows = _evidence_and_rows()
    table = diagnose.detection_table(evidence, rows)
    table.iloc[:2].to_csv(tmp_path / "a.csv", index=False)
    table.iloc[2:].to_csv(tmp_path / "b.csv", index=False)
    assert script["main"](["--tables", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) == 0
    printed = capsys.readouterr().out
    assert "4 nodule scans, 2 detected" in printed
    assert "ceiling: oracle where detected" in printed and "0.4" in printed
    with pytest.raises(SystemExit):  # results and --tables together
        script["main"]([str(tmp_path / "r.csv"), "--tables", str(tmp_path / "a.csv")])
    with pytest.raises(SystemExit):
        script["main"](["--tables", str(tmp_path / "missing.csv")])
