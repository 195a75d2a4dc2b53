"""MLflow: one run per pipeline run, its lineage tags, and the registered models.

With no ``MLFLOW_TRACKING_URI`` the store is ``sqlite:///<workspace>/mlflow.db`` (with the model registry) and
artifacts go to ``<workspace>/mlartifacts``; a real ``mlflow server`` is used by setting the variable only.
MLflow does not record the git commit under Prefect, so lineage tags are set explicitly.

A tracking server is checked before a run starts (:func:`check_tracking_server`: ``/health`` with bounded retries,
then an error naming the server), and MLflow's own HTTP retries, normally minutes long, are bounded by
``track.retries``/``backoff``/``timeout`` (:func:`configure_http`). What is recorded or raised never carries the
credentials of the tracking URI (:mod:`tasks.secrets`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.retry import Backoff, ServiceUnavailableError, retry
from tasks.secrets import redact, redact_obj, redact_url
from tasks.workspace import Workspace

TAG_PREFIX = "autolabel."


class TrackingError(RuntimeError):
    """An MLflow call failed; the message is MLflow's, with credentials masked."""


def _connect_uri(ws: Workspace) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ws.mlflow_db}"


def tracking_uri(ws: Workspace) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the workspace's sqlite store: as recorded (credentials masked)."""
    return redact_url(_connect_uri(ws))


def configure_http(retries: int, backoff: float, timeout: float) -> None:
    """Bound MLflow's own HTTP retries (by default ~7 retries with backoff and a 120 s timeout: minutes)."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(math.ceil(backoff))  # MLflow reads an int ("1.0" fails)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout)))


def end_orphaned_runs(ws: Workspace) -> list[str]:
    """Mark runs of the workspace's own store that are still RUNNING as KILLED; return their ids.

    Only call this holding the workspace lock: then no run of this store is alive, and a RUNNING one is what a
    killed process left behind. A shared tracking server is left alone (other workspaces' runs live there).
    """
    if os.environ.get("MLFLOW_TRACKING_URI") or not ws.mlflow_db.is_file():
        return []
    from mlflow.entities import RunTag, ViewType

    client = mlflow_client(ws)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not experiments:
        return []
    stale = client.search_runs(experiments, "attributes.status = 'RUNNING'", run_view_type=ViewType.ALL)
    for run in stale:
        client.log_batch(run.info.run_id, tags=[RunTag("autolabel.ended", "killed: found RUNNING by a later run")])
        client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in stale]


def check_tracking_server(ws: Workspace, retries: int, backoff: float, timeout: float) -> None:
    """Before any work: the tracking server answers ``/health`` (HTTP URIs only; local stores need no check).

    Raises:
        ServiceUnavailableError: "MLflow tracking server at <uri> is unreachable after N attempts over S s: ...".
    """
    configure_http(retries, backoff, timeout)
    uri = _connect_uri(ws)
    if not uri.lower().startswith(("http://", "https://")):
        return
    import requests

    def health() -> None:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        if response.status_code >= 500:
            raise ConnectionError(f"HTTP {response.status_code} from /health")

    retry(
        health,
        f"MLflow tracking server at {redact_url(uri)}",
        Backoff(attempts=retries + 1, first=backoff),
        retry_on=(OSError, requests.RequestException),
    )


@contextmanager
def _masked_errors() -> Iterator[None]:
    """MLflow's exceptions quote the request URL, credentials included: re-raise them masked."""
    try:
        yield
    except ServiceUnavailableError:
        raise
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        masked = redact(text)
        if masked == text:
            raise
        raise TrackingError(masked) from None


def mlflow_for(ws: Workspace):
    """mlflow, pointed at the workspace's store without leaking it into ``MLFLOW_TRACKING_URI``.

    ``mlflow.set_tracking_uri`` also exports the variable; left there, the next workspace in the same process
    would be mistaken for a configured server.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    user = os.environ.get("MLFLOW_TRACKING_URI")
    uri = _connect_uri(ws)
    if user is None:
        from tasks.dbtemplates import mlflow_store

        mlflow_store(ws.mlflow_db)  # a new workspace's store starts migrated (6 s of MLflow's migrations otherwise)
    if redact_url(uri) != uri:  # MLflow prints "View run at <tracking URI>/#/..." with the credentials in it
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)
    if user is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user
    return mlflow


def mlflow_client(ws: Workspace):
    from mlflow import MlflowClient

    mlflow_for(ws)
    return MlflowClient()


def start_run(ws: Workspace, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Create the run (status RUNNING) with flattened params and lineage tags (credentials masked); return its id."""
    with _masked_errors():
        client = mlflow_client(ws)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            location = None if os.environ.get("MLFLOW_TRACKING_URI") else ws.mlflow_artifacts.as_uri()
            exp_id = client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=run_name, tags={k: redact(str(v)) for k, v in tags.items()})
        from mlflow.entities import Param

        flat = _flatten(redact_obj(params))
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
        "autolabel.data_remote": redact_url(str(data.get("remote"))),
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

    client = mlflow_client(ws)
    now = int(time.time() * 1000)
    values = [
        Metric(f"{stage}.{k}"[:250].replace(" ", "_"), float(v), now, 0)
        for k, v in _flatten(metrics).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]
    with _masked_errors():
        for i in range(0, len(values), 500):
            client.log_batch(run_id, metrics=values[i : i + 500])


def set_tags(ws: Workspace, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    with _masked_errors():
        mlflow_client(ws).log_batch(run_id, tags=[RunTag(k, redact(str(v))[:5000]) for k, v in tags.items()])


def log_dataset(ws: Workspace, run_id: str, index: Any, name: str, source: str, digest: str) -> None:
    """Record the data version as the run's input dataset (digest = DVC md5).

    Through the client, not ``with mlflow.start_run(run_id)``: leaving that block ends the run as FINISHED, and a
    run killed later would then look complete.
    """
    import warnings

    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    mlflow = mlflow_for(ws)
    with warnings.catch_warnings():  # a local path matches two equivalent local source types
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(index, source=redact_url(source), name=name, digest=digest)
    entry = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])
    with _masked_errors():
        mlflow_client(ws).log_inputs(run_id, datasets=[entry])


def log_artifacts(ws: Workspace, run_id: str, folder: Path, artifact_path: str) -> None:
    with _masked_errors():
        mlflow_client(ws).log_artifacts(run_id, str(folder), artifact_path)


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
    ws: Workspace, run_id: str, prefix: str, embedder_path: Path, clusterer_path: Path, params_path: Path
) -> dict[str, RegisteredModel]:
    """Log and register the embedder and clusterer as MLflow ``pyfunc`` models, aliased ``@challenger``.

    Both wrap the stage outputs (``embed/model.pt``: tensors only, no pickle of code; ``cluster/model.pkl``: numpy
    arrays) with :mod:`tasks.serving`, and carry the ``tasks`` package as code, so that a refresh flow can embed
    and assign a new batch with the champions; the embedder also carries the run's ``params.yaml`` (a new batch
    must be standardised as the training images were). ``@champion`` moves only through :mod:`tasks.champion`'s
    gate. ``pip_requirements`` is explicit: inferring it costs ~17 s a model.
    """
    from tasks.serving import ClustererModel, EmbedderModel

    mlflow = mlflow_for(ws)
    client = mlflow_client(ws)
    code = [str(Path(__file__).resolve().parent)]
    out: dict[str, RegisteredModel] = {}
    with mlflow.start_run(run_id=run_id):
        info_e = mlflow.pyfunc.log_model(
            name="embedder",
            python_model=EmbedderModel(),
            artifacts={"model": str(embedder_path), "params": str(params_path)},
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
    # Leaving the ``with`` block ended the run as FINISHED, but the flow still has to publish: put it back to
    # RUNNING at once, so that a crash during publish leaves a RUNNING run that the next start marks KILLED
    # (end_orphaned_runs) instead of a FINISHED run without a label set.
    client.update_run(run_id, status="RUNNING")
    for role, info in (("embedder", info_e), ("clusterer", info_c)):
        name = f"{prefix}-{role}"
        version = str(info.registered_model_version)
        client.set_registered_model_alias(name, "challenger", version)
        out[role] = registered(ws, name, version)
    return out


def registered(ws: Workspace, name: str, version: str) -> RegisteredModel:
    """A registered model version with its current aliases."""
    aliases = mlflow_client(ws).get_registered_model(name).aliases or {}
    version = str(version)
    tags = sorted(a for a, v in aliases.items() if str(v) == version)
    return RegisteredModel(name=name, version=version, aliases=tags, uri=f"models:/{name}/{version}")


def end_run(ws: Workspace, run_id: str, status: str = "FINISHED") -> None:
    with _masked_errors():
        mlflow_client(ws).set_terminated(run_id, status=status)
