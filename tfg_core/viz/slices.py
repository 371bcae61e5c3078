"""Slice views of a (z, y, x) volume in MAISI's [0, 1] convention: CT windows in HU and coloured mask overlays.

Pure drawing: every function fills a given matplotlib ``Axes`` and returns what it drew, so tests can read the
image arrays, colour limits and overlay artists back without a display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tfg_core.report import METHOD_NAMES

#: window presets as (width, level) in HU
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 50.0),
    "full": (2000.0, 0.0),  # the whole [-1000, 1000] HU range MAISI's intensities cover
}

#: overlay colours (RGB) for the usual names; other names take the next colour of ``_CYCLE``
OVERLAY_COLOURS: dict[str, tuple[float, float, float]] = {
    "ground truth": (0.1, 0.9, 0.2),
    "tfg": (1.0, 0.55, 0.0),
    "no_prior": (0.85, 0.2, 0.85),
    "cam": (0.2, 0.6, 1.0),
    "gradcam": (0.0, 0.85, 0.85),
    "scorecam": (0.95, 0.9, 0.1),
    "ig": (1.0, 0.3, 0.35),
    "weakmedsam": (0.6, 0.45, 1.0),
    "unguided": (0.7, 0.7, 0.7),
}
_CYCLE = ((0.55, 0.35, 0.2), (0.9, 0.5, 0.7), (0.5, 0.8, 0.4), (0.3, 0.3, 0.9))
OVERLAY_ALPHA = 0.45


def unit_to_hu(x: np.ndarray) -> np.ndarray:
    """MAISI's [0, 1] intensities back to HU (``x·2000 − 1000``), as float32.

    Args:
        x: array in [0, 1].
    """
    return np.asarray(x, dtype=np.float32) * 2000.0 - 1000.0


def window_limits(window: str | tuple[float, float]) -> tuple[float, float]:
    """``(vmin, vmax)`` in HU of a preset name or a ``(width, level)`` pair.

    Args:
        window: a key of :data:`WINDOWS` or ``(width, level)`` in HU.
    """
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"unknown window {window!r}; presets: {sorted(WINDOWS)}")
        window = WINDOWS[window]
    width, level = (float(v) for v in window)
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return level - width / 2, level + width / 2


def overlay_colour(name: str, index: int = 0) -> tuple[float, float, float]:
    """RGB colour of an overlay: fixed for known names, else the ``index``-th of a small cycle.

    Args:
        name: overlay name (``"ground truth"``, a method name, anything else).
        index: position among the overlays, for unknown names.
    """
    return OVERLAY_COLOURS.get(name, _CYCLE[index % len(_CYCLE)])


def overlay_label(name: str) -> str:
    """Legend text of an overlay (the report's method names where known).

    Args:
        name: overlay name.
    """
    return METHOD_NAMES.get(name, name)


def mask_rgba(mask: np.ndarray, colour: Sequence[float], alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """An ``(y, x, 4)`` RGBA image: ``colour`` at ``alpha`` where ``mask`` is True, transparent elsewhere.

    Args:
        mask: boolean ``(y, x)`` slice.
        colour: RGB in [0, 1].
        alpha: opacity of the mask.
    """
    mask = np.asarray(mask, bool)
    rgba = np.zeros((*mask.shape, 4), np.float32)
    rgba[mask] = (*colour[:3], alpha)
    return rgba


def check_slice(volume: np.ndarray, z: int) -> int:
    """``z`` as a valid axial index of ``volume`` ``(z, y, x)`` (raises otherwise).

    Args:
        volume: the volume.
        z: axial index.
    """
    if np.ndim(volume) != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {np.shape(volume)}")
    if not 0 <= int(z) < volume.shape[0]:
        raise IndexError(f"slice {z} outside [0, {volume.shape[0] - 1}]")
    return int(z)


def draw_slice(
    ax,
    volume: np.ndarray,
    z: int,
    window: str | tuple[float, float] = "lung",
    overlays: Mapping[str, np.ndarray] | None = None,
    title: str | None = None,
    legend: bool = True,
):
    """Clear ``ax`` and draw axial slice ``z`` in HU with a CT window and coloured mask overlays.

    The CT slice is the axes' first image (data in HU, ``clim`` = the window); each overlay is one more RGBA image
    labelled with its name, in the order given, and listed in a legend.

    Args:
        ax: matplotlib Axes to draw into.
        volume: ``(z, y, x)`` in [0, 1].
        z: axial index.
        window: preset name of :data:`WINDOWS` or ``(width, level)`` in HU.
        overlays: ``{name: boolean (z, y, x) mask}`` on the volume's grid; empty slices still get a legend entry.
        title: axes title (default ``"z=<z>"``).
        legend: draw a legend of the overlays.

    Returns:
        The CT slice's ``AxesImage``.
    """
    from matplotlib.patches import Patch

    z = check_slice(volume, z)
    vmin, vmax = window_limits(window)
    ax.clear()
    image = ax.imshow(unit_to_hu(volume[z]), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    handles = []
    for i, (name, mask) in enumerate((overlays or {}).items()):
        if np.shape(mask) != np.shape(volume):
            raise ValueError(f"overlay {name!r} has shape {np.shape(mask)}, the volume {np.shape(volume)}")
        colour = overlay_colour(name, i)
        ax.imshow(mask_rgba(mask[z], colour), interpolation="nearest", label=name)
        handles.append(Patch(facecolor=(*colour, OVERLAY_ALPHA), edgecolor=colour, label=overlay_label(name)))
    if legend and handles:
        ax.legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.6, handlelength=1.0)
    ax.set_title(f"z={z}" if title is None else title, fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])
    return image


def overlay_images(ax) -> dict[str, object]:
    """The overlay images :func:`draw_slice` drew on ``ax``, by name (for tests and interactive tweaks).

    Args:
        ax: an Axes filled by :func:`draw_slice`.
    """
    return {im.get_label(): im for im in ax.get_images()[1:]}


def draw_slice_grid(
    volume: np.ndarray,
    slices: Sequence[int],
    windows: Sequence[str] = ("lung", "mediastinum"),
    overlays: Mapping[str, np.ndarray] | None = None,
    images: Mapping[str, np.ndarray] | None = None,
    maps: Mapping[str, np.ndarray] | None = None,
):
    """A montage Figure: one row per slice; a column per window (with overlays), then images, then maps.

    Args:
        volume: ``(z, y, x)`` in [0, 1].
        slices: axial indices, one row each.
        windows: window presets, one column each.
        overlays: masks drawn on the window columns (see :func:`draw_slice`).
        images: ``{title: (z, y, x) volume in [0, 1]}`` (e.g. the counterfactual), drawn in the first window.
        maps: ``{title: (z, y, x) map}`` (e.g. a difference map), ``magma`` from 0 to the map's maximum.
    """
    from matplotlib.figure import Figure

    images, maps = dict(images or {}), dict(maps or {})
    n_rows, n_cols = max(1, len(slices)), len(windows) + len(images) + len(maps)
    fig = Figure(figsize=(2.1 * n_cols, 2.2 * n_rows))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, z in enumerate(slices):
        row = iter(axes[r])
        for window in windows:
            draw_slice(next(row), volume, z, window, overlays, title=f"z={z} {window}", legend=r == 0)
        for name, image in images.items():
            draw_slice(next(row), image, z, windows[0], title=f"{name} z={z}")
        for name, values in maps.items():
            # one scale per map over all slices: rows stay comparable
            draw_map(next(row), values, z, vmax=float(np.max(values)), title=f"{name} z={z}")
    # fixed margins: tight_layout would measure every artist of every panel
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / fig.get_figheight(), wspace=0.05,
                        hspace=0.25)
    return fig


def draw_map(ax, values: np.ndarray, z: int, vmax: float | None = None, title: str | None = None,
             cmap: str = "magma"):
    """Clear ``ax`` and draw slice ``z`` of a non-negative map (a difference, a saliency) from 0 to ``vmax``.

    Args:
        ax: matplotlib Axes.
        values: ``(z, y, x)`` map.
        z: axial index.
        vmax: top of the colour scale (default: the slice's maximum); fix it to compare slices or steps.
        title: axes title.
        cmap: colour map.

    Returns:
        The ``AxesImage``.
    """
    z = check_slice(values, z)
    ax.clear()
    data = np.asarray(values[z], dtype=np.float32)
    top = float(data.max()) if vmax is None else float(vmax)
    image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=max(top, 1e-6), interpolation="nearest")
    if title is not None:
        ax.set_title(title, fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])
    return image


def save_montage(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a Figure as a PNG atomically (off-screen Agg canvas, whatever the session's backend) and close it.

    Args:
        fig: the Figure (from the drawing functions here or ``matplotlib.figure.Figure``).
        path: the PNG to write.
        dpi: resolution.
    """
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from tfg_core.io import atomic_write_with

    FigureCanvasAgg(fig)  # an ipympl canvas cannot render to a file headless; Agg always can
    path = atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)  # no-op for figures pyplot does not track
    return path
