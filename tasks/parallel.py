"""Embarrassingly parallel work (image stats, embedding inference) in chunks, on a Prefect task runner.

The stage functions take an optional ``mapper(fn, items) -> results`` and call it on chunks; without one they run
serially in the process (what ``dvc repro`` does). The Prefect flows pass :func:`prefect_mapper`, which runs the
chunks as Prefect tasks of a small sub-flow on the task runner chosen in ``params.yaml``'s ``runner`` section:
``local`` (Prefect's thread pool) or ``dask`` (``prefect-dask``: a ``LocalCluster`` of worker processes per run, or
an existing scheduler at ``runner.address``). Results come back in item order, so the output is the same whatever
the runner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tasks.config import RunnerParams

T = TypeVar("T")
R = TypeVar("R")
Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]


def serial_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    return [fn(item) for item in items]


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``range(n)`` in chunks of ``size``."""
    return [(i, min(i + size, n)) for i in range(0, n, max(size, 1))]


def task_runner(params: RunnerParams):
    """The Prefect task runner ``params`` asks for."""
    if params.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if params.address:
            return DaskTaskRunner(address=params.address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": params.n_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
                "host": "127.0.0.1",
            },
        )
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=params.n_workers)


def prefect_mapper(params: RunnerParams, name: str) -> Mapper:
    """A mapper that runs each item as a task ``name`` of a sub-flow on the configured task runner."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    @task(name=name, cache_policy=NO_CACHE)
    def apply(fn: Callable[[Any], Any], item: Any) -> Any:
        return fn(item)

    def mapper(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        # a flow without parameters: the function and the chunks (arrays) never go to the API, only to the runner
        @flow(name=f"{name}-fan-out", task_runner=task_runner(params))
        def fan_out() -> list[Any]:
            futures = [apply.submit(fn, item) for item in items]
            return [f.result() for f in futures]

        return fan_out()

    return mapper
