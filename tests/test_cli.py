"""The README's Run command and the CLI's error handling."""

import pandas as pd

from tfg_core.cli import main


def test_demo_runs_on_the_embedded_default(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--fold", "2", "--quiet"]) == 0
    table = pd.read_csv(out / "fold2_cases.csv")
    assert len(table) == 10 and set(table.fold) == {2}
    assert (table.positive_slices > 0).sum() == (table.n_nodules > 0).sum()  # labels follow the ground truth
    assert (out / "fold2_overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "phantom" / "annotations.csv").is_file()
    printed = capsys.readouterr().out
    assert "fold 2: 80 train / 10 val / 10 test scans" in printed
    # a rerun reuses the cohort and rewrites the same table; several folds add a pooled summary
    assert main(["demo", "--out", str(out), "--fold", "2", "3", "--quiet"]) == 0
    assert pd.read_csv(out / "fold2_cases.csv").equals(table)
    pooled = pd.read_csv(out / "all_folds_results.csv")
    assert set(pooled.fold) == {2, 3} and set(pooled.method) == {"tfg", "no_prior", "unguided"}
    assert len(pooled) == 3 * 20  # one row per (test scan, method)
    assert "all 2 folds (2, 3)" in capsys.readouterr().out


def test_cli_reports_data_errors_without_traceback(tmp_path, capsys):
    missing = tmp_path / "no_luna16_here"
    assert main(["manifest", str(missing), "--out", str(tmp_path / "m.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "m.csv").exists()
