"""Where TFG lost the nodule on its low-Dice scans: classifier, its gradient, the prior, or the threshold.

Run: ``python scripts/diagnose_tfg_failures.py outputs/n1a/demo/all_folds_results.csv outputs/n1b/demo/all_folds_results.csv``
(``--max-dice 0.3`` by default; about 5 s a scan on two cores). The rows must come from ``tfg demo`` on the phantom
cohort with the shipped demo flow and fold predictors and the default guidance (checked through ``params_hash``).

Prints one line per scan (:func:`tfg_core.diagnose.diagnose_case`) and the count per stage, and writes the table
beside the first CSV as ``tfg_failures.csv``. ``dsc_again`` recomputes each row's Dice from the same maps: the
largest difference to the rows' Dice is printed, so a diagnosis that does not reproduce its rows shows at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from tfg_core.data.luna16 import read_annotations
from tfg_core.diagnose import FAILURE_STAGES, diagnose_rows
from tfg_core.experiment import load_fold_predictor
from tfg_core.flow.demo import load_demo_flow
from tfg_core.io import atomic_write_text
from tfg_core.training.run import ensure_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="all_folds_results.csv of tfg demo runs")
    parser.add_argument("--root", type=Path, default=Path("outputs/phantom"), help="the phantom cohort of the runs")
    parser.add_argument("--max-dice", type=float, default=0.3, help="diagnose TFG scans with a Dice below this")
    parser.add_argument("--out", type=Path, default=None, help="table CSV (default: beside the first results)")
    args = parser.parse_args(argv)

    rows = pd.concat([pd.read_csv(p) for p in args.results], ignore_index=True)
    low = rows[(rows.method == "tfg") & (rows.gt_voxels > 0) & (rows.dsc < args.max_dice)]
    n_scans = int(((rows.method == "tfg") & (rows.gt_voxels > 0)).sum())
    print(f"{len(low)} of {n_scans} TFG scans with a nodule have Dice < {args.max_dice}")
    if low.empty:
        return 0
    manifest, _ = ensure_manifest(args.root)
    table = diagnose_rows(low, args.root, manifest, read_annotations(args.root / "annotations.csv"),
                          load_demo_flow(), load_fold_predictor)
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
