"""What the scheduler costs an iteration, measured on a synthetic shard (not dasknmf's engine).

Each iteration, each of two shards does the arithmetic of a HALS shard update on its two
5000 × 2000 float32 panels (C = H·X_iᵀ, three sweeps over W_i, the partials A_i = W_i·X_i and
B_i = W_i·W_iᵀ), then H is updated from the sum of the partials. Three ways to run it:

- ``memory``: the two shards in two threads of one process, H in the main thread;
- ``tasks``: a LocalCluster of 2 worker processes × 1 thread, one task per shard per
  iteration that forms H from both shards' outputs of the iteration before (as dasknmf's
  folded iterations do, ``dasknmf/fold.py``), two iterations in flight;
- ``collective``: the same cluster, one long-running task per shard that runs every iteration
  and sends its partials to the other shard's worker directly (a handler on each worker), as
  xgboost's and LightGBM's Dask integrations run their rounds.

The workers' mmap threshold is raised in both cluster ways (as dasknmf does,
``dasknmf/_malloc.py``). Reported: the median interval between iterations (30 iterations), in
fresh processes, the three ways interleaved round by round, medians over rounds. It bounds what
a collective engine (docs/design.md, "The hop that remains") could gain over today's tasks.

    python benchmarks/bench_hop.py --rounds 3 [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import machine, run_child, write_section

ROWS, N, K, ITERATIONS = 5000, 2000, 20, 30


def _panels(shard: int) -> list[np.ndarray]:
    rng = np.random.default_rng(shard)
    return [rng.random((ROWS, N), dtype=np.float32) for _ in range(2)]


def _start(shard: int) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + shard)
    return [rng.random((K, ROWS), dtype=np.float32) for _ in range(2)]


def _h0() -> np.ndarray:
    return np.random.default_rng(99).random((K, N), dtype=np.float32)


def shard_work(panels, h, wts):
    """One shard's update: new blocks of Wᵀ and the partials (A, B)."""
    a, b, new = np.zeros((K, N)), np.zeros((K, K)), []
    gram = h @ h.T
    scale = np.diag(gram)[:, None] + 1e-9
    for x, wt in zip(panels, wts, strict=True):
        c = h @ x.T
        for _ in range(3):
            wt = np.maximum(wt + 0.1 * (c - gram @ wt) / scale, 0).astype(np.float32)
        a += wt @ x
        b += wt @ wt.T
        new.append(wt)
    return new, a, b


def h_update(h, parts):
    a = sum(p[0] for p in parts)
    b = sum(p[1] for p in parts)
    scale = np.diag(b)[:, None] + 1e-9
    for _ in range(3):
        h = np.maximum(h + 0.1 * (a - b @ h) / scale, 0).astype(np.float32)
    return h


def _median_interval(stamps) -> float:
    return float(statistics.median(np.diff(stamps)))


# -- in memory -------------------------------------------------------------------------------


def in_memory() -> float:
    from concurrent.futures import ThreadPoolExecutor

    data, wts, h, stamps = [_panels(s) for s in (0, 1)], [_start(s) for s in (0, 1)], _h0(), []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(ITERATIONS):
            step = [pool.submit(shard_work, data[s], h, wts[s]) for s in (0, 1)]
            outs = [future.result() for future in step]
            wts = [out[0] for out in outs]
            h = h_update(h, [out[1:] for out in outs])
            stamps.append(time.perf_counter())
    return _median_interval(stamps)


# -- on a cluster: the panels live on the workers --------------------------------------------

_DATA: dict[int, list] = {}
_INBOX: dict = {}
_ARRIVED = threading.Condition()


def load(shard: int) -> int:
    _DATA[shard] = _panels(shard)
    return shard


def first_task(shard: int, h):
    return (*shard_work(_DATA[shard], h, _start(shard)), h)


def next_task(shard: int, own: int, *outs):
    """Iteration t + 1 of ``shard``: H(t) from all shards' outputs of t, then its update."""
    h = h_update(outs[0][3], [out[1:3] for out in outs])
    return (*shard_work(_DATA[shard], h, outs[own][0]), h)


def top(out) -> float:
    return float(out[3][0, 0])


async def _receive(comm=None, key=None, payload=None):
    with _ARRIVED:
        _INBOX[key] = payload
        _ARRIVED.notify_all()


def install_handler(dask_worker) -> None:
    dask_worker.handlers["bench_hop_put"] = _receive


def collective_task(shard: int, own: int, peers: list, h) -> list[float]:
    """Every iteration of ``shard``: its update, its partials sent to the other shards'
    workers, theirs awaited, H formed here from all (the same on every worker)."""
    from distributed import get_worker
    from distributed.protocol import to_serialize
    from distributed.utils import sync

    worker, wts, stamps = get_worker(), _start(shard), []
    for t in range(ITERATIONS):
        wts, a, b = shard_work(_DATA[shard], h, wts)
        for other, address in enumerate(peers):
            if other != own:
                rpc = worker.rpc(address)
                sync(worker.loop, rpc.bench_hop_put, key=(t, own), payload=to_serialize((a, b)))
        parts = []
        with _ARRIVED:
            for other in range(len(peers)):
                if other == own:
                    parts.append((a, b))
                    continue
                while (t, other) not in _INBOX:
                    _ARRIVED.wait()
                parts.append(_INBOX.pop((t, other)))
        h = h_update(h, parts)
        stamps.append(time.perf_counter())
    return stamps


def on_cluster(how: str) -> float:
    import bench_hop  # the workers take its functions from the module, not from __main__
    from distributed import Client, LocalCluster, wait

    from dasknmf import _malloc

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        _malloc.tune_workers(client)
        workers = sorted(client.scheduler_info()["workers"])
        wait(
            [
                client.submit(bench_hop.load, s, workers=[w], pure=False)
                for s, w in enumerate(workers)
            ]
        )
        h = _h0()
        if how == "collective":
            client.run(bench_hop.install_handler)
            futures = [
                client.submit(bench_hop.collective_task, s, s, workers, h, workers=[w], pure=False)
                for s, w in enumerate(workers)
            ]
            return _median_interval(client.gather(futures)[0])
        outs = [
            client.submit(bench_hop.first_task, s, h, workers=[w], pure=False)
            for s, w in enumerate(workers)
        ]
        pending, stamps = [], []
        for _ in range(ITERATIONS):
            outs = [
                client.submit(bench_hop.next_task, s, s, *outs, workers=[w], pure=False)
                for s, w in enumerate(workers)
            ]
            pending.append(client.submit(bench_hop.top, outs[0], pure=False))
            if len(pending) > 1:
                pending.pop(0).result()
                stamps.append(time.perf_counter())
        return _median_interval(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="store in benchmarks/RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import threadpoolctl

        threadpoolctl.threadpool_limits(1)  # as the workers run: one BLAS thread per task
        seconds = in_memory() if args.child == "memory" else on_cluster(args.child)
        print(json.dumps({"per_iter": seconds}))
        return
    ways = ("memory", "tasks", "collective")
    samples = {way: [] for way in ways}
    for round_ in range(args.rounds):
        for way in ways:
            samples[way].append(run_child(__file__, "--child", way)["per_iter"])
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    per_iter = {way: statistics.median(values) for way, values in samples.items()}
    labels = {
        "memory": "in memory (2 threads)",
        "tasks": "LocalCluster, 2 processes: a task per shard per iteration (as `fold.py`)",
        "collective": "LocalCluster, 2 processes: a long-running task per shard, partials "
        "sent worker to worker",
    }
    lines = [
        "## The scheduler's share of an iteration, synthetic (`benchmarks/bench_hop.py`)",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine()}. Two shards of two 5000 × 2000 "
        f"float32 panels, k = {K}; median interval between iterations of {ITERATIONS}, medians "
        f"of {args.rounds} rounds, the ways interleaved; not dasknmf's engine.",
        "",
        "| way | ms per iteration | ratio to in memory |",
        "|---|---|---|",
    ]
    for way in ways:
        lines.append(
            f"| {labels[way]} | {1000 * per_iter[way]:.1f} | "
            f"{per_iter[way] / per_iter['memory']:.2f}× |"
        )
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("hop", text)


if __name__ == "__main__":
    main()
