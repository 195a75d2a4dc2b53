"""Image embeddings behind one interface: standardised ``uint8`` images ``(N, S, S)`` → vectors ``(N, d)``.

``embed.method`` chooses what makes the vectors (:func:`fit_embedder` returns an :class:`EmbeddingModel`):

- ``simclr``: a backbone trained self-supervised (SimCLR: lightly's NT-Xent loss and projection head) on the
  run's own images. Two random views of each image (crops that keep the centre, 90° rotations, flips, intensity
  jitter, noise) are pulled together, other images pushed apart: defects have no canonical orientation and
  machines differ in gain. The default backbone ``small`` is a 4-stage residual CNN for grey patches (fast on a
  CPU); any torchvision classifier name works too.
- ``cnn``: the same backbone, untrained (a baseline).
- ``pretrained``: a torchvision backbone with ImageNet weights from a local file (``embed.weights``) or the
  ``$TORCH_HOME/hub/checkpoints`` cache; a clear error when missing, never a download. ``epochs > 0`` fine-tunes
  it with SimCLR.
- ``raw`` (pixels + PCA), ``hog``, ``lbp``, ``stats``, ``morph``: classic descriptors (:mod:`tasks.descriptors`),
  training-free baselines and fallbacks.
- ``combo``: a weighted concatenation of any of the above (``embed.blocks``, e.g. ``{simclr: 1, stats: 0.5}``).

Every block is standardised (z-score per dimension, fitted on the run's images), optionally PCA-reduced,
L2-normalised per image and multiplied by its weight; blocks are then concatenated. So a block's weight is its length
in every vector, whatever its dimension, and its share of the squared distance between two images goes with
weight² (weights 1 and ½: shares of about 4 to 1).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from tasks.config import EmbedParams
from tasks.descriptors import DESCRIPTORS, describe
from tasks.parallel import Mapper, spans

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(FileNotFoundError):
    """The configured local weights file is missing; says how to provide it instead of downloading."""


def device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class SmallResNet(nn.Module):
    """A light residual CNN for small grey patches on a CPU: a 16-channel stem at full resolution, then three
    residual stages (32-64-128 channels) that each halve the resolution (~0.4 M parameters, ~25 M MACs at 48 px).
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        stages, cin = [], 16
        for w in widths:
            stages.append(_Block(cin, w, 2))
            cin = w
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1)


def cached_weights(name: str) -> Path:
    """Where torchvision keeps ``name``'s default ImageNet weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, AttributeError) as exc:
        raise WeightsNotFoundError(f"embed.backbone: torchvision has no pretrained weights for {name!r}") from exc
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def resolve_weights(name: str, weights: str | None) -> Path | None:
    """``None`` → random init; ``"imagenet"`` → the TORCH_HOME cache file; else a local file path. Never downloads."""
    if not weights:
        return None
    path = cached_weights(name) if weights == "imagenet" else Path(weights).expanduser()
    if not path.is_file():
        hint = ""
        if name != "small":
            try:
                hint = f" (torchvision's file for {name} is {cached_weights(name).name})"
            except WeightsNotFoundError:
                pass
        raise WeightsNotFoundError(
            f"embed.weights: {path} not found. Nothing is downloaded at run time: copy the torchvision weights "
            f"file for {name}{hint} from a machine with internet to $TORCH_HOME/hub/checkpoints/ (with "
            "embed.weights: imagenet) or to any path given as embed.weights; or set embed.weights: null to "
            "train from scratch on your own images."
        )
    return path


def build_backbone(name: str, weights: str | None = None) -> tuple[nn.Module, int]:
    """A backbone with its classifier head removed, and its feature dimension.

    Args:
        name: ``small`` (:class:`SmallResNet`) or any torchvision classification model name (``resnet18``,
            ``mobilenet_v3_small``, ...).
        weights: ``None`` = random initialisation; ``"imagenet"`` = torchvision's weights file in
            ``$TORCH_HOME/hub/checkpoints``; or a path to a local state-dict file. Never downloaded.
    """
    if name == "small":
        if weights:
            raise ValueError("embed.weights: the 'small' backbone has no pretrained weights; use null")
        model: nn.Module = SmallResNet()
    else:
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"embed.backbone: unknown torchvision classification model {name!r}")
        model = torchvision.models.get_model(name, weights=None)
        path = resolve_weights(name, weights)
        if path is not None:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        for attr in ("fc", "classifier", "head", "heads"):
            if hasattr(model, attr):
                setattr(model, attr, nn.Identity())
                break
    model.eval()
    with torch.no_grad():
        dim = int(model(torch.zeros(2, 3, 64, 64)).shape[1])
    return model, dim


class Embedder(nn.Module):
    """Standardised grey ``uint8`` images ``(N, S, S)`` → L2-normalised feature vectors ``(N, dim)``."""

    def __init__(self, backbone: nn.Module, dim: int, input_size: int = 0):
        super().__init__()
        self.backbone = backbone
        self.dim = dim
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], shape ``(N, 1, S, S)`` → unnormalised backbone features."""
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self.backbone(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.device, torch.float32).unsqueeze(1) / 255.0
        return F.normalize(self.features(x), dim=1)


def _views(batch: torch.Tensor, gen: torch.Generator, min_scale: float = 0.6) -> torch.Tensor:
    """One random SimCLR view per image of a float batch ``(B, 1, S, S)`` in [0, 1].

    Crops keep most of the image (defects are near the centre of AOI crops), then 90° rotations, flips,
    brightness/contrast/gamma jitter and sensor noise: the nuisances that differ between machines.

    A crop's side is a uniform share in ``[min_scale, 1]`` of the image side and it stays inside the image, so
    before the small rotation every view contains the central square of side ``2 * min_scale - 1``
    (0.6: the central 20 %, ~13 px of 64; 0.75: the central half).
    """
    b, _, s, _ = batch.shape
    scale = torch.empty(b).uniform_(min_scale, 1.0, generator=gen)
    shift = (1 - scale).unsqueeze(1) * (torch.rand(b, 2, generator=gen) * 2 - 1)
    angle = torch.randint(0, 4, (b,), generator=gen).float() * (math.pi / 2)
    angle = angle + torch.empty(b).uniform_(-0.2, 0.2, generator=gen)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    gamma = torch.exp(torch.empty(b, 1, 1, 1).uniform_(-0.4, 0.4, generator=gen))
    out = out.clamp(1e-4, 1).pow(gamma)
    contrast = torch.empty(b, 1, 1, 1).uniform_(0.6, 1.4, generator=gen)
    bright = torch.empty(b, 1, 1, 1).uniform_(-0.15, 0.15, generator=gen)
    mean = out.mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + bright
    noise = torch.randn(out.shape, generator=gen) * torch.empty(b, 1, 1, 1).uniform_(0, 0.05, generator=gen)
    return (out + noise).clamp(0, 1)


@dataclass(frozen=True)
class TrainReport:
    epochs: int
    images: int
    seconds: float
    final_loss: float
    losses: list[float]
    device: str


def train_simclr(
    images: np.ndarray, params: EmbedParams, seed: int, log=None, crop_min_scale: float = 0.6
) -> tuple[Embedder, TrainReport]:
    """Train an :class:`Embedder` with SimCLR on standardised images ``(N, S, S)`` uint8.

    Seeded and, on the CPU, deterministic for a fixed thread count. ``crop_min_scale``: the smallest crop side of
    a view, as a share of the image side (:func:`_views`; in (0.5, 1]: every view keeps the image centre).
    """
    if not 0.5 < crop_min_scale <= 1.0:
        raise ValueError(f"crop_min_scale must be in (0.5, 1] (views keep the image centre), got {crop_min_scale}")
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dev = device()
    backbone, dim = build_backbone(params.backbone, params.weights)
    embedder = Embedder(backbone, dim, params.input_size).to(dev)
    if dev.type == "cpu":
        embedder = embedder.to(memory_format=torch.channels_last)  # ~1.4x faster convolutions on the CPU
    head = SimCLRProjectionHead(dim, 512, params.dim).to(dev)
    criterion = NTXentLoss(temperature=params.temperature)
    opt = torch.optim.AdamW(list(embedder.parameters()) + list(head.parameters()), lr=params.lr, weight_decay=1e-4)

    n = len(images)
    rng = np.random.default_rng(seed)
    train_idx = np.sort(rng.choice(n, size=min(n, params.max_train_images), replace=False))
    bs = min(params.batch_size, len(train_idx))
    steps = max(1, len(train_idx) // bs) * params.epochs
    # one-cycle: warm-up (at least 2 steps; torch divides by the warm-up length, so 10 steps at 0.1 failed) and
    # decay; too few steps for both (a tiny set) keep the constant learning rate
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=params.lr, total_steps=steps, pct_start=max(0.1, 2 / steps))
        if steps >= 4
        else None
    )
    losses: list[float] = []
    start = time.perf_counter()
    embedder.train()
    for epoch in range(params.epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        total, count = 0.0, 0
        for i in range(0, len(order) - bs + 1, bs):
            batch = torch.from_numpy(images[np.sort(order[i : i + bs])]).float().unsqueeze(1) / 255.0
            v1, v2 = _views(batch, gen, crop_min_scale).to(dev), _views(batch, gen, crop_min_scale).to(dev)
            z1, z2 = head(embedder.features(v1)), head(embedder.features(v2))
            loss = criterion(z1, z2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total, count = total + float(loss.detach()), count + 1
        losses.append(total / max(count, 1))
        if log is not None:
            log(f"embed: epoch {epoch + 1}/{params.epochs} loss {losses[-1]:.4f}")
    embedder.eval()
    embedder = embedder.to(memory_format=torch.contiguous_format)
    report = TrainReport(
        epochs=params.epochs,
        images=len(train_idx),
        seconds=round(time.perf_counter() - start, 2),
        final_loss=losses[-1] if losses else float("nan"),
        losses=losses,
        device=str(dev),
    )
    return embedder.cpu(), report


TORCH_METHODS = ("simclr", "cnn", "pretrained")
METHODS = (*TORCH_METHODS, *DESCRIPTORS, "combo")


@torch.inference_mode()
def torch_features(model: Embedder, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """L2-normalised backbone features of every image, in batches."""
    dev = device()
    model = model.to(dev).eval()
    out = np.empty((len(images), model.dim), np.float32)
    for i in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[i : i + batch_size]))  # a writable copy: images may be read-only
        out[i : i + len(batch)] = model(batch).cpu().numpy()
    return out


@dataclass
class BlockModel:
    """One block of an :class:`EmbeddingModel`: a feature source, its standardisation and its weight."""

    kind: str  # simclr | cnn | pretrained | raw | hog | lbp | stats | morph
    weight: float
    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray | None = None  # PCA rows (d_out, d_in), applied after standardisation
    net: Embedder | None = None
    backbone: str = ""

    def raw_features(self, images: np.ndarray) -> np.ndarray:
        if self.net is not None:
            return torch_features(self.net, images)
        return describe(self.kind, images)

    def finish(self, feats: np.ndarray) -> np.ndarray:
        z = (feats - self.mean) / self.scale
        if self.components is not None:
            z = z @ self.components.T
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        return (z * self.weight).astype(np.float32)


@dataclass
class EmbeddingModel:
    """The fitted embedder: standardised ``uint8`` images ``(N, S, S)`` → ``(N, dim)`` float32 vectors."""

    method: str
    blocks: list[BlockModel]

    @property
    def dim(self) -> int:
        return int(sum(len(b.mean) if b.components is None else len(b.components) for b in self.blocks))

    def transform(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Vectors for ``images``, in batches (descriptor blocks are computed per batch, so memory stays flat)."""
        out = np.empty((len(images), self.dim), np.float32)
        for i in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(images[i : i + batch_size])
            out[i : i + len(batch)] = np.concatenate([b.finish(b.raw_features(batch)) for b in self.blocks], 1)
        return out


@dataclass(frozen=True)
class FitReport:
    train_seconds: float
    embed_seconds: float
    train_images: int
    epochs: int
    final_loss: float | None
    block_seconds: dict[str, float]
    device: str


def _block_names(params: EmbedParams) -> dict[str, float]:
    if params.method != "combo":
        return {params.method: 1.0}
    blocks = {k: float(w) for k, w in params.blocks.items() if w > 0}
    if not blocks:
        raise ValueError("embed.blocks: combo needs at least one block with a positive weight")
    return blocks


def fit_embedder(
    images: np.ndarray,
    params: EmbedParams,
    seed: int,
    log=None,
    cache: dict | None = None,
    mapper: Mapper | None = None,
    chunk: int = 512,
    *,
    simclr_runs: int = 1,
    crop_min_scale: float = 0.6,
) -> tuple[EmbeddingModel, np.ndarray, FitReport]:
    """Fit ``params.method`` on ``images`` and return the model, the vectors of ``images`` and timings.

    Torch blocks are trained (SimCLR) or loaded; every block's standardisation (and PCA for ``raw``) is fitted on
    ``images``. Deterministic for a seed on the CPU (with a fixed thread count). ``cache`` (a dict the caller
    keeps, for the same images, params, seed and keyword options) lets several combinations share fitted blocks
    (benchmarks). With a ``mapper`` (:mod:`tasks.parallel`) the features (inference) of chunks of ``chunk`` images
    are computed by the flow's task runner, e.g. on Dask workers; features are per image, so the vectors do not
    change.

    Experimental SimCLR options (measured in bench/RESULTS.md, "Fifth round"; not in params.yaml):
    ``simclr_runs`` > 1 replaces the ``simclr`` block by that many trainings of ``epochs / simclr_runs`` epochs
    (same total budget) with seeds ``seed``, ``seed + 1000``, ..., each its own block of weight
    ``weight / sqrt(simclr_runs)`` (together the share of squared distances of one block of ``weight``);
    ``crop_min_scale`` is the smallest crop of a SimCLR view (:func:`train_simclr`).
    """
    images = np.asarray(images)
    names = _block_names(params)
    unknown = sorted(set(names) - set(METHODS) - {"combo"})
    if unknown or "combo" in names:
        choices = ", ".join(METHODS[:-1])
        raise ValueError(f"embed.blocks: unknown block(s) {unknown or ['combo']}; choose from {choices}")
    if simclr_runs < 1:
        raise ValueError(f"simclr_runs must be >= 1, got {simclr_runs}")
    blocks: list[BlockModel] = []
    outputs: list[np.ndarray] = []
    timings: dict[str, float] = {}
    train_seconds, embed_seconds, final_loss, epochs, train_images = 0.0, 0.0, None, 0, 0
    for key, kind, weight, block_seed, block_params in _plan(names, params, seed, simclr_runs):
        if cache is not None and key in cache:
            block0, feats, seconds, trained = cache[key]
        else:
            block0, feats, seconds, trained = _fit_block(
                kind, images, block_params, block_seed, log, mapper, chunk, crop_min_scale
            )
            if cache is not None:
                cache[key] = (block0, feats, seconds, trained)
        block = BlockModel(**{**block0.__dict__, "weight": weight})
        if trained is not None:
            train_seconds += trained.seconds
            runs = simclr_runs if kind == "simclr" else 1
            final_loss, epochs, train_images = trained.final_loss, trained.epochs * runs, trained.images
        outputs.append(block.finish(feats))
        blocks.append(block)
        timings[key] = seconds
        embed_seconds += seconds
        if log is not None:
            log(f"embed: block {key} ({feats.shape[1]} dims) in {seconds:.1f} s")
    model = EmbeddingModel(params.method, blocks)
    report = FitReport(
        train_seconds=round(train_seconds, 2),
        embed_seconds=round(embed_seconds, 2),
        train_images=train_images,
        epochs=epochs,
        final_loss=final_loss,
        block_seconds=timings,
        device=str(device()),
    )
    return model, np.concatenate(outputs, 1).astype(np.float32), report


def _plan(names: dict[str, float], params: EmbedParams, seed: int, simclr_runs: int):
    """(cache key, kind, weight, seed, params) of every block to fit; ``simclr`` split into ``simclr_runs``."""
    out = []
    for kind, weight in names.items():
        if kind == "simclr" and simclr_runs > 1:
            p = params.model_copy(update={"epochs": max(1, round(params.epochs / simclr_runs))})
            w = weight / math.sqrt(simclr_runs)
            out.extend((f"simclr-{i + 1}/{simclr_runs}", kind, w, seed + 1000 * i, p) for i in range(simclr_runs))
        else:
            out.append((kind, kind, weight, seed, params))
    return out


def _block_features(kind: str, net, images: np.ndarray) -> np.ndarray:
    return torch_features(net, images) if kind in TORCH_METHODS else describe(kind, images)


def _features(kind: str, net, images: np.ndarray, mapper: Mapper | None, chunk: int) -> np.ndarray:
    if len(images) <= chunk:
        return _block_features(kind, net, images)
    if mapper is None:  # in chunks too: descriptors hold ~100 KB of float temporaries per image (5 GB for 50k)
        out = [_block_features(kind, net, np.ascontiguousarray(images[a:b])) for a, b in spans(len(images), chunk)]
        return np.concatenate(out)
    batches = [np.ascontiguousarray(images[a:b]) for a, b in spans(len(images), chunk)]
    return np.concatenate(mapper(partial(_block_features, kind, net), batches))


def _fit_block(
    kind: str,
    images: np.ndarray,
    params: EmbedParams,
    seed: int,
    log=None,
    mapper: Mapper | None = None,
    chunk: int = 512,
    crop_min_scale: float = 0.6,
):
    """One block fitted on ``images``: (block with weight 1, raw features, embedding seconds, train report)."""
    net, report = None, None
    start = time.perf_counter()
    if kind in TORCH_METHODS:
        p = params
        if kind == "cnn":
            p = params.model_copy(update={"epochs": 0, "weights": None})
        elif kind == "pretrained":
            p = params.model_copy(update={"weights": params.weights or "imagenet"})
        net, report = train_simclr(images, p, seed, log=log, crop_min_scale=crop_min_scale)
        start = time.perf_counter()
    feats = _features(kind, net, images, mapper, chunk)
    mean = feats.mean(axis=0)
    scale = feats.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0).astype(np.float32)
    block = BlockModel(kind, 1.0, mean.astype(np.float32), scale, net=net, backbone=params.backbone)
    if kind == "raw":
        from sklearn.decomposition import PCA

        z = (feats - mean) / scale
        dims = min(params.pca_dims, z.shape[1], len(z))
        block.components = PCA(n_components=dims, random_state=seed).fit(z).components_.astype(np.float32)
    return block, feats, round(time.perf_counter() - start, 2), report


def save_model(model: EmbeddingModel, path: Path) -> None:
    """Save with ``torch.save`` as plain tensors and strings (loadable with ``weights_only=True``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = []
    for b in model.blocks:
        blob: dict = {
            "kind": b.kind,
            "weight": float(b.weight),
            "mean": torch.from_numpy(b.mean),
            "scale": torch.from_numpy(b.scale),
            "components": None if b.components is None else torch.from_numpy(b.components),
        }
        if b.net is not None:
            blob.update(backbone=b.backbone, input_size=b.net.input_size, state_dict=b.net.state_dict())
        blocks.append(blob)
    torch.save({"method": model.method, "blocks": blocks}, path)


def load_model(path: Path) -> EmbeddingModel:
    """Rebuild an :class:`EmbeddingModel` saved by :func:`save_model` (no weights are fetched)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    blocks = []
    for b in blob["blocks"]:
        net = None
        if "state_dict" in b:
            backbone, dim = build_backbone(b["backbone"], None)
            net = Embedder(backbone, dim, b.get("input_size", 0))
            net.load_state_dict(b["state_dict"])
            net.eval()
        comps = None if b["components"] is None else b["components"].numpy()
        blocks.append(
            BlockModel(b["kind"], b["weight"], b["mean"].numpy(), b["scale"].numpy(), comps, net, b.get("backbone", ""))
        )
    return EmbeddingModel(blob["method"], blocks)
