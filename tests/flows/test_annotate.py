"""Human labelling on a real run: label-next, the annotate flow (seeds + cluster names), bad inputs, simulate."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.flow
runner = CliRunner()


def _truth(synth_data: Path) -> dict[str, str]:
    with open(synth_data / "labels.csv", newline="") as fh:
        return {r["path"]: r["label"] for r in csv.DictReader(fh)}


def test_label_next_then_annotate_publishes_human_labels(retrain_run, synth_data, tmp_path):
    ws, first = retrain_run
    result = runner.invoke(app, ["label-next", "--workspace", str(ws), "--n", "12"])
    assert result.exit_code == 0, result.output
    next_csv = Path(result.stdout.strip().splitlines()[-1])
    with open(next_csv, newline="") as fh:
        asked = list(csv.DictReader(fh))
    assert len(asked) == 12 and [int(r["rank"]) for r in asked] == list(range(1, 13))
    assert all(r["reason"] for r in asked) and next_csv.with_suffix(".png").is_file()
    n_clusters = json.loads((ws / "results/cluster/metrics.json").read_text())["n_clusters"]
    assert sum("most typical" in r["reason"] for r in asked) == min(12, n_clusters)  # every cluster asked first

    truth = _truth(synth_data)
    seeds = tmp_path / "seeds.csv"
    seeds.write_text("image,label\n" + "".join(f"{r['image']},{truth[r['image']]}\n" for r in asked))
    names = tmp_path / "names.yaml"
    names.write_text("0: first-cluster\n")
    result = runner.invoke(
        app, ["annotate", "--workspace", str(ws), "--seeds", str(seeds), "--cluster-names", str(names)]
    )
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path != first and path.parent == first.parent
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["human_inputs"]["seed_labels_sha256"] and manifest["human_inputs"]["cluster_names_sha256"]
    assert manifest["models"] == json.loads((first / "manifest.json").read_text())["models"]  # no retraining
    assert {
        "human/seed_labels.csv",
        "human/cluster_names.yaml",
        "review_queue.csv",
        "report.html",
        "exports/coco.json",
        "exports/label_studio_tasks.json",
        "exports/cvat_annotations.xml",
    } <= set(manifest["files"])
    with open(path / "labels.csv", newline="") as fh:
        rows = {r["image"]: r for r in csv.DictReader(fh)}
    for r in asked:
        assert rows[r["image"]]["label"] == truth[r["image"]] and rows[r["image"]]["label_source"] == "human seed"
    assert {r["label_source"] for r in rows.values()} >= {"human seed", "seed propagation"}
    chain = json.loads(runner.invoke(app, ["lineage", str(path), "--image", asked[0]["image"], "--json"]).stdout)
    assert chain["image"]["seed_row"]["label"] == truth[asked[0]["image"]] and chain["image"]["seed_row"]["line"] == 2
    html = (path / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html  # offline
    annotate_metrics = json.loads((ws / "results/annotate/metrics.json").read_text())
    assert annotate_metrics["n_seeds"] == 12 and 0 <= annotate_metrics["overall_accuracy"] <= 1


def test_bad_human_input_names_the_line_and_publishes_nothing(retrain_run, tmp_path):
    ws, _ = retrain_run
    before = sorted(p.name for p in (ws / "labelsets").iterdir())
    human_before = {p.name: p.read_bytes() for p in (ws / "human").glob("*") if p.is_file()}
    names = tmp_path / "names.yaml"
    names.write_text("0: crack\n99: void\n")
    result = runner.invoke(app, ["annotate", "--workspace", str(ws), "--cluster-names", str(names)])
    assert result.exit_code != 0 and "names.yaml:2: unknown cluster 99" in result.output
    seeds = tmp_path / "seeds.csv"
    seeds.write_text("image,label\n/etc/passwd,crack\n")
    result = runner.invoke(app, ["annotate", "--workspace", str(ws), "--seeds", str(seeds)])
    assert result.exit_code != 0 and "seeds.csv:2" in result.output
    assert sorted(p.name for p in (ws / "labelsets").iterdir()) == before
    assert {p.name: p.read_bytes() for p in (ws / "human").glob("*") if p.is_file()} == human_before


def test_annotate_with_the_tracking_server_down_stops_before_any_work(retrain_run, tmp_path, monkeypatch):
    ws, _ = retrain_run
    before = sorted(p.name for p in (ws / "labelsets").iterdir())
    human_before = {p.name: p.read_bytes() for p in (ws / "human").glob("*") if p.is_file()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    names = tmp_path / "names.yaml"
    names.write_text("0: crack\n")
    result = runner.invoke(app, ["annotate", "--workspace", str(ws), "--cluster-names", str(names)])
    assert result.exit_code != 0
    assert f"MLflow tracking server at http://127.0.0.1:{port} is unreachable" in result.output, result.output
    assert sorted(p.name for p in (ws / "labelsets").iterdir()) == before
    assert {p.name: p.read_bytes() for p in (ws / "human").glob("*") if p.is_file()} == human_before


def _simulate_args(synth_data, ws) -> list[str]:
    return [
        "simulate",
        "--images",
        str(synth_data),
        "--labels",
        str(synth_data / "labels.csv"),
        "--budget",
        "0.1",
        "--rounds",
        "2",
        "--workspace",
        str(ws),
        "--no-retrain",
    ]


def test_simulate_plays_the_human(retrain_run, synth_data):
    ws, _ = retrain_run
    result = runner.invoke(app, _simulate_args(synth_data, ws))
    assert result.exit_code == 0, result.output
    metrics = json.loads((ws / "results/simulate/metrics.json").read_text())
    for key in ("overall_accuracy", "auto_accepted_accuracy", "coverage", "labels_used", "macro_recall"):
        assert key in metrics, key
    assert 0 < metrics["labels_used"] <= round(0.1 * metrics["n_images"]) + 1
    # the human's own labels are right, and propagation must not make things worse than labelling alone
    assert metrics["overall_accuracy"] >= metrics["labels_used"] / metrics["n_images"]
    assert 0 <= metrics["coverage"] <= 1 and 0 <= metrics["macro_recall"] <= 1
    assert metrics["coverage"] < 1 and metrics["overrides"] == []
    # --set applies without a retrain too (it was silently ignored): accepting every confidence accepts everything
    args = _simulate_args(synth_data, ws)
    accept_all = runner.invoke(app, [*args, "--set", "annotate.accept_confidence=0.0"])
    assert accept_all.exit_code == 0, accept_all.output
    loose = json.loads((ws / "results/simulate/metrics.json").read_text())
    assert loose["coverage"] == 1.0 and loose["overrides"] == ["annotate.accept_confidence=0.0"]
    assert loose["labels_used"] == metrics["labels_used"]  # label-next asks by margin, not by the threshold
    # --params would be ignored without a retrain: refused
    refused = runner.invoke(app, [*args, "--params", str(Path(__file__).resolve().parents[2] / "params.yaml")])
    assert refused.exit_code != 0 and "--params is for the retrain" in refused.output, refused.output
