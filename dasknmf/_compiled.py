"""Compiled kernels for a sparse panel under the Kullback–Leibler divergence (numba).

Per iteration the KL update of a sparse panel needs W·H at every stored entry twice (with the
old and with the new W), and each time the product of X ∘ 1/(W·H) with a factor. The numpy
path (``dasknmf.divergence``) does each as a separate pass with nnz × k gathers; here one loop
over the stored entries does both, without temporaries. Used when numba is installed
(``pip install "dasknmf[fast]"``) and ``dasknmf.compiled`` is not False; the results agree with
the numpy path to rounding (tests/test_compiled.py).
"""

from __future__ import annotations

import math

import dask
import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None


def enabled() -> bool:
    """Whether the compiled kernels are used: numba is importable and the config allows it."""
    setting = dask.config.get("dasknmf.compiled", "auto")
    if setting in (False, "false", "False", 0):
        return False
    if numba is None:
        if setting in (True, "true", "True"):
            raise ImportError("dasknmf.compiled is True but numba is not installed.")
        return False
    return True


if numba is not None:
    # fastmath lets the k-long reductions vectorize (X is finite, validated before any fit);
    # accumulating in the factors' dtype, as scikit-learn does, halves the time again.

    @numba.njit(nogil=True, cache=True, fastmath=True)
    def _kl_rows(indptr, indices, data, w, ht, eps, out, with_divergence):  # pragma: no cover
        """out[r] += Σ_p x_p / max(w_r·h_c, ε) · h_c over the stored entries (r, c) of X; with
        ``with_divergence``, also Σ x·log(x / max(wh, ε)) and Σ x over entries x > ε."""
        k = w.shape[1]
        divergence = 0.0
        total = 0.0
        for r in range(indptr.size - 1):
            w_r, out_r = w[r], out[r]
            for p in range(indptr[r], indptr[r + 1]):
                h_c = ht[indices[p]]
                wh = w_r[0] * h_c[0]
                for t in range(1, k):
                    wh += w_r[t] * h_c[t]
                if wh < eps:
                    wh = eps
                x = data[p]
                q = x / wh
                for t in range(k):
                    out_r[t] += q * h_c[t]
                if with_divergence and x > eps:
                    divergence += x * math.log(x / wh)
                    total += x
        return divergence, total

    @numba.njit(nogil=True, cache=True, fastmath=True)
    def _kl_columns(indptr, indices, data, w, ht, eps, out):  # pragma: no cover
        """out[c] += Σ_p x_p / max(w_r·h_c, ε) · w_r over the stored entries (r, c) of X."""
        k = w.shape[1]
        for r in range(indptr.size - 1):
            w_r = w[r]
            for p in range(indptr[r], indptr[r + 1]):
                c = indices[p]
                h_c = ht[c]
                wh = w_r[0] * h_c[0]
                for t in range(1, k):
                    wh += w_r[t] * h_c[t]
                if wh < eps:
                    wh = eps
                q = data[p] / wh
                out_c = out[c]
                for t in range(k):
                    out_c[t] += q * w_r[t]


def kl_w_numerator(x, wt: np.ndarray, h: np.ndarray, eps: float, with_divergence: bool):
    """(X ∘ 1/(W·H))·Hᵀ, component-major (k, m_i), for a CSR panel; and, if asked, the sums
    Σ x·log(x/wh) and Σ x of the divergence (else zeros)."""
    w, ht = np.ascontiguousarray(wt.T), np.ascontiguousarray(h.T)
    out = np.zeros_like(w)
    divergence, total = _kl_rows(
        x.indptr,
        x.indices,
        x.data.astype(w.dtype, copy=False),
        w,
        ht,
        w.dtype.type(eps),
        out,
        with_divergence,
    )
    return np.ascontiguousarray(out.T), divergence, total


def kl_h_numerator(x, wt: np.ndarray, h: np.ndarray, eps: float) -> np.ndarray:
    """Wᵀ·(X ∘ 1/(W·H)), (k, n), for a CSR panel."""
    w, ht = np.ascontiguousarray(wt.T), np.ascontiguousarray(h.T)
    out = np.zeros_like(ht)
    _kl_columns(
        x.indptr, x.indices, x.data.astype(w.dtype, copy=False), w, ht, w.dtype.type(eps), out
    )
    return np.ascontiguousarray(out.T)
