"""The fit as one sequence, for every estimator: panels → validation → objective →
initialization → checkpoint → iterations → final pass → factors.

An estimator translates its parameters into a ``Plan`` and calls ``fit`` (or ``transform``)
once; it reads the ``Fitted`` result back into its attributes. The update rule and the loss are
the plug-in: ``Plan.objective`` makes the ``steps.Objective`` (solver, β, penalties, sweeps,
extrapolation) for the shape of X, and the engine runs whatever it describes. Nothing here
knows scikit-learn.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from dasknmf import blocks, cuts, engine, init, masked, panels, passes, shards, stacked
from dasknmf._blas import single_blas_thread
from dasknmf.checkpoint import Checkpoint, fingerprint
from dasknmf.history import History
from dasknmf.progress import Reporter
from dasknmf.recovery import recovering
from dasknmf.steps import Objective
from dasknmf.storage import distributed_client

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What a fit is asked to do: the estimator's parameters, translated.

    ``objective(n_samples, n_features, n_components, stored)`` gives the update rule and loss
    for X of that shape with ``stored`` stored entries (m·n when dense).
    """

    n_components: int
    init: str
    objective: Callable[[int, int, int, int], Objective]
    max_iter: int
    tol: float
    panel_bytes: int
    random_state: Any = None
    W: Any = None  # the initialization, with init='custom'
    H: Any = None
    shuffle: bool = False
    cache: bool | str = "auto"
    layout: str = "auto"  # "rows", "columns" (Xᵀ), "blocks" (2-D) or "auto"
    extrapolate: bool | str = "auto"  # as asked: 'auto' gives way where memory is short
    missing: str | None = None  # "nan", "unstored": the loss over observed entries only
    checkpoint: Any = None
    checkpoint_every: int = 10
    resume: bool = False
    storage_options: dict | None = None
    verbose: int = 0
    progress: bool = False
    # Independent fits stacked so that each read of X serves them all (``dasknmf.rank``): the
    # rank of each (n_components is then their largest); random_state is a tuple of their seeds.
    ranks: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        """The components of the fit, all stacked fits together."""
        return sum(self.ranks) if self.ranks else self.n_components

    @property
    def fits(self) -> int:
        """The fits stacked (1 without ``ranks``)."""
        return len(self.ranks) or 1


@dataclass
class Fitted:
    """What a fit found."""

    components: np.ndarray  # H, (n_components, n_features)
    W: Any  # numpy in memory, a Dask array on the blocks held by the cluster otherwise
    n_iter: int
    loss_history: list[float]
    reconstruction_err: float
    layout: dict  # how X was cut: {"scheme": "rows" or "columns" (Xᵀ), "panels", "cached"}
    replicate_errors: list[float] | None = None  # stacked fits: each one's ‖X − WH‖
    replicate_n_iter: list[int] | None = None  # and the iterations each ran (``stacked``)
    norm_x: float | None = None  # ‖X‖ (over the observed entries for the masked loss)


def row_panels(X, panel_bytes: int, cache: bool | str = "auto", fitting: bool = True):
    """Row panels of a validated X: in memory for numpy and scipy.sparse, Dask otherwise.
    ``transform`` returns a lazy Dask array, so for it X is neither cached nor submitted."""
    if isinstance(X, da.Array):
        return panels.dask_panels(X, panel_bytes, cache if fitting else False, lazy=not fitting)
    return panels.in_memory_panels(X, panel_bytes)


def fit(X, plan: Plan) -> Fitted:
    """Fit ``plan`` to X (validated: numpy, scipy.sparse or a floating Dask array).

    A wide X whose full-width row panels would not fit the panel budget is factorized as
    Xᵀ ≈ Hᵀ·Wᵀ: its row panels are column blocks of X; an X for which neither fits is cut into
    2-D blocks (``dasknmf.blocks``). ``plan.layout`` can force one.
    """
    itemsize = X.dtype.itemsize
    layout = cuts.choose_layout(X.shape, plan.width, itemsize, plan.panel_bytes, plan.layout)
    if isinstance(X, da.Array):  # in-memory input is fitted here, not on the workers
        panels.check_fits_workers(X.shape, plan.width, itemsize, layout)
    if layout == "blocks":
        return _fit_blocks(X, plan)
    transposed = layout == "columns"
    parts = row_panels(X.T if transposed else X, plan.panel_bytes, plan.cache)
    try:
        with single_blas_thread():
            return _fit_panels(parts, plan, transposed)
    finally:
        parts.close()


def _fit_panels(parts: panels.Panels, plan: Plan, transposed: bool) -> Fitted:
    """Fit on ``parts``, which hold X, or Xᵀ when ``transposed`` (W and H swap roles)."""
    n_rows, n_cols = parts.shape
    k = plan.width
    W, H = plan.W, plan.H
    if transposed:
        W, H = (None, None) if W is None else (H.T, W.T)
    stats = engine.check_values(parts, masked=plan.missing is not None)
    stored = _entries(stats, plan, parts.sparse, parts.shape)
    shape = (n_cols, n_rows) if transposed else (n_rows, n_cols)
    objective = _objective(plan, shape, stored, stats)
    if transposed:
        objective = objective.transposed()
    panels.cache_if_small(parts, stats.nnz, plan.cache)
    if stats.min == 0 and objective.beta <= 0:
        raise ValueError(
            "When beta_loss <= 0 and X contains zeros, the solver may diverge. Please add "
            "small values to X, or use a positive beta_loss."
        )
    col_bounds = cuts.column_bounds(n_cols, k, parts.dtype.itemsize)
    ckpt = _checkpoint(plan, parts, fingerprint(plan, parts, stats, objective, col_bounds))

    def starting_point(from_checkpoint: bool) -> tuple:
        start = (plan, parts, ckpt, col_bounds, stats.mean, W, H)
        return _starting_point(from_checkpoint, *start, swap_streams=transposed, by_shard=True)

    # The factors to start from are handed over (``_handed_over``), not kept here: the
    # engine regroups W by shard, and the initial blocks are then released.
    point = {"start": starting_point(plan.resume)}
    n_start = point["start"][2]
    logger.info(
        "NMF fit: X %s %s%s in %d %s panels (%s), %d components, %s, beta %g, %s",
        "x".join(map(str, (n_cols, n_rows) if transposed else (n_rows, n_cols))),
        parts.dtype,
        " sparse" if parts.sparse else "",
        len(parts.items),
        "column" if transposed else "row",
        ("cached" if parts.cached or not parts.ops.is_lazy else "streamed")
        + (f", stacked {parts.stacked} at a time" if parts.stacked > 1 else ""),
        k,
        objective.solver,
        objective.beta,
        f"resumed at iteration {n_start}" if plan.resume else f"init {plan.init}",
    )

    def attempt():
        *factors, start, history, shuffle_rng, momentum, kept = point.pop("start")
        result = stacked.each_to_its_stop(  # engine.fit, again as stacked fits stop
            engine.fit,
            parts,
            objective,
            *_handed_over(factors),
            stats.sum_sq * plan.fits,  # the loss is the stacked fits' sum
            col_bounds,
            restate=shards.ShardStates,
            max_iter=plan.max_iter,
            tol=plan.tol,
            shuffle_rng=shuffle_rng,
            callback=report,
            checkpoint=ckpt,
            start=start,
            history=history,
            momentum=momentum,
            kept=kept,
        )
        return result, engine.final_pass(parts, objective, result)

    def restart(from_checkpoint: bool) -> int:
        panels.relocate(parts)
        point["start"] = starting_point(from_checkpoint)
        return point["start"][2]

    with Reporter(plan.verbose, plan.progress, plan.max_iter, n_start) as report:
        result, (value, h_blocks) = recovering(
            attempt,
            restart,
            ckpt,
            report,
            lambda error: panels.workers_keep_dying(error, panels.panel_task_memory(parts, k)),
        )
    reconstruction_err = float(np.sqrt(2 * max(value, 0.0)))
    logger.info(
        "NMF fit done: %d iterations, reconstruction error %.6g", result.n_iter, reconstruction_err
    )
    if transposed:
        states = parts.ops.fetch(result.wt)
        components = _side_by_side([b for state in states for b in shards.shard_blocks(state)])
        W = _side_by_side(h_blocks).T
        W = da.from_array(W) if parts.ops.is_lazy else W
    else:
        components = _side_by_side(h_blocks)
        W = _assemble_w(parts, result.wt, k)
    return Fitted(
        components=components,
        W=W,
        n_iter=result.n_iter,
        loss_history=list(result.history.loss),
        reconstruction_err=reconstruction_err,
        layout={
            "scheme": "columns" if transposed else "rows",
            "panels": len(parts.items),
            "cached": bool(parts.cached or not parts.ops.is_lazy),
            **({"stacked": parts.stacked} if parts.stacked > 1 else {}),
        },
        **stacked.outcome(result, stats.sum_sq),
    )


def _objective(plan: Plan, shape, stored: int, stats: passes.Moments) -> Objective:
    """The plan's objective for X of ``shape`` (stacked fits: all their components, each with
    the sweeps of its fit alone). 'auto' extrapolation is off where ‖X‖² underflows: its
    pushes then carried a fit of X·1e-200 to twice the error of X's (``Moments.underflows``)."""
    if not plan.ranks:
        objective = plan.objective(*shape, plan.n_components, stored)
    elif isinstance(plan.random_state, tuple) and len(plan.random_state) == len(plan.ranks):
        alone = {k: plan.objective(*shape, k, stored) for k in set(plan.ranks)}
        objective = Objective.stack(alone, plan.ranks, plan.init, plan.shuffle)
    else:
        raise ValueError(
            f"Stacked fits need one seed each: ranks {plan.ranks}, random_state "
            f"{plan.random_state!r}."
        )
    if stats.underflows and plan.extrapolate is not True:
        objective = dataclasses.replace(objective, extrapolate=False)
    return objective


def _checkpoint(plan: Plan, layout, settings: dict) -> Checkpoint | None:
    """The fit's checkpoint (None without one), for the fingerprint ``settings``; on a cluster
    the workers, which write W's blocks there, are checked to share its folder."""
    if plan.checkpoint is None:
        return None
    ckpt = Checkpoint(plan.checkpoint, plan.checkpoint_every, settings, plan.storage_options)
    if layout.ops.is_async:
        ckpt.probe(layout.ops.client)
    return ckpt


def _starting_point(from_checkpoint, plan, layout, ckpt, col_bounds, mean, W, H, **options):
    """(Wᵀ blocks, H blocks, iteration, history, shuffling generator, momentum, best iterate)
    to start from: the checkpoint's, or ``plan.init`` on ``layout`` (panels or 2-D blocks)."""
    if from_checkpoint:
        return _resumed(ckpt, layout, plan)
    k = plan.ranks or plan.width  # stacked fits: their ranks
    wt, h = init.initialize(
        layout, plan.init, k, col_bounds, mean, plan.random_state, W, H, **options
    )
    return wt, h, 0, None, _shuffler(plan), None, None


def _shuffler(plan: Plan) -> np.random.RandomState | None:
    """The generator of the components' orders (``shuffle=True``), at its start."""
    if not plan.shuffle:
        return None
    return np.random.RandomState(init.seed_entropy(plan.random_state) % 2**32)


def _resumed(ckpt: Checkpoint, layout, plan: Plan) -> tuple:
    """(Wᵀ blocks, H blocks, iteration, history, shuffling generator, momentum, best iterate)
    of the newest checkpoint, read into ``layout`` (panels or 2-D blocks)."""
    state = ckpt.load(layout)
    shuffle_rng = _shuffler(plan)
    if shuffle_rng is not None:
        shuffle_rng.set_state(state.shuffle_state)
    history = History(**state.history)
    return state.wt, state.h, state.n_iter, history, shuffle_rng, state.momentum, state.best


def _entries(stats: passes.Moments, plan: Plan, sparse: bool, shape) -> int:
    """The entries of X the loss runs over — the observed ones for the masked loss (none is
    an error), the stored ones of sparse X, else all — from the validation pass."""
    if plan.missing is None:
        return stats.nnz if sparse else shape[0] * shape[1]
    if stats.size == 0:
        raise ValueError(f"X has no observed entry (missing={plan.missing!r}): nothing to fit.")
    return stats.size


def _handed_over(factors: list) -> tuple:
    """The items of ``factors``, which is left empty (see ``_fit_panels``)."""
    items = tuple(factors)
    factors.clear()
    return items


def _fit_blocks(X, plan: Plan) -> Fitted:
    """Fit ``plan`` on 2-D blocks of X (``dasknmf.blocks``)."""
    grid = blocks.grid(X, _block_width(plan), plan.panel_bytes, plan.cache)
    try:
        with single_blas_thread():
            return _fit_grid(grid, plan)
    finally:
        grid.close()


def _block_width(plan: Plan) -> int:
    """Numbers per row and column in the sums of the 2-D tasks, which size the blocks: the
    components (of all stacked replicates), or for the masked loss each row's problem."""
    return plan.width if plan.missing is None else masked.sums_width(plan.n_components)


def _extrapolation_that_fits(objective: Objective, plan: Plan, grid: blocks.Grid) -> Objective:
    """``objective``, without extrapolation when ``plan.extrapolate`` is 'auto' and the
    cluster cannot hold its copies of the factors (the pushed and plain W, the H before and
    the pushed H, and the best iterate once a newer one is recorded: five against a plain
    fit's two); forced, that is an error."""
    client = distributed_client() if grid.ops.is_lazy else None
    if not objective.extrapolate or client is None or panels.worker_memory() is None:
        return objective
    k, itemsize = objective.n_components, grid.dtype.itemsize
    need, have = panels.factors_memory(client, grid.shape, k, itemsize, 5)
    if need <= have:
        return objective
    if plan.extrapolate is True:
        raise ValueError(
            f"extrapolate=True on 2-D blocks keeps five copies of W and H, about "
            f"{need / 2**20:,.0f} MiB, and the workers have {max(have, 0) / 2**20:,.0f} MiB "
            "below the point where they pause; use extrapolate='auto' or False."
        )
    logger.info("2-D blocks without extrapolation: its copies of W and H do not fit the workers")
    return dataclasses.replace(objective, extrapolate=False)


def _fit_grid(grid: blocks.Grid, plan: Plan) -> Fitted:
    """``_fit_blocks`` on the blocks of X: validation, objective, checkpoint, start, the
    iterations (again after a loss of data on the cluster), final pass."""
    n_rows, n_cols = grid.shape
    k = plan.width
    stats = blocks.check_values(grid, plan.missing is not None)
    stored = _entries(stats, plan, grid.sparse, grid.shape)
    objective = _extrapolation_that_fits(_objective(plan, grid.shape, stored, stats), plan, grid)
    settings = fingerprint(plan, grid, stats, objective, grid.col_bounds, layout="blocks")
    ckpt = _checkpoint(plan, grid, settings)

    def starting_point(from_checkpoint: bool) -> tuple:
        start = (plan, grid, ckpt, grid.col_bounds, stats.mean, plan.W, plan.H)
        return _starting_point(from_checkpoint, *start)

    point = {"start": starting_point(plan.resume)}
    n_start = point["start"][2]
    shape = [len(grid.row_bounds) - 1, len(grid.col_bounds) - 1]
    logger.info(
        "NMF fit: X %dx%d %s%s in %d x %d 2-D blocks (%s), %d components, %s, %s",
        n_rows,
        n_cols,
        grid.dtype,
        " sparse" if grid.sparse else "",
        *shape,
        "cached" if grid.cached else "streamed",
        k,
        objective.solver,
        f"resumed at iteration {n_start}" if plan.resume else f"init {plan.init}",
    )

    def attempt():
        *factors, start, history, shuffle_rng, momentum, kept = point.pop("start")
        result = stacked.each_to_its_stop(  # blocks.fit, again as stacked fits stop
            blocks.fit,
            grid,
            objective,
            *_handed_over(factors),
            stats.sum_sq * plan.fits,  # the loss is the stacked fits' sum
            restate=grid.unbundle,
            max_iter=plan.max_iter,
            tol=plan.tol,
            shuffle_rng=shuffle_rng,
            callback=report,
            checkpoint=ckpt,
            start=start,
            history=history,
            momentum=momentum,
            kept=kept,
        )
        value = blocks.final_pass(grid, objective, result)
        return result, value, blocks.w_blocks(grid, result, k)

    def restart(from_checkpoint: bool) -> int:
        blocks.relocate(grid)
        point["start"] = starting_point(from_checkpoint)
        return point["start"][2]

    need = blocks.task_memory(grid, _block_width(plan), plan.panel_bytes)
    with Reporter(plan.verbose, plan.progress, plan.max_iter, n_start) as report:
        result, (value, h_blocks), W = recovering(
            attempt, restart, ckpt, report, lambda error: panels.workers_keep_dying(error, need)
        )
    return Fitted(
        components=_side_by_side(h_blocks),
        W=W,
        n_iter=result.n_iter,
        loss_history=list(result.history.loss),
        reconstruction_err=float(np.sqrt(2 * max(value, 0.0))),
        layout={
            "scheme": "blocks",
            "blocks": shape,
            "cached": bool(grid.cached),
            "extrapolated": bool(objective.extrapolate),  # 'auto' may give way (memory)
        },
        **stacked.outcome(result, stats.sum_sq),
    )


def transform(
    X,
    H: np.ndarray,
    objective: Objective,
    panel_bytes: int,
    max_iter: int,
    tol: float,
    layout: str = "auto",
):
    """W for X under the fixed H (non-negative least squares, ``objective``'s update rule):
    numpy for in-memory X, a lazy Dask array for Dask X (each row panel read once when it is
    computed). Over 2-D blocks (``blocks.transform``) where a row with H does not fit
    ``panel_bytes`` (``layout`` 'auto', as a fit chooses) or ``layout`` is 'blocks'."""
    itemsize = X.dtype.itemsize
    chosen = cuts.choose_layout(X.shape, H.shape[0], itemsize, panel_bytes, layout)
    if chosen == "blocks":
        return blocks.transform(X, H, objective, panel_bytes, max_iter, tol)
    common = (objective, H, objective.gram(H), max_iter, tol)
    return map_rows(X, panel_bytes, passes.transform_panel, *common, k=H.shape[0])


def map_rows(X, panel_bytes: int, fn: Callable, *common, k: int):
    """``fn(*common, X_i)`` → W_i (m_i, k) for each row panel X_i of X, joined: numpy for
    in-memory X, a lazy Dask array for Dask X (each row panel read once when computed)."""
    parts = row_panels(X, panel_bytes, fitting=False)
    ops = parts.ops
    try:
        with single_blas_thread():
            blocks = parts.map(fn, [(x,) for x in parts.items], *(ops.share(c) for c in common))
            if not ops.is_lazy:
                return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    finally:
        parts.close()
    return da.concatenate(
        [
            da.from_delayed(b, shape=(rows, k), dtype=parts.dtype)
            for b, rows in zip(blocks, parts.row_sizes, strict=True)
        ]
    )


def _side_by_side(blocks: list) -> np.ndarray:
    """Component-major blocks joined along their second axis."""
    return np.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]


def _assemble_w(parts: panels.Panels, states: list, k: int):
    """W from the shards' states (``shards.shard_blocks``): numpy in memory, otherwise a Dask
    array with a chunk per panel (per group of stacked panels), computed where its shard is."""
    if not parts.ops.is_lazy:
        blocks = [b for state in states for b in shards.shard_blocks(state)]
        return np.ascontiguousarray(np.concatenate(blocks, axis=1).T)
    blocks, size = [], parts.stacked
    for state, (a, b) in zip(states, parts.shard_ranges, strict=True):
        inner = dask.delayed(shards.group_blocks)(parts.tree, state)  # as the state holds them
        for g, i in enumerate(range(a, b, size)):
            rows = sum(parts.row_sizes[i : min(i + size, b)])
            blocks.append(da.from_delayed(inner[g], shape=(k, rows), dtype=parts.dtype))
    return da.concatenate(blocks, axis=1).T
