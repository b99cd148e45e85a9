"""Multiplicative updates (Lee & Seung 2001; Févotte & Idier 2011), scikit-learn's 'mu'."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# scikit-learn's guard against a zero denominator.
EPSILON = np.finfo(np.float32).eps
#: Factors below this are set to zero after a β < 1 (W) or β ≤ 1 (H) update, as scikit-learn
#: does "for stability".
TINY = np.finfo(np.float64).eps

#: scikit-learn evaluates the 'mu' stopping rule every this many iterations.
CHECK_EVERY = 10


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
    """Run multiplicative updates on ``F`` in place.

    F ← F ∘ cross / (gram·F + l1 + l2·F), scikit-learn's rule for the Frobenius loss.
    Parameters as in :func:`dasknmf.solvers.hals.update`; ``order`` is ignored (all
    components move at once). The violation is not measured by this rule and is NaN.
    """
    for _ in range(n_sweeps):
        F = step(F, cross, gram @ F, l1=l1, l2=l2)
    return F, float("nan")


def step(
    F: np.ndarray,
    numerator: np.ndarray,
    denominator: np.ndarray,
    *,
    l1: float = 0.0,
    l2: float = 0.0,
    gamma: float = 1.0,
) -> np.ndarray:
    """One multiplicative update of ``F`` in place: F ← F ∘ (numerator / (denominator + l1 +
    l2·F))^γ, with scikit-learn's guard against a zero denominator. ``denominator`` may be
    a column (k, 1) broadcast over F (then, without l2, it stays that small); it is not
    modified."""
    if l1:
        denominator = denominator + l1
    if l2:
        denominator = denominator + l2 * F
    denominator = np.where(denominator == 0, EPSILON, denominator)
    ratio = numerator / denominator
    if gamma != 1:
        ratio **= gamma
    F *= ratio
    return F


def converged(n_iter: int, tol: float, history: dict) -> bool:
    """scikit-learn's 'mu' rule: every 10 iterations, stop when the reconstruction error fell
    by less than tol × the error at the initialization since the previous check."""
    if n_iter % CHECK_EVERY:
        return False
    errors = history["error"]  # errors[0] is at the initialization
    if errors[0] == 0:  # X is zero, or its squares underflow: no measure; on to max_iter
        return False  # (scikit-learn's rule, on NaN ratios, never stops there either)
    previous = errors[n_iter - CHECK_EVERY]
    return (previous - errors[n_iter]) / errors[0] < tol
