"""The tasks of an iteration — per row panel and per column block of H — as plain functions of
arrays: kernels and update rules put together, no Dask. ``engine`` runs them eagerly or as
Dask tasks.

One row panel X_i is read once per iteration, by ``_panel_step``: it updates W_i from H and
emits the partials of the H update. A task (``shard_step``) runs it on a run of consecutive
panels, a shard, and sums their partials into subtrees of the fixed reduction tree; ``h_step``
sums the last level of those partials and updates one column block of H. For the Frobenius
loss the partials are A_i = W_iᵀ·X_i and B_i = W_iᵀ·W_i; for another β-divergence they are
the numerator W_iᵀ·(X_i ∘ (W_i·H)^(β−2)) and the denominator W_iᵀ·(W_i·H)^(β−1) of the
multiplicative update (for β = 1 only colsum(W_i)).

Factors are component-major: a block of Wᵀ is (k, m_i), a column block of H is (k, n_j).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from dasknmf import divergence, kernels, masked
from dasknmf._blas import pin_worker_blas
from dasknmf.objective import Objective
from dasknmf.shards import (
    ShardOut,
    Subtrees,
    group_blocks,
    group_sizes,
    groups,
    picked,
    shard_blocks,
    shard_panels,
    stacked_rows,
    sum_in_order,
)
from dasknmf.solvers import extrapolation, mu

# Layout of the statistics vector of a panel task ("OLD": at the factors the task started from).
P_CROSS_OLD, P_WGW_OLD, P_SUM_W_OLD, P_SQ_W_OLD, P_SUM_W, P_VIOLATION, P_DIV_OLD = range(7)
# Layout of the statistics vector of an H block task (H_SQ_H: Σ n_j·‖h_j‖² of the new block,
# for the masked loss only).
H_CROSS, H_SUM_H_OLD, H_SQ_H_OLD, H_SUM_H, H_VIOLATION, H_SQ_H = range(6)
# Stacked fits (``Objective.ranks``, R fits) append each fit's own after these: a panel task's
# violation, Σ W∘C and ⟨W·Wᵀ, H·Hᵀ⟩ at the old W; an H block task's violation and Σ A∘H (R
# each). Summed over the panels and blocks like the rest.
P_FITS, H_FITS = 7, 6


# ---- panels and blocks -----------------------------------------------------------------------


class StreamedPanel:
    """A panel of X that the task using it reads from X's source (``source.compute``).

    For X streamed from its source on a distributed cluster. A panel read by a task of its own
    would have the same key in every iteration; with the next iteration submitted before the
    current one ends, the scheduler would then keep every panel in memory from one iteration to
    the next — caching X by accident. Read inside the task, a panel is in memory only while
    its task runs.

    A plain class, not a dataclass: Dask looks inside dataclasses in a task's arguments and
    would compute the source in a task of its own, which is what this class is there to avoid.
    """

    __slots__ = ("source",)

    def __init__(self, source):
        self.source = source  # a dask.delayed object reading the panel

    def read(self):
        return self.source.compute(scheduler="sync")


def panel_data(x):
    """The array of a panel, aligned (see ``kernels.aligned``) and, if sparse, CSR (the
    panel of a transposed CSR matrix is CSC): read now if streamed."""
    if isinstance(x, StreamedPanel):
        x = x.read()
    if sp.issparse(x) and x.format != "csr":
        x = x.tocsr()
    return kernels.aligned(x)


def full_width(h_blocks: Sequence) -> np.ndarray:
    """The column blocks of H (or of another component-major factor) side by side."""
    arrays = [h_array(b) for b in h_blocks]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=1)


def h_array(block) -> np.ndarray:
    """The array of a column block of H, held either as is (from the initialization) or as the
    whole output tuple of its ``h_step``: the next iteration reads the tuple directly, which
    saves a ``getitem`` task — a scheduler round trip — on the critical path."""
    return block[0] if isinstance(block, tuple) else block


def dot64(a: np.ndarray, b: np.ndarray) -> float:
    """⟨a, b⟩ accumulated in float64 (einsum casts in buffered blocks: no float64 copies, 7×
    faster than casting both whole for a float32 block of W)."""
    return float(np.einsum("i,i->", a.ravel(), b.ravel(), dtype=np.float64))


def _split(a: np.ndarray, col_bounds: Sequence[int]) -> list[np.ndarray]:
    return [a[:, start:stop] for start, stop in itertools.pairwise(col_bounds)]


# ---- one iteration ---------------------------------------------------------------------------


def _leaf(out) -> tuple:
    """The partials of the H update in a ``_panel_step`` output, by column block j:
    (B_i or the denominator of block j, stats_i, A_ij)."""
    second, stats, numerators = out[1], out[2], out[3:]
    return tuple(
        (second[j] if isinstance(second, tuple) else second, stats, a)
        for j, a in enumerate(numerators)
    )


def shard_step(objective: Objective, order, col_bounds, tree, h_blocks, state, *data):
    """The one task per shard and iteration: ``_panel_step`` on each of its panels in order,
    or on each group of them stacked (``stacked_panels``).

    ``tree`` is ``(level, split_every, group)``: the shard's panels start at a multiple of
    split_every**level, and it returns the nodes at ``level`` of the tree of H partials
    (``Subtrees``), so that the sums equal those of a tree over all panels (whose leaves are
    the groups of split_every**group panels), wherever the shards run. H·Hᵀ is formed here
    rather than passed in, so that the task depends only on the H blocks of the previous
    iteration. Returns a ``ShardOut``.
    """
    pin_worker_blas()
    h = full_width(h_blocks)
    sums, blocks, sizes = Subtrees(*tree), [], []
    runs = zip(groups(tree, shard_panels(data)), group_blocks(tree, state), strict=True)
    for (xs,), wt in runs:
        x, rows = stacked_panels(xs)
        out = _panel_step(objective, order, col_bounds, h, x, wt)
        blocks.append(out[0])
        sizes.append(tuple(rows))
        sums.add(_leaf(out))
    return ShardOut(tuple(blocks), sums.finish(), sizes=group_sizes(tree, sizes))


def stacked_panels(panels: Sequence) -> tuple:
    """The data of a group of consecutive panels as one panel (read now, if streamed), and
    the panels' numbers of rows."""
    if len(panels) == 1:
        x = panel_data(panels[0])
        return x, [x.shape[0]]
    arrays = [x.read() if isinstance(x, StreamedPanel) else x for x in panels]
    return panel_data(stacked_rows(arrays)), [x.shape[0] for x in arrays]


def extrapolated_shard_step(
    objective: Objective,
    order,
    col_bounds,
    tree,
    h_blocks,
    h_previous,
    control,
    state,
    plain_state,
    *data,
):
    """``shard_step`` with extrapolation (``solvers.extrapolation``).

    ``state`` holds the pushed W_i of the previous iteration, ``plain_state`` its plain W_i
    (both the same ``ShardOut`` after the first iteration); the H blocks
    are plain, ``h_previous`` those one iteration older. Each update starts from the pushed
    W_i (on a restart, from the plain one) and uses the pushed H; the new blocks and the
    partials of the H update are those of the pushed new W_i, and the plain new ones are kept.
    """
    pin_worker_blas()
    control = control_of(control)
    h = pushed_h(full_width(h_blocks), full_width(h_previous), control)
    sums, blocks, plains, sizes = Subtrees(*tree), [], [], []
    runs = zip(
        groups(tree, shard_panels(data)),
        group_blocks(tree, state),
        group_blocks(tree, plain_state, plain=True),
        strict=True,
    )
    for (xs,), w, w_plain in runs:
        x, rows = stacked_panels(xs)
        wt, wt_plain = (extrapolation.rescaled(b, control.scale) for b in (w, w_plain))
        start = wt_plain if control.restart else wt
        out = _panel_step(objective, order, col_bounds, h, x, start, push=(wt_plain, control.beta))
        blocks.append(out[0])
        plains.append(out[-1])
        sizes.append(tuple(rows))
        sums.add(_leaf(out[:-1]))
    return ShardOut(tuple(blocks), sums.finish(), tuple(plains), group_sizes(tree, sizes))


def pushed_h(h: np.ndarray, previous: np.ndarray, control) -> np.ndarray:
    """The H that an extrapolated iteration uses (the plain one on a restart), its components
    rescaled as ``control`` says."""
    h = extrapolation.rescaled(kernels.aligned(h), control.scale, inverse=True)
    if control.restart:
        return h
    previous = extrapolation.rescaled(kernels.aligned(previous), control.scale_older, inverse=True)
    return extrapolation.extrapolate(h, previous, control.beta)


def _panel_step(objective: Objective, order, col_bounds, h, x, wt, push=None):
    x, wt, h = panel_data(x), kernels.aligned(wt), kernels.aligned(h)
    if objective.masked:
        return _panel_step_masked(objective, order, col_bounds, h, x, wt)
    stats = _old_w_stats(wt, len(objective.ranks))
    if not objective.frobenius:
        return _panel_step_divergence(objective, col_bounds, h, x, wt, stats)
    wt = wt.copy()  # updated in place; the input may be a block that other tasks still read
    cross = objective.live_product(kernels.dot_h, x, h)
    wt = _w_update(objective, order, objective.gram(h), cross, wt, stats)
    if push is not None:
        plain = wt
        wt = extrapolation.extrapolate(plain, kernels.aligned(push[0]), push[1])
    stats[P_SUM_W] = wt.sum(dtype=np.float64)
    partials = _split(objective.live_product(kernels.dot_w, x, wt), col_bounds)
    out = (wt, objective.gram(wt), stats, *partials)
    return out if push is None else (*out, plain)


def _panel_step_masked(objective: Objective, order, col_bounds, h, x, wt):
    """``_panel_step`` for the masked loss: the rows of W_i by their own least squares over
    their observed entries (or, with 'mu', multiplicative updates of any β over them); the
    partials of H's column problems per column block j, as ((packed Σ w·wᵀ, counts), stats,
    A_ij), or ((denominator, counts), stats, numerator) (see ``masked``)."""
    values, pattern = masked.observed(x)
    penalties = dict(l1=objective.l1_w, l2=objective.l2_w, n_sweeps=objective.sweeps_w)
    if objective.solver == "mu":  # multiplicative updates, any β
        wt, terms = masked.mu_rows(values, pattern, h, wt, beta=objective.beta, **penalties)
    else:  # alternating least squares
        wt, terms = masked.update_rows(values, pattern, h, wt, order=order, **penalties)
    stats = _masked_stats(terms, wt, masked.counts(pattern, axis=1))
    if objective.solver == "mu":
        seconds, numerators = masked.mu_column_partials(
            values, pattern, wt, h, objective.beta, col_bounds
        )
        return (wt, seconds, stats, *numerators)
    partials = masked.column_partials(values, pattern, wt, col_bounds)
    return (wt, partials, stats, *_split(kernels.dot_w(values, wt), col_bounds))


def _masked_stats(terms: dict, wt, n_rows) -> np.ndarray:
    """``P_*`` statistics of a masked W update from its ``terms`` and the new W_i."""
    stats = np.zeros(7)
    stats[P_DIV_OLD], stats[P_VIOLATION] = terms["loss"], terms.get("violation", 0.0)
    stats[P_SUM_W_OLD], stats[P_SQ_W_OLD] = terms["sum_w"], terms["sq_w"]
    stats[P_SUM_W] = masked.weighted_sums(wt, n_rows)[0]
    return stats


def _old_w_stats(wt, n_fits: int = 0) -> np.ndarray:
    """``P_*`` statistics with ΣW_i and ‖W_i‖² of the W_i an update starts from (and room for
    ``n_fits`` stacked fits' own, ``P_FITS``)."""
    stats = np.zeros(P_FITS + 3 * n_fits)
    stats[P_SUM_W_OLD] = wt.sum(dtype=np.float64)
    stats[P_SQ_W_OLD] = dot64(wt, wt)
    return stats


def _w_update(objective: Objective, order, gram_h, cross, wt, stats) -> np.ndarray:
    """The Frobenius update of W_i in place from (H·Hᵀ, C_i = H·X_iᵀ), with the statistics
    of the W_i it starts from and the violation written into ``stats``."""
    pairs = (wt, cross), (objective.gram(wt), gram_h)
    _, stats[P_CROSS_OLD], stats[P_WGW_OLD] = _fit_terms(objective, stats, P_FITS, None, *pairs)
    wt, violation = objective.update(
        wt,
        gram_h,
        cross,
        l1=objective.l1_w,
        l2=objective.l2_w,
        n_sweeps=objective.sweeps_w,
        order=order,
    )
    stats[P_VIOLATION] = _fit_terms(objective, stats, P_FITS, violation)[0]
    return wt


def _fit_terms(objective: Objective, stats: np.ndarray, at: int, violations, *pairs) -> tuple:
    """(the violation, Σ a∘b in float64 of each pair) of all the fits together; for stacked
    fits also each one's own, written into ``stats`` from ``at`` on (``P_FITS``, ``H_FITS``):
    the ``violations`` (if not None), then each pair's (the totals are their sums)."""
    if not objective.stacked:
        return (violations, *(dot64(a, b) for a, b in pairs))
    n, totals = len(objective.ranks), []
    for i, (a, b) in enumerate(pairs, start=1):
        per_fit = objective.fit_sums(np.einsum("ij,ij->i", a, b, dtype=np.float64))
        stats[at + i * n : at + (i + 1) * n] = per_fit
        totals.append(float(per_fit.sum()))
    if violations is not None:
        stats[at : at + n] = violations
        violations = float(violations.sum())
    return (violations, *totals)


def w_update(objective: Objective, order, gram_h, cross, wt) -> tuple[np.ndarray, np.ndarray]:
    """W_i and its statistics vector (``P_*`` layout) from what the 2-D block scheme summed
    over column blocks: for the Frobenius loss (H·Hᵀ, C_i), as ``_panel_step`` forms them
    without extrapolation; for a β-divergence one multiplicative update from ``cross`` =
    (numerator, denominator, D_β at the old W_i) of ``divergence.w_statistics``; for the
    masked loss from the rows' problems or statistics (``masked.row_sums``, ``mu_row_sums``).
    """
    if objective.masked:
        penalties = dict(l1=objective.l1_w, l2=objective.l2_w)
        if objective.solver == "mu":
            new, terms = masked.mu_rows_from(cross, wt, beta=objective.beta, **penalties)
        else:
            n_sweeps = objective.sweeps_w
            new, terms = masked.update_rows_from(
                cross, wt, n_sweeps=n_sweeps, order=order, **penalties
            )
        return new, _masked_stats(terms, new, cross[-1])
    stats = _old_w_stats(wt, len(objective.ranks))
    if objective.frobenius:
        wt = _w_update(objective, order, gram_h, cross, wt.copy(), stats)
    else:
        numerator, denominator, stats[P_DIV_OLD] = cross
        wt = _mu_step_w(objective, wt.copy(), numerator, denominator)
    stats[P_SUM_W] = wt.sum(dtype=np.float64)
    return wt, stats


def _mu_step_w(objective: Objective, wt, numerator, denominator) -> np.ndarray:
    """One multiplicative update of W_i in place (``mu.step``), factors below ``mu.TINY`` zeroed
    for β < 1."""
    gamma = divergence.mm_exponent(objective.beta)
    wt = mu.step(wt, numerator, denominator, l1=objective.l1_w, l2=objective.l2_w, gamma=gamma)
    if objective.beta < 1:
        wt[wt < mu.TINY] = 0
    return wt


def _panel_step_divergence(objective: Objective, col_bounds, h, x, wt, stats):
    """``panel_step`` for a β-divergence other than Frobenius: multiplicative updates."""
    beta = objective.beta
    if objective.sweeps_w == 1 and divergence.fused(x, beta):  # returns a new W_i
        wt, numerator, denominator, stats[P_DIV_OLD] = divergence.kl_update(
            x, wt, h, l1=objective.l1_w, l2=objective.l2_w
        )
    else:
        wt = wt.copy()  # updated in place, as in ``_panel_step``
        for sweep in range(objective.sweeps_w):
            numerator, denominator, value = divergence.w_statistics(
                x, wt, h, beta, with_divergence=sweep == 0
            )
            if sweep == 0:
                stats[P_DIV_OLD] = value
            wt = _mu_step_w(objective, wt, numerator, denominator)
        numerator, denominator = divergence.h_statistics(x, wt, h, beta)
    stats[P_SUM_W] = wt.sum(dtype=np.float64)
    numerators = _split(numerator, col_bounds)
    if denominator.ndim == 1:  # β = 1: colsum(W_i), the same for every column block
        denominators = (denominator,) * len(numerators)
    else:
        denominators = tuple(_split(denominator, col_bounds))
    return (wt, denominators, stats, *numerators)


def h_step(objective: Objective, order, block: int, picks, h, *containers):
    """Update column block ``block`` of H from the summed panel partials.

    The last level of the reduction runs here, in the same task as the update: Σ of the nodes
    ``picks`` names among ``containers`` (see ``picked``).

    Returns ``(H_j, H_j·H_jᵀ, stats_j, B or None, panel stats)`` with stats_j in the ``H_*``
    layout.
    """
    pin_worker_blas()
    second, panel_stats, a = sum_in_order(*picked(block, picks, containers))
    h = kernels.aligned(h_array(h))
    stats = np.zeros(H_FITS + 2 * len(objective.ranks))
    h = h.copy()
    if objective.masked:
        grams, counts = second  # for 'mu', the denominator in place of the Gram matrices
        stats[H_SUM_H_OLD], stats[H_SQ_H_OLD] = masked.weighted_sums(h, counts)
        penalties = dict(l1=objective.l1_h, l2=objective.l2_h)
        if objective.solver == "mu":
            h = masked.mu_columns(h, a, grams, counts, beta=objective.beta, **penalties)
        else:
            h, stats[H_VIOLATION] = masked.update_columns(
                h, grams, counts, a, n_sweeps=objective.sweeps_h, order=order, **penalties
            )
        stats[H_SUM_H], stats[H_SQ_H] = masked.weighted_sums(h, counts)
        return h, h @ h.T, stats, None, panel_stats
    stats[H_SUM_H_OLD] = h.sum(dtype=np.float64)
    stats[H_SQ_H_OLD] = dot64(h, h)
    if objective.frobenius:
        h, violation = objective.update(
            h,
            second,
            a,
            l1=objective.l1_h,
            l2=objective.l2_h,
            n_sweeps=objective.sweeps_h,
            order=order,
        )
        stats[H_VIOLATION], stats[H_CROSS] = _fit_terms(objective, stats, H_FITS, violation, (a, h))
    else:
        h = _h_step_divergence(objective, h, a, second)
        second = None
    stats[H_SUM_H] = h.sum(dtype=np.float64)
    return h, objective.gram(h), stats, second, panel_stats


def extrapolated_h_step(
    objective: Objective, order, block: int, picks, h, h_previous, control, *containers
):
    """``h_step`` from the pushed H block (see ``extrapolated_shard_step``)."""
    start = pushed_block(h, h_previous, control_of(control))
    return h_step(objective, order, block, picks, start, *containers)


def extrapolated_whole_h_step(
    objective: Objective, order, picks, h, h_previous, control, norm_x_sq, *containers
):
    """``extrapolated_h_step`` of an H held in one column block, followed in the same task by
    the next iteration's control (``control_after``): its output tuple carries the control as
    its last item (see ``control_of``), which saves a task and a scheduler round trip between
    an iteration and the next."""
    out = extrapolated_h_step(objective, order, 0, picks, h, h_previous, control, *containers)
    return (*out, control_after(control, objective, norm_x_sq, out))


def control_of(control):
    """The extrapolation control held either as is or as the last item of the output tuple of
    ``extrapolated_whole_h_step``."""
    return control[-1] if isinstance(control, tuple) else control


def summary_of(fetched) -> tuple:
    """The iteration's summary ``(H·Hᵀ, H stats, B, panel stats)`` from what the driver
    fetched: the summary itself, or the output tuple of the one ``h_step`` of an H held in one
    small block (``engine.iterate`` then fetches it whole instead of running a task to sum
    it)."""
    return fetched if len(fetched) == 4 else h_summary(fetched)


def pushed_block(h, previous, control) -> np.ndarray:
    """``pushed_h`` of a column block of H held either way (see ``h_array``)."""
    return pushed_h(h_array(h), h_array(previous), control)


def component_sq_norms(factor) -> np.ndarray:
    """Σ over a component-major block of each component's squares, in float64."""
    factor = h_array(factor)
    return np.einsum("ij,ij->i", factor, factor, dtype=np.float64)


def shard_sq_norms(state) -> np.ndarray:
    """``component_sq_norms`` of each block of Wᵀ of a shard, one row each."""
    return np.stack([component_sq_norms(b) for b in shard_blocks(state)])


def advance_control(control, objective: Objective, norm_x_sq: float, summary):
    """The extrapolation control of the next iteration, from this iteration's summary."""
    control = control_of(control)
    gram_h, _, gram_w, _ = summary
    scale = None
    if not objective.has_penalties:  # else rescaling would change the objective
        scale = extrapolation.balance(np.diag(gram_w), np.diag(gram_h))
    loss = objective.penalized(*frobenius_terms(norm_x_sq, summary))
    rounding = extrapolation.ROUNDING * np.finfo(np.float64).eps * norm_x_sq
    return control.advance(loss, scale, rounding)


def control_after(control, objective: Objective, norm_x_sq: float, *h_outs):
    """``advance_control`` from the ``h_step`` outputs themselves (their summary formed here,
    as ``h_summary`` forms it): one task fewer between an iteration and the next."""
    return advance_control(control, objective, norm_x_sq, h_summary(*h_outs))


def frobenius_terms(norm_x_sq: float, summary) -> tuple[float, ...]:
    """½‖X − WH‖² at the end of an iteration (by the Gram identity), ΣW, ‖W‖², ΣH and ‖H‖²,
    from the iteration's summary ``(H·Hᵀ, H stats, B, panel stats)``."""
    gram_h, h_stats, gram_w, panel_stats = summary
    return (
        0.5 * (norm_x_sq - 2 * h_stats[H_CROSS] + dot64(gram_w, gram_h)),
        panel_stats[P_SUM_W],
        float(np.trace(gram_w)),
        h_stats[H_SUM_H],
        float(np.trace(gram_h)),
    )


def _h_step_divergence(objective: Objective, h, numerator, denominator) -> np.ndarray:
    if denominator.ndim == 1:  # β = 1: colsum(W); scikit-learn makes a zero column sum 1
        denominator = np.where(denominator == 0, 1.0, denominator)[:, None]
    h = mu.step(
        h,
        numerator,
        denominator,
        l1=objective.l1_h,
        l2=objective.l2_h,
        gamma=divergence.mm_exponent(objective.beta),
    )
    if objective.beta <= 1:
        h[h < mu.TINY] = 0
    return h


def h_summary(*outs) -> tuple:
    """Σ over ``h_step`` outputs (or over earlier results of this function) of
    (H_j·H_jᵀ, stats_j); B and the panel stats are the same in all and are taken from the first.
    Returns ``(H·Hᵀ, H stats, B, panel stats)``: all the driver needs of an iteration."""
    parts = [out if len(out) == 4 else out[1:5] for out in outs]  # an h_step output: H first
    sums = sum_in_order(*((part[0], part[1]) for part in parts))
    return (*sums, parts[0][2], parts[0][3])
