"""dasknmf: distributed, out-of-core Non-negative Matrix Factorization on Dask and Zarr.

The public names are imported on first use (PEP 562): a Dask worker that unpickles a task
from ``dasknmf.steps`` imports this package too, and should not pay for scikit-learn (the
estimator's base classes, ~90 MiB resident) when it only runs the per-panel kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dasknmf import _config  # noqa: F401  (registers the dask.config defaults)
from dasknmf._version import __version__

_EXPORTS = {
    "NMF": ("dasknmf.estimator", "NMF"),
    "MiniBatchNMF": ("dasknmf.streaming", "MiniBatchNMF"),
    "InvalidParameterError": ("dasknmf._params", "InvalidParameterError"),
    "MatrixPathError": ("dasknmf.io", "MatrixPathError"),
    "convert": ("dasknmf.converters", "convert"),
    "load": ("dasknmf.models", "load"),
    "open_matrix": ("dasknmf.io", "open_matrix"),
    "RankSelection": ("dasknmf.rank", "RankSelection"),
    "save_matrix": ("dasknmf.io", "save_matrix"),
    "select_rank": ("dasknmf.rank", "select_rank"),
    "consensus_nmf": ("dasknmf.rank", "consensus_nmf"),
    "load_rank": ("dasknmf.rank", "load_rank"),
}

__all__ = [
    "NMF",
    "InvalidParameterError",
    "MatrixPathError",
    "MiniBatchNMF",
    "RankSelection",
    "__version__",
    "consensus_nmf",
    "convert",
    "load",
    "load_rank",
    "open_matrix",
    "save_matrix",
    "select_rank",
]

if TYPE_CHECKING:  # pragma: no cover
    from dasknmf.converters import convert
    from dasknmf.estimator import NMF, InvalidParameterError
    from dasknmf.io import MatrixPathError, open_matrix, save_matrix
    from dasknmf.models import load
    from dasknmf.rank import RankSelection, consensus_nmf, load_rank, select_rank
    from dasknmf.streaming import MiniBatchNMF


def __getattr__(name: str):
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'dasknmf' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
