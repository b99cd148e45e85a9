"""The compiled sparse Kullback–Leibler kernels agree with the numpy path."""

import dask
import numpy as np
import pytest
import scipy.sparse as sp

from dasknmf import NMF, _compiled, divergence
from dasknmf.solvers import mu

pytest.importorskip("numba")

X = sp.random(300, 80, density=0.1, format="csr", random_state=0, dtype=np.float64)
X.data[:] = np.random.default_rng(0).poisson(2, X.nnz) + 1
X.data[:5] = 1e-9  # below ε: left out of the divergence, still in the update
rng = np.random.default_rng(1)
WT, H = rng.uniform(size=(4, 300)), rng.uniform(size=(4, 80))


def _both(fn):
    with dask.config.set({"dasknmf.compiled": True}):
        compiled = fn()
    with dask.config.set({"dasknmf.compiled": False}):
        plain = fn()
    return compiled, plain


def test_w_statistics_agree():
    compiled, plain = _both(lambda: divergence.w_statistics(X, WT, H, 1, with_divergence=True))
    for a, b in zip(compiled, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_h_statistics_agree():
    compiled, plain = _both(lambda: divergence.h_statistics(X, WT, H, 1))
    for a, b in zip(compiled, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize(("l1", "l2"), [(0.0, 0.0), (0.3, 0.0), (0.0, 0.5), (0.2, 0.7)])
def test_fused_update_is_the_update_then_the_h_statistics(l1, l2):
    """``divergence.kl_update`` (W updated row by row inside the pass over the entries) gives
    what ``mu.step`` with ``w_statistics``, then ``h_statistics`` at the new W give."""
    h = H.copy()
    h[2] = 0  # a zero row of H: rowsum 0, the denominator's guard
    with dask.config.set({"dasknmf.compiled": True}):
        wt, numerator, denominator, value = divergence.kl_update(X, WT.copy(), h, l1=l1, l2=l2)
    with dask.config.set({"dasknmf.compiled": False}):
        w_num, w_den, expected_value = divergence.w_statistics(X, WT, h, 1, with_divergence=True)
        expected_wt = mu.step(WT.copy(), w_num, w_den, l1=l1, l2=l2)
        expected_num, expected_den = divergence.h_statistics(X, expected_wt, h, 1)
    np.testing.assert_allclose(wt, expected_wt, rtol=1e-12)
    np.testing.assert_allclose(numerator, expected_num, rtol=1e-12)
    np.testing.assert_allclose(denominator, expected_den, rtol=1e-12)
    assert value == pytest.approx(expected_value, rel=1e-12)
    assert not np.array_equal(wt, WT)  # it did update


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fits_agree(dtype):
    kwargs = dict(
        n_components=4,
        solver="mu",
        beta_loss="kullback-leibler",
        init="random",
        random_state=0,
        tol=0,
        max_iter=20,
    )
    data = X.astype(dtype)
    compiled, plain = _both(lambda: NMF(**kwargs).fit(data))
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(compiled.components_, plain.components_, rtol=rtol, atol=1e-6)
    assert compiled.reconstruction_err_ == pytest.approx(plain.reconstruction_err_, rel=rtol)


def test_the_setting():
    with dask.config.set({"dasknmf.compiled": False}):
        assert not _compiled.enabled()
    with dask.config.set({"dasknmf.compiled": "auto"}):
        assert _compiled.enabled()
