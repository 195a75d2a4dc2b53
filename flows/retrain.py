"""The retrain flow: version → validate → standardize → embed → cluster → evaluate → track → publish.

Every step is a Prefect task around a stage function of ``tasks.stages`` (the same functions ``dvc repro`` runs),
every step logs to one MLflow run, and the flow ends by recording the stages in the workspace's ``dvc.lock`` so
``dvc status`` is clean and ``dvc repro`` knows the outputs are current.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run

from tasks import stages, tracking, versioning
from tasks.config import Params, load_params, write_params
from tasks.workspace import Workspace

log = logging.getLogger("autolabel")


class WorkspaceBusyError(RuntimeError):
    """Another run holds the workspace."""


def _task(fn, name: str, retries: int = 0):
    return task(fn, name=name, cache_policy=NO_CACHE, retries=retries, retry_delay_seconds=5)


version_task = _task(versioning.version_data, "version", retries=2)
validate_task = _task(stages.run_validate, "validate")
standardize_task = _task(stages.run_standardize, "standardize")
embed_task = _task(stages.run_embed, "embed")
cluster_task = _task(stages.run_cluster, "cluster")
evaluate_task = _task(stages.run_evaluate, "evaluate")
track_task = _task(stages.run_track, "track", retries=2)
publish_task = _task(stages.run_publish, "publish")


@task(name="record-dvc-lock", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def record_lock_task(ws: Workspace, push: bool) -> str:
    """``dvc commit`` the stage outputs into dvc.lock (and push them), then commit it to the workspace's git."""
    versioning.dvc(["commit", "-f", "-q"], ws.root)
    if push:
        versioning.dvc(["push", "-q"], ws.root)
    versioning.git(["add", "-A", "--", "dvc.lock", "dvc.yaml", "params.yaml", "results"], ws.root)
    if versioning.git(["status", "--porcelain", "--", "dvc.lock", "results"], ws.root).strip():
        versioning.git(["commit", "-q", "-m", "pipeline outputs"], ws.root)
    return versioning.git(["rev-parse", "HEAD"], ws.root).strip()


def lineage_tags(data: dict[str, Any], code: dict[str, Any], params: Params) -> dict[str, str]:
    """The lineage facts set as MLflow tags (the same ones the manifest holds)."""
    tags = {
        "mlflow.source.git.commit": code["git_commit"],
        "autolabel.git_commit": code["git_commit"],
        "autolabel.git_dirty": str(code["git_dirty"]).lower(),
        "autolabel.package_version": code["package_version"],
        "autolabel.data_md5": data["md5"],
        "autolabel.data_nfiles": str(data["nfiles"]),
        "autolabel.data_remote": data["remote"],
        "autolabel.params_hash": params.digest(),
        "autolabel.prefect_flow_run_id": str(flow_run.get_id() or ""),
    }
    if deployment.get_id():
        tags["autolabel.prefect_deployment_id"] = str(deployment.get_id())
    return tags


@flow(name="retrain", log_prints=True)
def retrain(
    images: str,
    workspace: str = "workspace",
    labels: str | None = None,
    params_file: str | None = None,
    overrides: list[str] | None = None,
) -> str:
    """Train on a folder of images and publish a label set; returns the label set's path."""
    params = load_params(Path(params_file) if params_file else None, overrides)
    ws = Workspace.at(workspace)
    ws.root.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(ws.root / ".autolabel.lock", timeout=0):
            return _retrain(ws, Path(images), Path(labels) if labels else None, params)
    except Timeout:
        raise WorkspaceBusyError(f"another run is using the workspace {ws.root}; wait for it or use another") from None


def _retrain(ws: Workspace, images: Path, labels: Path | None, params: Params) -> str:
    write_params(params, ws.params)
    data = version_task(ws, images, labels, params.version.remote, params.version.push).as_dict()
    code = versioning.code_version()
    run_id = tracking.start_run(
        ws,
        params.track.experiment,
        run_name=f"retrain-{flow_run.get_name() or 'local'}",
        params=params.as_dict(),
        tags=lineage_tags(data, code, params),
    )
    try:
        metrics = validate_task(ws, params)
        tracking.log_metrics(ws, run_id, "validate", metrics)
        import pandas as pd

        index = pd.read_csv(ws.stage_dir("validate") / "stats.csv", usecols=["image", "file_sha256"])
        tracking.log_dataset(ws, run_id, index, name="images", source=data["remote"], digest=data["md5"])
        for stage_task, name in (
            (standardize_task, "standardize"),
            (embed_task, "embed"),
            (cluster_task, "cluster"),
            (evaluate_task, "evaluate"),
        ):
            tracking.log_metrics(ws, run_id, name, stage_task(ws, params))
        models = track_task(ws, params, run_id)
        context = {
            "data": data,
            "code": code,
            "models": models,
            "mlflow_run_id": run_id,
            "mlflow_experiment": params.track.experiment,
            "mlflow_tracking_uri": tracking.tracking_uri(ws),
            "prefect_flow_run_id": str(flow_run.get_id() or ""),
            "prefect_deployment_id": str(deployment.get_id() or "") or None,
        }
        path = publish_task(ws, params, context)
        tracking.log_artifacts(ws, run_id, path, f"labelset/{path.name}")
        tracking.set_tags(ws, run_id, {"autolabel.labelset_id": path.name, "autolabel.labelset_path": str(path)})
        record_lock_task(ws, params.version.push)
        _publish_artifacts(ws, path)
    except BaseException:
        tracking.end_run(ws, run_id, "FAILED")
        raise
    tracking.end_run(ws, run_id, "FINISHED")
    return str(path)


def _publish_artifacts(ws: Workspace, path: Path) -> None:
    """Prefect artifacts: cluster sizes and a pointer to the label set."""
    import json

    manifest = json.loads((path / "manifest.json").read_text())
    sizes = manifest["metrics"]["cluster_sizes"]
    create_table_artifact(
        key="cluster-sizes",
        table=[{"cluster": int(c), "images": n} for c, n in sizes.items()],
        description=f"Cluster sizes of label set {path.name}",
    )
    m = manifest["metrics"]
    quality = manifest["quality"]
    lines = [
        f"# Label set `{path.name}`",
        f"- path: `{path}`",
        f"- images labelled: {m['n_images']}, quarantined: {quality['n_quarantined']}, clusters: {m['n_clusters']}",
        f"- data (DVC md5): `{manifest['data']['md5']}`; code: `{manifest['code']['git_commit']}`",
        f"- MLflow run: `{manifest['mlflow']['run_id']}`",
    ]
    if m.get("acc") is not None:
        lines.append(
            f"- ACC {m['acc']:.3f}, NMI {m['nmi']:.3f}, ARI {m['ari']:.3f}, macro recall {m['macro_recall']:.3f}"
        )
    create_markdown_artifact(key="labelset", markdown="\n".join(lines), description="Published label set")
