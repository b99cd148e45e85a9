"""The tasks of the 2-D block scheme (``dasknmf.blocks`` runs them): along a row of blocks
the sums for W_i's update and the update itself, down a column the partials of H_j's —
for the Frobenius loss, β-divergences, the masked loss and extrapolation — as plain
functions of arrays, as ``steps`` holds the row panels' tasks. A band (a worker thread's
consecutive rows of blocks) runs its rows one after the other in one task; each row's and
column's sums run in the order of the blocks."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dasknmf import divergence, kernels, masked, passes, steps
from dasknmf._blas import pin_worker_blas
from dasknmf.solvers import extrapolation
from dasknmf.steps import Objective, panel_data


class RowOut(NamedTuple):
    """What ``w_step`` returns: the new block of Wᵀ of a row of blocks, W_iᵀ·W_i and the
    statistics vector of the update. A band's state is a tuple of them (a checkpoint writes
    each one's ``wt``: see ``steps.h_array``)."""

    wt: np.ndarray  # pushed, in a fit with extrapolation
    gram: np.ndarray | None  # None for a β-divergence, whose H update does not need it
    stats: np.ndarray
    plain: np.ndarray | None = None  # the plain new W_i of a fit with extrapolation


def block_cross(h, x, total=None) -> np.ndarray:
    """C_i so far plus H_j·X_ijᵀ, (k, m_i)."""
    pin_worker_blas()
    cross = kernels.dot_h(panel_data(x), kernels.aligned(steps.h_array(h)))
    if total is not None:
        cross += total  # a sum of two: the same bits either way round
    return cross


def block_w_statistics(beta: float, wt, h, x, total=None) -> tuple:
    """For a β-divergence: the numerator and denominator of W_i's multiplicative update and
    D_β(X_i | W_i·H) so far, plus block (i, j)'s (``divergence.w_statistics`` at the W_i and
    H_j the iteration starts from)."""
    pin_worker_blas()
    wt = kernels.aligned(wt[0] if isinstance(wt, tuple) else wt)
    h = kernels.aligned(steps.h_array(h))
    numerator, denominator, value = divergence.w_statistics(panel_data(x), wt, h, beta, True)
    if total is None:
        return numerator, denominator, value
    return numerator + total[0], denominator + total[1], value + total[2]


def band_cross(objective: Objective, state, h, totals, xs: tuple) -> tuple:
    """For each row of a band, what its W update sums over the column blocks, so far
    (``totals``; None at the first column block) plus block j's: C_i (``block_cross``), or
    for a β-divergence the statistics of the multiplicative update (``block_w_statistics``,
    which reads the band's W ``state``)."""
    if totals is None:
        totals = (None,) * len(xs)
    if objective.masked:
        items = zip(state, xs, totals, strict=True)
        return tuple(block_row_sums(objective, wt, h, x, total) for wt, x, total in items)
    if objective.frobenius:
        return tuple(block_cross(h, x, total) for x, total in zip(xs, totals, strict=True))
    items = zip(state, xs, totals, strict=True)
    return tuple(block_w_statistics(objective.beta, wt, h, x, total) for wt, x, total in items)


def block_row_sums(objective: Objective, wt, h, x, total=None) -> tuple:
    """For the masked loss, row i's problems (``masked.row_sums``) or multiplicative-update
    statistics (``masked.mu_row_sums``, at the W_i the iteration starts from) so far, plus
    block (i, j)'s."""
    pin_worker_blas()
    values, pattern = masked.observed(panel_data(x))
    h = kernels.aligned(steps.h_array(h))
    if objective.solver == "mu":
        wt = kernels.aligned(block_of(wt))
        part = masked.mu_row_sums(values, pattern, wt, h, objective.beta)
    else:
        part = masked.row_sums(values, pattern, h)
    return part if total is None else steps.sum_in_order(total, part)


def band_w_step(
    objective: Objective, order, summary, control, again: bool, state, crosses, plains=None
):
    """``w_step`` for each row of a band: the band's new state, a tuple of ``RowOut``. With
    extrapolation (``control`` is the ``solvers.extrapolation.Control``) each W_i starts from
    its pushed block in ``state`` (its plain one in ``plains`` on a restart), rescaled as the
    control says, and the new W_i is pushed along its step from the plain one before, as
    ``steps.extrapolated_shard_step`` does it for a row panel. ``again``: a further sweep of
    a multiplicative update in this iteration, which keeps the statistics of the first (those
    of the W_i the iteration started from) but ΣW of the new W_i."""
    if control is None:
        out = tuple(
            w_step(objective, order, summary, wt, cross)
            for wt, cross in zip(state, crosses, strict=True)
        )
        if again:
            out = tuple(_first_stats(new, old) for new, old in zip(out, state, strict=True))
        return out
    out = []
    for wt, plain, cross in zip(state, plains, crosses, strict=True):
        wt = extrapolation.rescaled(kernels.aligned(block_of(wt)), control.scale)
        plain = extrapolation.rescaled(kernels.aligned(block_of(plain, True)), control.scale)
        start = plain if control.restart else wt
        out.append(w_step(objective, order, summary, start, cross, (plain, control.beta)))
    return tuple(out)


def _first_stats(new: RowOut, first: RowOut) -> RowOut:
    stats = first.stats.copy()
    stats[steps.P_SUM_W] = new.stats[steps.P_SUM_W]
    return new._replace(stats=stats)


def block_of(w, plain: bool = False) -> np.ndarray:
    """The block of Wᵀ of a row: an array, or the (plain) block of a ``RowOut``."""
    if isinstance(w, RowOut):
        return w.plain if plain else w.wt
    return w


def plain_rows(state) -> tuple:
    """The plain blocks of Wᵀ of a band (what a checkpoint of an extrapolated fit keeps)."""
    return tuple(block_of(w, True) for w in state)


def pushed_rows(state) -> tuple:
    """The blocks of Wᵀ of a band (the pushed ones of an extrapolated fit: its result)."""
    return tuple(block_of(w) for w in state)


def band_partial(objective: Objective, h, state, total, xs: tuple):
    """``block_partial`` down the rows of a band: column j's sums so far plus the band's."""
    for w_out, x in zip(state, xs, strict=True):
        total = block_partial(objective, h, w_out, x, total)
    return total


def w_step(objective: Objective, order, summary, wt, cross, push=None):
    """W_i (a block, or the previous ``w_step`` output) from what ``band_cross`` summed over
    the column blocks: for the Frobenius loss C_i with H·Hᵀ (from the previous iteration's
    ``summary``, or the initial H·Hᵀ), the update, statistics and W_iᵀ·W_i as the row-panel
    task forms them (``steps.w_update``); for a β-divergence the multiplicative update
    (the same function), without W_iᵀ·W_i. ``push``: (the plain W_i before, β) of an
    extrapolated fit, whose W_iᵀ·W_i and statistics are then those of the pushed W_i.
    Returns a ``RowOut``."""
    pin_worker_blas()
    wt = wt[0] if isinstance(wt, tuple) else wt  # the previous ``w_step`` output
    if objective.masked or not objective.frobenius:
        wt, stats = steps.w_update(objective, order, None, cross, kernels.aligned(wt))
        return RowOut(wt, None, stats)
    gram_h = summary[0] if isinstance(summary, tuple) else summary
    # All aligned: numpy's matmul skips BLAS for an unaligned operand (one received over the
    # network may be), and its own loop rounds differently from BLAS's.
    gram_h, cross, wt = map(kernels.aligned, (gram_h, cross, wt))
    wt, stats = steps.w_update(objective, order, gram_h, cross, wt)
    if push is None:
        return RowOut(wt, objective.gram(wt), stats)
    plain, wt = wt, extrapolation.extrapolate(wt, push[0], push[1])
    stats[steps.P_SUM_W] = wt.sum(dtype=np.float64)
    return RowOut(wt, objective.gram(wt), stats, plain)


def block_partial(objective: Objective, h, w_out, x, total=None) -> tuple:
    """Column j's sums so far plus block (i, j)'s: (B_i, stats_i, W_iᵀ·X_ij) for the Frobenius
    loss, (denominator, stats_i, numerator) of H_j's multiplicative update for a β-divergence
    (``divergence.h_statistics`` at the new W_i). Every column sums all of the statistics
    (and B = Σ W_iᵀ·W_i), as every H block's update needs them."""
    pin_worker_blas()
    wt, gram_w, stats = w_out[:3]
    x, wt = panel_data(x), kernels.aligned(wt)
    if objective.masked:
        part = _masked_partial(objective, h, wt, stats, x)
    elif objective.frobenius:
        part = (gram_w, stats, kernels.dot_w(x, wt))
    else:
        h = kernels.aligned(steps.h_array(h))
        numerator, denominator = divergence.h_statistics(x, wt, h, objective.beta)
        part = (denominator, stats, numerator)
    return part if total is None else steps.sum_in_order(total, part)


def _masked_partial(objective: Objective, h, wt, stats, x) -> tuple:
    """``block_partial`` for the masked loss: ((packed Σ w·wᵀ, counts), stats, A_ij), or
    ((denominator, counts), stats, numerator) at the new W_i (see ``masked``)."""
    values, pattern = masked.observed(x)
    whole = [0, x.shape[1]]
    if objective.solver == "mu":
        h = kernels.aligned(steps.h_array(h))
        seconds, numerators = masked.mu_column_partials(
            values, pattern, wt, h, objective.beta, whole
        )
        return seconds[0], stats, numerators[0]
    partials = masked.column_partials(values, pattern, wt, whole)
    return partials[0], stats, kernels.dot_w(values, wt)


def block_final_stats(objective: Objective, with_w: bool, h, w_out, x) -> np.ndarray:
    """D_β(X_ij | W_i·H_j) (½‖X_ij − W_i·H_j‖² for β = 2; over the observed entries for the
    masked loss), and ΣW_i, ‖W_i‖² for the first block of the row (``with_w``; for the masked
    loss every block's: weighted by the row's observed entries in the block, they add up to
    the weights of the whole row); for stacked replicates then each one's ½‖X_ij − W_i·H_j‖²
    (``passes.replicate_final_stats``)."""
    pin_worker_blas()
    wt = kernels.aligned(w_out[0] if isinstance(w_out, tuple) else w_out)
    h = kernels.aligned(steps.h_array(h))
    if objective.stacked:
        stats = passes.replicate_final_stats(objective, h, x, wt)
    else:
        stats = passes.final_stats(objective.beta, h, x, wt, objective.masked)
    if not with_w:
        stats[passes.F_SUM_W] = stats[passes.F_SQ_W] = 0.0
    return stats


#: ``steps.h_step``'s columns of an H block: all of it.
WHOLE_H = ((0, None),)


def column_h_step(objective: Objective, order, needs_h: bool, states: list, h, column: list):
    """In memory, a column's chain and its H update in one task: ``band_partial`` down the
    bands' ``states`` and blocks of ``column`` in order, then ``steps.h_step`` of H_j (as the
    chain's tasks on a cluster compute them, with the same bits)."""
    total = None
    for state, xs in zip(states, column, strict=True):
        total = band_partial(objective, h if needs_h else None, state, total, xs)
    return steps.h_step(objective, order, None, WHOLE_H, h, total)


def gram_of(objective: Objective, h_block) -> np.ndarray:
    """H_j·H_jᵀ, (k, k), of a column block of H (aligned: see ``w_step``; for stacked
    replicates only each one's own block, ``Objective.gram``)."""
    pin_worker_blas()
    return objective.gram(kernels.aligned(steps.h_array(h_block)))


def checked_cross(objective: Objective, h, x, total=None):
    """For ``transform``: ``block_cross`` (for the masked loss, the rows' problems of
    ``masked.row_sums``) after the block's own check for negative or non-finite values (a
    lazy transform has no validation pass)."""
    passes.checked_moments(objective.masked, x)
    if not objective.masked:
        return block_cross(h, x, total)
    pin_worker_blas()
    part = masked.row_sums(*masked.observed(panel_data(x)), kernels.aligned(h))
    return part if total is None else steps.sum_in_order(total, part)


def solve_rows(objective: Objective, gram_h, max_iter: int, tol: float, sums) -> np.ndarray:
    """For ``transform``: W_i, (m_i, k), from what ``checked_cross`` summed along the row —
    each row's least squares over its observed entries for the masked loss
    (``masked.solve_rows_from``), else one problem with H·Hᵀ (``passes.solve_frobenius``)."""
    if not objective.masked:
        return passes.solve_frobenius(objective, gram_h, max_iter, tol, sums)
    pin_worker_blas()
    penalties = dict(l1=objective.l1_w, l2=objective.l2_w)
    return masked.solve_rows_from(sums, max_iter=max_iter, tol=tol, **penalties)


def row_moments(objective: Objective, x, total=None) -> np.ndarray:
    """For ``transform``: the moments of a row of blocks so far, plus block (i, j)'s, after
    its own check for negative or non-finite values (``passes.checked_moments``)."""
    part = passes.checked_moments(objective.masked, x)
    return part if total is None else kernels.combine_moments(total, part)


def mu_sums(objective: Objective, tol: float, n_iter: int, state, h, x, total=None):
    """For a β-divergence ``transform`` (or the masked loss by multiplicative updates): the
    statistics of update ``n_iter`` of row i's W so far (see ``passes.mu_step``), plus block
    (i, j)'s at the W where ``state`` stands; None once the row's updates stopped."""
    if state.done:
        return None
    pin_worker_blas()
    x, h, wt = panel_data(x), kernels.aligned(h), kernels.aligned(state.wt)
    check = passes.mu_checks(n_iter, tol)
    if objective.masked:
        values, pattern = masked.observed(x)
        stats = masked.mu_w_statistics(values, pattern, wt, h, objective.beta, check)
        part = (*stats, masked.counts(pattern, axis=1))
    else:
        part = (*divergence.w_statistics(x, wt, h, objective.beta, check), None)
    if total is None:
        return part
    return tuple(None if a is None else a + b for a, b in zip(total, part, strict=True))


def mu_row_step(objective: Objective, max_iter: int, tol: float, n_iter: int, state, sums):
    """Update ``n_iter`` of a row's W from the statistics summed along its row of blocks
    (``passes.mu_step``); ``state`` itself once the row's updates stopped."""
    return state if state.done else passes.mu_step(objective, max_iter, tol, n_iter, state, *sums)
