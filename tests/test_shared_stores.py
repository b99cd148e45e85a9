"""Stores that every worker reads the same: paths resolved on the driver, workers that check
what they open, outputs probed before the fit, chunks missing from a store.

The clusters here are started as a remote one is: ``dask scheduler`` and ``dask worker``
processes (the commands that ship with distributed), in a directory other than the data's. A
worker that does not see the driver's files runs in a mount namespace of its own, with an
empty file system mounted over the data's folder (``unshare -m``, as root).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from conftest import last_json, low_rank, run_cli

from dasknmf import NMF, load, open_matrix, save_matrix
from dasknmf.storage import CorruptStoreError, StoreNotSharedError


def _dask_command(name: str) -> list[str]:
    # The `dask` entry point of the environment running the tests.
    return [sys.executable, "-c", "from dask.__main__ import main; main()", name]


@contextlib.contextmanager
def scheduler_and_workers(tmp_path, n_workers=2, hidden=None, cwd=None, port=0):
    """A scheduler (on ``port``; 0: any) and ``n_workers`` worker processes started with
    ``dask scheduler`` and ``dask worker --scheduler-file`` from ``cwd`` (a folder of their
    own by default). The last worker does not see the folder ``hidden`` (an empty tmpfs over
    it). Yields the scheduler file."""
    cwd = cwd or tmp_path / "cluster-home"
    cwd.mkdir(exist_ok=True)
    scheduler_file = tmp_path / "scheduler.json"
    processes = []
    options = ["--no-dashboard"]
    try:
        processes.append(
            subprocess.Popen(
                [
                    *_dask_command("scheduler"),
                    "--scheduler-file",
                    str(scheduler_file),
                    "--port",
                    str(port),
                    "--host",
                    "127.0.0.1",
                    *options,
                ],
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.1)
        worker = [
            *_dask_command("worker"),
            "--scheduler-file",
            str(scheduler_file),
            "--nthreads",
            "1",
            "--memory-limit",
            "1GiB",
            "--host",
            "127.0.0.1",
            *options,
        ]
        for index in range(n_workers):
            command = worker
            if hidden is not None and index == n_workers - 1:
                script = f"mount -t tmpfs none {hidden} && exec {shlex.join(worker)}"
                command = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
            processes.append(
                subprocess.Popen(
                    command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file)) as client:
            client.wait_for_workers(n_workers, timeout=120)
        yield scheduler_file
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _can_hide_folders() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(
    not _can_hide_folders(),
    reason="needs root and unshare -m to give a worker a file system view of its own",
)


def _cli(*args, cwd):
    # Small panels, so that every worker reads some.
    return run_cli(*args, cwd=cwd, env={**os.environ, "DASK_DASKNMF__PANEL_BYTES": "6000"})


FIT = ["-k", "4", "--random-state", "0", "--max-iter", "30", "--tol", "0", "--quiet"]


# ---- relative paths on a cluster started elsewhere --------------------------------------------


def test_relative_paths_reach_workers_started_in_another_directory(tmp_path, cluster):
    """The issue's reproduction: workers started in another directory, `dasknmf fit X.zarr`
    run where the store is. Before, the workers read zeros and the model was all zeros."""
    data = tmp_path / "data"
    data.mkdir()
    X = low_rank(600, 40, 4, seed=3, dtype=np.float32)
    save_matrix(data / "X.zarr", X, chunks=(100, 40))
    with scheduler_and_workers(tmp_path) as scheduler_file:
        record = last_json(
            _cli(
                "fit",
                "X.zarr",
                "-o",
                "model.zarr",
                "--scheduler-file",
                str(scheduler_file),
                "--json",
                *FIT,
                cwd=data,
            )
        )
        transform = _cli(
            "transform",
            "model.zarr",
            "X.zarr",
            "-o",
            "W.zarr",
            "--scheduler-file",
            str(scheduler_file),
            "--quiet",
            cwd=data,
        )
        assert transform.returncode == 0, transform.stderr
    assert record["n_iter"] == 30 and record["reconstruction_err"] > 0
    model = load(data / "model.zarr")
    assert np.abs(model.components_).sum() > 0
    # The same fit on a LocalCluster, from the absolute path: the same factors, bit for bit.
    reference = NMF(4, random_state=0, max_iter=30, tol=0, panel_bytes=6000)
    reference.fit(str(data / "X.zarr"))
    np.testing.assert_array_equal(model.components_, reference.components_)
    np.testing.assert_array_equal(
        model.W_.compute(), reference.W_.compute(), err_msg="W differs from the LocalCluster's"
    )
    W_new = open_matrix(data / "W.zarr").compute()
    np.testing.assert_array_equal(W_new, reference.transform(str(data / "X.zarr")).compute())


def test_paths_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_matrix("X.zarr", np.ones((4, 3)))
    X = open_matrix("X.zarr")
    node = next(v for v in X.dask.values() if isinstance(v, zarr.Array))
    assert str(node.store_path.store.root) == str(tmp_path / "X.zarr")
    model = NMF(2, checkpoint="ckpt", checkpoint_every=1, max_iter=2, init="random", random_state=0)
    model.fit(np.ones((4, 3)) + np.eye(4, 3))
    monkeypatch.chdir("/")
    assert (tmp_path / "ckpt").is_dir()


# ---- a worker that does not see the store ------------------------------------------------


@needs_namespaces
def test_a_worker_that_does_not_see_the_store_fails_the_fit(tmp_path):
    hidden = tmp_path / "data"
    hidden.mkdir()
    save_matrix(hidden / "X.zarr", low_rank(400, 30, 3, dtype=np.float32), chunks=(50, 30))
    sparse = sp.random(400, 30, density=0.2, format="csr", random_state=0, dtype=np.float32)
    save_matrix(hidden / "S.zarr", sparse)
    out = tmp_path / "out"
    out.mkdir()
    with scheduler_and_workers(tmp_path, hidden=hidden) as scheduler_file:
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file)):
            for store, cache in (("X.zarr", False), ("X.zarr", True), ("S.zarr", False)):
                model = NMF(3, max_iter=5, random_state=0, cache=cache, panel_bytes=6000)
                with pytest.raises(StoreNotSharedError) as info:
                    model.fit(str(hidden / store))
                message = str(info.value)
                assert f"{hidden / store}, which the driver opened" in message
                assert "worker tcp://127.0.0.1:" in message and "does not see it" in message
                assert not hasattr(model, "components_")
        started = time.monotonic()
        result = _cli(
            "fit",
            str(hidden / "X.zarr"),
            "-o",
            str(out / "model.zarr"),
            "--scheduler-file",
            str(scheduler_file),
            *FIT,
            cwd=tmp_path,
        )
        seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "does not see it" in result.stderr and str(hidden / "X.zarr") in result.stderr
    assert seconds < 120
    assert os.listdir(out) == []  # nothing written


@needs_namespaces
def test_an_output_folder_the_workers_do_not_share_fails_before_the_fit(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    save_matrix(data / "X.zarr", low_rank(400, 30, 3, dtype=np.float32), chunks=(50, 30))
    hidden = tmp_path / "out"
    hidden.mkdir()
    with scheduler_and_workers(tmp_path, hidden=hidden) as scheduler_file:
        result = _cli(
            "fit",
            str(data / "X.zarr"),
            "-o",
            str(hidden / "model.zarr"),
            "--scheduler-file",
            str(scheduler_file),
            *FIT,
            "-v",
            cwd=tmp_path,
        )
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file)):
            model = NMF(3, max_iter=5, random_state=0, checkpoint=hidden / "ckpt")
            with pytest.raises(StoreNotSharedError, match="does not share .*ckpt"):
                model.fit(str(data / "X.zarr"))
    assert result.returncode == 2, result.stderr
    assert "does not share" in result.stderr and str(hidden) in result.stderr
    assert "NMF fit:" not in result.stderr  # failed before the fit started
    assert [p for p in os.listdir(hidden) if not p.startswith("ckpt")] == []


# ---- chunks missing from a store -----------------------------------------------------------


def test_every_chunk_is_written_and_counted(tmp_path):
    X = np.zeros((300, 20), dtype=np.float32)
    X[:100] = 1.0  # the other chunks hold only zeros, Zarr's fill value
    save_matrix(tmp_path / "X.zarr", X, chunks=(100, 20))
    stored = zarr.open_array(str(tmp_path / "X.zarr"), mode="r")
    assert stored.attrs["dasknmf.chunks"] == 3
    assert sorted(os.listdir(tmp_path / "X.zarr" / "c")) == ["0", "1", "2"]


def test_a_missing_chunk_is_named(tmp_path):
    X = low_rank(300, 20, 2, dtype=np.float32)
    save_matrix(tmp_path / "X.zarr", X, chunks=(100, 20))
    shutil.rmtree(tmp_path / "X.zarr" / "c" / "1")
    with pytest.raises(
        CorruptStoreError, match=r"X.zarr: cannot read rows .*chunk c/1/0 is missing"
    ):
        open_matrix(tmp_path / "X.zarr", panel_bytes=8000).compute()


def test_a_missing_chunk_of_a_csr_store_is_named(tmp_path):
    from dasknmf import csr

    S = sp.random(2000, 50, density=0.5, format="csr", random_state=0)
    save_matrix(tmp_path / "S.zarr", S)
    data = zarr.open_group(str(tmp_path / "S.zarr"), mode="r")["data"]
    assert data.attrs["dasknmf.chunks"] == 1
    # Smaller chunks than the default, so that one of several can go missing.
    monkey = pytest.MonkeyPatch()
    monkey.setattr(csr, "ENTRIES_PER_CHUNK", 10_000)
    try:
        save_matrix(tmp_path / "T.zarr", S)
    finally:
        monkey.undo()
    os.remove(tmp_path / "T.zarr" / "indices" / "c" / "2")
    with pytest.raises(CorruptStoreError, match=r"cannot read indices of rows .*chunk indices/c/2"):
        open_matrix(tmp_path / "T.zarr").compute()
    # Shards of inner chunks: a missing shard (a file) is named the same way.
    monkey.setattr(csr, "ENTRIES_PER_CHUNK", 10_000)
    monkey.setattr(csr, "INNER_ENTRIES", 2_000)
    try:
        save_matrix(tmp_path / "U.zarr", S)
    finally:
        monkey.undo()
    assert zarr.open_group(str(tmp_path / "U.zarr"), mode="r")["indices"].shards == (10_000,)
    os.remove(tmp_path / "U.zarr" / "indices" / "c" / "2")
    with pytest.raises(CorruptStoreError, match=r"cannot read indices of rows .*chunk indices/c/2"):
        open_matrix(tmp_path / "U.zarr").compute()


def test_a_missing_chunk_of_a_saved_model_is_named(tmp_path):
    X = low_rank(200, 20, 2)
    model = NMF(2, max_iter=5, init="random", random_state=0).fit(X)
    model.save(tmp_path / "model.zarr")
    shutil.rmtree(tmp_path / "model.zarr" / "H" / "c")
    with pytest.raises(CorruptStoreError, match="model.zarr/H: .*chunk H/c/0/0 is missing"):
        load(tmp_path / "model.zarr")


def test_a_new_scheduler_at_an_old_address_is_told_what_never_to_steal(tmp_path):
    """The task prefixes a scheduler was told never to steal (``FutureOps.never_steal``) are
    remembered per scheduler, not per address: a scheduler restarted on the same host and
    port knows none of them, and is told again (before, the driver skipped it, and placed
    tasks could be stolen away from their data)."""
    import socket

    from distributed import Client

    from dasknmf.minibatch import batch_task
    from dasknmf.ops import FutureOps

    def told() -> bool:
        from distributed import stealing

        return "batch_task" in stealing.fast_tasks

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for run in ("first", "restarted"):
        folder = tmp_path / run
        folder.mkdir()
        with (
            scheduler_and_workers(folder, n_workers=1, port=port) as scheduler_file,
            Client(scheduler_file=str(scheduler_file)) as client,
        ):
            assert client.scheduler.address.endswith(f":{port}")
            assert not client.run_on_scheduler(told)
            FutureOps(client).never_steal(batch_task)
            assert client.run_on_scheduler(told), run
