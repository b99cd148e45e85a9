"""Bad input gets a ValueError/TypeError whose message names the problem."""

import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.exceptions import NotFittedError

from dasknmf import NMF, InvalidParameterError, MatrixPathError, MiniBatchNMF

GOOD = np.abs(np.random.default_rng(0).normal(size=(20, 6))) + 0.1


def _with(value, where=(3, 2)):
    X = GOOD.copy()
    X[where] = value
    return X


def _dask(X):
    """X as a Dask array in chunks of 7 rows, so the last chunk is a short one."""
    return da.from_array(X, chunks=(7,) + (-1,) * (X.ndim - 1))


@pytest.mark.parametrize("make", [np.asarray, _dask], ids=["numpy", "dask"])
@pytest.mark.parametrize(
    "X, error, match",
    [
        (_with(-1.0, (19, 5)), ValueError, "Negative values in data passed to NMF"),
        (_with(np.nan), ValueError, "NaN"),
        (_with(np.inf), ValueError, "infinity"),
        (_with(-np.inf), ValueError, "infinity"),
        (GOOD.astype(complex), ValueError, "Complex data not supported"),
        (np.zeros((0, 6)), ValueError, "0 sample"),
        (np.zeros((5, 0)), ValueError, "0 feature"),
        (GOOD[:, 0], ValueError, "Expected 2D array, got 1D array"),
        (GOOD[None], ValueError, "3D array|dim 3"),
    ],
    ids=[
        "negative-in-last-chunk",
        "nan",
        "inf",
        "-inf",
        "complex",
        "no-rows",
        "no-columns",
        "1-d",
        "3-d",
    ],
)
def test_bad_matrices(make, X, error, match):
    with pytest.raises(error, match=match):
        NMF(2, max_iter=5).fit(make(X))


@pytest.mark.parametrize("dtype", [str, object])
def test_non_numeric_numpy(dtype):
    X = np.full((20, 6), "abc", dtype=dtype)
    with pytest.raises(ValueError, match="could not convert string to float"):
        NMF(2, max_iter=5).fit(X)


def test_non_numeric_dask():
    with pytest.raises(ValueError, match="is not numeric"):
        NMF(2, max_iter=5).fit(da.from_array(GOOD.astype(str), chunks=(10, 6)))


@pytest.mark.parametrize(
    "values",
    [(GOOD * 1e25).astype(np.float32), GOOD * 1e160],
    ids=["float32-1e25", "float64-1e160"],
)
@pytest.mark.parametrize(
    "make",
    [
        lambda: NMF(3, init="random", random_state=0, max_iter=5),
        lambda: NMF(3, init="random", random_state=0, max_iter=5, solver="mu"),
        lambda: NMF(3, init="random", random_state=0, max_iter=5, layout="blocks"),
        lambda: MiniBatchNMF(3, init="random", random_state=0, max_iter=5, batch_size=7),
    ],
    ids=["cd", "mu", "blocks", "minibatch"],
)
def test_values_whose_arithmetic_overflows_the_dtype_are_named(values, make):
    """Finite values whose products leave the dtype's range made NaN objectives, and the
    fit went on to NaN factors (as scikit-learn's NMF does): now a ValueError at the first
    NaN that says what to do. float32 values of 1e20 fit (as NMF) or fail so (MiniBatchNMF,
    whose scikit-learn twin refuses them too)."""
    with pytest.raises(ValueError, match="became NaN: the arithmetic overflowed"):
        make().fit(values)


def test_negative_sparse():
    with pytest.raises(ValueError, match="Negative values in data passed to NMF"):
        NMF(2, max_iter=5).fit(sp.csr_array(_with(-2.0)))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"n_components": 0}, "'n_components' parameter of NMF must be an int in the range"),
        ({"n_components": -3}, "'n_components'"),
        ({"n_components": 2.5}, "'n_components'.*Got 2.5"),
        ({"n_components": "two"}, "'n_components'"),
        ({"solver": "lbfgs"}, "'solver' parameter of NMF must be a str among"),
        ({"init": "svd"}, "'init' parameter of NMF"),
        ({"beta_loss": "hellinger"}, "'beta_loss' parameter of NMF"),
        ({"tol": -1e-3}, "'tol' parameter of NMF must be a float in the range \\[0, inf\\)"),
        ({"max_iter": -1}, "'max_iter' parameter of NMF must be an int in the range \\[1, inf\\)"),
        ({"max_iter": 0}, "'max_iter'"),
        ({"max_iter": 2.0}, "'max_iter'"),
        ({"l1_ratio": 1.5}, "'l1_ratio' parameter of NMF must be a float in the range \\[0, 1\\]"),
        ({"l1_ratio": -0.1}, "'l1_ratio'"),
        ({"alpha_W": -1.0}, "'alpha_W'"),
        ({"alpha_H": "different"}, "'alpha_H'"),
        ({"random_state": "seed"}, "'random_state'"),
        ({"inner_iter": 0}, "'inner_iter'"),
        ({"cache": "sometimes"}, "'cache'"),
        ({"panel_bytes": "lots"}, "'panel_bytes'"),
        ({"panel_bytes": -5}, "'panel_bytes'"),
        ({"panel_bytes": np.int64(0)}, "'panel_bytes'"),
        ({"panel_bytes": 4.5}, "'panel_bytes'"),
        ({"shuffle": "yes"}, "'shuffle'"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(InvalidParameterError, match=match) as info:
        NMF(**{"n_components": 2, **params}).fit(GOOD)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_a_numpy_integer_is_a_size():
    """(``panel_bytes=np.int64(64)`` raised AttributeError from dask's parse_bytes.)"""
    size = GOOD.shape[1] * GOOD.itemsize * 4
    layout = NMF(2, panel_bytes=np.int64(size)).fit(GOOD).layout_
    assert layout == NMF(2, panel_bytes=f"{size}B").fit(GOOD).layout_ != NMF(2).fit(GOOD).layout_


@pytest.mark.parametrize("beta_loss", ["kullback-leibler", "itakura-saito", 1, 0.5])
@pytest.mark.parametrize("solver", ["cd", "hals"])
def test_beta_losses_other_than_frobenius_need_mu(beta_loss, solver):
    with pytest.raises(ValueError, match=f"solver '{solver}' does not handle beta_loss"):
        NMF(2, solver=solver, beta_loss=beta_loss).fit(GOOD)


@pytest.mark.parametrize("beta_loss", ["itakura-saito", 0, -0.5])
@pytest.mark.parametrize("make", [np.asarray, sp.csr_array], ids=["dense", "sparse"])
def test_beta_at_most_zero_refuses_zeros_in_x(beta_loss, make):
    X = GOOD.copy()
    X[5, 1] = 0
    with pytest.raises(ValueError, match="When beta_loss <= 0 and X contains zeros"):
        NMF(2, solver="mu", beta_loss=beta_loss).fit(make(X))


def test_frobenius_by_number_is_accepted():
    NMF(2, beta_loss=2, max_iter=5, tol=0).fit(GOOD)


def test_nndsvd_needs_n_components_at_most_min_shape():
    with pytest.raises(ValueError, match="init = 'nndsvda' can only be used when n_components"):
        NMF(7, init="nndsvda").fit(GOOD)
    # init=None falls back to 'random' as scikit-learn does.
    assert NMF(7, max_iter=5, tol=0, random_state=0).fit(GOOD).n_components_ == 7


@pytest.mark.parametrize(
    "W, H, error, match",
    [
        (
            np.ones((20, 2)),
            np.ones((3, 6)),
            ValueError,
            "wrong first dimension passed to NMF \\(input H\\). Expected 2, but got 3",
        ),
        (np.ones((20, 2)), np.ones((2, 5)), ValueError, "wrong second dimension.*input H"),
        (np.ones((19, 2)), np.ones((2, 6)), ValueError, "wrong first dimension.*input W"),
        (
            -np.ones((20, 2)),
            np.ones((2, 6)),
            ValueError,
            "Negative values in data passed to NMF \\(input W\\)",
        ),
        (
            np.ones((20, 2)),
            np.full((2, 6), np.nan),
            ValueError,
            "NaN or infinity in NMF \\(input H\\)",
        ),
        (np.zeros((20, 2)), np.ones((2, 6)), ValueError, "full of zeros"),
        (np.ones((20, 2), dtype=np.float32), np.ones((2, 6)), TypeError, "same dtype as X"),
        (None, np.ones((2, 6)), ValueError, "needs both W and H"),
        (np.ones(20), np.ones((2, 6)), ValueError, "Expected 2D array for NMF \\(input W\\)"),
    ],
)
def test_bad_custom_init(W, H, error, match):
    with pytest.raises(error, match=match):
        NMF(2, init="custom").fit_transform(GOOD, W=W, H=H)


def test_w_and_h_without_custom_init_warn():
    with pytest.warns(RuntimeWarning, match="provided W or H are ignored"):
        NMF(2, max_iter=3, tol=0).fit_transform(GOOD, W=np.ones((20, 2)), H=np.ones((2, 6)))


@pytest.mark.parametrize(
    "make", [np.asarray, lambda X: da.from_array(X, chunks=(5, 3))], ids=["numpy", "dask"]
)
def test_transform_with_wrong_number_of_columns(make):
    model = NMF(2, max_iter=10).fit(GOOD)
    with pytest.raises(ValueError, match="X has 5 features, but NMF is expecting 6 features"):
        model.transform(make(GOOD[:, :5]))


def test_transform_of_negative_dask_input_fails_on_compute():
    model = NMF(2, max_iter=10).fit(GOOD)
    W = model.transform(da.from_array(_with(-1.0, (19, 0)), chunks=(10, 6)))
    with pytest.raises(ValueError, match="Negative values in data passed to NMF"):
        W.compute(scheduler="sync")


@pytest.mark.parametrize("method", ["transform", "inverse_transform"])
def test_use_before_fit(method):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        getattr(NMF(2), method)(GOOD)


def test_inverse_transform_with_wrong_width():
    model = NMF(2, max_iter=10).fit(GOOD)
    with pytest.raises(ValueError, match="Expected W of shape \\(n_samples, 2\\)"):
        model.inverse_transform(np.ones((4, 3)))


def test_missing_zarr_path(tmp_path):
    with pytest.raises(MatrixPathError, match="does not exist") as info:
        NMF(2).fit(str(tmp_path / "nothing.zarr"))
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("value, match", [(-0.5, "Negative values"), (np.nan, "NaN")])
def test_bad_value_in_the_last_chunk_of_a_store_stops_the_fit_before_any_result(
    tmp_path, value, match, sync_scheduler
):
    from dasknmf import save_matrix

    X = np.abs(np.random.default_rng(0).normal(size=(1000, 8))) + 0.1
    X[-1, -1] = value  # the very last element of the last chunk
    path = save_matrix(tmp_path / "X.zarr", X, chunks=(64, 8))
    model = NMF(2, max_iter=5)
    with pytest.raises(ValueError, match=match):
        model.fit(str(path))
    assert not hasattr(model, "components_") and not hasattr(model, "W_")


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_a_damaged_chunk_file_is_named(tmp_path, sync_scheduler, damage, sparse):
    from dasknmf import save_matrix
    from dasknmf.io import CorruptStoreError

    X = np.abs(np.random.default_rng(0).normal(size=(400, 20))) + 0.1
    path = save_matrix(tmp_path / "X.zarr", sp.csr_matrix(X) if sparse else X, chunks=(100, 20))
    chunks = (path / "data" / "c") if sparse else (path / "c")
    chunk = sorted(p for p in chunks.rglob("*") if p.is_file())[-1]  # the last stored chunk
    raw = bytearray(chunk.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[16:48] = b"\xff" * 32
    chunk.write_bytes(bytes(raw))
    model = NMF(2, max_iter=3)
    with pytest.raises(CorruptStoreError, match="X.zarr.*corrupt or truncated") as info:
        model.fit(str(path))
    assert isinstance(info.value, ValueError)
    assert not hasattr(model, "components_")


def test_unknown_parameters():
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_component'"):
        NMF(n_component=2)
    with pytest.raises(ValueError, match="Invalid parameter 'n_component'"):
        NMF().set_params(n_component=2)


def test_more_components_than_rows_or_columns_as_scikit_learn():
    """Allowed with a random initialization (as scikit-learn does); nndsvd refuses it."""
    model = NMF(8, init="random", random_state=0, max_iter=20).fit(GOOD)
    assert model.components_.shape == (8, 6)
    assert np.all(np.isfinite(model.components_))
