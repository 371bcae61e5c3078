"""The rectified-flow grid and steps against MONAI's RFlowScheduler, and invert/sample as exact mirrors."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.schedulers import RFlowScheduler

from tfg_core.flow.maisi import load_maisi_config
from tfg_core.flow.schedule import (
    MAISI_V2_SCHEDULER,
    clean_estimate,
    euler_step,
    invert,
    next_timesteps,
    rflow_timesteps,
    run_to_end,
    sample,
    sampling_steps,
)

LATENT_SIZES = [8 * 8 * 8, 32 * 32 * 32, 64 * 64 * 32, 128 * 128 * 64]


def maisi_scheduler() -> RFlowScheduler:
    return RFlowScheduler(**MAISI_V2_SCHEDULER)


@pytest.mark.parametrize("numel", LATENT_SIZES)
@pytest.mark.parametrize("num_steps", [1, 7, 30])
def test_grid_is_monai_grid_before_its_float16_cast(numel, num_steps):
    scheduler = maisi_scheduler()
    scheduler.set_timesteps(num_steps, input_img_size_numel=numel)
    ours64 = rflow_timesteps(num_steps, numel, dtype=torch.float64)
    assert scheduler.timesteps.dtype == torch.float16  # what MONAI does, and why we keep our own floats
    assert torch.equal(ours64.to(torch.float16), scheduler.timesteps)
    assert torch.allclose(rflow_timesteps(num_steps, numel).double(), ours64, rtol=1e-7, atol=0)


def test_grid_matches_maisi_call_with_tensor_numel():
    # MAISI passes torch.prod(shape) (an int64 tensor), which makes MONAI compute in float32 before the cast
    shape = (64, 64, 32)
    scheduler = maisi_scheduler()
    scheduler.set_timesteps(30, input_img_size_numel=torch.prod(torch.tensor(shape)))
    ours = rflow_timesteps(30, 64 * 64 * 32)
    spacing16 = torch.finfo(torch.float16).eps * 1024  # float16 spacing just below 1000
    assert torch.allclose(ours, scheduler.timesteps.float(), atol=spacing16, rtol=0)


def test_untransformed_grid_matches_monai():
    scheduler = RFlowScheduler(use_discrete_timesteps=False, use_timestep_transform=False)
    scheduler.set_timesteps(30)
    assert torch.equal(rflow_timesteps(30, None, dtype=torch.float64).half(), scheduler.timesteps)
    assert torch.equal(rflow_timesteps(30, 64**3, use_timestep_transform=False), rflow_timesteps(30, None))


def test_scheduler_parameters_are_the_published_ones(shared_reference):
    reference = json.loads((shared_reference / "maisi_v2_config_network_rflow.json").read_text())["noise_scheduler"]
    assert {k: v for k, v in reference.items() if k != "_target_"} == MAISI_V2_SCHEDULER
    # the packaged config instantiates (with _target_) the scheduler whose grid we reproduce
    published = ConfigParser(load_maisi_config()).get_parsed_content("noise_scheduler", instantiate=True)
    published.set_timesteps(30, input_img_size_numel=64 * 64 * 32)
    assert torch.equal(rflow_timesteps(30, 64 * 64 * 32, dtype=torch.float64).half(), published.timesteps)


@pytest.mark.parametrize("numel", [None, *LATENT_SIZES])
def test_grid_is_descending_within_range(numel):
    grid = rflow_timesteps(30, numel)
    assert grid.shape == (30,) and grid.dtype == torch.float32
    assert grid[0] == 1000.0 and grid[-1] > 0.0
    assert torch.all(grid[1:] < grid[:-1])


def test_larger_latents_spend_more_steps_near_noise():
    small, large = rflow_timesteps(30, 32**3), rflow_timesteps(30, 128 * 128 * 64)
    assert torch.equal(small, rflow_timesteps(30, None))  # the transform is the identity at the base size
    assert torch.all(large[1:] > small[1:])


def test_grid_rejects_bad_step_counts():
    with pytest.raises(ValueError):
        rflow_timesteps(0)
    with pytest.raises(ValueError):
        rflow_timesteps(1001)


def test_clean_estimate_is_monai_pred_original_sample():
    gen = torch.Generator().manual_seed(0)
    z, v = torch.randn(2, 4, 6, 6, 6, generator=gen), torch.randn(2, 4, 6, 6, 6, generator=gen)
    scheduler = maisi_scheduler()
    scheduler.set_timesteps(30, input_img_size_numel=6**3)
    for t, next_t in zip(scheduler.timesteps, next_timesteps(scheduler.timesteps)):
        _, pred_original = scheduler.step(v, t, z, next_t)
        assert torch.allclose(clean_estimate(z, v, t.float()), pred_original, rtol=1e-6, atol=1e-6)


def test_euler_step_is_monai_step_with_its_int_truncation():
    gen = torch.Generator().manual_seed(1)
    z, v = torch.randn(1, 4, 5, 5, 5, generator=gen), torch.randn(1, 4, 5, 5, 5, generator=gen)
    scheduler = maisi_scheduler()
    scheduler.set_timesteps(30, input_img_size_numel=64 * 64 * 32)
    truncated = 0
    for t, next_t in zip(scheduler.timesteps, next_timesteps(scheduler.timesteps)):
        prev, _ = scheduler.step(v, t, z, next_t)
        # RFlowScheduler.step computes dt from int(next_timestep)
        assert torch.allclose(euler_step(z, v, t.float(), float(int(next_t))), prev, rtol=1e-6, atol=1e-6)
        if float(next_t) != int(next_t):
            truncated += 1
            assert not torch.allclose(euler_step(z, v, t.float(), next_t.float()), prev, rtol=1e-6, atol=1e-6)
    assert truncated > 0


def test_euler_step_equals_monai_on_integer_grid():
    gen = torch.Generator().manual_seed(2)
    z, v = torch.randn(1, 4, 4, 4, 4, generator=gen), torch.randn(1, 4, 4, 4, 4, generator=gen)
    scheduler = RFlowScheduler(use_discrete_timesteps=True, use_timestep_transform=False)
    scheduler.set_timesteps(10)
    for t, next_t in zip(scheduler.timesteps, next_timesteps(scheduler.timesteps)):
        prev, _ = scheduler.step(v, t, z, next_t)
        assert torch.allclose(euler_step(z, v, t, next_t), prev, rtol=1e-6, atol=1e-6)


def test_our_steps_cover_the_whole_path_unlike_monai_truncation():
    grid = rflow_timesteps(30, 64 * 64 * 32)
    total = sum(float(a - b) for a, b in sampling_steps(grid, 0))
    assert total == pytest.approx(1000.0, abs=1e-3)
    monai_total = sum(float(a) - int(b) for a, b in sampling_steps(grid.half(), 0))
    assert monai_total > total + 1.0  # MAISI's own sampler integrates a little more than the path length


def test_sign_convention_against_monai_add_noise():
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(1, 4, 4, 4, 4, generator=gen), torch.randn(1, 4, 4, 4, 4, generator=gen)
    scheduler = maisi_scheduler()
    grid = rflow_timesteps(30, 4**3)
    v = x0 - eps  # the rectified-flow target MAISI trains on
    for start in (0, 10, 15, 29):
        t = grid[start]
        z_t = scheduler.add_noise(x0, eps, t.reshape(1))
        assert torch.allclose(clean_estimate(z_t, v, t), x0, atol=1e-5)
        inverted = run_to_end(invert(lambda z, t: v, x0, grid, start))
        assert torch.allclose(inverted, z_t, atol=1e-5)


def test_clean_estimate_accepts_one_time_per_batch_item():
    z, v = torch.zeros(2, 1, 2, 2, 2), torch.ones(2, 1, 2, 2, 2)
    out = clean_estimate(z, v, torch.tensor([1000.0, 250.0]))
    assert torch.equal(out[0], torch.ones(1, 2, 2, 2)) and torch.equal(out[1], torch.full((1, 2, 2, 2), 0.25))


def test_invert_and_sample_yield_along_the_grid():
    grid = rflow_timesteps(30, 64**3)
    z0 = torch.zeros(1, 1, 2, 2, 2)
    inv = list(invert(lambda z, t: torch.ones_like(z), z0, grid, 15))
    assert [float(t) for t, _ in inv] == [float(t) for t in grid.flip(0)[: 30 - 15]]
    assert inv[-1][0] == grid[15]
    smp = list(sample(lambda z, t: torch.ones_like(z), inv[-1][1], grid, 15))
    assert len(smp) == 15 and float(smp[-1][0]) == 0.0
    assert [float(t) for t, _ in smp[:-1]] == [float(t) for t in grid[16:]]


def test_start_index_bounds():
    grid = rflow_timesteps(5)
    z = torch.ones(1, 1, 1, 1, 1)
    assert list(invert(lambda z, t: z, z, grid, 5)) == []
    assert run_to_end(sample(lambda z, t: z, z, grid, 5), z) is z
    with pytest.raises(ValueError):
        list(invert(lambda z, t: z, z, grid, 6))
    with pytest.raises(ValueError):
        run_to_end(iter(()))


@pytest.mark.parametrize(
    "field",
    [lambda z, t: torch.full_like(z, 0.7), lambda z, t: torch.cos(t / 300.0) * torch.ones_like(z) - 0.2],
    ids=["constant", "time-only"],
)
@pytest.mark.parametrize("start", [0, 15, 29])
def test_invert_then_sample_returns_input_when_v_ignores_z(field, start):
    z0 = torch.randn(2, 4, 3, 3, 3, generator=torch.Generator().manual_seed(4))
    grid = rflow_timesteps(30, 64 * 64 * 32)
    z_start = run_to_end(invert(field, z0, grid, start, progress=True))
    back = run_to_end(sample(field, z_start, grid, start))
    assert not torch.allclose(z_start, z0)
    assert torch.allclose(back, z0, rtol=0, atol=1e-5)


def test_invert_then_sample_is_first_order_for_a_smooth_field():
    def field(z, t):
        return -0.8 * z * torch.cos(t / 400.0) + 0.3 * torch.sin(z)

    z0 = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    errors = []
    for n in (15, 30, 60):
        grid = rflow_timesteps(n, 64 * 64 * 32, dtype=torch.float64)
        start = n // 2
        back = run_to_end(sample(field, run_to_end(invert(field, z0, grid, start)), grid, start))
        errors.append(float((back - z0).abs().max()))
    assert 0 < errors[1] < 0.1
    # halving the step roughly halves the roundtrip error
    assert errors[1] < 0.7 * errors[0] and errors[2] < 0.7 * errors[1]
