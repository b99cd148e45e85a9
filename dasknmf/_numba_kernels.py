"""The numba kernels behind ``dasknmf._compiled``, in their own module so that importing
dasknmf (on the client or on a worker) does not import numba and LLVM (~60 MiB per process)
unless a compiled kernel is actually called."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import math
import os
import pathlib
import sys
import tempfile
import threading

import numba
import numpy as np

# fastmath lets the k-long reductions vectorize (X is finite, validated before any fit);
# accumulating in the factors' dtype, as scikit-learn does, halves the time again. The small
# helpers are inlined into the kernels (numba IR), so they compile with the kernels' flags.


@numba.njit(inline="always", fastmath=True)
def _floored_dot(w_r, h_c, eps):  # pragma: no cover
    """max(w_r·h_c, ε): W·H at one stored entry, with scikit-learn's floor."""
    wh = w_r[0] * h_c[0]
    for t in range(1, w_r.size):
        wh += w_r[t] * h_c[t]
    return eps if wh < eps else wh


@numba.njit(inline="always", fastmath=True)
def _add_scaled(out, q, v):  # pragma: no cover
    """out += q·v over the k components."""
    for t in range(v.size):
        out[t] += q * v[t]


@numba.njit(inline="always", fastmath=True)
def _scatter_row(start, stop, indices, data, w_r, ht, eps, out):  # pragma: no cover
    """out[c] += x_p / max(w_r·h_c, ε) · w_r over the stored entries p of one row."""
    for p in range(start, stop):
        c = indices[p]
        _add_scaled(out[c], data[p] / _floored_dot(w_r, ht[c], eps), w_r)


@numba.njit(nogil=True, cache=True, fastmath=True)
def kl_rows(indptr, indices, data, w, ht, eps, out, with_divergence):  # pragma: no cover
    """out[r] += Σ_p x_p / max(w_r·h_c, ε) · h_c over the stored entries (r, c) of X; with
    ``with_divergence``, also Σ x·log(x / max(wh, ε)) and Σ x over entries x > ε."""
    divergence = 0.0
    total = 0.0
    for r in range(indptr.size - 1):
        w_r, out_r = w[r], out[r]
        for p in range(indptr[r], indptr[r + 1]):
            h_c = ht[indices[p]]
            x = data[p]
            q = x / _floored_dot(w_r, h_c, eps)
            _add_scaled(out_r, q, h_c)
            if with_divergence and x > eps:
                divergence += x * math.log(q)
                total += x
    return divergence, total


@numba.njit(nogil=True, cache=True, fastmath=True)
def kl_columns(indptr, indices, data, w, ht, eps, out):  # pragma: no cover
    """out[c] += Σ_p x_p / max(w_r·h_c, ε) · w_r over the stored entries (r, c) of X."""
    for r in range(indptr.size - 1):
        _scatter_row(indptr[r], indptr[r + 1], indices, data, w[r], ht, eps, out)


@numba.njit(nogil=True, cache=True, fastmath=True)
def kl_update_rows(indptr, indices, data, w, ht, den, l2, eps, out):  # pragma: no cover
    """The multiplicative Kullback–Leibler update of W, row by row, fused with the numerator
    of the H update: for each row r, num = Σ_p x_p / max(w_r·h_c, ε) · h_c (with the old w_r),
    then w_r ← w_r ∘ num / d for d = den + l2·w_r (ε where d = 0, as in ``mu.step``), then
    out[c] += x_p / max(w_r·h_c, ε) · w_r with the new w_r — while the row's h_c are still
    in cache. Also returns Σ x·log(x / max(wh, ε)) and Σ x over x > ε at the old W."""
    k = w.shape[1]
    num = np.empty(k, dtype=w.dtype)
    # The ratios x / wh of a row, for the logarithms: taken in a loop of their own after the
    # row's gathers, they cost 10% less time (measured on the sparse benchmark).
    longest = np.max(indptr[1:] - indptr[:-1]) if indptr.size > 1 else 0
    ratios = np.empty(longest, dtype=w.dtype)
    divergence = 0.0
    total = 0.0
    for r in range(indptr.size - 1):
        w_r = w[r]
        num[:] = 0
        start, stop = indptr[r], indptr[r + 1]
        for p in range(start, stop):
            h_c = ht[indices[p]]
            q = data[p] / _floored_dot(w_r, h_c, eps)
            ratios[p - start] = q
            _add_scaled(num, q, h_c)
        for p in range(start, stop):
            x = data[p]
            if x > eps:
                divergence += x * math.log(ratios[p - start])
                total += x
        for t in range(k):
            d = den[t] + l2 * w_r[t]
            if d == 0:
                d = eps
            w_r[t] *= num[t] / d
        _scatter_row(start, stop, indices, data, w_r, ht, eps, out)
    return divergence, total


#: Rows of a problem that ``hals_stacked`` sweeps at a time, copied into a contiguous scratch
#: (k × 1024 values: in L2). Measured on 20 problems of k = 20 and 25,000 rows, 10 sweeps
#: (Intel Xeon): float32 0.27 → 0.18–0.19 s, float64 0.61 → 0.29–0.32 s against whole rows;
#: 128 rows 0.31 / 0.40 s, 256–2,048 within the noise of 1,024.
HALS_ROW_BLOCK = 1024


@numba.njit(nogil=True, cache=True)
def hals_stacked(
    F, coupling, scaled_cross, diag, order, n_sweeps, block, violations
):  # pragma: no cover
    """HALS sweeps on independent problems (``solvers.hals``'s stacked replicates), one
    problem after the other, and each in blocks of ``block`` rows, all its sweeps on a block
    before the next, in a contiguous copy that stays in cache: F (R, k, rows) in place,
    ``coupling`` (R, k, k) the Gram matrices over their diagonals ``diag`` (R, k) with a zero
    diagonal, ``scaled_cross`` (R, k, rows) the cross products over the diagonals. Adds each
    problem's projected-gradient violation of the first sweep to ``violations`` (R,). The
    arithmetic is numpy's (``hals.update``) without its temporaries. The rows are independent
    problems, and each component's violation is summed over the rows in order across the
    blocks: the bits are those of whole rows at once (``block`` ≥ rows)."""
    n_problems, k, rows = F.shape
    block = max(1, min(block, rows))
    own = np.empty(k * block, F.dtype)  # the block's rows of F
    cross = np.empty(k * block, F.dtype)  # and of scaled_cross
    tmp = np.empty(block, F.dtype)
    per_component = np.zeros(k)
    for r in range(n_problems):
        per_component[:] = 0.0
        for start in range(0, rows, block):
            n = min(block, rows - start)
            f_block = own[: k * n].reshape((k, n))
            c_block = cross[: k * n].reshape((k, n))
            for j in range(k):
                f_block[j] = F[r, j, start : start + n]
                c_block[j] = scaled_cross[r, j, start : start + n]
            unclipped = tmp[:n]
            for sweep in range(n_sweeps):
                for t in order:
                    _coupled(f_block, coupling[r, t], c_block[t], unclipped)
                    d = diag[r, t]
                    f = f_block[t]
                    if sweep == 0:
                        per_component[t] = _violation(per_component[t], f, unclipped, d)
                    if d != 0:
                        for i in range(n):
                            f[i] = unclipped[i] if unclipped[i] > 0 else 0
            for j in range(k):
                F[r, j, start : start + n] = f_block[j]
        for t in order:
            violations[r] += per_component[t]


@numba.njit(inline="always")
def _coupled(F, coupling, scaled_cross, out):  # pragma: no cover
    """out = scaled_cross − coupling · F, one row of F at a time (contiguous, vectorized)."""
    out[:] = scaled_cross
    for j in range(F.shape[0]):
        c = coupling[j]
        if c != 0:
            f = F[j]
            for i in range(out.size):
                out[i] -= c * f[i]


@numba.njit(inline="always")
def _violation(total, f, unclipped, d):  # pragma: no cover
    """``total`` + Σ|projected gradient| of one component's rows (``hals._violation``; the
    gradient of a flat component, d = 0, is −unclipped), added one row after the other."""
    for i in range(f.size):
        grad = d * (f[i] - unclipped[i]) if d != 0 else -unclipped[i]
        if f[i] == 0 and grad > 0:
            grad = 0
        total += abs(grad)
    return total


# ---- the kernels above with a row's components in registers, for small k -------------------

#: The widest k that gets kernels of its own (below). Measured on halves of the sparse
#: benchmark's matrix (AMD EPYC, AVX-512), ``kl_update_rows`` against the generic one: 0.4–0.8×
#: the time for k = 2…20, 0.91× at 24; at 28–40 0.87–1.24× (no gain beyond the noise), and
#: 2.3× *slower* at 50, where the registers spill.
SPECIALIZED_MAX_K = 24

# The kernels above, with the k-long loops written out over named scalars ({...} fields).
_TEMPLATE = """\
# Generated by dasknmf._numba_kernels for k = {k}; rewritten when the template changes.
import math

import numba
import numpy as np


@numba.njit(nogil=True, cache={cache}, fastmath=True)
def kl_rows(indptr, indices, data, w, ht, eps, out, with_divergence):
    zero = w.dtype.type(0)
    divergence = 0.0
    total = 0.0
    for r in range(indptr.size - 1):
        {begin_row}
        for p in range(indptr[r], indptr[r + 1]):
            {floored_wh}
            x = data[p]
            q = x / wh
            {add_num}
            if with_divergence and x > eps:
                divergence += x * math.log(q)
                total += x
        o = out[r]
        {add_num_to_o}
    return divergence, total


@numba.njit(nogil=True, cache={cache}, fastmath=True)
def kl_columns(indptr, indices, data, w, ht, eps, out):
    for r in range(indptr.size - 1):
        {load_w}
        start, stop = indptr[r], indptr[r + 1]
        {scatter_row}


@numba.njit(nogil=True, cache={cache}, fastmath=True)
def kl_update_rows(indptr, indices, data, w, ht, den, l2, eps, out):
    longest = np.max(indptr[1:] - indptr[:-1]) if indptr.size > 1 else 0
    ratios = np.empty(longest, dtype=w.dtype)
    zero = w.dtype.type(0)
    divergence = 0.0
    total = 0.0
    for r in range(indptr.size - 1):
        {begin_row}
        start, stop = indptr[r], indptr[r + 1]
        for p in range(start, stop):
            {floored_wh}
            q = data[p] / wh
            ratios[p - start] = q
            {add_num}
        for p in range(start, stop):
            x = data[p]
            if x > eps:
                divergence += x * math.log(ratios[p - start])
                total += x
        {update_w}
        {store_w}
        {scatter_row}
    return divergence, total
"""

# out[c] += x_p / max(w_r·h_c, ε) · w_r over the stored entries p of row r (``_scatter_row``).
_SCATTER_ROW = """\
for p in range(start, stop):
            {floored_wh}
            o = out[indices[p]]
            {scatter}"""


def _render(k: int, cache: bool) -> str:
    """The kernels for one k, with w_r, a row's numerator and h_c as k named scalars: numba
    keeps them in registers and LLVM's SLP vectorizer packs them into vectors (the generic
    loops keep w_r and the numerator in memory, that may alias ``ht``/``out`` as far as LLVM
    knows, and are too short for its loop vectorizer)."""

    def each(fmt: str, sep: str = "; ") -> str:
        return sep.join(fmt.format(t=t) for t in range(k))

    # max(w_r·h_c, ε) at the stored entry p (``_floored_dot``), in one line.
    floored_wh = "; ".join(
        [
            "h = ht[indices[p]]",
            each("h{t} = h[{t}]"),
            "wh = " + each("w{t} * h{t}", " + "),
            "wh = eps if wh < eps else wh",
        ]
    )
    scatter = each("o[{t}] += q * w{t}")
    load_w = "w_r = w[r]; " + each("w{t} = w_r[{t}]")
    return _TEMPLATE.format(
        k=k,
        cache=cache,
        load_w=load_w,
        begin_row=f"{load_w}; " + each("n{t} = zero"),  # w_r and a numerator of zeros
        floored_wh=floored_wh,
        scatter_row=_SCATTER_ROW.format(
            floored_wh=floored_wh, scatter="q = data[p] / wh; " + scatter
        ),
        add_num=each("n{t} += q * h{t}"),
        add_num_to_o=each("o[{t}] += n{t}"),
        update_w=each("d{t} = den[{t}] + l2 * w{t}; w{t} *= n{t} / (eps if d{t} == 0 else d{t})"),
        store_w=each("w_r[{t}] = w{t}"),
    )


def _source_directory() -> pathlib.Path | None:
    """Where the generated kernels' sources are kept, so that numba's cache (next to them, or
    under NUMBA_CACHE_DIR) serves later processes: a directory of this user's own under the
    user's cache directory; None where there is none to be had."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = pathlib.Path(base, "dasknmf", "kernels")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Code is imported from there: only from a directory of this user's own (POSIX).
        mine = not hasattr(os, "getuid") or directory.stat().st_uid == os.getuid()
        if not mine or not os.access(directory, os.W_OK):
            return None
    except OSError:
        return None
    return directory


def _load(k: int):
    """The module of kernels for k: from a file in ``_source_directory()`` (written once, then
    reused as it is, so that its numba cache stays valid), else compiled from memory, uncached."""
    source = _render(k, cache=True)
    name = f"_dasknmf_kl_k{k}_{hashlib.sha256(source.encode()).hexdigest()[:12]}"
    directory = _source_directory()
    if directory is not None:
        path = directory / f"{name}.py"
        try:
            if not path.exists() or path.read_text() != source:
                with tempfile.NamedTemporaryFile(
                    "w", dir=directory, suffix=".tmp", delete=False
                ) as handle:
                    handle.write(source)
                os.replace(handle.name, path)
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            # Registered, as an import would: numba's cache finds the kernels' globals by
            # importing their module by name.
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return vars(module)
        except OSError:
            pass
    namespace: dict = {}
    exec(compile(_render(k, cache=False), name, "exec"), namespace)
    return namespace


_specialized = functools.cache(_load)
_compiling = threading.Lock()


@contextlib.contextmanager
def _slp_vectorized():
    """numba leaves LLVM's SLP vectorizer off (NUMBA_SLP_VECTORIZE=0) unless told; the
    specialized kernels need it. Switched on around their compilation only."""
    before = numba.config.SLP_VECTORIZE
    numba.config.SLP_VECTORIZE = 1
    try:
        yield
    finally:
        numba.config.SLP_VECTORIZE = before


def kernel(name: str, args: tuple):
    """The kernel ``name`` (``kl_rows``, ``kl_columns`` or ``kl_update_rows``) for these
    arguments: the one generated for their k (the width of ``w``, the fourth argument of all
    three; compiled for their types, or loaded from numba's cache) where k <=
    SPECIALIZED_MAX_K, else the generic one."""
    k = args[3].shape[1]
    if k > SPECIALIZED_MAX_K:
        return globals()[name]
    signature = tuple(numba.typeof(a) for a in args)
    with _compiling:  # the panels' threads: one writes the source, one compiles
        specialized = _specialized(k)[name]
        if signature not in specialized.overloads:
            with _slp_vectorized():
                specialized.compile(signature)
    return specialized


def run(name: str, *args):
    """The kernel ``name`` (see ``kernel``) called with ``args``."""
    return kernel(name, args)(*args)
