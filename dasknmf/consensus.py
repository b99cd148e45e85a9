"""Choosing k: the small-array math of rank selection and consensus NMF.

Each function takes the numpy results of several NMF replicates (different seeds) at one rank k.

- Consensus matrix and cophenetic correlation (Brunet et al. 2004, PNAS 101:4164): assign each
  sample to the component of its largest weight (argmax of its row of W); C[i, j] is the fraction
  of replicates that put samples i and j together. The cophenetic correlation is the Pearson
  correlation between the distances 1 − C and the cophenetic distances of their average-linkage
  tree: 1 for a perfectly stable clustering, lower as the assignments wobble. Pick the k where it
  starts to fall.
- Dispersion (Kim & Park 2007, Bioinformatics 23:1495): the mean of 4·(C_ij − ½)² over all
  entries, 1 when every entry is 0 or 1, 0 when every entry is ½.
- Consensus NMF (Kotliar et al. 2019, eLife 8:e43803; the ``cnmf`` package): pool the rows of H
  of all replicates and L2-normalize them; drop outliers whose local density (the mean distance
  to their nearest neighbours) exceeds a threshold; k-means the rest into k clusters; each
  consensus component is the per-feature median of its cluster, rescaled to sum 1. The
  silhouette of the clustering measures the stability of the solution at this k.
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy.cluster.hierarchy import cophenet, linkage
from scipy.spatial.distance import cdist, squareform
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score


def _matrix(a, name: str) -> np.ndarray:
    """``a`` as a finite 2-D float64 array, or ValueError."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _square(a, name: str) -> np.ndarray:
    """``a`` as a finite, non-empty, square float64 matrix, or ValueError."""
    a = _matrix(a, name)
    if a.shape[0] != a.shape[1] or a.size == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {a.shape}")
    return a


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm; a zero row stays zero."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def _silhouette(X: np.ndarray, labels: np.ndarray) -> float:
    """Euclidean silhouette, nan where undefined (fewer than 2 or more than n − 1 clusters)."""
    if not 2 <= np.unique(labels).size <= X.shape[0] - 1:
        return float("nan")
    return float(silhouette_score(X, labels, metric="euclidean"))


def _kmeans(X: np.ndarray, k: int, random_state) -> np.ndarray:
    if k == 1:
        return np.zeros(X.shape[0], dtype=np.intp)
    return KMeans(n_clusters=k, n_init=10, random_state=random_state).fit_predict(X).astype(np.intp)


def consensus_matrix(labels: np.ndarray) -> np.ndarray:
    """Fraction of replicates that put each pair of samples in the same cluster.

    Parameters
    ----------
    labels : ndarray of int, shape (n_replicates, n_samples)
        Per replicate, each sample's cluster (the argmax of its row of W).

    Returns
    -------
    ndarray of float64, shape (n_samples, n_samples)
        Symmetric, diagonal 1, values in [0, 1].
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D array, got shape {labels.shape}")
    if labels.shape[0] < 1:
        raise ValueError(f"labels needs at least 1 replicate (row), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        as_float = _matrix(labels, "labels")
        if not np.array_equal(as_float, np.round(as_float)):
            raise ValueError("labels must be integer cluster indices")
    n_replicates, n_samples = labels.shape
    # All replicates' one-hot memberships side by side: one product counts, for each pair,
    # the replicates that put them together (exact: small integers in float64).
    onehots = []
    for replicate in labels:
        _, cluster = np.unique(replicate, return_inverse=True)
        onehot = np.zeros((n_samples, cluster.max(initial=-1) + 1))
        onehot[np.arange(n_samples), cluster] = 1.0
        onehots.append(onehot)
    memberships = np.hstack(onehots)
    C = memberships @ memberships.T
    return C / n_replicates


def cophenetic_correlation(consensus: np.ndarray) -> float:
    """Brunet et al.'s cophenetic correlation coefficient of a consensus matrix.

    Parameters
    ----------
    consensus : ndarray, shape (n_samples, n_samples)
        A consensus matrix (:func:`consensus_matrix`); its upper triangle is used.

    Returns
    -------
    float
        Pearson correlation between 1 − C and the cophenetic distances of its average-linkage
        tree; 1.0 for fewer than 3 samples or when all distances are equal (undefined there).
    """
    C = _square(consensus, "consensus")
    if C.shape[0] < 3:
        return 1.0
    d = np.clip(squareform(1.0 - C, checks=False), 0.0, None)
    if np.ptp(d) == 0.0:
        return 1.0
    r, _ = cophenet(linkage(d, method="average"), d)
    return 1.0 if np.isnan(r) else float(r)


def dispersion(consensus: np.ndarray) -> float:
    """Kim & Park's dispersion coefficient: the mean of 4·(C_ij − ½)², in [0, 1] for C in [0, 1].

    Parameters
    ----------
    consensus : ndarray, shape (n_samples, n_samples)

    Returns
    -------
    float
        1 for a matrix of only 0 and 1, 0 for a matrix of only ½.
    """
    C = _square(consensus, "consensus")
    return float(np.mean(4.0 * (C - 0.5) ** 2))


def silhouette_and_clusters(
    components: np.ndarray, k: int, random_state=0
) -> tuple[float, np.ndarray]:
    """K-means the pooled, L2-normalized components of all replicates into k clusters.

    Parameters
    ----------
    components : ndarray, shape (n_replicates·k, n_features)
        The rows of H of all replicates, stacked.
    k : int
        The rank, the number of clusters.
    random_state : int, RandomState or None
        Seed of the k-means (``n_init=10``).

    Returns
    -------
    silhouette : float
        Euclidean silhouette score; nan for k == 1 or k >= n_rows (undefined).
    labels : ndarray of int, shape (n_rows,)
        Cluster of each row (all 0 for k == 1).
    """
    X = _unit_rows(_matrix(components, "components"))
    k = _check_k(k)
    if k > X.shape[0]:
        raise ValueError(f"k={k} is larger than the number of components ({X.shape[0]})")
    labels = _kmeans(X, k, random_state)
    return _silhouette(X, labels), labels


def consensus_components(
    components: np.ndarray,
    k: int,
    density_threshold: float = 0.5,
    neighbors: float = 0.3,
    random_state=0,
) -> dict:
    """cNMF consensus of the components of several replicates (Kotliar et al. 2019).

    Parameters
    ----------
    components : ndarray, shape (n_replicates·k, n_features)
        The rows of H of all replicates, stacked.
    k : int
        The rank.
    density_threshold : float
        Rows whose local density (mean euclidean distance of the L2-normalized row to its L
        nearest other rows) exceeds this are dropped as outliers.
    neighbors : float
        L as a fraction of the number of replicates: L = max(1, int(neighbors · n_rows / k)).
    random_state : int, RandomState or None
        Seed of the k-means (``n_init=10``).

    Returns
    -------
    dict
        ``components`` (k, n_features): per-cluster medians of the normalized rows, each
        rescaled to sum 1, ordered by the first kept row of each cluster; ``kept`` (n_rows,)
        bool; ``density`` (n_rows,); ``labels`` (n_rows,) int, −1 for dropped rows;
        ``silhouette``: of the kept rows' clustering (nan when undefined).
    """
    X = _unit_rows(_matrix(components, "components"))
    k = _check_k(k)
    n_rows = X.shape[0]
    if n_rows % k:
        raise ValueError(f"the number of components ({n_rows}) is not a multiple of k={k}")
    n_replicates = n_rows // k
    if n_replicates < 2:
        raise ValueError(f"consensus needs at least 2 replicates, got {n_replicates} (k={k})")
    if not np.isfinite(density_threshold) or not np.isfinite(neighbors) or neighbors <= 0:
        raise ValueError("density_threshold must be finite and neighbors finite and > 0")

    n_neighbors = min(max(1, int(neighbors * n_replicates)), n_rows - 1)
    dist = cdist(X, X)
    np.fill_diagonal(dist, np.inf)  # the L nearest *other* rows
    density = np.partition(dist, n_neighbors - 1, axis=1)[:, :n_neighbors].mean(axis=1)
    kept = density <= density_threshold
    if (n_kept := int(kept.sum())) < k:
        raise ValueError(
            f"density_threshold={density_threshold} keeps {n_kept} of {n_rows} components, "
            f"fewer than k={k}"
        )

    kept_rows = X[kept]
    raw = _kmeans(kept_rows, k, random_state)
    found, first = np.unique(raw, return_index=True)  # first kept row of each cluster
    if found.size < k:  # duplicate rows: KMeans may leave a cluster empty
        raise ValueError(f"k-means found only {found.size} distinct clusters, fewer than k={k}")
    kept_labels = np.argsort(np.argsort(first))[raw]  # clusters renumbered by their first row

    medians = np.stack([np.median(kept_rows[kept_labels == c], axis=0) for c in range(k)])
    sums = medians.sum(axis=1, keepdims=True)
    consensus = medians / np.where(sums > 0, sums, 1.0)

    labels = np.full(n_rows, -1, dtype=np.intp)
    labels[kept] = kept_labels
    return {
        "components": consensus,
        "kept": kept,
        "density": density,
        "labels": labels,
        "silhouette": _silhouette(kept_rows, kept_labels),
    }
