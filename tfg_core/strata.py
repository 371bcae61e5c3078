"""Dice by nodule size: every method's scored scans split by the diameter of the scan's largest annotated nodule.

A mean Dice over a cohort depends on how many of its nodules are small: a 7 mm nodule is about one voxel across
on the phantoms' 5.5 mm grid (a 2.5D classifier barely sees it, a reconstruction barely keeps it), a 25 mm one is
several. Reporting each size range apart lets two cohorts, or a method's gains, be compared where they differ.
The diameters come from the annotation table (LUNA16's ``diameter_mm``; the phantoms write the same column), so
the split works on rows written before it existed. The per-range statistics are :func:`tfg_core.report.aggregate`'s
(n, mean, bootstrap interval, empties, paired Wilcoxon against the reference method within the range).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from tfg_core.report import (BACKBONE_NAMES, DEFAULT_BACKBONES, METHOD_NAMES, METHOD_ORDER, MISSING, _ordered,
                             _select_experiment, aggregate)

# LIDC/LUNA16 analyses commonly split at 10 and 20 mm; the phantoms' nodules are 6.6–30 mm
SIZE_EDGES_MM: tuple[float, ...] = (0.0, 10.0, 20.0, math.inf)


def size_labels(edges: Sequence[float] = SIZE_EDGES_MM) -> list[str]:
    """Names of the ranges ``[edges[i], edges[i+1])``: ``"< 10 mm"``, ``"10–20 mm"``, ``"≥ 20 mm"``.

    Args:
        edges: increasing range limits in mm; the first may be 0 and the last inf.
    """
    edges = [float(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0:
        raise ValueError(f"size edges must be ≥ 0 and strictly increasing, got {edges}")

    def mm(v: float) -> str:
        return f"{v:g}"

    labels = []
    for lo, hi in zip(edges, edges[1:]):
        if lo == 0 and math.isfinite(hi):
            labels.append(f"< {mm(hi)} mm")
        elif math.isinf(hi):
            labels.append(f"≥ {mm(lo)} mm")
        else:
            labels.append(f"{mm(lo)}–{mm(hi)} mm")
    return labels


def largest_diameters(annotations: pd.DataFrame) -> pd.Series:
    """The diameter (mm) of each annotated scan's largest nodule, indexed by ``seriesuid``.

    Args:
        annotations: LUNA16-style table with ``seriesuid`` and ``diameter_mm``.
    """
    missing = {"seriesuid", "diameter_mm"} - set(annotations.columns)
    if missing:
        raise ValueError(f"the annotation table lacks column(s) {sorted(missing)}")
    diameters = pd.to_numeric(annotations["diameter_mm"], errors="coerce")
    bad = annotations["seriesuid"][~np.isfinite(diameters) | (diameters <= 0)]
    if len(bad):
        raise ValueError(f"{len(bad)} annotation(s) without a positive diameter_mm, e.g. scan {bad.iloc[0]}")
    return diameters.groupby(annotations["seriesuid"]).max().rename("diameter_mm")


def assign_sizes(rows: pd.DataFrame, annotations: pd.DataFrame,
                 edges: Sequence[float] = SIZE_EDGES_MM) -> pd.DataFrame:
    """The scored rows (``gt_voxels > 0``) with ``diameter_mm`` (largest nodule of the scan) and ``size`` (range).

    Args:
        rows: tidy per-case rows (:func:`tfg_core.evaluate.evaluate_fold`).
        annotations: the annotation table(s) of every cohort the rows come from (concatenated).
        edges: range limits in mm (:data:`SIZE_EDGES_MM`).

    Raises:
        ValueError: a scored scan with no annotation (wrong table), naming the first such scan.
    """
    labels = size_labels(edges)
    scored = rows[rows["gt_voxels"] > 0].copy()
    diameters = largest_diameters(annotations)
    scored["diameter_mm"] = scored["seriesuid"].map(diameters)
    unknown = scored.loc[scored["diameter_mm"].isna(), "seriesuid"].unique()
    if len(unknown):
        raise ValueError(f"{len(unknown)} scored scan(s) have no row in the annotation table, e.g. {unknown[0]} "
                         "(pass the annotations.csv of every cohort the results come from)")
    cut = pd.cut(scored["diameter_mm"], bins=[float(e) for e in edges], labels=labels, right=False)
    if cut.isna().any():
        raise ValueError(f"nodule diameters outside the size ranges {labels}: "
                         f"{sorted(scored.loc[cut.isna(), 'diameter_mm'].unique())[:3]} mm")
    scored["size"] = cut.astype(str)
    return scored


def aggregate_by_size(rows: pd.DataFrame, annotations: pd.DataFrame, edges: Sequence[float] = SIZE_EDGES_MM,
                      reference_method: str = "tfg", experiment: str | None = None) -> pd.DataFrame:
    """:func:`tfg_core.report.aggregate` within each size range, the range in a first column ``size``.

    Ranges without a scored scan are left out. Healthy scans are not in any range (they have no nodule).
    ``range_scans`` counts the range's scans over every method; a method's own ``n`` is smaller when it was run on
    only some of them (several runs pooled, e.g. a baseline run on some cohorts only).

    Args:
        rows: tidy per-case rows.
        annotations: annotation table(s) the scans' nodule diameters come from.
        edges: range limits in mm.
        reference_method: the method the others are tested against, within each range.
        experiment: which experiment, when the rows hold several.
    """
    sized = assign_sizes(_select_experiment(rows, experiment), annotations, edges)
    parts = []
    for label in size_labels(edges):
        part = sized[sized["size"] == label]
        if len(part):
            agg = aggregate(part.drop(columns=["size", "diameter_mm"]), reference_method=reference_method)
            scans = part.drop_duplicates(["fold", "seriesuid"])  # over every method: pooled runs may differ in n
            agg.insert(0, "size", label)
            agg.insert(1, "range_scans", len(scans))
            agg.insert(2, "diameter_median_mm", float(scans["diameter_mm"].median()))
            parts.append(agg)
    if not parts:
        raise ValueError("no scored scan (with a nodule) in the rows")
    return pd.concat(parts, ignore_index=True)


def _cell(r) -> str:
    if r is None or not np.isfinite(r.dsc_mean):
        return MISSING
    interval = f" [{r.dsc_ci_low:.2f}–{r.dsc_ci_high:.2f}]" if np.isfinite(r.dsc_ci_low) else ""
    # a method scored on fewer of the range's scans than the header counts (runs pooled with other methods) says so
    subset = f" (n = {int(r.n)})" if int(r.n) != int(r.range_scans) else ""
    return f"{r.dsc_mean:.3f}{interval}, {int(r.n_empty_pred)} empty{subset}"


def by_size_markdown(strata: pd.DataFrame, backbones: Sequence[str] = DEFAULT_BACKBONES,
                     title: str | None = None) -> str:
    """Mean Dice per method (rows) and size range (columns) as GitHub markdown, one table per backbone.

    Args:
        strata: output of :func:`aggregate_by_size`.
        backbones: backbone order; present ones not listed are appended.
        title: optional heading.
    """
    lines = [f"# {title}", ""] if title else []
    sizes = list(dict.fromkeys(strata["size"]))
    present = list(dict.fromkeys(strata["backbone"]))
    for backbone in [b for b in backbones if b in present] + [b for b in present if b not in backbones]:
        of_backbone = strata[strata["backbone"] == backbone]
        cells = of_backbone.set_index(["method", "size"])
        counts = of_backbone.drop_duplicates("size").set_index("size")
        header = ["Method"] + [f"{s} (n = {int(counts.loc[s, 'range_scans'])}, "
                               f"median {counts.loc[s, 'diameter_median_mm']:.1f} mm)"
                               for s in sizes if s in counts.index]
        lines += [f"{BACKBONE_NAMES.get(backbone, backbone)}:", "",
                  "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
        for method in _ordered(of_backbone["method"], METHOD_ORDER):
            row = [_cell(cells.loc[(method, s)]) if (method, s) in cells.index else MISSING
                   for s in sizes if s in counts.index]
            lines.append("| " + " | ".join([METHOD_NAMES.get(method, method), *row]) + " |")
        lines.append("")
    lines += ["- Each scan with a nodule falls in the range of its largest annotated nodule (`diameter_mm`); "
              "healthy scans are in none. Cell: mean Dice [95 % bootstrap interval of the mean], empty predictions; "
              "`by_size.csv` has every column of the aggregate (MSD, Wilcoxon p against the reference within the "
              "range) per range."]
    return "\n".join(lines) + "\n"


def write_by_size(rows: pd.DataFrame, annotations: pd.DataFrame, out_dir, title: str | None = None,
                  edges: Sequence[float] = SIZE_EDGES_MM, reference_method: str = "tfg",
                  experiment: str | None = None, backbones: Sequence[str] = DEFAULT_BACKBONES) -> dict:
    """Write ``by_size.md`` and ``by_size.csv`` (every aggregate column per range) atomically.

    Args:
        rows: tidy per-case rows.
        annotations: annotation table(s) of the rows' cohorts.
        out_dir: destination folder (created if needed).
        title: markdown heading.
        edges: range limits in mm.
        reference_method: see :func:`aggregate_by_size`.
        experiment: see :func:`aggregate_by_size`.
        backbones: see :func:`by_size_markdown`.

    Returns:
        ``{"by_size_md": ..., "by_size_csv": ...}`` paths.
    """
    from pathlib import Path

    from tfg_core.io import atomic_write_text, atomic_write_with

    strata = aggregate_by_size(rows, annotations, edges, reference_method, experiment)
    markdown = by_size_markdown(strata, backbones, title)
    out_dir = Path(out_dir)
    paths = {"by_size_md": out_dir / "by_size.md", "by_size_csv": out_dir / "by_size.csv"}
    atomic_write_with(paths["by_size_csv"], lambda p: strata.to_csv(p, index=False))
    atomic_write_text(paths["by_size_md"], markdown)
    return paths
