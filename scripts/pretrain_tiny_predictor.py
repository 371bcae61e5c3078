"""Pretrain the tiny predictor on an external phantom cohort: the demo's stand-in for RadImageNet / LiteMedSAM.

Run: ``python scripts/pretrain_tiny_predictor.py [--iterations N] [--workdir runs/tiny_pretrain]``.

The paper's predictors start from published backbones and are then fine-tuned on each LUNA16 fold. The tiny
demo predictor has no published backbone, and its fold training splits are small (80 phantoms, about 45
nodules), so it starts from this one: the same architecture trained the same way (:func:`finetune`, slice
labels only, balanced batches, the paper's augmentation) on cohort seed 1 — 500 phantoms that share no case
with the evaluation cohort (seed 0), the cohort the demo flow was trained on. Subsets 0–8 train, subset 9
validates; the checkpoint with the best validation F1 is written to ``tfg_core/assets/tiny_pretrained.pt``
and listed with its sha256 in ``assets.json``. ``scripts/train_tiny_predictors.py`` then fine-tunes it per
fold. Rerunning resumes nothing: it trains from scratch (38 min on the 2-core AVX2 CI-like machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from tfg_core.data.phantom import PhantomConfig, write_cohort
from tfg_core.io import atomic_write_text, sha256_file
from tfg_core.training.finetune import config_for, finetune
from tfg_core.training.run import ensure_manifest, load_slice_cases

ASSETS = Path(__file__).resolve().parents[1] / "tfg_core" / "assets"
PRETRAIN_COHORT = PhantomConfig(seed=1, n_cases=500)
VAL_SUBSET = 9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/tiny_pretrain"), help="cohort + logs")
    parser.add_argument("--out-dir", type=Path, default=ASSETS)
    parser.add_argument("--iterations", type=int, default=6000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--cases", type=int, default=PRETRAIN_COHORT.n_cases,
                        help="size of the external cohort (seed 1; the first 500 are the default cohort's cases)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)

    cohort = replace(PRETRAIN_COHORT, n_cases=args.cases)
    name = "phantom_seed1" + (f"_n{args.cases}" if args.cases != PRETRAIN_COHORT.n_cases else "")
    root = write_cohort(args.workdir / name, cohort, progress=args.progress)
    manifest, manifest_path = ensure_manifest(root)
    subset = manifest["subset"].astype(int)
    train_uids = sorted(manifest["seriesuid"][subset != VAL_SUBSET])
    val_uids = sorted(manifest["seriesuid"][subset == VAL_SUBSET])
    train = load_slice_cases(root, manifest, train_uids, progress=args.progress)
    val = load_slice_cases(root, manifest, val_uids, progress=args.progress)
    # the tiny defaults, from random initialisation: this run *is* the pretraining; only the backbone is passed on,
    # so the checkpoint is chosen at the prior-corrected operating point (no threshold fitted to subset 9)
    config = replace(config_for("tiny"), iterations=args.iterations, eval_every=args.eval_every, pretrained_path=None,
                     operating_point="prior")
    out = args.out_dir / "tiny_pretrained.pt"
    start = time.perf_counter()
    result = finetune(train, val, config, out, manifest_sha256=sha256_file(manifest_path), progress=args.progress)
    best = result["best"]
    manifest_json = args.out_dir / "assets.json"
    entries = json.loads(manifest_json.read_text()) if manifest_json.is_file() else {}
    entries[out.name] = {
        "sha256": sha256_file(out),
        "command": "python scripts/pretrain_tiny_predictor.py"
                   + (f" --iterations {args.iterations}" if args.iterations != 6000 else "")
                   + (f" --cases {args.cases}" if args.cases != PRETRAIN_COHORT.n_cases else ""),
        "cohort": f"PhantomConfig(seed={cohort.seed}, n_cases={cohort.n_cases}), "
                  f"val = subset {VAL_SUBSET}, train = the other subsets",
        "val_f1": best["f1"], "val_auc": best["auc"], "best_iteration": best["iteration"],
        "wall_s": round(time.perf_counter() - start, 1), "history": [
            {k: round(h[k], 4) for k in ("iteration", "f1", "auc")} for h in result["history"]],
    }
    atomic_write_text(manifest_json, json.dumps(dict(sorted(entries.items())), indent=2) + "\n")
    print(f"pretrained: val F1 {best['f1']:.3f} AUC {best['auc']:.3f} (iteration {best['iteration']}), "
          f"{entries[out.name]['wall_s']} s → {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
