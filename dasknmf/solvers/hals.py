"""Hierarchical alternating least squares (HALS), scikit-learn's 'cd' solver.

One sweep updates the k components one after the other (Gauss–Seidel), each by the exact
minimizer of the Frobenius objective in that component, clipped at zero — the same update as
``sklearn.decomposition._cdnmf_fast``, vectorized over the rows of the panel. Further sweeps
reuse the same statistics at O(k²·r) each (Gillis & Glineur 2012).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dasknmf import _compiled


def update(
    F: np.ndarray,
    gram: np.ndarray,
    cross: np.ndarray,
    *,
    l1: float = 0.0,
    l2: float = 0.0,
    n_sweeps: int = 1,
    order: Sequence[int] | None = None,
) -> tuple[np.ndarray, float]:
    """Run HALS sweeps on ``F`` in place.

    Minimizes ½‖X − Fᵀ·G‖² + l1·ΣF + ½·l2·‖F‖² over F ≥ 0, where ``gram`` = G·Gᵀ and
    ``cross`` = G·Xᵀ for the other factor G.

    Parameters
    ----------
    F : ndarray of shape (n_components, r)
        Current factor, component-major; updated in place.
    gram : ndarray of shape (n_components, n_components)
        Gram matrix of the other factor.
    cross : ndarray of shape (n_components, r)
        Cross product of X with the other factor.
    l1, l2 : float
        L1 and L2 penalties on F.
    n_sweeps : int
        Number of passes over the components.
    order : sequence of int, optional
        Order in which the components are visited (scikit-learn's ``shuffle``).

    Returns
    -------
    F : ndarray of shape (n_components, r)
    violation : float
        L1 norm of the projected gradient met during the first sweep, scikit-learn's
        convergence measure; for stacked problems (F of shape (R, k, r)) each one's, (R,).
    """
    if F.ndim == 3:
        return _update_stacked(F, gram, cross, l1, l2, n_sweeps, order)
    n_components = F.shape[0]
    if l2:
        gram = gram + l2 * np.eye(n_components, dtype=gram.dtype)
    if l1:
        cross = cross - F.dtype.type(l1)
    if order is None:
        order = range(n_components)
    # With D = diag(gram), the update of component t is
    #   F[t] <- max(F[t] + (cross[t] - gram[t] @ F) / D[t], 0) = max(c[t] - M[t] @ F, 0)
    # for c = cross / D and M = gram / D with a zero diagonal: three numpy calls per
    # component instead of five (sweeps are many, and hold the GIL between calls), into
    # buffers made once.
    diag = np.diag(gram).copy()
    curved = _curved(diag)
    diag[~curved] = 0
    safe = np.where(curved, diag, 1)
    scaled_cross = cross / safe[:, None]
    coupling = gram / safe[:, None]
    np.fill_diagonal(coupling, 0)
    # The first sweep's violation is formed at its end, in a few calls over all components
    # rather than several per component, from each one's value before its update (``before``)
    # and its unclipped update; a flat component's gradient is taken when it is met (it
    # depends on the components updated before it). The buffers have the dtypes of numpy's
    # own temporaries: the same bits as the expressions written out.
    product = np.empty(F.shape[1], np.result_type(coupling, F))
    unclipped = np.zeros(F.shape, np.result_type(scaled_cross, product))
    before, later, flat = F.copy(), unclipped[0].copy(), {}
    for sweep in range(n_sweeps):
        for t in order:
            if not curved[t]:
                if sweep == 0:  # no update, but scikit-learn counts its gradient
                    flat[t] = float(violation_of(F[t], gram[t] @ F - cross[t], in_place=True))
                continue
            np.matmul(coupling[t], F, out=product)
            u = unclipped[t] if sweep == 0 else later
            np.subtract(scaled_cross[t], product, out=u)
            np.maximum(u, 0, out=F[t])
        if sweep == 0:
            per_component = _violations(before, unclipped, diag)
    violation = 0.0
    if n_sweeps:
        for t in order:
            violation += flat[t] if t in flat else float(per_component[t])
    return F, violation


def _curved(diag: np.ndarray) -> np.ndarray:
    """The components an update divides by their curvature (the diagonal of the other
    factor's Gram matrix, per problem along the last axis); the others are flat, left as they
    are. A curvature below ε² of the largest is flat too: the rounding of the coupling terms
    G_ts·F_s, up to ε·√(G_tt·G_ss)·|F_s|, divided by G_tt then exceeds the other components'
    values, so the step is noise — and after an extrapolation push had left such a component
    of H at 1e-104 of the others, its W came out at 1e130 and the objective overflowed (X of
    1e50 and 1e-128, k = 2; found by hypothesis)."""
    eps = np.finfo(diag.dtype).eps if diag.dtype.kind == "f" else np.finfo(float).eps
    return diag > eps * eps * diag.max(axis=-1, keepdims=True, initial=0)


def _update_stacked(F, gram, cross, l1, l2, n_sweeps, order) -> tuple[np.ndarray, np.ndarray]:
    """``update`` of independent problems at once (stacked replicates): F (R, k, r), gram
    (R, k, k), cross (R, k, r). Component t of every problem is updated by one batched product,
    so the numpy calls per sweep are k, not R·k. The violation is each problem's, (R,)."""
    n_components = F.shape[1]
    if l2:
        gram = gram + l2 * np.eye(n_components, dtype=gram.dtype)
    if l1:
        cross = cross - F.dtype.type(l1)
    if order is None:
        order = range(n_components)
    diag = np.diagonal(gram, axis1=1, axis2=2).copy()  # (R, k)
    curved = _curved(diag)
    diag[~curved] = 0
    safe = np.where(curved, diag, 1)
    scaled_cross = cross / safe[:, :, None]
    coupling = gram / safe[:, :, None]
    coupling[:, np.arange(n_components), np.arange(n_components)] = 0
    if _compiled.enabled() and F.flags.c_contiguous:
        dtype = F.dtype
        violations = _compiled.hals_stacked(
            F,
            coupling.astype(dtype, copy=False),
            scaled_cross.astype(dtype, copy=False),
            diag.astype(dtype, copy=False),
            order,
            n_sweeps,
        )
        return F, violations
    violations = np.zeros(F.shape[0])
    for sweep in range(n_sweeps):
        for t in order:
            unclipped = scaled_cross[:, t] - np.matmul(coupling[:, t : t + 1], F)[:, 0]
            bent = curved[:, t, None]
            if sweep == 0:  # a flat component is not updated, but its gradient counts
                grad = np.where(bent, diag[:, t, None] * (F[:, t] - unclipped), -unclipped)
                violations += violation_of(F[:, t], grad, in_place=True)
            F[:, t] = np.where(bent, np.maximum(unclipped, 0), F[:, t])
    return F, violations


def _violations(before: np.ndarray, unclipped: np.ndarray, diag: np.ndarray) -> np.ndarray:
    """``violation_of`` each component (row) from its value before its update and its
    unclipped update (overwritten), the gradient being diag·(before − unclipped)."""
    grad = np.subtract(before, unclipped, out=unclipped)
    grad *= diag[:, None]
    return violation_of(before, grad, in_place=True)


def violation_of(f: np.ndarray, grad: np.ndarray, in_place: bool = False):
    """L1 norm of the projected gradient, in float64: where f is 0 only a negative gradient
    counts. Along the last axis: one value for a component, one per row of a 2-D ``f``.
    ``in_place``: ``grad`` is a buffer of the caller's, overwritten."""
    projected = grad if in_place else grad.copy()
    np.minimum(projected, 0, out=projected, where=f == 0)
    return np.add.reduce(np.abs(projected, out=projected), axis=-1, dtype=np.float64)


def converged(n_iter: int, tol: float, history: dict, window: int = 1) -> bool:
    """scikit-learn's 'cd' rule: projected-gradient violation ≤ tol × that of iteration 1 — for
    each of the last ``window`` iterations (scikit-learn's: the last one)."""
    violations = history["violation"]
    first = violations[0]
    if first == 0:
        return True
    return len(violations) >= window and max(violations[-window:]) <= tol * first
