"""Aggregate tidy per-case rows into per-(backbone, method) statistics and the paper's Table 1.

Rows are those of :func:`tfg_core.evaluate.evaluate_fold` (any number of folds, backbones and methods of one
experiment). Everything a reader needs to judge the numbers is stated next to them: n, folds, empty predictions,
excluded cases and the paired test against the reference method.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import bootstrap, wilcoxon

from tfg_core.io import atomic_write_text, atomic_write_with

METHOD_ORDER = ("cam", "gradcam", "scorecam", "ig", "weakmedsam", "tfg", "no_prior", "unguided", "oracle")
METHOD_NAMES = {
    "cam": "CAM",
    "gradcam": "Grad-CAM",
    "scorecam": "Score-CAM",
    "ig": "Integrated Gradients",
    "weakmedsam": "WeakMedSAM",
    "tfg": "TFG (ours)",
    "no_prior": "no-prior ablation",
    "unguided": "unguided difference",
    "oracle": "oracle counterfactual (healthy twin)",
}
BACKBONE_NAMES = {"tinyvit": "TinyViT", "resnet50": "ResNet-50", "tiny": "tiny (CPU demo)"}
DEFAULT_BACKBONES = ("tinyvit", "resnet50")
# with n < 6 pairs the exact two-sided signed-rank p cannot go below 2 / 2**5 = 0.0625: no test worth printing
MIN_PAIRS = 6
DSC_DDOF = 1
MISSING = "–"
# the mean Dice's confidence interval: a percentile bootstrap over the scored scans, seeded so a table repeats
CI_LEVEL = 0.95
CI_RESAMPLES = 10_000
CI_SEED = 0

AGGREGATE_COLUMNS = ["experiment", "backbone", "method", "n", "n_folds", "n_cohorts", "dsc_mean", "dsc_std",
                     "dsc_ci_low", "dsc_ci_high", "msd_median_mm",
                     "msd_median_finite_mm", "n_empty_pred", "n_both_empty_excluded", "n_no_gt_excluded",
                     "reference_method", "n_pairs", "wilcoxon_p", "p_note", "peak_on_nodule_rate",
                     "peak_dist_median_mm"]


TIDY_COLUMNS = ("fold", "seriesuid", "method", "dsc", "gt_voxels")  # what makes a CSV a table of result rows
# what identifies one result row (those present): a row read twice (a fold CSV and a batch's rows.csv) counts once
ROW_KEY = ("experiment", "fold", "seriesuid", "backbone", "method", "params_hash", "threshold_mode", "parameter", "value")


def find_result_files(entries: Sequence[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """CSV files of tidy result rows: files as given, folders searched for ``*.csv`` that hold such rows.

    Args:
        entries: CSV files and/or folders.
        recursive: search folders' subfolders too (a ``tfg batch`` results folder has one per run).

    Raises:
        DataError: an entry that does not exist, or nothing found at all.
    """
    from tfg_core.errors import DataError

    files: list[Path] = []
    for entry in map(Path, entries):
        if entry.is_dir():
            for path in sorted(entry.rglob("*.csv") if recursive else entry.glob("*.csv")):
                try:
                    header = set(pd.read_csv(path, nrows=0).columns)
                except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
                    continue
                if set(TIDY_COLUMNS) <= header:
                    files.append(path)
        elif entry.is_file():
            files.append(entry)
        else:
            raise DataError(entry, "no such result file or folder")
    if not files:
        raise DataError(", ".join(map(str, entries)), "no CSV of result rows there (columns " + ", ".join(TIDY_COLUMNS) + ")")
    return files


def read_result_rows(entries: Sequence[str | os.PathLike], recursive: bool = False) -> pd.DataFrame:
    """All tidy result rows from files and folders (:func:`find_result_files`), each row once.

    Args:
        entries: CSV files and/or folders.
        recursive: search folders' subfolders too.
    """
    from tfg_core.errors import DataError

    frames = []
    for path in find_result_files(entries, recursive):
        frame = pd.read_csv(path)
        missing = [c for c in TIDY_COLUMNS if c not in frame]
        if missing:
            raise DataError(path, f"not a table of result rows: missing columns {missing}")
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    return rows.drop_duplicates(subset=[c for c in ROW_KEY if c in rows], keep="last").reset_index(drop=True)


# what identifies one scored case of one method, whatever parameters produced it (for superseding reruns)
CASE_KEY = ("experiment", "backbone", "method", "fold", "seriesuid", "threshold_mode", "parameter", "value")


def supersede(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep, for every scored case of a method, only the row read last; return (kept, superseded).

    For pooling a rerun of some methods (e.g. with a new default) with an earlier run of the others: list the
    earlier files first. Without it, two rows of one case (different ``params_hash``) make :func:`aggregate` refuse.

    Args:
        rows: rows in reading order (:func:`read_result_rows`).
    """
    dup = rows.duplicated(subset=[c for c in CASE_KEY if c in rows], keep="last")
    return rows[~dup].reset_index(drop=True), rows[dup].reset_index(drop=True)


def _ordered(present: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """``preferred`` entries that are present, then the other present ones in order of first appearance."""
    present = list(dict.fromkeys(present))
    return [p for p in preferred if p in present] + [p for p in present if p not in preferred]


def _select_experiment(rows: pd.DataFrame, experiment: str | None) -> pd.DataFrame:
    if "experiment" not in rows.columns:
        if experiment is not None:
            raise ValueError(f"experiment={experiment!r} requested but the rows have no 'experiment' column")
        return rows
    found = list(dict.fromkeys(rows["experiment"]))
    if experiment is None:
        if len(found) > 1:
            raise ValueError(f"rows mix experiments {found}; pass experiment=... to choose one")
        return rows
    if experiment not in found:
        raise ValueError(f"experiment {experiment!r} not in the rows (found {found})")
    return rows[rows["experiment"] == experiment]


def mean_ci(values: Sequence[float] | np.ndarray, level: float = CI_LEVEL, resamples: int = CI_RESAMPLES,
            seed: int = CI_SEED) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean (``scipy.stats.bootstrap``), reproducible by its seed.

    The scans are resampled as independent cases; scans of one fold share a predictor and a threshold, which this
    ignores, so with few folds the interval is, if anything, too narrow.

    Args:
        values: one number per scored case (e.g. each scan's Dice).
        level: confidence level.
        resamples: bootstrap resamples.
        seed: random seed of the resampling.

    Returns:
        ``(low, high)``, the same for any order of ``values``; ``(nan, nan)`` with fewer than two values or a
        non-finite one; ``(v, v)`` when all values equal ``v``.
    """
    x = np.sort(np.asarray(values, dtype=float).ravel())  # sorted: the same cases in any row order, the same interval
    if x.size < 2 or not np.all(np.isfinite(x)):
        return math.nan, math.nan
    if np.all(x == x[0]):  # no spread to resample (scipy would warn and return NaN)
        return float(x[0]), float(x[0])
    result = bootstrap((x,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                       rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _paired_wilcoxon(ref: pd.Series, other: pd.Series) -> tuple[int, float, str]:
    """Two-sided signed-rank test of ``ref`` vs ``other`` DSC, both indexed by (fold, seriesuid)."""
    pairs = pd.concat([ref.rename("ref"), other.rename("other")], axis=1, join="inner").dropna()
    n = len(pairs)
    if n < MIN_PAIRS:
        return n, math.nan, f"fewer than {MIN_PAIRS} pairs"
    if np.all(pairs["ref"].to_numpy() == pairs["other"].to_numpy()):
        return n, math.nan, "all differences zero"
    return n, float(wilcoxon(pairs["ref"], pairs["other"]).pvalue), ""


def cohort_of(seriesuid: str) -> str:
    """Which cohort a scan belongs to: ``"phantom seed <k>"`` for a phantom UID, ``""`` for any other (one dataset).

    Folds are numbered 0–9 in every cohort, so rows pooled from several phantom cohorts (``tfg report --relabel``)
    count a fold once per cohort.

    Args:
        seriesuid: the scan's series UID.
    """
    from tfg_core.data.phantom import parse_series_uid

    try:
        return f"phantom seed {parse_series_uid(seriesuid)[0]}"
    except ValueError:
        return ""


def aggregate(rows: pd.DataFrame, reference_method: str = "tfg", experiment: str | None = None) -> pd.DataFrame:
    """One row per (backbone, method): Dice, MSD, counts and a paired test against ``reference_method``.

    Scored cases are those with a ground-truth nodule (``gt_voxels > 0``), pooled over folds (``n_folds`` counts
    a fold once per cohort, ``n_cohorts`` the cohorts: :func:`cohort_of`). Cases without one
    are excluded from Dice/MSD and counted: ``n_no_gt_excluded`` (all of them) and ``n_both_empty_excluded``
    (those where prediction and ground truth are both empty, whose Dice/MSD are undefined).

    - ``dsc_std`` is the sample standard deviation (``ddof=1``, NaN for n = 1), as usual for "mean ± SD".
    - ``dsc_ci_low`` / ``dsc_ci_high``: 95 % confidence interval of the mean Dice (:func:`mean_ci`, a seeded
      percentile bootstrap over the scored scans).
    - ``msd_median_mm`` is the median over all scored cases with an empty prediction counted as MSD = inf, so it
      is inf once half or more of the cases are empty (an honest "typically no surface at all");
      ``msd_median_finite_mm`` is the median over cases with a finite MSD only, ``n_empty_pred`` says how many
      were left out of it.
    - ``wilcoxon_p``: paired two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon`` defaults: zero
      differences dropped, exact p for small n without ties) of the reference method's DSC against this
      method's, on the scored cases both share by (fold, seriesuid) within the same backbone; ``n_pairs`` of them.
      It is NaN, with the reason in ``p_note``, for the reference itself, with fewer than ``MIN_PAIRS`` (6) pairs
      or when all differences are zero.

    Args:
        rows: tidy per-case rows (columns of :func:`tfg_core.evaluate.evaluate_fold`).
        reference_method: the method the others are tested against.
        experiment: which experiment to aggregate; required when ``rows`` hold several (never mixed silently).

    Raises:
        ValueError: several experiments and none chosen, or a (fold, seriesuid) repeated within a
            (backbone, method), which would corrupt the pairing.
    """
    rows = _select_experiment(rows, experiment)
    dup = rows.duplicated(["backbone", "method", "fold", "seriesuid"])
    if dup.any():
        first = rows[dup].iloc[0]
        raise ValueError(f"{int(dup.sum())} repeated (backbone, method, fold, seriesuid) rows, e.g. "
                         f"{(first.backbone, first.method, first.fold, first.seriesuid)}")
    exp_name = rows["experiment"].iloc[0] if "experiment" in rows.columns and len(rows) else experiment
    scored = rows[rows["gt_voxels"] > 0]
    dsc_by_case = {key: g.set_index(["fold", "seriesuid"])["dsc"] for key, g in scored.groupby(["backbone", "method"])}

    out = []
    for backbone in _ordered(rows["backbone"], DEFAULT_BACKBONES):
        of_backbone = rows[rows["backbone"] == backbone]
        for method in _ordered(of_backbone["method"], METHOD_ORDER):
            group = of_backbone[of_backbone["method"] == method]
            g = group[group["gt_voxels"] > 0]
            msd = g["msd_mm"].to_numpy(dtype=float)
            finite = msd[np.isfinite(msd)]
            if method == reference_method:
                n_pairs, p, note = 0, math.nan, "reference"
            elif (backbone, reference_method) not in dsc_by_case:
                n_pairs, p, note = 0, math.nan, f"no scored {reference_method} cases"
            elif (backbone, method) not in dsc_by_case:
                n_pairs, p, note = 0, math.nan, "no scored cases"
            else:
                n_pairs, p, note = _paired_wilcoxon(dsc_by_case[backbone, reference_method],
                                                    dsc_by_case[backbone, method])
            ci_low, ci_high = mean_ci(g["dsc"].to_numpy())
            cohorts = g["seriesuid"].map(cohort_of)
            out.append({
                "experiment": exp_name, "backbone": backbone, "method": method,
                "n": len(g), "n_folds": len(set(zip(cohorts, g["fold"]))), "n_cohorts": cohorts.nunique(),
                "dsc_mean": g["dsc"].mean() if len(g) else math.nan,
                "dsc_std": g["dsc"].std(ddof=DSC_DDOF) if len(g) else math.nan,
                "dsc_ci_low": ci_low, "dsc_ci_high": ci_high,
                # np.median keeps inf: it is the true median when the middle cases have no surface
                "msd_median_mm": float(np.median(msd)) if len(msd) else math.nan,
                "msd_median_finite_mm": float(np.median(finite)) if len(finite) else math.nan,
                "n_empty_pred": int(g["empty_pred"].sum()),
                "n_both_empty_excluded": int(group["both_empty"].sum()),
                "n_no_gt_excluded": int((group["gt_voxels"] == 0).sum()),
                "reference_method": reference_method, "n_pairs": n_pairs, "wilcoxon_p": p, "p_note": note,
                # rows of tfg_core.evaluate carry where each map's maximum lies (before thresholding)
                "peak_on_nodule_rate": g["peak_on_nodule"].mean() if "peak_on_nodule" in g and len(g) else math.nan,
                "peak_dist_median_mm": g["peak_dist_mm"].median() if "peak_dist_mm" in g and len(g) else math.nan,
            })
    return pd.DataFrame(out, columns=AGGREGATE_COLUMNS)


def _layout(agg: pd.DataFrame, backbones: Sequence[str], methods: Sequence[str] | None) -> tuple[list, list]:
    if agg.duplicated(["backbone", "method"]).any():
        raise ValueError("agg has repeated (backbone, method) rows; aggregate one experiment at a time")
    # requested backbones without any rows are left out (no all-dash columns); unrequested present ones are kept
    present_backbones = list(dict.fromkeys(agg["backbone"]))
    backbone_list = [b for b in backbones if b in present_backbones] + \
                    [b for b in present_backbones if b not in backbones]
    method_list = list(methods) if methods is not None else _ordered(agg["method"], METHOD_ORDER)
    return backbone_list, method_list


def _label(names: dict, key: str) -> str:
    return names.get(key, key)


def _fmt_msd(value: float) -> str:
    if math.isnan(value):
        return MISSING
    return "∞" if math.isinf(value) else f"{value:.2f}"


def _fmt_dsc(mean: float, std: float) -> str:
    if math.isnan(mean):
        return MISSING
    return f"{mean:.3f} ± {std:.3f}" if not math.isnan(std) else f"{mean:.3f}"


def table1(agg: pd.DataFrame, backbones: Sequence[str] = DEFAULT_BACKBONES,
           methods: Sequence[str] | None = None) -> pd.DataFrame:
    """The paper's Table 1 as formatted strings: one row per method, columns grouped by backbone.

    Columns are a (backbone, metric) MultiIndex with metrics "DSC (mean ± std)", "MSD mm (median)" and "n";
    "–" where a method was not run for a backbone. Methods follow :data:`METHOD_ORDER`, then any others.

    Args:
        agg: output of :func:`aggregate`.
        backbones: backbones in column order; present backbones not listed are appended, listed ones with no
            rows are left out.
        methods: method keys in row order; None = all present.
    """
    backbone_list, method_list = _layout(agg, backbones, methods)
    by_key = agg.set_index(["backbone", "method"])
    cells = {}
    for b in backbone_list:
        label = _label(BACKBONE_NAMES, b)
        dsc, msd, n = [], [], []
        for m in method_list:
            if (b, m) in by_key.index:
                r = by_key.loc[(b, m)]
                dsc.append(_fmt_dsc(r.dsc_mean, r.dsc_std))
                msd.append(_fmt_msd(r.msd_median_mm))
                n.append(str(int(r.n)))
            else:
                dsc.append(MISSING)
                msd.append(MISSING)
                n.append(MISSING)
        cells[(label, "DSC (mean ± std)")] = dsc
        cells[(label, "MSD mm (median)")] = msd
        cells[(label, "n")] = n
    index = pd.Index([_label(METHOD_NAMES, m) for m in method_list], name="Method")
    return pd.DataFrame(cells, index=index, columns=pd.MultiIndex.from_tuples(list(cells)) if cells else None)


def _fmt_p(r) -> str:
    if math.isnan(r.wilcoxon_p):
        return f"n/a ({r.p_note}, {int(r.n_pairs)} pairs)"
    p = "p < 0.001" if r.wilcoxon_p < 0.001 else f"p = {r.wilcoxon_p:.3f}"
    return f"{p} ({int(r.n_pairs)} pairs)"


def _per_backbone(g: pd.DataFrame, label: str, fmt) -> str:
    """``fmt(row)`` once for a backbone when all its methods agree, else per method."""
    texts = {m: fmt(r) for m, r in g.iterrows()}
    if len(set(texts.values())) == 1:
        return f"{label}: {next(iter(texts.values()))}"
    return f"{label}: " + ", ".join(f"{_label(METHOD_NAMES, m)} {t}" for m, t in texts.items())


def _notes(agg: pd.DataFrame, backbone_list: list, method_list: list) -> list[str]:
    sub = agg[agg["backbone"].isin(backbone_list) & agg["method"].isin(method_list)]
    ref = sub["reference_method"].iloc[0] if len(sub) else "tfg"
    counts, empties, excluded, tests, peaks, intervals = [], [], [], [], [], []
    for b in backbone_list:
        g = sub[sub["backbone"] == b].set_index("method")
        g = g.loc[[m for m in method_list if m in g.index]]
        label = _label(BACKBONE_NAMES, b)
        counts.append(_per_backbone(g, label, lambda r: f"n = {int(r.n)} over {int(r.n_folds)} "
                                                        f"fold{'s' if r.n_folds != 1 else ''}"
                                                        + (f" of {int(r.n_cohorts)} cohorts" if r.n_cohorts > 1 else "")))
        excluded.append(_per_backbone(g, label, lambda r: f"{int(r.n_no_gt_excluded)} "
                                                          f"({int(r.n_both_empty_excluded)} left empty, "
                                                          f"{int(r.n_no_gt_excluded - r.n_both_empty_excluded)} "
                                                          "with a mask)"))
        empties += [f"{label} {_label(METHOD_NAMES, m)} {int(r.n_empty_pred)} "
                    f"(finite-only MSD median {_fmt_msd(r.msd_median_finite_mm)} mm)"
                    for m, r in g.iterrows() if r.n_empty_pred > 0]
        tests += [f"{label} {_label(METHOD_NAMES, m)}: {_fmt_p(r)}" for m, r in g.iterrows() if m != ref]
        intervals += [f"{label} {_label(METHOD_NAMES, m)} [{r.dsc_ci_low:.3f}, {r.dsc_ci_high:.3f}]"
                      for m, r in g.iterrows() if np.isfinite(r.dsc_ci_low)]
        peaks += [f"{label} {_label(METHOD_NAMES, m)} {r.peak_on_nodule_rate:.0%} (median distance "
                  f"{r.peak_dist_median_mm:.1f} mm)" for m, r in g.iterrows()
                  if "peak_on_nodule_rate" in r and np.isfinite(r.peak_on_nodule_rate)]
    return [
        "n: scans with a ground-truth nodule scored, pooled over folds. " + "; ".join(counts) + ".",
        (f"DSC: mean ± sample std (ddof={DSC_DDOF}). MSD: median over all scored scans; an empty prediction "
         "has Dice 0 and MSD = ∞ and counts in the median (∞ when half or more are empty)."),
        (f"{CI_LEVEL:.0%} confidence interval of the mean DSC (percentile bootstrap over the scored scans, "
         f"{CI_RESAMPLES:,} resamples, seed {CI_SEED}; scans of one fold share a predictor, which it ignores): "
         + ("; ".join(intervals) if intervals else "none (fewer than 2 scans)") + "."),
        "Empty predictions: " + ("; ".join(empties) if empties else "none") + ".",
        "Excluded, no ground-truth nodule: " + "; ".join(excluded) + ".",
        f"Paired two-sided Wilcoxon signed-rank test on DSC vs {_label(METHOD_NAMES, ref)}, same (fold, scan) "
        f"within a backbone (not computed with fewer than {MIN_PAIRS} pairs or when all differences are zero): "
        + ("; ".join(tests) if tests else "none") + ".",
        f"Bold: best mean DSC per backbone. {MISSING}: method not run for that backbone.",
    ] + (["Map maximum on the nodule (inside it or one voxel away, before any threshold), share of scored scans "
          "and median distance from the maximum to the nodule: "
          + "; ".join(peaks) + "."] if peaks else [])


def table1_markdown(agg: pd.DataFrame, backbones: Sequence[str] = DEFAULT_BACKBONES,
                    methods: Sequence[str] | None = None, title: str | None = None) -> str:
    """Table 1 as GitHub markdown with the best mean DSC per backbone in bold and notes (n, folds, empties, p).

    Args:
        agg: output of :func:`aggregate`.
        backbones: see :func:`table1`.
        methods: see :func:`table1`.
        title: optional heading.
    """
    table = table1(agg, backbones, methods)
    backbone_list, method_list = _layout(agg, backbones, methods)
    for b in backbone_list:
        scores = agg[(agg["backbone"] == b) & agg["method"].isin(method_list)].set_index("method")["dsc_mean"]
        if scores.notna().any():
            col = (_label(BACKBONE_NAMES, b), "DSC (mean ± std)")
            for m in scores.index[scores == scores.max()]:  # ties are all bold
                row = _label(METHOD_NAMES, m)
                table.loc[row, col] = f"**{table.loc[row, col]}**"
    header = ["Method"] + [f"{b} {metric}" for b, metric in table.columns]
    lines = [f"# {title}", ""] if title else []
    exp = agg["experiment"].dropna().unique() if "experiment" in agg.columns else []
    if len(exp):
        lines += [f"Experiment: `{', '.join(map(str, exp))}`.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join([name, *map(str, values)]) + " |" for name, values in zip(table.index, table.to_numpy())]
    lines += [""] + [f"- {note}" for note in _notes(agg, backbone_list, method_list)]
    return "\n".join(lines) + "\n"


def write_report(rows: pd.DataFrame, out_dir: str | os.PathLike, title: str = "Table 1: nodule segmentation",
                 reference_method: str = "tfg", experiment: str | None = None,
                 backbones: Sequence[str] = DEFAULT_BACKBONES) -> dict[str, Path]:
    """Write ``table1.md``, ``table1.csv`` and ``aggregate.csv`` (all columns, p-values included) atomically.

    Everything is computed before the first write, and each file is replaced whole, so a failure leaves the
    previous files as they were.

    Args:
        rows: tidy per-case rows.
        out_dir: destination folder (created if needed).
        title: markdown heading.
        reference_method: see :func:`aggregate`.
        experiment: see :func:`aggregate`.
        backbones: see :func:`table1`.

    Returns:
        ``{"table1_md": ..., "table1_csv": ..., "aggregate_csv": ...}`` paths.
    """
    out_dir = Path(out_dir)
    agg = aggregate(rows, reference_method=reference_method, experiment=experiment)
    table = table1(agg, backbones)
    markdown = table1_markdown(agg, backbones, title=title)
    # one header row in the CSV: "<backbone> <metric>"
    flat = table.set_axis([f"{b} {metric}" for b, metric in table.columns], axis=1).reset_index()
    paths = {"table1_md": out_dir / "table1.md", "table1_csv": out_dir / "table1.csv",
             "aggregate_csv": out_dir / "aggregate.csv"}
    atomic_write_with(paths["aggregate_csv"], lambda p: agg.to_csv(p, index=False))
    atomic_write_with(paths["table1_csv"], lambda p: flat.to_csv(p, index=False))
    atomic_write_text(paths["table1_md"], markdown)
    return paths
