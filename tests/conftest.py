"""Shared fixtures: matrices, the array types every backend test runs on, a real LocalCluster."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from distributed.diagnostics.plugin import SchedulerPlugin


def low_rank(m: int, n: int, k: int, noise: float = 0.1, seed: int = 0, dtype=np.float64):
    """W·H + noise, all uniform from ``default_rng(seed)`` in that order."""
    rng = np.random.default_rng(seed)
    W = rng.uniform(size=(m, k))
    H = rng.uniform(size=(k, n))
    return (W @ H + noise * rng.uniform(size=(m, n))).astype(dtype)


def _as_numpy(X, panel_rows):
    return X


def _as_csr(X, panel_rows):
    return sp.csr_array(X)


def _as_dask(X, panel_rows):
    return da.from_array(X, chunks=(panel_rows, X.shape[1]))


ARRAY_TYPES = {"numpy": _as_numpy, "scipy-csr": _as_csr, "dask": _as_dask}


@pytest.fixture(params=sorted(ARRAY_TYPES))
def array_type(request):
    """Converts a numpy matrix to each input type the estimator takes in memory or via Dask:
    ``array_type(X, panel_rows)``."""
    return ARRAY_TYPES[request.param]


@pytest.fixture
def sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of two worker processes with one thread each."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            memory_limit="2GiB",
            dashboard_address=None,
        ) as local,
        Client(local) as client,
    ):
        yield client


def run_cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``python -m dasknmf ARGS`` as a user runs it, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "dasknmf", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def last_json(result) -> dict:
    """The JSON object a successful ``--json`` run printed last."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


class _SchedulerOrder(SchedulerPlugin):
    """A scheduler plugin that keeps the transitions of tasks, in the order the scheduler made
    them: ``(key, start, finish, worker)``; ``worker`` where a task finished."""

    name = "tests-scheduler-order"

    def __init__(self):
        self.events = []

    async def start(self, scheduler) -> None:
        pass

    def transition(self, key, start, finish, *args, **kwargs):
        self.events.append((key, start, finish, kwargs.get("worker")))


@contextmanager
def scheduler_order(client):
    """The transitions the scheduler makes inside the block, in its order (a list filled on
    leaving it). The task stream's times are each worker's clock shifted by an estimate of its
    offset from the scheduler's, which under load erred by a quarter of a second: they cannot
    order tasks of different workers, the scheduler's order can."""
    client.register_plugin(_SchedulerOrder())
    events = []
    try:
        yield events
    finally:
        events.extend(
            client.run_on_scheduler(
                lambda dask_scheduler: dask_scheduler.plugins[_SchedulerOrder.name].events
            )
        )
        client.unregister_scheduler_plugin(_SchedulerOrder.name)
