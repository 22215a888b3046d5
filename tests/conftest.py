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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP spin-waits make them very slow on a busy 2-core machine.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """In-process CLI runs set torch's thread count (``--threads``); parity tests must see the default again,
    because the fp32 reduction order, and so the last digits the fixtures are compared at, follows it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
