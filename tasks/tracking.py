"""MLflow: one run per pipeline run, its lineage tags, and the registered models.

With no ``MLFLOW_TRACKING_URI`` the store is ``sqlite:///<workspace>/mlflow.db`` (with the model registry) and
artifacts go to ``<workspace>/mlartifacts``; a real ``mlflow server`` is used by setting the variable only.
MLflow does not record the git commit under Prefect, so lineage tags are set explicitly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.workspace import Workspace

TAG_PREFIX = "autolabel."


def tracking_uri(ws: Workspace) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the workspace's sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ws.mlflow_db}"


def _mlflow(ws: Workspace):
    """mlflow, pointed at the workspace's store without leaking it into ``MLFLOW_TRACKING_URI``.

    ``mlflow.set_tracking_uri`` also exports the variable; left there, the next workspace in the same process
    would be mistaken for a configured server.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    user = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri(ws))
    if user is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user
    return mlflow


def _client(ws: Workspace):
    from mlflow import MlflowClient

    _mlflow(ws)
    return MlflowClient()


def start_run(ws: Workspace, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Create the run (status RUNNING) with flattened params and lineage tags; return its id."""
    client = _client(ws)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None if os.environ.get("MLFLOW_TRACKING_URI") else ws.mlflow_artifacts.as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    from mlflow.entities import Param

    flat = _flatten(params)
    batch = [Param(k, str(v)[:6000]) for k, v in flat.items()]
    for i in range(0, len(batch), 100):
        client.log_batch(run.info.run_id, params=batch[i : i + 100])
    return run.info.run_id


def lineage_tags(
    data: dict[str, Any],
    code: dict[str, Any],
    params_hash: str,
    flow_run_id: str | None = None,
    deployment_id: str | None = None,
) -> dict[str, str]:
    """The lineage facts set as run tags (the same ones the manifest holds), for every driver."""
    tags = {
        "mlflow.source.git.commit": code["git_commit"],
        "autolabel.git_commit": code["git_commit"],
        "autolabel.git_dirty": str(code["git_dirty"]).lower(),
        "autolabel.package_version": code["package_version"],
        "autolabel.data_md5": data["md5"],
        "autolabel.data_nfiles": str(data.get("nfiles")),
        "autolabel.data_remote": str(data.get("remote")),
        "autolabel.params_hash": params_hash,
        "autolabel.prefect_flow_run_id": flow_run_id or "",
    }
    if deployment_id:
        tags["autolabel.prefect_deployment_id"] = deployment_id
    return tags


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def log_metrics(ws: Workspace, run_id: str, stage: str, metrics: dict[str, Any]) -> None:
    """Log every finite number in ``metrics`` (nested dicts flattened) as ``<stage>.<key>``."""
    import time

    from mlflow.entities import Metric

    client = _client(ws)
    now = int(time.time() * 1000)
    values = [
        Metric(f"{stage}.{k}"[:250].replace(" ", "_"), float(v), now, 0)
        for k, v in _flatten(metrics).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]
    for i in range(0, len(values), 500):
        client.log_batch(run_id, metrics=values[i : i + 500])


def set_tags(ws: Workspace, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client = _client(ws)
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def log_dataset(ws: Workspace, run_id: str, index: Any, name: str, source: str, digest: str) -> None:
    """Record the data version as the run's input dataset (digest = DVC md5)."""
    import warnings

    mlflow = _mlflow(ws)
    with warnings.catch_warnings():  # a local path matches two equivalent local source types
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(index, source=source, name=name, digest=digest)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(dataset, context="training")


def log_artifacts(ws: Workspace, run_id: str, folder: Path, artifact_path: str) -> None:
    _client(ws).log_artifacts(run_id, str(folder), artifact_path)


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    aliases: list[str]
    uri: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "aliases": self.aliases, "uri": self.uri}


def _pins(*packages: str) -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in packages]


def log_models(
    ws: Workspace, run_id: str, prefix: str, embedder_path: Path, clusterer_path: Path
) -> dict[str, RegisteredModel]:
    """Log and register the embedder and clusterer as MLflow ``pyfunc`` models; set ``@champion`` when none exists.

    Both wrap the stage outputs (``embed/model.pt``: tensors only, no pickle of code; ``cluster/model.pkl``: numpy
    arrays) with :mod:`tasks.serving`, and carry the ``tasks`` package as code, so that a refresh flow can embed
    and assign a new batch with the champions. ``pip_requirements`` is explicit: inferring it costs ~17 s a model.
    """
    from tasks.serving import ClustererModel, EmbedderModel

    mlflow = _mlflow(ws)
    client = _client(ws)
    code = [str(Path(__file__).resolve().parent)]
    out: dict[str, RegisteredModel] = {}
    with mlflow.start_run(run_id=run_id):
        info_e = mlflow.pyfunc.log_model(
            name="embedder",
            python_model=EmbedderModel(),
            artifacts={"model": str(embedder_path)},
            code_paths=code,
            registered_model_name=f"{prefix}-embedder",
            pip_requirements=_pins(
                "torch", "torchvision", "numpy", "scipy", "scikit-image", "scikit-learn", "pydantic"
            ),
        )
        info_c = mlflow.pyfunc.log_model(
            name="clusterer",
            python_model=ClustererModel(),
            artifacts={"model": str(clusterer_path)},
            code_paths=code,
            registered_model_name=f"{prefix}-clusterer",
            pip_requirements=_pins("numpy", "scikit-learn", "joblib", "pandas", "pydantic"),
        )
    for role, info in (("embedder", info_e), ("clusterer", info_c)):
        name = f"{prefix}-{role}"
        version = str(info.registered_model_version)
        model = client.get_registered_model(name)
        if "champion" not in (model.aliases or {}):
            client.set_registered_model_alias(name, "champion", version)
        aliases = sorted(a for a, v in (client.get_registered_model(name).aliases or {}).items() if str(v) == version)
        out[role] = RegisteredModel(name=name, version=version, aliases=aliases, uri=f"models:/{name}/{version}")
    return out


def end_run(ws: Workspace, run_id: str, status: str = "FINISHED") -> None:
    _client(ws).set_terminated(run_id, status=status)
