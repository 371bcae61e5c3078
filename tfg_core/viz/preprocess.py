"""What preprocessing does to one scan, in one figure: scan grid → model grid → the 2.5D stacks the classifier sees."""

from __future__ import annotations

import numpy as np

from tfg_core.data.preprocess import hu_to_unit, mask_to_model_grid
from tfg_core.viz.comparison import nodule_slice
from tfg_core.viz.slices import draw_slice


def preprocessing_figure(case, sliced, n_slices: int = 9):
    """Top: the scan on its own grid (lung window, ground truth), on the model grid with the lung mask, and the
    HU histogram inside the lung. Bottom: the ``n_slices`` slices of the 2.5D stack centred on the nodule, each
    titled with its weak label.

    Args:
        case: a :class:`tfg_core.data.cases.Case`.
        sliced: its :class:`tfg_core.training.slice_data.SliceCase` (model grid, weak labels).
        n_slices: slices per stack.
    """
    import matplotlib.pyplot as plt

    from tfg_core.data.preprocess import to_model_grid

    grid = to_model_grid(case.volume, shape=sliced.volume.shape)
    gt_grid = mask_to_model_grid(case.nodule_mask, case.volume, grid) > 0
    lung_grid = mask_to_model_grid(case.lung_mask, case.volume, grid) > 0
    scan_unit = np.asarray(hu_to_unit(case.volume.array), dtype=np.float32)
    z_scan, z_grid = nodule_slice(case.nodule_mask), nodule_slice(gt_grid)

    fig = plt.figure(figsize=(max(9.0, 1.1 * n_slices), 5.6))
    top = fig.add_gridspec(1, 3, top=0.9, bottom=0.38, wspace=0.25).subplots()
    draw_slice(top[0], scan_unit, z_scan, "lung", {"ground truth": case.nodule_mask},
               title=f"scan grid {case.volume.shape}, {' x '.join(f'{s:g}' for s in case.volume.spacing)} mm")
    draw_slice(top[1], sliced.volume, z_grid, "lung", {"lung mask": lung_grid, "ground truth": gt_grid},
               title=f"model grid {tuple(sliced.volume.shape)} (LPS, [0, 1])")
    hu = case.volume.array[case.lung_mask]
    top[2].hist(np.clip(hu, -1100, 500), bins=80, color="0.3")
    top[2].set_xlabel("HU inside the lung mask", fontsize=8)
    top[2].set_yticks([])
    top[2].tick_params(labelsize=7)
    bottom = fig.add_gridspec(1, n_slices, top=0.28, bottom=0.02, wspace=0.05).subplots()
    half = n_slices // 2
    for i, ax in enumerate(np.atleast_1d(bottom)):
        z = int(np.clip(z_grid - half + i, 0, sliced.volume.shape[0] - 1))
        draw_slice(ax, sliced.volume, z, "lung", title=f"z={z} {'+' if sliced.labels[z] else '−'}", legend=False)
        if i == half:
            for side in ax.spines.values():
                side.set_edgecolor("red"), side.set_linewidth(2)
    fig.suptitle(f"{case.uid}: {len(case.annotations)} nodule(s); bottom: the 2.5D stack of slice {z_grid} "
                 f"(+ = weak label 'nodule in this slice')", fontsize=9)
    return fig
