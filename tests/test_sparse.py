"""Sparse data: CSR in Zarr (anndata's encoding), sparse Dask arrays, sparse fits."""

import os
import warnings

import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from sklearn.decomposition import NMF as SklearnNMF
from sklearn.exceptions import ConvergenceWarning

from dasknmf import NMF, csr, open_matrix, save_matrix


def _counts(m=600, n=120, density=0.08, seed=0):
    X = sp.random(m, n, density=density, format="csr", random_state=seed, dtype=np.float64)
    X.data[:] = np.random.default_rng(seed).poisson(3, X.nnz) + 1
    return X


X = _counts()


def test_csr_round_trip_in_anndata_encoding(tmp_path):
    path = save_matrix(tmp_path / "x.zarr", X)
    group = zarr.open_group(str(path), mode="r")
    assert dict(group.attrs) == {
        "encoding-type": "csr_matrix",
        "encoding-version": "0.1.0",
        "shape": [600, 120],
    }
    # Chunks sized to the matrix where it is known to be small (a chunk is decoded whole).
    assert group["data"].chunks == (X.nnz,) and group["indptr"].chunks == (601,)
    opened = open_matrix(path, panel_bytes=2000)
    assert sp.issparse(opened._meta) and opened.numblocks[0] > 3
    assert abs(opened.compute() - X).max() == 0


def test_a_sparse_dask_array_is_written_block_by_block(tmp_path, sync_scheduler):
    source = da.from_array(X, chunks=(100, 60), asarray=False)  # 2-D blocks of CSR
    path = save_matrix(tmp_path / "x.zarr", source)
    assert abs(open_matrix(path).compute() - X).max() == 0
    # Its size is not known before it is written: shards of the default size, of inner chunks.
    data = zarr.open_group(str(path), mode="r")["data"]
    assert data.shards == (csr.ENTRIES_PER_CHUNK,) and data.chunks == (csr.INNER_ENTRIES,)


def test_csr_entries_are_stored_in_shards_of_inner_chunks(tmp_path, monkeypatch):
    """Beyond ``INNER_ENTRIES`` the entries are stored in shards (a file each) of inner
    chunks, so that reading a few rows decodes an inner chunk or two (a batch of
    ``MiniBatchNMF``), not a whole stored chunk; what is read back is the matrix, panels of
    few rows included."""
    monkeypatch.setattr(csr, "INNER_ENTRIES", 500)
    monkeypatch.setattr(csr, "ENTRIES_PER_CHUNK", 2_000)
    assert csr.entry_layout(400) == {"chunks": (400,)}
    assert csr.entry_layout(1_200) == {"shards": (1_500,), "chunks": (500,)}
    assert csr.entry_layout(None) == {"shards": (2_000,), "chunks": (500,)}
    assert X.nnz > 4_000
    path = save_matrix(tmp_path / "x.zarr", X)
    group = zarr.open_group(str(path), mode="r")
    assert group["data"].shards == (2_000,) and group["data"].chunks == (500,)
    shards = -(-X.nnz // 2_000)
    assert group["data"].attrs["dasknmf.chunks"] == shards  # the stored files
    assert sorted(os.listdir(path / "data" / "c")) == [str(i) for i in range(shards)]
    opened = open_matrix(path, panel_rows=7)
    assert abs(opened.compute() - X).max() == 0


def test_anndata_reads_what_we_write_and_we_read_what_anndata_writes(tmp_path):
    anndata = pytest.importorskip("anndata")
    path = save_matrix(tmp_path / "x.zarr", X)
    theirs = anndata.io.read_elem(zarr.open_group(str(path), mode="r"))
    assert abs(sp.csr_matrix(theirs) - X).max() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's note about zarr v2 defaults
        anndata.AnnData(X=X).write_zarr(tmp_path / "sparse.h5ad.zarr")
        anndata.AnnData(X=X.toarray()).write_zarr(tmp_path / "dense.zarr")
    ours = open_matrix(tmp_path / "sparse.h5ad.zarr", component="X")
    assert sp.issparse(ours._meta) and abs(ours.compute() - X).max() == 0
    dense = open_matrix(tmp_path / "dense.zarr", component="X")
    np.testing.assert_array_equal(dense.compute(), X.toarray())


def _broken(tmp_path, edit):
    path = save_matrix(tmp_path / "x.zarr", X)
    edit(zarr.open_group(str(path), mode="r+"))
    return path


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda g: g["indptr"].__setitem__(5, 10**6), "indptr decreases"),
        (lambda g: g["indptr"].__setitem__(600, 7), "indptr must run from 0 to nnz"),
        (lambda g: g["indices"].__setitem__(3, 500), "column indices out of range"),
        (lambda g: g.attrs.__setitem__("shape", [601, 120]), "indptr has 601 entries"),
        (lambda g: g.attrs.__setitem__("encoding-type", "csc_matrix"), "csc_matrix group"),
        (lambda g: g.__delitem__("indices"), "lacks \\['indices'\\]"),
    ],
    ids=[
        "indptr-not-monotone",
        "indptr-end",
        "index-out-of-range",
        "shape",
        "csc",
        "missing-array",
    ],
)
def test_broken_csr_groups_are_named(tmp_path, edit, match, sync_scheduler):
    path = _broken(tmp_path, edit)
    model = NMF(3, max_iter=5)
    with pytest.raises(ValueError, match=match):
        model.fit(str(path))  # the open checks, or the validation pass, before any result
    assert not hasattr(model, "components_")


@pytest.mark.parametrize(
    "value, match", [(-2.0, "Negative values in data passed to NMF"), (np.nan, "NaN or infinity")]
)
def test_bad_stored_value_is_found(tmp_path, sync_scheduler, value, match):
    Y = X.copy()
    Y.data[-1] = value  # in the last panel
    path = save_matrix(tmp_path / "x.zarr", Y)
    model = NMF(3, max_iter=5)
    with pytest.raises(ValueError, match=match):
        model.fit(str(path))
    assert not hasattr(model, "components_")


KL = dict(
    n_components=4,
    solver="mu",
    beta_loss="kullback-leibler",
    init="random",
    random_state=0,
    tol=0,
    max_iter=30,
    panel_bytes=100 * 120 * 8,
)


def test_in_memory_dask_and_zarr_csr_agree(tmp_path, sync_scheduler):
    reference = NMF(**KL).fit(X)
    from_dask = NMF(**KL).fit(da.from_array(X, chunks=(100, 120), asarray=False))
    from_zarr = NMF(**KL).fit(str(save_matrix(tmp_path / "x.zarr", X)))
    for model in (from_dask, from_zarr):
        np.testing.assert_allclose(model.components_, reference.components_, rtol=1e-10)
        assert model.reconstruction_err_ == pytest.approx(reference.reconstruction_err_, rel=1e-12)


@pytest.mark.parametrize("cache", [True, False, "auto"])
def test_zarr_csr_on_a_cluster(cluster, tmp_path, cache):
    reference = NMF(**KL).fit(X)
    path = save_matrix(tmp_path / "x.zarr", X)
    model = NMF(cache=cache, **KL)
    W = model.fit_transform(str(path))
    assert isinstance(W, da.Array)
    np.testing.assert_allclose(model.components_, reference.components_, rtol=1e-10)
    np.testing.assert_allclose(W.compute(), reference.W_, rtol=1e-10)


@pytest.mark.parametrize(
    "solver, beta_loss",
    [("cd", "frobenius"), ("mu", "frobenius"), ("mu", "kullback-leibler"), ("mu", "itakura-saito")],
)
def test_final_loss_is_within_one_percent_of_sklearn(solver, beta_loss):
    """Same starting W and H, same iterations; mean over three starts (see the dense test)."""
    data = X.copy()
    if beta_loss == "itakura-saito":  # needs X without zeros: every entry stored
        data = sp.csr_matrix(X.toarray() + 0.5)
    ours, theirs = [], []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        W0, H0 = rng.uniform(0.5, 1.5, size=(600, 4)), rng.uniform(0.5, 1.5, size=(4, 120))
        kwargs = dict(
            n_components=4, solver=solver, beta_loss=beta_loss, init="custom", tol=0, max_iter=60
        )
        model = NMF(**kwargs)
        model.fit_transform(data, W=W0.copy(), H=H0.copy())
        reference = SklearnNMF(**kwargs)
        reference.fit_transform(data, W=W0.copy(), H=H0.copy())
        ours.append(model.reconstruction_err_)
        theirs.append(reference.reconstruction_err_)
    assert np.mean(ours) <= 1.01 * np.mean(theirs), (ours, theirs)


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
def test_empty_rows_and_columns(beta_loss):
    Y = X.tolil()
    Y[10:20, :] = 0
    Y[:, 5] = 0
    Y = Y.tocsr()
    Y.eliminate_zeros()
    kwargs = dict(
        n_components=3, solver="mu", beta_loss=beta_loss, init="nndsvda", tol=0, max_iter=40
    )
    model = NMF(**kwargs)
    W = model.fit_transform(Y)
    assert np.all(np.isfinite(W)) and np.all(np.isfinite(model.components_))
    assert np.all(W[10:20] == 0)  # an empty row has nothing to explain
    reference = SklearnNMF(**kwargs).fit(Y)
    assert model.reconstruction_err_ <= 1.01 * reference.reconstruction_err_


def test_reuters_topics():
    """A real corpus: the `lda` package's Reuters sample (395 documents × 4258 words), KL."""
    lda_datasets = pytest.importorskip("lda.datasets")
    counts = sp.csr_matrix(lda_datasets.load_reuters().astype(np.float64))
    vocab = np.array(lda_datasets.load_reuters_vocab())
    titles = lda_datasets.load_reuters_titles()
    kwargs = dict(
        n_components=10,
        solver="mu",
        beta_loss="kullback-leibler",
        init="nndsvda",
        random_state=0,
        max_iter=300,
    )
    model = NMF(**kwargs)
    W = model.fit_transform(counts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference = SklearnNMF(**kwargs).fit(counts)
    assert model.reconstruction_err_ <= 1.01 * reference.reconstruction_err_
    top = [set(vocab[np.argsort(row)[::-1][:10]]) for row in model.components_]
    for words in (
        {"pope", "vatican"},
        {"mother", "teresa"},
        {"elvis"},
        {"yeltsin"},
        {"charles", "diana"},
    ):
        assert any(words <= topic for topic in top), words
    # The first document is about Prince Charles: its strongest topic is the royal one.
    assert "UK: Prince Charles" in titles[0] and "charles" in top[int(np.argmax(W[0]))]


@pytest.mark.parametrize(
    "solver, beta_loss, compiled",
    [
        ("cd", "frobenius", "auto"),
        ("mu", "kullback-leibler", True),
        ("mu", "kullback-leibler", False),
        ("mu", 1.5, "auto"),
    ],
)
def test_a_sparse_panel_is_never_densified(tmp_path, sync_scheduler, monkeypatch, solver,
                                           beta_loss, compiled):  # fmt: skip
    """Fits of a sparse X, in memory and from a Zarr CSR store, with every way of turning a
    scipy.sparse matrix dense made to fail."""
    import dask

    path = save_matrix(tmp_path / "x.zarr", X)

    def densify(self, *args, **kwargs):
        raise AssertionError("a sparse panel was densified")

    formats = (sp.csr_matrix, sp.csr_array, sp.csc_matrix, sp.csc_array, sp.coo_matrix,
               sp.coo_array)  # fmt: skip
    for cls in {base for fmt in formats for base in fmt.__mro__}:
        for method in ("toarray", "todense", "__array__"):
            if method in vars(cls):
                monkeypatch.setattr(cls, method, densify)
    with pytest.raises(AssertionError, match="densified"):
        X[:10].toarray()  # the trap is set
    kwargs = dict(n_components=3, solver=solver, beta_loss=beta_loss, init="random",
                  random_state=0, tol=0, max_iter=5)  # fmt: skip
    with dask.config.set({"dasknmf.compiled": compiled}):
        for data in (X, str(path)):
            model = NMF(**kwargs)
            model.fit(data)
            assert np.isfinite(model.reconstruction_err_)
