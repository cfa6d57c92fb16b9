"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real-data folder: $BULWARK_DATA_ROOT, else <repo>/../shared/data; skip if neither."""
    repo = Path(__file__).resolve().parent.parent
    for cand in (os.environ.get("BULWARK_DATA_ROOT"), repo.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    pytest.skip("no data root found: set BULWARK_DATA_ROOT or provide <repo>/../shared/data")
