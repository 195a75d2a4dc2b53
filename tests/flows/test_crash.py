"""Crash safety: ``autolabel run`` killed with SIGKILL (its whole process group) during embed, cluster and publish.

After each kill the same command is run again, and then: it completes; no half-written label set was ever visible
(the unfinished one is a hidden ``labelsets/.tmp-*`` folder, removed by the next run); every label set verifies;
every registered model version's artifacts are complete; the killed MLflow run no longer claims to be RUNNING;
``dvc status`` is clean; and the label-set id is the one an uninterrupted run on the same data and params gives.

How the kill lands in a stage. Publish takes seconds (montages, figures, report), so the test watches the
workspace and kills as soon as the hidden label-set folder holds files. Embed and cluster finish their real work
in well under a second on 150 images, too fast to hit by watching; there the crashed run gets a test-only
``sitecustomize.py`` (on ``PYTHONPATH``, never in the package) that pauses inside the stage, after it wrote part of
its outputs (embed: ``model.pt`` saved, ``vectors.npy`` not yet; cluster: ``assignments.csv`` and ``model.pkl``
written, ``metrics.json`` not yet) and writes a marker file; the test kills the process group while it is paused
there. The pipeline itself has no fault-injection hook.

The runs talk to the session's Prefect test server (``PREFECT_API_URL``), so each one skips the ~20 s start of an
embedded server; the uninterrupted reference is the shared ``retrain_run`` of ``tests/flows/conftest.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

pytestmark = pytest.mark.flow

AUTOLABEL = Path(sys.executable).with_name("autolabel")
RUN_TIMEOUT = 900  # seconds; a full run takes ~1-2 min on 2 shared cores

SITECUSTOMIZE = '''
"""Test-only (tests/flows/test_crash.py): pause the process inside a pipeline stage so it can be killed there."""
import os

_where = os.environ.pop("AUTOLABEL_TEST_PAUSE_IN", None)  # popped: the run's own subprocesses never see it
_marker = os.environ.pop("AUTOLABEL_TEST_PAUSE_MARKER", None)
if _where:
    import importlib
    import time

    _target, _when = _where.split(":")
    _module_name, _name = _target.rsplit(".", 1)
    _module = importlib.import_module(_module_name)
    _original = getattr(_module, _name)

    def _pause():
        with open(_marker, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(3600)

    def _paused(*args, **kwargs):
        if _when == "before":
            _pause()
        result = _original(*args, **kwargs)
        _pause()
        return result

    setattr(_module, _name, _paused)
'''

PAUSES = {
    "embed": "tasks.embedding.save_model:after",  # model.pt written, vectors.npy and metrics.json not yet
    "cluster": "tasks.clustering.internal_metrics:before",  # assignments.csv and model.pkl written, metrics not yet
}


@pytest.fixture(scope="module")
def prefect_api_url(prefect_engine) -> str:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    assert url, "the Prefect test harness did not set an API URL"
    return str(url)


@pytest.fixture(scope="module")
def reference_id(retrain_run) -> str:
    """The label-set id of an uninterrupted run (same data, labels and params as the runs here)."""
    return retrain_run[1].name


def _command(images: Path, ws: Path, fast: list[str]) -> list[str]:
    sets = [arg for item in fast for arg in ("--set", item)]
    return [
        str(AUTOLABEL),
        "run",
        "--images",
        str(images),
        "--labels",
        str(images / "labels.csv"),
        "--workspace",
        str(ws),
        *sets,
    ]


def _env(prefect_api_url: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _wait(predicate: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {what} within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _visible_label_sets(ws: Path) -> list[str]:
    folder = ws / "labelsets"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def _check_model_artifacts(ws: Path) -> int:
    """Every registered model version resolves to a complete pyfunc model on disk; returns how many versions."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    n = 0
    for model in client.search_registered_models():
        for mv in client.search_model_versions(f"name='{model.name}'"):
            root = Path(urlparse(client.get_model_version_download_uri(mv.name, mv.version)).path)
            assert (root / "MLmodel").is_file(), (mv.name, mv.version, root)
            flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
            files = [
                flavor["python_model"],
                *(a["path"] if isinstance(a, dict) else a for a in flavor.get("artifacts", {}).values()),
            ]
            for rel in files:
                assert (root / rel).is_file() and (root / rel).stat().st_size > 0, (mv.name, mv.version, rel)
            n += 1
    return n


def _run_statuses(ws: Path) -> dict[str, str]:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return {r.info.run_id: r.info.status for r in client.search_runs(experiments, run_view_type=ViewType.ALL)}


@pytest.mark.parametrize("stage", ["embed", "cluster", "publish"])
def test_kill_9_then_run_again(stage, prefect_api_url, synth_data, fast_overrides, reference_id, tmp_path):
    from tasks.lineage import verify

    ws = tmp_path / "ws"
    command = _command(synth_data, ws, fast_overrides)
    log = tmp_path / "crashed.log"
    marker = tmp_path / "paused"
    extra: dict[str, str] = {}
    if stage in PAUSES:
        hook = tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
        extra = {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
            "AUTOLABEL_TEST_PAUSE_IN": PAUSES[stage],
            "AUTOLABEL_TEST_PAUSE_MARKER": str(marker),
        }
    with open(log, "w") as out:
        crashed = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=_env(prefect_api_url, **extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if stage in PAUSES:
            _wait(marker.is_file, crashed, log, f"pause inside {stage}", RUN_TIMEOUT)
        else:
            tmp_sets = lambda: list((ws / "labelsets").glob(".tmp-*/labels.csv")) if (ws / "labelsets").is_dir() else []  # noqa: E731
            _wait(lambda: bool(tmp_sets()), crashed, log, "a label set being written", RUN_TIMEOUT)
        os.killpg(crashed.pid, signal.SIGKILL)
        crashed.wait(timeout=60)
    finally:
        if crashed.poll() is None:
            os.killpg(crashed.pid, signal.SIGKILL)
    assert crashed.returncode == -signal.SIGKILL

    # the state the kill left: a stage half-written, nothing visible as a label set, the lock file still there
    results = ws / "results"
    if stage == "embed":
        assert (results / "embed/model.pt").is_file() and not (results / "embed/vectors.npy").exists()
    elif stage == "cluster":
        assert (results / "cluster/assignments.csv").is_file() and not (results / "cluster/metrics.json").exists()
    else:
        assert list((ws / "labelsets").glob(".tmp-*")), "the unfinished label set should be a hidden temporary folder"
    assert _visible_label_sets(ws) == []
    assert (ws / ".autolabel.lock").exists()  # the lock file stays; its lock died with the process
    assert list(_run_statuses(ws).values()) == ["RUNNING"]  # also during publish, after log_models

    start = time.monotonic()
    again = subprocess.run(
        command, cwd=tmp_path, env=_env(prefect_api_url), capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    print(f"run again after a kill during {stage}: {time.monotonic() - start:.0f} s")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    path = Path(again.stdout.strip().splitlines()[-1])

    assert path.name == reference_id  # the same label set as an uninterrupted run
    assert _visible_label_sets(ws) == [reference_id]
    assert sorted(p.name for p in (ws / "labelsets").iterdir()) == [reference_id]  # the temporary folder is gone
    result = verify(path)
    assert result.ok, result.problems
    assert _check_model_artifacts(ws) == (4 if stage == "publish" else 2)  # the killed publish had registered its own
    statuses = sorted(_run_statuses(ws).values())
    assert statuses == ["FINISHED", "KILLED"], statuses  # the killed run was closed by the next one
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"], cwd=ws, capture_output=True, text=True, timeout=300
    )
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["labelset_id"] == reference_id and manifest["mlflow"]["run_id"] in _run_statuses(ws)


def test_dvc_recovers_from_a_lock_holder_killed_with_sigkill(tmp_path):
    """DVC's repository lock (``.dvc/tmp/lock``, an fcntl lock) and its read/write lock file (``.dvc/tmp/rwlock``,
    entries with a pid) survive a SIGKILL as files, but the next DVC command is not blocked by them."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "data.txt").write_text("payload\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, cwd=repo, capture_output=True, text=True, timeout=120, env={**os.environ, "DVC_NO_ANALYTICS": "1"}
        )

    assert run("git", "init", "-q").returncode == 0
    assert run(sys.executable, "-m", "dvc", "init", "-q").returncode == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from dvc.repo import Repo; from dvc.rwlock import rwlock\n"
            "repo = Repo('.'); target = str(repo.root_dir) + '/data.txt'\n"
            "with repo.lock, rwlock(repo.tmp_dir, repo.fs, 'dvc add data.txt', [], [target], False):\n"
            "    print('locked', flush=True); time.sleep(600)",
        ],
        cwd=repo,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert "data.txt" in (repo / ".dvc/tmp/rwlock").read_text()
        busy = run(sys.executable, "-m", "dvc", "add", "data.txt")
        assert busy.returncode != 0 and "lock" in (busy.stderr + busy.stdout).lower()  # held: DVC refuses
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (repo / ".dvc/tmp/lock").exists() and "data.txt" in (repo / ".dvc/tmp/rwlock").read_text()  # left behind
    added = run(sys.executable, "-m", "dvc", "add", "-q", "data.txt")
    assert added.returncode == 0, added.stderr
    assert (repo / "data.txt.dvc").is_file()
