"""MiniBatchNMF: scikit-learn's results step for step, in memory, on Dask and on a cluster;
partial_fit; saved models updated with new rows (``dasknmf update``); bad input."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import MiniBatchNMF as SkMiniBatchNMF
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import check_estimator

import dasknmf
from dasknmf import NMF, InvalidParameterError, MiniBatchNMF
from dasknmf.checkpoint import CheckpointError
from tests.conftest import last_json, low_rank, run_cli, scheduler_order

K = 4


def _start(m: int, n: int, k: int = K, seed: int = 1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.1, 1, (m, k)).astype(dtype), rng.uniform(0.1, 1, (k, n)).astype(dtype)


def _fit_both(X, **params):
    """The same fit by scikit-learn and by dasknmf from the same custom start."""
    W0, H0 = _start(X.shape[0], X.shape[1], dtype=X.dtype)
    settings = {"n_components": K, "init": "custom", "batch_size": 40, **params}
    fits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for cls in (SkMiniBatchNMF, MiniBatchNMF):
            model = cls(**settings)
            # scikit-learn updates the H it is given in place: each fit gets its own copies.
            W = model.fit_transform(X, W=W0.copy(), H=H0.copy())
            fits.append((model, np.asarray(W)))
    return fits


def _same_fit(ours, theirs, rtol=1e-9):
    (sk, w_sk), (dk, w_dk) = theirs, ours
    assert (dk.n_iter_, dk.n_steps_) == (sk.n_iter_, sk.n_steps_)
    np.testing.assert_allclose(dk.components_, sk.components_, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(w_dk, w_sk, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(dk.reconstruction_err_, sk.reconstruction_err_, rtol=1e-9)


@pytest.mark.parametrize(
    "beta_loss, sparse",
    [(beta, sparse) for beta in ("frobenius", "kullback-leibler", 0.5) for sparse in (0, 1)]
    + [("itakura-saito", 0)],  # β <= 0 needs X without zeros: dense only
)
def test_steps_are_sklearns(beta_loss, sparse):
    X = low_rank(230, 30, K, seed=3)
    if sparse:
        X = sp.csr_matrix(np.where(X > np.median(X), X, 0.0))
    sk, ours = _fit_both(X, beta_loss=beta_loss, max_iter=15, tol=0)
    _same_fit(ours, sk)


@pytest.mark.parametrize(
    "params",
    [
        {"tol": 1e-3},  # stops on a small change of H
        {"max_no_improvement": 2, "tol": 0},  # stops on the smoothed cost
        {"fresh_restarts": True, "max_iter": 10},
        {"alpha_W": 0.01, "alpha_H": 0.05, "l1_ratio": 0.3, "max_iter": 10},
        {"beta_loss": 1, "alpha_W": 0.02, "forget_factor": 0.4, "batch_size": 33},
    ],
)
def test_stopping_restarts_and_penalties_are_sklearns(params):
    sk, ours = _fit_both(low_rank(230, 30, K, seed=4), **{"max_iter": 200, **params})
    _same_fit(ours, sk)
    if "tol" in params or "max_no_improvement" in params:
        assert ours[0].n_iter_ < 200  # the rule stopped it


def test_float32_and_transform_are_sklearns():
    X = low_rank(150, 20, K, dtype=np.float32)
    sk, ours = _fit_both(X, max_iter=8, tol=0)
    assert ours[0].components_.dtype == np.float32 and ours[1].dtype == np.float32
    np.testing.assert_allclose(ours[0].components_, sk[0].components_, rtol=1e-5)
    X64 = low_rank(150, 20, K)
    sk, ours = _fit_both(X64, max_iter=8, tol=0)
    np.testing.assert_allclose(ours[0].transform(X64[:30]), sk[0].transform(X64[:30]), rtol=1e-9)


def test_partial_fit_is_sklearns():
    X = low_rank(300, 25, K, seed=5)
    W0, H0 = _start(100, 25)
    models = [cls(K, init="custom", batch_size=64) for cls in (SkMiniBatchNMF, MiniBatchNMF)]
    for model in models:
        model.partial_fit(X[:100], W=W0.copy(), H=H0.copy())
        for start in (100, 200):
            model.partial_fit(X[start : start + 100])
    sk, ours = models
    assert ours.n_steps_ == sk.n_steps_ == 3
    np.testing.assert_allclose(ours.components_, sk.components_, rtol=1e-10)
    np.testing.assert_allclose(ours._components_denominator, sk._components_denominator, rtol=1e-10)


def test_sklearn_check_estimator():
    """With the settings scikit-learn's own test suite gives its MiniBatchNMF."""
    model = MiniBatchNMF(batch_size=10, max_iter=20, fresh_restarts=True)
    results = check_estimator(model, on_fail=None)
    failed = {r["check_name"]: str(r["exception"]) for r in results if r["status"] == "failed"}
    assert failed == {}
    assert {r["check_name"] for r in results if r["status"] == "skipped"} <= {
        "check_array_api_input"
    }
    assert len(results) > 40


# ---- Dask, Zarr and a cluster ---------------------------------------------------------------


def _fit(X, shape=None, **params):
    W0, H0 = _start(*(shape or X.shape))
    settings = {"init": "custom", "batch_size": 40, "max_iter": 6, "tol": 0, **params}
    model = MiniBatchNMF(K, **settings)
    W = model.fit_transform(X, W=W0, H=H0)
    return model, np.asarray(W)


def test_dask_and_zarr_batches_are_the_in_memory_ones(tmp_path):
    """Chunks of batch_size rows: the same batches, the same factors bit for bit."""
    X = low_rank(230, 30, K)
    expected, w_expected = _fit(X)
    dasknmf.save_matrix(tmp_path / "X.zarr", X, chunks=(40, 30))
    for source in (da.from_array(X, chunks=(40, 30)), str(tmp_path / "X.zarr")):
        model, W = _fit(source, X.shape)
        assert isinstance(model.W_, da.Array)
        assert np.array_equal(model.components_, expected.components_)
        assert np.array_equal(W, w_expected)
        assert model.n_steps_ == expected.n_steps_ and model.layout_["panels"] == 6
    W = model.transform(str(tmp_path / "X.zarr"))
    assert isinstance(W, da.Array)
    np.testing.assert_allclose(W.compute(), expected.transform(X), rtol=1e-6)


def test_a_csr_store_is_read_in_batches_of_batch_size_rows(tmp_path):
    """A CSR store's panels are opened at batch_size rows: the in-memory batches, steps and
    factors bit for bit. Its stored bytes alone made one panel of all rows — one batch an
    epoch, whatever batch_size said."""
    from dask.utils import key_split

    dense = low_rank(230, 30, K)
    X = sp.csr_matrix(np.where(dense > 0.6, dense, 0))
    expected, w_expected = _fit(X)
    path = dasknmf.save_matrix(tmp_path / "X.zarr", X)
    model, W = _fit(str(path), X.shape)
    assert model.layout_["panels"] == 6 and model.n_steps_ == expected.n_steps_
    assert np.array_equal(model.components_, expected.components_)
    assert np.array_equal(W, w_expected)
    # transform reads the store in panels of its own: one read here, not one per batch (a
    # CSR read decompresses whole stored chunks, whatever rows it wants)
    graph = dict(model.transform(str(path)).__dask_graph__())
    assert sum(key_split(key) == "read_rows-from-value" for key in graph) == 1


def test_a_chunk_taller_than_batch_size_is_one_batch():
    X = low_rank(230, 30, K)
    model, _ = _fit(da.from_array(X, chunks=(100, 30)))
    assert model.layout_["panels"] == 3 and model.n_steps_ == 18


def test_on_a_cluster(cluster):
    X = low_rank(400, 30, K, seed=2)
    expected, w_expected = _fit(X)
    one, w_one = _fit(da.from_array(X, chunks=(40, 30)), parallel_batches=1)
    assert np.array_equal(one.components_, expected.components_)
    assert np.array_equal(w_one, w_expected)
    # One batch per worker in a step (the default): two batches, H updated once from both.
    both, _ = _fit(da.from_array(X, chunks=(40, 30)))
    assert both.n_steps_ == expected.n_steps_ == 60
    assert both.reconstruction_err_ < 1.05 * expected.reconstruction_err_
    assert not np.array_equal(both.components_, expected.components_)
    # partial_fit from a Dask array of several panels: one step, the panels' sums added.
    W0, H0 = _start(200, 30)
    memory = MiniBatchNMF(K, init="custom").partial_fit(X[:200], W=W0, H=H0)
    lazy = MiniBatchNMF(K, init="custom", panel_bytes=50 * 30 * 8)
    lazy.partial_fit(da.from_array(X[:200], chunks=(50, 30)), W=W0, H=H0)
    np.testing.assert_allclose(lazy.components_, memory.components_, rtol=1e-6)


@pytest.mark.parametrize("cache", ["auto", False])
def test_a_csr_store_on_a_cluster_is_cached_when_it_fits(cluster, tmp_path, cache):
    """With cache='auto' a CSR store's batches are kept on the workers when they fit (before,
    each batch was read from the store in every epoch — a whole stored chunk of entries for
    each). Their size is known from the store's indptr, so they are cached first and the
    validation pass reads them from memory: the store is read once, not twice. The bits are
    the in-memory fit's either way."""
    from dask.utils import key_split

    dense = low_rank(400, 30, K, seed=3)
    X = sp.csr_matrix(np.where(dense > 0.6, dense, 0))
    settings = {"parallel_batches": 1}
    expected, w_expected = _fit(X, **settings)
    path = dasknmf.save_matrix(tmp_path / "X.zarr", X)
    with scheduler_order(cluster) as events:
        model, W = _fit(str(path), X.shape, cache=cache, **settings)
    assert model.layout_["panels"] == 10 and model.layout_["cached"] == (cache == "auto")
    # In the scheduler's order (the workers' clocks, shifted by estimates of their offsets,
    # once put a copy's end a quarter of a second after a validation task's start).
    names = [key_split(e[0]) for e in events]
    copied = [i for i, e in enumerate(events) if names[i] == "aligned_copy" and e[2] == "memory"]
    validating = [i for i, name in enumerate(names) if name == "moments_task"]
    if cache == "auto":  # the copies into memory, then the validation pass on them
        assert len(copied) == 10
        assert sum(events[i][2] == "memory" for i in validating) == 10
        assert max(copied) < min(validating)
    else:
        assert "aligned_copy" not in names
    assert np.array_equal(model.components_, expected.components_)
    assert np.array_equal(W, w_expected)


def test_a_step_on_a_cluster_is_a_task_per_batch_and_one_for_h(cluster):
    """On a cluster a step runs a task per batch, one taking its W out, and one step task for
    H, A and B, whose output the next step and the driver take whole (``StepOut``): no task
    picks them apart. The next step is submitted before the summary is read and dropped when
    the rule stops the fit, which stops where the fit in memory stops, with its bits."""
    from dask.utils import key_split
    from distributed import get_task_stream

    X = low_rank(230, 30, K, seed=8)
    settings = {"max_no_improvement": 3, "tol": 1e-3, "max_iter": 200, "parallel_batches": 1}
    expected, w_expected = _fit(X, **settings)
    assert expected.n_iter_ < 200  # stopped by its rule
    with get_task_stream(cluster) as stream:
        got, w_got = _fit(da.from_array(X, chunks=(40, 30)), **settings)
    assert (got.n_iter_, got.n_steps_) == (expected.n_iter_, expected.n_steps_)
    assert np.array_equal(got.components_, expected.components_)
    assert np.array_equal(w_got, w_expected)
    prefixes = [key_split(task["key"]) for task in stream.data]
    steps = got.n_steps_  # one batch per step
    # Each step's tasks ran (those of the step submitted ahead may have run too); a task
    # picking an item of a step's output would be a 'getitem' per step.
    assert steps <= prefixes.count("step_update") <= steps + 1
    assert steps <= prefixes.count("batch_task") <= steps + 1
    assert prefixes.count("getitem") < 4


def test_the_scheduler_holds_no_more_tasks_late_in_a_fit_than_early(cluster, monkeypatch):
    """Issue 11's bound, for MiniBatchNMF: the lineage of H, A, B and of the W blocks that
    steps made is cut every ``minibatch.LINEAGE_EVERY`` steps (5 here), so the task states
    the scheduler holds late in a fit are no more than early on; without the cuts they grow
    with every step (checked first). A cut parks the W blocks made since the last one only,
    not every batch's (a task each: on 489 batches a cut cost more than 20 steps' tasks)."""
    from dasknmf import minibatch
    from dasknmf.ops import FutureOps

    X = da.from_array(low_rank(400, 30, K, seed=4), chunks=(20, 30))  # 20 batches: 10 steps
    counts, parked = {}, []
    judge, detach = minibatch.Convergence.__call__, FutureOps.detach

    def counting(self, step, *args):
        counts[step] = cluster.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        return judge(self, step, *args)

    def counted_detach(self, futures):
        parked.append(len(futures))
        return detach(self, futures)

    monkeypatch.setattr(minibatch.Convergence, "__call__", counting)
    monkeypatch.setattr(FutureOps, "detach", counted_detach)
    settings = dict(max_iter=12, tol=0, max_no_improvement=None, parallel_batches=2, batch_size=20)
    with monkeypatch.context() as uncut:
        uncut.setattr(minibatch, "LINEAGE_EVERY", 10**9)
        _fit(X, **settings)
    assert counts[120] > counts[20] + 50 and not parked
    counts.clear()
    monkeypatch.setattr(minibatch, "LINEAGE_EVERY", 5)
    _fit(X, **settings)
    early = max(counts[i] for i in range(20, 30))
    late = max(counts[i] for i in range(110, 121))
    assert late <= early + 10, (early, late)
    # The W blocks of the 6 steps since the last cut at most (the one submitted ahead
    # included), with H, A and B.
    assert len(parked) == 23 and max(parked) == 2 * 6 + 3, parked


def test_the_batches_of_a_step_run_on_different_workers(cluster):
    """Consecutive batches are placed on the worker threads in turn (``Panels.interleaved``),
    so that the batches of a step — consecutive — run at once, one per worker, cached or read
    from the store (before, a step's batches lay in one worker's run of panels and ran one
    after the other there); the bits are those of the fit in memory."""
    from dask.utils import key_split

    from dasknmf import minibatch
    from dasknmf.ops import FutureOps

    X = low_rank(400, 30, K, seed=8)
    settings = {"tol": 0, "max_no_improvement": None, "max_iter": 2, "parallel_batches": 2}
    expected, _ = _fit(X, **settings)
    asked, submit = [], FutureOps.map

    def recording(self, fn, items, *common, workers=None):
        futures = submit(self, fn, items, *common, workers=workers)
        if fn is minibatch.batch_task:
            asked.append(list(zip([f.key for f in futures], workers, strict=True)))
        return futures

    for cache in (True, False):
        asked.clear()
        with scheduler_order(cluster) as events, pytest.MonkeyPatch.context() as patch:
            patch.setattr(FutureOps, "map", recording)
            got, _ = _fit(da.from_array(X, chunks=(40, 30)), cache=cache, **settings)
        assert np.array_equal(got.components_, expected.components_)
        # Each step asks for its batches on different workers ...
        assert len(asked) == 10 and all(len({w for _, w in step}) == 2 for step in asked)
        ran = {e[0]: e[3] for e in events if e[2] == "memory" and key_split(e[0]) == "batch_task"}
        assert len(ran) == 20  # 10 batches of 40 rows, 2 epochs
        # ... and the scheduler runs them there (loose restrictions: a worker that is gone
        # would not hold the fit up). The test once paired a step's batches by the task
        # stream's start times, workers' clocks shifted by estimates of their offsets, and in
        # about 1 of 8 runs of the suite saw a step's batches on one worker.
        assert [[ran[key] for key, _ in step] for step in asked] == [
            [worker for _, worker in step] for step in asked
        ], cache


# ---- saved models and updates -------------------------------------------------------------


def test_save_load_and_partial_fit_go_on_as_unsaved(tmp_path):
    X = low_rank(300, 25, K, seed=6)
    model, _ = _fit(X[:200])
    model.save(tmp_path / "m.zarr")
    loaded = dasknmf.load(tmp_path / "m.zarr")
    assert isinstance(loaded, MiniBatchNMF)
    assert np.array_equal(loaded.components_, model.components_)
    assert loaded.n_steps_ == model.n_steps_ and loaded._rho == model._rho
    model.partial_fit(X[200:])
    loaded.partial_fit(X[200:])
    assert np.array_equal(loaded.components_, model.components_)
    assert np.array_equal(loaded._components_numerator, model._components_numerator)
    assert isinstance(dasknmf.load(_nmf_model(tmp_path)), NMF)


def _nmf_model(tmp_path):
    path = tmp_path / "nmf.zarr"
    NMF(K, max_iter=5).fit(low_rank(50, 25, K)).save(path)
    return path


def test_update_command(tmp_path):
    X = low_rank(300, 25, K, seed=7)
    model, _ = _fit(X[:200])
    model.save(tmp_path / "m.zarr")
    dasknmf.save_matrix(tmp_path / "new.zarr", X[200:])
    record = last_json(
        run_cli(
            "update", str(tmp_path / "m.zarr"), str(tmp_path / "new.zarr"),
            "-o", str(tmp_path / "next.zarr"), "--json", "--workers", "1",
        )
    )  # fmt: skip
    assert record["rows"] == 100 and record["n_steps"] == model.n_steps_ + 1
    updated = dasknmf.load(tmp_path / "next.zarr")
    model.partial_fit(X[200:])
    np.testing.assert_allclose(updated.components_, model.components_, rtol=1e-6)
    np.testing.assert_allclose(updated.W_.compute(), model.transform(X[200:]), rtol=1e-5)
    # The same model can take the next day's rows.
    assert updated.partial_fit(X[:50]).n_steps_ == model.n_steps_ + 1


@pytest.mark.parametrize("case", ["nmf model", "width", "loss"])
def test_update_command_refuses(tmp_path, case):
    model, _ = _fit(low_rank(100, 25, K))
    model.save(tmp_path / "m.zarr")
    path = _nmf_model(tmp_path) if case == "nmf model" else tmp_path / "m.zarr"
    width = 24 if case == "width" else 25
    dasknmf.save_matrix(tmp_path / "new.zarr", low_rank(30, width, K))
    extra = ["--beta-loss", "kullback-leibler"] if case == "loss" else []
    result = run_cli(
        "update", str(path), str(tmp_path / "new.zarr"), "-o", str(tmp_path / "next.zarr"),
        "--workers", "1", *extra,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert {"nmf model": "keeps no running sums", "width": "features", "loss": "beta_loss"}[
        case
    ] in result.stderr
    assert not (tmp_path / "next.zarr").exists()


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [
        (low_rank(20, 24, K), "features"),
        (np.full((20, 25), np.nan), "NaN"),
        (-low_rank(20, 25, K), "Negative"),
    ],
)
@pytest.mark.parametrize("lazy", [False, True])
def test_a_bad_batch_leaves_the_model_as_it_was(bad, match, lazy):
    model = MiniBatchNMF(K, batch_size=20, max_iter=3, tol=0, random_state=0)
    model.fit(low_rank(60, 25, K))
    state = {k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in vars(model).items()}
    with pytest.raises(ValueError, match=match):
        model.partial_fit(da.from_array(bad, chunks=(7, bad.shape[1])) if lazy else bad)
    assert set(vars(model)) == set(state)
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(vars(model)[key], value), key
    if match != "features":  # nor does a first call start a model
        fresh = MiniBatchNMF(K)
        with pytest.raises(ValueError, match=match):
            fresh.partial_fit(bad)
        assert vars(fresh) == vars(MiniBatchNMF(K))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"forget_factor": 1.5}, "forget_factor"),
        ({"max_no_improvement": 0}, "max_no_improvement"),
        ({"fresh_restarts": "yes"}, "fresh_restarts"),
        ({"parallel_batches": 0}, "parallel_batches"),
        ({"transform_max_iter": -1}, "transform_max_iter"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(InvalidParameterError, match=match):
        MiniBatchNMF(K, **params).fit(low_rank(30, 10, K))


def test_beta_at_most_zero_refuses_zeros():
    X = low_rank(30, 10, K)
    X[0, 0] = 0
    with pytest.raises(ValueError, match="beta_loss <= 0"):
        MiniBatchNMF(K, beta_loss="itakura-saito").fit(X)


# ---- checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("fresh_restarts", [False, True])
def test_resume_is_bit_identical(tmp_path, fresh_restarts):
    X = low_rank(230, 30, K, seed=8)
    settings = {"fresh_restarts": fresh_restarts, "max_no_improvement": 3, "tol": 1e-3}
    whole, w_whole = _fit(X, max_iter=200, **settings)
    assert whole.n_iter_ < 200 and whole.n_steps_ > 12  # stopped by its rule, after step 12
    _fit(X, max_iter=2, checkpoint=tmp_path, checkpoint_every=5, **settings)  # 12 steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter-00000010"]
    resumed, w_resumed = _fit(X, max_iter=200, checkpoint=tmp_path, resume=True, **settings)
    assert (resumed.n_iter_, resumed.n_steps_) == (whole.n_iter_, whole.n_steps_)
    assert np.array_equal(resumed.components_, whole.components_)
    assert np.array_equal(resumed._components_denominator, whole._components_denominator)
    assert np.array_equal(w_resumed, w_whole)


def test_resume_on_a_cluster_is_bit_identical(tmp_path, cluster):
    X = da.from_array(low_rank(230, 30, K, seed=9), chunks=(40, 30))
    whole, w_whole = _fit(X, (230, 30), max_iter=8, parallel_batches=2)
    _fit(X, (230, 30), max_iter=3, parallel_batches=2, checkpoint=tmp_path, checkpoint_every=4)
    resumed, w_resumed = _fit(
        X, (230, 30), max_iter=8, parallel_batches=2, checkpoint=tmp_path, resume=True
    )
    assert np.array_equal(resumed.components_, whole.components_)
    assert np.array_equal(w_resumed, w_whole)


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    X = low_rank(230, 30, K)
    _fit(X, max_iter=2, checkpoint=tmp_path, checkpoint_every=5)
    with pytest.raises(CheckpointError, match="forget_factor"):
        _fit(X, forget_factor=0.5, checkpoint=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="another input"):
        _fit(X * 2, checkpoint=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _fit(X, checkpoint=tmp_path / "none", resume=True)
    with pytest.raises(ValueError, match="needs checkpoint"):
        _fit(X, resume=True)
