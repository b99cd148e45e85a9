"""Faults a cluster has: a worker process killed mid-fit, workers with less memory than X."""

import contextlib
import logging
import os
import signal
import time

import dask
import numpy as np
import psutil
import pytest
from conftest import low_rank
from distributed import Client, LocalCluster

from dasknmf import NMF, engine, pipeline, save_matrix
from dasknmf.ops import FutureOps

KWARGS = dict(n_components=5, init="random", random_state=0, tol=0, max_iter=24)


def _kill_workers_at(monkeypatch, client, n_iter: int, how_many: int) -> list:
    """Kill ``how_many`` worker processes (SIGKILL) when the fit reports iteration ``n_iter``,
    and wait until the scheduler has seen them go; their nannies start fresh ones."""
    killed = []
    report = pipeline.Reporter.__call__

    def call(self, i, history):
        if i == n_iter and not killed:
            killed.extend(_kill(client, how_many))
        report(self, i, history)

    monkeypatch.setattr(pipeline.Reporter, "__call__", call)
    return killed


def _kill(client, how_many: int) -> list:
    """SIGKILL ``how_many`` worker processes, wait until the scheduler has seen them go and a
    nanny has started a worker again; returns the (address, pid) of those killed."""
    victims = sorted(client.run(os.getpid).items())[-how_many:]
    for _, pid in victims:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while any(address in client.scheduler_info()["workers"] for address, _ in victims):
        assert time.monotonic() < deadline, "the scheduler did not see the workers die"
        time.sleep(0.05)
    # With no worker back the fit would wait until the test's timeout: say so instead.
    # (The hangs once blamed on nannies were tasks stuck in 'no-worker' after workers
    # that registered while starting: see the test at the end of this file.)
    deadline = time.monotonic() + 90
    while not client.scheduler_info()["workers"]:
        assert time.monotonic() < deadline, "no nanny restarted its worker in 90 s"
        time.sleep(0.05)
    return victims


@contextlib.contextmanager
def _workers(n_workers: int, memory_limit):
    """A Client of a LocalCluster of ``n_workers`` worker processes of one thread and
    ``memory_limit`` each."""
    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            memory_limit=memory_limit,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture
def nanny_cluster():
    """Two worker processes under nannies, which restart a worker that dies (a fresh cluster
    for each test)."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    X = low_rank(4000, 60, 5)
    path = save_matrix(tmp_path_factory.mktemp("x") / "X.zarr", X, chunks=(500, 60))
    return X, str(path)


@pytest.fixture(scope="module")
def stored_thin(stored, tmp_path_factory):
    """The stored X in chunks of 10 rows: 400 panels, updated 8 at a time (stacked)."""
    X, _ = stored
    path = save_matrix(tmp_path_factory.mktemp("x") / "X.zarr", X, chunks=(10, 60))
    return X, str(path)


#: 2-D blocks of the stored X (4000 × 60): 2 × 2.
BLOCKS = dict(layout="blocks", panel_bytes=2000 * 30 * 8)
#: 400 row panels of ``stored_thin``: many per shard (bundled), stacked.
THIN = dict(panel_bytes=10 * 60 * 8, layout="rows")


@pytest.mark.parametrize(
    "cache, checkpoint_every, how_many, layout",
    [
        (True, None, 1, {}),
        (False, None, 1, {}),
        (True, None, 2, {}),
        (False, 3, 2, {}),
        (True, None, 1, BLOCKS),
        (False, 3, 2, BLOCKS),
        (True, None, 1, THIN),
    ],
    ids=[
        "cached-one",
        "streamed-one",
        "cached-all",
        "streamed-all-checkpoint",
        "blocks-cached-one",
        "blocks-streamed-all-checkpoint",
        "thin-cached-one",
    ],
)
def test_workers_killed_mid_fit_change_nothing(
    request, nanny_cluster, tmp_path, monkeypatch, cache, checkpoint_every, how_many, layout
):
    """One worker lost, or all of them, in a fit of row panels or of 2-D blocks: Dask
    recomputes what they held, from the store and the tasks' lineage since the factors were
    last detached from it (tasks placed on a worker that is gone go to the new ones: see
    ``ops.LooseRestrictions``); detached factors that were lost (here: at iteration 5, the
    kill at 7) restart the fit from the checkpoint or the initialization. The factors are
    those of an undisturbed fit."""
    monkeypatch.setattr(engine, "LINEAGE_EVERY", 5)
    client = nanny_cluster
    _, path = request.getfixturevalue("stored_thin" if layout is THIN else "stored")
    kwargs = {**KWARGS, "cache": cache, "panel_bytes": 500 * 60 * 8, **layout}
    reference = NMF(**kwargs)
    W_ref = reference.fit_transform(path).compute()
    if layout is THIN:
        assert (reference.layout_["panels"], reference.layout_["stacked"]) == (400, 8)

    if checkpoint_every:
        kwargs.update(checkpoint=tmp_path / "ckpt", checkpoint_every=checkpoint_every)
    killed = _kill_workers_at(monkeypatch, client, 7, how_many)
    model = NMF(**kwargs)
    W = model.fit_transform(path).compute()
    assert len(killed) == how_many, "the workers were not killed"
    assert model.layout_["scheme"] == ("blocks" if layout is BLOCKS else "rows")
    np.testing.assert_array_equal(W, W_ref)
    np.testing.assert_array_equal(model.components_, reference.components_)
    assert model.loss_history_ == reference.loss_history_
    assert model.n_iter_ == KWARGS["max_iter"]


@pytest.mark.parametrize(
    "cache, checkpoint_every, how_many",
    [(True, None, 1), (False, 4, 2)],
    ids=["cached-one", "streamed-all-checkpoint"],
)
def test_workers_killed_mid_minibatch_fit_change_nothing(
    nanny_cluster, stored, tmp_path, monkeypatch, cache, checkpoint_every, how_many
):
    """``MiniBatchNMF`` as ``NMF`` above: workers killed at step 13 (the factors last
    detached at step 10, so that what they held is lost for good) restart the fit from its
    newest checkpoint, else from the initialization; the model is that of an undisturbed fit.
    (Before, the out-of-core benchmark's fit ended at the first lost value.)"""
    from dasknmf import MiniBatchNMF, minibatch

    monkeypatch.setattr(minibatch, "LINEAGE_EVERY", 5)
    client = nanny_cluster
    _, path = stored  # 4000 rows in 8 batches of 500, two per step: 4 steps per epoch
    kwargs = dict(
        n_components=5, init="random", random_state=0, tol=0, max_no_improvement=None,
        max_iter=6, batch_size=500, cache=cache, parallel_batches=2,
    )  # fmt: skip
    reference = MiniBatchNMF(**kwargs)
    W_ref = reference.fit_transform(path).compute()
    if checkpoint_every:
        kwargs.update(checkpoint=tmp_path / "ckpt", checkpoint_every=checkpoint_every)
    killed, judge = [], minibatch.Convergence.__call__

    def call(self, step, *args):
        if step == 13 and not killed:
            killed.extend(_kill(client, how_many))
        return judge(self, step, *args)

    monkeypatch.setattr(minibatch.Convergence, "__call__", call)
    model = MiniBatchNMF(**kwargs)
    W = model.fit_transform(path).compute()
    assert len(killed) == how_many, "the workers were not killed"
    np.testing.assert_array_equal(W, W_ref)
    np.testing.assert_array_equal(model.components_, reference.components_)
    assert model.reconstruction_err_ == reference.reconstruction_err_
    assert (model.n_iter_, model.n_steps_) == (reference.n_iter_, reference.n_steps_) == (6, 48)


@pytest.mark.parametrize(
    "checkpoint_every, layout",
    [(None, {}), (4, {}), (4, dict(BLOCKS, cache=True))],
    ids=["from-init", "from-checkpoint", "blocks-from-checkpoint"],
)
def test_data_the_cluster_cannot_recompute_restarts_the_fit(
    nanny_cluster, stored, tmp_path, monkeypatch, caplog, checkpoint_every, layout
):
    """When the cluster reports data lost for good (a cancelled key, a KilledWorker), the fit
    (row panels or 2-D blocks) starts again from its newest checkpoint, else from the
    initialization, and ends where an undisturbed fit ends. The loss is injected once, in the
    final pass after the loop."""
    from distributed.client import FutureCancelledError

    from dasknmf import blocks

    _, path = stored
    kwargs = {**KWARGS, "cache": False, "panel_bytes": 500 * 60 * 8, **layout}
    reference = NMF(**kwargs).fit(path)
    if checkpoint_every:
        kwargs.update(checkpoint=tmp_path / "ckpt", checkpoint_every=checkpoint_every)
    module = blocks if layout else engine
    final_pass, failures = module.final_pass, []

    def lose_once(*args):
        if not failures:
            failures.append(1)
            raise FutureCancelledError("panel_step-0", reason="lost dependencies")
        return final_pass(*args)

    monkeypatch.setattr(module, "final_pass", lose_once)
    with caplog.at_level(logging.WARNING, logger="dasknmf"):
        model = NMF(**kwargs).fit(path)
    start = "the checkpoint" if checkpoint_every else "the initialization"
    assert f"restarting the fit from {start}" in caplog.text
    np.testing.assert_array_equal(model.components_, reference.components_)
    assert model.loss_history_ == reference.loss_history_


def test_a_fetch_fails_when_a_worker_with_detached_factors_leaves(nanny_cluster):
    """A worker that held factors put aside (``FutureOps.detach``) dies: the next fetch
    raises ``StateLostError`` (the fit restarts) instead of waiting on tasks that could only
    be made from them — here one that never ends; before, a 2-D fit hung in about half the
    runs of the test above. After ``forget_detached`` (the restarted fit) a fetch waits."""
    import threading

    from distributed import Event

    from dasknmf.detached import LOSS_CHECK_EVERY, StateLostError

    client = nanny_cluster
    ops = FutureOps(client)
    pids = dict(sorted(client.run(os.getpid).items()))
    holder, other = list(pids)
    [detached] = ops.detach([client.submit(np.ones, 3, workers=[holder], pure=False)])
    np.testing.assert_array_equal(ops.fetch(detached), np.ones(3))  # fast: no check needed
    never = Event("never-set", client=client)
    stuck = client.submit(never.wait, workers=[other], allow_other_workers=False, pure=False)
    os.kill(pids[holder], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(StateLostError, match=holder):
        ops.fetch(stuck)
    assert time.monotonic() - start < 30
    ops.forget_detached()
    result = []
    waiting = threading.Thread(target=lambda: result.append(ops.fetch(stuck)), daemon=True)
    waiting.start()
    waiting.join(3 * LOSS_CHECK_EVERY)
    assert waiting.is_alive() and not result  # no loss to report: it waits for the task
    never.set()
    waiting.join(30)
    assert result == [True]


def test_a_gather_fails_when_its_result_is_lost_with_a_holder_meanwhile(
    nanny_cluster, tmp_path, monkeypatch
):
    """The awaited result was finished when the wait ended, and is lost with a holder of
    detached factors before the gather takes it: the scheduler sets it pending again, and its
    remaking may never end (in a 2-D fit it waited on the cascade of errors after the failed
    ``_pick_up``; here a task that blocks when made again). The fetch raises
    ``StateLostError`` within seconds instead of gathering for ever (fails with a plain
    ``client.gather``: the test times out)."""
    from distributed import wait

    from dasknmf.detached import StateLostError

    client = nanny_cluster
    ops = FutureOps(client)
    pids = dict(sorted(client.run(os.getpid).items()))
    holder, _ = list(pids)
    ops.detach([client.submit(np.ones, 3, workers=[holder], pure=False)])
    again, release = tmp_path / "again", tmp_path / "release"

    def blocks_when_made_again(again: str, release: str) -> int:
        while os.path.exists(again) and not os.path.exists(release):
            time.sleep(0.05)
        return 1

    result = client.submit(
        blocks_when_made_again, str(again), str(release), workers=[holder], pure=False
    )
    wait(result)
    again.touch()
    waited = ops._holders._wait

    def then_lose_the_result(obj):
        waited(obj)
        os.kill(pids[holder], signal.SIGKILL)
        while holder in client.scheduler_info()["workers"]:
            time.sleep(0.05)

    monkeypatch.setattr(ops._holders, "_wait", then_lose_the_result)
    start = time.monotonic()
    try:
        with pytest.raises(StateLostError, match=holder):
            ops.fetch(result)
        assert time.monotonic() - start < 30
    finally:
        release.touch()


def test_holders_of_detached_factors_are_never_seen_gone_while_they_run():
    """The client refreshes its copy of the scheduler's identity in the background with no
    workers listed; read through ``client.scheduler_info`` a check could see every holder
    gone (an empty view in about 1 of 80 calls with a 10 ms refresh) and restart a fit that
    had lost nothing — as a fit on the 8 GB benchmark store did. ``workers_now`` asks the
    scheduler itself: no check of living holders fails (fails with the shared copy)."""
    from dasknmf._workers_code import workers_now
    from dasknmf.detached import Holders

    with (
        dask.config.set({"distributed.client.scheduler-info-interval": "10ms"}),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        holders = Holders(client)
        start = time.monotonic()
        checks = 0
        while time.monotonic() - start < 5:
            holders.on = frozenset(workers_now(client))
            assert len(holders.on) == 2
            holders.check()  # StateLostError if a holder looks gone
            checks += 1
        assert checks > 500


def test_a_fetch_waits_on_when_a_worker_with_detached_factors_retires(nanny_cluster):
    """A worker retired gracefully moves its results elsewhere before it leaves: nothing is
    lost, so a fetch waiting while it retires neither fails nor restarts the fit, and the
    detached value is still there."""
    import threading

    from distributed import Event, wait

    from dasknmf.detached import LOSS_CHECK_EVERY

    client = nanny_cluster
    ops = FutureOps(client)
    holder, other = sorted(client.scheduler_info()["workers"])
    [detached] = ops.detach([client.submit(np.ones, 3, workers=[holder], pure=False)])
    # Taken back (``_pick_up`` ran): a result, which a retirement copies elsewhere. A value
    # still put aside, not taken back yet, leaves with its worker.
    wait(detached)
    never = Event("never-set-retire", client=client)
    stuck = client.submit(never.wait, workers=[other], allow_other_workers=False, pure=False)
    result, errors = [], []

    def fetch():
        try:
            result.append(ops.fetch(stuck))
        except Exception as error:
            errors.append(error)

    waiting = threading.Thread(target=fetch, daemon=True)
    waiting.start()
    client.retire_workers([holder], close_workers=True)
    assert holder not in client.scheduler_info()["workers"]
    waiting.join(3 * LOSS_CHECK_EVERY)
    assert waiting.is_alive() and not errors and not result
    never.set()
    waiting.join(30)
    assert result == [True] and not errors
    np.testing.assert_array_equal(ops.fetch(detached), np.ones(3))


def test_workers_with_less_memory_than_x_equal_the_in_memory_fit(tmp_path):
    """X of 192 MiB streamed through two workers of 160 MiB each (about 90 of them taken by
    the interpreter and libraries): no worker is terminated, and the factors are the in-memory
    fit's, bit for bit (both cut X into the same 24 panels of 8 MiB; with 16 MiB panels a
    worker was terminated in one of four runs in a fresh environment)."""
    n_rows, n_cols = 24_576, 1024
    rng = np.random.default_rng(0)
    X = (rng.uniform(size=(n_rows, 6)) @ rng.uniform(size=(6, n_cols))).astype(np.float64)
    X += 0.01 * rng.uniform(size=X.shape)
    path = save_matrix(tmp_path / "X.zarr", X, chunks=(1024, n_cols))
    kwargs = dict(n_components=6, init="random", random_state=0, tol=0, max_iter=6)
    reference = NMF(panel_bytes=8 * 2**20, **kwargs).fit(X)
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            memory_limit="160MiB",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        assert X.nbytes > 160 * 2**20
        pids = client.run(os.getpid)
        model = NMF(cache=False, panel_bytes=8 * 2**20, **kwargs).fit(str(path))
        assert client.run(os.getpid) == pids, "a worker was terminated"
    np.testing.assert_array_equal(model.components_, reference.components_)
    assert model.loss_history_ == reference.loss_history_


def _set_status(status_name):
    def set_status(dask_worker):
        from distributed.core import Status

        dask_worker.status = Status[status_name]  # reported to the scheduler

    return set_status


def _scheduler_sees(client, status_name):
    deadline = time.monotonic() + 30
    while not all(w["status"] == status_name for w in client.scheduler_info()["workers"].values()):
        assert time.monotonic() < deadline, f"the workers did not turn {status_name}"
        time.sleep(0.05)


def test_a_task_pinned_to_a_gone_worker_runs_when_a_worker_turns_running():
    """The all-workers-killed case without the race: a restarted worker may register while
    still starting and run only later. Here the only worker is paused (not running), a task
    pinned loosely to a worker that does not exist waits in 'no-worker', and when the worker
    runs again, ``ops.LooseRestrictions`` sends the task to it (distributed alone would
    leave it waiting: the worker does not meet its restriction)."""

    # No memory limit: else the worker's memory monitor resumes the paused worker itself.
    with _workers(1, 0) as client:
        FutureOps(client)  # registers the plugin
        client.run(_set_status("paused"))
        _scheduler_sees(client, "paused")
        future = client.submit(
            sum, [1, 2], workers=["tcp://127.0.0.1:9"], allow_other_workers=True, pure=False
        )
        deadline = time.monotonic() + 30
        while future.key not in client.run_on_scheduler(
            lambda dask_scheduler: [ts.key for ts in dask_scheduler.unrunnable]
        ):
            assert time.monotonic() < deadline, "the task did not wait for a worker"
            time.sleep(0.05)
        client.run(_set_status("running"))
        assert future.result(timeout=30) == 3


def test_a_problem_no_worker_can_hold_fails_before_any_work():
    """Row panels: one row (or one column) with the k-row factor and its partial sums exceeds a
    worker; 2-D blocks (what 'auto' takes then): W and H exceed the workers' memory. Either is
    an error that names the memory needed and the memory there is, before any task runs."""
    import dask.array as da

    from dasknmf.panels import WORKER_BASELINE, task_memory

    with _workers(1, "300MiB") as client:
        X = da.random.random((200_000, 100_000), chunks=(1_000, 100_000))  # never computed
        row = task_memory(100_000 * 8, 100_000, 500, 8) / 2**20
        factors = 2 * 500 * 300_000 * 8 / 2**20
        room = (0.8 * 300 * 2**20 - WORKER_BASELINE) / 2**20
        for layout, match in (
            ("rows", rf"needs about {row:,.0f} MiB and a worker has 300 MiB"),
            ("auto", rf"W and H .* needs about {factors:,.0f} MiB and the workers have "
             rf"together, below the point where they pause, {room:,.0f} MiB"),
        ):  # fmt: skip
            _refused_before_any_work(client, NMF(500, init="random", layout=layout), X, match)


def test_2d_blocks_whose_h_no_single_worker_can_hold_fail_before_any_work():
    """2-D blocks make all of H's column blocks on one worker (where the column chains end):
    W and H fit the two workers together, but H twice does not fit one of them — an error
    naming both before any task runs, where before the fit started and its H tasks would have
    paused or killed that worker."""
    import dask.array as da

    from dasknmf.panels import WORKER_BASELINE

    with _workers(2, "400MiB") as client:
        X = da.random.random((200_000, 1_000_000), chunks=(20_000, 100_000))  # never computed
        h_twice = 2 * 16 * 1_000_000 * 8 / 2**20
        room = (0.8 * 400 * 2**20 - WORKER_BASELINE) / 2**20
        assert 2 * 16 * 1_200_000 * 8 / 2**20 <= 2 * room < 2 * h_twice  # W and H fit in all
        match = (
            rf"H \(twice, all its column blocks on the worker where the column chains end\) "
            rf"needs about {h_twice:,.0f} MiB and the largest worker has below the point where "
            rf"it pauses {room:,.0f} MiB"
        )
        _refused_before_any_work(client, NMF(16, init="random", layout="blocks"), X, match)


def _refused_before_any_work(client, model, X, match: str) -> None:
    """``model.fit(X)`` raises a ValueError matching ``match``, and no task was submitted."""
    with pytest.raises(ValueError, match=match):
        model.fit(X)
    assert not hasattr(model, "components_")
    assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0


def test_workers_that_keep_dying_fail_the_fit_naming_the_task(tmp_path):
    """A panel whose second read kills the worker reading it (as running out of memory would):
    distributed gives up on the task after four dead workers, and the fit fails with an error
    that names the task and the likely cause, instead of restarting into the same deaths or
    waiting for workers for ever."""
    import dask.array as da
    from distributed.scheduler import KilledWorker

    from dasknmf.panels import WorkersLostError

    folder = tmp_path

    def read_once(block, block_info=None):
        marker = folder / f"read-{block_info[0]['chunk-location'][0]}"
        if marker.exists():
            os._exit(1)
        marker.touch()
        return block

    base = low_rank(2000, 40, 3)
    X = da.from_array(base, chunks=(500, 40)).map_blocks(read_once, dtype=base.dtype)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster),
    ):
        model = NMF(
            3, init="random", random_state=0, max_iter=5, cache=False, panel_bytes=500 * 40 * 8
        )
        with pytest.raises(
            WorkersLostError, match=r"Task .*shard_step.* ran on 4 workers and each died"
        ) as info:
            model.fit(X)
    assert "memory" in str(info.value) and "restarting the fit would run it again" in str(
        info.value
    )
    assert isinstance(info.value.__cause__, KilledWorker)


class _PeakRSS:
    """The peak resident memory of one process, sampled every 5 ms while the block runs."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_a_task_stays_within_its_memory_estimate(tmp_path):
    """The per-task peak that sizes panels to the workers (``panels.task_memory``: 3 panels
    plus 32 MiB plus 3·k·n·itemsize), held by measurement in every phase of a job — the fit
    (validation pass, initialization, iterations, final error pass), saving the model (W
    written from the cluster), transform, and writing its W to a store: the resident memory of
    a worker running one streamed task at a time, sampled every 5 ms, above what it held
    before the fit."""
    from dasknmf.panels import task_memory

    rows, n, k = 2048, 2000, 20
    X = np.random.default_rng(0).uniform(size=(8 * rows, n)).astype(np.float32)
    path = save_matrix(tmp_path / "X.zarr", X, chunks=(rows, n))
    panel = 2 * rows * n * 4  # 31 MiB: two stored chunks
    kwargs = dict(init="random", random_state=0, tol=0, cache=False, panel_bytes=panel)

    def job(model, name):
        yield "fit", lambda: model.fit(str(path))
        yield "save", lambda: model.save(tmp_path / f"{name}-model.zarr")
        yield (
            "transform",
            lambda: save_matrix(tmp_path / f"{name}-W.zarr", model.transform(str(path))),
        )

    with _workers(1, "2GiB") as client:
        for _, run in job(NMF(k, max_iter=1, **kwargs), "warm"):  # the worker loads its code
            run()
        client.run(lambda: __import__("gc").collect())
        (pid,) = client.run(os.getpid).values()
        extra = {}
        baseline = psutil.Process(pid).memory_info().rss
        for phase, run in job(NMF(k, max_iter=3, **kwargs), "measured"):
            with _PeakRSS(pid) as memory:
                run()
            extra[phase] = memory.peak - baseline
    assert panel < extra["fit"], extra  # the measurement sees a panel
    limit = task_memory(panel, n, k, 4)
    assert all(value <= limit for value in extra.values()), (
        {phase: f"{value / 2**20:.0f} MiB" for phase, value in extra.items()},
        f"limit {limit / 2**20:.0f} MiB",
    )


def test_panels_are_sized_to_the_workers_memory():
    """Without panel_bytes, Dask input is cut into panels whose tasks fit the workers: smaller
    than the default on small workers, the default on large ones."""
    from dasknmf import _params
    from dasknmf.panels import PANEL_MULTIPLE, TASK_OVERHEAD, WORKER_BASELINE

    default = 64 * 2**20
    for limit, threads in ((400 * 2**20, 1), (400 * 2**20, 2), (8 * 2**30, 1)):
        with (
            LocalCluster(
                n_workers=1,
                threads_per_worker=threads,
                memory_limit=limit,
                dashboard_address=None,
            ) as cluster,
            Client(cluster),
        ):
            budget = _params.panel_budget(None, True, (10**6, 2000), 20, 4)
        per_task = (0.8 * limit - WORKER_BASELINE) / threads
        expected = int((per_task - TASK_OVERHEAD - 3 * 20 * 2000 * 4) / PANEL_MULTIPLE)
        assert budget == min(default, max(2**20, expected))
        assert (budget < default) == (limit < 2**30)
    assert _params.panel_budget(None, True, (10**6, 2000), 20, 4) == default  # no cluster
    with (
        dask.config.set({"dasknmf.panel-bytes": 6000}),  # a smaller default stays
        LocalCluster(n_workers=1, memory_limit="400MiB", dashboard_address=None) as cluster,
        Client(cluster),
    ):
        assert _params.panel_budget(None, True, (10**6, 2000), 20, 4) == 6000
    assert _params.panel_budget("8MiB", True, (10**6, 2000), 20, 4) == 8 * 2**20


def test_a_worker_that_joins_mid_fit_changes_nothing(monkeypatch, stored):
    """A worker added while the fit runs takes the tasks that are not placed (reductions, H
    updates) or stays idle; the fit neither hangs nor changes: the factors are the in-memory
    fit's, bit for bit."""
    X, path = stored
    kwargs = dict(KWARGS, cache=False, panel_bytes=500 * 60 * 8)
    reference = NMF(**kwargs).fit(X)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        report = pipeline.Reporter.__call__
        joined = []

        def call(self, i, history):
            if i == 3 and not joined:
                cluster.scale(2)
                client.wait_for_workers(2, timeout=60)
                joined.append(i)
            report(self, i, history)

        monkeypatch.setattr(pipeline.Reporter, "__call__", call)
        model = NMF(**kwargs).fit(path)
        assert joined and len(client.scheduler_info()["workers"]) == 2
    np.testing.assert_array_equal(model.components_, reference.components_)
    assert model.loss_history_ == reference.loss_history_
