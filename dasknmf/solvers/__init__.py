"""Update rules for one factor given small statistics: pure numpy, no Dask, no X.

Each rule updates a component-major factor ``F`` (k, r) — Wᵀ for a row panel or a column block
of H — from the Gram matrix of the other factor (k, k) and the cross product of X with the other
factor (k, r). Because only these statistics enter, a rule can run several inner sweeps for the
price of one read of X. Each module offers::

    update(F, gram, cross, *, l1, l2, n_sweeps, order) -> (F, violation)
    converged(n_iter, tol, history) -> bool
"""

from __future__ import annotations

from types import ModuleType

from dasknmf.solvers import hals, mu

SOLVERS: dict[str, ModuleType] = {"hals": hals, "cd": hals, "mu": mu}


def get_solver(name: str) -> ModuleType:
    """The update-rule module for a solver name ('hals', its scikit-learn alias 'cd', or 'mu')."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"Unknown solver {name!r}; choose one of {sorted(SOLVERS)}.") from None
