"""What an iteration minimizes and how (``Objective``): the loss, the update rule, the
penalties, the sweeps per update, extrapolation, the masked loss and stacked replicates — one
frozen value that every task of a fit receives."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from dasknmf.solvers import get_solver


@dataclass(frozen=True)
class Objective:
    """What an iteration minimizes and how: D_β(X | WH) + l1_w·ΣW + ½·l2_w·‖W‖² + (the same
    for H), D_2 being ½‖X − WH‖². ``masked``: ½Σ over the observed entries of X, each row's
    and column's penalties scaled by its number of them (``dasknmf.masked``)."""

    n_components: int
    solver: str = "hals"
    beta: float = 2.0
    l1_w: float = 0.0
    l2_w: float = 0.0
    l1_h: float = 0.0
    l2_h: float = 0.0
    sweeps_w: int = 1  # sweeps of the update rule per iteration, for W and for H
    sweeps_h: int = 1
    extrapolate: bool = False  # push the iterates along their last step (HALS only)
    masked: bool = False  # the loss over the observed entries only (``dasknmf.masked``)
    # Independent fits stacked (``dasknmf.rank``): n_components = replicates × k, and the
    # components of each replicate interact only among themselves (block-diagonal Grams).
    replicates: int = 1

    @property
    def rule(self):
        return get_solver(self.solver)

    def gram(self, f: np.ndarray) -> np.ndarray:
        """F·Fᵀ of a component-major factor; for stacked replicates only its diagonal blocks
        (each replicate's own Gram matrix), zeros elsewhere."""
        if self.replicates == 1:
            return f @ f.T
        gram = np.zeros((f.shape[0], f.shape[0]), dtype=f.dtype)
        for part in self._replicate_slices(f.shape[0]):
            gram[part, part] = f[part] @ f[part].T
        return gram

    def update(
        self, f: np.ndarray, gram: np.ndarray, cross: np.ndarray, *, l1, l2, n_sweeps, order
    ):
        """The update rule on ``f`` in place (``solvers.*.update``), replicate by replicate:
        the sum of the replicates' violations."""
        if self.replicates == 1:
            return self.rule.update(f, gram, cross, l1=l1, l2=l2, n_sweeps=n_sweeps, order=order)
        # All replicates at once, as (R, k, r) problems with their (R, k, k) Gram matrices.
        shape, k = f.shape, f.shape[0] // self.replicates
        grams = np.stack([gram[part, part] for part in self._replicate_slices(shape[0])])
        stacked, violation = self.rule.update(
            f.reshape(self.replicates, k, -1),
            grams,
            cross.reshape(self.replicates, k, -1),
            l1=l1,
            l2=l2,
            n_sweeps=n_sweeps,
            order=order,
        )
        return stacked.reshape(shape), violation

    def check_stacking(self, init: str, shuffle: bool) -> None:
        """Stacked replicates are independent fits only where nothing couples their
        components: the Frobenius loss over all of X, a random start each, no shared
        extrapolation control, no shared component order."""
        lacks = {
            "a β-divergence other than Frobenius": self.beta != 2,
            "the masked loss (missing=...)": self.masked,
            "extrapolation": self.extrapolate,
            "shuffle=True": shuffle,
            f"init={init!r}": init != "random",
        }
        unsupported = [what for what, lacking in lacks.items() if lacking]
        if unsupported:
            raise ValueError(f"Stacked replicates do not support {', '.join(unsupported)}.")

    def _replicate_slices(self, n_components: int) -> list[slice]:
        k = n_components // self.replicates
        return [slice(r * k, (r + 1) * k) for r in range(self.replicates)]

    @property
    def frobenius(self) -> bool:
        return self.beta == 2

    @property
    def has_penalties(self) -> bool:
        return any((self.l1_w, self.l2_w, self.l1_h, self.l2_h))

    def penalized(self, value: float, sum_w: float, sq_w: float, sum_h: float, sq_h: float):
        """The objective from D_β(X | WH) and the sums the penalties need."""
        return float(
            value
            + self.l1_w * sum_w
            + 0.5 * self.l2_w * sq_w
            + self.l1_h * sum_h
            + 0.5 * self.l2_h * sq_h
        )

    def transposed(self) -> Objective:
        """The same objective for Xᵀ ≈ Hᵀ·Wᵀ: the roles of W and H swap."""
        return dataclasses.replace(
            self,
            l1_w=self.l1_h,
            l2_w=self.l2_h,
            l1_h=self.l1_w,
            l2_h=self.l2_w,
            sweeps_w=self.sweeps_h,
            sweeps_h=self.sweeps_w,
        )
