"""Held-out error by bi-cross-validation (Owen & Perry 2009), for choosing k
(``dasknmf.rank``): with the rows and the columns each split in two, for each of the four
blocks A = X[I, J], NMF is fitted to X[¬I, ¬J] = W_D·H_D, then W_C = argmin ‖X[I, ¬J] − W_C·H_D‖
and H_B = argmin ‖X[¬I, J] − W_D·H_B‖ (non-negative least squares) predict A ≈ W_C·H_B; the
held-out error is √(Σ‖A − W_C·H_B‖² / Σ‖A‖²) over the four. Too small a k leaves structure in A
unexplained; too large a k fits noise in X[¬I, ¬J] that does not carry over, so the held-out
error is smallest near the rank of the signal.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import dask
import dask.array as da
import numpy as np
from sklearn.exceptions import ConvergenceWarning

from dasknmf import kernels, panels, passes, pipeline
from dasknmf.estimator import NMF
from dasknmf.steps import StreamedPanel

#: Sweeps and tolerance of the non-negative least squares of the held-out prediction.
NNLS_MAX_ITER, NNLS_TOL = 200, 1e-4


def stacked_fit(X, ranks: tuple[int, ...], seeds: tuple, settings: dict, **plan) -> tuple:
    """Fits of ``ranks`` (one seed each) stacked in one (``pipeline.Plan.ranks``), with the
    ``NMF`` ``settings`` (random starts, no extrapolation): (``pipeline.Fitted``, the stacked
    objective for a transform with its H)."""
    model = NMF(n_components=max(ranks), **settings)
    fitted = pipeline.fit(
        X,
        pipeline.Plan(
            n_components=max(ranks),
            init="random",
            objective=model._objective,
            max_iter=model.max_iter,
            tol=model.tol,
            panel_bytes=model._panel_budget(
                X.shape, X.dtype.itemsize, sum(ranks), isinstance(X, da.Array)
            ),
            random_state=seeds,
            ranks=ranks,
            storage_options=model.storage_options,
            **plan,
        ),
    )
    alone = model._objective(*X.shape, max(ranks))
    return fitted, dataclasses.replace(alone, n_components=sum(ranks), ranks=ranks)


def heldout_errors(X, ks, settings: dict, seed: int, folds: int = 2) -> dict[int, float]:
    """The relative held-out error of each rank in ``ks`` by bi-cross-validation (see the
    module), the rows and columns split into ``folds`` groups each at random (seeded by
    ``seed``), for fits with the ``NMF`` ``settings``. On each fold the fits of all ks are
    stacked: each read of a submatrix serves them all (the fit, the transform, the normal
    equations, the residuals); the non-negative least squares stay each k's own."""
    m, n = X.shape
    ranks = tuple(ks)
    check_folds(X.shape, max(ranks), folds)
    rng = np.random.default_rng(seed)
    row_fold, col_fold = rng.permutation(m) % folds, rng.permutation(n) % folds
    sums = np.zeros(len(ranks) + 1)  # Σ‖A − W_C·H_B‖² per k, then Σ‖A‖²
    for a in range(folds):
        rows, others = np.flatnonzero(row_fold == a), np.flatnonzero(row_fold != a)
        for b in range(folds):
            cols, rest = np.flatnonzero(col_fold == b), np.flatnonzero(col_fold != b)
            with warnings.catch_warnings():  # a fold's fit is a means, not the result
                warnings.simplefilter("ignore", ConvergenceWarning)
                fitted, objective = stacked_fit(
                    submatrix(X, others, rest), ranks, (seed,) * len(ranks), settings
                )
            model = NMF(**settings)
            w_c = pipeline.transform(
                submatrix(X, rows, rest),
                fitted.components,
                objective,
                model._panel_budget(
                    (rows.size, rest.size), X.dtype.itemsize, sum(ranks), isinstance(X, da.Array)
                ),
                model.max_iter,
                model.tol,
            )
            gram, cross = _normal_equations(fitted.W, submatrix(X, others, cols))
            parts = objective.fit_slices()
            h_b = np.concatenate(
                [passes.nnls(gram[p, p], cross[p], NNLS_MAX_ITER, NNLS_TOL) for p in parts]
            )
            sums += by_row_blocks(residual_and_norm, submatrix(X, rows, cols), w_c, h_b, parts)
    residuals, total = sums[:-1], sums[-1]
    return {
        k: float(np.sqrt(r / total)) if total > 0 else 0.0
        for k, r in zip(ranks, residuals, strict=True)
    }


def submatrix(X, rows: np.ndarray, cols: np.ndarray):
    """X[rows][:, cols] for increasing index arrays. For a Dask array, each row chunk is read
    inside the task that takes its rows (``StreamedPanel``): the keys of X's own chunks never
    reach the scheduler, where a fit of X already holds them (the scheduler warns, and may
    deadlock, when one key comes with two different specs)."""
    if not isinstance(X, da.Array):
        return X[rows][:, cols]
    X = X.rechunk({1: -1})
    bounds = np.cumsum((0, *X.chunks[0]))
    blocks = []
    pieces = zip(panels.blocks_as_delayed(X), itertools.pairwise(bounds), strict=True)
    for source, (low, high) in pieces:
        local = rows[(rows >= low) & (rows < high)] - low
        if local.size:
            task = dask.delayed(_take)(StreamedPanel(source), local, cols)
            shape = (local.size, cols.size)
            blocks.append(da.from_delayed(task, shape=shape, dtype=X.dtype, meta=X._meta))
    return da.concatenate(blocks)


def _take(panel, rows, cols):
    return panel.read()[rows][:, cols]


def check_folds(shape, k: int, folds: int) -> None:
    if min(shape) < folds * k:
        raise ValueError(
            f"X of shape {shape} is too small for bi-cross-validation of rank {k} ({folds} "
            f"folds need {folds * k} rows and columns); pass heldout=False or smaller ks."
        )


def _normal_equations(w, x) -> tuple[np.ndarray, np.ndarray]:
    """(Wᵀ·W, Wᵀ·X) for W (r, k) and X (r, c), by row blocks when they are Dask arrays."""
    gram = by_row_blocks(lambda _, wt: wt @ wt.T, x, w)
    return gram, by_row_blocks(kernels.dot_w, x, w)


def by_row_blocks(fn, x, w, *extra):
    """Σ over row blocks of ``fn(x_i, W_iᵀ, *extra)`` (W_iᵀ component-major, contiguous)."""
    if not isinstance(x, da.Array) and not isinstance(w, da.Array):
        return fn(kernels.aligned(x), np.ascontiguousarray(np.asarray(w).T), *extra)
    x = x if isinstance(x, da.Array) else da.from_array(x)
    x = x.rechunk({1: -1})
    w = da.asarray(w).rechunk((x.chunks[0], -1))
    parts = [
        dask.delayed(_block_term)(fn, xi, wi, *extra)
        for xi, wi in zip(x.to_delayed()[:, 0], w.to_delayed()[:, 0], strict=True)
    ]
    return _fixed_order_sum(dask.compute(*parts))


def _block_term(fn, x, w, *extra):
    return fn(kernels.aligned(x), np.ascontiguousarray(w.T), *extra)


def _fixed_order_sum(terms):
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def residual_and_norm(x, wt, h, parts=(slice(None),)) -> np.ndarray:
    """(‖X_i − W_i·H‖² for each slice of the components in ``parts``, ‖X_i‖²) of a block, in
    float64."""
    values = x.data if hasattr(x, "tocsr") else x
    values = np.asarray(values, dtype=np.float64).ravel()
    residuals = [kernels.residual_sq(x, wt[part], h[part]) for part in parts]
    return np.array([*residuals, np.dot(values, values)])
