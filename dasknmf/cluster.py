"""Getting a ``distributed.Client``: a LocalCluster sized to this machine by default, an
existing cluster by scheduler address or scheduler file, or a cluster built from a YAML spec
(``cluster_configs/``)."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

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


def load_spec(path: str | os.PathLike) -> tuple[Callable[..., Any], list, dict]:
    """Read and check a YAML cluster spec (dask-ctl's format) without building anything:
    ``module`` and ``class`` name the cluster class, ``args`` and ``kwargs`` its arguments.

    Returns ``(cluster_class, args, kwargs)``. Raises ValueError naming the problem: a missing
    or malformed file, a module that cannot be imported, a class it lacks, or arguments the
    class does not take (an unknown keyword is named, with the spec's path).
    """
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
    _check_arguments(cluster_class, args, kwargs, f"Cluster spec {path}: {spec['class']}")
    return cluster_class, args, kwargs


def from_spec(path: str | os.PathLike):
    """Build the cluster a YAML spec describes (dask-ctl's format; see ``load_spec``)."""
    cluster_class, args, kwargs = load_spec(path)
    return cluster_class(*args, **kwargs)


def _check_arguments(cluster_class, args: list, kwargs: dict, where: str) -> None:
    """Raise ValueError if ``cluster_class(*args, **kwargs)`` cannot bind: an unknown keyword
    (a typo in the spec) is named, with the closest accepted one."""
    try:
        signature = inspect.signature(cluster_class)
    except (TypeError, ValueError):
        return  # nothing to check against (a builtin, say)
    accepted = _accepted_keywords(cluster_class, kwargs)
    unknown = [key for key in kwargs if accepted is not None and key not in accepted]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(accepted), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        keywords = "keyword" if len(unknown) == 1 else "keywords"
        raise ValueError(f"{where} takes no {keywords} {', '.join(hints)}.")
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        raise ValueError(f"{where} does not take these arguments: {error}.") from None


def _accepted_keywords(target, kwargs: dict) -> set[str] | None:
    """The keywords ``target(...)`` accepts, following its ``**kwargs`` to where they go; None
    when they go somewhere ``_receiver`` does not know (then anything may be valid)."""
    accepted: set[str] = set()
    while target is not None:
        try:
            parameters = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            return None
        accepted |= {
            p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return accepted
        target = _receiver(target, kwargs)
    return None


def _receiver(target, kwargs: dict):
    """Where the constructor ``target`` passes its ``**kwargs``, for the cluster classes of
    ``cluster_configs/`` and the classes those pass them through; None for any other class,
    whose keywords then go unchecked: a ``**kwargs`` may go anywhere.

    - ``distributed.LocalCluster``: to its worker class (``worker_class``, else a Nanny, or a
      Worker when ``processes`` is false); a Nanny passes them to a Worker, a Worker to
      ``ServerNode``.
    - ``SSHCluster`` (a function): to ``SpecCluster``. Keywords of the deprecated SSH API
      (``n_workers``, ``scheduler_addr``, ...) are rejected too; the new API takes them in
      ``worker_options`` and ``scheduler_options``.
    - dask-jobqueue's ``JobQueueCluster`` (SLURMCluster, PBSCluster, ...): to its ``job_cls``
      (SLURMJob, ...), whose ``**kwargs`` go to the base class ``Job``.
    - dask-kubernetes' ``KubeCluster``: to ``distributed.deploy.Cluster``.
    """
    from distributed import Nanny, SpecCluster, Worker
    from distributed.node import ServerNode

    if not isinstance(target, type):
        if _name(target) == "distributed.deploy.ssh.SSHCluster":
            return SpecCluster
        return None
    mro = target.__mro__
    owner = next(c for c in mro if "__init__" in vars(c))  # whose __init__ target runs
    superclass = mro[mro.index(owner) + 1] if owner is not object else None
    if owner is LocalCluster:
        worker_class = kwargs.get("worker_class")
        if worker_class is None:
            processes = kwargs.get("processes")
            return Nanny if processes is None or processes else Worker
        return worker_class if isinstance(worker_class, type) else None
    if owner is Nanny:
        return Worker
    if owner is Worker:
        return ServerNode
    if _name(owner) == "dask_jobqueue.core.JobQueueCluster" and "job_cls" not in kwargs:
        return getattr(target, "job_cls", None)
    if _name(owner).startswith("dask_jobqueue.") and "dask_jobqueue.core.Job" in map(_name, mro):
        return superclass  # SLURMJob(..., **base_class_kwargs) -> Job.__init__
    if _name(owner).startswith("dask_kubernetes.") and owner.__name__ == "KubeCluster":
        return superclass
    return None


def _name(obj) -> str:
    """``module.qualname`` of a class or function, to recognize ones from optional packages."""
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


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
        with from_spec(spec) as cluster, Client(cluster) as client, _quiet_close(client):
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
        with (
            local_cluster(**local_kwargs) as cluster,
            Client(cluster) as client,
            _quiet_close(client),
        ):
            yield client


@contextlib.contextmanager
def _quiet_close(client: Client) -> Iterator[None]:
    """Stop the heartbeats of the workers of a cluster made here before it is shut down. A
    heartbeat in flight while the scheduler removes its worker fails, and distributed logs
    that with a traceback at ERROR level (``Worker.heartbeat``) — on the stderr of a command
    that had only its own one-line error to say. The block's own errors pass through."""
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            client.run(_stop_heartbeat, on_error="ignore")


def _stop_heartbeat(dask_worker) -> None:
    dask_worker.periodic_callbacks["heartbeat"].stop()
