"""Scans on which guidance never acts (no slice called positive): would the most probable slice point at the nodule?

Run: ``python scripts/scans_without_positive_slices.py outputs/e0a/demo/all_folds_results.csv
outputs/e0b/demo/all_folds_results.csv`` (rows of ``tfg demo``; a fresh cohort names its seed and folder:
``--cohort-seed 2 --root outputs/f2a/phantom_seed2``). Classifier calls only, no guidance: about a second a scan.

TFG's loss covers the slices the classifier calls positive on the input (Algorithm 1), so a nodule scan without a
positive slice gets no mask. A fallback that guides on the most probable slice instead can only help if that slice
lies on the nodule, and it costs a push on every healthy scan without a positive slice, unless some probability
floor separates the two. This prints both sides (:func:`tfg_core.diagnose.slice_evidence_rows`) and writes the
table beside the first CSV as ``slice_evidence.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tfg_core.diagnose import add_slice_evidence_arguments, slice_evidence_of_runs
from tfg_core.io import atomic_write_text


def summarise(table: pd.DataFrame) -> list[str]:
    """The lines the script prints after the per-scan table.

    Args:
        table: :func:`tfg_core.diagnose.slice_evidence_rows` output.
    """
    none = table[table.positive_slices == 0]
    nodule, healthy = none[none.nodule_voxels > 0], none[none.nodule_voxels == 0]
    n_nodule, n_healthy = int((table.nodule_voxels > 0).sum()), int((table.nodule_voxels == 0).sum())
    hit = nodule[nodule.top_slice_on_nodule]
    lines = [f"nodule scans without a positive slice: {len(nodule)} of {n_nodule}; their most probable slice lies on "
             f"the nodule in {len(hit)}"]
    if len(nodule):
        lines.append("  their largest slice probability: " + ", ".join(f"{p:.2f}" for p in sorted(nodule.max_p))
                     + (" (on the nodule: " + ", ".join(f"{p:.2f}" for p in sorted(hit.max_p)) + ")" if len(hit) else ""))
    lines.append(f"healthy scans without a positive slice: {len(healthy)} of {n_healthy}")
    if len(healthy):
        q = np.quantile(healthy.max_p, [0.0, 0.5, 1.0])
        lines.append(f"  their largest slice probability: min {q[0]:.2f}, median {q[1]:.2f}, max {q[2]:.2f}")
        for _, row in hit.iterrows():  # a floor that keeps this scan's fallback keeps these healthy pushes too
            lines.append(f"  a floor at {row.max_p:.2f} (fold {row.fold}'s hit) would also push on "
                         f"{int((healthy.max_p >= row.max_p).sum())} of those healthy scans")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_evidence_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="table CSV (default: beside the first results)")
    args = parser.parse_args(argv)

    _, table = slice_evidence_of_runs(args.results, args.root, args.cohort_seed, args.threshold)
    shown = table[table.positive_slices == 0].drop(columns=["seriesuid"])
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(shown.round(3).to_string(index=False))
    print("\n".join(summarise(table)))
    out = args.out or args.results[0].with_name("slice_evidence.csv")
    atomic_write_text(out, table.to_csv(index=False))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
