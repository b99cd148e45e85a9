"""Extrapolation with restarts for HALS (Ang & Gillis, "Accelerating nonnegative matrix
factorization algorithms using extrapolation", Neural Computation 31(2), 2019).

After an update each factor is pushed further along its last step, Ŷ = max(Y + β·(Y − Y'), 0)
with Y' the factor one update earlier, and the next update starts from (and, for the other
factor, uses) the pushed point. β grows by ``GROWTH`` while the objective decreases, up to a
ceiling that itself grows by ``CEILING_GROWTH``; when the objective increases, the next
iteration restarts from the plain iterates, β is divided by ``DECAY`` and the ceiling becomes
the β that failed. The pushed points are projected onto the non-negative orthant, so every
recorded objective is that of a non-negative pair (W, H) — the pair the fit returns.

The objective without penalties does not change when a component of W is scaled by s and the
same component of H by 1/s, and extrapolation drifts along that flat direction: on the digits
the norms of the components spread over four orders of magnitude in 100 iterations (the
product W·H fine, but tiny columns of W are poor features). So without penalties each
iteration also rescales the components to equal norms in W and H (``balance``). HALS and the
extrapolation commute with that rescaling, so it changes the iterates' product only by
rounding; with penalties the penalties keep the scales in check and nothing is rescaled.

On the uniformly random sparse benchmark matrix this reached scikit-learn's 1000-iteration
error in 66 iterations instead of several hundred (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from dasknmf.solvers import hals

#: β of the first iteration and the factors that move it (the values recommended by Ang & Gillis).
BETA0, GROWTH, CEILING_GROWTH, DECAY = 0.5, 1.05, 1.01, 1.5
#: A rise of the objective within this many ε·‖X‖² is rounding, not a rise: the Gram identity
#: ‖X‖² − 2⟨X, WH⟩ + ⟨WᵀW, HHᵀ⟩ that measures it rounds at that scale, and on a plateau two
#: layouts of one fit saw 2384.5000000000005 and 2384.4999999999995 after 2384.5 — one
#: restarted, the other did not, and their fits parted (12 × 7 X, k = 1; found by hypothesis).
ROUNDING = 16
#: Iterations over which the stopping rule looks at the violation (see ``converged``).
STOP_WINDOW = 10


@dataclass(frozen=True)
class Control:
    """The state of the extrapolation between iterations: the β of the next iteration, its
    ceiling, the objective of the last iteration and whether the next one restarts."""

    beta: float = BETA0
    ceiling: float = 1.0
    loss: float = math.inf
    restart: bool = False
    # Scales of the components of W (those of H: 1/scale) for the factors of the last
    # iteration, and the product with the scales before for the H of the iteration before it.
    scale: tuple[float, ...] | None = None
    scale_older: tuple[float, ...] | None = None

    def advance(
        self, loss: float, scale: tuple[float, ...] | None = None, rounding: float = 0.0
    ) -> Control:
        """The control of the next iteration, given the objective ``loss`` of this one and the
        ``scale`` that balances its components (None: leave them). A rise of at most
        ``rounding`` (the objective's own rounding, ``ROUNDING`` · ε · ‖X‖²) is no rise."""
        older = None
        if scale is not None:
            older = scale if self.scale is None else tuple(np.multiply(scale, self.scale))
        if loss > self.loss + rounding:
            return Control(self.beta / DECAY, self.beta, loss, True, scale, older)
        ceiling = min(1.0, self.ceiling * CEILING_GROWTH)
        return Control(min(ceiling, self.beta * GROWTH), ceiling, loss, False, scale, older)

    def as_dict(self) -> dict:
        return asdict(self)


def balance(sq_norms_w: np.ndarray, sq_norms_h: np.ndarray) -> tuple[float, ...]:
    """Scales s_t of the components of W (1/s_t for H) after which ‖w_t‖ = ‖h_t‖; 1 for a
    component that is zero in W or H.

    Where the ratio of the squared norms leaves the floats (a component of W of 1e-161 against
    one of H of 1: its square is 3e-322, the ratio overflows and the scale, ∞, turned both
    factors into NaN), the fourth roots are taken apart: s_t = ⁴√‖h_t‖² / ⁴√‖w_t‖², finite
    (1e80 there); a scale still not finite and positive is 1."""
    sq_norms_w, sq_norms_h = np.asarray(sq_norms_w), np.asarray(sq_norms_h)
    usable = (sq_norms_w > 0) & (sq_norms_h > 0)
    with np.errstate(over="ignore", under="ignore"):
        ratio = np.divide(sq_norms_h, sq_norms_w, out=np.ones_like(sq_norms_w), where=usable)
        scale = np.sqrt(np.sqrt(ratio))
        out = ~np.isfinite(scale) | (scale == 0)
        if out.any():
            apart = np.sqrt(np.sqrt(sq_norms_h[out])) / np.sqrt(np.sqrt(sq_norms_w[out]))
            scale[out] = np.where(np.isfinite(apart) & (apart > 0), apart, 1.0)
    return tuple(float(v) for v in scale)


def rescaled(factor: np.ndarray, scale: tuple[float, ...] | None, inverse: bool = False):
    """A component-major factor with component t multiplied by scale[t] (divided, with
    ``inverse``); the factor itself when there is no scale."""
    if scale is None:
        return factor
    s = np.asarray(scale, dtype=factor.dtype)[:, None]
    return factor / s if inverse else factor * s


def extrapolate(new: np.ndarray, previous: np.ndarray, beta: float) -> np.ndarray:
    """max(new + β·(new − previous), 0), as a new array of ``new``'s dtype."""
    out = np.subtract(new, previous)
    out *= beta
    out += new
    np.maximum(out, 0, out=out)
    return out


def converged(n_iter: int, tol: float, history: dict) -> bool:
    """scikit-learn's 'cd' rule over a window: the largest projected-gradient violation of the
    last ``STOP_WINDOW`` iterations ≤ tol × that of iteration 1.

    The violation is measured at the pushed points, and it jumps with the pushes and restarts:
    on a 20000 × 1000 matrix of rank 10 plus noise one iteration's violation fell below 1e-4
    of the first after 23 iterations, at an error of 173 — 25% above the 138 of iteration 60
    (plain HALS stopped after 55 iterations at 160; with the window the fit stops after 32 at
    158). A single low value is no evidence of convergence."""
    return hals.converged(n_iter, tol, history, window=STOP_WINDOW)
