"""Object store against local disk: one pass over the out-of-core benchmark's store, and NMF
iterations, read from an S3-compatible server on loopback and from the local disk.

The store is the 2 GB one of ``bench_out_of_core.py`` (250,000 × 2,000 float32, blosc-lz4,
chunks of 2,048 rows), copied into a moto S3 server (``moto.server``, in a process of its own,
on 127.0.0.1) — the server the tests use. On a LocalCluster of 2 worker processes × 1 thread
(1 GiB each), the script measures, in one run and interleaved, rounds of

- one pass over the store: ``open_matrix(path).sum()`` (every panel read once), in MB/s,
  for panels of 16, 64 and 256 MiB (``panel_bytes``) and, from S3, also with 2 threads per
  worker (twice the concurrent requests);
- an NMF fit, k = 20, random init, X streamed (``cache=False``): the median time between
  iterations.

Medians over ``--rounds`` rounds. The loopback server is not a real object store: it has no
network latency and its own CPU cost (a Python server on the same two cores), so the ratios
bound what the client side costs; see RESULTS.md for the reading.

    pip install ".[bench]"          # s3fs and moto's server
    python benchmarks/bench_remote.py --write
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import iteration_times, machine, write_section
from bench_out_of_core import make_store

ROWS, N, K = 250_000, 2_000, 20
WORKERS, WORKER_MEMORY = 2, 2**30
PANELS = ("16MiB", "64MiB", "256MiB")
CREDENTIALS = {"key": "bench", "secret": "bench"}


@contextlib.contextmanager
def s3_server():
    """moto's S3 server in a process of its own; yields its storage_options."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    server = subprocess.Popen(
        [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
         "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )  # fmt: skip
    options = {"endpoint_url": f"http://127.0.0.1:{port}", **CREDENTIALS}
    try:
        import s3fs

        deadline = time.monotonic() + 60
        while True:
            try:
                s3fs.S3FileSystem(**options, skip_instance_cache=True).ls("")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield options
    finally:
        server.terminate()
        server.wait()


def upload(local, options) -> tuple[str, float]:
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("bench")
    start = time.perf_counter()
    fs.put(str(local), "bench/X.zarr", recursive=True)
    return "s3://bench/X.zarr", time.perf_counter() - start


def one_pass(path, options, panel_bytes) -> float:
    from dasknmf import open_matrix

    X = open_matrix(path, panel_bytes=panel_bytes, storage_options=options)
    start = time.perf_counter()
    X.sum(dtype=np.float64).compute()
    return time.perf_counter() - start


def per_iteration(path, options, n_iter: int) -> float:
    from dasknmf import NMF

    with iteration_times() as stamps:
        NMF(K, init="random", random_state=0, tol=0, max_iter=n_iter, cache=False,
            storage_options=options).fit(path)  # fmt: skip
    return statistics.median(np.diff(stamps[1:]))  # stamps[0] and [1]: both after iteration 1


def main() -> None:
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="store in benchmarks/RESULTS.md")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()
    local = make_store(ROWS)
    nbytes = ROWS * N * 4
    chunk_files = [f for f in (local / "c").rglob("*") if f.is_file()]
    n_chunks, stored = len(chunk_files), sum(f.stat().st_size for f in chunk_files)
    with s3_server() as options:
        remote, upload_seconds = upload(local, options)
        reads = {}
        fits = {"disk": [], "s3": []}
        for threads in (1, 2):
            with (
                LocalCluster(
                    n_workers=WORKERS,
                    threads_per_worker=threads,
                    memory_limit=WORKER_MEMORY,
                    dashboard_address=None,
                ) as cluster,
                Client(cluster),
            ):
                for _ in range(args.rounds):
                    for panel in PANELS:
                        for where, path, opts in (
                            ("disk", str(local), None),
                            ("s3", remote, options),
                        ):
                            if threads == 2 and (where == "disk" or panel == "256MiB"):
                                continue
                            seconds = one_pass(path, opts, panel)
                            reads.setdefault((where, panel, threads), []).append(seconds)
                    if threads == 1:
                        fits["disk"].append(per_iteration(str(local), None, args.iterations))
                        fits["s3"].append(per_iteration(remote, options, args.iterations))

    def rate(key):
        return nbytes / statistics.median(reads[key]) / 1e6

    lines = [
        "## Object store against local disk (`benchmarks/bench_remote.py`)",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine()}. X is the out-of-core "
        f"benchmark's {nbytes / 1e9:.1f} GB store ({ROWS:,} × {N:,} float32, blosc-lz4, "
        f"{n_chunks} chunk objects of 2,048 rows, {stored / n_chunks / 2**20:.1f} MiB each on "
        "average); `s3` is moto's S3 server in a process "
        "of its own on 127.0.0.1 (uploaded in "
        f"{upload_seconds:.0f} s), `disk` the local file system (page cache warm). LocalCluster "
        f"of {WORKERS} workers × 1 thread (2 threads where said), {WORKER_MEMORY >> 20} MiB "
        f"each; medians of {args.rounds} rounds, interleaved.",
        "",
        "| one pass over X (`open_matrix(path).sum()`) | disk | s3 | s3 / disk |",
        "|---|---|---|---|",
    ]
    for panel in PANELS:
        d, s = rate(("disk", panel, 1)), rate(("s3", panel, 1))
        lines.append(
            f"| panels of {panel}, 1 thread per worker | {d:,.0f} MB/s | {s:,.0f} MB/s | "
            f"{d / s:.1f}× slower |"
        )
    for panel in PANELS[:2]:
        s = rate(("s3", panel, 2))
        lines.append(f"| panels of {panel}, 2 threads per worker | | {s:,.0f} MB/s | |")
    d, s = statistics.median(fits["disk"]), statistics.median(fits["s3"])
    lines += [
        "",
        f"| NMF, k = {K}, X streamed (`cache=False`), 64 MiB panels | disk | s3 | s3 / disk |",
        "|---|---|---|---|",
        f"| median time per iteration | {d:.2f} s | {s:.2f} s | {s / d:.2f}× |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("remote", text)


if __name__ == "__main__":
    main()
