"""Initializations: chunking-independent random blocks, NNDSVD as scikit-learn computes it."""

import dask.array as da
import numpy as np
import pytest
from conftest import low_rank
from sklearn.decomposition._nmf import _initialize_nmf

from dasknmf import init
from dasknmf.cuts import column_bounds
from dasknmf.panels import dask_panels, in_memory_panels


def _panels(X, n_panels, lazy=False):
    rows = -(-X.shape[0] // n_panels)
    if lazy:
        return dask_panels(
            da.from_array(X, chunks=(rows, X.shape[1])), rows * X.shape[1] * X.itemsize, cache=False
        )
    return in_memory_panels(X, rows * X.shape[1] * X.itemsize, n_threads=1)


def _initial(X, method, n_panels, k=4, lazy=False, **kwargs):
    panels = _panels(X, n_panels, lazy)
    cols = column_bounds(X.shape[1], k, X.itemsize)
    wt, h = init.initialize(panels, method, k, cols, X.mean(), **kwargs)
    wt, h = panels.ops.fetch((wt, h))
    return np.concatenate(wt, axis=1).T, np.concatenate(h, axis=1)


def test_half_normal_rows_do_not_depend_on_how_they_are_cut():
    whole = init.half_normal_rows(7, 0, 0, 10000, 3)
    parts = [
        init.half_normal_rows(7, 0, a, b, 3) for a, b in [(0, 4000), (4000, 4097), (4097, 10000)]
    ]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert np.all(whole >= 0)
    assert not np.array_equal(whole, init.half_normal_rows(7, 1, 0, 10000, 3))  # streams differ


def test_panels_of_a_few_rows_share_the_block_they_draw_from(monkeypatch):
    """The last blocks of draws are kept: 1,000 panels of 4 rows draw one block of 4,096 rows,
    not one each, and get the numbers a fresh draw gives; a kept block is read-only; blocks
    above ``KEPT_BLOCK_BYTES`` are drawn afresh."""
    from dasknmf import _random

    _random._kept_block.cache_clear()
    rows = [_random.normal_rows(11, 0, 4 * i, 4 * i + 4, 3) for i in range(1000)]
    assert _random._kept_block.cache_info().misses == 1
    fresh = _random._draw_block(11, 0, 0, 3)[:4000]
    np.testing.assert_array_equal(np.concatenate(rows), fresh)
    with pytest.raises(ValueError, match="read-only"):
        rows[0][0, 0] = 1.0
    monkeypatch.setattr(_random, "KEPT_BLOCK_BYTES", 4096 * 3 * 8 - 1)
    _random._kept_block.cache_clear()
    np.testing.assert_array_equal(_random.normal_rows(11, 0, 0, 4, 3), fresh[:4])
    assert _random._kept_block.cache_info().misses == 0


@pytest.mark.parametrize("method", ["random", "nndsvdar"])
def test_random_parts_do_not_depend_on_the_panels(method):
    X = low_rank(200, 30, 4)
    W1, H1 = _initial(X, method, 1, random_state=3)
    W5, H5 = _initial(X, method, 5, random_state=3)
    if method == "random":
        np.testing.assert_array_equal(W1, W5)
        np.testing.assert_array_equal(H1, H5)
    else:  # the SVD sums over panels, so it differs by rounding; the noise does not differ
        np.testing.assert_allclose(W1, W5, rtol=1e-9)
        np.testing.assert_allclose(H1, H5, rtol=1e-9)


@pytest.mark.parametrize("lazy", [False, True])
def test_random_w_made_by_shard_equals_it_made_by_panel(lazy, sync_scheduler):
    """``by_shard``: one task per shard makes a tuple of its panels' blocks
    (``shards.ShardStates``, which ``Panels.bundle`` passes on): the blocks by panel, regrouped."""
    from dasknmf.shards import ShardStates

    X = low_rank(200, 30, 4)
    panels = _panels(X, 20, lazy)
    panels.shard(3)
    cols = column_bounds(X.shape[1], 4, X.itemsize)
    by_panel, _ = init.initialize(panels, "random", 4, cols, X.mean(), random_state=1)
    by_shard, _ = init.initialize(
        panels, "random", 4, cols, X.mean(), random_state=1, by_shard=True
    )
    assert isinstance(by_shard, ShardStates) and panels.bundle(by_shard) == list(by_shard)
    by_panel, by_shard = panels.ops.fetch((list(by_panel), list(by_shard)))
    assert [len(s) for s in by_shard] == [b - a for a, b in panels.shard_ranges] != [20]
    for block, shard_block in zip(by_panel, [b for s in by_shard for b in s], strict=True):
        np.testing.assert_array_equal(block, shard_block)


def test_random_has_sklearn_scale():
    X = low_rank(4000, 50, 4)
    W, H = _initial(X, "random", 3, random_state=0)
    expected = np.sqrt(X.mean() / 4) * np.sqrt(2 / np.pi)  # E|N(0, 1)| = sqrt(2/π)
    assert W.mean() == pytest.approx(expected, rel=0.05)
    assert H.mean() == pytest.approx(expected, rel=0.1)
    assert W.dtype == X.dtype


@pytest.mark.parametrize("method", ["nndsvd", "nndsvda"])
@pytest.mark.parametrize("lazy", [False, True])
def test_nndsvd_matches_sklearn_on_an_exactly_low_rank_matrix(method, lazy, sync_scheduler):
    # For rank k the randomized SVD is exact (up to signs, which NNDSVD does not see).
    X = low_rank(120, 25, 4, noise=0.0)
    W, H = _initial(X, method, 3, lazy=lazy, random_state=0)
    W_sk, H_sk = _initialize_nmf(X, 4, init=method, random_state=0)
    np.testing.assert_allclose(W @ H, W_sk @ H_sk, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(W, W_sk, rtol=1e-5, atol=1e-6)


def test_nndsvd_coefficients_guard_an_empty_part():
    _, coef_w, coef_h = init.nndsvd_coefficients(
        np.array([2.0, 1.0]), np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 0.0]])
    )
    assert np.all(np.isfinite(coef_w)) and coef_w[1] == 0 and coef_h[1] == 0


def test_custom_blocks():
    X = low_rank(50, 8, 2)
    W0 = np.random.default_rng(0).uniform(size=(50, 2))
    H0 = np.random.default_rng(1).uniform(size=(2, 8))
    W, H = _initial(X, "custom", 3, k=2, W=W0, H=H0)
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(H, H0)


def test_seed_entropy():
    assert init.seed_entropy(5) == 5
    assert init.seed_entropy(np.random.RandomState(0)) == init.seed_entropy(
        np.random.RandomState(0)
    )
    assert isinstance(init.seed_entropy(None), int)
    assert isinstance(init.seed_entropy(np.random.default_rng(0)), int)
    with pytest.raises(ValueError, match="cannot be used to seed"):
        init.seed_entropy("seven")


def test_unknown_method():
    X = low_rank(10, 4, 2)
    with pytest.raises(ValueError, match="Invalid init parameter"):
        _initial(X, "svd", 1, k=2)
