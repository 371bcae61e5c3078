"""Fine-tuning speed per backbone, and the tiny predictor's full fine-tune on the default phantom cohort.

Run: ``python benchmarks/bench_finetune.py [--json PATH] [--skip-full] [--root DIR]``.

Per backbone it times a few optimiser steps of the same training step ``finetune`` runs (gather stacks →
augment → forward/backward → Adam), after warm-up, and reports iterations per second and peak memory
(process RSS high-water mark on CPU; ``torch.cuda.max_memory_allocated`` on GPU, where AMP bf16 is used).
Backbones are randomly initialised: speed does not depend on the weights. The last part runs
``finetune_fold(fold=0)`` for the tiny predictor with its defaults (``TINY_DEFAULTS``), once as one fine-tune and
once as the shipped recipe (``members=2``: two seeds combined, ``scripts/train_tiny_predictors.py``), and prints
wall seconds and the best validation F1 of each (issue #3 asks for validation F1 ≥ 0.9 within 2 minutes on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from tfg_core.predictors import build_predictor
from tfg_core.training.finetune import TINY_DEFAULTS
from tfg_core.training.slice_data import AugmentConfig, BatchAugment

# (backbone, batch size, timed iterations): large backbones get a small batch and few steps on CPU
CPU_PLAN = [("tiny", TINY_DEFAULTS["batch_size"], 20), ("tinyvit", 4, 3), ("resnet50", 4, 3)]
GPU_PLAN = [("tiny", TINY_DEFAULTS["batch_size"], 100), ("tinyvit", 16, 30), ("resnet50", 16, 30)]
WARMUP = 1


def rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_steps(backbone: str, batch_size: int, iterations: int, device: str) -> dict:
    """Iterations per second of the fine-tuning step for one backbone.

    Args:
        backbone: ``tiny`` | ``tinyvit`` | ``resnet50``.
        batch_size: stacks per step.
        iterations: timed steps (after :data:`WARMUP` untimed ones).
        device: ``cpu`` | ``cuda``.
    """
    torch.manual_seed(0)
    # the same memory format as ``finetune`` uses
    model = build_predictor(backbone).to(device).to(memory_format=torch.channels_last).train()
    size = model.input_size
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    augment = BatchAugment(AugmentConfig(), seed=0)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else contextlib.nullcontext
    stacks = torch.rand(batch_size, model.in_slices, size, size)
    target = (torch.arange(batch_size) % 2).float().to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        x = augment(stacks.to(device)).contiguous(memory_format=torch.channels_last)
        with amp():
            loss = loss_fn(model(x).float(), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    for _ in range(WARMUP):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"backbone": backbone, "device": device, "amp": device == "cuda", "batch_size": batch_size,
           "input": f"{model.in_slices}x{size}x{size}", "iterations": iterations,
           "it_per_s": iterations / seconds, "stacks_per_s": iterations * batch_size / seconds,
           "peak_rss_mib": rss_mib()}
    if device == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def full_tiny_finetune(root: Path | None, members: int = 1) -> dict:
    """``finetune_fold`` on fold 0 of the default phantom cohort with the tiny defaults (CPU).

    Args:
        root: an existing default cohort; None writes one into a temporary folder first (≈ 20 s, not timed).
        members: fine-tunes combined into one predictor (1: a single fine-tune; 2: the shipped recipe).
    """
    from tfg_core.data.phantom import PhantomConfig, write_cohort
    from tfg_core.training.run import finetune_fold

    with tempfile.TemporaryDirectory() as tmp:
        if root is None:
            root = Path(tmp) / "phantom"
            write_cohort(root, PhantomConfig())
        start = time.perf_counter()
        result = finetune_fold(root, fold=0, backbone="tiny", out=Path(tmp) / "tiny_fold0.pt", progress=False,
                               members=members)
        wall = time.perf_counter() - start
    best = result["best"]
    return {"backbone": "tiny", "fold": 0, "members": members, "wall_s": wall, "train_s": result["seconds"],
            "it_per_s": result["iterations_per_second"], "best_val_f1": best["f1"], "best_val_auc": best["auc"],
            "best_iteration": best["iteration"], "precision": best["precision"], "recall": best["recall"],
            **{k: TINY_DEFAULTS[k] for k in ("iterations", "batch_size", "lr")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--root", type=Path, default=None, help="existing default phantom cohort (else one is written)")
    parser.add_argument("--skip-full", action="store_true", help="only the per-backbone speed table")
    args = parser.parse_args(argv)

    torch.set_num_threads(torch.get_num_threads())  # report what the machine gives, no tuning
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, cuda={torch.cuda.is_available()}")
    rows = [time_steps(b, bs, n, "cpu") for b, bs, n in CPU_PLAN]
    if torch.cuda.is_available():
        rows += [time_steps(b, bs, n, "cuda") for b, bs, n in GPU_PLAN]
    print(f"{'backbone':<9} {'device':<6} {'amp':<5} {'batch':>5} {'input':<10} {'it/s':>8} {'stacks/s':>9} {'peak MiB':>9}")
    for r in rows:
        peak = r.get("peak_gpu_mib", r["peak_rss_mib"])
        print(f"{r['backbone']:<9} {r['device']:<6} {str(r['amp']):<5} {r['batch_size']:>5} {r['input']:<10} "
              f"{r['it_per_s']:>8.2f} {r['stacks_per_s']:>9.1f} {peak:>9.0f}")
    out = {"speed": rows}
    if not args.skip_full:
        out["tiny_full_finetune"] = []
        for members in (1, 2):
            full = full_tiny_finetune(args.root, members)
            out["tiny_full_finetune"].append(full)
            what = "one fine-tune" if members == 1 else f"{members} fine-tunes as one predictor (shipped recipe)"
            print(f"tiny, phantom fold 0 (CPU), {what}: {full['wall_s']:.1f} s wall "
                  f"({full['iterations']} it each, batch {full['batch_size']}, {full['it_per_s']:.1f} it/s), "
                  f"best val F1 {full['best_val_f1']:.3f} (AUC {full['best_val_auc']:.3f}) at iteration "
                  f"{full['best_iteration']} (precision {full['precision']:.3f}, recall {full['recall']:.3f})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
