"""The refresh flow: a new batch → version → validate → embed + assign with ``@champion`` → drift → label set.

No training: the batch is labelled by the registry's champion models and published as an incremental label set
whose lineage names them. When the batch has drifted beyond ``params.yaml``'s ``refresh`` limits (and
``refresh.retrain_on_drift``), the retrain flow runs on all the workspace's data, batches included.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run

from flows.retrain import lineage_tags, retrain, workspace_lock
from tasks import champion, tracking, versioning
from tasks import refresh as refreshing
from tasks.config import load_params
from tasks.datasets import discover
from tasks.preflight import before_work
from tasks.workspace import Workspace

log = logging.getLogger("autolabel")

champion_task = task(champion.load_champion, name="load-champion", cache_policy=NO_CACHE)
version_batch_task = task(
    versioning.version_batch, name="version-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5
)
refresh_task = task(refreshing.run_refresh, name="embed-assign-drift", cache_policy=NO_CACHE)
publish_task = task(refreshing.publish_refresh, name="publish-refresh", cache_policy=NO_CACHE)


@task(name="record-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def record_task(ws: Workspace, batch_id: str) -> str:
    """Commit the batch's results (labels, drift, quality; not the arrays) to the workspace's git."""
    versioning.git(["add", "-A", "--", "results/refresh"], ws.root)
    if versioning.git(["status", "--porcelain", "--", "results/refresh"], ws.root).strip():
        versioning.git(["commit", "-q", "-m", f"refresh {batch_id}"], ws.root)
    return versioning.git(["rev-parse", "HEAD"], ws.root).strip()


@flow(name="refresh", log_prints=True)
def refresh(
    images: str,
    workspace: str = "workspace",
    batch: str | None = None,
    overrides: list[str] | None = None,
    allow_retrain: bool = True,
) -> dict[str, Any]:
    """Label a new batch with the champion models; returns the label set, the drift and any retrain's label set."""
    log.setLevel(logging.INFO)
    ws = Workspace.at(workspace)
    params = load_params(ws.params if ws.params.is_file() else None, overrides)
    if Path(images).is_dir() and not discover(Path(images)).images:  # a nightly inbox may well be empty
        log.info("no new images in %s: nothing to refresh", images)
        return {"labelset": None, "batch_id": None, "drift": None, "skipped": f"no images in {images}"}
    with workspace_lock(ws):
        before_work(ws, params)  # services answer (else stop before any work); a killed run's leftovers closed
        result = _refresh(ws, Path(images), batch, params)
    drift = result["drift"]
    if drift["drifted"] and params.refresh.retrain_on_drift and allow_retrain:
        log.warning("drift (%s): retraining on all the workspace's data", "; ".join(drift["reasons"]))
        result["retrain_labelset"] = retrain(workspace=str(ws.root), overrides=overrides)
    return result


def _refresh(ws: Workspace, images: Path, batch_name: str | None, params) -> dict[str, Any]:
    champ = champion_task(ws, params.track.model_prefix)
    batch = version_batch_task(
        ws, images, batch_name, params.version.remote, params.version.push, params.version.push_timeout
    )
    code = versioning.code_version()
    workspace_data = versioning.current_data_version(ws)
    data = {**batch.as_dict(), "remote": batch.remote}
    run_id = tracking.start_run(
        ws,
        params.track.experiment,
        run_name=f"refresh-{batch.batch_id}",
        params=params.as_dict(),
        tags={
            **lineage_tags(data, code, params),
            "autolabel.flow": "refresh",
            "autolabel.batch_id": batch.batch_id,
            **{f"autolabel.champion.{r}": f"{m.name}/{m.version}" for r, m in champ.models.items()},
        },
    )
    try:
        metrics = refresh_task(ws, params, champ, batch)
        tracking.log_metrics(ws, run_id, "refresh", metrics)
        context = {
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "prefect_flow_run_id": str(flow_run.get_id() or ""),
            "deployment_id": str(deployment.get_id() or "") or None,
            "mlflow_run_id": run_id,
            "mlflow_tracking_uri": tracking.tracking_uri(ws),
            "code": code,
            "workspace_data_md5": workspace_data["md5"],
        }
        path = publish_task(ws, params, champ, batch, context)
        tracking.log_artifacts(ws, run_id, path, f"labelset/{path.name}")
        tracking.set_tags(ws, run_id, {"autolabel.labelset_id": path.name, "autolabel.drift": str(metrics["drift"])})
        record_task(ws, batch.batch_id)
    except BaseException:
        tracking.end_run(ws, run_id, "FAILED")
        raise
    tracking.end_run(ws, run_id, "FINISHED")
    _drift_artifact(batch.batch_id, metrics, path)
    return {"labelset": str(path), "batch_id": batch.batch_id, "drift": metrics["drift"], "mlflow_run_id": run_id}


def _drift_artifact(batch_id: str, metrics: dict[str, Any], path: Path) -> None:
    d = metrics["drift"]
    lines = [
        f"# Refresh of batch `{batch_id}`",
        "",
        f"Label set `{path}`: {metrics['n_passed']} images labelled, {metrics['n_needs_review']} to review, "
        f"{metrics['n_quarantined']} quarantined.",
        "",
        "| drift signal | value |",
        "|---|---|",
        f"| far from their cluster | {d['far_share']:.3f} (threshold distance {d['far_threshold']:.4f}) |",
        f"| cluster-share PSI | {d['psi']:.3f} |",
        f"| mean shift (training std) | {d['mean_shift']:.3f} |",
        f"| drifted | {'yes: ' + '; '.join(d['reasons']) if d['drifted'] else 'no'} |",
    ]
    create_markdown_artifact(key="refresh-drift", markdown="\n".join(lines), description="Drift of a new batch")
