"""Where TFG lost the nodule on its low-Dice scans: classifier, its gradient, the prior, or the threshold.

Run: ``python scripts/diagnose_tfg_failures.py outputs/n1a/demo/all_folds_results.csv outputs/n1b/demo/all_folds_results.csv``
(``--max-dice 0.3`` by default; a few seconds a scan on two cores with the demo flow). By default the rows are taken
to come from ``tfg demo`` on the phantom cohort with the shipped demo flow and fold predictors and default guidance;
other runs name theirs: ``--dataset luna16 --root /data/LUNA16 --flow maisi-v2 --backbone tinyvit --checkpoint
runs/fold{fold}/best.pt --guidance '{"strength": 2}'``; rows of a fresh phantom cohort (``tfg demo --cohort-seed 2``)
name it: ``--cohort-seed 2 --root outputs/phantom_seed2``. The guidance parameters are checked against the rows'
``params_hash``; the networks are not, but other networks than the rows' show as a nonzero Dice difference below.

Prints one line per scan (:func:`tfg_core.diagnose.diagnose_case`) and the count per stage, and writes the table
beside the first CSV as ``tfg_failures.csv``. ``dsc_again`` recomputes each row's Dice from the same maps: the
largest difference to the rows' Dice is printed, so a diagnosis that does not reproduce its rows shows at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd

from tfg_core.diagnose import FAILURE_STAGES, diagnose_rows
from tfg_core.experiment import DATASETS, FLOWS, default_guidance, load_flow, load_fold_predictor, open_cohort
from tfg_core.io import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="all_folds_results.csv of tfg demo runs")
    parser.add_argument("--dataset", choices=DATASETS, default="phantom", help="the cohort the rows were made on")
    parser.add_argument("--root", type=Path, default=Path("outputs/phantom"), help="its LUNA16-shaped tree")
    parser.add_argument("--cohort-seed", type=int, default=0,
                        help="phantom cohort seed the rows were made on (tfg demo --cohort-seed; 0 = evaluation)")
    parser.add_argument("--flow", choices=FLOWS, default="demo", help="the prior the rows were made with")
    parser.add_argument("--maisi-autoencoder", default="", help="MAISI-v2 autoencoder_v1.pt ($TFG_MAISI_AUTOENCODER)")
    parser.add_argument("--maisi-unet", default="", help="MAISI-v2 diff_unet_3d_rflow-ct.pt ($TFG_MAISI_UNET)")
    parser.add_argument("--backbone", choices=("tiny", "tinyvit", "resnet50"), default="tiny",
                        help="the fold predictors' backbone")
    parser.add_argument("--checkpoint", default="",
                        help="each fold's predictor, with {fold} in the path (empty: the shipped tiny predictors)")
    parser.add_argument("--guidance", default="{}",
                        help="GuidanceConfig fields the rows were run with, as JSON, over the flow's defaults "
                             "(tfg_core.experiment.default_guidance: with --flow demo, tfg demo's start index)")
    parser.add_argument("--max-dice", type=float, default=0.3, help="diagnose TFG scans with a Dice below this")
    parser.add_argument("--out", type=Path, default=None, help="table CSV (default: beside the first results)")
    args = parser.parse_args(argv)
    try:
        # the fields over the flow's own defaults: rows of tfg demo start where it starts
        config = dataclasses.replace(default_guidance(args.flow), **json.loads(args.guidance))
    except (TypeError, ValueError) as error:  # bad JSON, an unknown field or a value GuidanceConfig refuses
        parser.error(f"--guidance {args.guidance!r}: {error}")

    rows = pd.concat([pd.read_csv(p) for p in args.results], ignore_index=True)
    low = rows[(rows.method == "tfg") & (rows.gt_voxels > 0) & (rows.dsc < args.max_dice)]
    n_scans = int(((rows.method == "tfg") & (rows.gt_voxels > 0)).sum())
    print(f"{len(low)} of {n_scans} TFG scans with a nodule have Dice < {args.max_dice}")
    if low.empty:
        return 0
    cohort = open_cohort(args.dataset, args.root, phantom_seed=args.cohort_seed)
    flow = load_flow(args.flow, args.maisi_autoencoder, args.maisi_unet)

    def predictor(fold: int):
        return load_fold_predictor(fold, args.backbone, args.checkpoint.format(fold=fold) or None)

    table = diagnose_rows(low, cohort.root, cohort.manifest, cohort.annotations, flow, predictor, config)
    with pd.option_context("display.width", 220, "display.max_columns", 30):
        print(table.drop(columns=["seriesuid"]).round(3).to_string(index=False))
    counts = table.stage.value_counts().reindex(FAILURE_STAGES, fill_value=0)
    print("\nstage where the nodule was lost: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    print(f"largest |Dice recomputed − Dice in the rows|: {(table.dsc_again - table.dsc).abs().max():.4f}")
    out = args.out or args.results[0].with_name("tfg_failures.csv")
    atomic_write_text(out, table.to_csv(index=False))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
