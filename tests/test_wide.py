"""Wide matrices: when full-width row panels would not fit, X is factorized as Xᵀ ≈ Hᵀ·Wᵀ."""

import dask.array as da
import numpy as np
import pytest
from conftest import low_rank

from dasknmf import NMF, save_matrix
from dasknmf.cuts import choose_layout

WIDE = low_rank(40, 3000, 3)
SMALL_BUDGET = 64 * 2**10  # a one-row task needs (3k + 1)·n·8 = 240 KiB: too much


def test_layout_decision():
    assert choose_layout((20000, 2000), 20, 4, 16 * 2**20) == "rows"
    assert choose_layout((40, 3000), 3, 8, SMALL_BUDGET) == "columns"
    assert choose_layout((40, 3000), 3, 8, 16 * 2**20) == "rows"
    assert choose_layout((4000, 3000), 3, 8, SMALL_BUDGET) == "blocks"  # neither fits
    assert choose_layout((4000, 3000), 3, 8, SMALL_BUDGET, "rows") == "rows"  # forced


def _both_orientations(**kwargs):
    upright, wide = NMF(**kwargs), NMF(panel_bytes=SMALL_BUDGET, **kwargs)
    return upright, upright.fit_transform(WIDE), wide, wide.fit_transform(WIDE)


def test_transposed_fit_converges_to_the_same_solution():
    upright, W_upright, wide, W_wide = _both_orientations(
        n_components=3, init="random", random_state=0, tol=0, max_iter=400
    )
    assert W_wide.shape == (40, 3) and wide.components_.shape == (3, 3000)
    assert np.all(W_wide >= 0) and np.all(wide.components_ >= 0)
    assert wide.reconstruction_err_ == pytest.approx(
        np.linalg.norm(WIDE - W_wide @ wide.components_), rel=1e-9
    )
    assert wide.reconstruction_err_ == pytest.approx(upright.reconstruction_err_, rel=1e-3)
    np.testing.assert_allclose(
        W_wide @ wide.components_, W_upright @ upright.components_, atol=0.02
    )


@pytest.mark.parametrize(("solver", "extrapolate"), [("cd", True), ("cd", False), ("mu", "auto")])
def test_transposed_fit_keeps_the_penalties_on_their_factors(solver, extrapolate):
    """Same start (the random streams swap with the roles) and the same penalized objective;
    updating H before W, the paths differ, so the values after 150 iterations only agree
    roughly (both ways keep approaching the same limit)."""
    upright, _, wide, _ = _both_orientations(
        n_components=3,
        init="random",
        random_state=0,
        solver=solver,
        tol=0,
        max_iter=150,
        alpha_W=1e-4,
        alpha_H=2e-4,
        l1_ratio=0.5,
        extrapolate=extrapolate,
    )
    assert wide.loss_history_[0] == pytest.approx(upright.loss_history_[0], rel=1e-12)
    assert wide.loss_history_[-1] == pytest.approx(upright.loss_history_[-1], rel=0.02)
    if extrapolate is not True:  # extrapolation may raise the objective before a restart
        assert np.all(np.diff(wide.loss_history_) <= 1e-10 * wide.loss_history_[0])


def test_transposed_custom_init():
    rng = np.random.default_rng(0)
    W0, H0 = rng.uniform(size=(40, 3)), rng.uniform(size=(3, 3000))
    model = NMF(3, init="custom", panel_bytes=SMALL_BUDGET, tol=0, max_iter=5)
    W = model.fit_transform(WIDE, W=W0, H=H0)
    assert W.shape == (40, 3) and model.loss_history_[0] == pytest.approx(
        0.5 * np.linalg.norm(WIDE - W0 @ H0) ** 2, rel=1e-9
    )


@pytest.mark.parametrize("extrapolate", [False, True])
def test_wide_zarr_on_a_cluster(cluster, tmp_path, extrapolate):
    """The Zarr store on a cluster and the in-memory array are split into different panels, so
    the two fits differ by rounding: after 60 iterations the plain fits still agree to 1e-3
    in their transforms; extrapolation amplifies such differences (its β reacts to every
    change of the objective), so for it the errors and the products are compared."""
    path = save_matrix(tmp_path / "wide.zarr", WIDE.astype(np.float32), chunks=(20, 500))
    settings = dict(
        n_components=3,
        init="nndsvda",
        random_state=0,
        max_iter=60,
        tol=0,
        panel_bytes=SMALL_BUDGET,
        extrapolate=extrapolate,
    )
    model = NMF(**settings)
    W = model.fit_transform(str(path))
    assert isinstance(W, da.Array) and W.shape == (40, 3)
    reference = NMF(**settings)
    W_reference = reference.fit_transform(WIDE.astype(np.float32))
    assert model.reconstruction_err_ == pytest.approx(reference.reconstruction_err_, rel=1e-4)
    if extrapolate:
        product = W.compute() @ model.components_
        np.testing.assert_allclose(product, W_reference @ reference.components_, atol=0.02)
        return
    np.testing.assert_allclose(
        model.transform(WIDE.astype(np.float32)),
        reference.transform(WIDE.astype(np.float32)),
        rtol=1e-3,
        atol=1e-3,
    )
