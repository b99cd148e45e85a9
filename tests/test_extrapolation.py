"""HALS with extrapolation (dasknmf.solvers.extrapolation): the control's rules, the balancing
of the components, and fits with it against fits without."""

import json
import math

import numpy as np
import pytest
from conftest import low_rank

from dasknmf import NMF
from dasknmf.solvers import extrapolation
from dasknmf.solvers.extrapolation import BETA0, CEILING_GROWTH, DECAY, GROWTH, Control


def test_beta_grows_under_its_ceiling_while_the_objective_falls():
    control = Control()
    first = control.advance(10.0)
    assert not first.restart and first.loss == 10.0
    assert first.ceiling == 1.0  # the ceiling starts at 1, its cap
    assert first.beta == pytest.approx(min(first.ceiling, BETA0 * GROWTH))
    betas = [first.beta]
    for loss in np.linspace(9, 1, 40):
        first = first.advance(float(loss))
        betas.append(first.beta)
    assert np.all(np.diff(betas) >= 0) and max(betas) <= 1.0


def test_an_increase_restarts_with_a_smaller_beta_and_ceiling():
    control = Control().advance(10.0).advance(9.0)
    worse = control.advance(9.5)
    assert worse.restart and worse.loss == 9.5
    assert worse.beta == pytest.approx(control.beta / DECAY)
    assert worse.ceiling == control.beta  # the β that failed
    after = worse.advance(9.4)
    assert not after.restart and after.beta <= after.ceiling
    assert after.ceiling == pytest.approx(control.beta * CEILING_GROWTH)


def test_a_rise_within_the_objectives_rounding_is_no_rise():
    """On a plateau the objective of two layouts of one fit rounded to either side of the
    last one (2384.5000000000005 and …4999999999995 after 2384.5): one restarted, the other
    did not, and the fits parted. A rise within ``rounding`` is no rise."""
    control = Control().advance(10.0)
    assert not control.advance(10.0 + 1e-12, rounding=1e-11).restart
    assert control.advance(10.0 + 1e-10, rounding=1e-11).restart
    assert control.advance(10.0 + 1e-12).restart  # without it, any rise restarts
    X = np.zeros((12, 7))
    X[[0, 1, 8, 8, 10], [5, 5, 5, 6, 6]] = [1, 85, 2, 54, 43]
    settings = dict(init="random", random_state=0, tol=0, max_iter=12)
    one = NMF(1, **settings).fit(X)
    panels = NMF(1, panel_bytes=4 * 7 * 8, **settings).fit(X)  # 3 panels of 4 rows
    np.testing.assert_allclose(panels.loss_history_, one.loss_history_, rtol=1e-12)


def test_scales_accumulate_for_the_older_h():
    control = Control(scale=(2.0, 1.0), scale_older=(2.0, 1.0))
    nxt = control.advance(1.0, (3.0, 0.5))
    assert nxt.scale == (3.0, 0.5) and nxt.scale_older == (6.0, 0.5)
    assert control.advance(1.0, None).scale is None


def test_extrapolate_pushes_and_projects():
    new, previous = np.array([[1.0, 2.0, 0.1]]), np.array([[0.5, 3.0, 1.0]])
    out = extrapolation.extrapolate(new, previous, 0.5)
    np.testing.assert_allclose(out, [[1.25, 1.5, 0.0]])  # 0.1 + 0.5·(0.1 − 1) < 0 → 0
    assert out.dtype == new.dtype and new[0, 0] == 1.0  # a new array
    assert extrapolation.extrapolate(new.astype(np.float32), previous, 0.3).dtype == np.float64


def test_balance_equalizes_the_norms():
    sq_w, sq_h = np.array([4.0, 1.0, 0.0, 9.0]), np.array([1.0, 16.0, 5.0, 0.0])
    scale = np.array(extrapolation.balance(sq_w, sq_h))
    np.testing.assert_allclose(sq_w[:2] * scale[:2] ** 2, sq_h[:2] / scale[:2] ** 2)
    np.testing.assert_array_equal(scale[2:], 1.0)  # a zero component is left alone
    f = np.ones((4, 3), dtype=np.float32)
    assert extrapolation.rescaled(f, tuple(scale)).dtype == np.float32
    inverse = extrapolation.rescaled(f, tuple(scale), inverse=True)
    np.testing.assert_allclose(inverse[:, 0], 1 / scale)
    assert extrapolation.rescaled(f, None) is f


def test_balance_stays_finite_where_the_ratio_of_the_squares_leaves_the_floats():
    """A component of W of 1e-161 against one of H of 1 (hypothesis found it: a fit of a
    matrix holding 3e-161 and 1 ended in NaN): its square, 3e-322, overflows the ratio; and
    the other way round it underflows to 0, a scale that made H infinite."""
    sq_w = np.array([(1.6e-161) ** 2, 3.4, 1.0])
    sq_h = np.array([3.4, (1.6e-161) ** 2, 5e-324])
    scale = np.array(extrapolation.balance(sq_w, sq_h))
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    # (3e-322 is subnormal: its few significant bits put the scales 0.4% off)
    expected = [3.4**0.25 / 1.6e-161**0.5, 1.6e-161**0.5 / 3.4**0.25]
    np.testing.assert_allclose(scale[:2], expected, rtol=1e-2)
    w = np.array([1.6e-161, 3.4**0.5]) * scale[:2]
    h = np.array([3.4**0.5, 1.6e-161]) / scale[:2]
    np.testing.assert_allclose(w, h, rtol=1e-2)  # balanced
    X = np.zeros((3, 7))
    X[0, 0], X[2, 2] = 3.03883136e-161, 1.0
    model = NMF(2, init="random", random_state=0, tol=0, max_iter=12, solver="cd")
    W = model.fit_transform(X)
    assert np.all(np.isfinite(W)) and np.all(np.isfinite(model.components_))
    assert model.reconstruction_err_ < 1e-6


X = low_rank(300, 40, 6, seed=3)
SETTINGS = dict(n_components=6, init="random", random_state=0, tol=0, max_iter=60)


def test_extrapolation_reaches_the_error_of_three_times_the_iterations():
    def error(max_iter, **kwargs):
        return NMF(**{**SETTINGS, "max_iter": max_iter}, **kwargs).fit(X).reconstruction_err_

    # 'auto': on for 'cd'
    assert error(20) < error(60, extrapolate=False)
    assert error(60) < error(200, extrapolate=False)


def test_extrapolated_fit_returns_the_recorded_nonnegative_pair():
    pushed = NMF(**SETTINGS).fit(X)
    W = pushed.transform(X)
    assert np.all(pushed.components_ >= 0) and np.all(W >= 0)
    # The returned pair is the one whose objective was the lowest recorded.
    lowest = min(pushed.loss_history_)
    assert lowest == pytest.approx(0.5 * pushed.reconstruction_err_**2, rel=1e-6)


def test_the_components_stay_balanced():
    """Without penalties the scale of a component is free; the fit keeps ‖w_t‖ ≈ ‖h_t‖ (up to
    the drift of the last iteration) instead of letting extrapolation spread them."""
    model = NMF(**SETTINGS)
    W = model.fit_transform(X)
    ratio = np.linalg.norm(W, axis=0) / np.linalg.norm(model.components_, axis=1)
    assert np.all((ratio > 0.5) & (ratio < 2)), ratio


def test_balancing_does_not_change_the_path(monkeypatch):
    """HALS and the extrapolation commute with rescaling components, so the objectives of a fit
    that balances them agree, to rounding, with those of a fit that does not."""
    balanced = NMF(**SETTINGS).fit(X).loss_history_
    monkeypatch.setattr(extrapolation, "balance", lambda w, h: tuple(np.ones(len(w))))
    unbalanced = NMF(**SETTINGS).fit(X).loss_history_
    np.testing.assert_allclose(balanced, unbalanced, rtol=1e-6)


def test_penalized_fit_is_not_rescaled(monkeypatch):
    calls = []
    real = extrapolation.balance
    monkeypatch.setattr(extrapolation, "balance", lambda *a: calls.append(1) or real(*a))
    NMF(alpha_W=0.01, **SETTINGS).fit(X)
    assert not calls
    NMF(**{**SETTINGS, "max_iter": 3}).fit(X)
    assert len(calls) == 1 + 3  # the initialization and each iteration


def test_extrapolate_parameter_errors():
    with pytest.raises(ValueError, match="'extrapolate' parameter of NMF must be a bool or 'auto'"):
        NMF(2, extrapolate="yes").fit(X)
    with pytest.raises(ValueError, match="solver 'cd'/'hals' only"):
        NMF(2, solver="mu", extrapolate=True).fit(X)
    model = NMF(2, solver="mu", max_iter=5).fit(X)  # 'auto' is off for 'mu'
    assert math.isfinite(model.reconstruction_err_)


def test_the_stopping_rule_needs_a_window_of_small_violations():
    window = extrapolation.STOP_WINDOW
    dip = [1.0, 1e-3, 1e-6] + [1e-3] * (window - 3)
    assert not extrapolation.converged(len(dip), 1e-4, {"violation": dip})
    settled = [1.0] + [1e-5] * window
    assert extrapolation.converged(len(settled), 1e-4, {"violation": settled})
    assert not extrapolation.converged(3, 1e-4, {"violation": [1.0, 1e-6, 1e-6]})  # too few
    assert extrapolation.converged(1, 1e-4, {"violation": [0.0]})  # nothing to do


@pytest.mark.parametrize("extrapolate", [True, False])
def test_an_extrapolated_fit_stops_by_the_windowed_rule(monkeypatch, extrapolate):
    calls = []
    real = extrapolation.converged
    monkeypatch.setattr(extrapolation, "converged", lambda *a: calls.append(1) or real(*a))
    model = NMF(**{**SETTINGS, "tol": 1e-3, "max_iter": 200, "extrapolate": extrapolate}).fit(X)
    assert bool(calls) == extrapolate
    assert model.n_iter_ < 200 and (model.n_iter_ >= extrapolation.STOP_WINDOW or not extrapolate)


@pytest.mark.parametrize("layout", ["rows", "blocks"])
def test_auto_gives_extrapolation_up_where_the_objective_underflows(layout):
    """X·1e-200: ‖X‖² underflows float64, so the objective that controls the pushes is 0 at
    every iteration; with them the fit ran its 200 iterations to twice the relative error of
    X's own fit (hypothesis, against scikit-learn). 'auto' drops extrapolation there: the fit
    of extrapolate=False, bit for bit, whose error is X's; at 1e-150 it extrapolates."""
    X = np.random.default_rng(0).uniform(size=(4, 3))
    settings = dict(init="random", random_state=0, max_iter=200, tol=1e-6, layout=layout)

    def fit(scale, **more):
        model = NMF(2, **settings, **more)
        W = model.fit_transform(X * scale)
        c = np.sqrt(scale)
        error = np.linalg.norm(X - (W / c) @ (model.components_ / c)) / np.linalg.norm(X)
        return model, error

    auto, error = fit(1e-200)
    plain, _ = fit(1e-200, extrapolate=False)
    assert np.array_equal(auto.components_, plain.components_)
    _, expected = fit(1.0, extrapolate=False)
    np.testing.assert_allclose(error, expected, rtol=1e-6)
    auto, error = fit(1e-150)
    plain, _ = fit(1e-150, extrapolate=False)
    assert not np.array_equal(auto.components_, plain.components_)  # extrapolated
    np.testing.assert_allclose(error, expected, rtol=1e-3)


# A fit whose iteration 12 is a push that raises the objective 8.3-fold (iteration 13 restarts).
CUT = np.array(
    [
        [55.84424345, 25.70370308, 92.74129709, 19.06330567, 74.40416333, 54.80969841, 0.84062436],
        [56.71174617, 12.30132115, 24.1499001, 31.03537436, 97.04793986, 77.98756658, 49.21979138],
        [94.47146974, 72.213155, 93.23769838, 33.43965275, 98.83789546, 16.30739865, 11.09859177],
        [39.51144501, 71.68339118, 38.51082748, 40.19037606, 96.14596508, 32.12761294, 51.22970725],
    ]
)


@pytest.mark.parametrize("where", ["rows", "blocks", "cluster-rows", "cluster-blocks"])
def test_a_fit_returns_its_best_iterate(where, tmp_path, request):
    """Cut by max_iter = 12 right after a push that raised the objective 8.3-fold, the fit
    returned that pushed pair. It now returns the iterate of the lowest objective (10 here:
    11 is 2e-4 above it);
    n_iter_ and loss_history_ still count and record every iteration, and the
    ConvergenceWarning comes. A checkpoint whose iteration is not the best holds the best
    iterate too, so fits resumed from it return what the uninterrupted ones return."""
    import dask.array as da
    from sklearn.exceptions import ConvergenceWarning

    X = CUT
    settings = dict(init="random", random_state=0, tol=1e-12, extrapolate=True)
    if where.startswith("cluster"):
        request.getfixturevalue("cluster")
        X = da.from_array(CUT, chunks=(2, 7))
    settings["layout"] = where.removeprefix("cluster-")
    settings["panel_bytes"] = 2 * 4 * 8 if where.endswith("blocks") else None
    longer = NMF(1, max_iter=13, **settings).fit(X)
    assert longer.loss_history_[12] > 8 * longer.loss_history_[11]  # the rise it is about

    for every, generation, best in ((1, 12, 10), (5, 10, None)):
        checkpoint = tmp_path / f"every-{every}"
        with pytest.warns(ConvergenceWarning, match="Maximum number of iterations 12"):
            cut = NMF(1, max_iter=12, checkpoint=checkpoint, checkpoint_every=every, **settings)
            cut.fit(X)
        assert cut.layout_["scheme"] == settings["layout"]
        assert cut.n_iter_ == 12 and cut.loss_history_ == longer.loss_history_[:13]
        assert np.argmin(cut.loss_history_) == 10
        assert 0.5 * cut.reconstruction_err_**2 == pytest.approx(cut.loss_history_[10], rel=1e-9)
        assert [p.name for p in checkpoint.iterdir()] == [f"iter-{generation:08d}"]
        state = checkpoint / f"iter-{generation:08d}" / "state.json"
        assert json.loads(state.read_text())["best"] == best  # None: the iteration itself
        at_10 = NMF(1, max_iter=10, **settings).fit(X)
        np.testing.assert_array_equal(cut.components_, at_10.components_)
        np.testing.assert_array_equal(np.asarray(cut.W_), np.asarray(at_10.W_))
        for max_iter, reference in ((12, cut), (13, longer)):  # from 12 and from 10
            resumed = NMF(1, max_iter=max_iter, checkpoint=checkpoint, resume=True, **settings)
            W = resumed.fit_transform(X)
            np.testing.assert_array_equal(resumed.components_, reference.components_)
            np.testing.assert_array_equal(np.asarray(W), np.asarray(reference.W_))
            assert resumed.loss_history_ == reference.loss_history_
            assert resumed.n_iter_ == reference.n_iter_


def test_a_push_that_leaves_a_component_near_zero_does_not_overflow_the_fit():
    """X of 1e50 with a background of 1e-128, k = 2 (found by hypothesis): a push left a
    component of H at 1e-104 of the other, HALS divided by its curvature, W reached 1e130 and
    the objective overflowed — a ValueError saying X's values were too large for float64. Such
    a component is now left as it is for that update (``hals._curved``); the fit ends at the
    plain fit's error."""
    X = np.full((11, 6), 1.05258366e-128)
    X[0, 1], X[0, 2], X[1, 1], X[10, 3] = 1.5e50, 1e50, 1e50, 1e50
    settings = dict(init="random", random_state=0, tol=0, max_iter=12, solver="cd")
    pushed = NMF(2, **settings).fit(X)
    plain = NMF(2, extrapolate=False, **settings).fit(X)
    assert pushed.reconstruction_err_ == pytest.approx(plain.reconstruction_err_, rel=1e-9)
    assert np.all(np.isfinite(pushed.components_))


@pytest.mark.parametrize("layout", ["rows", "blocks"])
def test_a_fit_whose_pushes_overflow_stops_at_its_best_iterate(layout):
    """The same X with 2e50 and 7e50: a push left all of H near zero, W's update left the
    floats at iteration 8, and the NaN objective went into loss_history_. The fit now stops
    there with a warning and returns its best iterate (X itself overflowing the dtype, at the
    first iteration, is still an error: tests/test_bad_input.py)."""
    X = np.full((11, 6), 1.05258366e-128)
    X[0, 1], X[0, 2], X[1, 1], X[10, 3] = 2e50, 7e50, 1e50, 1e50
    settings = dict(init="random", random_state=0, tol=0, max_iter=12, solver="cd", layout=layout)
    settings["panel_bytes"] = 2 * 6 * 8 * 2 if layout == "blocks" else None
    with pytest.warns(RuntimeWarning, match="became NaN at iteration 8: an extrapolation push"):
        model = NMF(2, **settings).fit(X)
    assert model.layout_["scheme"] == layout and model.n_iter_ == 7
    loss = np.array(model.loss_history_)
    assert len(loss) == 8 and np.all(np.isfinite(loss))
    assert 0.5 * model.reconstruction_err_**2 == pytest.approx(loss.min(), rel=1e-9)
    assert np.all(np.isfinite(model.components_)) and np.all(np.isfinite(model.W_))
