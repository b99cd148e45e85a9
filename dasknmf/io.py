"""Matrices in Zarr: open one as a Dask array of row panels, write one chunk by chunk.

Outputs are written to a temporary sibling and renamed into place when complete, so a failed
write never leaves something that looks finished.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import pathlib
from collections.abc import Iterator

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
import zarr
from dask.array.core import getter

from dasknmf import csr, storage
from dasknmf._config import get_bytes
from dasknmf.storage import CorruptStoreError, MatrixPathError, StorageError

__all__ = [
    "CorruptStoreError",
    "MatrixPathError",
    "StorageError",
    "describe_matrix",
    "load_model",
    "open_matrix",
    "save_matrix",
    "save_model",
]

#: Chunks written by ``save_matrix`` aim at this size (every iteration re-reads them).
DEFAULT_CHUNK_BYTES = 16 * 2**20
#: Fewer whole rows than this per chunk, and ``save_matrix`` writes 2-D tiles instead.
MIN_CHUNK_ROWS = 64


#: File types ``dasknmf.convert`` turns into Zarr stores.
CONVERTIBLE = (".npy", ".npz", ".mtx", ".h5ad")


class CheckedReader:
    """Dask's ``getter`` for a stored array, run where the panel is read (a worker).

    Before its first read in a process it checks that the store there is the one the driver
    opened (``storage.verify``: a worker that does not see the store would read every chunk as
    the fill value); it refuses to read over a chunk missing from a store written by dasknmf;
    and it names the store and the rows when a chunk cannot be decoded (a truncated or
    corrupted chunk file makes the codec fail with a message such as "error during blosc
    decompression: -1", which says neither)."""

    def __init__(self, where: str, digest: str | None = None):
        self.where = where
        self.digest = digest

    def __call__(self, a, b, asarray=True, lock=None):
        if self.digest is not None:
            storage.verify(a, self.digest, self.where)
        region = b if isinstance(b, tuple) else (b,)
        rows = region[0]
        missing = storage.missing_chunks(a, region) if isinstance(a, zarr.Array) else []
        if missing:
            raise CorruptStoreError(
                f"{self.where}: cannot read rows {rows.start}:{rows.stop}: the stored chunk "
                f"{missing[0]} is missing ({len(missing)} missing under these rows)."
            )
        try:
            return getter(a, b, asarray=asarray, lock=lock)
        except Exception as error:
            raise CorruptStoreError(
                f"{self.where}: cannot read rows {rows.start}:{rows.stop}: a stored chunk is "
                f"corrupt or truncated ({type(error).__name__}: {error})."
            ) from error

    def __dask_tokenize__(self):
        return ("dasknmf.io.CheckedReader", self.where, self.digest)


def check_matrix_dtype(dtype, whom: str) -> None:
    """Reject non-numeric and complex dtypes with scikit-learn's wording."""
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise ValueError(f"Complex data not supported: {whom} has dtype {dtype}.")
    if dtype.kind not in "biuf":
        raise ValueError(f"dtype='{dtype}' is not numeric: {whom} must hold numbers.")


def check_matrix_shape(shape: tuple, whom: str) -> None:
    """Require a non-empty 2-D shape (scikit-learn's wording)."""
    if len(shape) != 2:
        raise ValueError(
            f"Expected 2D array, got {len(shape)}D array instead: {whom} has shape {shape}."
        )
    for axis, what in ((0, "sample"), (1, "feature")):
        if shape[axis] < 1:
            raise ValueError(
                f"Found array with 0 {what}(s) (shape={tuple(shape)}) while a minimum of 1 is "
                f"required: {whom} is empty."
            )


def _panel_rows(
    n_rows: int, row_bytes: int, chunk_rows: int, budget: int, most: int | None = None
) -> int:
    """Rows per Dask chunk: a whole number of stored chunks, about ``budget`` bytes, and no
    more than ``most`` rows unless one stored chunk is taller."""
    per_chunk = max(1, budget // max(1, row_bytes * chunk_rows))
    if most is not None:
        per_chunk = max(1, min(per_chunk, most // chunk_rows))
    return min(n_rows, per_chunk * chunk_rows)


def open_matrix(
    source,
    component: str | None = None,
    *,
    panel_bytes: int | str | None = None,
    panel_rows: int | None = None,
    storage_options: dict | None = None,
) -> da.Array:
    """Open a matrix stored in Zarr as a Dask array of full-width row panels.

    Parameters
    ----------
    source : str, os.PathLike, zarr.Array or zarr.Group
        A Zarr v3 (or v2) store holding a 2-D numeric array, a group in the anndata CSR
        encoding (read as CSR row panels, ``scipy.sparse.csr_matrix`` chunks), or a group
        holding one of these (an AnnData store's ``X``: ``component="X"``). A local path
        (made absolute here, so that every worker reads the same store) or an fsspec URL
        (``s3://bucket/X.zarr``, ``gs://...``, ``abfs://...``).
    component : str, optional
        The array's name inside a group (e.g. ``"X"``).
    panel_bytes : int or str, optional
        Target bytes of a row panel (``"64MiB"`` or bytes); default ``dasknmf.panel-bytes``.
        Panels are a whole number of stored chunks (or shards), so no two tasks read the
        same chunk. The panels of a CSR group are this many bytes of stored entries.
    panel_rows : int, optional
        At most this many rows per panel (a dense store's stored chunk taller than that is a
        panel of its own); for a CSR group, whose rows are read at any bound, exactly this
        many but for the last. ``MiniBatchNMF`` opens a store in panels of ``batch_size``.
    storage_options : dict, optional
        fsspec options for a URL (``endpoint_url``, ``key``, ``secret``, ``anon``, ...).

    Returns
    -------
    dask.array.Array of shape (n_samples, n_features)
        Chunks span a whole number of stored rows (about ``panel_bytes`` of full-width rows)
        and keep the stored column chunking. A task reading a panel first checks that its
        worker sees the store this process opened (else ``StoreNotSharedError``).
    """
    if panel_rows is not None and (
        isinstance(panel_rows, bool)
        or not isinstance(panel_rows, numbers.Integral)
        or panel_rows < 1
    ):
        raise ValueError(f"panel_rows must be an integer >= 1 or None, got {panel_rows!r}.")
    node, where = _open_node(source, storage_options)
    return _node_as_dask(node, where, component, panel_bytes, panel_rows)


def _node_as_dask(
    node, where: str, component: str | None, panel_bytes: int | None, panel_rows=None
) -> da.Array:
    """``open_matrix`` of an open Zarr node that ``where`` names."""
    if component is not None:
        if not isinstance(node, zarr.Group):
            raise ValueError(
                f"{where} is a Zarr array, not a group: it has no component {component!r}."
            )
        if component not in node:
            raise ValueError(
                f"{where} has no component {component!r}; it holds {sorted(node.keys())}."
            )
        node = node[component]
        where = f"{where}/{component}"
    if isinstance(panel_bytes, str):
        try:
            panel_bytes = int(dask.utils.parse_bytes(panel_bytes))
        except ValueError:
            raise ValueError(
                f"panel_bytes must be a size such as '64MiB' or a number of bytes, got "
                f"{panel_bytes!r}."
            ) from None
    budget = panel_bytes or get_bytes("dasknmf.panel-bytes")
    if csr.is_sparse_group(node):
        return csr.open_group(node, where, budget, storage.fingerprint(node), panel_rows)
    if isinstance(node, zarr.Group):
        raise ValueError(
            f"{where} is a Zarr group, not a matrix; pass component= to name the array "
            f"inside it (it holds {sorted(node.keys())})."
        )
    check_matrix_shape(node.shape, where)
    check_matrix_dtype(node.dtype, where)
    stored = storage.stored_chunks(node)
    n_rows, n_cols = node.shape
    rows = _panel_rows(n_rows, n_cols * node.dtype.itemsize, stored[0], budget, panel_rows)
    chunks = (rows, stored[1])
    reader = CheckedReader(where, storage.fingerprint(node))
    name = "from-zarr-" + dask.base.tokenize(node, chunks, reader)
    return da.from_array(node, chunks=chunks, name=name, getitem=reader)


def describe_matrix(
    source, component: str | None = None, *, count: bool = True, storage_options=None
) -> dict:
    """What ``dasknmf info`` shows of a stored matrix: shape, dtype, dense or CSR, the stored
    chunks, the row panels dasknmf reads, and the non-zeros (for CSR the stored entries, from
    ``indptr``; for a dense store counted in one read of it, on the current scheduler, unless
    ``count`` is False)."""
    X = open_matrix(source, component, storage_options=storage_options)
    node, where = _open_node(source, storage_options)
    if component is not None:
        node = node[component]
    info = {
        "path": where,
        "shape": list(X.shape),
        "dtype": str(X.dtype),
        "format": "csr" if sp.issparse(X._meta) else "dense",
        "panels": len(X.chunks[0]),
        "panel_rows": max(X.chunks[0]),
    }
    if info["format"] == "csr":
        info["nnz"] = int(node["indptr"][-1])
        info["density"] = info["nnz"] / max(1, X.shape[0] * X.shape[1])
    else:
        if count:
            info["nnz"] = int(da.count_nonzero(X).compute())
        info["chunks"] = list(node.chunks)
        if node.shards is not None:
            info["shards"] = list(node.shards)
    return info


def _open_node(source, storage_options=None) -> tuple[zarr.Array | zarr.Group, str]:
    """The Zarr node at ``source`` (a path, URL, ``Location``, or a node already) and the name
    to call it by in messages."""
    if isinstance(source, zarr.Array | zarr.Group):
        return source, repr(source)
    if not isinstance(source, str | os.PathLike | storage.Location):
        raise TypeError(f"Expected a path or a zarr.Array/zarr.Group, got {type(source).__name__}.")
    where = storage.location(source, storage_options)
    if not where.exists():
        raise MatrixPathError(f"No such matrix: {where} does not exist.")
    try:
        with storage.remote_errors(where):
            return zarr.open(store=where.store(read_only=True), mode="r"), str(where)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError) as error:
        hint = ""
        if pathlib.PurePosixPath(where.name).suffix.lower() in CONVERTIBLE:
            hint = f"; convert it first: dasknmf convert {where} DST.zarr"
        raise MatrixPathError(f"{where} is not a Zarr store{hint} ({error})") from error


def default_chunks(
    shape: tuple[int, int], itemsize: int, target: int = DEFAULT_CHUNK_BYTES
) -> tuple[int, int]:
    """Chunks of about ``target`` bytes: bands of whole rows when at least
    ``MIN_CHUNK_ROWS`` rows fit, else square-ish tiles, which serve row panels and the column
    panels of a wide matrix (factorized as Xᵀ) alike."""
    n_rows, n_cols = shape
    rows = target // (n_cols * itemsize)
    if rows >= min(n_rows, MIN_CHUNK_ROWS):
        return min(n_rows, rows), n_cols
    side = max(1, math.isqrt(target // itemsize))
    return min(n_rows, side), min(n_cols, side)


def check_output(path, overwrite: bool, how: str = "overwrite=True", storage_options=None) -> None:
    """Refuse to write ``path`` (a local path or a URL) when something is there (unless
    ``overwrite``; ``how`` says how to ask for that) or when its folder (bucket) does not
    exist."""
    storage.check_output(storage.location(path, storage_options), overwrite, how)


@contextlib.contextmanager
def atomic_path(path, overwrite: bool = False, storage_options=None) -> Iterator[storage.Location]:
    """Yield a temporary sibling of ``path`` (a ``storage.Location``) to write into; move it
    to ``path`` on success, remove it on failure (``storage.atomic``)."""
    with storage.atomic(storage.location(path, storage_options), overwrite) as tmp:
        yield tmp


def _written(target: storage.Location):
    return target.path if not target.remote else target.url


def save_matrix(
    path,
    X,
    *,
    chunks: tuple[int, int] | None = None,
    overwrite: bool = False,
    storage_options: dict | None = None,
):
    """Write a matrix to Zarr, chunk by chunk: dense (numpy or Dask) as a 2-D array, sparse
    (scipy.sparse, or Dask with sparse chunks) as a group in the anndata CSR encoding.

    A dense Dask array is written by its own tasks on the current scheduler (never gathered
    here); a sparse one block after block, one block in this process at a time. The store is
    written to a temporary sibling and moved to ``path`` when complete. Every chunk is stored
    (also one of zeros) and their number recorded (attribute ``dasknmf.chunks``), so that a
    chunk missing later is an error when it is read, not zeros.

    Parameters
    ----------
    path : str or os.PathLike
        Where the store goes, a local path or an fsspec URL; must not exist unless
        ``overwrite``.
    X : ndarray, scipy.sparse matrix or dask.array.Array of shape (n_samples, n_features)
    chunks : (int, int), optional
        Stored chunk shape of a dense matrix; default about 16 MiB of whole rows (2-D tiles
        for very wide rows). Sparse data is stored in shards of 4 Mi entries (a file each)
        made of chunks of 256 Ki entries, so that a read of a few rows decodes little.
    overwrite : bool
        Replace an existing store at ``path``.
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    pathlib.Path of the written store (its URL, a str, for an object store).
    """
    if not isinstance(X, da.Array) and not sp.issparse(X):
        X = np.asarray(X)
    check_matrix_shape(X.shape, "X")
    check_matrix_dtype(X.dtype, "X")
    target = storage.location(path, storage_options)
    if _is_sparse(X):
        with storage.atomic(target, overwrite) as tmp:
            size = None if isinstance(X, da.Array) else (X.shape[0], X.nnz)
            writer = csr.Writer(tmp, X.shape[1], X.dtype, shape=size)
            for block in csr.row_blocks(X, _sparse_block_rows(X)):
                writer.append(block)
            writer.close()
        return _written(target)
    chunks = tuple(chunks) if chunks is not None else default_chunks(X.shape, X.dtype.itemsize)
    with storage.atomic(target, overwrite) as tmp:
        _write_array(tmp.store(), X, chunks)
    return _written(target)


def _is_sparse(X) -> bool:
    return sp.issparse(X) or (isinstance(X, da.Array) and sp.issparse(X._meta))


def _sparse_block_rows(X) -> int:
    """Rows per block when writing in-memory sparse data: about 16 MiB of entries."""
    if isinstance(X, da.Array):
        return 0  # Dask blocks are written as they are
    entry_bytes = X.dtype.itemsize + 8
    per_row = max(1.0, X.nnz * entry_bytes / max(X.shape[0], 1))
    return max(1, int(DEFAULT_CHUNK_BYTES // per_row))


def _write_array(where, X, chunks: tuple[int, int]) -> zarr.Array:
    """Create a Zarr array at ``where`` (a store, or a path inside a group) and write numpy or
    Dask ``X`` into it, chunk by chunk, every chunk stored. A Dask array is written by its own
    tasks, one stored chunk each: no two tasks write the same chunk, and a task holds no more
    than a chunk. On a distributed cluster the workers write: a local folder is first probed
    for being shared with them (``storage.probe_shared``)."""
    target = zarr.create_array(
        where,
        shape=X.shape,
        chunks=chunks,
        dtype=X.dtype,
        compressors=storage.compressors(),
        config=storage.complete_chunks_config(),
        attributes={storage.CHUNKS_ATTRIBUTE: storage.chunk_count(X.shape, chunks)},
    )
    if isinstance(X, da.Array):
        storage.probe_workers(target)
        da.store(X.rechunk(chunks), target, lock=False)
    else:
        target[...] = X
    return target


# ---- fitted models ---------------------------------------------------------------------------

#: Version of the layout of a saved model (a Zarr group with arrays W and H and attributes).
MODEL_FORMAT = 1


def save_model(
    path,
    H: np.ndarray,
    W,
    attributes: dict,
    *,
    overwrite: bool = False,
    storage_options=None,
    ids: tuple | None = None,
    arrays: dict | None = None,
):
    """Write a fitted model to a Zarr group: arrays ``H`` (k × n) and ``W`` (m × k, if given:
    numpy, or Dask, written chunk by chunk by the cluster), the in-memory ``arrays`` given by
    name (a mini-batch model's running sums) and ``attributes`` (JSON: the
    estimator's parameters and results), to which the layout's format, the package version,
    the shapes and the dtype are added; ``ids``, the original (row ids, column ids) of the
    fitted X, as in a store written from records (``csr.write_ids``). The group is written to
    a temporary sibling and moved to ``path`` (a local path or a URL) when complete."""
    from dasknmf._version import __version__

    k, n_features = H.shape
    attributes = {
        "dasknmf": {"format": MODEL_FORMAT, "version": __version__},
        **attributes,
        "n_components": int(k),
        "n_features": int(n_features),
        "dtype": str(H.dtype),
    }
    if W is not None:
        attributes["n_samples"] = int(W.shape[0])
    target = storage.location(path, storage_options)
    with storage.atomic(target, overwrite) as tmp:
        group = zarr.open_group(store=tmp.store(), mode="w")
        _write_array(group.store_path / "H", H, default_chunks(H.shape, H.dtype.itemsize))
        if W is not None:
            _write_array(group.store_path / "W", W, default_chunks(W.shape, W.dtype.itemsize))
        for name, array in (arrays or {}).items():
            array = np.asarray(array)
            _write_array(
                group.store_path / name, array, default_chunks(array.shape, array.itemsize)
            )
        group.attrs.update(attributes)
        if ids is not None:
            csr.write_ids(tmp, *ids, ("rows", "columns", "values"))
    return _written(target)


def matrix_ids(source, storage_options=None) -> tuple[np.ndarray, np.ndarray] | None:
    """The original (row ids, column ids) kept with a store written from records, or with a
    saved model fitted on one; None for anything else (arrays, stores without ids)."""
    if not isinstance(source, str | os.PathLike | zarr.Group):
        return None
    try:
        node, _ = _open_node(source, storage_options)
    except (MatrixPathError, TypeError):
        return None
    return csr.read_ids(node) if isinstance(node, zarr.Group) else None


def load_model_array(path, name: str, shape: tuple, *, storage_options=None) -> np.ndarray:
    """Array ``name`` of a saved model, read, checked to have ``shape``."""
    node, where = _open_node(path, storage_options)
    if not isinstance(node, zarr.Group) or name not in node:
        raise ValueError(f"{where} has no array {name!r}.")
    array = _node_as_dask(node, where, name, None).compute(scheduler="sync")
    if array.shape != tuple(shape):
        raise ValueError(f"{where}: {name} has shape {array.shape}, expected {tuple(shape)}.")
    return array


def load_model(path, *, storage_options=None) -> tuple[dict, np.ndarray, da.Array | None]:
    """``(attributes, H, W)`` of a group written by ``save_model`` (a local path or a URL):
    H read, W (if saved) a lazy Dask array reading the stored W. Raises ``ValueError`` for a
    group that is not a model, of another format, or whose arrays do not match."""
    node, where = _open_node(path, storage_options)
    attributes = dict(node.attrs) if isinstance(node, zarr.Group) else {}
    if "dasknmf" not in attributes or "H" not in node:
        raise ValueError(f"{where} is not a dasknmf model (no 'dasknmf' attribute and array H).")
    found = attributes["dasknmf"].get("format")
    if found != MODEL_FORMAT:
        raise ValueError(
            f"{where} holds a model in format {found}; this dasknmf reads format {MODEL_FORMAT}."
        )
    H = _node_as_dask(node, where, "H", None).compute(scheduler="sync")
    if H.shape != (attributes["n_components"], attributes["n_features"]):
        raise ValueError(
            f"{where}: H has shape {H.shape}, the attributes say "
            f"{(attributes['n_components'], attributes['n_features'])}."
        )
    W = None
    if "W" in node:
        shape = node["W"].shape
        if shape != (attributes.get("n_samples"), attributes["n_components"]):
            raise ValueError(
                f"{where}: W has shape {shape}, the attributes say "
                f"{(attributes.get('n_samples'), attributes['n_components'])}."
            )
        W = _node_as_dask(node, where, "W", None)
    return attributes, H, W
