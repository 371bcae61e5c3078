"""Qualitative comparison figure in the layout of the paper's Fig. 3/4: one row per scan, the slice through the
largest nodule, then input, ground truth and every method's mask (filled) with the ground truth outlined.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from tfg_core.report import METHOD_NAMES


def nodule_slice(gt: np.ndarray) -> int:
    """Axial index with the most ground-truth voxels (the middle slice when there are none).

    Args:
        gt: (z, y, x) boolean mask.
    """
    counts = np.asarray(gt).reshape(gt.shape[0], -1).sum(axis=1)
    return int(np.argmax(counts)) if counts.any() else gt.shape[0] // 2


MASK_RGBA = (1.0, 0.75, 0.0, 0.6)
GT_RGBA = (0.1, 0.9, 0.2, 0.55)


def draw_method_comparison(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, Mapping[str, np.ndarray]]],
    methods: Sequence[str],
    window: tuple[float, float] = (0.0, 0.7),
):
    """The comparison as a matplotlib Figure (rows × (2 + methods) axes); nothing is written.

    Args:
        rows: ``(label, image, gt, masks)`` per scan: image (z, y, x) in [0, 1], gt and ``masks[method]`` boolean
            (z, y, x) on the same grid.
        methods: columns after input and ground truth, in order (missing masks are left blank).
        window: display range of the [0, 1] image (0.0–0.7 ≈ −1000…400 HU, a lung window).
    """
    import matplotlib.pyplot as plt

    columns = ["input", "ground truth", *methods]
    n = max(1, len(rows))
    fig, axes = plt.subplots(n, len(columns), figsize=(1.7 * len(columns), 1.8 * n), squeeze=False)
    for r, (label, image, gt, masks) in enumerate(rows):
        z = nodule_slice(gt)
        for c, name in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(image[z], cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
            overlay = gt[z] if name == "ground truth" else masks.get(name, None)
            if overlay is not None and name != "ground truth":
                overlay = overlay[z]
            if overlay is not None and name != "input":
                colour = GT_RGBA if name == "ground truth" else MASK_RGBA
                rgba = np.zeros((*overlay.shape, 4))
                rgba[np.asarray(overlay, bool)] = colour
                ax.imshow(rgba, interpolation="nearest")
            if name not in ("input", "ground truth") and gt[z].any():
                ax.contour(gt[z], levels=[0.5], colors="r", linewidths=0.6)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(METHOD_NAMES.get(name, name), fontsize=7)
        axes[r, 0].set_ylabel(f"{label} z={z}", fontsize=6)
    fig.tight_layout()
    return fig


def method_comparison_figure(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, Mapping[str, np.ndarray]]],
    methods: Sequence[str],
    path: str | os.PathLike,
    window: tuple[float, float] = (0.0, 0.7),
    dpi: int = 110,
) -> None:
    """Write :func:`draw_method_comparison` as a PNG (headless: the Agg canvas, no display needed).

    Args:
        rows: see :func:`draw_method_comparison`.
        methods: see :func:`draw_method_comparison`.
        path: PNG file to write (the caller makes it atomic).
        window: display range of the [0, 1] image.
        dpi: resolution.
    """
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = draw_method_comparison(rows, methods, window)
    FigureCanvasAgg(fig)  # render off-screen whatever backend the session uses (a notebook's widget backend too)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)


def draw_score_maps(image: np.ndarray, gt: np.ndarray, maps: Mapping[str, np.ndarray], methods: Sequence[str],
                    window: tuple[float, float] = (0.0, 0.7)):
    """One scan's raw maps before thresholding: input, then each method's map on the nodule slice (own colour
    scale per map, ground truth outlined in red). Returns the Figure.

    Args:
        image: (z, y, x) in [0, 1].
        gt: (z, y, x) boolean ground truth.
        maps: ``{method: (z, y, x) map}``.
        methods: the maps to show, in order (missing ones are skipped).
        window: display range of the image.
    """
    import matplotlib.pyplot as plt

    shown = [m for m in methods if m in maps]
    z = nodule_slice(gt)
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(2.0 * (1 + len(shown)), 2.2), squeeze=False)
    axes[0, 0].imshow(image[z], cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
    axes[0, 0].set_title(f"input z={z}", fontsize=7)
    for ax, name in zip(axes[0, 1:], shown):
        ax.imshow(maps[name][z], cmap="magma", interpolation="nearest")
        ax.set_title(METHOD_NAMES.get(name, name), fontsize=7)
    for ax in axes[0]:
        if gt[z].any():
            ax.contour(gt[z], levels=[0.5], colors="r", linewidths=0.6)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    return fig
