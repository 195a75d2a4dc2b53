"""Data versions with DVC (and code versions with git): the `version` step.

The image folder is mirrored into ``<workspace>/data/images``, added to DVC and pushed to the remote; the data
version is the ``.dir`` md5 DVC writes into ``data/images.dvc``. The workspace's git history records every data
version. DVC is driven through its CLI, its stable interface.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.datasets import Discovery, discover
from tasks.retry import Backoff, retry
from tasks.secrets import MASK, redact, redact_url, unmask
from tasks.workspace import PROJECT_ROOT, Workspace

REMOTE_ENV = "AUTOLABEL_DVC_REMOTE"  # the remote when `version.remote` is null (infra/local/up.sh's env.sh sets it)

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "aoi-autolabel",
    "GIT_AUTHOR_EMAIL": "autolabel@localhost",
    "GIT_COMMITTER_NAME": "aoi-autolabel",
    "GIT_COMMITTER_EMAIL": "autolabel@localhost",
}
_WS_GITIGNORE = """\
# written by aoi-autolabel: large or machine-local files stay out of git
/dvc-remote/
/mlflow.db
/mlartifacts/
/labelsets/
/.prefect/
/.gx/
/.autolabel.lock
"""


_HUMAN_README = """\
# Human inputs (versioned with this workspace's git history)

- `cluster_names.yaml`: cluster id → label, one per line (`3: crack`); several clusters may share a label.
- `seed_labels.csv`: `image,label` for a few images (paths as in the image folder).

`autolabel label-next` says which images to label first; `autolabel annotate` re-labels and publishes.
"""


class VersioningError(RuntimeError):
    """A git or DVC command failed; the message carries the command and its output."""


@dataclass(frozen=True)
class DataVersion:
    """What identifies the data of a run."""

    md5: str
    nfiles: int
    size: int
    remote: str
    labels_md5: str | None
    n_ignored: int
    workspace_commit: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _env() -> dict[str, str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    for key, value in _GIT_ENV.items():
        env.setdefault(key, value)
    return env


def _run(cmd: list[str], cwd: Path, retries: int = 0, timeout: float | None = None) -> str:
    env = _env()
    for attempt in range(retries + 1):
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise VersioningError(
                redact(f"`{' '.join(cmd)}` did not finish in {timeout:g} s in {cwd} (remote slow or hanging?)")
            ) from exc
        if proc.returncode == 0:
            return proc.stdout
        output = (proc.stderr + proc.stdout).strip()
        if "Unable to acquire lock" in output and attempt < retries:
            time.sleep(min(2**attempt, 10))
            continue
        if "Unable to acquire lock" in output:
            raise VersioningError(
                redact(f"DVC repository in {cwd} is locked by another process (another run here?): {output}")
            )
        raise VersioningError(redact(f"`{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}):\n{output}"))
    raise AssertionError("unreachable")


def dvc(args: list[str], cwd: Path, timeout: float | None = None) -> str:
    """Run a DVC command with this interpreter's DVC, retrying on repository-lock contention.

    ``timeout`` bounds commands that talk to a remote: a hanging remote ends in a clear error, not a stuck run.
    """
    return _run([sys.executable, "-m", "dvc", *args], cwd, retries=5, timeout=timeout)


def git(args: list[str], cwd: Path) -> str:
    return _run(["git", *args], cwd)


@dataclass
class BackgroundDvc:
    """A DVC command running beside other work, for steps whose result nothing reads until later.

    The data's ``dvc push`` (3.4 s at 10k images) overlaps validate and standardize; the compute stages'
    ``dvc commit`` (2 s) overlaps publish. :meth:`wait` before anything depends on the command's effect.
    """

    args: list[str]
    cwd: Path
    timeout: float | None
    proc: subprocess.Popen[bytes]
    output: Any  # the child's stdout and stderr (a temporary file: a full pipe would stall the command)
    started: float

    @classmethod
    def start(cls, args: list[str], cwd: Path, timeout: float | None = None) -> BackgroundDvc:
        import tempfile

        output = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "dvc", *args]
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=output, stderr=subprocess.STDOUT)
        return cls(args, Path(cwd), timeout, proc, output, time.monotonic())

    def settle(self) -> int | None:
        """Let the command end, at most its timeout after its start, without retrying or raising (what a failed
        run's cleanup needs: no DVC process left writing behind it). Its exit code; None when it was stopped."""
        left = None if self.timeout is None else max(0.0, self.started + self.timeout - time.monotonic())
        try:
            return self.proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self.output.close()

    def wait(self) -> float:
        """:meth:`settle`, then a command that failed (or timed out) is run once more in the foreground, as a task
        retry would have done; that one's error (the command and its output) is what the caller sees. Returns the
        seconds waited.

        Raises:
            VersioningError: if the command fails twice, or does not finish within its timeout.
        """
        t = time.monotonic()
        if self.settle() != 0:
            dvc(self.args, self.cwd, timeout=self.timeout)
        return time.monotonic() - t


_pushes: dict[Path, BackgroundDvc] = {}


def start_push(cwd: Path, targets: list[str], timeout: float | None) -> None:
    """Start ``dvc push -q targets`` in the background; one per workspace, finished by :func:`wait_for_push`."""
    wait_for_push(cwd)
    _pushes[Path(cwd).resolve()] = BackgroundDvc.start(["push", "-q", *targets], cwd, timeout)


def take_push(cwd: Path) -> BackgroundDvc | None:
    """The workspace's background push, handed over to the caller (None when none is running)."""
    return _pushes.pop(Path(cwd).resolve(), None)


def wait_for_push(cwd: Path) -> float | None:
    """Wait for the workspace's background push (:meth:`BackgroundDvc.wait`); None when none was running."""
    pending = take_push(cwd)
    return None if pending is None else pending.wait()


def code_version(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Git commit and dirty flag of the pipeline's own code (``unknown`` outside a git checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("aoi-autolabel")
    except PackageNotFoundError:
        pkg_version = "unknown"
    try:
        commit = git(["rev-parse", "HEAD"], root).strip()
        dirty = bool(git(["status", "--porcelain", "--untracked-files=no"], root).strip())
    except (VersioningError, FileNotFoundError):
        commit, dirty = "unknown", True
    return {"git_commit": commit, "git_dirty": dirty, "package_version": pkg_version}


def _remote_urls(ws: Workspace) -> dict[str, str | None]:
    """The ``storage`` remote's URL at DVC's ``repo`` (.dvc/config, in git) and ``local`` (.dvc/config.local,
    git-ignored) levels."""
    from dvc.config import Config

    config = Config(dvc_dir=str(ws.root / ".dvc"), validate=False)
    levels = ("repo", "local")
    return {level: config.load_one(level).get("remote", {}).get("storage", {}).get("url") for level in levels}


def _configure_dvc(ws: Workspace, url: str) -> str:
    """Make ``url`` the default remote ``storage`` (other options of the remote, e.g. ``endpointurl``, are kept),
    with DVC's analytics off and a copying cache (in-process: two ``dvc config`` subprocesses cost ~0.8 s).

    A URL with a password goes to ``.dvc/config.local`` only (git-ignored, where DVC keeps credentials), its
    masked form to ``.dvc/config``. A masked URL (from a workspace's recorded params.yaml) keeps the real one
    already in config.local. Written through DVC's config API, so no password is ever on a command line.
    Returns the URL as recorded (masked).
    """
    from dvc.config import Config

    masked = redact_url(url)
    current = _remote_urls(ws)
    if MASK in url:
        url = unmask(url, [current["local"], current["repo"]]) or ""
        if not url:
            raise VersioningError(
                f"the DVC remote {masked} has a masked password and the workspace's .dvc/config.local has no "
                "matching URL: give the URL with its password in a params file or in DVC's config.local"
            )
    config = Config(dvc_dir=str(ws.root / ".dvc"), validate=False)
    with config.edit("repo") as conf:
        conf["remote"].setdefault("storage", {})["url"] = masked
        conf["core"]["remote"] = "storage"
        conf["core"]["analytics"] = "false"
        # the cache never shares inodes with the mirror (which may be hard links to the user's files; see
        # mirror_images), whatever a user- or system-wide DVC config says
        conf["cache"]["type"] = "reflink,copy"
    if url != masked or current["local"]:
        with config.edit("local") as conf:
            if url != masked:
                conf["remote"].setdefault("storage", {})["url"] = url
            else:  # a password-free URL replaces an earlier one that had a password
                conf.get("remote", {}).get("storage", {}).pop("url", None)
    return masked


def recorded_remote(ws: Workspace) -> str:
    """The workspace's default remote URL as recorded (credentials masked), for drivers with no version step."""
    urls = _remote_urls(ws)
    url = urls["local"] or urls["repo"]
    if not url:
        raise VersioningError(f"{ws.root} has no DVC remote 'storage': run `autolabel run` first")
    return redact_url(url)


def _remote(ws: Workspace, remote: str | None) -> str:
    """The remote to use: ``version.remote``, else ``$AUTOLABEL_DVC_REMOTE``, else ``<workspace>/dvc-remote``."""
    return remote or os.environ.get(REMOTE_ENV) or str(ws.dvc_remote)


def check_remote(ws: Workspace, remote: str | None, retries: int, backoff: float, timeout: float) -> None:
    """Before any work: the DVC remote can be reached (a TCP connection to its endpoint, or a writable folder).

    Endpoints: http(s)/ssh/webdav URLs name theirs; ``s3://`` uses ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` or
    the remote's ``endpointurl`` in the workspace's DVC config, else AWS; other schemes are not checked here (DVC's
    own errors then name them).

    Raises:
        ServiceUnavailableError: "DVC remote <url> [(endpoint ...)] is unreachable after N attempts over S s: ...".
    """
    import socket
    import tempfile
    from urllib.parse import urlsplit

    url = _remote(ws, remote)
    if MASK in url and (ws.root / ".dvc").is_dir():
        url = unmask(url, _remote_urls(ws).values()) or url
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    service = f"DVC remote {redact_url(url)}"
    policy = Backoff(attempts=retries + 1, first=backoff)
    if scheme in ("", "file"):
        folder = Path(urlsplit(url).path if scheme else url)
        if not folder.is_absolute():
            folder = ws.root / folder

        def writable() -> None:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".autolabel-check-"):
                pass

        retry(writable, service, policy)
        return
    endpoint = url
    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        if not endpoint and (ws.root / ".dvc").is_dir():
            from dvc.config import Config

            options = Config(dvc_dir=str(ws.root / ".dvc"), validate=False).load_one("local")
            endpoint = options.get("remote", {}).get("storage", {}).get("endpointurl") or ""
        endpoint = endpoint or "https://s3.amazonaws.com"
        service += f" (endpoint {redact_url(endpoint)})"
    elif scheme not in ("http", "https", "webdav", "webdavs", "ssh", "sftp"):
        return
    parts = urlsplit(endpoint)
    default_port = {"http": 80, "webdav": 80, "ssh": 22, "sftp": 22}.get(parts.scheme.lower(), 443)
    address = (parts.hostname or "", parts.port or default_port)

    def connect() -> None:
        socket.create_connection(address, timeout=timeout).close()

    retry(connect, service, policy)


def init_workspace(ws: Workspace, remote: str | None) -> str:
    """Make ``ws`` a git + DVC repo with a default remote (idempotent); return the remote URL as recorded
    (credentials masked, see :func:`_configure_dvc`).

    The remote: ``remote`` (``version.remote``), else ``$AUTOLABEL_DVC_REMOTE``, else ``<workspace>/dvc-remote``.
    """
    ws.root.mkdir(parents=True, exist_ok=True)
    if not (ws.root / ".git").exists():
        git(["init", "-q", "-b", "main"], ws.root)
    if not (ws.root / ".dvc").exists():
        dvc(["init", "-q"], ws.root)
    gitignore = ws.root / ".gitignore"
    if not gitignore.exists() or _WS_GITIGNORE not in gitignore.read_text():
        gitignore.write_text(_WS_GITIGNORE + (gitignore.read_text() if gitignore.exists() else ""))
    url = _remote(ws, remote)
    if url == str(ws.dvc_remote):
        ws.dvc_remote.mkdir(exist_ok=True)
    url = _configure_dvc(ws, url)
    shutil.copyfile(PROJECT_ROOT / "dvc.yaml", ws.root / "dvc.yaml")
    ws.human.mkdir(exist_ok=True)
    readme = ws.human / "README.md"
    if not readme.exists():
        readme.write_text(_HUMAN_README)
    return url


def mirror_images(src: Path, dest: Path) -> Discovery:
    """Make ``dest`` hold exactly the readable image files of ``src`` (only what changed is touched).

    Files are hard-linked when ``src`` and ``dest`` share a file system (10k images: ~0.3 s instead of ~2.7 s of
    copying), else copied. This is safe because nothing ever writes into a mirrored file: a changed image is
    unlinked and linked (or copied) again, and DVC adds with ``--no-relink`` and a copying cache, so the recorded
    versions live in DVC's cache as copies of their own (editing a source image never changes a version). Symlinks
    are mirrored as the file they point to, unless they leave ``src`` (then they are rejected).
    """
    found = discover(src)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = set(found.images)
    for path in sorted(dest.rglob("*"), reverse=True):
        rel = path.relative_to(dest).as_posix()
        if path.is_file() and rel not in wanted:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    link = True
    for rel in found.images:
        s, d = src / rel, dest / rel
        st = s.stat()
        if d.exists():
            dt = d.stat()
            same_file = (dt.st_ino, dt.st_dev) == (st.st_ino, st.st_dev)
            if same_file or (dt.st_size == st.st_size and int(dt.st_mtime) == int(st.st_mtime)):
                continue
            d.unlink()  # never write into it: it may be a hard link to an earlier source file
        d.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(s, d)  # follows a symlink: the link is to the file it points to
                continue
            except OSError:  # another file system, or links not allowed: copy from now on
                link = False
        shutil.copy2(s, d)
    return found


def _has_rows(csv_file: Path) -> bool:
    with open(csv_file, "rb") as fh:
        return len(fh.read(1 << 16).splitlines()) > 1


def _dvc_out(dvc_file: Path) -> dict[str, Any]:
    return yaml.safe_load(dvc_file.read_text())["outs"][0]


def version_data(
    ws: Workspace,
    images: Path | None,
    labels: Path | None,
    remote: str | None,
    push: bool,
    push_timeout: float | None = None,
    background_push: bool = False,
) -> DataVersion:
    """Mirror, ``dvc add``, ``dvc push`` and commit the data; return its version.

    With ``background_push`` the push runs beside what follows (:func:`start_push`); the caller must
    :func:`wait_for_push` before it publishes anything that says the data is in the remote.

    With ``images`` None the workspace's own data is versioned: ``data/images`` plus every refreshed batch
    (``merge_batches``), keeping its ground truth; that is what a scheduled or drift-triggered retrain trains on.

    Raises:
        FileNotFoundError: if the image folder (or labels file) is missing.
        VersioningError: if git or DVC fails (message names the command).
    """
    if images is None:
        if not ws.images.is_dir():
            raise FileNotFoundError(f"{ws.images} is missing: give --images for the first run of a workspace")
        url = init_workspace(ws, remote)
        merged = merge_batches(ws)
        found = discover(ws.images)
        source = f"{ws.images} (+{len(merged)} merged batches)"
    else:
        images = Path(images).resolve()
        if not images.is_dir():
            raise FileNotFoundError(f"image folder not found: {images}")
        if (ws.root == images or ws.root in images.parents) and images != ws.localized:
            raise ValueError(f"the image folder {images} must not be inside the workspace {ws.root}")
        url = init_workspace(ws, remote)
        found = mirror_images(images, ws.images)
        source = str(images)
        with open(ws.rejected, "w", newline="") as fh:  # image files never copied: they join the quarantine
            writer = csv.writer(fh)
            writer.writerow(["image", "reason"])
            writer.writerows(found.rejected)
    image_list, ignored = found.images, found.ignored
    if not image_list:
        raise ValueError(f"no image files under {source} ({len(ignored)} other files ignored)")
    targets = ["data/images", "data/labels.csv"]
    if labels is not None:
        labels = Path(labels)
        if not labels.is_file():
            raise FileNotFoundError(f"labels file not found: {labels}")
        shutil.copyfile(labels, ws.labels)
    elif images is not None or not ws.labels.is_file():  # an empty ground truth keeps evaluate's dependency stable
        ws.labels.write_text("path,label\n")
    dvc(["add", "-q", "--no-relink", *targets], ws.root)  # see mirror_images: the mirror may be hard links
    if push and background_push:
        start_push(ws.root, targets, push_timeout)
    elif push:
        dvc(["push", "-q", *targets], ws.root, timeout=push_timeout)
    out = _dvc_out(ws.root / "data" / "images.dvc")
    labels_md5 = _dvc_out(ws.root / "data" / "labels.csv.dvc")["md5"] if _has_rows(ws.labels) else None

    tracked = [p for p in (".gitignore", ".dvc", "dvc.yaml", "params.yaml", "data", "human") if (ws.root / p).exists()]
    git(["add", "-A", "--", *tracked], ws.root)
    if git(["status", "--porcelain", "--", *tracked], ws.root).strip():
        git(["commit", "-q", "-m", f"data {out['md5']} ({out.get('nfiles')} files)"], ws.root)
    commit = git(["rev-parse", "HEAD"], ws.root).strip()
    return DataVersion(
        md5=out["md5"],
        nfiles=int(out.get("nfiles", len(image_list))),
        size=int(out.get("size", 0)),
        remote=url,
        labels_md5=labels_md5,
        n_ignored=len(ignored),
        workspace_commit=commit,
    )


def current_data_version(ws: Workspace) -> dict[str, Any]:
    """The data version recorded in the workspace (for `dvc repro`, where no version step runs)."""
    dvc_file = ws.root / "data" / "images.dvc"
    if not dvc_file.is_file():
        raise FileNotFoundError(f"{dvc_file} is missing: version the data first (`autolabel run`)")
    out = _dvc_out(dvc_file)
    return {"md5": out["md5"], "nfiles": out.get("nfiles"), "size": out.get("size")}


@dataclass(frozen=True)
class BatchVersion:
    """A new batch of images added to the workspace's data history (``data/batches/<batch_id>``)."""

    batch_id: str
    md5: str
    nfiles: int
    remote: str
    workspace_commit: str
    rejected: list[tuple[str, str]]

    @property
    def folder(self) -> str:
        return f"data/batches/{self.batch_id}"

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "rejected"} | {"folder": self.folder}


def batch_id_of(src: Path, images: list[str]) -> str:
    """A content id for a batch (paths and bytes): ingesting the same batch twice is recognised."""
    import hashlib

    digest = hashlib.sha256()
    for rel in images:
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        with open(src / rel, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return f"batch-{digest.hexdigest()[:12]}"


def version_batch(
    ws: Workspace, src: Path, name: str | None, remote: str | None, push: bool, push_timeout: float | None = None
) -> BatchVersion:
    """Add a new batch beside the training data: its own ``.dvc`` file, pushed, committed (the history grows).

    The batch is versioned on its own, so its cost does not grow with the workspace; a later retrain merges every
    batch into ``data/images`` (``merge_batches``).

    Raises:
        FileNotFoundError: missing folder, or a workspace that was never trained.
        ValueError: a batch with no images, a bad batch name, or a folder inside the workspace.
    """
    src = Path(src).resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"image folder not found: {src}")
    if ws.root == src or ws.root in src.parents:
        raise ValueError(f"the image folder {src} must not be inside the workspace {ws.root}")
    if not (ws.root / ".dvc").is_dir():
        raise FileNotFoundError(f"{ws.root} is not a trained workspace: run `autolabel run` first")
    found = discover(src)
    if not found.images:
        raise ValueError(f"no image files under {src} ({len(found.ignored)} other files ignored)")
    batch_id = name or batch_id_of(src, found.images)
    if not batch_id.replace("-", "").replace("_", "").replace(".", "").isalnum() or batch_id.startswith("."):
        raise ValueError(f"batch name {batch_id!r}: use letters, digits, '-', '_' and '.' only")
    url = init_workspace(ws, remote)
    folder = f"data/batches/{batch_id}"
    mirror_images(src, ws.root / folder)
    dvc(["add", "-q", "--no-relink", folder], ws.root)  # see mirror_images
    if push:
        dvc(["push", "-q", folder], ws.root, timeout=push_timeout)
    git(["add", "-A", "--", f"{folder}.dvc", "data/batches/.gitignore", ".dvc"], ws.root)
    if git(["status", "--porcelain", "--", "data/batches"], ws.root).strip():
        git(["commit", "-q", "-m", f"batch {batch_id}"], ws.root)
    out = _dvc_out(ws.root / f"{folder}.dvc")
    return BatchVersion(
        batch_id=batch_id,
        md5=out["md5"],
        nfiles=int(out.get("nfiles", len(found.images))),
        remote=url,
        workspace_commit=git(["rev-parse", "HEAD"], ws.root).strip(),
        rejected=list(found.rejected),
    )


def merge_batches(ws: Workspace) -> list[str]:
    """Copy every refreshed batch into ``data/images/batches/<id>/`` (once) so a retrain sees all the data."""
    root = ws.root / "data" / "batches"
    merged = []
    for batch in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        dest = ws.images / "batches" / batch.name
        if not dest.exists():
            shutil.copytree(batch, dest)
            merged.append(batch.name)
    return merged
