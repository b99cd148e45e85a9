"""The 2-D block scheme: X cut into blocks X_ij over row panels i and column blocks j, for
matrices large in both dimensions, where a task can hold neither a whole row of X with H nor a
whole column with W.

An iteration reads every block twice (once when streamed; cached blocks stay in memory):

1. along each row of blocks, in the order of j, a chain of tasks sums C_i = Σ_j H_j·X_ijᵀ
   (``block_cross``: each adds its block's product to the sum so far); C_i and H·Hᵀ (from
   the previous iteration's summary) update W_i by HALS sweeps (``w_step``);
2. along each column of blocks, in the order of i, a chain sums A_j = Σ_i W_iᵀ·X_ij with
   W_iᵀ·W_i and the statistics of W_i (``block_partial``), and updates H_j (``steps.h_step``,
   as in the row-panel scheme).

No task holds more than a block of X, W_i and H_j and a k × m_i or k × n_j sum, and a chain
holds one sum at a time. The sums run in a fixed order wherever the tasks run, so the
factors are the same bits on a cluster and in memory for the same blocks. Cached blocks are
placed in bands of consecutive rows per worker thread, and each task runs with its block: the
chains along rows stay on one worker and W_i never moves; a chain along a column crosses from
one worker to the next once.

This is the same alternating minimization as the row-panel scheme (W from H⁽ᵗ⁾, H from
W⁽ᵗ⁺¹⁾), so the factors equal its factors up to rounding (the sums over j are formed in
another order than one product over the whole row). Frobenius loss with HALS, without
extrapolation; initialization 'random' or 'custom'.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp

from dasknmf import engine, kernels, passes, steps
from dasknmf._blas import pin_worker_blas
from dasknmf._config import get_bytes
from dasknmf.init import random_block, seed_entropy
from dasknmf.ops import DaskOps, EagerOps, FutureOps, tree_reduce
from dasknmf.panels import (
    BLOCK_FACTORS,
    PANEL_MULTIPLE,
    TASK_OVERHEAD,
    even_bounds,
    should_cache,
    wait_for_workers,
)
from dasknmf.steps import Objective, panel_data
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
        return self.shard_map(_tuple_of, items)

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
    stored = int(X.map_blocks(_count, dtype=np.int64).sum().compute()) if sparse else None
    itemsize = X.dtype.itemsize
    client = distributed_client()
    threads = len(_slots(client)) if client is not None else 2  # as in memory
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


def _tuple_of(*items) -> tuple:
    return items


class RowOut(NamedTuple):
    """What ``w_step`` returns: the new block of Wᵀ of a row of blocks, W_iᵀ·W_i and the
    statistics vector of the update. A band's state is a tuple of them (a checkpoint writes
    each one's ``wt``: see ``steps.h_array``)."""

    wt: np.ndarray
    gram: np.ndarray
    stats: np.ndarray


def _count(block) -> np.ndarray:
    n = block.nnz if sp.issparse(block) else np.count_nonzero(block)
    return np.full((1, 1), n, dtype=np.int64)


def _cache_in_bands(client, flat: list, n_rows: int, n_cols: int) -> tuple[list, list]:
    """Blocks kept on the workers in bands of consecutive rows, one band per worker thread
    (in the order of the workers' addresses); returns the futures and each row's worker."""
    from distributed import wait

    slots = _slots(client)
    locations = [slots[i * len(slots) // n_rows] for i in range(n_rows)]
    where = [locations[index // n_cols] for index in range(len(flat))]
    copies = DaskOps().map(_the_block, [(b,) for b in flat], workers=where)
    futures = client.compute(copies, optimize_graph=False)  # one graph: see ``FutureOps.map``
    wait(futures)
    for future in futures:
        if future.status == "error":
            future.result()  # raises the task's error (a block that cannot be read)
    return futures, locations


def _slots(client) -> list[str]:
    """A worker's address for each of its threads, in the order of the addresses."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return [w for w in sorted(workers) for _ in range(max(1, workers[w].get("nthreads") or 1))]


def _the_block(x):
    return x


# ---- tasks -----------------------------------------------------------------------------------


def block_cross(h, x, total=None) -> np.ndarray:
    """C_i so far plus H_j·X_ijᵀ, (k, m_i)."""
    pin_worker_blas()
    cross = kernels.dot_h(panel_data(x), kernels.aligned(steps.h_array(h)))
    if total is not None:
        cross += total  # a sum of two: the same bits either way round
    return cross


def band_cross(h, totals, xs: tuple) -> tuple:
    """``block_cross`` for each row of a band: its C_i so far (``totals``; None at the first
    column block) plus H_j·X_ijᵀ."""
    if totals is None:
        totals = (None,) * len(xs)
    return tuple(block_cross(h, x, total) for x, total in zip(xs, totals, strict=True))


def band_w_step(objective: Objective, order, summary, state, crosses) -> tuple:
    """``w_step`` for each row of a band: the band's new state, a tuple of ``RowOut``."""
    return tuple(
        w_step(objective, order, summary, wt, cross)
        for wt, cross in zip(state, crosses, strict=True)
    )


def band_partial(state, total, xs: tuple):
    """``block_partial`` down the rows of a band: column j's sums so far plus the band's."""
    for w_out, x in zip(state, xs, strict=True):
        total = block_partial(w_out, x, total)
    return total


def w_step(objective: Objective, order, summary, wt, cross):
    """W_i (a block, or the previous ``w_step`` output) from C_i = Σ_j C_ij and H·Hᵀ (from the
    previous iteration's ``summary``, or the initial H·Hᵀ): the update, statistics and W_iᵀ·W_i
    as the row-panel task forms them (``steps.w_update``). Returns ``(Wt_i, B_i, stats_i)``."""
    pin_worker_blas()
    gram_h = summary[0] if isinstance(summary, tuple) else summary
    wt = wt[0] if isinstance(wt, tuple) else wt  # the previous ``w_step`` output
    # All aligned: numpy's matmul skips BLAS for an unaligned operand (one received over the
    # network may be), and its own loop rounds differently from BLAS's.
    gram_h, cross, wt = map(kernels.aligned, (gram_h, cross, wt))
    wt, stats = steps.w_update(objective, order, gram_h, cross, wt)
    return RowOut(wt, wt @ wt.T, stats)


def block_partial(w_out, x, total=None) -> tuple:
    """Column j's sums so far plus block (i, j)'s (B_i, stats_i, W_iᵀ·X_ij): every column sums
    all of B = Σ W_iᵀ·W_i and the statistics, as every H block's update needs them."""
    pin_worker_blas()
    wt, gram_w, stats = w_out
    part = (gram_w, stats, kernels.dot_w(panel_data(x), kernels.aligned(wt)))
    return part if total is None else steps.sum_in_order(total, part)


def block_final_stats(with_w: bool, h, w_out, x) -> np.ndarray:
    """½‖X_ij − W_i·H_j‖², and ΣW_i, ‖W_i‖² for the first block of the row (``with_w``)."""
    pin_worker_blas()
    wt = w_out[0] if isinstance(w_out, tuple) else w_out
    stats = passes.final_stats(2.0, kernels.aligned(steps.h_array(h)), x, kernels.aligned(wt))
    if not with_w:
        stats[passes.F_SUM_W] = stats[passes.F_SQ_W] = 0.0
    return stats


def gram_of(h_block) -> np.ndarray:
    """H_j·H_jᵀ, (k, k), of a column block of H (aligned: see ``w_step``)."""
    pin_worker_blas()
    h = kernels.aligned(steps.h_array(h_block))
    return h @ h.T


def first_summary(ops, h: list):
    """H·Hᵀ of the H an iteration starts from, summed over the column blocks by the tree
    that sums it in an iteration's summary (``steps._h_summary``): a fit resumed from the H of
    a checkpoint goes on with the bits the uninterrupted fit had."""
    return tree_reduce(ops, [ops.call(gram_of, b) for b in h])


# ---- driver ----------------------------------------------------------------------------------


def iterate(g: Grid, objective, wt: list, h: list, summary, orders=(None, None)):
    """One iteration (see the module's docstring), one task per band and column block in
    each chain: new W states (per band, a tuple of ``w_step`` outputs), H blocks (``h_step``
    outputs) and the summary ``(H·Hᵀ, H stats, B, panel stats)``. Each row's and each
    column's sums run in the order of the blocks, whatever the bands."""
    order_w, order_h = orders
    crosses = [None] * len(wt)
    for j, h_j in enumerate(h):
        items = zip(crosses, g.column(j), strict=True)
        crosses = g.shard_map(band_cross, [(c, xs) for c, xs in items], h_j)
    items = list(zip(wt, crosses, strict=True))
    w_outs = g.shard_map(band_w_step, items, objective, order_w, summary)
    h_outs = []
    for j, h_j in enumerate(h):
        total = None
        for s, (w_out, xs) in enumerate(zip(w_outs, g.column(j), strict=True)):
            total = _on_band(g, s, band_partial, w_out, total, xs)
        h_outs.append(g.ops.call(steps.h_step, objective, order_h, None, ((0, None),), h_j, total))
    new_summary = tree_reduce(g.ops, h_outs, steps._h_summary, first=steps._h_summary)
    return w_outs, h_outs, new_summary


def _on_band(g: Grid, s: int, fn, *args):
    """``fn(*args)`` as a task of band s, placed with its blocks when they are cached."""
    if g.locations is None:
        return g.ops.call(fn, *args)
    return g.ops.map(fn, [args], workers=[g.locations[g.band_bounds[s]]])[0]


def check_values(g: Grid) -> engine.Moments:
    """The validation pass over the blocks (see ``engine.check_values``)."""
    ops = g.ops
    check = passes.moments_task
    parts = [g.on_row(i, check, False, x) for i, row in enumerate(g.items) for x in row]
    stats = engine.as_moments(ops.fetch(tree_reduce(ops, parts, kernels.combine_moments)))
    passes.reject_bad_values(stats.n_nonfinite, stats.min, "NMF (input X)")
    return stats


def initialize(g: Grid, method: str, k: int, mean: float, random_state=None, W=None, H=None):
    """Initial blocks of Wᵀ (by row panel) and H (by column block): 'random' draws the same
    numbers as the row-panel scheme (seeds keyed by rows and columns, not by blocks)."""
    from dasknmf import init

    ops = g.ops
    rows, cols = g.ranges
    if method == "random":
        entropy, scale = seed_entropy(random_state), np.sqrt(mean / k)
        draw = init._W_RANDOM, init._H_RANDOM
        wt = [
            g.on_row(i, random_block, entropy, draw[0], scale, g.dtype, k, a, b)
            for i, (a, b) in enumerate(rows)
        ]
        h = [ops.call(random_block, entropy, draw[1], scale, g.dtype, k, c, d) for c, d in cols]
    elif method == "custom":
        wt = [ops.call(init._component_major, g.dtype, W[a:b]) for a, b in rows]
        h = [ops.call(init._copy_block, g.dtype, H[:, c:d]) for c, d in cols]
    else:
        raise ValueError(
            f"init={method!r} is not available with the 2-D block layout (a matrix large in "
            "both dimensions, or layout='blocks'): its SVD over blocks is not implemented yet. "
            "Use init='random' or init='custom'."
        )
    return ops.persist(wt, h)


def fit(
    g: Grid,
    objective: Objective,
    wt: list,
    h: list,
    norm_x_sq: float,
    *,
    max_iter: int,
    tol: float,
    shuffle_rng=None,
    callback=None,
    checkpoint=None,
    start: int = 0,
    history: engine.History | None = None,
) -> engine.FitResult:
    """Alternate the W and H updates over the blocks until the stopping rule or ``max_iter``
    (as ``engine.fit``; each iteration waits for the previous one's summary). The result holds
    the bands' states as W (see ``iterate``) and the H blocks as arrays (numpy in memory).

    ``checkpoint`` (a ``dasknmf.checkpoint.Checkpoint``) is written after every
    ``checkpoint.every``-th iteration; a resumed fit passes its factors as ``wt`` and ``h``,
    its iteration as ``start`` and its ``history``, and goes on with the same bits."""
    ops = g.ops
    k = objective.n_components
    shared = ops.share(objective)
    summary = first_summary(ops, h)
    wt = g.bundle(wt)  # one state per band from here on
    history = history if history is not None else engine.History()
    n_iter = start
    for n_iter in range(start + 1, max_iter + 1):
        orders = (None, None)
        if shuffle_rng is not None:
            orders = (shuffle_rng.permutation(k), shuffle_rng.permutation(k))
        if ops.is_async and n_iter % engine.LINEAGE_EVERY == 0:  # see ``engine._detached``
            wt = ops.detach(wt)
            h = [ops.share(b) for b in ops.fetch([ops.call(steps.h_array, b) for b in h])]
            summary = ops.share(ops.fetch(summary))
        wt, h, summary = ops.persist(*iterate(g, shared, wt, h, summary, orders))
        known = engine._record(history, objective, norm_x_sq, n_iter, ops.fetch(summary))
        if callback is not None and known:
            callback(known, history)
        if tol > 0 and known and objective.rule.converged(known, tol, history.as_dict()):
            break
        if checkpoint is not None and checkpoint.due(n_iter):
            state = None if shuffle_rng is None else shuffle_rng.get_state()
            checkpoint.save(g, n_iter, wt, h, history, state)
    h = [ops.call(steps.h_array, b) for b in h]
    return engine.FitResult(wt=list(wt), h=h, n_iter=n_iter, history=history)


def final_pass(g: Grid, result: engine.FitResult) -> tuple[float, list]:
    """The exact ½‖X − WH‖² of the result, from one more read of the blocks; returns it and
    the H blocks as numpy."""
    ops = g.ops
    parts = [
        g.on_row(i, block_final_stats, j == 0, h_j, w_out, x)
        for i, (w_out, row) in enumerate(zip(g.unbundle(result.wt), g.items, strict=True))
        for j, (h_j, x) in enumerate(zip(result.h, row, strict=True))
    ]
    value = ops.fetch(tree_reduce(ops, parts))[passes.F_DIV]
    return float(value), ops.fetch(result.h)


def w_blocks(g: Grid, result: engine.FitResult, k: int):
    """W from the bands' states: numpy in memory, a Dask array otherwise."""
    w_outs = g.unbundle(result.wt)
    if not g.ops.is_lazy:
        return np.ascontiguousarray(np.concatenate([w[0] for w in w_outs], axis=1).T)
    rows, _ = g.ranges
    return da.concatenate(
        [
            da.from_delayed(dask.delayed(_rows_of)(w), shape=(b - a, k), dtype=g.dtype)
            for w, (a, b) in zip(w_outs, rows, strict=True)
        ]
    )


def relocate(g: Grid) -> None:
    """After workers were lost: wait for workers (``panels.wait_for_workers``) and run each
    row's tasks where its first block is now (the scheduler recomputes lost cached blocks
    from their source, wherever it puts them)."""
    if g.locations is None:
        return
    from distributed import wait

    client = g.ops.client
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


def _rows_of(w_out) -> np.ndarray:
    return np.ascontiguousarray(w_out[0].T)
