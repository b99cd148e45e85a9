"""Saving and loading fitted models: round trips, atomic writes, bad stores."""

import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import low_rank
from sklearn.exceptions import NotFittedError

import dasknmf
from dasknmf import NMF, MatrixPathError, save_matrix

X = low_rank(120, 15, 3)


@pytest.fixture
def fitted():
    model = NMF(n_components=3, init="random", random_state=0, alpha_W=0.001, max_iter=40)
    W = model.fit_transform(X)
    return model, W


def test_round_trip(tmp_path, fitted):
    model, W = fitted
    path = model.save(tmp_path / "model.zarr")
    loaded = dasknmf.load(path)
    assert loaded.get_params() == model.get_params()
    np.testing.assert_array_equal(loaded.components_, model.components_)
    np.testing.assert_array_equal(loaded.W_.compute(), W)
    for name in (
        "n_components_",
        "n_features_in_",
        "n_iter_",
        "reconstruction_err_",
        "loss_history_",
    ):
        assert getattr(loaded, name) == getattr(model, name), name
    np.testing.assert_array_equal(loaded.transform(X), model.transform(X))
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs["dasknmf"]["version"] == dasknmf.__version__
    assert group.attrs["n_samples"] == 120 and group.attrs["dtype"] == "float64"
    assert [p.name for p in tmp_path.iterdir()] == ["model.zarr"]  # no temporary left


def test_feature_names_survive(tmp_path):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(X, columns=[f"gene{i}" for i in range(15)])
    model = NMF(n_components=2, max_iter=10).fit(frame)
    loaded = dasknmf.load(model.save(tmp_path / "m.zarr"))
    assert list(loaded.feature_names_in_) == list(frame.columns)
    np.testing.assert_allclose(loaded.transform(frame), model.transform(frame))


def test_random_state_instance_is_not_stored(tmp_path):
    model = NMF(n_components=2, random_state=np.random.RandomState(0), max_iter=5).fit(X)
    assert dasknmf.load(model.save(tmp_path / "m.zarr")).random_state is None


def test_existing_path_is_refused_unless_overwrite(tmp_path, fitted):
    model, _ = fitted
    path = model.save(tmp_path / "m.zarr")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        model.save(path)
    other = NMF(n_components=2, max_iter=5).fit(X)
    other.save(path, overwrite=True)
    assert dasknmf.load(path).n_components_ == 2


def test_a_failed_save_leaves_nothing(tmp_path, fitted):
    model, W = fitted

    def fail(block):
        raise RuntimeError("worker lost its disk")

    model.W_ = da.from_array(W, chunks=(40, 3)).map_blocks(fail, dtype=W.dtype)
    with pytest.raises(RuntimeError, match="worker lost its disk"):
        model.save(tmp_path / "m.zarr")
    assert list(tmp_path.iterdir()) == []


def test_dask_fit_writes_w_from_the_cluster(tmp_path, cluster):
    model = NMF(n_components=3, init="random", random_state=0, max_iter=20, panel_bytes=30 * 15 * 8)
    W = model.fit_transform(da.from_array(X, chunks=(30, 15)))
    loaded = dasknmf.load(model.save(tmp_path / "m.zarr"))
    np.testing.assert_array_equal(loaded.W_.compute(), W.compute())
    np.testing.assert_array_equal(loaded.components_, model.components_)


def test_unfitted_model_cannot_be_saved(tmp_path):
    with pytest.raises(NotFittedError):
        NMF(2).save(tmp_path / "m.zarr")
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path, fitted):
    with pytest.raises(MatrixPathError, match="does not exist"):
        dasknmf.load(tmp_path / "missing.zarr")
    save_matrix(tmp_path / "x.zarr", X)
    with pytest.raises(ValueError, match="is not a dasknmf model"):
        dasknmf.load(tmp_path / "x.zarr")
    model, _ = fitted
    path = model.save(tmp_path / "m.zarr")
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["dasknmf"] = {"format": 99, "version": "9.0"}
    with pytest.raises(ValueError, match="format 99; this dasknmf reads format 1"):
        dasknmf.load(path)
    group.attrs["dasknmf"] = {"format": 1, "version": "0.1.0"}
    group.attrs["n_features"] = 16
    with pytest.raises(ValueError, match="H has shape \\(3, 15\\), the attributes say"):
        dasknmf.load(path)
