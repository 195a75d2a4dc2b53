"""Secrets never leak: a run with credentials in its URLs and environment records them nowhere.

The run talks to a real MLflow tracking server whose URI carries a password (basic auth in the URL), pushes to a
real HTTP DVC remote that requires a password given in the remote's URL (in a params file: never on a command
line), and has AWS keys in its environment. Afterwards no sentinel appears in the run's output (its logs), in the
tracking server's database or artifacts, in any file of the workspace or its git history, nor in the Prefect flow
run's parameters, logs or artifacts. The one place a password is kept is the workspace's ``.dvc/config.local``:
DVC's own git-ignored file for credentials, needed to push and fetch again (``autolabel verify`` finds the real
URL there from the masked one in the manifest). Passwords are masked as ``user:***@host`` wherever a URL is
recorded, so the record still says which server and remote were used.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.flow

VENV_BIN = Path(sys.executable).parent
SENTINELS = {
    "mlflow": "Mlflow-db-pw-SENTINEL-41",
    "remote": "Remote-pw-SENTINEL-42",
    "aws_secret": "Aws-secret-SENTINEL-43",
    "aws_id": "AKIASENTINEL44",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_api_url(prefect_engine) -> str:
    from prefect.settings import get_current_settings

    return str(get_current_settings().api.url)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on loopback (sqlite backend, proxied artifacts); yields (port, its folder)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield port, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def dvc_http_remote(tmp_path):
    """A minimal HTTP DVC remote (HEAD/GET/POST/PUT of files) that wants basic auth; yields (port, its folder)."""
    store = tmp_path / "remote-store"
    store.mkdir()
    expected = "Basic " + base64.b64encode(f"autolabel:{SENTINELS['remote']}".encode()).decode()

    class Remote(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, code: int, body: bytes = b"") -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def _file(self) -> Path | None:
            if self.headers.get("Authorization") != expected:
                self._reply(401)
                return None
            return store / self.path.split("?", 1)[0].lstrip("/")

        def do_HEAD(self):  # noqa: N802 - http.server's naming
            path = self._file()
            if path is not None:
                self._reply(200 if path.is_file() else 404)

        def do_GET(self):  # noqa: N802
            path = self._file()
            if path is not None:
                self._reply(200, path.read_bytes()) if path.is_file() else self._reply(404)

        def do_POST(self):  # noqa: N802
            path = self._file()
            if path is None:
                return
            if self.headers.get("Transfer-Encoding") == "chunked":
                body = b""
                while size := int(self.rfile.readline().strip(), 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            else:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            self._reply(200)

        do_PUT = do_POST  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Remote)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], store
    finally:
        server.shutdown()
        server.server_close()


def _hits(data: bytes) -> list[str]:
    return [name for name, value in SENTINELS.items() if value.encode() in data]


def _prefect_records(prefect_api_url: str, flow_run_id: str) -> str:
    """The flow run's parameters, logs and artifacts as stored by the Prefect server, as one JSON text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=200)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    assert logs and {a.key for a in artifacts} >= {"labelset", "cluster-sizes"}
    return json.dumps(
        {
            "parameters": run.parameters,
            "logs": [log.message for log in logs],
            "artifacts": [a.model_dump(mode="json") for a in artifacts],
        }
    )


def test_no_secret_is_recorded(
    prefect_api_url, mlflow_server, dvc_http_remote, synth_data, fast_overrides, tmp_path, monkeypatch
):
    mlflow_port, mlflow_root = mlflow_server
    remote_port, remote_store = dvc_http_remote
    tracking = f"http://autolabel:{SENTINELS['mlflow']}@127.0.0.1:{mlflow_port}"
    remote = f"http://autolabel:{SENTINELS['remote']}@127.0.0.1:{remote_port}/dvc"
    params = tmp_path / "params.yaml"
    params.write_text(f"version:\n  remote: {remote}\n")
    ws = tmp_path / "ws"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api_url,
        "MLFLOW_TRACKING_URI": tracking,
        "AWS_ACCESS_KEY_ID": SENTINELS["aws_id"],
        "AWS_SECRET_ACCESS_KEY": SENTINELS["aws_secret"],
    }
    sets = [arg for item in fast_overrides for arg in ("--set", item)]
    command = [str(VENV_BIN / "autolabel"), "run", "--images", str(synth_data), "--labels"]
    command += [str(synth_data / "labels.csv"), "--workspace", str(ws), "--params", str(params), *sets]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")[-5000:]
    assert _hits(done.stdout + done.stderr) == []  # the logs: Prefect, MLflow, DVC, ours
    path = Path(done.stdout.decode().strip().splitlines()[-1])
    manifest = json.loads((path / "manifest.json").read_text())
    # recorded, masked: the record still says which server and which remote
    assert manifest["mlflow"]["tracking_uri"] == f"http://autolabel:***@127.0.0.1:{mlflow_port}"
    assert manifest["data"]["remote"] == f"http://autolabel:***@127.0.0.1:{remote_port}/dvc"
    assert manifest["params"]["version"]["remote"] == manifest["data"]["remote"]
    assert any(remote_store.rglob("*")), "the data was pushed to the remote, with its password"

    # every file of the workspace and its git history; .dvc/config.local is where the password must be
    local_config = ws / ".dvc" / "config.local"
    assert _hits(local_config.read_bytes()) == ["remote"]
    leaking = {
        str(p.relative_to(ws)): _hits(p.read_bytes())
        for p in ws.rglob("*")
        if p.is_file() and p != local_config and _hits(p.read_bytes())
    }
    assert leaking == {}
    history = subprocess.run(["git", "log", "--all", "-p"], cwd=ws, capture_output=True, timeout=120).stdout
    assert b"version:" in history and _hits(history) == []
    assert "config.local" not in subprocess.run(["git", "ls-files"], cwd=ws, capture_output=True, text=True).stdout

    # the tracking server: every row of its database, every artifact it stores
    with sqlite3.connect(mlflow_root / "server.db") as db:
        dump = "\n".join(db.iterdump()).encode()
    assert manifest["mlflow"]["run_id"].encode() in dump and b"autolabel:***@" in dump  # the masked remote tag
    assert _hits(dump) == []
    assert {str(p): _hits(p.read_bytes()) for p in (mlflow_root / "artifacts").rglob("*") if p.is_file()} == {
        str(p): [] for p in (mlflow_root / "artifacts").rglob("*") if p.is_file()
    }

    # Prefect: the flow run's parameters, its logs and its artifacts
    assert _hits(_prefect_records(prefect_api_url, manifest["prefect"]["flow_run_id"]).encode()) == []

    # and the label set still verifies: the real URLs are found again from the masked ones
    from tasks.lineage import verify

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    result = verify(path)
    assert result.ok, result.problems
    assert all(SENTINELS["remote"] not in line for line in result.checked)
