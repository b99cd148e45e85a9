"""Initial W and H, block by block: 'random', 'nndsvd', 'nndsvda', 'nndsvdar', 'custom'.

Blocks of Wᵀ follow the row panels of X, blocks of H its column blocks; every block is made by
its own task, so nothing of size m or n passes through the driver. Random values come from
streams keyed by ``SeedSequence(random_state, spawn_key=(stream, block))`` over blocks of a fixed
number of rows (``dasknmf._random``), not over panels: the initialization, and so the result,
does not depend on how X is chunked beyond rounding.
"""

from __future__ import annotations

import itertools

import numpy as np

from dasknmf import shards, svd
from dasknmf._random import normal_rows, seed_entropy
from dasknmf.grid import Grid
from dasknmf.ops import tree_reduce
from dasknmf.panels import Panels

#: Power iterations of the randomized SVD behind NNDSVD (a starting point needs no more).
SVD_POWER_ITER = 1
#: NNDSVD truncates entries below this to zero (scikit-learn's ``eps``).
NNDSVD_EPS = 1e-6

# Random streams.
_W_RANDOM, _H_RANDOM, _W_FILL, _H_FILL, _SVD_SKETCH = range(5)

INIT_METHODS = ("random", "nndsvd", "nndsvda", "nndsvdar", "custom")

__all__ = ["INIT_METHODS", "initialize", "seed_entropy"]


def half_normal_rows(entropy: int, stream: int, start: int, stop: int, width: int) -> np.ndarray:
    """Rows ``start:stop`` of an endless (·, width) matrix of |N(0, 1)| draws."""
    return np.abs(normal_rows(entropy, stream, start, stop, width))


def random_block(
    entropy: int | tuple, stream: int, scale, dtype, k: int | tuple, start: int, stop: int
) -> np.ndarray:
    """A (k, stop − start) component-major block of ``scale``·|N(0, 1)|; for stacked fits,
    tuples of their entropies, scales and ranks: the block of each, one above the other."""
    if isinstance(entropy, tuple):
        blocks = [
            random_block(e, stream, s, dtype, r, start, stop)
            for e, s, r in zip(entropy, scale, k, strict=True)
        ]
        return np.ascontiguousarray(np.concatenate(blocks))
    block = half_normal_rows(entropy, stream, start, stop, k).T * scale
    return np.ascontiguousarray(block, dtype=dtype)


def _ranges(bounds: list[int]) -> list[tuple[int, int]]:
    return list(itertools.pairwise(bounds))


def random_init(
    panels: Panels,
    k: int | tuple,
    col_bounds: list[int],
    mean: float,
    entropy: int | tuple,
    streams: tuple[int, int],
    by_shard: bool = False,
):
    """scikit-learn's 'random': |N(0, 1)|·sqrt(mean(X) / k), W from the first stream, H from
    the second; for stacked fits, tuples of their entropies and ranks: one such start per fit,
    stacked. ``by_shard``: W made by one task per shard of ``panels``, as one state per shard
    (``shards.ShardStates``), the same blocks as by one task per panel."""
    ops = panels.ops
    scale = tuple(np.sqrt(mean / r) for r in k) if isinstance(k, tuple) else np.sqrt(mean / k)
    common = (entropy, streams[0], scale, panels.dtype, k)
    if by_shard:  # one task per shard (``shards.ShardStates``)
        ranges = _ranges(panels.row_bounds)
        items = [(ranges[a:b],) for a, b in panels.shard_ranges]
        states = panels.shard_map(random_blocks, items, *common, data=False)
        wt = shards.ShardStates(ops.persist(*states) if ops.is_lazy else states)
    else:
        wt = panels.map(random_block, _ranges(panels.row_bounds), *common)
    h = ops.map(random_block, _ranges(col_bounds), entropy, streams[1], scale, panels.dtype, k)
    return wt, h


def random_blocks(entropy, stream: int, scale: float, dtype, k: int, ranges) -> tuple:
    """``random_block`` of each of a shard's panels (rows ``ranges``)."""
    return tuple(random_block(entropy, stream, scale, dtype, k, a, b) for a, b in ranges)


# ---- NNDSVD (Boutsidis & Gallopoulos 2008), as scikit-learn computes it ---------------------


def signed_norms_sq(block: np.ndarray) -> np.ndarray:
    """Σ over a component-major block of the squared positive and negative parts, (2, k)."""
    block = block.astype(np.float64, copy=False)
    positive = np.maximum(block, 0)
    negative = np.minimum(block, 0)
    return np.stack([(positive**2).sum(axis=1), (negative**2).sum(axis=1)])


def nndsvd_coefficients(s: np.ndarray, u_norms_sq: np.ndarray, v_norms_sq: np.ndarray):
    """Per component: which part of the singular vectors to keep (0 = |x|, +1 = positive part,
    −1 = negative part) and the factors by which W's and H's parts are scaled."""
    k = len(s)
    signs = np.zeros(k, dtype=np.int8)
    coef_w = np.zeros(k)
    coef_h = np.zeros(k)
    u_pos, u_neg = np.sqrt(u_norms_sq)
    v_pos, v_neg = np.sqrt(v_norms_sq)
    # The leading singular pair of a non-negative matrix has one sign: use its absolute value.
    coef_w[0] = coef_h[0] = np.sqrt(s[0])
    for j in range(1, k):
        m_pos, m_neg = u_pos[j] * v_pos[j], u_neg[j] * v_neg[j]
        if m_pos > m_neg:
            signs[j], sigma, norm_u, norm_v = 1, m_pos, u_pos[j], v_pos[j]
        else:
            signs[j], sigma, norm_u, norm_v = -1, m_neg, u_neg[j], v_neg[j]
        if sigma > 0:  # scikit-learn divides by zero here and gets NaN
            scale = np.sqrt(s[j] * sigma)
            coef_w[j], coef_h[j] = scale / norm_u, scale / norm_v
    return signs, coef_w, coef_h


def nndsvd_block(
    signs: np.ndarray,
    coef: np.ndarray,
    fill: str,
    mean: float,
    entropy: int,
    stream: int,
    dtype,
    start: int,
    stop: int,
    vectors: np.ndarray,
) -> np.ndarray:
    """One component-major block of the NNDSVD factor from the same block of singular vectors,
    with scikit-learn's zero filling: 'zeros' (nndsvd), 'mean' (nndsvda), 'random' (nndsvdar)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    parts = np.where(
        (signs == 0)[:, None], np.abs(vectors), np.maximum(signs[:, None] * vectors, 0)
    )
    block = coef[:, None] * parts
    block[block < NNDSVD_EPS] = 0
    zeros = block == 0
    if fill == "mean":
        block[zeros] = mean
    elif fill == "random":
        noise = half_normal_rows(entropy, stream, start, stop, block.shape[0]).T
        block[zeros] = mean * noise[zeros] / 100
    return block.astype(dtype)


def nndsvd_init(
    panels: Panels,
    k: int,
    col_bounds: list[int],
    mean: float,
    entropy: int,
    variant: str,
    fill_streams: tuple[int, int],
):
    """'nndsvd', 'nndsvda' or 'nndsvdar' from a randomized truncated SVD of X (over the 2-D
    blocks of a ``grid.Grid``: the same numbers up to rounding); nndsvdar's noise for W and H
    comes from the two ``fill_streams``."""
    if isinstance(panels, Grid):
        ut, s, vt = svd.randomized_svd_blocks(panels, k, SVD_POWER_ITER, entropy, _SVD_SKETCH)
    else:
        ut, s, vt = svd.randomized_svd(panels, k, SVD_POWER_ITER, entropy, col_bounds, _SVD_SKETCH)
    return nndsvd_factors(panels, col_bounds, (ut, s, vt), mean, entropy, variant, fill_streams)


def nndsvd_factors(
    layout, col_bounds: list[int], triplets: tuple, mean: float, entropy: int, variant, fill_streams
):
    """The NNDSVD blocks of Wᵀ (by row of ``layout``: row panels, or rows of 2-D blocks) and
    of H (by column block) from the singular ``triplets`` (Uᵀ blocks, S, Vᵀ blocks)."""
    ops = layout.ops
    ut, s, vt = triplets
    u_norms, v_norms = (
        ops.fetch(tree_reduce(ops, ops.map(signed_norms_sq, [(b,) for b in blocks])))
        for blocks in (ut, vt)
    )
    signs, coef_w, coef_h = nndsvd_coefficients(s, u_norms, v_norms)
    fill = {"nndsvd": "zeros", "nndsvda": "mean", "nndsvdar": "random"}[variant]
    wt = layout.map(
        nndsvd_block,
        [(*bounds, b) for bounds, b in zip(_ranges(layout.row_bounds), ut, strict=True)],
        signs,
        coef_w,
        fill,
        mean,
        entropy,
        fill_streams[0],
        layout.dtype,
    )
    h = ops.map(
        nndsvd_block,
        [(*bounds, b) for bounds, b in zip(_ranges(col_bounds), vt, strict=True)],
        signs,
        coef_h,
        fill,
        mean,
        entropy,
        fill_streams[1],
        layout.dtype,
    )
    return wt, h


def custom_init(panels: Panels, col_bounds: list[int], W, H):
    """Blocks of user-given W (m, k) and H (k, n)."""
    ops = panels.ops
    wt = panels.map(
        _component_major,
        [(W[start:stop],) for start, stop in _ranges(panels.row_bounds)],
        panels.dtype,
    )
    h = ops.map(
        _copy_block, [(H[:, start:stop],) for start, stop in _ranges(col_bounds)], panels.dtype
    )
    return wt, h


def _component_major(dtype, rows) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(rows).T, dtype=dtype)


def _copy_block(dtype, block) -> np.ndarray:
    return np.array(block, dtype=dtype, order="C")


def initialize(
    panels: Panels,
    method: str,
    k: int | tuple,
    col_bounds: list[int],
    mean: float,
    random_state=None,
    W=None,
    H=None,
    swap_streams: bool = False,
    by_shard: bool = False,
):
    """Initial blocks of Wᵀ and H for ``method``; persisted when ``panels.ops`` is lazy.
    ``panels``: the row panels of X, or the 2-D blocks of a ``grid.Grid`` (Wᵀ by row of blocks,
    each block made where its row is).

    ``swap_streams`` when the panels hold Xᵀ: W of Xᵀ is Hᵀ of X and draws from H's streams, so
    that a random initialization is the same in both orientations. ``by_shard``: see
    ``random_init`` (the other methods make W by panel). Stacked fits ('random' only): k and
    ``random_state`` are tuples of their ranks and seeds.
    """
    if isinstance(random_state, tuple):  # stacked fits, one seed each
        entropy = tuple(seed_entropy(seed) for seed in random_state)
    else:
        entropy = seed_entropy(random_state)
    streams = (_W_RANDOM, _H_RANDOM, _W_FILL, _H_FILL)
    if swap_streams:
        streams = (_H_RANDOM, _W_RANDOM, _H_FILL, _W_FILL)
    if method == "random":
        wt, h = random_init(panels, k, col_bounds, mean, entropy, streams[:2], by_shard)
    elif method == "custom":
        wt, h = custom_init(panels, col_bounds, W, H)
    elif method in ("nndsvd", "nndsvda", "nndsvdar"):
        wt, h = nndsvd_init(panels, k, col_bounds, mean, entropy, method, streams[2:])
    else:
        raise ValueError(
            f"Invalid init parameter: got {method!r} instead of one of {(None, *INIT_METHODS)!r}"
        )
    return panels.ops.persist(wt, h)
