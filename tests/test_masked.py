"""Fits of the observed entries only (``NMF(missing=...)``, ``dasknmf.masked``): the math
against brute force, the estimator on planted data, in memory and on a cluster, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning

from dasknmf import NMF, masked
from dasknmf._params import InvalidParameterError
from dasknmf.io import save_matrix

pytestmark = pytest.mark.filterwarnings("ignore", category=ConvergenceWarning)


def planted(m=240, n=90, k=4, observed=0.35, noise=0.01, seed=0):
    """A rank-k matrix plus noise, and a random pattern of observed entries."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(size=(m, k)) @ rng.uniform(size=(k, n))
    X = np.maximum(X + noise * rng.standard_normal((m, n)), 0)
    return X, rng.uniform(size=(m, n)) < observed


def with_nan(X, mask):
    return np.where(mask, X, np.nan)


def as_sparse(X, mask):
    """The observed entries of X as a CSR matrix that stores every one of them (zeros too)."""
    rows, cols = np.nonzero(mask)
    return sp.csr_matrix((X[rows, cols], (rows, cols)), shape=X.shape)


def objective(X, mask, W, H, alpha_W=0.0, alpha_H=0.0, l1_ratio=0.0):
    """The masked objective, written out (module docstring of ``dasknmf.masked``)."""
    residual = np.where(mask, X - W @ H, 0)
    n_i, n_j = mask.sum(axis=1), mask.sum(axis=0)
    penalty_w = alpha_W * (l1_ratio * W.sum(axis=1) + 0.5 * (1 - l1_ratio) * (W**2).sum(axis=1))
    penalty_h = alpha_H * (l1_ratio * H.sum(axis=0) + 0.5 * (1 - l1_ratio) * (H**2).sum(axis=0))
    return 0.5 * (residual**2).sum() + n_i @ penalty_w + n_j @ penalty_h


FIT = dict(init="random", random_state=0, max_iter=60, tol=0)


# ---- the math ------------------------------------------------------------------------------


def test_packed_outer_products_unpack_to_each_columns_outer_product():
    f = np.random.default_rng(0).uniform(size=(4, 7))
    grams = masked.unpack(masked.packed_outer(f).T, 4)
    np.testing.assert_allclose(grams, np.einsum("kr,lr->rkl", f, f))


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_one_row_update_from_brute_force(kind):
    """The loss at the old rows, the new rows (exact non-negative least squares after enough
    sweeps, compared with scipy's NNLS row by row) and the column partials."""
    X, mask = planted(30, 20, 3, observed=0.5)
    mask[4] = False  # a row with nothing observed
    x = as_sparse(X, mask) if kind == "sparse" else with_nan(X, mask)
    rng = np.random.default_rng(1)
    h, wt = rng.uniform(size=(3, 20)), rng.uniform(size=(3, 30))
    values, pattern = masked.observed(x)
    new, terms = masked.update_rows(values, pattern, h, wt, l1=0.0, l2=0.0, n_sweeps=300)
    assert terms["loss"] == pytest.approx(objective(X, mask, wt.T, h), rel=1e-10)
    sum_w, sq_w = masked.weighted_sums(wt, mask.sum(axis=1))
    assert terms["sum_w"] == pytest.approx((mask.sum(axis=1) * wt.sum(axis=0)).sum())
    assert terms["sq_w"] == pytest.approx(sq_w) and terms["sum_w"] == pytest.approx(sum_w)
    for i in range(30):
        cols = np.flatnonzero(mask[i])
        if cols.size == 0:
            np.testing.assert_array_equal(new[:, i], 0)
            continue
        expected, _ = scipy.optimize.nnls(h[:, cols].T, X[i, cols])
        np.testing.assert_allclose(new[:, i], expected, atol=1e-6)
    ((grams, counts),) = masked.column_partials(values, pattern, new, [0, 20])
    np.testing.assert_array_equal(counts, mask.sum(axis=0))
    expected = np.einsum("ij,ki,li->jkl", mask, new, new)
    np.testing.assert_allclose(masked.unpack(grams, 3), expected, rtol=1e-12)
    exact = masked.residual_sq(values, pattern, new, h)
    assert exact == pytest.approx(2 * objective(X, mask, new.T, h), rel=1e-12)


def test_penalties_scale_with_each_rows_count():
    """With L2 only, a row's update solves (G_i + l2·n_i·I)·w = c_i when w > 0."""
    X, mask = planted(10, 30, 2, observed=0.6)
    X += 1.0  # well inside the positive orthant
    h = np.random.default_rng(2).uniform(0.5, 1, size=(2, 30))
    values, pattern = masked.observed(with_nan(X, mask))
    new, _ = masked.update_rows(values, pattern, h, np.ones((2, 10)), l1=0.0, l2=0.3, n_sweeps=500)
    for i in range(10):
        cols = np.flatnonzero(mask[i])
        gram = h[:, cols] @ h[:, cols].T + 0.3 * cols.size * np.eye(2)
        np.testing.assert_allclose(new[:, i], np.linalg.solve(gram, h[:, cols] @ X[i, cols]))


# ---- the estimator -----------------------------------------------------------------------


def test_missing_entries_are_predicted_from_the_observed_ones():
    """The reason for the feature: on a planted rank-4 matrix with 35% observed, the held-out
    entries come back to about the noise (0.01); read as zeros, they do not."""
    X, mask = planted()
    model = NMF(4, missing="nan", init="random", random_state=0, max_iter=300, tol=1e-8)
    W = model.fit_transform(with_nan(X, mask))
    held_out = np.sqrt(np.mean((W @ model.components_ - X)[~mask] ** 2))
    assert held_out < 0.02
    zeros = NMF(4, init="random", random_state=0, max_iter=300).fit(np.where(mask, X, 0))
    as_zeros = zeros.transform(np.where(mask, X, 0)) @ zeros.components_
    assert np.sqrt(np.mean((as_zeros - X)[~mask] ** 2)) > 20 * held_out
    assert not np.isnan(W).any()


def test_loss_history_is_the_masked_objective_and_decreases():
    X, mask = planted(observed=0.5)
    params = dict(alpha_W=0.01, alpha_H=0.02, l1_ratio=0.3)
    model = NMF(4, missing="nan", **params, **FIT)
    W = model.fit_transform(with_nan(X, mask))
    H = model.components_
    assert model.loss_history_[-1] == pytest.approx(objective(X, mask, W, H, **params), rel=1e-9)
    residual = np.where(mask, X - W @ H, 0)
    assert model.reconstruction_err_ == pytest.approx(np.sqrt((residual**2).sum()), rel=1e-12)
    assert len(model.loss_history_) == model.n_iter_ + 1
    assert np.all(np.diff(model.loss_history_) <= 1e-9 * model.loss_history_[0])


def test_dense_nan_and_sparse_unstored_give_the_same_fit():
    """The same observed entries, as NaN-marked dense X or as stored entries of sparse X (a
    stored zero is an observed zero)."""
    X, mask = planted()
    X[mask & (np.arange(X.shape[1]) < 5)] = 0.0  # observed zeros, stored explicitly
    S = as_sparse(X, mask)
    assert S.nnz == mask.sum() and (S.data == 0).any()
    dense = NMF(4, missing="nan", **FIT).fit(with_nan(X, mask))
    sparse = NMF(4, missing="unstored", **FIT).fit(S)
    np.testing.assert_allclose(sparse.components_, dense.components_, rtol=1e-9, atol=1e-12)
    dropped = S.copy()
    dropped.eliminate_zeros()  # the zeros now unobserved: another fit
    other = NMF(4, missing="unstored", **FIT).fit(dropped)
    assert not np.allclose(other.components_, dense.components_, rtol=1e-3)


def test_every_entry_observed_is_the_unmasked_objective():
    """missing='nan' on X without NaN minimizes scikit-learn's objective (counts n and m)."""
    X, _ = planted(observed=1.0)
    params = dict(alpha_W=0.001, l1_ratio=0.5)
    model = NMF(4, missing="nan", **params, **{**FIT, "max_iter": 400}).fit(X)
    W, H = model.W_, model.components_
    m, n = X.shape
    sklearn_objective = (
        0.5 * ((X - W @ H) ** 2).sum()
        + 0.001 * n * (0.5 * W.sum() + 0.25 * (W**2).sum())
        + 0.001 * m * (0.5 * H.sum() + 0.25 * (H**2).sum())
    )
    assert model.loss_history_[-1] == pytest.approx(sklearn_objective, rel=1e-6)
    plain = NMF(4, **params, **{**FIT, "max_iter": 400}).fit(X)
    assert model.loss_history_[-1] == pytest.approx(plain.loss_history_[-1], rel=1e-3)


def test_rows_and_columns_without_observed_entries_get_zero_factors():
    X, mask = planted(60, 30, 3, observed=0.5)
    mask[7], mask[:, 11] = False, False
    W = NMF(3, missing="nan", **FIT).fit_transform(with_nan(X, mask))
    model = NMF(3, missing="unstored", **FIT)
    W_sparse = model.fit_transform(as_sparse(X, mask))
    for w in (W, W_sparse):
        np.testing.assert_array_equal(w[7], 0)
        assert np.isfinite(w).all()
    np.testing.assert_array_equal(model.components_[:, 11], 0)


def test_transform_folds_in_rows_with_a_few_observed_entries():
    """A new row observed in a few columns gets the W that its own least squares over those
    columns gives: the fitted rows come back, and its missing entries are predicted."""
    X, mask = planted(observed=0.5)
    model = NMF(4, missing="nan", init="random", random_state=0, max_iter=300, tol=1e-8)
    W = model.fit_transform(with_nan(X, mask))
    again = model.transform(with_nan(X, mask))
    np.testing.assert_allclose(again, W, atol=1e-4)
    rng = np.random.default_rng(5)
    w_new = rng.uniform(size=(1, 4))
    row = w_new @ model.components_
    few = rng.uniform(size=row.shape) < 0.3
    folded = model.transform(np.where(few, row, np.nan))
    np.testing.assert_allclose(folded @ model.components_, row, rtol=1e-3, atol=1e-3)


def test_checkpoints_resume_a_masked_fit_bit_for_bit(tmp_path):
    X, mask = planted()
    Xn = with_nan(X, mask)
    whole = NMF(4, missing="nan", **FIT).fit(Xn)
    params = {**FIT, "checkpoint": tmp_path / "ckpt", "checkpoint_every": 10}
    NMF(4, missing="nan", **{**params, "max_iter": 30}).fit(Xn)
    resumed = NMF(4, missing="nan", resume=True, **params).fit(Xn)
    np.testing.assert_array_equal(resumed.components_, whole.components_)
    assert resumed.loss_history_ == whole.loss_history_


def test_on_a_cluster_from_zarr_stores_the_same_factors(cluster, tmp_path):
    """Dense NaN-marked and CSR Zarr stores on a 2-worker LocalCluster: the dense one equals
    the in-memory fit bit for bit (same panels), the sparse one up to rounding (its panels are
    cut by stored entries)."""
    X, mask = planted(1200, 60, 4)
    params = {**FIT, "max_iter": 15, "panel_bytes": 100 * 60 * 8}
    reference = NMF(4, missing="nan", **params).fit(with_nan(X, mask))
    dense = save_matrix(tmp_path / "D.zarr", with_nan(X, mask), chunks=(100, 60))
    model = NMF(4, missing="nan", **params).fit(str(dense))
    assert model.layout_["panels"] == reference.layout_["panels"] == 12
    np.testing.assert_array_equal(model.components_, reference.components_)
    np.testing.assert_array_equal(model.W_.compute(), reference.W_)
    assert model.loss_history_ == reference.loss_history_
    sparse = save_matrix(tmp_path / "S.zarr", as_sparse(X, mask))
    model = NMF(4, missing="unstored", **params).fit(str(sparse))
    np.testing.assert_allclose(model.components_, reference.components_, rtol=1e-9)
    W = model.transform(str(sparse)).compute()
    np.testing.assert_allclose(W, reference.transform(with_nan(X, mask)), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler", 1.5, "itakura-saito"])
def test_multiplicative_updates_of_every_beta(beta_loss):
    """solver='mu' with missing: the β-divergence over the observed entries (count-scaled
    penalties) never increases and is what the loss history says; dense NaN and sparse
    unstored input give the same fit; missing entries are predicted."""
    X, mask = planted(observed=0.5)
    X += 0.05  # no zeros: Itakura-Saito needs them positive
    params = dict(solver="mu", beta_loss=beta_loss, alpha_W=0.001, l1_ratio=0.5, **FIT)
    model = NMF(4, missing="nan", **{**params, "max_iter": 200})
    W = model.fit_transform(with_nan(X, mask))
    H = model.components_
    history = np.array(model.loss_history_)
    assert np.all(np.diff(history) <= 1e-9 * history[0])
    rows, cols = np.nonzero(mask)
    observed = sp.csr_matrix((X[rows, cols], (rows, cols)), shape=X.shape)
    # D_β over the observed entries, written out.
    wh = W @ H
    beta = {"frobenius": 2, "kullback-leibler": 1, "itakura-saito": 0}.get(beta_loss, beta_loss)
    if beta == 2:
        divergence = 0.5 * ((X - wh)[mask] ** 2).sum()
    elif beta == 1:
        divergence = (X * np.log(X / wh) - X + wh)[mask].sum()
    elif beta == 0:
        divergence = (X / wh - np.log(X / wh) - 1)[mask].sum()
    else:
        divergence = (
            (X**beta + (beta - 1) * wh**beta - beta * X * wh ** (beta - 1)) / (beta * (beta - 1))
        )[mask].sum()
    penalty = objective(X, mask, W, H, 0.001, 0.001, 0.5) - objective(X, mask, W, H)
    assert history[-1] == pytest.approx(divergence + penalty, rel=1e-6)
    sparse = NMF(4, missing="unstored", **{**params, "max_iter": 200}).fit(observed)
    np.testing.assert_allclose(sparse.components_, H, rtol=1e-8, atol=1e-12)
    held_out = np.sqrt(np.mean((wh - X)[~mask] ** 2))
    assert held_out < 0.05


def test_every_entry_observed_multiplicative_updates_are_the_unmasked_ones():
    """Kullback–Leibler with missing='nan' and no NaN: the unmasked fit's factors, up to
    rounding (the same updates; the penalties scale by the counts n and m)."""
    X, _ = planted(observed=1.0)
    params = dict(solver="mu", beta_loss="kullback-leibler", alpha_W=0.01, l1_ratio=0.5, **FIT)
    masked_fit = NMF(4, missing="nan", **params).fit(X)
    plain = NMF(4, **params).fit(X)
    np.testing.assert_allclose(masked_fit.components_, plain.components_, rtol=1e-7)
    np.testing.assert_allclose(masked_fit.loss_history_, plain.loss_history_, rtol=1e-9)


# ---- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(missing="zeros"), "'missing' parameter of NMF must be None or a str among"),
        (dict(missing="nan", extrapolate=True), "without extrapolation; got extrapolate=True"),
        (dict(missing="nan", beta_loss="kullback-leibler"), "solver 'cd' does not handle"),
        (dict(missing="nan", init="nndsvda"), "init='nndsvda' cannot start a fit with missing"),
    ],
)
def test_settings_a_masked_fit_does_not_take(params, match):
    X, mask = planted(40, 20, 2)
    model = NMF(2, **params)
    with pytest.raises(ValueError, match=match) as info:
        model.fit(with_nan(X, mask))
    assert not hasattr(model, "components_")
    assert isinstance(info.value, InvalidParameterError) == (params["missing"] == "zeros")


def test_input_that_does_not_suit_missing(tmp_path):
    X, mask = planted(40, 20, 2)
    with pytest.raises(ValueError, match="missing='unstored' needs sparse X"):
        NMF(2, missing="unstored").fit(with_nan(X, mask))
    with pytest.raises(ValueError, match="missing='unstored' needs sparse X"):
        NMF(2, missing="unstored").fit(str(save_matrix(tmp_path / "D.zarr", X)))
    with pytest.raises(ValueError, match="missing='nan' is for dense X"):
        NMF(2, missing="nan").fit(as_sparse(X, mask))
    with pytest.raises(ValueError, match="Input X contains NaN"):
        NMF(2, init="random").fit(with_nan(X, mask))  # missing=None: today's error
    with pytest.raises(ValueError, match="X has no observed entry"):
        NMF(2, missing="nan").fit(np.full((5, 4), np.nan))
    with pytest.raises(ValueError, match="Negative values"):
        NMF(2, missing="nan").fit(with_nan(X - 1, mask))
    inf = with_nan(X, mask)
    inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity|infinity"):
        NMF(2, missing="nan").fit(inf)
    stored_nan = as_sparse(X, mask)
    stored_nan.data[0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        NMF(2, missing="unstored").fit(stored_nan)
