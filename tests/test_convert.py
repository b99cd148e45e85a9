"""Converters to Zarr: .npy, .npz, Matrix Market, .h5ad."""

import warnings

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

import dasknmf.converters
from dasknmf import MatrixPathError, convert, open_matrix

rng = np.random.default_rng(0)
DENSE = rng.uniform(size=(50, 7))
SPARSE = sp.random(300, 40, density=0.1, format="csr", random_state=1)


def _same(path, expected):
    got = open_matrix(path).compute()
    if sp.issparse(expected):
        assert sp.issparse(got) and abs(got - expected).max() == 0
    else:
        np.testing.assert_array_equal(got, expected)


def test_npy_is_read_in_row_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(dasknmf.converters, "DEFAULT_CHUNK_BYTES", 7 * 8 * 6)  # 6 rows a block
    np.save(tmp_path / "x.npy", DENSE)
    _same(convert(tmp_path / "x.npy", tmp_path / "x.zarr"), DENSE)


def test_npz(tmp_path):
    sp.save_npz(tmp_path / "x.npz", SPARSE)
    _same(convert(tmp_path / "x.npz", tmp_path / "x.zarr"), SPARSE)
    np.savez(tmp_path / "dense.npz", a=DENSE)
    with pytest.raises(ValueError, match="is not a scipy.sparse .npz file"):
        convert(tmp_path / "dense.npz", tmp_path / "y.zarr")
    assert not (tmp_path / "y.zarr").exists()


@pytest.mark.parametrize("symmetry", ["general", "symmetric"])
@pytest.mark.parametrize("field", ["real", "integer", "pattern"])
def test_matrix_market_is_streamed(tmp_path, monkeypatch, symmetry, field):
    monkeypatch.setattr(dasknmf.converters, "MTX_BLOCK", 97)  # many parsing blocks
    monkeypatch.setattr(dasknmf.converters, "DEFAULT_CHUNK_BYTES", 2000)  # many row blocks
    matrix = sp.random(
        120, 120 if symmetry == "symmetric" else 90, density=0.08, format="coo", random_state=2
    )
    if symmetry == "symmetric":
        matrix = sp.triu(matrix + matrix.T).tocoo()
    if field == "integer":
        matrix.data = np.ceil(matrix.data * 10)
    # Shuffle the entries: a Matrix Market file need not be sorted.
    order = np.random.default_rng(3).permutation(matrix.nnz)
    matrix = sp.coo_matrix(
        (matrix.data[order], (matrix.row[order], matrix.col[order])), shape=matrix.shape
    )
    scipy.io.mmwrite(tmp_path / "x.mtx", matrix, field=field, symmetry=symmetry)
    expected = sp.csr_matrix(scipy.io.mmread(tmp_path / "x.mtx"))
    _same(convert(tmp_path / "x.mtx", tmp_path / "x.zarr"), expected)


def test_matrix_market_array_layout(tmp_path):
    scipy.io.mmwrite(tmp_path / "x.mtx", DENSE)
    np.testing.assert_allclose(
        open_matrix(convert(tmp_path / "x.mtx", tmp_path / "x.zarr")).compute(), DENSE
    )


@pytest.mark.parametrize(
    "text, match",
    [
        ("hello\n", "is not a Matrix Market file"),
        ("%%MatrixMarket matrix coordinate real general\n3 3 2\n1 1 1.0\n", "ends after 1"),
        ("%%MatrixMarket matrix coordinate real general\n3 3 1\n4 1 1.0\n", "outside the 3 × 3"),
        ("%%MatrixMarket matrix coordinate complex general\n1 1 1\n1 1 1 0\n", "Complex"),
        ("%%MatrixMarket matrix coordinate real general\nthree 3 1\n", "is not integers"),
    ],
)
def test_broken_matrix_market(tmp_path, text, match):
    (tmp_path / "x.mtx").write_text(text)
    with pytest.raises(ValueError, match=match):
        convert(tmp_path / "x.mtx", tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("sparse", [True, False])
def test_h5ad(tmp_path, sparse, monkeypatch):
    anndata = pytest.importorskip("anndata")
    pytest.importorskip("h5py")
    monkeypatch.setattr(dasknmf.converters, "DEFAULT_CHUNK_BYTES", 3000)
    X = SPARSE if sparse else SPARSE.toarray()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        anndata.AnnData(X=X).write_h5ad(tmp_path / "x.h5ad")
    _same(convert(tmp_path / "x.h5ad", tmp_path / "x.zarr"), X)


def test_convert_errors(tmp_path):
    with pytest.raises(MatrixPathError, match="does not exist"):
        convert(tmp_path / "missing.npy", tmp_path / "x.zarr")
    (tmp_path / "x.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match="the suffix '.txt' is not one of"):
        convert(tmp_path / "x.txt", tmp_path / "x.zarr")
    (tmp_path / "x.csv").write_text("1,2\n")  # records: converted with triples=
    with pytest.raises(ValueError, match="holds records: say which of its columns"):
        convert(tmp_path / "x.csv", tmp_path / "x.zarr")
    np.save(tmp_path / "x.npy", DENSE)
    convert(tmp_path / "x.npy", tmp_path / "x.zarr")
    with pytest.raises(FileExistsError, match="already exists"):
        convert(tmp_path / "x.npy", tmp_path / "x.zarr")
    np.save(tmp_path / "v.npy", DENSE[0])
    with pytest.raises(ValueError, match="Expected 2D array, got 1D"):
        convert(tmp_path / "v.npy", tmp_path / "v.zarr")
