"""``dasknmf.MiniBatchNMF``: scikit-learn's mini-batch NMF, in memory or over the row panels of
a Dask array or Zarr store, with ``partial_fit`` and updates of a saved model by new rows.

The estimator checks parameters and input in scikit-learn's words and translates them into a
``minibatch.Schedule``; the fit is ``dasknmf.minibatch``'s, the per-batch arithmetic
``dasknmf.online``'s.
"""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from dasknmf import _params, io, minibatch
from dasknmf._base import BaseNMF
from dasknmf.online import Online

__all__ = ["MiniBatchNMF", "load_minibatch_model"]

#: The estimator's parameters that ``minibatch.Schedule`` takes as they are.
_SCHEDULE_SETTINGS = (
    "batch_size", "max_iter", "forget_factor", "max_no_improvement", "fresh_restarts",
    "fresh_restarts_max_iter", "random_state", "parallel_batches", "cache", "verbose",
    "checkpoint", "checkpoint_every", "resume", "storage_options",
)  # fmt: skip


class MiniBatchNMF(BaseNMF):
    """Mini-batch Non-negative Matrix Factorization, in memory or on a Dask cluster.

    scikit-learn's :class:`sklearn.decomposition.MiniBatchNMF` — the online multiplicative
    updates of Lefèvre et al. (2011): each mini-batch of rows updates its W from the current
    H, and H is updated from running sums of the batches' statistics, the older ones
    discounted by the forget factor — with its parameters, attributes and results. numpy and
    scipy.sparse input is fitted in memory, batch by batch as scikit-learn does; a Dask array,
    a ``zarr.Array`` or the path of a Zarr store is read in row panels of at most
    ``batch_size`` rows (whole stored chunks), so that an epoch reads X once, and
    ``parallel_batches`` of them are computed at once on the cluster before H is updated
    from their summed statistics.

    Parameters
    ----------
    n_components : int, 'auto' or None, default='auto'
    init : {'random', 'nndsvd', 'nndsvda', 'nndsvdar', 'custom'}, default=None
        As for :class:`dasknmf.NMF`.
    batch_size : int, default=1024
        Rows per mini-batch. For Dask input the batches are row panels of whole stored chunks
        of at most this many rows (a chunk taller than it is a batch of its own): chunk X
        along rows in ``batch_size`` rows to have scikit-learn's batches. A CSR store is read
        in batches of ``batch_size`` rows (fewer only where the workers' memory calls for
        smaller panels).
    beta_loss : float or {'frobenius', 'kullback-leibler', 'itakura-saito'}, default='frobenius'
        β-divergence to minimize; β <= 0 needs X without zeros.
    tol : float, default=1e-4
        Stop when H changes by at most ``tol`` (relative, Frobenius norm) in a step; also the
        tolerance of the W solves of ``transform`` and of fresh restarts. 0 turns both off.
    max_no_improvement : int or None, default=10
        Stop when the smoothed cost has not improved for this many steps (None: never).
    max_iter : int, default=200
        Maximum number of epochs (passes over X).
    alpha_W, alpha_H, l1_ratio : float
        Regularization, as in scikit-learn: the W terms scaled by n_features, the H terms by
        the rows of each batch.
    forget_factor : float, default=0.7
        How much of the past a step keeps: the running sums are multiplied by
        forget_factor^(rows of the step / n_samples) before a step's statistics are added, so
        that after one epoch the past weighs forget_factor.
    fresh_restarts : bool, default=False
        Solve W of each batch completely (from a constant start) in every step, and W of all
        of X at the end, instead of one update of the kept W.
    fresh_restarts_max_iter : int, default=30
        Updates of such a solve, at most.
    transform_max_iter : int or None, default=None
        Updates of the W solves of ``transform`` (and of the final fresh restart), at most;
        None: ``max_iter``.
    random_state : int, RandomState instance or None, default=None
    verbose : int, default=0
        Print the mean batch cost of each step.
    parallel_batches : int or None, default=None
        Dask input: batches computed at once in a step before H is updated from their summed
        statistics — the same step as one batch of all their rows (without fresh restarts),
        with ρ for that many rows. None: one per worker thread on a distributed cluster, 1
        otherwise (scikit-learn's sequence). Results depend on it.
    panel_bytes : int, str or None, default=None
        Size of the row panels that ``transform`` and ``partial_fit`` read Dask input in.
    cache : bool or 'auto', default='auto'
        Dask input: keep X's batches in cluster memory between epochs, as for ``NMF``.
    checkpoint : str, os.PathLike or None, default=None
        A folder to write a checkpoint to every ``checkpoint_every`` steps (H, the running
        sums, W of every batch and the state of the stopping rule), atomically, as ``NMF``
        does; on a cluster it must be storage the workers share.
    checkpoint_every : int, default=10
        Steps between checkpoints.
    resume : bool, default=False
        Continue from the newest checkpoint in ``checkpoint``: the result is bit-identical to
        that of a fit never interrupted. The checkpoint must come from a fit of the same input
        with the same settings (``max_iter``, ``max_no_improvement``, ``tol`` without fresh
        restarts, and the reporting may differ); ``dasknmf.checkpoint.CheckpointError`` (a
        ``ValueError``) otherwise.
    storage_options : dict or None, default=None
        fsspec options for X given as a URL (and a checkpoint URL).

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
    n_components_ : int
    reconstruction_err_ : float
        √(2·D_β(X | WH)) at the end of the fit, for the W returned.
    n_iter_ : int
        Epochs started.
    n_steps_ : int
        Mini-batches processed.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
    W_ : ndarray or dask.array.Array of shape (n_samples, n_components)
        W of the fit (what ``fit_transform`` returned).
    layout_ : dict
        The batches: ``panels`` (their number) and whether they were ``cached``.
    """

    def __init__(
        self,
        n_components="auto",
        *,
        init=None,
        batch_size=1024,
        beta_loss="frobenius",
        tol=1e-4,
        max_no_improvement=10,
        max_iter=200,
        alpha_W=0.0,
        alpha_H="same",
        l1_ratio=0.0,
        forget_factor=0.7,
        fresh_restarts=False,
        fresh_restarts_max_iter=30,
        transform_max_iter=None,
        random_state=None,
        verbose=0,
        parallel_batches=None,
        panel_bytes=None,
        cache="auto",
        checkpoint=None,
        checkpoint_every=10,
        resume=False,
        storage_options=None,
    ):
        self.n_components = n_components
        self.init = init
        self.batch_size = batch_size
        self.beta_loss = beta_loss
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.max_iter = max_iter
        self.alpha_W = alpha_W
        self.alpha_H = alpha_H
        self.l1_ratio = l1_ratio
        self.forget_factor = forget_factor
        self.fresh_restarts = fresh_restarts
        self.fresh_restarts_max_iter = fresh_restarts_max_iter
        self.transform_max_iter = transform_max_iter
        self.random_state = random_state
        self.verbose = verbose
        self.parallel_batches = parallel_batches
        self.panel_bytes = panel_bytes
        self.cache = cache
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.storage_options = storage_options

    # ---- parameters ---------------------------------------------------------------------

    def _online(self, n_components: int, n_features: int) -> Online:
        return Online(
            n_components=n_components,
            beta=_params.beta(self.beta_loss),
            alpha_w=self.alpha_W,
            alpha_h=self.alpha_W if self.alpha_H == "same" else self.alpha_H,
            l1_ratio=self.l1_ratio,
            n_features=n_features,
            tol=self.tol,
        )

    @property
    def _transform_max_iter(self) -> int:
        return self.max_iter if self.transform_max_iter is None else self.transform_max_iter

    def _resolve(self, X, W, H) -> tuple[str, int, object, object]:
        method, k = _params.resolve_init(
            self.n_components, self.init, "mu", *X.shape, W, H
        )  # fmt: skip
        if method == "custom":
            W, H = _params.check_custom_init(W, H, (X.shape[0], k), (k, X.shape[1]), X.dtype)
        return method, k, W, H

    # ---- fitting -------------------------------------------------------------------------

    def fit_transform(self, X, y=None, W=None, H=None):
        """Learn an NMF model for the data X by mini-batches and return W.

        Parameters
        ----------
        X : {array-like, sparse matrix, dask.array.Array, zarr.Array, str} of shape \
(n_samples, n_features)
        y : Ignored
        W : array-like of shape (n_samples, n_components), default=None
            Initial W with ``init='custom'``.
        H : array-like of shape (n_components, n_features), default=None
            Initial H with ``init='custom'``.

        Returns
        -------
        W : ndarray or dask.array.Array of shape (n_samples, n_components)
        """
        _params.check("MiniBatchNMF", self.get_params())
        if self.resume and self.checkpoint is None:
            raise ValueError("resume=True needs checkpoint, the folder to resume from.")
        # A store opened in panels of at most batch_size rows, the batches: whole stored
        # chunks of a dense store; a CSR store, whose bytes of stored entries would put far
        # more rows in a panel, in batch_size rows (transform and partial_fit read it in
        # bigger panels: a CSR read decompresses whole stored chunks).
        X = self._check_input(X, reset=True, rows=self.batch_size)
        method, k, W, H = self._resolve(X, W, H)
        schedule = minibatch.Schedule(
            online=self._online(k, X.shape[1]),
            init=method,
            transform_max_iter=self._transform_max_iter,
            W=W,
            H=H,
            **{name: getattr(self, name) for name in _SCHEDULE_SETTINGS},
        )
        fitted = minibatch.fit(X, schedule)
        self._keep(fitted.components, fitted.numerator, fitted.denominator, fitted.rho)
        self.W_ = fitted.W
        self.n_iter_ = fitted.n_iter
        self.n_steps_ = fitted.n_steps
        self.reconstruction_err_ = fitted.reconstruction_err
        self.layout_ = fitted.layout
        if self.n_iter_ == self.max_iter and self.tol > 0:
            warnings.warn(
                f"Maximum number of iterations {self.max_iter} reached. Increase it to "
                "improve convergence.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self.W_

    def _keep(self, H, A, B, rho) -> None:
        self.components_ = H
        self.n_components_ = H.shape[0]
        self._components_numerator = A
        self._components_denominator = B
        self._rho = rho

    def partial_fit(self, X, y=None, W=None, H=None):
        """Update the model with X as one mini-batch (scikit-learn's ``partial_fit``): W of
        X's rows solved for the current H, then H updated from their statistics and the
        running sums. The first call initializes the model from X (``W``, ``H`` with
        ``init='custom'``) and fixes the forget factor's ρ from its number of rows. A Dask
        array, Zarr array or path is read once, in row panels. A failing call leaves the
        model as it was.

        Returns
        -------
        self
        """
        before = dict(self.__dict__)
        try:
            return self._partial_fit(X, W, H)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _partial_fit(self, X, W, H):
        fitted = hasattr(self, "components_")
        if not fitted:
            _params.check("MiniBatchNMF", self.get_params())
        X = self._check_input(X, reset=not fitted)
        start = None
        if not fitted:
            method, k, W, H = self._resolve(X, W, H)
            start = minibatch.Start(
                method, self.batch_size, self.forget_factor, self.random_state, W, H
            )  # fmt: skip
            model = None
        else:
            k = self.components_.shape[0]
            model = minibatch.Model(
                self.components_,
                self._components_numerator,
                self._components_denominator,
                self._rho,
            )
        updated = minibatch.partial_fit(
            X,
            self._online(k, X.shape[1]),
            self.fresh_restarts_max_iter,
            self._panel_budget(X.shape, X.dtype.itemsize, k, isinstance(X, da.Array)),
            model,
            start,
        )
        self._keep(updated.components, updated.numerator, updated.denominator, updated.rho)
        self.n_steps_ = getattr(self, "n_steps_", 0) + 1
        return self

    # ---- using a fitted model --------------------------------------------------------------

    def transform(self, X):
        """W for X under the fitted H (scikit-learn's ``MiniBatchNMF.transform``).

        Returns
        -------
        W : ndarray of shape (n_samples, n_components), or a lazy dask.array.Array for Dask,
            Zarr or path input (one solve per row panel, each read once when computed).
        """
        check_is_fitted(self)
        X = self._check_input(X, reset=False)
        H = self.components_
        return minibatch.transform(
            X,
            self._online(H.shape[0], X.shape[1]),
            H,
            self._transform_max_iter,
            self._panel_budget(X.shape, X.dtype.itemsize, H.shape[0], isinstance(X, da.Array)),
        )

    def save(self, path, *, overwrite: bool = False, storage_options=None):
        """Write the fitted model to a Zarr group (``dasknmf.load`` reads it back): as
        ``NMF.save``, with the running sums A and B (arrays ``numerator``, ``denominator``) and
        ρ, so that ``partial_fit`` or ``dasknmf update`` can go on from it."""
        check_is_fitted(self)
        return self._save(
            path,
            overwrite,
            storage_options,
            arrays={
                "numerator": self._components_numerator,
                "denominator": self._components_denominator,
            },
        )


def load_minibatch_model(path, attributes: dict, H: np.ndarray, W, storage_options=None):
    """A fitted ``MiniBatchNMF`` from a group written by ``MiniBatchNMF.save``."""
    params = dict(attributes["params"])
    model = MiniBatchNMF(**params)
    model.storage_options = storage_options
    A, B = (
        io.load_model_array(path, name, H.shape, storage_options=storage_options)
        for name in ("numerator", "denominator")
    )
    model._keep(H, A, B, float(attributes["rho"]))
    model.n_features_in_ = attributes["n_features"]
    model.n_steps_ = attributes.get("n_steps", 0)
    if attributes.get("n_iter") is not None:
        model.n_iter_ = attributes["n_iter"]
    if attributes.get("reconstruction_err") is not None:
        model.reconstruction_err_ = attributes["reconstruction_err"]
    if "feature_names_in" in attributes:
        model.feature_names_in_ = np.asarray(attributes["feature_names_in"], dtype=object)
    if "layout" in attributes:
        model.layout_ = dict(attributes["layout"])
    if W is not None:
        model.W_ = W
    return model
