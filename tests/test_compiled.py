"""The compiled sparse Kullback–Leibler kernels agree with the numpy path."""

import os
import subprocess
import sys

import dask
import numpy as np
import pytest
import scipy.sparse as sp

from dasknmf import NMF, _compiled, divergence
from dasknmf.solvers import mu

pytest.importorskip("numba")
from dasknmf import _numba_kernels  # imports numba: after the skip

X = sp.random(300, 80, density=0.1, format="csr", random_state=0, dtype=np.float64)
X.data[:] = np.random.default_rng(0).poisson(2, X.nnz) + 1
X.data[:5] = 1e-9  # below ε: left out of the divergence, still in the update


def _both(fn):
    with dask.config.set({"dasknmf.compiled": True}):
        compiled = fn()
    with dask.config.set({"dasknmf.compiled": False}):
        plain = fn()
    return compiled, plain


#: k of the kernels generated for it, and of the generic ones.
K_BOTH_WAYS = [4, _numba_kernels.SPECIALIZED_MAX_K + 1]


def _factors(k):
    factors = np.random.default_rng(k)
    return factors.uniform(size=(k, X.shape[0])), factors.uniform(size=(k, X.shape[1]))


@pytest.mark.parametrize("k", K_BOTH_WAYS)
@pytest.mark.parametrize("with_divergence", [True, False])
def test_w_statistics_agree(k, with_divergence):
    wt, h = _factors(k)
    compiled, plain = _both(lambda: divergence.w_statistics(X, wt, h, 1, with_divergence))
    if not with_divergence:
        assert compiled[2] is None and plain[2] is None
        compiled, plain = compiled[:2], plain[:2]
    for a, b in zip(compiled, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("k", K_BOTH_WAYS)
def test_h_statistics_agree(k):
    wt, h = _factors(k)
    compiled, plain = _both(lambda: divergence.h_statistics(X, wt, h, 1))
    for a, b in zip(compiled, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize(
    "k",
    [1, 4, _numba_kernels.SPECIALIZED_MAX_K, _numba_kernels.SPECIALIZED_MAX_K + 1],
    ids=lambda k: f"k{k}",
)
@pytest.mark.parametrize(("l1", "l2"), [(0.0, 0.0), (0.3, 0.0), (0.0, 0.5), (0.2, 0.7)])
def test_fused_update_is_the_update_then_the_h_statistics(l1, l2, k):
    """``divergence.kl_update`` (W updated row by row inside the pass over the entries) gives
    what ``mu.step`` with ``w_statistics``, then ``h_statistics`` at the new W give — with
    the kernels specialized to k (k <= SPECIALIZED_MAX_K) and with the generic one."""
    wt, h = _factors(k)
    h[k // 2] = 0  # a zero row of H: rowsum 0, the denominator's guard
    given = wt.copy()
    with dask.config.set({"dasknmf.compiled": True}):
        new_wt, numerator, denominator, value = divergence.kl_update(X, wt, h, l1=l1, l2=l2)
    np.testing.assert_array_equal(wt, given)  # a new W_i: the block may be read elsewhere
    with dask.config.set({"dasknmf.compiled": False}):
        w_num, w_den, expected_value = divergence.w_statistics(X, wt, h, 1, with_divergence=True)
        expected_wt = mu.step(wt.copy(), w_num, w_den, l1=l1, l2=l2)
        expected_num, expected_den = divergence.h_statistics(X, expected_wt, h, 1)
    np.testing.assert_allclose(new_wt, expected_wt, rtol=1e-12)
    np.testing.assert_allclose(numerator, expected_num, rtol=1e-12)
    np.testing.assert_allclose(denominator, expected_den, rtol=1e-12)
    assert value == pytest.approx(expected_value, rel=1e-12)
    assert not np.array_equal(new_wt, wt)  # it did update


def test_kernel_choice():
    def arguments(k, dtype=np.float32, index=np.int32):
        x = sp.csr_matrix(X, dtype=dtype)
        x.indptr, x.indices = x.indptr.astype(index), x.indices.astype(index)
        w, ht = np.ones((X.shape[0], k), dtype), np.ones((X.shape[1], k), dtype)
        eps, den = dtype(1e-9), np.ones(k, dtype)
        return x.indptr, x.indices, x.data, w, ht, den, eps, eps, np.zeros_like(ht)

    def kernel(k, *types):
        return _numba_kernels.kernel("kl_update_rows", arguments(k, *types))

    limit = _numba_kernels.SPECIALIZED_MAX_K
    assert kernel(limit + 1) is _numba_kernels.kl_update_rows
    three = kernel(3)
    assert three is not _numba_kernels.kl_update_rows
    assert kernel(3, np.float64, np.int64) is three
    assert len(three.overloads) >= 2  # one per signature, compiled on first use
    assert kernel(4) is not three


_LOAD_K7 = """
import numpy as np, scipy.sparse as sp
from dasknmf import _numba_kernels
x = sp.random(50, 30, density=0.3, format="csr", random_state=0, dtype=np.float64)
w, ht = np.ones((50, 7)), np.ones((30, 7))
arguments = (x.indptr, x.indices, x.data, w, ht, np.ones(7), 0.0, 1e-9, np.zeros_like(ht))
kernel = _numba_kernels.kernel("kl_update_rows", arguments)
kernel(*arguments)
w_generic, out_generic = np.ones((50, 7)), np.zeros_like(ht)
_numba_kernels.kl_update_rows(*arguments[:3], w_generic, ht, *arguments[5:8], out_generic)
np.testing.assert_allclose(w, w_generic, rtol=1e-12)
np.testing.assert_allclose(arguments[-1], out_generic, rtol=1e-12)
print(kernel.stats.cache_hits.get(kernel.signatures[0], 0))
"""


def _in_a_new_process(cache_home):
    environment = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    environment.pop("NUMBA_CACHE_DIR", None)
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_K7], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def test_a_specialized_kernel_is_compiled_once_and_then_loaded_from_the_cache(tmp_path):
    """The generated source is written under the user's cache directory, so that numba's
    cache serves the next process (a cluster's worker processes start without it)."""
    assert _in_a_new_process(tmp_path) == 0  # compiled
    sources = list((tmp_path / "dasknmf" / "kernels").glob("*_k7_*.py"))
    assert len(sources) == 1
    assert _in_a_new_process(tmp_path) == 1  # loaded
    assert list((tmp_path / "dasknmf" / "kernels").glob("*_k7_*.py")) == sources


def test_without_a_cache_directory_the_kernel_is_compiled_in_memory(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    assert _in_a_new_process(blocked) == 0
    assert blocked.read_text() == "not a directory"


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


def test_a_cache_directory_of_another_user_is_not_used(tmp_path, monkeypatch):
    """Generated code is imported from the directory: one that another user owns (a shared
    XDG_CACHE_HOME, say) is passed over, and the kernel compiled in memory instead."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _numba_kernels._source_directory() == tmp_path / "dasknmf" / "kernels"
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    assert _numba_kernels._source_directory() is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stacked_hals_sweeps_in_blocks_of_rows_are_those_of_whole_rows(dtype):
    """``hals_stacked`` sweeps each problem ``block`` rows at a time (all sweeps on a block
    before the next): the rows are independent and each component's violation is summed over
    them in order, so any block — here blocks of 7 and the default, over 2,500 rows with a
    partial last block — gives the bits of whole rows at once, flat component included."""
    rng = np.random.default_rng(3)
    R, k, rows = 3, 6, 2500
    F = rng.random((R, k, rows)).astype(dtype)
    grams = rng.random((R, k, k))
    grams = grams @ grams.transpose(0, 2, 1) + np.eye(k)
    diag = np.diagonal(grams, axis1=1, axis2=2).copy()
    coupling = grams / diag[:, :, None]
    coupling[:, np.arange(k), np.arange(k)] = 0
    diag[1, 2], coupling[1, 2] = 0, 0  # problem 1's component 2 is flat
    scaled = rng.random((R, k, rows)) * 3 / diag.clip(1)[:, :, None]
    args = (coupling.astype(dtype), scaled.astype(dtype), diag.astype(dtype), [4, 0, 2, 5, 1, 3])
    whole = F.copy()
    expected = _compiled.hals_stacked(whole, *args, 5, block=rows)
    assert not np.array_equal(whole, F)
    for block in (7, None):
        got = F.copy()
        violations = _compiled.hals_stacked(got, *args, 5, block=block)
        assert np.array_equal(got, whole) and np.array_equal(violations, expected), block
    assert _numba_kernels.HALS_ROW_BLOCK < rows
