"""Compiled kernels for a sparse panel under the Kullback–Leibler divergence (numba).

Per iteration the KL update of a sparse panel needs W·H at every stored entry twice (with the
old and with the new W), and each time the product of X ∘ 1/(W·H) with a factor. The numpy
path (``dasknmf.divergence``) does each as a separate pass with nnz × k gathers; here one loop
over the stored entries does both, without temporaries — and ``kl_update`` also updates W
row by row in that loop, so that a row's columns of H are gathered from memory once for the
W update and the H numerator together (half the time of the two passes, measured on the
sparse benchmark). For k <= ``_numba_kernels.SPECIALIZED_MAX_K`` the kernels are
generated for the k at hand (a row's k components in registers; their source is kept under
``~/.cache/dasknmf/kernels`` for numba's cache). Used when numba is installed
(``pip install "dasknmf[fast]"``) and ``dasknmf.compiled`` is not False; the results agree with
the numpy path to rounding (tests/test_compiled.py).
"""

from __future__ import annotations

import functools
import importlib.util

import dask
import numpy as np


@functools.cache
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


@functools.cache
def _kernels():
    from dasknmf import _numba_kernels

    return _numba_kernels


def enabled() -> bool:
    """Whether the compiled kernels are used: numba is installed and the config allows it."""
    setting = dask.config.get("dasknmf.compiled", "auto")
    if setting in (False, "false", "False", 0):
        return False
    if not _numba_installed():
        if setting in (True, "true", "True"):
            raise ImportError("dasknmf.compiled is True but numba is not installed.")
        return False
    return True


def kl_w_numerator(x, wt: np.ndarray, h: np.ndarray, eps: float, with_divergence: bool):
    """(X ∘ 1/(W·H))·Hᵀ, component-major (k, m_i), for a CSR panel; and, if asked, the sums
    Σ x·log(x/wh) and Σ x of the divergence (else zeros)."""
    w, ht = np.ascontiguousarray(wt.T), np.ascontiguousarray(h.T)
    out = np.zeros_like(w)
    divergence, total = _kernels().run(
        "kl_rows",
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
    data = x.data.astype(w.dtype, copy=False)
    _kernels().run("kl_columns", x.indptr, x.indices, data, w, ht, w.dtype.type(eps), out)
    return np.ascontiguousarray(out.T)


def kl_update(x, wt: np.ndarray, h: np.ndarray, denominator: np.ndarray, l2: float, eps: float):
    """One multiplicative Kullback–Leibler update of a CSR panel's W, fused with the numerator
    of the H update: returns the new Wᵀ (k, m_i), Wᵀ_new·(X ∘ 1/(W_new·H)) (k, n) and the sums
    Σ x·log(x/wh) and Σ x of the divergence at the old W.

    ``denominator`` (k,) is the W update's denominator without its l2 term: rowsum(H) + l1.
    The update is ``mu.step``'s, for one row at a time."""
    w, ht = np.array(wt.T, order="C"), np.ascontiguousarray(h.T)
    out = np.zeros_like(ht)
    dtype = w.dtype.type
    divergence, total = _kernels().run(
        "kl_update_rows",
        x.indptr,
        x.indices,
        x.data.astype(w.dtype, copy=False),
        w,
        ht,
        denominator.astype(w.dtype, copy=False),
        dtype(l2),
        dtype(eps),
        out,
    )
    return np.ascontiguousarray(w.T), np.ascontiguousarray(out.T), divergence, total


def hals_stacked(
    F, coupling, scaled_cross, diag, order, n_sweeps: int, block: int | None = None
) -> np.ndarray:
    """HALS sweeps on the stacked problems F (R, k, r) in place, ``block`` rows at a time
    (default ``_numba_kernels.HALS_ROW_BLOCK``; see ``_numba_kernels.hals_stacked``); returns
    each problem's violation of the first sweep."""
    violations = np.zeros(F.shape[0])
    order = np.asarray(order, dtype=np.int64)
    kernels = _kernels()
    block = kernels.HALS_ROW_BLOCK if block is None else block
    kernels.hals_stacked(F, coupling, scaled_cross, diag, order, n_sweeps, block, violations)
    return violations
