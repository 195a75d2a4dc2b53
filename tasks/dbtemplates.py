"""Empty, migrated databases made once per machine and tool version, copied into each new workspace.

A new workspace's Prefect and MLflow sqlite stores would otherwise run every schema migration on first use: 3-20 s
each on 2 cores, paid by every fresh workspace (and every test). The template is made by a child process with the
tool's own code (its migrations, its registrations), in a temporary folder, and renamed into place atomically, so a
concurrent run sees the whole file or none. A template is keyed by the tool's version: a new version makes a new
one, which its own migrations build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

DB_ENV = "AUTOLABEL_TEMPLATE_DB"
"""The path the template's code must create its database at."""

MLFLOW_CODE = f"""
import os
from mlflow.tracking import MlflowClient

MlflowClient(tracking_uri="sqlite:///" + os.environ["{DB_ENV}"]).search_experiments()
"""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aoi-autolabel"


def template(name: str, version: str, code: str, env: Callable[[Path], dict[str, str]] | None = None) -> Path | None:
    """``<cache>/<name>-<version>.db``, made by running ``code`` once (None when it cannot be made: the caller's
    tool then migrates its database itself, as without a template).

    ``code`` creates the database at ``$AUTOLABEL_TEMPLATE_DB``; ``env(tmp)`` adds variables for a child run with
    ``tmp`` as its working folder (e.g. Prefect's home).
    """
    cache = cache_dir()
    path = cache / f"{name}-{version}.db"
    if path.is_file():
        return path
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            db = Path(tmp) / f"{name}.db"
            child_env = {**os.environ, DB_ENV: str(db), **(env(Path(tmp)) if env else {})}
            subprocess.run([sys.executable, "-c", code], env=child_env, cwd=tmp, check=True, capture_output=True)
            if not db.is_file() or any(Path(tmp).glob(f"{name}.db-*")):  # not closed cleanly: do not keep it
                return None
            os.replace(db, path)
    except (OSError, subprocess.CalledProcessError):
        return None
    return path


def copy_into(template_db: Path, dest: Path) -> bool:
    """Copy a template to ``dest`` (a new workspace's database) without ever leaving a partial file there, and never
    over a database that appeared meanwhile (a hard link fails when ``dest`` exists). Returns whether it copied."""
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.copy")
    try:
        shutil.copyfile(template_db, partial)
        os.link(partial, dest)
    except FileExistsError:
        return False
    finally:
        partial.unlink(missing_ok=True)
    return True


def mlflow_store(dest: Path) -> None:
    """Start a workspace's new MLflow sqlite store from the template of this MLflow version, when there is one."""
    if dest.exists():
        return
    from importlib.metadata import version

    made = template("mlflow", version("mlflow"), MLFLOW_CODE)
    if made is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        copy_into(made, dest)
