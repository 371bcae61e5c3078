"""The guidance benchmark's accounting on the shipped demo (in-process, without its fresh-process isolation).

The README's Performance section reads its ratios from these counts: the segmentation evaluates 1.5× the unguided
run's latents (inversion alone, then guided run and reference as pairs) in as many velocity calls.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_guidance.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_guidance", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ListQueue(list):
    put = list.append


def measure(bench, target, *args) -> dict:
    queue = ListQueue()
    target(*args, queue)
    (result,) = queue
    return result


def test_velocity_calls_and_latents_of_each_mode(bench):
    rows = {mode: measure(bench, bench._wall, "tiny", mode, "full", "cpu")
            for mode in ("unguided", "guided run", "segmentation")}
    # defaults: 30 steps, start 15 -> 15 inversion + 15 sampling calls
    assert {m: (r["velocity_calls"], r["velocity_latents"]) for m, r in rows.items()} == {
        "unguided": (30, 30), "guided run": (30, 30), "segmentation": (30, 45)}
    assert all(r["seconds"] > 0 and r["steps"] == "30/15/5" for r in rows.values())


def test_breakdown_times_every_evaluation_and_floors_follow(bench):
    b = measure(bench, bench._breakdown, "tiny", "full", "cpu")
    assert b["positives"] > 0
    assert all(b[k] > 0 for k in ("encode_s", "velocity_s", "velocity_pair_s", "decode_s", "update_s"))
    unguided = {"velocity_calls": 30, "velocity_latents": 30, "steps": "30/15/5"}
    segmentation = {"velocity_calls": 30, "velocity_latents": 45}
    guided_floor, segmentation_floor = bench.floors(unguided, segmentation, b)
    base = b["encode_s"] + 30 * b["velocity_s"] + b["decode_s"]
    assert guided_floor == pytest.approx(1 + 5 * b["update_s"] / base)
    expected = (b["encode_s"] + 15 * b["velocity_s"] + 15 * b["velocity_pair_s"] + 2 * b["decode_s"]
                + 5 * b["update_s"]) / base
    assert segmentation_floor == pytest.approx(expected)
