"""Publishing label sets: immutable, checksummed, all-or-nothing.

A label set is written into a hidden temporary folder next to its destination, made read-only, and renamed into
place in one step, so a crash never leaves a half-published set. Its id is a content hash of what determines the
labels (data version, params, labels, human inputs): the same inputs give the same id, and an existing set is
never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

LABEL_COLUMNS = ["image", "sha256", "cluster", "label", "confidence", "needs_review", "label_source"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def montage(images: np.ndarray, title: str, columns: int = 6, scale: int = 2) -> Image.Image:
    """A grid of standardised grey images with a title bar."""
    n = len(images)
    side = images.shape[1] * scale if n else 64
    rows = max(1, -(-n // columns))
    canvas = Image.new("L", (columns * (side + 2) + 2, rows * (side + 2) + 22), 255)
    ImageDraw.Draw(canvas).text((4, 4), title, fill=0)
    for i, img in enumerate(images):
        tile = Image.fromarray(img).resize((side, side), Image.Resampling.NEAREST)
        canvas.paste(tile, (2 + (i % columns) * (side + 2), 22 + (i // columns) * (side + 2)))
    return canvas


def labelset_id(data_md5: str, params_hash: str, labels_sha256: str, human_inputs_hash: str) -> str:
    """Content id: the same data, params, labels and human inputs give the same id."""
    key = json.dumps([data_md5, params_hash, labels_sha256, human_inputs_hash]).encode()
    return hashlib.sha256(key).hexdigest()[:16]


def _make_read_only(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    folder.chmod(folder.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def remove_stale_temps(labelsets: Path) -> list[Path]:
    """Delete temporary folders left by crashed publishes (their process is gone); return them."""
    removed = []
    for tmp in labelsets.glob(".tmp-*"):
        pid = tmp.name.split("-")[1]
        if pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid():
            continue
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.chmod(0o755)
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def publish(
    labelsets: Path,
    set_id: str,
    write_files: Callable[[Path], None],
    manifest: dict[str, Any],
) -> tuple[Path, bool]:
    """Write a label set atomically and return ``(path, created)``.

    ``write_files(folder)`` writes every file of the set; this adds ``manifest.json`` with the sha256 of each file,
    makes the folder read-only and renames it into place. If ``labelsets/<set_id>`` exists it is left untouched
    and ``created`` is False.
    """
    labelsets.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(labelsets)
    final = labelsets / set_id
    if final.exists():
        return final, False
    tmp = labelsets / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_files(tmp)
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {**manifest, "labelset_id": set_id, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        _make_read_only(tmp)
        os.rename(tmp, final)
    except BaseException:
        for path in [tmp, *tmp.rglob("*")] if tmp.exists() else []:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, True
