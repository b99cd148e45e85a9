"""One NMF iteration as a graph over the row panels of X, and the driver that runs it.

Per iteration every row panel X_i is read once, by one task (``steps.panel_step``) that

1. forms C_i = H·X_iᵀ with the current H,
2. updates its block of W from (C_i, H·Hᵀ) — several inner sweeps cost no further read of X,
3. emits the partials of the H update, A_i = W_iᵀ·X_i (split by the column blocks of H) and
   B_i = W_iᵀ·W_i, and scalar statistics of the objective.

A and B are summed by fixed-order trees; each column block H_j is then updated by its own task
(``steps.h_step``). Only k×k matrices and scalars return to the driver. Other β-divergences
follow the same scheme with the partials of their multiplicative updates.

The iteration is written once, against the small ``Ops`` interface. ``EagerOps`` calls the
functions at once on in-memory panels (numpy or scipy.sparse), running the panels of a phase in a
thread pool; ``DaskOps`` wraps them in ``dask.delayed``, and the driver persists W and H after each
iteration so that the graph does not grow. Both run the same functions in the same order, so the
same panels give bit-identical factors either way.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import math
import operator
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp

from dasknmf import kernels, steps
from dasknmf._config import get_bytes
from dasknmf.solvers import extrapolation
from dasknmf.steps import Objective, StreamedPanel, sum_in_order
from dasknmf.storage import distributed_client

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Executing a phase: eagerly, or as Dask tasks
# --------------------------------------------------------------------------------------------


class EagerOps:
    """Run functions at once on in-memory data; the items of a ``map`` go to a thread pool."""

    is_lazy = False
    is_async = False

    def __init__(self, n_threads: int = 1):
        self.n_threads = max(1, n_threads)
        self._pool = ThreadPoolExecutor(self.n_threads) if self.n_threads > 1 else None

    def map(self, fn: Callable, items: Sequence[tuple], *common: Any, workers=None) -> list:
        """``[fn(*common, *item) for item in items]``; ``workers`` is ignored."""
        if self._pool is None or len(items) < 2:
            return [fn(*common, *item) for item in items]
        return list(self._pool.map(lambda item: fn(*common, *item), items))

    def call(self, fn: Callable, *args: Any):
        return fn(*args)

    def item(self, obj, index: int):
        """``obj[index]`` of a task's tuple of outputs."""
        return obj[index]

    def share(self, value):
        """A value that many tasks read, made once."""
        return value

    def persist(self, *objs):
        return objs

    def fetch(self, obj):
        return obj

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


class DaskOps:
    """Build ``dask.delayed`` tasks; they run on the current scheduler when persisted or
    computed (or stay lazy, for results returned as Dask arrays)."""

    is_lazy = True
    is_async = False

    def map(self, fn: Callable, items: Sequence[tuple], *common: Any, workers=None) -> list:
        """One task per item; ``workers[i]``, if given, is where item i's task should run (the
        worker holding its panel of X), so that the scheduler neither moves nor steals it."""
        task = dask.delayed(fn, pure=False)
        if workers is None:
            return [task(*common, *item) for item in items]
        tasks = []
        for item, worker in zip(items, workers, strict=True):
            with dask.annotate(workers=[worker], allow_other_workers=True):
                tasks.append(task(*common, *item))
        return tasks

    def call(self, fn: Callable, *args: Any):
        return dask.delayed(fn, pure=False)(*args)

    def item(self, obj, index: int):
        return obj[index]

    def share(self, value):
        # One key that every task reads, instead of a copy embedded in (and traversed for) each
        # task: building tasks around a dataclass or list argument cost ~10 ms per iteration.
        return dask.delayed(value, pure=True, traverse=False)

    def persist(self, *objs):
        return dask.persist(*objs)

    def fetch(self, obj):
        return dask.compute(obj)[0]

    def close(self) -> None:
        pass


def _the(value):
    return value


def _loose_restrictions_plugin():
    from distributed.diagnostics.plugin import SchedulerPlugin

    class LooseRestrictions(SchedulerPlugin):
        """Sends tasks pinned to a worker that is gone to the workers that run now.

        dasknmf places a task with its panel (``workers=[w]``, ``allow_other_workers=True``).
        When every worker dies, such tasks wait in the 'no-worker' state, and distributed, when
        a worker starts running, reschedules only the tasks whose restrictions that worker
        meets — never these — so the fit would wait forever. This does what the loose
        restrictions mean, whenever a worker joins or turns to 'running': a restarted worker
        may register while still starting up and run only later, when ``add_worker`` has
        already passed (a fit then hung in one of about ten runs of the all-workers-killed test).
        """

        name = "dasknmf-loose-restrictions"

        async def start(self, scheduler) -> None:
            self.scheduler = scheduler

        def add_worker(self, scheduler, worker):
            self._unpin_soon(scheduler, worker)

        def log_event(self, topic, msg):
            if (
                isinstance(msg, dict)
                and msg.get("action") == "worker-status-change"
                and msg.get("status") == "running"
            ):
                self._unpin_soon(self.scheduler, topic)

        @staticmethod
        def _unpin_soon(scheduler, worker) -> None:
            # After the scheduler's own handling of the event, which adds the worker to the
            # running ones (the status-change event is logged before that).
            asyncio.get_running_loop().call_soon(LooseRestrictions._unpin, scheduler, worker)

        @staticmethod
        def _unpin(scheduler, worker) -> None:
            if not scheduler.running:
                return
            stuck = []
            for ts in scheduler.unrunnable:
                valid = scheduler.valid_workers(ts)
                if ts.loose_restrictions and valid is not None and not valid:
                    stuck.append(ts.key)
            if stuck:
                scheduler.transitions(
                    dict.fromkeys(stuck, "processing"), stimulus_id=f"dasknmf-unpin-{worker}"
                )

    return LooseRestrictions()


class FutureOps:
    """Submit tasks to a distributed Client at once, as futures.

    Used to fit on a distributed cluster: the work of an iteration starts while the driver is
    still submitting it, and nothing is spent building and optimizing ``dask.delayed`` graphs
    (22 ms of driver CPU per iteration, a third of a core on a 2-core machine). Panels of X are
    futures (cached) or ``StreamedPanel``s (read by the task that uses them).
    """

    is_lazy = True
    is_async = True

    def __init__(self, client):
        self.client = client
        try:
            client.register_plugin(_loose_restrictions_plugin(), name="dasknmf-loose-restrictions")
        except Exception as error:  # e.g. a remote scheduler without dasknmf installed
            logger.warning("Could not register dasknmf's scheduler plugin: %s", error)

    def map(self, fn: Callable, items: Sequence[tuple], *common: Any, workers=None) -> list:
        """One task per item; ``workers[i]``, if given, is where item i's task should run."""
        if workers is None:
            return [self.client.submit(fn, *common, *item, pure=False) for item in items]
        return [
            self.client.submit(
                fn,
                *common,
                *item,
                pure=False,
                workers=[worker],
                allow_other_workers=True,
            )
            for item, worker in zip(items, workers, strict=True)
        ]

    def call(self, fn: Callable, *args: Any):
        return self.client.submit(fn, *args, pure=False)

    def item(self, obj, index: int):
        return self.client.submit(operator.getitem, obj, index, pure=False)

    def share(self, value):
        # A task that returns the value, rather than scattered data: a task has lineage, so the
        # scheduler makes the value again if its worker dies (scattered data would be lost for
        # good, and a broadcast scatter waits on every worker the scheduler knows of, even one
        # that is dying).
        return self.client.submit(_the, value, pure=False)

    def persist(self, *objs):
        return objs

    def fetch(self, obj):
        return self.client.gather(obj)

    def close(self) -> None:
        pass


def tree_reduce(
    ops,
    items: list,
    combine: Callable = sum_in_order,
    first: Callable | None = None,
    split_every: int | None = None,
):
    """Combine ``items`` by a tree of fixed shape and order (groups of ``split_every``).

    ``first``, when given, combines the leaves instead of ``combine`` — it can pick the fields
    to sum out of a task's tuple of outputs, which saves one ``getitem`` task per field.
    """
    if split_every is None:
        split_every = int(dask.config.get("dasknmf.split-every"))
    split_every = max(2, split_every)
    level = first or combine
    if first is None and len(items) == 1:
        return items[0]
    while True:
        items = [
            ops.call(level, *items[start : start + split_every])
            for start in range(0, len(items), split_every)
        ]
        level = combine
        if len(items) == 1:
            return items[0]


# --------------------------------------------------------------------------------------------
# X as row panels
# --------------------------------------------------------------------------------------------


def even_bounds(n: int, n_parts: int) -> list[int]:
    """Boundaries of ``n_parts`` near-equal consecutive ranges of ``range(n)``."""
    n_parts = max(1, min(n_parts, n))
    return [part * n // n_parts for part in range(n_parts + 1)]


def coalesce_bounds(chunks: Sequence[int], chunk_nbytes: Sequence[float], budget: int) -> list[int]:
    """Group consecutive chunks into panels of at most ``budget`` bytes (at least one chunk each);
    return the row boundaries. Chunks are never split, so panels stay aligned to storage."""
    bounds = [0]
    size = 0.0
    end = 0
    for rows, nbytes in zip(chunks, chunk_nbytes, strict=True):
        if size and size + nbytes > budget:
            bounds.append(end)
            size = 0.0
        end += rows
        size += nbytes
    bounds.append(end)
    return bounds


def wide(shape: tuple[int, int], n_components: int, itemsize: int, budget: int) -> bool:
    """Whether to factorize Xᵀ instead of X: when a task on a one-row panel — the row, H and the
    k×n partials — would not fit ``budget`` and a task on a one-column panel of Xᵀ is smaller.
    (If neither fits, the smaller is taken; a two-pass 2-D block scheme would be needed.)"""
    n_rows, n_cols = shape
    per_row_task = (3 * n_components + 1) * n_cols * itemsize
    per_column_task = (3 * n_components + 1) * n_rows * itemsize
    return per_row_task > budget and per_column_task < per_row_task


def column_bounds(n_features: int, n_components: int, itemsize: int) -> list[int]:
    """Column blocks of H (and of the A partials) of at most ``dasknmf.h-block-bytes``."""
    budget = get_bytes("dasknmf.h-block-bytes")
    n_blocks = math.ceil(n_components * n_features * itemsize / budget)
    return even_bounds(n_features, n_blocks)


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
    locations: list[str] | None = None  # the worker holding each cached panel

    def map(self, fn: Callable, items: Sequence[tuple], *common: Any) -> list:
        """``ops.map`` over the panels (one item per panel), each task placed with its panel."""
        return self.ops.map(fn, items, *common, workers=self.locations)

    @property
    def row_sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.row_bounds[:-1], self.row_bounds[1:], strict=True)]

    def close(self) -> None:
        self.ops.close()


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
    return Panels(
        ops=EagerOps(min(threads, len(items))),
        items=items,
        row_bounds=bounds,
        shape=tuple(X.shape),
        dtype=X.dtype,
        sparse=sp.issparse(X),
    )


def _cluster_memory() -> int:
    """Memory available to computations: the workers' limits with a distributed Client, the
    machine's memory otherwise."""
    from distributed.system import MEMORY_LIMIT

    client = distributed_client()
    if client is None:
        return int(MEMORY_LIMIT)
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return int(sum(w.get("memory_limit") or MEMORY_LIMIT for w in workers))


def should_cache(nbytes: int, cache: bool | str) -> bool:
    """Decide whether X is kept in cluster memory (``cache`` is True, False or 'auto')."""
    if cache == "auto":
        fraction = float(dask.config.get("dasknmf.cache-fraction"))
        return nbytes <= fraction * _cluster_memory()
    return bool(cache)


def dask_panels(
    X: da.Array, panel_bytes: int | None = None, cache: bool | str = "auto", lazy: bool = False
) -> Panels:
    """Full-width row panels of a Dask array: consecutive row chunks are grouped up to
    ``panel_bytes``, all column chunks of a band of rows merge into one panel; X is persisted
    when ``should_cache`` says so, otherwise every iteration reads it again.

    With a distributed Client, work is submitted as futures (``FutureOps``) unless ``lazy``
    asks for ``dask.delayed`` results.
    """
    budget = panel_bytes or get_bytes("dasknmf.panel-bytes")
    n_rows, n_cols = X.shape
    row_nbytes = n_cols * X.dtype.itemsize
    bounds = coalesce_bounds(X.chunks[0], [rows * row_nbytes for rows in X.chunks[0]], budget)
    panel_rows = tuple(b - a for a, b in itertools.pairwise(bounds))
    X = X.rechunk((panel_rows, n_cols))
    client = None if lazy else distributed_client()
    sparse = sp.issparse(X._meta)
    # The size of sparse data is known after the validation pass: see ``cache_panels``.
    cached = cache is True if sparse else should_cache(X.nbytes, cache)
    items = blocks_as_delayed(X)
    locations = None
    if cached:
        items, locations = _persist_panels(items, panel_rows, client)
    elif client is not None:
        # Any worker can read a panel from the source; a fixed one keeps W_i where it is.
        items = [StreamedPanel(item) for item in items]
        locations = _balanced_workers(client, panel_rows)
    return Panels(
        ops=DaskOps() if client is None else FutureOps(client),
        items=items,
        row_bounds=bounds,
        shape=(n_rows, n_cols),
        dtype=X.dtype,
        cached=cached,
        sparse=sparse,
        locations=locations,
    )


def cache_panels(panels: Panels) -> None:
    """Keep panels that are read from their source in memory from now on (for sparse X, whose
    size is known only after the validation pass has counted its non-zeros)."""
    if panels.cached or not panels.ops.is_lazy:
        return
    items = [p.source if isinstance(p, StreamedPanel) else p for p in panels.items]
    panels.items, panels.locations = _persist_panels(
        items, panels.row_sizes, panels.ops.client if panels.ops.is_async else None
    )
    panels.cached = True


#: Seconds ``relocate`` waits for as many workers as before a loss.
RELOCATE_WAIT = 60


def relocate(panels: Panels) -> None:
    """After workers were lost: place the panels' tasks on the workers there are now (a task
    pinned to a worker that is gone would wait for it forever). Cached panels are recomputed
    from their source by the scheduler, and tasks then go where they landed."""
    if not panels.ops.is_async or panels.locations is None:
        return
    from distributed import wait

    client = panels.ops.client
    try:  # the workers that replace the lost ones, if they come
        client.wait_for_workers(len(set(panels.locations)), timeout=RELOCATE_WAIT)
    except TimeoutError:
        client.wait_for_workers(1)
    if panels.cached:
        wait(panels.items)
        holders = client.who_has(panels.items)
        panels.locations = [sorted(holders[f.key])[0] for f in panels.items]
    else:
        panels.locations = _balanced_workers(client, panels.row_sizes)


def blocks_as_delayed(X: da.Array) -> list:
    """The blocks of a Dask array as ``Delayed`` objects, in C order.

    Graph optimization would drop the futures of an array persisted on a distributed cluster,
    and with them the data; so a persisted array keeps its graph as it is.
    """
    from distributed import futures_of

    return list(X.to_delayed(optimize_graph=not futures_of(X)).ravel())


def _aligned_copy(x):
    return kernels.aligned(x)


def _balanced_workers(client, sizes: Sequence[int]) -> list[str]:
    """A worker for each panel: consecutive panels go to each worker in turn, balanced by
    rows."""
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    starts = np.cumsum([0, *sizes[:-1]])
    return [workers[int(start * len(workers) // sum(sizes))] for start in starts]


def _persist_panels(items: list, sizes: Sequence[int], client) -> tuple[list, list | None]:
    """Keep the panels in memory: persisted ``Delayed`` objects without ``client``, else
    futures on the cluster, on ``_balanced_workers``. Every later task on a panel is placed
    with it: the scheduler then neither moves panels between workers nor leaves most of them
    on one worker."""
    if client is None:
        return list(dask.persist(*items)), None
    from distributed import wait

    futures = [
        client.submit(
            _aligned_copy,
            client.compute(item),
            pure=False,
            workers=[worker],
            allow_other_workers=True,
        )
        for item, worker in zip(items, _balanced_workers(client, sizes), strict=True)
    ]
    wait(futures)
    for future in futures:
        if future.status == "error":
            future.result()  # raises the task's error (a panel that cannot be read)
    holders = client.who_has(futures)
    return futures, [sorted(holders[f.key])[0] for f in futures]


# --------------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------------


@dataclass
class Moments:
    """What the validation pass learns about X."""

    min: float
    n_nonfinite: int
    sum: float
    sum_sq: float
    nnz: int
    size: int

    @property
    def mean(self) -> float:
        return self.sum / self.size


def moments(panels: Panels) -> Moments:
    """One pass over X: min, non-finite count, Σx, Σx², nnz."""
    ops = panels.ops
    parts = panels.map(steps.moments_task, [(x,) for x in panels.items])
    total = ops.fetch(tree_reduce(ops, parts, kernels.combine_moments))
    return Moments(
        min=float(total[kernels.MOMENT_MIN]),
        n_nonfinite=int(total[kernels.MOMENT_NONFINITE]),
        sum=float(total[kernels.MOMENT_SUM]),
        sum_sq=float(total[kernels.MOMENT_SUMSQ]),
        nnz=int(total[kernels.MOMENT_NNZ]),
        size=int(total[kernels.MOMENT_SIZE]),
    )


def check_values(panels: Panels, whom: str = "NMF (input X)") -> Moments:
    """Run the validation pass; reject NaN, infinity and negative values with a clear error."""
    stats = moments(panels)
    steps.reject_bad_values(stats.n_nonfinite, stats.min, whom)
    return stats


def iterate(
    panels: Panels,
    objective: Objective,
    wt: list,
    h: list,
    col_bounds: list[int],
    orders=(None, None),
    momentum: tuple | None = None,
    norm_x_sq: float | None = None,
):
    """Build (or, eagerly, run) one iteration. Returns the new blocks of Wᵀ, the new column
    blocks of H (as ``h_step`` outputs, see ``h_array``), the summary ``(H·Hᵀ, H stats, B,
    panel stats)`` and the momentum of the next iteration. ``objective`` and ``col_bounds``
    may be ``ops.share``d.

    ``momentum``, for a fit with extrapolation (``solvers.extrapolation``), is ``(plain blocks
    of Wᵀ, the H blocks of the iteration before, control)``; then ``wt`` holds the pushed
    blocks of Wᵀ, and ``norm_x_sq`` is needed for the next control. Without, it is None.

    The critical path is panel_step → h_step (which also runs the last level of its reduction)
    → the next panel_step; the summary is off it (with extrapolation, the next control is on
    it: one small task).
    """
    ops = panels.ops
    order_w, order_h = orders
    if momentum is None:
        panel_step, h_step = steps.panel_step, steps.h_step
        extra_items, extra_common = (), ()
    else:
        panel_step, h_step = steps.extrapolated_panel_step, steps.extrapolated_h_step
        wt_plain, h_previous, control = momentum
        extra_items, extra_common = (wt_plain,), (h_previous, control)
    outs = panels.map(
        panel_step,
        list(zip(panels.items, wt, *extra_items, strict=True)),
        objective,
        order_w,
        col_bounds,
        h,
        *extra_common,
    )
    new_wt = [ops.item(out, 0) for out in outs]
    h_outs = []
    for j, h_j in enumerate(h):
        parts, raw = reduce_to_fanin(ops, outs, functools.partial(steps._panel_partials, j))
        previous = () if momentum is None else (h_previous[j], control)
        h_outs.append(ops.call(h_step, objective, order_h, j, raw, h_j, *previous, *parts))
    summary = tree_reduce(ops, h_outs, steps._h_summary, first=steps._h_summary)
    if momentum is not None:
        control = ops.call(steps.advance_control, control, objective, norm_x_sq, summary)
        momentum = ([ops.item(out, -1) for out in outs], h, control)
    return new_wt, h_outs, summary, momentum


def reduce_to_fanin(ops, items: list, first: Callable, split_every: int | None = None):
    """Reduce ``items`` by a fixed-order tree until at most ``split_every`` remain, so that the
    consumer can run the last level itself. Returns ``(items, raw)``: ``raw`` is True when no
    level ran (the items are the original ones, not sums made by ``first``)."""
    if split_every is None:
        split_every = int(dask.config.get("dasknmf.split-every"))
    split_every = max(2, split_every)
    if len(items) <= split_every:
        return items, True
    level = first
    while len(items) > split_every:
        items = [
            ops.call(level, *items[start : start + split_every])
            for start in range(0, len(items), split_every)
        ]
        level = sum_in_order
    return items, False


def _lost_data_errors() -> tuple[type[BaseException], ...]:
    from concurrent.futures import CancelledError

    from distributed.scheduler import KilledWorker

    return (CancelledError, KilledWorker)  # FutureCancelledError is a CancelledError


#: What a fit on a cluster raises when a worker died with results nothing can recompute.
LOST_DATA = _lost_data_errors()


@dataclass
class History:
    """Per-iteration record; index 0 is the initialization."""

    loss: list[float] = field(default_factory=list)  # the penalized objective
    error: list[float] = field(default_factory=list)  # ‖X − WH‖_F
    violation: list[float] = field(default_factory=list)  # from iteration 1 on

    def as_dict(self) -> dict:
        return {"loss": self.loss, "error": self.error, "violation": self.violation}

    def record(
        self,
        objective: Objective,
        value: float,
        sum_w: float,
        sq_w: float,
        sum_h: float,
        sq_h: float,
    ) -> None:
        """Append the objective at a point, from D_β(X | WH) (½‖X − WH‖² for Frobenius) and
        the sums the penalties need; the error is scikit-learn's sqrt(2·D_β)."""
        value = max(float(value), 0.0)
        self.error.append(math.sqrt(2 * value))
        self.loss.append(objective.penalized(value, sum_w, sq_w, sum_h, sq_h))


@dataclass
class FitResult:
    wt: list
    h: list
    n_iter: int
    history: History


def fit(
    panels: Panels,
    objective: Objective,
    wt: list,
    h: list,
    norm_x_sq: float,
    col_bounds: list[int],
    *,
    max_iter: int,
    tol: float,
    shuffle_rng: np.random.RandomState | None = None,
    callback: Callable[[int, History], None] | None = None,
    checkpoint=None,
    start: int = 0,
    history: History | None = None,
    momentum: tuple | None = None,
) -> FitResult:
    """Alternate W and H updates until the solver's stopping rule or ``max_iter``.

    ``wt`` (blocks of Wᵀ per row panel) and ``h`` (column blocks of H, split at ``col_bounds``)
    are the initialization, as ``panels.ops`` holds them. After each iteration the new blocks
    are persisted and only the k×k summary comes back to this process. On a distributed
    cluster the next iteration is submitted before the summary is read, so the cluster never
    waits for this process; if the rule then says stop, that speculative iteration is dropped.

    ``checkpoint`` (a ``dasknmf.checkpoint.Checkpoint``) is written after every
    ``checkpoint.every``-th iteration. A resumed fit passes the checkpoint's factors as ``wt``
    and ``h``, its iteration as ``start`` and its ``history`` (and ``shuffle_rng`` in the
    checkpoint's state): it then computes exactly what the uninterrupted fit would have.

    With ``objective.extrapolate`` the iterates are pushed along their last step
    (``solvers.extrapolation``); a resumed fit then also passes the checkpoint's ``momentum``
    (see ``iterate``).
    """
    ops = panels.ops
    if objective.extrapolate and momentum is None:
        momentum = (list(wt), list(h), _first_control(panels, objective, wt, h))
    k = objective.n_components
    in_flight: collections.deque = collections.deque()
    latest = (wt, h, momentum)
    shared = ops.share(objective), ops.share(col_bounds)

    # The shuffling generator's state before each submitted iteration's draws: a checkpoint
    # after iteration t keeps the state for t + 1, whether or not t + 1 is already in flight.
    rng_before: dict[int, tuple] = {}
    next_iter = start + 1  # the iteration that submit() builds

    def submit() -> None:
        nonlocal latest, next_iter
        orders = (None, None)
        if shuffle_rng is not None:
            rng_before[next_iter] = shuffle_rng.get_state()
            orders = (shuffle_rng.permutation(k), shuffle_rng.permutation(k))
        wt, h, momentum = latest
        step = ops.persist(
            *iterate(panels, shared[0], wt, h, shared[1], orders, momentum, norm_x_sq)
        )
        latest = (step[0], step[1], step[3])
        in_flight.append(step)
        next_iter += 1

    history = history if history is not None else History()
    # The factors of the last two iterations. Those of ``start`` are arrays; later H blocks
    # are whole ``h_step`` output tuples (see ``steps.h_array``).
    recent: dict[int, tuple] = {start: (wt, h, momentum)}
    n_iter, stop = start, 0
    if start < max_iter:
        submit()
    for n_iter in range(start + 1, max_iter + 1):
        if ops.is_async and n_iter < max_iter:
            submit()
        wt, h, summary, momentum = in_flight.popleft()
        recent[n_iter] = (wt, h, momentum)
        recent.pop(n_iter - 2, None)
        known = _record(history, objective, norm_x_sq, n_iter, ops.fetch(summary))
        if callback is not None and known:
            callback(known, history)
        rule = extrapolation if objective.extrapolate else objective.rule
        if tol > 0 and known and rule.converged(known, tol, history.as_dict()):
            stop = known
            break
        if checkpoint is not None and checkpoint.due(n_iter):
            state = None
            if shuffle_rng is not None:
                state = rng_before.get(n_iter + 1) or shuffle_rng.get_state()
            checkpoint.save(panels, n_iter, wt, h, history, state, momentum)
        rng_before.pop(n_iter, None)
        if not ops.is_async and n_iter < max_iter:
            submit()
    in_flight.clear()  # a speculative iteration, if any: releasing it cancels it
    n_iter = stop or n_iter
    wt, h, _ = recent[n_iter]
    if not ops.is_lazy:
        h = [steps.h_array(b) for b in h]
    elif n_iter > start:  # h_step output tuples (those of ``start`` are arrays already)
        h = [ops.item(b, 0) for b in h]
    return FitResult(wt=list(wt), h=h, n_iter=n_iter, history=history)


def _first_control(panels: Panels, objective: Objective, wt: list, h: list):
    """The extrapolation control of the first iteration: it balances the components of the
    initialization (see ``solvers.extrapolation``), so that the first violation, the
    reference of the stopping rule, is measured at the scales of the later ones."""
    if objective.has_penalties:
        return extrapolation.Control()
    ops = panels.ops
    sq_w = tree_reduce(ops, panels.map(steps.component_sq_norms, [(b,) for b in wt]))
    sq_h = tree_reduce(ops, ops.map(steps.component_sq_norms, [(b,) for b in h]))
    scale = extrapolation.balance(*ops.fetch((sq_w, sq_h)))
    return extrapolation.Control(scale=scale, scale_older=scale)


def _record(history: History, objective: Objective, norm_x_sq: float, n_iter: int, summary) -> int:
    """Record what iteration ``n_iter``'s summary tells; return the last iteration whose
    objective is now known (0: only the initialization's).

    For Frobenius the Gram identity gives the objective at the end of the iteration. For
    another β-divergence only the panel tasks see W·H, with the factors they start from, so
    the objective of iteration t is known when iteration t + 1 has run (the last one's comes
    from ``final_pass``).
    """
    _, h_stats, _, panel_stats = summary
    old_sums = (
        panel_stats[steps.P_SUM_W_OLD],
        panel_stats[steps.P_SQ_W_OLD],
        h_stats[steps.H_SUM_H_OLD],
        h_stats[steps.H_SQ_H_OLD],
    )
    if not objective.frobenius:
        history.record(objective, panel_stats[steps.P_DIV_OLD], *old_sums)
        return n_iter - 1
    if n_iter == 1:
        cross, wgw = panel_stats[steps.P_CROSS_OLD], panel_stats[steps.P_WGW_OLD]
        history.record(objective, 0.5 * (norm_x_sq - 2 * cross + wgw), *old_sums)
    history.record(objective, *steps.frobenius_terms(norm_x_sq, summary))
    history.violation.append(float(panel_stats[steps.P_VIOLATION] + h_stats[steps.H_VIOLATION]))
    return n_iter


def final_pass(panels: Panels, objective: Objective, result: FitResult) -> tuple[float, list]:
    """One more pass over X for the exact D_β(X | WH) of the result (the Gram identity of the
    iterations loses digits when the residual is small against ‖X‖). Completes the history when
    its last entry was not known yet. Returns (D_β, the column blocks of H as numpy)."""
    ops = panels.ops
    h_full = ops.call(steps.full_width, result.h) if len(result.h) > 1 else result.h[0]
    parts = panels.map(
        steps.final_stats, list(zip(panels.items, result.wt, strict=True)), objective.beta, h_full
    )
    value, sum_w, sq_w = ops.fetch(tree_reduce(ops, parts))
    h_blocks = ops.fetch(result.h)
    if len(result.history.loss) == result.n_iter:
        sum_h = sum(float(b.sum(dtype=np.float64)) for b in h_blocks)
        sq_h = sum(steps._dot64(b, b) for b in h_blocks)
        result.history.record(objective, value, sum_w, sq_w, sum_h, sq_h)
    return float(value), h_blocks
