"""Rank selection and consensus NMF: consensus matrix, cophenetic, dispersion, cNMF consensus."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import cophenet, linkage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import squareform

from dasknmf.consensus import (
    consensus_components,
    consensus_matrix,
    cophenetic_correlation,
    dispersion,
    silhouette_and_clusters,
)


def planted(k=5, n_replicates=10, n_features=60, noise=0.01, seed=0):
    """Replicates of k sparse non-negative components, scaled, with noise, rows shuffled."""
    rng = np.random.default_rng(seed)
    truth = rng.gamma(0.3, size=(k, n_features))
    rows = np.tile(truth, (n_replicates, 1)) * rng.uniform(0.5, 2.0, size=(n_replicates * k, 1))
    rows += noise * rows.max() * rng.uniform(size=rows.shape)
    replicate = np.repeat(np.arange(n_replicates), k)
    component = np.tile(np.arange(k), n_replicates)
    order = rng.permutation(rows.shape[0])
    return truth, rows[order], replicate[order], component[order]


def block_consensus(sizes):
    groups = np.repeat(np.arange(len(sizes)), sizes)
    return (groups[:, None] == groups[None, :]).astype(float)


# consensus_matrix


def test_consensus_matrix_matches_a_double_loop():
    labels = np.array([[0, 0, 1, 1, 2], [1, 1, 1, 0, 0], [0, 2, 2, 0, 1], [3, 3, 3, 3, 3]])
    C = consensus_matrix(labels)
    n_rep, n = labels.shape
    expected = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            expected[i, j] = np.mean([labels[r, i] == labels[r, j] for r in range(n_rep)])
    np.testing.assert_allclose(C, expected)
    assert C.dtype == np.float64
    np.testing.assert_array_equal(C, C.T)
    np.testing.assert_array_equal(np.diag(C), 1.0)
    assert C.min() >= 0.0 and C.max() <= 1.0


def test_consensus_matrix_of_random_labels_is_symmetric_in_unit_range():
    labels = np.random.default_rng(1).integers(0, 4, size=(20, 30))
    C = consensus_matrix(labels)
    together = (labels[:, :, None] == labels[:, None, :]).sum(axis=0)
    np.testing.assert_array_equal(C, together / 20)  # counts, exact
    np.testing.assert_array_equal(C, C.T)
    np.testing.assert_array_equal(np.diag(C), 1.0)
    assert 0.0 <= C.min() and C.max() <= 1.0
    np.testing.assert_allclose(C * 20, np.round(C * 20), atol=1e-12)  # multiples of 1/20


# cophenetic_correlation and dispersion


def test_cophenetic_of_a_perfect_consensus_is_one():
    assert cophenetic_correlation(block_consensus([3, 4, 2])) == pytest.approx(1.0)
    assert cophenetic_correlation(np.ones((5, 5))) == 1.0  # one cluster: constant distances
    assert cophenetic_correlation(np.eye(2)) == 1.0  # fewer than 3 samples


def test_cophenetic_of_a_noisy_consensus_is_below_one():
    rng = np.random.default_rng(2)
    noise = rng.uniform(0, 0.45, size=(12, 12))
    C = np.abs(block_consensus([4, 4, 4]) - (noise + noise.T) / 2)
    np.fill_diagonal(C, 1.0)
    assert 0.0 < cophenetic_correlation(C) < 1.0


def test_cophenetic_matches_scipy():
    rng = np.random.default_rng(3)
    A = rng.uniform(size=(15, 15))
    C = (A + A.T) / 2
    np.fill_diagonal(C, 1.0)
    d = squareform(1.0 - C, checks=False)
    expected, _ = cophenet(linkage(d, method="average"), d)
    assert cophenetic_correlation(C) == pytest.approx(expected, rel=1e-12)


def test_dispersion():
    assert dispersion(block_consensus([2, 3])) == 1.0
    assert dispersion(np.full((4, 4), 0.5)) == 0.0
    C = np.array([[1.0, 0.75], [0.75, 1.0]])  # 4·(¼)² = ¼ off the diagonal
    assert dispersion(C) == pytest.approx((1.0 + 0.25 + 0.25 + 1.0) / 4)


# silhouette_and_clusters


def test_silhouette_finds_one_row_per_replicate_in_each_cluster():
    k = 5
    _, rows, replicate, component = planted(k=k)
    score, labels = silhouette_and_clusters(rows, k)
    assert score > 0.9
    for c in range(k):
        members = labels == c
        assert np.sort(replicate[members]).tolist() == list(range(10))
        assert np.unique(component[members]).size == 1
    wrong, _ = silhouette_and_clusters(rows, k + 2)
    assert wrong < score


def test_silhouette_is_nan_where_undefined():
    _, rows, _, _ = planted(k=3, n_replicates=2)
    score, labels = silhouette_and_clusters(rows, 1)
    assert np.isnan(score) and (labels == 0).all()
    score, labels = silhouette_and_clusters(rows, rows.shape[0])
    assert np.isnan(score) and np.unique(labels).size == rows.shape[0]


# consensus_components


def test_consensus_drops_outliers_and_recovers_the_planted_components():
    k, n_replicates = 5, 10
    truth, rows, _, _ = planted(k=k, n_replicates=n_replicates, seed=4)
    rng = np.random.default_rng(5)
    outliers = rng.choice(rows.shape[0], size=3, replace=False)
    rows[outliers] = rng.uniform(size=(3, rows.shape[1]))
    result = consensus_components(rows, k)
    assert not result["kept"][outliers].any()
    assert result["kept"].sum() == rows.shape[0] - 3
    assert (result["labels"][outliers] == -1).all()
    assert (result["density"][outliers] > 0.5).all()

    consensus = result["components"]
    assert consensus.shape == (k, rows.shape[1])
    np.testing.assert_allclose(consensus.sum(axis=1), 1.0)
    expected = truth / truth.sum(axis=1, keepdims=True)
    corr = np.corrcoef(consensus, expected)[:k, k:]
    match, truth_index = linear_sum_assignment(-corr)
    assert (corr[match, truth_index] > 0.99).all()
    assert result["silhouette"] > 0.9

    again = consensus_components(rows, k)
    for key in ("components", "kept", "density", "labels"):
        np.testing.assert_array_equal(again[key], result[key])
    assert again["silhouette"] == result["silhouette"]


def test_consensus_orders_clusters_by_first_kept_row():
    _, rows, _, _ = planted(k=4, n_replicates=6, seed=6)
    labels = consensus_components(rows, 4)["labels"]
    first = [np.flatnonzero(labels == c)[0] for c in range(4)]
    assert first == sorted(first)


# failure modes


@pytest.mark.parametrize(
    "call",
    [
        lambda a: consensus_matrix(a.astype(int)),
        cophenetic_correlation,
        dispersion,
        lambda a: silhouette_and_clusters(a, 2),
        lambda a: consensus_components(a, 2),
    ],
)
def test_wrong_ndim_names_the_shape(call):
    with pytest.raises(ValueError, match=r"2-D.*\(2, 3, 4\)"):
        call(np.ones((2, 3, 4)))


@pytest.mark.parametrize(
    "call",
    [
        cophenetic_correlation,
        dispersion,
        lambda a: silhouette_and_clusters(a, 2),
        lambda a: consensus_components(a, 2),
        lambda a: consensus_matrix(a),
    ],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_refused(call, bad):
    a = np.eye(4)
    a[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        call(a)


def test_consensus_matrix_needs_a_replicate():
    with pytest.raises(ValueError, match="at least 1 replicate"):
        consensus_matrix(np.zeros((0, 5), dtype=int))


def test_consensus_matrices_must_be_square():
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        dispersion(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        cophenetic_correlation(np.ones((3, 4)))


def test_consensus_components_refusals():
    _, rows, _, _ = planted(k=3, n_replicates=4)
    with pytest.raises(ValueError, match=r"keeps 0 of 12 components, fewer than k=3"):
        consensus_components(rows, 3, density_threshold=0.0)
    with pytest.raises(ValueError, match="not a multiple of k=5"):
        consensus_components(rows, 5)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        consensus_components(rows, 0)
    with pytest.raises(ValueError, match="at least 2 replicates"):
        consensus_components(rows[:3], 3)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        silhouette_and_clusters(rows, 0)
    with pytest.raises(ValueError, match="larger than the number of components"):
        silhouette_and_clusters(rows, 13)
