"""Auditing a real label set: lineage, verify (and each of its failure modes), restore, diff, determinism."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.lineage import diff, lineage, restore, verify

pytestmark = pytest.mark.flow
runner = CliRunner()


def _editable_copy(labelset: Path, dest: Path) -> Path:
    """A writable copy of a (read-only) label set, to tamper with."""
    shutil.copytree(labelset, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest


def _edit_manifest(labelset: Path, change) -> None:
    path = labelset / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_lineage_json_has_every_field(retrain_run):
    ws, path = retrain_run
    result = runner.invoke(app, ["lineage", str(path), "--json"])
    assert result.exit_code == 0, result.output
    chain = json.loads(result.stdout)
    assert set(chain) >= {
        "labelset",
        "prefect",
        "mlflow",
        "models",
        "code",
        "data",
        "quality",
        "params_hash",
        "params",
        "human_inputs",
    }
    assert chain["labelset"]["id"] == path.name and chain["labelset"]["created_at"]
    assert chain["prefect"]["flow_run_id"] and chain["mlflow"]["run_id"] and chain["mlflow"]["experiment"]
    for model in chain["models"].values():
        assert {"name", "version", "aliases"} <= set(model) and "champion" in model["aliases"]
    assert {"git_commit", "git_dirty"} <= set(chain["code"])
    assert {"md5", "remote", "nfiles"} <= set(chain["data"])
    assert {"suite_sha256", "n_passed", "n_quarantined"} <= set(chain["quality"])
    assert {"cluster_names_sha256", "seed_labels_sha256"} <= set(chain["human_inputs"])

    with open(path / "labels.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    image = runner.invoke(app, ["lineage", str(path), "--image", row["image"], "--json"])
    one = json.loads(image.stdout)["image"]
    assert one["sha256"] == row["sha256"] and one["label"] == row["label"] and one["quality_passed"] is True
    assert {"confidence", "label_source", "cluster"} <= set(one)
    quarantined = next(csv.DictReader(open(ws / "results/validate/quarantine.csv")))
    q = lineage(path, quarantined["image"])["image"]
    assert q["quality_passed"] is False and q["quarantine_reason"] == quarantined["reason"]
    missing = runner.invoke(app, ["lineage", str(path), "--image", "no/such.png"])
    assert missing.exit_code != 0 and "not in label set" in missing.output


def test_verify_passes_on_an_untouched_label_set(retrain_run):
    _, path = retrain_run
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 0, result.output
    assert "fetched from" in result.output and "file checksums" in result.output


def test_verify_names_tampered_missing_and_extra_files(retrain_run, tmp_path):
    _, path = retrain_run
    copy = _editable_copy(path, tmp_path / path.name)
    (copy / "labels.csv").write_text((copy / "labels.csv").read_text().replace("cluster-", "cluster_", 1))
    next((copy / "montages").glob("*.png")).unlink()
    (copy / "notes.txt").write_text("added later")
    result = runner.invoke(app, ["verify", str(copy), "--no-remote"])
    assert result.exit_code == 1
    assert "tampered file: labels.csv" in result.output
    assert "missing file: montages/cluster-" in result.output
    assert "extra file not in the manifest: notes.txt" in result.output


def test_verify_names_missing_run_and_model_version(retrain_run, tmp_path):
    _, path = retrain_run
    copy = _editable_copy(path, tmp_path / path.name)

    def break_refs(m):
        m["mlflow"]["run_id"] = "0" * 32
        m["models"]["embedder"]["version"] = "999"

    _edit_manifest(copy, break_refs)
    problems = verify(copy, check_remote=False).problems
    assert any(p.startswith("missing MLflow run 000") for p in problems), problems
    assert any("missing model version: aoi-autolabel-embedder v999" in p for p in problems), problems


def test_verify_detects_data_missing_from_the_remote(retrain_run, tmp_path):
    ws, path = retrain_run
    remote = tmp_path / "remote-copy"
    shutil.copytree(ws / "dvc-remote", remote)
    # one image of this data version (the remote also holds other stages' outputs, e.g. the embedder's weights)
    md5 = json.loads((path / "manifest.json").read_text())["data"]["md5"]
    listing = json.loads((remote / "files/md5" / md5[:2] / md5[2:]).read_text())
    victim = remote / "files/md5" / listing[0]["md5"][:2] / listing[0]["md5"][2:]
    victim.unlink()
    copy = _editable_copy(path, tmp_path / path.name)
    _edit_manifest(copy, lambda m: m["data"].update(remote=str(remote)))
    result = verify(copy)
    assert not result.ok and any("cannot be fetched from the DVC remote" in p for p in result.problems)


def test_restore_is_byte_identical(retrain_run, synth_data, tmp_path):
    _, path = retrain_run
    info = restore(path, tmp_path / "restored")
    originals = {p.relative_to(synth_data).as_posix(): p for p in synth_data.rglob("*") if p.suffix in (".png", ".jpg")}
    restored = {
        p.relative_to(tmp_path / "restored").as_posix(): p for p in (tmp_path / "restored").rglob("*") if p.is_file()
    }
    assert set(restored) == set(originals) and info["files"] == len(originals)
    for rel, p in originals.items():
        assert hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256(restored[rel].read_bytes()).digest(), rel
    with pytest.raises(FileExistsError):
        restore(path, tmp_path / "restored")


def test_same_inputs_give_the_same_label_set_id(retrain_run, synth_data, fast_overrides, tmp_path):
    """Determinism: another workspace, the same data, params, code and (no) human inputs → the same id."""
    from flows.retrain import retrain

    _, first = retrain_run
    second = Path(
        retrain(
            images=str(synth_data),
            workspace=str(tmp_path / "ws2"),
            labels=str(synth_data / "labels.csv"),
            overrides=fast_overrides,
        )
    )
    assert second.name == first.name
    assert (second / "labels.csv").read_bytes() == (first / "labels.csv").read_bytes()
    d = diff(first, second)
    assert d["label_changed"] == [] and d["added"] == [] and d["removed"] == [] and d["causes"] == []
