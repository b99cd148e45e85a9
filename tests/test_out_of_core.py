"""Out of core: a Zarr matrix three times the workers' memory, streamed every iteration."""

import os
import threading
import time

import dask.array as da
import numpy as np
import psutil
import pytest
from distributed import Client, LocalCluster

from dasknmf import NMF, open_matrix, save_matrix

WORKER_LIMIT = 350 * 2**20
N_WORKERS = 2


class WorkerMemory:
    """Samples the resident memory of the given processes every 20 ms."""

    def __init__(self, pids):
        self.processes = [psutil.Process(pid) for pid in pids]
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            for p in self.processes:
                self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def small_workers():
    with (
        LocalCluster(
            n_workers=N_WORKERS,
            threads_per_worker=1,
            memory_limit=WORKER_LIMIT,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.mark.slow  # 2 minutes; the claim runs by default in test_reliability's smaller test
def test_input_three_times_the_cluster_memory_streams_within_limits(small_workers, tmp_path):
    client = small_workers
    n_cols, rank = 1024, 5
    n_rows = 3 * N_WORKERS * WORKER_LIMIT // (n_cols * 4) + 1
    rng = da.random.default_rng(0)
    W = rng.uniform(size=(n_rows, rank), chunks=(4096, rank))
    H = rng.uniform(size=(rank, n_cols), chunks=(rank, n_cols))
    X = W @ H + 0.1 * rng.uniform(size=(n_rows, n_cols), chunks=(4096, n_cols))
    path = save_matrix(tmp_path / "X.zarr", X.astype(np.float32), chunks=(4096, n_cols))
    stored = open_matrix(path)
    assert stored.nbytes >= 3 * N_WORKERS * WORKER_LIMIT

    pids = client.run(os.getpid)
    model = NMF(
        n_components=rank, init="random", random_state=0, tol=0, max_iter=4, panel_bytes=8 * 2**20
    )
    with WorkerMemory(pids.values()) as memory:
        W_fit = model.fit_transform(str(path))
    assert client.run(os.getpid) == pids, "a worker was restarted"
    assert max(memory.peak.values()) < WORKER_LIMIT, memory.peak
    assert isinstance(W_fit, da.Array) and W_fit.shape == (n_rows, rank)
    loss = np.array(model.loss_history_)
    assert np.all(np.diff(loss) < 0)
    # Rank-5 data: four iterations from a random start already explain most of it.
    assert loss[-1] < 0.02 * loss[0]
    by_chunk = da.from_zarr(str(path))  # stored chunks: small enough for these workers
    norm = float(np.sqrt((by_chunk.astype(np.float64) ** 2).sum().compute()))
    assert model.reconstruction_err_ < 0.1 * norm
    print(f"peak worker RSS {max(memory.peak.values()) / 2**20:.0f} MiB of {WORKER_LIMIT >> 20}")
