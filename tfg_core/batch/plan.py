"""Plan a batch: one run per (fold, parameter set), each a chain of notebooks with its own folders.

A run is named after what varies (``fold3_strength-2.0``), lives in ``runs/<experiment>/<run_id>/`` (executed
notebooks, ``status.json``) and writes its results to ``results/<experiment>/<run_id>/`` (tidy CSVs, figures,
``params.json``). What each notebook receives is decided here, once, so a dry run shows exactly what will run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Parameters the batch fills in when a notebook declares them and the user did not set them.
RUN_FOLDER_PARAMETERS = ("out_dir", "results_dir")
HEADLESS_DEFAULTS = {"progress": False, "interactive": False}
TEMPLATE_FIELDS = ("fold", "experiment", "run_id", "results_dir", "run_dir")
_MAX_RUN_ID = 80


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs, picklable so a process pool or a SLURM job can execute it.

    Args:
        experiment: experiment name (folder under ``runs/`` and ``results/``).
        run_id: folder name of this run, unique within the experiment.
        fold: held-out fold.
        grid_point: the values of the swept parameters for this run (empty without a grid).
        notebooks: absolute paths of the notebook chain, executed in order.
        parameters: per notebook, the parameters papermill injects.
        run_dir: executed notebooks and ``status.json``.
        results_dir: what the notebooks write (tidy CSVs, figures) and ``params.json``.
        retries: how many times a failed run is started again.
        threads: ``OMP_NUM_THREADS`` for the run's kernels (0: leave the environment alone).
        kernel_name: Jupyter kernel.
    """

    experiment: str
    run_id: str
    fold: int
    grid_point: dict[str, Any]
    notebooks: tuple[str, ...]
    parameters: tuple[dict[str, Any], ...]
    run_dir: str
    results_dir: str
    retries: int = 1
    threads: int = 0
    kernel_name: str = "python3"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params_hash(self) -> str:
        """Hash of the notebook chain's names and injected parameters: a finished run is reused only if equal."""
        payload = [[Path(nb).name, params] for nb, params in zip(self.notebooks, self.parameters)]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_folds(text: str | Sequence[int]) -> list[int]:
    """Folds from ``"0-9"``, ``"0,2,5"``, ``"0-3,7"`` or a list of ints.

    Args:
        text: the fold expression.
    """
    if not isinstance(text, str):
        folds = [int(f) for f in text]
    else:
        folds = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"folds: cannot read {part!r} (expected e.g. 0-9 or 0,2,5)")
            folds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    if not folds or any(not 0 <= f <= 9 for f in folds):
        raise ValueError(f"folds must be in 0-9, got {text!r}")
    return sorted(set(folds))


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, booleans, lists, null), otherwise the string itself.

    Args:
        text: the value as typed.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(items: Sequence[str], as_list: bool = False) -> dict[str, Any]:
    """``NAME=VALUE`` pairs into a dict; with ``as_list`` each value must be a JSON list (or comma-separated).

    Args:
        items: the pairs as typed on the command line.
        as_list: grid mode: the value lists the values to sweep.
    """
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        value = parse_value(raw)
        if as_list:
            if not isinstance(value, list):
                value = [parse_value(v) for v in raw.split(",")]
            if not value:
                raise ValueError(f"grid parameter {name} has no values")
        out[name] = value
    return out


def expand_grid(grid: Mapping[str, Sequence[Any]] | None = None,
                sets: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Parameter sets: the product of ``grid``'s value lists, times each of ``sets`` (or one empty set).

    Args:
        grid: name -> values to sweep (full product).
        sets: explicit parameter sets, e.g. one-at-a-time ablations read from a JSON file.
    """
    names = list(grid or {})
    product = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))] if names else [{}]
    explicit = [dict(s) for s in sets] if sets else [{}]
    points = [{**s, **p} for s in explicit for p in product]
    seen, unique = set(), []
    for point in points:
        key = json.dumps(point, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            unique.append(point)
    return unique


def run_id_for(fold: int, point: Mapping[str, Any]) -> str:
    """A readable folder name for a run: ``fold3`` or ``fold3_strength-2.0_loss-bce`` (hashed when too long).

    Args:
        fold: the held-out fold.
        point: the swept parameters' values.
    """
    def show(value: Any) -> str:
        text = "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return re.sub(r"[^A-Za-z0-9.+]+", "", text) or "none"

    name = "_".join([f"fold{fold}"] + [f"{k}-{show(v)}" for k, v in sorted(point.items())])
    if len(name) > _MAX_RUN_ID:
        digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:10]
        name = f"fold{fold}_{digest}"
    return name


def notebook_parameters(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The parameters a notebook declares in its ``parameters`` cell (papermill's view).

    Args:
        path: the notebook.
    """
    import papermill as pm

    path = Path(path)
    if not path.is_file():
        from tfg_core.errors import DataError

        raise DataError(path, "no such notebook")
    return pm.inspect_notebook(str(path))


def _fill(value: Any, fields: Mapping[str, Any]) -> Any:
    """Format ``{fold}``-style templates inside strings (and lists of strings)."""
    if isinstance(value, str) and "{" in value:
        try:
            return value.format(**fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"parameter template {value!r}: only {{{'}, {'.join(TEMPLATE_FIELDS)}}} can be used "
                             f"({exc})") from None
    if isinstance(value, list):
        return [_fill(v, fields) for v in value]
    return value


_TYPE_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
}


def check_parameter_types(notebook: str | os.PathLike, declared: Mapping[str, Mapping[str, Any]],
                          parameters: Mapping[str, Any]) -> None:
    """Refuse a value whose type differs from the notebook's typed declaration (``fold: int = 0``).

    A wrong type would otherwise fail inside the notebook, in every run, long after the batch started.

    Args:
        notebook: the notebook (for the message).
        declared: its parameters (:func:`notebook_parameters`).
        parameters: what would be injected.

    Raises:
        ValueError: naming the notebook, the parameter, the declared type and the value.
    """
    for name, value in parameters.items():
        expected = declared.get(name, {}).get("inferred_type_name", "None")
        check = _TYPE_CHECKS.get(str(expected))
        if check is not None and not check(value):
            raise ValueError(f"{Path(notebook).name}: parameter {name} is declared {expected}, got {value!r} "
                             f"({type(value).__name__}); on the command line numbers, true/false and [lists] are "
                             f"read as JSON, anything else as text")


def plan_runs(notebooks: Sequence[str | os.PathLike], folds: Sequence[int], experiment: str,
              fixed: Mapping[str, Any] | None = None, grid: Mapping[str, Sequence[Any]] | None = None,
              sets: Sequence[Mapping[str, Any]] | None = None, runs_root: str | os.PathLike = "runs",
              results_root: str | os.PathLike = "results", retries: int = 1, threads: int = 0,
              kernel_name: str = "python3") -> list[RunSpec]:
    """Every run of a batch, with the exact parameters each notebook of the chain will receive.

    Each notebook receives: ``fold``; ``out_dir``/``results_dir`` = the run's results folder; ``progress`` and
    ``interactive`` off (headless); then the user's fixed and swept parameters that it declares (these win).
    String values may use ``{fold}``, ``{experiment}``, ``{run_id}``, ``{results_dir}``, ``{run_dir}``, e.g.
    ``checkpoint={results_dir}/tiny_fold{fold}.pt`` hands a fine-tuned predictor from one notebook to the next.

    Args:
        notebooks: the chain, in order.
        folds: held-out folds.
        experiment: experiment name.
        fixed: parameters shared by every run.
        grid: parameters to sweep (full product).
        sets: explicit parameter sets (combined with ``grid``).
        runs_root: where ``<experiment>/<run_id>/`` with the executed notebooks goes.
        results_root: where ``<experiment>/<run_id>/`` with the results goes.
        retries: restarts of a failed run.
        threads: ``OMP_NUM_THREADS`` per run (0: inherit).
        kernel_name: Jupyter kernel.

    Raises:
        ValueError: a parameter no notebook of the chain declares (a typo would otherwise be silently ignored),
            or a swept parameter that is also fixed.
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+", experiment or ""):
        raise ValueError(f"experiment name must be letters, digits, '.', '_' or '-', got {experiment!r}")
    fixed, grid = dict(fixed or {}), dict(grid or {})
    both = sorted(set(fixed) & set(grid))
    if both:
        raise ValueError(f"parameters both fixed and swept: {both}")
    paths = [Path(nb).resolve() for nb in notebooks]
    if not paths:
        raise ValueError("no notebook to run")
    if len({p.name for p in paths}) != len(paths):
        raise ValueError("a chain runs each notebook once (executed notebooks are kept under their names)")
    declared = [notebook_parameters(p) for p in paths]
    points = expand_grid(grid, sets)
    swept = sorted(set(grid) | {k for s in (sets or []) for k in s})
    known = set().union(*map(set, declared))
    unknown = sorted((set(fixed) | set(swept)) - known)
    if unknown:
        listing = "; ".join(f"{p.name}: {', '.join(d)}" for p, d in zip(paths, declared))
        raise ValueError(f"no notebook of the chain declares {unknown} (declared: {listing})")

    specs = []
    for fold in parse_folds(folds):
        for point in points:
            run_id = run_id_for(fold, {k: point[k] for k in swept if k in point})
            run_dir = (Path(runs_root) / experiment / run_id).resolve()
            results_dir = (Path(results_root) / experiment / run_id).resolve()
            fields = {"fold": fold, "experiment": experiment, "run_id": run_id,
                      "results_dir": str(results_dir), "run_dir": str(run_dir)}
            chain = []
            for names in declared:
                params: dict[str, Any] = {}
                if "fold" in names:
                    params["fold"] = fold
                params.update({k: str(results_dir) for k in RUN_FOLDER_PARAMETERS if k in names})
                params.update({k: v for k, v in HEADLESS_DEFAULTS.items() if k in names})
                params.update({k: _fill(v, fields) for k, v in {**fixed, **point}.items() if k in names})
                check_parameter_types(paths[len(chain)], names, params)
                chain.append(params)
            specs.append(RunSpec(experiment, run_id, fold, dict(point), tuple(map(str, paths)), tuple(chain),
                                 str(run_dir), str(results_dir), retries, threads, kernel_name))
    ids = [s.run_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError("two runs share a folder name; give the parameter sets distinct values")
    return specs
