"""Process settings for Prefect, MLflow, DVC and GX, applied when a command runs (never at import).

They must be in the environment before Prefect is imported. Values already set by the user win, so the same
code talks to real servers when ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` are set.
"""

from __future__ import annotations

import os
from pathlib import Path

QUIET = {
    # measured on 2 cores: the ephemeral Prefect server needs > 20 s to start the first time
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "autolabel",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
}
# an embedded (ephemeral) Prefect server needs none of its background services for a run
EPHEMERAL_SERVICES_OFF = [
    f"PREFECT_SERVER_SERVICES_{name}_ENABLED"
    for name in (
        "SCHEDULER",
        "LATE_RUNS",
        "FOREMAN",
        "TRIGGERS",
        "PAUSE_EXPIRATIONS",
        "REPOSSESSOR",
        "CANCELLATION_CLEANUP",
        "CLEANUP_RECONCILER",
        "DB_VACUUM",
    )
]


def configure(workspace: Path | None = None) -> None:
    """Set quiet, offline-safe defaults; with no Prefect server configured, keep Prefect's state per workspace."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("PREFECT_API_URL"):
        for key in EPHEMERAL_SERVICES_OFF:
            os.environ.setdefault(key, "false")
        if workspace is not None:
            home = Path(workspace).expanduser().resolve() / ".prefect"
            home.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("PREFECT_HOME", str(home))
