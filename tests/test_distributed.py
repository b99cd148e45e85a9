"""The Dask engine on a real LocalCluster with worker processes, from memory and from Zarr."""

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import low_rank
from distributed import Client, LocalCluster

from dasknmf import NMF, engine, save_matrix

KWARGS = dict(
    n_components=4, init="random", random_state=0, tol=0, max_iter=25, panel_bytes=50 * 30 * 8
)


@pytest.fixture(scope="module")
def X():
    return low_rank(200, 30, 4)


@pytest.fixture(scope="module")
def in_memory(X):
    model = NMF(**KWARGS)
    return model.fit_transform(X), model


@pytest.mark.parametrize("cache", [True, False])
def test_cluster_fit_is_bit_identical_to_in_memory(cluster, X, in_memory, cache):
    W_ref, reference = in_memory
    model = NMF(cache=cache, **KWARGS)
    W = model.fit_transform(da.from_array(X, chunks=(50, 30)))
    assert isinstance(W, da.Array) and W.chunks[0] == (50,) * 4
    np.testing.assert_array_equal(W.compute(), W_ref)
    np.testing.assert_array_equal(model.components_, reference.components_)
    assert model.loss_history_ == reference.loss_history_
    assert model.reconstruction_err_ == reference.reconstruction_err_


@pytest.mark.parametrize("extrapolate", [True, False])
def test_an_iteration_runs_a_task_per_shard_folding_the_h_update(cluster, X, extrapolate):
    """With H in one small block and few shards, an iteration is its shards' tasks alone: each
    first forms the H of the iteration before from all the shards' outputs (``fold``), so no
    H task waits between two iterations (a scheduler round trip each) — only the first
    iteration's shards run the plain shard step, and only the last iteration's H runs as a task
    of its own. The driver reads each summary through one small task (``h_of``); no task forms
    a summary or a control. The factors are still those of the in-memory fit, bit for bit."""
    from dask.utils import key_split
    from distributed import get_task_stream

    kwargs = {**KWARGS, "extrapolate": extrapolate, "max_iter": 12}
    reference = NMF(**kwargs).fit(X)
    with get_task_stream() as stream:
        model = NMF(**kwargs).fit(da.from_array(X, chunks=(50, 30)))
    names = [key_split(task["key"]) for task in stream.data]
    shard_task = "extrapolated_shard_step" if extrapolate else "shard_step"
    assert names.count(shard_task) == 2  # the first iteration's, from the initialization
    assert names.count("folded_shard_step") == 2 * 11
    assert names.count("h_of") == 11 and names.count("h_update") == 1  # the 12th iteration's H
    assert {"h_step", "extrapolated_whole_h_step"}.isdisjoint(names)
    assert {"h_summary", "control_after", "advance_control"}.isdisjoint(names)
    np.testing.assert_array_equal(model.components_, reference.components_)
    assert model.loss_history_ == reference.loss_history_


@pytest.mark.parametrize("extrapolate", [True, False])
def test_a_folded_iteration_sums_the_levels_above_the_shards_itself(cluster, extrapolate):
    """With more shards' nodes than one task sums (``split_every``), a level of the reduction
    tree runs between the shards and the H update; folded, each shard task runs it itself, in
    the same order (``fold.h_update``): no task of its own, and the in-memory fit's bits."""
    from dask.utils import key_split
    from distributed import get_task_stream

    X = low_rank(800, 30, 4)
    kwargs = {**KWARGS, "extrapolate": extrapolate, "max_iter": 6, "panel_bytes": 25 * 30 * 8}
    with dask.config.set({"dasknmf.split-every": 2}):  # the shape of the sums: both fits
        reference = NMF(**kwargs).fit(X)
        with get_task_stream() as stream:
            model = NMF(**kwargs).fit(da.from_array(X, chunks=(25, 30)))
    names = [key_split(task["key"]) for task in stream.data]
    assert names.count("folded_shard_step") == 2 * 5
    assert "combine_picked" not in names[: names.index("shard_final_stats")]
    np.testing.assert_array_equal(model.components_, reference.components_)
    assert model.loss_history_ == reference.loss_history_


def test_more_shards_than_fold_keep_an_h_task_per_iteration(cluster, X, monkeypatch):
    """More shards than ``fold.MAX_SHARDS`` (each shard task would take every other shard's
    output): an H task per iteration, and the in-memory fit's bits."""
    from dask.utils import key_split
    from distributed import get_task_stream

    from dasknmf import fold

    monkeypatch.setattr(fold, "MAX_SHARDS", 1)
    kwargs = {**KWARGS, "max_iter": 6}
    reference = NMF(**kwargs).fit(X)
    with get_task_stream() as stream:
        model = NMF(**kwargs).fit(da.from_array(X, chunks=(50, 30)))
    names = [key_split(task["key"]) for task in stream.data]
    assert names.count("extrapolated_whole_h_step") in (6, 7) and "folded_shard_step" not in names
    np.testing.assert_array_equal(model.components_, reference.components_)


def test_fit_from_a_zarr_path_streams_it(cluster, X, in_memory, tmp_path):
    path = save_matrix(tmp_path / "X.zarr", X, chunks=(50, 30))
    model = NMF(cache=False, **KWARGS)
    W = model.fit_transform(str(path))
    np.testing.assert_array_equal(W.compute(), in_memory[0])
    assert model.n_features_in_ == 30


def test_stopping_rule_on_a_cluster_matches_in_memory(cluster, X):
    """The next iteration is submitted before the stopping rule runs; when it says stop, the
    speculative iteration is dropped and the result is the one of the iteration that stopped."""
    kwargs = dict(KWARGS, tol=1e-3, max_iter=500)
    reference = NMF(**kwargs).fit(X)
    model = NMF(**kwargs).fit(da.from_array(X, chunks=(50, 30)))
    assert 1 < model.n_iter_ == reference.n_iter_ < 500
    np.testing.assert_array_equal(model.components_, reference.components_)


def test_lazy_transform_on_the_cluster(cluster, X, in_memory):
    _, model = in_memory
    W = model.transform(da.from_array(X, chunks=(50, 30)))
    np.testing.assert_array_equal(W.compute(), model.transform(X))


def test_same_factors_on_every_scheduler(X, tmp_path):
    """Same input, chunks and seed: bit-identical factors on the synchronous and threaded
    schedulers and on LocalClusters of 1 and 2 worker processes (BLAS pinned to one thread)."""
    Xd = da.from_array(X, chunks=(50, 30))
    kwargs = dict(KWARGS, init="nndsvda")
    results = {}
    for name in ("synchronous", "threads"):
        with dask.config.set(scheduler=name):
            results[name] = NMF(**kwargs).fit(Xd).components_
    for n_workers in (1, 2):
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                dashboard_address=None,
                memory_limit="1GiB",
            ) as local,
            Client(local),
        ):
            results[f"{n_workers} workers"] = NMF(**kwargs).fit(Xd).components_
    for name, H in results.items():
        np.testing.assert_array_equal(H, results["synchronous"], err_msg=name)


def test_worker_tasks_do_not_import_scikit_learn_or_numba(cluster, X):
    """Workers run the per-panel tasks only: unpickling them must not import the estimator's
    scikit-learn (~90 MiB resident per worker) nor numba, which out-of-core budgets can't spare."""

    def heavy_modules():
        import sys

        return sorted(m for m in ("dasknmf.steps", "sklearn", "numba") if m in sys.modules)

    cluster.restart()  # fresh worker processes
    NMF(**KWARGS).fit(da.from_array(X, chunks=(50, 30)))
    assert list(cluster.run(heavy_modules).values()) == [["dasknmf.steps"]] * 2


def test_fits_on_one_client_register_the_scheduler_plugin_once(cluster):
    """Every fit registers dasknmf's scheduler plugin; the second must not warn that it
    overwrites the first (users saw that warning after every fit)."""
    import warnings

    X = low_rank(400, 20, 2)
    Xd = da.from_array(X, chunks=(100, 20))
    NMF(2, init="random", random_state=0, max_iter=3).fit(Xd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NMF(2, init="random", random_state=0, max_iter=3, tol=0).fit(Xd)
    plugins = cluster.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.plugins))
    assert plugins.count("dasknmf-loose-restrictions") == 1


def test_placed_tasks_are_never_stolen_and_the_memory_manager_is_restored(cluster, monkeypatch):
    """The tasks a fit places with their data — and ``_pick_up``, which takes a detached value
    back on the worker that holds it (stolen, it failed as if that worker had died: the
    out-of-core MiniBatchNMF benchmark did so) — are never stolen; the Active Memory Manager,
    stopped while the fit runs, runs again after it."""
    monkeypatch.setattr(engine, "LINEAGE_EVERY", 2)  # detach every other iteration
    X = da.from_array(low_rank(400, 20, 2), chunks=(100, 20))
    assert cluster.amm.running()
    NMF(2, init="random", random_state=0, max_iter=5, tol=0).fit(X)
    assert cluster.amm.running()

    def never_stolen(dask_scheduler):
        from distributed import stealing

        return {
            "extrapolated_shard_step",
            "folded_shard_step",
            "pick_up",
        } <= stealing.fast_tasks  # key prefixes

    assert cluster.run_on_scheduler(never_stolen)


@pytest.mark.parametrize("layout", ["rows", "blocks"])
def test_a_fit_that_fails_keeping_x_on_the_workers_restores_the_memory_manager(
    cluster, tmp_path, layout
):
    """A block of X that cannot be read fails the fit while X is being kept on the workers
    (before any iteration), with the read's error; the Active Memory Manager, which the fit
    stopped, runs again."""
    readable = da.ones((40, 6), chunks=(20, 6))
    missing = dask.delayed(np.load)(str(tmp_path / "missing.npy"))
    X = da.concatenate([readable, da.from_delayed(missing, shape=(20, 6), dtype=float)])
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        NMF(2, init="random", max_iter=2, cache=True, layout=layout, panel_bytes=20 * 6 * 8).fit(X)
    assert cluster.amm.running()


def test_shards_give_the_same_factors_on_any_number_of_workers():
    """60 panels of 5 rows and a fan-in of 3: shards of whole subtrees (one task per worker
    thread and iteration) on 1, 2 and 3 worker processes and on one worker with 3 threads give
    the in-memory factors bit for bit — Frobenius (HALS with extrapolation, the default) with
    the panels updated 3 at a time, stacked; Kullback–Leibler one by one
    (``dasknmf.group-bytes`` 0), with 2 column blocks of H."""
    X = low_rank(300, 40, 4)
    # Row panels forced: under 'auto' a KL fit whose rows do not fit the budget takes 2-D blocks
    # (tests/test_blocks.py holds their bits on clusters).
    kwargs = dict(
        n_components=4, random_state=0, tol=0, max_iter=6, panel_bytes=5 * 40 * 8, layout="rows"
    )
    cases = {
        "frobenius": (dict(init="nndsvda"), {}, 3),
        "kl": (
            dict(init="random", beta_loss="kullback-leibler", solver="mu"),
            {"dasknmf.h-block-bytes": 4 * 20 * 8, "dasknmf.group-bytes": 0},
            None,
        ),
    }
    references = {}
    for name, (settings, config, _) in cases.items():
        with dask.config.set({"dasknmf.split-every": 3, **config}):
            reference = NMF(**kwargs, **settings)
            references[name] = (reference.fit_transform(X), reference)
    Xd = da.from_array(X, chunks=(5, 40))
    for n_workers, threads in ((1, 1), (2, 1), (3, 1), (1, 3)):
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads,
                dashboard_address=None,
                memory_limit="1GiB",
            ) as local,
            Client(local),
        ):
            for name, (settings, config, stacked) in cases.items():
                with dask.config.set({"dasknmf.split-every": 3, **config}):
                    model = NMF(**kwargs, **settings)
                    W = model.fit_transform(Xd).compute()
                W_ref, reference = references[name]
                where = f"{name}: {n_workers} workers x {threads} threads"
                assert model.layout_["panels"] == 60
                assert model.layout_.get("stacked") == stacked, where
                np.testing.assert_array_equal(
                    model.components_, reference.components_, err_msg=where
                )
                np.testing.assert_array_equal(W, W_ref, err_msg=where)
                assert model.loss_history_ == reference.loss_history_, where


def test_stacked_tiny_panels_streamed_from_a_store_equal_them_cached(cluster, tmp_path):
    """A CSR store in 32 or more panels of a few rows, read by the shard tasks in every
    iteration and updated 2 at a time, stacked (a fan-in of 2), gives the factors of the same
    panels kept on the workers, bit for bit."""
    import scipy.sparse as sp

    from dasknmf import open_matrix

    X = low_rank(128, 12, 3, seed=5)
    X[X < np.quantile(X, 0.3)] = 0
    data = sp.csr_array(X)
    path = save_matrix(tmp_path / "x.zarr", data)
    per_panel = -(-(data.nnz * 12 + 129 * 8) // 32)  # 32 panels or more
    fits = []
    with dask.config.set({"dasknmf.split-every": 2}):
        for cache in (False, True):
            model = NMF(3, init="random", random_state=0, tol=0, max_iter=4, cache=cache)
            model.set_params(panel_bytes=per_panel, layout="rows")
            W = model.fit_transform(open_matrix(path, panel_bytes=per_panel))
            # W in a chunk per group of stacked panels (not 32 or more chunks of a few rows)
            assert len(W.chunks[0]) == -(-model.layout_["panels"] // 2)
            fits.append((W.compute(), model))
            assert model.layout_["cached"] == cache and model.layout_["stacked"] == 2
    assert fits[0][1].layout_["panels"] == fits[1][1].layout_["panels"] >= 32
    (W_streamed, streamed), (W_cached, cached) = fits
    np.testing.assert_array_equal(W_streamed, W_cached)
    np.testing.assert_array_equal(streamed.components_, cached.components_)
    assert streamed.loss_history_ == cached.loss_history_


def test_a_shard_task_takes_its_cached_panels_as_one_bundle(cluster):
    """Cached panels reach a shard's task as one ``PanelBundle`` made on its worker (one input
    per shard and iteration, however many panels), made once for the shards there are and
    again when they change; dask counts a bundle as the tuple alone (its panels are held, and
    counted, under their own keys)."""
    from dask.sizeof import sizeof

    from dasknmf import panels as panels_
    from dasknmf.shards import PanelBundle, shard_panels

    def described(*data):
        panels = shard_panels(data)
        return len(data), type(panels).__name__, [p.shape[0] for p in panels], sizeof(panels)

    X = low_rank(400, 30, 4)
    parts = panels_.dask_panels(da.from_array(X, chunks=(10, 30)), panel_bytes=10 * 30 * 8)
    try:
        assert parts.cached and len(parts.items) == 40
        n_shards = len(parts.shard_ranges)
        assert 1 < n_shards < 40
        first = cluster.gather(parts.shard_map(described, [()] * n_shards))
        for (n_args, kind, rows, size), (a, b) in zip(first, parts.shard_ranges, strict=True):
            assert (n_args, kind, rows) == (1, "PanelBundle", [10] * (b - a))
            assert size < 1000 < (b - a) * 10 * 30 * 8  # not the panels' bytes again
        made = parts._bundles
        assert len(made[1]) == n_shards
        parts.shard_map(described, [()] * n_shards)
        assert parts._bundles is made  # reused
        workers = sorted(cluster.scheduler_info()["workers"])
        parts.shard(1, workers[:1])  # one shard, on one worker: bundles made again
        ((n_args, kind, rows, _),) = cluster.gather(parts.shard_map(described, [()]))
        assert parts._bundles is not made and (n_args, kind, rows) == (1, "PanelBundle", [10] * 40)
    finally:
        parts.close()
    assert sizeof(PanelBundle([np.zeros(1000)])) < 1000


def test_the_scheduler_holds_no_more_tasks_after_500_iterations_than_after_50(cluster, monkeypatch):
    """Issue 11: the factors' lineage is cut every ``engine.LINEAGE_EVERY`` iterations (5
    here, 20 by default: a shorter fit shows the same), so the task states the scheduler holds
    (sampled over a full cut period) after iteration 200 are no more than after iteration 40.
    Without the cut the same measurement grows with every iteration (checked first, so that
    the measurement can tell). ``bench_scale.py --scheduler-state`` measures the default
    period over 500 iterations."""
    X = low_rank(400, 30, 4)
    counts: dict[int, int] = {}
    record = engine.record_summary

    def counting(history, objective, norm_x_sq, n_iter, summary):
        counts[n_iter] = cluster.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        return record(history, objective, norm_x_sq, n_iter, summary)

    monkeypatch.setattr(engine, "record_summary", counting)
    kwargs = dict(n_components=4, random_state=0, tol=0, panel_bytes=50 * 30 * 8)
    Xd = da.from_array(X, chunks=(50, 30))
    with monkeypatch.context() as uncut:
        uncut.setattr(engine, "LINEAGE_EVERY", 10**9)
        NMF(max_iter=60, **kwargs).fit(Xd)
    assert counts[60] > counts[10] + 50  # 2-7 tasks kept per iteration (2: folded)
    counts.clear()
    monkeypatch.setattr(engine, "LINEAGE_EVERY", 5)
    NMF(max_iter=200, **kwargs).fit(Xd)
    early = max(counts[i] for i in range(36, 46))
    late = max(counts[i] for i in range(191, 201))
    assert late <= early + 10, (early, late)


def test_a_detached_value_waits_for_its_paused_worker(cluster, monkeypatch):
    """A value put aside on a worker (``FutureOps.detach``) is taken back there even while
    that worker is paused (memory): it waits for it, where it once ran on the other worker
    and failed as if the value's worker had died."""
    import time

    from distributed import wait
    from distributed.core import Status

    from dasknmf.ops import FutureOps

    workers = sorted(cluster.scheduler_info()["workers"])
    values = [
        cluster.submit(np.arange, 10 + i, workers=[w], pure=False) for i, w in enumerate(workers)
    ]
    wait(values)
    ops = FutureOps(cluster)
    who_has = cluster.who_has

    def set_status(status, dask_worker):
        # The memory monitor would resume a worker paused below its memory threshold.
        manager = dask_worker.memory_manager
        if status == Status.paused:
            manager.saved_pause, manager.memory_pause_fraction = (
                manager.memory_pause_fraction,
                False,
            )
        else:
            manager.memory_pause_fraction = manager.saved_pause
        dask_worker.status = status

    def pause_first_then_who_has(futures):
        cluster.run(set_status, Status.paused, workers=workers[:1])
        return who_has(futures)

    monkeypatch.setattr(cluster, "who_has", pause_first_then_who_has)
    try:
        detached = ops.detach(values)
        wait(detached[1:])
        time.sleep(1)
        assert detached[0].status == "pending"  # not run on the other worker
    finally:
        cluster.run(set_status, Status.running, workers=workers[:1])
        ops.close()
    np.testing.assert_array_equal(detached[0].result(), np.arange(10))
    np.testing.assert_array_equal(detached[1].result(), np.arange(11))
