"""One real retrain run on a small synthetic set, shared by the flow tests (the flow costs ~1 min)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    from tasks.synthetic import generate

    out = tmp_path_factory.mktemp("synth") / "images"
    generate(out, n=150, seed=3)
    return out


@pytest.fixture(scope="session")
def retrain_run(prefect_engine, synth_data, fast_overrides, tmp_path_factory) -> tuple[Path, Path]:
    """(workspace, label set) of one retrain flow run with ground-truth labels."""
    from flows.retrain import retrain

    ws = tmp_path_factory.mktemp("ws") / "workspace"
    path = retrain(
        images=str(synth_data), workspace=str(ws), labels=str(synth_data / "labels.csv"), overrides=fast_overrides
    )
    return ws, Path(path)
