"""``tfg demo``: the embedded default, end to end on a CPU in minutes, no downloads.

Today it runs the data path on the phantom cohort — LUNA16-shaped tree → manifest → fold split → scans and
ground truth → MAISI intensity window and model grid → 2.5D stacks with weak slice labels — and, when a
fine-tuned slice classifier for the fold is available, its slice-level scores. Results are written
atomically under ``out``; a rerun reuses the cohort.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tfg_core.data.cases import load_case
from tfg_core.data.folds import fold_split
from tfg_core.data.luna16 import read_annotations
from tfg_core.data.phantom import PhantomConfig, write_cohort
from tfg_core.data.preprocess import to_model_grid
from tfg_core.data.slices import make_stacks
from tfg_core.io import atomic_write_text, atomic_write_with
from tfg_core.training.run import ensure_manifest
from tfg_core.training.slice_data import slice_case_from

ASSETS = Path(__file__).resolve().parent / "assets"


def shipped_predictor(fold: int) -> Path | None:
    """The repository's fine-tuned tiny predictor for ``fold``, if one is shipped.

    Args:
        fold: held-out fold.
    """
    path = ASSETS / f"tiny_predictor_fold{fold}.pt"
    return path if path.is_file() else None


def run_demo(out: str | os.PathLike = "outputs/demo", fold: int = 0, cohort: str | os.PathLike | None = None,
             progress: bool = True) -> pd.DataFrame:
    """Run the demo on one held-out phantom fold and write a table and a figure.

    Args:
        out: output folder.
        fold: held-out fold (LUNA16 subset) 0–9.
        cohort: where the phantom tree lives (default ``<out>/../phantom``).
        progress: progress bars.
    """
    started = time.perf_counter()
    out = Path(out)
    root = Path(cohort) if cohort is not None else out.parent / "phantom"
    write_cohort(root, PhantomConfig(), progress=progress)
    manifest, _ = ensure_manifest(root)
    annotations = read_annotations(root / "annotations.csv")
    split = fold_split(manifest, fold)
    rows = manifest.set_index("seriesuid", drop=False)

    predictor = None
    ckpt = shipped_predictor(fold)
    if ckpt is not None:
        from tfg_core.training.checkpoint import load_predictor
        from tfg_core.training.finetune import predict_slices

        predictor, _ = load_predictor(ckpt)

    records, cases = [], []
    for uid in split.test:
        case = load_case(root, rows.loc[uid], annotations)
        grid = to_model_grid(case.volume)
        sc = slice_case_from(case)
        stacks = make_stacks(grid.array)
        rec = {
            "fold": fold, "seriesuid": uid, "flipped": bool(rows.loc[uid, "flipped"]),
            "shape": "x".join(map(str, case.volume.shape)), "model_grid": "x".join(map(str, grid.shape)),
            "spacing_mm": "x".join(f"{s:g}" for s in case.volume.spacing),
            "n_nodules": len(case.annotations), "nodule_voxels": int(case.nodule_mask.sum()),
            "positive_slices": int(sc.labels.sum()), "stacks": "x".join(map(str, stacks.shape)),
            "lung_fraction": round(float(case.lung_mask.mean()), 3),
        }
        if predictor is not None:
            probs = predict_slices(predictor, sc, size=predictor.input_size)
            rec["slice_acc"] = round(float(np.mean((probs >= 0.5) == sc.labels)), 3)
            sc.probs = probs
        records.append(rec)
        cases.append((case, sc))
    table = pd.DataFrame.from_records(records)
    atomic_write_text(out / f"fold{fold}_cases.csv", table.to_csv(index=False))
    figure = out / f"fold{fold}_overview.png"
    atomic_write_with(figure, lambda tmp: _overview_figure(cases, tmp))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.drop(columns=["seriesuid"]).to_string(index=False))
    print(f"\nfold {fold}: {len(split.train)} train / {len(split.val)} val / {len(split.test)} test scans; "
          f"{int(table['n_nodules'].sum())} nodules in the test fold; "
          f"predictor: {ckpt.name if ckpt else 'none shipped yet'}; {time.perf_counter() - started:.1f} s")
    print(f"wrote {out / f'fold{fold}_cases.csv'} and {figure}")
    return table


def _overview_figure(cases, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cases)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for col, (case, sc) in enumerate(cases):
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
        if getattr(sc, "probs", None) is not None:
            ax.plot(sc.probs, color="k", lw=0.8, label="p(nodule)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("slice", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[1, 0].legend(fontsize=6)
    fig.suptitle("phantom test fold: lung window, ground truth (red), lung mask (cyan); weak slice labels", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
