"""What each attribution baseline costs per explained slice, in seconds and in classifier forward passes.

Run: ``python benchmarks/bench_baselines.py [--large] [--json PATH]``.

For each backbone a batch of random 2.5D stacks is explained by CAM, Grad-CAM, Score-CAM, Integrated Gradients
(captum, 50 steps) and WeakMedSAM (LiteMedSAM encoder + box prompts + random walk; needs the bundled LiteMedSAM
weights and a 1×1-conv head, so not for ResNet50). The ratio column divides by one plain forward pass of the
same batch measured in the same process. Each (backbone, method) runs in a fresh process so its peak resident
memory (Linux ``ru_maxrss``) is its own. ``--large`` adds TinyViT (256²) and ResNet50 (224²) with random
weights; their Score-CAM and IG are timed on a part of the work (a few channel batches / path steps) and
extrapolated linearly, which the output marks with ``*``. Weights do not change the cost.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

METHODS = ("forward", "cam", "gradcam", "scorecam", "ig", "weakmedsam")
IG_STEPS = 50


def _measure(backbone: str, method: str, batch: int, partial: bool, queue) -> None:
    import torch

    from tfg_core.baselines.cam import cam_maps, gradcam_maps, scorecam_maps
    from tfg_core.baselines.ig import ig_maps
    from tfg_core.predictors import build_predictor

    torch.manual_seed(0)
    model = build_predictor(backbone).eval()
    stacks = torch.rand(batch, model.in_slices, model.input_size, model.input_size)
    channels = None
    scale = 1.0
    if method == "forward":
        def run():
            with torch.no_grad():
                model(stacks)
    elif method == "cam":
        def run():
            cam_maps(model, stacks)
    elif method == "gradcam":
        def run():
            gradcam_maps(model, stacks)
    elif method == "scorecam":
        with torch.no_grad():
            channels = model.feat(model.features(model.normalize(stacks[:1]))).shape[1]
        chunk = 64 if backbone == "tiny" else 8
        if partial:  # the masked forward passes dominate: time two channel batches of one stack and scale
            sub = stacks[:1]

            @torch.no_grad()
            def run():
                feats = model.feat(model.features(model.normalize(sub)))[:, : 2 * chunk]
                up = torch.nn.functional.interpolate(feats, size=sub.shape[-2:], mode="bilinear")
                for j in range(0, up.shape[1], chunk):
                    model(sub * up[0, j : j + chunk, None])
            scale = batch * channels / (2 * chunk)
        else:
            def run():
                scorecam_maps(model, stacks, channel_batch=chunk)
    elif method == "ig":
        steps = 4 if partial else IG_STEPS
        scale = IG_STEPS / steps

        def run():
            ig_maps(model, stacks, n_steps=steps, internal_batch_size=16 if backbone != "tiny" else 64)
    elif method == "weakmedsam":
        from tfg_core.baselines.weakmedsam import WeakMedSam

        refiner = WeakMedSam.from_litemedsam(model)
        # a random-weight head's CAM may be ≤ 0 everywhere (no prompt, encoder skipped): one fixed box per slice,
        # as for a slice with one CAM region, so the encoder and decoder always run
        refiner.boxes = lambda cam: torch.tensor([[64.0, 64.0, 128.0, 128.0]])

        def run():
            refiner(stacks)
    else:
        raise ValueError(method)
    run()  # warm-up (lazy init, allocator)
    start = time.perf_counter()
    run()
    seconds = (time.perf_counter() - start) * scale
    queue.put({"backbone": backbone, "method": method, "batch": batch, "input": model.input_size,
               "seconds": seconds, "per_slice_s": seconds / batch, "extrapolated": scale != 1.0,
               "channels": channels, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def measure(backbone: str, method: str, batch: int, partial: bool) -> dict | None:
    """Run one measurement in a fresh process (its own peak memory); None when it failed.

    Args:
        backbone: ``tiny`` | ``tinyvit`` | ``resnet50``.
        method: one of :data:`METHODS`.
        batch: stacks explained at once.
        partial: time part of Score-CAM/IG and extrapolate (large backbones on a CPU).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(backbone, method, batch, partial, queue))
    proc.start()
    proc.join()
    return queue.get() if not queue.empty() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also TinyViT and ResNet50 (minutes on a CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    plan = [("tiny", 16, False)] + ([("tinyvit", 2, True), ("resnet50", 4, True)] if args.large else [])
    rows = []
    for backbone, batch, partial in plan:
        for method in METHODS:
            if method == "weakmedsam" and backbone == "resnet50":
                continue  # linear head: WeakMedSAM is defined for the 1×1-conv head only
            row = measure(backbone, method, batch, partial)
            if row is None:
                print(f"{backbone} {method}: failed (see the error above)")
                continue
            rows.append(row)
    forward = {r["backbone"]: r["per_slice_s"] for r in rows if r["method"] == "forward"}
    print(f"{'backbone':<9} {'input':>5} {'method':<11} {'s/slice':>9} {'× forward':>10} {'peak MiB':>9}")
    for r in rows:
        r["forward_ratio"] = r["per_slice_s"] / forward[r["backbone"]]
        mark = "*" if r["extrapolated"] else " "
        print(f"{r['backbone']:<9} {r['input']:>5} {r['method']:<11} {r['per_slice_s']:>8.3f}{mark} "
              f"{r['forward_ratio']:>10.1f} {r['peak_rss_mib']:>9.0f}")
    if any(r["extrapolated"] for r in rows):
        print("* timed on part of the work and scaled linearly (Score-CAM: 2 channel batches of one stack; IG: 4 steps)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
