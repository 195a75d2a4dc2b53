"""Scheduled operation: the deployments of flows/deploy.py run by a process worker against the real servers.

One module-scoped setup registers ``refresh-nightly`` and ``retrain-weekly`` with ``autolabel deploy`` (as an operator
would, in a subprocess with the services' environment) and starts ``prefect worker start --pool ... --type process``
in another folder (so the deployment's pull step must move it into the checkout). Then: infra/prefect.yaml registers
the same deployments; a triggered retrain and refresh complete through the worker and land in the MLflow server with
``@champion``; a one-minute cron makes a run by itself that completes. Everything is asserted on the servers.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, Services, service_env, stop_process

pytestmark = pytest.mark.services

BIN = Path(sys.executable).parent
POOL = "autolabel"
PREFIX = f"deploytest-{uuid.uuid4().hex[:8]}"  # models and experiment of this module only
ISOLATED = [f"track.model_prefix={PREFIX}", f"track.experiment={PREFIX}"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
TIMINGS: dict[str, float] = {}  # printed at the end of the module (pytest -s)


def api(services: Services, method: str, path: str, body: dict | None = None):
    response = httpx.request(method, f"{services.prefect_api_url}/{path.lstrip('/')}", json=body, timeout=30)
    response.raise_for_status()
    return response.json() if response.content else None


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else f"({path} missing)"


class Env:
    """What the module's tests share."""

    def __init__(self, services: Services, root: Path, worker: subprocess.Popen):
        self.services = services
        self.root = root
        self.worker = worker
        self.worker_log = services.run_dir / "logs" / "worker.log"
        self.ws = root / "ws"
        self.synth = root / "synth"
        self.inbox = root / "inbox"  # refresh-nightly's default batch
        self.cron_inbox = root / "inbox-cron"

    def deployment(self, name: str) -> dict:
        return api(self.services, "GET", f"deployments/name/{name}")

    def trigger(self, name: str, parameters: dict) -> dict:
        deployment = self.deployment(name)
        return api(self.services, "POST", f"deployments/{deployment['id']}/create_flow_run", {"parameters": parameters})

    def wait(self, run_id: str, timeout_s: float, what: str) -> dict:
        """Poll the flow run until it ends; fail with the worker's log when it does not complete in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            run = api(self.services, "GET", f"flow_runs/{run_id}")
            if run["state_type"] in TERMINAL or time.monotonic() > deadline:
                break
            assert self.worker.poll() is None, f"the worker exited ({self.worker.returncode}):\n{tail(self.worker_log)}"
            time.sleep(3)
        assert run["state_type"] == "COMPLETED", (
            f"{what}: flow run {run['name']} is {run['state_type']} ({run['state_name']}) after {timeout_s} s; "
            f"state message: {(run.get('state') or {}).get('message')}\n--- worker log ---\n{tail(self.worker_log)}"
        )
        return run

    def states(self, run_id: str) -> dict[str, datetime]:
        """First time the run entered each state type."""
        seen: dict[str, datetime] = {}
        for state in sorted(
            api(self.services, "GET", f"flow_run_states/?flow_run_id={run_id}"), key=lambda s: s["timestamp"]
        ):
            seen.setdefault(state["type"], parse_time(state["timestamp"]))
        return seen


def autolabel_deploy(services: Services, *args: str) -> tuple[dict[str, str], float]:
    """``autolabel deploy ARGS`` in a subprocess with the services' environment; ``{flow/name: id}`` and seconds."""
    t0 = time.monotonic()
    done = subprocess.run(
        [str(BIN / "autolabel"), "deploy", *args],
        env=services.subprocess_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.monotonic() - t0
    assert done.returncode == 0, f"autolabel deploy failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    ids = dict(line.split() for line in done.stdout.strip().splitlines())
    assert set(ids) == {"refresh/refresh-nightly", "retrain/retrain-weekly"}, done.stdout
    return ids, took


def copy_images(src: Path, dest: Path, names: list[str]) -> None:
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, dest / name)


@pytest.fixture(scope="module")
def env(services: Services, tmp_path_factory) -> Iterator[Env]:
    import pandas as pd

    from tasks.synthetic import generate

    root = tmp_path_factory.mktemp("deployments")
    generate(root / "synth", n=60, seed=1)
    generate(root / "more", n=50, seed=2)
    planted = set(pd.read_csv(root / "more" / "planted.csv").iloc[:, 0].astype(str))
    good = [p for p in pd.read_csv(root / "more" / "labels.csv").iloc[:, 0].astype(str) if p not in planted]
    copy_images(root / "more", root / "inbox", good[:12])  # two small batches that share no image
    copy_images(root / "more", root / "inbox-cron", good[12:24])

    ids, took = autolabel_deploy(services, "--inbox", str(root / "inbox"), "--workspace", str(root / "ws"))
    TIMINGS["register both deployments (autolabel deploy, s)"] = took
    # the worker starts outside the checkout: only the deployments' pull step brings the runs there
    elsewhere = root / "worker-cwd"
    elsewhere.mkdir()
    worker = services.spawn(
        "worker",
        ["env", "-C", str(elsewhere), str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
        env=services.subprocess_env(),
    )
    state = Env(services, root, worker)
    try:
        yield state
    finally:
        stop_process(worker)
        for name in ids:  # the one-minute cron would go on making runs for as long as the server lives
            deployment_id = api(services, "GET", f"deployments/name/{name}")["id"]
            api(services, "PATCH", f"deployments/{deployment_id}", {"paused": True})
        print("\n" + "\n".join(f"  {k}: {v:.1f}" for k, v in TIMINGS.items()))


def comparable(deployment: dict) -> dict:
    keys = ("entrypoint", "parameters", "pull_steps", "job_variables", "work_pool_name", "tags", "paused")
    out = {k: deployment[k] for k in keys}
    out["schedules"] = [(s["schedule"], s["active"]) for s in deployment["schedules"]]
    return out


# --------------------------------------------------------------------------------------------------------------
def test_deployments_are_registered_with_their_schedules(env: Env):
    pool = api(env.services, "GET", f"work_pools/{POOL}")
    assert pool["type"] == "process" and pool["concurrency_limit"] == 1
    refresh = env.deployment("refresh/refresh-nightly")
    retrain = env.deployment("retrain/retrain-weekly")
    assert [s["schedule"] for s in refresh["schedules"]] == [{"cron": "0 2 * * *", "timezone": "UTC", "day_or": True}]
    assert [s["schedule"] for s in retrain["schedules"]] == [{"cron": "0 3 * * 0", "timezone": "UTC", "day_or": True}]
    assert refresh["parameters"] == {"images": str(env.inbox), "workspace": str(env.ws)}
    assert retrain["parameters"] == {"workspace": str(env.ws)}
    step = {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    assert refresh["pull_steps"] == retrain["pull_steps"] == [step]
    assert refresh["entrypoint"] == "flows/refresh.py:refresh"
    assert retrain["entrypoint"] == "flows/retrain.py:retrain"
    assert refresh["work_pool_name"] == retrain["work_pool_name"] == POOL
    # the scheduler has planned the next nights
    runs = api(
        env.services,
        "POST",
        "flow_runs/filter",
        {"flow_runs": {"deployment_id": {"any_": [refresh["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}},
    )
    deadline = time.monotonic() + 60
    while not runs and time.monotonic() < deadline:
        time.sleep(3)
        runs = api(
            env.services,
            "POST",
            "flow_runs/filter",
            {"flow_runs": {"deployment_id": {"any_": [refresh["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}},
        )
    assert runs, "the scheduler planned no run of refresh-nightly"
    assert {parse_time(r["expected_start_time"]).strftime("%H:%M") for r in runs} == {"02:00"}


def test_prefect_yaml_describes_the_same_deployments(env: Env):
    before = {name: comparable(env.deployment(name)) for name in ("refresh/refresh-nightly", "retrain/retrain-weekly")}
    t0 = time.monotonic()
    done = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all"],
        env=env.services.subprocess_env(
            AUTOLABEL_PROJECT_DIR=str(ROOT), AUTOLABEL_INBOX=str(env.inbox), AUTOLABEL_WORKSPACE=str(env.ws)
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    TIMINGS["register both deployments (prefect deploy infra/prefect.yaml, s)"] = time.monotonic() - t0
    assert done.returncode == 0, f"prefect deploy failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    after = {name: comparable(env.deployment(name)) for name in before}
    assert after == before


def test_worker_runs_a_triggered_retrain_then_refresh(env: Env, fast_overrides: list[str]):
    t0 = time.monotonic()
    overrides = [*fast_overrides, *ISOLATED]
    retrain = env.trigger("retrain/retrain-weekly", {"images": str(env.synth), "overrides": overrides})
    done = env.wait(retrain["id"], 600, "triggered retrain")
    TIMINGS["triggered retrain, creation to completed (s)"] = time.monotonic() - t0
    states = env.states(retrain["id"])
    TIMINGS["worker pickup: triggered run created -> PENDING (s)"] = (
        states["PENDING"] - parse_time(retrain["created"])
    ).total_seconds()
    TIMINGS["flow-run process start: PENDING -> RUNNING (s)"] = (states["RUNNING"] - states["PENDING"]).total_seconds()
    assert done["deployment_id"] == env.deployment("retrain/retrain-weekly")["id"]

    t0 = time.monotonic()
    refresh = env.trigger("refresh/refresh-nightly", {"allow_retrain": False})  # images: the deployment's inbox
    env.wait(refresh["id"], 420, "triggered refresh")
    TIMINGS["triggered refresh, creation to completed (s)"] = time.monotonic() - t0

    with service_env(env.services, MLFLOW_DISABLE_TELEMETRY="true"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=env.services.mlflow_tracking_uri)
        experiment = client.get_experiment_by_name(PREFIX)
        assert experiment is not None, f"no experiment {PREFIX} on the MLflow server"
        runs = {
            r.data.tags.get("autolabel.prefect_flow_run_id"): r
            for r in client.search_runs([experiment.experiment_id], max_results=50)
        }
        champions = {
            role: client.get_model_version_by_alias(f"{PREFIX}-{role}", "champion")
            for role in ("embedder", "clusterer")
        }
    assert set(runs) >= {retrain["id"], refresh["id"]}, sorted(runs)
    for run, deployment in (
        (runs[retrain["id"]], "retrain/retrain-weekly"),
        (runs[refresh["id"]], "refresh/refresh-nightly"),
    ):
        assert run.info.status == "FINISHED"
        assert run.data.tags["autolabel.prefect_deployment_id"] == env.deployment(deployment)["id"]
    assert runs[refresh["id"]].data.tags["autolabel.flow"] == "refresh"
    assert {v.run_id for v in champions.values()} == {runs[retrain["id"]].info.run_id}
    labelsets = [p for p in (env.ws / "labelsets").iterdir() if (p / "manifest.json").is_file()]
    assert len(labelsets) == 2


def test_one_minute_cron_makes_and_completes_a_run(env: Env):
    """Re-registered with `* * * * *` on a new inbox, refresh-nightly runs by itself within ~3 minutes."""
    registered_at = datetime.now(UTC)
    autolabel_deploy(
        env.services,
        *("--inbox", str(env.cron_inbox), "--workspace", str(env.ws), "--refresh-cron", "* * * * *"),
        *("--set", "refresh.retrain_on_drift=false"),
    )
    refresh = env.deployment("refresh/refresh-nightly")
    assert [s["schedule"]["cron"] for s in refresh["schedules"]] == ["* * * * *"]  # replaced, not added
    query = {
        "flow_runs": {
            "deployment_id": {"any_": [refresh["id"]]},
            "expected_start_time": {
                "after_": registered_at.isoformat(),
                "before_": (registered_at + timedelta(minutes=3)).isoformat(),
            },
        },
        "sort": "EXPECTED_START_TIME_ASC",
        "limit": 5,
    }
    t0 = time.monotonic()
    runs: list[dict] = []
    while not runs and time.monotonic() - t0 < 90:
        time.sleep(2)
        runs = api(env.services, "POST", "flow_runs/filter", query)
    assert runs, f"no scheduled run within 90 s of registering a one-minute cron\n{tail(env.worker_log)}"
    first = runs[0]
    TIMINGS["cron: registration -> scheduled run exists (s)"] = time.monotonic() - t0
    assert first["auto_scheduled"] and parse_time(first["expected_start_time"]).second == 0
    assert first["parameters"]["images"] == str(env.cron_inbox)
    done = env.wait(first["id"], 240, "cron-scheduled refresh")
    states = env.states(first["id"])
    TIMINGS["cron: expected start -> PENDING (s)"] = (
        states["PENDING"] - parse_time(first["expected_start_time"])
    ).total_seconds()
    TIMINGS["cron: registration -> run completed (s)"] = (datetime.now(UTC) - registered_at).total_seconds()
    assert done["state_type"] == "COMPLETED"
    batches = sorted(p.name for p in (env.ws / "data" / "batches").iterdir() if p.is_dir())
    assert len(batches) == 2, batches  # the triggered refresh's batch and the cron run's
