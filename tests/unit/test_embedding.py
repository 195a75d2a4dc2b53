"""Every embedding method on small synthetic images: real torch, lightly and scikit-image, no mocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from tasks.config import EmbedParams
from tasks.descriptors import DESCRIPTORS, describe
from tasks.embedding import (
    WeightsNotFoundError,
    build_backbone,
    cached_weights,
    fit_embedder,
    load_model,
    save_model,
)


def _images(n=24, size=32, seed=0) -> np.ndarray:
    """Two kinds of patches: a bright centre blob, or a dark line through the centre, on noisy grey."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        base = 120 + rng.normal(0, 8, (size, size))
        if i % 2:
            base[np.hypot(yy, xx) < size / 6] = 230
        else:
            base[np.abs(yy) < 2] = 20
        out[i] = np.clip(base, 0, 255)
    return out


FAST = {"epochs": 1, "batch_size": 8, "input_size": 0, "max_train_images": 16}


@pytest.mark.parametrize("name", DESCRIPTORS)
def test_descriptors_are_finite_and_deterministic(name):
    images = _images()
    a, b = describe(name, images), describe(name, images)
    assert a.ndim == 2 and len(a) == len(images) and np.isfinite(a).all()
    assert np.array_equal(a, b)


@pytest.mark.parametrize("method", [*DESCRIPTORS, "cnn", "simclr"])
def test_each_method_fits_saves_and_reloads(method, tmp_path):
    torch.set_num_threads(1)
    images = _images()
    params = EmbedParams(method=method, **FAST)
    model, vectors, report = fit_embedder(images, params, seed=0)
    assert vectors.shape == (len(images), model.dim) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)  # one block of weight 1
    if method == "simclr":
        assert report.epochs == 1 and report.train_seconds > 0
    save_model(model, tmp_path / "model.pt")
    again = load_model(tmp_path / "model.pt").transform(images)
    assert np.allclose(again, vectors, atol=1e-4)


@pytest.mark.parametrize("n_images", [8, 16, 40, 96])
def test_simclr_trains_on_small_sets_with_the_default_schedule(n_images):
    """Few images make few optimiser steps (96 images = one batch x 10 epochs = 10 steps): the learning-rate
    schedule must still work (one-cycle with 10 steps at pct_start 0.1 divided by zero)."""
    torch.set_num_threads(1)
    images = _images(n=n_images, size=16)
    params = EmbedParams(method="simclr", input_size=0, max_train_images=n_images, batch_size=256)
    model, vectors, report = fit_embedder(images, params, seed=0)
    assert report.epochs == params.epochs and np.isfinite(vectors).all()


def test_simclr_is_deterministic_for_a_seed():
    torch.set_num_threads(1)
    images = _images()
    params = EmbedParams(method="simclr", **FAST)
    _, a, _ = fit_embedder(images, params, seed=3)
    _, b, _ = fit_embedder(images, params, seed=3)
    assert np.array_equal(a, b)


def test_descriptors_separate_two_kinds():
    images = _images(n=40)
    _, vectors, _ = fit_embedder(images, EmbedParams(method="stats"), seed=0)
    kind = np.arange(40) % 2
    sim = vectors @ vectors.T
    same = sim[kind[:, None] == kind[None, :]].mean()
    other = sim[kind[:, None] != kind[None, :]].mean()
    assert same > other + 0.3


def test_combo_weights_blocks_and_shares_a_cache():
    images = _images()
    params = EmbedParams(method="combo", blocks={"stats": 1.0, "lbp": 0.5, "cnn": 0.25}, **FAST)
    cache: dict = {}
    model, vectors, report = fit_embedder(images, params, seed=0, cache=cache)
    assert [b.kind for b in model.blocks] == ["stats", "lbp", "cnn"] and set(cache) == {"stats", "lbp", "cnn"}
    dims = np.cumsum([0] + [len(b.mean) for b in model.blocks])
    norms = [np.linalg.norm(vectors[:, dims[i] : dims[i + 1]], axis=1) for i in range(3)]
    for norm, weight in zip(norms, (1.0, 0.5, 0.25), strict=True):
        assert np.allclose(norm, weight, atol=1e-4)
    other = EmbedParams(method="combo", blocks={"stats": 2.0}, **FAST)
    _, reweighted, _ = fit_embedder(images, other, seed=0, cache=cache)
    assert np.allclose(reweighted, 2 * vectors[:, : dims[1]], atol=1e-5)
    assert set(report.block_seconds) == {"stats", "lbp", "cnn"}


def test_unknown_block_is_refused():
    with pytest.raises(ValueError, match="unknown block"):  # at load (tasks/config.py)
        EmbedParams(method="combo", blocks={"sift": 1.0})
    unchecked = EmbedParams(method="combo").model_copy(update={"blocks": {"sift": 1.0}})  # model_copy skips it
    with pytest.raises(ValueError, match="unknown block"):  # and again where the blocks are fitted
        fit_embedder(_images(), unchecked, seed=0)


def test_pretrained_weights_missing_give_a_clear_error_and_never_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / cached_weights("mobilenet_v3_small").name
    assert expected.name.startswith("mobilenet_v3_small") and expected.name.endswith(".pth")
    with pytest.raises(WeightsNotFoundError, match="Nothing is downloaded") as err:
        build_backbone("mobilenet_v3_small", "imagenet")
    assert str(expected) in str(err.value)
    with pytest.raises(WeightsNotFoundError, match="embed.weights"):
        build_backbone("mobilenet_v3_small", str(tmp_path / "nope.pth"))


def test_pretrained_weights_are_found_in_the_torch_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small(weights=None)
    path = cached_weights("mobilenet_v3_small")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    torch.set_num_threads(1)
    params = EmbedParams(method="pretrained", backbone="mobilenet_v3_small", epochs=0, input_size=32)
    model, vectors, _ = fit_embedder(_images(n=8), params, seed=0)
    loaded = model.blocks[0].net.backbone.features[0][0].weight
    assert torch.equal(loaded, reference.features[0][0].weight)
    assert vectors.shape[0] == 8 and np.isfinite(vectors).all()


def test_descriptors_of_an_image_do_not_depend_on_its_batch():
    """A 3-D ndimage filter once mixed neighbouring images of a batch into each other's gradient features."""
    from tasks.descriptors import DESCRIPTORS, describe

    rng = np.random.default_rng(0)
    images = (rng.random((24, 32, 32)) * 255).astype(np.uint8)
    for kind in DESCRIPTORS:
        whole = describe(kind, images)
        chunked = np.concatenate([describe(kind, images[i : i + 7]) for i in range(0, len(images), 7)])
        np.testing.assert_allclose(whole, chunked, atol=1e-5, err_msg=kind)


@pytest.mark.parametrize(("exported", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_at_barriers_unless_the_user_says_otherwise(exported, expected):
    """Spinning OpenMP threads made training 10x slower beside one other busy process (tasks/__init__.py)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if exported:
        env["OMP_WAIT_POLICY"] = exported
    code = "import os, tasks.embedding; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
