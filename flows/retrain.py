"""The retrain flow: version → validate → standardize → embed → cluster → evaluate → track → publish.

Every step is a Prefect task around a stage function of ``tasks.stages`` (the same functions ``dvc repro`` runs),
every step logs to one MLflow run, and the flow ends by recording the stages in the workspace's ``dvc.lock`` so
``dvc status`` is clean and ``dvc repro`` knows the outputs are current.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock, Timeout
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run

from tasks import champion, parallel, stages, tracking, versioning
from tasks.config import Params, load_params, write_params
from tasks.preflight import before_work
from tasks.versioning import BackgroundDvc
from tasks.workspace import STAGES, Workspace

COMPUTE_STAGES = [name for name in STAGES if name != "publish"]

log = logging.getLogger("autolabel")


class WorkspaceBusyError(RuntimeError):
    """Another run holds the workspace."""


WARM_IMPORTS = ("great_expectations", "mlflow")
"""Libraries the steps right after ``version`` import on first use (validate: GX, 1.8 s; the MLflow run: 0.6-1.1 s).

Imported during the version step (mirror by hard links, then ``dvc add`` in a subprocess) they were ready ~1 s
sooner (10k images, idle machine: 5.6-6.0 s after the step's start instead of 6.6-7.0 s). Adding torch (2.3 s,
needed only at embed) gained nothing more; with the earlier copying mirror, whose Python loop holds the GIL,
nothing was gained at all."""


def warm_imports() -> threading.Thread:
    """Import :data:`WARM_IMPORTS` in a background thread while the version step waits on git and DVC subprocesses.

    The caller joins it before the next step: validate forks worker processes, and a fork in the middle of an
    import would leave that module's import lock held in the children. A failed import is left for the task that
    needs the module, which raises it with its own traceback.
    """

    def load() -> None:
        for name in WARM_IMPORTS:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001
                log.debug("warm import of %s failed", name, exc_info=True)

    thread = threading.Thread(target=load, name="warm-imports", daemon=True)
    thread.start()
    return thread


def _task(fn, name: str, retries: int = 0):
    return task(fn, name=name, cache_policy=NO_CACHE, retries=retries, retry_delay_seconds=5)


version_task = _task(versioning.version_data, "version", retries=2)
validate_task = _task(stages.run_validate, "validate")
standardize_task = _task(stages.run_standardize, "standardize")
embed_task = _task(stages.run_embed, "embed")
cluster_task = _task(stages.run_cluster, "cluster")
evaluate_task = _task(stages.run_evaluate, "evaluate")
annotate_task = _task(stages.run_annotate, "annotate")
track_task = _task(stages.run_track, "track", retries=2)
publish_task = _task(stages.run_publish, "publish")
localize_task = _task(stages.run_localize, "localize")


@task(name="record-dvc-lock", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def record_lock_task(ws: Workspace, push: bool, only: list[str] | None = None) -> str:
    """``dvc commit`` the stage outputs into dvc.lock (and push them), then commit it to the workspace's git.

    ``only``: the stages to commit (default all; :func:`publish_and_record` commits the compute stages beside
    publish and leaves only ``publish`` here). Only dvc.yaml's outputs are pushed: the data's .dvc files were pushed by
    the version step (push-data waited for it), and checking their 10k objects against the remote again cost
    0.2-0.5 s of nothing. ``--no-relink``: the outputs are already in the cache, and re-copying them over themselves
    took 0.5 s at 10k images.
    """
    versioning.dvc(["commit", "-f", "-q", "--no-relink", *(only or [])], ws.root)
    if push:
        versioning.dvc(["push", "-q", "dvc.yaml"], ws.root)
    versioning.git(["add", "-A", "--", "dvc.lock", "dvc.yaml", "params.yaml", "results", "human"], ws.root)
    if versioning.git(["status", "--porcelain", "--", "dvc.lock", "results"], ws.root).strip():
        versioning.git(["commit", "-q", "-m", "pipeline outputs"], ws.root)
    return versioning.git(["rev-parse", "HEAD"], ws.root).strip()


def mapper(params: Params, name: str) -> parallel.Mapper | None:
    """The parallel stages' chunks go to the task runner of ``params.runner`` (None: in-process, serial)."""
    return parallel.prefect_mapper(params.runner, name) if params.runner.kind == "dask" else None


def lineage_tags(data: dict[str, Any], code: dict[str, Any], params: Params) -> dict[str, str]:
    """The lineage tags of a run inside a Prefect flow (flow-run and deployment ids from Prefect's runtime)."""
    deployment_id = deployment.get_id()
    return tracking.lineage_tags(
        data, code, params.digest(), str(flow_run.get_id() or ""), str(deployment_id) if deployment_id else None
    )


@contextmanager
def workspace_lock(ws: Workspace) -> Iterator[None]:
    """One run at a time per workspace (DVC and git need it too); a second run stops with a clear message."""
    ws.root.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(ws.root / ".autolabel.lock", timeout=0):
            yield
    except Timeout:
        raise WorkspaceBusyError(f"another run is using the workspace {ws.root}; wait for it or use another") from None


def localize_images(ws: Workspace, params: Params, images: str | None, templates: str | None) -> str | None:
    """With templates, cut defect patches from the raw images and return the patch folder (what the run versions
    and labels); without, return ``images`` and forget an earlier run's patches when new raw images come in."""
    if templates is None:
        if images is not None:
            stages.clear_localize(ws)
        return images
    if images is None:
        raise ValueError("templates need the raw images they belong to (images)")
    localize_task(ws, params, Path(images), Path(templates))
    return str(ws.localized)


@flow(name="retrain", log_prints=True)
def retrain(
    images: str | None = None,
    workspace: str = "workspace",
    labels: str | None = None,
    params_file: str | None = None,
    overrides: list[str] | None = None,
    templates: str | None = None,
) -> str:
    """Train on a folder of images and publish a label set; returns the label set's path.

    Without ``images`` it retrains on the workspace's own data: the last image folder plus every batch a refresh
    added (what the weekly schedule and a drift-triggered retrain do).
    """
    log.setLevel(logging.INFO)
    ws = Workspace.at(workspace)
    if params_file is None and images is None and ws.params.is_file():
        params_file = str(ws.params)  # retraining the workspace's data: keep its params
    params = load_params(Path(params_file) if params_file else None, overrides)
    with workspace_lock(ws):
        before_work(ws, params)  # services answer (else stop before any work); a killed run's leftovers closed
        images = localize_images(ws, params, images, templates)
        return _retrain(ws, Path(images) if images else None, Path(labels) if labels else None, params)


def _retrain(ws: Workspace, images: Path | None, labels: Path | None, params: Params) -> str:
    write_params(params, ws.params)
    version = params.version
    warming = warm_imports()
    try:
        data = version_task(
            ws, images, labels, version.remote, version.push, version.push_timeout, background_push=True
        ).as_dict()
    finally:
        warming.join()
    # the ~750k objects of the imports so far (Prefect, GX, MLflow, pandas) live as long as the process: moved out of
    # the cyclic GC's reach, each full collection during the compute stages stops re-scanning them (one run: 12 full
    # collections took 3.2 s, against 1.8 s for the same stages without the flow's imports; bench/RESULTS.md)
    gc.freeze()
    try:
        code = versioning.code_version()
        run_id = tracking.start_run(
            ws,
            params.track.experiment,
            run_name=f"retrain-{flow_run.get_name() or 'local'}",
            params=params.as_dict(),
            tags=lineage_tags(data, code, params),
        )
    except BaseException:
        finish_push_quietly(ws)
        raise
    try:
        if (ws.stage_dir("localize") / "metrics.json").is_file():  # the images are defect patches (templates)
            tracking.log_metrics(ws, run_id, "localize", ws.read_json("localize"))
        metrics = validate_task(ws, params, mapper(params, "image-stats"))
        tracking.log_metrics(ws, run_id, "validate", metrics)
        index = pd.read_csv(ws.stage_dir("validate") / "stats.csv", usecols=["image", "file_sha256"])
        tracking.log_dataset(ws, run_id, index, name="images", source=data["remote"], digest=data["md5"])
        tracking.log_metrics(ws, run_id, "standardize", standardize_task(ws, params))
        tracking.log_metrics(ws, run_id, "embed", embed_task(ws, params, mapper(params, "embed-chunk")))
        tracking.log_metrics(ws, run_id, "cluster", cluster_task(ws, params))
        tracking.log_metrics(ws, run_id, "evaluate", evaluate_task(ws, params))
        retire_cluster_names(ws)
        tracking.log_metrics(ws, run_id, "annotate", annotate_task(ws, params))
        tracking.log_metrics(ws, run_id, "version", {"push_wait_seconds": push_task(ws) or 0.0})
        models = track_task(ws, params, run_id)
        models = gate_and_record(ws, params, run_id, models)
        path = publish_and_record(ws, params, run_id, data, code, models)
    except BaseException:
        finish_push_quietly(ws)
        tracking.end_run(ws, run_id, "FAILED")
        raise
    tracking.end_run(ws, run_id, "FINISHED")
    return str(path)


@task(name="push-data", cache_policy=NO_CACHE)
def push_task(ws: Workspace) -> float | None:
    """Wait for the version step's background ``dvc push`` (seconds waited), before models and the label set
    are recorded as trained on data that is in the remote."""
    return versioning.wait_for_push(ws.root)


def finish_push_quietly(ws: Workspace) -> None:
    """A failed run still lets its data push end (the data version is committed to the workspace's git already);
    a failed push is logged, never retried nor raised over the run's own error."""
    pending = versioning.take_push(ws.root)
    if pending is not None and pending.settle() != 0:
        log.warning("the data push of this failed run did not finish: `dvc %s`", " ".join(pending.args))


@task(name="champion-gate", cache_policy=NO_CACHE)
def gate_task(ws: Workspace, params: Params, models: dict[str, Any]) -> champion.GateDecision:
    return champion.gate(ws, params, models)


def gate_and_record(ws: Workspace, params: Params, run_id: str, models: dict[str, Any]) -> dict[str, Any]:
    """Run the champion gate, log its decision in MLflow and as a Prefect artifact; return the models' new aliases."""
    decision = gate_task(ws, params, models)
    rows = [
        ("decision", "promoted to @champion" if decision.promoted else "kept the current @champion"),
        ("reason", decision.reason),
        ("metric", decision.metric),
        ("challenger score", decision.challenger_score),
        ("champion score", decision.champion_score),
        ("challenger versions", decision.challenger),
        ("champion before", decision.champion_before),
        ("images scored", decision.n_images),
    ]
    create_markdown_artifact(
        key="champion-gate",
        markdown="\n".join(["# Champion gate", "", "| | |", "|---|---|", *(f"| {k} | `{v}` |" for k, v in rows)]),
        description="Champion/challenger decision of this retrain",
    )
    return champion.record(ws, run_id, decision, models)


def retire_cluster_names(ws: Workspace) -> None:
    """Cluster ids of a new clustering mean something else: move old cluster names aside (seeds stay valid)."""
    names = ws.human / "cluster_names.yaml"
    if names.is_file():
        old = ws.human / "superseded"
        old.mkdir(exist_ok=True)
        target = old / f"cluster_names-{flow_run.get_id() or 'previous'}.yaml"
        names.rename(target)
        log.warning("cluster names were made for the previous clustering; moved to %s", target)


def publish_and_record(
    ws: Workspace, params: Params, run_id: str, data: dict[str, Any], code: dict[str, Any], models: dict[str, Any]
) -> Path:
    """Publish the label set, link it from MLflow and Prefect, and record the outputs in dvc.lock and git."""
    context = stages.publish_context(
        ws, params, run_id, data, code, models, str(flow_run.get_id() or ""), str(deployment.get_id() or "") or None
    )
    ws.write_json("track", {"run_id": run_id, "data": data, "models": models}, name="context.json")
    # the compute stages' outputs are final: record them in dvc.lock beside publish (2 s at 10k images)
    committing = BackgroundDvc.start(["commit", "-f", "-q", "--no-relink", *COMPUTE_STAGES], ws.root)
    try:
        path = publish_task(ws, params, context)
    except BaseException:
        committing.settle()  # never leave a DVC process writing dvc.lock behind a failed run
        raise
    committing.wait()
    tracking.log_artifacts(ws, run_id, path, f"labelset/{path.name}")
    manifest = json.loads((path / "manifest.json").read_text())
    tracking.set_tags(ws, run_id, manifest_tags(manifest))
    record_lock_task(ws, params.version.push, only=["publish"])
    _publish_artifacts(ws, path)
    return path


def manifest_tags(manifest: dict[str, Any]) -> dict[str, str]:
    """The manifest's lineage facts as MLflow tags, so the chain can be walked from the MLflow UI too."""
    tags = {
        "autolabel.labelset_id": manifest["labelset_id"],
        "autolabel.quality_suite_sha256": manifest["quality"]["suite_sha256"],
        "autolabel.quality_passed": str(manifest["quality"]["n_passed"]),
        "autolabel.quality_quarantined": str(manifest["quality"]["n_quarantined"]),
        "autolabel.human_inputs_hash": manifest["human_inputs"]["hash"],
        "autolabel.cluster_names_sha256": str(manifest["human_inputs"]["cluster_names_sha256"]),
        "autolabel.seed_labels_sha256": str(manifest["human_inputs"]["seed_labels_sha256"]),
        "autolabel.labels_sha256": manifest["labels_sha256"],
    }
    for role, model in manifest.get("models", {}).items():
        tags[f"autolabel.model.{role}"] = f"{model['name']}/{model['version']} {','.join(model.get('aliases', []))}"
    return tags


def _publish_artifacts(ws: Workspace, path: Path) -> None:
    """Prefect artifacts: cluster sizes, and the label set with the same lineage facts as the MLflow tags."""
    manifest = json.loads((path / "manifest.json").read_text())
    m = manifest["metrics"]
    create_table_artifact(
        key="cluster-sizes",
        table=[{"cluster": int(c), "images": n} for c, n in m["cluster_sizes"].items()],
        description=f"Cluster sizes of label set {path.name}",
    )
    facts = {
        "label set path": str(path),
        "Prefect flow run": manifest["prefect"]["flow_run_id"],
        "Prefect deployment": manifest["prefect"]["deployment_id"],
        "MLflow run": manifest["mlflow"]["run_id"],
        "MLflow experiment": manifest["mlflow"]["experiment"],
        "code (git commit, dirty)": f"{manifest['code']['git_commit']} {manifest['code']['git_dirty']}",
        "data (DVC md5)": manifest["data"]["md5"],
        "data remote": manifest["data"]["remote"],
        "data files": manifest["data"]["nfiles"],
        "params hash": manifest["params_hash"],
        **{k.removeprefix("autolabel."): v for k, v in manifest_tags(manifest).items()},
    }
    lines = [f"# Label set `{path.name}`", "", "| fact | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in facts.items()]
    if m.get("acc") is not None:
        lines.append(
            f"\nACC {m['acc']:.3f}, NMI {m['nmi']:.3f}, ARI {m['ari']:.3f}, macro recall {m['macro_recall']:.3f}"
        )
    create_markdown_artifact(key="labelset", markdown="\n".join(lines), description="Published label set")
