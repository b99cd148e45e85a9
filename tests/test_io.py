"""Zarr matrices: open_matrix and save_matrix, success and failure."""

import dask.array as da
import numpy as np
import pytest
import zarr

from dasknmf import MatrixPathError, open_matrix, save_matrix
from dasknmf.io import default_chunks

X = np.arange(600, dtype=np.float32).reshape(100, 6)


def test_round_trip_numpy(tmp_path):
    path = save_matrix(tmp_path / "x.zarr", X, chunks=(16, 6))
    stored = zarr.open_array(str(path), mode="r")
    assert stored.chunks == (16, 6) and stored.dtype == np.float32
    opened = open_matrix(path, panel_bytes=40 * 6 * 4)
    # Panels are whole stored chunks: 2 chunks of 16 rows fit in 40 rows' worth of bytes.
    assert opened.chunks == ((32, 32, 32, 4), (6,))
    np.testing.assert_array_equal(opened.compute(), X)
    assert not list(tmp_path.glob(".x.zarr.tmp-*"))


def test_round_trip_dask_is_written_chunk_by_chunk(tmp_path, sync_scheduler):
    source = da.from_array(X, chunks=(7, 6))
    path = save_matrix(tmp_path / "x.zarr", source, chunks=(20, 6))
    np.testing.assert_array_equal(zarr.open_array(str(path), mode="r")[:], X)


def test_open_a_zarr_array_and_a_group_component(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("X", data=X, chunks=(50, 6))
    np.testing.assert_array_equal(open_matrix(group["X"]).compute(), X)
    np.testing.assert_array_equal(open_matrix(tmp_path / "g.zarr", component="X").compute(), X)


def test_sharded_arrays_are_read_by_whole_shards(tmp_path):
    array = zarr.create_array(
        str(tmp_path / "s.zarr"), shape=X.shape, chunks=(10, 6), shards=(30, 6), dtype=X.dtype
    )
    array[:] = X
    assert open_matrix(array, panel_bytes=1).chunks[0] == (30, 30, 30, 10)


def test_default_chunks():
    assert default_chunks((10**6, 100), 8) == (20971, 100)  # bands of 16 MiB
    assert default_chunks((8, 100), 8, target=8000) == (8, 100)  # all rows fit: one band
    assert default_chunks((10**4, 10**6), 4) == (2048, 2048)  # wide: 16 MiB tiles
    assert default_chunks((3, 4), 8) == (3, 4)


def test_open_keeps_the_stored_column_chunks(tmp_path):
    path = save_matrix(tmp_path / "x.zarr", X, chunks=(16, 4))
    assert open_matrix(path, panel_bytes=32 * 6 * 4).chunks == ((32, 32, 32, 4), (4, 2))


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    path = save_matrix(tmp_path / "x.zarr", X)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_matrix(path, X * 2)
    np.testing.assert_array_equal(open_matrix(path).compute(), X)  # untouched
    save_matrix(path, X * 2, overwrite=True)
    np.testing.assert_array_equal(open_matrix(path).compute(), X * 2)


def test_failed_write_leaves_nothing(tmp_path):
    def fail(block):
        raise RuntimeError("disk on fire")

    source = da.from_array(X, chunks=(50, 6)).map_blocks(fail, dtype=X.dtype)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_matrix(tmp_path / "x.zarr", source, chunks=(50, 6))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad, match",
    [
        (X[:, 0], "Expected 2D array, got 1D"),
        (X[None], "Expected 2D array, got 3D"),
        (np.zeros((0, 3)), "0 sample"),
        (X.astype(complex), "Complex data not supported"),
        (X.astype(str), "is not numeric"),
    ],
)
def test_save_rejects_what_is_not_a_numeric_matrix(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        save_matrix(tmp_path / "x.zarr", bad)
    assert list(tmp_path.iterdir()) == []


def test_save_into_a_missing_folder(tmp_path):
    with pytest.raises(MatrixPathError, match="does not exist"):
        save_matrix(tmp_path / "no" / "x.zarr", X)


def test_open_errors(tmp_path):
    with pytest.raises(MatrixPathError, match="No such matrix: .*missing.zarr does not exist"):
        open_matrix(tmp_path / "missing.zarr")
    (tmp_path / "not-zarr").mkdir()
    with pytest.raises(MatrixPathError, match="is not a Zarr store"):
        open_matrix(tmp_path / "not-zarr")
    with pytest.raises(TypeError, match="Expected a path or a zarr.Array"):
        open_matrix(42)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("X", data=X)
    group.create_array("v", data=np.arange(5.0))
    group.create_array("t", data=np.zeros((2, 2, 2)))
    group.create_array("s", shape=(2, 2), dtype=str)  # variable-length strings (specified in v3)
    with pytest.raises(ValueError, match="is a Zarr group, not a matrix.*\\['X', 's', 't', 'v'\\]"):
        open_matrix(tmp_path / "g.zarr")
    with pytest.raises(ValueError, match="has no component 'Y'"):
        open_matrix(tmp_path / "g.zarr", component="Y")
    with pytest.raises(ValueError, match="g.zarr/v has shape"):
        open_matrix(tmp_path / "g.zarr", component="v")
    with pytest.raises(ValueError, match="got 3D"):
        open_matrix(tmp_path / "g.zarr", component="t")
    with pytest.raises(ValueError, match="is not numeric"):
        open_matrix(tmp_path / "g.zarr", component="s")
    with pytest.raises(ValueError, match="is a Zarr array, not a group"):
        open_matrix(group["X"], component="X")


def test_open_with_a_panel_size_that_is_not_a_size(tmp_path):
    save_matrix(tmp_path / "x.zarr", X, chunks=(10, 6))
    with pytest.raises(ValueError, match="panel_bytes must be a size such as '64MiB'.*'abc'"):
        open_matrix(tmp_path / "x.zarr", panel_bytes="abc")
    assert open_matrix(tmp_path / "x.zarr", panel_bytes="1KiB").chunks[0][0] < X.shape[0]


def test_open_in_panels_of_at_most_some_rows(tmp_path):
    """``panel_rows`` caps the rows of a panel: a CSR group is read at any row bound (its
    bytes of stored entries alone put all 100 rows in one panel here), a dense store in whole
    stored chunks (a chunk taller than the cap is a panel of its own)."""
    import scipy.sparse as sp

    sparse = sp.csr_matrix(np.where(X % 7 == 0, X, 0))
    save_matrix(tmp_path / "s.zarr", sparse)
    assert open_matrix(tmp_path / "s.zarr").chunks[0] == (100,)
    opened = open_matrix(tmp_path / "s.zarr", panel_rows=30)
    assert opened.chunks[0] == (30, 30, 30, 10)
    assert (opened.compute() != sparse).nnz == 0
    save_matrix(tmp_path / "d.zarr", X, chunks=(16, 6))
    assert open_matrix(tmp_path / "d.zarr", panel_rows=40).chunks[0] == (32, 32, 32, 4)
    assert open_matrix(tmp_path / "d.zarr", panel_rows=10).chunks[0] == (16,) * 6 + (4,)
    for bad in (0, -3, 2.5, True, "30"):
        with pytest.raises(ValueError, match="panel_rows must be an integer >= 1"):
            open_matrix(tmp_path / "s.zarr", panel_rows=bad)
