"""The fit pipeline on its own: what an estimator hands it, what it hands back, and the
progress it reports."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from conftest import low_rank

from dasknmf import NMF, pipeline
from dasknmf.history import History


def test_the_estimator_hands_the_pipeline_one_plan(monkeypatch):
    calls = []
    fit = pipeline.fit

    def recording(X, plan):
        calls.append(plan)
        return fit(X, plan)

    monkeypatch.setattr(pipeline, "fit", recording)
    X = low_rank(60, 12, 3)
    model = NMF(3, init="random", random_state=0, max_iter=30, tol=0).fit(X)
    (plan,) = calls
    assert plan.n_components == 3 and plan.init == "random" and plan.max_iter == 30
    objective = plan.objective(60, 12, 3, 60 * 12)
    assert objective.solver == "hals" and objective.beta == 2
    assert model.n_iter_ == 30 and len(model.loss_history_) == 31


def test_a_plan_fits_without_an_estimator():
    """What a new estimator does: describe the fit, call the pipeline, read the result."""
    X = low_rank(80, 10, 2)
    reference = NMF(2, init="random", random_state=0, max_iter=25, tol=0)
    W = reference.fit_transform(X)
    plan = pipeline.Plan(
        n_components=2,
        init="random",
        objective=reference._objective,
        max_iter=25,
        tol=0.0,
        panel_bytes=16 * 2**20,
        random_state=0,
    )
    fitted = pipeline.fit(X, plan)
    np.testing.assert_array_equal(fitted.components, reference.components_)
    np.testing.assert_array_equal(fitted.W, W)
    assert fitted.n_iter == 25 and fitted.loss_history == reference.loss_history_
    assert fitted.reconstruction_err == reference.reconstruction_err_


def test_a_plan_is_checked_by_the_pipeline_too():
    plan = pipeline.Plan(
        n_components=2,
        init="random",
        objective=NMF(2)._objective,
        max_iter=5,
        tol=0.0,
        panel_bytes=2**20,
    )
    with pytest.raises(ValueError, match="Negative values in data passed to NMF"):
        pipeline.fit(-np.ones((5, 4)), plan)


def test_the_progress_bar_shows_the_best_objective_and_the_restarts(monkeypatch):
    """An extrapolated fit's objective jumps up at a restart; the bar shows the lowest value so
    far and counts the rises, instead of the raw jump."""
    from tqdm import tqdm

    stream = io.StringIO()
    monkeypatch.setattr(
        "tqdm.auto.tqdm", lambda **kw: tqdm(**kw, file=stream, mininterval=0, ascii=True)
    )
    history = History(loss=[10.0])
    with pipeline.Reporter(verbose=0, progress=True, max_iter=4) as report:
        for n_iter, loss in enumerate([8.0, 22.0, 7.0], start=1):
            history.loss.append(loss)
            report(n_iter, history)
            shown = re.findall(r"best_objective=([\d.e+]+), restarts=(\d+)", stream.getvalue())
            best, rises = shown[-1]
            assert float(best) == min(history.loss)
            assert int(rises) == (1 if n_iter >= 2 else 0)


def test_the_layout_is_reported_and_saved(tmp_path):
    """Which scheme cut X (row panels of X, or of Xᵀ for a wide X) is an attribute of the
    fitted model, kept when it is saved."""
    import dasknmf

    tall = NMF(2, init="random", random_state=0, max_iter=3, panel_bytes=40 * 12 * 8)
    tall.fit(low_rank(200, 12, 2))
    assert tall.layout_ == {"scheme": "rows", "panels": 5, "cached": True}
    wide = NMF(2, init="random", random_state=0, max_iter=3, panel_bytes=600)
    wide.fit(low_rank(8, 3000, 2))  # one row with H and the partials exceeds 600 bytes
    assert wide.layout_["scheme"] == "columns"
    wide.save(tmp_path / "wide.zarr")
    assert dasknmf.load(tmp_path / "wide.zarr").layout_ == wide.layout_
