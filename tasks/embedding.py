"""Image embeddings: a torchvision backbone trained self-supervised (SimCLR) on the run's own images.

No pretrained weights can be downloaded at run time. A backbone starts either from random weights or from a local
ImageNet weights file (``embed.weights``); never from the network. SimCLR (lightly's NT-Xent loss and projection
head) then adapts it to the user's defects: two random views of each image (crop, flips, 90° rotations, intensity
jitter, noise) are pulled together, other images pushed apart. Defects have no canonical orientation, so rotation
and flip invariance is what we want.

The trained :class:`Embedder` maps standardised ``uint8`` images ``(N, S, S)`` to L2-normalised vectors; it is
the model that is registered in MLflow.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from tasks.config import EmbedParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(FileNotFoundError):
    """The configured local weights file is missing; says how to provide it instead of downloading."""


def device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_backbone(name: str, weights: str | None = None) -> tuple[nn.Module, int]:
    """A torchvision classifier with its head removed, and its feature dimension.

    Args:
        name: any torchvision classification model name (``resnet18``, ``mobilenet_v3_small``, ...).
        weights: path to a local state-dict file (e.g. ImageNet weights copied from a machine with internet, or
            found in ``$TORCH_HOME/hub/checkpoints``). ``None`` = random initialisation. Never downloaded.
    """
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"embed.backbone: unknown torchvision classification model {name!r}")
    model = torchvision.models.get_model(name, weights=None)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"embed.weights: {path} not found. Nothing is downloaded at run time: copy the torchvision weights "
                f"file for {name} (e.g. from $TORCH_HOME/hub/checkpoints on a machine with internet) to that path, "
                "or set embed.weights: null to train from scratch on your own images."
            )
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


def _views(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random SimCLR view per image of a float batch ``(B, 1, S, S)`` in [0, 1].

    Crops keep most of the image (defects are near the centre of AOI crops), then 90° rotations, flips,
    brightness/contrast/gamma jitter and sensor noise: the nuisances that differ between machines.
    """
    b, _, s, _ = batch.shape
    scale = torch.empty(b).uniform_(0.6, 1.0, generator=gen)
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


def train_simclr(images: np.ndarray, params: EmbedParams, seed: int, log=None) -> tuple[Embedder, TrainReport]:
    """Train an :class:`Embedder` with SimCLR on standardised images ``(N, S, S)`` uint8.

    Seeded and, on the CPU, deterministic for a fixed thread count.
    """
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dev = device()
    backbone, dim = build_backbone(params.backbone, params.weights)
    embedder = Embedder(backbone, dim, params.input_size).to(dev)
    head = SimCLRProjectionHead(dim, 512, params.dim).to(dev)
    criterion = NTXentLoss(temperature=params.temperature)
    opt = torch.optim.AdamW(list(embedder.parameters()) + list(head.parameters()), lr=params.lr, weight_decay=1e-4)

    n = len(images)
    rng = np.random.default_rng(seed)
    train_idx = np.sort(rng.choice(n, size=min(n, params.max_train_images), replace=False))
    bs = min(params.batch_size, len(train_idx))
    steps = max(1, len(train_idx) // bs) * params.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=params.lr, total_steps=max(steps, 1), pct_start=0.1)
    losses: list[float] = []
    start = time.perf_counter()
    embedder.train()
    for epoch in range(params.epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        total, count = 0.0, 0
        for i in range(0, len(order) - bs + 1, bs):
            batch = torch.from_numpy(images[np.sort(order[i : i + bs])]).float().unsqueeze(1) / 255.0
            v1, v2 = _views(batch, gen).to(dev), _views(batch, gen).to(dev)
            z1, z2 = head(embedder.features(v1)), head(embedder.features(v2))
            loss = criterion(z1, z2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + float(loss.detach()), count + 1
        losses.append(total / max(count, 1))
        if log is not None:
            log(f"embed: epoch {epoch + 1}/{params.epochs} loss {losses[-1]:.4f}")
    embedder.eval()
    report = TrainReport(
        epochs=params.epochs,
        images=len(train_idx),
        seconds=round(time.perf_counter() - start, 2),
        final_loss=losses[-1] if losses else float("nan"),
        losses=losses,
        device=str(dev),
    )
    return embedder.cpu(), report


@torch.inference_mode()
def embed_all(model: Embedder, images: np.ndarray, out: Path, batch_size: int = 256) -> np.memmap:
    """Vectors for every image, computed in batches into the memory-mapped ``.npy`` file ``out``."""
    dev = device()
    model = model.to(dev).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    vectors = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(len(images), model.dim))
    for i in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
        vectors[i : i + len(batch)] = model(batch).cpu().numpy()
    vectors.flush()
    return vectors


def save_embedder(model: Embedder, params: EmbedParams, path: Path) -> None:
    """Save the state dict with what is needed to rebuild it (backbone name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"backbone": params.backbone, "dim": model.dim, "input_size": model.input_size}
    torch.save({**blob, "state_dict": model.state_dict()}, path)


def load_embedder(path: Path) -> Embedder:
    """Rebuild an :class:`Embedder` saved by :func:`save_embedder` (no weights are fetched)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    backbone, dim = build_backbone(blob["backbone"], None)
    model = Embedder(backbone, dim, blob.get("input_size", 0))
    model.load_state_dict(blob["state_dict"])
    return model.eval()
