"""What an iteration minimizes and how (``Objective``): the loss, the update rule, the
penalties, the sweeps per update, extrapolation, the masked loss and stacked replicates — one
frozen value that every task of a fit receives."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

from dasknmf.solvers import get_solver


class OverflowedError(ValueError):
    """An objective or a batch's cost became NaN (``overflowed``)."""


def overflowed(what: str) -> OverflowedError:
    """The error for ``what`` (an objective, a batch's cost) that became NaN: X was checked
    finite, so the arithmetic overflowed — float32 values near 1e20–1e25, whose products leave
    float32, or float64 ones near 1e160 — where scikit-learn's ``NMF`` goes on and returns
    NaN factors."""
    return OverflowedError(
        f"{what} became NaN: the arithmetic overflowed the range of X's dtype (X's values are "
        "too large for it). Scale X down, or fit it as float64 if it is float32."
    )


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
    # Sweeps of the update rule per iteration, for W and for H; for stacked fits (``ranks``)
    # whose own sweeps differ (``inner_iter='auto'`` on sparse X), one per fit.
    sweeps_w: int | tuple[int, ...] = 1
    sweeps_h: int | tuple[int, ...] = 1
    extrapolate: bool = False  # push the iterates along their last step (HALS only)
    masked: bool = False  # the loss over the observed entries only (``dasknmf.masked``)
    # Independent fits stacked (``dasknmf.rank``): the rank of each, in order (n_components is
    # their sum); the components of each fit interact only among themselves (block-diagonal
    # Gram matrices). Empty for one fit.
    ranks: tuple[int, ...] = ()
    # Stacked fits that have met their stopping rule (indices into ``ranks``): their components
    # are no longer updated, so that each keeps the factors of the iteration it stopped at.
    frozen: frozenset[int] = frozenset()

    @property
    def rule(self):
        return get_solver(self.solver)

    @property
    def stacked(self) -> bool:
        return bool(self.ranks)

    def gram(self, f: np.ndarray) -> np.ndarray:
        """F·Fᵀ of a component-major factor; for stacked fits only its diagonal blocks (each
        fit's own Gram matrix), zeros elsewhere."""
        if not self.stacked:
            return f @ f.T
        gram = np.zeros((f.shape[0], f.shape[0]), dtype=f.dtype)
        for part in self.fit_slices():
            gram[part, part] = f[part] @ f[part].T
        return gram

    def update(
        self, f: np.ndarray, gram: np.ndarray, cross: np.ndarray, *, l1, l2, n_sweeps, order
    ):
        """The update rule on ``f`` in place (``solvers.*.update``) and its violation; for
        stacked fits fit by fit, the frozen ones left as they are, and each one's violation
        (n_fits,) (0 for a frozen fit). ``n_sweeps``: an int, or for stacked fits one per fit."""
        if not self.stacked:
            return self.rule.update(f, gram, cross, l1=l1, l2=l2, n_sweeps=n_sweeps, order=order)
        sweeps = n_sweeps if isinstance(n_sweeps, tuple) else (n_sweeps,) * len(self.ranks)
        violations = np.zeros(len(self.ranks))
        # The fits of a run of equal rank and sweeps at once, as (R, k, r) problems with their
        # (R, k, k) Gram matrices: views of f (splitting its first axis), updated in place.
        for (k, n, frozen), part, count, first in self._runs(sweeps):
            if frozen:
                continue
            grams = np.stack([gram[s, s] for s in self._slices(part.start, k, count)])
            _, found = self.rule.update(
                f[part].reshape(count, k, -1),
                grams,
                cross[part].reshape(count, k, -1),
                l1=l1,
                l2=l2,
                n_sweeps=n,
                order=order,
            )
            violations[first : first + count] = found
        return f, violations

    @classmethod
    def stack(cls, alone: dict, ranks: tuple[int, ...], init: str, shuffle: bool) -> Objective:
        """The objective of stacked fits of ``ranks`` from the objective of each rank's fit
        ``alone`` (they differ only in their sweeps, kept per fit where they differ)."""
        objective = alone[max(alone)]
        objective.check_stacking(init, shuffle)

        def each(name: str):
            values = tuple(getattr(alone[k], name) for k in ranks)
            return values if len(set(values)) > 1 else values[0]

        return dataclasses.replace(
            objective,
            n_components=sum(ranks),
            ranks=ranks,
            sweeps_w=each("sweeps_w"),
            sweeps_h=each("sweeps_h"),
        )

    def check_stacking(self, init: str, shuffle: bool) -> None:
        """Stacked fits are independent only where nothing couples their components: the
        Frobenius loss over all of X, a random start each, no shared extrapolation control, no
        shared component order."""
        lacks = {
            "a β-divergence other than Frobenius": self.beta != 2,
            "the masked loss (missing=...)": self.masked,
            "extrapolation": self.extrapolate,
            "shuffle=True": shuffle,
            f"init={init!r}": init != "random",
        }
        unsupported = [what for what, lacking in lacks.items() if lacking]
        if unsupported:
            raise ValueError(f"Stacked fits do not support {', '.join(unsupported)}.")

    def live_product(self, product, x, f: np.ndarray) -> np.ndarray:
        """``product(x, f)`` (a row per component of ``f``), formed only for the components
        of the stacked fits not frozen; a frozen fit's rows are zeros: its factors are no
        longer updated, nor its own terms recorded (``stacked.record``). Fits stop at very
        different iterations (a planted sparse matrix, ks 2…10: 21 to 200), and the products
        are most of an iteration's work."""
        if not self.frozen:
            return product(x, f)
        live = [part for i, part in enumerate(self.fit_slices()) if i not in self.frozen]
        rows = np.concatenate([np.arange(part.start, part.stop) for part in live])
        formed = product(x, f[rows])
        out = np.zeros((f.shape[0], formed.shape[1]), dtype=formed.dtype)
        out[rows] = formed
        return out

    def fit_slices(self) -> list[slice]:
        """The components of each stacked fit."""
        bounds = np.cumsum((0, *self.ranks))
        return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]

    def _runs(self, sweeps: tuple[int, ...]):
        """((k, sweeps, frozen), components, number of fits, first fit) of each run of
        consecutive fits of equal rank, sweeps and freezing."""
        start = first = 0
        frozen = [i in self.frozen for i in range(len(self.ranks))]
        for key, run in itertools.groupby(zip(self.ranks, sweeps, frozen, strict=True)):
            count = len(list(run))
            yield key, slice(start, start + key[0] * count), count, first
            start += key[0] * count
            first += count

    def fit_sums(self, per_component: np.ndarray) -> np.ndarray:
        """Σ over each stacked fit's components of a per-component vector, (n_fits,)."""
        starts = np.cumsum((0, *self.ranks[:-1]))
        return np.add.reduceat(per_component, starts)

    @staticmethod
    def _slices(start: int, k: int, count: int) -> list[slice]:
        return [slice(start + r * k, start + (r + 1) * k) for r in range(count)]

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
