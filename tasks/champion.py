"""Champion/challenger: the registry's ``@champion`` models move only when a retrain's models score at least as well.

A retrain registers its embedder and clusterer as ``@challenger``. The gate then scores the challenger and the
current champion **on the same images** (this run's data, a seeded sample of at most ``GATE_SAMPLE``): with
ground-truth labels by ``nmi`` (or the configured external metric; Hungarian ``acc`` is biased between cluster
counts: two clusters can beat seven on imbalanced data), else by silhouette in each model's own embedding. The
challenger is promoted when ``challenger >= champion - gate.tolerance``, when there is no champion yet, or when the
champion can no longer be loaded (its artifacts are gone: keeping it would break every refresh). Both models move
together: a clusterer is only meaningful with the embedder it was fitted on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks import tracking
from tasks.config import Params
from tasks.datasets import read_labels
from tasks.tracking import RegisteredModel, mlflow_client, mlflow_for, registered
from tasks.workspace import Workspace

log = logging.getLogger("autolabel")
ROLES = ("embedder", "clusterer")
GATE_SAMPLE = 5000


class NoChampionError(RuntimeError):
    """The registry has no ``@champion`` models for this prefix: run a retrain first."""


@dataclass
class Champion:
    """The loaded champion pair: registry entries, the fitted objects, and the params it was trained with."""

    models: dict[str, RegisteredModel]
    embedder: Any  # tasks.embedding.EmbeddingModel
    clusterer: Any  # tasks.clustering.ClusterModel
    params: Params

    def standardize(self, root: Path, images: list[str], out: Path) -> np.ndarray:
        """Standardise ``images`` as the champion's training images were (streamed into ``out``)."""
        from tasks.standardize import standardize_all

        return standardize_all(root, images, out, self.params.standardize, self.params.validate.max_pixels)

    def embed_assign(self, images: np.ndarray, batch_size: int = 1024):
        """Vectors and cluster assignments (``tasks.clustering.Clustering``) of standardised images."""
        from tasks.clustering import assign

        vectors = self.embedder.transform(images, batch_size=batch_size)
        return vectors, assign(self.clusterer, vectors)


def champion_versions(ws: Workspace, prefix: str) -> dict[str, str] | None:
    """``{role: version}`` of the ``@champion`` pair, or None when either is missing."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(ws)
    out: dict[str, str] = {}
    for role in ROLES:
        try:
            out[role] = str(client.get_model_version_by_alias(f"{prefix}-{role}", "champion").version)
        except MlflowException:
            return None
    return out


def load_champion(ws: Workspace, prefix: str) -> Champion:
    """Load the ``@champion`` pair from the registry (through MLflow, as any consumer would).

    Raises:
        NoChampionError: no champion registered under ``prefix``.
    """
    versions = champion_versions(ws, prefix)
    if versions is None:
        raise NoChampionError(
            f"no @champion models named {prefix}-embedder/-clusterer in the MLflow registry: run `autolabel run` first"
        )
    mlflow = mlflow_for(ws)
    loaded = {
        role: mlflow.pyfunc.load_model(f"models:/{prefix}-{role}/{versions[role]}").unwrap_python_model()
        for role in ROLES
    }
    embedder = loaded["embedder"]
    if embedder.params is None:
        raise NoChampionError(f"{prefix}-embedder v{versions['embedder']} carries no params.yaml: retrain once")
    return Champion(
        models={role: registered(ws, f"{prefix}-{role}", versions[role]) for role in ROLES},
        embedder=embedder.model,
        clusterer=loaded["clusterer"].model,
        params=embedder.params,
    )


@dataclass(frozen=True)
class GateDecision:
    metric: str
    challenger: dict[str, str]
    champion_before: dict[str, str] | None
    challenger_score: float | None
    champion_score: float | None
    promoted: bool
    reason: str
    n_images: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _score(metric: str, vectors: np.ndarray, clusters: np.ndarray, truth: list[str] | None, seed: int) -> float:
    if metric == "silhouette":
        from tasks.clustering import internal_metrics

        return float(internal_metrics(vectors, clusters, seed)["silhouette"])
    from tasks.evaluation import evaluate

    return float(evaluate(truth, clusters)[metric])


def gate(ws: Workspace, params: Params, models: dict[str, dict[str, Any]]) -> GateDecision:
    """Score challenger and champion on this run's images; move ``@champion`` to the challenger when it passes."""
    prefix = params.track.model_prefix
    challenger = {role: str(models[role]["version"]) for role in ROLES}
    assignments = pd.read_csv(ws.stage_dir("cluster") / "assignments.csv")
    images = list(assignments["image"])
    rng = np.random.default_rng(params.base.seed)
    idx = np.sort(rng.choice(len(images), size=min(len(images), GATE_SAMPLE), replace=False))
    sample = [images[i] for i in idx]
    truth_map = read_labels(ws.labels, known=set(sample)) if ws.labels.is_file() else {}
    metric = params.gate.metric
    if metric == "auto":
        metric = "nmi" if len(set(truth_map.values())) > 1 else "silhouette"
    elif metric != "silhouette" and len(set(truth_map.values())) < 2:
        log.warning("gate.metric %s needs ground-truth labels; none here: using silhouette", metric)
        metric = "silhouette"
    if metric != "silhouette":  # external metrics on the labelled part of the sample only
        keep = np.array([p in truth_map for p in sample])
        idx, sample = idx[keep], [p for p, k in zip(sample, keep, strict=True) if k]
    truth = [truth_map[p] for p in sample] if metric != "silhouette" else None
    vectors = np.load(ws.stage_dir("embed") / "vectors.npy", mmap_mode="r")
    ch_score = _score(metric, np.asarray(vectors[idx]), assignments["cluster"].to_numpy()[idx], truth, params.base.seed)

    before = champion_versions(ws, prefix)
    champ_score: float | None = None
    if before is None:
        promoted, reason = True, "no champion yet"
    else:
        try:
            champion = load_champion(ws, prefix)
        except Exception as exc:  # noqa: BLE001 - any failure to load means the champion is unusable
            promoted, reason = True, f"champion could not be loaded ({type(exc).__name__}: {exc})"
        else:
            tmp = ws.stage_dir("track") / "gate-images.npy"
            try:
                std = champion.standardize(ws.images, sample, tmp)
                vec, result = champion.embed_assign(np.asarray(std))
            finally:
                tmp.unlink(missing_ok=True)
            champ_score = _score(metric, vec, result.labels, truth, params.base.seed)
            promoted = ch_score >= champ_score - params.gate.tolerance
            reason = (
                f"challenger {metric} {ch_score:.4f} {'>=' if promoted else '<'} champion {champ_score:.4f}"
                f" - tolerance {params.gate.tolerance}"
            )
    if promoted:
        client = mlflow_client(ws)
        for role in ROLES:
            client.set_registered_model_alias(f"{prefix}-{role}", "champion", challenger[role])
    log.info("champion gate: %s (%s)", "promoted" if promoted else "kept the champion", reason)
    return GateDecision(
        metric=metric,
        challenger=challenger,
        champion_before=before,
        challenger_score=ch_score,
        champion_score=champ_score,
        promoted=promoted,
        reason=reason,
        n_images=len(sample),
    )


def record(ws: Workspace, run_id: str, decision: GateDecision, models: dict[str, Any]) -> dict[str, Any]:
    """Log the decision on the MLflow run (metrics ``gate.*``, tags ``autolabel.gate.*``) and in
    ``results/track/gate.json``; return ``models`` with their aliases as they are now."""
    d = decision.as_dict()
    ws.write_json("track", d, name="gate.json")
    scores = {k: d[k] for k in ("challenger_score", "champion_score") if d[k] is not None}
    tracking.log_metrics(ws, run_id, "gate", {**scores, "promoted": int(decision.promoted)})
    tracking.set_tags(
        ws,
        run_id,
        {
            "autolabel.gate.decision": "promoted" if decision.promoted else "kept champion",
            "autolabel.gate.metric": decision.metric,
            "autolabel.gate.reason": decision.reason,
            "autolabel.gate.champion_before": json.dumps(decision.champion_before),
        },
    )
    return {role: registered(ws, m["name"], m["version"]).as_dict() for role, m in models.items()}
