"""dasknmf: distributed, out-of-core Non-negative Matrix Factorization on Dask and Zarr."""

from dasknmf import _config  # noqa: F401  (registers the dask.config defaults)
from dasknmf.converters import convert
from dasknmf.estimator import NMF, InvalidParameterError
from dasknmf.io import MatrixPathError, open_matrix, save_matrix
from dasknmf.io import load_model as load

__version__ = "0.1.0"

__all__ = [
    "NMF",
    "InvalidParameterError",
    "MatrixPathError",
    "__version__",
    "convert",
    "load",
    "open_matrix",
    "save_matrix",
]
