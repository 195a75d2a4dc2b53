"""The annotate flow: new human inputs → labels → a new label set, without retraining.

Engineers name clusters or label the images ``label-next`` asked for; this flow validates those files, copies them
into the workspace's versioned ``human/`` folder, propagates, and publishes with the models of the last retrain.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
from prefect import flow

from flows.retrain import annotate_task, lineage_tags, publish_and_record, workspace_lock
from tasks import tracking, versioning
from tasks.annotation import load_cluster_names, load_seeds
from tasks.config import load_params
from tasks.preflight import before_work
from tasks.workspace import Workspace

log = logging.getLogger("autolabel")


@flow(name="annotate", log_prints=True)
def annotate(workspace: str, cluster_names: str | None = None, seeds: str | None = None) -> str:
    """Apply human inputs to the last retrain's clusters and publish a label set; returns its path."""
    log.setLevel(logging.INFO)
    ws = Workspace.at(workspace)
    with workspace_lock(ws):
        if not (ws.stage_dir("track") / "context.json").is_file():
            raise FileNotFoundError(f"{ws.root} has no trained models yet: run `autolabel run` first")
        params = load_params(ws.params)
        before_work(ws, params)  # services answer (else stop before any work); a killed run's leftovers closed
        images = set(pd.read_csv(ws.stage_dir("cluster") / "assignments.csv")["image"])
        n_clusters = int(ws.read_json("cluster")["n_clusters"])
        if cluster_names is not None:  # check before copying: a bad file must not land in the workspace
            load_cluster_names(Path(cluster_names), n_clusters)
        if seeds is not None:
            load_seeds(Path(seeds), images)
        ws.human.mkdir(exist_ok=True)
        for src, name in ((cluster_names, "cluster_names.yaml"), (seeds, "seed_labels.csv")):
            if src is not None and Path(src).resolve() != (ws.human / name).resolve():
                shutil.copyfile(src, ws.human / name)
        previous = ws.read_json("track", name="context.json")
        code = versioning.code_version()
        run_id = tracking.start_run(
            ws,
            params.track.experiment,
            run_name="annotate",
            params=params.as_dict(),
            tags={**lineage_tags(previous["data"], code, params), "autolabel.flow": "annotate"},
        )
        try:
            tracking.log_metrics(ws, run_id, "annotate", annotate_task(ws, params))
            path = publish_and_record(ws, params, run_id, previous["data"], code, previous["models"])
        except BaseException:
            tracking.end_run(ws, run_id, "FAILED")
            raise
        tracking.end_run(ws, run_id, "FINISHED")
        return str(path)
