"""Per-panel math on one row panel of X: numpy dense or scipy.sparse, no Dask.

Factors are held component-major: ``Wt`` is (k, m_i) for a panel of m_i rows and ``H`` is
(k, n) or a column block (k, n_j), so that both factor updates work on contiguous rows.
Every product returns a dense numpy array; a sparse panel is never densified.
"""

from __future__ import annotations

from functools import singledispatch

import numpy as np
import scipy.sparse as sp

# Layout of the vector returned by ``panel_moments`` (combined with ``combine_moments``).
MOMENT_MIN, MOMENT_NONFINITE, MOMENT_SUM, MOMENT_SUMSQ, MOMENT_NNZ, MOMENT_SIZE = range(6)

_SPARSE_TYPES = (sp.sparray, sp.spmatrix)


def _register_sparse(generic):
    """Register one implementation for both scipy sparse array and matrix classes."""

    def decorator(func):
        for cls in _SPARSE_TYPES:
            generic.register(cls)(func)
        return func

    return decorator


@singledispatch
def aligned(x):
    """``x`` with its buffers aligned for its dtype, copied only if they are not.

    Arrays that a Dask worker received over the network can sit at unaligned addresses
    (``flags.aligned`` False); BLAS then took 9x longer on them here (80 ms instead of 9 ms for
    H·Xᵀ of a 5000×2000 float32 panel).
    """
    raise TypeError(f"dasknmf kernels do not handle panels of type {type(x).__name__}")


@aligned.register
def _(x: np.ndarray) -> np.ndarray:
    return x if x.flags.aligned else np.require(x, requirements="A")


@_register_sparse(aligned)
def _(x):
    if all(a.flags.aligned for a in (x.data, x.indices, x.indptr)):
        return x
    return x.copy()


@singledispatch
def dot_h(x, h: np.ndarray) -> np.ndarray:
    """H @ X_iᵀ, of shape (k, m_i), for a panel X_i (m_i, n) and H (k, n)."""
    raise TypeError(f"dasknmf kernels do not handle panels of type {type(x).__name__}")


@dot_h.register
def _(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    return h @ x.T


#: A sparse panel's products with a factor of more components than this run over blocks of
#: ``_SPARSE_BLOCK`` components: scipy's kernel gathers a row of the factor per stored entry,
#: and the factor's rows for a block of components stay in cache (n × 16 values) where those
#: for all of them do not. Measured on 25,000 rows of the sparse benchmark's matrix (n =
#: 20,000), 400 components: AMD EPYC (1 MB L2) 0.35 s in one product, 0.20 s in blocks of 64;
#: Intel Xeon (2 MB L2 a core) H·Xᵀ 0.175 s in one, 0.17 in blocks of 64, 0.14 of 32, 0.10 of
#: 16, 0.13 of 8 (Wᵀ·X alike). At 100 components no gain. The bits are the same for any block.
_SPARSE_WIDE, _SPARSE_BLOCK = 128, 16


def _sparse_times(x, f: np.ndarray) -> np.ndarray:
    """(x @ fᵀ)ᵀ for a sparse x and a component-major f (k, ·), k ≥ ``_SPARSE_WIDE`` in blocks
    of components: each entry is summed as in one product (bit for bit)."""
    if f.shape[0] <= _SPARSE_WIDE:
        return np.ascontiguousarray((x @ f.T).T)
    out = np.empty((f.shape[0], x.shape[0]), dtype=np.result_type(x.dtype, f.dtype))
    for start in range(0, f.shape[0], _SPARSE_BLOCK):
        block = slice(start, start + _SPARSE_BLOCK)
        out[block] = (x @ f[block].T).T
    return out


@_register_sparse(dot_h)
def _(x, h: np.ndarray) -> np.ndarray:
    return _sparse_times(x, h)


@singledispatch
def dot_w(x, wt: np.ndarray) -> np.ndarray:
    """Wᵢᵀ @ X_i, of shape (k, n), for a panel X_i (m_i, n) and Wt_i (k, m_i)."""
    raise TypeError(f"dasknmf kernels do not handle panels of type {type(x).__name__}")


@dot_w.register
def _(x: np.ndarray, wt: np.ndarray) -> np.ndarray:
    return wt @ x


@_register_sparse(dot_w)
def _(x, wt: np.ndarray) -> np.ndarray:
    return _sparse_times(x.T, wt)


@singledispatch
def panel_moments(x) -> np.ndarray:
    """Min, count of non-finite values, Σx, Σx², nnz and size of a panel (float64)."""
    raise TypeError(f"dasknmf kernels do not handle panels of type {type(x).__name__}")


#: Values per block in ``panel_moments``: bounds its float64 temporaries to 8 MiB.
_MOMENT_BLOCK = 2**20


def _moments_of_values(values: np.ndarray, size: int) -> np.ndarray:
    """Moments of the stored values (all of a dense panel; ``data`` of a sparse one), summed
    in float64 over blocks so that no float64 copy of the whole panel is made."""
    stored_min, n_nonfinite, total, total_sq, nnz = np.inf, 0, 0.0, 0.0, 0
    for start in range(0, values.size, _MOMENT_BLOCK):
        block = values[start : start + _MOMENT_BLOCK].astype(np.float64)
        finite = np.isfinite(block)
        if not finite.all():
            n_nonfinite += block.size - int(np.count_nonzero(finite))
            block = block[finite]
        if block.size:
            stored_min = min(stored_min, float(block.min()))
        total += float(block.sum())
        total_sq += float(np.dot(block, block))
        nnz += int(np.count_nonzero(block))
    if size > values.size:  # a sparse panel has implicit zeros
        stored_min = min(stored_min, 0.0)
    return np.array([stored_min, n_nonfinite, total, total_sq, nnz, size])


@panel_moments.register
def _(x: np.ndarray) -> np.ndarray:
    return _moments_of_values(x.reshape(-1), x.size)


@_register_sparse(panel_moments)
def _(x) -> np.ndarray:
    return _moments_of_values(x.data, x.shape[0] * x.shape[1])


def combine_moments(*moments: np.ndarray) -> np.ndarray:
    """Combine ``panel_moments`` of several panels, in the order given."""
    total = np.sum(moments, axis=0)
    total[MOMENT_MIN] = min(m[MOMENT_MIN] for m in moments)
    return total


@singledispatch
def residual_sq(x, wt: np.ndarray, h: np.ndarray) -> float:
    """‖X_i − W_i·H‖²_F in float64 for one panel."""
    raise TypeError(f"dasknmf kernels do not handle panels of type {type(x).__name__}")


#: Bytes of X_i − W_i·H formed at a time by ``residual_sq`` (per block of rows).
RESIDUAL_BLOCK_BYTES = 4 * 2**20


@residual_sq.register
def _(x: np.ndarray, wt: np.ndarray, h: np.ndarray) -> float:
    # In blocks of rows: the whole residual, and its float64 copy, would take three times the
    # panel beside it (a worker sized for the iterations was killed in this pass). The blocks
    # are formed in two buffers made once: a Dask worker process runs with glibc's
    # MALLOC_TRIM_THRESHOLD_ set (distributed's default), which maps every large array afresh,
    # and a new array per block made this pass 10x slower there than in the driver (stacked
    # fits run it once per fit: 22 s against 2.4 s for 90 fits on a 64 MB panel).
    rows = max(1, RESIDUAL_BLOCK_BYTES // max(1, 8 * x.shape[1]))
    if not x.dtype == wt.dtype == h.dtype:
        return _residual_sq_mixed(x, wt, h, rows)
    shape = (min(rows, x.shape[0]), x.shape[1])
    block = np.empty(shape, x.dtype)
    wide = None if x.dtype == np.float64 else np.empty(shape, np.float64)
    total = 0.0
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        part = block[: stop - start]
        np.matmul(wt[:, start:stop].T, h, out=part)
        np.subtract(x[start:stop], part, out=part)
        if wide is not None:
            np.copyto(wide[: stop - start], part)
            part = wide[: stop - start]
        flat = part.ravel()
        total += float(np.dot(flat, flat))
    return total


def _residual_sq_mixed(x, wt, h, rows: int) -> float:
    total = 0.0
    for start in range(0, x.shape[0], rows):
        block = x[start : start + rows] - wt[:, start : start + rows].T @ h
        block = block.astype(np.float64, copy=False).ravel()
        total += float(np.dot(block, block))
    return total


@_register_sparse(residual_sq)
def _(x, wt: np.ndarray, h: np.ndarray) -> float:
    # W·H is dense; evaluate the norm by the Gram identity instead of forming it.
    data = x.data.astype(np.float64, copy=False)
    cross = np.vdot(dot_w(x, wt).astype(np.float64), h.astype(np.float64))
    gram = np.vdot((wt @ wt.T).astype(np.float64), (h @ h.T).astype(np.float64))
    return float(max(np.dot(data, data) - 2.0 * cross + gram, 0.0))
