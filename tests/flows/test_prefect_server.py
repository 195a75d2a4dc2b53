"""The temporary Prefect server of `autolabel run`: started before Prefect's import only when Prefect's settings can
come from nothing but the environment; otherwise Prefect starts it itself. Real runs, real servers, on loopback."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psutil

from flows.cli import _plain_ephemeral_setup

EARLY = "(started before Prefect's import)"


def test_plain_setup_is_only_the_environment(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for key in [k for k in os.environ if k.startswith("PREFECT_")]:
        monkeypatch.delenv(key)
    assert not _plain_ephemeral_setup()  # no PREFECT_HOME: the CLI always sets one
    monkeypatch.setenv("PREFECT_HOME", str(home))
    assert _plain_ephemeral_setup()
    (cwd / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert _plain_ephemeral_setup()  # a pyproject without [tool.prefect] says nothing to Prefect
    for path, text in ((cwd / "pyproject.toml", "[tool.prefect]\n"), (cwd / "prefect.toml", ""),
                       (cwd / ".env", ""), (home / "profiles.toml", "")):  # fmt: skip
        before = path.read_text() if path.exists() else None
        path.write_text(text)
        assert not _plain_ephemeral_setup(), path
        path.unlink() if before is None else path.write_text(before)
    for key, value in (("PREFECT_API_URL", "http://127.0.0.1:1/api"), ("PREFECT_SERVER_EPHEMERAL_ENABLED", "false"),
                       ("PREFECT_API_DATABASE_CONNECTION_URL", "sqlite+aiosqlite:////x.db")):  # fmt: skip
        monkeypatch.setenv(key, value)
        assert not _plain_ephemeral_setup(), key
        monkeypatch.delenv(key)
    assert _plain_ephemeral_setup()


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(cwd, images, ws, fast_overrides) -> str:
    """`autolabel run` from ``cwd`` with no Prefect or MLflow server configured; its whole output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    sets = [arg for o in fast_overrides for arg in ("--set", o)]
    cmd = [sys.executable, "-m", "flows.cli", "run", "--images", str(images), "--workspace", str(ws), *sets]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _servers_on(port: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "uvicorn" in cmd and "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
            found.append(p)
    return found


def test_run_starts_its_server_early_and_stops_it(tmp_path, synth_data, fast_overrides):
    early = _run(REPO, synth_data, tmp_path / "ws", fast_overrides)
    assert EARLY in early, early[-3000:]
    port = re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", early).group(1)
    assert f"Stopping temporary server on http://127.0.0.1:{port}" in early
    assert not _servers_on(port)  # stopped with the command

    elsewhere = tmp_path / "elsewhere"  # a prefect.toml where the command runs: Prefect starts its own server
    elsewhere.mkdir()
    (elsewhere / "prefect.toml").write_text("[logging]\nlevel = 'INFO'\n")
    own = _run(elsewhere, synth_data, tmp_path / "ws2", fast_overrides)
    assert "Starting temporary server on" in own and EARLY not in own, own[-3000:]
