"""Choosing k: many factorizations per rank, the replicates of all ranks sharing each read of X.

``select_rank(X, ks, n_replicates)`` fits, for each k, ``n_replicates`` NMFs from random
starts (seeds ``random_state + r``) **stacked**, the replicates of all ks together: one fit of
n_replicates·Σk components whose Gram matrices are block-diagonal (``Objective.ranks``), so
that each panel task reads X_i once per iteration for all of them and forms H·X_iᵀ and Wᵀ·X_i
as one product each, while the updates stay each fit's own (with its own sweeps). The ks are
stacked into as few fits as keep the factors of each within ``STACK_BYTES``. Replicate r of k
has the factors of ``NMF(n_components=k, init='random', random_state=seed_r,
extrapolate=False)`` run alone, up to rounding, and stops at the iteration that fit stops at:
each stacked fit stops by its own rule (``dasknmf.stacked``).

Per k it reports each replicate's error ‖X − W·H‖, the stability of the clustering of the
samples (the argmax of each row of W) across replicates — cophenetic correlation (Brunet et al.
2004) and dispersion (Kim & Park 2007) of their consensus matrix, on at most
``consensus_samples`` rows drawn at random, so that no m × m matrix is formed — the silhouette
of the pooled components clustered into k groups (Kotliar et al. 2019), and a held-out error by
bi-cross-validation (``dasknmf.heldout``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
import os
from collections.abc import Iterable

import dask.array as da
import numpy as np
import zarr

from dasknmf import _params, consensus, io, storage
from dasknmf._random import seed_entropy
from dasknmf.estimator import NMF
from dasknmf.heldout import (
    by_row_blocks,
    check_folds,
    heldout_errors,
    residual_and_norm,
    stacked_fit,
)

logger = logging.getLogger(__name__)

#: The suggested k is the smallest whose held-out error is within this fraction of the smallest
#: one: beyond the rank of the signal the held-out error stays flat (non-negativity keeps the
#: extra components from fitting much noise), and the first k on that plateau is the rank.
HELDOUT_MARGIN = 0.005


@dataclasses.dataclass
class RankSelection:
    """What ``select_rank`` found, per k (dicts keyed by k)."""

    ks: list[int]
    n_replicates: int
    seeds: list[int]
    errors: dict[int, np.ndarray]  # each replicate's ‖X − W·H‖ (Frobenius)
    n_iter: dict[int, int]  # the most iterations a replicate ran (each stops by its own rule)
    cophenetic: dict[int, float]
    dispersion: dict[int, float]
    silhouette: dict[int, float]
    heldout_error: dict[int, float]  # relative (see the module); empty with heldout=False
    components: dict[int, np.ndarray]  # H of all replicates, (n_replicates·k, n_features)
    suggested_k: int
    rule: str
    norm_x: float  # ‖X‖, for relative errors
    source: str | None = None  # X's path or URL (and matrix inside), when it was given as one

    def as_dict(self) -> dict:
        """Everything but the components, as JSON-able values."""
        per_k = [
            {
                "k": k,
                "errors": [float(e) for e in self.errors[k]],
                "relative_error": float(np.mean(self.errors[k]) / self.norm_x),
                "n_iter": int(self.n_iter[k]),
                "cophenetic": _jsonable(self.cophenetic[k]),
                "dispersion": _jsonable(self.dispersion[k]),
                "silhouette": _jsonable(self.silhouette[k]),
                "heldout_error": _jsonable(self.heldout_error.get(k)),
            }
            for k in self.ks
        ]
        return {
            "ks": list(self.ks),
            "n_replicates": self.n_replicates,
            "seeds": list(self.seeds),
            "norm_x": self.norm_x,
            "suggested_k": self.suggested_k,
            "rule": self.rule,
            "source": self.source,
            "per_k": per_k,
        }

    def check_rank(self, k) -> None:
        """ValueError unless rank ``k`` was run."""
        if not _params.is_int(k) or k not in self.components:
            raise ValueError(f"Rank {k!r} was not run: the selection has ks {self.ks}.")

    def save(self, path, *, overwrite: bool = False, storage_options=None):
        """Write the selection to a Zarr group: the ``as_dict`` values as attributes and the
        pooled components of each k as arrays ``components_K`` (``load_rank`` reads it). The
        group is written to a temporary sibling and moved to ``path`` when complete."""
        with io.atomic_path(path, overwrite, storage_options) as tmp:
            group = zarr.open_group(store=tmp.store(), mode="w")
            for k in self.ks:
                group.create_array(f"components_{k}", data=np.asarray(self.components[k]))
            group.attrs.update(
                {"dasknmf": {"kind": "rank", "format": RANK_FORMAT}, "rank": self.as_dict()}
            )
        return path


#: Version of the layout of a saved rank selection.
RANK_FORMAT = 1


def is_rank(path, storage_options=None) -> bool:
    """Whether ``path`` holds a saved rank selection (of any format)."""
    try:
        group = zarr.open_group(store=storage.location(path, storage_options).store(), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return False
    return dict(group.attrs).get("dasknmf", {}).get("kind") == "rank"


def load_rank(path, *, storage_options=None) -> RankSelection:
    """The ``RankSelection`` saved at ``path``; ValueError for anything else."""
    if not is_rank(path, storage_options):
        raise ValueError(f"{path} is not a rank selection (written by dasknmf rank).")
    group = zarr.open_group(store=storage.location(path, storage_options).store(), mode="r")
    header = dict(group.attrs)["dasknmf"]
    if header.get("format") != RANK_FORMAT:
        raise ValueError(f"{path} is not a rank selection of format {RANK_FORMAT} (dasknmf rank).")
    found = group.attrs["rank"]
    per_k = {entry["k"]: entry for entry in found["per_k"]}

    def column(name):
        return {k: np.nan if e[name] is None else e[name] for k, e in per_k.items()}

    return RankSelection(
        ks=list(found["ks"]),
        n_replicates=found["n_replicates"],
        seeds=list(found["seeds"]),
        errors={k: np.array(e["errors"]) for k, e in per_k.items()},
        n_iter={k: e["n_iter"] for k, e in per_k.items()},
        cophenetic=column("cophenetic"),
        dispersion=column("dispersion"),
        silhouette=column("silhouette"),
        heldout_error={k: e["heldout_error"] for k, e in per_k.items() if e["heldout_error"]},
        components={k: group[f"components_{k}"][...] for k in per_k},
        suggested_k=found["suggested_k"],
        rule=found["rule"],
        norm_x=found["norm_x"],
        source=found.get("source"),
    )


def consensus_nmf(
    X,
    selection: RankSelection,
    k: int,
    *,
    density_threshold: float = 0.5,
    neighbors: float = 0.3,
    max_iter: int = 200,
    tol: float = 1e-4,
    panel_bytes=None,
    storage_options=None,
) -> NMF:
    """An ordinary fitted ``NMF`` from the replicates of rank ``k`` (Kotliar et al. 2019):
    H the consensus of their pooled components (``consensus.consensus_components``: outliers
    by local density dropped, k-means, medians, each row scaled to sum 1), W refitted to X with
    H fixed (non-negative least squares, one read of X) and its error measured (one more).
    ``transform``, ``save``, ``dasknmf info`` and ``plot`` take it like any model."""
    selection.check_rank(k)
    found = consensus.consensus_components(selection.components[k], k, density_threshold, neighbors)
    model = NMF(
        n_components=k,
        max_iter=max_iter,
        tol=tol,
        panel_bytes=panel_bytes,
        storage_options=storage_options,
    )
    X = model._check_input(X, reset=True)
    H = np.ascontiguousarray(found["components"], dtype=X.dtype)
    if H.shape[1] != X.shape[1]:
        raise ValueError(f"X has {X.shape[1]} features; rank {k} was run on {H.shape[1]}.")
    model.components_, model.n_components_ = H, k
    W = model.transform(X)
    if isinstance(W, da.Array):
        W = W.persist()
    residual = by_row_blocks(residual_and_norm, X, W, H)[0]
    model.W_, model.n_iter_, model.loss_history_ = W, 0, []
    model.reconstruction_err_ = float(np.sqrt(residual))
    model.consensus_ = {key: found[key] for key in ("kept", "silhouette")}
    return model


def select_rank(
    X,
    ks: Iterable[int],
    n_replicates: int = 10,
    *,
    solver: str = "cd",
    max_iter: int = 200,
    tol: float = 1e-4,
    random_state=None,
    alpha_W: float = 0.0,
    alpha_H="same",
    l1_ratio: float = 0.0,
    heldout: bool = True,
    consensus_samples: int = 1000,
    panel_bytes=None,
    storage_options=None,
    verbose: int = 0,
    progress: bool = False,
) -> RankSelection:
    """Fit ``n_replicates`` NMFs of each k in ``ks`` and measure which k the data support.

    Parameters
    ----------
    X : {array-like, sparse matrix, dask.array.Array, zarr.Array, str}
        The data, as ``NMF.fit`` takes it.
    ks : iterable of int
        The ranks to try, each in 1 … min(n_samples, n_features).
    n_replicates : int, default=10
        Random starts per k (at least 2); replicate r is seeded ``random_state + r``.
    solver, max_iter, tol, alpha_W, alpha_H, l1_ratio, panel_bytes, storage_options, verbose
        As for ``NMF`` (the Frobenius loss, no extrapolation).
    random_state : int or None
        The first replicate's seed; None draws one.
    heldout : bool, default=True
        Measure the bi-cross-validation error (``dasknmf.heldout``: four more fits, each on a
        quarter of X, with all ks stacked).
    consensus_samples : int, default=1000
        Rows of W drawn for the consensus matrix (all rows when there are fewer).

    Returns
    -------
    RankSelection
    """
    ks = check_ks(ks)
    if not _params.is_int(n_replicates) or isinstance(n_replicates, bool) or n_replicates < 2:
        raise ValueError(f"n_replicates must be an integer of at least 2, got {n_replicates!r}.")
    if not _params.is_int(consensus_samples) or consensus_samples < 2:
        raise ValueError(
            f"consensus_samples must be an integer of at least 2, got {consensus_samples!r}."
        )
    settings = dict(
        init="random",
        solver=solver,
        max_iter=max_iter,
        tol=tol,
        alpha_W=alpha_W,
        alpha_H=alpha_H,
        l1_ratio=l1_ratio,
        extrapolate=False,
        panel_bytes=panel_bytes,
        storage_options=storage_options,
    )
    _params.check("select_rank", {**settings, "random_state": random_state, "verbose": verbose})
    checker = NMF(n_components=max(ks), random_state=random_state, **settings)
    checker._validate_params()  # the combinations (e.g. the solver's and the penalties')
    source = os.fspath(X) if isinstance(X, str | os.PathLike) else None
    X = checker._check_input(X, reset=True)
    check_ks(ks, X.shape)
    if heldout:
        check_folds(X.shape, max(ks), 2)
    first = (
        int(random_state) if _params.is_int(random_state) else seed_entropy(random_state) % 2**31
    )
    if first + n_replicates > 2**32:
        raise ValueError(
            f"random_state + n_replicates - 1 must be below 2**32 (the replicates' seeds), got "
            f"{random_state} + {n_replicates - 1}."
        )
    seeds = [first + r for r in range(n_replicates)]
    found: dict[str, dict] = {name: {} for name in _PER_K}
    norm_x = None
    for group in stacked_groups(ks, n_replicates, X.shape, X.dtype.itemsize):
        ranks = tuple(k for k in group for _ in seeds)
        fitted, _ = stacked_fit(
            X, ranks, tuple(seeds) * len(group), settings, verbose=verbose, progress=progress
        )
        norm_x = fitted.norm_x
        starts = np.cumsum([0, *group]) * n_replicates  # each k's first component
        for g, k in enumerate(group):
            columns = slice(int(starts[g]), int(starts[g + 1]))
            components = fitted.components[columns]
            labels = _sample_labels(fitted.W[:, columns], k, n_replicates, consensus_samples, first)
            matrix = consensus.consensus_matrix(labels)
            found["errors"][k] = np.array(
                fitted.replicate_errors[g * n_replicates :][:n_replicates]
            )
            found["n_iter"][k] = max(fitted.replicate_n_iter[g * n_replicates :][:n_replicates])
            found["cophenetic"][k] = consensus.cophenetic_correlation(matrix)
            found["dispersion"][k] = consensus.dispersion(matrix)
            found["silhouette"][k] = consensus.silhouette_and_clusters(components, k)[0]
            found["components"][k] = components
    if heldout:  # the folds' fits of all ks stacked
        for group in stacked_groups(ks, 1, X.shape, X.dtype.itemsize):
            found["heldout_error"].update(heldout_errors(X, group, settings, first))
    for k in ks:
        logger.info(
            "rank %d: %d replicates, mean error %.6g, cophenetic %.4f, held-out error %s",
            k,
            n_replicates,
            float(np.mean(found["errors"][k])),
            found["cophenetic"][k],
            found["heldout_error"].get(k, "not measured"),
        )
    suggested, rule = suggest(ks, found["cophenetic"], found["heldout_error"])
    return RankSelection(
        ks=ks,
        n_replicates=n_replicates,
        seeds=seeds,
        suggested_k=suggested,
        rule=rule,
        norm_x=float(norm_x),
        source=source,
        **found,
    )


#: The factors of one stacked fit, (m + n) × its components, stay within this many bytes: the
#: ks are stacked in order into as few fits as that allows (a k whose replicates alone exceed
#: it gets a fit of its own).
STACK_BYTES = 2**30


def stacked_groups(ks: list[int], replicates: int, shape, itemsize: int) -> list[list[int]]:
    """The ks fitted together, one stacked fit per group (``STACK_BYTES``)."""
    groups: list[list[int]] = []
    held = 0
    for k in ks:
        size = sum(shape) * k * replicates * itemsize
        if groups and held + size <= STACK_BYTES:
            groups[-1].append(k)
            held += size
        else:
            groups.append([k])
            held = size
    return groups


_PER_K = (
    "errors",
    "n_iter",
    "cophenetic",
    "dispersion",
    "silhouette",
    "heldout_error",
    "components",
)


def suggest(ks: list[int], cophenetic: dict, heldout: dict) -> tuple[int, str]:
    """The suggested k and the rule that chose it: the smallest k whose held-out error is
    within ``HELDOUT_MARGIN`` of the smallest one when it was measured, else the k before the
    largest fall of the cophenetic correlation (Brunet et al. 2004), else (it never falls) the
    largest k."""
    if heldout:
        bound = min(heldout.values()) * (1 + HELDOUT_MARGIN)
        best = min(k for k in ks if heldout[k] <= bound)
        return best, (
            f"the smallest k whose held-out (bi-cross-validation) error is within "
            f"{HELDOUT_MARGIN:.1%} of the smallest"
        )
    falls = [(cophenetic[a] - cophenetic[b], a) for a, b in itertools.pairwise(ks)]
    if falls and max(falls)[0] > 0:
        return max(falls, key=lambda f: (f[0], -f[1]))[1], (
            "the k before the largest fall of the cophenetic correlation"
        )
    return ks[-1], "the largest k (the cophenetic correlation never falls)"


def _sample_labels(W, k: int, replicates: int, samples: int, seed: int) -> np.ndarray:
    """Per replicate, the cluster (argmax over its k columns of W) of ``samples`` rows drawn
    at random (all rows when there are fewer): (replicates, rows)."""
    m = W.shape[0]
    rows = np.arange(m)
    if m > samples:
        rows = np.sort(np.random.default_rng(seed).choice(m, samples, replace=False))
    w = W[rows]
    w = w.compute() if isinstance(w, da.Array) else np.asarray(w)
    return np.stack([w[:, r * k : (r + 1) * k].argmax(axis=1) for r in range(replicates)])


def check_ks(ks, shape=None) -> list[int]:
    """The ranks to try, sorted; ValueError or TypeError for anything but distinct integers
    in 1 … min(shape)."""
    try:
        values = list(ks)
    except TypeError:
        raise TypeError(f"ks must be an iterable of integers, got {ks!r}.") from None
    if not values:
        raise ValueError("ks is empty: give at least one rank to try.")
    for k in values:
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise ValueError(f"ks must be integers of at least 1, got {k!r}.")
    if len(set(values)) != len(values):
        raise ValueError(f"ks has duplicates: {values}.")
    if shape is not None and max(values) > min(shape):
        raise ValueError(
            f"ks must lie in 1 … min(n_samples, n_features) = {min(shape)}: got {max(values)}."
        )
    return sorted(int(k) for k in values)


def _jsonable(value):
    if value is None:
        return None
    value = float(value)
    return None if not np.isfinite(value) else value
