"""Finding, verifying and strictly loading checkpoints.

Every file is read with ``torch.load(weights_only=True)``; a file listed in
``data_manifest/weights.json`` must match its sha256; a state dict that does not fit the module fails
with the full key diff instead of PyTorch's truncated message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from tfg_core.errors import CheckpointError
from tfg_core.io import sha256_file

MANIFEST_PATH = Path(__file__).resolve().parents[1] / "data_manifest" / "weights.json"


def weights_manifest(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Entries of the weights manifest, keyed by name.

    Each entry has ``filename``, ``sha256`` (may be null when unknown), ``env`` (the environment variable
    that points at the file), ``source`` (where a user gets it) and ``licence``.

    Args:
        path: manifest file; defaults to ``data_manifest/weights.json`` of this repository.
    """
    path = Path(path) if path is not None else MANIFEST_PATH
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def resolve_weights(name: str, path: str | os.PathLike | None = None) -> Path:
    """Find the file for manifest entry ``name``: explicit path, else its environment variable.

    Args:
        name: manifest key, e.g. ``"maisi_autoencoder"``.
        path: a user-supplied path that wins over the environment.
    """
    entry = weights_manifest().get(name, {})
    env = entry.get("env")
    candidate = path if path is not None else (os.environ.get(env) if env else None)
    where = entry.get("source", "see data_manifest/weights.json")
    if candidate is None:
        hint = f" or set ${env}" if env else ""
        raise CheckpointError(f"no file given for weights {name!r}: pass its path{hint}. Get it from: {where}")
    candidate = Path(candidate).expanduser()
    if not candidate.is_file():
        raise CheckpointError(f"{candidate}: weights file for {name!r} does not exist. Get it from: {where}")
    return candidate


def verify_sha256(path: str | os.PathLike, expected: str | None) -> str:
    """Hash ``path`` and compare with ``expected`` (skipped when ``expected`` is None).

    Args:
        path: the file to check.
        expected: hex sha256 from the manifest, or None.
    """
    actual = sha256_file(path)
    if expected is not None and actual.lower() != expected.lower():
        raise CheckpointError(
            f"{path}: sha256 mismatch (expected {expected}, got {actual}); the file is corrupt, truncated "
            "or a different release"
        )
    return actual


def load_checkpoint(path: str | os.PathLike, name: str | None = None, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``, after a sha256 check when ``name`` has a manifest entry.

    Args:
        path: checkpoint file.
        name: manifest key whose sha256 must match; None skips the check.
        map_location: device to load tensors onto.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    if name is not None:
        verify_sha256(path, weights_manifest().get(name, {}).get("sha256"))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, non-tensor objects refused by weights_only
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({exc})") from exc


def state_dict_diff(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Keys missing from / unexpected in ``state_dict`` and keys whose shapes differ.

    Args:
        module: the model that should receive the weights.
        state_dict: the weights.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def load_state_dict_strict(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike = "state dict"
) -> torch.nn.Module:
    """Load ``state_dict`` into ``module`` strictly; on any difference raise with every key listed.

    Args:
        module: the model to fill.
        state_dict: the weights.
        source: file name (or description) for the error message.
    """
    diff = state_dict_diff(module, state_dict)
    if any(diff.values()):
        lines = [f"{source}: checkpoint does not fit {type(module).__name__}"]
        for kind, keys in diff.items():
            if keys:
                lines.append(f"  {kind} ({len(keys)}):")
                lines.extend(f"    {k}" for k in keys)
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(dict(state_dict), strict=True)
    return module
