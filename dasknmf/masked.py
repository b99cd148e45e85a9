"""The masked Frobenius loss: NMF fitted to the observed entries of X only (recommendation).

With Ω the observed entries — those that are not NaN in dense X (``missing='nan'``), those
stored in sparse X (``missing='unstored'``; a stored zero is an observed zero) — the fit
minimizes

    ½·Σ_{(i,j)∈Ω} (x_ij − w_i·h_j)² + Σ_i n_i·(l1_w·‖w_i‖₁ + ½·l2_w·‖w_i‖²)
                                      + Σ_j n_j·(l1_h·‖h_j‖₁ + ½·l2_h·‖h_j‖²)

where n_i and n_j count the observed entries of row i and column j: each row's and column's
penalty grows with its data, as in Spark's ALS-WR (Zhou et al. 2008). With every entry
observed this is scikit-learn's objective (n_i = n_features, n_j = n_samples).

Each row of W is then its own non-negative least-squares problem in the columns of H where the
row is observed: Gram matrix G_i = Σ_{j∈Ω_i} h_j·h_jᵀ and right-hand side c_i = Σ_{j∈Ω_i}
x_ij·h_j (alternating least squares). One read of a row panel X_p gives both for each of its
rows — c = H·X_pᵀ with the missing entries as zeros, G = P_p·Q_H with P_p the 0/1 pattern of
Ω and Q_H the packed outer products h_j·h_jᵀ — and HALS sweeps on (G_i, c_i) update w_i. The
new rows give the partials of the column problems, Σ_{i∈Ω_j} w_i·w_iᵀ (packed) and
Σ_i x_ij·w_i, summed over panels like the partials of the unmasked fit; each column of H is
then updated the same way. Per iteration: one read of X, O(|Ω|·k²) flops per factor, and a
partial of n·k(k+1)/2 values per task.

Rows (and columns) without an observed entry have no data to fit: their factors are zero, so
are their predictions.

Plain functions of numpy and scipy.sparse arrays; ``steps`` runs them as tasks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from dasknmf import divergence, kernels
from dasknmf.divergence import EPSILON
from dasknmf.solvers import mu
from dasknmf.solvers.hals import violation_of

#: Bytes of the temporaries (unpacked Gram matrices, a float copy of a dense pattern) that the
#: row and column updates form at a time.
BLOCK_BYTES = 16 * 2**20


def observed(x):
    """``(values, pattern)`` of a panel: X with its missing entries as zeros, and the 0/1
    pattern of the observed ones — a boolean array for dense X (the entries not NaN), a CSR
    matrix of ones with X's indices for sparse X (the stored entries)."""
    if sp.issparse(x):
        x = x.tocsr()
        ones = np.ones(x.data.shape, dtype=x.dtype)
        return x, sp.csr_matrix((ones, x.indices, x.indptr), shape=x.shape)
    mask = ~np.isnan(x)
    return np.where(mask, x, x.dtype.type(0)), mask


def observed_values(x) -> np.ndarray:
    """The observed entries of a panel, as a 1-D array (for the validation pass)."""
    if sp.issparse(x):
        return x.data
    return x[~np.isnan(x)]


def moments(x) -> np.ndarray:
    """``kernels.panel_moments`` over the observed entries only: their min, the non-finite
    values among them (infinity; NaN too when X is sparse), their sum, sum of squares,
    nonzeros, and their number as the size."""
    return kernels.panel_moments(observed_values(x))


def counts(pattern, axis: int) -> np.ndarray:
    """Observed entries per row (``axis=1``) or per column (``axis=0``), as float64."""
    return np.asarray(pattern.sum(axis=axis, dtype=np.float64)).ravel()


def sums_width(k: int) -> int:
    """Numbers per row (or column) in the sums of its problem: C (k), the packed Gram matrix
    (k(k+1)/2) and the count — what sizes the 2-D blocks of a masked fit in place of k."""
    return k + k * (k + 1) // 2 + 1


def packed_outer(ft: np.ndarray) -> np.ndarray:
    """The upper triangles of f·fᵀ for each column f of a component-major factor (k, r), as
    rows of a (k(k+1)/2, r) array."""
    upper, lower = np.triu_indices(ft.shape[0])
    return ft[upper] * ft[lower]


def unpack(packed: np.ndarray, k: int) -> np.ndarray:
    """(r, k(k+1)/2) packed upper triangles → (r, k, k) symmetric matrices."""
    upper, lower = np.triu_indices(k)
    out = np.empty((packed.shape[0], k, k), dtype=packed.dtype)
    out[:, upper, lower] = packed
    out[:, lower, upper] = packed
    return out


def _block_rows(k: int, pattern=None) -> int:
    """Rows per block of the row updates: their unpacked Gram matrices, and a float copy of a
    dense ``pattern``'s rows, within ``BLOCK_BYTES``."""
    width = pattern.shape[1] if isinstance(pattern, np.ndarray) else 0
    return max(1, BLOCK_BYTES // (8 * max(k * k, width)))


def _pattern_rows(pattern, rows: slice, dtype) -> np.ndarray | sp.csr_matrix:
    block = pattern[rows]
    return block.astype(dtype) if isinstance(block, np.ndarray) else block


def hals(
    F: np.ndarray,
    grams: np.ndarray,
    cross: np.ndarray,
    l1: np.ndarray,
    l2: np.ndarray,
    n_sweeps: int,
    order: Sequence[int] | None = None,
) -> float:
    """HALS sweeps, in place, on each column f_r of the component-major ``F`` (k, r) for its
    own problem: min ½·f_rᵀ·G_r·f_r − c_rᵀ·f_r + l1_r·Σf_r + ½·l2_r·‖f_r‖² over f_r ≥ 0, with
    G_r = ``grams[r]`` and c_r = ``cross[:, r]``. Returns the L1 norm of the projected gradient
    met in the first sweep (scikit-learn's convergence measure). A column whose curvature in a
    component is zero (no observed entry, no L2) keeps that component."""
    k = F.shape[0]
    dtype = F.dtype.type
    l1, l2 = l1.astype(F.dtype), l2.astype(F.dtype)
    violation = 0.0
    for sweep in range(n_sweeps):
        for t in range(k) if order is None else order:
            grad = np.einsum("rk,kr->r", grams[:, t, :], F) - cross[t] + l1 + l2 * F[t]
            diag = grams[:, t, t] + l2
            if sweep == 0:
                violation += float(violation_of(F[t], grad))
            curved = diag > 0
            step = grad / np.where(curved, diag, dtype(1))
            F[t] = np.where(curved, np.maximum(F[t] - step, dtype(0)), F[t])
    return violation


def _row_problems(values, pattern, h: np.ndarray, n_rows: np.ndarray):
    """The rows' least-squares problems of a panel, a block of rows at a time: ``(slice of
    the rows, their Gram matrices (r_b, k, k), their C = H·X_bᵀ (k, r_b), their counts)``."""
    k, r = h.shape[0], values.shape[0]
    cross = kernels.dot_h(values, h)
    quadratic = np.ascontiguousarray(packed_outer(h).T)  # (n, p)
    step = _block_rows(k, pattern)
    for start in range(0, r, step):
        rows = slice(start, min(r, start + step))
        grams = unpack(np.asarray(_pattern_rows(pattern, rows, h.dtype) @ quadratic), k)
        yield rows, grams, cross[:, rows], n_rows[rows]


def update_rows(
    values,
    pattern,
    h: np.ndarray,
    wt: np.ndarray,
    *,
    l1: float,
    l2: float,
    n_sweeps: int,
    order: Sequence[int] | None = None,
) -> tuple[np.ndarray, dict]:
    """The rows of W of a panel (``wt``, component-major (k, r)) updated for H (k, n), from one
    read of the panel (``values``, ``pattern`` from ``observed``); ``l1``, ``l2`` are per
    observed entry (each row's are scaled by its count).

    Returns the new block and what the objective needs at the block it started from: ``loss``
    (½·Σ_Ω(x − w·h)², by the Gram identity of each row: Σx² − 2·w·c + wᵀ·G·w), ``sum_w`` and
    ``sq_w`` (Σ_i n_i·Σw_i and Σ_i n_i·‖w_i‖²), and the ``violation`` of the first sweep.
    """
    n_rows = counts(pattern, axis=1)
    problems = _row_problems(values, pattern, h, n_rows)
    return _update_rows(wt, problems, n_rows, 0.5 * _sum_sq(values), l1, l2, n_sweeps, order)


def _sum_sq(values) -> float:
    """Σx² over the observed entries (zero elsewhere in ``values``), in float64."""
    data = values.data if sp.issparse(values) else values.ravel()
    return float(np.dot(data, data.astype(np.float64)))


def row_sums(values, pattern, h: np.ndarray) -> tuple:
    """A block's part of its rows' problems, for rows whose columns come in blocks (the 2-D
    scheme sums them along each row of blocks): ``(C = H·X_bᵀ (k, r), packed Gram matrices
    (r, k(k+1)/2), Σx² over the observed entries, observed entries per row)``."""
    quadratic = np.ascontiguousarray(packed_outer(h).T)  # (n, p)
    step, r = _block_rows(1, pattern), values.shape[0]
    grams = np.zeros((r, quadratic.shape[1]), dtype=h.dtype)
    for start in range(0, r, step):
        rows = slice(start, min(r, start + step))
        grams[rows] = _pattern_rows(pattern, rows, h.dtype) @ quadratic
    sum_sq = np.float64(_sum_sq(values))
    return kernels.dot_h(values, h), grams, sum_sq, counts(pattern, axis=1)


def update_rows_from(sums: tuple, wt: np.ndarray, *, l1, l2, n_sweeps, order=None):
    """``update_rows`` from its problems summed over the column blocks (``row_sums``)."""
    n_rows, sum_sq = sums[3], sums[2]
    problems = _summed_problems(sums)
    return _update_rows(wt, problems, n_rows, 0.5 * float(sum_sq), l1, l2, n_sweeps, order)


def _summed_problems(sums: tuple):
    """``_row_problems`` from the problems summed over the column blocks (``row_sums``)."""
    cross, packed, _, n_rows = sums
    k, r = cross.shape
    step = _block_rows(k)
    for start in range(0, r, step):
        rows = slice(start, min(r, start + step))
        yield rows, unpack(packed[rows], k), cross[:, rows], n_rows[rows]


def _update_rows(wt, problems, n_rows, loss: float, l1, l2, n_sweeps, order):
    """HALS sweeps on each row's problem in ``problems`` (blocks of rows); ``loss`` starts at
    ½Σx²."""
    sum_w, sq_w = weighted_sums(wt, n_rows)
    violation = 0.0
    wt = wt.copy()  # updated in place; the input may be a block other tasks still read
    for rows, grams, c, count in problems:
        block = wt[:, rows]
        loss -= float(np.einsum("kr,kr->", block, c, dtype=np.float64))
        loss += 0.5 * float(np.einsum("kr,rkl,lr->", block, grams, block, dtype=np.float64))
        violation += hals(block, grams, c, l1 * count, l2 * count, n_sweeps, order)
    wt[:, n_rows == 0] = 0  # nothing observed: nothing to fit
    return wt, {"loss": loss, "sum_w": sum_w, "sq_w": sq_w, "violation": violation}


def column_partials(values, pattern, wt: np.ndarray, col_bounds: Sequence[int]) -> tuple:
    """The partials of the column problems from a panel's new rows of W, per column block j:
    ``(packed Σ_{i∈Ω_j} w_i·w_iᵀ of shape (n_j, k(k+1)/2), observed entries per column)``.
    The right-hand sides Σ_i x_ij·w_i are the unmasked fit's W_iᵀ·X_i (``kernels.dot_w``)."""
    r = wt.shape[1]
    quadratic = np.ascontiguousarray(packed_outer(wt).T)  # (r, p)
    if sp.issparse(pattern):
        grams = np.asarray(pattern.T @ quadratic)
    else:
        grams = np.zeros((pattern.shape[1], quadratic.shape[1]), dtype=wt.dtype)
        rows = _block_rows(1, pattern)
        for start in range(0, r, rows):
            block = _pattern_rows(pattern, slice(start, start + rows), wt.dtype)
            grams += block.T @ quadratic[start : start + rows]
    n_cols = counts(pattern, axis=0)
    return tuple((grams[a:b], n_cols[a:b]) for a, b in itertools.pairwise(col_bounds))


def update_columns(
    h: np.ndarray,
    packed_grams: np.ndarray,
    n_cols: np.ndarray,
    cross: np.ndarray,
    *,
    l1: float,
    l2: float,
    n_sweeps: int,
    order: Sequence[int] | None = None,
) -> tuple[np.ndarray, float]:
    """A column block of H (k, n_j) updated from the summed ``column_partials`` and
    A_j = Σ_i W_iᵀ·X_ij (``cross``), in place; returns it and the violation of the first
    sweep. Columns without an observed entry are zero."""
    k, n = h.shape
    violation = 0.0
    columns = _block_rows(k)
    for start in range(0, n, columns):
        stop = min(n, start + columns)
        grams = unpack(packed_grams[start:stop], k)
        count = n_cols[start:stop]
        block = h[:, start:stop]
        violation += hals(
            block, grams, cross[:, start:stop], l1 * count, l2 * count, n_sweeps, order
        )
    h[:, n_cols == 0] = 0
    return h, violation


def weighted_sums(ft: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Σ_r weight_r·Σf_r and Σ_r weight_r·‖f_r‖² of a component-major factor (k, r), in
    float64: the penalties' sums with each row's (column's) count as its weight."""
    column_sums = ft.sum(axis=0, dtype=np.float64)
    column_squares = np.einsum("kr,kr->r", ft, ft, dtype=np.float64)
    return float(np.dot(weights, column_sums)), float(np.dot(weights, column_squares))


def residual_sq(values, pattern, wt: np.ndarray, h: np.ndarray) -> float:
    """Σ_Ω (x − w·h)² of a panel in float64, exactly (the final error pass): over the stored
    entries of sparse X, over row blocks of dense X."""
    total = 0.0
    if sp.issparse(values):
        rows = np.repeat(np.arange(values.shape[0]), np.diff(values.indptr))
        step = max(1, BLOCK_BYTES // (8 * wt.shape[0]))
        for start in range(0, values.nnz, step):
            i, j = rows[start : start + step], values.indices[start : start + step]
            product = np.einsum("kr,kr->r", wt[:, i], h[:, j], dtype=np.float64)
            difference = values.data[start : start + step] - product
            total += float(np.dot(difference, difference))
        return total
    rows = _block_rows(1, pattern)
    for start in range(0, values.shape[0], rows):
        block = values[start : start + rows] - wt[:, start : start + rows].T @ h
        block = np.where(pattern[start : start + rows], block, 0).astype(np.float64).ravel()
        total += float(np.dot(block, block))
    return total


def solve_rows(
    values, pattern, h: np.ndarray, *, l1: float, l2: float, max_iter: int, tol: float
) -> np.ndarray:
    """W of a panel for a fixed H (``transform``): each row's non-negative least squares over
    its observed entries, by HALS sweeps from zero until the violation falls to ``tol`` × its
    first value (or ``max_iter`` sweeps). Returns the (r, k) block."""
    problems = _row_problems(values, pattern, h, counts(pattern, axis=1))
    return _solve_rows(problems, h.shape[0], values.shape[0], h.dtype, l1, l2, max_iter, tol)


def solve_rows_from(sums: tuple, *, l1: float, l2: float, max_iter: int, tol: float):
    """``solve_rows`` from its problems summed over the column blocks (``row_sums``)."""
    cross = sums[0]
    problems = _summed_problems(sums)
    return _solve_rows(problems, *cross.shape, cross.dtype, l1, l2, max_iter, tol)


def _solve_rows(problems, k: int, r: int, dtype, l1, l2, max_iter: int, tol: float):
    wt = np.zeros((k, r), dtype=dtype)
    for rows, grams, c, count in problems:
        block = wt[:, rows]
        first = None
        for _ in range(max_iter):
            violation = hals(block, grams, c, l1 * count, l2 * count, 1)
            first = violation if first is None else first
            if first == 0 or violation <= tol * first:
                break
    return np.ascontiguousarray(wt.T)


# ---- β-divergences: multiplicative updates over the observed entries -------------------------


def product(values, pattern, wt: np.ndarray, h: np.ndarray):
    """W·H where it is observed: at the stored entries (in storage order) of sparse X, the
    whole (r, n) product of dense X (whose unobserved entries the callers mask)."""
    if sp.issparse(values):
        return divergence.sampled_product(values, wt, h)
    return wt.T @ h


def beta_divergence(values, pattern, wh, beta: float) -> float:
    """D_β(X | W·H) summed over the observed entries, as scikit-learn's ``_beta_divergence``
    sums it over all: the terms in X over the entries above ε, with W·H floored at ε there;
    the terms in W·H alone over every observed entry."""
    if sp.issparse(values):
        x, y = values.data.astype(np.float64), np.asarray(wh, dtype=np.float64)
    else:
        x, y = values[pattern].astype(np.float64), np.asarray(wh)[pattern].astype(np.float64)
    if beta == 2:
        return 0.5 * float(np.dot(x - y, x - y))
    keep = x > EPSILON
    x_kept, y_kept = x[keep], np.maximum(y[keep], EPSILON)
    if beta == 1:
        return float(np.dot(x_kept, np.log(x_kept / y_kept)) + y.sum() - x_kept.sum())
    if beta == 0:
        ratio = x_kept / y_kept
        return float(ratio.sum() - x.size - np.log(ratio).sum())
    cross = np.dot(x_kept, y_kept ** (beta - 1))
    total = (x_kept**beta).sum() - beta * cross + (beta - 1) * (y**beta).sum()
    return float(total / (beta * (beta - 1)))


def mu_parts(values, pattern, wh, beta: float):
    """X ∘ (W·H)^(β−2) and (W·H)^(β−1) over the observed entries (zero elsewhere), patterned
    like X: the matrices whose products with H and W are the numerators and denominators of
    the multiplicative updates (scikit-learn's guards)."""
    wh = np.array(wh, copy=True)
    if beta < 2:
        wh[wh < EPSILON] = EPSILON
    x = values.data if sp.issparse(values) else values
    numerator = x * wh ** (beta - 2) if beta != 2 else x
    denominator = wh ** (beta - 1) if beta != 2 else wh
    if sp.issparse(values):
        return divergence.with_values(values, numerator), divergence.with_values(
            values, denominator
        )
    return np.where(pattern, numerator, 0), np.where(pattern, denominator, 0)


def mu_w_statistics(values, pattern, wt, h, beta: float, with_divergence: bool = False):
    """Numerator and denominator (k, r) of the W update over the observed entries of a panel
    (``observed``), and D_β there when asked (else None): ``divergence.w_statistics``,
    masked."""
    wh = product(values, pattern, wt, h)
    value = beta_divergence(values, pattern, wh, beta) if with_divergence else None
    numerator, denominator = (kernels.dot_h(m, h) for m in mu_parts(values, pattern, wh, beta))
    return numerator, denominator, value


def mu_rows(values, pattern, h, wt, *, beta, l1, l2, n_sweeps) -> tuple[np.ndarray, dict]:
    """``update_rows`` for a β-divergence: ``n_sweeps`` multiplicative updates of the rows of W
    from the observed entries, penalties scaled by each row's count. Returns the new block and
    ``loss`` (D_β at the old block), ``sum_w``, ``sq_w``."""
    n_rows = counts(pattern, axis=1)
    sum_w, sq_w = weighted_sums(wt, n_rows)
    wt = wt.copy()  # updated in place
    loss = 0.0
    for sweep in range(n_sweeps):
        numerator, denominator, value = mu_w_statistics(values, pattern, wt, h, beta, sweep == 0)
        if sweep == 0:
            loss = value
        wt = mu_row_step(wt, numerator, denominator, n_rows, beta, l1, l2)
    wt[:, n_rows == 0] = 0
    return wt, {"loss": loss, "sum_w": sum_w, "sq_w": sq_w}


def mu_row_sums(values, pattern, wt, h, beta: float) -> tuple:
    """A block's part of its rows' multiplicative update (the 2-D scheme sums them along each
    row of blocks): ``(numerator, denominator, D_β over the observed entries, observed
    entries per row)`` at the W_i and H_j the iteration starts from."""
    numerator, denominator, value = mu_w_statistics(values, pattern, wt, h, beta, True)
    return numerator, denominator, np.float64(value), counts(pattern, axis=1)


def mu_rows_from(sums: tuple, wt, *, beta, l1, l2) -> tuple[np.ndarray, dict]:
    """``mu_rows`` (one sweep) from its statistics summed over the column blocks."""
    numerator, denominator, value, n_rows = sums
    sum_w, sq_w = weighted_sums(wt, n_rows)
    wt = mu_row_step(wt.copy(), numerator, denominator, n_rows, beta, l1, l2)
    wt[:, n_rows == 0] = 0
    return wt, {"loss": float(value), "sum_w": sum_w, "sq_w": sq_w}


def mu_row_step(wt, numerator, denominator, n_rows, beta: float, l1, l2) -> np.ndarray:
    """One multiplicative update of rows of W in place, penalties scaled by each row's
    count."""
    denominator = denominator + l1 * n_rows + l2 * n_rows * wt
    wt = mu.step(wt, numerator, denominator, gamma=divergence.mm_exponent(beta))
    if beta < 1:
        wt[wt < mu.TINY] = 0
    return wt


def mu_column_partials(values, pattern, wt, h, beta, col_bounds) -> tuple[tuple, tuple]:
    """The panel's parts of the H update at its new rows, per column block j: ``(denominator
    Wᵀ·(W·H)^(β−1) over the observed entries, observed entries per column)`` and the
    numerators Wᵀ·(X ∘ (W·H)^(β−2))."""
    wh = product(values, pattern, wt, h)
    numerator, denominator = (kernels.dot_w(m, wt) for m in mu_parts(values, pattern, wh, beta))
    n_cols = counts(pattern, axis=0)
    bounds = list(itertools.pairwise(col_bounds))
    seconds = tuple((denominator[:, a:b], n_cols[a:b]) for a, b in bounds)
    return seconds, tuple(numerator[:, a:b] for a, b in bounds)


def mu_columns(h, numerator, denominator, n_cols, *, beta, l1, l2) -> np.ndarray:
    """One multiplicative update of a column block of H from the summed partials."""
    denominator = denominator + l1 * n_cols + l2 * n_cols * h
    h = mu.step(h, numerator, denominator, gamma=divergence.mm_exponent(beta))
    if beta <= 1:
        h[h < mu.TINY] = 0
    h[:, n_cols == 0] = 0
    return h
