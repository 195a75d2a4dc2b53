"""A new batch labelled with the ``@champion`` models, no training: validate → standardise → embed + assign → drift
→ labels → an incremental label set.

Outputs go to ``<workspace>/results/refresh/<batch_id>/`` (the retrain's stage outputs are left alone). Labels come
from the newest label set published with the champion's clusterer: each cluster takes the label its images carry
there (human-named clusters and seed propagation), with the share of that label as its purity. New images that are
far from their cluster, in an unnamed cluster or with low confidence go to the review queue.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.annotation import NAMED_CLUSTER, UNNAMED
from tasks.champion import Champion
from tasks.config import Params
from tasks.drift import measure
from tasks.stages import validate_folder
from tasks.versioning import BatchVersion
from tasks.workspace import Workspace

log = logging.getLogger("autolabel")
CHAMPION_LABEL = "champion cluster label"


@dataclass(frozen=True)
class ClusterLabels:
    """Cluster id → (label, purity) from the label set ``labelset_id`` (None when no label set exists yet)."""

    labels: dict[int, tuple[str, float]]
    labelset_id: str | None


def champion_labels(ws: Workspace, champion: Champion) -> ClusterLabels:
    """Labels of the champion's clusters, from the newest label set made with the champion's clusterer."""
    want = champion.models["clusterer"]
    best: tuple[str, Path] | None = None
    for manifest_path in ws.labelsets.glob("*/manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        model = manifest.get("models", {}).get("clusterer", {})
        if manifest.get("kind", "retrain") == "retrain" and (model.get("name"), str(model.get("version"))) == (
            want.name,
            want.version,
        ):
            if best is None or manifest["created_at"] > best[0]:
                best = (manifest["created_at"], manifest_path.parent)
    if best is None:
        return ClusterLabels({}, None)
    rows = pd.read_csv(best[1] / "labels.csv", keep_default_na=False)
    sure = ~rows["needs_review"].astype(bool)  # a human-named cluster counts whole; propagations when accepted
    named = rows[(rows["label_source"] == NAMED_CLUSTER) | ((rows["label_source"] != UNNAMED) & sure)]
    out: dict[int, tuple[str, float]] = {}
    for cluster, group in named.groupby("cluster"):
        counts = group["label"].value_counts()
        total = int((rows["cluster"] == cluster).sum())
        out[int(cluster)] = (str(counts.index[0]), float(counts.iloc[0]) / max(total, 1))
    return ClusterLabels(out, best[1].name)


def validate_batch(ws: Workspace, params: Params, batch: BatchVersion, out: Path) -> tuple[list[str], pd.DataFrame]:
    """The retrain's quality checks (same GX suite) on the batch; returns the passed images and the quarantine."""
    rejected = pd.DataFrame(batch.rejected, columns=["image", "reason"])
    result, quarantine = validate_folder(ws.root / batch.folder, rejected, params, out)
    return list(result.passed), quarantine


def run_refresh(ws: Workspace, params: Params, champion: Champion, batch: BatchVersion) -> dict[str, Any]:
    """Label a versioned batch with the champion; write labels, review queue and drift; return the metrics."""
    out = ws.stage_dir("refresh") / batch.batch_id
    out.mkdir(parents=True, exist_ok=True)
    (ws.stage_dir("refresh") / ".gitignore").write_text("*.npy\n")
    passed, quarantine = validate_batch(ws, params, batch, out)
    if not passed:
        raise ValueError(f"no image of batch {batch.batch_id} passed validation; see {out / 'quarantine.csv'}")
    root = ws.root / batch.folder
    images = champion.standardize(root, passed, out / "images.npy")
    vectors, result = champion.embed_assign(np.asarray(images))
    np.save(out / "vectors.npy", vectors.astype(np.float32))
    reference = champion.clusterer.info.get("reference")
    if reference is None:
        raise ValueError("the champion clusterer carries no training reference for drift: retrain once")
    drift = measure(reference, vectors, result.labels, result.distance, params.refresh)
    names = champion_labels(ws, champion)
    far = result.distance > drift.far_threshold
    labels, source, confidence = [], [], []
    for c, conf in zip(result.labels, result.confidence, strict=True):
        if int(c) in names.labels:
            label, purity = names.labels[int(c)]
            labels.append(label)
            source.append(CHAMPION_LABEL)
            confidence.append(float(conf) * purity)
        else:
            labels.append(f"cluster-{int(c)}")
            source.append(UNNAMED)
            confidence.append(float(conf))
    conf_arr = np.asarray(confidence)
    needs_review = far | (conf_arr < params.cluster.review_below) | (np.asarray(source) == UNNAMED)
    from tasks.publishing import LABEL_COLUMNS, sha256_file

    rows = pd.DataFrame(
        {
            "image": passed,
            "sha256": [sha256_file(root / p) for p in passed],
            "cluster": result.labels,
            "label": labels,
            "confidence": np.round(conf_arr, 4),
            "needs_review": needs_review,
            "label_source": source,
        },
        columns=LABEL_COLUMNS,
    )
    rows.to_csv(out / "labels.csv", index=False)
    # most informative first: far from everything, then least confident
    order = np.lexsort((conf_arr, ~far))
    review = rows.iloc[order][rows["needs_review"].to_numpy()[order]].drop(columns=["sha256"])
    review.insert(0, "rank", np.arange(1, len(review) + 1))
    review.to_csv(out / "review.csv", index=False)
    metrics = {
        "batch_id": batch.batch_id,
        "n_images": len(passed) + len(quarantine),
        "n_passed": len(passed),
        "n_quarantined": len(quarantine),
        "n_needs_review": int(needs_review.sum()),
        "coverage": float(1 - needs_review.mean()),
        "n_far": int(far.sum()),
        "labels_from": names.labelset_id,
        "cluster_sizes": {str(k): int(v) for k, v in zip(*np.unique(result.labels, return_counts=True), strict=True)},
        "drift": drift.as_dict(),
    }
    ws.write_json(f"refresh/{batch.batch_id}", metrics)
    log.info(
        "refresh %s: %d labelled, %d need review, drift %s",
        batch.batch_id,
        len(passed),
        int(needs_review.sum()),
        "; ".join(drift.reasons) or "none",
    )
    return metrics


def publish_refresh(
    ws: Workspace, params: Params, champion: Champion, batch: BatchVersion, context: dict[str, Any]
) -> Path:
    """The batch's incremental label set (atomic, content-addressed), whose lineage names the champion models."""
    import hashlib

    from tasks.exports import write_exports
    from tasks.publishing import labelset_id, montage, publish
    from tasks.quality import suite_digest

    out = ws.stage_dir("refresh") / batch.batch_id
    metrics = json.loads((out / "metrics.json").read_text())
    labels_csv = (out / "labels.csv").read_bytes()
    rows = pd.read_csv(out / "labels.csv", keep_default_na=False)
    review = pd.read_csv(out / "review.csv", keep_default_na=False)
    quarantine = pd.read_csv(out / "quarantine.csv", keep_default_na=False)
    stats = pd.read_csv(out / "stats.csv", usecols=["image", "width", "height"])
    sizes = {r.image: (int(r.width), int(r.height)) for r in stats.itertuples() if r.width == r.width}
    labels_sha = hashlib.sha256(labels_csv).hexdigest()
    models = {role: m.as_dict() for role, m in champion.models.items()}
    models_key = hashlib.sha256(json.dumps([models, metrics["labels_from"]], sort_keys=True).encode()).hexdigest()
    set_id = labelset_id(batch.md5, params.digest(), labels_sha, models_key)
    images = np.load(out / "images.npy", mmap_mode="r")

    def write_files(folder: Path) -> None:
        (folder / "labels.csv").write_bytes(labels_csv)
        review.to_csv(folder / "review_queue.csv", index=False)
        quarantine.to_csv(folder / "quarantine.csv", index=False)
        (folder / "drift.json").write_text(json.dumps(metrics["drift"], indent=2) + "\n")
        (folder / "montages").mkdir()
        for c, group in rows.groupby("cluster"):
            first = np.sort(group.index.to_numpy()[: params.publish.montage_size])
            title = f"cluster {c} ({group['label'].iat[0]}): {len(group)} new images"
            montage(images[first], title).save(folder / "montages" / f"cluster-{c}.png")
        write_exports(folder, rows, sizes, model_version=models["embedder"]["uri"])

    manifest = {
        "kind": "refresh",
        "created_at": context["created_at"],
        "prefect": {"flow_run_id": context.get("prefect_flow_run_id"), "deployment_id": context.get("deployment_id")},
        "mlflow": {
            "run_id": context["mlflow_run_id"],
            "experiment": params.track.experiment,
            "tracking_uri": context["mlflow_tracking_uri"],
        },
        "code": context["code"],
        "data": {**batch.as_dict(), "workspace_data_md5": context.get("workspace_data_md5")},
        "quality": {
            "suite": params.validate.suite,
            "suite_sha256": suite_digest(params.validate.suite),
            "n_images": metrics["n_images"],
            "n_passed": metrics["n_passed"],
            "n_quarantined": metrics["n_quarantined"],
            "quarantined": quarantine.to_dict(orient="records"),
        },
        "params": params.as_dict(),
        "params_hash": params.digest(),
        "models": models,
        "labels_from_labelset": metrics["labels_from"],
        "human_inputs": {"hash": models_key, "cluster_names_sha256": None, "seed_labels_sha256": None},
        "metrics": metrics,
        "labels_sha256": labels_sha,
    }
    path, created = publish(ws.labelsets, set_id, write_files, manifest)
    log.info("refresh publish: %s %s", "wrote" if created else "already published, unchanged:", path)
    return path
