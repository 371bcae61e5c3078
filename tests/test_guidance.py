"""The guidance loop on an analytic toy flow and a hand-made blob detector, plus a smoke run on a narrow MAISI-v2.

The toy flow (``GaussianToyFlow``) knows the exact velocity of a Gaussian "healthy" distribution, so the Jacobian of
the clean estimate is known; the detector's logit responds only to bright voxels of the centre slice, so each
slice's gradient touches that slice alone and only where the blob is.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from blob_detector import BlobDetector  # tests/blob_detector.py (pytest puts tests/ on sys.path)

from tfg_core.flow.maisi import (
    MaisiFlow,
    build_maisi_autoencoder,
    build_maisi_unet,
    load_maisi_config,
    reinit_zero_output,
    replace_maisi_group_norm,
)
from tfg_core.flow.noprior import NoPriorFlow
from tfg_core.flow.schedule import sample
from tfg_core.flow.toy import GaussianToyFlow
from tfg_core.guidance import GuidanceConfig, evidence_map, guide, positive_slices, run_guidance
from tfg_core.predictors import build_predictor
from tfg_core.segment import dice, segment

SIZE = 16
BLOB_SLICES = (6, 7, 8, 9, 10)  # the blob covers slices 6..10; with 3-slice stacks, 6 and 10 see its edge


def healthy_image() -> torch.Tensor:
    h = torch.full((SIZE, SIZE, SIZE), 0.2)
    return h + 0.05 * torch.sin(torch.arange(SIZE, dtype=torch.float32) / 3)[None, None, :]


def blob_mask() -> torch.Tensor:
    zz, yy, xx = torch.meshgrid(*[torch.arange(SIZE, dtype=torch.float32)] * 3, indexing="ij")
    return ((zz - 8) ** 2 + (yy - 7) ** 2 + (xx - 9) ** 2) <= 2.5**2


class SpyFlow(GaussianToyFlow):
    """Records how the velocity and the decoder are called."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.velocity_calls: list[tuple[bool, bool]] = []
        self.velocity_batches: list[int] = []
        self.decodes = 0

    def velocity(self, z, t):
        self.velocity_calls.append((torch.is_grad_enabled(), z.requires_grad))
        self.velocity_batches.append(z.shape[0])
        return super().velocity(z, t)

    def decode(self, z):
        self.decodes += 1
        return super().decode(z)


@pytest.fixture
def detector() -> BlobDetector:
    return BlobDetector().eval()


@pytest.fixture
def image() -> torch.Tensor:
    return healthy_image() + 0.7 * blob_mask().float()


def toy_flow(**kwargs) -> SpyFlow:
    return SpyFlow(healthy_image(), **{"sigma": 1.0, "scale_factor": 1.5, **kwargs})


def states(flow, detector, x, **config):
    return list(guide(flow, detector, x, GuidanceConfig(**{"num_steps": 10, "start_index": 4, **config})))


def first_guided(trajectory):
    return next(s for s in trajectory if s.phase == "guided")


# --- the toy flow itself ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [100.0, 500.0, 900.0])
def test_toy_velocity_is_the_conditional_mean_of_x0_minus_eps(t):
    """Least squares of (x0 - eps) on z_t over samples of the path recovers the closed form's slope and intercept."""
    flow = GaussianToyFlow(torch.full((1, 1, 1), 0.3), sigma=0.4, scale_factor=1.5)
    gen = torch.Generator().manual_seed(0)
    x0 = 1.5 * (0.3 + 0.4 * torch.randn(200_000, generator=gen, dtype=torch.float64))
    eps = torch.randn(200_000, generator=gen, dtype=torch.float64)
    r = t / 1000
    z = (1 - r) * x0 + r * eps
    design = torch.stack([z, torch.ones_like(z)], 1)
    slope, intercept = torch.linalg.lstsq(design, (x0 - eps)[:, None]).solution.flatten().tolist()
    probe = torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1)
    v0, v1 = flow.velocity(probe, t).flatten().tolist()
    assert v1 - v0 == pytest.approx(slope, abs=0.01) and v1 - v0 == pytest.approx(float(flow.coefficient(t)))
    assert v0 == pytest.approx(intercept, abs=0.01)


# --- structure of the trajectory ---------------------------------------------------------------------------------


def test_phases_counts_and_times(detector, image):
    flow = toy_flow()
    trajectory = states(flow, detector, image, guided_steps=3)
    assert [s.phase for s in trajectory] == ["encode"] + ["invert"] * 6 + ["guided"] * 3 + ["free"] * 3 + ["final"]
    grid = flow.timesteps(10)
    invert, guided, free = (trajectory[1:7], trajectory[7:10], trajectory[10:13])
    assert [s.step for s in invert] == [9, 8, 7, 6, 5, 4] and [s.step for s in guided + free] == list(range(4, 10))
    assert invert[-1].t == pytest.approx(float(grid[4])) and [s.t for s in invert] == sorted(s.t for s in invert)
    assert [s.t_prev for s in guided + free] == pytest.approx(grid[4:].tolist())
    assert trajectory[-2].t == 0.0 and trajectory[-1].t == 0.0
    assert all(s.z.shape == (1, 1, SIZE, SIZE, SIZE) and s.z.device.type == "cpu" for s in trajectory)
    # the encode state lists the input's positive slices; guided states carry loss, gradient norm and positives
    assert trajectory[0].positives == BLOB_SLICES and all(p > 0.9 for p in trajectory[0].probabilities)
    for s in guided:
        assert s.guided and s.loss is not None and s.grad_norm > 0 and s.positives == BLOB_SLICES
        assert len(s.probabilities) == len(BLOB_SLICES) and s.x_hat.shape == (SIZE, SIZE, SIZE)
    assert all(not s.guided and s.loss is None and s.x_hat is None for s in invert + free)
    assert torch.allclose(trajectory[-1].x_hat, trajectory[-1].z[0, 0] / 1.5)  # final: the decoded counterfactual


def test_only_needed_decodes_and_optional_free_step_decodes(detector, image):
    flow = toy_flow()
    trajectory = states(flow, detector, image, guided_steps=2)
    assert flow.decodes == 2 + 1  # two guided clean estimates + the final image, nothing else
    flow = toy_flow()
    trajectory = states(flow, detector, image, guided_steps=2, decode_free_steps=True)
    assert flow.decodes == 2 + 4 + 1
    free = [s for s in trajectory if s.phase == "free"]
    expected = flow.decode(flow.encode(image[None, None]))  # shape only; values differ per step
    assert all(s.x_hat is not None and s.x_hat.shape == expected.shape[2:] for s in free)


def test_start_at_the_end_runs_no_step(detector, image):
    trajectory = states(toy_flow(), detector, image, start_index=10, guided_steps=0)
    assert [s.phase for s in trajectory] == ["encode", "final"]
    assert torch.allclose(trajectory[-1].x_hat, image, atol=1e-6)


# --- reconstruction and the effect of guidance ---------------------------------------------------------------------


class DriftFlow(GaussianToyFlow):
    """A velocity that depends on time only: Euler inversion and sampling are then exact mirrors."""

    def velocity(self, z, t):
        return torch.full_like(z, 0.3) - 0.5 * float(t) / 1000


def test_unguided_reconstruction(detector, image):
    config = GuidanceConfig(num_steps=10, start_index=4, guided_steps=3)
    exact = run_guidance(DriftFlow(healthy_image()), detector, image, config)
    assert torch.allclose(exact.x_reference, image, atol=1e-6)
    close = run_guidance(toy_flow(), detector, image, config)  # z-dependent field: Euler error only
    error = (close.x_reference - image).abs().max()
    assert error < 0.1 and (close.x_counterfactual - image).abs().max() > 0.3  # guidance changed far more
    finer = run_guidance(toy_flow(), detector, image, GuidanceConfig(num_steps=20, start_index=8, guided_steps=0))
    assert (finer.x_reference - image).abs().max() < 0.6 * error  # first order: twice the steps, about half


@pytest.mark.parametrize("skipping", [True, False])
def test_the_reference_is_sampled_beside_the_guided_run(detector, image, skipping):
    """One velocity call per sampling step serves both runs (batch of two), and the reference it yields is plain
    unguided sampling from the same inverted latent."""
    flow = toy_flow()
    config = GuidanceConfig(num_steps=10, start_index=4, guided_steps=3, gradient_skipping=skipping)
    trajectory = list(guide(flow, detector, image, config, reference=True))
    sampling = [s for s in trajectory if s.phase in ("guided", "free")]
    # inversion: 6 single calls; sampling: one pair per step, except that full backprop computes each guided
    # velocity with a graph, so the reference's is then a call of its own
    expected = [1] * 6 + ([2] * 6 if skipping else [1, 1] * 3 + [2] * 3)
    assert flow.velocity_batches == expected
    z_start = [s for s in trajectory if s.phase == "invert"][-1].z
    plain = GaussianToyFlow(healthy_image(), sigma=1.0, scale_factor=1.5)
    grid = plain.timesteps(10)
    for state, (t, z_ref) in zip(sampling, sample(plain.velocity, z_start, grid, 4), strict=True):
        assert state.t == pytest.approx(float(t)) and torch.allclose(state.z_reference, z_ref, atol=1e-6)
        assert state.velocity_reference.shape == state.z_reference.shape == state.z.shape
    final = trajectory[-1]
    assert torch.allclose(final.x_reference, plain.decode(z_ref)[0, 0], atol=1e-6)
    assert not torch.allclose(final.x_hat, final.x_reference, atol=1e-3)  # the guided run did move away
    # run_guidance's map is built from exactly these two reconstructions
    result = run_guidance(toy_flow(), detector, image, config)
    assert torch.equal(result.x_reference, final.x_reference) and torch.equal(result.x_counterfactual, final.x_hat)
    # with nothing to guide (a healthy image) even full backprop needs no graph: pairs throughout
    flow = toy_flow()
    list(guide(flow, detector, healthy_image(), config, reference=True))
    assert flow.velocity_batches == [1] * 6 + [2] * 6
    # without a reference nothing is batched and no state carries one
    flow = toy_flow()
    assert all(s.z_reference is None and s.x_reference is None for s in guide(flow, detector, image, config))
    assert set(flow.velocity_batches) == {1}


def test_strength_zero_is_the_reference_exactly(detector, image):
    result = run_guidance(toy_flow(), detector, image, GuidanceConfig(num_steps=10, start_index=4, strength=0.0))
    assert torch.equal(result.x_counterfactual, result.x_reference)
    assert torch.count_nonzero(result.difference) == 0
    guided = [s for s in result.trajectory if s["phase"] == "guided"]
    assert len(guided) == 5 and all(s["loss"] > 0 and s["grad_norm"] > 0 for s in guided)  # computed, scaled by 0


@pytest.mark.parametrize("loss", ["bce", "logit"])
def test_guidance_removes_the_blob_and_the_map_finds_it(detector, image, loss):
    result = run_guidance(toy_flow(), detector, image, GuidanceConfig(num_steps=10, start_index=4, loss=loss))
    _, ref_probs = positive_slices(detector, result.x_reference, threshold=0.0)
    _, cf_probs = positive_slices(detector, result.x_counterfactual, threshold=0.0)
    blob = list(BLOB_SLICES)
    assert min(np.array(ref_probs)[blob]) > 0.9 and max(np.array(cf_probs)[blob]) < 0.6
    assert result.input_positives == BLOB_SLICES
    mask = segment(result.difference, "otsu")
    assert dice(mask, blob_mask().numpy()) > 0.7


def test_compare_to_input(detector, image):
    result = run_guidance(toy_flow(), detector, image, GuidanceConfig(num_steps=10, start_index=4), compare_to="input")
    assert result.x_reference is None
    assert torch.equal(result.difference, (result.x_counterfactual - image).abs())  # "absolute", the default
    removed = run_guidance(toy_flow(), detector, image, GuidanceConfig(num_steps=10, start_index=4,
                                                                       difference="removed"), compare_to="input")
    assert torch.equal(removed.difference, (image - removed.x_counterfactual).clamp(min=0))
    with pytest.raises(ValueError, match="compare_to"):
        run_guidance(toy_flow(), detector, image, compare_to="nothing")


class ContrastDetector(BlobDetector):
    """The blob detector minus the slice below the centre: brightening that slice lowers the logit."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return super().features(x) - 50.0 * (x[:, :1] - 0.2)


def test_decrease_keeps_only_the_darkening_part_of_the_gradient(image):
    """With velocity 0 and identity decoding one guided step is x - eta * grad, so the relation is exact."""
    detector = ContrastDetector().eval()
    common = dict(num_steps=10, start_index=4, guided_steps=1, strength=0.05)
    runs = {change: run_guidance(NoPriorFlow(), detector, image, GuidanceConfig(density_change=change, **common),
                                 compare_to="input") for change in ("any", "decrease")}
    change_any = runs["any"].x_counterfactual - image
    change_decrease = runs["decrease"].x_counterfactual - image
    assert runs["any"].input_positives == BLOB_SLICES
    # the unconstrained step removes the blob *and* brightens the slice below it (the adversarial route) ...
    assert change_any[blob_mask()].min() < -1e-3 and change_any.max() > 1e-3
    # ... the constrained one keeps exactly its darkening part
    assert torch.allclose(change_decrease, change_any.clamp(max=0), atol=1e-7)
    assert float(change_decrease.max()) == 0.0 and change_decrease.min() < -1e-3


def test_evidence_map_is_the_normalised_dilated_cam(detector, image):
    """The blob detector's CAM is 640 relu(x - 0.5)^2 on each centre slice, so the weight is known voxel by voxel."""
    from scipy.ndimage import maximum_filter

    cam = 640.0 * F.relu(image - 0.5) ** 2
    for power, dilation in ((1.0, 0), (2.0, 1), (0.5, 2)):
        weight = evidence_map(detector, image, power=power, dilation=dilation)
        expected = maximum_filter(((cam / cam.max()) ** power).numpy(), size=2 * dilation + 1, mode="constant")
        assert weight.shape == image.shape and float(weight.max()) == pytest.approx(1.0)
        np.testing.assert_allclose(weight.numpy(), expected, atol=1e-6)
    assert int((evidence_map(detector, image, dilation=0) > 0).sum()) == int(blob_mask().sum())
    assert float(evidence_map(detector, healthy_image()).abs().max()) == 0.0  # no evidence: no weight, no NaN


def test_evidence_map_needs_a_cam_head(detector, image):
    plain = copy.deepcopy(detector)
    plain.head = torch.nn.Linear(1, 1)
    with pytest.raises(TypeError, match="class activation map"):
        evidence_map(plain, image)
    with pytest.raises(TypeError, match="class activation map"):
        next(guide(toy_flow(), plain, image, GuidanceConfig(gradient_weight="cam")))


def test_cam_weight_keeps_the_update_where_the_classifier_sees_the_nodule(image):
    """Velocity 0 and identity decoding: one weighted step is x - eta * w * grad, w = the input's evidence map."""
    detector = ContrastDetector().eval()
    common = dict(num_steps=10, start_index=4, guided_steps=1, strength=0.05, density_change="any")
    plain = run_guidance(NoPriorFlow(), detector, image, GuidanceConfig(**common), compare_to="input")
    weighted = run_guidance(NoPriorFlow(), detector, image, GuidanceConfig(gradient_weight="cam", **common),
                            compare_to="input")
    weight = evidence_map(detector, image)
    change_plain, change_weighted = plain.x_counterfactual - image, weighted.x_counterfactual - image
    torch.testing.assert_close(change_weighted, change_plain * weight, atol=1e-7, rtol=0)
    # the classifier's context voxels (the slice below the blob, brightened by the plain step) are left alone ...
    context = weight == 0
    assert change_plain[context].abs().max() > 1e-3 and float(change_weighted[context].abs().max()) == 0.0
    # ... and the blob, where its evidence is, keeps most of the plain step's darkening
    blob = blob_mask()
    assert float(change_plain[blob].sum()) < 0 and float(change_weighted[blob].sum() / change_plain[blob].sum()) > 0.5


# --- gradients ---------------------------------------------------------------------------------------------------


def test_a_guided_step_is_algorithm_1(detector, image):
    """z_next = z - eta * d loss / d z0_hat + v(z) (t_from - t_to)/1000, with the loss recomputed independently."""
    flow = toy_flow()
    trajectory = states(flow, detector, image, strength=0.7, guided_steps=1, loss="bce")
    before, step = trajectory[6], trajectory[7]
    assert before.phase == "invert" and step.phase == "guided"
    z, t_from, t_to = before.z, torch.tensor(step.t_prev), torch.tensor(step.t)
    v = flow.velocity(z, t_from)
    z_hat = (z + v * t_from / 1000).requires_grad_(True)
    image_hat = flow.decode(z_hat)[0, 0]
    stacks = torch.stack([image_hat[[i - 1, i, i + 1]] for i in step.positives])
    loss = F.softplus(detector(stacks)).mean()
    (grad,) = torch.autograd.grad(loss, z_hat)
    assert torch.allclose(image_hat.detach(), step.x_hat) and step.loss == pytest.approx(float(loss.detach()), rel=1e-6)
    expected = z - 0.7 * grad + v * (t_from - t_to) / 1000  # the Euler step reuses v from before the update
    assert torch.allclose(step.z, expected, atol=1e-6)
    assert not torch.allclose(step.z, expected - 0.7 * grad * float(flow.coefficient(t_from)) * (t_from - t_to) / 1000,
                              atol=1e-6)  # ... which differs measurably from re-evaluating v after it


def test_gradient_skipping_never_differentiates_the_velocity(detector, image):
    skip_flow, full_flow = toy_flow(), toy_flow()
    skip = first_guided(states(skip_flow, detector, image))
    full = first_guided(states(full_flow, detector, image, gradient_skipping=False))
    assert skip_flow.velocity_calls and not any(grad and req for grad, req in skip_flow.velocity_calls)
    assert any(grad and req for grad, req in full_flow.velocity_calls)
    # same clean estimate at the first guided step; through the network d z0_hat / d z = 1 + r * dv/dz
    assert torch.equal(skip.x_hat, full.x_hat) and skip.loss == full.loss
    t = skip.t_prev
    factor = 1 + t / 1000 * float(skip_flow.coefficient(t))
    assert abs(factor - 1) > 0.1  # the check below can tell the two apart
    assert full.grad_norm == pytest.approx(abs(factor) * skip.grad_norm, rel=1e-4)


def test_loss_kinds_and_reductions(detector, image):
    runs = {
        (loss, red): first_guided(states(toy_flow(), detector, image, loss=loss, reduction=red))
        for loss in ("bce", "logit") for red in ("mean", "sum")
    }
    p = np.array(runs["bce", "mean"].probabilities)
    logits = np.log(p / (1 - p))
    assert runs["bce", "mean"].loss == pytest.approx(np.mean(np.log1p(np.exp(logits))), rel=1e-4)
    assert runs["logit", "mean"].loss == pytest.approx(np.mean(logits), rel=1e-4)
    n = len(p)
    for loss in ("bce", "logit"):
        assert runs[loss, "sum"].loss == pytest.approx(n * runs[loss, "mean"].loss, rel=1e-5)
        assert runs[loss, "sum"].grad_norm == pytest.approx(n * runs[loss, "mean"].grad_norm, rel=1e-5)
    # slices' gradients are disjoint here, and BCE scales each slice's logit gradient by its probability
    ratio = runs["bce", "mean"].grad_norm / runs["logit", "mean"].grad_norm
    assert p.min() - 1e-6 <= ratio <= p.max() + 1e-6 and ratio < 0.999


def test_inner_iterations_keep_lowering_the_loss(detector, image):
    step = first_guided(states(toy_flow(), detector, image, loss="logit", strength=0.3, inner_iterations=3))
    assert len(step.losses) == len(step.grad_norms) == 3
    assert step.losses[0] > step.losses[1] > step.losses[2]


# --- which slices the loss covers ---------------------------------------------------------------------------------


def test_recomputed_positives_follow_the_clean_estimate(detector, image):
    common = dict(loss="logit", guided_steps=4, positive_threshold=0.65)
    fixed = [s for s in states(toy_flow(), detector, image, **common) if s.phase == "guided"]
    recomputed = [s for s in states(toy_flow(), detector, image, positives="recomputed", **common)
                  if s.phase == "guided"]
    assert all(s.positives == BLOB_SLICES and s.guided for s in fixed)  # the input's positives, every step
    for s in recomputed:  # exactly the slices positive on that step's clean estimate
        assert s.positives == positive_slices(detector, s.x_hat, threshold=0.65)[0]
    # as the blob fades the set shrinks (edge slices first), then guidance stops
    assert [s.positives for s in recomputed[:2]] == [BLOB_SLICES, BLOB_SLICES[1:4]]
    assert not recomputed[-1].positives and not recomputed[-1].guided and recomputed[-1].x_hat is not None


def test_no_positive_slice_makes_guidance_a_no_op(detector):
    healthy = healthy_image()
    flow = toy_flow()
    result = run_guidance(flow, detector, healthy, GuidanceConfig(num_steps=10, start_index=4))
    assert result.input_positives == ()
    assert torch.equal(result.x_counterfactual, result.x_reference)
    guided = [s for s in result.trajectory if s["phase"] == "guided"]
    assert guided and all(s["loss"] is None and s["n_positives"] == 0 for s in guided)


# --- input checks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(start_index=31), dict(guided_steps=16), dict(positives="all"), dict(loss="mse"), dict(reduction="max"),
     dict(inner_iterations=0), dict(positive_threshold=1.5), dict(density_change="increase"),
     dict(gradient_weight="gradcam"), dict(weight_power=0.0), dict(weight_dilation=-1)],
)
def test_config_is_checked(kwargs):
    with pytest.raises(ValueError):
        GuidanceConfig(**kwargs)


def test_inputs_are_checked(detector, image):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        next(guide(toy_flow(), detector, image * 1000 - 500))
    with pytest.raises(ValueError, match="shape"):
        next(guide(toy_flow(), detector, image[None]))
    with pytest.raises(ValueError, match="eval"):
        next(guide(toy_flow(), BlobDetector().train(), image))


# --- the real MAISI-v2 interfaces ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow_maisi() -> MaisiFlow:
    """MAISI-v2's classes with narrow channels and fewer norm groups (same code paths, seconds on a CPU)."""
    config = copy.deepcopy(load_maisi_config())
    config["autoencoder_def"].update(num_channels=[8, 8, 8], num_res_blocks=[1, 1, 1], num_splits=1, norm_num_groups=4)
    config["diffusion_unet_def"].update(num_channels=[32, 32, 32, 32], num_res_blocks=1, norm_num_groups=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        autoencoder = replace_maisi_group_norm(build_maisi_autoencoder(config))
        unet = reinit_zero_output(build_maisi_unet(config))
    flow = MaisiFlow(autoencoder, unet, 1.7, spacing_zyx_mm=(2.0, 1.5, 1.5))
    return flow.eval().requires_grad_(False)


@pytest.mark.parametrize("skipping", [True, False], ids=["gradient-skipping", "full-backprop"])
def test_runs_with_a_random_weight_maisi(narrow_maisi, skipping):
    torch.manual_seed(0)
    predictor = build_predictor("tiny").eval()  # 64x64 input: the loop resizes the 32x32 slices
    x = torch.rand(32, 32, 32, generator=torch.Generator().manual_seed(0))
    config = GuidanceConfig(num_steps=3, start_index=1, guided_steps=1, positive_threshold=0.0,
                            gradient_skipping=skipping)
    result = run_guidance(narrow_maisi, predictor, x, config)
    assert [s["phase"] for s in result.trajectory] == ["encode", "invert", "invert", "guided", "free", "final"]
    guided = result.trajectory[3]
    assert guided["n_positives"] == 32 and np.isfinite(guided["loss"]) and guided["grad_norm"] > 0
    assert result.x_counterfactual.shape == result.x_reference.shape == (32, 32, 32)
    assert torch.isfinite(result.difference).all() and result.difference.max() > 0
