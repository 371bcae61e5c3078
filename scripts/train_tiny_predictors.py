"""Train the demo's tiny predictors, one per test fold, and list them with sha256 in ``assets.json``.

Run: ``python scripts/train_tiny_predictors.py [--folds 0 1 …] [--root DIR] [--out-dir tfg_core/assets]``.

Each fold k is ``finetune_fold(root, k, "tiny", members=2)`` (test = subset k, val = subset k+1, train = the rest)
on the default phantom cohort (``PhantomConfig()``, seed 0), with the tiny defaults: two fine-tunes (seeds 0 and 1)
from the shipped pretrained tiny predictor's backbone (``scripts/pretrain_tiny_predictor.py``, an external cohort,
seed 1), combined into one mean-CAM ensemble whose operating point is placed on the validation slices. Folds run
sequentially (the CPU is shared); the manifest is rewritten after each fold so an interrupted run keeps what it
finished, with the torch CPU thread count the fold ran with. On the same torch build and thread count a rerun gives
bit-identical weights (the files still differ: they record the wall time); another thread count gives other weights.
Besides the validation F1 that picked the checkpoint (an optimistic number: it is the best of several checks),
the manifest records the slice F1 and AUC on the fold's held-out test scans, which training never saw.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tfg_core.data.folds import fold_split
from tfg_core.data.phantom import PhantomConfig, write_cohort
from tfg_core.io import atomic_write_text, sha256_file
from tfg_core.predictors.tiny import PRETRAINED_PATH
from tfg_core.training.checkpoint import load_predictor
from tfg_core.training.finetune import TINY_DEFAULTS, evaluate
from tfg_core.training.run import ensure_manifest, finetune_fold, load_slice_cases

ASSETS = Path(__file__).resolve().parents[1] / "tfg_core" / "assets"
# fine-tunes per fold: two seeds of one recipe moved the guided segmentation by more than their slice metrics said,
# and their mean-CAM ensemble guided better on the validation scans (docs/measurement_log.md)
MEMBERS = 2


def held_out_slice_metrics(root: Path, fold: int, checkpoint: Path) -> dict[str, float]:
    """Slice-level F1 (at p = 0.5) and AUC of a fold's checkpoint on that fold's held-out test scans."""
    manifest, _ = ensure_manifest(root)
    cases = load_slice_cases(root, manifest, fold_split(manifest, fold).test)
    model, _ = load_predictor(checkpoint)
    metrics = evaluate(model, cases)
    return {"f1": round(metrics["f1"], 4), "auc": round(metrics["auc"], 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--root", type=Path, default=Path("outputs/phantom"), help="default phantom cohort (written if absent)")
    parser.add_argument("--out-dir", type=Path, default=ASSETS)
    parser.add_argument("--iterations", type=int, default=None, help="override TINY_DEFAULTS (smoke runs only)")
    parser.add_argument("--members", type=int, default=MEMBERS, help="fine-tunes (seeds 0, 1, …) per fold ensemble")
    parser.add_argument("--pretrained", type=Path, default=PRETRAINED_PATH,
                        help="backbone to start from (default: the shipped tiny_pretrained.pt; another one to try a "
                             "candidate pretraining, with --out-dir elsewhere)")
    parser.add_argument("--clean-estimate-steps", type=int, nargs="*", default=[],
                        help="also train on each training scan's demo-flow clean estimate at one of these sampling "
                             "steps (e.g. 24 25 26 27 28, the demo's guided steps); default: inputs only")
    args = parser.parse_args(argv)
    pretrained = args.pretrained.resolve()
    shipped = pretrained == PRETRAINED_PATH.resolve()

    write_cohort(args.root, PhantomConfig())  # resumable: a complete cohort is only checked, not rewritten
    manifest_path = args.out_dir / "assets.json"
    views: dict = {}  # clean-estimate views, computed once per scan for all folds of this run
    for fold in args.folds:
        name = f"tiny_predictor_fold{fold}.pt"
        start = time.perf_counter()
        result = finetune_fold(args.root, fold, "tiny", out=args.out_dir / name, progress=False, seed=0,
                               iterations=args.iterations, pretrained_path=str(pretrained), members=args.members,
                               clean_estimate_steps=tuple(args.clean_estimate_steps), view_cache=views)
        best = result["best"]
        test = held_out_slice_metrics(args.root, fold, args.out_dir / name)
        # read just before writing: another run (other folds, in parallel) may have added its entries meanwhile
        entries = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        entries[name] = {
            "sha256": sha256_file(args.out_dir / name),
            "command": f"python scripts/train_tiny_predictors.py --folds {fold}"
                       + (f" --iterations {args.iterations}" if args.iterations else "")
                       + (f" --members {args.members}" if args.members != MEMBERS else "")
                       + ("" if shipped else f" --pretrained {args.pretrained}")
                       + (" --clean-estimate-steps " + " ".join(map(str, args.clean_estimate_steps))
                          if args.clean_estimate_steps else ""),
            "cohort": "PhantomConfig() seed 0", "fold": fold, "val_f1": best["f1"], "best_iteration": best["iteration"],
            "test_f1": test["f1"], "test_auc": test["auc"],
            "wall_s": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads(),
            "config": {**TINY_DEFAULTS, "seed": 0, "members": args.members,
                       **({"clean_estimate_steps": args.clean_estimate_steps} if args.clean_estimate_steps else {}),
                       "pretrained_path": (
                           f"tfg_core/assets/{PRETRAINED_PATH.name}" if shipped else str(args.pretrained)),
                       **({"iterations": args.iterations} if args.iterations else {})},
            "pretrained_sha256": sha256_file(pretrained),
        }
        atomic_write_text(manifest_path, json.dumps(dict(sorted(entries.items())), indent=2) + "\n")
        print(f"fold {fold}: val F1 {best['f1']:.3f} (iterations {best['iteration']}), test F1 {test['f1']:.3f} "
              f"AUC {test['auc']:.3f}, {entries[name]['wall_s']} s → {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
