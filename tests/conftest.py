"""Shared fixtures. Prefect settings must be in the environment before Prefect is imported."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="autolabel-prefect-"))
from flows import environment  # noqa: E402

environment.configure(None)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def prefect_engine():
    """A real, temporary Prefect server for the whole session (~20 s once on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real defect data beside the checkout; in CI its absence is a failure, not a skip."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SHARED_DATA} is missing: CI must run with ../shared beside the checkout")
        pytest.skip(f"{SHARED_DATA} not found")
    return SHARED_DATA


# fast settings for flow tests: a real but tiny training run
FAST = [
    "embed.epochs=1",
    "embed.batch_size=32",
    "embed.max_train_images=64",
    "standardize.size=32",
    "cluster.k=7",
    "cluster.n_init=2",
    "cluster.heads=2",
    "cluster.epochs=10",
]


@pytest.fixture(scope="session")
def fast_overrides() -> list[str]:
    return list(FAST)
