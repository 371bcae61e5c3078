"""``tfg demo``: the embedded default, end to end on a CPU in minutes, no downloads.

1. the data path on the phantom cohort — LUNA16-shaped tree → manifest → fold split → scans and ground truth
   → MAISI intensity window and model grid → 2.5D stacks with weak slice labels (a table and a figure);
2. with the shipped demo flow and the fold's fine-tuned tiny predictor: guided segmentation of the held-out
   fold — TFG, the no-prior ablation (same classifier steps, velocity 0) and the unguided difference — with
   thresholds calibrated on the fold's validation scans, Dice / MSD per scan, NIfTI masks in the scans'
   geometry and a figure (input / counterfactual / difference / ground truth);
3. the baselines on the same predictor and protocol (CAM, Grad-CAM, Score-CAM, Integrated Gradients, WeakMedSAM
   with LiteMedSAM's real prompt encoder and decoder), a side-by-side figure, and the paper's Table 1 layout over
   the folds run (``report/``).
Results are written atomically under ``out``; a rerun reuses the cohort, each fold's cases table and overview
(``fold<k>_cases.json``: same cohort, scans and predictor) and every fold that finished with the same parameters,
methods and networks (``fold<k>_finished.json``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tfg_core.data.cases import load_case
from tfg_core.data.folds import fold_split
from tfg_core.data.inventory import scan_record
from tfg_core.data.luna16 import read_annotations
from tfg_core.data.slices import make_stacks
from tfg_core.errors import DataError
from tfg_core.io import atomic_write_text, atomic_write_with
from tfg_core.training.slice_data import slice_case_from

ASSETS = Path(__file__).resolve().parent / "assets"
# the phantom cohort the demo flow and the pretrained tiny backbone were trained on: never evaluated on
TRAINING_SEED = 1
_FIGURE_ORDER = ("tfg", "no_prior", "cam", "gradcam", "scorecam", "ig", "weakmedsam", "unguided", "oracle")
# WeakMedSAM and Score-CAM are opt-in (``--methods all``), so the README's Run command stays within issue #4's five
# minutes on a 2-core CPU: LiteMedSAM's encoder takes seconds per 256×256 slice, and Score-CAM one forward pass of the
# predictor pair per feature channel (128) and slice — a third of a fold's demo with it (benchmarks/bench_baselines.py)
DEFAULT_METHODS = ("tfg", "no_prior", "unguided", "cam", "gradcam", "ig", "oracle")
# where the demo's guidance starts: step 24 of 30, not the paper's 15 (GuidanceConfig's default, kept for MAISI-v2).
# The demo flow's clean estimate half way is blurry enough that vessel cross-sections read as nodules; chosen on two
# fresh cohorts by a rule written beforehand and confirmed on a third, unseen one (docs/measurement_log.md)
DEMO_START_INDEX = 24


def shipped_predictor(fold: int) -> Path | None:
    """The repository's fine-tuned tiny predictor for ``fold``, if one is shipped.

    Args:
        fold: held-out fold.
    """
    path = ASSETS / f"tiny_predictor_fold{fold}.pt"
    return path if path.is_file() else None


def load_shipped_predictor(fold: int):
    """Load the shipped tiny predictor of ``fold`` after checking its sha256 against ``assets.json``.

    Args:
        fold: held-out fold.
    """
    from tfg_core.checkpoints import verify_sha256
    from tfg_core.errors import CheckpointError
    from tfg_core.training.checkpoint import load_predictor

    path = shipped_predictor(fold)
    manifest = ASSETS / "assets.json"
    entry = json.loads(manifest.read_text()).get(path.name) if path is not None and manifest.is_file() else None
    if entry is None:
        raise CheckpointError(f"no shipped predictor for fold {fold} listed in {manifest}; "
                              f"retrain it with `python scripts/train_tiny_predictors.py --folds {fold}`")
    verify_sha256(path, entry["sha256"])
    return load_predictor(path)[0]


def _finished_key(split, predictor_path: Path, flow_path: Path, config, methods: Sequence[str], refine: str,
                  map_scale: str, calibrate_on: str) -> dict:
    """What decides a fold's rows: the scans, the evaluation parameters, the methods and the networks' files."""
    from tfg_core.evaluate import evaluation_params, params_hash
    from tfg_core.io import sha256_file

    return {"fold": int(split.fold), "val": sorted(split.val), "test": sorted(split.test),
            "params_hash": params_hash(evaluation_params(config, refine=refine, map_scale=map_scale,
                                                              calibrate_on=calibrate_on)),
            "methods": sorted(methods), "predictor_sha256": sha256_file(predictor_path),
            "flow_sha256": sha256_file(flow_path)}


def _finished_rows(results: Path, finished: Path, key: dict) -> pd.DataFrame | None:
    """The fold's rows from an earlier run with the same ``key``; None when there is none to trust."""
    try:
        if json.loads(finished.read_text()) != key:
            return None
        rows = pd.read_csv(results)
    except (OSError, ValueError):  # missing, unreadable or half-written: run the fold again
        return None
    same = (set(rows.get("params_hash", ())) == {key["params_hash"]}
            and sorted(set(rows.get("method", ()))) == key["methods"]
            and set(rows.get("seriesuid", ())) == set(key["test"]))
    return rows if same else None


def segment_fold(root: Path, manifest: pd.DataFrame, annotations: pd.DataFrame, split, out: Path, predictor=None,
                 config=None, methods: Sequence[str] | None = None, progress: bool = True,
                 refine: str = "density_after", map_scale: str = "absolute", calibrate_on: str = "nodules",
                 resume: bool = True) -> pd.DataFrame | None:
    """Guided segmentation of the held-out fold with the shipped assets; None when they are missing.

    A fold that finished before in ``out`` with the same parameters, methods, predictor and flow (recorded in
    ``fold<k>_finished.json`` once its rows and figures are written) is not run again: its rows are read back,
    so a killed multi-fold run resumes at the first unfinished fold.

    Args:
        root: phantom tree.
        manifest: its manifest.
        annotations: its annotations.
        split: the fold split.
        out: output folder (rows CSV, NIfTI, figure).
        predictor: the fold's fine-tuned predictor (None: the demo has none for this fold).
        config: guidance parameters (default :class:`tfg_core.guidance.GuidanceConfig` starting at
            :data:`DEMO_START_INDEX`).
        methods: methods to run (default :data:`DEFAULT_METHODS`).
        progress: progress bars.
        refine: post-processing of every method's mask (:data:`tfg_core.segment.REFINEMENTS`).
        map_scale: every method's map as it is or as a fraction of its scan's maximum
            (:data:`tfg_core.segment.MAP_SCALES`).
        calibrate_on: the validation scans every threshold is calibrated on
            (:data:`tfg_core.segment.CALIBRATION_SCANS`: those with a nodule, or all).
        resume: reuse the fold's finished rows when everything that decides them is unchanged.
    """
    flow_path = ASSETS / "demo_flow.pt"
    if predictor is None or not flow_path.is_file():
        missing = [p.name for p in (ASSETS / f"tiny_predictor_fold{split.fold}.pt", flow_path) if not p.is_file()]
        print(f"guided segmentation skipped: no shipped {', '.join(missing)} in {ASSETS} yet")
        return None
    from tfg_core.data.nifti import write_nifti
    from tfg_core.evaluate import evaluate_fold, summarise
    from tfg_core.flow.demo import load_demo_flow
    from tfg_core.guidance import GuidanceConfig
    from tfg_core.segment import on_scan
    from tfg_core.viz.comparison import method_comparison_figure
    config = config if config is not None else GuidanceConfig(start_index=DEMO_START_INDEX)
    methods = tuple(methods) if methods is not None else DEFAULT_METHODS
    results = out / f"fold{split.fold}_results.csv"
    finished = out / f"fold{split.fold}_finished.json"
    key = _finished_key(split, shipped_predictor(split.fold), flow_path, config, methods, refine, map_scale,
                        calibrate_on)
    if resume and (rows := _finished_rows(results, finished, key)) is not None:
        print(f"fold {split.fold}: reusing {results}, finished earlier with the same parameters, methods, predictor "
              f"and flow (--fresh runs it again)")
        return rows
    finished.unlink(missing_ok=True)  # from here on the rows on disk may change: they count as unfinished
    flow = load_demo_flow()
    shown = []

    def keep(prepared, maps, masks):
        uid = prepared.uid
        if "tfg" in masks:  # TFG's mask and difference map in the scan's geometry
            write_nifti(on_scan(masks["tfg"], prepared.case.volume, is_mask=True), out / "masks" / f"{uid}_mask.nii.gz")
            write_nifti(on_scan(maps["tfg"], prepared.case.volume, is_mask=False), out / "masks" / f"{uid}_diff.nii.gz")
        if prepared.gt_grid.any():
            shown.append((prepared, maps, masks))

    rows, thresholds = evaluate_fold(root, manifest, annotations, split, flow, predictor, config, methods=methods,
                                     backbone="tiny", experiment="demo", on_test_case=keep, progress=progress,
                                     refine=refine, map_scale=map_scale, calibrate_on=calibrate_on)
    atomic_write_text(results, rows.to_csv(index=False))
    if "tfg" in methods:
        atomic_write_with(out / f"fold{split.fold}_segmentation.png", lambda tmp: _segmentation_figure(shown, tmp))
    figure_rows = [(p.uid.rsplit(".", 1)[-1], p.grid.array, p.gt_grid, m) for p, _, m in shown[:6]]
    atomic_write_with(out / f"fold{split.fold}_methods.png",
                      lambda tmp: method_comparison_figure(figure_rows, [m for m in _FIGURE_ORDER if m in methods], tmp))
    atomic_write_text(finished, json.dumps(key, indent=1))  # last: everything of the fold is on disk
    summary = summarise(rows)
    summary["threshold"] = summary.method.map(thresholds)
    summary["val_dice"] = summary.method.map(rows.groupby("method").val_dice.first())
    summary["seconds_per_scan"] = summary.method.map(rows.groupby("method").seconds.mean())
    val_with_nodule = len(set(split.val) & set(annotations.seriesuid))
    calibration = (f"all {len(split.val)} validation scans" if calibrate_on == "all"
                   else f"the {val_with_nodule} validation scans with a nodule, of {len(split.val)}")
    print(f"\nguided segmentation, fold {split.fold} test scans with nodules (thresholds calibrated on {calibration}):")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return rows


def cohort_root(out: str | os.PathLike, cohort_seed: int = 0, cohort: str | os.PathLike | None = None) -> Path:
    """Where the demo keeps the phantom cohort of ``cohort_seed``: ``cohort`` if given, else beside ``out``.

    Args:
        out: the demo's output folder.
        cohort_seed: 0 = ``<out>/../phantom``, k ≥ 2 = ``<out>/../phantom_seed<k>``.
        cohort: an explicit cohort folder.
    """
    if cohort is not None:
        return Path(cohort)
    return Path(out).parent / ("phantom" if cohort_seed == 0 else f"phantom_seed{cohort_seed}")


def run_demo(out: str | os.PathLike = "outputs/demo", fold: int = 0, cohort: str | os.PathLike | None = None,
             config=None, methods: Sequence[str] | None = None,
             progress: bool = True, refine: str = "density_after",
             map_scale: str = "absolute", calibrate_on: str = "nodules",
             resume: bool = True, cohort_seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Run the demo on one held-out phantom fold and write a table and figures.

    Returns the per-scan data table and the segmentation rows (None when no predictor is shipped for the fold).

    Args:
        out: output folder.
        fold: held-out fold (LUNA16 subset) 0–9.
        cohort: where the phantom tree lives (default ``<out>/../phantom``, ``<out>/../phantom_seed<k>`` for
            another ``cohort_seed``).
        config: guidance parameters (:class:`tfg_core.guidance.GuidanceConfig`; None = its defaults but
            ``start_index`` = :data:`DEMO_START_INDEX`).
        methods: methods to run (None: :data:`DEFAULT_METHODS`).
        progress: progress bars.
        refine: post-processing of every method's mask (:data:`tfg_core.segment.REFINEMENTS`).
        map_scale: every method's map as it is or as a fraction of its scan's maximum
            (:data:`tfg_core.segment.MAP_SCALES`).
        calibrate_on: the validation scans every threshold is calibrated on
            (:data:`tfg_core.segment.CALIBRATION_SCANS`: those with a nodule, or all).
        resume: reuse the fold's cases table and overview figure when ``out`` holds them for the same cohort,
            test scans and predictor (``fold<k>_cases.json``), and its segmentation rows when it finished before
            with the same parameters, methods, predictor and flow (:func:`segment_fold`).
        cohort_seed: phantom cohort seed: 0 (default) is the evaluation cohort every choice was made on; any seed
            but 1 is a fresh replication cohort of the same generator, never seen in training or selection.
    """
    started = time.perf_counter()
    out = Path(out)
    if cohort_seed == TRAINING_SEED or cohort_seed < 0:
        raise DataError(None, f"cohort seed {cohort_seed}: evaluate on 0 (the evaluation cohort) or a fresh seed ≥ 2 "
                        f"(seed {TRAINING_SEED} is the demo flow's and the pretrained backbone's training cohort)")
    from tfg_core.experiment import open_cohort

    opened = open_cohort("phantom", cohort_root(out, cohort_seed, cohort), progress=progress, phantom_seed=cohort_seed)
    root, manifest, annotations = opened.root, opened.manifest, opened.annotations
    split = fold_split(manifest, fold)
    rows = manifest.set_index("seriesuid", drop=False)

    ckpt = shipped_predictor(fold)
    predictor = load_shipped_predictor(fold) if ckpt is not None else None
    out.mkdir(parents=True, exist_ok=True)

    cases_key = _cases_key(root, split, ckpt)
    table = _reused_cases(out, fold, cases_key) if resume else None
    reused = table is not None
    if not reused:
        table = _write_cases(root, rows, annotations, split, predictor, out, cases_key)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.drop(columns=["seriesuid"]).to_string(index=False))
    print(f"\nfold {fold}: {len(split.train)} train / {len(split.val)} val / {len(split.test)} test scans; "
          f"{int(table['n_nodules'].sum())} nodules in the test fold; "
          f"predictor: {ckpt.name if ckpt else 'none shipped yet'}; {time.perf_counter() - started:.1f} s")
    print(f"{'reused' if reused else 'wrote'} {out / f'fold{fold}_cases.csv'} and {out / f'fold{fold}_overview.png'}"
          + (" (same scans, cohort and predictor as before)" if reused else ""))
    seg_rows = segment_fold(root, manifest, annotations, split, out, predictor=predictor, config=config,
                            methods=methods, progress=progress, refine=refine, map_scale=map_scale,
                            calibrate_on=calibrate_on, resume=resume)
    print(f"total {time.perf_counter() - started:.1f} s")
    return table, seg_rows


def run_demo_folds(folds: list[int], out: str | os.PathLike = "outputs/demo", config=None,
                   methods: Sequence[str] | None = None, progress: bool = True,
                   refine: str = "density_after", map_scale: str = "absolute", calibrate_on: str = "nodules",
                   resume: bool = True, cohort_seed: int = 0) -> pd.DataFrame | None:
    """:func:`run_demo` for several held-out folds, then one report over all their test scans.

    Writes ``all_folds_results.csv`` (the tidy rows of every fold run) and ``report/`` (the paper's Table 1
    layout as markdown and CSV, and the aggregate with paired Wilcoxon tests against TFG) and prints the table.

    Args:
        folds: held-out folds.
        out: output folder.
        config: guidance parameters (None = :class:`tfg_core.guidance.GuidanceConfig` defaults, starting at
            :data:`DEMO_START_INDEX`).
        methods: methods to run (None: :data:`DEFAULT_METHODS`).
        progress: progress bars.
        refine: post-processing of every method's mask (:data:`tfg_core.segment.REFINEMENTS`).
        map_scale: every method's map as it is or as a fraction of its scan's maximum
            (:data:`tfg_core.segment.MAP_SCALES`).
        calibrate_on: the validation scans every threshold is calibrated on
            (:data:`tfg_core.segment.CALIBRATION_SCANS`: those with a nodule, or all).
        resume: folds that finished before in ``out`` with the same parameters, methods, predictor and flow are
            read back instead of run again (a killed run resumes at its first unfinished fold).
        cohort_seed: phantom cohort seed (:func:`run_demo`): 0 the evaluation cohort, ≥ 2 a fresh replication.
    """
    from tfg_core.report import write_report
    from tfg_core.strata import write_by_size

    rows = []
    for fold in folds:
        _, seg = run_demo(out, fold, config=config, methods=methods, progress=progress, refine=refine,
                          map_scale=map_scale, calibrate_on=calibrate_on, resume=resume,
                          cohort_seed=cohort_seed)
        if seg is not None:  # None: no predictor shipped for this fold
            rows.append(seg)
    if not rows:
        return None
    pooled = pd.concat(rows, ignore_index=True)
    atomic_write_text(Path(out) / "all_folds_results.csv", pooled.to_csv(index=False))
    cohort = "Phantom cohort" if cohort_seed == 0 else f"Fresh phantom cohort (seed {cohort_seed})"
    title = f"{cohort}, tiny predictor, folds {', '.join(map(str, folds))}"
    paths = write_report(pooled, Path(out) / "report", title=title)
    # the same scans by the size of their largest nodule: cohorts differ most in how many small nodules they hold
    annotations = read_annotations(cohort_root(out, cohort_seed) / "annotations.csv")
    paths.update(write_by_size(pooled, annotations, Path(out) / "report", title=f"{title}, by nodule size"))
    print("\n" + paths["table1_md"].read_text())
    print(paths["by_size_md"].read_text())
    print(f"wrote {Path(out) / 'all_folds_results.csv'}, {paths['table1_md']} and {paths['by_size_md']}")
    return pooled


def _cases_key(root: Path, split, predictor_path: Path | None) -> dict:
    """What decides a fold's cases table and overview figure: the cohort, the test scans and the predictor's file."""
    from dataclasses import asdict

    from tfg_core.data.phantom import read_cohort_config
    from tfg_core.io import sha256_file

    key = {"cohort": asdict(read_cohort_config(root)), "fold": int(split.fold), "test": sorted(split.test),
           "predictor_sha256": sha256_file(predictor_path) if predictor_path is not None else None}
    return json.loads(json.dumps(key))  # as it reads back from disk (tuples become lists)


def _reused_cases(out: Path, fold: int, key: dict) -> pd.DataFrame | None:
    """The fold's cases table from an earlier run with the same ``key`` (its figure on disk too); else None."""
    try:
        if json.loads((out / f"fold{fold}_cases.json").read_text()) != key:
            return None
        if not (out / f"fold{fold}_overview.png").is_file():
            return None
        table = pd.read_csv(out / f"fold{fold}_cases.csv")
    except (OSError, ValueError):  # missing or half-written: build it again
        return None
    return table if sorted(table.get("seriesuid", ())) == key["test"] else None


def _write_cases(root: Path, rows: pd.DataFrame, annotations: pd.DataFrame, split, predictor, out: Path,
                 key: dict) -> pd.DataFrame:
    """Per test scan its geometry, model grid, nodules, weak slice labels, stacks and the predictor's slice
    accuracy; written with the overview figure, then ``key`` (last, so a killed write is rebuilt)."""
    from tfg_core.training.finetune import predict_slices

    fold = int(split.fold)
    (out / f"fold{fold}_cases.json").unlink(missing_ok=True)
    records, cases = [], []
    for uid in split.test:
        case = load_case(root, rows.loc[uid], annotations)
        sc = slice_case_from(case)  # the model-grid volume and its weak slice labels
        stacks = make_stacks(sc.volume)
        facts = scan_record(case, sc)
        rec = {"fold": fold, "seriesuid": uid, "flipped": bool(rows.loc[uid, "flipped"]),
               **{k: facts[k] for k in ("shape", "model_grid", "spacing_mm", "n_nodules", "nodule_voxels",
                                        "positive_slices", "lung_fraction")},
               "stacks": "x".join(map(str, stacks.shape))}
        probs = None
        if predictor is not None:
            probs = predict_slices(predictor, sc, size=predictor.input_size)
            rec["slice_acc"] = round(float(np.mean((probs >= 0.5) == sc.labels)), 3)
        records.append(rec)
        cases.append((case, sc, probs))
    table = pd.DataFrame.from_records(records)
    atomic_write_text(out / f"fold{fold}_cases.csv", table.to_csv(index=False))
    atomic_write_with(out / f"fold{fold}_overview.png", lambda tmp: _overview_figure(cases, tmp))
    atomic_write_text(out / f"fold{fold}_cases.json", json.dumps(key, indent=1))
    return table


def _segmentation_figure(shown, path: Path, max_cases: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = shown[:max_cases] or []
    cols = ["input", "counterfactual (TFG)", "|difference|", "TFG mask", "no-prior mask", "ground truth"]
    fig, axes = plt.subplots(max(1, len(shown)), len(cols), figsize=(2.0 * len(cols), 2.1 * max(1, len(shown))), squeeze=False)
    for row, (prepared, maps, masks) in enumerate(shown):
        gt = prepared.gt_grid
        z = int(np.argmax(gt.sum(axis=(1, 2))))
        panels = [prepared.grid.array[z], maps["_counterfactual"][z], maps["tfg"][z], masks["tfg"][z],
                  masks.get("no_prior", np.zeros_like(gt))[z], gt[z]]
        for col, (ax, img) in enumerate(zip(axes[row], panels)):
            ax.imshow(img, cmap="magma" if col == 2 else "gray", vmin=0, vmax=None if col == 2 else 1)
            if col >= 3:
                ax.contour(gt[z], levels=[0.5], colors="r", linewidths=0.6)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(cols[col], fontsize=8)
        axes[row, 0].set_ylabel(f"{prepared.uid.rsplit('.', 1)[-1]} z={z}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _overview_figure(cases, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cases)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for col, (case, sc, probs) in enumerate(cases):
        mask = case.nodule_mask
        z = int(np.argmax(mask.sum(axis=(1, 2)))) if mask.any() else case.volume.shape[0] // 2
        ax = axes[0, col]
        ax.imshow(case.volume.array[z], cmap="gray", vmin=-1000, vmax=400)  # lung window
        if mask[z].any():
            ax.contour(mask[z], levels=[0.5], colors="r", linewidths=0.8)
        ax.contour(case.lung_mask[z], levels=[0.5], colors="c", linewidths=0.4)
        ax.set_title(f"{case.uid.rsplit('.', 1)[-1]} z={z}", fontsize=7)
        ax.axis("off")
        ax = axes[1, col]
        ax.step(np.arange(len(sc.labels)), sc.labels.astype(float), where="mid", color="r", label="label")
        if probs is not None:
            ax.plot(probs, color="k", lw=0.8, label="p(nodule)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("slice", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[1, 0].legend(fontsize=6)
    fig.suptitle("phantom test fold: lung window, ground truth (red), lung mask (cyan); weak slice labels", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
