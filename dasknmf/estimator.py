"""``dasknmf.NMF``: scikit-learn's NMF estimator on the one-pass engine.

The estimator is scikit-learn's face: it checks parameters and input, translates them into a
``pipeline.Plan`` — the update rule and loss as ``steps.Objective`` — and reads the fitted
factors back into scikit-learn's attributes. The fit itself, in memory for numpy and
scipy.sparse and on Dask for Dask arrays, Zarr arrays, paths and URLs, is ``dasknmf.pipeline``'s.
"""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from dasknmf import _params, io, pipeline
from dasknmf._base import BaseNMF
from dasknmf._params import InvalidParameterError
from dasknmf.recommend import RecommenderMixin
from dasknmf.steps import Objective

__all__ = ["NMF", "InvalidParameterError", "load_model"]

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


#: The estimator's parameters that ``pipeline.Plan`` takes as they are.
_PLAN_SETTINGS = (
    "max_iter", "tol", "random_state", "shuffle", "cache", "layout", "missing", "checkpoint",
    "checkpoint_every", "resume", "storage_options", "verbose", "progress", "extrapolate",
)  # fmt: skip


class NMF(RecommenderMixin, BaseNMF):
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
        for 'mu' (True with 'mu' is an error), off on 2-D blocks whose workers cannot
        hold its five copies of W and H (True there is an error), and off where ‖X‖²
        underflows float64 (values near 1e-160 and below: the objective cannot measure the
        pushes).
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
    missing : {None, 'nan', 'unstored'}, default=None
        Which entries of X are unobserved (recommendation: ratings not given). None: all are
        observed. 'nan': the NaN entries of dense X. 'unstored': the entries that sparse X does
        not store (a stored zero is an observed zero). The loss is then summed over the
        observed entries only — with 'cd'/'hals' the Frobenius loss by alternating least
        squares (each row of W, and each column of H, by HALS sweeps on its own Gram matrix),
        with 'mu' any β-divergence by multiplicative updates — with each row's (column's)
        penalties scaled by its number of observed entries instead of n_features
        (n_samples), as in Spark's ALS-WR; rows and columns with no observed entry get zero
        factors. ``init`` 'random' or 'custom' (None means 'random'), no extrapolation.
    layout : {'auto', 'rows', 'columns', 'blocks'}, default='auto'
        How X is cut into tasks: row panels, row panels of Xᵀ, or 2-D blocks (for X large in
        both dimensions). 'auto' takes the first whose tasks fit ``panel_bytes``.
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
        ‖X − WH‖_F of the factors returned (scikit-learn's definition): those of the last
        iteration, or with extrapolation those of the lowest objective in ``loss_history_``
        (a push may raise the objective for an iteration).
    n_iter_ : int
        Number of iterations run.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Only for input with string column names.
    loss_history_ : list of float
        The objective after each iteration; entry 0 is the initialization.
    layout_ : dict
        How X was cut into the tasks' units: ``scheme`` "rows" (row panels of X), "columns"
        (row panels of Xᵀ, for a wide X) or "blocks" (2-D), the number of ``panels`` (or of
        ``blocks``, rows × columns), and whether they were ``cached`` in memory or read from
        their source in every iteration; ``stacked``, for many tiny row panels, how many
        consecutive panels a task updates at once (``dasknmf.group-bytes``).
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
        layout="auto",
        missing=None,
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
        self.layout = layout
        self.missing = missing
        self.progress = progress
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.storage_options = storage_options

    # ---- parameters ---------------------------------------------------------------------

    def _validate_params(self) -> None:
        _params.check("NMF", self.get_params())
        _params.check_combinations(self.get_params())

    def _objective(
        self, n_samples: int, n_features: int, n_components: int, stored: int | None = None
    ) -> Objective:
        """The objective and the sweeps of the update rule; ``stored`` is the number of stored
        entries of X (all m·n when dense)."""
        stored = n_samples * n_features if stored is None else stored
        alpha_H = self.alpha_W if self.alpha_H == "same" else self.alpha_H
        masked = self.missing is not None
        # Masked: penalties per observed entry, scaled by each row's (column's) count.
        per_w, per_h = (1, 1) if masked else (n_features, n_samples)
        solver = "mu" if self.solver == "mu" else "hals"
        if self.inner_iter != "auto":
            sweeps_w = sweeps_h = int(self.inner_iter)
        elif solver == "mu":
            sweeps_w = sweeps_h = 1
        else:
            sweeps_w = auto_sweeps(stored / n_samples, n_components)
            sweeps_h = auto_sweeps(stored / n_features, n_components)
        return Objective(
            n_components=n_components,
            solver=solver,
            beta=_params.beta(self.beta_loss),
            l1_w=per_w * self.alpha_W * self.l1_ratio,
            l2_w=per_w * self.alpha_W * (1.0 - self.l1_ratio),
            l1_h=per_h * alpha_H * self.l1_ratio,
            l2_h=per_h * alpha_H * (1.0 - self.l1_ratio),
            sweeps_w=sweeps_w,
            sweeps_h=sweeps_h,
            extrapolate=solver == "hals" and self.extrapolate in ("auto", True) and not masked,
            masked=masked,
        )

    # ---- fitting -------------------------------------------------------------------------

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
        source, X = X, self._check_input(X, reset=True)
        n_samples, n_features = X.shape
        method, k = _params.resolve_init(
            self.n_components, self.init, self.solver, n_samples, n_features, W, H, self.missing
        )
        if method == "custom":
            W, H = _params.check_custom_init(W, H, (n_samples, k), (k, n_features), X.dtype)
        plan = pipeline.Plan(
            n_components=k,
            init=method,
            objective=self._objective,
            panel_bytes=self._panel_budget(
                X.shape, X.dtype.itemsize, k, lazy=isinstance(X, da.Array)
            ),
            W=W,
            H=H,
            **{name: getattr(self, name) for name in _PLAN_SETTINGS},
        )
        fitted = pipeline.fit(X, plan)
        self.components_ = fitted.components
        self.W_ = fitted.W
        self.n_components_ = k
        self.n_iter_ = fitted.n_iter
        self.loss_history_ = fitted.loss_history
        self.reconstruction_err_ = fitted.reconstruction_err
        self.layout_ = fitted.layout
        self._fitted_X = X  # for ``recommend`` (a reference; a store is read again there)
        self._keep_ids(io.matrix_ids(source, self.storage_options))
        if self.n_iter_ == self.max_iter and self.tol > 0:
            warnings.warn(
                f"Maximum number of iterations {self.max_iter} reached. Increase it to "
                "improve convergence.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self.W_

    def save(self, path, *, overwrite: bool = False, storage_options=None):
        """Write the fitted model to a Zarr group (see ``dasknmf.load``).

        Arrays ``W`` (``W_``, written chunk by chunk from the cluster for a Dask fit) and ``H``
        (``components_``); attributes with the parameters, ``n_iter_``, ``loss_history_``,
        ``reconstruction_err_``, the input shape and the package version. The group is written
        to a temporary sibling and moved to ``path`` when complete.

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
        return self._save(
            path,
            overwrite,
            storage_options,
            ids=(self.row_ids_, self.col_ids_) if hasattr(self, "row_ids_") else None,
        )

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
        X = self._check_input(X, reset=False)
        H = self.components_
        return pipeline.transform(
            X,
            H,
            self._objective(*X.shape, H.shape[0]),
            self._panel_budget(X.shape, X.dtype.itemsize, H.shape[0], isinstance(X, da.Array)),
            self.max_iter,
            self.tol,
            self.layout,
        )


def load_model(path, *, storage_options=None) -> NMF:
    """A fitted ``NMF`` from a group written by ``NMF.save`` (a local path or a URL);
    ``transform`` works without refitting. ``W_``, if saved, is a lazy Dask array reading
    the stored W."""
    attributes, H, W = io.load_model(path, storage_options=storage_options)
    model = NMF(**attributes["params"])
    model.storage_options = storage_options
    model.components_ = H
    model.n_components_ = attributes["n_components"]
    model.n_features_in_ = attributes["n_features"]
    model.n_iter_ = attributes["n_iter"]
    model.loss_history_ = list(attributes["loss_history"])
    model.reconstruction_err_ = attributes["reconstruction_err"]
    if "feature_names_in" in attributes:
        model.feature_names_in_ = np.asarray(attributes["feature_names_in"], dtype=object)
    if "layout" in attributes:
        model.layout_ = dict(attributes["layout"])
    if W is not None:
        model.W_ = W
    model._keep_ids(io.matrix_ids(path, storage_options))
    return model
