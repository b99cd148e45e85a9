"""Scale-out benchmarks (issue "Scale-out"), one scenario per flag; so far:

``--small-workers``: out of core on small workers. A 1.6 GB dense store (200,000 × 2,000
float32, the out-of-core benchmark's matrix with fewer rows) on a LocalCluster of 2 worker
processes × 1 thread with 500 MB each, default settings (64 MiB panels, ``cache='auto'``, which
streams X: it is 1.6× the cluster's memory), k = 20, random init. Measured: whether the fit
completes and whether any worker was restarted; one raw read of the store
(``open_matrix(path).sum()``, median of 3); the median time between iterations and its ratio
to the read; the peak resident memory of each worker (sampled every 20 ms).

    python benchmarks/bench_scale.py --small-workers --write
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import iteration_times, machine, write_section
from bench_out_of_core import ProcessMemory, make_store

SMALL_ROWS, K = 200_000, 20
SMALL_WORKER_MEMORY = 500 * 10**6


def small_workers(n_iter: int) -> dict:
    from distributed import Client, LocalCluster

    from dasknmf import NMF, open_matrix

    path = make_store(SMALL_ROWS)
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit=SMALL_WORKER_MEMORY,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        reads = []
        for _ in range(3):
            start = time.perf_counter()
            open_matrix(path).sum(dtype=np.float64).compute()
            reads.append(time.perf_counter() - start)
        pids = {f"worker {i}": pid for i, pid in enumerate(client.run(os.getpid).values())}
        error = None
        with iteration_times() as stamps, ProcessMemory(pids) as memory:
            try:
                NMF(K, init="random", random_state=0, tol=0, max_iter=n_iter).fit(str(path))
            except Exception as failure:  # the point is to see whether it completes
                error = f"{type(failure).__name__}: {failure}"
        restarted = set(client.run(os.getpid).values()) != set(pids.values())
    return {
        "error": error,
        "restarted": restarted,
        "raw_read": statistics.median(reads),
        "per_iteration": statistics.median(np.diff(stamps[1:])) if len(stamps) > 2 else None,
        "peak": memory.peak,
        "nbytes": SMALL_ROWS * 2000 * 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-workers", action="store_true")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="store in benchmarks/RESULTS.md")
    args = parser.parse_args()
    if not args.small_workers:
        parser.error("choose a scenario (--small-workers)")
    r = small_workers(args.iterations)
    limit = SMALL_WORKER_MEMORY / 2**20
    ratio = f"{r['per_iteration'] / r['raw_read']:.2f}×" if r["per_iteration"] else "–"
    per_iteration = f"{r['per_iteration']:.2f} s" if r["per_iteration"] else "–"
    lines = [
        "## Out of core on small workers (`benchmarks/bench_scale.py --small-workers`)",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine()}. X is {r['nbytes'] / 1e9:.1f} GB "
        f"({SMALL_ROWS:,} × 2,000 float32, blosc-lz4, chunks of 2,048 rows) on a LocalCluster "
        f"of 2 workers × 1 thread with {limit:.0f} MiB each; default settings (64 MiB panels, "
        f"`cache='auto'`: streamed); k = {K}, random init, {args.iterations} iterations.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| completed | {'yes' if r['error'] is None else 'no: ' + r['error'][:200]} |",
        f"| any worker restarted | {'yes' if r['restarted'] else 'no'} |",
        f"| one raw read (median of 3) | {r['raw_read']:.2f} s |",
        f"| median time per iteration | {per_iteration} |",
        f"| **per iteration / raw read** | **{ratio}** |",
    ]
    for name, peak in r["peak"].items():
        lines.append(f"| peak RSS, {name} (limit {limit:.0f} MiB) | {peak / 2**20:.0f} MiB |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("scale-small-workers", text)


if __name__ == "__main__":
    main()
