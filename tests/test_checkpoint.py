"""Checkpoints: atomic generations, resuming bit-identically, refusing a checkpoint that does
not fit. (Killing a real process mid-fit and resuming it: tests/test_cli.py.)"""

import json

import dask
import numpy as np
import pytest
from conftest import low_rank

from dasknmf import NMF, save_matrix
from dasknmf.checkpoint import CheckpointError

BASE = dict(n_components=4, init="random", random_state=0, tol=0, panel_bytes=200 * 30 * 8 // 4)


@pytest.fixture(scope="module")
def X():
    return low_rank(200, 30, 4)


def _generations(path):
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"shuffle": True},
        {"alpha_W": 0.01},
        {"extrapolate": False},
        {"solver": "mu"},
        {"solver": "mu", "beta_loss": "kullback-leibler", "alpha_W": 0.01},
        # 40 panels of 5 rows, updated 2 at a time, stacked (a fan-in of 2)
        {"panel_bytes": 5 * 30 * 8, "layout": "rows", "config": {"dasknmf.split-every": 2}},
    ],
    ids=["hals", "hals-shuffle", "hals-penalized", "hals-plain", "mu", "kl", "hals-stacked"],
)
def test_resumed_fit_is_bit_identical(X, tmp_path, settings):
    settings = dict(settings)
    with dask.config.set(settings.pop("config", {})):
        _resume_and_compare(X, tmp_path, settings)


def _resume_and_compare(X, tmp_path, settings):
    kwargs = dict(BASE, **settings)
    reference = NMF(max_iter=10, **kwargs)
    W_ref = reference.fit_transform(X)
    first = NMF(max_iter=7, checkpoint=tmp_path, checkpoint_every=3, **kwargs).fit(X)
    assert first.n_iter_ == 7
    assert _generations(tmp_path) == ["iter-00000006"]  # the older generation is gone
    resumed = NMF(max_iter=10, checkpoint=tmp_path, checkpoint_every=3, resume=True, **kwargs)
    W = resumed.fit_transform(X)
    np.testing.assert_array_equal(W, W_ref)
    np.testing.assert_array_equal(resumed.components_, reference.components_)
    assert resumed.loss_history_ == reference.loss_history_
    assert resumed.n_iter_ == 10
    assert resumed.reconstruction_err_ == reference.reconstruction_err_
    assert _generations(tmp_path) == ["iter-00000009"]
    assert resumed.layout_.get("stacked") == (2 if "panel_bytes" in settings else None)


def test_resume_on_a_cluster_from_zarr(cluster, X, tmp_path):
    """The blocks of W are written and read by the workers; the result equals both an
    uninterrupted cluster fit and the in-memory one."""
    path = save_matrix(tmp_path / "X.zarr", X, chunks=(50, 30))
    kwargs = dict(BASE, cache=False)
    reference = NMF(max_iter=8, **kwargs).fit(X)
    checkpoint = tmp_path / "ckpt"
    NMF(max_iter=5, checkpoint=checkpoint, checkpoint_every=5, **kwargs).fit(str(path))
    state = json.loads((checkpoint / "iter-00000005" / "state.json").read_text())
    assert state["n_iter"] == 5 and state["n_wt"] == 4
    resumed = NMF(max_iter=8, checkpoint=checkpoint, resume=True, **kwargs)
    W = resumed.fit_transform(str(path))
    np.testing.assert_array_equal(W.compute(), reference.W_)
    np.testing.assert_array_equal(resumed.components_, reference.components_)
    assert resumed.loss_history_ == reference.loss_history_


@pytest.mark.parametrize("settings", [{}, {"shuffle": True}, {"extrapolate": False}])
def test_a_checkpoint_between_folded_iterations_resumes_on_a_cluster(
    cluster, X, tmp_path, settings
):
    """On a cluster the H of iteration t is formed by iteration t + 1's shard tasks (``fold``):
    a checkpoint after t, while t + 1 and t + 2 are in flight, saves that H, the extrapolation
    state and the shuffling generator's state of t + 1; the resumed fit equals the uninterrupted
    one and the in-memory one, bit for bit."""
    import dask.array as da
    from dask.utils import key_split
    from distributed import get_task_stream

    from dasknmf import engine

    kwargs = {**BASE, **settings}
    reference = NMF(max_iter=10, **kwargs).fit(X)
    Xd = da.from_array(X, chunks=(50, 30))
    checkpoint = tmp_path / "ckpt"

    class StopError(Exception):
        pass

    record = engine.record_summary

    def stop_after_seven(history, objective, norm_x_sq, n_iter, summary):
        if n_iter == 8:  # iteration 7 is checkpointed, 8 and 9 were submitted
            raise StopError
        return record(history, objective, norm_x_sq, n_iter, summary)

    engine.record_summary = stop_after_seven
    try:
        with pytest.raises(StopError), get_task_stream() as stream:
            NMF(max_iter=10, checkpoint=checkpoint, checkpoint_every=7, **kwargs).fit(Xd)
    finally:
        engine.record_summary = record
    assert "folded_shard_step" in {key_split(task["key"]) for task in stream.data}
    assert _generations(checkpoint) == ["iter-00000007"]
    resumed = NMF(max_iter=10, checkpoint=checkpoint, resume=True, **kwargs).fit(Xd)
    np.testing.assert_array_equal(resumed.components_, reference.components_)
    assert resumed.loss_history_ == reference.loss_history_


@pytest.mark.parametrize("layout", ["rows", "blocks"])
def test_resume_with_nothing_left_to_do_returns_the_checkpoint(X, tmp_path, layout):
    """(2-D blocks: W was then taken from the bands' states as an iteration leaves them, and
    the checkpoint's blocks failed with an AxisError.)"""
    settings = dict(BASE, layout=layout, checkpoint=tmp_path, checkpoint_every=3, max_iter=6)
    done = NMF(**settings).fit(X)
    again = NMF(resume=True, **settings).fit(X)
    assert again.n_iter_ == 6
    np.testing.assert_array_equal(again.components_, done.components_)
    assert again.reconstruction_err_ == done.reconstruction_err_


def test_a_partial_generation_is_ignored_and_cleaned_up(X, tmp_path):
    """What a process killed while writing leaves: a temporary folder without state.json."""
    NMF(max_iter=4, checkpoint=tmp_path, checkpoint_every=2, **BASE).fit(X)
    partial = tmp_path / ".iter-00000006.partial-deadbeef"
    (partial / "wt-0").mkdir(parents=True)
    reference = NMF(max_iter=6, **BASE).fit(X)
    resumed = NMF(max_iter=6, checkpoint=tmp_path, checkpoint_every=2, resume=True, **BASE)
    resumed.fit(X)
    np.testing.assert_array_equal(resumed.components_, reference.components_)
    assert _generations(tmp_path) == ["iter-00000006"]


def test_no_checkpoint_to_resume_from(X, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        NMF(max_iter=4, checkpoint=tmp_path / "none", resume=True, **BASE).fit(X)
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        NMF(max_iter=4, resume=True, **BASE).fit(X)


@pytest.mark.parametrize(
    "change, kind, key",
    [
        ({"n_components": 3}, "other settings", "settings.n_components"),
        ({"alpha_W": 0.1}, "other settings", "settings.l2_w"),
        ({"solver": "mu"}, "other settings", "settings.solver"),
        ({"random_state": 1}, "other settings", "settings.random_state"),
        ({"panel_bytes": 200 * 30 * 8 // 2}, "other settings", "settings.panels"),
    ],
)
def test_a_checkpoint_of_other_settings_is_refused(X, tmp_path, change, kind, key):
    NMF(max_iter=2, checkpoint=tmp_path, checkpoint_every=2, **BASE).fit(X)
    before = _generations(tmp_path)
    kwargs = dict(BASE, **change)
    with pytest.raises(CheckpointError, match=f"written for {kind} .*{key}"):
        NMF(max_iter=4, checkpoint=tmp_path, resume=True, **kwargs).fit(X)
    assert _generations(tmp_path) == before  # the checkpoint is left as it was


def test_a_checkpoint_of_another_input_is_refused(X, tmp_path):
    NMF(max_iter=2, checkpoint=tmp_path, checkpoint_every=2, **BASE).fit(X)
    other = X.copy()
    other[0, 0] += 1.0
    with pytest.raises(CheckpointError, match=r"written for another input \(input.sum"):
        NMF(max_iter=4, checkpoint=tmp_path, resume=True, **BASE).fit(other)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"checkpoint_every": 2.5}, "checkpoint_every"),
        ({"checkpoint": 3}, "checkpoint"),
        ({"resume": "yes"}, "resume"),
    ],
)
def test_bad_checkpoint_parameters(X, tmp_path, params, match):
    with pytest.raises(ValueError, match=f"The '{match}' parameter"):
        NMF(max_iter=2, **dict({"checkpoint": tmp_path}, **params), **BASE).fit(X)
