"""The retrain flow end to end on a small synthetic set: real Prefect, MLflow (sqlite), DVC, GX and torch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.publishing import sha256_file

pytestmark = pytest.mark.flow


def _dvc(ws: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def test_label_set_files_and_rows(retrain_run, synth_data):
    ws, path = retrain_run
    assert path.parent == ws / "labelsets" and path.is_dir()
    with open(path / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", "sha256", "cluster", "label", "confidence", "needs_review", "label_source"]
    quarantined = {r["image"] for r in csv.DictReader(open(ws / "results/validate/quarantine.csv"))}
    all_images = {r["path"] for r in csv.DictReader(open(synth_data / "labels.csv"))}
    assert {r["image"] for r in rows} == all_images - quarantined  # one row per image that passed
    for r in rows[:10]:
        assert r["sha256"] == sha256_file(synth_data / r["image"])
        assert 0.0 <= float(r["confidence"]) <= 1.0
    montages = sorted((path / "montages").glob("cluster-*.png"))
    assert len(montages) == len({r["cluster"] for r in rows})


def test_manifest_lineage(retrain_run):
    ws, path = retrain_run
    manifest = json.loads((path / "manifest.json").read_text())
    for key in (
        "labelset_id",
        "created_at",
        "prefect",
        "mlflow",
        "code",
        "data",
        "params",
        "params_hash",
        "models",
        "quality",
        "files",
        "metrics",
    ):
        assert key in manifest, key
    assert manifest["labelset_id"] == path.name
    assert manifest["prefect"]["flow_run_id"]
    assert manifest["mlflow"]["run_id"]
    assert set(manifest["code"]) >= {"git_commit", "git_dirty"}
    assert manifest["params"]["embed"]["epochs"] == 1
    assert manifest["models"]["embedder"]["name"] == "aoi-autolabel-embedder"
    for rel, digest in manifest["files"].items():
        assert sha256_file(path / rel) == digest
    assert "labels.csv" in manifest["files"] and any(f.startswith("montages/") for f in manifest["files"])


def test_dvc_version_matches_data_and_status_clean(retrain_run, synth_data):
    ws, path = retrain_run
    manifest = json.loads((path / "manifest.json").read_text())
    out = yaml.safe_load((ws / "data/images.dvc").read_text())["outs"][0]
    assert manifest["data"]["md5"] == out["md5"] and out["md5"].endswith(".dir")
    assert out["nfiles"] == len([p for p in synth_data.rglob("*") if p.suffix in (".png", ".jpg")])
    assert manifest["data"]["n_ignored"] == 3  # README.txt, labels.csv, planted.csv
    assert json.loads(_dvc(ws, "status", "--json") or "{}") == {}
    assert json.loads(_dvc(ws, "status", "--cloud", "--json") or "{}") == {}  # everything is in the remote
    assert (ws / "dvc.lock").is_file()


def test_planted_bad_files_are_quarantined_with_reasons(retrain_run, synth_data):
    ws, _ = retrain_run
    reasons = {r["image"]: r["reason"] for r in csv.DictReader(open(ws / "results/validate/quarantine.csv"))}
    expected = {"corrupt": "unreadable", "blank": "blank", "blurred": "blurred", "duplicate": "duplicate of"}
    planted = list(csv.DictReader(open(synth_data / "planted.csv")))
    assert planted
    for row in planted:
        assert row["path"] in reasons, row
        assert expected[row["kind"]] in reasons[row["path"]], (row, reasons[row["path"]])


def test_metrics_and_mlflow_registry(retrain_run):
    ws, path = retrain_run
    metrics = json.loads((ws / "results/evaluate/metrics.json").read_text())
    for key in ("nmi", "ari", "acc", "macro_recall", "per_class_recall", "n_images", "n_quarantined", "n_clusters"):
        assert metrics[key] is not None, key
    assert 0 <= metrics["acc"] <= 1 and metrics["n_clusters"] == 7

    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    manifest = json.loads((path / "manifest.json").read_text())
    run = client.get_run(manifest["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((ws / "mlartifacts").as_uri())  # artifacts stay in the workspace
    assert run.data.tags["autolabel.data_md5"] == manifest["data"]["md5"]
    assert run.data.tags["autolabel.prefect_flow_run_id"] == manifest["prefect"]["flow_run_id"]
    assert run.data.tags["mlflow.source.git.commit"] == manifest["code"]["git_commit"]
    assert "evaluate.acc" in run.data.metrics
    assert run.inputs.dataset_inputs[0].dataset.digest == manifest["data"]["md5"]
    for role in ("embedder", "clusterer"):
        mv = client.get_model_version_by_alias(f"aoi-autolabel-{role}", "champion")
        assert mv.run_id == run.info.run_id
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, f"labelset/{path.name}")}
    assert f"labelset/{path.name}/manifest.json" in artifacts


def test_dvc_repro_reproduces_without_prefect(retrain_run):
    """The same stages run by DVC: up to date after the flow; a changed param reruns what depends on it."""
    ws, path = retrain_run
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout.lower()
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["cluster"]["k"] = 5
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "Running stage 'cluster'" in proc.stdout and "Running stage 'embed'" not in proc.stdout
    new = json.loads((ws / "results/publish/labelset.json").read_text())
    assert new["labelset_id"] != path.name and Path(new["path"]).is_dir()
    assert json.loads((ws / "results/evaluate/metrics.json").read_text())["n_clusters"] == 5
