"""X as row panels: split in memory, or grouped from the chunks of a Dask array; kept in
cluster memory (placed on the workers in turn) or read from their source by the task that uses
them; placed again after workers were lost.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp

from dasknmf import csr, kernels, shards
from dasknmf._config import get_bytes
from dasknmf._workers_code import workers_now
from dasknmf.cuts import coalesce_bounds, even_bounds, group_level, shard_layout
from dasknmf.ops import DaskOps, EagerOps, FutureOps, closed_on_error
from dasknmf.steps import StreamedPanel
from dasknmf.storage import distributed_client


@dataclass
class Panels:
    """X split into full-width row panels, ready for ``ops``.

    ``items`` holds the panels: numpy / scipy.sparse arrays for ``EagerOps``, ``Delayed`` objects
    for ``DaskOps``. ``row_bounds`` has one more entry than ``items``.
    """

    ops: Any
    items: list
    row_bounds: list[int]
    shape: tuple[int, int]
    dtype: np.dtype
    cached: bool = False
    sparse: bool = False  # panels are scipy.sparse
    locations: list[str] | None = None  # the worker of each panel (cached: the one holding it)
    # Consecutive panels on the worker threads in turn rather than in runs (``_place``): the
    # batches of a mini-batch step, consecutive, then run at once.
    interleaved: bool = False
    # Shards: runs of consecutive panels, one task each per iteration (see ``shard_layout``).
    shard_bounds: list[int] = field(default_factory=list)
    level: int = 0  # shards start at multiples of split_every**level panels
    split_every: int = 8
    group: int = 0  # tasks update runs of split_every**group panels at once (``group_level``)
    _bundles: tuple | None = field(default=None, repr=False, compare=False)  # see ``_bundled``

    def __post_init__(self):
        if not self.shard_bounds:
            self.split_every = max(2, int(dask.config.get("dasknmf.split-every")))
            row_nbytes = self.shape[1] * np.dtype(self.dtype).itemsize
            self.group = group_level(self.row_sizes, row_nbytes, self.split_every)
            self.shard(1)

    def map(self, fn: Callable, items: Sequence[tuple], *common: Any) -> list:
        """``ops.map`` over the panels (one item per panel), each task placed with its panel."""
        return self.ops.map(fn, items, *common, workers=self.locations)

    @property
    def shard_ranges(self) -> list[tuple[int, int]]:
        return list(itertools.pairwise(self.shard_bounds))

    @property
    def stacked(self) -> int:
        """How many consecutive panels a task updates at once (``group_level``)."""
        return self.split_every**self.group

    @property
    def tree(self) -> tuple[int, int, int]:
        """``(level, split_every, group)``: where the shards' subtrees of the reduction end,
        and the level of the groups of panels a task updates at once."""
        return self.level, self.split_every, self.group

    def shard(self, n_slots: int, workers: Sequence[str] | None = None) -> None:
        """Cut the panels into shards for ``n_slots`` tasks at once (on ``workers``, one entry
        per slot, if given: each panel is then placed with its shard)."""
        self.level, self.shard_bounds = shard_layout(
            self.row_sizes, n_slots, self.split_every, self.group
        )
        if workers:
            n_shards = len(self.shard_bounds) - 1
            self.locations = [
                workers[s * len(workers) // n_shards]
                for s, (a, b) in enumerate(self.shard_ranges)
                for _ in range(a, b)
            ]

    def shard_map(self, fn: Callable, items: Sequence[tuple], *common: Any, data=True) -> list:
        """One task per shard: ``fn(*common, *items[s], *data_s)``, with data_s the shard's
        panels (cached on a cluster: one ``PanelBundle``; streamed: one tuple; none unless
        ``data``), placed where the shard's panels are."""
        workers = (
            None if self.locations is None else [self.locations[a] for a, _ in self.shard_ranges]
        )
        if not data:
            data = [()] * len(items)
        elif self.cached and self.ops.is_async:
            data = [(bundle,) for bundle in self._bundled(workers)]
        else:
            data = [self.items[a:b] for a, b in self.shard_ranges]
            if self.ops.is_lazy and not self.cached:  # ``StreamedPanel``s: one argument
                data = [(tuple(d),) for d in data]
        return self.ops.map(
            fn, [(*item, *d) for item, d in zip(items, data, strict=True)], *common, workers=workers
        )

    def _bundled(self, workers) -> list:
        """The cached panels as one ``PanelBundle`` per shard, made where the shard runs, once
        for the panels, shards and places there are now (again after ``relocate``)."""
        made_for = [list(self.items), list(self.shard_bounds), workers]
        if self._bundles is None or self._bundles[0] != made_for:
            items = [tuple(self.items[a:b]) for a, b in self.shard_ranges]
            self._bundles = (made_for, self.ops.map(shards.bundled, items, workers=workers))
        return self._bundles[1]

    def bundle(self, blocks: list) -> list:
        """Per-panel objects (blocks of Wᵀ) as one tuple per shard, made where the shard is
        (``shards.ShardStates`` are so already)."""
        if isinstance(blocks, shards.ShardStates):
            return list(blocks)
        items = [tuple(blocks[a:b]) for a, b in self.shard_ranges]
        return self.shard_map(tuple_of, items, data=False) if self.ops.is_lazy else items

    @property
    def row_sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.row_bounds[:-1], self.row_bounds[1:], strict=True)]

    def close(self) -> None:
        self.ops.close()


def tuple_of(*blocks) -> tuple:
    """The arguments as a tuple (a task bundling per-panel objects by shard)."""
    return blocks


def _nbytes(x) -> int:
    if sp.issparse(x):
        return x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
    return x.nbytes


def in_memory_panels(X, panel_bytes: int | None = None, n_threads: int | None = None) -> Panels:
    """Split an in-memory matrix (numpy, or scipy.sparse converted to CSR) into row panels of
    about ``panel_bytes`` (default ``dasknmf.memory-panel-bytes``). The split depends only on
    the shape and the budget, not on the machine, so results are the same everywhere."""
    budget = panel_bytes or get_bytes("dasknmf.memory-panel-bytes")
    if sp.issparse(X):
        X = X.tocsr()
    n_rows = X.shape[0]
    bounds = even_bounds(n_rows, math.ceil(_nbytes(X) / budget))
    items = [X[start:stop] for start, stop in itertools.pairwise(bounds)]
    threads = n_threads if n_threads is not None else (os.cpu_count() or 1)
    panels = Panels(
        ops=EagerOps(min(threads, len(items))),
        items=items,
        row_bounds=bounds,
        shape=tuple(X.shape),
        dtype=X.dtype,
        sparse=sp.issparse(X),
    )
    panels.shard(panels.ops.n_threads)
    return panels


def _cluster_memory() -> int:
    """Memory available to computations: the workers' limits with a distributed Client, the
    machine's memory otherwise."""
    from distributed.system import MEMORY_LIMIT

    client = distributed_client()
    if client is None:
        return int(MEMORY_LIMIT)
    workers = workers_now(client).values()
    return int(sum(w.get("memory_limit") or MEMORY_LIMIT for w in workers))


def should_cache(nbytes: int, cache: bool | str) -> bool:
    """Decide whether X is kept in cluster memory (``cache`` is True, False or 'auto')."""
    if cache == "auto":
        fraction = float(dask.config.get("dasknmf.cache-fraction"))
        return nbytes <= fraction * _cluster_memory()
    return bool(cache)


def dask_panels(
    X: da.Array,
    panel_bytes: int | None = None,
    cache: bool | str = "auto",
    lazy: bool = False,
    interleaved: bool = False,
) -> Panels:
    """Full-width row panels of a Dask array: consecutive row chunks are grouped up to
    ``panel_bytes``, all column chunks of a band of rows merge into one panel; X is persisted
    when ``should_cache`` says so, otherwise every iteration reads it again.

    With a distributed Client, work is submitted as futures (``FutureOps``) unless ``lazy``
    asks for ``dask.delayed`` results; ``interleaved``: see ``Panels.interleaved``.
    """
    budget = panel_bytes or get_bytes("dasknmf.panel-bytes")
    n_rows, n_cols = X.shape
    row_nbytes = n_cols * X.dtype.itemsize
    bounds = coalesce_bounds(X.chunks[0], [rows * row_nbytes for rows in X.chunks[0]], budget)
    panel_rows = tuple(b - a for a, b in itertools.pairwise(bounds))
    sparse = sp.issparse(X._meta)
    # Sparse data: its size is known from a CSR store's indptr (then cached at once, and the
    # validation pass reads the cached panels), else after the validation pass has counted
    # the entries (``cache_if_small``).
    nbytes = csr.stored_bytes(X) if sparse else X.nbytes
    cached = cache is True if nbytes is None else should_cache(nbytes, cache)
    X = X.rechunk((panel_rows, n_cols))
    client = None if lazy else distributed_client()
    items = blocks_as_delayed(X)
    panels = Panels(
        ops=DaskOps() if client is None else FutureOps(client),
        items=items,
        row_bounds=bounds,
        shape=(n_rows, n_cols),
        dtype=X.dtype,
        sparse=sparse,
        interleaved=interleaved,
    )
    with closed_on_error(panels.ops):
        _place(panels, client)
        if cached:
            cache_panels(panels)
        elif client is not None:
            # Any worker can read a panel from the source; a fixed one keeps W_i where it is.
            panels.items = [StreamedPanel(item) for item in panels.items]
    return panels


def thread_slots(client) -> list[str]:
    """A worker's address for each of its threads, in the order of the addresses."""
    workers = workers_now(client)
    return [w for w in sorted(workers) for _ in range(max(1, workers[w].get("nthreads") or 1))]


def _place(panels: Panels, client) -> None:
    """Shard the panels for the threads of the cluster (of this machine without ``client``)."""
    if client is None:
        panels.shard(os.cpu_count() or 1)
        return
    slots = thread_slots(client)
    panels.shard(len(slots), slots)
    if panels.interleaved:
        panels.locations = [slots[i % len(slots)] for i in range(len(panels.items))]


def cache_panels(panels: Panels) -> None:
    """Keep panels that are read from their source in memory from now on (for sparse X, whose
    size is known only after the validation pass has counted its non-zeros)."""
    if panels.cached or not panels.ops.is_lazy:
        return
    items = [p.source if isinstance(p, StreamedPanel) else p for p in panels.items]
    panels.items = _persist_panels(items, panels)
    panels.cached = True


def cache_if_small(panels: Panels, nnz: int, cache: bool | str) -> None:
    """Sparse panels, whose stored entries the validation pass has just counted (``nnz``),
    kept in memory when ``cache`` is 'auto' and they fit (``should_cache``)."""
    if not panels.sparse or cache != "auto":
        return
    if should_cache(csr.in_memory_bytes(nnz, panels.shape[0], panels.dtype.itemsize), "auto"):
        cache_panels(panels)


#: Seconds ``relocate`` waits for as many workers as before a loss (and then for one).
RELOCATE_WAIT = 60
#: A task holds at most this many times its panel above what the worker held before (the
#: panel, its read buffer and the products formed from it), plus ``TASK_OVERHEAD`` and
#: ``3·k·n·itemsize`` of H and partial sums. Measured on a streamed fit, k = 20, n = 2000: 2.5×
#: for 64 MiB panels, 3.0× for 32 MiB, 4.1× for 16 MiB (whose fixed costs weigh more); held by
#: ``tests/test_reliability.py::test_a_task_stays_within_its_memory_estimate``.
PANEL_MULTIPLE = 3
TASK_OVERHEAD = 32 * 2**20
#: A task of 2-D blocks holds W_i, H_j and the k × m_i or k × n_j sums in and out of it.
BLOCK_FACTORS = 4
#: What a worker process holds before any task (measured 100–115 MiB once dasknmf is loaded).
WORKER_BASELINE = 150 * 2**20


class WorkersLostError(RuntimeError):
    """The workers of a fit are gone and do not come back, or keep dying."""


def workers_keep_dying(error, need: int) -> WorkersLostError:
    """The error for a task that every worker running it died with (``KilledWorker``), whose
    tasks need about ``need`` bytes."""
    limit = worker_memory()
    has = f"a worker has {limit / 2**20:,.0f} MiB" if limit else "the workers have no limit"
    return WorkersLostError(
        f"Task {error.task!r} of the fit ran on {error.allowed_failures + 1} workers and each "
        f"died while running it (the last: {error.last_worker.address}); restarting the fit "
        f"would run it again. The usual cause is memory: a task here needs about "
        f"{need / 2**20:,.0f} MiB and {has}; give the workers more memory or pass a smaller "
        "panel_bytes. The workers' logs tell the cause."
    )


def task_memory(panel_nbytes: float, n_features: int, n_components: int, itemsize: int) -> int:
    """Bytes a task of a fit holds at its peak, for panels of ``panel_nbytes``."""
    factor = 3 * n_components * n_features * itemsize
    return int(PANEL_MULTIPLE * panel_nbytes + TASK_OVERHEAD + factor)


def cluster_panel_bytes(shape: tuple[int, int], n_components: int, itemsize: int) -> int | None:
    """The largest panel whose tasks stay, with the worker's baseline, below the memory at
    which distributed pauses a worker (``distributed.worker.memory.pause``, 80%) on every
    worker of the current cluster, with as many tasks at once as the worker has threads.
    None without a distributed Client or without worker memory limits. The k-row factor is
    counted for the shorter side of X (the fit runs on Xᵀ when that is the cheaper one); when
    so little is left beside it that 2-D blocks allow larger ones, the size of 2-D blocks,
    whose tasks hold a block of X and ``BLOCK_FACTORS`` factor blocks of at most its size."""
    client = distributed_client()
    if client is None:
        return None
    pause = dask.config.get("distributed.worker.memory.pause") or 0.8
    factor = 3 * n_components * min(shape) * itemsize
    per_task = [
        (pause * w["memory_limit"] - WORKER_BASELINE) / max(1, w.get("nthreads") or 1)
        for w in workers_now(client).values()
        if w.get("memory_limit")
    ]
    if not per_task:
        return None
    room = min(per_task) - TASK_OVERHEAD
    return int(max((room - factor) / PANEL_MULTIPLE, room / (PANEL_MULTIPLE + BLOCK_FACTORS)))


def worker_memory() -> int | None:
    """The smallest memory limit of the current distributed cluster's workers (None without
    a distributed Client, or when no worker has a limit)."""
    client = distributed_client()
    if client is None:
        return None
    limits = [w.get("memory_limit") for w in workers_now(client).values()]
    limits = [limit for limit in limits if limit]
    return min(limits) if limits else None


def check_fits_workers(
    shape: tuple[int, int], n_components: int, itemsize: int, layout: str = "rows"
) -> None:
    """Refuse, before any work, a problem that the workers cannot hold: for row (or column)
    panels, one row of X with H and the k × n partials (or one column with W's) on the
    smallest worker; for 2-D blocks, W and H (twice: the next iteration's are made from them)
    in the memory of all workers below the point where they pause — what any 2-D fit needs
    (while a band's rows are updated, their sums H·X_iᵀ take as much again as their W
    blocks) — and H twice in the largest worker's: its column blocks are all made on the
    worker where the column chains end (``blocks._on_h``)."""
    client = distributed_client()
    limit = worker_memory()
    if limit is None:
        return
    n_rows, n_cols = shape
    if layout == "blocks":
        rooms = _rooms(client)
        need, have = factors_memory(client, shape, n_components, itemsize, 2, rooms)
        what = "W and H (twice, while an iteration makes the next ones from them)"
        where = "the workers have together, below the point where they pause,"
        h_twice = 2 * n_components * n_cols * itemsize
        if need <= have and h_twice > max(rooms):
            need, have = h_twice, max(rooms)
            what = "H (twice, all its column blocks on the worker where the column chains end)"
            where = "the largest worker has below the point where it pauses"
    else:
        need = min(
            task_memory(n_cols * itemsize, n_cols, n_components, itemsize),
            task_memory(n_rows * itemsize, n_rows, n_components, itemsize),
        )
        have = limit
        what = (
            "the smallest task (one row of X, or one column, with the k-row factor and its "
            "partial sums)"
        )
        where = "a worker has"
    if need > have:
        raise ValueError(
            f"NMF with {n_components} components of a {n_rows} x {n_cols} matrix does not fit "
            f"the workers: {what} needs about {need / 2**20:,.0f} MiB and {where} "
            f"{max(have, 0) / 2**20:,.0f} MiB. Fewer components or more memory would fit."
        )


def factors_memory(client, shape, n_components: int, itemsize: int, copies: int, rooms=None):
    """(bytes of ``copies`` of W and H, bytes the workers of ``client`` have together below
    the point where they pause): what a 2-D fit, whose factors are what the workers hold,
    must fit in. ``rooms``: the workers' ``_rooms``, if the caller has asked for them."""
    rooms = _rooms(client) if rooms is None else rooms
    return copies * n_components * sum(shape) * itemsize, sum(rooms)


def _rooms(client) -> list[float]:
    """Bytes each worker of ``client`` holds below the point where it pauses, beyond what it
    holds before any task."""
    pause = dask.config.get("distributed.worker.memory.pause") or 0.8
    workers = workers_now(client).values()
    return [pause * w["memory_limit"] - WORKER_BASELINE for w in workers]


def panel_task_memory(parts: Panels, k: int) -> int:
    """The memory a task of ``parts``' largest panel needs (``task_memory``), k components."""
    n_cols, itemsize = parts.shape[1], parts.dtype.itemsize
    largest = max(parts.row_sizes) * n_cols * itemsize
    return task_memory(largest, n_cols, k, itemsize)


def relocate(panels: Panels) -> None:
    """After workers were lost: place the panels' tasks on the workers there are now (a task
    pinned to a worker that is gone would wait for it forever). Cached panels are recomputed
    from their source by the scheduler, and tasks then go where they landed."""
    if not panels.ops.is_async or panels.locations is None:
        return
    from distributed import wait

    client = panels.ops.client
    panels.ops.forget_detached()
    wait_for_workers(client, len(set(panels.locations)))
    _place(panels, client)
    if panels.cached:  # recomputed where the scheduler put them
        wait(panels.items)
        holders = client.who_has(panels.items)
        panels.locations = [sorted(holders[f.key])[0] for f in panels.items]


def wait_for_workers(client, n_workers: int) -> None:
    """Wait up to ``RELOCATE_WAIT`` s for ``n_workers`` (the workers that replace lost ones,
    if they come), then as long again for one; ``WorkersLostError`` if none comes."""
    try:
        client.wait_for_workers(n_workers, timeout=RELOCATE_WAIT)
    except TimeoutError:
        try:
            client.wait_for_workers(1, timeout=RELOCATE_WAIT)
        except TimeoutError:
            raise WorkersLostError(
                f"Workers of the fit were lost and none came back within {2 * RELOCATE_WAIT} s; "
                "the fit cannot go on (start workers, or resume from a checkpoint later)."
            ) from None


def blocks_as_delayed(X: da.Array) -> list:
    """The blocks of a Dask array as ``Delayed`` objects, in C order.

    Graph optimization would drop the futures of an array persisted on a distributed cluster,
    and with them the data; so a persisted array keeps its graph as it is.
    """
    from distributed import futures_of

    return list(X.to_delayed(optimize_graph=not futures_of(X)).ravel())


def _aligned_copy(x):
    return kernels.aligned(x)


def _persist_panels(items: list, panels: Panels) -> list:
    """Keep the panels in memory: persisted ``Delayed`` objects without a distributed Client,
    else futures, each on its shard's worker.
    Every later task on a panel is placed with it: the scheduler then neither moves panels
    between workers nor leaves most of them on one worker."""
    if not panels.ops.is_async:
        return list(dask.persist(*items))
    from distributed import wait

    client = panels.ops.client
    # Stolen by an idle worker, a copy would put its panel there, not where it was placed:
    # consecutive panels on one worker (MiniBatchNMF's batches of a step then ran in turn).
    panels.ops.never_steal(_aligned_copy)
    copies = DaskOps().map(_aligned_copy, [(item,) for item in items], workers=panels.locations)
    futures = client.compute(copies, optimize_graph=False)  # one graph: see ``FutureOps.map``
    wait(futures)
    for future in futures:
        if future.status == "error":
            future.result()  # raises the task's error (a panel that cannot be read)
    holders = client.who_has(futures)
    panels.locations = [sorted(holders[f.key])[0] for f in futures]
    return futures
