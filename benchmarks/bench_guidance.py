"""What guidance costs: wall-time ratios to the unguided pipeline, and peak memory of one guided step, naive vs
optimised (slab decoding, checkpointed decoder blocks).

    python benchmarks/bench_guidance.py              # CPU, about 20 min on 2 cores: all of the below but --large
    python benchmarks/bench_guidance.py --large      # + the optimised MAISI-v2 step at 256x256x128 (CPU: long)
    python benchmarks/bench_guidance.py --quick      # the tiny demo ratios only (a minute)
    python benchmarks/bench_guidance.py --device cuda  # on a GPU: peak = torch.cuda.max_memory_allocated
    ... --json PATH                                  # also write every measurement

Every measurement runs in a fresh process, so its peak memory is its own ("extra" = peak minus the process's peak
after building the models and inputs).

1. Wall time. Unguided = encode, invert to the start index, sample back, decode. Guided run = the same with the
   guided steps (``guide``). Segmentation = guided run + the unguided reference from the shared inversion, sampled
   beside the guided run (both latents in one velocity call per sampling step): ``run_guidance``. Counted: velocity
   calls and latents evaluated; timed apart: one velocity call on one latent and on a pair, one decode, one guided
   update, from which the floors of the two ratios follow (what the extra evaluations must cost).
   - tiny: the shipped demo flow and fold-0 predictor on a phantom with a 25.7 mm nodule, default GuidanceConfig.
   - maisi: the real MAISI-v2 architecture (random weights, zero-initialised output conv re-initialised, CPU
     settings) at 32x64x64, 6 steps (start 3, 1 guided), every slice positive (the costliest case).
2. Memory of one guided step (``guided_update``: velocity, decode, tiny predictor on the stacks of 8 positive slices,
   back-propagation into the latent, update) with the real MAISI-v2 architecture at a 128x128x64 image: naive
   (published GroupNorm, ``decoder="full"``: autograd through a whole-volume decode) vs optimised
   (``decoder="slab"``, checkpointed blocks) and the plain no-grad decode of the same latent for reference.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time

import torch

from tfg_core.guidance import GuidanceConfig

NODULE_CASE = 21  # seed-0 phantom with a 25.7 mm solid nodule (fold 1; tests/test_demo_flow.py)


def _peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _maisi(device: str, naive: bool):
    from tfg_core.flow.maisi import (
        MaisiFlow,
        build_maisi_autoencoder,
        build_maisi_unet,
        reinit_zero_output,
        replace_maisi_group_norm,
    )

    cpu = device != "cuda"
    torch.manual_seed(0)
    autoencoder = build_maisi_autoencoder(cpu=cpu)
    if not naive:  # one fused kernel instead of MAISI's per-group loop (same state dict, same result)
        replace_maisi_group_norm(autoencoder)
    unet = reinit_zero_output(build_maisi_unet(cpu=cpu))
    flow = MaisiFlow(autoencoder, unet, scale_factor=1.0, spacing_zyx_mm=(2.5, 1.5, 1.5))
    return flow.to(device).eval().requires_grad_(False)


def _tiny_case():
    from tfg_core.data.phantom import generate_case
    from tfg_core.data.preprocess import to_model_grid
    from tfg_core.demo import load_shipped_predictor
    from tfg_core.flow.demo import IMAGE_SHAPE, load_demo_flow

    case = generate_case(NODULE_CASE)
    x = torch.from_numpy(to_model_grid(case.volume, shape=IMAGE_SHAPE).array)
    return load_demo_flow(), load_shipped_predictor(case.subset).requires_grad_(False), x


def _setup(kind: str, decoder: str, device: str):
    """Flow, predictor, image and guidance config of a wall-time measurement (see the module docstring)."""
    from tfg_core.predictors import build_predictor

    torch.manual_seed(0)
    if kind == "tiny":
        flow, predictor, x = _tiny_case()
        config = GuidanceConfig(decoder=decoder)
    else:
        flow, predictor = _maisi(device, naive=decoder == "full"), build_predictor("tiny").eval()
        x = torch.rand(32, 64, 64)
        config = GuidanceConfig(num_steps=6, start_index=3, guided_steps=1, positive_threshold=0.0, decoder=decoder)
    return flow.to(device), predictor.to(device), x.to(device), config


def _wall(kind: str, mode: str, decoder: str, device: str, queue) -> None:
    from tfg_core.flow.schedule import invert, run_to_end, sample
    from tfg_core.guidance import guide, run_guidance

    flow, predictor, x, config = _setup(kind, decoder, device)
    calls = []  # latents per velocity call
    velocity = flow.velocity
    flow.velocity = lambda z, t: calls.append(z.shape[0]) or velocity(z, t)  # count network evaluations
    base = _peak_mib(device)
    start = time.perf_counter()
    if mode == "unguided":
        with torch.no_grad():
            z0 = flow.encode(x[None, None])
            grid = flow.timesteps(config.num_steps, latent_shape=tuple(z0.shape))
            z = run_to_end(invert(flow.velocity, z0, grid, config.start_index), z0)
            flow.decode(run_to_end(sample(flow.velocity, z, grid, config.start_index), z))
    elif mode == "guided run":
        for _ in guide(flow, predictor, x, config):
            pass
    else:
        run_guidance(flow, predictor, x, config)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _peak_mib(device)
    queue.put({"kind": kind, "mode": mode, "decoder": decoder, "seconds": seconds, "velocity_calls": len(calls),
               "velocity_latents": sum(calls), "peak_mib": peak, "extra_mib": peak - base,
               "steps": f"{config.num_steps}/{config.start_index}/{config.guided_steps}"})


def _breakdown(kind: str, decoder: str, device: str, queue) -> None:
    """Seconds of the evaluations a run is made of: one encode, one velocity call (one latent, a pair), one decode
    (no graph), one guided update."""
    from tfg_core.flow.schedule import clean_estimate
    from tfg_core.guidance import guided_update, positive_slices

    flow, predictor, x, config = _setup(kind, decoder, device)
    with torch.no_grad():
        z = flow.encode(x[None, None])
    t = flow.timesteps(config.num_steps, latent_shape=tuple(z.shape))[config.start_index]
    positives, _ = positive_slices(predictor, x, config.positive_threshold)

    def timed(fn) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[1]

    with torch.no_grad():
        encode = timed(lambda: flow.encode(x[None, None]))
        v = flow.velocity(z, t)
        velocity = timed(lambda: flow.velocity(z, t))
        pair = torch.cat([z, z])
        velocity_pair = timed(lambda: flow.velocity(pair, t))
        decode = timed(lambda: flow.decode(clean_estimate(z, v, t)))
    update = timed(lambda: guided_update(flow, predictor, z, t, v, positives, config))
    queue.put({"kind": kind, "decoder": decoder, "encode_s": encode, "velocity_s": velocity,
               "velocity_pair_s": velocity_pair, "decode_s": decode, "update_s": update, "positives": len(positives)})


def _step(mode: str, shape: tuple[int, int, int], device: str, slab_slices: int | None, queue) -> None:
    from tfg_core.guidance import guided_update
    from tfg_core.predictors import build_predictor

    flow = _maisi(device, naive=mode == "naive")
    predictor = build_predictor("tiny").eval().requires_grad_(False).to(device)
    z = torch.randn(1, *flow.latent_shape(shape), generator=torch.Generator().manual_seed(0)).to(device)
    t = flow.timesteps(30, latent_shape=tuple(z.shape))[15]
    depth = shape[0]
    positives = tuple(range(depth // 2 - 4, depth // 2 + 4))  # a nodule on 8 slices; stacks reach 16
    config = GuidanceConfig(decoder="full" if mode == "naive" else "slab", slice_batch=8, slab_slices=slab_slices)
    with torch.no_grad():
        flow.velocity(z, t)  # allocator warm-up, so the baseline includes the network's own working memory
    base = _peak_mib(device)
    start = time.perf_counter()
    if mode == "decode only":
        with torch.no_grad():
            flow.decode(z)
    else:
        update = guided_update(flow, predictor, z, t, None, positives, config)
        assert update.loss is not None and update.grad_norm > 0
    if device == "cuda":
        torch.cuda.synchronize()
    peak = _peak_mib(device)
    queue.put({"mode": mode, "shape": "x".join(map(str, shape)), "seconds": time.perf_counter() - start,
               "peak_mib": peak, "extra_mib": peak - base, "slab_slices": slab_slices if mode == "optimised" else None})


def run(target, *args) -> dict:
    """``target(*args, queue)`` in a fresh spawned process; its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def floors(unguided: dict, segmentation: dict, breakdown: dict) -> tuple[float, float]:
    """Wall-time ratios the counted evaluations alone would give: (guided run, segmentation) ÷ unguided.

    The guided run adds one guided update per guided step; the segmentation also runs its sampling calls on pairs
    (guided run and reference) and decodes the reference.

    Args:
        unguided: ``_wall`` row of the unguided run.
        segmentation: ``_wall`` row of the segmentation.
        breakdown: ``_breakdown`` row (seconds of each evaluation).
    """
    b = breakdown
    n, g = unguided["velocity_calls"], int(unguided["steps"].split("/")[2])
    pairs = segmentation["velocity_latents"] - segmentation["velocity_calls"]  # calls that evaluated two latents
    unguided_s = b["encode_s"] + n * b["velocity_s"] + b["decode_s"]
    guided = (unguided_s + g * b["update_s"]) / unguided_s
    seg = (b["encode_s"] + (segmentation["velocity_calls"] - pairs) * b["velocity_s"] + pairs * b["velocity_pair_s"]
           + 2 * b["decode_s"] + g * b["update_s"]) / unguided_s
    return guided, seg


def wall_ratios(kind: str, device: str) -> list[dict]:
    rows = []
    for decoder in ("full", "slab"):
        by_mode = {mode: run(_wall, kind, mode, decoder, device) for mode in ("unguided", "guided run", "segmentation")}
        unguided = by_mode["unguided"]
        for mode, r in by_mode.items():
            r["ratio"] = r["seconds"] / unguided["seconds"]
            r["call_ratio"] = r["velocity_calls"] / unguided["velocity_calls"]
            r["latent_ratio"] = r["velocity_latents"] / unguided["velocity_latents"]
            rows.append(r)
            print(f"{kind:5s} {r['steps']:>8s} {decoder:5s} {mode:13s} {r['seconds']:8.2f} s  x{r['ratio']:.2f}  "
                  f"(velocity calls x{r['call_ratio']:.2f}, latents x{r['latent_ratio']:.2f})  "
                  f"peak {r['peak_mib']:7.0f} MiB", flush=True)
        b = run(_breakdown, kind, decoder, device)
        b["floor_ratio"], b["segmentation_floor_ratio"] = floors(unguided, by_mode["segmentation"], b)
        rows.append(b)
        print(f"{kind:5s} {'':>8s} {decoder:5s} one encode {b['encode_s']:.3f} s, one velocity {b['velocity_s']:.3f} s "
              f"(a pair {b['velocity_pair_s']:.3f} s), one decode {b['decode_s']:.3f} s, one guided update "
              f"({b['positives']} positive slices) {b['update_s']:.3f} s -> floors: guided run "
              f"x{b['floor_ratio']:.2f}, segmentation x{b['segmentation_floor_ratio']:.2f}", flush=True)
    return rows


def step_memory(shape: tuple[int, int, int], device: str, modes: tuple[str, ...], slab_slices: int | None) -> list[dict]:
    rows = [run(_step, mode, shape, device, slab_slices) for mode in modes]
    for r in rows:
        print(f"maisi {r['shape']:>11s} {r['mode']:12s} {r['seconds']:8.1f} s  extra {r['extra_mib']:7.0f} MiB  "
              f"(process peak {r['peak_mib']:.0f} MiB)", flush=True)
    by_mode = {r["mode"]: r for r in rows}
    if {"naive", "optimised"} <= set(by_mode):
        ratio = by_mode["naive"]["extra_mib"] / by_mode["optimised"]["extra_mib"]
        print(f"maisi {rows[0]['shape']:>11s} naive ÷ optimised extra memory: {ratio:.1f}x", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the tiny demo's wall-time ratios")
    parser.add_argument("--large", action="store_true", help="also the optimised MAISI-v2 step at 256x256x128")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--slab-slices", type=int, default=GuidanceConfig().slab_slices,
                        help="GuidanceConfig.slab_slices of the optimised step (default: the config's default)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    results: dict = {"wall": wall_ratios("tiny", args.device)}
    if not args.quick:
        results["wall"] += wall_ratios("maisi", args.device)
        results["memory"] = step_memory((64, 128, 128), args.device, ("decode only", "naive", "optimised"),
                                        args.slab_slices)
    if args.large:
        results["memory"] += step_memory((128, 256, 256), args.device, ("decode only", "optimised"), args.slab_slices)
    print("ratio = wall time ÷ unguided inversion + reconstruction of the same steps; extra = peak memory above the "
          "process's peak after building the models and inputs")
    if args.json:
        from tfg_core.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
