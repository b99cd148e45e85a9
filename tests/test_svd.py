"""Randomized SVD over panels against numpy's exact SVD."""

import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp

from dasknmf import svd
from dasknmf.cuts import even_bounds
from dasknmf.grid import grid
from dasknmf.panels import dask_panels, in_memory_panels


def _decaying(m=300, n=80, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(m, n)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (u * 0.7 ** np.arange(n)) @ v.T


def _svd(X, k, n_iter, kind="numpy", n_panels=3, col_block_bytes=None):
    rows = -(-X.shape[0] // n_panels)
    budget = rows * X.shape[1] * X.dtype.itemsize
    if kind == "dask":
        panels = dask_panels(da.from_array(X, chunks=(rows, X.shape[1])), budget, cache=False)
    else:
        panels = in_memory_panels(sp.csr_array(X) if kind == "sparse" else X, budget)
    cols = even_bounds(X.shape[1], 1 if col_block_bytes is None else 3)
    ut, s, vt = svd.randomized_svd(panels, k, n_iter, entropy=0, col_bounds=cols, stream=9)
    ut, vt = panels.ops.fetch((ut, vt))
    return np.concatenate(ut, axis=1).T, s, np.concatenate(vt, axis=1)


@pytest.mark.parametrize("kind", ["numpy", "sparse", "dask"])
@pytest.mark.parametrize("col_blocks", [None, 3])
def test_leading_triplets_match_numpy(kind, col_blocks, sync_scheduler):
    X = _decaying()
    U, s, Vt = _svd(X, 5, n_iter=2, kind=kind, col_block_bytes=col_blocks)
    U_ref, s_ref, Vt_ref = np.linalg.svd(X, full_matrices=False)
    np.testing.assert_allclose(s, s_ref[:5], rtol=1e-8)
    # Singular vectors up to sign.
    signs = np.sign(np.sum(U * U_ref[:, :5], axis=0))
    np.testing.assert_allclose(U * signs, U_ref[:, :5], atol=1e-6)
    np.testing.assert_allclose(Vt * signs[:, None], Vt_ref[:5], atol=1e-6)
    np.testing.assert_allclose(U.T @ U, np.eye(5), atol=1e-10)


def test_more_power_iterations_are_more_accurate():
    rng = np.random.default_rng(1)
    X = np.abs(rng.normal(size=(400, 120)))  # slow spectral decay
    s_ref = np.linalg.svd(X, compute_uv=False)[:10]
    errors = [np.abs(_svd(X, 10, n_iter)[1] - s_ref).max() for n_iter in (0, 1, 3)]
    assert errors[0] > errors[1] > errors[2]


def test_rank_below_k_gives_zero_triplets():
    rng = np.random.default_rng(2)
    X = rng.uniform(size=(60, 3)) @ rng.uniform(size=(3, 20))
    U, s, Vt = _svd(X, 6, n_iter=1)
    assert np.all(s[3:] == 0) and np.all(U[:, 3:] == 0) and np.all(Vt[3:] == 0)
    np.testing.assert_allclose((U * s) @ Vt, X, atol=1e-8)


def test_zero_matrix():
    U, s, Vt = _svd(np.zeros((10, 4)), 2, n_iter=1)
    assert not s.any() and not U.any() and not Vt.any()
    assert U.shape == (10, 2) and Vt.shape == (2, 4)


def test_k_above_the_smaller_dimension_is_capped_by_the_sketch():
    X = _decaying(50, 6)
    _, s, _ = _svd(X, 6, n_iter=1)
    np.testing.assert_allclose(s, np.linalg.svd(X, compute_uv=False), rtol=1e-8)


def _svd_blocks(X, k, n_iter, budget, band_bounds=None):
    g = grid(X, k, budget)
    if band_bounds is not None:
        g.band_bounds = band_bounds
    try:
        ut, s, vt = svd.randomized_svd_blocks(g, k, n_iter, entropy=0, stream=9)
        return np.concatenate(ut, axis=1).T, s, np.concatenate(vt, axis=1), len(g.col_bounds) - 1
    finally:
        g.close()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_the_svd_over_2d_blocks_is_the_row_panel_svd(sparse):
    """Over 2-D blocks (no task holding a whole row or column) the same triplets as over row
    panels up to rounding — the sketch draws the same numbers — and those of numpy; any
    grouping of the rows into bands gives the same bits."""
    X = _decaying()
    data = sp.csr_array(X) if sparse else X
    U, s, Vt, n_col_blocks = _svd_blocks(data, 5, 2, 40 * 20 * 8)
    assert n_col_blocks > 1
    U_rows, s_rows, Vt_rows = _svd(X, 5, n_iter=2, kind="sparse" if sparse else "numpy")
    np.testing.assert_allclose(s, s_rows, rtol=1e-12)
    np.testing.assert_allclose(U, U_rows, atol=1e-10)
    np.testing.assert_allclose(Vt, Vt_rows, atol=1e-10)
    np.testing.assert_allclose(s, np.linalg.svd(X, compute_uv=False)[:5], rtol=1e-8)
    n_rows = len(grid(data, 5, 40 * 20 * 8).items)
    assert n_rows > 2
    for bands in ([0, n_rows], [0, 1, n_rows], list(range(n_rows + 1))):
        again = _svd_blocks(data, 5, 2, 40 * 20 * 8, bands)
        np.testing.assert_array_equal(again[0], U)
        np.testing.assert_array_equal(again[2], Vt)


def test_the_svd_over_2d_blocks_of_a_zero_or_low_rank_matrix():
    U, s, Vt, _ = _svd_blocks(np.zeros((40, 30)), 2, 1, 10 * 10 * 8)
    assert not s.any() and not U.any() and not Vt.any()
    assert U.shape == (40, 2) and Vt.shape == (2, 30)
    rng = np.random.default_rng(2)
    X = rng.uniform(size=(60, 3)) @ rng.uniform(size=(3, 20))
    U, s, Vt, _ = _svd_blocks(X, 6, 1, 15 * 10 * 8)
    assert np.all(s[3:] == 0) and np.all(U[:, 3:] == 0) and np.all(Vt[3:] == 0)
    np.testing.assert_allclose((U * s) @ Vt, X, atol=1e-8)


@pytest.mark.parametrize("kind", ["numpy", "sparse", "dask", "blocks"])
def test_a_matrix_of_huge_values_has_the_triplets_of_the_same_matrix_scaled(kind, sync_scheduler):
    """P·Pᵀ (P = Yᵀ·X) goes as σ⁴ and overflowed float64 for σ above ~1e77: an NNDSVD start
    failed with numpy's 'Eigenvalues did not converge' on a matrix of entries near 1e99 that
    scikit-learn factorizes (found by hypothesis). Such a pass runs again with P scaled by a
    power of two: the same vectors, the singular values scaled, up to rounding."""
    X = _decaying()
    big = X * 2.0**300  # ~2e90
    if kind == "blocks":
        U, s, Vt, _ = _svd_blocks(X, 5, 2, 40 * 20 * 8)
        U_big, s_big, Vt_big, _ = _svd_blocks(big, 5, 2, 40 * 20 * 8)
    else:
        U, s, Vt = _svd(X, 5, n_iter=2, kind=kind)
        U_big, s_big, Vt_big = _svd(big, 5, n_iter=2, kind=kind)
    np.testing.assert_allclose(s_big, s * 2.0**300, rtol=1e-10)
    np.testing.assert_allclose(U_big, U, atol=1e-10)
    np.testing.assert_allclose(Vt_big, Vt, atol=1e-10)


def test_an_nndsvd_start_takes_huge_values():
    """A fit from an NNDSVD start of X·2³³⁰ (~2e99) is the fit of X, scaled, up to rounding
    (before, numpy's LinAlgError); beyond what float64 can sketch, a clear error."""
    from dasknmf import NMF

    X = np.abs(_decaying(60, 12))
    for init in ("nndsvd", "nndsvda"):
        small = NMF(3, init=init, max_iter=30, tol=0).fit(X)
        big = NMF(3, init=init, max_iter=30, tol=0).fit(X * 2.0**330)
        assert np.all(np.isfinite(big.components_))
        np.testing.assert_allclose(
            big.reconstruction_err_, small.reconstruction_err_ * 2.0**330, rtol=1e-4
        )
    with pytest.raises(ValueError, match="too large for an NNDSVD start.*overflowed float64"):
        NMF(3, init="nndsvd", max_iter=2).fit(X * 1e160)
    # float32: P itself leaves float32, which no scaling of it in float64 brings back
    with pytest.raises(ValueError, match="too large for an NNDSVD start.*overflowed float32"):
        NMF(3, init="nndsvd", max_iter=2).fit((X * 1e25).astype(np.float32))
