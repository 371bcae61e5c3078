"""Shared test fixtures: where the read-only real data lives, the default phantom cohort, small synthetic volumes."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data expected at {SHARED_DATA} (the repository's ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    if not SHARED_REFERENCE.is_dir():
        pytest.fail(f"reference files expected at {SHARED_REFERENCE} (the repository's ../shared/reference)")
    return SHARED_REFERENCE


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def default_phantom(tmp_path_factory) -> Path:
    """The demo's default phantom cohort (100 scans, seed 0), written once per test session (≈ 20 s a write)."""
    from tfg_core.data.phantom import PhantomConfig, write_cohort

    return write_cohort(tmp_path_factory.mktemp("default_cohort") / "phantom", PhantomConfig())


@pytest.fixture(scope="session")
def phantom_copy(default_phantom) -> Callable[[Path], Path]:
    """``phantom_copy(dst)`` puts a private copy of the default cohort at ``dst`` (a test may write into its own).

    Tests of code that writes the cohort on first use start from the copy, as a second run would; the first-use
    write itself is tested by ``test_cli`` (the README's Run command) and ``test_phantom``."""

    def copy(dst: Path) -> Path:
        shutil.copytree(default_phantom, dst)
        return Path(dst)

    return copy
