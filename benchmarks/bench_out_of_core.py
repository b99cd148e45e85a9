"""Out-of-core benchmark: an 8 GB Zarr matrix on a LocalCluster with 2 GB of worker memory.

X = W·H + 0.1·noise, float32, 1,000,000 × 2,000 (8 GB; rank 20; uniform draws from Dask's
``default_rng(0)``), and the same with 250,000 rows (2 GB), written once to
``benchmarks/_data/`` (reused if present). On a LocalCluster of 2 worker processes × 1 thread
with 1 GiB each, the script measures, for each size,

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

from dasknmf._config import get_bytes
from dasknmf.cuts import coalesce_bounds
from dasknmf.panels import should_cache

N, K, RANK = 2_000, 20, 20
SIZES = (250_000, 1_000_000)
WORKERS, WORKER_MEMORY = 2, 2**30
DATA = pathlib.Path(__file__).with_name("_data")


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


def make_store(n_rows: int) -> pathlib.Path:
    import dask.array as da

    from dasknmf import save_matrix

    path = DATA / f"out_of_core_{n_rows}.zarr"
    if path.exists():
        return path
    DATA.mkdir(exist_ok=True)
    rng = da.random.default_rng(0)
    rows = 2048
    W = rng.uniform(size=(n_rows, RANK), chunks=(rows, RANK))
    H = rng.uniform(size=(RANK, N), chunks=(RANK, N))
    noise = rng.uniform(size=(n_rows, N), chunks=(rows, N))
    start = time.perf_counter()
    save_matrix(path, (W @ H + 0.1 * noise).astype(np.float32), chunks=(rows, N))
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


def measure(client, path: pathlib.Path, n_iter: int) -> dict:
    """Raw read, per-iteration time, bytes between workers and peak memory for one store."""
    import dask.array as da

    from dasknmf import NMF, engine, open_matrix

    X = open_matrix(path)
    reads = []
    for _ in range(3):
        start = time.perf_counter()
        da.from_zarr(str(path)).sum().compute()
        reads.append(time.perf_counter() - start)

    pids = {f"worker {i}": pid for i, pid in enumerate(client.run(os.getpid).values())}
    pids["driver + scheduler"] = os.getpid()
    stamps, sent = [], []
    record = engine.History.record

    def timed_record(self, *a, **kw):
        stamps.append(time.perf_counter())
        sent.append(
            sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())
        )
        record(self, *a, **kw)

    engine.History.record = timed_record
    try:
        model = NMF(n_components=K, init="random", random_state=0, tol=0, max_iter=n_iter)
        before = client.run(os.getpid)
        with ProcessMemory(pids) as memory:
            start = time.perf_counter()
            model.fit(str(path))
            fit_seconds = time.perf_counter() - start
    finally:
        engine.History.record = record
    budget = get_bytes("dasknmf.panel-bytes")
    n_panels = len(coalesce_bounds(X.chunks[0], [r * N * 4 for r in X.chunks[0]], budget)) - 1
    return dict(
        n_rows=X.shape[0],
        nbytes=X.nbytes,
        disk=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        cached=should_cache(X.nbytes, "auto"),
        n_panels=n_panels,
        raw_read=statistics.median(reads),
        # stamps[0] and [1] are both taken after iteration 1.
        per_iteration=statistics.median(np.diff(stamps[1:])),
        moved=statistics.median(np.diff(sent[1:])),
        fit_seconds=fit_seconds,
        restarted=client.run(os.getpid) != before,
        peak=memory.peak,
    )


def main() -> None:
    from distributed import Client, LocalCluster

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
        results = [measure(client, make_store(n_rows), args.iterations) for n_rows in SIZES]

    # The estimate of the design: every panel's partial (k × n float32, plus k × k and the
    # statistics) travels once. Measured is less: consecutive panels sit on one worker, and the
    # reduction tree sums a worker's partials there before anything crosses.
    partial = K * N * 4 + K * K * 4 + 64
    limit = WORKER_MEMORY / 2**20
    lines = [
        "## Out of core: Zarr on 2 GB of workers (`benchmarks/bench_out_of_core.py`)",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine()}. X is n × {N:,} float32, "
        f"rank {RANK} plus noise, blosc-lz4; LocalCluster of {WORKERS} worker processes × 1 "
        f"thread with {limit:.0f} MiB each; k = {K}, random init, {args.iterations} "
        "iterations, default settings (`cache='auto'`, 64 MiB panels).",
        "",
        "| measure | " + " | ".join(f"{r['n_rows']:,} rows" for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]

    def row(label, values):
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    row(
        "X in memory / on disk",
        [f"{r['nbytes'] / 1e9:.1f} / {r['disk'] / 1e9:.1f} GB" for r in results],
    )
    row("X cached or streamed", ["cached" if r["cached"] else "streamed" for r in results])
    row("row panels", [str(r["n_panels"]) for r in results])
    row(
        "one raw read, `da.from_zarr(path).sum()` (median of 3)",
        [f"{r['raw_read']:.1f} s" for r in results],
    )
    row("NMF, median time per iteration", [f"{r['per_iteration']:.1f} s" for r in results])
    row(
        "**per iteration / raw read**",
        [f"**{r['per_iteration'] / r['raw_read']:.2f}×**" for r in results],
    )
    row(
        "whole fit (validation pass, iterations, error pass)",
        [f"{r['fit_seconds']:.0f} s" for r in results],
    )
    row(
        "bytes between workers per iteration, measured",
        [f"{r['moved'] / 2**20:.1f} MiB" for r in results],
    )
    row(
        "the same, estimated as panels × k × n × itemsize",
        [f"{r['n_panels'] * partial / 2**20:.1f} MiB" for r in results],
    )
    row("any worker restarted", ["yes" if r["restarted"] else "no" for r in results])
    for name in results[0]["peak"]:
        bound = f" (limit {limit:.0f} MiB)" if name.startswith("worker") else ""
        row(f"peak RSS, {name}{bound}", [f"{r['peak'][name] / 2**20:.0f} MiB" for r in results])
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("out-of-core", text)


if __name__ == "__main__":
    main()
