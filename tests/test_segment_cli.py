"""`tfg segment`: phantom .mhd, NIfTI and real LIDC DICOM inputs → geometry-exact NIfTI, reports, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from tfg_core.cli import main
from tfg_core.data.luna16 import read_annotations
from tfg_core.data.nifti import write_nifti
from tfg_core.data.phantom import PhantomConfig, write_cohort
from tfg_core.pseudolabel import read_input
from tfg_core.training.run import ensure_manifest


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = write_cohort(tmp_path_factory.mktemp("phantom"), PhantomConfig(n_cases=20))
    manifest, _ = ensure_manifest(root)
    annotations = read_annotations(root / "annotations.csv")
    with_nodule = manifest[manifest.seriesuid.isin(annotations.seriesuid)]
    return root, [root / p for p in with_nodule.path], annotations


def assert_same_geometry(output: Path, reference: sitk.Image):
    """The output NIfTI lies exactly on the input scan's voxels (SimpleITK and nibabel agree)."""
    image = sitk.ReadImage(str(output))
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    affine = nib.load(str(output)).affine  # RAS: LPS with x and y negated
    lps_to_ras = np.diag([-1, -1, 1])
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(affine[:3, :3], lps_to_ras @ direction @ np.diag(reference.GetSpacing()), atol=1e-5)
    np.testing.assert_allclose(affine[:3, 3], lps_to_ras @ np.asarray(reference.GetOrigin()), atol=1e-4)


def test_segment_phantom_mhd_and_nifti(phantom, tmp_path, capsys):
    root, scans, annotations = phantom
    mhd = scans[0]
    nifti = tmp_path / "as_nifti.nii.gz"
    write_nifti(read_input(mhd), nifti)
    out = tmp_path / "out"
    assert main(["segment", str(mhd), str(nifti), "--out", str(out), "--quiet"]) == 0
    uid = mhd.stem
    reference = sitk.ReadImage(str(mhd))
    for name in (f"{uid}_mask.nii.gz", f"{uid}_diff.nii.gz", "as_nifti_mask.nii.gz", "as_nifti_diff.nii.gz"):
        assert_same_geometry(out / name, reference)
    mask = nib.load(str(out / f"{uid}_mask.nii.gz"))
    assert mask.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    report = json.loads((out / f"{uid}.json").read_text())
    assert report["id"] == uid and report["model_grid_zyx"] == [32, 64, 64] and report["threshold_mode"] == "otsu"
    assert report["software"]["tfg-nodules"] and report["params_hash"] and (out / f"{uid}.png").is_file()
    assert {"preprocess_s", "guidance_s", "postprocess_s", "total_s"} <= set(report["timings_s"])
    # the report's numbers are the mask's: voxels, mm³, and a component centre where the mask is
    assert sum(c["voxels"] for c in report["components"]) == int(np.asarray(mask.dataobj).sum()) == report["mask_voxels"]
    spacing = np.prod(reference.GetSpacing())
    assert report["mask_volume_mm3"] == pytest.approx(report["mask_voxels"] * spacing, rel=1e-3)
    if report["components"]:
        centre = report["components"][0]["centre_world_mm"]
        nodules = annotations[annotations.seriesuid == uid][["coordX", "coordY", "coordZ"]].to_numpy()
        nearest = np.min(np.linalg.norm(nodules - np.asarray(centre), axis=1))
        assert nearest < 15, f"largest component {nearest:.1f} mm from the nearest nodule"
    assert "2 of 2 scan(s)" in capsys.readouterr().out


def test_segment_real_lidc_dicom(shared_data, tmp_path):
    folders = sorted(p for p in (shared_data / "lidc_idri_slices").glob("*/*/*") if p.is_dir())
    assert len(folders) == 2
    out = tmp_path / "lidc"
    # 12 slices of 1.25 mm next to 350 mm in-plane: the demo grid 32x64x64 would be 11.6:1, so a finer one
    assert main(["segment", *map(str, folders), "--out", str(out), "--grid", "32", "128", "128", "--quiet"]) == 0
    for folder in folders:
        reader = sitk.ImageSeriesReader()
        reference = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(folder)))  # an independent DICOM reader
        uid = folder.name  # the SeriesInstanceUID
        assert_same_geometry(out / f"{uid}_mask.nii.gz", reference)
        assert_same_geometry(out / f"{uid}_diff.nii.gz", reference)
        report = json.loads((out / f"{uid}.json").read_text())
        assert report["seriesuid"] == uid and report["model_grid_zyx"] == [32, 128, 128]


# finished per-scan reports; not the hidden temporary of one being written when the kill comes, which keeps the
# target's suffixes (".<uid>.json.<random>.tmp.<…>.json", a uid being full of dots) and so also ends in ".json"
REPORTS = "[!.]*.json"


def test_resume_after_a_kill(phantom, tmp_path):
    root, scans, _ = phantom
    scans = scans[:4]
    out = tmp_path / "out"
    # a short schedule (invert 6 steps, sample 6, 3 guided): the kill-and-resume path, not the segmentation
    command = [sys.executable, "-m", "tfg_core.cli", "segment", *map(str, scans), "--out", str(out), "--resume",
               "--quiet", "--start-index", "24", "--guided-steps", "3"]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(out.glob(REPORTS))) < 2:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob(REPORTS)}
    assert 2 <= len(finished) < len(scans), "kill the run mid-way"
    for report in finished:  # what a killed run left finished is complete
        uid = report[:-5]
        for name in (f"{uid}_mask.nii.gz", f"{uid}_diff.nii.gz"):
            nib.load(str(out / name)).get_fdata()

    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count(": skipped") == len(finished) and result.stdout.count(": done") == len(scans) - len(finished)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob(REPORTS) if p.name in finished} == finished
    assert not list(out.glob(".*")), "temporary files left behind"
    for scan in scans:  # every output of every scan is complete and readable
        for suffix in ("_mask.nii.gz", "_diff.nii.gz"):
            assert np.isfinite(nib.load(str(out / f"{scan.stem}{suffix}")).get_fdata()).all()
        json.loads((out / f"{scan.stem}.json").read_text())
    # other parameters: not the same result, so the scans are segmented again
    first = command.index(str(scans[1]))
    again = subprocess.run([*command[:first], *command[first + len(scans) - 1:], "--threshold", "0.2"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count(": done") == 1 and ": skipped" not in again.stdout


def test_segment_with_density_refinement(phantom, tmp_path):
    _, scans, annotations = phantom
    # a scan with a nodule; a low fixed threshold so the plain mask spreads around what changed
    scan = next(s for s in scans if (annotations.seriesuid == s.stem).any())
    short = ["--start-index", "24", "--guided-steps", "3", "--threshold", "0.02", "--quiet"]
    masks, hu = {}, read_input(scan).array
    for refine in ("none", "density"):
        out = tmp_path / refine
        assert main(["segment", str(scan), "--out", str(out), "--refine", refine, *short]) == 0
        report = json.loads((out / f"{scan.stem}.json").read_text())
        assert report["parameters"].get("refine", "none") == refine
        # NIfTI is (x, y, z); the scan's array is (z, y, x)
        masks[refine] = np.asarray(nib.load(str(out / f"{scan.stem}_mask.nii.gz")).dataobj).transpose(2, 1, 0) > 0
    assert masks["none"].any() and masks["density"].any()
    assert not np.array_equal(masks["none"], masks["density"])
    # what the refinement keeps is dense tissue: denser on average than the plain mask, and above lung level
    assert hu[masks["density"]].mean() > hu[masks["none"]].mean() + 100
    assert np.percentile(hu[masks["density"]], 5) > -700


def test_segment_with_a_scan_scaled_threshold(phantom, tmp_path):
    """``--map-scale scan``: a numeric threshold is a fraction of the scan's largest change in the lung; the written
    difference map stays unscaled, and the report says which scale was used."""
    _, scans, annotations = phantom
    scan = next(s for s in scans if (annotations.seriesuid == s.stem).any())
    short = ["--start-index", "24", "--guided-steps", "3", "--gradient-weight", "cam", "--quiet"]
    out = tmp_path / "scaled"
    assert main(["segment", str(scan), "--out", str(out), "--map-scale", "scan", "--threshold", "0.5", *short]) == 0
    report = json.loads((out / f"{scan.stem}.json").read_text())
    assert report["parameters"]["map_scale"] == "scan" and report["parameters"]["guidance"]["gradient_weight"] == "cam"
    difference = np.asarray(nib.load(str(out / f"{scan.stem}_diff.nii.gz")).dataobj)
    mask = np.asarray(nib.load(str(out / f"{scan.stem}_mask.nii.gz")).dataobj) > 0
    assert mask.any() and difference.max() < 0.5  # unscaled (a scaled map would reach 1 in the lung)
    # the mask holds only strong changes: about half the largest one or more (0.3: resampling to the scan's grid)
    assert difference[mask].min() >= 0.3 * difference.max()
