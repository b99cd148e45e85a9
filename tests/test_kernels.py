"""Per-panel kernels against plain numpy, for dense and sparse panels."""

import numpy as np
import pytest
import scipy.sparse as sp

from dasknmf import kernels

rng = np.random.default_rng(0)
DENSE = rng.uniform(size=(30, 12)).astype(np.float32)
DENSE[DENSE < 0.6] = 0  # some zeros, so the sparse forms are really sparse
H = rng.uniform(size=(4, 12)).astype(np.float32)
WT = rng.uniform(size=(4, 30)).astype(np.float32)

PANELS = {
    "numpy": DENSE,
    "csr_array": sp.csr_array(DENSE),
    "csr_matrix": sp.csr_matrix(DENSE),
}


@pytest.fixture(params=sorted(PANELS))
def panel(request):
    return PANELS[request.param]


def test_dot_h_is_h_times_x_transposed(panel):
    result = kernels.dot_h(panel, H)
    assert isinstance(result, np.ndarray) and result.shape == (4, 30)
    np.testing.assert_allclose(result, H @ DENSE.T, rtol=1e-6)


def test_dot_w_is_wt_times_x(panel):
    result = kernels.dot_w(panel, WT)
    assert isinstance(result, np.ndarray) and result.shape == (4, 12)
    assert result.flags.c_contiguous
    np.testing.assert_allclose(result, WT @ DENSE, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_wide_sparse_products_run_in_blocks_bit_for_bit(dtype):
    """With more than 128 components a sparse panel's products run over blocks of 16
    components (in cache); each entry is the one product's, bit for bit."""
    x = sp.random(40, 300, density=0.1, random_state=1, format="csr", dtype=np.float32)
    h = rng.uniform(size=(200, 300)).astype(dtype)
    wt = rng.uniform(size=(200, 40)).astype(dtype)
    for got, want in [
        (kernels.dot_h(x, h), (x @ h.T).T),
        (kernels.dot_w(x, wt), (x.T @ wt.T).T),
    ]:
        assert got.flags.c_contiguous and got.dtype == want.dtype
        assert np.array_equal(got, want)


def test_moments(panel):
    m = kernels.panel_moments(panel)
    x = DENSE.astype(np.float64)
    assert m[kernels.MOMENT_MIN] == 0
    assert m[kernels.MOMENT_NONFINITE] == 0
    assert m[kernels.MOMENT_SUM] == pytest.approx(x.sum())
    assert m[kernels.MOMENT_SUMSQ] == pytest.approx((x**2).sum())
    assert m[kernels.MOMENT_NNZ] == np.count_nonzero(x)
    assert m[kernels.MOMENT_SIZE] == x.size


def test_moments_find_negative_and_nonfinite_values():
    x = np.ones((3, 4))
    x[2, 3] = -0.5
    x[0, 0] = np.nan
    x[1, 1] = np.inf
    m = kernels.panel_moments(x)
    assert m[kernels.MOMENT_NONFINITE] == 2
    assert m[kernels.MOMENT_MIN] == -0.5  # still found beside the NaN


def test_moments_of_sparse_count_implicit_zeros():
    m = kernels.panel_moments(sp.csr_array(np.array([[0.0, 2.0], [3.0, 0.0]])))
    assert m[kernels.MOMENT_MIN] == 0 and m[kernels.MOMENT_SIZE] == 4
    empty = kernels.panel_moments(sp.csr_array((2, 3)))
    assert empty[kernels.MOMENT_MIN] == 0 and empty[kernels.MOMENT_SUM] == 0


def test_combine_moments_takes_min_and_sums():
    a = kernels.panel_moments(np.array([[1.0, 2.0]]))
    b = kernels.panel_moments(np.array([[0.5, 4.0]]))
    total = kernels.combine_moments(a, b)
    assert total[kernels.MOMENT_MIN] == 0.5
    assert total[kernels.MOMENT_SUM] == 7.5
    assert total[kernels.MOMENT_SIZE] == 4


def test_residual(panel):
    expected = ((DENSE.astype(np.float64) - WT.T.astype(np.float64) @ H) ** 2).sum()
    assert kernels.residual_sq(panel, WT, H) == pytest.approx(expected, rel=1e-5)


def test_aligned_copies_only_unaligned_buffers(panel):
    assert kernels.aligned(panel) is panel
    raw = np.zeros(DENSE.nbytes + 1, dtype=np.uint8)
    unaligned = np.frombuffer(raw[1:].data, dtype=np.float32).reshape(DENSE.shape)
    unaligned[...] = DENSE
    assert not unaligned.flags.aligned
    fixed = kernels.aligned(unaligned)
    assert fixed.flags.aligned
    np.testing.assert_array_equal(fixed, DENSE)


@pytest.mark.parametrize(
    "kernel, args",
    [
        (kernels.dot_h, (H,)),
        (kernels.dot_w, (WT,)),
        (kernels.panel_moments, ()),
        (kernels.residual_sq, (WT, H)),
        (kernels.aligned, ()),
    ],
)
def test_unsupported_panel_type_is_a_type_error(kernel, args):
    with pytest.raises(TypeError, match="do not handle panels of type list"):
        kernel(DENSE.tolist(), *args)


def test_moments_are_summed_block_by_block(monkeypatch):
    monkeypatch.setattr(kernels, "_MOMENT_BLOCK", 7)
    x = DENSE.astype(np.float64)
    x[29, 11] = np.nan  # in the last block
    m = kernels.panel_moments(x)
    finite = x[np.isfinite(x)]
    assert m[kernels.MOMENT_NONFINITE] == 1
    assert m[kernels.MOMENT_SUM] == pytest.approx(finite.sum())
    assert m[kernels.MOMENT_SUMSQ] == pytest.approx((finite**2).sum())
    assert m[kernels.MOMENT_NNZ] == np.count_nonzero(finite)


def test_the_dense_residual_is_formed_in_blocks_of_rows(monkeypatch):
    """The final error pass must fit a worker sized for the iterations: the residual of a panel
    is formed a few MiB at a time, not whole (and then again in float64)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3000, 2000)).astype(np.float32)  # a 24 MB panel
    wt = rng.uniform(size=(5, 3000)).astype(np.float32)
    h = rng.uniform(size=(5, 2000)).astype(np.float32)
    residual = (x - wt.T @ h).astype(np.float64)
    expected = float(np.dot(residual.ravel(), residual.ravel()))
    del residual
    tracemalloc.start()
    try:
        value = kernels.residual_sq(x, wt, h)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert value == pytest.approx(expected, rel=1e-12)
    assert peak < 3 * kernels.RESIDUAL_BLOCK_BYTES + 2**20, f"peak {peak / 2**20:.0f} MiB"
    monkeypatch.setattr(kernels, "RESIDUAL_BLOCK_BYTES", 7 * 2000 * 8)  # blocks of 7 rows
    assert kernels.residual_sq(x, wt, h) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
def test_the_dense_residual_in_reused_buffers_is_the_plain_formula_bit_for_bit(dtype, order):
    """``residual_sq`` forms its row blocks in two buffers made once (a worker's allocator maps
    every large array afresh); the sum is, bit for bit, that of a new array per block, for
    either dtype, a Fortran-ordered W and a last block shorter than the others. Mixed dtypes
    take the plain formula."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(700, 2000)).astype(dtype)  # 256-row blocks: 256, 256, 188
    wt = np.asarray(rng.uniform(size=(7, 700)).astype(dtype), order=order)
    h = rng.uniform(size=(7, 2000)).astype(dtype)
    rows = kernels.RESIDUAL_BLOCK_BYTES // (8 * 2000)
    assert 700 % rows
    plain = 0.0
    for start in range(0, 700, rows):
        block = (x[start : start + rows] - wt[:, start : start + rows].T @ h).astype(np.float64)
        plain += float(np.dot(block.ravel(), block.ravel()))
    assert kernels.residual_sq(x, wt, h) == plain
    other = np.float64 if dtype == np.float32 else np.float32
    mixed = kernels.residual_sq(x, wt, h.astype(other))
    assert mixed == pytest.approx(plain, rel=1e-5)
