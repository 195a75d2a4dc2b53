"""Retrain, then refresh, against real servers: a Prefect server, an MLflow server (PostgreSQL + S3 artifacts) and a
DVC remote in S3 (moto). Assertions are made on the servers themselves, not on what the pipeline says it did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

AUTOLABEL = str(Path(sys.executable).parent / "autolabel")


def _autolabel(args: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run([AUTOLABEL, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"autolabel {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _prefect(services, path: str, body: dict) -> list[dict]:
    response = httpx.post(f"{services.prefect_api_url}/{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def _keys(services, bucket: str) -> list[str]:
    s3 = services.s3_client()
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


@pytest.fixture(scope="module")
def pipeline(services, fast_overrides, tmp_path_factory) -> dict:
    """One retrain and one refresh run by the CLI against the services (as an operator would)."""
    from tasks.synthetic import generate

    root = tmp_path_factory.mktemp("pipeline")
    generate(root / "base", n=120, seed=11)
    generate(root / "new", n=50, seed=12)
    remote = "s3://dvc-remote/pipeline-test"
    # the remote comes from the environment (as env.sh exports it), not from --set
    env = {**services.subprocess_env(), "AUTOLABEL_DVC_REMOTE": remote}
    sets = [a for s in fast_overrides for a in ("--set", s)]
    ws = root / "ws"
    _autolabel(
        ["run", "--images", str(root / "base"), "--labels", str(root / "base" / "labels.csv"), "--workspace", str(ws)]
        + sets,
        env,
        root,
    )
    retrain_set = _last_labelset(ws)
    out = _autolabel(["refresh", "--images", str(root / "new"), "--workspace", str(ws), "--no-retrain"], env, root)
    refresh_set = Path(out.strip().splitlines()[-1])
    return {"ws": ws, "retrain": retrain_set, "refresh": refresh_set, "env": env, "root": root, "remote": remote}


def _last_labelset(ws: Path) -> Path:
    sets = [p for p in (ws / "labelsets").iterdir() if (p / "manifest.json").is_file()]
    assert len(sets) == 1
    return sets[0]


def test_prefect_server_has_the_flow_runs_and_artifacts(services, pipeline):
    flows = {f["id"]: f["name"] for f in _prefect(services, "flows/filter", {})}
    runs = _prefect(services, "flow_runs/filter", {})
    done = {flows[r["flow_id"]] for r in runs if r["state_type"] == "COMPLETED"}
    assert {"retrain", "refresh"} <= done, runs
    manifest = json.loads((pipeline["retrain"] / "manifest.json").read_text())
    assert manifest["prefect"]["flow_run_id"] in {r["id"] for r in runs}
    keys = {a["key"] for a in _prefect(services, "artifacts/filter", {})}
    assert {"labelset", "champion-gate", "refresh-drift", "cluster-sizes"} <= keys


def test_mlflow_server_has_runs_models_and_s3_artifacts(services, pipeline):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=services.mlflow_tracking_uri, registry_uri=services.mlflow_tracking_uri)
    manifest = json.loads((pipeline["retrain"] / "manifest.json").read_text())
    assert manifest["mlflow"]["tracking_uri"] == services.mlflow_tracking_uri
    run = client.get_run(manifest["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["autolabel.gate.decision"] == "promoted"
    for role in ("embedder", "clusterer"):
        mv = client.get_model_version_by_alias(f"aoi-autolabel-{role}", "champion")
        assert mv.run_id == run.info.run_id
    keys = _keys(services, "mlflow-artifacts")
    assert any(run.info.run_id in k and k.endswith("manifest.json") for k in keys), keys[:20]
    assert any(k.endswith("model.pt") for k in keys), "the embedder's weights are in S3"
    refresh = json.loads((pipeline["refresh"] / "manifest.json").read_text())
    rrun = client.get_run(refresh["mlflow"]["run_id"])
    assert rrun.data.tags["autolabel.flow"] == "refresh"
    assert refresh["models"]["embedder"]["version"] == str(
        client.get_model_version_by_alias("aoi-autolabel-embedder", "champion").version
    )


def test_dvc_remote_in_s3_holds_both_data_versions(services, pipeline):
    # other tests' workspaces push to env.sh's default remote (s3://dvc-remote/autolabel): only ours are ours
    keys = [k for k in _keys(services, "dvc-remote") if k.startswith("pipeline-test/")]
    assert keys, "the remote named by AUTOLABEL_DVC_REMOTE holds nothing"
    for which in ("retrain", "refresh"):
        manifest = json.loads((pipeline[which] / "manifest.json").read_text())
        assert manifest["data"]["remote"] == pipeline["remote"]
        md5 = manifest["data"]["md5"].removesuffix(".dir")
        assert any(k.endswith(md5[2:] + ".dir") for k in keys), f"{which} data version {md5} not in the remote"
    # what an auditor runs: checksums, MLflow run and models on the server, data fetched back from S3
    for which in ("retrain", "refresh"):
        out = _autolabel(["verify", str(pipeline[which])], pipeline["env"], pipeline["root"])
        assert "verified" in out


def test_no_secret_reaches_the_workspace_or_servers(services, pipeline):
    secret = services.env["AWS_SECRET_ACCESS_KEY"]
    password = services.env["AUTOLABEL_PG_PASSWORD"]
    for path in pipeline["ws"].rglob("*"):
        if path.is_file() and ".dvc/config.local" not in path.as_posix() and path.stat().st_size < 5_000_000:
            data = path.read_bytes()
            assert secret.encode() not in data and password.encode() not in data, path
