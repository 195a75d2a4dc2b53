"""The real services of infra/local (up.sh/down.sh): each one does its job on loopback, secrets stay private."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from .conftest import (
    Services,
    fail_or_skip,
    new_run_dir,
    parse_env_sh,
    service_env,
    start_services,
    stop_process,
    stop_services,
)

pytestmark = pytest.mark.services

VENV_BIN = Path(sys.executable).parent
REQUIRED = [
    "PREFECT_API_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AUTOLABEL_DVC_REMOTE",
    "AUTOLABEL_DVC_ENDPOINT",
    "AUTOLABEL_PG_PORT",
    "AUTOLABEL_S3_PORT",
    "AUTOLABEL_PREFECT_PORT",
    "AUTOLABEL_MLFLOW_PORT",
]


def http_json(method: str, url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as response:
        text = response.read().decode()
    return json.loads(text) if text else None


def listeners(port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(address)
            if family == 4:
                found.append(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                found.append(socket.inet_ntop(socket.AF_INET6, words))
    return found


def marked_pids(run_dir: Path) -> list[int]:
    """Processes carrying up.sh's marker for ``run_dir`` (what down.sh stops)."""
    marker = f"AUTOLABEL_SERVICE_RUN_DIR={run_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def non_loopback_ipv4() -> list[str]:
    """This machine's IPv4 addresses other than 127.x (to show PostgreSQL is not reachable through them)."""
    if shutil.which("hostname") is None:
        return []
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout.split()
    return [a for a in out if "." in a and not a.startswith("127.")]


# --------------------------------------------------------------------------------------------------------------
def test_env_sh_is_private_and_complete(services: Services):
    env_sh = services.run_dir / "env.sh"
    assert stat.S_IMODE(env_sh.stat().st_mode) == 0o600
    assert set(REQUIRED) <= set(services.env)
    assert services.prefect_api_url == f"http://127.0.0.1:{services.ports['prefect']}/api"
    assert services.mlflow_tracking_uri == f"http://127.0.0.1:{services.ports['mlflow']}"
    assert services.dvc_remote.startswith("s3://dvc-remote/")
    assert services.dvc_endpoint == services.s3_endpoint_url == f"http://127.0.0.1:{services.ports['s3']}"
    assert len(set(services.ports.values())) == 4


@pytest.mark.parametrize("service", ["pg", "s3", "prefect", "mlflow"])
def test_listens_on_loopback_only(services: Services, service: str):
    addresses = listeners(services.ports[service])
    assert addresses, f"nothing listens on the {service} port"
    assert set(addresses) == {"127.0.0.1"}, addresses


def test_postgres_needs_the_password_and_serves_both_databases(services: Services):
    import psycopg2

    for dbname in ("prefect", "mlflow"):
        with psycopg2.connect(f"{services.pg_dsn} dbname={dbname}", connect_timeout=10) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT host(inet_server_addr()), current_setting('listen_addresses'), current_user")
                assert cur.fetchone() == ("127.0.0.1", "127.0.0.1", services.env["AUTOLABEL_PG_USER"])
                # the servers created their schemas there (Prefect and MLflow ran their migrations)
                cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
                assert cur.fetchone()[0] > 10
        conn.close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(f"{services.pg_dsn}x dbname=prefect", connect_timeout=10)
    for address in non_loopback_ipv4():
        with pytest.raises(OSError):
            socket.create_connection((address, services.ports["pg"]), timeout=3).close()


def test_prefect_runs_a_flow_through_the_server(services: Services, tmp_path: Path):
    assert http_json("GET", f"{services.prefect_api_url}/health") is True
    script = tmp_path / "smoke.py"
    script.write_text(
        textwrap.dedent(
            """
            import json
            from prefect import flow, task
            from prefect.client.orchestration import get_client

            @task
            def add(x: int) -> int:
                return x + 1

            @flow(name="services-smoke")
            def smoke(x: int) -> int:
                return add(x)

            state = smoke(41, return_state=True)
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(state.state_details.flow_run_id)
                print(json.dumps({"id": str(run.id), "state": run.state_type.value, "api": str(client.api_url)}))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], env=services.subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["api"].rstrip("/") == services.prefect_api_url
    assert seen["state"] == "COMPLETED"
    # read back from the server itself, not through the client that wrote it
    run = http_json("GET", f"{services.prefect_api_url}/flow_runs/{seen['id']}")
    assert run["state_type"] == "COMPLETED"
    assert http_json("GET", f"{services.prefect_api_url}/flows/{run['flow_id']}")["name"] == "services-smoke"
    tasks = http_json(
        "POST", f"{services.prefect_api_url}/task_runs/filter", {"flow_runs": {"id": {"any_": [seen["id"]]}}}
    )
    assert [t["state_type"] for t in tasks] == ["COMPLETED"]


def test_prefect_scheduler_creates_runs_for_a_cron_schedule(services: Services):
    api = services.prefect_api_url
    flow_id = http_json("POST", f"{api}/flows/", {"name": f"cron-probe-{uuid.uuid4().hex[:8]}"})["id"]
    deployment = http_json(
        "POST",
        f"{api}/deployments/",
        {"name": "cron", "flow_id": flow_id, "schedules": [{"schedule": {"cron": "* * * * *"}, "active": True}]},
    )
    try:
        query = {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}, "limit": 5}
        deadline = time.monotonic() + 90  # the scheduler looks at recently changed deployments every few seconds
        runs = []
        while time.monotonic() < deadline and not runs:
            time.sleep(2)
            runs = http_json("POST", f"{api}/flow_runs/filter", query)
        assert runs, "the scheduler created no run for a cron deployment within 90 s (is it disabled?)"
        assert {r["state_type"] for r in runs} == {"SCHEDULED"}
        assert all(r["expected_start_time"].endswith(":00Z") for r in runs)  # on the minute: cron, not ad hoc
    finally:
        http_json("DELETE", f"{api}/deployments/{deployment['id']}")


def test_mlflow_logs_a_run_with_its_artifact_in_s3(services: Services, tmp_path: Path):
    artifact = tmp_path / "note.txt"
    artifact.write_text(f"hello from {uuid.uuid4()}\n")
    with service_env(services, MLFLOW_DISABLE_TELEMETRY="true"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=services.mlflow_tracking_uri)
        experiment_id = client.create_experiment(f"services-{uuid.uuid4().hex[:8]}")
        run = client.create_run(experiment_id)
        client.log_param(run.info.run_id, "alpha", "0.5")
        client.log_metric(run.info.run_id, "acc", 0.9)
        client.log_artifact(run.info.run_id, str(artifact), artifact_path="docs")
        client.set_terminated(run.info.run_id)
        back = client.get_run(run.info.run_id)
        listed = [f.path for f in client.list_artifacts(run.info.run_id, "docs")]
    assert back.data.params == {"alpha": "0.5"} and back.data.metrics == {"acc": 0.9}
    assert back.info.artifact_uri.startswith("mlflow-artifacts:/"), back.info.artifact_uri  # proxied by the server
    assert listed == ["docs/note.txt"]
    keys = [
        o["Key"]
        for o in services.s3_client().list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])
        if run.info.run_id in o["Key"]
    ]
    assert len(keys) == 1 and keys[0].endswith("/docs/note.txt"), keys
    body = services.s3_client().get_object(Bucket="mlflow-artifacts", Key=keys[0])["Body"].read()
    assert body == artifact.read_bytes()


def test_dvc_pushes_to_the_s3_remote(services: Services, tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = services.subprocess_env(DVC_NO_ANALYTICS="1", GIT_TERMINAL_PROMPT="0")
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"

    def run(*argv: str) -> None:
        done = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"

    prefix = f"{services.dvc_remote.removeprefix('s3://dvc-remote/').strip('/')}/test-{uuid.uuid4().hex[:8]}"
    payload = f"dvc payload {uuid.uuid4()}\n".encode()
    (repo / "data.txt").write_bytes(payload)
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "add", "-q", "data.txt")
    run("dvc", "remote", "add", "-d", "storage", f"s3://dvc-remote/{prefix}")
    run("dvc", "remote", "modify", "storage", "endpointurl", services.dvc_endpoint)
    run("dvc", "push", "-q")
    md5 = hashlib.md5(payload).hexdigest()
    objects = services.s3_client().list_objects_v2(Bucket="dvc-remote", Prefix=f"{prefix}/").get("Contents", [])
    assert [o["Key"] for o in objects] == [f"{prefix}/files/md5/{md5[:2]}/{md5[2:]}"]


def test_secrets_stay_out_of_logs_and_command_lines(services: Services):
    """Placed after the tests that talk to the services, so their traffic is in the logs too."""
    secrets = {k: services.env[k] for k in ("AUTOLABEL_PG_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")}
    assert all(len(value) >= 16 for value in secrets.values())
    files = sorted((services.run_dir / "logs").glob("*.log")) + [services.run_dir / "ports.env"]
    assert len(files) >= 5
    for path in files:
        text = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in text, f"{name} appears in {path.name}"
    pids = marked_pids(services.run_dir)
    assert pids, "no process carries the RUN_DIR marker: down.sh could not find the services"
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        for name, value in secrets.items():
            assert value.encode() not in argv, f"{name} is on the command line of pid {pid}"


def test_down_stops_everything_and_is_safe_twice():
    """A second, light instance (PostgreSQL + S3 + a helper that ignores SIGTERM) and its down.sh."""
    run_dir = new_run_dir("autolabel-down-")
    helper = None
    try:
        result, _ = start_services(run_dir, AUTOLABEL_SERVICES="postgres s3")
        if result.returncode != 0:
            fail_or_skip(f"up.sh exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        light = Services(run_dir=run_dir, env=parse_env_sh(run_dir / "env.sh"))
        assert set(light.ports) == {"pg", "s3"} and "PREFECT_API_URL" not in light.env
        helper = light.spawn(
            "stubborn",
            [
                sys.executable,
                "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
            ],
        )
        again, _ = start_services(run_dir)  # refused: this RUN_DIR has live services
        assert again.returncode == 3 and "live services" in again.stderr, again.stderr
        ports = list(light.ports.values())
        assert all(listeners(port) for port in ports)

        down = stop_services(run_dir)
        assert down.returncode == 0, down.stdout + down.stderr
        assert helper.wait(5) is not None
        assert not any(listeners(port) for port in ports)
        assert marked_pids(run_dir) == []
        assert not (run_dir / "pg/data/postmaster.pid").exists()
        assert list((run_dir / "pids").glob("*.pid")) == []
        second = stop_services(run_dir)
        assert second.returncode == 0, second.stdout + second.stderr
    finally:
        if helper is not None:
            stop_process(helper, grace_s=1)
        stop_services(run_dir)
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
