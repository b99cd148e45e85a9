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
#: Files of (row id, column id, value) records, converted with ``triples=``.
TRIPLE_SUFFIXES = (".csv", ".tsv", ".parquet")
#: Records of a triples file read at a time.
TRIPLE_BLOCK = 1 << 20
#: Entries of a Matrix Market file parsed at a time.
MTX_BLOCK = 1 << 20


def convert(
    src, dst, *, triples=None, overwrite: bool = False, storage_options: dict | None = None
):
    """Convert the matrix in ``src`` to a Zarr store at ``dst``.

    Parameters
    ----------
    src : str or os.PathLike
        A ``.npy`` file (dense, read memory-mapped in row blocks), a ``.npz`` file written by
        ``scipy.sparse.save_npz``, a Matrix Market ``.mtx`` file (coordinate format streamed in
        two passes with memory O(rows); array format read whole) or an AnnData ``.h5ad`` file
        (its ``X``, dense or CSR, read in row blocks; needs h5py).
        With ``triples``: a ``.csv``, ``.tsv`` or ``.parquet`` file of (row id, column id,
        value) records, e.g. (user, item, rating), read in blocks (``_convert_triples``).
    dst : str or os.PathLike
        The Zarr store to write, a local path or an fsspec URL (``s3://...``); must not exist
        unless ``overwrite``.
    triples : str or sequence of 3 str, optional
        The columns of ``src`` that hold the row id, the column id and the value, e.g.
        ``"user,item,rating"``. The store is then a CSR group that stores exactly the records
        (the missing ratings are its unstored entries: ``NMF(missing="unstored")``), rows and
        columns in the sorted order of their ids, which it keeps as ``row_ids`` and
        ``col_ids`` (``read_ids``).
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
    if triples is not None or suffix in TRIPLE_SUFFIXES:
        return _convert_triples(src, dst, overwrite, triples)
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

    return _write_coordinates(
        lambda: _mtx_stream(src, entries), (n_rows, n_cols), dtype, dst, overwrite
    )


def _mtx_stream(src: pathlib.Path, entries):
    with src.open() as f:
        _mtx_header(f, src)
        yield from entries(f)


def _write_coordinates(stream, shape, dtype, dst, overwrite: bool, unique=None, after=None):
    """Write the entries that ``stream()`` yields in blocks of (rows, cols, values) as a CSR
    group: pass 1 counts the entries per row, pass 2 places them by row into files on disk,
    then the rows are written in blocks, each sorted by column. Memory stays O(rows) plus one
    block. Entries at the same place are summed, or, with ``unique(row, col)`` (the message
    of the error), refused. ``after(group location)`` adds to the group before it is moved
    into place."""
    n_rows, n_cols = shape
    counts = np.zeros(n_rows + 1, dtype=np.int64)
    for rows, _, _ in stream():
        np.add.at(counts, rows + 1, 1)
    indptr = np.cumsum(counts)
    total = int(indptr[-1])
    near = None if dst.remote or not dst.path.parent.is_dir() else dst.path.parent
    with tempfile.TemporaryDirectory(dir=near) as tmp:
        data = np.lib.format.open_memmap(f"{tmp}/data.npy", "w+", dtype, (max(total, 1),))
        indices = np.lib.format.open_memmap(f"{tmp}/indices.npy", "w+", np.int64, (max(total, 1),))
        position = indptr[:-1].copy()
        for rows, cols, values in stream():
            order = np.argsort(rows, kind="stable")
            rows, cols, values = rows[order], cols[order], values[order]
            starts = np.searchsorted(rows, rows, side="left")
            slots = position[rows] + (np.arange(rows.size) - starts)
            data[slots], indices[slots] = values, cols
            np.add.at(position, rows, 1)
        check_matrix_dtype(dtype, "the entries")
        with atomic_path(dst, overwrite) as out:
            writer = csr.Writer(out, n_cols, dtype, shape=(n_rows, total))
            rows_per_block = max(1, n_rows * DEFAULT_CHUNK_BYTES // max(1, total * 16))
            for start in range(0, n_rows, rows_per_block):
                stop = min(start + rows_per_block, n_rows)
                low, high = indptr[start], indptr[stop]
                block = sp.csr_matrix(
                    (data[low:high], indices[low:high], indptr[start : stop + 1] - low),
                    shape=(stop - start, n_cols),
                )
                block.sort_indices()
                if unique is not None:
                    _refuse_repeats(block, start, unique)
                writer.append(block)
            writer.close()
            if after is not None:
                after(out)
    return _written(dst)


def _refuse_repeats(block: sp.csr_matrix, first_row: int, message) -> None:
    """A ValueError (``message(row, col)``) for the first place a sorted block holds twice."""
    same = np.flatnonzero(np.diff(block.indices) == 0)
    if same.size == 0:
        return
    rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
    repeated = same[rows[same] == rows[same + 1]]
    if repeated.size:
        at = int(repeated[0])
        raise ValueError(message(first_row + int(rows[at]), int(block.indices[at])))


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
            nnz = max(1, int(indptr[-1]))
            writer = csr.Writer(out, n_cols, node["data"].dtype, shape=(n_rows, nnz))
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


# ---- (row id, column id, value) records: ratings ---------------------------------------------


def _triple_columns(triples) -> list[str]:
    if triples is None:
        raise ValueError(
            "A .csv, .tsv or .parquet file holds records: say which of its columns hold the row "
            "id, the column id and the value, e.g. triples='user,item,rating' (--triples)."
        )
    names = triples.split(",") if isinstance(triples, str) else list(triples or ())
    names = [str(name).strip() for name in names]
    if len(names) != 3 or not all(names) or len(set(names)) != 3:
        raise ValueError(
            "triples must name three different columns (row id, column id, value), e.g. "
            f"'user,item,rating'; got {triples!r}."
        )
    return names


def _triple_blocks(src: pathlib.Path, names: list[str]):
    """The records of ``src`` in blocks of (row ids, column ids, values) as pandas Series; ids
    read as strings."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError(
            "Converting triples needs pandas: pip install 'dasknmf[ratings]'"
        ) from None
    suffix = src.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                "Reading Parquet needs pyarrow: pip install 'dasknmf[ratings]'"
            ) from None
        try:
            source = pq.ParquetFile(src)
        except Exception as error:
            raise ValueError(f"{src} is not a Parquet file: {error}") from None
        absent = [name for name in names if name not in source.schema_arrow.names]
        if absent:
            raise ValueError(f"{src} has no column {absent}: it has {source.schema_arrow.names}.")
        frames = (b.to_pandas() for b in source.iter_batches(TRIPLE_BLOCK, columns=names))
    elif suffix in (".csv", ".tsv"):
        with src.open() as f:
            header = pd.read_csv(f, sep="\t" if suffix == ".tsv" else ",", nrows=0)
        absent = [name for name in names if name not in header.columns]
        if absent:
            raise ValueError(f"{src} has no column {absent}: its header is {list(header.columns)}.")
        frames = pd.read_csv(
            src, sep="\t" if suffix == ".tsv" else ",", usecols=names,
            dtype={names[0]: str, names[1]: str}, chunksize=TRIPLE_BLOCK, keep_default_na=False,
        )  # fmt: skip
    else:
        raise ValueError(
            f"Cannot read records from {src}: its suffix is not one of {TRIPLE_SUFFIXES}."
        )
    for frame in frames:
        rows, cols = (frame[name].astype(str) for name in names[:2])
        values = pd.to_numeric(frame[names[2]], errors="coerce")
        bad = values.isna() & frame[names[2]].notna()
        if bad.any() or values.isna().any():
            where = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise ValueError(
                f"{src}: the {names[2]!r} of the record ({rows.iloc[where]}, {cols.iloc[where]}) "
                f"is {frame[names[2]].iloc[where]!r}, not a number."
            )
        for name, ids in zip(names[:2], (rows, cols), strict=True):
            if (ids == "").any():
                raise ValueError(f"{src}: a record has no {name!r}.")
        yield rows, cols, values.to_numpy(dtype=np.float64)


def _sorted_ids(ids: set) -> np.ndarray:
    """The ids in sorted order: as int64 when all are integers, else as strings."""
    ids = np.array(sorted(ids), dtype=object)
    try:
        numbers = np.array([int(v) for v in ids], dtype=np.int64)
    except (ValueError, OverflowError):
        return ids
    if np.array_equal(numbers.astype(str).astype(object), ids):  # "007" stays a string
        return np.sort(numbers)
    return ids


def _convert_triples(src: pathlib.Path, dst: storage.Location, overwrite: bool, triples):
    names = _triple_columns(triples)
    import pandas as pd

    row_ids, col_ids = set(), set()
    for rows, cols, _ in _triple_blocks(src, names):
        row_ids.update(rows.unique())
        col_ids.update(cols.unique())
    if not row_ids:
        raise ValueError(f"{src} holds no records.")
    row_ids, col_ids = _sorted_ids(row_ids), _sorted_ids(col_ids)
    row_index, col_index = (pd.Index(ids.astype(str)) for ids in (row_ids, col_ids))

    def stream():
        for rows, cols, values in _triple_blocks(src, names):
            yield row_index.get_indexer(rows), col_index.get_indexer(cols), values

    def repeated(row: int, col: int) -> str:
        return f"{src}: the record ({row_ids[row]}, {col_ids[col]}) appears more than once."

    def add_ids(out: storage.Location) -> None:
        csr.write_ids(out, row_ids, col_ids, names)

    shape = (len(row_ids), len(col_ids))
    check_matrix_shape(shape, str(src))
    return _write_coordinates(stream, shape, np.float64, dst, overwrite, repeated, add_ids)
