"""The workspace: one folder that is a git + DVC repo holding a run's data, results, tracking store and label sets.

Keeping every path here means the Prefect flow, the `autolabel stage` commands run by `dvc repro`, and the tests
all agree on where things live.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("validate", "standardize", "embed", "cluster", "evaluate", "annotate", "publish")


@dataclass(frozen=True)
class Workspace:
    """Paths inside a workspace folder (nothing is created on construction)."""

    root: Path

    @classmethod
    def at(cls, root: Path | str) -> Workspace:
        return cls(Path(root).expanduser().resolve())

    @property
    def images(self) -> Path:
        return self.root / "data" / "images"

    @property
    def localized(self) -> Path:
        """Defect patches cut from raw images by ``autolabel run --templates``: what the version step then mirrors
        into ``images`` (outside ``data/``, so git never sees the patches; DVC versions them as ``data/images``)."""
        return self.root / "localized"

    @property
    def rejected(self) -> Path:
        """Image files of the input folder that were not copied (e.g. symlinks leaving it), with reasons."""
        return self.root / "data" / "rejected.csv"

    @property
    def labels(self) -> Path:
        return self.root / "data" / "labels.csv"

    @property
    def human(self) -> Path:
        """Versioned human inputs: ``cluster_names.yaml`` and ``seed_labels.csv``."""
        return self.root / "human"

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def dvc_remote(self) -> Path:
        return self.root / "dvc-remote"

    @property
    def labelsets(self) -> Path:
        return self.root / "labelsets"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def prefect_home(self) -> Path:
        return self.root / ".prefect"

    def stage_dir(self, stage: str) -> Path:
        """``results/<stage>/``: every output of a stage, and its ``metrics.json``."""
        return self.root / "results" / stage

    def read_json(self, stage: str, name: str = "metrics.json") -> dict[str, Any]:
        path = self.stage_dir(stage) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the {stage} stage first")
        return json.loads(path.read_text())

    def write_json(self, stage: str, data: dict[str, Any], name: str = "metrics.json") -> Path:
        path = self.stage_dir(stage) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        return path
