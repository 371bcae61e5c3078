"""Nodule pseudo-labels for scans nobody annotated: what ``tfg segment`` does, scan by scan.

Per input (``.mhd``, NIfTI or a DICOM series folder): read → checks (finite voxels, enough slices, a model grid that
is not too anisotropic) → model grid → guidance (counterfactual) → |counterfactual − unguided reconstruction| →
threshold (Otsu inside the lung, label-free, or a given value) → back to the scan's own grid. Written per scan, in
the **original geometry** (spacing, origin, direction): ``<id>_mask.nii.gz``, ``<id>_diff.nii.gz``, an overview
``<id>.png`` and last ``<id>.json`` (slices flagged positive, components with volume in mm³ and centre in world
mm, parameters, version, timings), whose presence marks the scan done for ``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from tfg_core.data.volume import Volume
from tfg_core.errors import DataError, TfgError
from tfg_core.guidance import GuidanceConfig
from tfg_core.io import atomic_write_text, atomic_write_with

N_CONTEXT_SLICES = 9  # the 2.5D classifier's stack: fewer slices than this leave it nothing to compare
MAX_ANISOTROPY = 8.0  # largest / smallest voxel side on the model grid the guidance is run on
DEMO_GRID = (32, 64, 64)  # the demo flow's training grid


@dataclass
class SegmentConfig:
    """How scans are segmented.

    Args:
        guidance: guidance parameters.
        threshold: ``"otsu"`` (inside the lung, label-free) or a value of the difference map (e.g. one calibrated on
            a validation fold by ``tfg demo`` / ``05_baselines``).
        grid: model grid ``(z, y, x)``; None = every side rounded to a multiple of 32.
        min_component_voxels: drop smaller components (model-grid voxels).
        refine: ``"density"`` redraws each component on the scan's density (:func:`tfg_core.segment.refine_by_density`);
            ``"none"`` keeps the thresholded map.
        map_scale: ``"scan"`` thresholds the map as a fraction of its maximum in the lung
            (:func:`tfg_core.segment.scale_map`; a numeric ``threshold`` is then that fraction), ``"absolute"`` as it
            is. The written difference map is the unscaled one either way.
        max_anisotropy: refuse model grids whose voxel sides differ more than this factor.
    """

    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    threshold: str | float = "otsu"
    grid: tuple[int, int, int] | None = None
    min_component_voxels: int = 0
    refine: str = "none"
    map_scale: str = "absolute"
    max_anisotropy: float = MAX_ANISOTROPY

    def as_dict(self) -> dict[str, Any]:
        return {"guidance": asdict(self.guidance), "threshold": self.threshold,
                "grid": list(self.grid) if self.grid else None, "min_component_voxels": self.min_component_voxels,
                "max_anisotropy": self.max_anisotropy,
                **({"refine": self.refine} if self.refine != "none" else {}),  # absent = none: old runs resume
                **({"map_scale": self.map_scale} if self.map_scale != "absolute" else {})}


def read_input(path: str | os.PathLike) -> Volume:
    """A scan from a ``.mhd`` file, a NIfTI file or a DICOM series folder (HU, original geometry).

    Args:
        path: the input.

    Raises:
        DataError: no such input, an unknown kind, or anything the readers find wrong with it.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if path.is_dir():
        from tfg_core.data.dicom import read_dicom_series

        return read_dicom_series(path)
    name = path.name.lower()
    if name.endswith(".mhd"):
        from tfg_core.data.mhd import read_mhd

        return read_mhd(path)
    if name.endswith((".nii", ".nii.gz")):
        from tfg_core.data.nifti import read_nifti

        return read_nifti(path)
    raise DataError(path, "not a scan: expected a .mhd file, a NIfTI file (.nii, .nii.gz) or a DICOM series folder")


def scan_id(path: str | os.PathLike, volume: Volume) -> str:
    """The name of a scan's outputs: its series UID when it has one, else the input's file or folder name.

    Args:
        path: the input.
        volume: the scan read from it.
    """
    path = Path(path)
    stem = re.sub(r"\.(nii\.gz|nii|mhd)$", "", path.name, flags=re.IGNORECASE)
    name = volume.uid or stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scan"


def check_model_grid(volume: Volume, grid: Sequence[int], max_anisotropy: float = MAX_ANISOTROPY) -> None:
    """Refuse scans the guidance cannot make sense of, with what to do about it.

    Args:
        volume: the scan.
        grid: the model grid it would be resampled to.
        max_anisotropy: largest allowed ratio of voxel sides on the model grid.

    Raises:
        DataError: fewer slices than a 2.5D stack, or a model grid too anisotropic.
    """
    source = volume.source or volume.uid or "scan"
    if volume.shape[0] < N_CONTEXT_SLICES or min(volume.shape[1:]) < 32:
        raise DataError(source, f"too small for the model: {volume.shape} voxels (z, y, x); the 2.5D classifier needs "
                                f"at least {N_CONTEXT_SLICES} slices and 32 x 32 in-plane")
    extent = np.asarray(volume.shape, float) * np.asarray(volume.spacing, float)
    spacing = extent / np.asarray(grid, float)
    ratio = float(spacing.max() / spacing.min())
    if ratio > max_anisotropy:
        raise DataError(source, f"too anisotropic for the model grid {tuple(grid)}: voxels of "
                                f"{' x '.join(f'{s:.2f}' for s in spacing)} mm (ratio {ratio:.1f} > {max_anisotropy:g}); "
                                f"choose a grid closer to the scan's proportions with --grid Z Y X "
                                f"(the scan spans {' x '.join(f'{e:.0f}' for e in extent)} mm)")


@dataclass
class ScanSegmentation:
    """One scan's result, on its own grid.

    Args:
        mask: the binary mask (uint8), in the scan's geometry.
        difference: the difference map, in the scan's geometry.
        report: the JSON-able report.
        overview: (image, difference, mask) on the model grid and the slice to show, for the PNG.
    """

    mask: Volume
    difference: Volume
    report: dict[str, Any]
    overview: tuple[np.ndarray, np.ndarray, np.ndarray, int]


def components(mask: np.ndarray, volume: Volume) -> list[dict[str, Any]]:
    """Connected components of a mask on the scan grid: voxels, volume in mm³, centre in world mm (x, y, z, LPS).

    Args:
        mask: boolean ``(z, y, x)`` on ``volume``'s grid.
        volume: the scan (spacing, origin, direction).
    """
    labels, n = ndimage.label(mask)
    if not n:
        return []
    index = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index)
    centres = np.asarray(ndimage.center_of_mass(mask, labels, index), float).reshape(n, 3)
    world = volume.voxel_to_world(centres)
    voxel_mm3 = float(np.prod(volume.spacing))
    out = [{"voxels": int(s), "volume_mm3": round(float(s) * voxel_mm3, 2),
            "centre_world_mm": [round(float(c), 2) for c in w]} for s, w in zip(sizes, world)]
    return sorted(out, key=lambda c: -c["voxels"])


def segment_volume(volume: Volume, flow, predictor, config: SegmentConfig | None = None) -> ScanSegmentation:
    """Segment one scan: guidance on the model grid, threshold, back to the scan's grid.

    Args:
        volume: the scan in HU (original geometry).
        flow: the rectified-flow prior.
        predictor: the slice classifier (eval mode).
        config: how (default :class:`SegmentConfig`).
    """
    from tfg_core.data.lungmask import threshold_lung_mask
    from tfg_core.data.preprocess import check_finite, mask_to_model_grid, model_grid_shape, to_model_grid
    from tfg_core.guidance import run_guidance
    from tfg_core.segment import on_scan, otsu_threshold, scale_map, segment

    config = config or SegmentConfig()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    check_finite(volume)
    grid_shape = tuple(config.grid) if config.grid else model_grid_shape(volume.shape)
    check_model_grid(volume, grid_shape, config.max_anisotropy)
    grid = to_model_grid(volume, shape=grid_shape)
    lung = mask_to_model_grid(threshold_lung_mask(volume), volume, grid) > 0
    if not lung.any():
        raise DataError(volume.source or volume.uid, "no lung found (the air threshold finds no lung inside the body): "
                                                     "is this a chest CT in Hounsfield units?")
    timings["preprocess_s"] = time.perf_counter() - started

    started = time.perf_counter()
    device = next(predictor.parameters()).device  # the flow and the predictor share it
    x = torch.as_tensor(grid.array, dtype=torch.float32, device=device)
    try:
        result = run_guidance(flow, predictor, x, config.guidance)
    except torch.OutOfMemoryError as exc:
        raise TfgError(f"{volume.source or volume.uid}: out of memory on the model grid {grid_shape} "
                       f"({exc.__class__.__name__}); use a smaller --grid, --device cpu, or fewer "
                       f"slices per predictor call (--slice-batch)") from None
    timings["guidance_s"] = time.perf_counter() - started

    started = time.perf_counter()
    diff = result.difference.numpy()
    scaled = scale_map(diff, lung, config.map_scale)
    threshold = otsu_threshold(scaled, lung) if config.threshold == "otsu" else float(config.threshold)
    mask_grid = segment(scaled, threshold, lung, config.min_component_voxels, refine=config.refine, image=grid.array)
    mask = on_scan(mask_grid, volume, is_mask=True)
    difference = on_scan(diff, volume, is_mask=False)
    parts = components(mask.array > 0, volume)
    timings["postprocess_s"] = time.perf_counter() - started

    # model-grid slice -> world z of its centre, so a reader can find the flagged slices in any viewer
    flagged = [{"model_slice": int(z), "probability": round(float(p), 4),
                "world_z_mm": round(float(grid.voxel_to_world(np.array([[z, 0, 0]]))[0, 2]), 2)}
               for z, p in zip(result.input_positives, result.input_probabilities)]
    report = {
        "input": volume.source, "seriesuid": volume.uid,
        "scan": {"shape_zyx": list(volume.shape), "spacing_zyx_mm": [round(float(s), 4) for s in volume.spacing],
                 "origin_xyz_mm": [round(float(o), 3) for o in volume.origin]},
        "model_grid_zyx": list(grid_shape), "threshold": float(threshold), "threshold_mode": str(config.threshold),
        "positive_slices": flagged, "components": parts,
        "mask_voxels": int((mask.array > 0).sum()), "mask_volume_mm3": round(sum(c["volume_mm3"] for c in parts), 2),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    z_show = int(np.argmax((diff * mask_grid).reshape(len(diff), -1).max(1))) if mask_grid.any() else \
        int(np.argmax(diff.reshape(len(diff), -1).max(1)))
    return ScanSegmentation(mask, difference, report, (grid.array, diff, mask_grid, z_show))


def _overview_png(path: Path, overview, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from tfg_core.viz.slices import draw_map, draw_slice

    image, diff, mask, z = overview
    fig = Figure(figsize=(9, 3.3))
    axes = fig.subplots(1, 3)
    draw_slice(axes[0], image, z, "lung", title=f"input, model slice {z}")
    draw_map(axes[1], diff, z, title="|counterfactual − unguided|")
    draw_slice(axes[2], image, z, "lung", {"TFG mask": mask}, title="mask")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _version() -> str:
    import tfg_core

    return tfg_core.__version__


def params_hash(config: SegmentConfig, model_info: dict[str, Any]) -> str:
    """Hash of everything that decides a scan's outputs (for ``--resume``).

    Args:
        config: the segmentation config.
        model_info: which flow and predictor.
    """
    payload = json.dumps({"config": config.as_dict(), "models": model_info}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_writable(out: Path) -> None:
    """Create ``out`` and prove a file can be written there, before any scan is processed.

    Args:
        out: the output folder.

    Raises:
        DataError: it cannot be created or written to.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(out, f"output folder is not writable ({exc.strerror or exc})") from None


def remove_stale_temporaries(out: Path) -> int:
    """Delete temporary files a killed run left behind (``atomic_path``'s ``.<name>.<random>.tmp…``).

    Args:
        out: the output folder.
    """
    stale = [p for p in out.glob(".*.tmp*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def segment_inputs(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, flow, predictor,
                   config: SegmentConfig | None = None, model_info: dict[str, Any] | None = None,
                   resume: bool = False, progress: bool = True) -> pd.DataFrame:
    """Segment every input into ``out``; one summary row per input (``done`` | ``skipped`` | ``failed``).

    A scan that cannot be read or fails a check is reported (``error``) and the others go on; nothing already in
    ``out`` is modified by a failing scan.

    Args:
        inputs: ``.mhd`` / NIfTI files and DICOM series folders.
        out: output folder.
        flow: the rectified-flow prior.
        predictor: the slice classifier (eval mode).
        config: how to segment.
        model_info: which flow and predictor (recorded in each report and in the resume hash).
        resume: skip inputs whose report exists with the same parameters.
        progress: a progress bar over inputs.
    """
    from tfg_core.data.nifti import write_nifti

    config = config or SegmentConfig()
    model_info = dict(model_info or {})
    out = Path(out)
    check_writable(out)
    remove_stale_temporaries(out)
    phash = params_hash(config, model_info)
    rows = []
    for path in tqdm(list(inputs), disable=not progress, desc="segment", unit="scan"):
        row: dict[str, Any] = {"input": str(path), "id": "", "state": "failed", "components": 0,
                               "mask_volume_mm3": np.nan, "seconds": 0.0, "error": ""}
        started = time.perf_counter()
        try:
            volume = read_input(path)
            uid = row["id"] = scan_id(path, volume)
            report_path = out / f"{uid}.json"
            if resume and _finished(report_path, phash):
                previous = json.loads(report_path.read_text(encoding="utf-8"))
                row.update(state="skipped", components=len(previous["components"]),
                           mask_volume_mm3=previous["mask_volume_mm3"])
                rows.append(row)
                continue
            result = segment_volume(volume, flow, predictor, config)
            write_nifti(result.mask, out / f"{uid}_mask.nii.gz")
            write_nifti(result.difference, out / f"{uid}_diff.nii.gz")
            atomic_write_with(out / f"{uid}.png", lambda tmp: _overview_png(tmp, result.overview, uid))
            report = {"id": uid, **result.report, "parameters": config.as_dict(), "models": model_info,
                      "params_hash": phash, "software": {"tfg-nodules": _version(), "torch": torch.__version__},
                      "outputs": [f"{uid}_mask.nii.gz", f"{uid}_diff.nii.gz", f"{uid}.png"],
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            report["timings_s"]["total_s"] = round(time.perf_counter() - started, 3)
            atomic_write_text(report_path, json.dumps(report, indent=2))  # last: marks the scan done
            row.update(state="done", components=len(report["components"]), mask_volume_mm3=report["mask_volume_mm3"])
        except TfgError as exc:
            row["error"] = str(exc)
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
    return pd.DataFrame(rows)


def _finished(report_path: Path, phash: str) -> bool:
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    outputs = [report_path.parent / name for name in report.get("outputs", [])]
    return report.get("params_hash") == phash and all(p.is_file() for p in outputs)
