"""The shard tasks of an iteration, and folding each H update into the next iteration's.

An iteration on a cluster is one task per shard of row panels, then the H task that sums the
shards' nodes and updates H, then the next shard tasks: two hops through the scheduler on the
critical path (the last shard done → the H task running → the next shards running: 5–14 ms
each, measured, against 45–75 ms of shard work). When H is one small block (``engine.small_h``),
the shards' outputs go whole to the H task (``engine.small_states``) and the shards are few
(``MAX_SHARDS``), ``Fold`` drops the H task: each shard task of iteration t + 1 first forms
H(t) itself from all the shards' outputs of iteration t (``h_update``: the levels of the
reduction tree above the shards and the H task's function, on the same values in the same
order, so the same bits on every worker and as in memory), then its W update, and returns
H(t) with its ``ShardOut`` (``ShardOut.h``). One hop per iteration. The driver reads iteration
t's summary from shard 0's output of iteration t + 1 (``h_of``: a small task off the critical
path), so it keeps two iterations in flight; the H of the iteration a fit stops at, cuts its
lineage at or runs out of iterations at is formed by an H task of its own (``Fold.close``).
"""

from __future__ import annotations

from dasknmf import steps
from dasknmf.ops import EagerOps, continue_tree
from dasknmf.panels import Panels


def shard_tasks(panels: Panels, objective, wt: list, h: list, col_bounds, order, momentum):
    """One iteration's shard tasks (``steps.shard_step`` or, with ``momentum``,
    ``steps.extrapolated_shard_step``) from the shards' states ``wt`` and the H blocks ``h``
    (see ``engine.iterate``). ``objective`` and ``col_bounds`` may be ``ops.share``d."""
    if momentum is None:
        items, step, extra = [(state,) for state in wt], steps.shard_step, ()
    else:
        wt_plain, h_previous, control = momentum
        items = list(zip(wt, wt_plain, strict=True))
        step, extra = steps.extrapolated_shard_step, (h_previous, control)
    return panels.shard_map(step, items, objective, order, col_bounds, panels.tree, h, *extra)


#: At most this many shards fold their H updates: each shard task takes every other shard's
#: whole output (at most ``engine.SMALL_STATE_BYTES`` of W each), S·(S − 1) moves per iteration.
MAX_SHARDS = 4


def applies(panels: Panels, whole: bool, fetch_h: bool) -> bool:
    """Whether a fit on ``panels`` folds its H updates into its shard tasks: on a cluster,
    with the shards' outputs moved whole, H one small block and few shards."""
    few = len(panels.shard_ranges) <= MAX_SHARDS
    return panels.ops.is_async and whole and fetch_h and few


def h_update(objective, order, tree, norm_x_sq, h, h_previous, control, *outs):
    """H(t) from the shards' outputs ``outs`` of iteration t: what the H task of
    ``engine.iterate`` computes (``steps.h_step``, or ``steps.extrapolated_whole_h_step``
    with the next control as its last item), after the levels of the reduction tree above the
    shards that ``engine.iterate`` runs as tasks (``ops.continue_tree``; ``tree``: the shards'
    numbers of nodes and the fan-in), run here in the same order. ``h``, ``h_previous`` and
    ``control`` are those iteration t started from; ``h`` None: carried in the outputs
    (``ShardOut.h``)."""
    h, h_previous, control = _started_from(h, h_previous, control, outs)
    counts, split_every = tree
    sums, picks = continue_tree(EagerOps(), list(outs), counts, 0, split_every)
    if objective.extrapolate:
        return steps.extrapolated_whole_h_step(
            objective, order, picks, h, h_previous, control, norm_x_sq, *sums
        )
    return steps.h_step(objective, order, 0, picks, h, *sums)


def _started_from(h, h_previous, control, outs) -> tuple:
    """(H, H before, control) that iteration t started from: as given, or, ``h`` None, as
    carried in its shards' outputs ``outs`` (``ShardOut.h``; the control is the last item of
    H(t − 1)'s output)."""
    if h is None:
        h, h_previous = outs[0].h
        control = h
    return h, h_previous, control


def folded_shard_step(
    objective, orders, col_bounds, tree, nodes, norm_x_sq, h, h_previous, control, count, own,
    *outs_and_data,
):  # fmt: skip
    """The task of shard ``own`` in iteration t + 1: H(t) from the ``count`` shard outputs of
    iteration t (``h_update``; ``nodes``: its ``tree``), then the shard's update from its own
    output of iteration t and its panels (the rest of the arguments). ``orders``: H(t)'s order
    of components, then W(t + 1)'s. Returns the ``ShardOut`` with ``h`` = (H(t)'s output,
    H(t − 1) with extrapolation): what the next iteration's ``h_update`` starts from."""
    outs, data = outs_and_data[:count], outs_and_data[count:]
    order_h, order_w = orders
    h, h_previous, control = _started_from(h, h_previous, control, outs)
    h_out = h_update(objective, order_h, nodes, norm_x_sq, h, h_previous, control, *outs)
    state = outs[own]
    if not objective.extrapolate:
        out = steps.shard_step(objective, order_w, col_bounds, tree, [h_out], state, *data)
        return out._replace(h=(h_out, None))
    out = steps.extrapolated_shard_step(
        objective, order_w, col_bounds, tree, [h_out], [h], h_out, state, state, *data
    )
    return out._replace(h=(h_out, steps.h_array(h)))  # H(t) and H(t - 1)


def h_of(out):
    """The output of the H update that a folded shard task ran (``folded_shard_step``)."""
    return out.h[0]


class Fold:
    """The iterations of a fit whose H updates run in the next iteration's shard tasks.

    ``step`` submits an iteration and returns the entry ``(wt, h, summary, momentum)`` of the
    one before it (as ``engine.iterate`` returns them) once that one's H is known; ``close``
    forms the newest iteration's H by a task of its own and returns its entry."""

    def __init__(self, panels: Panels, objective, shared, norm_x_sq, counts: list[int]):
        self.panels, self.objective, self.shared = panels, objective, shared
        # the shards' numbers of nodes and the fan-in (``h_update``)
        self.norm_x_sq, self.tree = norm_x_sq, (tuple(counts), panels.split_every)
        # The newest iteration, whose H is not formed yet: (its shard outputs, its order of
        # H's components, what it started from (H, H before, control: None when carried),
        # its H blocks before)
        self._pending = None

    @property
    def is_open(self) -> bool:
        """Whether an iteration was submitted whose H is not formed yet."""
        return self._pending is not None

    def drop(self) -> None:
        """Forget the newest iteration (submitted ahead: the fit stopped before it)."""
        self._pending = None

    def step(self, latest: tuple, orders: tuple):
        ops, (objective, col_bounds) = self.panels.ops, self.shared
        order_w, order_h = orders
        if self._pending is None:  # from ``latest`` (the start, or factors detached)
            wt, h, momentum = latest
            outs = shard_tasks(self.panels, objective, wt, h, col_bounds, order_w, momentum)
            source = (h[0], None, None) if momentum is None else (h[0], momentum[1][0], momentum[2])
            self._pending = (outs, order_h, source, h)
            return None
        outs, before_order, source, h_before = self._pending
        new = self.panels.shard_map(
            folded_shard_step,
            [(own, *outs) for own in range(len(outs))],
            *(objective, (before_order, order_w), col_bounds, self.panels.tree, self.tree),
            *(self.norm_x_sq, *source, len(outs)),
        )
        h_t = ops.call(h_of, new[0])
        self._pending = (new, order_h, (None, None, None), [h_t])
        return self._entry(outs, h_t, h_before)

    def close(self) -> tuple:
        outs, order_h, source, h_before = self._pending
        h_t = self.panels.ops.call(
            h_update, self.shared[0], order_h, self.tree, self.norm_x_sq, *source, *outs
        )
        self._pending = None
        return self._entry(outs, h_t, h_before)

    def _entry(self, outs: list, h_t, h_before: list) -> tuple:
        momentum = (outs, h_before, h_t) if self.objective.extrapolate else None
        return outs, [h_t], h_t, momentum
