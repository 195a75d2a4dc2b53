"""Migrated empty databases copied into new workspaces: real MLflow migrations, real sqlite files."""

from __future__ import annotations

import sqlite3

from mlflow import MlflowClient

from tasks import dbtemplates


def test_mlflow_store_starts_from_a_migrated_template(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    db = tmp_path / "ws" / "mlflow.db"
    dbtemplates.mlflow_store(db)
    templates = sorted((tmp_path / "cache" / "aoi-autolabel").glob("mlflow-*.db"))
    assert len(templates) == 1 and db.read_bytes() == templates[0].read_bytes()
    with sqlite3.connect(db) as con:
        tables = {name for (name,) in con.execute("select name from sqlite_master where type='table'")}
    assert {"experiments", "runs", "alembic_version", "registered_models"} <= tables
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri()))
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
    before = db.read_bytes()
    dbtemplates.mlflow_store(db)  # an existing store is never replaced
    assert db.read_bytes() == before
    assert not dbtemplates.copy_into(templates[0], db) and db.read_bytes() == before
    assert [p.name for p in db.parent.iterdir()] == ["mlflow.db"]  # no partial copy left behind


def test_a_template_that_cannot_be_made_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert dbtemplates.template("broken", "1", "raise SystemExit(3)") is None
    assert dbtemplates.template("empty", "1", "pass") is None  # exited cleanly without a database: not kept
    assert not list((tmp_path / "cache" / "aoi-autolabel").glob("*.db"))
