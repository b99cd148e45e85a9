"""``dasknmf.NMF``: scikit-learn's NMF estimator on the one-pass engine.

The estimator validates parameters and input, picks the driver — in memory for numpy and
scipy.sparse, Dask for Dask arrays, Zarr arrays and paths — and hands over to ``engine``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
import os
import warnings

import dask
import dask.array as da
import numpy as np
import zarr
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted, validate_data

from dasknmf import engine, init, io, steps
from dasknmf._blas import single_blas_thread
from dasknmf._config import get_bytes
from dasknmf.checkpoint import Checkpoint

__all__ = ["NMF", "InvalidParameterError"]

_BETA_LOSSES = {"frobenius": 2.0, "kullback-leibler": 1.0, "itakura-saito": 0.0}

logger = logging.getLogger(__name__)

#: Restarts of a fit after a worker loss, before the error is raised.
MAX_RECOVERIES = 3

#: At most this many HALS sweeps per factor and iteration with ``inner_iter='auto'``.
MAX_AUTO_SWEEPS = 10


def auto_sweeps(entries: float, n_components: int) -> int:
    """HALS sweeps for a factor when ``inner_iter='auto'``, given the stored entries of X per
    row (for W) or per column (for H): n (m) for dense X, fewer for sparse X.

    A sweep over a row of W costs k² flops against the 2·entries·k of the two products of that
    row with X, so sweeps are cheap while entries/k is large; they cut the number of passes
    over X (Gillis & Glineur 2012; benchmarks/RESULTS.md).
    """
    return int(np.clip(entries // n_components, 1, MAX_AUTO_SWEEPS))


class InvalidParameterError(ValueError, TypeError):
    """A constructor parameter has a wrong type or value (scikit-learn raises the same)."""


def _check_param(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise InvalidParameterError(
            f"The {name!r} parameter of NMF must be {expected}. Got {value!r} instead."
        )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_lazy_input(X) -> bool:
    return isinstance(X, da.Array | zarr.Array | zarr.Group | str | os.PathLike)


class NMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Non-negative Matrix Factorization (NMF), in memory or on a Dask cluster.

    Find two non-negative matrices W (n_samples, n_components) and H (n_components,
    n_features) whose product approximates the non-negative matrix X, by minimizing

        ½‖X − WH‖²_F + alpha_W·n_features·(l1_ratio·‖W‖₁ + ½(1 − l1_ratio)·‖W‖²_F)
                    + alpha_H·n_samples·(l1_ratio·‖H‖₁ + ½(1 − l1_ratio)·‖H‖²_F)

    — the objective of :class:`sklearn.decomposition.NMF`, whose parameters and attributes this
    class shares. numpy and scipy.sparse input is factorized in memory; a Dask array, a
    ``zarr.Array`` or the path of a Zarr store is factorized by Dask on the current scheduler
    (the active ``distributed.Client`` if any), reading X once per iteration in row panels.

    Parameters
    ----------
    n_components : int, 'auto' or None, default='auto'
        Number of components. None or 'auto': n_features ('auto' takes it from H with
        ``init='custom'``).
    init : {'random', 'nndsvd', 'nndsvda', 'nndsvdar', 'custom'}, default=None
        Initialization. None: 'nndsvda' if n_components <= min(n_samples, n_features),
        otherwise 'random'. NNDSVD uses a randomized SVD over the row panels of X, one read of
        X per power iteration (see ``dasknmf.svd``).
    solver : {'cd', 'hals', 'mu'}, default='cd'
        'cd' (scikit-learn's name) and 'hals' are the same coordinate-descent family:
        hierarchical alternating least squares. 'mu' is the multiplicative update.
    beta_loss : float or {'frobenius', 'kullback-leibler', 'itakura-saito'}, default='frobenius'
        The β-divergence to minimize (2 Frobenius, 1 Kullback–Leibler, 0 Itakura–Saito); other
        than Frobenius, only with ``solver='mu'``. On sparse X, W·H is evaluated only where X
        is stored. β <= 0 needs X without zeros.
    tol : float, default=1e-4
        Tolerance of scikit-learn's stopping rule for the solver: for 'cd'/'hals', the
        projected-gradient violation relative to that of the first iteration; for 'mu', the
        decrease of the error over 10 iterations relative to the error at the initialization.
        ``tol=0`` runs exactly ``max_iter`` iterations.
    max_iter : int, default=200
        Maximum number of iterations (each reads X once).
    random_state : int, RandomState instance or None, default=None
        Seed of the random initialization and of the randomized SVD.
    alpha_W, alpha_H, l1_ratio : float
        Regularization, as in scikit-learn (``alpha_H='same'`` takes ``alpha_W``).
    verbose : int, default=0
        Print the objective after each iteration.
    shuffle : bool, default=False
        Visit the components in a random order in each 'cd' sweep.
    inner_iter : int or 'auto', default='auto'
        Sweeps of the update rule per factor and iteration. Extra sweeps reuse the statistics
        of one read of X (Gillis & Glineur 2012). 'auto': for 'cd'/'hals', n_features //
        n_components sweeps for W and n_samples // n_components for H, each between 1 and
        10; for 'mu', 1 (scikit-learn's single update). ``inner_iter=1`` with 'cd' and
        ``extrapolate=False`` is scikit-learn's algorithm step for step.
    extrapolate : bool or 'auto', default='auto'
        'cd'/'hals' only: after each update, push W and H further along their last step and
        update from there, with restarts when the objective increases (Ang & Gillis 2019,
        ``dasknmf.solvers.extrapolation``). Usually reaches a given error in far fewer
        iterations; the objective may rise for one iteration before a restart, and the
        ``tol`` rule must hold for 10 iterations in a row. 'auto': on for 'cd'/'hals', off
        for 'mu' (True with 'mu' is an error).
    panel_bytes : int, str or None, default=None
        Target size of a row panel of X (the unit of work of one task), e.g. ``"64MiB"``;
        default ``dask.config`` keys ``dasknmf.panel-bytes`` for Dask input (64 MiB: fewer,
        larger tasks, since every task costs the scheduler time) and
        ``dasknmf.memory-panel-bytes`` for in-memory input (16 MiB: enough panels to keep the
        threads busy).
    cache : bool or 'auto', default='auto'
        Dask input only: keep X in cluster memory between iterations (True), re-read it from
        its source every iteration (False), or keep it when it takes at most
        ``dasknmf.cache-fraction`` of the cluster's memory ('auto').
    progress : bool, default=False
        Show a progress bar over iterations with the objective.
    checkpoint : str, os.PathLike or None, default=None
        A folder to write a checkpoint to every ``checkpoint_every`` iterations: the factors,
        the iteration and the loss history, written atomically (a checkpoint is always the
        previous one or the new one, never half of one). For a fit on a cluster the workers
        write the blocks of W: the folder must be on storage they share with this process.
    checkpoint_every : int, default=10
        Iterations between checkpoints.
    resume : bool, default=False
        Continue from the newest checkpoint in ``checkpoint`` instead of initializing. The
        checkpoint must come from a fit of the same input with the same settings (``tol``,
        ``max_iter`` and the reporting options may differ); the factors are then
        bit-identical to those of a fit that was never interrupted. Raises
        ``dasknmf.checkpoint.CheckpointError`` (a ``ValueError``) otherwise.
    storage_options : dict or None, default=None
        fsspec options (``endpoint_url``, ``key``, ``secret``, ``anon``, ...) for X given as
        a URL (``s3://bucket/X.zarr``, ``gs://...``, ``abfs://...``) and for a ``checkpoint``
        URL. Not written into a saved model.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        H, the factorization matrix (always numpy).
    n_components_ : int
    reconstruction_err_ : float
        ‖X − WH‖_F at the end of the fit (scikit-learn's definition).
    n_iter_ : int
        Number of iterations run.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Only for input with string column names.
    loss_history_ : list of float
        The objective after each iteration; entry 0 is the initialization.
    W_ : ndarray or dask.array.Array of shape (n_samples, n_components)
        W of the fit (what ``fit_transform`` returned): numpy for in-memory input, a Dask array
        backed by blocks on the cluster for Dask input, a lazy Dask array reading the store
        for a model from ``dasknmf.load``.

    Notes
    -----
    ``fit_transform`` and ``transform`` return numpy W for numpy or scipy.sparse input and a
    Dask array W (backed by blocks persisted on the cluster, or lazy for ``transform``) for
    Dask, Zarr or path input.
    """

    def __init__(
        self,
        n_components="auto",
        *,
        init=None,
        solver="cd",
        beta_loss="frobenius",
        tol=1e-4,
        max_iter=200,
        random_state=None,
        alpha_W=0.0,
        alpha_H="same",
        l1_ratio=0.0,
        verbose=0,
        shuffle=False,
        inner_iter="auto",
        extrapolate="auto",
        panel_bytes=None,
        cache="auto",
        progress=False,
        checkpoint=None,
        checkpoint_every=10,
        resume=False,
        storage_options=None,
    ):
        self.n_components = n_components
        self.init = init
        self.solver = solver
        self.beta_loss = beta_loss
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state
        self.alpha_W = alpha_W
        self.alpha_H = alpha_H
        self.l1_ratio = l1_ratio
        self.verbose = verbose
        self.shuffle = shuffle
        self.inner_iter = inner_iter
        self.extrapolate = extrapolate
        self.panel_bytes = panel_bytes
        self.cache = cache
        self.progress = progress
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.storage_options = storage_options

    # ---- parameters ---------------------------------------------------------------------

    def _validate_params(self) -> None:
        k = self.n_components
        valid_k = k == "auto" if isinstance(k, str) else k is None or (_is_int(k) and k >= 1)
        _check_param(
            "n_components", k, valid_k, "an int in the range [1, inf), None or a str among {'auto'}"
        )
        _check_param(
            "init",
            self.init,
            self.init is None or self.init in init.INIT_METHODS,
            f"a str among {set(init.INIT_METHODS)} or None",
        )
        _check_param(
            "solver",
            self.solver,
            isinstance(self.solver, str) and self.solver in ("cd", "hals", "mu"),
            "a str among {'cd', 'hals', 'mu'}",
        )
        beta = self.beta_loss
        _check_param(
            "beta_loss",
            beta,
            beta in _BETA_LOSSES if isinstance(beta, str) else _is_real(beta),
            f"a str among {set(_BETA_LOSSES)} or a float",
        )
        _check_param(
            "tol", self.tol, _is_real(self.tol) and self.tol >= 0, "a float in the range [0, inf)"
        )
        _check_param(
            "max_iter",
            self.max_iter,
            _is_int(self.max_iter) and self.max_iter >= 1,
            "an int in the range [1, inf)",
        )
        rs = self.random_state
        _check_param(
            "random_state",
            rs,
            rs is None
            or isinstance(rs, np.random.RandomState)
            or (_is_int(rs) and 0 <= rs < 2**32),
            "an int in the range [0, 4294967295], an instance of 'numpy.random."
            "mtrand.RandomState' or None",
        )
        _check_param(
            "alpha_W",
            self.alpha_W,
            _is_real(self.alpha_W) and self.alpha_W >= 0,
            "a float in the range [0, inf)",
        )
        _check_param(
            "alpha_H",
            self.alpha_H,
            self.alpha_H == "same"
            if isinstance(self.alpha_H, str)
            else _is_real(self.alpha_H) and self.alpha_H >= 0,
            "a float in the range [0, inf) or a str among {'same'}",
        )
        _check_param(
            "l1_ratio",
            self.l1_ratio,
            _is_real(self.l1_ratio) and 0 <= self.l1_ratio <= 1,
            "a float in the range [0, 1]",
        )
        _check_param(
            "verbose", self.verbose, isinstance(self.verbose, numbers.Integral), "an int or a bool"
        )
        _check_param("shuffle", self.shuffle, isinstance(self.shuffle, bool | np.bool_), "a bool")
        ii = self.inner_iter
        _check_param(
            "inner_iter",
            ii,
            ii == "auto" if isinstance(ii, str) else _is_int(ii) and ii >= 1,
            "an int in the range [1, inf) or 'auto'",
        )
        ex = self.extrapolate
        _check_param(
            "extrapolate",
            ex,
            ex == "auto" if isinstance(ex, str) else isinstance(ex, bool | np.bool_),
            "a bool or 'auto'",
        )
        if ex is True and self.solver == "mu":
            raise InvalidParameterError(
                "The 'extrapolate' parameter of NMF applies to solver 'cd'/'hals' only; "
                "solver='mu' needs extrapolate=False or 'auto'."
            )
        _check_param(
            "cache",
            self.cache,
            self.cache == "auto"
            if isinstance(self.cache, str)
            else isinstance(self.cache, bool | np.bool_),
            "a bool or 'auto'",
        )
        _check_param(
            "progress", self.progress, isinstance(self.progress, bool | np.bool_), "a bool"
        )
        _check_param(
            "checkpoint",
            self.checkpoint,
            self.checkpoint is None or isinstance(self.checkpoint, str | os.PathLike),
            "a str or os.PathLike (a folder) or None",
        )
        _check_param(
            "checkpoint_every",
            self.checkpoint_every,
            _is_int(self.checkpoint_every) and self.checkpoint_every >= 1,
            "an int in the range [1, inf)",
        )
        _check_param("resume", self.resume, isinstance(self.resume, bool | np.bool_), "a bool")
        _check_param(
            "storage_options",
            self.storage_options,
            self.storage_options is None or isinstance(self.storage_options, dict),
            "a dict or None",
        )
        if self.resume and self.checkpoint is None:
            raise ValueError("resume=True needs checkpoint, the folder to resume from.")
        pb = self.panel_bytes
        if pb is not None:
            try:
                valid = (_is_int(pb) or isinstance(pb, str)) and self._panel_budget() > 0
            except (ValueError, TypeError):
                valid = False
            _check_param(
                "panel_bytes", pb, valid, "a positive int, a size string such as '64MiB', or None"
            )
        if self.solver != "mu" and self._beta() != 2:
            raise ValueError(
                f"Invalid beta_loss parameter: solver {self.solver!r} does not handle "
                f"beta_loss = {beta!r}"
            )

    def _beta(self) -> float:
        """``beta_loss`` as a number (2 Frobenius, 1 Kullback–Leibler, 0 Itakura–Saito)."""
        if isinstance(self.beta_loss, str):
            return _BETA_LOSSES[self.beta_loss]
        return float(self.beta_loss)

    def _panel_budget(self, lazy: bool = True) -> int:
        """Bytes of a row panel: ``panel_bytes``, else ``dasknmf.panel-bytes`` for Dask input
        and ``dasknmf.memory-panel-bytes`` for in-memory input."""
        if self.panel_bytes is None:
            return get_bytes("dasknmf.panel-bytes" if lazy else "dasknmf.memory-panel-bytes")
        if isinstance(self.panel_bytes, str):
            from dask.utils import parse_bytes

            return int(parse_bytes(self.panel_bytes))
        return int(self.panel_bytes)

    def _objective(
        self, n_samples: int, n_features: int, n_components: int, stored: int | None = None
    ) -> engine.Objective:
        """The objective and the sweeps of the update rule; ``stored`` is the number of stored
        entries of X (all m·n when dense)."""
        stored = n_samples * n_features if stored is None else stored
        alpha_H = self.alpha_W if self.alpha_H == "same" else self.alpha_H
        solver = "mu" if self.solver == "mu" else "hals"
        if self.inner_iter != "auto":
            sweeps_w = sweeps_h = int(self.inner_iter)
        elif solver == "mu":
            sweeps_w = sweeps_h = 1
        else:
            sweeps_w = auto_sweeps(stored / n_samples, n_components)
            sweeps_h = auto_sweeps(stored / n_features, n_components)
        return engine.Objective(
            n_components=n_components,
            solver=solver,
            beta=self._beta(),
            l1_w=n_features * self.alpha_W * self.l1_ratio,
            l2_w=n_features * self.alpha_W * (1.0 - self.l1_ratio),
            l1_h=n_samples * alpha_H * self.l1_ratio,
            l2_h=n_samples * alpha_H * (1.0 - self.l1_ratio),
            sweeps_w=sweeps_w,
            sweeps_h=sweeps_h,
            extrapolate=solver == "hals" and self.extrapolate in ("auto", True),
        )

    # ---- input ---------------------------------------------------------------------------

    def _check_input(self, X, reset: bool):
        """X validated: numpy or scipy.sparse through scikit-learn's ``validate_data``, or a
        floating Dask array for Dask, Zarr and path input."""
        if not _is_lazy_input(X):
            return validate_data(
                self,
                X,
                accept_sparse=("csr", "csc"),
                dtype=[np.float64, np.float32],
                reset=reset,
                ensure_non_negative=not reset,
            )
        X = _as_dask_matrix(X, self._panel_budget(), self.storage_options)
        if reset:
            self.n_features_in_ = X.shape[1]
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but NMF is expecting "
                f"{self.n_features_in_} features as input."
            )
        return X

    def _panels(self, X, fitting: bool) -> engine.Panels:
        """Row panels of a validated X. ``transform`` returns a lazy Dask array, so for it
        X is neither cached nor submitted."""
        if isinstance(X, da.Array):
            cache = self.cache if fitting else False
            return engine.dask_panels(X, self._panel_budget(), cache, lazy=not fitting)
        return engine.in_memory_panels(X, self._panel_budget(lazy=False))

    # ---- fitting -------------------------------------------------------------------------

    def fit(self, X, y=None, **params):
        """Learn an NMF model for the data X.

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

    def fit_transform(self, X, y=None, W=None, H=None):
        """Learn an NMF model for the data X and return the transformed data W.

        Parameters
        ----------
        X : {array-like, sparse matrix, dask.array.Array, zarr.Array, str} of shape \
(n_samples, n_features)
            Training data.
        y : Ignored
        W : array-like of shape (n_samples, n_components), default=None
            Initial W with ``init='custom'``.
        H : array-like of shape (n_components, n_features), default=None
            Initial H with ``init='custom'``.

        Returns
        -------
        W : ndarray or dask.array.Array of shape (n_samples, n_components)
        """
        self._validate_params()
        X = self._check_input(X, reset=True)
        n_samples, n_features = X.shape
        method, k = self._resolve_init(n_samples, n_features, W, H)
        if method == "custom":
            W, H = _check_custom_init(W, H, (n_samples, k), (k, n_features), X.dtype)
        # A wide X whose full-width row panels would not fit the budget is factorized as
        # Xᵀ ≈ Hᵀ·Wᵀ: its row panels are column blocks of X.
        budget = self._panel_budget(lazy=isinstance(X, da.Array))
        transposed = engine.wide(X.shape, k, X.dtype.itemsize, budget)
        panels = self._panels(X.T if transposed else X, fitting=True)
        try:
            with single_blas_thread():
                return self._fit_panels(panels, method, k, W, H, transposed)
        finally:
            panels.close()

    def _resolve_init(self, n_samples: int, n_features: int, W, H) -> tuple[str, int]:
        k = self.n_components
        method = self.init
        if method == "custom":
            H_shape = np.shape(H) if H is not None else None
            if k == "auto" and H_shape is not None and len(H_shape) == 2:
                k = H_shape[0]
        elif W is not None or H is not None:
            warnings.warn(
                "When init!='custom', provided W or H are ignored. Set  init='custom' to use "
                "them as initialization.",
                RuntimeWarning,
                stacklevel=3,
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
        if self.solver == "mu" and method == "nndsvd":
            warnings.warn(
                "The multiplicative update ('mu') solver cannot update zeros present in the "
                "initialization, and so leads to poorer results when used jointly with "
                "init='nndsvd'. You may try init='nndsvda' or init='nndsvdar' instead.",
                UserWarning,
                stacklevel=3,
            )
        return method, int(k)

    def _fit_panels(self, panels: engine.Panels, method: str, k: int, W, H, transposed: bool):
        """Fit on ``panels``, which hold X, or Xᵀ when ``transposed`` (W and H swap roles)."""
        n_rows, n_cols = panels.shape
        if transposed:
            W, H = (None, None) if W is None else (H.T, W.T)
        stats = engine.check_values(panels)
        stored = stats.nnz if panels.sparse else n_rows * n_cols
        objective = self._objective(
            *((n_cols, n_rows) if transposed else (n_rows, n_cols)), k, stored
        )
        if transposed:
            objective = objective.transposed()
        if panels.sparse and self.cache == "auto":
            stored_bytes = stats.nnz * (panels.dtype.itemsize + 8) + (n_rows + 1) * 8
            if engine.should_cache(stored_bytes, "auto"):
                engine.cache_panels(panels)
        if stats.min == 0 and objective.beta <= 0:
            raise ValueError(
                "When beta_loss <= 0 and X contains zeros, the solver may diverge. Please add "
                "small values to X, or use a positive beta_loss."
            )
        col_bounds = engine.column_bounds(n_cols, k, panels.dtype.itemsize)
        ckpt = None
        if self.checkpoint is not None:
            fingerprint = self._fingerprint(panels, stats, objective, method, col_bounds)
            ckpt = Checkpoint(
                self.checkpoint, self.checkpoint_every, fingerprint, self.storage_options
            )
            if panels.ops.is_async:  # the workers write W's blocks there
                ckpt.probe(panels.ops.client)

        def starting_point(from_checkpoint: bool):
            """(Wᵀ blocks, H blocks, iteration, history, shuffling generator, momentum) to start
            from."""
            shuffle_rng = None
            if self.shuffle:
                shuffle_rng = np.random.RandomState(init.seed_entropy(self.random_state) % 2**32)
            if from_checkpoint:
                state = ckpt.load(panels)
                if shuffle_rng is not None:
                    shuffle_rng.set_state(state.shuffle_state)
                history = engine.History(**state.history)
                return state.wt, state.h, state.n_iter, history, shuffle_rng, state.momentum
            wt, h = init.initialize(
                panels,
                method,
                k,
                col_bounds,
                stats.mean,
                self.random_state,
                W,
                H,
                swap_streams=transposed,
            )
            return wt, h, 0, None, shuffle_rng, None

        wt, h, start, history, shuffle_rng, momentum = starting_point(self.resume)
        logger.info(
            "NMF fit: X %s %s%s, %d components, %s, beta %g, %s",
            "x".join(map(str, (n_cols, n_rows) if transposed else (n_rows, n_cols))),
            panels.dtype,
            " sparse" if panels.sparse else "",
            k,
            objective.solver,
            objective.beta,
            f"resumed at iteration {start}" if self.resume else f"init {method}",
        )
        with _Reporter(self.verbose, self.progress, self.max_iter, start) as report:
            for attempt in itertools.count(1):
                try:
                    result = engine.fit(
                        panels,
                        objective,
                        wt,
                        h,
                        stats.sum_sq,
                        col_bounds,
                        max_iter=self.max_iter,
                        tol=self.tol,
                        shuffle_rng=shuffle_rng,
                        callback=report,
                        checkpoint=ckpt,
                        start=start,
                        history=history,
                        momentum=momentum,
                    )
                    value, h_blocks = engine.final_pass(panels, objective, result)
                    break
                except engine.LOST_DATA as error:
                    # A worker died with blocks of W or H that nothing can recompute (their
                    # inputs, the previous iteration's blocks, are gone): start again from the
                    # newest checkpoint, else from the initialization. Either gives exactly
                    # the factors of an undisturbed fit.
                    if attempt > MAX_RECOVERIES:
                        raise
                    from_checkpoint = ckpt is not None and ckpt.latest() is not None
                    logger.warning(
                        "Data lost on the cluster (%s: %s); restarting the fit from %s",
                        type(error).__name__,
                        error,
                        "the checkpoint" if from_checkpoint else "the initialization",
                    )
                    engine.relocate(panels)
                    wt, h, start, history, shuffle_rng, momentum = starting_point(from_checkpoint)
                    report.restart(start)
        self.reconstruction_err_ = float(np.sqrt(2 * max(value, 0.0)))
        logger.info(
            "NMF fit done: %d iterations, reconstruction error %.6g",
            result.n_iter,
            self.reconstruction_err_,
        )
        if transposed:
            self.components_ = _side_by_side(panels.ops.fetch(result.wt))
            W = _side_by_side(h_blocks).T
            self.W_ = da.from_array(W) if panels.ops.is_lazy else W
        else:
            self.components_ = _side_by_side(h_blocks)
            self.W_ = _assemble_w(panels, result.wt, k)
        self.n_components_ = k
        self.n_iter_ = result.n_iter
        self.loss_history_ = list(result.history.loss)
        if self.n_iter_ == self.max_iter and self.tol > 0:
            warnings.warn(
                f"Maximum number of iterations {self.max_iter} reached. Increase it to "
                "improve convergence.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return self.W_

    def _fingerprint(self, panels, stats, objective, method: str, col_bounds) -> dict:
        """What the iterates of a fit depend on, for checking that a checkpoint fits: the
        update rule, the initialization, the panel layout and the input (its statistics from
        the validation pass stand for its contents)."""
        seed = self.random_state
        return {
            **{f"settings.{key}": value for key, value in dataclasses.asdict(objective).items()},
            "settings.init": method,
            "settings.random_state": seed if seed is None or _is_int(seed) else type(seed).__name__,
            "settings.shuffle": bool(self.shuffle),
            "settings.panels": list(map(int, panels.row_bounds)),
            "settings.column_blocks": list(map(int, col_bounds)),
            "input.shape": list(panels.shape),
            "input.dtype": str(panels.dtype),
            "input.sparse": bool(panels.sparse),
            "input.nnz": stats.nnz,
            "input.sum": stats.sum,
            "input.sum_sq": stats.sum_sq,
            "input.min": stats.min,
        }

    def save(self, path, *, overwrite: bool = False, storage_options=None):
        """Write the fitted model to a Zarr group (see ``dasknmf.load``).

        Arrays ``W`` (``W_``, written chunk by chunk from the cluster for a Dask fit) and ``H``
        (``components_``); attributes with the parameters, ``n_iter_``, ``loss_history_``,
        ``reconstruction_err_``, the input shape and the package version. The group is written
        to a temporary sibling and renamed to ``path`` when complete.

        Parameters
        ----------
        path : str or os.PathLike
            A local path or an fsspec URL; must not exist unless ``overwrite``.
        overwrite : bool, default=False
        storage_options : dict, optional
            fsspec options for a URL; default the model's ``storage_options``.

        Returns
        -------
        pathlib.Path (the URL, a str, for an object store)
        """
        options = self.storage_options if storage_options is None else storage_options
        return io.save_model(self, path, overwrite=overwrite, storage_options=options)

    # ---- using a fitted model --------------------------------------------------------------

    def transform(self, X):
        """Transform X by the fitted model: W for the fixed H (non-negative least squares).

        Parameters
        ----------
        X : {array-like, sparse matrix, dask.array.Array, zarr.Array, str} of shape \
(n_samples, n_features)

        Returns
        -------
        W : ndarray of shape (n_samples, n_components), or a lazy dask.array.Array for Dask,
            Zarr or path input (each row panel is read once when it is computed).
        """
        check_is_fitted(self)
        panels = self._panels(self._check_input(X, reset=False), fitting=False)
        H = self.components_
        k = H.shape[0]
        objective = self._objective(*panels.shape, k)
        gram_h = H @ H.T
        ops = panels.ops
        try:
            with single_blas_thread():
                blocks = panels.map(
                    steps.transform_panel,
                    [(x,) for x in panels.items],
                    objective,
                    ops.share(H),
                    gram_h,
                    self.max_iter,
                    self.tol,
                )
                if not ops.is_lazy:
                    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        finally:
            panels.close()
        return da.concatenate(
            [
                da.from_delayed(b, shape=(rows, k), dtype=panels.dtype)
                for b, rows in zip(blocks, panels.row_sizes, strict=True)
            ]
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


def _as_dask_matrix(X, panel_bytes: int, storage_options=None) -> da.Array:
    """A Dask array, zarr.Array or Zarr path (or URL) as a 2-D floating Dask array."""
    if not isinstance(X, da.Array):
        X = io.open_matrix(X, panel_bytes=panel_bytes, storage_options=storage_options)
    io.check_matrix_shape(X.shape, "X")
    io.check_matrix_dtype(X.dtype, "X")
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    return X


def _check_custom_init(W, H, w_shape, h_shape, dtype):
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
            import dask

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


def _side_by_side(blocks: list) -> np.ndarray:
    """Component-major blocks joined along their second axis."""
    return np.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]


def _assemble_w(panels: engine.Panels, wt: list, k: int):
    """W from its component-major blocks: numpy in memory, a Dask array otherwise."""
    if not panels.ops.is_lazy:
        return np.ascontiguousarray(np.concatenate(wt, axis=1).T)
    blocks = [
        da.from_delayed(dask.delayed(b), shape=(k, rows), dtype=panels.dtype)
        for b, rows in zip(wt, panels.row_sizes, strict=True)
    ]
    return da.concatenate(blocks, axis=1).T


class _Reporter:
    """Per-iteration output: scikit-learn style lines (verbose) and/or a tqdm bar (progress)."""

    def __init__(self, verbose: int, progress: bool, max_iter: int, start: int = 0):
        self.verbose = verbose
        self.progress = progress
        self.max_iter = max_iter
        self.start = start
        self._bar = None

    def __enter__(self):
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.max_iter, initial=self.start, desc="NMF", unit="it")
            client = engine.distributed_client()
            if client is not None:
                self._bar.write(f"Dask dashboard: {client.dashboard_link}")
        return self

    def restart(self, n_iter: int) -> None:
        """The fit starts again after ``n_iter`` iterations (after a worker loss)."""
        if self._bar is not None:
            self._bar.reset(total=self.max_iter)
            self._bar.update(n_iter)

    def __call__(self, n_iter: int, history: engine.History) -> None:
        loss = history.loss[-1]
        change = (history.loss[-2] - loss) / abs(history.loss[-2]) if history.loss[-2] else 0.0
        if self.verbose:
            print(f"Iteration {n_iter:4d}  objective {loss:.6g}  relative decrease {change:.3e}")
        if self._bar is not None:
            self._bar.set_postfix(objective=f"{loss:.6g}", rel_change=f"{change:.2e}")
            self._bar.update(1)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()
