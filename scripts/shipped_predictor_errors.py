"""Where the shipped tiny fold predictors' slice errors sit, pooled over the ten folds' validation and test scans.

Run: ``python scripts/shipped_predictor_errors.py [--root outputs/phantom]`` (about 40 s on two cores).

Each fold's predictor (``tfg_core/assets/tiny_predictor_fold{k}.pt``) classifies every slice of that fold's
validation and test scans at its saved operating point; :func:`tfg_core.training.slice_errors.slice_error_table`
names each error by where it sits (a nodule's edge slice, inside a nodule, next to one, elsewhere).

Beside it, a reader that sees the nodule's noise-free signal: the scan minus its healthy twin (same anatomy and
noise, no nodules), a slice called positive when the nodule adds at least τ HU to one of its voxels, τ the best
for the pooled F1. It shows how far the weak label follows what the nodule puts into the slice: where this
reader is right and the classifier wrong, the signal was there and the classifier did not resolve it.
Prints one row per split, the numbers the README's Status section quotes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tfg_core.data.folds import fold_split
from tfg_core.data.phantom import PhantomConfig, generate_case, healthy_twin, parse_series_uid, write_cohort
from tfg_core.experiment import load_fold_predictor
from tfg_core.training.calibration import f1_optimal_shift
from tfg_core.training.finetune import binary_metrics, predict_slices
from tfg_core.training.run import ensure_manifest, load_slice_cases
from tfg_core.training.slice_errors import slice_error_table, summarize_slice_errors


def nodule_signal_per_slice(uid: str, config: PhantomConfig) -> tuple[np.ndarray, np.ndarray]:
    """(labels, peak |scan − healthy twin| in HU) per axial slice of one phantom, on the phantom's own grid."""
    index = parse_series_uid(uid)[1]
    case, twin = generate_case(index, config), healthy_twin(index, config)
    signal = np.abs(case.volume.array.astype(np.float32) - twin.volume.array.astype(np.float32))
    labels = (case.nodule_labels > 0).reshape(len(signal), -1).any(axis=1)
    return labels, signal.reshape(len(signal), -1).max(axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("outputs/phantom"),
                        help="default phantom cohort (written if absent)")
    args = parser.parse_args(argv)

    config = PhantomConfig()
    write_cohort(args.root, config)  # resumable: a complete cohort is only checked
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
        scans = [(fold, uid) for fold in range(10) for uid in getattr(fold_split(manifest, fold), split_name)]
        per_scan = [nodule_signal_per_slice(uid, config) for _, uid in scans]
        labels, signal = (np.concatenate(a) for a in zip(*per_scan))
        cut = -f1_optimal_shift(signal, labels)  # the cut with the best pooled F1, half-way between two signals
        calls = signal >= cut
        fold_of_slice = np.concatenate([np.full(len(lab), fold) for (fold, _), (lab, _) in zip(scans, per_scan)])
        per_fold = [binary_metrics(calls[fold_of_slice == fold], labels[fold_of_slice == fold])["f1"]
                    for fold in range(10)]
        print(f"{split_name}: noise-free signal reader F1 per fold at {cut:.0f} HU: "
              + ", ".join(f"{f:.3f}" for f in per_fold), flush=True)
        rows[split_name] = pd.concat([summarize_slice_errors(table), pd.Series({
            "median nodule voxels, found": positives.nodule_voxels[positives.call].median(),
            "median nodule voxels, missed": positives.nodule_voxels[~positives.call].median(),
            "noise-free signal reader F1": binary_metrics(calls, labels)["f1"], "its cut (HU)": cut})])
    print(pd.DataFrame(rows).T.round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
