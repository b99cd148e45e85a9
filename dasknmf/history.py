"""The record of a fit's iterations (objective, error, violation), and the iterate an
extrapolated fit returns: the one of the lowest objective (``Best``)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from dasknmf.objective import Objective, OverflowedError, overflowed


@dataclass
class History:
    """Per-iteration record; index 0 is the initialization."""

    loss: list[float] = field(default_factory=list)  # the penalized objective
    error: list[float] = field(default_factory=list)  # ‖X − WH‖_F
    violation: list[float] = field(default_factory=list)  # from iteration 1 on
    fits: list[dict] = field(default_factory=list)  # each stacked fit's own (``stacked.record``)

    def as_dict(self) -> dict:
        return {"loss": self.loss, "error": self.error, "violation": self.violation} | (
            {"fits": self.fits} if self.fits else {}
        )

    def record(
        self,
        objective: Objective,
        value: float,
        sum_w: float,
        sq_w: float,
        sum_h: float,
        sq_h: float,
    ) -> None:
        """Append the objective at a point, from D_β(X | WH) (½‖X − WH‖² for Frobenius) and
        the sums the penalties need; the error is scikit-learn's sqrt(2·D_β).

        ``ValueError`` when it is NaN (``objective.overflowed``)."""
        value = max(float(value), 0.0) if not math.isnan(value) else value
        loss = objective.penalized(value, sum_w, sq_w, sum_h, sq_h)
        if math.isnan(loss) or math.isnan(sum_w) or math.isnan(sum_h):
            raise overflowed(f"The objective at iteration {len(self.loss)}")
        self.error.append(math.sqrt(2 * value))
        self.loss.append(loss)


@dataclass
class Best:
    """The iterate of the lowest objective recorded from iteration ``first`` on (ties: the
    later one), which an extrapolated fit returns.

    A push that raises the objective is undone by the next iteration's restart, but the
    iterations after a restart need not come back below the best point at once: a fit cut by
    ``max_iter`` right after a push returned that pushed pair (a 4 × 7 matrix, k = 1, tol = 0,
    max_iter = 12: 8.3× the objective of the iteration before), and 10 in 500 small fits with
    k below the rank ended more than 1% above their best (2.2× at worst) after 12 iterations.
    Ang and Gillis's reference code keeps the best iterate for the same reason.

    The drivers keep the factors of the best iterate once a newer one is recorded
    (``see``), and a checkpoint holds them too, so that a resumed fit returns what the
    uninterrupted one returns (``first``: the best iteration a checkpoint names, else the
    iteration the fit starts from)."""

    active: bool  # the objective extrapolates (else every iterate is returned in turn)
    first: int
    n_iter: int = -1
    loss: float = math.inf
    seen: int = -1  # the last index of ``history.loss`` looked at

    def __post_init__(self):
        self.seen = self.first - 1

    def see(self, history: History, n_iter: int) -> bool:
        """Take in what ``history`` recorded up to iteration ``n_iter``; whether the best
        iterate has just fallen behind: it is ``n_iter - 1``, which the driver must now keep."""
        if not self.active:
            return False
        for i in range(self.seen + 1, len(history.loss)):
            if history.loss[i] <= self.loss:
                self.n_iter, self.loss = i, history.loss[i]
        self.seen = len(history.loss) - 1
        return self.n_iter == n_iter - 1

    def returned(self, n_iter: int) -> int:
        """The iteration whose factors a fit that ended at ``n_iter`` returns."""
        return self.n_iter if self.active and self.n_iter >= 0 else n_iter

    def overflowed(self, error: OverflowedError, n_iter: int) -> None:
        """An extrapolated fit whose objective became NaN at iteration ``n_iter`` > 1 ends at
        its best iterate, with a warning (a push can leave a component of H near zero, and W's
        update then leaves the floats: X of 1e50 with a background of 1e-128, found by
        hypothesis); otherwise, or at the first iteration, where X's values are what overflows,
        ``error`` is raised."""
        if not self.active or n_iter <= 1:
            raise error
        warnings.warn(
            f"The objective became NaN at iteration {n_iter}: an extrapolation push overflowed "
            f"the arithmetic. The fit stops and returns its best iterate, iteration "
            f"{self.n_iter}; extrapolate=False fits without pushes.",
            RuntimeWarning,
            stacklevel=2,
        )

    def older(self, n_iter: int, kept: tuple | None) -> tuple | None:
        """What a checkpoint of iteration ``n_iter`` holds of the best iterate: (its iteration,
        W, H) from the driver's ``kept`` when it is older, else None."""
        if self.active and 0 <= self.n_iter < n_iter:
            return (self.n_iter, *kept[:2])
        return None
