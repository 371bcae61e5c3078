"""The ablation figure: Dice against each swept guidance parameter, one panel per parameter.

The default setting sits at its own value in every panel (a ring marks it); the no-prior ablation (velocity 0)
is a dotted line: how much of the result the generative prior is responsible for.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tfg_core.ablation import sweep_values
from tfg_core.guidance import GuidanceConfig

MODE_STYLE = {"calibrated": ("tab:blue", "o"), "otsu": ("tab:orange", "s")}


def _dice_stats(rows: pd.DataFrame) -> tuple[float, float, int]:
    dsc = rows.loc[rows.gt_voxels > 0, "dsc"].to_numpy(float)
    if not len(dsc):
        return np.nan, np.nan, 0
    sem = dsc.std(ddof=1) / np.sqrt(len(dsc)) if len(dsc) > 1 else 0.0
    return float(dsc.mean()), float(sem), len(dsc)


def draw_ablation(fig, rows: pd.DataFrame, base: GuidanceConfig, parameters=None):
    """Draw one panel per swept parameter on ``fig`` (cleared first) and return it.

    Args:
        fig: a matplotlib figure.
        rows: ablation rows (:func:`tfg_core.ablation.run_ablation`, any number of folds).
        base: the config the sweep is centred on (places the default's value).
        parameters: panels to draw (default: every swept parameter in the rows, in their order).
    """
    fig.clear()
    swept = [p for p in dict.fromkeys(rows.parameter) if p not in ("default", "no_prior")]
    parameters = list(parameters) if parameters is not None else swept
    modes = list(dict.fromkeys(rows.threshold_mode))
    axes = fig.subplots(1, max(1, len(parameters)), squeeze=False, sharey=True)[0]
    default_rows = rows[rows.parameter == "default"]
    no_prior_rows = rows[rows.parameter == "no_prior"]
    for ax, parameter in zip(axes, parameters):
        own = rows[rows.parameter == parameter]
        default_value = str(getattr(base, parameter))
        values = sweep_values(pd.concat([own, default_rows.assign(parameter=parameter, value=default_value)]), parameter)
        for mode in modes:
            color, marker = MODE_STYLE.get(mode, ("tab:gray", "^"))
            stats = []
            for value in values:
                source = default_rows if value == default_value else own[own.value == value]
                stats.append(_dice_stats(source[source.threshold_mode == mode]))
            means, sems = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
            x = np.arange(len(values))
            ax.errorbar(x, means, yerr=sems, color=color, marker=marker, capsize=3, label=mode)
            if default_value in values:
                at = values.index(default_value)
                ax.plot(at, means[at], marker="o", ms=13, mfc="none", mec="black", zorder=5)
            no_prior = _dice_stats(no_prior_rows[no_prior_rows.threshold_mode == mode])[0]
            if np.isfinite(no_prior):
                ax.axhline(no_prior, color=color, ls=":", lw=1.2)
        ax.set_xticks(np.arange(len(values)), values)
        ax.set_xlabel(parameter.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice (mean ± s.e.m. over scans with a nodule)")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        from matplotlib.lines import Line2D

        handles += [Line2D([], [], color="gray", ls=":"), Line2D([], [], marker="o", ms=10, mfc="none", mec="black", ls="")]
        labels += ["no prior (velocity 0)", "default setting"]
        fig.legend(handles, labels, loc="upper center", ncol=len(handles), frameon=False)
    n = _dice_stats(default_rows[default_rows.threshold_mode == modes[0]])[2] if modes else 0
    fig.suptitle(f"Guidance ablations ({n} scans with a nodule per point)", y=0.02, va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.9))
    return fig


def ablation_figure(rows: pd.DataFrame, base: GuidanceConfig, parameters=None, panel_width: float = 2.8):
    """A new figure with :func:`draw_ablation`.

    Args:
        rows: ablation rows.
        base: the config the sweep is centred on.
        parameters: panels to draw.
        panel_width: inches per panel.
    """
    import matplotlib.pyplot as plt

    swept = [p for p in dict.fromkeys(rows.parameter) if p not in ("default", "no_prior")]
    count = len(list(parameters) if parameters is not None else swept)
    fig = plt.figure(figsize=(panel_width * max(1, count) + 0.8, 3.4))
    return draw_ablation(fig, rows, base, parameters)
