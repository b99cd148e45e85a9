"""The numba kernels behind ``dasknmf._compiled``, in their own module so that importing
dasknmf (on the client or on a worker) does not import numba and LLVM (~60 MiB per process)
unless a compiled kernel is actually called."""

from __future__ import annotations

import math

import numba
import numpy as np

# fastmath lets the k-long reductions vectorize (X is finite, validated before any fit);
# accumulating in the factors' dtype, as scikit-learn does, halves the time again. The small
# helpers are inlined into the kernels (numba IR), so they compile with the kernels' flags.


@numba.njit(inline="always", fastmath=True)
def _floored_dot(w_r, h_c, eps):  # pragma: no cover
    """max(w_r·h_c, ε): W·H at one stored entry, with scikit-learn's floor."""
    wh = w_r[0] * h_c[0]
    for t in range(1, w_r.size):
        wh += w_r[t] * h_c[t]
    return eps if wh < eps else wh


@numba.njit(inline="always", fastmath=True)
def _add_scaled(out, q, v):  # pragma: no cover
    """out += q·v over the k components."""
    for t in range(v.size):
        out[t] += q * v[t]


@numba.njit(inline="always", fastmath=True)
def _scatter_row(start, stop, indices, data, w_r, ht, eps, out):  # pragma: no cover
    """out[c] += x_p / max(w_r·h_c, ε) · w_r over the stored entries p of one row."""
    for p in range(start, stop):
        c = indices[p]
        _add_scaled(out[c], data[p] / _floored_dot(w_r, ht[c], eps), w_r)


@numba.njit(nogil=True, cache=True, fastmath=True)
def kl_rows(indptr, indices, data, w, ht, eps, out, with_divergence):  # pragma: no cover
    """out[r] += Σ_p x_p / max(w_r·h_c, ε) · h_c over the stored entries (r, c) of X; with
    ``with_divergence``, also Σ x·log(x / max(wh, ε)) and Σ x over entries x > ε."""
    divergence = 0.0
    total = 0.0
    for r in range(indptr.size - 1):
        w_r, out_r = w[r], out[r]
        for p in range(indptr[r], indptr[r + 1]):
            h_c = ht[indices[p]]
            x = data[p]
            q = x / _floored_dot(w_r, h_c, eps)
            _add_scaled(out_r, q, h_c)
            if with_divergence and x > eps:
                divergence += x * math.log(q)
                total += x
    return divergence, total


@numba.njit(nogil=True, cache=True, fastmath=True)
def kl_columns(indptr, indices, data, w, ht, eps, out):  # pragma: no cover
    """out[c] += Σ_p x_p / max(w_r·h_c, ε) · w_r over the stored entries (r, c) of X."""
    for r in range(indptr.size - 1):
        _scatter_row(indptr[r], indptr[r + 1], indices, data, w[r], ht, eps, out)


@numba.njit(nogil=True, cache=True, fastmath=True)
def kl_update_rows(indptr, indices, data, w, ht, den, l2, eps, out):  # pragma: no cover
    """The multiplicative Kullback–Leibler update of W, row by row, fused with the numerator
    of the H update: for each row r, num = Σ_p x_p / max(w_r·h_c, ε) · h_c (with the old w_r),
    then w_r ← w_r ∘ num / d for d = den + l2·w_r (ε where d = 0, as in ``mu.step``), then
    out[c] += x_p / max(w_r·h_c, ε) · w_r with the new w_r — while the row's h_c are still
    in cache. Also returns Σ x·log(x / max(wh, ε)) and Σ x over x > ε at the old W."""
    k = w.shape[1]
    num = np.empty(k, dtype=w.dtype)
    # The ratios x / wh of a row, for the logarithms: taken in a loop of their own after the
    # row's gathers, they cost 10% less time (measured on the sparse benchmark).
    longest = np.max(indptr[1:] - indptr[:-1]) if indptr.size > 1 else 0
    ratios = np.empty(longest, dtype=w.dtype)
    divergence = 0.0
    total = 0.0
    for r in range(indptr.size - 1):
        w_r = w[r]
        num[:] = 0
        start, stop = indptr[r], indptr[r + 1]
        for p in range(start, stop):
            h_c = ht[indices[p]]
            q = data[p] / _floored_dot(w_r, h_c, eps)
            ratios[p - start] = q
            _add_scaled(num, q, h_c)
        for p in range(start, stop):
            x = data[p]
            if x > eps:
                divergence += x * math.log(ratios[p - start])
                total += x
        for t in range(k):
            d = den[t] + l2 * w_r[t]
            if d == 0:
                d = eps
            w_r[t] *= num[t] / d
        _scatter_row(start, stop, indices, data, w_r, ht, eps, out)
    return divergence, total
