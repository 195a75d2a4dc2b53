"""Auditing label sets: walk a label back to its sources, verify, diff and restore.

Everything starts from a label set's ``manifest.json`` (written by the publish step). The checks use the real
systems the manifest points at: the MLflow tracking store for the run and the registered model versions, and the
DVC remote for the data version (through a throw-away DVC repo, so the check does not depend on the workspace
still being there).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.publishing import sha256_file
from tasks.secrets import is_masked, redact, unmask


class LabelSetError(ValueError):
    """Not a label set (no readable manifest.json)."""


def load_manifest(labelset: Path) -> dict[str, Any]:
    path = Path(labelset) / "manifest.json"
    if not path.is_file():
        raise LabelSetError(f"{labelset} is not a label set: {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LabelSetError(f"{path} is not valid JSON: {exc}") from exc


def read_rows(labelset: Path) -> dict[str, dict[str, str]]:
    """``labels.csv`` rows keyed by image path."""
    with open(Path(labelset) / "labels.csv", newline="") as fh:
        return {row["image"]: row for row in csv.DictReader(fh)}


def lineage(labelset: Path, image: str | None = None) -> dict[str, Any]:
    """The chain from a label set (or one of its images) back to data, code, params, models, quality, run.

    Raises:
        KeyError: when ``image`` is neither labelled nor quarantined in this label set.
    """
    labelset = Path(labelset)
    m = load_manifest(labelset)
    chain: dict[str, Any] = {
        "labelset": {"id": m["labelset_id"], "created_at": m["created_at"], "path": str(labelset.resolve())},
        "prefect": m.get("prefect", {}),
        "mlflow": m.get("mlflow", {}),
        "models": m.get("models", {}),
        "code": m.get("code", {}),
        "data": m.get("data", {}),
        "quality": {k: v for k, v in m.get("quality", {}).items() if k != "quarantined"},
        "params_hash": m.get("params_hash"),
        "params": m.get("params", {}),
        "human_inputs": m.get("human_inputs", {}),
    }
    if image is None:
        return chain
    rows = read_rows(labelset)
    quarantined = {q["image"]: q["reason"] for q in m.get("quality", {}).get("quarantined", [])}
    if image in rows:
        row = rows[image]
        chain["image"] = {
            "path": image,
            "sha256": row["sha256"],
            "label": row["label"],
            "confidence": float(row["confidence"]),
            "needs_review": row["needs_review"] == "True",
            "label_source": row["label_source"],
            "cluster": int(row["cluster"]),
            "quality_passed": True,
        }
        seed = _seed_row(labelset, image)
        if seed is not None:
            chain["image"]["seed_row"] = seed
    elif image in quarantined:
        chain["image"] = {"path": image, "quality_passed": False, "quarantine_reason": quarantined[image]}
    else:
        raise KeyError(f"{image} is not in label set {m['labelset_id']} (neither labelled nor quarantined)")
    return chain


def _seed_row(labelset: Path, image: str) -> dict[str, Any] | None:
    seeds = labelset / "human" / "seed_labels.csv"
    if not seeds.is_file():
        return None
    with open(seeds, newline="") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), start=2):
            if row.get("image") == image:
                return {"file": "human/seed_labels.csv", "line": lineno, **row}
    return None


@dataclass
class Verification:
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(labelset: Path, check_remote: bool = True) -> Verification:
    """Recompute every checksum; check the MLflow run, the model versions and the data in the DVC remote."""
    labelset = Path(labelset)
    result = Verification()
    m = load_manifest(labelset)
    files: dict[str, str] = m.get("files", {})
    present = {p.relative_to(labelset).as_posix() for p in labelset.rglob("*") if p.is_file()} - {"manifest.json"}
    for rel, digest in sorted(files.items()):
        path = labelset / rel
        if not path.is_file():
            result.problems.append(f"missing file: {rel}")
        elif sha256_file(path) != digest:
            result.problems.append(f"tampered file: {rel} (sha256 differs from the manifest)")
    for rel in sorted(present - set(files)):
        result.problems.append(f"extra file not in the manifest: {rel}")
    result.checked.append(f"{len(files)} file checksums")
    _verify_mlflow(m, result)
    if check_remote:
        _verify_remote(m, result, labelset)
    return result


def _verify_mlflow(m: dict[str, Any], result: Verification) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = m.get("mlflow", {}).get("tracking_uri")
    run_id = m.get("mlflow", {}).get("run_id")
    if not uri or not run_id:
        result.problems.append("manifest names no MLflow run")
        return
    if is_masked(uri):  # recorded without its password: the user's environment holds the real URI
        real = unmask(uri, [os.environ.get("MLFLOW_TRACKING_URI")])
        if real is None:
            result.problems.append(f"the tracking URI {uri} is recorded masked: set MLFLOW_TRACKING_URI to verify")
            return
        uri = real
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        run = client.get_run(run_id)
        if run.info.lifecycle_stage == "deleted":
            result.problems.append(f"MLflow run {run_id} is deleted in {uri}")
        else:
            result.checked.append(f"MLflow run {run_id}")
    except MlflowException:
        result.problems.append(f"missing MLflow run {run_id} in {uri}")
    for role, model in sorted(m.get("models", {}).items()):
        try:
            mv = client.get_model_version(model["name"], str(model["version"]))
        except MlflowException:
            result.problems.append(f"missing model version: {model['name']} v{model['version']} ({role})")
            continue
        if mv.run_id != run_id and m.get("kind") != "refresh":  # a refresh labels with models of an earlier run
            result.problems.append(f"model {model['name']} v{model['version']} was not made by run {run_id}")
        result.checked.append(f"model {model['name']} v{model['version']}")


@contextlib.contextmanager
def remote_repo(remote: str, md5: str, nfiles: int, path: str = "images") -> Iterator[Path]:
    """A throw-away git + DVC repo whose ``<path>.dvc`` points at one data version in ``remote``."""
    with tempfile.TemporaryDirectory(prefix="autolabel-dvc-") as tmp:
        root = Path(tmp)
        _run(["git", "init", "-q"], root)
        _dvc(["init", "-q"], root)
        _dvc(["remote", "add", "-d", "origin", remote], root)
        (root / f"{path}.dvc").write_text(f"outs:\n- md5: {md5}\n  nfiles: {nfiles}\n  hash: md5\n  path: {path}\n")
        yield root


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = _run([sys.executable, "-m", "dvc", *args], cwd)
    if proc.returncode != 0 and args[0] in ("init", "remote"):
        raise RuntimeError(f"dvc {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _real_remote(labelset: Path, remote: str) -> str | None:
    """The remote URL with its credentials: a masked one is looked up in the DVC config of the label set's
    workspace (``.dvc/config.local`` keeps the password, see ``tasks.versioning``)."""
    if not is_masked(remote):
        return remote
    dvc_dir = Path(labelset).resolve().parents[1] / ".dvc"
    if not dvc_dir.is_dir():
        return None
    from dvc.config import Config

    config = Config(dvc_dir=str(dvc_dir), validate=False)
    urls = [r.get("url") for level in ("local", "repo") for r in config.load_one(level).get("remote", {}).values()]
    return unmask(remote, urls)


def _verify_remote(m: dict[str, Any], result: Verification, labelset: Path) -> None:
    data = m.get("data", {})
    md5, nfiles, remote = data.get("md5"), int(data.get("nfiles") or 0), data.get("remote")
    if not md5 or not remote:
        result.problems.append("manifest names no data version or DVC remote")
        return
    recorded, remote = remote, _real_remote(labelset, remote)
    if remote is None:
        result.problems.append(f"the DVC remote {recorded} is recorded masked and its workspace's DVC config is gone")
        return
    with remote_repo(remote, md5, nfiles) as root:
        # `dvc status --cloud` does not notice a single missing object: fetch every object for real instead
        proc = _dvc(["fetch", "images.dvc"], root)
        if proc.returncode != 0:
            detail = redact(" ".join((proc.stderr + proc.stdout).split())[-300:])
            result.problems.append(f"data version {md5} cannot be fetched from the DVC remote {recorded}: {detail}")
        else:
            result.checked.append(f"data version {md5} ({nfiles} files) fetched from {recorded}")


def restore(labelset: Path, to: Path) -> dict[str, Any]:
    """Check out the exact images of the label set's data version from the DVC remote into ``to``.

    Every labelled image is then compared with its sha256 in labels.csv.

    Raises:
        FileExistsError: ``to`` exists and is not empty.
        RuntimeError: the remote does not have the data, or a restored file differs.
    """
    labelset, to = Path(labelset), Path(to)
    m = load_manifest(labelset)
    if to.exists() and any(to.iterdir()):
        raise FileExistsError(f"{to} exists and is not empty")
    data = m["data"]
    remote = _real_remote(labelset, data["remote"])
    if remote is None:
        raise RuntimeError(f"the DVC remote {data['remote']} is recorded masked and its workspace's DVC config is gone")
    with remote_repo(remote, data["md5"], int(data["nfiles"])) as root:
        proc = _dvc(["pull", "-q", "images.dvc"], root)
        if proc.returncode != 0:
            detail = redact(proc.stderr)
            raise RuntimeError(f"could not fetch data version {data['md5']} from {data['remote']}: {detail}")
        to.parent.mkdir(parents=True, exist_ok=True)
        if to.exists():
            to.rmdir()
        shutil.copytree(root / "images", to)
    mismatched = [img for img, row in read_rows(labelset).items() if sha256_file(to / img) != row["sha256"]]
    if mismatched:
        raise RuntimeError(f"{len(mismatched)} restored files differ from the label set, e.g. {mismatched[0]}")
    nfiles = sum(1 for p in to.rglob("*") if p.is_file())
    return {"to": str(to), "files": nfiles, "verified_sha256": len(read_rows(labelset)), "data_md5": data["md5"]}


def diff(a: Path, b: Path) -> dict[str, Any]:
    """What changed from label set ``a`` to ``b``, and why (data, params, model, human input)."""
    ma, mb = load_manifest(a), load_manifest(b)
    ra, rb = read_rows(a), read_rows(b)
    changed = [
        {"image": img, "from": ra[img]["label"], "to": rb[img]["label"]}
        for img in sorted(set(ra) & set(rb))
        if ra[img]["label"] != rb[img]["label"]
    ]
    causes: list[str] = []
    if ma["data"]["md5"] != mb["data"]["md5"]:
        causes.append(f"data: {ma['data']['md5']} → {mb['data']['md5']}")
    if ma.get("params_hash") != mb.get("params_hash"):
        keys = _changed_keys(ma.get("params", {}), mb.get("params", {}))
        causes.append("params: " + ", ".join(f"{k}: {va!r} → {vb!r}" for k, va, vb in keys))
    for role in sorted(set(ma.get("models", {})) | set(mb.get("models", {}))):
        va = ma.get("models", {}).get(role, {}).get("version")
        vb = mb.get("models", {}).get(role, {}).get("version")
        if va != vb:
            causes.append(f"model: {role} v{va} → v{vb}")
    if ma.get("human_inputs", {}).get("hash") != mb.get("human_inputs", {}).get("hash"):
        causes.append("human input: cluster names or seed labels changed")
    if ma.get("code", {}).get("git_commit") != mb.get("code", {}).get("git_commit"):
        causes.append(f"code: {ma['code'].get('git_commit')} → {mb['code'].get('git_commit')}")
    return {
        "a": ma["labelset_id"],
        "b": mb["labelset_id"],
        "added": sorted(set(rb) - set(ra)),
        "removed": sorted(set(ra) - set(rb)),
        "label_changed": changed,
        "unchanged": len(set(ra) & set(rb)) - len(changed),
        "causes": causes,
    }


def _changed_keys(pa: dict[str, Any], pb: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(pa) | set(pb)):
        va, vb = pa.get(key), pb.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(_changed_keys(va, vb, f"{prefix}{key}."))
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out
