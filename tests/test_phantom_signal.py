"""A phantom nodule's signal (excess over its healthy twin, against the case's noise) and the misses-by-kind table."""

from __future__ import annotations

import runpy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from tfg_core import diagnose
from tfg_core.data.phantom import PhantomConfig, generate_case, healthy_twin, series_uid
from tfg_core.data.phantom_signal import nodule_signal, nodule_signal_rows

ALL_NODULES = PhantomConfig(n_cases=4, nodule_probability=1.0, flip_fraction=0.0)


def test_each_case_keeps_the_noise_it_was_drawn_with():
    config = PhantomConfig()
    sigmas = [generate_case(i, config).noise_sigma_hu for i in range(6)]
    assert all(config.noise_hu_range[0] <= s <= config.noise_hu_range[1] for s in sigmas)
    assert len(set(sigmas)) == 6  # drawn per case
    assert healthy_twin(2, config).noise_sigma_hu == sigmas[2]  # the twin shares the noise
    fixed = generate_case(2, replace(config, noise_hu_range=(20.0, 20.0)))
    assert fixed.noise_sigma_hu == 20.0
    # what the σ says: the residual of a case against the same case drawn without noise
    quiet = generate_case(2, replace(config, noise_hu_range=(0.0, 0.0)))
    residual = fixed.volume.array.astype(float) - quiet.volume.array
    inside = (quiet.volume.array > -1000) & (quiet.volume.array < 3000)  # away from the clip limits
    assert residual[inside].std() == pytest.approx(20.0, rel=0.05)


def test_nodule_signal_is_the_nodules_excess_over_the_twin_in_noise_units():
    signal = nodule_signal(1, ALL_NODULES)
    case, twin = generate_case(1, ALL_NODULES), healthy_twin(1, ALL_NODULES)
    excess = case.volume.array.astype(float) - twin.volume.array
    assert signal.seriesuid == case.uid == series_uid(0, 1)
    assert signal.peak_excess_hu == excess.max() > 200  # a nodule replaces lung (about −850 HU) by denser tissue
    peak = np.unravel_index(excess.argmax(), excess.shape)
    assert ndimage.binary_dilation(case.nodule_mask)[peak]  # the peak is on a nodule (or its soft edge)
    assert signal.noise_sigma_hu == case.noise_sigma_hu
    assert signal.peak_snr == pytest.approx(signal.peak_excess_hu / signal.noise_sigma_hu)
    assert signal.kinds.split(",") == [n.kind for n in case.nodules] and signal.n_nodules == len(case.nodules)
    assert signal.kind == (case.nodules[0].kind if len(case.nodules) == 1 else "several")
    assert signal.nodule_voxels == case.nodule_mask.sum()
    assert signal.largest_diameter_mm == max(n.diameter_mm for n in case.nodules)
    # the shared noise cancels: four times the noise leaves the excess (up to rounding) and quarters the ratio
    loud = nodule_signal(1, replace(ALL_NODULES, noise_hu_range=(4 * signal.noise_sigma_hu,) * 2))
    assert loud.peak_excess_hu == pytest.approx(signal.peak_excess_hu, abs=2)
    assert loud.peak_snr == pytest.approx(signal.peak_snr / 4, rel=0.01)


def test_nodule_signal_rows_refuse_healthy_cases_and_other_seeds():
    rows = nodule_signal_rows([series_uid(0, 0), series_uid(0, 2), series_uid(0, 0)], ALL_NODULES)
    assert rows.seriesuid.tolist() == [series_uid(0, 0), series_uid(0, 2)]  # once each, in order
    assert (rows.peak_snr > 0).all() and {"kind", "peak_excess_hu", "noise_sigma_hu"} <= set(rows.columns)
    with pytest.raises(ValueError, match="has no nodule"):
        nodule_signal(0, replace(ALL_NODULES, nodule_probability=0.0))
    with pytest.raises(ValueError, match="seed 3, not of the cohort's seed 0"):
        nodule_signal_rows([series_uid(3, 0)], ALL_NODULES)
    with pytest.raises(ValueError, match="not a phantom series UID"):
        nodule_signal_rows(["1.2.3"], ALL_NODULES)


def _table():
    """Six nodule scans: two small ground-glass ones missed, small and large solid ones, a large pleural one."""
    return pd.DataFrame({
        "cohort": 2, "fold": 0, "seriesuid": list("abcdef"), "nodule_voxels": [2, 3, 4, 40, 30, 5],
        "max_p_on_nodule": [0.1, 0.2, 0.9, 0.99, 0.3, 0.6], "detected": [False, False, True, True, False, True],
        "kind": ["ground_glass", "ground_glass", "solid", "solid", "juxta_pleural", "solid"],
        "peak_snr": [10.0, 20.0, 30.0, 40.0, 50.0, 60.0], "tfg": [0.0, 0.0, 0.5, 0.9, 0.0, 0.4]})


def test_misses_by_kind_counts_and_medians():
    summary = diagnose.misses_by_kind(_table()).set_index(["kind", "size"])
    gg = summary.loc[("ground_glass", "<= 6 voxels")]
    assert (gg.n, gg.detected, gg.missed, gg.miss_rate) == (2, 0, 2, 1.0)
    assert gg.peak_snr_missed == 15.0 and np.isnan(gg.peak_snr_detected)
    small = summary.loc[("all", "<= 6 voxels")]
    assert (small.n, small.detected, small.missed) == (4, 2, 2)
    assert small.peak_snr_detected == 45.0 and small.peak_snr_missed == 15.0
    large = summary.loc[("all", "> 6 voxels")]
    assert (large.n, large.missed, large.miss_rate) == (2, 1, 0.5)
    assert diagnose.misses_by_kind(_table(), small_voxels=2).loc[lambda t: t.kind == "all", "n"].tolist() == [1, 5]
    # signal columns are not methods of the Dice summary
    assert diagnose.detection_ceiling(_table()).method.tolist()[0] == "tfg"
    with pytest.raises(ValueError, match="join nodule_signal_rows"):
        diagnose.misses_by_kind(_table().drop(columns="peak_snr"))


def test_detection_script_prints_misses_by_kind_for_tables_with_the_signal(tmp_path, capsys):
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "detection_ceiling.py"))
    _table().to_csv(tmp_path / "with.csv", index=False)
    _table().drop(columns=["kind", "peak_snr"]).to_csv(tmp_path / "without.csv", index=False)
    assert script["main"](["--tables", str(tmp_path / "with.csv")]) == 0
    printed = capsys.readouterr().out
    assert "6 nodule scans, 3 detected" in printed and "by nodule kind and size" in printed
    assert "ground_glass" in printed and "juxta_pleural" in printed
    assert script["main"](["--tables", str(tmp_path / "without.csv")]) == 0  # older tables: the Dice summary only
    assert "by nodule kind" not in capsys.readouterr().out


def _census_script() -> dict:
    return runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "nodule_size_census.py"))


def test_nodule_size_census_counts_each_nodule_scan_and_its_shares():
    script = _census_script()
    config = PhantomConfig(n_cases=8, seed=3)
    rows = script["census_rows"](config)
    cases = [generate_case(i, config) for i in range(config.n_cases)]
    with_nodules = [c for c in cases if c.nodules]
    assert list(rows["index"]) == [c.index for c in with_nodules]
    assert list(rows.nodule_voxels) == [int((c.nodule_labels > 0).sum()) for c in with_nodules]
    assert list(rows.n_nodules) == [int(c.nodule_labels.max()) for c in with_nodules]

    made_up = pd.DataFrame({"nodule_voxels": [1, 3, 6, 7, 40], "largest_diameter_mm": [5.5, 6.0, 9.5, 9.6, 20.0]})
    summary = script["census_summary"](made_up, [2, 6], [9.5])
    assert summary == {"nodule scans": 5, "≤ 2 voxels (%)": 20.0, "≤ 6 voxels (%)": 60.0,
                       "largest ≤ 9.5 mm (%)": 60.0, "median voxels": 6.0, "smallest largest-diameter (mm)": 5.5}
    assert script["census_summary"](made_up.iloc[:0], [2], [9.5]) == {"nodule scans": 0}


def test_nodule_size_census_script_compares_grids(capsys):
    assert _census_script()["main"](["--shapes", "16x32x32", "24x48x48", "--seeds", "0", "--cases", "6"]) == 0
    out = capsys.readouterr().out
    assert "16x32x32 (5.00 × 11.00 × 11.00 mm)" in out and "24x48x48 (3.33 × 7.33 × 7.33 mm)" in out
    assert "≤ 6 voxels (%)" in out
    with pytest.raises(SystemExit):
        _census_script()["main"](["--shapes", "32x64"])
