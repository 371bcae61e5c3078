"""Ablation sweeps: the settings, the subsampled split, scoring with both threshold modes, and the figure."""

import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest

import tfg_core.evaluate as evaluate
from tfg_core.ablation import ablation_table, one_at_a_time, run_ablation, subsample_split
from tfg_core.data.folds import fold_split
from tfg_core.data.luna16 import build_manifest, read_annotations
from tfg_core.data.phantom import PhantomConfig, write_cohort
from tfg_core.guidance import GuidanceConfig
from tfg_core.viz.ablation import ablation_figure


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = write_cohort(tmp_path_factory.mktemp("phantom"), PhantomConfig(n_cases=30))
    return root, build_manifest(root), read_annotations(root / "annotations.csv")


def test_one_at_a_time_changes_one_field_per_setting():
    base = GuidanceConfig()
    settings = one_at_a_time(base, {"strength": [0.5, 1.0, 2.0], "loss": ["logit", "bce"]})
    assert [(s.parameter, s.value) for s in settings] == [
        ("default", ""), ("strength", 0.5), ("strength", 2.0), ("loss", "bce"), ("no_prior", "velocity 0")]
    for s in settings[1:-1]:
        changed = [f for f in base.__dataclass_fields__ if getattr(s.config, f) != getattr(base, f)]
        assert changed == [s.parameter]
    assert settings[-1].method == "no_prior" and settings[-1].config == base
    with pytest.raises(ValueError, match="unknown guidance parameters"):
        one_at_a_time(base, {"strenght": [1]})
    with pytest.raises(ValueError, match="guided_steps=20"):  # only 15 steps remain after start index 15
        one_at_a_time(base, {"guided_steps": [20]})


def test_subsample_keeps_nodule_scans_first(cohort):
    root, manifest, annotations = cohort
    split = fold_split(manifest, 0)
    small = subsample_split(split, annotations, max_val=1, max_test=2)
    with_nodule = set(annotations.seriesuid)
    assert len(small.val) == 1 and len(small.test) == 2 and small.train == split.train
    assert set(small.test) <= set(split.test)
    if with_nodule & set(split.test):
        assert small.test[0] in with_nodule
    assert subsample_split(split, annotations) == split


def test_sweep_scores_every_setting_with_both_modes(cohort, monkeypatch):
    """Maps whose nodule contrast grows with the strength: Dice must rise along the strength axis."""
    root, manifest, annotations = cohort
    calls = []

    def fake_maps(prepared, flow, predictor, config, methods, *args):
        calls.append((config.strength, tuple(methods)))
        rng = np.random.default_rng(zlib.crc32(prepared.uid.encode()))
        noise = rng.random(prepared.gt_grid.shape)
        return {m: prepared.gt_grid * config.strength + noise for m in methods}

    monkeypatch.setattr(evaluate, "difference_maps", fake_maps)
    with_nodules = set(annotations.seriesuid)
    split = next(s for s in (fold_split(manifest, k) for k in range(10))
                 if with_nodules & set(s.val) and with_nodules & set(s.test))
    settings = one_at_a_time(GuidanceConfig(), {"strength": [0.1, 4.0]})
    # the thresholded maps themselves: the default refinement would redraw them on the phantom's density
    rows = run_ablation(root, manifest, annotations, split, None, None, settings, refine="none")
    assert ("no_prior",) in {c[1] for c in calls}
    # maps once per scan, scored twice; healthy validation scans are not mapped (calibration uses the nodule scans)
    val_with_nodules = [u for u in split.val if u in with_nodules]
    assert len(val_with_nodules) < len(split.val)
    assert len(calls) == len(settings) * (len(val_with_nodules) + len(split.test))
    assert set(rows.threshold_mode) == {"calibrated", "otsu"}
    assert len(rows) == 2 * len(settings) * len(split.test)
    table = ablation_table(rows).set_index(["parameter", "value", "threshold_mode"])
    weak, strong = table.loc[("strength", "0.1", "calibrated"), "dsc_mean"], table.loc[("strength", "4.0", "calibrated"), "dsc_mean"]
    assert strong > 0.9 > 0.5 > weak  # noise in [0, 1) buries a contrast of 0.1, not one of 4

    fig = ablation_figure(rows, GuidanceConfig())
    (ax,) = [a for a in fig.axes if a.get_xlabel()]
    assert ax.get_xlabel() == "strength" and [t.get_text() for t in ax.get_xticklabels()] == ["0.1", "1.0", "4.0"]
    calibrated = ax.lines[0].get_ydata()
    assert calibrated[2] > calibrated[0]
    assert any(line.get_linestyle() == ":" for line in ax.lines)  # the no-prior reference


def test_the_notebook_sweeps_the_default_sweep():
    import ast

    import papermill as pm

    from tfg_core.ablation import DEFAULT_SWEEP
    from tfg_core.experiment import default_guidance

    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "04_ablations.ipynb"
    assert ast.literal_eval(pm.inspect_notebook(str(notebook))["sweep"]["default"]) == DEFAULT_SWEEP
    # centred on either flow's defaults, every swept value is a valid setting and the base value appears once
    for base in (GuidanceConfig(), default_guidance("demo")):
        assert len(one_at_a_time(base)) == 1 + sum(len(v) - 1 for v in DEFAULT_SWEEP.values()) + 1
