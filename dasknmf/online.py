"""The online (mini-batch) multiplicative updates of scikit-learn's ``MiniBatchNMF``, per
batch of rows — plain functions of arrays, no Dask; ``dasknmf.minibatch`` runs them.

A batch task reads its rows X_b once: it updates W_b from H (one multiplicative step, or a
fresh solve), and returns the batch's part of the H update — the numerator Wᵀ·(X ∘
(WH)^(β−2)) and the denominator (for β = 2 the Gram matrix WᵀW, for β = 1 colsum(W)) — with
the batch's β-divergence. ``update_h`` then folds the summed parts of one round into the
running sums A and B with the forget factor ρ (Mairal et al. 2010; Lefèvre et al. 2011):
A ← ρ·A + numerator ∘ H^(1/γ), B ← ρ·B + denominator, H ← (A / B)^γ — scikit-learn's
``_multiplicative_update_h`` with ``A``, ``B`` and ``rho``, guards included.

Factors are component-major, as everywhere in dasknmf: ``wt`` is (k, m_b), ``h`` is (k, n).
``Convergence`` is scikit-learn's stopping rule over the steps' summaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dasknmf import divergence, kernels
from dasknmf._blas import pin_worker_blas
from dasknmf.objective import overflowed
from dasknmf.solvers import mu
from dasknmf.steps import panel_data


@dataclass(frozen=True)
class Online:
    """The loss and the penalties of a mini-batch fit, in scikit-learn's terms: the W
    penalties scale with n_features, the H penalties with the rows of each batch."""

    n_components: int
    beta: float = 2.0
    alpha_w: float = 0.0
    alpha_h: float = 0.0
    l1_ratio: float = 0.0
    n_features: int = 1
    tol: float = 1e-4

    @property
    def gamma(self) -> float:
        return divergence.mm_exponent(self.beta)

    def w_penalties(self) -> tuple[float, float]:
        return (
            self.n_features * self.alpha_w * self.l1_ratio,
            self.n_features * self.alpha_w * (1.0 - self.l1_ratio),
        )

    def h_penalties(self, n_rows: int) -> tuple[float, float]:
        return n_rows * self.alpha_h * self.l1_ratio, n_rows * self.alpha_h * (1.0 - self.l1_ratio)


def _fixed_h(online: Online, x, h: np.ndarray):
    """What the W updates of a batch share while H is fixed: for β = 2, H·X_bᵀ and H·Hᵀ
    (scikit-learn recomputes them in every update; the values are the same)."""
    return (kernels.dot_h(x, h), h @ h.T) if online.beta == 2 else None


def _w_step(online: Online, x, wt: np.ndarray, h: np.ndarray, fixed) -> np.ndarray:
    """One multiplicative update of W_b in place (scikit-learn's ``_multiplicative_update_w``)."""
    l1, l2 = online.w_penalties()
    if online.beta == 2:
        numerator, gram_h = fixed
        denominator = gram_h @ wt
    else:
        numerator, denominator, _ = divergence.w_statistics(x, wt, h, online.beta)
    return mu.step(wt, numerator, denominator, l1=l1, l2=l2, gamma=online.gamma)


def _mean(x) -> float:
    total = x.sum(dtype=np.float64)
    return float(total) / (x.shape[0] * x.shape[1])


def _solve(online: Online, x, h: np.ndarray, max_iter: int, fixed) -> np.ndarray:
    k = online.n_components
    start = np.sqrt(_mean(x) / k)
    wt = np.full((k, x.shape[0]), start, dtype=x.dtype)
    for _ in range(max_iter):
        before = wt.copy()
        wt = _w_step(online, x, wt, h, fixed)
        change = np.linalg.norm(wt - before) / np.linalg.norm(wt)
        if online.tol > 0 and change <= online.tol:
            break
    return wt


def solve_w(online: Online, h: np.ndarray, max_iter: int, x) -> np.ndarray:
    """W_b for a fixed H (scikit-learn's ``MiniBatchNMF._solve_W``, the heart of ``transform``):
    multiplicative updates from the constant √(mean(X_b)/k) until W changes by at most
    ``tol`` (relative) or after ``max_iter`` updates; returns Wᵀ_b, (k, m_b)."""
    pin_worker_blas()
    x, h = panel_data(x), kernels.aligned(h)
    return _solve(online, x, h, max_iter, _fixed_h(online, x, h))


def solve_w_rows(online: Online, h: np.ndarray, max_iter: int, x) -> np.ndarray:
    """``solve_w`` as W_b, (m_b, k) (a panel of ``transform``)."""
    return np.ascontiguousarray(solve_w(online, h, max_iter, x).T)


def _h_statistics(online: Online, x, wt, h, fixed, norm_x_sq: float):
    """The batch's numerator and denominator of the H update and D_β(X_b | W_b·H)."""
    beta = online.beta
    if beta == 2:
        numerator = kernels.dot_w(x, wt)  # Wᵀ·X_b, (k, n)
        denominator = wt @ wt.T  # WᵀW, (k, k): the update forms WᵀW·H
        # ½‖X_b − W_b·H‖² without forming W_b·H: ‖X_b‖² − 2⟨W_b, H·X_bᵀ⟩ + ⟨WᵀW, H·Hᵀ⟩.
        cross = np.vdot(wt.astype(np.float64), fixed[0].astype(np.float64))
        gram = np.vdot(denominator.astype(np.float64), fixed[1].astype(np.float64))
        return numerator, denominator, 0.5 * max(norm_x_sq - 2.0 * cross + gram, 0.0)
    if divergence.fused(x, beta):
        numerator, denominator = divergence.h_statistics(x, wt, h, beta)
        return numerator, denominator, divergence.kl_divergence(x, wt, h)
    wh = divergence.sampled_product(x, wt, h)
    value = divergence.divergence(x, wh, wt, h, beta)
    numerator = kernels.dot_w(divergence.weighted(x, wh, beta), wt)
    return numerator, divergence.h_denominator(x, wh, wt, h, beta), value


def batch_task(online: Online, fresh_max_iter: int, h: np.ndarray, x, wt, norm_x_sq: float):
    """The work of one batch: ``(Wᵀ_b, statistics)`` — the new Wᵀ_b (a fresh solve when ``wt``
    is None, else one update of ``wt``) and the batch's ``(numerator, denominator, divergence,
    ΣW_b, ‖W_b‖², rows)`` for ``update_h``. The divergence is D_β(X_b | W_b·H) at the new W_b
    and the H given; ``norm_x_sq`` is ‖X_b‖² (used for β = 2)."""
    pin_worker_blas()
    x, h = panel_data(x), kernels.aligned(h)
    fixed = _fixed_h(online, x, h)
    beta = online.beta
    if wt is not None and divergence.fused(x, beta):  # one compiled pass: W, then H's sums
        l1, l2 = online.w_penalties()
        wt, numerator, denominator, _ = divergence.kl_update(x, wt, h, l1=l1, l2=l2)
        value = divergence.kl_divergence(x, wt, h)
    else:
        if wt is None:
            wt = _solve(online, x, h, fresh_max_iter, fixed)
        else:
            wt = _w_step(online, x, np.array(wt, copy=True), h, fixed)
        if beta < 1:  # scikit-learn: for stability
            wt[wt < mu.TINY] = 0.0
        numerator, denominator, value = _h_statistics(online, x, wt, h, fixed, norm_x_sq)
    sums = (float(wt.sum(dtype=np.float64)), float(np.vdot(wt, wt)))
    return wt, (numerator, denominator, float(value), *sums, x.shape[0])


def add_statistics(*stats: tuple) -> tuple:
    """The statistics of several batches of one round, summed in the order given."""
    numerator, denominator, value, sum_w, sq_w, rows = stats[0]
    for other in stats[1:]:
        numerator = numerator + other[0]
        denominator = denominator + other[1]
        value, sum_w, sq_w, rows = (
            value + other[2], sum_w + other[3], sq_w + other[4], rows + other[5]
        )  # fmt: skip
    return numerator, denominator, value, sum_w, sq_w, rows


def batch_cost(online: Online, stats: tuple, h: np.ndarray) -> float:
    """scikit-learn's mean batch cost: the penalized divergence of the batch, per row."""
    _, _, value, sum_w, sq_w, rows = stats
    l1_w, l2_w = online.w_penalties()
    l1_h, l2_h = online.h_penalties(rows)
    penalties = l1_w * sum_w + l2_w * sq_w
    if l1_h or l2_h:
        h64 = h.astype(np.float64, copy=False)
        penalties += l1_h * h64.sum() + l2_h * float(np.vdot(h64, h64))
    return (value + penalties) / rows


def update_h(online: Online, h: np.ndarray, A: np.ndarray, B: np.ndarray, rho: float, stats):
    """H after one step: ``(H, A, B)`` new (the inputs are not modified)."""
    numerator, denominator, *_, rows = stats
    if online.beta == 2:
        denominator = denominator @ h
    elif online.beta == 1:
        denominator = np.where(denominator == 0, 1.0, denominator).astype(h.dtype)[:, None]
    else:
        denominator = denominator.copy()
    l1, l2 = online.h_penalties(rows)
    if l1 > 0:
        denominator += l1
    if l2 > 0:
        denominator = denominator + l2 * h
    denominator[denominator == 0] = divergence.EPSILON
    gamma = online.gamma
    new_a = numerator * (h ** (1 / gamma) if gamma != 1 else h)
    new_a += rho * A
    new_b = rho * B
    new_b += denominator
    h = new_a / new_b
    if gamma != 1:
        h **= gamma
    if online.beta <= 1:
        h[h < mu.TINY] = 0.0
    return h.astype(A.dtype, copy=False), new_a, new_b


def final_divergence(beta: float, h: np.ndarray, x, wt: np.ndarray) -> float:
    """D_β(X_b | W_b·H) of one batch (for the error at the end of a fit)."""
    pin_worker_blas()
    x, h, wt = panel_data(x), kernels.aligned(h), kernels.aligned(wt)
    if beta == 2:
        return 0.5 * kernels.residual_sq(x, wt, h)
    if divergence.fused(x, beta):
        return divergence.kl_divergence(x, wt, h)
    return divergence.divergence(x, divergence.sampled_product(x, wt, h), wt, h, beta)


class Convergence:
    """scikit-learn's ``_minibatch_convergence``: an exponentially weighted average of the mean
    batch cost; stop when H changes by at most ``tol`` or the average has not improved for
    ``max_no_improvement`` steps. The first step is not judged (H was not updated yet)."""

    def __init__(self, tol: float, max_no_improvement: int | None, n_samples: int, verbose=0):
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.n_samples = n_samples
        self.verbose = verbose
        self.ewa = self.ewa_min = None
        self.no_improvement = 0
        self.n_batches = 0  # processed so far

    def as_dict(self) -> dict:
        """The state a checkpoint keeps (``restore`` takes it back)."""
        names = ("ewa", "ewa_min", "no_improvement", "n_batches")
        return {name: getattr(self, name) for name in names}

    def restore(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def __call__(self, step: int, n_steps: int, cost: float, change: float, rows: int) -> bool:
        if np.isnan(cost) or np.isnan(change):
            raise overflowed(f"The mean batch cost at step {step}")
        if step == 1:
            if self.verbose:
                print(f"Minibatch step {step}/{n_steps}: mean batch cost: {cost}")
            return False
        alpha = min(rows / (self.n_samples + 1), 1)
        self.ewa = cost if self.ewa is None else self.ewa * (1 - alpha) + cost * alpha
        if self.verbose:
            print(f"Minibatch step {step}/{n_steps}: mean batch cost: {cost}, ewa cost: {self.ewa}")
        if self.tol > 0 and change <= self.tol:
            if self.verbose:
                print(f"Converged (small H change) at step {step}/{n_steps}")
            return True
        if self.ewa_min is None or self.ewa < self.ewa_min:
            self.no_improvement, self.ewa_min = 0, self.ewa
        else:
            self.no_improvement += 1
        if self.max_no_improvement is not None and self.no_improvement >= self.max_no_improvement:
            if self.verbose:
                print(
                    "Converged (lack of improvement in objective function) "
                    f"at step {step}/{n_steps}"
                )
            return True
        return False
