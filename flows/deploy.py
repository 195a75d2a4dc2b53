"""Scheduled operation: the refresh and retrain flows as deployments on a Prefect server's process work pool.

``register`` is what ``autolabel deploy`` runs; ``infra/prefect.yaml`` describes the same two deployments for
``prefect deploy``. A worker started on the pool (``prefect worker start --pool autolabel --type process``) runs
them: it pulls nothing, the pull step only moves into this project checkout (the flow code is read from there), so
the worker must run on this machine with this checkout's venv. Its environment is the flows' environment too:
``MLFLOW_TRACKING_URI``, the AWS keys of an S3 DVC remote, and so on.

Import this module only after ``PREFECT_API_URL`` is set (Prefect reads its settings at import).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flows import environment

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POOL = "autolabel"
REFRESH_CRON = "0 2 * * *"  # nightly at 02:00
RETRAIN_CRON = "0 3 * * 0"  # weekly, Sunday 03:00
DEFAULT_TIMEZONE = "UTC"
# quiet, offline-safe settings for the flow-run processes (job variables of the deployments; the worker's own
# environment comes first, these are applied over it): no telemetry, the autolabel logger in the Prefect UI
RUN_ENV = {k: v for k, v in environment.QUIET.items() if not k.startswith("PREFECT_SERVER_")}
TAGS = ["aoi-autolabel"]


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: which flow, when, with which parameters."""

    name: str
    entrypoint: str  # relative to the project checkout, "path/to/file.py:flow_function"
    cron: str
    parameters: dict[str, Any]
    description: str
    tags: list[str] = field(default_factory=lambda: list(TAGS))


class NoServerError(RuntimeError):
    """No Prefect server configured: deployments need one (the embedded mode has no scheduler nor worker)."""


def specs(
    inbox: Path,
    workspace: Path,
    refresh_cron: str = REFRESH_CRON,
    retrain_cron: str = RETRAIN_CRON,
    overrides: Sequence[str] = (),
) -> list[DeploymentSpec]:
    """The two deployments: ``refresh-nightly`` labels the inbox, ``retrain-weekly`` retrains on the workspace.

    Paths are made absolute: the flow runs start in the project checkout, not where this was called.
    """
    extra = {"overrides": list(overrides)} if overrides else {}
    workspace = Path(workspace).expanduser().resolve()
    return [
        DeploymentSpec(
            name="refresh-nightly",
            entrypoint="flows/refresh.py:refresh",
            cron=refresh_cron,
            parameters={"images": str(Path(inbox).expanduser().resolve()), "workspace": str(workspace), **extra},
            description="Label the inbox's new images with the @champion models; retrain when they drifted.",
        ),
        DeploymentSpec(
            name="retrain-weekly",
            entrypoint="flows/retrain.py:retrain",
            cron=retrain_cron,
            parameters={"workspace": str(workspace), **extra},
            description="Retrain on the workspace's own data (last image folder + every refreshed batch).",
        ),
    ]


def require_server() -> str:
    """The configured ``PREFECT_API_URL``; raises :class:`NoServerError` when there is none."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url:
        raise NoServerError(
            "deployments need a Prefect server: set PREFECT_API_URL (e.g. `source RUN_DIR/env.sh` after "
            "infra/local/up.sh RUN_DIR)"
        )
    return url


def ensure_work_pool(name: str, concurrency_limit: int | None = 1) -> bool:
    """Create the ``process`` work pool ``name`` when it is missing; returns whether it was created.

    The default concurrency limit of 1 serialises the pool's runs: both deployments work in one workspace, which
    takes one run at a time (DVC and git lock it), so a retrain waits for a running refresh instead of failing.
    An existing pool is left as it is.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            pass
        else:
            if pool.type != "process":
                raise ValueError(f"work pool {name!r} exists with type {pool.type!r}; these deployments need 'process'")
            return False
        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="process",
                # the process worker's own template: no lookup of worker metadata on the internet
                base_job_template=ProcessWorker.get_default_base_job_template(),
                concurrency_limit=concurrency_limit or None,
                description="aoi-autolabel: refresh and retrain runs in local processes",
            )
        )
        return True


def register(
    inbox: Path,
    workspace: Path,
    pool: str = DEFAULT_POOL,
    refresh_cron: str = REFRESH_CRON,
    retrain_cron: str = RETRAIN_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    overrides: Sequence[str] = (),
    project_dir: Path = PROJECT_ROOT,
    pool_concurrency: int | None = 1,
) -> dict[str, UUID]:
    """Create the work pool if missing and create or update both deployments; returns ``{"flow/name": id}``.

    Re-registering replaces the deployments' schedules and parameters (the scheduler drops the runs it had
    planned for the old schedule).
    """
    require_server()
    from prefect import Flow
    from prefect.schedules import Cron

    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r} (use an IANA name such as UTC or Europe/Berlin)") from None
    project_dir = Path(project_dir).resolve()
    wanted = specs(inbox, workspace, refresh_cron, retrain_cron, overrides)
    schedules = {spec.name: Cron(spec.cron, timezone=timezone) for spec in wanted}  # a bad cron stops here
    ensure_work_pool(pool, pool_concurrency)
    ids: dict[str, UUID] = {}
    for spec in wanted:
        # local source: the deployment's pull step is `set_working_directory: <project_dir>`, nothing is copied
        flow = Flow.from_source(source=str(project_dir), entrypoint=spec.entrypoint)
        deployment = flow.to_deployment(
            name=spec.name,
            schedules=[schedules[spec.name]],
            parameters=spec.parameters,
            description=spec.description,
            tags=spec.tags,
            job_variables={"env": dict(RUN_ENV)},
        )
        ids[f"{flow.name}/{spec.name}"] = deployment.apply(work_pool_name=pool)
    return ids
