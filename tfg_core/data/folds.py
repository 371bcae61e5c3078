"""LUNA16's official 10-fold protocol: test on subset k, validate on one other subset, train on the rest."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

N_FOLDS = 10


@dataclass(frozen=True)
class FoldSplit:
    """Series UIDs of one fold's train / validation / test split."""

    fold: int
    train: list[str]
    val: list[str]
    test: list[str]


def fold_split(manifest: pd.DataFrame, fold: int, val_offset: int = 1) -> FoldSplit:
    """Split a manifest (columns ``seriesuid``, ``subset``) for test fold ``fold``.

    Validation is subset ``(fold + val_offset) % 10``: fixed so every method (TFG and the baselines)
    calibrates its threshold on the same scans, and no scan is ever in two roles.

    Args:
        manifest: one row per scan with its LUNA16 subset.
        fold: test subset, 0–9.
        val_offset: which other subset validates (≠ 0 mod 10).
    """
    if not 0 <= fold < N_FOLDS:
        raise ValueError(f"fold must be in 0..{N_FOLDS - 1}, got {fold}")
    if val_offset % N_FOLDS == 0:
        raise ValueError("val_offset must not map the validation subset onto the test subset")
    val_fold = (fold + val_offset) % N_FOLDS
    subset = manifest["subset"].astype(int)
    uids = manifest["seriesuid"].astype(str)
    return FoldSplit(
        fold=fold,
        train=sorted(uids[(subset != fold) & (subset != val_fold)]),
        val=sorted(uids[subset == val_fold]),
        test=sorted(uids[subset == fold]),
    )
