"""Converting matrix files to Zarr: ``.npy``, ``.npz`` (scipy.sparse), Matrix Market ``.mtx``
(streamed), AnnData ``.h5ad`` (its X, through h5py).

Dense sources become a 2-D Zarr array, sparse ones a CSR group in anndata's encoding (see
``dasknmf.csr``). Large sources are read in row blocks; the output is written to a temporary
sibling and renamed when complete.
"""

from __future__ import annotations

import itertools
import pathlib
import tempfile

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp

from dasknmf import csr, storage
from dasknmf.io import (
    CONVERTIBLE,
    DEFAULT_CHUNK_BYTES,
    MatrixPathError,
    _written,
    atomic_path,
    check_matrix_dtype,
    check_matrix_shape,
    save_matrix,
)

SUFFIXES = CONVERTIBLE
#: Entries of a Matrix Market file parsed at a time.
MTX_BLOCK = 1 << 20


def convert(src, dst, *, overwrite: bool = False, storage_options: dict | None = None):
    """Convert the matrix in ``src`` to a Zarr store at ``dst``.

    Parameters
    ----------
    src : str or os.PathLike
        A ``.npy`` file (dense, read memory-mapped in row blocks), a ``.npz`` file written by
        ``scipy.sparse.save_npz``, a Matrix Market ``.mtx`` file (coordinate format streamed in
        two passes with memory O(rows); array format read whole) or an AnnData ``.h5ad`` file
        (its ``X``, dense or CSR, read in row blocks; needs h5py).
    dst : str or os.PathLike
        The Zarr store to write, a local path or an fsspec URL (``s3://...``); must not exist
        unless ``overwrite``.
    overwrite : bool
    storage_options : dict, optional
        fsspec options for a ``dst`` URL.

    Returns
    -------
    pathlib.Path of the written store (its URL, a str, for an object store).
    """
    src = pathlib.Path(src)
    dst = storage.location(dst, storage_options)
    if not src.exists():
        raise MatrixPathError(f"No such file: {src} does not exist.")
    suffix = src.suffix.lower()
    if suffix == ".npy":
        X = np.load(src, mmap_mode="r")
        check_matrix_shape(X.shape, str(src))
        return _save_dense_in_blocks(X, dst, overwrite)
    if suffix == ".npz":
        try:
            X = sp.load_npz(src)
        except (ValueError, KeyError, OSError) as error:
            raise ValueError(
                f"{src} is not a scipy.sparse .npz file (scipy.sparse.save_npz): {error}"
            ) from error
        return save_matrix(dst, X, overwrite=overwrite)
    if suffix == ".mtx":
        return _convert_mtx(src, dst, overwrite)
    if suffix == ".h5ad":
        return _convert_h5ad(src, dst, overwrite)
    raise ValueError(f"Cannot convert {src}: the suffix {suffix!r} is not one of {SUFFIXES}.")


# ---- Matrix Market -------------------------------------------------------------------------------


def _mtx_header(f, src) -> tuple[str, str, str, tuple[int, ...]]:
    banner = f.readline().split()
    if len(banner) != 5 or banner[0].lower() != "%%matrixmarket" or banner[1].lower() != "matrix":
        raise ValueError(
            f"{src} is not a Matrix Market file: its first line is not "
            "'%%MatrixMarket matrix <format> <field> <symmetry>'."
        )
    layout, field, symmetry = (word.lower() for word in banner[2:])
    if field == "complex":
        raise ValueError(f"Complex data not supported: {src} holds complex values.")
    line = f.readline()
    while line.startswith("%") or not line.strip():
        line = f.readline()
    try:
        sizes = tuple(int(v) for v in line.split())
    except ValueError:
        raise ValueError(f"{src}: the size line {line.strip()!r} is not integers.") from None
    return layout, field, symmetry, sizes


def _save_dense_in_blocks(X, dst: storage.Location, overwrite: bool):
    """Write an array-like that only this process can read (a memory map, an HDF5 dataset) in
    row blocks, with the synchronous scheduler."""
    rows = max(1, DEFAULT_CHUNK_BYTES // max(1, X.shape[1] * X.dtype.itemsize))
    with dask.config.set(scheduler="sync"):
        return save_matrix(dst, da.from_array(X, chunks=(rows, -1)), overwrite=overwrite)


def _mtx_entries(f, src, field: str, nnz: int):
    """The coordinate entries in blocks of (rows, cols, values), 0-based."""
    columns = 2 if field == "pattern" else 3
    seen = 0
    while seen < nnz:
        lines = list(itertools.islice(f, min(MTX_BLOCK, nnz - seen)))
        block = np.loadtxt(lines, ndmin=2, comments="%") if lines else np.empty((0, columns))
        if block.shape[0] == 0:
            raise ValueError(f"{src} ends after {seen} of its {nnz} entries.")
        if block.shape[1] != columns:
            raise ValueError(f"{src}: entries have {block.shape[1]} fields, expected {columns}.")
        seen += block.shape[0]
        values = np.ones(block.shape[0]) if field == "pattern" else block[:, 2]
        yield block[:, 0].astype(np.int64) - 1, block[:, 1].astype(np.int64) - 1, values


def _convert_mtx(src: pathlib.Path, dst: storage.Location, overwrite: bool):
    with src.open() as f:
        layout, field, symmetry, sizes = _mtx_header(f, src)
    if layout == "array":
        import scipy.io

        return save_matrix(dst, np.asarray(scipy.io.mmread(src)), overwrite=overwrite)
    if layout != "coordinate" or len(sizes) != 3:
        raise ValueError(f"{src}: unsupported Matrix Market layout {layout!r}.")
    n_rows, n_cols, nnz = sizes
    check_matrix_shape((n_rows, n_cols), str(src))
    dtype = np.int64 if field == "integer" else np.float64
    mirrored = symmetry in ("symmetric", "skew-symmetric", "hermitian")
    sign = -1.0 if symmetry == "skew-symmetric" else 1.0

    def entries(f):
        for rows, cols, values in _mtx_entries(f, src, field, nnz):
            if rows.size and (
                rows.min() < 0 or rows.max() >= n_rows or cols.min() < 0 or cols.max() >= n_cols
            ):
                raise ValueError(f"{src}: an entry lies outside the {n_rows} × {n_cols} matrix.")
            yield rows, cols, values
            if mirrored:
                off = rows != cols
                yield cols[off], rows[off], sign * values[off]

    # Pass 1: entries per row. Pass 2: place them by row into files on disk. Then write the
    # rows in blocks, each sorted by column. Memory stays O(rows) plus one block.
    counts = np.zeros(n_rows + 1, dtype=np.int64)
    with src.open() as f:
        _mtx_header(f, src)
        for rows, _, _ in entries(f):
            np.add.at(counts, rows + 1, 1)
    indptr = np.cumsum(counts)
    total = int(indptr[-1])
    near = None if dst.remote or not dst.path.parent.is_dir() else dst.path.parent
    with tempfile.TemporaryDirectory(dir=near) as tmp:
        data = np.lib.format.open_memmap(f"{tmp}/data.npy", "w+", dtype, (max(total, 1),))
        indices = np.lib.format.open_memmap(f"{tmp}/indices.npy", "w+", np.int64, (max(total, 1),))
        position = indptr[:-1].copy()
        with src.open() as f:
            _mtx_header(f, src)
            for rows, cols, values in entries(f):
                order = np.argsort(rows, kind="stable")
                rows, cols, values = rows[order], cols[order], values[order]
                starts = np.searchsorted(rows, rows, side="left")
                slots = position[rows] + (np.arange(rows.size) - starts)
                data[slots], indices[slots] = values, cols
                np.add.at(position, rows, 1)
        check_matrix_dtype(dtype, str(src))
        with atomic_path(dst, overwrite) as out:
            writer = csr.Writer(out, n_cols, dtype)
            rows_per_block = max(1, n_rows * DEFAULT_CHUNK_BYTES // max(1, total * 16))
            for start in range(0, n_rows, rows_per_block):
                stop = min(start + rows_per_block, n_rows)
                low, high = indptr[start], indptr[stop]
                block = sp.csr_matrix(
                    (data[low:high], indices[low:high], indptr[start : stop + 1] - low),
                    shape=(stop - start, n_cols),
                )
                block.sort_indices()
                writer.append(block)
            writer.close()
    return _written(dst)


# ---- AnnData .h5ad ---------------------------------------------------------------------------


def _convert_h5ad(src: pathlib.Path, dst: storage.Location, overwrite: bool):
    try:
        import h5py
    except ImportError:
        raise ImportError("Converting .h5ad needs h5py: pip install h5py") from None
    with h5py.File(src, "r") as f:
        if "X" not in f:
            raise ValueError(f"{src} has no X: it holds {sorted(f.keys())}.")
        node = f["X"]
        if isinstance(node, h5py.Dataset):
            check_matrix_shape(node.shape, f"{src}:X")
            check_matrix_dtype(node.dtype, f"{src}:X")
            return _save_dense_in_blocks(node, dst, overwrite)
        encoding = node.attrs.get("encoding-type")
        if isinstance(encoding, bytes):
            encoding = encoding.decode()
        if encoding != "csr_matrix":
            raise ValueError(f"{src}:X is {encoding!r}; only a dense X or a CSR X converts.")
        n_rows, n_cols = (int(s) for s in node.attrs["shape"])
        indptr = node["indptr"][...]
        with atomic_path(dst, overwrite) as out:
            writer = csr.Writer(out, n_cols, node["data"].dtype)
            nnz = max(1, int(indptr[-1]))
            rows = max(1, n_rows * DEFAULT_CHUNK_BYTES // (nnz * 16))
            for start in range(0, n_rows, rows):
                stop = min(start + rows, n_rows)
                low, high = int(indptr[start]), int(indptr[stop])
                writer.append(
                    sp.csr_matrix(
                        (
                            node["data"][low:high],
                            node["indices"][low:high],
                            indptr[start : stop + 1] - low,
                        ),
                        shape=(stop - start, n_cols),
                    )
                )
            writer.close()
    return _written(dst)
