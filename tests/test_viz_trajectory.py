"""The trajectory viewer: a cheap guidance run is recorded, the widgets are driven from Python, and what the axes
hold is checked (image arrays, colour limits, markers, overlays); the headless path writes PNG montages (notebook 03
under papermill: tests/test_notebooks.py).

The run is the analytic ``GaussianToyFlow`` with the hand-made blob detector of ``tests/blob_detector.py``: a
16³ volume, a few milliseconds per step.
"""

from __future__ import annotations

import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from blob_detector import BlobDetector  # tests/blob_detector.py (pytest puts tests/ on sys.path)

from tfg_core.flow.toy import GaussianToyFlow
from tfg_core.guidance import GuidanceConfig, guide, run_guidance, slice_logits
from tfg_core.viz.slices import WINDOWS, draw_slice, overlay_images, unit_to_hu, window_limits
from tfg_core.viz.trajectory import draw_step_montage, montage_steps, record_trajectory
from tfg_core.viz.viewer import TrajectoryViewer

PNG = b"\x89PNG\r\n\x1a\n"
SIZE = 16
CONFIG = GuidanceConfig(num_steps=10, start_index=4, guided_steps=3, strength=2.0)


def healthy() -> torch.Tensor:
    return torch.full((SIZE,) * 3, 0.2) + 0.05 * torch.sin(torch.arange(SIZE, dtype=torch.float32) / 3)[None, None]


def blob() -> np.ndarray:
    zz, yy, xx = np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij")
    return ((zz - 8) ** 2 + (yy - 7) ** 2 + (xx - 9) ** 2) <= 2.5**2


@pytest.fixture(scope="module")
def run():
    flow = GaussianToyFlow(healthy(), sigma=1.0, scale_factor=1.5)
    detector = BlobDetector().eval()
    x = healthy() + 0.7 * torch.as_tensor(blob(), dtype=torch.float32)
    return flow, detector, x, record_trajectory(flow, detector, x, CONFIG)


@pytest.fixture(scope="module")
def trajectory(run):
    return run[3]


@pytest.fixture
def overlays(trajectory):
    gt = blob()
    return {"ground truth": gt, "tfg": trajectory.difference > 0.1, "cam": np.roll(gt, 3, axis=2)}


def _array(ax, i=0) -> np.ndarray:
    return np.asarray(ax.get_images()[i].get_array())


def _line(ax, gid):
    lines = [line for line in ax.get_lines() if line.get_gid() == gid]
    return lines[0] if lines else None


# --- recording ------------------------------------------------------------------------------------------------------


def test_the_record_holds_what_the_guidance_loop_yielded(run):
    flow, detector, x, traj = run
    assert traj.steps == (4, 5, 6, 7, 8, 9, 10)  # every sampling step, then the final decode as step num_steps
    assert traj.phases == ("guided",) * 3 + ("free",) * 3 + ("final",)
    states = [s for s in guide(flow, detector, x, CONFIG) if s.x_hat is not None]  # guided steps and final
    for s in states[:-1]:
        assert np.array_equal(traj.x_hat[traj.index(s.step)], s.x_hat.numpy())
    assert np.array_equal(traj.x_counterfactual, states[-1].x_hat.numpy()) and np.array_equal(traj.x_hat[-1],
                                                                                              traj.x_counterfactual)
    # the TFG map is run_guidance's, bit for bit: same reference run from the same inverted latent
    assert np.array_equal(traj.difference, run_guidance(flow, detector, x, CONFIG).difference.numpy())
    # before the first update both runs sit on the same latent; the reference ends at the unguided reconstruction
    assert np.array_equal(traj.reference_x_hat[0], traj.x_hat[0])
    assert np.array_equal(traj.reference_x_hat[-1], traj.x_reference)
    with torch.no_grad():
        expected = torch.sigmoid(slice_logits(detector, torch.as_tensor(traj.x_hat[2]), range(SIZE))).numpy()
    assert np.allclose(traj.probabilities[2], expected)
    assert traj.positives == (6, 7, 8, 9, 10)  # the slices the blob covers
    assert traj.probabilities[-1, 8] < traj.input_probabilities[8] - 0.3  # guidance lowered the blob's score
    steps, losses = traj.loss_curve()
    assert steps.tolist() == [4, 5, 6] and losses[0] > losses[-1]
    assert traj.focus_slice() in (7, 8, 9) and traj.default_step() == 6


def test_keep_guided_decodes_no_free_step_and_input_mode_runs_no_reference(run):
    flow, detector, x, _ = run
    traj = record_trajectory(flow, detector, x, CONFIG, compare_to="input", keep="guided")
    assert traj.steps == (4, 5, 6, 10) and traj.phases[-1] == "final"
    assert traj.x_reference is None and traj.reference_x_hat is None and traj.reference_probabilities is None
    assert np.array_equal(traj.difference, np.abs(traj.x_counterfactual - traj.x_input))
    with pytest.raises(ValueError, match="no unguided clean estimates"):
        traj.running_difference(4, "matched")
    with pytest.raises(ValueError, match="no recorded clean estimate"):
        traj.index(7)


def test_a_scan_without_positive_slices_has_no_guided_update(run):
    flow, detector, _, _ = run
    traj = record_trajectory(flow, detector, healthy(), CONFIG, keep="guided")
    assert traj.positives == () and traj.steps == (10,) and len(traj.loss_curve()[0]) == 0  # nothing to decode
    viewer = TrajectoryViewer(traj, interactive=False)
    assert viewer.step == 10 and [t.get_text() for t in viewer.axes["loss"].texts] == ["no guided update"]


# --- pure drawing ---------------------------------------------------------------------------------------------------


def test_window_presets_in_hu():
    assert window_limits("lung") == (-1350.0, 150.0) and WINDOWS["lung"] == (1500.0, -600.0)
    assert window_limits("mediastinum") == (-125.0, 225.0) and window_limits((400, 40)) == (-160.0, 240.0)
    assert np.allclose(unit_to_hu(np.array([0.0, 0.25, 1.0])), [-1000.0, -500.0, 1000.0])
    with pytest.raises(ValueError, match="unknown window"):
        window_limits("bone")


def test_slice_view_draws_hu_in_the_window_with_one_image_per_overlay(trajectory, overlays):
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    image = draw_slice(ax, trajectory.x_input, 8, "mediastinum", overlays)
    assert np.array_equal(_array(ax), unit_to_hu(trajectory.x_input[8])) and image.get_clim() == (-125.0, 225.0)
    drawn = overlay_images(ax)
    assert list(drawn) == ["ground truth", "tfg", "cam"]
    for name, im in drawn.items():
        assert np.array_equal(np.asarray(im.get_array())[..., 3] > 0, overlays[name][8])
    colours = {tuple(np.asarray(im.get_array())[overlays[n][8]][0][:3].round(3)) for n, im in drawn.items()}
    assert len(colours) == 3  # each overlay its own colour
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ground truth", "TFG (ours)", "CAM"]
    with pytest.raises(ValueError, match="overlay 'bad'"):
        draw_slice(ax, trajectory.x_input, 8, overlays={"bad": np.zeros((2, 2, 2), bool)})


# --- the widget -----------------------------------------------------------------------------------------------------


def test_widgets_drive_the_drawn_slice_step_window_and_overlays(trajectory, overlays):
    viewer = TrajectoryViewer(trajectory, overlays, z=8, step=5)
    axes, t = viewer.axes, trajectory
    assert np.array_equal(_array(axes["x_hat"]), unit_to_hu(t.x_hat[t.index(5)][8]))
    png = viewer.image.value
    assert png[:8] == PNG

    viewer.slice_slider.value = 7
    assert np.array_equal(_array(axes["input"]), unit_to_hu(t.x_input[7]))
    assert np.array_equal(_array(axes["x_hat"]), unit_to_hu(t.x_hat[t.index(5)][7]))
    assert viewer.image.value != png  # the PNG shown in the widget was re-rendered

    viewer.step_slider.value = 6  # a guided step: marked on both curves
    k = t.index(6)
    assert np.array_equal(_array(axes["x_hat"]), unit_to_hu(t.x_hat[k][7]))
    assert np.allclose(_array(axes["difference"]), np.abs(t.x_hat[k][7] - t.x_reference[7]))
    assert axes["difference"].get_images()[0].get_clim() == (0.0, pytest.approx(t.difference_scale()))
    prob = axes["probability"]
    marker = _line(prob, "marker")
    assert list(marker.get_xdata()) == [6] and marker.get_ydata()[0] == t.probabilities[k, 7]
    assert list(_line(prob, "current").get_xdata()) == [6, 6]
    assert list(_line(prob, "probability").get_ydata()) == list(t.probabilities[:, 7])
    steps, losses = t.loss_curve()
    assert list(_line(axes["loss"], "marker").get_xdata()) == [6]
    assert _line(axes["loss"], "marker").get_ydata()[0] == losses[list(steps).index(6)]

    viewer.step_slider.value = 8  # a free step: no loss there, only the step line
    assert _line(axes["loss"], "marker") is None and list(_line(axes["loss"], "current").get_xdata()) == [8, 8]
    assert list(_line(prob, "marker").get_xdata()) == [8]

    viewer.window_dropdown.value = "mediastinum"
    for panel in ("input", "x_hat"):
        assert axes[panel].get_images()[0].get_clim() == window_limits("mediastinum")

    viewer.overlay_boxes["tfg"].value = False
    assert list(overlay_images(axes["input"])) == ["ground truth", "cam"]
    assert [x.get_text() for x in axes["input"].get_legend().get_texts()] == ["ground truth", "CAM"]
    viewer.overlay_boxes["tfg"].value = True
    assert list(overlay_images(axes["input"])) == ["ground truth", "tfg", "cam"]

    viewer.reference_dropdown.value = "matched"
    k = t.index(8)
    assert np.allclose(_array(axes["difference"]), np.abs(t.x_hat[k][7] - t.reference_x_hat[k][7]))
    assert [o for o in viewer.reference_dropdown.options] == ["reference", "matched", "input"]


def test_headless_viewer_saves_the_views_as_png_montages(trajectory, overlays, tmp_path):
    viewer = TrajectoryViewer(trajectory, overlays, z=8, window="mediastinum", interactive=False)
    assert viewer.widget is None
    assert viewer.axes["x_hat"].get_images()[0].get_clim() == window_limits("mediastinum")
    paths = viewer.save_montages(tmp_path / "out", prefix="scan", dpi=40)
    assert {p.name for p in paths.values()} == {"scan_slices.png", "scan_steps.png"}
    assert all(p.read_bytes()[:8] == PNG for p in paths.values())
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind

    assert montage_steps(trajectory) == list(trajectory.steps)  # seven steps fit in the default eight rows
    steps = montage_steps(trajectory, max_rows=5)
    assert steps == [4, 5, 6, 7, 10]  # every guided step and the final decode first, then free steps
    fig = draw_step_montage(trajectory, 8, steps)
    rows = np.array(fig.axes).reshape(len(steps), 4)
    for row, step in zip(rows, steps):
        assert np.array_equal(_array(row[0]), unit_to_hu(trajectory.x_hat[trajectory.index(step)][8]))
        assert list(_line(row[2], "marker").get_xdata()) == [step]


def test_module_imports_and_writes_montages_without_a_display_or_ipympl(tmp_path):
    """A fresh interpreter with no display and no backend chosen: matplotlib falls back to Agg, nothing of ipympl
    or ipywidgets is imported, and a montage is written."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND", "WAYLAND_DISPLAY")}
    code = (
        "import sys, numpy as np, matplotlib\n"
        "from tfg_core.viz import slices, trajectory, viewer\n"
        "assert not {'ipympl', 'ipywidgets'} & set(sys.modules), 'widget modules imported'\n"
        "fig = slices.draw_slice_grid(np.full((3, 8, 8), 0.2), [1], overlays={'tfg': np.ones((3, 8, 8), bool)})\n"
        f"slices.save_montage(fig, {str(tmp_path / 'm.png')!r}, dpi=20)\n"
        "print(matplotlib.get_backend())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120, capture_output=True,
                          text=True)
    assert done.stdout.strip().lower() == "agg" and (tmp_path / "m.png").read_bytes()[:8] == PNG


# notebook 03 itself, headless: tests/test_notebooks.py::test_guided_sampling_notebook_runs_headless_with_its_diagnosis
