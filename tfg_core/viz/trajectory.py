"""What the guidance does, step by step: a recorded trajectory, pure drawing functions, montages and a viewer.

``record_trajectory`` runs :func:`tfg_core.guidance.guide` on one scan and keeps, per sampling step, the decoded
clean estimate x̂ the loop already yields (``decode_free_steps`` makes free steps yield one too), the classifier's
probability of every slice on it, and the unguided run's clean estimate at the same step. The drawing functions
fill given matplotlib axes from that record (testable headless); ``save_montages`` writes the same views as PNGs;
``tfg_core.viz.viewer.TrajectoryViewer`` puts sliders, a window preset and overlay switches in front of them (ipywidgets; an ipympl
canvas under ``%matplotlib widget``, a PNG image widget under any other backend).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tfg_core.flow.base import FlowModel
from tfg_core.flow.schedule import clean_estimate
from tfg_core.guidance import GuidanceConfig, guide, slice_logits
from tfg_core.predictors.heads import Predictor
from tfg_core.segment import difference_map
from tfg_core.viz.slices import check_slice, draw_map, draw_slice, draw_slice_grid, save_montage

#: what a running difference is taken against (see :meth:`Trajectory.reference_at`)
REFERENCES = ("reference", "matched", "input")
PANELS = ("input", "x_hat", "difference", "probability", "loss")


@dataclass
class Trajectory:
    """One scan's guidance run, kept for viewing; images are ``(z, y, x)`` float32 in [0, 1] on the model grid.

    Args:
        x_input: the input image.
        x_counterfactual: the guided reconstruction (the ``"final"`` state's decode).
        x_reference: the unguided reconstruction from the same inverted latent (None: compared to the input).
        steps: sampling step index of each recorded clean estimate, ascending; ``config.num_steps`` is the final
            decode (the counterfactual itself).
        phases: ``"guided"``, ``"free"`` or ``"final"`` per recorded step.
        times: time ``t`` at which each clean estimate was taken (0 for the final decode).
        x_hat: ``(n_steps, z, y, x)`` clean estimates, before each step's guidance update.
        reference_x_hat: ``(n_steps, z, y, x)`` the unguided run's clean estimates at the same steps, or None.
        probabilities: ``(n_steps, z)`` classifier probability of every slice on ``x_hat``.
        reference_probabilities: ``(n_steps, z)`` the same on ``reference_x_hat``, or None.
        input_probabilities: ``(z,)`` probability of every slice on the input.
        positives: slices predicted positive on the input (those the loss covers with ``positives="fixed"``).
        config: the guidance parameters used.
        summaries: ``GuidanceStep.summary()`` of every state ``guide`` yielded (encode, inversion, sampling, final).
    """

    x_input: np.ndarray
    x_counterfactual: np.ndarray
    x_reference: np.ndarray | None
    steps: tuple[int, ...]
    phases: tuple[str, ...]
    times: tuple[float, ...]
    x_hat: np.ndarray
    reference_x_hat: np.ndarray | None
    probabilities: np.ndarray
    reference_probabilities: np.ndarray | None
    input_probabilities: np.ndarray
    positives: tuple[int, ...]
    config: GuidanceConfig
    summaries: list[dict[str, Any]] = field(default_factory=list)
    _scales: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def reference(self) -> np.ndarray:
        """The image the TFG map is taken against: the unguided reconstruction, else the input."""
        return self.x_reference if self.x_reference is not None else self.x_input

    @property
    def difference(self) -> np.ndarray:
        """The TFG map from counterfactual and reference by ``config.difference`` (as ``run_guidance`` builds it)."""
        return difference_map(self.x_counterfactual, self.reference, self.config.difference)

    def index(self, step: int) -> int:
        """Position of sampling step ``step`` among the recorded steps.

        Args:
            step: a sampling step index from :attr:`steps`.
        """
        try:
            return self.steps.index(int(step))
        except ValueError:
            raise ValueError(f"step {step} has no recorded clean estimate; recorded: {list(self.steps)}") from None

    def loss_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, losses)`` of the guided steps that made an update (first inner iteration's loss)."""
        rows = [(s["step"], s["loss"]) for s in self.summaries if s["phase"] == "guided" and s["loss"] is not None]
        steps, losses = zip(*rows) if rows else ((), ())
        return np.asarray(steps, dtype=int), np.asarray(losses, dtype=float)

    def reference_at(self, step: int, reference: str | np.ndarray = "reference") -> np.ndarray:
        """The image a step's running difference is taken against.

        Args:
            step: recorded sampling step.
            reference: ``"reference"`` the unguided reconstruction (the input when none was computed);
                ``"matched"`` the unguided clean estimate at the same step, so early blurred estimates are compared
                to equally blurred ones and only what guidance changed remains; ``"input"`` the input image; or
                any ``(z, y, x)`` volume.
        """
        if not isinstance(reference, str):
            return np.asarray(reference, dtype=np.float32)
        if reference == "matched":
            if self.reference_x_hat is None:
                raise ValueError("no unguided clean estimates recorded (recorded with compare_to='input')")
            return self.reference_x_hat[self.index(step)]
        if reference == "reference":
            return self.reference
        if reference == "input":
            return self.x_input
        raise ValueError(f"reference must be one of {REFERENCES} or a volume, got {reference!r}")

    def running_difference(self, step: int, reference: str | np.ndarray = "reference") -> np.ndarray:
        """``|x̂_step − reference|`` ``(z, y, x)``.

        Args:
            step: recorded sampling step.
            reference: see :meth:`reference_at`.
        """
        return np.abs(self.x_hat[self.index(step)] - self.reference_at(step, reference))

    def difference_scale(self, reference: str | np.ndarray = "reference") -> float:
        """Largest running difference over all steps: one colour scale while scrubbing (cached per mode).

        Args:
            reference: see :meth:`reference_at`.
        """
        key = reference if isinstance(reference, str) else id(reference)
        if key not in self._scales:
            self._scales[key] = max(float(self.running_difference(s, reference).max()) for s in self.steps)
        return self._scales[key]

    def focus_slice(self) -> int:
        """Axial index where the TFG map is largest in sum (where guidance changed most)."""
        return int(np.argmax(self.difference.reshape(self.difference.shape[0], -1).sum(axis=1)))

    def default_step(self) -> int:
        """The last guided step recorded (the final decode when none)."""
        guided = [s for s, p in zip(self.steps, self.phases) if p == "guided"]
        return guided[-1] if guided else self.steps[-1]


def _slice_probabilities(predictor: Predictor, images: Sequence[np.ndarray], device, slice_batch: int) -> np.ndarray:
    """``(len(images), z)`` classifier probability of every slice of each image."""
    out = []
    with torch.no_grad():
        for image in images:
            x = torch.as_tensor(image, device=device)
            out.append(torch.sigmoid(slice_logits(predictor, x, range(x.shape[0]), slice_batch)).cpu().numpy())
    return np.stack(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def _decoded_estimate(flow: FlowModel, z: torch.Tensor, v: torch.Tensor, t: float) -> np.ndarray:
    with torch.no_grad():
        return flow.decode(clean_estimate(z, v, t))[0, 0].float().cpu().numpy()


def record_trajectory(
    flow: FlowModel,
    predictor: Predictor,
    x: torch.Tensor,
    config: GuidanceConfig | None = None,
    compare_to: str = "reference",
    keep: str = "all",
    progress: bool = False,
) -> Trajectory:
    """Run :func:`tfg_core.guidance.guide` on one image and keep what the viewer shows.

    Memory: per recorded step two decoded volumes (guided and unguided x̂); for the 32×64×64 demo volumes that is
    0.5 MB each. ``keep="guided"`` records only the guided steps and the final decode (free steps are then not
    decoded at all), for large volumes.

    Args:
        flow: the rectified-flow model (on ``x``'s device).
        predictor: slice classifier in eval mode.
        x: image ``(z, y, x)`` or ``(1, 1, z, y, x)`` in [0, 1] on the flow's grid.
        config: guidance parameters (``GuidanceConfig()`` when None); ``decode_free_steps`` is set from ``keep``.
        compare_to: ``"reference"``: also run the unguided sampling from the same inverted latent (its clean
            estimates and reconstruction); ``"input"``: no reference run, differences against the input.
        keep: ``"all"`` sampling steps or only the ``"guided"`` ones (plus the final decode).
        progress: tqdm bars.
    """
    if compare_to not in ("reference", "input"):
        raise ValueError(f"compare_to must be 'reference' or 'input', got {compare_to!r}")
    if keep not in ("all", "guided"):
        raise ValueError(f"keep must be 'all' or 'guided', got {keep!r}")
    cfg = dataclasses.replace(config if config is not None else GuidanceConfig(), decode_free_steps=keep == "all")
    with_reference = compare_to == "reference"
    summaries, recorded, ref_recorded, z_ref = [], [], [], None
    for state in guide(flow, predictor, x, cfg, progress, reference=with_reference):
        summaries.append(state.summary())
        if state.phase in ("encode", "invert"):
            z_ref = state.z  # the latent sampling starts from, shared with the unguided run
        if state.x_hat is not None:
            final = state.phase == "final"
            recorded.append((cfg.num_steps if final else state.step, state.phase, 0.0 if final else state.t_prev,
                             state.x_hat.float().numpy()))
            if with_reference:  # the reference's clean estimate at the same step, from guide's own reference run
                ref_recorded.append(state.x_reference.float().numpy() if final else _decoded_estimate(
                    flow, z_ref.to(x.device), state.velocity_reference.to(x.device), state.t_prev))
        if state.z_reference is not None:
            z_ref = state.z_reference
    steps, phases, times, hats = zip(*recorded)
    x_input = (x[0, 0] if x.ndim == 5 else x).detach().float().cpu().numpy()
    ref_hats = x_ref = ref_probs = None
    if with_reference:
        ref_hats, x_ref = np.stack(ref_recorded), ref_recorded[-1]
        ref_probs = _slice_probabilities(predictor, ref_hats, x.device, cfg.slice_batch)
    return Trajectory(
        x_input=x_input, x_counterfactual=hats[-1], x_reference=x_ref, steps=tuple(steps), phases=tuple(phases),
        times=tuple(times), x_hat=np.stack(hats), reference_x_hat=ref_hats,
        probabilities=_slice_probabilities(predictor, hats, x.device, cfg.slice_batch),
        reference_probabilities=ref_probs,
        input_probabilities=_slice_probabilities(predictor, [x_input], x.device, cfg.slice_batch)[0],
        positives=tuple(summaries[0]["positives"]), config=cfg, summaries=summaries,
    )


# --- pure drawing ---------------------------------------------------------------------------------------------------


def _mark_step(ax, step: int, x: Sequence[int], y: Sequence[float]) -> None:
    """The current step: a vertical line, and a dot on the curve where the curve has a value there."""
    ax.axvline(step, color="r", lw=0.8, gid="current")
    x = list(x)
    if step in x:
        ax.plot([step], [y[x.index(step)]], "o", color="r", ms=5, gid="marker")


def _step_axis(ax, trajectory: Trajectory) -> None:
    # the same x range on both curves, from the first sampling step to the final decode
    ax.set_xlim(trajectory.config.start_index - 0.5, trajectory.config.num_steps + 0.5)
    ax.set_xlabel("sampling step", fontsize=7)
    ax.tick_params(labelsize=6)


def draw_probability_curve(ax, trajectory: Trajectory, z: int, step: int, threshold: float | None = None) -> None:
    """Clear ``ax`` and plot the classifier probability of slice ``z`` across the recorded steps.

    Solid: on the guided clean estimate (``gid="probability"``); dashed: on the unguided one (``"unguided"``);
    dotted: on the input (``"input"``); the current step as a red line (``"current"``) and dot (``"marker"``).

    Args:
        ax: matplotlib Axes.
        trajectory: the record.
        z: axial index.
        step: current sampling step.
        threshold: positive-slice threshold drawn as a grey line (default: the config's).
    """
    z = check_slice(trajectory.x_input, z)
    ax.clear()
    probs = trajectory.probabilities[:, z]
    ax.plot(trajectory.steps, probs, ".-", color="C0", lw=1, label="guided x̂", gid="probability")
    if trajectory.reference_probabilities is not None:
        ax.plot(trajectory.steps, trajectory.reference_probabilities[:, z], "--", color="0.45", lw=1,
                label="unguided x̂", gid="unguided")
    ax.axhline(float(trajectory.input_probabilities[z]), color="C2", ls=":", lw=1, label="input", gid="input")
    ax.axhline(trajectory.config.positive_threshold if threshold is None else threshold, color="0.8", lw=0.6)
    _mark_step(ax, step, trajectory.steps, probs)
    ax.set_ylim(-0.03, 1.03)
    _step_axis(ax, trajectory)
    ax.set_title(f"p(nodule) of slice {z}", fontsize=8)
    ax.legend(fontsize=6, loc="best", framealpha=0.6)


def draw_loss_curve(ax, trajectory: Trajectory, step: int) -> None:
    """Clear ``ax`` and plot the guidance loss over the guided steps (``gid="loss"``), the current step marked.

    Args:
        ax: matplotlib Axes.
        trajectory: the record.
        step: current sampling step.
    """
    ax.clear()
    steps, losses = trajectory.loss_curve()
    if len(steps):
        ax.plot(steps, losses, ".-", color="C1", lw=1, gid="loss")
    else:  # no positive slice on the input: guidance had nothing to remove
        ax.text(0.5, 0.5, "no guided update", ha="center", va="center", fontsize=7, transform=ax.transAxes)
    _mark_step(ax, step, steps.tolist(), losses.tolist())
    _step_axis(ax, trajectory)
    ax.set_title(f"loss ({trajectory.config.loss}) on guided steps", fontsize=8)


def draw_step_images(axes: Mapping[str, Any], trajectory: Trajectory, z: int, step: int,
                     window: str | tuple[float, float] = "lung",
                     reference: str | np.ndarray = "reference") -> None:
    """Fill ``axes["x_hat"]`` (the clean estimate, in the window) and ``axes["difference"]`` (the running
    difference, one colour scale for all steps); either key may be absent.

    Args:
        axes: ``{"x_hat": Axes, "difference": Axes}``.
        trajectory: the record.
        z: axial index.
        step: recorded sampling step.
        window: CT window preset or ``(width, level)``.
        reference: what the difference is taken against (see :meth:`Trajectory.reference_at`).
    """
    k = trajectory.index(step)
    if "x_hat" in axes:
        draw_slice(axes["x_hat"], trajectory.x_hat[k], z, window,
                   title=f"x̂ step {step} ({trajectory.phases[k]}, t={trajectory.times[k]:.0f})")
    if "difference" in axes:
        name = reference if isinstance(reference, str) else "given volume"
        draw_map(axes["difference"], trajectory.running_difference(step, reference), z,
                 vmax=trajectory.difference_scale(reference), title=f"|x̂ − {name}|")


def draw_viewer(axes: Mapping[str, Any], trajectory: Trajectory, z: int, step: int,
                window: str | tuple[float, float] = "lung", overlays: Mapping[str, np.ndarray] | None = None,
                reference: str | np.ndarray = "reference") -> None:
    """Fill the viewer's panels (:data:`PANELS`; any subset): the input slice with overlays, the clean estimate,
    the running difference, the slice's probability curve and the loss curve.

    Args:
        axes: ``{panel: Axes}``.
        trajectory: the record.
        z: axial index.
        step: recorded sampling step.
        window: CT window preset or ``(width, level)``.
        overlays: ``{name: boolean (z, y, x) mask}`` drawn on the input.
        reference: what the difference is taken against.
    """
    if "input" in axes:
        draw_slice(axes["input"], trajectory.x_input, z, window, overlays, title=f"input z={z}")
    draw_step_images(axes, trajectory, z, step, window, reference)
    if "probability" in axes:
        draw_probability_curve(axes["probability"], trajectory, z, step)
    if "loss" in axes:
        draw_loss_curve(axes["loss"], trajectory, step)


def viewer_axes(fig) -> dict[str, Any]:
    """Lay the viewer's panels out on an empty Figure: three images on top, the two curves below.

    Args:
        fig: a matplotlib Figure.
    """
    top = [p for p in ("input", "x_hat", "difference") for _ in range(2)]
    axes = fig.subplot_mosaic([top, ["probability"] * 3 + ["loss"] * 3], height_ratios=[1.5, 1])
    # fixed margins (not tight_layout): redraws keep every panel in place and cost no layout pass
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.08, top=0.95, wspace=0.9, hspace=0.25)
    return axes


def draw_step_montage(trajectory: Trajectory, z: int, steps: Sequence[int] | None = None,
                      window: str | tuple[float, float] = "lung", reference: str | np.ndarray = "reference"):
    """The scrubber as a montage Figure: one row per step (x̂, running difference, probability and loss curves).

    Args:
        trajectory: the record.
        z: axial index.
        steps: recorded steps to show (default :func:`montage_steps`).
        window: CT window preset.
        reference: what the difference is taken against.
    """
    from matplotlib.figure import Figure

    steps = list(steps) if steps is not None else montage_steps(trajectory)
    fig = Figure(figsize=(10.0, 2.2 * len(steps)))
    grid = fig.subplots(len(steps), 4, squeeze=False, width_ratios=[1, 1, 1.4, 1.4])
    for row, step in zip(grid, steps):
        draw_viewer(dict(zip(PANELS[1:], row)), trajectory, z, step, window, reference=reference)
    # fixed margins: tight_layout measures every tick label and costs more than the drawing
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.5 / fig.get_figheight(), top=1 - 0.35 / fig.get_figheight(),
                        wspace=0.3, hspace=0.5)
    return fig


def montage_steps(trajectory: Trajectory, max_rows: int = 8) -> list[int]:
    """Steps worth a montage row: every guided step, the final decode, free steps evenly in between.

    Args:
        trajectory: the record.
        max_rows: at most this many rows (guided steps are kept first).
    """
    guided = [s for s, p in zip(trajectory.steps, trajectory.phases) if p == "guided"]
    free = [s for s, p in zip(trajectory.steps, trajectory.phases) if p == "free"]
    room = max(0, max_rows - len(guided) - 1)
    picked = [free[int(i)] for i in np.linspace(0, len(free) - 1, room)] if free and room else []
    return sorted(set(guided[: max_rows - 1]) | set(picked) | {trajectory.steps[-1]})


def save_montages(trajectory: Trajectory, out_dir: str | os.PathLike, z: int | None = None,
                  overlays: Mapping[str, np.ndarray] | None = None, steps: Sequence[int] | None = None,
                  window: str = "lung", reference: str | np.ndarray = "reference", prefix: str = "trajectory",
                  n_slices: int = 5, dpi: int = 110) -> dict[str, Path]:
    """The viewer's views as PNGs (headless runs): ``<prefix>_slices.png`` and ``<prefix>_steps.png``.

    ``slices``: ``n_slices`` slices around ``z`` in the lung and mediastinum windows with the overlays, the
    counterfactual, the unguided reconstruction and the TFG map; ``steps``: the scrubber montage on slice ``z``.

    Args:
        trajectory: the record.
        out_dir: folder (created); files are written atomically.
        z: centre slice (default :meth:`Trajectory.focus_slice`).
        overlays: ``{name: boolean (z, y, x) mask}``.
        steps: steps of the step montage (default :func:`montage_steps`).
        window: window of the step montage.
        reference: what the running difference is taken against.
        prefix: file name prefix.
        n_slices: rows of the slice montage.
        dpi: resolution of the PNGs.
    """
    out = Path(out_dir)
    z = trajectory.focus_slice() if z is None else check_slice(trajectory.x_input, z)
    nz = trajectory.x_input.shape[0]
    lo = min(max(0, z - n_slices // 2), max(0, nz - n_slices))
    images = {"counterfactual": trajectory.x_counterfactual}
    if trajectory.x_reference is not None:
        images["unguided"] = trajectory.x_reference
    slices_fig = draw_slice_grid(trajectory.x_input, range(lo, min(nz, lo + n_slices)), ("lung", "mediastinum"),
                                 overlays, images, {"TFG map": trajectory.difference})
    return {
        "slices": save_montage(slices_fig, out / f"{prefix}_slices.png", dpi),
        "steps": save_montage(draw_step_montage(trajectory, z, steps, window, reference), out / f"{prefix}_steps.png",
                              dpi),
    }
