"""Shared test fixtures: the optional real HAM10000 copy beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

# ``../shared`` beside the repository root: read-only, and absent on some machines.
HAM_DIR = Path(__file__).parents[2] / "shared" / "data" / "ham10000"
HAM_METADATA = HAM_DIR / "HAM10000_metadata.csv"

requires_ham = pytest.mark.skipif(
    not HAM_METADATA.is_file(), reason=f"real HAM10000 not found at {HAM_DIR}"
)
"""Mark for tests that read the real data; they skip cleanly where it is absent."""


@pytest.fixture
def ham_dir() -> Path:
    """The real HAM10000 folder; skips the test when it (or its metadata) is absent."""
    if not HAM_METADATA.is_file():
        pytest.skip(f"real HAM10000 not found at {HAM_DIR}")
    return HAM_DIR
