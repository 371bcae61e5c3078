"""Training-free guidance of a rectified flow by a 2.5D slice classifier (the paper's Algorithm 1), as a generator.

    encode x -> z(0)  ->  invert (backward Euler) to t = grid[start_index]
    guided steps (the first ``guided_steps`` sampling steps), each:
        v = velocity(z, t) [no grad]  ->  z0_hat = z + v t/1000  ->  decode  ->  2.5D stacks of the positive slices
        -> classifier logits -> loss towards "no nodule"  ->  z <- z - strength * d loss / d z0_hat
        -> Euler step with the same v
    free steps (the rest, unguided)  ->  decode: the counterfactual

With gradient skipping (FlowChef) nothing is differentiated through the velocity network: ``d z0_hat / d z`` is taken
as the identity, so the update uses the gradient w.r.t. the clean estimate. ``gradient_skipping=False``
differentiates through the network as well. The loss is the paper's BCE towards label 0 (``softplus(logit)``) or
the raw logit; BCE's gradient is ``sigmoid(logit)`` times the logit's, so it fades once a slice looks negative.

The decoder is back-propagated either through a whole-volume decode (``decoder="full"``) or by slabs: the clean
estimate is decoded once without a graph and only the axial runs the loss reads are decoded again with one
(``decoder="slab"``, ``tfg_core.flow.slab``), which is what makes MAISI-v2 at full size fit in memory.

``guide`` yields a ``GuidanceStep`` per step (for notebooks and tests); ``run_guidance`` runs it to the end with the
unguided reference, which starts from the same inverted latent and is sampled beside the guided run: both latents go
through the velocity network in one batch of two per step (one call instead of two; on a CPU, batch 1 of the demo's
small latent even takes PyTorch's slow conv3d kernel, so the pair costs less than one alone there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tfg_core.data.slices import make_stacks, resize_maps
from tfg_core.flow.base import FlowModel
from tfg_core.flow.schedule import clean_estimate, euler_step, invert, sampling_steps
from tfg_core.flow.slab import decode_with_statistics
from tfg_core.predictors.heads import Predictor
from tfg_core.segment import DIFFERENCES, difference_map

PHASES = ("encode", "invert", "guided", "free", "final")
# how the classifier may change the image: only by taking density away (the default, first) or in "any" direction
DENSITY_CHANGES = ("decrease", "any")
# where the classifier may change the image: anywhere (the paper, first) or in proportion to its own evidence (CAM)
GRADIENT_WEIGHTS = ("none", "cam")


@dataclass(frozen=True)
class GuidanceConfig:
    """Every parameter of the guidance loop: the paper's defaults except ``loss`` and ``density_change`` (measured).

    Args:
        num_steps: sampling steps of the flow's time grid (MAISI-v2: 30).
        start_index: sampling step at which sampling restarts after inversion (15 of 30: invert half way).
        guided_steps: how many of the remaining steps are guided (5); the rest run unguided.
        strength: step size ``eta`` of ``z <- z - eta * grad`` (1.0).
        inner_iterations: gradient updates per guided step before its Euler step (1). With gradient skipping the
            step's velocity is computed once and held fixed; with full backprop it is recomputed at every update.
            The Euler step uses the last velocity computed.
        gradient_skipping: True: gradient w.r.t. the clean estimate, no backprop through the velocity network
            (FlowChef); False: differentiate through it too.
        positives: which slices the loss covers: ``"fixed"`` = predicted positive on the input,
            ``"recomputed"`` = predicted positive on the current clean estimate at every update.
        loss: ``"logit"`` (the raw logit, which does not saturate) or ``"bce"`` (BCE towards 0, the paper's).
            The default is measured on the demo (an earlier demo flow and predictors): on a 25.7 mm nodule the BCE fell
            from 2.4 to 0.05 after one strength-4 step, so later guided steps did almost nothing, and over phantom
            folds 0-3 the logit loss gave the higher mean Dice (docs/measurement_log.md; repeat it with
            ``tfg demo --fold 0 1 2 3 --loss bce``).
        reduction: ``"mean"`` or ``"sum"`` of the per-slice losses.
        positive_threshold: a slice is positive when ``sigmoid(logit) >= positive_threshold``.
        slice_batch: stacks per predictor call (memory).
        decode_free_steps: also decode the clean estimate of free steps for the trajectory (costs a decode each).
        decoder: how the loss is back-propagated through the decoder. ``"slab"``: decode the whole clean estimate
            without a graph, then back-propagate only through the axial slabs the loss reads, from the latent range
            that determines them, with GroupNorm statistics of the whole-volume decode held constant
            (``tfg_core.flow.slab``; MAISI-v2 at 128x128x64: 1.3 GB instead of 9.4 GB, see the README's
            Performance section). ``"full"``: plain autograd through a whole-volume decode (exact gradient, also
            through the normalisation statistics). ``"auto"``: the flow's ``default_decoder`` (``"slab"`` for
            MAISI-v2, ``"full"`` for the small demo flow). Flows without ``decoder_stages`` always use ``"full"``.
        checkpointing: activation-checkpoint every decoder block in slab decoding (keeps block inputs only).
        slab_slices: bound on the memory of slab decoding: decode the clean estimate that many voxels at a time
            along z in every decoder block, and back-propagate runs in parts of that many slices; None: whole
            volume, whole runs (faster, more memory; see ``tfg_core.flow.slab.decode_with_statistics``). MAISI-v2
            at 128x128x64, one guided step: 8 -> 1.3 GB, 16 -> 1.7 GB, None -> 2.3 GB (README, Performance).
        difference: the segmentation map built from the two reconstructions (``segment.difference_map``):
            ``"absolute"`` = ``|counterfactual - reference|`` (the paper's, the default) or ``"removed"`` =
            ``max(reference - counterfactual, 0)``, the density the guidance took away. Measured on the ten phantom
            folds with ``density_change="any"`` and the earlier ×4 demo flow (docs/measurement_log.md): ``"removed"``
            gave mean Dice 0.217 against 0.209 but 14 empty masks against 11 and a larger median MSD, so it is an
            option, not the default.
        density_change: which part of the classifier's image gradient drives the update. ``"any"``: all of it (the
            paper). ``"decrease"``: only its non-negative part, the voxels whose *darkening* lowers the loss; a nodule
            is removed by making it as dark as the lung around it, and this shuts the adversarial route of fooling
            the classifier by adding density elsewhere (the decoder's Jacobian still spreads the update, so single
            voxels may brighten). Applies to the no-prior ablation alike. The default is measured on the ten phantom
            folds with the earlier ×4 demo flow (docs/measurement_log.md): ``"decrease"`` gave mean Dice 0.269 against
            0.209 (map maximum on the nodule in 58 % of the scans against 50 %), but not on every scan (better on 14,
            worse on 16, Wilcoxon p = 0.32).
        gradient_weight: where the classifier's image gradient may act. ``"none"``: everywhere (the paper).
            ``"cam"``: multiplied voxel by voxel by the classifier's own class activation map of the *input*
            (``evidence_map``: every slice's CAM, negative evidence cut at 0, divided by the volume's maximum,
            raised to ``weight_power``, max-filtered over ``weight_dilation`` voxels). The gradient of a 2.5D
            classifier also reaches voxels it only reads as context (vessels, the chest wall); the CAM says which
            of them carry its nodule evidence, so the counterfactual is changed there and the rest is left to the
            prior. Applies to the no-prior ablation alike. Needs a predictor with a CAM head.
        weight_power: exponent of the normalised CAM (>1 concentrates the weight on the strongest evidence).
        weight_dilation: radius in voxels of the max filter over the weight (0: none), so the nodule's rim, where
            the feature map's coarse cells fall off, is not frozen.
    """

    num_steps: int = 30
    start_index: int = 15
    guided_steps: int = 5
    strength: float = 1.0
    inner_iterations: int = 1
    gradient_skipping: bool = True
    positives: str = "fixed"
    loss: str = "logit"
    reduction: str = "mean"
    positive_threshold: float = 0.5
    slice_batch: int = 16
    decode_free_steps: bool = False
    decoder: str = "auto"
    checkpointing: bool = True
    slab_slices: int | None = 8
    difference: str = "absolute"
    density_change: str = "decrease"
    gradient_weight: str = "none"
    weight_power: float = 1.0
    weight_dilation: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.start_index <= self.num_steps:
            raise ValueError(f"start_index must be in [0, num_steps={self.num_steps}], got {self.start_index}")
        if not 0 <= self.guided_steps <= self.num_steps - self.start_index:
            raise ValueError(
                f"guided_steps must be in [0, {self.num_steps - self.start_index}] (the steps left after "
                f"start_index={self.start_index} of {self.num_steps}), got {self.guided_steps}"
            )
        for name, allowed in (("positives", ("fixed", "recomputed")), ("loss", ("bce", "logit")),
                              ("reduction", ("mean", "sum")), ("decoder", ("auto", "slab", "full")),
                              ("difference", DIFFERENCES), ("density_change", DENSITY_CHANGES),
                              ("gradient_weight", GRADIENT_WEIGHTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.inner_iterations < 1 or self.slice_batch < 1:
            raise ValueError("inner_iterations and slice_batch must be >= 1")
        if self.slab_slices is not None and self.slab_slices < 1:
            raise ValueError(f"slab_slices must be >= 1 or None, got {self.slab_slices}")
        if not 0.0 <= self.positive_threshold <= 1.0:
            raise ValueError(f"positive_threshold is a probability, got {self.positive_threshold}")
        if not self.weight_power > 0 or self.weight_dilation < 0:
            raise ValueError(f"weight_power must be > 0 and weight_dilation >= 0, got {self.weight_power}, "
                             f"{self.weight_dilation}")


@dataclass
class GuidanceStep:
    """The state after one step of the loop.

    Args:
        phase: ``"encode"`` (the input's latent and its positive slices), ``"invert"``, ``"guided"``, ``"free"``,
            or ``"final"`` (``x_hat`` is the decoded counterfactual).
        step: sampling step index ``i`` (``grid[i] -> grid[i+1]``; for inversion the step being undone);
            None for encode/final.
        t_prev: time the step started from: where the clean estimate, loss and positives were evaluated.
        t: time of ``z``.
        z: latent after the step (detached, on the CPU).
        x_hat: decoded clean estimate at ``t_prev`` before the update, ``(z, y, x)``, or None when not decoded.
        losses: loss of every inner iteration (empty when no update was made).
        grad_norms: L2 norm of the latent gradient of every inner iteration.
        positives: slices the loss covered (first inner iteration); on encode, the input's positive slices.
        probabilities: classifier probability of each of those slices on ``x_hat`` (on the input for encode).
        velocity: the velocity the step's Euler update used (guided and free steps; detached, on the CPU).
        z_reference: with ``guide(..., reference=True)``: the unguided reference's latent after the step (guided,
            free and final states; detached, on the CPU).
        velocity_reference: the velocity of the reference's step.
        x_reference: on ``"final"`` with ``reference=True``: the decoded unguided reconstruction.
    """

    phase: str
    step: int | None
    t_prev: float
    t: float
    z: torch.Tensor
    x_hat: torch.Tensor | None = None
    losses: tuple[float, ...] = ()
    grad_norms: tuple[float, ...] = ()
    positives: tuple[int, ...] = ()
    probabilities: tuple[float, ...] = ()
    velocity: torch.Tensor | None = None
    z_reference: torch.Tensor | None = None
    velocity_reference: torch.Tensor | None = None
    x_reference: torch.Tensor | None = None

    @property
    def loss(self) -> float | None:
        """Loss at the step's first inner iteration (None when the step made no update)."""
        return self.losses[0] if self.losses else None

    @property
    def grad_norm(self) -> float | None:
        """Gradient norm at the step's first inner iteration (None when the step made no update)."""
        return self.grad_norms[0] if self.grad_norms else None

    @property
    def guided(self) -> bool:
        """Whether the step changed the latent by guidance."""
        return bool(self.losses)

    def summary(self) -> dict[str, Any]:
        """The step without tensors: one row of a trajectory table."""
        return {
            "phase": self.phase, "step": self.step, "t_prev": self.t_prev, "t": self.t, "loss": self.loss,
            "grad_norm": self.grad_norm, "losses": list(self.losses), "grad_norms": list(self.grad_norms),
            "n_positives": len(self.positives), "positives": list(self.positives),
            "probabilities": list(self.probabilities),
        }


@dataclass
class GuidanceResult:
    """What ``run_guidance`` returns; every image is ``(z, y, x)`` on the model grid, on the CPU.

    Args:
        x_input: the input image.
        x_counterfactual: the guided reconstruction.
        x_reference: the unguided reconstruction from the same inverted latent (None when compared to the input).
        difference: the change from the reference (or the input) to the counterfactual, by ``config.difference``.
        compare_to: ``"reference"`` or ``"input"``.
        input_positives: slices predicted positive on the input.
        input_probabilities: their probabilities.
        trajectory: ``GuidanceStep.summary()`` of every step.
    """

    x_input: torch.Tensor
    x_counterfactual: torch.Tensor
    x_reference: torch.Tensor | None
    difference: torch.Tensor
    compare_to: str
    input_positives: tuple[int, ...]
    input_probabilities: tuple[float, ...]
    trajectory: list[dict[str, Any]] = field(default_factory=list)


def slice_logits(
    predictor: Predictor, image: torch.Tensor, slices: Sequence[int], slice_batch: int = 16
) -> torch.Tensor:
    """Classifier logits of the 2.5D stacks centred on ``slices`` of ``image`` ``(z, y, x)``, in batches.

    Differentiable when ``image`` requires grad; the caller picks the grad mode.

    Args:
        predictor: slice classifier (in eval mode).
        image: volume in [0, 1].
        slices: centre slice indices.
        slice_batch: stacks per call.
    """
    slices = list(slices)
    if not slices:
        return image.new_zeros(0)
    chunks = [slices[i : i + slice_batch] for i in range(0, len(slices), slice_batch)]
    stacks = (make_stacks(image, c, n_slices=predictor.in_slices, size=predictor.input_size) for c in chunks)
    return torch.cat([predictor(s) for s in stacks])


def positive_slices(
    predictor: Predictor, image: torch.Tensor, threshold: float = 0.5, slice_batch: int = 16
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Slices of ``image`` ``(z, y, x)`` with ``sigmoid(logit) >= threshold``, and their probabilities.

    Args:
        predictor: slice classifier (in eval mode).
        image: volume in [0, 1].
        threshold: probability at which a slice counts as positive.
        slice_batch: stacks per call.
    """
    with torch.no_grad():
        probs = torch.sigmoid(slice_logits(predictor, image.detach(), range(image.shape[0]), slice_batch))
    keep = torch.nonzero(probs >= threshold).flatten().tolist()
    return tuple(keep), tuple(probs[keep].tolist())


def evidence_map(
    predictor: Predictor, image: torch.Tensor, power: float = 1.0, dilation: int = 1, slice_batch: int = 16
) -> torch.Tensor:
    """The classifier's nodule evidence on every slice of ``image``, as a (z, y, x) weight in [0, 1].

    Each slice's class activation map (the head's weights applied to ``feat``, as the CAM baseline computes it),
    negative evidence cut at 0, brought to the slice's (y, x) grid (bilinear, the resize ``make_stacks`` undoes),
    divided by the volume's maximum (one scale for every slice), raised to ``power`` and max-filtered over a cube
    of ``2 * dilation + 1`` voxels. All zero when the classifier sees no evidence anywhere.

    Args:
        predictor: slice classifier in eval mode with a ``CamHead`` (``Predictor.class_activation``).
        image: volume (z, y, x) in [0, 1].
        power: exponent of the normalised map.
        dilation: max-filter radius in voxels (0: none).
        slice_batch: stacks per classifier call.
    """
    vol = image.detach()
    maps = []
    with torch.no_grad():
        for i in range(0, vol.shape[0], slice_batch):
            stacks = make_stacks(vol, list(range(i, min(i + slice_batch, vol.shape[0]))),
                                 n_slices=predictor.in_slices, size=predictor.input_size)
            maps.append(resize_maps(predictor.class_activation(stacks).float(), tuple(vol.shape[1:])))
    weight = torch.cat(maps).clamp_min(0)
    peak = weight.max()
    if peak <= 0:
        return weight
    weight = (weight / peak) ** power
    if dilation > 0:
        weight = F.max_pool3d(weight[None, None], 2 * dilation + 1, stride=1, padding=dilation)[0, 0]
    return weight


def _loss_and_image_gradient(
    predictor: Predictor, image: torch.Tensor, slices: Sequence[int], config: GuidanceConfig
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Loss over ``slices``, its gradient w.r.t. ``image``, and the slices' logits.

    Batch by batch, each batch's graph freed before the next: the predictor graph of every positive slice never
    has to be held at once; the decoder is back-propagated once afterwards with the summed gradient.
    """
    leaf = image.detach().requires_grad_(True)
    grad, total, logits_all = torch.zeros_like(leaf), 0.0, []
    divisor = len(slices) if config.reduction == "mean" else 1
    for i in range(0, len(slices), config.slice_batch):
        logits = slice_logits(predictor, leaf, slices[i : i + config.slice_batch], config.slice_batch)
        # BCE towards label 0 is softplus(logit); "logit" pushes the raw score down without saturating
        per_slice = F.softplus(logits) if config.loss == "bce" else logits
        loss = per_slice.sum() / divisor
        grad += torch.autograd.grad(loss, leaf)[0]
        total += float(loss.detach())
        logits_all.append(logits.detach())
    return total, grad, torch.cat(logits_all)


def _frozen_velocity(flow: FlowModel, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The velocity as a constant: no graph, whatever the caller's grad mode."""
    with torch.no_grad():
        return flow.velocity(z, t)


class GuidedUpdate(NamedTuple):
    """What one gradient update of the latent returns (see ``guided_update``)."""

    z: torch.Tensor  # latent after the update (unchanged when there was nothing to guide)
    v: torch.Tensor  # velocity used for the clean estimate (detached)
    image: torch.Tensor  # decoded clean estimate before the update (detached)
    positives: tuple[int, ...]
    probabilities: tuple[float, ...]
    loss: float | None  # None: no positive slice, no update
    grad_norm: float | None


def guided_update(
    flow: FlowModel, predictor: Predictor, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor | None,
    positives: tuple[int, ...], cfg: GuidanceConfig, image_weight: torch.Tensor | None = None,
) -> GuidedUpdate:
    """One gradient update of the latent: clean estimate -> decode -> loss on the positive slices -> step.

    The unit ``guide`` repeats (``inner_iterations`` times per guided step), and what the benchmarks measure.

    Args:
        flow: the rectified-flow model.
        predictor: slice classifier in eval mode.
        z: latent at time ``t``.
        t: time of ``z``.
        v: the step's velocity at ``z`` when already computed (gradient skipping); None computes it.
        positives: slices the loss covers (``cfg.positives == "fixed"``); recomputed on the clean estimate otherwise.
        cfg: loop parameters (strength, loss, decoder path, ...).
        image_weight: (z, y, x) factor on the image gradient (``evidence_map``), or None.
    """
    with torch.enable_grad():
        if cfg.gradient_skipping:
            # v is a constant: d z0_hat / d z = I, so the gradient w.r.t. z0_hat is the update direction
            v = v if v is not None else _frozen_velocity(flow, z, t)
            wrt = z_hat = clean_estimate(z, v, t).requires_grad_(True)
        else:
            wrt = z.detach().requires_grad_(True)
            v = flow.velocity(wrt, t)
            z_hat = clean_estimate(wrt, v, t)
        decoder = flow.default_decoder if cfg.decoder == "auto" else cfg.decoder
        stages = flow.decoder_stages() if decoder == "slab" else None
        if stages is not None:  # no graph here: slabs get one in vjp
            decoded = decode_with_statistics(stages, z_hat, cfg.checkpointing, cfg.slab_slices)
            image = decoded.image[0, 0]
        else:
            image = flow.decode(z_hat)[0, 0]
        if cfg.positives == "recomputed":
            positives, _ = positive_slices(predictor, image, cfg.positive_threshold, cfg.slice_batch)
        if not positives:  # nothing left to remove
            return GuidedUpdate(z, v.detach(), image.detach(), (), (), None, None)
        loss, grad_image, logits = _loss_and_image_gradient(predictor, image, positives, cfg)
        if cfg.density_change == "decrease":  # z <- z - eta * grad: a positive component darkens that voxel
            grad_image = grad_image.clamp(min=0)
        if image_weight is not None:
            grad_image = grad_image * image_weight.to(grad_image.device)
        if stages is not None:
            grad = grad_z_hat = decoded.vjp(grad_image[None, None])
            if wrt is not z_hat:  # full backprop: on through the clean estimate into the velocity network
                (grad,) = torch.autograd.grad(z_hat, wrt, grad_outputs=grad_z_hat)
        else:
            (grad,) = torch.autograd.grad(image, wrt, grad_outputs=grad_image)
    probabilities = tuple(torch.sigmoid(logits).tolist())
    z_new = z.detach() - cfg.strength * grad
    return GuidedUpdate(z_new, v.detach(), image.detach(), positives, probabilities, loss, float(grad.norm()))


def _check_input(predictor: Predictor, x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:
        x = x[None, None]
    if x.ndim != 5 or x.shape[:2] != (1, 1):
        raise ValueError(f"expected an image (z, y, x) or (1, 1, z, y, x), got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.min() < -1e-3 or x.max() > 1 + 1e-3:
        raise ValueError("expected a float image in MAISI's [0, 1] intensities (see preprocess.hu_to_unit)")
    if predictor.training:
        raise ValueError("the predictor is in training mode (batch statistics would change its output): call .eval()")
    return x


def guide(
    flow: FlowModel,
    predictor: Predictor,
    x: torch.Tensor,
    config: GuidanceConfig | None = None,
    progress: bool = False,
    reference: bool = False,
) -> Iterator[GuidanceStep]:
    """Run the guidance loop step by step; the last state (phase ``"final"``) holds the counterfactual.

    Args:
        flow: the rectified-flow model (on the same device as ``x``).
        predictor: slice classifier in eval mode; its ``in_slices`` and ``input_size`` shape the stacks.
        x: image ``(z, y, x)`` or ``(1, 1, z, y, x)`` in [0, 1] on the flow's grid.
        config: loop parameters (``GuidanceConfig()`` when None).
        progress: show tqdm bars.
        reference: also sample the unguided reference from the same inverted latent, step by step beside the guided
            run (its velocity in the same network call, a batch of two, except where full backprop needs the guided
            velocity with a graph); every sampling state then carries ``z_reference`` and ``velocity_reference``, and
            the final one ``x_reference``.

    Yields:
        ``GuidanceStep`` for encode, every inversion step, every guided and free step, and the final decode.
    """
    cfg = config if config is not None else GuidanceConfig()
    x = _check_input(predictor, x)

    velocity = partial(_frozen_velocity, flow)

    with torch.no_grad():
        z = flow.encode(x)
    weight = None
    if cfg.gradient_weight == "cam":  # the input's evidence, fixed for the run; first, so a head without a CAM fails here
        weight = evidence_map(predictor, x[0, 0], cfg.weight_power, cfg.weight_dilation, cfg.slice_batch)
    input_pos, input_probs = positive_slices(predictor, x[0, 0], cfg.positive_threshold, cfg.slice_batch)
    yield GuidanceStep("encode", None, 0.0, 0.0, z.detach().cpu(), positives=input_pos, probabilities=input_probs)

    grid = flow.timesteps(cfg.num_steps, latent_shape=tuple(z.shape))
    t_prev = 0.0
    for k, (t, z) in enumerate(invert(velocity, z, grid, cfg.start_index, progress=progress)):
        yield GuidanceStep("invert", cfg.num_steps - 1 - k, t_prev, float(t), z.detach().cpu())
        t_prev = float(t)

    steps = sampling_steps(grid, cfg.start_index)
    z_ref = z if reference else None
    for i, (t_from, t_to) in enumerate(tqdm(steps, desc="guide", disable=not progress), start=cfg.start_index):
        guided = i - cfg.start_index < cfg.guided_steps
        updates = guided and (cfg.positives == "recomputed" or bool(input_pos))
        v, v_ref, x_hat, losses, norms, slices, probs = None, None, None, [], [], (), ()
        if z_ref is not None:
            if updates and not cfg.gradient_skipping:  # the guided velocity needs a graph: guided_update computes it
                v_ref = velocity(z_ref, t_from)
            else:  # both velocities in one call; the guided one is the step's, taken before any update
                v, v_ref = velocity(torch.cat([z, z_ref]), t_from).split(1)
        if updates:
            for it in range(cfg.inner_iterations):
                # with gradient skipping the step's velocity is computed once; otherwise at every update
                u = guided_update(flow, predictor, z, t_from, v if cfg.gradient_skipping else None, input_pos, cfg,
                                  weight)
                v = u.v
                if it == 0:
                    x_hat, slices, probs = u.image.cpu(), u.positives, u.probabilities
                if u.loss is None:  # no positive slice: this update and the step's later ones are no-ops
                    break
                z = u.z
                losses.append(u.loss)
                norms.append(u.grad_norm)
        if v is None:  # free step, or a guided step with nothing to guide
            v = velocity(z, t_from)
        if x_hat is None and cfg.decode_free_steps:
            with torch.no_grad():
                x_hat = flow.decode(clean_estimate(z, v, t_from))[0, 0].cpu()
        z = euler_step(z, v, t_from, t_to)  # the same v as the guidance used (Algorithm 1)
        if z_ref is not None:
            z_ref = euler_step(z_ref, v_ref, t_from, t_to)
        phase = "guided" if guided else "free"
        yield GuidanceStep(phase, i, float(t_from), float(t_to), z.detach().cpu(), x_hat, tuple(losses), tuple(norms),
                           slices, probs, v.detach().cpu(), _cpu(z_ref), _cpu(v_ref))

    with torch.no_grad():  # one decode at a time: at full size a decode is the largest no-grad allocation
        x_cf = flow.decode(z)[0, 0]
        x_ref = flow.decode(z_ref)[0, 0].cpu() if z_ref is not None else None
    yield GuidanceStep("final", None, 0.0, 0.0, z.detach().cpu(), x_cf.cpu(), z_reference=_cpu(z_ref),
                       x_reference=x_ref)


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().cpu()


def run_guidance(
    flow: FlowModel,
    predictor: Predictor,
    x: torch.Tensor,
    config: GuidanceConfig | None = None,
    compare_to: str = "reference",
    progress: bool = False,
) -> GuidanceResult:
    """Run ``guide`` to the end and build the difference map.

    The reference (``compare_to="reference"``) runs the same sampling steps without guidance from the same inverted
    latent (``guide(..., reference=True)``), so the map shows what guidance changed rather than what the autoencoder
    and the flow fail to reproduce.

    Args:
        flow: the rectified-flow model.
        predictor: slice classifier in eval mode.
        x: image ``(z, y, x)`` or ``(1, 1, z, y, x)`` in [0, 1] on the flow's grid.
        config: loop parameters.
        compare_to: ``"reference"`` (unguided reconstruction) or ``"input"`` (no reference is computed).
        progress: show tqdm bars.
    """
    if compare_to not in ("reference", "input"):
        raise ValueError(f"compare_to must be 'reference' or 'input', got {compare_to!r}")
    cfg = config if config is not None else GuidanceConfig()
    trajectory, states = [], {}
    for state in guide(flow, predictor, x, cfg, progress, reference=compare_to == "reference"):
        trajectory.append(state.summary())
        states[state.phase] = state
    x_input = (x[0, 0] if x.ndim == 5 else x).detach().cpu()
    x_cf, x_ref = states["final"].x_hat, states["final"].x_reference
    difference = torch.from_numpy(difference_map(x_cf, x_ref if x_ref is not None else x_input, cfg.difference))
    enc = states["encode"]
    return GuidanceResult(x_input, x_cf, x_ref, difference, compare_to, enc.positives, enc.probabilities, trajectory)
