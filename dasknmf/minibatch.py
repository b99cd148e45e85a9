"""The mini-batch fit (scikit-learn's ``MiniBatchNMF``) as one sequence: batches → validation →
initialization → steps (W of a batch, then H from the running sums) → final pass.

A *step* updates W for the rows of its batches from the current H and then H once from the
batches' statistics, folded into the running sums A and B with the forget factor ρ
(``dasknmf.online``). In memory a step is one batch of ``batch_size`` rows, as scikit-learn's
(``sklearn.utils.gen_batches``). For a Dask array, Zarr array or path the batches are row
panels of X of at most ``batch_size`` rows (stored chunks are never split: a chunk taller than
``batch_size`` is a batch of its own), so an epoch reads X once; a step takes
``parallel_batches`` consecutive batches, computed at once on the workers, and updates H once
from their summed statistics — the same as one batch of their rows together. ρ is
forget_factor^(rows of a step / n_samples), so that an epoch forgets as much whatever the step.

Nothing here knows scikit-learn; ``dasknmf.streaming`` is the estimator.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp

from dasknmf import engine, init, kernels, online, panels, passes, pipeline
from dasknmf._blas import single_blas_thread
from dasknmf.checkpoint import Checkpoint
from dasknmf.online import Convergence, Online
from dasknmf.ops import EagerOps
from dasknmf.recovery import recovering
from dasknmf.storage import distributed_client

logger = logging.getLogger(__name__)

#: On a distributed cluster, the lineage of the factors is cut after every this many steps.
LINEAGE_EVERY = 20


@dataclass(frozen=True)
class Schedule:
    """What a mini-batch fit is asked to do: the estimator's parameters, translated."""

    online: Online
    init: str
    batch_size: int
    max_iter: int
    forget_factor: float = 0.7
    max_no_improvement: int | None = 10
    fresh_restarts: bool = False
    fresh_restarts_max_iter: int = 30
    transform_max_iter: int = 200
    random_state: Any = None
    W: Any = None  # the initialization, with init='custom'
    H: Any = None
    parallel_batches: int | None = None
    cache: bool | str = "auto"
    verbose: int = 0
    checkpoint: Any = None  # a folder, written every ``checkpoint_every`` steps
    checkpoint_every: int = 10
    resume: bool = False
    storage_options: dict | None = None


@dataclass
class Fitted:
    """What a mini-batch fit found: H, the running sums A and B of its last step, W."""

    components: np.ndarray
    numerator: np.ndarray  # A
    denominator: np.ndarray  # B
    W: Any  # numpy in memory, a Dask array otherwise
    n_iter: int
    n_steps: int
    reconstruction_err: float
    rho: float
    layout: dict


# ---- the batches -------------------------------------------------------------------------------


def batch_panels(X, rows: int, cache: bool | str = "auto") -> panels.Panels:
    """X cut into batches of at most ``rows`` rows: scikit-learn's ``gen_batches`` in memory,
    row panels of whole stored chunks for a Dask array, consecutive ones on the worker threads
    in turn (a step's batches then run at once)."""
    if isinstance(X, da.Array):
        budget = rows * X.shape[1] * X.dtype.itemsize
        return panels.dask_panels(X, budget, cache, interleaved=True)
    if sp.issparse(X):
        X = X.tocsr()
    bounds = [*range(0, X.shape[0], rows), X.shape[0]]
    return panels.Panels(
        ops=EagerOps(1),
        items=[X[a:b] for a, b in itertools.pairwise(bounds)],
        row_bounds=bounds,
        shape=tuple(X.shape),
        dtype=X.dtype,
        sparse=sp.issparse(X),
    )


def _worker_threads() -> int:
    client = distributed_client()
    if client is None:
        return 1
    return len(panels.thread_slots(client))


def steps_of_epoch(n_batches: int, per_step: int) -> list[list[int]]:
    """The batches of each step of an epoch: ``per_step`` consecutive ones at a time."""
    per_step = max(1, min(per_step, n_batches))
    return [list(range(a, min(a + per_step, n_batches))) for a in range(0, n_batches, per_step)]


def _validated(parts: panels.Panels, whom: str, beta: float):
    """The validation pass: the moments of X and ‖X_b‖² of each batch; bad values rejected."""
    ops = parts.ops
    per_batch = ops.fetch(parts.map(passes.moments_task, [(x,) for x in parts.items], False))
    per_batch = [np.asarray(m) for m in per_batch]
    stats = passes.as_moments(kernels.combine_moments(*per_batch))
    passes.reject_bad_values(stats.n_nonfinite, stats.min, whom)
    if stats.min == 0 and beta <= 0:
        raise ValueError(
            "When beta_loss <= 0 and X contains zeros, the solver may diverge. Please add "
            "small values to X, or use a positive beta_loss."
        )
    return stats, [float(m[kernels.MOMENT_SUMSQ]) for m in per_batch]


# ---- one step ----------------------------------------------------------------------------------


class StepOut(tuple):
    """A step task's output ``(H, A, B, summary)``. While small (``engine.SMALL_H_BYTES``), the
    next step's tasks and the driver take it whole and pick what they use (``part``): a task
    picking each item would cost the scheduler more than moving them."""

    __slots__ = ()


def part(value, index: int):
    """Item ``index`` of a ``StepOut``; any other value is that item itself."""
    return value[index] if isinstance(value, StepOut) else value


def step_update(spec: Online, rho: float, h, A, B, *outputs) -> StepOut:
    """H, A and B after a step, and its summary ``(mean batch cost, relative change of H,
    rows)``, from the batch tasks' outputs (``online.batch_task``), summed in order."""
    h, A, B = part(h, 0), part(A, 1), part(B, 2)
    total = online.add_statistics(*(out[1] for out in outputs))
    new_h, A, B = online.update_h(spec, h, A, B, rho, total)
    norm = np.linalg.norm(new_h)
    change = float(np.linalg.norm(new_h - h) / norm) if norm else 0.0
    return StepOut((new_h, A, B, (online.batch_cost(spec, total, h), change, total[-1])))


def batch_task(spec: Online, fresh_max_iter: int, h, x, wt, norm_x_sq: float):
    """``online.batch_task`` with H as the step before left it (see ``StepOut``)."""
    return online.batch_task(spec, fresh_max_iter, part(h, 0), x, wt, norm_x_sq)


def _first(out):
    return out[0]


@dataclass
class State:
    """The factors between steps, as ``ops`` holds them: Wᵀ per batch, H, A, B; and the
    batches whose Wᵀ a step made since the lineage was last cut (``_detach``)."""

    wt: list
    h: Any
    A: Any
    B: Any
    changed: set = dataclasses.field(default_factory=set)


def run_step(
    parts: panels.Panels, state: State, batches: list[int], spec: Online, rho: float,
    fresh_max_iter: int | None, norms: list[float],
):  # fmt: skip
    """One step on ``batches`` (indices into ``parts``): ``state`` updated in place; returns
    the step's summary as ``ops`` holds it. ``fresh_max_iter``: solve each W_b afresh (from
    its constant start) with at most that many updates instead of updating the kept W_b."""
    ops = parts.ops
    items = [
        (parts.items[b], None if fresh_max_iter else state.wt[b], norms[b]) for b in batches
    ]  # fmt: skip
    workers = None if parts.locations is None else [parts.locations[b] for b in batches]
    outputs = ops.map(batch_task, items, spec, fresh_max_iter or 0, state.h, workers=workers)
    for b, out in zip(batches, outputs, strict=True):
        state.wt[b] = ops.call(_first, out) if ops.is_lazy else out[0]
    state.changed.update(batches)
    new = ops.call(step_update, spec, rho, state.h, state.A, state.B, *outputs)
    if not ops.is_lazy:
        state.h, state.A, state.B, summary = new
        return summary
    # H, A and B: k × n each, at most 8 bytes an entry.
    if ops.is_async and 3 * parts.shape[1] * spec.n_components * 8 <= engine.SMALL_H_BYTES:
        state.h = state.A = state.B = new  # see ``StepOut``
        return new
    state.h, state.A, state.B, summary = (ops.item(new, i) for i in range(4))
    if not ops.is_async:  # dask.delayed: run the step now, keep its results
        persisted = ops.persist(*(state.wt[b] for b in batches), state.h, state.A, state.B)
        for b, value in zip(batches, persisted, strict=False):
            state.wt[b] = value
        state.h, state.A, state.B = persisted[len(batches) :]
    return summary


def _detach(parts: panels.Panels, state: State) -> None:
    """Cuts the lineage of H, A, B and of the Wᵀ that steps made since the last cut (the
    others have none left: a task per batch of an epoch, each time, cost the scheduler a
    quarter to a third of a second on 123 batches)."""
    ops = parts.ops
    if not ops.is_async:
        return
    changed = sorted(state.changed)
    values = ops.detach([*(state.wt[b] for b in changed), *_factors(ops, state)])
    for b, value in zip(changed, values[: len(changed)], strict=True):
        state.wt[b] = value
    state.h, state.A, state.B = values[-3:]
    state.changed.clear()


def _factors(ops, state: State) -> list:
    """H, A and B of ``state`` as ``ops`` holds arrays (see ``StepOut``)."""
    if state.h is state.A is state.B:
        return [ops.call(part, state.h, i) for i in range(3)]
    return [state.h, state.A, state.B]


# ---- the fit -----------------------------------------------------------------------------------


def fit(X, schedule: Schedule) -> Fitted:
    """Fit ``schedule`` to X (validated: numpy, scipy.sparse or a floating Dask array)."""
    rows = min(schedule.batch_size, X.shape[0])
    parts = batch_panels(X, rows, schedule.cache)
    try:
        with single_blas_thread():
            return _fit(parts, schedule)
    finally:
        parts.close()


def _per_step(parts: panels.Panels, parallel_batches: int | None) -> int:
    if parallel_batches is not None:
        return parallel_batches
    return _worker_threads() if parts.ops.is_async else 1


def _fit(parts: panels.Panels, schedule: Schedule) -> Fitted:
    spec = schedule.online
    n_samples, n_features = parts.shape
    k = spec.n_components
    stats, norms = _validated(parts, "MiniBatchNMF (input X)", spec.beta)
    panels.cache_if_small(parts, stats.nnz, schedule.cache)
    ops = parts.ops
    epoch = steps_of_epoch(len(parts.items), _per_step(parts, schedule.parallel_batches))
    step_rows = min(len(epoch[0]) * max(parts.row_sizes), n_samples)
    rho = schedule.forget_factor ** (step_rows / n_samples)
    fresh = schedule.fresh_restarts_max_iter if schedule.fresh_restarts else None
    total_steps = schedule.max_iter * len(epoch)
    ckpt = _checkpoint(parts, schedule, stats, len(epoch[0]))

    def starting(from_checkpoint: bool) -> tuple:
        """(state, steps done, stopping rule) from the newest checkpoint or the start."""
        converged = Convergence(spec.tol, schedule.max_no_improvement, n_samples, schedule.verbose)
        if from_checkpoint:
            saved = ckpt.load(parts)
            converged.restore(saved.history)
            return State(saved.wt, *saved.h), saved.n_iter, converged
        wt, h = init.initialize(
            parts, schedule.init, k, [0, n_features], stats.mean, schedule.random_state,
            schedule.W, schedule.H,
        )  # fmt: skip
        h = h[0]
        return State(list(wt), h, ops.call(np.array, h), ops.call(np.ones_like, h)), 0, converged

    point = {"start": starting(schedule.resume)}
    logger.info(
        "MiniBatchNMF fit: X %dx%d %s%s in %d batches, %d per step, %d components, beta %g%s",
        n_samples, n_features, parts.dtype, " sparse" if parts.sparse else "",
        len(parts.items), len(epoch[0]), k, spec.beta,
        f", resumed after step {point['start'][1]}" if schedule.resume else "",
    )  # fmt: skip

    def attempt() -> tuple:
        state, start, converged = point.pop("start")
        ahead: collections.deque = collections.deque()  # (summary, batches, state after)

        def submit(step: int) -> None:
            batches = epoch[(step - 1) % len(epoch)]
            summary = run_step(parts, state, batches, spec, rho, fresh, norms)
            ahead.append((summary, len(batches), State(list(state.wt), state.h, state.A, state.B)))

        step, after = start, state
        if start < total_steps:
            submit(start + 1)
        for step in range(start + 1, total_steps + 1):
            # On a cluster the next step is submitted before this one's summary is read, so
            # that the workers never wait for this process; dropped if the rule says stop.
            if ops.is_async and step < total_steps:
                submit(step + 1)
            summary, n_batches, after = ahead.popleft()
            converged.n_batches += n_batches
            if converged(step, total_steps, *part(ops.fetch(summary), 3)):
                break
            if ckpt is not None and ckpt.due(step):
                h_blocks = _factors(ops, after)
                ckpt.save(parts, step, parts.bundle(after.wt), h_blocks, converged, None)
            if step % LINEAGE_EVERY == 0 and step < total_steps:
                _detach(parts, state)  # the newest steps' state
            if not ops.is_async and step < total_steps:
                submit(step + 1)
        ahead.clear()  # a step submitted ahead, if any: releasing it cancels it
        state = after
        h, A, B = _factors(ops, state)
        if schedule.fresh_restarts:
            state.wt = _solve_all(parts, spec, h, schedule.transform_max_iter)
        items = [(x, w) for x, w in zip(parts.items, state.wt, strict=True)]
        final = parts.map(online.final_divergence, items, spec.beta, h)
        return state, step, converged, sum(ops.fetch(final)), ops.fetch([h, A, B])

    def restart(from_checkpoint: bool) -> int:
        panels.relocate(parts)
        point["start"] = starting(from_checkpoint)
        return point["start"][1]

    state, step, converged, value, (components, A, B) = recovering(
        attempt,
        restart,
        ckpt,
        None,
        lambda error: panels.workers_keep_dying(error, panels.panel_task_memory(parts, k)),
    )
    n_batches = converged.n_batches
    n_iter = math.ceil(step / len(epoch))
    return Fitted(
        components=components,
        numerator=A,
        denominator=B,
        W=_assemble(parts, state.wt, k),
        n_iter=n_iter,
        n_steps=n_batches,
        reconstruction_err=float(np.sqrt(2 * max(value, 0.0))),
        rho=float(rho),
        layout={"scheme": "rows", "panels": len(parts.items), "cached": _cached(parts)},
    )


def _checkpoint(parts: panels.Panels, schedule: Schedule, stats, per_step: int):
    """The fit's ``Checkpoint`` (None without one), with the fingerprint of what the steps
    depend on: the loss and penalties, the start, the batches and the input."""
    if schedule.checkpoint is None:
        return None
    spec = dataclasses.asdict(schedule.online)
    if not schedule.fresh_restarts:
        spec.pop("tol")  # then only the stopping rule uses it
    seed = schedule.random_state
    fingerprint = {
        **{f"settings.{key}": value for key, value in spec.items()},
        "settings.init": schedule.init,
        "settings.random_state": seed if seed is None or _is_int(seed) else type(seed).__name__,
        "settings.batches": list(map(int, parts.row_bounds)),
        "settings.per_step": per_step,
        "settings.forget_factor": schedule.forget_factor,
        "settings.fresh_restarts": schedule.fresh_restarts,
        "settings.fresh_restarts_max_iter": schedule.fresh_restarts_max_iter,
        **{f"input.{key}": value for key, value in dataclasses.asdict(stats).items()},
        "input.shape": list(parts.shape),
        "input.dtype": str(parts.dtype),
        "input.sparse": bool(parts.sparse),
    }
    ckpt = Checkpoint(
        schedule.checkpoint, schedule.checkpoint_every, fingerprint, schedule.storage_options
    )
    if parts.ops.is_async:  # the workers write W's blocks there
        ckpt.probe(parts.ops.client)
    return ckpt


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _cached(parts: panels.Panels) -> bool:
    return bool(parts.cached or not parts.ops.is_lazy)


def _solve_all(parts: panels.Panels, spec: Online, h, max_iter: int) -> list:
    """W of every batch solved afresh for H (the end of a fit with fresh restarts). In memory
    as one problem over all rows (scikit-learn's ``_solve_W(X, H)``), else per batch."""
    if not parts.ops.is_lazy:
        X = _whole(parts.items)
        wt = online.solve_w(spec, h, max_iter, X)
        return [wt[:, a:b] for a, b in itertools.pairwise(parts.row_bounds)]
    return parts.map(online.solve_w, [(x,) for x in parts.items], spec, h, max_iter)


def _whole(items: list):
    if len(items) == 1:
        return items[0]
    return sp.vstack(items, format="csr") if sp.issparse(items[0]) else np.concatenate(items)


def _transposed(wt):
    return np.ascontiguousarray(np.asarray(wt).T)


def _assemble(parts: panels.Panels, wt: list, k: int):
    """W (m, k) from the blocks of Wᵀ: numpy in memory, a Dask array otherwise."""
    if not parts.ops.is_lazy:
        return _transposed(np.concatenate(wt, axis=1) if len(wt) > 1 else wt[0])
    return da.concatenate(
        [
            da.from_delayed(dask.delayed(_transposed)(b), shape=(rows, k), dtype=parts.dtype)
            for b, rows in zip(wt, parts.row_sizes, strict=True)
        ]
    )


# ---- partial_fit and transform --------------------------------------------------------------


@dataclass
class Model:
    """What ``partial_fit`` and ``update`` carry from one call to the next."""

    components: np.ndarray
    numerator: np.ndarray
    denominator: np.ndarray
    rho: float


@dataclass(frozen=True)
class Start:
    """How ``partial_fit`` initializes a model that has none yet (scikit-learn: from the first
    X given, H by ``init`` and A = H, B = 1, ρ = forget_factor^(min(batch_size, m)/m))."""

    init: str
    batch_size: int
    forget_factor: float
    random_state: Any = None
    W: Any = None
    H: Any = None


def _started(parts: panels.Panels, spec: Online, start: Start, mean: float) -> Model:
    _, h = init.initialize(
        parts, start.init, spec.n_components, [0, parts.shape[1]], mean, start.random_state,
        start.W, start.H,
    )  # fmt: skip
    h = np.asarray(parts.ops.fetch(h[0]))
    n_samples = parts.shape[0]
    rho = start.forget_factor ** (min(start.batch_size, n_samples) / n_samples)
    return Model(h, h.copy(), np.ones_like(h), float(rho))


def partial_fit(
    X, spec: Online, fresh_max_iter: int, panel_bytes: int, model: Model | None, start: Start
) -> Model:
    """One step of the whole of X (scikit-learn's ``partial_fit``): W of its rows solved afresh
    for the current H (at most ``fresh_max_iter`` updates), then H from their statistics.
    ``model`` is what the previous call left (None: start one from X, see ``Start``). In
    memory X is one batch, as in scikit-learn; a Dask array is read in row panels of
    ``panel_bytes`` whose statistics are summed, which is the same step. Nothing of
    ``model`` is modified: the updated model is returned."""
    if isinstance(X, da.Array):
        parts = panels.dask_panels(X, panel_bytes, cache=False)
    else:
        parts = batch_panels(X, max(1, X.shape[0]))
    try:
        with single_blas_thread():
            stats, norms = _validated(parts, "MiniBatchNMF (input X)", spec.beta)
            if model is None:
                model = _started(parts, spec, start, stats.mean)
            ops = parts.ops
            state = State(
                [None] * len(parts.items),
                ops.share(model.components),
                ops.share(model.numerator),
                ops.share(model.denominator),
            )
            batches = list(range(len(parts.items)))
            run_step(parts, state, batches, spec, model.rho, fresh_max_iter, norms)
            h, A, B = ops.fetch(_factors(ops, state))
    finally:
        parts.close()
    return Model(np.asarray(h), np.asarray(A), np.asarray(B), model.rho)


def transform(X, spec: Online, h: np.ndarray, max_iter: int, panel_bytes: int):
    """W for X under the fixed H (scikit-learn's ``_solve_W``): numpy in memory (one problem
    over all rows, as scikit-learn), a lazy Dask array for Dask X (one problem per row panel,
    each read once when computed)."""
    if not isinstance(X, da.Array):
        with single_blas_thread():
            return _transposed(online.solve_w(spec, h, max_iter, X))
    return pipeline.map_rows(
        X, panel_bytes, online.solve_w_rows, spec, h, max_iter, k=spec.n_components
    )
