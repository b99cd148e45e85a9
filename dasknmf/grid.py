"""X as a grid of 2-D blocks for ``dasknmf.blocks``: block boundaries within the memory
budgets, the blocks in memory, as Dask tasks, or cached on the workers in bands of rows (one
band per worker thread), and the bands whose tasks run together."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp

from dasknmf import steps
from dasknmf._config import get_bytes
from dasknmf.cuts import even_bounds
from dasknmf.ops import DaskOps, EagerOps, FutureOps, closed_on_error
from dasknmf.panels import (
    BLOCK_FACTORS,
    PANEL_MULTIPLE,
    TASK_OVERHEAD,
    should_cache,
    thread_slots,
    tuple_of,
    wait_for_workers,
)
from dasknmf.storage import distributed_client


@dataclass
class Grid:
    """X as a grid of blocks ``items[i][j]`` (rows ``row_bounds[i]:row_bounds[i + 1]``,
    columns ``col_bounds[j]:col_bounds[j + 1]``), ready for ``ops``."""

    ops: Any
    items: list[list]
    row_bounds: list[int]
    col_bounds: list[int]
    shape: tuple[int, int]
    dtype: np.dtype
    sparse: bool = False
    cached: bool = True
    locations: list | None = None  # the worker of each row of blocks (cached on a cluster)
    # Bands: runs of consecutive rows of blocks whose tasks run as one per phase (a worker
    # thread's rows, where the blocks are cached). They group tasks, never sums: the bits do
    # not depend on them.
    band_bounds: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.band_bounds:
            self.band_bounds = runs(list(range(len(self.items))))

    @property
    def ranges(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        return list(itertools.pairwise(self.row_bounds)), list(itertools.pairwise(self.col_bounds))

    def close(self) -> None:
        self.ops.close()

    def on_row(self, i: int, fn, *args):
        """``fn(*args)`` as a task of row i, placed with its blocks when they are cached."""
        if self.locations is None:
            return self.ops.call(fn, *args)
        return self.ops.map(fn, [args], workers=[self.locations[i]])[0]

    # What the engine and a checkpoint ask of a layout (as of ``panels.Panels``): a band is a
    # shard, its tasks placed with its blocks.

    def map(self, fn, items, *common) -> list:
        """``ops.map`` with one item per row of blocks, each task placed with its row."""
        return self.ops.map(fn, items, *common, workers=self.locations)

    @property
    def shard_ranges(self) -> list[tuple[int, int]]:
        return list(itertools.pairwise(self.band_bounds))

    def shard_map(self, fn, items, *common, data=False) -> list:
        """One task per band, ``fn(*common, *items[s])``, placed where its rows are (the
        blocks are passed by the caller, column by column: ``data`` must be False)."""
        if data:
            raise ValueError("Band tasks take their blocks column by column, not as data.")
        workers = None
        if self.locations is not None:
            workers = [self.locations[a] for a, _ in self.shard_ranges]
        return self.ops.map(fn, items, *common, workers=workers)

    def column(self, j: int) -> list[tuple]:
        """The blocks of column j, one tuple per band."""
        return [tuple(row[j] for row in self.items[a:b]) for a, b in self.shard_ranges]

    def bundle(self, blocks: list) -> list:
        """Per-row objects (blocks of Wᵀ) as one tuple per band, made where the band is."""
        items = [tuple(blocks[a:b]) for a, b in self.shard_ranges]
        if not self.ops.is_lazy:
            return items
        return self.shard_map(tuple_of, items)

    def unbundle(self, states: list) -> list:
        """The per-row objects of the bands' states (the reverse of ``bundle``)."""
        if not self.ops.is_lazy:
            return [row for state in states for row in state]
        return [
            self.ops.item(state, i)
            for state, (a, b) in zip(states, self.shard_ranges, strict=True)
            for i in range(b - a)
        ]


def grid_bounds(shape, n_components: int, itemsize: int, budget: int, stored=None, parts=1):
    """Row and column boundaries of blocks of X of about ``budget`` bytes (a dense block
    m_i·n_j·itemsize; a sparse one its share of the ``stored`` entries, itemsize + 4 bytes
    each, and its row pointers) whose k-row factor blocks (k × m_i of W, k × n_j of H) take at
    most ``budget`` (or ``dasknmf.h-block-bytes``, if larger) each. As large as that allows,
    near-square when X's budget binds: the fewer blocks, the fewer tasks and sums; but at least
    ``parts`` (the threads that run them) along each side, where X has as many rows and
    columns, since the W updates run in parallel over rows of blocks, the H updates over
    columns."""
    n_rows, n_cols = shape
    if stored is None:
        cell = float(itemsize)
    else:
        cell = (itemsize + 4) * max(stored, 1) / (n_rows * n_cols)
    factor = max(budget, get_bytes("dasknmf.h-block-bytes"))
    most = max(1, factor // (n_components * itemsize))
    rows = min(n_rows, most, math.ceil(n_rows / parts))
    cols = min(n_cols, most, math.ceil(n_cols / parts))
    if rows * cols * cell + 8 * rows > budget:
        side = max(1, math.isqrt(int(budget / cell)))
        cols = max(1, min(cols, side))
        rows = max(1, min(rows, int(budget / (cols * cell + 8))))
    return (
        even_bounds(n_rows, math.ceil(n_rows / rows)),
        even_bounds(n_cols, math.ceil(n_cols / cols)),
    )


def grid(X, n_components: int, budget: int, cache: bool | str = "auto") -> Grid:
    """The blocks of a validated X: in memory for numpy and scipy.sparse, Dask otherwise, kept
    in cluster memory (``cache`` True, or 'auto' and X takes at most ``dasknmf.cache-fraction``
    of it) or read from the source in every iteration. A sparse Dask X is read once here to
    count its entries, which size the blocks."""
    if not isinstance(X, da.Array):
        X = X.tocsr() if sp.issparse(X) else X
        stored = X.nnz if sp.issparse(X) else None
        # Not the machine's threads: the blocks, hence the bits, depend on shape and budget only.
        rows, cols = grid_bounds(X.shape, n_components, X.dtype.itemsize, budget, stored, 2)
        row_ranges, col_ranges = list(itertools.pairwise(rows)), list(itertools.pairwise(cols))
        items = [[X[a:b, c:d] for c, d in col_ranges] for a, b in row_ranges]
        threads = min(len(items), os.cpu_count() or 1)
        bands = runs([i * threads // len(items) for i in range(len(items))])
        ops = EagerOps(threads)
        return Grid(
            ops, items, rows, cols, tuple(X.shape), X.dtype, sp.issparse(X), band_bounds=bands
        )
    sparse = sp.issparse(X._meta)
    stored = count_stored(X)
    itemsize = X.dtype.itemsize
    client = distributed_client()
    threads = len(thread_slots(client)) if client is not None else 2  # as in memory
    rows, cols = grid_bounds(X.shape, n_components, itemsize, budget, stored, threads)
    nbytes = X.nbytes if stored is None else stored * (itemsize + 4) + 8 * X.shape[0]
    X = X.rechunk((tuple(np.diff(rows)), tuple(np.diff(cols))))
    flat, n = list(X.to_delayed(optimize_graph=False).ravel()), len(cols) - 1
    cached = should_cache(nbytes, cache)
    locations = None
    if client is None:
        ops = DaskOps()
        flat = list(dask.persist(*flat)) if cached else flat
    else:
        ops = FutureOps(client)
        with closed_on_error(ops):
            if cached:
                flat, locations = _cache_in_bands(client, flat, len(rows) - 1, n)
            else:
                flat = [steps.StreamedPanel(b) for b in flat]
    n_rows = len(rows) - 1
    items = [flat[i * n : (i + 1) * n] for i in range(n_rows)]
    bands = runs([i * threads // n_rows for i in range(n_rows)])  # as ``_cache_in_bands``
    return Grid(ops, items, rows, cols, tuple(X.shape), X.dtype, sparse, cached, locations, bands)


def runs(labels: list) -> list[int]:
    """Boundaries of the runs of equal consecutive ``labels``."""
    return [i for i in range(len(labels)) if i == 0 or labels[i] != labels[i - 1]] + [len(labels)]


def count_stored(X: da.Array) -> int | None:
    """The stored entries of a sparse Dask X (one read of it); None for a dense X."""
    if not sp.issparse(X._meta):
        return None
    meta = np.empty((0, 0), dtype=np.int64)  # (without it, dask calls _count on X's meta)
    return int(X.map_blocks(_count, dtype=np.int64, meta=meta).sum().compute())


def _count(block) -> np.ndarray:
    n = block.nnz if sp.issparse(block) else np.count_nonzero(block)
    return np.full((1, 1), n, dtype=np.int64)


def _cache_in_bands(client, flat: list, n_rows: int, n_cols: int) -> tuple[list, list]:
    """Blocks kept on the workers in bands of consecutive rows, one band per worker thread
    (in the order of the workers' addresses); returns the futures and each row's worker."""
    from distributed import wait

    slots = thread_slots(client)
    locations = [slots[i * len(slots) // n_rows] for i in range(n_rows)]
    where = [locations[index // n_cols] for index in range(len(flat))]
    copies = DaskOps().map(_the_block, [(b,) for b in flat], workers=where)
    futures = client.compute(copies, optimize_graph=False)  # one graph: see ``FutureOps.map``
    wait(futures)
    for future in futures:
        if future.status == "error":
            future.result()  # raises the task's error (a block that cannot be read)
    return futures, locations


def _the_block(x):
    return x


def relocate(g: Grid) -> None:
    """After workers were lost: wait for workers (``panels.wait_for_workers``) and run each
    row's tasks where its first block is now (the scheduler recomputes lost cached blocks
    from their source, wherever it puts them)."""
    if g.locations is None:
        return
    from distributed import wait

    client = g.ops.client
    g.ops.forget_detached()
    wait_for_workers(client, len(set(g.locations)))
    firsts = [row[0] for row in g.items]
    wait(firsts)
    holders = client.who_has(firsts)
    g.locations = [sorted(holders[f.key])[0] for f in firsts]
    g.band_bounds = runs(g.locations)


def task_memory(g: Grid, n_components: int, budget: int) -> int:
    """Bytes a task of the blocks holds at its peak: its block (at most ``budget``, which
    sized the blocks) and ``panels.BLOCK_FACTORS`` factor blocks and sums of the longer
    side."""
    rows, cols = g.ranges
    dense = max(b - a for a, b in rows) * max(d - c for c, d in cols) * g.dtype.itemsize
    largest = min(dense, budget)
    side = max(max(b - a for a, b in rows), max(d - c for c, d in cols))
    factors = BLOCK_FACTORS * n_components * side * g.dtype.itemsize
    return int(PANEL_MULTIPLE * largest + TASK_OVERHEAD + factors)
