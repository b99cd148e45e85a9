"""Getting a ``distributed.Client``: a LocalCluster sized to this machine by default, an
existing cluster by scheduler address or scheduler file, or a cluster built from a YAML spec
(``cluster_configs/``)."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator

import yaml
from distributed import Client, LocalCluster
from distributed.system import MEMORY_LIMIT


def local_cluster(
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | int | None = None,
    dashboard_address: str | None = ":0",
    **kwargs,
) -> LocalCluster:
    """A LocalCluster of worker processes, one BLAS thread each.

    Parameters
    ----------
    n_workers : int, optional
        Default: one per CPU core.
    threads_per_worker : int
        Task threads per worker; dasknmf's parallelism comes from tasks, not from BLAS.
    memory_limit : str or int, optional
        Per worker; default: the machine's memory divided among the workers.
    dashboard_address : str or None
        Where the dashboard listens (":0" picks a free port; None turns it off).
    """
    n_workers = n_workers or os.cpu_count() or 1
    if n_workers < 1:
        raise ValueError(f"n_workers must be at least 1, got {n_workers}.")
    if memory_limit is None:
        memory_limit = int(MEMORY_LIMIT // n_workers)
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        memory_limit=memory_limit,
        dashboard_address=dashboard_address,
        **kwargs,
    )


def from_spec(path: str | os.PathLike):
    """Build the cluster a YAML spec describes (dask-ctl's format): ``module`` and ``class``
    name the cluster class, ``args`` and ``kwargs`` its arguments."""
    if not os.path.exists(path):
        raise ValueError(f"Cluster spec {path} does not exist.")
    with open(path) as f:
        try:
            spec = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ValueError(f"Cluster spec {path} is not valid YAML: {error}") from error
    if not isinstance(spec, dict) or not {"module", "class"} <= spec.keys():
        raise ValueError(f"Cluster spec {path} must be a mapping with 'module' and 'class'.")
    args, kwargs = spec.get("args") or [], spec.get("kwargs") or {}
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError(f"Cluster spec {path}: 'args' must be a list and 'kwargs' a mapping.")
    try:
        module = importlib.import_module(spec["module"])
    except ImportError as error:
        raise ValueError(
            f"Cluster spec {path} names module {spec['module']!r}, which cannot be imported "
            f"({error}); install the package that provides it."
        ) from error
    try:
        cluster_class = getattr(module, spec["class"])
    except AttributeError:
        raise ValueError(
            f"Cluster spec {path}: module {spec['module']!r} has no class {spec['class']!r}."
        ) from None
    return cluster_class(*args, **kwargs)


@contextlib.contextmanager
def connect(
    address: str | None = None,
    scheduler_file: str | os.PathLike | None = None,
    spec: str | os.PathLike | None = None,
    **local_kwargs,
) -> Iterator[Client]:
    """A Client for the block: to ``address``, to the scheduler in ``scheduler_file``, to a
    cluster built from the YAML ``spec``, or to a new ``local_cluster(**local_kwargs)``; a
    cluster made here is shut down afterwards."""
    given = [
        name
        for name, value in (
            ("address", address),
            ("scheduler_file", scheduler_file),
            ("spec", spec),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(f"Give one of address, scheduler_file and spec, not {given}.")
    if spec is not None:
        with from_spec(spec) as cluster, Client(cluster) as client:
            yield client
    elif address is not None:
        with Client(address) as client:
            yield client
    elif scheduler_file is not None:
        if not os.path.exists(scheduler_file):
            raise ValueError(f"Scheduler file {scheduler_file} does not exist.")
        with Client(scheduler_file=os.fspath(scheduler_file)) as client:
            yield client
    else:
        with local_cluster(**local_kwargs) as cluster, Client(cluster) as client:
            yield client
