"""What a run does before any work: check the outside services, and close what a killed run left behind.

A run that found the tracking server down only after versioning the data and training would leave half-done work
behind (a data version without a run, a run without models). So the flows check first, with the bounded retries
of :mod:`tasks.retry`: the MLflow tracking server (``/health``, when ``MLFLOW_TRACKING_URI`` is an HTTP URL) and
the DVC remote (when the run pushes). Local stores need no check.

A run killed with SIGKILL cannot clean up; the next run in the workspace does, holding the workspace lock (so no
other run is alive): hidden temporary label-set folders are deleted (they were never visible as label sets), and
MLflow runs of the workspace's own store still marked RUNNING are marked KILLED. Stage outputs need nothing: every
stage rewrites its ``results/<stage>/`` from its inputs, and DVC's and the workspace's locks are released by the
operating system when their process dies.
"""

from __future__ import annotations

import logging

from tasks.config import Params
from tasks.publishing import remove_stale_temps
from tasks.tracking import check_tracking_server, end_orphaned_runs
from tasks.versioning import check_remote
from tasks.workspace import Workspace

log = logging.getLogger("autolabel")


def check_services(ws: Workspace, params: Params) -> None:
    """Raise :class:`tasks.retry.ServiceUnavailableError` naming the first service that does not answer."""
    t = params.track
    check_tracking_server(ws, t.retries, t.backoff, t.timeout)
    v = params.version
    if v.push:
        check_remote(ws, v.remote, v.retries, v.backoff, v.timeout)


def close_leftovers(ws: Workspace) -> None:
    """Clean up after a run that was killed (call holding the workspace lock)."""
    if ws.labelsets.is_dir():
        for path in remove_stale_temps(ws.labelsets):
            log.warning("removed %s, the unfinished label set of a run that was killed", path)
    for run_id in end_orphaned_runs(ws):
        log.warning("MLflow run %s was left RUNNING by a run that was killed: marked KILLED", run_id)


def before_work(ws: Workspace, params: Params) -> None:
    """Both, in the order that touches nothing when a service is down."""
    check_services(ws, params)
    close_leftovers(ws)
