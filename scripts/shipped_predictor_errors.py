"""Where the shipped tiny fold predictors' slice errors sit, pooled over the ten folds' validation and test scans.

Run: ``python scripts/shipped_predictor_errors.py [--root outputs/phantom]`` (about 30 s on two cores).

Each fold's predictor (``tfg_core/assets/tiny_predictor_fold{k}.pt``) classifies every slice of that fold's
validation and test scans at its saved operating point; :func:`tfg_core.training.slice_errors.slice_error_table`
names each error by where it sits (a nodule's edge slice, inside a nodule, next to one, elsewhere). Prints one row
per split, the numbers the README's Status section quotes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from tfg_core.data.folds import fold_split
from tfg_core.data.phantom import PhantomConfig, write_cohort
from tfg_core.experiment import load_fold_predictor
from tfg_core.training.finetune import predict_slices
from tfg_core.training.run import ensure_manifest, load_slice_cases
from tfg_core.training.slice_errors import slice_error_table, summarize_slice_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("outputs/phantom"), help="default phantom cohort (written if absent)")
    args = parser.parse_args(argv)

    write_cohort(args.root, PhantomConfig())  # resumable: a complete cohort is only checked
    manifest, _ = ensure_manifest(args.root)
    rows = {}
    for split_name in ("val", "test"):
        tables = []
        for fold in range(10):
            cases = load_slice_cases(args.root, manifest, getattr(fold_split(manifest, fold), split_name))
            model = load_fold_predictor(fold)
            probs = [predict_slices(model, case, size=int(model.input_size)) for case in cases]
            tables.append(slice_error_table(cases, probs))
        table = pd.concat(tables, ignore_index=True)
        positives = table[table.label]
        rows[split_name] = pd.concat([summarize_slice_errors(table), pd.Series({
            "median nodule voxels, found": positives.nodule_voxels[positives.call].median(),
            "median nodule voxels, missed": positives.nodule_voxels[~positives.call].median()})])
    print(pd.DataFrame(rows).T.round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
