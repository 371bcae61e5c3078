"""Every bad input a user meets gets a clear message naming the file and the problem, and changes no output.

Each case runs the real entry point (`tfg segment`, `tfg batch`, `tfg report`, the readers) against an output
folder that already holds results from an earlier run, and checks the message and that those results are
byte-for-byte what they were.
"""

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tfg_core.cli import main
from tfg_core.data.mhd import write_mhd
from tfg_core.data.nifti import write_nifti
from tfg_core.data.phantom import PhantomConfig, write_cohort
from tfg_core.data.volume import Volume
from tfg_core.training.run import ensure_manifest

PROBE = Path(__file__).resolve().parent / "fixtures" / "batch_probe.ipynb"


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    root = write_cohort(tmp_path_factory.mktemp("phantom"), PhantomConfig(n_cases=10))
    manifest, _ = ensure_manifest(root)
    return root / manifest.path.iloc[0]


@pytest.fixture
def out(tmp_path) -> Path:
    """An output folder with results of an earlier run in it."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "earlier.json").write_text('{"components": [], "mask_volume_mm3": 0}')
    (folder / "earlier_mask.nii.gz").write_bytes(b"\x1f\x8b earlier result")
    return folder


def segment_fails(inputs, out: Path, capsys, *extra: str, code: int = 1) -> str:
    before = snapshot(out)
    assert main(["segment", *map(str, inputs), "--out", str(out), "--quiet", *extra]) == code
    captured = capsys.readouterr()
    assert snapshot(out) == before, "a failing input changed the output folder"
    return captured.out + captured.err


def volume(shape=(32, 64, 64), spacing=(2.5, 5.5, 5.5), fill=-800.0) -> Volume:
    array = np.full(shape, fill, np.float32)
    array[:, 8:-8, 8:-8] = 40.0  # some body
    return Volume(array, spacing, (0.0, 0.0, 0.0), np.eye(3), uid="synthetic")


def test_truncated_raw(scan, out, tmp_path, capsys):
    copy = tmp_path / "truncated"
    shutil.copytree(scan.parent, copy)
    raw = copy / scan.with_suffix(".raw").name
    raw.write_bytes(raw.read_bytes()[:5000])
    message = segment_fails([copy / scan.name], out, capsys)
    assert raw.name in message and "bytes" in message


def test_header_without_data_file_and_zero_spacing(scan, out, tmp_path, capsys):
    header = tmp_path / "nodata.mhd"
    header.write_text("\n".join(l for l in scan.read_text().splitlines() if not l.startswith("ElementDataFile")))
    assert "ElementDataFile" in segment_fails([header], out, capsys)
    zero = tmp_path / "zero.mhd"
    shutil.copy(scan.with_suffix(".raw"), tmp_path / scan.with_suffix(".raw").name)
    zero.write_text(re.sub(r"ElementSpacing = .*", "ElementSpacing = 0 5.5 2.5", scan.read_text()))
    message = segment_fails([zero], out, capsys)
    assert "zero.mhd" in message and "spacing" in message.lower()


def test_nan_voxels(out, tmp_path, capsys):
    bad = volume()
    bad.array[5, 30, 30] = np.nan
    path = write_nifti(bad, tmp_path / "nan.nii.gz")
    message = segment_fails([path], out, capsys)
    assert "nan.nii.gz" in message and "NaN" in message


def test_no_lung_in_the_scan(out, tmp_path, capsys):
    path = write_mhd(volume(), tmp_path / "no_lung.mhd")  # body and air only: not a chest CT
    message = segment_fails([path], out, capsys)
    assert "no_lung.mhd" in message and "no lung found" in message


def test_not_a_scan_and_missing(out, tmp_path, capsys):
    png = tmp_path / "slice.png"
    png.write_bytes(b"\x89PNG")
    message = segment_fails([png, tmp_path / "absent.mhd"], out, capsys)
    assert "slice.png: not a scan" in message and "absent.mhd: no such file or folder" in message


def test_empty_dicom_folder(out, tmp_path, capsys):
    empty = tmp_path / "empty_series"
    empty.mkdir()
    assert "empty_series" in segment_fails([empty], out, capsys)


def test_scan_too_small_or_too_anisotropic(out, tmp_path, capsys):
    few = write_mhd(volume(shape=(4, 64, 64)), tmp_path / "four_slices.mhd")
    message = segment_fails([few], out, capsys)
    assert "four_slices" in message and "too small" in message and "9 slices" in message
    flat = write_mhd(volume(shape=(32, 64, 64), spacing=(0.3, 5.5, 5.5)), tmp_path / "flat.mhd")
    message = segment_fails([flat], out, capsys)
    assert "flat.mhd" in message and "too anisotropic" in message and "--grid" in message
    # the advice works: a grid with the scan's proportions (9.6 x 352 x 352 mm) passes the check
    from tfg_core.pseudolabel import check_model_grid, read_input

    check_model_grid(read_input(flat), (32, 256, 256))


def test_checkpoint_for_another_architecture(scan, out, tmp_path, capsys):
    from tfg_core.predictors import build_predictor
    from tfg_core.training.checkpoint import save_predictor

    wrong = tmp_path / "wrong.pt"
    model = build_predictor("tiny", in_slices=9)
    state = {k + "_renamed" if "head" in k else k: v for k, v in model.state_dict().items()}
    torch.save({"format": "tfg-predictor-v1", "backbone": "tiny", "in_slices": 9, "state_dict": state,
                "config": {}, "metrics": {}, "manifest_sha256": None}, wrong)
    message = segment_fails([scan], out, capsys, "--predictor", str(wrong), code=2)
    assert "wrong.pt" in message and "_renamed" in message  # the key diff is listed
    truncated = tmp_path / "truncated.pt"
    save_predictor(truncated, model, "tiny", {}, {}, None)
    truncated.write_bytes(truncated.read_bytes()[:300])
    message = segment_fails([scan], out, capsys, "--predictor", str(truncated), code=2)
    assert "truncated.pt" in message


def test_out_of_memory_says_what_to_change(scan, out, capsys, monkeypatch):
    import tfg_core.guidance

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(tfg_core.guidance, "run_guidance", no_memory)
    message = segment_fails([scan], out, capsys)
    assert scan.name in message and "out of memory" in message and "--grid" in message and "--device" in message


def test_output_folder_not_writable(scan, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["segment", str(scan), "--out", str(blocker / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "a_file/out" in err and "not writable" in err and blocker.read_text() == "not a folder"


def test_notebook_parameter_of_the_wrong_type(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["batch", str(PROBE), "-e", "typed", "--folds", "0", "-p", "fold=three", "--runs", str(runs),
                 "--results", str(tmp_path / "results"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "batch_probe.ipynb: parameter fold is declared int, got 'three'" in err and not runs.exists()
    assert main(["batch", str(PROBE), "-e", "typed", "--folds", "0", "-g", "value=0.5,high", "--dry-run"]) == 2
    assert "parameter value is declared float, got 'high'" in capsys.readouterr().err


def test_result_tables_without_result_rows(out, tmp_path, capsys):
    table = tmp_path / "not_results.csv"
    table.write_text("a,b\n1,2\n")
    before = snapshot(out)
    assert main(["report", str(table), "--out", str(out)]) == 2
    assert "not_results.csv" in capsys.readouterr().err and snapshot(out) == before
    assert main(["report", str(tmp_path / "nothing_here"), "--out", str(out)]) == 2
    assert "no such result file or folder" in capsys.readouterr().err


def test_missing_annotations_are_named(tmp_path):
    from tfg_core.errors import DataError
    from tfg_core.experiment import open_cohort

    root = write_cohort(tmp_path / "tree", PhantomConfig(n_cases=10))
    (root / "annotations.csv").unlink()
    with pytest.raises((DataError, FileNotFoundError), match="annotations.csv"):
        open_cohort("luna16", root)
