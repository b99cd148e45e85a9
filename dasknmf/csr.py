"""Sparse matrices in Zarr, in the anndata CSR encoding, without anndata.

A Zarr group with attributes ``encoding-type: csr_matrix``, ``encoding-version: 0.1.0`` and
``shape: [m, n]``, holding the arrays ``data``, ``indices`` and ``indptr`` of a CSR matrix —
what ``AnnData.write_zarr`` writes for a sparse ``X``, so a scverse user's store opens directly
and what dasknmf writes opens in anndata.

Reading gives a Dask array of ``scipy.sparse.csr_matrix`` row panels; each panel task reads its
slice of ``indptr`` and the matching runs of ``data`` and ``indices``, and checks them.
Writing appends row blocks one after the other, so a matrix larger than memory is written
block by block.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
import zarr

from dasknmf import storage
from dasknmf.storage import CorruptStoreError

ENCODING = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0"}
#: Entries per stored chunk (a file) of ``data``, ``indices`` and ``indptr`` (16 MiB of
#: float32 data), a Zarr shard of inner chunks of ``INNER_ENTRIES``.
ENTRIES_PER_CHUNK = 1 << 22
#: Entries per inner chunk of a shard: what a read decodes at least. A batch of 1,024 rows of
#: the sparse benchmark (41,000 entries) read in 30 ms from an unsharded 4-Mi-entry chunk, in
#: 6 ms from shards of 256-Ki-entry chunks; a whole 4-Mi-entry shard in 37 ms (148 unsharded:
#: zarr decodes the inner chunks in parallel). 32 and 64 Ki: batches 5 ms, whole 56–87 ms.
INNER_ENTRIES = 1 << 18


def chunk_entries(entries: int | None) -> int:
    """Entries per chunk of an array that will hold ``entries`` (None: unknown): a small array
    is one chunk of its own size, since reading a chunk decodes all of it (a 4-Mi-entry chunk
    of strings holding 30 ids took 0.9 s to read)."""
    return ENTRIES_PER_CHUNK if entries is None else max(1, min(ENTRIES_PER_CHUNK, int(entries)))


def entry_layout(entries: int | None) -> dict:
    """``chunks`` (and ``shards``) of an array of CSR entries that will hold ``entries`` (None:
    unknown): one chunk when it is at most ``INNER_ENTRIES``, else shards of at most
    ``ENTRIES_PER_CHUNK`` entries (a whole number of inner chunks) made of inner chunks, so
    that a read of a few rows decodes an inner chunk or two, not a whole stored chunk."""
    size = chunk_entries(entries)
    if size <= INNER_ENTRIES:
        return {"chunks": (size,)}
    return {"shards": (-(-size // INNER_ENTRIES) * INNER_ENTRIES,), "chunks": (INNER_ENTRIES,)}


def is_csr_group(node) -> bool:
    return isinstance(node, zarr.Group) and node.attrs.get("encoding-type") == "csr_matrix"


def is_sparse_group(node) -> bool:
    return isinstance(node, zarr.Group) and str(node.attrs.get("encoding-type", "")).endswith(
        "_matrix"
    )


def check_group(group: zarr.Group, where: str) -> tuple[tuple[int, int], int]:
    """The shape and nnz of a CSR group, after the checks that need no full read: a clear
    ValueError if the arrays are missing or inconsistent with each other or with ``shape``."""
    if group.attrs.get("encoding-type") != "csr_matrix":
        raise ValueError(
            f"{where} is a {group.attrs.get('encoding-type')} group; dasknmf reads row panels of "
            "CSR (encoding-type csr_matrix). Convert it to CSR first."
        )
    missing = [name for name in ("data", "indices", "indptr") if name not in group]
    if missing or "shape" not in group.attrs:
        raise ValueError(
            f"{where} is not a complete CSR group: it lacks {missing or ['the shape attribute']}."
        )
    shape = tuple(int(s) for s in group.attrs["shape"])
    if len(shape) != 2:
        raise ValueError(f"{where}: the shape attribute {list(shape)} is not 2-D.")
    data, indices, indptr = group["data"], group["indices"], group["indptr"]
    if indptr.shape != (shape[0] + 1,):
        raise ValueError(
            f"{where}: indptr has {indptr.shape[0]} entries, the shape {list(shape)} needs "
            f"{shape[0] + 1}."
        )
    if data.shape != indices.shape:
        raise ValueError(
            f"{where}: data has {data.shape[0]} entries but indices {indices.shape[0]}."
        )
    first, last = int(indptr[0]), int(indptr[shape[0]])
    if first != 0 or last != data.shape[0]:
        raise ValueError(
            f"{where}: indptr must run from 0 to nnz = {data.shape[0]}, it runs from {first} "
            f"to {last}."
        )
    if data.dtype.kind not in "biuf" or indices.dtype.kind not in "iu":
        raise ValueError(
            f"{where}: data must be numeric and indices integers, got {data.dtype} and "
            f"{indices.dtype}."
        )
    return shape, data.shape[0]


def _read(array: zarr.Array, start: int, stop: int, where: str, rows: tuple[int, int]):
    missing = storage.missing_chunks(array, (slice(start, stop),))
    if missing:
        raise CorruptStoreError(
            f"{where}: cannot read {array.basename} of rows {rows[0]}:{rows[1]}: the stored "
            f"chunk {missing[0]} is missing ({len(missing)} missing under these rows)."
        )
    try:
        return np.asarray(array[start:stop])
    except Exception as error:
        raise CorruptStoreError(
            f"{where}: cannot read {array.basename} of rows {rows[0]}:{rows[1]}: a stored chunk "
            f"is corrupt or truncated ({type(error).__name__}: {error})."
        ) from error


def read_rows(
    group: zarr.Group, start: int, stop: int, where: str, digest: str | None = None
) -> sp.csr_matrix:
    """Rows ``start:stop`` of a CSR group, checked: the group is the one the driver opened
    (``digest``, see ``storage.verify``), its chunks are there, indptr is monotone and the
    indices are in range."""
    if digest is not None:
        storage.verify(group, digest, where)
    n_cols = int(group.attrs["shape"][1])
    rows = (start, stop)
    indptr = _read(group["indptr"], start, stop + 1, where, rows).astype(np.int64)
    if np.any(np.diff(indptr) < 0):
        raise ValueError(f"{where}: indptr decreases within rows {start}:{stop}; not CSR.")
    low, high = int(indptr[0]), int(indptr[-1])
    indices = _read(group["indices"], low, high, where, rows)
    if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
        raise ValueError(
            f"{where}: column indices out of range [0, {n_cols}) in rows {start}:{stop}."
        )
    data = _read(group["data"], low, high, where, rows)
    return sp.csr_matrix((data, indices, indptr - low), shape=(stop - start, n_cols))


def open_group(
    group: zarr.Group,
    where: str,
    panel_bytes: int,
    digest: str | None = None,
    most_rows: int | None = None,
) -> da.Array:
    """A CSR group as a Dask array of CSR row panels of about ``panel_bytes`` of stored data
    and at most ``most_rows`` rows; the tasks reading them check the group against ``digest``
    (``storage.fingerprint``)."""
    (n_rows, n_cols), nnz = check_group(group, where)
    dtype = group["data"].dtype
    entry_bytes = dtype.itemsize + group["indices"].dtype.itemsize
    row_bytes = max(1.0, (nnz * entry_bytes + n_rows * 8) / max(n_rows, 1))
    rows = max(1, min(n_rows, int(panel_bytes // row_bytes), most_rows or n_rows))
    meta = sp.csr_matrix((0, 0), dtype=dtype)
    read = dask.delayed(read_rows, pure=True)
    blocks = [
        da.from_delayed(
            read(group, start, min(start + rows, n_rows), where, digest),
            shape=(min(rows, n_rows - start), n_cols),
            dtype=dtype,
            meta=meta,
        )
        for start in range(0, n_rows, rows)
    ]
    X = da.concatenate(blocks, axis=0)
    # What the panels take in memory, known here from indptr: a fit can decide to cache them
    # before its validation pass reads them (``stored_bytes``; gone from any array made of it).
    setattr(X, _STORED_BYTES, in_memory_bytes(nnz, n_rows, dtype.itemsize))
    return X


_STORED_BYTES = "dasknmf_stored_bytes"


def in_memory_bytes(nnz: int, n_rows: int, itemsize: int) -> int:
    """Bytes of a CSR matrix in memory: its values, int64 column indices and row pointers."""
    return nnz * (itemsize + 8) + (n_rows + 1) * 8


def stored_bytes(X: da.Array) -> int | None:
    """Bytes that the CSR panels of ``X`` take in memory, if ``X`` is a CSR store as
    ``open_group`` opened it (None for any other array, or one made from it)."""
    return X.__dict__.get(_STORED_BYTES)


class Writer:
    """Appends CSR row blocks to a new group in the anndata encoding, at ``where`` (a
    ``storage.Location`` or anything ``zarr.open_group`` takes). Every chunk is stored and
    counted (``storage.CHUNKS_ATTRIBUTE``), so that one missing later is an error."""

    def __init__(self, where, n_cols: int, dtype, index_dtype=np.int64, shape=None):
        """``shape``, if known: (rows, stored entries) of the whole matrix, to size the chunks of
        a small one to it (``chunk_entries``)."""
        rows, entries = (None, None) if shape is None else shape
        store = where.store() if isinstance(where, storage.Location) else str(where)
        self.group = zarr.open_group(store=store, mode="w")
        self.n_cols = int(n_cols)
        self.n_rows = 0
        self.nnz = 0
        for name, kind, size in (
            ("data", dtype, entries),
            ("indices", index_dtype, entries),
            ("indptr", np.int64, None if rows is None else rows + 1),
        ):
            self.group.create_array(
                name,
                shape=(0,),
                **entry_layout(size),
                dtype=kind,
                compressors=storage.compressors(),
                config=storage.complete_chunks_config(),
            )
        self.group["indptr"].append(np.zeros(1, dtype=np.int64))

    def append(self, block) -> None:
        """Append the rows of a scipy.sparse (or dense) block."""
        block = sp.csr_matrix(block)
        if block.shape[1] != self.n_cols:
            raise ValueError(
                f"A block of {block.shape[1]} columns cannot follow blocks of {self.n_cols}."
            )
        block.sum_duplicates()  # canonical CSR: sorted, unique column indices per row
        if block.nnz:
            self.group["data"].append(block.data.astype(self.group["data"].dtype, copy=False))
            self.group["indices"].append(block.indices.astype(self.group["indices"].dtype))
        self.group["indptr"].append(block.indptr[1:].astype(np.int64) + self.nnz)
        self.n_rows += block.shape[0]
        self.nnz += block.nnz

    def close(self) -> zarr.Group:
        for name in ("data", "indices", "indptr"):
            array = self.group[name]
            stored = storage.stored_chunks(array)
            array.attrs[storage.CHUNKS_ATTRIBUTE] = storage.chunk_count(array.shape, stored)
        self.group.attrs.update({**ENCODING, "shape": [self.n_rows, self.n_cols]})
        return self.group


def row_blocks(X, rows: int):
    """scipy.sparse or Dask-with-sparse-chunks X as a sequence of CSR row blocks (a Dask block
    is computed when its turn comes, so one block at a time is in this process)."""
    if isinstance(X, da.Array):
        for block in X.rechunk({1: -1}).to_delayed()[:, 0]:
            yield block.compute()
        return
    X = X.tocsr()
    for start in range(0, X.shape[0], rows):
        yield X[start : start + rows]


#: Attribute of a CSR group written from records (``convert(..., triples=...)``): the names
#: of the record's columns for the rows, the columns and the values.
IDS_ATTRIBUTE = "dasknmf-ids"


def write_ids(where, row_ids: np.ndarray, col_ids: np.ndarray, names) -> None:
    """Keep the original ids of the rows and columns of a CSR group, in its ``row_ids`` and
    ``col_ids`` arrays (int64, or variable-length strings)."""
    store = where.store() if isinstance(where, storage.Location) else str(where)
    group = zarr.open_group(store=store, mode="a")
    for name, ids in (("row_ids", row_ids), ("col_ids", col_ids)):
        dtype = np.int64 if ids.dtype.kind == "i" else str
        array = group.create_array(
            name,
            shape=ids.shape,
            dtype=dtype,
            chunks=(chunk_entries(ids.size),),
            config=storage.complete_chunks_config(),
        )
        array[:] = ids
        array.attrs[storage.CHUNKS_ATTRIBUTE] = storage.chunk_count(array.shape, array.chunks)
    group.attrs[IDS_ATTRIBUTE] = {"rows": names[0], "columns": names[1], "values": names[2]}


def read_ids(group: zarr.Group) -> tuple[np.ndarray, np.ndarray] | None:
    """The original (row ids, column ids) of a CSR group written from records — int64, or
    Python strings in object arrays — or None."""
    if IDS_ATTRIBUTE not in group.attrs:
        return None
    ids = (group[name][:] for name in ("row_ids", "col_ids"))
    return tuple(a if a.dtype.kind == "i" else a.astype(object) for a in ids)
