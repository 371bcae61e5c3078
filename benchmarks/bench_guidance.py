"""Guided segmentation vs. unguided invert + reconstruct: wall time ratio and peak memory, on CPU (and GPU).

    python benchmarks/bench_guidance.py [--maisi] [--json PATH]

Each measurement runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own.
- tiny: the shipped demo flow (or randomly initialised demo networks if the asset is missing) on the
  phantom grid 32×64×64, the tiny predictor, the default guidance (30 steps, start 15, 5 guided).
- maisi (``--maisi``): the real MAISI-v2 architecture with random weights (zero-initialised output conv
  re-initialised), CPU settings, a small image; fewer steps so a CPU finishes (printed).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time

import torch


def _flow_and_predictor(kind: str):
    from tfg_core.predictors import build_predictor

    predictor = build_predictor("tiny").eval()
    if kind == "tiny":
        from tfg_core.flow.demo import DEMO_FLOW_PATH, DemoFlow, build_demo_autoencoder, build_demo_unet, load_demo_flow

        flow = load_demo_flow() if DEMO_FLOW_PATH.is_file() else DemoFlow(build_demo_autoencoder(), build_demo_unet(), 1.0)
        return flow.eval(), predictor, (32, 64, 64)
    from tfg_core.flow.maisi import MaisiFlow, build_maisi_autoencoder, build_maisi_unet, reinit_zero_output

    unet = reinit_zero_output(build_maisi_unet(cpu=True))
    flow = MaisiFlow(build_maisi_autoencoder(cpu=True), unet, scale_factor=1.0, spacing_zyx_mm=(2.5, 5.5, 5.5))
    return flow.eval(), predictor, (32, 64, 64)


def _measure(kind: str, mode: str, steps: dict, queue) -> None:
    from tfg_core.flow.schedule import invert, run_to_end, sample
    from tfg_core.guidance import GuidanceConfig, run_guidance

    torch.manual_seed(0)
    flow, predictor, shape = _flow_and_predictor(kind)
    x = torch.rand(shape)
    # a bright block so the predictor has something to call positive even with random weights
    x[12:20, 24:40, 24:40] = 0.9
    config = GuidanceConfig(positive_threshold=0.0, **steps)  # every slice positive: the worst case for cost
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "unguided":
        with torch.no_grad():
            z0 = flow.encode(x[None, None])
            grid = flow.timesteps(config.num_steps, latent_shape=tuple(z0.shape))
            z = run_to_end(invert(flow.velocity, z0, grid, config.start_index), z0)
            z = run_to_end(sample(flow.velocity, z, grid, config.start_index), z)
            flow.decode(z)
    else:
        run_guidance(flow, predictor, x, config)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"kind": kind, "mode": mode, "seconds": seconds, "peak_rss_mib": peak / 1024,
               "extra_rss_mib": (peak - base_rss) / 1024, "steps": steps})


def run(kind: str, mode: str, steps: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(kind, mode, steps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maisi", action="store_true", help="also the real MAISI-v2 architecture (slow on CPU)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    plans = [("tiny", {"num_steps": 30, "start_index": 15, "guided_steps": 5})]
    if args.maisi:
        plans.append(("maisi", {"num_steps": 6, "start_index": 3, "guided_steps": 1}))
    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'model':6s} {'steps':>22s} {'unguided s':>10s} {'guided s':>9s} {'ratio':>6s} {'peak MiB (ung/guid)':>20s}")
    for kind, steps in plans:
        unguided = run(kind, "unguided", steps)
        guided = run(kind, "guided", steps)
        ratio = guided["seconds"] / unguided["seconds"]
        results.append({"kind": kind, "unguided": unguided, "guided": guided, "ratio": ratio})
        s = f"{steps['num_steps']}/{steps['start_index']}/{steps['guided_steps']} (n/start/G)"
        print(f"{kind:6s} {s:>22s} {unguided['seconds']:10.2f} {guided['seconds']:9.2f} {ratio:6.2f} "
              f"{unguided['peak_rss_mib']:9.0f}/{guided['peak_rss_mib']:.0f}")
    print("ratio = guided segmentation (guided run + unguided reference sharing the inversion) ÷ unguided "
          "invert + reconstruct of the same steps")
    if args.json:
        from tfg_core.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
