"""Dice by nodule size: ranges, the largest nodule of a scan, per-range statistics against a direct computation."""

import math

import numpy as np
import pandas as pd
import pytest

from tfg_core.cli import main
from tfg_core.report import mean_ci
from tfg_core.strata import aggregate_by_size, assign_sizes, by_size_markdown, size_labels, write_by_size


def _rows(rng):
    """Two folds × 9 scans with a nodule (three of each size range) + 1 healthy, TFG and CAM."""
    rows = []
    for method in ("tfg", "cam"):
        for fold in (0, 1):
            for i in range(9):
                dsc = float(rng.uniform(0.0, 1.0))
                empty = method == "cam" and i == 0
                rows.append({"experiment": "e", "fold": fold, "seriesuid": f"f{fold}s{i}", "backbone": "tiny",
                             "method": method, "dsc": 0.0 if empty else dsc, "msd_mm": math.inf if empty else 2.0,
                             "pred_voxels": 0 if empty else 5, "gt_voxels": 7, "empty_pred": empty,
                             "both_empty": False})
            rows.append({"experiment": "e", "fold": fold, "seriesuid": f"f{fold}healthy", "backbone": "tiny",
                         "method": method, "dsc": 0.0, "msd_mm": math.inf, "pred_voxels": 3, "gt_voxels": 0,
                         "empty_pred": False, "both_empty": False})
    return pd.DataFrame(rows)


def _annotations():
    # scan i: largest nodule 6 + 0.5 i (< 10 mm), 12 + i (10-20 mm) or 20 + i (>= 20 mm, 20 itself included);
    # every scan also holds a 4 mm nodule, which must not decide its range
    records = []
    for fold in (0, 1):
        for i in range(9):
            largest = (6.0 + 0.5 * i, 12.0 + i, 20.0 + i)[i % 3]
            records += [{"seriesuid": f"f{fold}s{i}", "diameter_mm": largest},
                        {"seriesuid": f"f{fold}s{i}", "diameter_mm": 4.0}]
    return pd.DataFrame(records)


def test_size_labels_and_bad_edges():
    assert size_labels() == ["< 10 mm", "10–20 mm", "≥ 20 mm"]
    assert size_labels((3, 8, 30)) == ["3–8 mm", "8–30 mm"]
    with pytest.raises(ValueError, match="increasing"):
        size_labels((0, 20, 10))


def test_each_scan_falls_in_the_range_of_its_largest_nodule():
    sized = assign_sizes(_rows(np.random.default_rng(0)), _annotations())
    assert "f0healthy" not in set(sized.seriesuid)  # healthy scans are in no range
    first = sized.drop_duplicates("seriesuid").set_index("seriesuid")
    assert first.loc["f0s0", "size"] == "< 10 mm" and first.loc["f0s0", "diameter_mm"] == 6.0
    assert first.loc["f0s1", "size"] == "10–20 mm" and first.loc["f0s1", "diameter_mm"] == 13.0
    assert first.loc["f0s2", "size"] == "≥ 20 mm" and first.loc["f0s2", "diameter_mm"] == 22.0
    edge = _annotations().replace({"diameter_mm": {22.0: 20.0}})  # on an edge: the upper range, as [lo, hi)
    assert assign_sizes(_rows(np.random.default_rng(0)), edge).set_index("seriesuid").loc["f0s2", "size"].iloc[0] \
        == "≥ 20 mm"


def test_per_range_statistics_match_a_direct_computation():
    rows = _rows(np.random.default_rng(1))
    strata = aggregate_by_size(rows, _annotations()).set_index(["size", "method"])
    for k, label in enumerate(("< 10 mm", "10–20 mm", "≥ 20 mm")):
        uids = {f"f{f}s{i}" for f in (0, 1) for i in range(9) if i % 3 == k}
        for method in ("tfg", "cam"):
            dsc = rows[(rows.method == method) & rows.seriesuid.isin(uids)].dsc.to_numpy()
            r = strata.loc[(label, method)]
            assert r.n == 6 and r.dsc_mean == pytest.approx(dsc.mean())
            assert (r.dsc_ci_low, r.dsc_ci_high) == pytest.approx(mean_ci(dsc))
        assert strata.loc[(label, "cam"), "n_pairs"] == 6  # paired within the range
    assert strata.loc[("< 10 mm", "cam"), "n_empty_pred"] == 2 and strata.loc[("≥ 20 mm", "cam"), "n_empty_pred"] == 0
    markdown = by_size_markdown(strata.reset_index(), title="t")
    assert "< 10 mm (n = 6, median 7.5 mm)" in markdown  # 6, 7.5 and 9 mm, twice
    tfg_small = strata.loc[("< 10 mm", "tfg")]
    assert f"| TFG (ours) | {tfg_small.dsc_mean:.3f} [{tfg_small.dsc_ci_low:.2f}–{tfg_small.dsc_ci_high:.2f}], 0 empty" \
        in markdown


def test_a_method_scored_on_fewer_scans_does_not_set_the_ranges_count():
    # pooled runs: CAM only on fold 0 and listed first, TFG on both folds
    rows = _rows(np.random.default_rng(4))
    rows = rows[(rows.method == "tfg") | (rows.fold == 0)].sort_values("method")
    strata = aggregate_by_size(rows, _annotations())
    assert (strata.range_scans == 6).all()
    assert set(strata[strata.method == "cam"].n) == {3} and set(strata[strata.method == "tfg"].n) == {6}
    markdown = by_size_markdown(strata)
    assert "< 10 mm (n = 6, median 7.5 mm)" in markdown
    cam_lines = [line for line in markdown.splitlines() if line.startswith("| CAM")]
    assert cam_lines and cam_lines[0].count("(n = 3)") == 3
    assert "(n = " not in next(line for line in markdown.splitlines() if line.startswith("| TFG"))


def test_a_scored_scan_without_annotation_is_refused_by_name():
    annotations = _annotations()
    with pytest.raises(ValueError, match="f1s4"):
        assign_sizes(_rows(np.random.default_rng(0)), annotations[annotations.seriesuid != "f1s4"])
    with pytest.raises(ValueError, match="diameter_mm"):
        assign_sizes(_rows(np.random.default_rng(0)), annotations.drop(columns="diameter_mm"))


def test_report_cli_writes_the_size_table(tmp_path, capsys):
    rows = _rows(np.random.default_rng(2))
    rows.to_csv(tmp_path / "rows.csv", index=False)
    annotations = _annotations().assign(coordX=0.0, coordY=0.0, coordZ=0.0)
    annotations.to_csv(tmp_path / "annotations.csv", index=False)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "rows.csv"), "--out", str(out),
                 "--annotations", str(tmp_path / "annotations.csv")]) == 0
    assert "by nodule size" in capsys.readouterr().out
    table = pd.read_csv(out / "by_size.csv")
    assert set(table["size"]) == {"< 10 mm", "10–20 mm", "≥ 20 mm"} and set(table.n) == {6}
    assert (out / "table1.md").is_file() and (out / "by_size.md").read_text().startswith("# ")
    # annotations of another cohort: an error naming the table, nothing half written
    before = (out / "by_size.md").read_text()
    annotations[annotations.seriesuid != "f0s3"].to_csv(tmp_path / "other.csv", index=False)
    assert main(["report", str(tmp_path / "rows.csv"), "--out", str(out),
                 "--annotations", str(tmp_path / "other.csv")]) == 2
    err = capsys.readouterr().err
    assert "other.csv" in err and "f0s3" in err and "Traceback" not in err
    assert (out / "by_size.md").read_text() == before


def test_write_by_size_returns_its_paths(tmp_path):
    paths = write_by_size(_rows(np.random.default_rng(3)), _annotations(), tmp_path / "r")
    assert paths["by_size_md"].is_file() and paths["by_size_csv"].is_file()
