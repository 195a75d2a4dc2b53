"""The parallel stages on a real Dask LocalCluster (prefect-dask) give exactly what the in-process path gives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.config import EmbedParams, RunnerParams, StandardizeParams
from tasks.parallel import prefect_mapper

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def dask_mapper(prefect_engine):
    return prefect_mapper(RunnerParams(kind="dask", n_workers=2, chunk=16), "test-chunk")


@pytest.fixture(scope="module")
def standardized(synth_data) -> tuple[list[str], np.ndarray]:
    from tasks.datasets import discover
    from tasks.standardize import standardize_image

    images = [p for p in discover(synth_data).images if "machine-a" in p][:48]
    params = StandardizeParams(size=32)
    arr = []
    for rel in images:
        try:
            arr.append(standardize_image(synth_data / rel, params, 50_000_000))
        except Exception:  # noqa: BLE001 - the set has planted corrupt files
            continue
    return images, np.stack(arr)


def test_dask_embedding_gives_the_same_vectors(dask_mapper, standardized):
    from tasks.embedding import fit_embedder

    _, images = standardized
    params = EmbedParams(method="combo", blocks={"stats": 1.0, "lbp": 1.0, "morph": 1.0})
    _, local, _ = fit_embedder(images, params, seed=0)
    _, dask, _ = fit_embedder(images, params, seed=0, mapper=dask_mapper, chunk=16)
    assert local.shape == dask.shape and len(images) > 16 * 2
    np.testing.assert_array_equal(local, dask)


def test_dask_quality_stats_are_the_same(dask_mapper, synth_data):
    from tasks.datasets import discover
    from tasks.quality import compute_stats

    images = discover(synth_data).images[:60]
    local = compute_stats(synth_data, images, 50_000_000)
    dask = compute_stats(synth_data, images, 50_000_000, mapper=dask_mapper, chunk=16)
    pd.testing.assert_frame_equal(local, dask)
