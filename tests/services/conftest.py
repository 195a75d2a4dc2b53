"""Real services for integration tests: PostgreSQL, S3 (moto), a Prefect server and an MLflow server on 127.0.0.1.

``services`` (session scope) runs ``infra/local/up.sh`` once in a fresh folder, yields a :class:`Services` and runs
``infra/local/down.sh`` at the end of the session (a teardown error if anything is left listening). When the
services can't start, the tests fail in CI (``CI=true``) and are skipped elsewhere, with up.sh's output as reason.

The service addresses are never put in ``os.environ`` for the whole session: other test modules rely on the
embedded defaults (ephemeral Prefect, MLflow on sqlite). Use one of

- ``services.subprocess_env()`` for a child process (the most honest way to run a flow against the server: Prefect
  reads ``PREFECT_API_URL`` when its settings are first loaded, i.e. at import);
- ``with service_env(services): ...`` to set the variables in this process temporarily (fine for MLflow, boto3,
  DVC subprocesses; not for an already-imported Prefect);
- ``services.spawn(name, argv)`` for a long-running helper such as ``prefect worker start``: it gets its own
  process group and the RUN_DIR marker, so ``down.sh`` stops it with the servers.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UP = ROOT / "infra" / "local" / "up.sh"
DOWN = ROOT / "infra" / "local" / "down.sh"
UP_TIMEOUT_S = 420  # up.sh's own health budget is ~6.5 min at most; this only guards against a hang

# settings of the embedded mode (tests/conftest.py, flows/environment.py) that must not leak into a client of the
# real servers; PREFECT_HOME stays (a per-session folder) so clients don't write to ~/.prefect
EMBEDDED_ONLY_PREFIXES = ("PREFECT_SERVER_SERVICES_", "PREFECT_SERVER_EPHEMERAL_")


@dataclass(frozen=True)
class Services:
    """Running services of one up.sh instance.

    Attributes:
        run_dir: the instance folder (logs/, pids/, env.sh, ports.env, pg/).
        env: every variable exported by ``run_dir/env.sh``: PREFECT_API_URL, MLFLOW_TRACKING_URI,
            MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION,
            AUTOLABEL_DVC_REMOTE, AUTOLABEL_DVC_ENDPOINT, AUTOLABEL_{PG,S3,PREFECT,MLFLOW}_PORT,
            AUTOLABEL_PG_HOST/USER/PASSWORD, AUTOLABEL_RUN_DIR.
        startup_s: how long up.sh took.
    """

    run_dir: Path
    env: Mapping[str, str] = field(repr=False)  # holds secrets: keep them out of pytest's assertion output
    startup_s: float = 0.0

    @property
    def prefect_api_url(self) -> str:
        return self.env["PREFECT_API_URL"]

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def s3_endpoint_url(self) -> str:
        return self.env["MLFLOW_S3_ENDPOINT_URL"]

    @property
    def dvc_remote(self) -> str:
        return self.env["AUTOLABEL_DVC_REMOTE"]

    @property
    def dvc_endpoint(self) -> str:
        return self.env["AUTOLABEL_DVC_ENDPOINT"]

    @property
    def ports(self) -> dict[str, int]:
        """``{"pg": ..., "s3": ..., "prefect": ..., "mlflow": ...}``."""
        return {
            name.removeprefix("AUTOLABEL_").removesuffix("_PORT").lower(): int(value)
            for name, value in self.env.items()
            if name.startswith("AUTOLABEL_") and name.endswith("_PORT")
        }

    @property
    def pg_dsn(self) -> str:
        """libpq DSN of the service role (it owns the databases ``prefect`` and ``mlflow``); append ``dbname=``."""
        e = self.env
        return (
            f"host={e['AUTOLABEL_PG_HOST']} port={e['AUTOLABEL_PG_PORT']} "
            f"user={e['AUTOLABEL_PG_USER']} password={e['AUTOLABEL_PG_PASSWORD']}"
        )

    def s3_client(self):
        """A boto3 S3 client on the moto server (buckets ``mlflow-artifacts`` and ``dvc-remote``)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def subprocess_env(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        """Environment for a child process that talks to these services.

        Args:
            base: starting environment (default ``os.environ``); embedded-mode server settings are dropped.
            **extra: more variables, applied last.
        """
        env = {
            k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(EMBEDDED_ONLY_PREFIXES)
        }
        env.update(self.env)
        env.update(extra)
        return env

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start a long-running helper (e.g. ``prefect worker start``) that ``down.sh`` will stop.

        It runs in its own process group with the service environment plus the RUN_DIR marker that down.sh looks
        for; output goes to ``run_dir/logs/<name>.log`` and the pid to ``run_dir/pids/<name>.pid``. Stop it
        earlier with :func:`stop_process`.
        """
        full_env = self.subprocess_env() if env is None else dict(env)
        full_env["AUTOLABEL_SERVICE_RUN_DIR"] = str(self.run_dir)
        log = open(self.run_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child from here on
        try:
            proc = subprocess.Popen(
                argv,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        (self.run_dir / "pids" / f"{name}.pid").write_text(f"{proc.pid}\n")
        return proc


def stop_process(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop a process group started by :meth:`Services.spawn`: SIGINT, then SIGKILL (workers ignore SIGTERM)."""
    import signal

    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)


@contextlib.contextmanager
def service_env(services: Services, **extra: str) -> Iterator[dict[str, str]]:
    """Set the services' variables (and ``extra``) in ``os.environ`` for the ``with`` block, then restore.

    Variables that were unset before are removed again. Prefect reads its settings once; to run a flow against
    the server, prefer a subprocess with ``services.subprocess_env()``.
    """
    updates = {**services.env, **extra}
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield updates
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def parse_env_sh(path: Path) -> dict[str, str]:
    """The ``export NAME=VALUE`` lines of an env.sh written by up.sh (values quoted with printf %q)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("export "):
            continue
        name, _, value = line.removeprefix("export ").partition("=")
        words = shlex.split(value) if value else [""]
        env[name] = words[0] if words else ""
    return env


def fail_or_skip(reason: str) -> None:
    """In CI (CI=true) a service that can't start is a failure; elsewhere the test is skipped with the reason."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"real services are required in CI but could not start:\n{reason}", pytrace=False)
    pytest.skip(f"real services not available: {reason.strip().splitlines()[-1] if reason.strip() else reason}")


def start_services(run_dir: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run up.sh in ``run_dir`` (with extra environment ``env``, e.g. ``AUTOLABEL_SERVICES``); returns (result, s)."""
    t0 = time.monotonic()
    result = subprocess.run(
        ["bash", str(UP), str(run_dir)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=UP_TIMEOUT_S,
        check=False,
    )
    return result, time.monotonic() - t0


def stop_services(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DOWN), str(run_dir)], capture_output=True, text=True, timeout=120, check=False)


def new_run_dir(prefix: str = "autolabel-services-") -> Path:
    """A fresh folder under /tmp: pytest's tmp_path lives in a root-only (0700) tree the postgres user can't enter."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """PostgreSQL, S3 (moto), Prefect server and MLflow server for the whole session (~30-90 s to start)."""
    tools = ("bash", "setsid", "runuser") if os.geteuid() == 0 else ("bash", "setsid")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        fail_or_skip(f"missing tools: {', '.join(missing)}")
    run_dir = new_run_dir()
    try:
        result, took = start_services(run_dir)
    except subprocess.TimeoutExpired as exc:
        stop_services(run_dir)
        fail_or_skip(f"up.sh did not finish in {exc.timeout} s")
    if result.returncode != 0:
        kept = f" (logs kept in {run_dir}/logs)" if (run_dir / "logs").is_dir() else ""
        if not kept:
            shutil.rmtree(run_dir, ignore_errors=True)
        fail_or_skip(f"up.sh exited {result.returncode}{kept}\n{result.stdout}\n{result.stderr}")
    env = parse_env_sh(run_dir / "env.sh")
    try:
        yield Services(run_dir=run_dir, env=env, startup_s=took)
    finally:
        down = stop_services(run_dir)
        if down.returncode != 0:
            pytest.fail(f"down.sh left something running (exit {down.returncode}):\n{down.stdout}\n{down.stderr}")
        shutil.rmtree(run_dir, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Every test under tests/services carries the ``services`` marker (select or deselect with -m)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.services)
