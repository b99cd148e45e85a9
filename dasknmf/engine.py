"""One NMF iteration as a graph over the row panels of X, and the driver that runs it.

Per iteration every row panel X_i is read once, by one task (``steps.panel_step``) that

1. forms C_i = H·X_iᵀ with the current H,
2. updates its block of W from (C_i, H·Hᵀ) — several inner sweeps cost no further read of X,
3. emits the partials of the H update, A_i = W_iᵀ·X_i (split by the column blocks of H) and
   B_i = W_iᵀ·W_i, and scalar statistics of the objective.

A and B are summed by fixed-order trees; each column block H_j is then updated by its own task
(``steps.h_step``). Only k×k matrices and scalars return to the driver. Other β-divergences
follow the same scheme with the partials of their multiplicative updates.

The iteration is written once, against the small ``Ops`` interface (``dasknmf.ops``): at once
on in-memory panels, or as Dask tasks, after which the driver persists W and H so that the graph
does not grow. The panels themselves come from ``dasknmf.panels``.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dasknmf import fold as folding
from dasknmf import kernels, passes, shards, stacked, steps
from dasknmf.detached import StateLostError
from dasknmf.history import Best, History
from dasknmf.objective import OverflowedError
from dasknmf.ops import EagerOps, continue_tree, tree_reduce
from dasknmf.panels import Panels
from dasknmf.passes import Moments, as_moments
from dasknmf.solvers import extrapolation
from dasknmf.steps import Objective

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Executing a phase: eagerly, or as Dask tasks
# --------------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------------


def moments(panels: Panels, masked: bool = False) -> Moments:
    """One pass over X: min, non-finite count, Σx, Σx², nnz — over the observed entries
    only when ``masked`` (their number as the size)."""
    parts = panels.shard_map(passes.shard_moments, [()] * len(panels.shard_ranges), masked)
    return as_moments(_tree_here(panels.ops, parts, kernels.combine_moments))


def _tree_here(ops, parts: list, combine: Callable = shards.sum_in_order):
    """The fixed-order tree over the panels' small results, which shard tasks returned as rows
    (``passes.shard_moments``), run in this process: the same sums as a tree of tasks over
    the panels would make, without a task per panel."""
    rows = [row for part in ops.fetch(parts) for row in part]
    return tree_reduce(EagerOps(), rows, combine)


def check_values(panels: Panels, whom: str = "NMF (input X)", masked: bool = False) -> Moments:
    """Run the validation pass; reject NaN (unless missing), infinity and negative values
    with a clear error."""
    stats = moments(panels, masked)
    passes.reject_bad_values(stats.n_nonfinite, stats.min, whom)
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
    whole: bool = True,
    fetch_h: bool = False,
):
    """Build (or, eagerly, run) one iteration: one task per shard of panels, one per column
    block of H, and the reduction tree between them over the shards' subtrees. Returns the new
    shard states (``steps.ShardOut``), the new column blocks of H (as ``h_step`` outputs, see
    ``h_array``), the summary ``(H·Hᵀ, H stats, B, panel stats)`` and the momentum of the next
    iteration. ``wt`` holds the state of each shard (``steps.shard_blocks``); ``objective``
    and ``col_bounds`` may be ``ops.share``d.

    ``momentum``, for a fit with extrapolation (``solvers.extrapolation``), is ``(plain
    states, the H blocks of the iteration before, control)``; then ``wt`` holds the pushed
    blocks of Wᵀ, and ``norm_x_sq`` is needed for the next control. Without, it is None.
    ``whole``: the shards' outputs go whole to the tasks summing their nodes (``small_states``).
    ``fetch_h``: H is one small block (``small_h``), whose ``h_step`` output the driver fetches
    whole as the summary (``steps.summary_of``) instead of a task forming the summary.

    The critical path is shard_step → h_step (which also runs the last level of its
    reduction) → the next shard_step; the summary is off it. With extrapolation the next
    control is on it: formed by the ``h_step`` itself when H is one block, else one small task.
    A fit on a cluster with H one small block and few shards folds the ``h_step`` into the
    next iteration's shard tasks instead (``fold.Fold``).
    """
    ops = panels.ops
    order_w, order_h = orders
    outs = folding.shard_tasks(panels, objective, wt, h, col_bounds, order_w, momentum)
    if momentum is not None:
        h_step = steps.extrapolated_h_step
        _, h_previous, control = momentum
    else:
        h_step = steps.h_step
    # Small shards go whole to the tasks that sum their nodes (moving a few MiB costs less
    # than a task); else their ``ShardOut.nodes`` are split off where they ran: W stays there.
    nodes = outs if whole else [ops.item(out, 1) for out in outs]
    counts = _node_counts(panels)
    if momentum is not None and len(h) == 1:  # the h_step forms the control too
        containers, picks = continue_tree(ops, nodes, counts, 0, panels.split_every)
        h_outs = [
            ops.call(
                steps.extrapolated_whole_h_step,
                *(objective, order_h, picks, h[0], h_previous[0], control, norm_x_sq),
                *containers,
            )
        ]
        control = h_outs[0]  # its last item (steps.control_of)
    else:
        h_outs = []
        for j, h_j in enumerate(h):
            containers, picks = continue_tree(ops, nodes, counts, j, panels.split_every)
            previous = () if momentum is None else (h_previous[j], control)
            h_outs.append(
                ops.call(h_step, objective, order_h, j, picks, h_j, *previous, *containers)
            )
    if fetch_h:  # one block (``small_h``)
        summary = h_outs[0]
    else:
        summary = tree_reduce(ops, h_outs, steps.h_summary, first=steps.h_summary)
    if momentum is not None and len(h) > 1:
        if len(h_outs) <= panels.split_every:  # the summary is one task: form it in this one
            control = ops.call(steps.control_after, control, objective, norm_x_sq, *h_outs)
        else:
            control = ops.call(steps.advance_control, control, objective, norm_x_sq, summary)
    if momentum is not None:
        momentum = (outs, h, control)
    return outs, h_outs, summary, momentum


#: Shards whose W blocks (pushed and plain) take at most this many bytes, in at most this many
#: arrays (a block per panel, or per stacked group), go whole to the tasks that sum their nodes:
#: on loopback a task hop costs more than moving a few MiB, but each array is a frame of its
#: own (a shard of 5,000 tiny blocks took 130 ms to move).
SMALL_STATE_BYTES = 4 * 2**20
SMALL_STATE_BLOCKS = 64


def small_states(panels: Panels, objective: Objective) -> bool:
    if not panels.ops.is_lazy:
        return True
    rows = max(panels.row_bounds[b] - panels.row_bounds[a] for a, b in panels.shard_ranges)
    blocks = max(math.ceil((b - a) / panels.stacked) for a, b in panels.shard_ranges)
    copies = 2 if objective.extrapolate else 1
    return (
        copies * rows * objective.n_components * panels.dtype.itemsize <= SMALL_STATE_BYTES
        and copies * blocks <= SMALL_STATE_BLOCKS
    )


#: An H held in one block of at most this many bytes: the driver fetches its ``h_step`` output
#: whole as the iteration's summary, which saves the task that would form the summary.
SMALL_H_BYTES = 2**20


def small_h(objective: Objective, col_bounds: list[int], dtype) -> bool:
    width = col_bounds[-1] - col_bounds[0]
    size = objective.n_components * width * np.dtype(dtype).itemsize
    return len(col_bounds) == 2 and size <= SMALL_H_BYTES


def _node_counts(panels: Panels) -> list[int]:
    """How many nodes of the reduction tree each shard returns."""
    group = panels.split_every**panels.level
    return [math.ceil((b - a) / group) for a, b in panels.shard_ranges]


def _lost_data_errors() -> tuple[type[BaseException], ...]:
    from concurrent.futures import CancelledError

    from distributed.scheduler import KilledWorker

    # FutureCancelledError is a CancelledError; StateLostError: detached factors lost
    return (CancelledError, KilledWorker, StateLostError)


#: What a fit on a cluster raises when a worker died with results nothing can recompute.
LOST_DATA = _lost_data_errors()
#: What distributed raises for a task whose every worker died while running it.
KILLED_WORKER = LOST_DATA[1]


@dataclass
class FitResult:
    wt: list
    h: list
    n_iter: int
    history: History
    h_stats: np.ndarray | None = None  # the H stats of iteration n_iter (``steps.H_*``)
    # D of each stacked fit at the end (``Objective.ranks``), from ``final_pass``
    replicate_values: list = field(default_factory=list)


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
    kept: tuple | None = None,
) -> FitResult:
    """Alternate W and H updates until the solver's stopping rule or ``max_iter``.

    ``wt`` (blocks of Wᵀ per row panel) and ``h`` (column blocks of H, split at ``col_bounds``)
    are the initialization, as ``panels.ops`` holds them; the result holds W as one state per
    shard (``steps.shard_blocks``). After each iteration the new blocks
    are persisted and only the k×k summary comes back to this process. On a distributed
    cluster the next iteration is submitted before the summary is read (the next two when the
    H updates are folded into the shard tasks, ``fold``), so the cluster never waits for this
    process; if the rule then says stop, those speculative iterations are dropped.

    ``checkpoint`` (a ``dasknmf.checkpoint.Checkpoint``) is written after every
    ``checkpoint.every``-th iteration. A resumed fit passes the checkpoint's factors as ``wt``
    and ``h``, its iteration as ``start`` and its ``history`` (and ``shuffle_rng`` in the
    checkpoint's state): it then computes exactly what the uninterrupted fit would have.

    With ``objective.extrapolate`` the iterates are pushed along their last step
    (``solvers.extrapolation``); a resumed fit then also passes the checkpoint's ``momentum``
    (see ``iterate``), and its ``kept`` best iterate, (iteration, Wᵀ blocks, H blocks), when
    the checkpoint holds one older than itself. An extrapolated fit returns the iterate of the
    lowest objective (``history.Best``); ``n_iter`` and the history count all iterations run.
    """
    ops = panels.ops
    wt = panels.bundle(wt)  # one state per shard from here on
    if objective.extrapolate and momentum is None:
        momentum = (list(wt), list(h), first_control(panels, objective, wt, h))
    elif momentum is not None:
        momentum = (panels.bundle(momentum[0]), *momentum[1:])
    k = objective.n_components
    in_flight: collections.deque = collections.deque()
    latest = (wt, h, momentum)
    shared = ops.share(objective), ops.share(col_bounds)
    whole = small_states(panels, objective)
    fetch_h = small_h(objective, col_bounds, panels.dtype)
    fold, speculate = None, stacked.speculates(objective, tol)
    if folding.applies(panels, whole, fetch_h) and speculate:
        fold = folding.Fold(panels, objective, shared, norm_x_sq, _node_counts(panels))

    # The shuffling generator's state before each submitted iteration's draws: a checkpoint
    # after iteration t keeps the state for t + 1, whether or not t + 1 is already in flight.
    rng_before: dict[int, tuple] = {}
    next_iter = start + 1  # the iteration that submit() builds

    def submit() -> None:
        nonlocal latest, next_iter
        if ops.is_async and next_iter > start + 1 and (next_iter - 1) % LINEAGE_EVERY == 0:
            if fold is not None and fold.is_open:
                close()
            latest = cut_lineage(ops, *latest)[:3]
        orders = (None, None)
        if shuffle_rng is not None:
            rng_before[next_iter] = shuffle_rng.get_state()
            orders = (shuffle_rng.permutation(k), shuffle_rng.permutation(k))
        next_iter += 1
        if fold is not None:  # builds next_iter - 1, completes the one before it
            done = fold.step(latest, orders)
            if done is not None:
                in_flight.append(done)
            return
        wt, h, momentum = latest
        step = ops.persist(
            *iterate(
                panels, shared[0], wt, h, shared[1], orders, momentum, norm_x_sq, whole, fetch_h
            )
        )
        latest = (step[0], step[1], step[3])
        in_flight.append(step)

    def close() -> None:
        """The newest iteration's H by a task of its own (``fold.Fold.close``)."""
        nonlocal latest
        done = fold.close()
        in_flight.append(done)
        latest = (done[0], done[1], done[3])

    history = history if history is not None else History()
    # The factors of the last two iterations. Those of ``start`` are arrays; later H blocks
    # are whole ``h_step`` output tuples (see ``steps.h_array``).
    recent: dict[int, tuple] = {start: (wt, h, momentum, None)}
    n_iter, stop = start, 0
    # The best iterate, kept once a newer one is recorded (``history.Best``); a resumed fit's
    # checkpoint may hold an older one.
    best = Best(bool(objective.extrapolate), start if kept is None else kept[0])
    best.see(history, start)  # a resumed fit: its history so far
    kept = None if kept is None else (panels.bundle(kept[1]), kept[2], None, None)
    # Iterations submitted ahead of the one read: a folded iteration's summary comes with the
    # next one's shard tasks.
    ahead = (1 if fold is None else 2) if speculate else 0
    if start < max_iter:
        submit()
    for n_iter in range(start + 1, max_iter + 1):
        while ops.is_async and next_iter <= min(n_iter + ahead, max_iter):
            submit()
        if not in_flight:  # folded: the last iteration
            close()
        wt, h, summary, momentum = in_flight.popleft()
        summary = steps.summary_of(ops.fetch(summary))
        recent[n_iter] = (wt, h, momentum, summary[1])
        recent.pop(n_iter - 2, None)
        try:
            known = record_summary(history, objective, norm_x_sq, n_iter, summary)
        except OverflowedError as error:
            best.overflowed(error, n_iter)  # raises, or the fit ends at its best iterate
            stop = n_iter - 1  # the best is that one (in ``recent``) or an older, kept one
            break
        if best.see(history, n_iter):  # the best iterate is no longer the newest: keep it
            kept = _kept(ops, recent[n_iter - 1])
        if callback is not None and known:
            callback(known, history)
        rule = extrapolation if objective.extrapolate else objective.rule
        if tol > 0 and known and stacked.stopped(objective, rule, known, tol, history.as_dict()):
            stop = known
            break
        if checkpoint is not None and checkpoint.due(n_iter):
            state = None
            if shuffle_rng is not None:
                state = rng_before.get(n_iter + 1) or shuffle_rng.get_state()
            checkpoint.save(
                panels, n_iter, wt, h, history, state, momentum, best.older(n_iter, kept)
            )
        rng_before.pop(n_iter, None)
        if not ops.is_async and n_iter < max_iter:
            submit()
    in_flight.clear()  # a speculative iteration, if any: releasing it cancels it
    if fold is not None:
        fold.drop()
    n_iter = stop or n_iter
    returned = best.returned(n_iter)
    wt, h, _, h_stats = recent[n_iter] if returned == n_iter else kept
    if not ops.is_lazy:
        h = [steps.h_array(b) for b in h]
    else:  # h_step output tuples, or arrays (from the start, or detached)
        h = [ops.call(steps.h_array, b) for b in h]
    return FitResult(wt=list(wt), h=h, n_iter=n_iter, history=history, h_stats=h_stats)


def _kept(ops, iterate: tuple) -> tuple:
    """An iterate (an entry of ``fit``'s ``recent``) reduced to what its result needs: the
    shards' W blocks (``shards.resumable``) and H's arrays, so that keeping it past the next
    iterations holds no sums of theirs."""
    wt, h, _, h_stats = iterate
    return (
        [ops.call(shards.resumable, s) for s in wt],
        [ops.call(steps.h_array, b) for b in h],
        None,
        h_stats,
    )


#: A fit on a distributed cluster cuts the lineage of its factors after every this many
#: iterations (``cut_lineage``), so that what the scheduler holds does not grow with iterations.
LINEAGE_EVERY = 20


def cut_lineage(ops, wt: list, h: list, momentum, summary=None):
    """The factors an iteration starts from, without the lineage that leads to them: the
    shards' (bands') states put aside and taken back on their workers (``FutureOps.detach``),
    the small H blocks, extrapolation control and ``summary`` (2-D blocks) through this
    process. Waits for them. Returns ``(wt, h, momentum, summary)``."""
    states = [ops.call(shards.resumable, state) for state in wt]
    small = ops.fetch([[ops.call(steps.h_array, b) for b in h], summary, momentum and momentum[1:]])
    wt = ops.detach(states)
    h = [ops.share(b) for b in small[0]]
    summary = None if small[1] is None else ops.share(small[1])
    if momentum is not None:  # the plain blocks are in the same states (see ``iterate``)
        h_previous, control = small[2]
        momentum = (wt, [ops.share(b) for b in h_previous], ops.share(steps.control_of(control)))
    return wt, h, momentum, summary


def first_control(panels: Panels, objective: Objective, wt: list, h: list):
    """The extrapolation control of the first iteration: it balances the components of the
    initialization (see ``solvers.extrapolation``), so that the first violation, the
    reference of the stopping rule, is measured at the scales of the later ones. ``wt``: the
    state of each shard (band of a ``Grid``)."""
    if objective.has_penalties:
        return extrapolation.Control()
    ops = panels.ops
    sq_w = _tree_here(ops, panels.shard_map(steps.shard_sq_norms, [(s,) for s in wt], data=False))
    sq_h = tree_reduce(ops, ops.map(steps.component_sq_norms, [(b,) for b in h]))
    scale = extrapolation.balance(sq_w, ops.fetch(sq_h))
    return extrapolation.Control(scale=scale, scale_older=scale)


def record_summary(
    history: History, objective: Objective, norm_x_sq: float, n_iter: int, summary
) -> int:
    """Record what iteration ``n_iter``'s summary tells; return the last iteration whose
    objective is now known (0: only the initialization's).

    For Frobenius the Gram identity gives the objective at the end of the iteration. For
    another β-divergence, or the masked loss, only the panel tasks see W·H, with the factors
    they start from, so the objective of iteration t is known when iteration t + 1 has run
    (the last one's comes from ``final_pass``).
    """
    _, h_stats, _, panel_stats = summary
    old_sums = (
        panel_stats[steps.P_SUM_W_OLD],
        panel_stats[steps.P_SQ_W_OLD],
        h_stats[steps.H_SUM_H_OLD],
        h_stats[steps.H_SQ_H_OLD],
    )
    if not objective.frobenius or objective.masked:
        history.record(objective, panel_stats[steps.P_DIV_OLD], *old_sums)
        if objective.masked and objective.solver == "hals":  # this iteration's violations
            violation = panel_stats[steps.P_VIOLATION] + h_stats[steps.H_VIOLATION]
            history.violation.append(float(violation))
        return n_iter - 1
    if n_iter == 1:
        cross, wgw = panel_stats[steps.P_CROSS_OLD], panel_stats[steps.P_WGW_OLD]
        history.record(objective, 0.5 * (norm_x_sq - 2 * cross + wgw), *old_sums)
    terms = steps.frobenius_terms(norm_x_sq, summary)
    if objective.stacked:
        stacked.record(history.fits, objective, norm_x_sq, n_iter, summary)
        if objective.frozen:  # whose products were not formed: their errors where they stopped
            terms = (stacked.half_sq_error(history.fits), *terms[1:])
    history.record(objective, *terms)
    history.violation.append(float(panel_stats[steps.P_VIOLATION] + h_stats[steps.H_VIOLATION]))
    return n_iter


def final_pass(panels: Panels, objective: Objective, result: FitResult) -> tuple[float, list]:
    """One more pass over X for the exact D_β(X | WH) of the result (the Gram identity of the
    iterations loses digits when the residual is small against ‖X‖). Completes the history when
    its last entry was not known yet. Returns (D_β, the column blocks of H as numpy)."""
    ops = panels.ops
    h_full = ops.call(steps.full_width, result.h) if len(result.h) > 1 else result.h[0]
    nodes = panels.shard_map(
        passes.shard_final_stats,
        [(state,) for state in result.wt],
        objective,
        panels.tree,
        h_full,
    )
    containers, picks = continue_tree(
        ops, nodes, _node_counts(panels), None, panels.split_every, root=True
    )
    total = ops.call(shards.combine_picked, None, picks, *containers)
    value, sum_w, sq_w, *result.replicate_values = ops.fetch(total)
    h_blocks = ops.fetch(result.h)
    complete_history(objective, result, value, sum_w, sq_w, h_blocks)
    return float(value), h_blocks


def complete_history(objective: Objective, result: FitResult, value, sum_w, sq_w, h_blocks):
    """Record the final pass's objective when the history lacks the last iteration's (a
    β-divergence's or the masked loss's, known one iteration late: see ``record_summary``)."""
    if len(result.history.loss) == result.n_iter:
        sum_h = sum(float(b.sum(dtype=np.float64)) for b in h_blocks)
        sq_h = sum(steps.dot64(b, b) for b in h_blocks)
        if objective.masked and result.h_stats is not None:
            # Weighted by the columns' counts, which only the H tasks know. (None: a fit
            # resumed at its max_iter ran no iteration; its H penalty is then unweighted.)
            sum_h, sq_h = result.h_stats[steps.H_SUM_H], result.h_stats[steps.H_SQ_H]
        result.history.record(objective, value, sum_w, sq_w, sum_h, sq_h)
