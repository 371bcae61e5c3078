"""What notebooks and batch runs share: open a cohort by name, load a fold's predictor, name result files.

Kept apart from ``demo.py`` (the embedded walk-through) so that a notebook run on LUNA16 and one on the phantom
cohort go through the same three calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

DATASETS = ("phantom", "luna16")


@dataclass
class Cohort:
    """A LUNA16-shaped tree with its manifest and annotation table.

    Args:
        dataset: ``"phantom"`` or ``"luna16"``.
        root: the tree (``subset0..9/*.mhd``, ``annotations.csv``).
        manifest: one row per scan (``tfg_core.data.luna16.build_manifest``).
        annotations: the nodule table.
    """

    dataset: str
    root: Path
    manifest: pd.DataFrame
    annotations: pd.DataFrame

    def split(self, fold: int):
        """LUNA16 fold ``fold``: test = subset k, validation = subset k+1, the rest train."""
        from tfg_core.data.folds import fold_split

        return fold_split(self.manifest, fold)


def open_cohort(dataset: str, root: str | os.PathLike, progress: bool = False, phantom_seed: int = 0) -> Cohort:
    """Open (and for ``"phantom"`` first write, if absent) a cohort; its manifest is cached as ``root/manifest.csv``.

    Args:
        dataset: ``"phantom"`` (the embedded default cohort, written on first use) or ``"luna16"`` (an existing
            LUNA16 download).
        root: where the tree is (or goes).
        progress: progress bars while writing/scanning.
        phantom_seed: the phantom cohort's seed: 0 the evaluation cohort, ≥ 2 a fresh one (``tfg demo
            --cohort-seed``); a folder written with another seed is refused, naming its ``cohort.json``.
    """
    from tfg_core.data.luna16 import read_annotations
    from tfg_core.errors import DataError
    from tfg_core.training.run import ensure_manifest

    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    root = Path(root)
    if dataset == "phantom":
        from tfg_core.data.phantom import PhantomConfig, write_cohort

        write_cohort(root, PhantomConfig(seed=phantom_seed), progress=progress)
    elif not root.is_dir():
        raise DataError(root, "no LUNA16 tree here (expected subset0..9/*.mhd and annotations.csv)")
    manifest, _ = ensure_manifest(root, progress=progress)
    return Cohort(dataset, root, manifest, read_annotations(root / "annotations.csv"))


def load_fold_predictor(fold: int, backbone: str = "tiny", checkpoint: str | os.PathLike | None = None,
                        device: str = "cpu"):
    """The fine-tuned predictor of a fold, in eval mode.

    Args:
        fold: held-out fold.
        backbone: ``"tiny"`` | ``"tinyvit"`` | ``"resnet50"``.
        checkpoint: a checkpoint written by ``tfg finetune``; None takes the shipped tiny predictor of the fold
            (phantom cohort only).
        device: where to put it.
    """
    if checkpoint is None:
        if backbone != "tiny":
            raise ValueError(f"no shipped {backbone} predictor: fine-tune one with `tfg finetune --backbone "
                             f"{backbone} --fold {fold}` and pass its checkpoint")
        from tfg_core.demo import load_shipped_predictor

        return load_shipped_predictor(fold).to(device).eval()
    from tfg_core.training.checkpoint import load_predictor

    return load_predictor(checkpoint)[0].to(device).eval()


def resolve_path(path: str | os.PathLike) -> Path:
    """An absolute path for a notebook parameter: relative paths are taken from the repository root.

    Jupyter starts a notebook's kernel in the notebook's folder, papermill in the caller's: anchoring relative
    parameters at the repository (the folder holding ``notebooks/`` next to an editable ``tfg_core``) makes
    ``outputs/...`` mean the same place in both; outside a repository checkout the current folder is used.

    Args:
        path: a parameter value.
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    repo = Path(__file__).resolve().parents[1]
    base = repo if (repo / "notebooks").is_dir() else Path.cwd()
    return (base / path).resolve()


FLOWS = ("demo", "maisi-v2")


def default_guidance(flow: str = "demo"):
    """The guidance parameters ``tfg demo`` and ``tfg segment`` use with ``flow``, for notebooks to start from.

    The demo flow starts guiding at :data:`tfg_core.demo.DEMO_START_INDEX` (measured on fresh phantom cohorts);
    MAISI-v2 keeps :class:`~tfg_core.guidance.GuidanceConfig`'s defaults, the paper's.

    Args:
        flow: ``"demo"`` or ``"maisi-v2"``.
    """
    from tfg_core.guidance import GuidanceConfig

    if flow == "demo":
        from tfg_core.demo import DEMO_START_INDEX

        return GuidanceConfig(start_index=DEMO_START_INDEX)
    if flow == "maisi-v2":
        return GuidanceConfig()
    raise ValueError(f"flow must be one of {FLOWS}, got {flow!r}")


def load_flow(name: str = "demo", autoencoder: str | os.PathLike | None = None, unet: str | os.PathLike | None = None,
              device: str = "cpu"):
    """The rectified-flow prior a notebook guides: the shipped CPU demo flow or MAISI-v2 with its real weights.

    Args:
        name: ``"demo"`` (phantom grid, shipped) or ``"maisi-v2"`` (weights from the paths or the
            ``$TFG_MAISI_*`` variables, see ``data_manifest/weights.json``).
        autoencoder: MAISI ``autoencoder_v1.pt`` (empty/None: the environment variable).
        unet: MAISI ``diff_unet_3d_rflow-ct.pt`` (empty/None: the environment variable).
        device: where to put the networks.
    """
    if name == "demo":
        from tfg_core.flow.demo import load_demo_flow

        return load_demo_flow(device=device)
    if name == "maisi-v2":
        from tfg_core.flow.maisi import load_maisi_v2

        return load_maisi_v2(autoencoder or None, unet or None, device=device)
    raise ValueError(f"flow must be one of {FLOWS}, got {name!r}")
