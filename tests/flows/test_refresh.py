"""Refresh flow and champion gate under the real Prefect engine, MLflow registry (sqlite) and DVC.

One workspace tells the story a scheduled deployment lives through: a first retrain (champion), a new batch
labelled by the champion, cluster names reaching later batches, a weaker retrain that must not take over, and a
drifted batch that triggers a retrain on all the data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageOps

from tasks.workspace import Workspace

pytestmark = pytest.mark.flow
GATE = ["gate.metric=nmi"]


def _client(ws: Path):
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _champion(ws: Path) -> dict[str, str]:
    client = _client(ws)
    return {
        role: str(client.get_model_version_by_alias(f"aoi-autolabel-{role}", "champion").version)
        for role in ("embedder", "clusterer")
    }


def _artifact(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


@pytest.fixture(scope="module")
def batches(tmp_path_factory) -> dict[str, Path]:
    """Training images, a new batch like them, and a drifted batch (inverted and rotated: a new machine)."""
    from tasks.synthetic import generate

    root = tmp_path_factory.mktemp("batches")
    generate(root / "base", n=150, seed=3)
    generate(root / "new", n=60, seed=4)
    generate(root / "later", n=50, seed=5)
    drifted = root / "drifted"
    for src in sorted((root / "later").rglob("*.png")):
        try:
            with Image.open(src) as im:
                grey = im.convert("L")
        except OSError:
            continue  # the generator plants corrupt files; the drifted batch needs none
        dst = drifted / src.relative_to(root / "later")
        dst.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(grey).rotate(45).save(dst)
    return {"base": root / "base", "new": root / "new", "later": root / "later", "drifted": drifted}


@pytest.fixture(scope="module")
def trained(prefect_engine, batches, fast_overrides, tmp_path_factory) -> Path:
    from flows.retrain import retrain

    ws = tmp_path_factory.mktemp("refresh-ws") / "ws"
    retrain(
        images=str(batches["base"]),
        workspace=str(ws),
        labels=str(batches["base"] / "labels.csv"),
        overrides=fast_overrides + GATE,
    )
    return ws


@pytest.fixture(scope="module")
def refreshed(trained, batches) -> dict:
    from flows.refresh import refresh

    return refresh(images=str(batches["new"]), workspace=str(trained), allow_retrain=False)


def test_first_retrain_becomes_champion(trained):
    gate = Workspace.at(trained).read_json("track", name="gate.json")
    assert gate["promoted"] and gate["reason"] == "no champion yet" and gate["metric"] == "nmi"
    assert _champion(trained) == {"embedder": "1", "clusterer": "1"}
    run = _client(trained).get_model_version("aoi-autolabel-embedder", "1").run_id
    tags = _client(trained).get_run(run).data.tags
    assert tags["autolabel.gate.decision"] == "promoted"
    assert _artifact("champion-gate"), "the gate decision is a Prefect artifact"


def test_refresh_labels_new_batch_with_champion(trained, refreshed, batches):
    from tasks.lineage import verify

    ws = Workspace.at(trained)
    path = Path(refreshed["labelset"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "refresh"
    assert {r: m["version"] for r, m in manifest["models"].items()} == {"embedder": "1", "clusterer": "1"}
    assert "champion" in manifest["models"]["embedder"]["aliases"]
    batch_id = refreshed["batch_id"]
    assert manifest["data"]["folder"] == f"data/batches/{batch_id}"
    # the batch is its own DVC version, committed to the workspace's history
    assert (ws.root / f"data/batches/{batch_id}.dvc").is_file()
    assert f"batch {batch_id}" in _git_log(ws.root)
    planted = pd.read_csv(batches["new"] / "planted.csv")
    rows = pd.read_csv(path / "labels.csv")
    quarantined = set(pd.read_csv(path / "quarantine.csv")["image"])
    n_files = sum(1 for p in batches["new"].rglob("*") if p.is_file() and p.suffix in {".png", ".jpg"})
    assert not set(planted["path"]) & set(rows["image"]), "planted bad files are never labelled"
    assert len(rows) + len(quarantined) == n_files, "every image is labelled or quarantined"
    assert rows["needs_review"].all(), "no cluster is named yet: everything goes to review"
    assert set(refreshed["drift"]) >= {"far_share", "psi", "mean_shift", "drifted"}
    assert not refreshed["drift"]["drifted"], refreshed["drift"]
    result = verify(path)
    assert result.ok, result.problems
    tags = _client(trained).get_run(refreshed["mlflow_run_id"]).data.tags
    assert tags["autolabel.flow"] == "refresh" and tags["autolabel.champion.embedder"] == "aoi-autolabel-embedder/1"
    assert _artifact("refresh-drift")


def test_same_batch_again_gives_the_same_label_set(trained, refreshed, batches):
    from flows.refresh import refresh

    again = refresh(images=str(batches["new"]), workspace=str(trained), allow_retrain=False)
    assert again["labelset"] == refreshed["labelset"] and again["batch_id"] == refreshed["batch_id"]


def test_cluster_names_reach_later_batches(trained, refreshed, batches, tmp_path):
    from flows.annotate import annotate
    from flows.refresh import refresh

    ws = Workspace.at(trained)
    names = tmp_path / "names.yaml"
    names.write_text("".join(f"{c}: type-{c % 3}\n" for c in range(7)))
    annotate(workspace=str(ws.root), cluster_names=str(names))
    result = refresh(images=str(batches["later"]), workspace=str(ws.root), allow_retrain=False)
    rows = pd.read_csv(Path(result["labelset"]) / "labels.csv")
    assert set(rows["label_source"]) == {"champion cluster label"}
    assert set(rows["label"]) <= {"type-0", "type-1", "type-2"}
    manifest = json.loads((Path(result["labelset"]) / "manifest.json").read_text())
    assert manifest["labels_from_labelset"] is not None


def test_weaker_challenger_does_not_replace_champion(trained, refreshed, fast_overrides):
    from flows.retrain import retrain

    ws = Workspace.at(trained)
    weak = ["cluster.method=kmeans", "cluster.k=2", "embed.method=raw"]
    path = retrain(workspace=str(ws.root), overrides=fast_overrides + GATE + weak)
    gate = ws.read_json("track", name="gate.json")
    assert not gate["promoted"], gate
    assert gate["champion_before"] == {"embedder": "1", "clusterer": "1"}
    assert gate["challenger_score"] < gate["champion_score"]
    assert _champion(ws.root) == {"embedder": "1", "clusterer": "1"}
    client = _client(ws.root)
    assert str(client.get_model_version_by_alias("aoi-autolabel-embedder", "challenger").version) == "2"
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["models"]["embedder"]["aliases"] == ["challenger"]
    run = client.get_run(manifest["mlflow"]["run_id"])
    assert run.data.metrics["gate.promoted"] == 0 and run.data.tags["autolabel.gate.decision"] == "kept champion"


def test_drifted_batch_triggers_retrain_on_all_data(trained, refreshed, batches, fast_overrides):
    from flows.refresh import refresh

    ws = Workspace.at(trained)
    result = refresh(images=str(batches["drifted"]), workspace=str(ws.root), overrides=fast_overrides + GATE)
    drift = result["drift"]
    # a new machine moves every image the same way: the cluster shares collapse (psi). far_share may stay low,
    # since images that all moved together can sit close to one prototype (see tasks/drift.py)
    assert drift["drifted"] and any(r.startswith("psi") for r in drift["reasons"]), drift
    assert drift["psi"] > 10 * max(refreshed["drift"]["psi"], 0.01), (drift, refreshed["drift"])
    assert result.get("retrain_labelset"), "drift must trigger the retrain flow"
    manifest = json.loads((Path(result["retrain_labelset"]) / "manifest.json").read_text())
    batches_in_ws = sorted(p.name for p in (ws.root / "data" / "batches").iterdir() if p.is_dir())
    assert sorted(p.name for p in (ws.images / "batches").iterdir()) == batches_in_ws
    n_batch_files = sum(1 for p in (ws.root / "data" / "batches").rglob("*") if p.is_file() and p.suffix != ".dvc")
    assert manifest["data"]["nfiles"] >= 150 + n_batch_files - 10  # base + every batch (a few base files unread)


def _git_log(root: Path) -> str:
    import subprocess

    return subprocess.run(["git", "log", "--format=%s"], cwd=root, capture_output=True, text=True).stdout


def test_empty_inbox_is_skipped_not_failed(trained, tmp_path):
    from flows.refresh import refresh

    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "notes.txt").write_text("not an image")
    result = refresh(images=str(tmp_path / "inbox"), workspace=str(trained))
    assert result["labelset"] is None and "no images" in result["skipped"]
