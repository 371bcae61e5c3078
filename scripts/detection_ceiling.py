"""How much of TFG's Dice the slice classifier allows: the nodule scans it detects, and what TFG could reach on them.

Run on one cohort's ``tfg demo`` rows (classifier calls only, about a second a scan):
``python scripts/detection_ceiling.py outputs/h4a/demo/all_folds_results.csv outputs/h4b/demo/all_folds_results.csv
--cohort-seed 4 --root outputs/h4/phantom_seed4`` writes ``detection.csv`` beside the first CSV and prints each
method's mean Dice on all nodule scans, on the detected ones (a slice through the nodule called positive on the
input, so guidance pushes on it) and on the rest, and two bounds on TFG's mean with this classifier: every detected
scan at Dice 1, and every detected scan at the oracle's Dice (the healthy twin through the autoencoder), 0 on the
rest. It also joins each scan's nodule signal (``tfg_core.data.phantom_signal``: kinds, size, the nodules' peak
excess over the healthy twin in units of the case's noise σ) and prints detected and missed scans by kind and size,
which tells whether the missed ones are lost in the noise or in the anatomy. Several cohorts' tables are pooled with
``--tables a/detection.csv b/detection.csv`` (no classifier call).
Rows of several runs of one cohort (e.g. TFG in one, the oracle or IG in another) may be passed together; a scan
scored by a method twice keeps the row of the file listed last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from tfg_core.data.phantom import read_cohort_config
from tfg_core.data.phantom_signal import nodule_signal_rows
from tfg_core.diagnose import (add_slice_evidence_arguments, detection_ceiling, detection_table, misses_by_kind,
                               slice_evidence_of_runs)
from tfg_core.io import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_evidence_arguments(parser, results_nargs="*")
    parser.add_argument("--out", type=Path, default=None, help="table CSV (default: detection.csv beside the first "
                                                                 "results)")
    parser.add_argument("--tables", nargs="+", type=Path, default=None,
                        help="pool detection.csv tables written earlier instead of reading results")
    args = parser.parse_args(argv)
    if bool(args.results) == bool(args.tables):
        parser.error("give either result CSVs of one cohort or --tables of earlier runs")

    if args.tables:
        missing = [p for p in args.tables if not p.is_file()]
        if missing:
            parser.error(f"no such table: {missing[0]}")
        table = pd.concat([pd.read_csv(p) for p in args.tables], ignore_index=True)
    else:
        rows, evidence = slice_evidence_of_runs(args.results, args.root, args.cohort_seed, args.threshold)
        table = detection_table(evidence, rows, args.threshold)
        table.insert(0, "cohort", args.cohort_seed)
        signal = nodule_signal_rows(table.seriesuid, read_cohort_config(args.root))
        table = table.merge(signal.drop(columns="nodule_voxels"), on="seriesuid", how="left")
        out = args.out or args.results[0].with_name("detection.csv")
        atomic_write_text(out, table.to_csv(index=False))
        print(f"wrote {out}")
    summary = detection_ceiling(table)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"{len(table)} nodule scans, {int(table.detected.sum())} detected (a slice through the nodule called "
              f"positive)")
        print(summary.round(3).to_string(index=False))
        with_signal = table[table.peak_snr.notna()] if "peak_snr" in table else table.iloc[:0]
        if len(with_signal):  # tables written before the nodule signal was joined lack it
            print(f"\nby nodule kind and size, {len(with_signal)} of the scans (peak_snr: the nodules' peak excess "
                  "over the healthy twin / noise σ, median)")
            print(misses_by_kind(with_signal).round(2).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
