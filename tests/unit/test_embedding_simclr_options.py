"""fit_embedder's experimental SimCLR options (bench/RESULTS.md, "Fifth round"): real torch and lightly, no mocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.config import EmbedParams
from tasks.embedding import _views, fit_embedder, load_model, save_model, train_simclr

FAST = {"batch_size": 8, "input_size": 0, "max_train_images": 16}


def _images(n=24, size=32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.normal(120, 8, (n, size, size))
    out[1::2, size // 3 : -size // 3, size // 3 : -size // 3] = 230
    return np.clip(out, 0, 255).astype(np.uint8)


def _dot_survives(min_scale: float, views: int = 1024) -> np.ndarray:
    """Per view: does a 5 px bright dot off the centre of a dark 64 px image stay in it?"""
    batch = torch.zeros(views, 1, 64, 64)
    batch[:, :, 43:48, 43:48] = 1.0  # pixel centres 43..47 = normalised 0.36..0.48: inside the central half
    out = _views(batch, torch.Generator().manual_seed(0), min_scale)
    flat = out.flatten(1)
    return (flat.max(1).values - flat.median(1).values > 0.3).numpy()


def test_a_higher_crop_minimum_keeps_the_central_half_in_every_view():
    wide = _dot_survives(0.6)
    central = _dot_survives(0.75)
    assert central.all()  # 0.75: every crop contains the central half of the image
    assert 0.01 < 1 - wide.mean() < 0.2  # 0.6 (the default) cuts it out of a few views (4.5 % of 1,024)


def test_crop_min_scale_is_validated_and_reaches_training():
    torch.set_num_threads(1)
    params = EmbedParams(method="simclr", epochs=1, **FAST)
    with pytest.raises(ValueError, match=r"crop_min_scale must be in \(0.5, 1\]"):
        train_simclr(_images(), params, 0, crop_min_scale=0.4)
    _, a, _ = fit_embedder(_images(), params, seed=0)
    _, b, _ = fit_embedder(_images(), params, seed=0, crop_min_scale=0.6)
    _, c, _ = fit_embedder(_images(), params, seed=0, crop_min_scale=0.9)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_simclr_runs_split_the_epochs_into_seeded_blocks_that_save_and_reload(tmp_path):
    torch.set_num_threads(1)
    images = _images()
    params = EmbedParams(method="combo", blocks={"stats": 0.5, "simclr": 0.5}, epochs=2, **FAST)
    cache: dict = {}
    model, vectors, report = fit_embedder(images, params, seed=0, cache=cache, simclr_runs=2)
    assert [b.kind for b in model.blocks] == ["stats", "simclr", "simclr"]
    assert set(cache) == {"stats", "simclr-1/2", "simclr-2/2"} and report.epochs == 2  # 1 epoch per training
    assert cache["simclr-1/2"][3].epochs == 1 and report.train_images == 16
    dims = np.cumsum([0] + [len(b.mean) for b in model.blocks])
    norms = [np.linalg.norm(vectors[:, dims[i] : dims[i + 1]], axis=1) for i in range(3)]
    for norm, weight in zip(norms, (0.5, 0.5 / math.sqrt(2), 0.5 / math.sqrt(2)), strict=True):
        assert np.allclose(norm, weight, atol=1e-4)
    one, two = (b.net.backbone.stem[0].weight for b in model.blocks[1:])
    assert not torch.equal(one, two)  # different seeds
    save_model(model, tmp_path / "model.pt")
    assert np.allclose(load_model(tmp_path / "model.pt").transform(images), vectors, atol=1e-4)
    with pytest.raises(ValueError, match="simclr_runs must be >= 1"):
        fit_embedder(images, params, seed=0, simclr_runs=0)
