"""What dasknmf's two estimators (``NMF``, ``MiniBatchNMF``) share: checking input in
scikit-learn's words (numpy and scipy.sparse through ``validate_data``, Dask arrays, Zarr
arrays and paths as Dask arrays), the panel budget, ``inverse_transform``, tags and saving."""

from __future__ import annotations

import os

import dask.array as da
import numpy as np
import zarr
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from dasknmf import _params, io


def is_lazy_input(X) -> bool:
    """Whether X is factorized by Dask (a Dask array, a Zarr array or group, a path or URL)."""
    return isinstance(X, da.Array | zarr.Array | zarr.Group | str | os.PathLike)


class BaseNMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """The shared part of the estimators; subclasses define the parameters and the fit."""

    def _panel_budget(self, shape=None, itemsize=8, n_components=None, lazy=True) -> int:
        """Bytes of a row panel (``_params.panel_budget``); for Dask input without
        ``panel_bytes``, sized to the workers' memory once the shape of X is known."""
        if n_components is None and shape is not None:
            k = self.n_components
            n_components = k if _params.is_int(k) else min(shape)
        return _params.panel_budget(self.panel_bytes, lazy, shape, n_components, itemsize)

    def _read_budget(self, shape=None, itemsize=8) -> int:
        """Bytes of the panels a store is opened in (whole stored chunks grouped up to it)."""
        return self._panel_budget(shape, itemsize)

    def _check_input(self, X, reset: bool, rows: int | None = None):
        """X validated: numpy or scipy.sparse through scikit-learn's ``validate_data``, or a
        floating Dask array for Dask, Zarr and path input; a store opened in panels of at
        most ``rows`` rows."""
        missing = getattr(self, "missing", None)
        if not is_lazy_input(X):
            X = validate_data(
                self,
                X,
                accept_sparse=("csr", "csc"),
                dtype=[np.float64, np.float32],
                reset=reset,
                ensure_non_negative=not reset,
                ensure_all_finite="allow-nan" if missing else True,
            )
            _params.check_missing_input(missing, X)
            return X
        X = _params.as_dask_matrix(X, self._read_budget, self.storage_options, rows)
        _params.check_missing_input(missing, X)
        if reset:
            self.n_features_in_ = X.shape[1]
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        return X

    def fit(self, X, y=None, **params):
        """Learn an NMF model for the data X (see ``fit_transform``).

        Parameters
        ----------
        X : {array-like, sparse matrix, dask.array.Array, zarr.Array, str} of shape \
(n_samples, n_features)
            Training data.
        y : Ignored
        **params : kwargs
            Passed to ``fit_transform`` (``W``, ``H`` with ``init='custom'``).

        Returns
        -------
        self : object
        """
        self.fit_transform(X, **params)
        return self

    def _save(self, path, overwrite: bool, storage_options, arrays=None, ids=None):
        """Write the model (``io.save_model``), with more ``arrays`` beside W and H."""
        check_is_fitted(self)
        options = self.storage_options if storage_options is None else storage_options
        return io.save_model(
            path,
            np.asarray(self.components_),
            getattr(self, "W_", None),
            {"estimator": type(self).__name__, **_params.saved_attributes(self)},
            overwrite=overwrite,
            storage_options=options,
            ids=ids,
            arrays=arrays,
        )

    def inverse_transform(self, X):
        """Transform data back to its original space: X @ components_.

        Parameters
        ----------
        X : {ndarray, sparse matrix, dask.array.Array} of shape (n_samples, n_components)

        Returns
        -------
        X_original : ndarray or dask.array.Array of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        if np.ndim(X) != 2 or np.shape(X)[1] != self.n_components_:
            raise ValueError(
                f"Expected W of shape (n_samples, {self.n_components_}), got shape {np.shape(X)}."
            )
        return X @ self.components_

    @property
    def _n_features_out(self):
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.input_tags.sparse = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
