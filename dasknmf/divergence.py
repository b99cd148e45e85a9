"""β-divergences between a panel X_i and W_i·H, and the statistics of their multiplicative
updates — numpy dense or scipy.sparse panels, no Dask.

For a sparse panel W·H is evaluated only where X is stored (a sampled dense–dense product),
and the zeros enter in closed form where they can: for the Kullback–Leibler divergence
Σ(WH) = Σ_k colsum(W)_k · rowsum(H)_k. Only a β outside {0, 1, 2} needs Σ (WH)^β over every
entry; it is formed in blocks of rows, never as a whole dense panel. The guards against zero
and tiny values are scikit-learn's (``sklearn.decomposition._nmf``), so that the updates are
its updates.

Factors are component-major, as everywhere in dasknmf: ``wt`` is (k, m_i), ``h`` is (k, n).
"""

from __future__ import annotations

from functools import singledispatch

import numpy as np
import scipy.sparse as sp

from dasknmf import _compiled
from dasknmf.kernels import _register_sparse, dot_h, dot_w

#: scikit-learn's guard against dividing by (or taking a negative power of) zero.
EPSILON = np.finfo(np.float32).eps
#: Rows per block when a sparse panel needs W·H at every entry (general β only).
ROW_BLOCK = 1024
#: Stored entries per block of the sampled product.
SAMPLE_BLOCK = 1 << 16


def mm_exponent(beta: float) -> float:
    """γ of the majorization–minimization updates (Févotte & Idier 2011)."""
    if beta < 1:
        return 1.0 / (2.0 - beta)
    if beta > 2:
        return 1.0 / (beta - 1.0)
    return 1.0


# ---- W·H where it is needed ----------------------------------------------------------------


@singledispatch
def sampled_product(x, wt: np.ndarray, h: np.ndarray) -> np.ndarray:
    """W_i·H where the panel stores values: the whole (m_i, n) product for a dense panel, the
    values at the stored entries (in storage order) for a sparse one."""
    raise TypeError(f"dasknmf kernels do not handle panels of type {type(x).__name__}")


@sampled_product.register
def _(x: np.ndarray, wt: np.ndarray, h: np.ndarray) -> np.ndarray:
    return wt.T @ h


@_register_sparse(sampled_product)
def _(x, wt: np.ndarray, h: np.ndarray) -> np.ndarray:
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    w, ht = np.ascontiguousarray(wt.T), np.ascontiguousarray(h.T)
    out = np.empty(x.nnz, dtype=np.result_type(wt, h))
    for start in range(0, x.nnz, SAMPLE_BLOCK):
        stop = start + SAMPLE_BLOCK
        out[start:stop] = np.einsum("ij,ij->i", w[rows[start:stop]], ht[x.indices[start:stop]])
    return out


def _values(x) -> np.ndarray:
    return x.data if sp.issparse(x) else x


def with_values(x, values: np.ndarray):
    """A matrix shaped and patterned like panel ``x`` holding ``values``."""
    if sp.issparse(x):
        return x.__class__((values, x.indices, x.indptr), shape=x.shape)
    return values


# ---- the divergence --------------------------------------------------------------------------


def divergence(x, wh: np.ndarray, wt: np.ndarray, h: np.ndarray, beta: float) -> float:
    """The β-divergence D_β(X_i | W_i·H) of one panel, as scikit-learn's ``_beta_divergence``
    (without its square root): entries of X not above ε are left out, W·H is floored at ε.

    ``wh`` is ``sampled_product(x, wt, h)``. For β = 2 this is ½‖X_i − W_i·H‖².
    """
    x_values = _values(x).astype(np.float64).ravel()
    wh_values = np.asarray(wh, dtype=np.float64).ravel()
    if beta == 2:
        if sp.issparse(x):  # ‖X − WH‖² over every entry, with WH dense: by the Gram identity
            from dasknmf.kernels import residual_sq

            return 0.5 * residual_sq(x, wt, h)
        return 0.5 * float(np.dot(x_values - wh_values, x_values - wh_values))
    keep = x_values > EPSILON
    x_values, wh_values = x_values[keep], np.maximum(wh_values[keep], EPSILON)
    if beta == 1:
        return (
            float(np.dot(x_values, np.log(x_values / wh_values)))
            + _sum_wh(wt, h)
            - (x_values.sum())
        )
    if beta == 0:
        ratio = x_values / wh_values
        return float(ratio.sum() - x.shape[0] * x.shape[1] - np.log(ratio).sum())
    sum_wh_beta = _sum_power(x, wh, wt, h, beta)
    sum_x_wh = float(np.dot(x_values, wh_values ** (beta - 1)))
    return ((x_values**beta).sum() - beta * sum_x_wh + (beta - 1) * sum_wh_beta) / (
        beta * (beta - 1)
    )


def _sum_wh(wt: np.ndarray, h: np.ndarray) -> float:
    """Σ (W·H) over every entry, in closed form: colsum(W)·rowsum(H)."""
    return float(wt.sum(axis=1, dtype=np.float64) @ h.sum(axis=1, dtype=np.float64))


def _sum_power(x, wh, wt, h, beta) -> float:
    """Σ (W_i·H)^β over every entry of the panel (the zeros of X included)."""
    if not sp.issparse(x):
        return float((np.asarray(wh, dtype=np.float64) ** beta).sum())
    total = 0.0
    for block in _dense_rows(wt, h):
        total += float((block.astype(np.float64) ** beta).sum())
    return total


def _dense_rows(wt: np.ndarray, h: np.ndarray):
    """W_i·H in blocks of ``ROW_BLOCK`` rows."""
    for start in range(0, wt.shape[1], ROW_BLOCK):
        yield wt[:, start : start + ROW_BLOCK].T @ h


# ---- the statistics of a multiplicative update -----------------------------------------------


def weighted(x, wh: np.ndarray, beta: float):
    """X ∘ (W·H)^(β−2), patterned like X (scikit-learn's ``WH_safe_X``): the matrix whose
    products with H (for W) and with W (for H) are the numerators of the updates."""
    x_values = _values(x)
    wh = np.array(wh, copy=True)
    if beta < 2:
        wh[wh < EPSILON] = EPSILON
    if beta == 1:
        values = x_values / wh
    elif beta == 0:
        values = x_values / wh**2
    else:
        values = x_values * wh ** (beta - 2)
    return with_values(x, values)


def w_denominator(x, wh: np.ndarray, wt: np.ndarray, h: np.ndarray, beta: float) -> np.ndarray:
    """(W·H)^(β−1)·Hᵀ for the W update, component-major (k, m_i): for β = 1 the same column
    rowsum(H) for every row, returned once as (k, 1)."""
    if beta == 1:
        return h.sum(axis=1)[:, None]
    if not sp.issparse(x):
        return h @ _floored_power(wh, beta - 1).T
    return np.concatenate(
        [h @ _floored_power(block, beta - 1).T for block in _dense_rows(wt, h)], axis=1
    )


def h_denominator(x, wh: np.ndarray, wt: np.ndarray, h: np.ndarray, beta: float) -> np.ndarray:
    """The panel's part of Wᵀ·(W·H)^(β−1) for the H update, (k, n): for β = 1 only colsum(W_i),
    (k,), which the H update broadcasts."""
    if beta == 1:
        return wt.sum(axis=1)
    if not sp.issparse(x):
        return wt @ _floored_power(wh, beta - 1)
    total = np.zeros_like(h)
    for start, block in zip(range(0, wt.shape[1], ROW_BLOCK), _dense_rows(wt, h), strict=True):
        total += wt[:, start : start + ROW_BLOCK] @ _floored_power(block, beta - 1)
    return total


def _floored_power(wh: np.ndarray, exponent: float) -> np.ndarray:
    """(W·H)^exponent with scikit-learn's floor at ε for negative exponents."""
    wh = np.array(wh, copy=True)
    if exponent < 0:
        wh[wh < EPSILON] = EPSILON
    return wh**exponent


# ---- both together ---------------------------------------------------------------------------


def fused(x, beta: float) -> bool:
    """Whether the compiled Kullback–Leibler kernels serve this panel."""
    return beta == 1 and sp.issparse(x) and _compiled.enabled()


def kl_update(x, wt: np.ndarray, h: np.ndarray, *, l1: float = 0.0, l2: float = 0.0):
    """For a panel that ``fused`` serves: ``mu.step`` of W with ``w_statistics`` (β = 1), then
    ``h_statistics`` at the new W, in one compiled pass over the stored entries.

    Returns the new Wᵀ (k, m_i), the numerator and denominator of the H update, and
    D_KL(X_i | W_i·H) at the old W.
    """
    denominator = w_denominator(x, None, wt, h, 1)[:, 0]
    if l1:
        denominator = denominator + l1
    sum_wh = _sum_wh(wt, h)
    wt, numerator, logs, total = _compiled.kl_update(x, wt, h, denominator, l2, EPSILON)
    value = logs + sum_wh - total
    return wt, numerator, h_denominator(x, None, wt, h, 1), value


def kl_divergence(x, wt: np.ndarray, h: np.ndarray) -> float:
    """D_KL(X_i | W_i·H) of a panel that ``fused`` serves, in one compiled pass."""
    _, logs, total = _compiled.kl_w_numerator(x, wt, h, EPSILON, True)
    return logs + _sum_wh(wt, h) - total


def w_statistics(x, wt: np.ndarray, h: np.ndarray, beta: float, with_divergence: bool = False):
    """Numerator (X ∘ (W·H)^(β−2))·Hᵀ and denominator of the W update, both (k, m_i), and
    D_β(X_i | W_i·H) when asked (else None)."""
    if fused(x, beta):
        numerator, logs, total = _compiled.kl_w_numerator(x, wt, h, EPSILON, with_divergence)
        value = logs + _sum_wh(wt, h) - total if with_divergence else None
        return numerator, w_denominator(x, None, wt, h, beta), value
    wh = sampled_product(x, wt, h)
    value = divergence(x, wh, wt, h, beta) if with_divergence else None
    return dot_h(weighted(x, wh, beta), h), w_denominator(x, wh, wt, h, beta), value


def h_statistics(x, wt: np.ndarray, h: np.ndarray, beta: float):
    """The panel's numerator Wᵀ·(X ∘ (W·H)^(β−2)), (k, n), and denominator (see
    ``h_denominator``) of the H update."""
    if fused(x, beta):
        return _compiled.kl_h_numerator(x, wt, h, EPSILON), h_denominator(x, None, wt, h, beta)
    wh = sampled_product(x, wt, h)
    return dot_w(weighted(x, wh, beta), wt), h_denominator(x, wh, wt, h, beta)
