"""``TrajectoryViewer``: sliders over slices and guidance steps, a CT window preset and overlay switches in front of
the pure drawing functions of :mod:`tfg_core.viz.trajectory` (ipywidgets; an ipympl canvas under
``%matplotlib widget``, a PNG image widget under any other backend; PNG montages when not interactive).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tfg_core.viz.slices import WINDOWS, check_slice
from tfg_core.viz.trajectory import REFERENCES, Trajectory, draw_viewer, save_montages, viewer_axes


def _widget_backend() -> bool:
    import matplotlib

    return matplotlib.get_backend().lower() in ("widget", "ipympl", "module://ipympl.backend_nbagg")


class TrajectoryViewer:
    """Sliders over slices and steps, a CT window preset and overlay switches, redrawn by :func:`draw_viewer`.

    Under ``%matplotlib widget`` the figure is an ipympl canvas (zoom, pan, HU under the cursor); under any other
    backend (inline, Agg, tests) it is rendered to a PNG shown in an ``ipywidgets.Image``. With
    ``interactive=False`` no widget is built: :meth:`save_montages` writes the same views as PNGs.

    Args:
        trajectory: the record (:func:`record_trajectory`).
        overlays: ``{name: boolean (z, y, x) mask}`` (ground truth, TFG mask, baseline masks), each a checkbox.
        z: initial slice (default :meth:`Trajectory.focus_slice`).
        step: initial step (default :meth:`Trajectory.default_step`).
        window: initial window preset (a key of :data:`tfg_core.viz.slices.WINDOWS`).
        reference: what the running difference is taken against (``"reference"``, ``"matched"``, ``"input"``).
        interactive: build the widgets (False: figure only, for headless runs).
        figsize: figure size in inches.
    """

    def __init__(self, trajectory: Trajectory, overlays: Mapping[str, np.ndarray] | None = None,
                 z: int | None = None, step: int | None = None, window: str = "lung",
                 reference: str = "reference", interactive: bool = True, figsize: tuple[float, float] = (10, 6.2)):
        self.trajectory = trajectory
        self.overlays = dict(overlays or {})
        self.interactive = interactive
        self._z = trajectory.focus_slice() if z is None else check_slice(trajectory.x_input, z)
        self._step = trajectory.default_step() if step is None else trajectory.steps[trajectory.index(step)]
        self._window, self._reference, self._shown = window, reference, set(self.overlays)
        self.figure = self._make_figure(figsize)
        self.axes = viewer_axes(self.figure)
        self.widget = self._build_widgets() if interactive else None
        self.redraw()

    # state: the controls when there are widgets, the constructor's values otherwise
    @property
    def z(self) -> int:
        return self.slice_slider.value if self.widget is not None else self._z

    @property
    def step(self) -> int:
        return self.step_slider.value if self.widget is not None else self._step

    @property
    def window(self) -> str:
        return self.window_dropdown.value if self.widget is not None else self._window

    @property
    def reference(self) -> str:
        return self.reference_dropdown.value if self.widget is not None else self._reference

    @property
    def shown_overlays(self) -> dict[str, np.ndarray]:
        """The overlays whose checkbox is ticked, in the given order."""
        on = {n for n, box in self.overlay_boxes.items() if box.value} if self.widget is not None else self._shown
        return {n: m for n, m in self.overlays.items() if n in on}

    def _make_figure(self, figsize):
        if self.interactive and _widget_backend():
            import matplotlib.pyplot as plt

            with plt.ioff():  # shown once, inside the widget box, not again as a cell output
                fig = plt.figure(figsize=figsize)
            fig.canvas.header_visible = False
            return fig
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)  # not registered with pyplot: never auto-displayed, never leaked
        FigureCanvasAgg(fig)
        return fig

    def _build_widgets(self):
        import ipywidgets as w

        t = self.trajectory
        self.slice_slider = w.IntSlider(value=self._z, min=0, max=t.x_input.shape[0] - 1, description="slice z")
        self.step_slider = w.SelectionSlider(options=[(f"{s} {p}", s) for s, p in zip(t.steps, t.phases)],
                                             value=self._step, description="step")
        self.window_dropdown = w.Dropdown(options=list(WINDOWS), value=self._window, description="window")
        refs = [r for r in REFERENCES if r != "matched" or t.reference_x_hat is not None]
        self.reference_dropdown = w.Dropdown(options=refs, value=self._reference, description="|x̂ − …|")
        self.overlay_boxes = {n: w.Checkbox(value=True, description=n, indent=False) for n in self.overlays}
        controls = [self.slice_slider, self.step_slider, self.window_dropdown, self.reference_dropdown,
                    *self.overlay_boxes.values()]
        for control in controls:
            control.observe(lambda _change: self.redraw(), names="value")
        if isinstance(self.figure.canvas, w.DOMWidget):
            self.image = None
            view = self.figure.canvas
        else:
            self.image = view = w.Image(format="png")
        return w.VBox([w.HBox(controls[:2]), w.HBox(controls[2:]), view])

    def redraw(self) -> None:
        """Draw the current state into the figure (and refresh the PNG image widget when there is one)."""
        draw_viewer(self.axes, self.trajectory, self.z, self.step, self.window, self.shown_overlays, self.reference)
        if self.widget is None:
            return
        if self.image is None:
            self.figure.canvas.draw_idle()
        else:
            import io

            buffer = io.BytesIO()
            self.figure.savefig(buffer, format="png", dpi=80)
            self.image.value = buffer.getvalue()

    def save_montages(self, out_dir: str | os.PathLike, prefix: str = "trajectory", dpi: int = 110) -> dict[str, Path]:
        """:func:`save_montages` at the viewer's slice, window, reference and ticked overlays.

        Args:
            out_dir: folder for the PNGs.
            prefix: file name prefix.
            dpi: resolution of the PNGs.
        """
        return save_montages(self.trajectory, out_dir, self.z, self.shown_overlays, window=self.window,
                             reference=self.reference, prefix=prefix, dpi=dpi)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget if self.widget is not None else self.figure)
