"""The passes over X around the iterations, as plain functions of arrays: the validation pass
(``moments_task``), the exact error of the result (``final_stats``) and ``transform``'s
(``transform_panel``). ``engine``, ``blocks`` and ``pipeline`` run them as tasks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from dasknmf import divergence, kernels, masked
from dasknmf._blas import pin_worker_blas
from dasknmf.shards import (
    Subtrees,
    group_blocks,
    groups,
    shard_panels,
)
from dasknmf.solvers import get_solver, mu
from dasknmf.steps import Objective, dot64, panel_data, stacked_panels

# Layout of the vector of ``final_stats``.
F_DIV, F_SUM_W, F_SQ_W = range(3)


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

    @property
    def underflows(self) -> bool:
        """Whether ‖X‖² of a nonzero X underflows float64 (values near 1e-160 and below): the
        objective from the Gram identity is then zero or a few bits and cannot steer a fit."""
        return self.nnz > 0 and self.sum_sq < np.finfo(np.float64).tiny


def as_moments(total) -> Moments:
    """``Moments`` from the combined ``kernels.panel_moments`` vector."""
    return Moments(
        min=float(total[kernels.MOMENT_MIN]),
        n_nonfinite=int(total[kernels.MOMENT_NONFINITE]),
        sum=float(total[kernels.MOMENT_SUM]),
        sum_sq=float(total[kernels.MOMENT_SUMSQ]),
        nnz=int(total[kernels.MOMENT_NNZ]),
        size=int(total[kernels.MOMENT_SIZE]),
    )


def moments_task(masked_loss: bool, x) -> np.ndarray:
    """``kernels.panel_moments`` of a panel (the validation pass); over its observed entries
    only for the masked loss."""
    x = panel_data(x)
    return masked.moments(x) if masked_loss else kernels.panel_moments(x)


def shard_moments(masked_loss: bool, *data) -> np.ndarray:
    """``moments_task`` of each panel of a shard, one row each (the validation pass runs one
    task per shard; the rows are combined as a tree over the panels would: ``engine.moments``)."""
    return np.stack([moments_task(masked_loss, x) for x in shard_panels(data)])


def reject_bad_values(n_nonfinite: int, minimum: float, whom: str) -> None:
    """A clear error for NaN, infinity or negative values."""
    if n_nonfinite:
        raise ValueError(
            f"Input X contains NaN or infinity ({n_nonfinite} non-finite values); "
            f"{whom} must be finite."
        )
    if minimum < 0:
        raise ValueError(f"Negative values in data passed to {whom} (minimum {minimum:g}).")


def final_stats(beta: float, h: np.ndarray, x, wt: np.ndarray, masked_loss=False) -> np.ndarray:
    """The exact D_β(X_i | W_i·H) of a panel, ΣW_i and ‖W_i‖² (``F_*`` layout); for the
    masked loss ½Σ over the observed entries, and the sums weighted by the rows' counts."""
    pin_worker_blas()
    x, wt, h = panel_data(x), kernels.aligned(wt), kernels.aligned(h)
    if masked_loss:
        values, pattern = masked.observed(x)
        if beta == 2:
            value = 0.5 * masked.residual_sq(values, pattern, wt, h)
        else:
            wh = masked.product(values, pattern, wt, h)
            value = masked.beta_divergence(values, pattern, wh, beta)
        return np.array([value, *masked.weighted_sums(wt, masked.counts(pattern, axis=1))])
    if beta == 2:
        value = 0.5 * kernels.residual_sq(x, wt, h)
    else:
        value = divergence.divergence(x, divergence.sampled_product(x, wt, h), wt, h, beta)
    return np.array([value, wt.sum(dtype=np.float64), dot64(wt, wt)])


def shard_final_stats(objective: Objective, tree, h: np.ndarray, state, *data) -> tuple:
    """``final_stats`` of each panel (or group of panels) of a shard, summed into the nodes at
    ``tree``'s level (see ``shard_step``)."""
    sums = Subtrees(*tree)
    for (xs,), wt in zip(groups(tree, shard_panels(data)), group_blocks(tree, state), strict=True):
        x = stacked_panels(xs)[0]
        if objective.stacked:
            sums.add(replicate_final_stats(objective, h, x, wt))
        else:
            sums.add(final_stats(objective.beta, h, x, wt, objective.masked))
    return sums.finish()


def replicate_final_stats(objective: Objective, h: np.ndarray, x, wt: np.ndarray) -> np.ndarray:
    """``final_stats`` of stacked Frobenius fits (``Objective.ranks``): the ``F_*`` layout for
    all of them (F_DIV the sum of their losses), then each one's ½‖X_i − W_i·H‖²."""
    pin_worker_blas()
    x, wt, h = panel_data(x), kernels.aligned(wt), kernels.aligned(h)
    values = [0.5 * kernels.residual_sq(x, wt[part], h[part]) for part in objective.fit_slices()]
    return np.array([sum(values), wt.sum(dtype=np.float64), dot64(wt, wt), *values])


def transform_panel(
    objective: Objective, h: np.ndarray, gram_h: np.ndarray, max_iter: int, tol: float, x
) -> np.ndarray:
    """W_i for a fixed H, from one read of X_i. Frobenius: non-negative least squares by HALS
    sweeps from zero on the cached C_i = H·X_iᵀ until the violation falls to ``tol`` × its
    first value (or ``max_iter`` sweeps); masked, the same for each row's own least squares
    over its observed entries (``masked.solve_rows``). Another β: scikit-learn's W-only
    multiplicative updates from sqrt(mean(X_i)/k), checked every 10 iterations. Returns the
    (m_i, k) block."""
    pin_worker_blas()
    x, h = panel_data(x), kernels.aligned(h)
    moments = checked_moments(objective.masked, x)
    if objective.masked and objective.solver == "hals":  # each row's own least squares
        values, pattern = masked.observed(x)
        return masked.solve_rows(
            values, pattern, h, l1=objective.l1_w, l2=objective.l2_w, max_iter=max_iter, tol=tol
        )
    if multiplicative_transform(objective):
        return _transform_divergence(objective, h, max_iter, tol, x, moments)
    return solve_frobenius(objective, gram_h, max_iter, tol, kernels.dot_h(x, h))


def multiplicative_transform(objective: Objective) -> bool:
    """Whether ``transform`` iterates multiplicative W updates (another β, or the masked loss
    by MU) rather than solving least squares (the Frobenius loss; masked, by HALS)."""
    return objective.solver != "hals" if objective.masked else not objective.frobenius


def checked_moments(masked_loss: bool, x) -> np.ndarray:
    """``moments_task`` of a panel, after rejecting its bad values: a lazy transform has no
    validation pass of its own, so each panel (or 2-D block) checks itself."""
    moments = moments_task(masked_loss, x)
    reject_bad_values(
        int(moments[kernels.MOMENT_NONFINITE]), moments[kernels.MOMENT_MIN], "NMF (input X)"
    )
    return moments


def solve_frobenius(objective: Objective, gram_h, max_iter: int, tol: float, cross) -> np.ndarray:
    """W_i, (m_i, k), from C_i = H·X_iᵀ and H·Hᵀ by ``nnls`` (the Frobenius transform); for
    stacked fits each one's own (with its own stopping rule)."""
    pin_worker_blas()
    penalties = dict(l1=objective.l1_w, l2=objective.l2_w)
    parts = objective.fit_slices() if objective.stacked else [slice(None)]
    wt = [nnls(gram_h[p, p], cross[p], max_iter, tol, **penalties) for p in parts]
    return np.ascontiguousarray(np.concatenate(wt).T)


def nnls(gram: np.ndarray, cross: np.ndarray, max_iter: int, tol: float, l1=0.0, l2=0.0):
    """argmin over F ≥ 0 of ½‖X − Fᵀ·G‖² (+ penalties) from ``gram`` = G·Gᵀ and ``cross`` =
    G·Xᵀ: HALS sweeps from zero until the violation falls to ``tol`` × its first value, or
    ``max_iter`` sweeps. Returns F, component-major (k, r)."""
    wt = np.zeros_like(cross)
    rule = get_solver("hals")
    first = None
    for _ in range(max_iter):
        wt, violation = rule.update(wt, gram, cross, l1=l1, l2=l2)
        if first is None:
            first = violation
        if first == 0 or violation <= tol * first:
            break
    return wt


def _transform_divergence(objective, h, max_iter, tol, x, moments) -> np.ndarray:
    state = mu_start(h.shape[0], x.shape[0], h.dtype, moments)
    penalty = None
    if objective.masked:  # over the observed entries, each row's penalty by its count
        values, pattern = masked.observed(x)
        penalty = masked.counts(pattern, axis=1)
    for n_iter in range(max_iter + 1):
        check = mu_checks(n_iter, tol)
        if objective.masked:
            stats = masked.mu_w_statistics(values, pattern, state.wt, h, objective.beta, check)
        else:
            stats = divergence.w_statistics(x, state.wt, h, objective.beta, check)
        state = mu_step(objective, max_iter, tol, n_iter, state, *stats, penalty)
        if state.done:
            break
    return mu_rows(state)


class MuSolve(NamedTuple):
    """Where ``transform``'s multiplicative W updates under a fixed H stand, for one panel
    or one row of 2-D blocks: Wᵀ (k, rows), the first and the last checked error, whether
    they stopped."""

    wt: np.ndarray
    first: float | None = None
    previous: float | None = None
    done: bool = False


def mu_start(k: int, rows: int, dtype, moments) -> MuSolve:
    """scikit-learn's start of the W-only updates: every entry sqrt(mean(X_i) / k), the mean
    from the rows' ``moments_task`` (over the observed entries for the masked loss)."""
    mean = moments[kernels.MOMENT_SUM] / moments[kernels.MOMENT_SIZE]
    return MuSolve(np.full((k, rows), np.sqrt(mean / k), dtype=dtype))


def mu_checks(n_iter: int, tol: float) -> bool:
    """Whether update ``n_iter`` checks the error (the first, then every ``CHECK_EVERY``)."""
    return n_iter == 0 or (tol > 0 and n_iter % mu.CHECK_EVERY == 0)


def mu_step(
    objective: Objective, max_iter: int, tol: float, n_iter, state: MuSolve, *stats
) -> MuSolve:
    """Update ``n_iter`` of the rows of ``state`` from their statistics ``(numerator,
    denominator, D_β when checked, observed entries per row for the masked loss, else
    None)``: done when the error fell by less than ``tol`` × its first value since the last
    check, or after ``max_iter`` updates. ``state`` is not modified."""
    numerator, denominator, value, n_rows = stats
    wt, first, previous = state.wt, state.first, state.previous
    if mu_checks(n_iter, tol):
        current = np.sqrt(2 * max(value, 0.0))
        if first is None:
            first = previous = current
        elif first == 0 or (previous - current) / first < tol:
            return state._replace(done=True)
        else:
            previous = current
    if n_iter == max_iter:
        return MuSolve(wt, first, previous, True)
    beta, l1, l2 = objective.beta, objective.l1_w, objective.l2_w
    if n_rows is not None:  # masked: each row's penalties scaled by its count
        wt = masked.mu_row_step(wt.copy(), numerator, denominator, n_rows, beta, l1, l2)
    else:
        wt = mu.step(
            wt.copy(), numerator, denominator, gamma=divergence.mm_exponent(beta), l1=l1, l2=l2
        )
        if beta < 1:
            wt[wt < mu.TINY] = 0
    return MuSolve(wt, first, previous, False)


def mu_rows(state: MuSolve) -> np.ndarray:
    """The (rows, k) block of W where ``state`` stands."""
    return np.ascontiguousarray(state.wt.T)
