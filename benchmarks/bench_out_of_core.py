"""Out-of-core benchmark: an 8 GB Zarr matrix on a LocalCluster with 2 GB of worker memory.

X = W·H + 0.1·noise, float32, 1,000,000 × 2,000 (8 GB; rank 20; uniform draws from Dask's
``default_rng(0)``), written once to ``benchmarks/_data/`` (reused if present). On a LocalCluster
of 2 worker processes × 1 thread with 1 GiB each, the script measures

- one raw read of the store on the same cluster: ``da.from_zarr(path).sum()`` (median of 3);
- an NMF fit, k = 20, random init, 4 iterations, X streamed (``cache='auto'`` decides: X is
  4× the cluster's memory): the median wall time between iterations, and its ratio to the read;
- the peak resident memory of every process (sampled every 20 ms) against the workers' limit;
- the bytes workers sent each other per iteration (``transfer_outgoing_bytes_total``) against
  the estimate panels × k × n × itemsize (each partial sent once).

    python benchmarks/bench_out_of_core.py --write
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import statistics
import sys
import threading
import time

import numpy as np
import psutil

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import machine, write_section

M, N, K, RANK = 1_000_000, 2_000, 20, 20
WORKERS, WORKER_MEMORY = 2, 2**30
DATA = pathlib.Path(__file__).with_name("_data") / "out_of_core.zarr"


class ProcessMemory:
    """Peak resident memory of each of the given processes, sampled every 20 ms."""

    def __init__(self, pids: dict[str, int]):
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            for name, process in self.processes.items():
                self.peak[name] = max(self.peak[name], process.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_store(client) -> None:
    import dask.array as da

    from dasknmf import save_matrix

    if DATA.exists():
        return
    DATA.parent.mkdir(exist_ok=True)
    rng = da.random.default_rng(0)
    rows = 2048
    W = rng.uniform(size=(M, RANK), chunks=(rows, RANK))
    H = rng.uniform(size=(RANK, N), chunks=(RANK, N))
    noise = rng.uniform(size=(M, N), chunks=(rows, N))
    X = (W @ H + 0.1 * noise).astype(np.float32)
    start = time.perf_counter()
    save_matrix(DATA, X, chunks=(rows, N))
    print(f"wrote {DATA} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def main() -> None:
    import dask.array as da
    from distributed import Client, LocalCluster

    from dasknmf import NMF, engine, open_matrix

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="store in benchmarks/RESULTS.md")
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()

    with (
        LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            memory_limit=WORKER_MEMORY,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        make_store(client)
        X = open_matrix(DATA)
        disk = sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file())
        reads = []
        for _ in range(3):
            start = time.perf_counter()
            da.from_zarr(str(DATA)).sum().compute()
            reads.append(time.perf_counter() - start)
        raw_read = statistics.median(reads)

        pids = {f"worker {i}": pid for i, pid in enumerate(client.run(os.getpid).values())}
        pids["driver + scheduler"] = os.getpid()
        stamps, sent = [], []
        record = engine.History.record

        def timed_record(self, *a, **kw):
            stamps.append(time.perf_counter())
            sent.append(
                sum(
                    client.run(
                        lambda dask_worker: dask_worker.transfer_outgoing_bytes_total
                    ).values()
                )
            )
            record(self, *a, **kw)

        engine.History.record = timed_record
        model = NMF(n_components=K, init="random", random_state=0, tol=0, max_iter=args.iterations)
        restarts_before = client.run(os.getpid)
        with ProcessMemory(pids) as memory:
            start = time.perf_counter()
            model.fit(str(DATA))
            fit_seconds = time.perf_counter() - start
        restarted = client.run(os.getpid) != restarts_before
        cached = engine.should_cache(X.nbytes, "auto")
        # stamps[0] and [1] are both taken after iteration 1.
        per_iteration = statistics.median(np.diff(stamps[1:]))
        moved = statistics.median(np.diff(sent[1:]))
        n_panels = (
            len(
                engine.coalesce_bounds(
                    X.chunks[0],
                    [r * N * 4 for r in X.chunks[0]],
                    engine.get_bytes("dasknmf.panel-bytes"),
                )
            )
            - 1
        )

    # The estimate of the design: every panel's partial (k × n float32, plus k × k and the
    # statistics) travels once. Measured is less: consecutive panels sit on one worker, and the
    # reduction tree sums a worker's partials there before anything crosses.
    partial = K * N * 4 + K * K * 4 + 64
    estimate = n_panels * partial
    limit = WORKER_MEMORY / 2**20
    lines = [
        "## Out of core: 8 GB Zarr, 2 GB of workers (`benchmarks/bench_out_of_core.py`)",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine()}. X is {M:,} × {N:,} float32 "
        f"({X.nbytes / 1e9:.1f} GB in memory, {disk / 1e9:.1f} GB on disk, blosc-lz4); "
        f"LocalCluster of {WORKERS} worker processes × 1 thread with {limit:.0f} MiB each; "
        f"k = {K}, random init, {args.iterations} iterations, `cache='auto'` "
        f"({'cached' if cached else 'streamed from Zarr every iteration'}); "
        f"{n_panels} row panels.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| one raw read, `da.from_zarr(path).sum()` (median of 3) | {raw_read:.1f} s |",
        f"| NMF, median time per iteration | {per_iteration:.1f} s |",
        f"| ratio per iteration / raw read | {per_iteration / raw_read:.2f}× |",
        f"| whole fit (validation pass, {args.iterations} iterations, error pass) | "
        f"{fit_seconds:.0f} s |",
        f"| bytes sent between workers per iteration, measured | {moved / 2**20:.1f} MiB |",
        f"| the same, estimated as panels × k × n × itemsize | {estimate / 2**20:.1f} MiB |",
        f"| any worker restarted | {'yes' if restarted else 'no'} |",
    ]
    for name, peak in memory.peak.items():
        bound = f" (limit {limit:.0f} MiB)" if name.startswith("worker") else ""
        lines.append(f"| peak RSS, {name} | {peak / 2**20:.0f} MiB{bound} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("out-of-core", text)


if __name__ == "__main__":
    main()
