"""β-divergences and their multiplicative updates against scikit-learn, dense and sparse."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import NMF as SklearnNMF
from sklearn.decomposition._nmf import (
    _beta_divergence,
    _multiplicative_update_h,
    _multiplicative_update_w,
)

from dasknmf import NMF, divergence, kernels
from dasknmf.solvers import mu

rng = np.random.default_rng(3)
DENSE = rng.uniform(size=(40, 25))
DENSE[DENSE < 0.4] = 0  # zeros, and values below float32's eps:
DENSE[0, :3] = 1e-9
POSITIVE = rng.uniform(0.1, 1.0, size=(40, 25))
W0 = rng.uniform(size=(40, 3))
H0 = rng.uniform(size=(3, 25))
BETAS = [2, 1, 0.5, 1.5, 3]


def _panel(X, kind):
    return sp.csr_array(X) if kind == "sparse" else X


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("beta", [*BETAS, 0])
def test_divergence_of_panels_adds_up_to_sklearns(kind, beta):
    X = POSITIVE if beta <= 0 else DENSE
    expected = _beta_divergence(X, W0, H0, beta)
    total = 0.0
    for rows in (slice(0, 13), slice(13, 40)):
        panel = _panel(X[rows], kind)
        wt = np.ascontiguousarray(W0[rows].T)
        total += divergence.divergence(
            panel, divergence.sampled_product(panel, wt, H0), wt, H0, beta
        )
    assert total == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_sampled_product_is_wh_where_x_is_stored(kind):
    panel = _panel(DENSE, kind)
    values = divergence.sampled_product(panel, np.ascontiguousarray(W0.T), H0)
    if kind == "sparse":
        rows, cols = panel.nonzero()
        np.testing.assert_allclose(values, (W0 @ H0)[rows, cols], rtol=1e-12)
    else:
        np.testing.assert_allclose(values, W0 @ H0, rtol=1e-12)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("beta", [b for b in BETAS if b != 2])
@pytest.mark.parametrize("l1, l2", [(0.0, 0.0), (0.05, 0.1)])
def test_one_update_of_w_and_of_h_is_sklearns(kind, beta, l1, l2):
    X = _panel(DENSE, kind)
    gamma = divergence.mm_exponent(beta)
    W_sk, *_ = _multiplicative_update_w(X, W0.copy(), H0, beta, l1, l2, gamma)
    wt = np.ascontiguousarray(W0.T)
    wh = divergence.sampled_product(X, wt, H0)
    numerator = kernels.dot_h(divergence.weighted(X, wh, beta), H0)
    denominator = divergence.w_denominator(X, wh, wt, H0, beta)
    W = mu.step(wt.copy(), numerator, denominator, l1=l1, l2=l2, gamma=gamma).T
    np.testing.assert_allclose(W, W_sk, rtol=1e-10)

    H_sk = _multiplicative_update_h(X, W_sk, H0.copy(), beta, l1, l2, gamma)
    wt = np.ascontiguousarray(W_sk.T)
    wh = divergence.sampled_product(X, wt, H0)
    numerator = kernels.dot_w(divergence.weighted(X, wh, beta), wt)
    denominator = divergence.h_denominator(X, wh, wt, H0, beta)
    if beta == 1:
        denominator = denominator[:, None]
    H = mu.step(H0.copy(), numerator, denominator, l1=l1, l2=l2, gamma=gamma)
    np.testing.assert_allclose(H, H_sk, rtol=1e-10)


def test_dense_blocks_of_a_sparse_panel_cover_every_row(monkeypatch):
    monkeypatch.setattr(divergence, "ROW_BLOCK", 7)
    X = sp.csr_array(DENSE)
    wt = np.ascontiguousarray(W0.T)
    wh = divergence.sampled_product(X, wt, H0)
    np.testing.assert_allclose(
        divergence.w_denominator(X, wh, wt, H0, 1.5), H0 @ ((W0 @ H0) ** 0.5).T, rtol=1e-12
    )
    np.testing.assert_allclose(
        divergence.h_denominator(X, wh, wt, H0, 1.5), W0.T @ (W0 @ H0) ** 0.5, rtol=1e-12
    )
    assert divergence.divergence(X, wh, wt, H0, 3) == pytest.approx(
        _beta_divergence(DENSE, W0, H0, 3), rel=1e-10
    )


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize(
    "beta_loss, alpha_W, l1_ratio",
    [
        ("kullback-leibler", 0.0, 0.0),
        ("kullback-leibler", 0.01, 0.5),
        (0.5, 0.0, 0.0),
        (1.5, 0.005, 1.0),
        (3, 0.0, 0.0),
        ("itakura-saito", 0.0, 0.0),
    ],
)
def test_fit_is_sklearn_step_for_step(kind, beta_loss, alpha_W, l1_ratio):
    X = POSITIVE if beta_loss == "itakura-saito" else DENSE
    kwargs = dict(
        n_components=3,
        solver="mu",
        beta_loss=beta_loss,
        init="custom",
        tol=0,
        max_iter=25,
        alpha_W=alpha_W,
        l1_ratio=l1_ratio,
    )
    ours = NMF(panel_bytes=13 * 25 * 8, **kwargs)
    W = ours.fit_transform(_panel(X, kind), W=W0.copy(), H=H0.copy())
    reference = SklearnNMF(**kwargs)
    W_sk = reference.fit_transform(_panel(X, kind), W=W0.copy(), H=H0.copy())
    np.testing.assert_allclose(W, W_sk, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(ours.components_, reference.components_, rtol=1e-8, atol=1e-12)
    assert ours.reconstruction_err_ == pytest.approx(reference.reconstruction_err_, rel=1e-9)
    loss = np.array(ours.loss_history_)
    assert len(loss) == 26 and np.all(np.diff(loss) <= 1e-10 * loss[0])


@pytest.mark.parametrize("beta_loss", ["kullback-leibler", 0.5])
def test_stops_when_sklearn_stops(beta_loss):
    """The stopping rule needs the error after an iteration, which for β != 2 is known one
    iteration later: the fit must still stop at scikit-learn's iteration, with its factors."""
    kwargs = dict(
        n_components=3, solver="mu", beta_loss=beta_loss, init="custom", tol=1e-3, max_iter=1000
    )
    ours = NMF(**kwargs)
    ours.fit_transform(DENSE, W=W0.copy(), H=H0.copy())
    reference = SklearnNMF(**kwargs)
    reference.fit_transform(DENSE, W=W0.copy(), H=H0.copy())
    assert 10 <= ours.n_iter_ == reference.n_iter_ < 1000
    np.testing.assert_allclose(ours.components_, reference.components_, rtol=1e-8)
    assert len(ours.loss_history_) == ours.n_iter_ + 1


@pytest.mark.parametrize("beta_loss", ["kullback-leibler", "itakura-saito", 0.5])
def test_transform_minimizes_the_divergence_for_fixed_h(beta_loss):
    X = POSITIVE
    model = NMF(3, solver="mu", beta_loss=beta_loss, random_state=0, max_iter=300).fit(X)
    W = model.transform(X)
    beta = {"kullback-leibler": 1, "itakura-saito": 0}.get(beta_loss, beta_loss)
    H = model.components_
    best = _beta_divergence(X, W, H, beta)
    for _ in range(20):  # no nearby non-negative W is clearly better
        other = np.maximum(W * rng.uniform(0.9, 1.1, size=W.shape), 0)
        assert _beta_divergence(X, other, H, beta) >= best * (1 - 1e-3)
