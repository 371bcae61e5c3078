"""Dice against nodule size: each scan's Dice at its largest nodule's diameter, and each method's mean per range.

Left: one point per scored scan and method (``tfg_core.strata.assign_sizes``), so a reader sees where a method
starts to lose nodules. Right: the mean per size range with its 95 % bootstrap interval
(``tfg_core.strata.aggregate_by_size``), methods side by side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from tfg_core.report import METHOD_NAMES, METHOD_ORDER, _ordered


def draw_dice_by_size(fig, sized: pd.DataFrame, strata: pd.DataFrame, methods: Sequence[str] | None = None,
                      edges: Sequence[float] | None = None):
    """Draw the two panels on ``fig`` (cleared first) and return it.

    Args:
        fig: a matplotlib figure.
        sized: scored rows with ``diameter_mm`` and ``size`` (:func:`tfg_core.strata.assign_sizes`), one backbone.
        strata: the same rows aggregated per range (:func:`tfg_core.strata.aggregate_by_size`).
        methods: methods to draw (default: every one present, in Table 1's order).
        edges: range limits to mark on the diameter axis (finite inner ones are drawn).
    """
    fig.clear()
    methods = list(methods) if methods is not None else _ordered(sized["method"], METHOD_ORDER)
    sizes = list(dict.fromkeys(strata["size"]))
    scatter, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        mine = sized[sized["method"] == method]
        # a small horizontal offset per method keeps equal-diameter points of several methods apart
        scatter.scatter(mine["diameter_mm"] * (1 + 0.01 * (i - len(methods) / 2)), mine["dsc"], s=12,
                        color=colours[method], alpha=0.7, label=METHOD_NAMES.get(method, method))
        agg = strata[strata["method"] == method].set_index("size").reindex(sizes)
        x = np.arange(len(sizes)) + (i - (len(methods) - 1) / 2) * width
        low = (agg["dsc_mean"] - agg["dsc_ci_low"]).clip(lower=0).fillna(0)
        high = (agg["dsc_ci_high"] - agg["dsc_mean"]).clip(lower=0).fillna(0)
        bars.bar(x, agg["dsc_mean"], width=width, color=colours[method], yerr=[low, high], capsize=2)
    for edge in edges or ():
        if np.isfinite(edge) and edge > 0:
            scatter.axvline(edge, color="0.6", lw=0.8, ls=":")
    scatter.set_xscale("log")
    # plain millimetre ticks: a log axis would otherwise label 20 mm as "2×10¹"
    low, high = sized["diameter_mm"].min() * 0.8, sized["diameter_mm"].max() * 1.25
    ticks = [t for t in (3, 5, 7, 10, 15, 20, 30, 50, 70) if low <= t <= high]
    scatter.set_xticks(ticks, [f"{t:g}" for t in ticks])
    scatter.set_xticks([], minor=True)
    scatter.set_xlabel("diameter of the scan's largest nodule (mm)")
    scatter.set_ylabel("Dice per scan")
    scatter.set_ylim(-0.03, 1.03)
    scatter.legend(fontsize=7, loc="lower right")
    counts = strata.drop_duplicates("size").set_index("size")["n"].reindex(sizes)
    bars.set_xticks(range(len(sizes)), [f"{s}\nn = {int(n)}" for s, n in counts.items()])
    bars.set_ylabel("mean Dice (95 % interval)")
    bars.set_ylim(0, 1)
    fig.tight_layout()
    return fig


def dice_by_size_figure(sized: pd.DataFrame, strata: pd.DataFrame, methods: Sequence[str] | None = None,
                        edges: Sequence[float] | None = None):
    """A new figure with :func:`draw_dice_by_size`.

    Args:
        sized: scored rows with their sizes.
        strata: their per-range aggregate.
        methods: methods to draw.
        edges: range limits to mark.
    """
    import matplotlib.pyplot as plt

    return draw_dice_by_size(plt.figure(figsize=(10, 3.6)), sized, strata, methods, edges)
