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

The tasks go by bands of consecutive rows of blocks (``grid.Grid.band_bounds``), one band per
worker thread: a link of a chain runs its band's blocks of one column in order, a W update
its band's rows. A task holds one block of X at a time, H_j, and its band's W blocks and
sums. The sums run in the order of the blocks wherever and in whatever bands the tasks run,
so the factors are the same bits on a cluster and in memory for the same blocks. Cached
blocks lie on the worker of their band: the chains along rows stay on one worker and W never
moves; a chain along a column crosses from one worker to the next once.

``transform`` (W for new rows under a fixed H) sums C_i along each row of blocks in the same
way and solves each row's non-negative least squares from it: one read of X, no task holding
the whole of H.

This is the same alternating minimization as the row-panel scheme (W from H⁽ᵗ⁾, H from
W⁽ᵗ⁺¹⁾), so the factors equal its factors up to rounding (the sums over j are formed in
another order than one product over the whole row). Frobenius loss by HALS (or MU), other
β-divergences by one multiplicative update per factor and iteration, whose statistics are
summed along the rows and the columns of blocks in the same way. HALS with extrapolation
(``solvers.extrapolation``) as on row panels: a band pushes its rows of W after their
update, a task per column block pushes H_j before the iteration uses it.
Initialization 'random' or 'custom', or NNDSVD from the randomized SVD over the blocks
(``svd.randomized_svd_blocks``: its passes run in the same chains as an iteration).
"""

from __future__ import annotations

import functools
import itertools

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from dasknmf import block_steps, engine, kernels, masked, passes, stacked, steps
from dasknmf.grid import Grid, count_stored
from dasknmf.grid import grid as grid  # the blocks of X, as ``blocks.grid``
from dasknmf.grid import grid_bounds as grid_bounds
from dasknmf.grid import relocate as relocate
from dasknmf.grid import task_memory as task_memory
from dasknmf.history import Best, History
from dasknmf.objective import OverflowedError
from dasknmf.ops import tree_reduce
from dasknmf.solvers import extrapolation
from dasknmf.steps import Objective


def first_summary(g: Grid, objective: Objective, h: list):
    """H·Hᵀ of the H an iteration starts from, summed over the column blocks by the tree
    that sums it in an iteration's summary (``steps.h_summary``): a fit resumed from the H of
    a checkpoint goes on with the bits the uninterrupted fit had. Each H_j·H_jᵀ is formed
    where the H blocks are made (``_on_h``)."""
    return tree_reduce(g.ops, [_on_h(g, block_steps.gram_of, objective, b) for b in h])


def _on_h(g: Grid, fn, *args):
    """``fn(*args)`` as a task on the worker of the last band, where the column chains end
    and the H blocks are made: their data does not move."""
    return g.on_row(g.band_bounds[-2], fn, *args)


# ---- driver ----------------------------------------------------------------------------------


def iterate(
    g: Grid,
    objective: Objective,
    wt: list,
    h: list,
    summary,
    orders=(None, None),
    shared=None,
    momentum=None,
    norm_x_sq: float | None = None,
):
    """One iteration (see the module's docstring), one task per band and column block in
    each chain: new W states (per band, a tuple of ``w_step`` outputs), H blocks (``h_step``
    outputs), the summary ``(H·Hᵀ, H stats, B, panel stats)`` and the momentum of the next
    iteration. Each row's and each column's sums run in the order of the blocks, whatever
    the bands. ``shared``: the objective as ``g.ops.share`` made it once for all iterations
    (the tasks' argument).

    ``momentum``, for a fit with extrapolation, is ``(the bands' plain W, the H blocks of the
    iteration before, control)`` (as ``engine.iterate`` has it; ``norm_x_sq`` gives the next
    control): one task per column block pushes H_j, and their H_j·H_jᵀ, summed by the tree
    of ``first_summary``, replace the summary's H·Hᵀ in the W update."""
    ops = g.ops
    order_w, order_h = orders
    # The column chains read H_j for a multiplicative update's statistics (not Frobenius's).
    needs_h = objective.solver == "mu" and (objective.masked or not objective.frobenius)
    # Each sweep of a multiplicative W update needs its statistics from the row again.
    sweeps = objective.sweeps_w if needs_h else 1
    control, extra = None, [()] * len(wt)
    if momentum is not None:
        plains, h_previous, control = momentum
        h_start = h
        h = [
            _on_h(g, steps.pushed_block, *pair, control) for pair in zip(h, h_previous, strict=True)
        ]
        summary = first_summary(g, objective, h)
        extra = [(p,) for p in plains]
    objective = objective if shared is None else shared
    w_outs = wt
    for sweep in range(sweeps):
        crosses = [None] * len(wt)
        for j, h_j in enumerate(h):
            items = zip(w_outs, crosses, g.column(j), strict=True)
            crosses = g.shard_map(
                block_steps.band_cross, [(w, h_j, c, xs) for w, c, xs in items], objective
            )
        items = [(w, c, *e) for w, c, e in zip(w_outs, crosses, extra, strict=True)]
        common = (objective, order_w, summary, control, sweep > 0)
        w_outs = g.shard_map(block_steps.band_w_step, items, *common)
    if not ops.is_lazy:  # in memory: the columns' chains side by side on the threads
        items = [(h_j, g.column(j)) for j, h_j in enumerate(h)]
        h_outs = ops.map(block_steps.column_h_step, items, objective, order_h, needs_h, w_outs)
    else:
        h_outs = []
        for j, h_j in enumerate(h):
            total, h_in = None, h_j if needs_h else None
            for s, (w_out, xs) in enumerate(zip(w_outs, g.column(j), strict=True)):
                total = g.on_row(
                    g.band_bounds[s], block_steps.band_partial, objective, h_in, w_out, total, xs
                )
            # Where the column's sums end: they do not move, and the H blocks and the summary
            # tree over them are then on one worker, not spread at random.
            h_outs.append(
                _on_h(g, steps.h_step, objective, order_h, None, block_steps.WHOLE_H, h_j, total)
            )
    new_summary = tree_reduce(ops, h_outs, steps.h_summary, first=steps.h_summary)
    if momentum is not None:
        control = ops.call(steps.advance_control, control, objective, norm_x_sq, new_summary)
        momentum = (w_outs, h_start, control)
    return w_outs, h_outs, new_summary, momentum


def check_values(g: Grid, masked_loss: bool = False) -> passes.Moments:
    """The validation pass over the blocks (see ``engine.check_values``); over the observed
    entries only for the masked loss."""
    ops = g.ops
    check = passes.moments_task
    parts = [g.on_row(i, check, masked_loss, x) for i, row in enumerate(g.items) for x in row]
    stats = passes.as_moments(ops.fetch(tree_reduce(ops, parts, kernels.combine_moments)))
    passes.reject_bad_values(stats.n_nonfinite, stats.min, "NMF (input X)")
    return stats


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
    history: History | None = None,
    momentum: tuple | None = None,
    kept: tuple | None = None,
) -> engine.FitResult:
    """Alternate the W and H updates over the blocks until the stopping rule or ``max_iter``
    (as ``engine.fit``; each iteration waits for the previous one's summary). The result holds
    the bands' states as W (see ``iterate``) and the H blocks as arrays (numpy in memory).

    ``checkpoint`` (a ``dasknmf.checkpoint.Checkpoint``) is written after every
    ``checkpoint.every``-th iteration; a resumed fit passes its factors as ``wt`` and ``h``,
    its iteration as ``start`` and its ``history``, and goes on with the same bits.

    With ``objective.extrapolate`` the iterates are pushed along their last step
    (``solvers.extrapolation``, as ``engine.fit`` does); a resumed fit then also passes the
    checkpoint's ``momentum`` (see ``iterate``) and ``kept`` best iterate (as
    ``engine.fit``)."""
    ops = g.ops
    k = objective.n_components
    wt = g.bundle(wt)  # one state per band from here on
    if objective.extrapolate and momentum is None:
        momentum = (list(wt), list(h), engine.first_control(g, objective, wt, h))
    elif momentum is not None:
        momentum = (g.bundle(momentum[0]), *momentum[1:])
    summary = None if momentum is not None else first_summary(g, objective, h)
    history = history if history is not None else History()
    shared = ops.share(objective)
    rule = extrapolation if objective.extrapolate else objective.rule
    n_iter, h_stats = start, None
    best = Best(bool(objective.extrapolate), start if kept is None else kept[0])
    best.see(history, start)  # a resumed fit: its history so far
    kept = None if kept is None else (g.bundle(kept[1]), kept[2], None)
    for n_iter in range(start + 1, max_iter + 1):
        orders = (None, None)
        if shuffle_rng is not None:
            orders = (shuffle_rng.permutation(k), shuffle_rng.permutation(k))
        if ops.is_async and n_iter % engine.LINEAGE_EVERY == 0:  # see ``engine.cut_lineage``
            wt, h, momentum, summary = engine.cut_lineage(ops, wt, h, momentum, summary)
        step = iterate(g, objective, wt, h, summary, orders, shared, momentum, norm_x_sq)
        previous = (wt, h, h_stats)  # this iteration's inputs, until its summary is read
        wt, h, summary, momentum = ops.persist(*step)
        numbers = ops.fetch(summary)
        try:
            known = engine.record_summary(history, objective, norm_x_sq, n_iter, numbers)
        except OverflowedError as error:
            best.overflowed(error, n_iter)  # raises, or the fit ends at its best iterate
            # the best is that iterate (``previous``) or an older, kept one
            (wt, h, h_stats), n_iter = previous, n_iter - 1
            break
        h_stats = numbers[1]  # the masked loss's H penalty needs them (``final_pass``)
        if best.see(history, n_iter):  # the best iterate is no longer the newest: keep it
            kept = _kept(g, *previous)
        del previous
        if callback is not None and known:
            callback(known, history)
        if tol > 0 and known and stacked.stopped(objective, rule, known, tol, history.as_dict()):
            break
        if checkpoint is not None and checkpoint.due(n_iter):
            state = None if shuffle_rng is None else shuffle_rng.get_state()
            if momentum is not None:  # the plain W blocks, as the checkpoint writes them
                momentum = (g.shard_map(block_steps.plain_rows, [(s,) for s in wt]), *momentum[1:])
            checkpoint.save(g, n_iter, wt, h, history, state, momentum, best.older(n_iter, kept))
    if best.returned(n_iter) != n_iter:
        wt, h, h_stats = kept
    h = [ops.call(steps.h_array, b) for b in h]
    return engine.FitResult(wt=list(wt), h=h, n_iter=n_iter, history=history, h_stats=h_stats)


def _kept(g: Grid, wt: list, h: list, h_stats) -> tuple:
    """An iterate reduced to what its result needs (the bands' pushed W blocks and H's
    arrays), so that keeping it past the next iterations holds nothing more
    (``history.Best``)."""
    wt = g.shard_map(block_steps.pushed_rows, [(s,) for s in wt])
    return wt, [g.ops.call(steps.h_array, b) for b in h], h_stats


def final_pass(g: Grid, objective: Objective, result: engine.FitResult) -> tuple[float, list]:
    """The exact D_β(X | WH) of the result (½‖X − WH‖² for β = 2), from one more read of the
    blocks; completes the history when its last entry was not known yet (a β-divergence's,
    as ``engine.final_pass`` does). Returns it and the H blocks as numpy."""
    ops = g.ops
    parts = [
        g.on_row(
            i, block_steps.block_final_stats, objective, j == 0 or objective.masked, h_j, w_out, x
        )
        for i, (w_out, row) in enumerate(zip(g.unbundle(result.wt), g.items, strict=True))
        for j, (h_j, x) in enumerate(zip(result.h, row, strict=True))
    ]
    value, sum_w, sq_w, *result.replicate_values = ops.fetch(tree_reduce(ops, parts))
    h_blocks = ops.fetch(result.h)
    engine.complete_history(objective, result, value, sum_w, sq_w, h_blocks)
    return float(value), h_blocks


def w_blocks(g: Grid, result: engine.FitResult, k: int):
    """W from the bands' states: numpy in memory, a Dask array otherwise."""
    w_outs = g.unbundle(result.wt)
    if not g.ops.is_lazy:
        return np.ascontiguousarray(
            np.concatenate([block_steps.block_of(w) for w in w_outs], axis=1).T
        )
    rows, _ = g.ranges
    return da.concatenate(
        [
            da.from_delayed(dask.delayed(_rows_of)(w), shape=(b - a, k), dtype=g.dtype)
            for w, (a, b) in zip(w_outs, rows, strict=True)
        ]
    )


def _rows_of(w_out) -> np.ndarray:
    return np.ascontiguousarray(block_steps.block_of(w_out).T)


# ---- transform -------------------------------------------------------------------------------


def transform(X, h: np.ndarray, objective: Objective, budget: int, max_iter: int, tol: float):
    """W for X under the fixed H over 2-D blocks of about ``budget`` bytes: numpy for
    in-memory X, a lazy Dask array for Dask X (each block read once when computed). A sparse
    Dask X is read once here to count its entries, which size the blocks.

    A least-squares transform (the Frobenius loss over all of X, or the masked loss by HALS
    over its observed entries) sums each row's problem along its row of blocks and solves it
    (``_least_squares_row``); a multiplicative one (another β, or the masked loss by MU)
    iterates each row's W, every update summing its statistics along the row
    (``_multiplicative_row``)."""
    k = h.shape[0]
    least_squares = not passes.multiplicative_transform(objective)
    width = 3 * k + 1  # multiplicative: W, the numerator and the denominator, the row's count
    if least_squares:
        width = masked.sums_width(k) if objective.masked else k
    lazy = isinstance(X, da.Array)
    if not lazy:
        X = X.tocsr() if sp.issparse(X) else X
    stored = count_stored(X) if lazy else (X.nnz if sp.issparse(X) else None)
    rows, cols = grid_bounds(X.shape, width, X.dtype.itemsize, budget, stored, 2)
    col_ranges = list(itertools.pairwise(cols))
    if lazy:
        X = X.rechunk((tuple(np.diff(rows)), tuple(np.diff(cols))))
        items, tasks = X.__dask_keys__(), _Later(tokenize(X, h, objective, max_iter, tol))
    else:
        items = [[X[a:b, c:d] for c, d in col_ranges] for a, b in itertools.pairwise(rows)]
        tasks = _Now()
    h_blocks = [tasks.value(h[:, c:d]) for c, d in col_ranges]
    if least_squares:
        solve = functools.partial(_least_squares_row, gram_h=tasks.value(objective.gram(h)))
    else:
        solve = functools.partial(_multiplicative_row, k=k, dtype=h.dtype)
    common = (tasks, tasks.value(objective), h_blocks, max_iter, tol)
    parts = [
        solve(*common, row, b - a)
        for row, (a, b) in zip(items, itertools.pairwise(rows), strict=True)
    ]
    if not lazy:
        return np.concatenate(parts)
    return tasks.array(X, parts, (tuple(np.diff(rows)), (k,)))


class _Now:
    """Runs a transform's tasks as they are made (in-memory X)."""

    def value(self, v):
        return v

    def __call__(self, fn, *args):
        return fn(*args)


class _Later:
    """Makes a lazy transform's tasks into one graph: keyed by the transform's token and
    their order of making (the same transform, the same keys), their arguments the keys of
    earlier tasks, of X's blocks and of the values they share (each in the graph once)."""

    def __init__(self, token: str):
        self.token, self.made, self.graph = token, itertools.count(), {}

    def value(self, v):
        key = (f"transform-value-{self.token}", next(self.made))
        self.graph[key] = v
        return key

    def __call__(self, fn, *args):
        key = (f"{fn.__name__.strip('_')}-{self.token}", next(self.made))
        self.graph[key] = (fn, *args)
        return key

    def array(self, X: da.Array, rows: list, chunks) -> da.Array:
        """The Dask array of W whose row blocks are the tasks ``rows``."""
        name = f"transform-{self.token}"
        for i, key in enumerate(rows):
            self.graph[(name, i, 0)] = key
        graph = HighLevelGraph.from_collections(name, self.graph, dependencies=[X])
        return da.Array(graph, name, chunks, meta=np.empty((0, 0), dtype=X.dtype))


def _least_squares_row(tasks, objective, h_blocks, max_iter, tol, row, n_rows, *, gram_h):
    """W_i of a row of blocks from its problem, summed along the row (one read of it)."""
    cross = None
    for h_j, x in zip(h_blocks, row, strict=True):
        cross = tasks(block_steps.checked_cross, objective, h_j, x, cross)
    return tasks(block_steps.solve_rows, objective, gram_h, max_iter, tol, cross)


def _multiplicative_row(tasks, objective, h_blocks, max_iter, tol, row, n_rows, *, k, dtype):
    """W_i of a row of blocks by the multiplicative updates of ``passes.transform_panel``:
    a pass along the row for the moments that start them, then one per update (in memory
    until the row's updates stop; a lazy graph has every update's tasks, those after the
    stop passing the state on). Dask keeps the row's blocks from the first pass to the last,
    so each is read once."""
    moments = None
    for x in row:
        moments = tasks(block_steps.row_moments, objective, x, moments)
    state = tasks(passes.mu_start, k, n_rows, dtype, moments)
    for n_iter in range(max_iter + 1):
        sums = None
        for h_j, x in zip(h_blocks, row, strict=True):
            sums = tasks(block_steps.mu_sums, objective, tol, n_iter, state, h_j, x, sums)
        state = tasks(block_steps.mu_row_step, objective, max_iter, tol, n_iter, state, sums)
        if isinstance(state, passes.MuSolve) and state.done:
            break
    return tasks(passes.mu_rows, state)
