"""Scores of a fitted model: ``predict_pairs`` for (row, column) pairs and ``recommend``, the top-n
columns of each row, with the entries the model was fitted on left out. W may be numpy or a
Dask array (a fit on a cluster, a loaded model): the top-n are then found block by block of W's
rows where the blocks are, and only n columns per row come back.
"""

from __future__ import annotations

import os
import pathlib

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
import zarr
from sklearn.utils.validation import check_is_fitted

from dasknmf import io

#: Bytes of the scores of a block of rows that ``top_n`` forms at a time.
SCORE_BLOCK_BYTES = 32 * 2**20


def _indices(values, size: int, name: str, what: str) -> np.ndarray:
    """``values`` as a 1-D integer array of positions in ``range(size)``, or a clear error."""
    array = np.asarray(values)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(
            f"{name} must be a 1-D sequence of integers, got {array.dtype} {array.shape}."
        )
    bad = array[(array < 0) | (array >= size)]
    if bad.size:
        raise ValueError(
            f"{name} {bad[:10].tolist()}{' ...' if bad.size > 10 else ''} are not {what} of the "
            f"fitted data (0 to {size - 1})."
        )
    return array.astype(np.intp)


def _rows_of(W, rows: np.ndarray) -> np.ndarray:
    if isinstance(W, da.Array):
        unique, inverse = np.unique(rows, return_inverse=True)
        return np.asarray(W[unique].compute())[inverse]
    return np.asarray(W)[rows]


def predict_pairs(W, H: np.ndarray, rows, cols) -> np.ndarray:
    """(W·H)[rows[t], cols[t]] for each pair t."""
    rows = _indices(rows, W.shape[0], "rows", "rows")
    cols = _indices(cols, H.shape[1], "cols", "columns")
    if rows.shape != cols.shape:
        raise ValueError(
            f"rows and cols must have the same length, got {rows.size} and {cols.size}."
        )
    w = _rows_of(W, rows)
    return np.einsum("tk,kt->t", w, H[:, cols])


def _pattern(x, missing) -> sp.csr_matrix:
    """The entries of a block of X the fit saw as data: the observed ones (``missing``), or the
    nonzero ones when nothing is missing (the items a user already has)."""
    if sp.issparse(x):
        x = x.tocsr()
        if missing is None:
            x = x.copy()
            x.eliminate_zeros()
        return sp.csr_matrix((np.ones(x.nnz, dtype=bool), x.indices, x.indptr), shape=x.shape)
    x = np.asarray(x)
    return sp.csr_matrix(~np.isnan(x) if missing == "nan" else x != 0)


def _top_block(w: np.ndarray, H: np.ndarray, n: int, seen) -> np.ndarray:
    """Top-n columns of the rows ``w`` (best first) and their scores, as one (r, 2n) float64
    block: columns in the first n (−1 where fewer than n are left), scores in the last n."""
    out = np.empty((w.shape[0], 2 * n))
    step = max(1, SCORE_BLOCK_BYTES // (8 * H.shape[1]))
    for start in range(0, w.shape[0], step):
        scores = (w[start : start + step] @ H).astype(np.float64)
        if seen is not None:
            block = seen[start : start + step].tocoo()
            scores[block.row, block.col] = -np.inf
        part = np.argpartition(-scores, n - 1, axis=1)[:, :n] if n < scores.shape[1] else None
        if part is None:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        best = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-best, axis=1, kind="stable")
        items = np.take_along_axis(part, order, axis=1)
        best = np.take_along_axis(best, order, axis=1)
        items = np.where(np.isneginf(best), -1, items)
        out[start : start + step, :n] = items
        out[start : start + step, n:] = best
    return out


def _top_dask_block(H, n, missing, w, x=None):
    return _top_block(w, H, n, None if x is None else _pattern(x, missing))


def top_n(W, H: np.ndarray, n: int, rows=None, X=None, missing=None):
    """The ``n`` best columns of each row in ``rows`` (all when None) by W·H, best first, and
    their scores; the entries of X the fit saw as data are left out when X is given. Returns
    ``(columns, scores)``, (r, n) int64 and float64; a row with fewer than n columns left has
    column −1 and score −inf in the places it lacks."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}.")
    n = int(min(n, H.shape[1]))
    H = np.asarray(H)
    if rows is None and isinstance(W, da.Array):
        parts = W.rechunk({1: -1})
        blocks = [parts] if X is None else [parts, X.rechunk({0: parts.chunks[0], 1: -1})]
        result = da.map_blocks(
            _top_dask_block, dask.delayed(H), n, missing, *blocks,
            dtype=np.float64, chunks=(parts.chunks[0], (2 * n,)),
            meta=np.empty((0, 0), dtype=np.float64),
        ).compute()  # fmt: skip
    else:
        rows = np.arange(W.shape[0]) if rows is None else _indices(rows, W.shape[0], "rows", "rows")
        seen = None
        if X is not None:
            x = X[rows]
            x = x.compute() if isinstance(x, da.Array) else x
            seen = _pattern(x, missing)
        result = _top_block(_rows_of(W, rows), H, n, seen)
    return result[:, :n].astype(np.int64), result[:, n:]


def positions(ids: np.ndarray, given, name: str) -> np.ndarray:
    """The positions of the original ``given`` ids among the sorted ``ids`` of the fitted rows
    or columns, or a clear error naming those it does not know."""
    given = np.asarray(given)
    given = given.reshape(1) if given.ndim == 0 else given
    if given.ndim != 1:
        raise TypeError(f"{name} must be a 1-D sequence of ids, got shape {given.shape}.")
    if ids.dtype.kind == "i":
        if given.size and not np.issubdtype(given.dtype, np.integer):
            raise TypeError(f"{name} must be integer ids (the fitted ones are), got {given.dtype}.")
    else:
        ids, given = np.asarray(ids, dtype=object), np.asarray(given.astype(str), dtype=object)
    at = np.minimum(np.searchsorted(ids, given), len(ids) - 1)
    unknown = given[ids[at] != given]
    if unknown.size:
        raise ValueError(
            f"{name} {unknown[:10].tolist()}{' ...' if unknown.size > 10 else ''} are not ids "
            "of the fitted data."
        )
    return at.astype(np.intp)


class RecommenderMixin:
    """``predict_pairs`` and ``recommend`` for an estimator with ``W_``, ``components_``,
    ``missing`` and the X it was fitted on (``_fitted_X``). With the original ids of X's rows
    and columns (``row_ids_``, ``col_ids_``: X was a store written from records), rows and
    columns are named by their ids."""

    def _keep_ids(self, ids) -> None:
        for name, value in zip(("row_ids_", "col_ids_"), ids or (None, None), strict=True):
            if value is not None:
                setattr(self, name, value)
            elif hasattr(self, name):
                delattr(self, name)

    def _positions(self, given, axis: int):
        ids = getattr(self, ("row_ids_", "col_ids_")[axis], None)
        if ids is None or given is None:
            return given
        return positions(ids, given, ("rows", "cols")[axis])

    def __getstate__(self):
        # A pickled model does not carry its training data (as a saved one does not).
        state = super().__getstate__()
        state.pop("_fitted_X", None)
        return state

    def _check_scores(self):
        check_is_fitted(self)
        if getattr(self, "W_", None) is None:
            raise ValueError("This model has no W (saved without it): it cannot score rows.")

    def predict_pairs(self, rows, cols):
        """The model's scores (W·H) of (row, column) pairs of the fitted data.

        Not ``predict``: scikit-learn's estimator checks take an estimator with ``predict`` for
        a predictor, ``predict(X)`` of new samples, which this is not.

        Parameters
        ----------
        rows, cols : array-like of the same length
            Row and column positions (int) in the X that was fitted; their original ids when
            X was a store written from records (``row_ids_``, ``col_ids_``).

        Returns
        -------
        scores : ndarray of shape (len(rows),)
        """
        self._check_scores()
        rows, cols = self._positions(rows, 0), self._positions(cols, 1)
        return predict_pairs(self.W_, self.components_, rows, cols)

    def recommend(self, rows=None, n=10, exclude_observed=True, X=None):
        """The top-``n`` columns of each row by the model's scores, best first.

        Parameters
        ----------
        rows : array-like or None, default=None
            Rows of the fitted data (positions, or ids as in ``predict_pairs``); None: all (for a W
            on a cluster, block by block there).
        n : int, default=10
        exclude_observed : bool, default=True
            Leave out the entries the model was fitted on: the observed ones with ``missing``,
            the nonzero ones without (the items a user already has).
        X : array-like, sparse matrix, Dask array, Zarr array or path, optional
            The data the model was fitted on, for ``exclude_observed``; default the X that
            ``fit`` was given (a reference kept by the estimator; a pickled or loaded model
            has none).

        Returns
        -------
        columns : ndarray of shape (n_rows, n)
            Positions (int64, −1 where a row has fewer than n columns left), or the columns'
            ids (an object array, None there) for a model with ``col_ids_``.
        scores : ndarray of shape (n_rows, n), float64
            −inf where a row has fewer than n columns left.
        """
        self._check_scores()
        if exclude_observed:
            X = getattr(self, "_fitted_X", None) if X is None else _fitted_data(X, self)
            if X is None:
                raise ValueError(
                    "exclude_observed=True needs the X the model was fitted on, which a loaded "
                    "or pickled model does not keep: pass it as X=, or exclude_observed=False."
                )
        else:
            X = None
        rows = self._positions(rows, 0)
        columns, scores = top_n(self.W_, self.components_, n, rows, X, self.missing)
        ids = getattr(self, "col_ids_", None)
        if ids is not None:  # named by their ids; None where a row has fewer than n
            named = np.asarray(ids, dtype=object)[columns]
            columns = np.where(columns >= 0, named, None)
        return columns, scores


def _fitted_data(X, model):
    """X given to ``recommend``: a path or Zarr array opened as Dask, checked against the
    model's shape."""
    if isinstance(X, str | os.PathLike | zarr.Array | zarr.Group):
        X = io.open_matrix(X, storage_options=getattr(model, "storage_options", None))
    shape = (model.W_.shape[0], model.components_.shape[1])
    if getattr(X, "ndim", None) != 2 or tuple(X.shape) != shape:
        raise ValueError(
            f"X has shape {getattr(X, 'shape', None)}, but the model was fitted on X of shape "
            f"{shape}."
        )
    return X


def row_labels(model, rows) -> np.ndarray:
    """The rows of a ``recommend`` result as the table names them: their ids, or positions."""
    ids = getattr(model, "row_ids_", None)
    if rows is None:
        return np.arange(model.W_.shape[0]) if ids is None else np.asarray(ids)
    return np.asarray(rows).reshape(-1)


def check_table_path(path, overwrite: bool = False) -> pathlib.Path:
    """A clear error, before any work, for a table ``write_table`` could not write."""
    path = pathlib.Path(path)
    if path.suffix.lower() not in (".parquet", ".csv"):
        raise ValueError(f"Cannot write {path}: the table is a .parquet or a .csv file.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite to replace it.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"Cannot write {path}: its folder {path.parent} does not exist.")
    return path


def write_table(path, rows, columns: np.ndarray, scores: np.ndarray, overwrite: bool = False):
    """Write top-n lists as a long table (row, rank, column, score; a row's missing places
    left out) to a ``.parquet`` or ``.csv`` file, atomically: a temporary sibling renamed when
    complete. Returns the path."""
    import tempfile

    import pandas as pd

    path = check_table_path(path, overwrite)
    suffix = path.suffix.lower()

    n = columns.shape[1]
    kept = np.isfinite(scores).ravel()
    frame = pd.DataFrame(
        {
            "row": np.repeat(rows, n)[kept],
            "rank": np.tile(np.arange(1, n + 1), len(rows))[kept],
            "column": columns.ravel()[kept],
            "score": scores.ravel()[kept],
        }
    )
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        tmp = pathlib.Path(f.name)
    try:
        if suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
