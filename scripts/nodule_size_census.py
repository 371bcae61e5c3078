"""How many phantom nodule scans lie at the grid's resolution limit, for one or more phantom grids.

The phantom generator draws nodule diameters log-uniform in ``diameter_range_mm`` but never below 1.2 mean voxel
sizes, so its floor moves with the grid. This census says what that means in voxels: for each grid it generates
the cohorts of the given seeds (phantom generation only, no model; about 20 s a 100-case cohort at the default grid)
and prints, over the scans with nodules, the share whose nodules total at most k voxels (the demo's classifier
misses most scans at ≤ 6 voxels, see README Status) and whose largest nodule is at most a given diameter::

    python scripts/nodule_size_census.py --shapes 32x64x64 48x96x96 --seeds 2 3 4 5

The field of view is the default's (80 × 352 × 352 mm), so a finer shape means a finer spacing.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from tfg_core.data.phantom import PhantomConfig, iter_cases


def _shape(text: str) -> tuple[int, int, int]:
    try:
        z, y, x = (int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is ZxYxX, e.g. 32x64x64; got {text!r}") from None
    return z, y, x


def census_rows(config: PhantomConfig, progress: bool = False) -> pd.DataFrame:
    """One row per nodule scan of ``config``'s cohort: nodule count, voxels of all nodules, largest diameter.

    Args:
        config: the cohort (shape, seed, number of cases, …).
        progress: show a progress bar over the cases.
    """
    rows = [{"seed": config.seed, "index": case.index, "n_nodules": len(case.nodules),
             "nodule_voxels": int(case.nodule_mask.sum()),
             "largest_diameter_mm": max(n.diameter_mm for n in case.nodules)}
            for case in iter_cases(config, progress=progress) if case.nodules]
    return pd.DataFrame(rows, columns=["seed", "index", "n_nodules", "nodule_voxels", "largest_diameter_mm"])


def census_summary(rows: pd.DataFrame, voxel_limits: list[int], diameter_limits_mm: list[float]) -> dict:
    """Shares (%) of the nodule scans in ``rows`` at or under each voxel and diameter limit.

    Args:
        rows: :func:`census_rows` of one grid (any number of seeds).
        voxel_limits: limits on the voxels of all of a scan's nodules together.
        diameter_limits_mm: limits on the scan's largest nodule diameter.
    """
    summary: dict = {"nodule scans": len(rows)}
    if rows.empty:
        return summary
    for k in voxel_limits:
        summary[f"≤ {k} voxels (%)"] = round(100.0 * float(np.mean(rows.nodule_voxels <= k)), 1)
    for mm in diameter_limits_mm:
        summary[f"largest ≤ {mm:g} mm (%)"] = round(100.0 * float(np.mean(rows.largest_diameter_mm <= mm)), 1)
    summary["median voxels"] = float(rows.nodule_voxels.median())
    summary["smallest largest-diameter (mm)"] = round(float(rows.largest_diameter_mm.min()), 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=_shape, default=[(32, 64, 64), (48, 96, 96)],
                        help="phantom grids ZxYxX over the default field of view (default: 32x64x64 48x96x96)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[2, 3, 4, 5], help="cohort seeds (default: 2 3 4 5)")
    parser.add_argument("--cases", type=int, default=PhantomConfig().n_cases, help="cases per cohort")
    parser.add_argument("--voxels", nargs="+", type=int, default=[2, 4, 6, 12],
                        help="voxel limits on a scan's nodules together (default: 2 4 6 12)")
    parser.add_argument("--diameters", nargs="+", type=float, default=[6.4, 9.5],
                        help="limits on a scan's largest diameter in mm (default: 6.4 9.5, i.e. 6 voxels at "
                             "48x96x96 and at 32x64x64)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)

    table = {}
    for shape in args.shapes:
        configs = [PhantomConfig(shape=shape, seed=seed, n_cases=args.cases) for seed in args.seeds]
        rows = pd.concat([census_rows(c, args.progress) for c in tqdm(configs, disable=not args.progress)],
                         ignore_index=True)
        spacing = " × ".join(f"{s:.2f}" for s in configs[0].voxel_spacing)
        table[f"{'x'.join(map(str, shape))} ({spacing} mm)"] = census_summary(rows, args.voxels, args.diameters)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"seeds {' '.join(map(str, args.seeds))}, {args.cases} cases each; share of the nodule scans")
        # object columns, so the counts print as integers beside the percentages
        print(pd.DataFrame({grid: pd.Series(summary, dtype=object) for grid, summary in table.items()}).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
