"""The version step on real git and DVC: the mirror's hard links never let a source edit change a recorded version."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import versioning
from tasks.workspace import Workspace


def _png(path, seed: int, side: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)).save(path)


def _cached(ws: Workspace, data: bytes):
    md5 = hashlib.md5(data).hexdigest()
    return ws.root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def test_mirror_links_and_versions_stay_copies(tmp_path):
    src, ws = tmp_path / "src", Workspace.at(tmp_path / "ws")
    for i, rel in enumerate(["a.png", "b.png", "sub/c.png"]):
        _png(src / rel, i)
    modes = {p: p.stat().st_mode for p in src.rglob("*.png")}
    first = versioning.version_data(ws, src, None, None, push=True)
    assert first.nfiles == 3
    for rel in ["a.png", "b.png", "sub/c.png"]:
        mirrored, cached = ws.images / rel, _cached(ws, (src / rel).read_bytes())
        assert mirrored.samefile(src / rel)  # a hard link: no bytes copied
        assert cached.is_file() and not cached.samefile(src / rel)  # the version is a copy of its own
    assert {p: p.stat().st_mode for p in src.rglob("*.png")} == modes  # the user's files are untouched
    old_a = (src / "a.png").read_bytes()

    with open(src / "a.png", "r+b") as fh:  # edited in place (same inode)
        fh.seek(len(old_a) - 8)
        fh.write(b"\x00" * 8)
    (src / "b.png").unlink()
    _png(src / "b.png", 7, side=30)  # replaced by another file
    second = versioning.version_data(ws, src, None, None, push=True)
    assert second.md5 != first.md5
    assert _cached(ws, old_a).read_bytes() == old_a  # the first version still holds the old bytes
    assert (ws.images / "b.png").samefile(src / "b.png")
    cmd = [sys.executable, "-m", "dvc", "status", "-q", "data/images.dvc"]
    status = subprocess.run(cmd, cwd=ws.root, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr  # the data matches its .dvc file


def test_mirror_copies_when_links_are_impossible(tmp_path):
    """Across file systems (here: /dev/shm, a tmpfs, when the test's folder is on another one) the mirror copies.

    Skipped only outside CI; in CI (``CI=true``) a machine without a second file system fails the test instead."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        reason = "no second file system to mirror across"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    with tempfile.TemporaryDirectory(dir=shm) as other:
        src = tmp_path / "src"
        _png(src / "a.png", 1)
        found = versioning.mirror_images(src, Path(other) / "images")
        copy = Path(other) / "images" / "a.png"
        assert found.images == ["a.png"] and copy.read_bytes() == (src / "a.png").read_bytes()
        assert not copy.samefile(src / "a.png")


def test_workspace_config_beats_a_user_wide_hardlink_cache(tmp_path, monkeypatch):
    """A user-wide DVC config with ``cache.type hardlink`` would make the cache share inodes with the mirror, i.e. with
    the user's own files; the workspace's config (written in-process, not by ``dvc config``) overrides it."""
    user_dir = tmp_path / "user-dvc"
    user_dir.mkdir()
    (user_dir / "config").write_text("[cache]\n    type = hardlink\n[core]\n    analytics = true\n")
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(user_dir))
    src, ws = tmp_path / "src", Workspace.at(tmp_path / "ws")
    _png(src / "a.png", 3)
    versioning.version_data(ws, src, None, None, push=False)
    cmd = [sys.executable, "-m", "dvc", "config", "--list"]
    listed = subprocess.run(cmd, cwd=ws.root, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "cache.type=reflink,copy" in listed and "core.analytics=false" in listed
    assert not _cached(ws, (src / "a.png").read_bytes()).samefile(src / "a.png")
