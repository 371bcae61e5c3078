"""Shared test fixtures: where the read-only real data lives, and small synthetic volumes."""

from __future__ import annotations

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
