#!/usr/bin/env python
"""Retrain the shipped demo flow (``tfg_core/assets/demo_flow.pt``) and record it in ``flow_assets.json``.

    python scripts/train_demo_flow.py                    # defaults = the shipped weights' config
    python scripts/train_demo_flow.py --workdir runs/demo_flow --progress

Rerunning the same command resumes from the checkpoints in ``--workdir`` (delete it to start over). The result is
reproducible on the same torch build and thread count (``--threads``); CPU kernels differ across builds, so another
machine gives a different file (and hash) of equal quality. Phantoms come from cohort seed ``--seed`` (default 1),
disjoint from the evaluation cohort (seed 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from tfg_core.flow.demo import ASSET_NAME, DEMO_FLOW_PATH, FLOW_ASSETS_PATH, flow_assets
from tfg_core.flow.train_demo import DemoTrainConfig, train_demo_flow
from tfg_core.io import atomic_write_text, sha256_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo_flow"), help="cache + resumable checkpoints")
    parser.add_argument("--output", type=Path, default=DEMO_FLOW_PATH, help="asset file to write")
    parser.add_argument("--assets-json", type=Path, default=FLOW_ASSETS_PATH, help="asset list to update")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (part of reproducibility; 2 threads on 2 shared cores ran 10x slower)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    for f in fields(DemoTrainConfig):  # every config field is a flag, defaults = the shipped weights
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = DemoTrainConfig(**{f.name: getattr(args, f.name) for f in fields(DemoTrainConfig)})

    start = time.monotonic()
    report = train_demo_flow(config, args.workdir, args.output, progress=args.progress)
    entries = flow_assets(args.assets_json)
    entries[ASSET_NAME] = {
        "filename": args.output.name,
        "sha256": sha256_file(args.output),
        "size_bytes": args.output.stat().st_size,
        "command": "python scripts/train_demo_flow.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "threads": args.threads,
        "wall_seconds_this_run": round(time.monotonic() - start, 1),
        "training_seconds": {"data": report["data_seconds"], "autoencoder": report["autoencoder"]["seconds"],
                             "flow": report["flow"]["seconds"]},
        "training_data": f"phantom cohort seed {config.seed}, cases 0..{config.n_cases - 1} (evaluation cohort is seed 0)",
        "config": report["config"],
        "scale_factor": report["scale_factor"],
        "autoencoder_l1_curve": report["autoencoder"]["l1_curve"],
        "flow_mse_curve": report["flow"]["mse_curve"],
        "metrics": report["metrics"],
    }
    atomic_write_text(args.assets_json, json.dumps(entries, indent=2, sort_keys=True) + "\n")
    print(json.dumps(entries[ASSET_NAME], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
