"""The notebooks: committed clean, one typed `parameters` cell, and executable end to end by papermill."""

from functools import partial
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def run_notebook(name: str, folder: Path, **params) -> Path:
    """Execute notebook ``name`` with papermill in ``folder`` (its working directory and where the run is saved)."""
    pm.execute_notebook(str(NOTEBOOKS[[p.name for p in NOTEBOOKS].index(name)]), str(folder / name),
                        parameters=params, kernel_name="python3", progress_bar=False, cwd=str(folder))
    return folder / name


def test_there_are_numbered_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert {"00_quickstart.ipynb", "01_preprocess.ipynb", "02_finetune_predictor.ipynb", "03_guided_sampling.ipynb",
            "04_ablations.ipynb", "05_baselines.ipynb", "06_report.ipynb"} <= set(names)
    assert all(n[:2].isdigit() and n[2] == "_" for n in names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_clean_with_one_typed_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks without outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], "one `parameters` cell, the first code cell"
    params = pm.inspect_notebook(str(path))
    assigned = [line.split(":")[0] for line in tagged[0].source.splitlines() if line and not line.startswith("#")]
    assert list(params) == assigned  # every line is seen by papermill (an "=" inside a comment would hide it)
    for name, p in params.items():
        assert p["inferred_type_name"] != "None" and p["help"], f"{path.name}: {name} needs a type and a comment"


def test_notebooks_run_on_the_phantom_cohort(tmp_path, phantom_copy):
    """00 → 05 → 06 with tiny parameters: each writes where the next one reads."""
    phantom_copy(tmp_path / "phantom")  # as on a second run (the demo's first-use write: test_cli)
    run = partial(run_notebook, folder=tmp_path)
    # CAM alone: the notebook is glue around run_demo, whose guided run test_cli covers (a guided fold is minutes)
    run("00_quickstart.ipynb", fold=2, data_root=str(tmp_path / "phantom"), out_dir=str(tmp_path / "quick"),
        methods=["cam"], progress=False)
    assert (tmp_path / "quick" / "fold2_methods.png").is_file() and (tmp_path / "phantom" / "manifest.csv").is_file()
    run("05_baselines.ipynb", data_root=str(tmp_path / "phantom"), fold=2, methods=["gradcam"],
        results_dir=str(tmp_path / "results"), progress=False)  # CAM came from 00: one row per scan and method
    rows = pd.read_csv(tmp_path / "results" / "fold2_tiny_baselines.csv")
    assert set(rows.method) == {"gradcam"} and set(rows.fold) == {2}
    run("06_report.ipynb", results=[str(tmp_path / "results"), str(tmp_path / "quick" / "fold2_results.csv")],
        relabel_experiment="phantom", annotations=[str(tmp_path / "phantom" / "annotations.csv")],
        out_dir=str(tmp_path / "report"), title="test")
    table = (tmp_path / "report" / "table1.md").read_text()
    assert "| CAM |" in table and "Grad-CAM" in table and (tmp_path / "report" / "dice.png").is_file()
    by_size = pd.read_csv(tmp_path / "report" / "by_size.csv")  # the fold's nodule scans, each in one range
    assert by_size.query("method == 'cam'").n.sum() == pd.read_csv(tmp_path / "report" / "aggregate.csv").query(
        "method == 'cam'").n.iloc[0]
    assert (tmp_path / "report" / "dice_by_size.png").read_bytes()[:4] == b"\x89PNG"
    executed = nbformat.read(tmp_path / "06_report.ipynb", as_version=4)
    assert any(o.get("output_type") == "display_data" for c in executed.cells for o in c.get("outputs", []))


def test_open_cohort_names_a_missing_luna16_tree(tmp_path):
    from tfg_core.errors import DataError
    from tfg_core.experiment import open_cohort, resolve_path

    with pytest.raises(DataError, match="no LUNA16 tree here"):
        open_cohort("luna16", tmp_path / "absent")
    with pytest.raises(ValueError, match="dataset must be one of"):
        open_cohort("lidc", tmp_path)
    assert resolve_path(tmp_path) == tmp_path and resolve_path("outputs/x").is_absolute()


def test_preprocess_finetune_and_ablation_notebooks_chain(tmp_path, phantom_copy):
    """01 → 02 → 04 with tiny parameters; 04 guides with the (ensemble) checkpoint 02 just wrote."""
    phantom_copy(tmp_path / "phantom")
    run = partial(run_notebook, folder=tmp_path)
    data = str(tmp_path / "phantom")
    run("01_preprocess.ipynb", data_root=data, fold=1, out_dir=str(tmp_path / "pre"), progress=False)
    inventory = pd.read_csv(tmp_path / "pre" / "inventory.csv")
    assert len(inventory) == 100 and inventory.error.isna().all()  # every phantom scan read, none damaged
    folds = pd.read_csv(tmp_path / "pre" / "folds.csv", index_col=0)
    assert folds.loc["test", "scans"] == 10 and (tmp_path / "pre" / "preprocessing.png").is_file()
    assert "matches the pinned list" in (tmp_path / "01_preprocess.ipynb").read_text()

    run("02_finetune_predictor.ipynb", data_root=data, fold=1, iterations=20, eval_every=10, batch_size=8,
        out_dir=str(tmp_path / "ft"), progress=False)
    history = pd.read_csv(tmp_path / "ft" / "tiny_fold1_history.csv")  # two members by default, as shipped
    assert list(history.iteration) == [10, 20, 10, 20] and list(history.member) == [0, 0, 1, 1]
    assert (tmp_path / "ft" / "tiny_fold1.pt").is_file()
    slices = pd.read_csv(tmp_path / "ft" / "tiny_fold1_test_slices.csv", index_col=0)
    assert len(slices) == 2 and slices.auc.between(0, 1).all()  # this checkpoint and the shipped one

    run("04_ablations.ipynb", data_root=data, fold=1, checkpoint=str(tmp_path / "ft" / "tiny_fold1.pt"),
        sweep={"strength": [2.0]}, max_val_scans=1, max_test_scans=1, results_dir=str(tmp_path / "abl"),
        progress=False)
    rows = pd.read_csv(tmp_path / "abl" / "fold1_tiny_ablations.csv")
    assert list(dict.fromkeys(rows.parameter)) == ["default", "strength", "no_prior"]
    assert set(rows[rows.parameter == "strength"].value.astype(float)) == {2.0}
    assert set(rows.threshold_mode) == {"calibrated", "otsu"} and len(rows) == 3 * 2 * 1  # settings x modes x scans
    assert (tmp_path / "abl" / "fold1_tiny_ablations.png").is_file()

    run("06_report.ipynb", results=[], ablations=[str(tmp_path / "abl")], out_dir=str(tmp_path / "report"))
    assert (tmp_path / "report" / "ablations.png").is_file()
    pooled = pd.read_csv(tmp_path / "report" / "ablations.csv")
    assert set(pooled.threshold_mode) == {"calibrated", "otsu"} and (pooled.n >= 1).all()


def test_guided_sampling_notebook_runs_headless_with_its_diagnosis(tmp_path, phantom_copy):
    """03 without widgets (papermill, as in a batch), with few steps: montages, NIfTI maps, the trajectory and the
    failure stage; its parameters' defaults are the guidance loop's."""
    from tfg_core.demo import DEMO_START_INDEX
    from tfg_core.diagnose import FAILURE_STAGES
    from tfg_core.experiment import default_guidance
    from tfg_core.guidance import GuidanceConfig

    params = pm.inspect_notebook(str(NOTEBOOKS[[p.name for p in NOTEBOOKS].index("03_guided_sampling.ipynb")]))
    for name in ("guided_steps", "strength"):
        assert params[name]["default"] == repr(getattr(GuidanceConfig(), name))
    # -1: the flow's own start, what `tfg demo` (demo flow) and `tfg segment --flow maisi-v2` use
    assert params["start_index"]["default"] == "-1"
    assert default_guidance("demo") == GuidanceConfig(start_index=DEMO_START_INDEX)
    assert default_guidance("maisi-v2") == GuidanceConfig()
    with pytest.raises(ValueError, match="flow must be one of"):
        default_guidance("maisi")
    phantom_copy(tmp_path / "phantom")
    executed = run_notebook("03_guided_sampling.ipynb", tmp_path, data_root=str(tmp_path / "phantom"), fold=0,
                            start_index=-1, guided_steps=2, baselines=["cam"], out_dir=str(tmp_path / "out"),
                            interactive=False, progress=False)
    out = tmp_path / "out"
    assert len(list(out.glob("*_slices.png"))) == 1 and len(list(out.glob("*_steps.png"))) == 1
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out.glob("*.png"))
    assert len(list(out.glob("*_counterfactual.nii.gz"))) == 1 and len(list(out.glob("*_tfg_diff.nii.gz"))) == 1
    steps = pd.read_csv(next(out.glob("*_trajectory.csv")))
    # -1 resolved to the demo flow's start (24 of 30): 6 inversion steps, then 6 sampling steps, 2 of them guided
    assert steps.phase.value_counts().to_dict() == {"invert": 30 - DEMO_START_INDEX, "guided": 2,
                                                    "free": 30 - DEMO_START_INDEX - 2, "encode": 1, "final": 1}
    executed = nbformat.read(executed, as_version=4)
    shown = [o for c in executed.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(shown) == 2  # both montages displayed in the notebook
    (cell,) = [c for c in executed.cells if c.get("id") == "cell-diagnose"]
    diagnosis = "".join(o.get("data", {}).get("text/plain", "") for o in cell.outputs)
    assert "positive_slices_on_nodule" in diagnosis and any(stage in diagnosis for stage in FAILURE_STAGES)
