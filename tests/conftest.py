"""Shared test configuration: the official fixture directory (../shared beside the checkout)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("STAR_FIXTURES", REPO.parent / "shared" / "fixtures" / "star_tiny"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The star_tiny fixture directory; parity tests fail (never skip) when it is missing."""
    assert FIXTURES.is_dir(), f"fixture directory {FIXTURES} not found: put ../shared beside the checkout or set STAR_FIXTURES"
    return FIXTURES
