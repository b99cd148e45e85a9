"""Constructor parameters of the estimators, checked as scikit-learn checks them: one rule per
parameter (a predicate and the words for what it expects), and scikit-learn's message."""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Callable, Mapping

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
from dask.utils import parse_bytes

from dasknmf import init, io, panels
from dasknmf._config import get_bytes

#: The smallest panel the cluster's memory may ask for (below, a task costs more than it reads).
MIN_PANEL_BYTES = 2**20

BETA_LOSSES = {"frobenius": 2.0, "kullback-leibler": 1.0, "itakura-saito": 0.0}


class InvalidParameterError(ValueError, TypeError):
    """A constructor parameter has a wrong type or value (scikit-learn raises the same)."""


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_bool(value) -> bool:
    return isinstance(value, bool | np.bool_)


def _int_at_least(low: int) -> tuple[Callable, str]:
    return (lambda v: is_int(v) and v >= low), f"an int in the range [{low}, inf)"


def _size(value) -> bool:
    """A positive number of bytes: an int (numpy's too) or a string such as '64MiB'."""
    try:
        if isinstance(value, str):
            return int(parse_bytes(value)) > 0
        return is_int(value) and int(value) > 0
    except (ValueError, TypeError):
        return False


def _random_state(value) -> bool:
    return (
        value is None
        or isinstance(value, np.random.RandomState)
        or (is_int(value) and 0 <= value < 2**32)
    )


_NON_NEGATIVE = (lambda v: is_real(v) and v >= 0), "a float in the range [0, inf)"

#: name: (predicate, what it expects). ``NMF``'s parameters; other estimators take subsets.
RULES: dict[str, tuple[Callable, str]] = {
    "n_components": (
        lambda v: v == "auto" if isinstance(v, str) else v is None or (is_int(v) and v >= 1),
        "an int in the range [1, inf), None or a str among {'auto'}",
    ),
    "init": (
        lambda v: v is None or v in init.INIT_METHODS,
        f"a str among {set(init.INIT_METHODS)} or None",
    ),
    "solver": (
        lambda v: isinstance(v, str) and v in ("cd", "hals", "mu"),
        "a str among {'cd', 'hals', 'mu'}",
    ),
    "beta_loss": (
        lambda v: v in BETA_LOSSES if isinstance(v, str) else is_real(v),
        f"a str among {set(BETA_LOSSES)} or a float",
    ),
    "tol": _NON_NEGATIVE,
    "max_iter": _int_at_least(1),
    "random_state": (
        _random_state,
        "an int in the range [0, 4294967295], an instance of 'numpy.random.mtrand.RandomState' "
        "or None",
    ),
    "alpha_W": _NON_NEGATIVE,
    "alpha_H": (
        lambda v: v == "same" if isinstance(v, str) else is_real(v) and v >= 0,
        "a float in the range [0, inf) or a str among {'same'}",
    ),
    "l1_ratio": ((lambda v: is_real(v) and 0 <= v <= 1), "a float in the range [0, 1]"),
    "verbose": ((lambda v: isinstance(v, numbers.Integral)), "an int or a bool"),
    "shuffle": (_is_bool, "a bool"),
    "inner_iter": (
        lambda v: v == "auto" if isinstance(v, str) else is_int(v) and v >= 1,
        "an int in the range [1, inf) or 'auto'",
    ),
    "extrapolate": (
        lambda v: v == "auto" if isinstance(v, str) else _is_bool(v),
        "a bool or 'auto'",
    ),
    "panel_bytes": (
        lambda v: v is None or _size(v),
        "a positive int, a size string such as '64MiB', or None",
    ),
    "cache": ((lambda v: v == "auto" if isinstance(v, str) else _is_bool(v)), "a bool or 'auto'"),
    "layout": (
        lambda v: v in ("auto", "rows", "columns", "blocks"),
        "'auto', 'rows', 'columns' or 'blocks'",
    ),
    "missing": (
        lambda v: v is None or v in ("nan", "unstored"),
        "None or a str among {'nan', 'unstored'}",
    ),
    "progress": (_is_bool, "a bool"),
    "checkpoint": (
        lambda v: v is None or isinstance(v, str | os.PathLike),
        "a str or os.PathLike (a folder) or None",
    ),
    "checkpoint_every": _int_at_least(1),
    "resume": (_is_bool, "a bool"),
    "storage_options": ((lambda v: v is None or isinstance(v, dict)), "a dict or None"),
    # MiniBatchNMF's
    "batch_size": _int_at_least(1),
    "max_no_improvement": (
        lambda v: v is None or (is_int(v) and v >= 1),
        "an int in the range [1, inf) or None",
    ),
    "forget_factor": ((lambda v: is_real(v) and 0 <= v <= 1), "a float in the range [0, 1]"),
    "fresh_restarts": (_is_bool, "a bool"),
    "fresh_restarts_max_iter": _int_at_least(1),
    "transform_max_iter": (
        lambda v: v is None or (is_int(v) and v >= 1),
        "an int in the range [1, inf) or None",
    ),
    "parallel_batches": (
        lambda v: v is None or (is_int(v) and v >= 1),
        "an int in the range [1, inf) or None",
    ),
}


def check(owner: str, params: Mapping[str, object]) -> None:
    """Raise ``InvalidParameterError`` in scikit-learn's words for the first parameter that
    breaks its rule."""
    for name, value in params.items():
        ok, expected = RULES[name]
        if not ok(value):
            raise InvalidParameterError(
                f"The {name!r} parameter of {owner} must be {expected}. Got {value!r} instead."
            )


def beta(beta_loss) -> float:
    """``beta_loss`` as a number (2 Frobenius, 1 Kullback–Leibler, 0 Itakura–Saito)."""
    return BETA_LOSSES[beta_loss] if isinstance(beta_loss, str) else float(beta_loss)


def panel_budget(panel_bytes, lazy: bool = True, shape=None, n_components=None, itemsize=8) -> int:
    """Bytes of a row panel: ``panel_bytes``, else ``dasknmf.memory-panel-bytes`` for in-memory
    input and, for Dask input, ``dasknmf.panel-bytes`` or less: what keeps every task within
    the memory of the current cluster's workers (``panels.cluster_panel_bytes``), when the
    ``shape`` of X and ``n_components`` are known."""
    if panel_bytes is not None:
        return int(parse_bytes(panel_bytes)) if isinstance(panel_bytes, str) else int(panel_bytes)
    if not lazy:
        return get_bytes("dasknmf.memory-panel-bytes")
    budget = get_bytes("dasknmf.panel-bytes")
    if shape is not None and n_components is not None:
        fitted = panels.cluster_panel_bytes(shape, n_components, itemsize)
        if fitted is not None:
            budget = min(budget, max(MIN_PANEL_BYTES, fitted))  # lowered, never raised
    return budget


def check_combinations(params: Mapping[str, object]) -> None:
    """The rules between ``NMF``'s parameters, in scikit-learn's words where it has them."""
    solver, extrapolate, missing = params["solver"], params["extrapolate"], params["missing"]
    if extrapolate is True and solver == "mu":
        raise InvalidParameterError(
            "The 'extrapolate' parameter of NMF applies to solver 'cd'/'hals' only; "
            "solver='mu' needs extrapolate=False or 'auto'."
        )
    if params["resume"] and params["checkpoint"] is None:
        raise ValueError("resume=True needs checkpoint, the folder to resume from.")
    if missing is not None and extrapolate is True:
        raise ValueError(
            f"missing={missing!r} is fitted by alternating least squares (solver 'cd' or "
            "'hals') or multiplicative updates ('mu'), without extrapolation; got "
            "extrapolate=True."
        )
    if solver != "mu" and beta(params["beta_loss"]) != 2:
        raise ValueError(
            f"Invalid beta_loss parameter: solver {solver!r} does not handle "
            f"beta_loss = {params['beta_loss']!r}"
        )


def check_missing_input(missing, X) -> None:
    """``missing`` against the kind of X (validated: numpy, scipy.sparse or Dask)."""
    sparse = sp.issparse(X._meta if isinstance(X, da.Array) else X)
    if missing == "unstored" and not sparse:
        raise ValueError(
            "missing='unstored' needs sparse X (scipy.sparse, or a CSR Zarr store), whose "
            "unstored entries are the missing ones; for dense X, mark them NaN and use "
            "missing='nan'."
        )
    if missing == "nan" and sparse:
        raise ValueError(
            "missing='nan' is for dense X; for sparse X use missing='unstored' (the entries "
            "it does not store are the missing ones)."
        )


def resolve_init(
    n_components, init, solver: str, n_samples: int, n_features: int, W, H, missing=None
) -> tuple[str, int]:
    """The initialization method and the number of components, as scikit-learn resolves
    them (with its warnings and errors); a fit with ``missing`` entries starts from 'random'
    or 'custom'."""
    k = n_components
    method = init
    if missing is not None and method is None:
        method = "random"
    if missing is not None and method.startswith("nndsvd"):
        raise ValueError(
            f"init={method!r} cannot start a fit with missing={missing!r} (its SVD would read "
            "the missing entries as zeros); use init='random' or 'custom'."
        )
    if method == "custom":
        H_shape = np.shape(H) if H is not None else None
        if k == "auto" and H_shape is not None and len(H_shape) == 2:
            k = H_shape[0]
    elif W is not None or H is not None:
        warnings.warn(
            "When init!='custom', provided W or H are ignored. Set  init='custom' to use "
            "them as initialization.",
            RuntimeWarning,
            stacklevel=4,
        )
    if k is None or k == "auto":
        k = n_features
    if method is None:
        method = "nndsvda" if k <= min(n_samples, n_features) else "random"
    if method.startswith("nndsvd") and k > min(n_samples, n_features):
        raise ValueError(
            f"init = '{method}' can only be used when n_components <= min(n_samples, "
            f"n_features); got n_components={k} for X of shape {(n_samples, n_features)}."
        )
    if solver == "mu" and method == "nndsvd":
        warnings.warn(
            "The multiplicative update ('mu') solver cannot update zeros present in the "
            "initialization, and so leads to poorer results when used jointly with "
            "init='nndsvd'. You may try init='nndsvda' or init='nndsvdar' instead.",
            UserWarning,
            stacklevel=4,
        )
    return method, int(k)


def check_custom_init(W, H, w_shape, h_shape, dtype):
    """scikit-learn's checks of a custom initialization."""
    if W is None or H is None:
        raise ValueError("init='custom' needs both W and H passed to fit_transform.")
    checked = []
    for name, array, shape in (("H", H, h_shape), ("W", W, w_shape)):
        whom = f"NMF (input {name})"
        if not isinstance(array, da.Array):
            array = np.asarray(array)
        if array.ndim != 2:
            raise ValueError(f"Expected 2D array for {whom}, got {array.ndim}D array instead.")
        for axis, which in ((0, "first"), (1, "second")):
            if array.shape[axis] != shape[axis]:
                raise ValueError(
                    f"Array with wrong {which} dimension passed to {whom}. Expected "
                    f"{shape[axis]}, but got {array.shape[axis]}."
                )
        if array.dtype != dtype:
            raise TypeError(
                f"H and W should have the same dtype as X. Got {name}.dtype = {array.dtype} "
                f"and X.dtype = {dtype}."
            )
        low, high, finite = (np.min(array), np.max(array), np.isfinite(array).all())
        if isinstance(array, da.Array):
            low, high, finite = dask.compute(low, high, finite)
        if not finite:
            raise ValueError(f"Input contains NaN or infinity in {whom}.")
        if low < 0:
            raise ValueError(f"Negative values in data passed to {whom}.")
        if high == 0:
            raise ValueError(f"Array passed to {whom} is full of zeros.")
        checked.append(array)
    H, W = checked
    return W, H


def saved_attributes(model) -> dict:
    """What a saved model keeps beside its factors (JSON): the parameters (not the
    storage_options, which may hold credentials), the iterations, the loss history, the error
    and the feature names."""
    attributes = {
        "params": {
            key: _jsonable(v) for key, v in model.get_params().items() if key != "storage_options"
        },
        "n_iter": _optional(getattr(model, "n_iter_", None), int),
        "loss_history": [float(v) for v in getattr(model, "loss_history_", [])],
        "reconstruction_err": _optional(getattr(model, "reconstruction_err_", None), float),
    }
    if hasattr(model, "_rho"):  # a mini-batch model: ρ of its forget factor
        attributes["rho"] = float(model._rho)
    if hasattr(model, "n_steps_"):
        attributes["n_steps"] = int(model.n_steps_)
    if hasattr(model, "layout_"):
        attributes["layout"] = model.layout_
    if hasattr(model, "feature_names_in_"):
        attributes["feature_names_in"] = [str(name) for name in model.feature_names_in_]
    return attributes


def _optional(value, kind):
    """``kind(value)``, or None for a model that has no such result (``partial_fit`` only)."""
    return None if value is None else kind(value)


def _jsonable(value):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.random.RandomState | np.random.Generator):
        return None  # a generator's state is not a parameter worth keeping
    return value


def as_dask_matrix(X, budget, storage_options=None, rows: int | None = None) -> da.Array:
    """A Dask array, zarr.Array or Zarr path (or URL) as a 2-D floating Dask array; a store is
    opened in panels of ``budget(shape, itemsize)`` bytes and at most ``rows`` rows."""
    if not isinstance(X, da.Array):
        source = X
        options = dict(panel_rows=rows, storage_options=storage_options)
        X = io.open_matrix(source, panel_bytes=budget(), **options)
        panel_bytes = budget(X.shape, X.dtype.itemsize)
        if panel_bytes < budget():  # small workers: group the stored chunks in smaller panels
            X = io.open_matrix(source, panel_bytes=panel_bytes, **options)
    io.check_matrix_shape(X.shape, "X")
    io.check_matrix_dtype(X.dtype, "X")
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    return X
