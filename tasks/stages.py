"""The pipeline's stages over a workspace: one implementation, two drivers.

Each ``run_<stage>(ws, params)`` reads its inputs from and writes its outputs to ``<workspace>/results/<stage>/``
(plus ``metrics.json``), exactly the ``deps``/``outs`` that ``dvc.yaml`` declares. The Prefect flow calls them as
tasks (the ``*_task`` wrappers at the bottom); ``dvc repro`` calls them through ``autolabel stage <name>``.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.config import Params
from tasks.datasets import discover, read_labels
from tasks.parallel import Mapper
from tasks.workspace import Workspace

log = logging.getLogger("autolabel")


class QualityGateError(RuntimeError):
    """Too many images failed validation: the data, not the code, needs attention."""


def _set_threads(params: Params) -> None:
    import torch

    torch.set_num_threads(params.base.threads or os.cpu_count() or 1)


def _passed(ws: Workspace) -> list[str]:
    path = ws.stage_dir("validate") / "passed.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the validate stage first")
    return [line for line in path.read_text().splitlines() if line]


def validate_folder(
    root: Path, rejected: pd.DataFrame, params: Params, out: Path, mapper: Mapper | None = None
) -> tuple[Any, pd.DataFrame]:
    """Image stats → GX suite on every image under ``root``; writes ``stats.csv`` and ``quarantine.csv`` to ``out``.

    One place for the quality checks of a retrain's data and of a refresh's batch. ``rejected`` (image, reason) are
    the files versioning refused (never read, so GX never saw them); they join the quarantine all the same.
    """
    from tasks import quality

    images = discover(root).images
    out.mkdir(parents=True, exist_ok=True)
    if not images:
        rejected.to_csv(out / "quarantine.csv", index=False)
        raise ValueError(f"no readable images in {root} ({len(rejected)} files rejected, see {out / 'quarantine.csv'})")
    stats = quality.compute_stats(root, images, params.validate.max_pixels, mapper=mapper, chunk=params.runner.chunk)
    result = quality.validate_stats(stats, params.validate)
    quarantine = pd.concat([result.quarantine[["image", "reason"]], rejected], ignore_index=True)
    stats.to_csv(out / "stats.csv", index=False)
    quarantine.to_csv(out / "quarantine.csv", index=False)
    return result, quarantine


def run_validate(ws: Workspace, params: Params, mapper: Mapper | None = None) -> dict[str, Any]:
    """Image stats → GX suite → ``quarantine.csv`` (image, reason) and ``passed.txt``.

    ``mapper`` (from the Prefect flow, :mod:`tasks.parallel`) measures chunks of images on the task runner.
    """
    out = ws.stage_dir("validate")
    rejected = pd.read_csv(ws.rejected, keep_default_na=False) if ws.rejected.is_file() else pd.DataFrame()
    result, quarantine = validate_folder(ws.images, rejected, params, out, mapper)
    (out / "passed.txt").write_text("".join(f"{p}\n" for p in result.passed))
    ws.write_json("validate", result.gx_result, name="gx_result.json")
    metrics = dict(result.summary)
    if len(rejected):  # never read, so GX never saw them; they count as failures all the same
        n_all = int(metrics["n_images"]) + len(rejected)
        metrics.update(n_rejected=len(rejected), n_images=n_all, n_quarantined=len(quarantine))
        metrics["fail_share"] = len(quarantine) / n_all
    ws.write_json("validate", metrics)
    log.info("validate: %d passed, %d quarantined", len(result.passed), len(result.quarantine))
    share = float(result.summary["fail_share"])
    if share > params.validate.max_fail_share:
        raise QualityGateError(
            f"{share:.1%} of the images failed validation (limit validate.max_fail_share = "
            f"{params.validate.max_fail_share:.1%}); see {out / 'quarantine.csv'}"
        )
    if len(result.passed) < 2:
        raise QualityGateError(f"only {len(result.passed)} image(s) passed validation; see {out / 'quarantine.csv'}")
    return metrics


def run_standardize(ws: Workspace, params: Params) -> dict[str, Any]:
    """Passed images → ``images.npy`` ``(N, size, size)`` uint8 and ``index.csv`` (image, sha256)."""
    from tasks.standardize import standardize_all

    passed = _passed(ws)
    out = ws.stage_dir("standardize")
    standardize_all(ws.images, passed, out / "images.npy", params.standardize, params.validate.max_pixels)
    stats = pd.read_csv(ws.stage_dir("validate") / "stats.csv", usecols=["image", "file_sha256"])
    sha = dict(zip(stats["image"], stats["file_sha256"], strict=True))
    pd.DataFrame({"image": passed, "sha256": [sha[p] for p in passed]}).to_csv(out / "index.csv", index=False)
    metrics = {"n_images": len(passed), "size": params.standardize.size, "lighting": params.standardize.lighting}
    ws.write_json("standardize", metrics)
    return metrics


def run_embed(ws: Workspace, params: Params, mapper: Mapper | None = None) -> dict[str, Any]:
    """Standardised images → ``vectors.npy`` ``(N, d)`` float32 (index.csv order) with the fitted ``model.pt``.

    ``mapper`` (from the Prefect flow, :mod:`tasks.parallel`) computes chunks of features on the task runner.
    """
    from tasks.embedding import fit_embedder, save_model

    _set_threads(params)
    images = np.load(ws.stage_dir("standardize") / "images.npy", mmap_mode="r")
    out = ws.stage_dir("embed")
    out.mkdir(parents=True, exist_ok=True)
    model, vectors, report = fit_embedder(
        images, params.embed, params.base.seed, log=log.info, mapper=mapper, chunk=params.runner.chunk
    )
    save_model(model, out / "model.pt")
    np.save(out / "vectors.npy", vectors.astype(np.float32))
    metrics = {
        "method": params.embed.method,
        "blocks": {b.kind: b.weight for b in model.blocks},
        "train_seconds": report.train_seconds,
        "train_images": report.train_images,
        "epochs": report.epochs,
        "final_loss": report.final_loss,
        "embed_seconds": report.embed_seconds,
        "block_seconds": report.block_seconds,
        "dim": int(vectors.shape[1]),
        "device": report.device,
        "backbone": params.embed.backbone,
    }
    ws.write_json("embed", metrics)
    return metrics


def run_cluster(ws: Workspace, params: Params) -> dict[str, Any]:
    """Vectors → clusters with a confidence per image (``assignments.csv``) and the fitted ``model.pkl``."""
    import time

    import joblib

    from tasks.clustering import cluster, internal_metrics
    from tasks.drift import reference_stats

    _set_threads(params)
    vectors = np.load(ws.stage_dir("embed") / "vectors.npy")
    index = pd.read_csv(ws.stage_dir("standardize") / "index.csv")
    start = time.perf_counter()
    result = cluster(vectors, params.cluster, params.base.seed)
    seconds = round(time.perf_counter() - start, 2)
    out = ws.stage_dir("cluster")
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "image": index["image"],
            "cluster": result.labels,
            "confidence": np.round(result.confidence, 6),
            "distance": np.round(result.distance, 6),
        }
    ).to_csv(out / "assignments.csv", index=False)
    # what a refresh compares new batches with (tasks.drift), carried by the model so the champion alone suffices
    result.model.info["reference"] = reference_stats(vectors, result.labels, result.distance, result.model.n_clusters)
    joblib.dump(result.model, out / "model.pkl")
    metrics = {
        "method": params.cluster.method,
        "n_clusters": int(result.model.n_clusters),
        "cluster_seconds": seconds,
        **internal_metrics(vectors, result.labels, params.base.seed),
    }
    if "best_head" in result.model.info:
        metrics["scan_best_head"] = result.model.info["best_head"]
        metrics["scan_head_losses"] = result.model.info["head_losses"]
    if "k_scores" in result.model.info:
        metrics["k_silhouette"] = {str(k): v for k, v in result.model.info["k_scores"].items()}
    metrics["n_needs_review"] = int((result.confidence < params.cluster.review_below).sum())
    ws.write_json("cluster", metrics)
    return metrics


def run_evaluate(ws: Workspace, params: Params) -> dict[str, Any]:
    """External metrics when ``data/labels.csv`` has labels for the images; internal metrics always."""
    from tasks.evaluation import evaluate

    assignments = pd.read_csv(ws.stage_dir("cluster") / "assignments.csv")
    cluster_metrics = ws.read_json("cluster")
    validate_metrics = ws.read_json("validate")
    metrics: dict[str, Any] = {
        "n_images": int(len(assignments)),
        "n_quarantined": int(validate_metrics["n_quarantined"]),
        "n_clusters": int(cluster_metrics["n_clusters"]),
        "silhouette": cluster_metrics["silhouette"],
        "cluster_sizes": cluster_metrics["cluster_sizes"],
        "nmi": None,
        "ari": None,
        "acc": None,
        "macro_recall": None,
        "per_class_recall": None,
        "n_labelled": 0,
    }
    labels = read_labels(ws.labels, known=set(assignments["image"])) if ws.labels.is_file() else {}
    if labels:
        mask = assignments["image"].isin(labels.keys()).to_numpy()
        y_true = [labels[p] for p in assignments["image"][mask]]
        metrics.update(evaluate(y_true, assignments["cluster"].to_numpy()[mask]))
        log.info("evaluate: acc %.3f nmi %.3f ari %.3f", metrics["acc"], metrics["nmi"], metrics["ari"])
    ws.write_json("evaluate", metrics)
    return metrics


def run_track(ws: Workspace, params: Params, run_id: str) -> dict[str, dict[str, Any]]:
    """Log and register the embedder and clusterer of this run in MLflow."""
    from tasks.tracking import log_models

    embedder = ws.stage_dir("embed") / "model.pt"
    clusterer = ws.stage_dir("cluster") / "model.pkl"
    models = log_models(ws, run_id, params.track.model_prefix, embedder, clusterer, ws.params)
    return {role: m.as_dict() for role, m in models.items()}


def _ground_truth(ws: Workspace, images: list[str]) -> dict[str, str]:
    """Ground-truth labels of ``images`` from ``data/labels.csv`` when the run was given one, else empty."""
    return read_labels(ws.labels, known=set(images)) if ws.labels.is_file() else {}


def run_annotate(ws: Workspace, params: Params) -> dict[str, Any]:
    """Clusters + human inputs (``human/``) → a label, calibrated confidence and source for every image."""
    from tasks.annotation import UNNAMED, annotate_with_params, load_human_inputs, review_order
    from tasks.evaluation import label_metrics
    from tasks.publishing import LABEL_COLUMNS

    assignments = pd.read_csv(ws.stage_dir("cluster") / "assignments.csv")
    index = pd.read_csv(ws.stage_dir("standardize") / "index.csv")
    vectors = np.load(ws.stage_dir("embed") / "vectors.npy", mmap_mode="r")
    images = list(assignments["image"])
    clusters = assignments["cluster"].to_numpy()
    human = load_human_inputs(ws.human, set(images), int(ws.read_json("cluster")["n_clusters"]))
    confidence = assignments["confidence"].to_numpy()
    ann = annotate_with_params(params, images, np.asarray(vectors), clusters, confidence, human)
    rows = pd.DataFrame(
        {
            "image": images,
            "sha256": index["sha256"],
            "cluster": clusters,
            "label": ann.labels,
            "confidence": np.round(ann.confidence, 4),
            "needs_review": ann.needs_review,
            "label_source": ann.source,
        },
        columns=LABEL_COLUMNS,
    )
    out = ws.stage_dir("annotate")
    out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / "labels.csv", index=False)
    review = rows.iloc[review_order(ann, clusters)].drop(columns=["sha256"])
    review.insert(0, "rank", np.arange(1, len(review) + 1))
    review.to_csv(out / "review.csv", index=False)
    metrics: dict[str, Any] = {
        "n_images": len(rows),
        "n_needs_review": int(ann.needs_review.sum()),
        "coverage": float(1 - ann.needs_review.mean()),
        "n_seeds": len(human.seeds),
        "n_named_clusters": len(human.cluster_names),
        "label_sources": rows["label_source"].value_counts().to_dict(),
        "propagation_space": ann.space,
        "seed_held_out_accuracy": ann.held_out_accuracy,
        "human_inputs": human.as_lineage(),
    }
    truth = _ground_truth(ws, images)
    if truth and (rows["label_source"] != UNNAMED).any():
        mask = rows["image"].isin(truth.keys()).to_numpy()
        y = [truth[i] for i in rows["image"][mask]]
        metrics.update(label_metrics(y, list(rows["label"][mask]), ann.needs_review[mask]))
    ws.write_json("annotate", metrics)
    return metrics


def publish_context(
    ws: Workspace,
    params: Params,
    run_id: str,
    data: dict[str, Any],
    code: dict[str, Any],
    models: dict[str, Any],
    flow_run_id: str | None = None,
    deployment_id: str | None = None,
) -> dict[str, Any]:
    """What ``run_publish`` needs from the driver (Prefect flow or ``dvc repro``), in one place."""
    from tasks.tracking import tracking_uri

    return {
        "data": data,
        "code": code,
        "models": models,
        "mlflow_run_id": run_id,
        "mlflow_experiment": params.track.experiment,
        "mlflow_tracking_uri": tracking_uri(ws),
        "prefect_flow_run_id": flow_run_id,
        "prefect_deployment_id": deployment_id,
    }


def run_publish(ws: Workspace, params: Params, context: dict[str, Any]) -> Path:
    """Write the label set atomically: labels, review queue, exports, montages, figures, report, manifest.

    ``context`` carries what only the driver knows: ``mlflow_run_id``, ``mlflow_experiment``,
    ``mlflow_tracking_uri``, ``prefect_flow_run_id``, ``prefect_deployment_id``, ``models``, ``code``, ``data``.
    """
    import hashlib
    import shutil

    from tasks import report
    from tasks.exports import write_exports
    from tasks.publishing import labelset_id, montage, publish
    from tasks.quality import suite_digest

    annotate_dir = ws.stage_dir("annotate")
    rows = pd.read_csv(annotate_dir / "labels.csv", keep_default_na=False)
    review = pd.read_csv(annotate_dir / "review.csv", keep_default_na=False)
    annotate_metrics = ws.read_json("annotate")
    human = annotate_metrics["human_inputs"]
    assignments = pd.read_csv(ws.stage_dir("cluster") / "assignments.csv")
    labels_csv = (annotate_dir / "labels.csv").read_bytes()
    labels_sha = hashlib.sha256(labels_csv).hexdigest()
    data = context["data"]
    set_id = labelset_id(data["md5"], params.digest(), labels_sha, human["hash"])
    images = np.load(ws.stage_dir("standardize") / "images.npy", mmap_mode="r")
    stats = pd.read_csv(ws.stage_dir("validate") / "stats.csv", usecols=["image", "width", "height"])
    sizes = {r.image: (int(r.width), int(r.height)) for r in stats.itertuples() if r.width == r.width}
    truth = _ground_truth(ws, list(rows["image"]))
    models = context.get("models", {})
    evaluate_metrics = ws.read_json("evaluate")
    localize = ws.read_json("localize") if (ws.stage_dir("localize") / "metrics.json").is_file() else None

    def write_files(folder: Path) -> None:
        (folder / "labels.csv").write_bytes(labels_csv)
        review.to_csv(folder / "review_queue.csv", index=False)
        if ws.human.is_dir():
            shutil.copytree(ws.human, folder / "human", ignore=shutil.ignore_patterns("README*", "superseded"))
        if localize is not None:  # the images are defect patches: patch -> source image, template and boxes
            (folder / "localize").mkdir()
            for name in ("boxes.csv", "unlocalized.csv"):
                shutil.copyfile(ws.stage_dir("localize") / name, folder / "localize" / name)
        (folder / "montages").mkdir()
        for c, group in assignments.groupby("cluster"):
            nearest = group.sort_values("distance").index[: params.publish.montage_size]
            name = rows["label"][group.index].mode().iat[0]
            title = f"cluster {c} ({name}): {len(group)} images, {len(nearest)} most typical"
            montage(images[np.sort(nearest.to_numpy())], title).save(folder / "montages" / f"cluster-{c}.png")
        figures = folder / "figures"
        figures.mkdir()
        clusters = rows["cluster"].to_numpy()
        report.plot_sizes(clusters, list(rows["label"]), figures / "cluster_sizes.png")
        vectors = np.load(ws.stage_dir("embed") / "vectors.npy", mmap_mode="r")
        idx, xy = report.embedding_map(vectors, params.publish.map_points, params.publish.map_method, params.base.seed)
        report.plot_map(
            xy, [f"cluster {c}" for c in clusters[idx]], "embedding map by cluster", figures / "map_by_cluster.png"
        )
        report.plot_map(xy, list(rows["label"].to_numpy()[idx]), "embedding map by label", figures / "map_by_label.png")
        if truth:
            known = rows[rows["image"].isin(truth.keys())]
            report.plot_confusion([truth[i] for i in known["image"]], list(known["label"]), figures / "confusion.png")
        write_exports(folder, rows, sizes, model_version=str(models.get("embedder", {}).get("uri", "")))
        facts = {
            "label set": set_id,
            "images labelled": len(rows),
            "needs review": int(rows["needs_review"].sum()),
            "data version (DVC md5)": data["md5"],
            "MLflow run": context.get("mlflow_run_id"),
            "Prefect flow run": context.get("prefect_flow_run_id"),
            "code": context["code"].get("git_commit"),
        }
        report.write_report(folder, f"Label set {set_id}", facts, {**evaluate_metrics, **annotate_metrics}, review)

    validate_metrics = ws.read_json("validate")
    quarantine = pd.read_csv(ws.stage_dir("validate") / "quarantine.csv", keep_default_na=False)
    manifest = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "prefect": {
            "flow_run_id": context.get("prefect_flow_run_id"),
            "deployment_id": context.get("prefect_deployment_id"),
        },
        "mlflow": {
            "run_id": context.get("mlflow_run_id"),
            "experiment": context.get("mlflow_experiment"),
            "tracking_uri": context.get("mlflow_tracking_uri"),
        },
        "code": context["code"],
        "data": data,
        **({"localize": {**localize, "boxes": "localize/boxes.csv"}} if localize is not None else {}),
        "quality": {
            "suite": params.validate.suite,
            "suite_sha256": suite_digest(params.validate.suite),
            "success": validate_metrics.get("success"),
            "n_images": validate_metrics["n_images"],
            "n_passed": validate_metrics["n_passed"],
            "n_quarantined": validate_metrics["n_quarantined"],
            "quarantined": quarantine.to_dict(orient="records"),
        },
        "params": params.as_dict(),
        "params_hash": params.digest(),
        "models": models,
        "human_inputs": human,
        "metrics": {**evaluate_metrics, "annotate": annotate_metrics},
        "labels_sha256": labels_sha,
    }
    path, created = publish(ws.labelsets, set_id, write_files, manifest)
    log.info("publish: %s %s", "wrote" if created else "already published, unchanged:", path)
    ws.write_json("publish", {"labelset_id": set_id, "path": str(path), "created": created}, name="labelset.json")
    return path


def run_localize(ws: Workspace, params: Params, raw_images: Path, templates: Path | None) -> dict[str, Any]:
    """Raw inspection images + defect-free templates → defect patches in ``ws.localized``.

    The version step then versions that folder as the run's images. ``results/localize/`` keeps the lineage:
    ``boxes.csv`` (patch → source image, template, boxes), ``unlocalized.csv`` (every image that gave no defect
    patch, and why) and ``metrics.json``; the label set carries the first two and the manifest the metrics.

    Raises:
        FileNotFoundError: a missing image folder. ValueError: templates that do not fit ``localize.rule``, raw
        images inside the workspace, or nothing to label at all.
    """
    import shutil

    from tasks.localize import localize_folder

    raw = Path(raw_images).resolve()
    if ws.root == raw or ws.root in raw.parents:
        raise ValueError(f"the image folder {raw} must not be inside the workspace {ws.root}")
    tpl = Path(templates).resolve() if templates is not None else None
    ws.root.mkdir(parents=True, exist_ok=True)
    gitignore = ws.root / ".gitignore"  # the patches are versioned by DVC (as data/images), never by git
    text = gitignore.read_text() if gitignore.is_file() else ""
    if "/localized/" not in text.splitlines():
        gitignore.write_text(text + ("\n" if text and not text.endswith("\n") else "") + "/localized/\n")
    result = localize_folder(raw, tpl, ws.localized, params.localize, log=log.info)
    out = ws.stage_dir("localize")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("boxes.csv", "unlocalized.csv"):
        shutil.copyfile(ws.localized / name, out / name)
    metrics = {
        **result.as_dict(),
        "images_root": str(raw),
        "templates": str(tpl) if tpl else None,
        "rule": params.localize.rule,
        "unpaired": params.localize.unpaired,
    }
    ws.write_json("localize", metrics)
    log.info(
        "localize: %d images, %d pairs → %d defect patches, %d whole images, %d skipped, %d failures",
        result.images,
        result.pairs,
        result.patches,
        result.whole,
        result.skipped,
        len(result.failures),
    )
    if result.patches + result.whole == 0:
        raise ValueError(f"nothing to label: no defect patch and no whole image from {raw}; see {out}/unlocalized.csv")
    return metrics


def clear_localize(ws: Workspace) -> None:
    """Forget an earlier run's patches and localisation lineage (a run that versions raw images without templates)."""
    import shutil

    for folder in (ws.stage_dir("localize"), ws.localized):
        shutil.rmtree(folder, ignore_errors=True)
