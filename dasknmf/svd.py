"""Randomized truncated SVD of X over its row panels, one read of X per subspace iteration.

Subspace iteration (Halko, Martinsson & Tropp 2011) alternates Y = X·Z and Z' = Xᵀ·Q with
Q = orth(Y). Both products need the same panel X_i, so one task per panel forms
Y_i = X_i·Z, its Gram matrix Y_iᵀ·Y_i and P_i = Y_iᵀ·X_i; with G = Σ Y_iᵀY_i = V·Λ·Vᵀ and
T = V·Λ^(-1/2), Q = Y·T is orthonormal and B = Qᵀ·X = Tᵀ·ΣP_i. The SVD of the small B, from the
eigenvectors of B·Bᵀ = Tᵀ·(ΣP·Pᵀ)·T = Ũ·Σ²·Ũᵀ, gives the next Z = Bᵀ·Ũ·Σ⁻¹ (orthonormal),
and at the end U = Q·Ũ, S = Σ, Vᵀ = Z. ``n_iter`` power iterations cost n_iter + 1 reads of X,
where the textbook form costs 2·n_iter + 2.

Orthonormalizing through Gram matrices loses directions whose singular values are below
~1e-8 of the largest; an initialization does not need them. Everything here is written against
``panels.Panels``, so the in-memory and the Dask paths compute the same numbers.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from dasknmf import kernels
from dasknmf._blas import pin_worker_blas
from dasknmf._random import normal_rows
from dasknmf.ops import reduce_to_fanin, tree_reduce
from dasknmf.panels import Panels
from dasknmf.steps import full_width, panel_data, sum_in_order

#: Extra sketch columns beyond the rank asked for.
OVERSAMPLES = 10
#: Eigenvalues of a Gram matrix below this fraction of the largest are dropped (rank deficit).
RANK_CUTOFF = 1e-12


def _sketch_panel(col_bounds, z_blocks, x):
    """Y_iᵀ = (X_i·Z)ᵀ, its Gram matrix (float64) and P_i = Y_iᵀ·X_i split by column block."""
    pin_worker_blas()
    x = panel_data(x)
    yt = kernels.dot_h(x, full_width(z_blocks))
    yt64 = yt.astype(np.float64)
    p = kernels.dot_w(x, yt)
    return (yt, yt64 @ yt64.T, *(p[:, a:b] for a, b in itertools.pairwise(col_bounds)))


def _block_partials(block: int, *outs) -> tuple:
    return sum_in_order(*((out[1], out[2 + block]) for out in outs))


def _block_sums(block: int, raw: bool, scale: float, *parts):
    """The last level of the reduction for column block ``block``: (G, P_j, P_j·P_jᵀ)."""
    return _with_ppt(scale, _block_partials(block, *parts) if raw else sum_in_order(*parts))


def _with_ppt(scale: float, sums: tuple) -> tuple:
    """(G, P_j) → (G, P_j, s²·P_j·P_jᵀ), s = ``scale`` (a power of two, 1 unless P·Pᵀ
    overflows: ``_OverflowedPassError``)."""
    gram, p = sums
    p64 = p.astype(np.float64)
    if scale != 1:
        p64 *= scale
    with np.errstate(over="ignore", invalid="ignore"):
        ppt = p64 @ p64.T
    if not np.all(np.isfinite(ppt)):  # overflowed: all ∞, which sums to ∞ without NaNs
        ppt = np.full_like(ppt, np.inf)
    return gram, p, ppt


class _OverflowedPassError(Exception):
    """P·Pᵀ overflowed: a pass to run again with P scaled by ``scale``."""

    def __init__(self, scale: float):
        super().__init__(scale)
        self.scale = scale


def _scale_for(gram: np.ndarray) -> float:
    """A power of two s that brings s·P near 1: P = Yᵀ·X is of the order of G = Yᵀ·Y (σ² for
    an orthonormal Z), and P·Pᵀ of its square, which overflows where σ exceeds ~1e77 (X of
    entries near 1e80: scikit-learn's NNDSVD takes them)."""
    return 2.0 ** -math.ceil(math.log2(float(np.max(np.abs(np.diag(gram))))))


def _gram_summary(*block_sums) -> tuple:
    """(G, Σ_j P_j·P_jᵀ): what the driver needs of a pass."""
    return block_sums[0][0], sum_in_order(*(b[2] for b in block_sums))


def _next_z(coef: np.ndarray, dtype, block_sum) -> np.ndarray:
    """A column block of the next Zᵀ: coefᵀ·P_j, component-major."""
    return np.ascontiguousarray((coef.T @ block_sum[1].astype(np.float64)).astype(dtype))


def _gaussian_block(entropy: int, stream: int, width: int, dtype, start: int, stop: int):
    return np.array(normal_rows(entropy, stream, start, stop, width).T, dtype=dtype, order="C")


def _orthonormalizer(gram: np.ndarray) -> np.ndarray:
    """T with Tᵀ·G·T = I on the numerical range of G (no columns for dropped directions)."""
    values, vectors = np.linalg.eigh(gram)
    keep = values > max(values.max(initial=0), 0) * RANK_CUTOFF
    return vectors[:, keep] / np.sqrt(values[keep])


def randomized_svd(
    panels: Panels, k: int, n_iter: int, entropy: int, col_bounds: list[int], stream: int
):
    """The leading ``k`` singular triplets of X.

    Returns ``(ut, s, vt)``: blocks of Uᵀ by row panel (k, m_i), the singular values (numpy,
    length k, zero beyond the numerical rank) and blocks of Vᵀ by column block (k, n_j), held
    as ``panels.ops`` holds data.
    """
    return _randomized_svd(panels, k, n_iter, entropy, col_bounds, stream, _subspace_pass)


def randomized_svd_blocks(g, k: int, n_iter: int, entropy: int, stream: int):
    """``randomized_svd`` over the 2-D blocks of ``g`` (a ``dasknmf.grid.Grid``): the same
    numbers up to rounding (Y_i = X_i·Z is summed over the column blocks), no task holding a
    whole row of X or a whole column. Uᵀ comes by row of blocks, Vᵀ by column block."""
    return _randomized_svd(g, k, n_iter, entropy, g.col_bounds, stream, _subspace_pass_blocks)


def _randomized_svd(layout, k, n_iter, entropy, col_bounds, stream, one_pass):
    ops = layout.ops
    n_rows, n_cols = layout.shape
    width = min(k + OVERSAMPLES, n_rows, n_cols)
    z = ops.map(
        _gaussian_block, list(itertools.pairwise(col_bounds)), entropy, stream, width, layout.dtype
    )
    scale = 1.0  # P·Pᵀ unscaled unless it overflows (then each pass scales it)
    for _ in range(n_iter + 1):
        try:
            yt, next_z, sigma, coef_u = one_pass(layout, z, col_bounds, scale)
        except _OverflowedPassError as too_large:
            scale = too_large.scale
            yt, next_z, sigma, coef_u = one_pass(layout, z, col_bounds, scale)
        z = next_z
        if not sigma.size:  # X is zero
            break
    kept = min(k, sigma.size)
    s = np.zeros(k)
    s[:kept] = sigma[:kept]
    ut = layout.map(_leading_rows, [(b,) for b in yt], coef_u[:, :kept], k, layout.dtype)
    vt = ops.map(_leading_rows, [(b,) for b in z], None, k, layout.dtype)
    return ut, s, vt


def _subspace_pass(panels: Panels, z: list, col_bounds: list[int], scale: float):
    """One read of X: from Zᵀ blocks to (Y_iᵀ blocks, next Zᵀ blocks, Σ, coefficients that turn
    Y_iᵀ into Uᵀ blocks); P·Pᵀ formed scaled by ``scale``² (``_with_ppt``)."""
    ops = panels.ops
    outs = panels.map(_sketch_panel, [(x,) for x in panels.items], col_bounds, z)
    sums = []
    for j in range(len(z)):
        parts, raw = reduce_to_fanin(ops, outs, functools.partial(_block_partials, j))
        sums.append(ops.call(_block_sums, j, raw, scale, *parts))
    yt = [ops.item(out, 0) for out in outs]
    summary = tree_reduce(ops, sums, _gram_summary, first=_gram_summary)
    return _next_subspace(ops, yt, sums, summary, panels.dtype, scale)


def _next_subspace(ops, yt: list, sums: list, summary, dtype, scale: float):
    """The end of a pass, for either layout: from the Y_iᵀ blocks, the column blocks' sums
    (``_block_sums``) and their summary to what ``_subspace_pass`` returns; ``_OverflowedPassError``
    when P·Pᵀ overflowed unscaled."""
    yt, sums, summary = ops.persist(yt, sums, summary)
    gram, ppt = ops.fetch(summary)
    if not np.all(np.isfinite(gram)) or not np.all(np.isfinite(ppt)):
        if scale == 1 and np.all(np.isfinite(gram)):
            raise _OverflowedPassError(_scale_for(gram))
        raise ValueError(
            f"X's values are too large for an NNDSVD start (its sketch overflowed {dtype}: "
            f"largest squared singular value estimate {np.max(np.diag(gram)):.3g}); scale X "
            "down, fit it as float64 if it is float32, or use init='random'."
        )
    t = _orthonormalizer(gram)
    values, u_small = np.linalg.eigh(t.T @ ppt @ t)
    if scale != 1:
        values = values / scale / scale  # s² would underflow
    values, u_small = values[::-1], u_small[:, ::-1]  # descending
    sigma = np.sqrt(np.maximum(values, 0))
    keep = sigma > sigma.max(initial=0) * np.sqrt(RANK_CUTOFF)
    sigma, u_small = sigma[keep], u_small[:, keep]
    next_z = ops.map(_next_z, [(b,) for b in sums], (t @ u_small) / sigma, dtype)
    return yt, next_z, sigma, t @ u_small


def _band_sketch(z_block, totals, xs: tuple) -> tuple:
    """For each row of a band, Y_iᵀ so far (``totals``; None at the first column block) plus
    (X_ij·Z_j)ᵀ."""
    pin_worker_blas()
    totals = (None,) * len(xs) if totals is None else totals
    out = []
    for x, total in zip(xs, totals, strict=True):
        yt = kernels.dot_h(panel_data(x), kernels.aligned(z_block))
        out.append(yt if total is None else yt + total)
    return tuple(out)


def _band_project(with_gram: bool, yts: tuple, total, xs: tuple) -> tuple:
    """Column j's (G, P_j) so far plus the band's, down its rows: P_ij = Y_iᵀ·X_ij and, for
    the first column block only (``with_gram``; G is taken from it), G_i = Y_iᵀ·Y_i."""
    pin_worker_blas()
    for yt, x in zip(yts, xs, strict=True):
        yt = kernels.aligned(yt)
        gram = None
        if with_gram:
            yt64 = yt.astype(np.float64)
            gram = yt64 @ yt64.T
        part = (gram, kernels.dot_w(panel_data(x), yt))
        if total is not None:
            part = (None if gram is None else total[0] + gram, total[1] + part[1])
        total = part
    return total


def _subspace_pass_blocks(g, z: list, col_bounds: list[int], scale: float):
    """``_subspace_pass`` over the blocks of a ``grid.Grid``, in the tasks of an iteration of
    ``dasknmf.blocks``: along each row of blocks (one task per band and column block) the
    chain of Y_iᵀ = Σ_j (X_ij·Z_j)ᵀ, then along each column the chain of Σ_i Y_iᵀ·X_ij (and,
    in the first column, of G = Σ_i Y_iᵀ·Y_i), each sum in the order of the blocks."""
    yt = [None] * len(g.shard_ranges)
    for j, z_j in enumerate(z):
        items = zip(yt, g.column(j), strict=True)
        yt = g.shard_map(_band_sketch, [(t, xs) for t, xs in items], z_j)
    sums = []
    for j in range(len(z)):
        total = None
        for s, (state, xs) in enumerate(zip(yt, g.column(j), strict=True)):
            total = g.on_row(g.band_bounds[s], _band_project, j == 0, state, total, xs)
        sums.append(g.on_row(g.band_bounds[-2], _with_ppt, scale, total))
    summary = tree_reduce(g.ops, sums, _gram_summary, first=_gram_summary)
    return _next_subspace(g.ops, g.unbundle(yt), sums, summary, g.dtype, scale)


def _leading_rows(coef, n: int, dtype, block: np.ndarray) -> np.ndarray:
    """The first ``n`` rows of coefᵀ·block (of block itself if coef is None), zero-padded when
    the rank is below ``n``."""
    rows = block if coef is None else coef.T @ block.astype(np.float64)
    out = np.zeros((n, block.shape[1]), dtype=dtype)
    out[: min(n, rows.shape[0])] = rows[:n]
    return out
