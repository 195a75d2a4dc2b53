"""Outages: a tracking server that is down or slow, a DVC remote that cannot be reached.

Each ends the same way, before any work: a few attempts with backoff (``track.*`` / ``version.*`` retries, backoff,
timeout), then one clear error naming the service, within a bounded time; the workspace holds nothing but its
lock file, so nothing was versioned, trained or published. Credentials in the URLs never show in the error.

``autolabel run`` runs as a subprocess (the user's view: its exit code and last line) against the session's
Prefect test server.
"""

from __future__ import annotations

import http.server
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.flow

SENTINEL = "Sentinel-pw-7Q2x"
QUICK = ["track.retries=2", "track.backoff=0.2", "track.timeout=1", "version.retries=2", "version.backoff=0.2"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.fixture
def isolated(prefect_engine, monkeypatch):
    """The variables set through this are the run's environment (and restored afterwards)."""
    from prefect.settings import get_current_settings

    monkeypatch.setenv("PREFECT_API_URL", str(get_current_settings().api.url))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return monkeypatch


def _run(synth_data: Path, ws: Path, overrides: list[str]) -> tuple[SimpleNamespace, float]:
    sets = [arg for item in [*QUICK, *overrides] for arg in ("--set", item)]
    command = [str(Path(sys.executable).with_name("autolabel")), "run", "--images", str(synth_data)]
    start = time.monotonic()
    done = subprocess.run(
        [*command, "--workspace", str(ws), *sets], cwd=ws.parent, capture_output=True, text=True, timeout=600
    )
    return SimpleNamespace(exit_code=done.returncode, output=done.stdout + done.stderr), time.monotonic() - start


def _retry_seconds(output: str) -> float:
    """The time the retries took, as the error says ("... unreachable after 3 attempts over 1.6 s: ...")."""
    return float(re.search(r"unreachable after \d+ attempts over ([\d.]+) s", output).group(1))


def _assert_nothing_done(ws: Path) -> None:
    # no git/DVC repo, data, results or label set: only the lock and the CLI's Prefect home (made before the flow)
    assert sorted(p.name for p in ws.iterdir()) in ([".autolabel.lock"], [".autolabel.lock", ".prefect"])


def test_tracking_server_down(synth_data, isolated, tmp_path):
    port = _closed_port()
    isolated.setenv("MLFLOW_TRACKING_URI", f"http://autolabel:{SENTINEL}@127.0.0.1:{port}")
    result, seconds = _run(synth_data, tmp_path / "ws", [])
    assert result.exit_code == 1, result.output
    assert (
        f"MLflow tracking server at http://autolabel:***@127.0.0.1:{port} is unreachable after 3 attempts"
        in result.output
    ), result.output
    assert SENTINEL not in result.output
    assert "attempt 1 failed" in result.output and "retrying in 0.2 s" in result.output  # the backoff, logged
    assert _retry_seconds(result.output) < 5  # 3 refused connections, 0.2 + 0.4 s of backoff
    assert seconds < 120, seconds  # with the process's and the flow's start
    _assert_nothing_done(tmp_path / "ws")


def test_tracking_server_too_slow(synth_data, isolated, tmp_path):
    requests_seen: list[float] = []

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            requests_seen.append(time.monotonic())
            time.sleep(5)  # longer than track.timeout
            try:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
            except OSError:
                pass  # the client gave up

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        isolated.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        result, seconds = _run(synth_data, tmp_path / "ws", [])
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 1, result.output
    assert f"MLflow tracking server at http://127.0.0.1:{port} is unreachable after 3 attempts" in result.output
    assert "Timeout" in result.output, result.output
    assert len(requests_seen) == 3  # bounded: three requests, no more
    gaps = [b - a for a, b in zip(requests_seen, requests_seen[1:], strict=False)]
    assert all(gap >= 1.0 for gap in gaps), gaps  # each after the 1 s timeout plus the backoff
    assert 3 <= _retry_seconds(result.output) < 8  # 3 timeouts of 1 s, 0.6 s of backoff
    assert seconds < 120, seconds
    _assert_nothing_done(tmp_path / "ws")


def test_dvc_remote_endpoint_down(synth_data, isolated, tmp_path):
    port = _closed_port()
    isolated.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    isolated.setenv("AWS_ACCESS_KEY_ID", "AKIA-SENTINEL-ID")
    isolated.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    result, seconds = _run(synth_data, tmp_path / "ws", ["version.remote=s3://autolabel-data/dvc"])
    assert result.exit_code == 1, result.output
    expected = f"DVC remote s3://autolabel-data/dvc (endpoint http://127.0.0.1:{port}) is unreachable after 3 attempts"
    assert expected in result.output, result.output
    assert SENTINEL not in result.output
    assert _retry_seconds(result.output) < 5
    assert seconds < 120, seconds
    _assert_nothing_done(tmp_path / "ws")


def test_dvc_remote_that_hangs_stops_the_push_within_its_timeout(synth_data, isolated, tmp_path):
    """The endpoint accepts connections and never answers: the reachability check passes, `dvc push` would wait
    for botocore's minutes of read timeouts and retries; ``version.push_timeout`` stops it with a clear error.
    The push runs beside the compute stages, so the run fails before its models are registered or published."""
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) and never reads nor answers
    port = listener.getsockname()[1]
    isolated.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    isolated.setenv("AWS_ACCESS_KEY_ID", "AKIA-SENTINEL-ID")
    isolated.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    try:
        result, seconds = _run(
            synth_data, tmp_path / "ws", ["version.remote=s3://autolabel-data/dvc", "version.push_timeout=4"]
        )
    finally:
        listener.close()
    assert result.exit_code == 1, result.output
    assert re.search(r"dvc push -q .*did not finish in 4 s", result.output), result.output
    assert SENTINEL not in result.output
    assert seconds < 180, seconds  # the background push and one retry in the foreground, 4 s each, plus the stages
    ws = tmp_path / "ws"
    assert not (ws / "labelsets").exists(), sorted(p.name for p in ws.iterdir())  # nothing published
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    assert (ws / "results" / "embed").is_dir()  # the stages ran beside the push...
    assert not MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()  # ...no model registered


def test_dvc_remote_folder_unusable(synth_data, isolated, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote's parent folder should be\n")
    remote = blocker / "remote"
    result, _ = _run(synth_data, tmp_path / "ws", [f"version.remote={remote}"])
    assert result.exit_code == 1, result.output
    assert f"DVC remote {remote} is unreachable after 3 attempts" in result.output, result.output
    assert "NotADirectoryError" in result.output
    _assert_nothing_done(tmp_path / "ws")
