"""Scale-out benchmarks (issue "Scale-out"), one scenario per flag:

``--small-workers``: out of core on small workers. A 1.6 GB dense store (200,000 × 2,000
float32, the out-of-core benchmark's matrix with fewer rows) on a LocalCluster of 2 worker
processes × 1 thread with 500 MB each, default settings (64 MiB panels, ``cache='auto'``, which
streams X: it is 1.6× the cluster's memory), k = 20, random init. Measured: whether the fit
completes and whether any worker was restarted; one raw read of the store
(``open_matrix(path).sum()``, median of 3); the median time between iterations and its ratio
to the read; the peak resident memory of each worker (sampled every 20 ms).

    python benchmarks/bench_scale.py --small-workers --write

``--many-panels``: the cost of panels. X = 40,000 × 100 float32 (W·H, k = 20, uniform from
``default_rng(0)``) cut into 10 panels of 4,000 rows or 10,000 panels of 4 rows, fitted in
memory (2 threads) and on a LocalCluster of 2 worker processes × 1 thread with X persisted
there (``cache=True``); k = 20, random init, tol 0, row panels forced, default settings
otherwise. Measured: the median time between iterations of an 8-iteration fit (the median of 3
rounds, the two sizes alternating; on the cluster after a first fit of each that warms the
workers up), the task states the scheduler holds at the end of each iteration (median), and
how many panels a task updates at once (``layout_['stacked']``).

``--scheduler-state``: a 500-iteration fit of a 400 × 30 matrix in 8 panels on a LocalCluster
of 2 worker processes; the task states the scheduler holds after iterations 50 and 500 (the
maximum over the 20 iterations up to each: one period of the lineage cut), with the cut and,
for comparison, without it (``engine.LINEAGE_EVERY`` set beyond the fit).

``--cost-model``: the cost model of the docs (tasks, bytes moved between workers, worker
memory per iteration) against measurement: X = 40,000 × 500 float32 (80 MB) in 80 panels of
1 MB, persisted on LocalClusters of 1, 2, 4 and 8 worker processes × 1 thread; k = 20, random
init, tol 0; counted over iterations 3–10 of a fit (after a first fit that warms up): tasks
that ran (a scheduler plugin), bytes the workers sent each other
(``transfer_outgoing_bytes_total``), and the bytes each worker holds (``state.nbytes``).

    python benchmarks/bench_scale.py --many-panels --scheduler-state --cost-model --write

``--two-d``: 2-D blocks. A sparse 8,000,000 × 8,000,000 float32 CSR store with 40,000,000
stored entries (positions uniform from ``default_rng(0)``, values those of W·H for gamma
W, H of rank 16 there) on a LocalCluster of 2 worker processes × 1 thread with 1.5 GB each,
default settings (panels sized from the workers, ``layout='auto'``, ``cache='auto'``); k = 16,
random init, tol 0. Measured: the layout taken, whether the fit completes and whether any
worker was restarted, the median time between iterations, the bytes the workers sent each
other per iteration, each worker's peak resident memory (sampled every 20 ms); then the same
fit in memory on the same blocks (the store read into scipy.sparse, the same ``panel_bytes``),
and the largest differences between the two fits' factors. ``--two-d-size N --two-d-nnz E``
runs a smaller matrix.

    python benchmarks/bench_scale.py --two-d --write

``--threads``: shards even over the threads. The dense benchmark's matrix (20,000 × 2,000
float32, 160 MB) in its Zarr store as ``save_matrix`` writes it (opened as panels of 64, 64
and 25 MB), streamed in every iteration (``dasknmf.cache-fraction`` 0) on a LocalCluster of 2
worker processes × 1 thread, k = 20 and 100, random init, tol 0, 8 iterations, default
settings. The shards as ``cuts.shard_layout`` cuts them now (at the panel boundary nearest each
thread's share of the rows) against the rule before 2026-12-04, which this script reproduces
(a panel goes to the shard its start falls in). Measured: each thread's share of the rows and
the median time between iterations (median of 3 rounds, the two rules alternating).

    python benchmarks/bench_scale.py --threads --write
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import iteration_times, machine, write_section
from bench_out_of_core import DATA, ProcessMemory, make_store

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


def shards_by_starts(row_sizes, n_slots: int, split_every: int, group: int = 0):
    """``cuts.shard_layout`` before 2026-12-04: a panel run goes to the shard its start
    falls in (for the comparison of ``--threads``)."""
    from dasknmf.ops import shard_level

    n_panels = len(row_sizes)
    level = max(group, shard_level(n_panels, n_slots, split_every))
    starts = list(range(0, n_panels, split_every**level))
    rows_before = np.cumsum([0, *row_sizes])
    n_shards = min(n_slots, len(starts))
    owner = [int(rows_before[g] * n_shards // max(1, rows_before[-1])) for g in starts]
    bounds = [g for g, a, b in zip(starts[1:], owner, owner[1:], strict=False) if a != b]
    return level, [0, *bounds, n_panels]


THREADS_KS = (20, 100)


def threads(n_iter: int) -> dict:
    import dask
    from bench_dense import make_x
    from distributed import Client, LocalCluster

    from dasknmf import NMF, panels, save_matrix

    path = DATA / "threads.zarr"
    save_matrix(path, make_x(), overwrite=True)
    layout = panels.shard_layout

    def per_iteration(k: int, before: bool) -> dict:
        shares = []

        def recorded(row_sizes, *args, **kwargs):
            level, bounds = (shards_by_starts if before else layout)(row_sizes, *args, **kwargs)
            rows = [sum(row_sizes[a:b]) for a, b in itertools.pairwise(bounds)]
            shares.append([r / sum(row_sizes) for r in rows])
            return level, bounds

        panels.shard_layout = recorded  # what Panels.shard calls
        try:
            model = NMF(k, init="random", random_state=0, tol=0, max_iter=n_iter)
            with iteration_times() as stamps:
                model.fit(str(path))
        finally:
            panels.shard_layout = layout
        return {
            "per_iteration": statistics.median(np.diff(stamps[1:])),
            "panels": model.layout_["panels"],
            "shares": shares[-1],
        }

    runs: dict = {}
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster),
        dask.config.set({"dasknmf.cache-fraction": 0}),
    ):
        for k in THREADS_KS:
            per_iteration(k, False)  # warm up
            for _ in range(ROUNDS):
                for before in (True, False):
                    runs.setdefault((k, before), []).append(per_iteration(k, before))
    return {
        key: dict(value[0], per_iteration=statistics.median(r["per_iteration"] for r in value))
        for key, value in runs.items()
    }


def report_threads(r: dict, write: bool) -> None:
    lines = [
        "## Shards even over the threads (`benchmarks/bench_scale.py --threads`)",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine()}. The dense benchmark's matrix "
        "(20,000 × 2,000 float32, 160 MB) streamed from its store in every iteration on a "
        "LocalCluster of 2 worker processes × 1 thread; random init, tol 0, default settings "
        "(3 panels of 64, 64 and 25 MB); median time between iterations of an 8-iteration fit, "
        f"the median of {ROUNDS} rounds, the rules alternating. *Before*: a panel goes to the "
        "shard its start falls in; *now*: shards cut at the panel boundary nearest each "
        "thread's share (`cuts.shard_layout`).",
        "",
        "| k | shards | rows per thread | ms per iteration | before / now |",
        "|---|---|---|---|---|",
    ]
    for k in THREADS_KS:
        old, new = r[k, True], r[k, False]
        for label, x in (("before", old), ("now", new)):
            shares = " / ".join(f"{share:.0%}" for share in x["shares"])
            ratio = f"**{old['per_iteration'] / new['per_iteration']:.2f}×**" if x is new else ""
            lines.append(
                f"| {k} | {label} | {shares} | {1000 * x['per_iteration']:.0f} | {ratio} |"
            )
    text = "\n".join(lines)
    print(text)
    if write:
        write_section("scale-threads", text)


MANY_ROWS, MANY_COLS, FEW, MANY = 40_000, 100, 10, 10_000
ROUNDS = 3


@contextlib.contextmanager
def scheduler_tasks(client):
    """The number of task states on the scheduler after each iteration the block records."""
    from dasknmf import engine

    counts: dict[int, int] = {}
    record = engine._record

    def counting(history, objective, norm_x_sq, n_iter, summary):
        if client is not None:
            counts[n_iter] = client.run_on_scheduler(_n_tasks)
        return record(history, objective, norm_x_sq, n_iter, summary)

    engine._record = counting
    try:
        yield counts
    finally:
        engine._record = record


def _n_tasks(dask_scheduler) -> int:
    return len(dask_scheduler.tasks)


def many_panels(n_iter: int) -> dict:
    import dask.array as da
    from distributed import Client, LocalCluster

    from dasknmf import NMF

    rng = np.random.default_rng(0)
    X = rng.random((MANY_ROWS, K), dtype=np.float32) @ rng.random((K, MANY_COLS), dtype=np.float32)

    def per_iteration(data, n_panels, client=None):
        rows = MANY_ROWS // n_panels
        model = NMF(
            K,
            init="random",
            random_state=0,
            tol=0,
            max_iter=n_iter,
            cache=True,
            panel_bytes=rows * MANY_COLS * 4,
            layout="rows",  # under 'auto' a row with H does not fit 4 rows' budget: 2-D blocks
        )
        with iteration_times() as stamps, scheduler_tasks(client) as tasks:
            model.fit(data)
        assert model.layout_["panels"] == n_panels, model.layout_
        return {
            "per_iteration": statistics.median(np.diff(stamps[1:])),
            "tasks": statistics.median(tasks.values()) if tasks else None,
            "stacked": model.layout_.get("stacked", 1),
        }

    def median_of_rounds(runs: list[dict]) -> dict:
        return dict(runs[0], per_iteration=statistics.median(r["per_iteration"] for r in runs))

    runs: dict = {}
    for _ in range(ROUNDS):  # the two sizes alternate, so that a noisy spell hits both
        for n_panels in (FEW, MANY):
            runs.setdefault(("memory", n_panels), []).append(per_iteration(X, n_panels))
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        data = {
            n: da.from_array(X, chunks=(MANY_ROWS // n, MANY_COLS)).persist() for n in (FEW, MANY)
        }
        for n_panels in (FEW, MANY):
            per_iteration(data[n_panels], n_panels, client)  # warm up
        for _ in range(ROUNDS):
            for n_panels in (FEW, MANY):
                run = per_iteration(data[n_panels], n_panels, client)
                runs.setdefault(("cluster", n_panels), []).append(run)
    return {key: median_of_rounds(value) for key, value in runs.items()}


def scheduler_state() -> dict:
    import dask.array as da
    from distributed import Client, LocalCluster

    from dasknmf import NMF, engine

    rng = np.random.default_rng(0)
    X = rng.random((400, 4)) @ rng.random((4, 30))
    out = {}
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        data = da.from_array(X, chunks=(50, 30)).persist()
        for name, every in (("with the cut", engine.LINEAGE_EVERY), ("without", 10**9)):
            engine.LINEAGE_EVERY, default = every, engine.LINEAGE_EVERY
            try:
                with scheduler_tasks(client) as counts:
                    NMF(4, random_state=0, tol=0, max_iter=500, panel_bytes=50 * 30 * 8).fit(data)
            finally:
                engine.LINEAGE_EVERY = default
            out[name] = (
                max(counts[i] for i in range(31, 51)),
                max(counts[i] for i in range(481, 501)),
            )
    return out


COST_ROWS, COST_COLS, COST_PANEL_ROWS = 40_000, 500, 500


def predicted(m, n, k, n_panels, n_workers, itemsize=4, split_every=8, extrapolate=True):
    """The cost model of docs/design.md for one iteration of the row-panel engine with one
    column block of H, one thread per worker and X persisted by the caller (held twice: the
    caller's chunks and dasknmf's aligned panels): (tasks, bytes moved between workers, bytes
    held by a worker)."""
    from dasknmf.engine import SMALL_H_BYTES, SMALL_STATE_BLOCKS, SMALL_STATE_BYTES
    from dasknmf.fold import MAX_SHARDS
    from dasknmf.ops import shard_level

    shards = min(n_workers, n_panels)
    level = shard_level(n_panels, shards, split_every)
    nodes = -(-n_panels // split_every**level)
    continuing, count = 0, nodes
    while count > split_every:
        count = -(-count // split_every)
        continuing += count
    copies = 2 if extrapolate else 1  # pushed and plain blocks of W
    blocks = copies * -(-n_panels // shards)  # W arrays of a shard (no stacking here)
    whole = copies * -(-m // shards) * k * itemsize <= SMALL_STATE_BYTES
    whole = whole and blocks <= SMALL_STATE_BLOCKS
    # the H task; a summary task unless H is small (then its H task forms the control too)
    small_h = k * n * itemsize <= SMALL_H_BYTES
    tasks = shards * (1 if whole else 2) + continuing + 1 + (0 if small_h else 1 + extrapolate)
    remote = 1 - 1 / n_workers
    node = (k * n + k * k) * itemsize
    moved = (n_workers - 1) * k * n * itemsize + remote * (nodes + continuing) * node
    if whole and small_h and shards <= MAX_SHARDS:  # folded (``dasknmf.fold``)
        # each shard task forms H itself (and the levels of the tree above the shards) from
        # every shard's whole output, which carries the H it formed (and the H before, with
        # extrapolation); one task reads the summary
        tasks = shards + 1
        out = copies * -(-m // shards) * k * itemsize + (nodes / shards) * node
        out += copies * k * n * itemsize
        return tasks, (shards - 1) * shards * out, held_by(m, n, k, n_workers, copies, itemsize)
    if whole:  # the shards' outputs go whole, W included, to the tasks summing their nodes
        moved += remote * copies * m * k * itemsize
    return tasks, moved, held_by(m, n, k, n_workers, copies, itemsize)


def held_by(m, n, k, n_workers, copies, itemsize) -> float:
    """Bytes a worker holds: X twice (see ``predicted``), W's state and the next one."""
    return (2 * m * n + 2 * copies * m * k) * itemsize / n_workers


def _task_counter():
    """A scheduler plugin counting the tasks that ran (``done``)."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class CountTasks(SchedulerPlugin):
        done = 0

        def transition(self, key, start, finish, *args, **kwargs):
            if start == "processing" and finish == "memory":
                self.done += 1

    return CountTasks()


def cost_model(n_iter: int = 10) -> list[dict]:
    import dask.array as da
    from distributed import Client, LocalCluster

    from dasknmf import NMF, engine

    rng = np.random.default_rng(0)
    X = rng.random((COST_ROWS, K), dtype=np.float32) @ rng.random((K, COST_COLS), dtype=np.float32)
    rows = []
    for n_workers in (1, 2, 4, 8):
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                memory_limit="1GiB",
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            counter = _task_counter()
            cluster.scheduler.add_plugin(counter)
            data = da.from_array(X, chunks=(COST_PANEL_ROWS, COST_COLS)).persist()
            kwargs = dict(init="random", random_state=0, tol=0, max_iter=n_iter, cache=True)
            kwargs["panel_bytes"] = COST_PANEL_ROWS * COST_COLS * 4
            NMF(K, **kwargs).fit(data)  # warm up
            samples = {}
            record = engine._record

            def sampling(h, o, x, it, summary, samples=samples, counter=counter, record=record):
                if it in (3, n_iter):
                    sent = client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total)
                    held = client.run(lambda dask_worker: dask_worker.state.nbytes)
                    samples[it] = (counter.done, sum(sent.values()), max(held.values()))
                return record(h, o, x, it, summary)

            engine._record = sampling
            try:
                model = NMF(K, **kwargs).fit(data)
            finally:
                engine._record = record
            span = n_iter - 3
            (t0, b0, _), (t1, b1, held) = samples[3], samples[n_iter]
            tasks, moved, held_model = predicted(
                COST_ROWS, COST_COLS, K, model.layout_["panels"], n_workers
            )
            rows.append(
                {
                    "workers": n_workers,
                    "panels": model.layout_["panels"],
                    "tasks": (t1 - t0) / span,
                    "tasks_model": tasks,
                    "moved": (b1 - b0) / span,
                    "moved_model": moved,
                    "held": held,
                    "held_model": held_model,
                }
            )
    return rows


def report_cost_model(rows: list[dict], write: bool) -> None:
    lines = [
        "## Cost model against measurement (`benchmarks/bench_scale.py --cost-model`)",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine()}. X = {COST_ROWS:,} × "
        f"{COST_COLS} float32 in panels of {COST_PANEL_ROWS} rows, persisted; k = {K}, random "
        "init (extrapolation on); per iteration over iterations 3–10; LocalClusters of worker "
        "processes × 1 thread. Model: the formulas of the design document "
        "(`predicted` in the script).",
        "",
        "| workers | panels | tasks per iteration (model) | bytes moved per iteration (model) "
        "| largest bytes held by a worker (model) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['panels']} | {r['tasks']:.1f} ({r['tasks_model']}) | "
            f"{r['moved'] / 2**10:,.0f} KiB ({r['moved_model'] / 2**10:,.0f} KiB) | "
            f"{r['held'] / 2**20:,.1f} MiB ({r['held_model'] / 2**20:,.1f} MiB) |"
        )
    text = "\n".join(lines)
    print(text)
    if write:
        write_section("scale-cost-model", text)


TWO_D_SIZE, TWO_D_NNZ, TWO_D_K = 8_000_000, 40_000_000, 16
TWO_D_WORKER_MEMORY = 1.5e9


def make_sparse_store(n: int, nnz: int):
    """The planted sparse matrix of ``--two-d`` as a CSR store (written once, then reused)."""
    import scipy.sparse as sp

    from dasknmf import save_matrix

    path = DATA / f"two_d_{n}_{nnz}.zarr"
    if path.exists():
        return path
    DATA.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    W = rng.gamma(1.0, 1.0, (n, TWO_D_K)).astype(np.float32)
    H = rng.gamma(1.0, 1.0, (TWO_D_K, n)).astype(np.float32)
    rows, cols = rng.integers(0, n, nnz), rng.integers(0, n, nnz)
    values = np.empty(nnz, dtype=np.float32)
    for start in range(0, nnz, 2**20):
        r, c = rows[start : start + 2**20], cols[start : start + 2**20]
        values[start : start + 2**20] = np.einsum("ij,ji->i", W[r], H[:, c])
    del W, H
    X = sp.csr_array((values, (rows, cols)), shape=(n, n))
    X.sum_duplicates()
    save_matrix(path, X)
    return path


def two_d(n_iter: int, n: int, nnz: int) -> dict:
    import dask
    import scipy.sparse as sp
    from distributed import Client, LocalCluster

    from dasknmf import NMF, _params, open_matrix

    path = make_sparse_store(n, nnz)
    kwargs = dict(init="random", random_state=0, tol=0, max_iter=n_iter)
    with (
        # Every transfer a worker receives, with its keys' sizes (``moved_by``).
        dask.config.set({"distributed.admin.low-level-log-length": 1_000_000}),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit=TWO_D_WORKER_MEMORY,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        budget = _params.panel_budget(None, True, (n, n), TWO_D_K, 4)
        counter = _task_counter()
        cluster.scheduler.add_plugin(counter)
        pids = {f"worker {i}": pid for i, pid in enumerate(client.run(os.getpid).values())}
        sent = lambda dask_worker: dask_worker.transfer_outgoing_bytes_total  # noqa: E731
        error, model, whole = None, NMF(TWO_D_K, **kwargs), None
        before = sum(client.run(sent).values())
        # At each iteration: tasks run so far, and bytes the workers have sent to each other.
        done: list[tuple[int, int]] = []
        probe = lambda: (counter.done, sum(client.run(sent).values()))  # noqa: E731
        with iteration_times(probe, done) as stamps, ProcessMemory(pids) as memory:
            try:
                model.fit(str(path))
                W_cluster = model.W_.compute()
                whole = (sum(client.run(sent).values()) - before) / n_iter
            except Exception as failure:  # the point is to see whether it completes
                error = f"{type(failure).__name__}: {failure}"
        moved_by = _moved_by(client)
        restarted = set(client.run(os.getpid).values()) != set(pids.values())
    result = {
        "error": error,
        "restarted": restarted,
        "budget": budget,
        "per_iteration": statistics.median(np.diff(stamps[1:])) if len(stamps) > 2 else None,
        "moved": statistics.median(np.diff([b for _, b in done[1:]])) if len(done) > 2 else None,
        "moved_whole": whole if error is None else None,
        "moved_by": {name: nbytes / n_iter for name, nbytes in moved_by.items()},
        "tasks": statistics.median(np.diff([t for t, _ in done[1:]])) if len(done) > 2 else None,
        "peak": memory.peak,
        "n": n,
        "nnz": nnz,
        "n_iter": n_iter,
    }
    if error is not None:
        return result
    result["layout"] = model.layout_
    X = sp.csr_array(open_matrix(path).compute())
    # The same update rule: 'auto' extrapolation gives way on workers that cannot hold its
    # copies of the factors, and in memory there is no such limit.
    extrapolate = model.layout_["extrapolated"]
    in_memory = NMF(TWO_D_K, panel_bytes=budget, extrapolate=extrapolate, **kwargs)
    with iteration_times() as stamps:
        W_memory = in_memory.fit_transform(X)
    result["memory_per_iteration"] = statistics.median(np.diff(stamps[1:]))
    result["memory_layout"] = in_memory.layout_
    scale_h = np.abs(in_memory.components_).max()
    result["diff_H"] = float(np.abs(model.components_ - in_memory.components_).max() / scale_h)
    result["diff_W"] = float(np.abs(W_cluster - W_memory).max() / np.abs(W_memory).max())
    result["identical"] = bool(
        np.array_equal(model.components_, in_memory.components_)
        and np.array_equal(W_cluster, W_memory)
    )
    result["errors"] = (model.reconstruction_err_, in_memory.reconstruction_err_)
    return result


def _moved_by(client) -> dict[str, int]:
    """Bytes the workers received from each other, by the name of the task that made the
    data (``dask.utils.key_split``), largest first."""
    from dask.utils import key_split

    def received(dask_worker):
        return [(k, n) for t in dask_worker.transfer_incoming_log for k, n in t["keys"].items()]

    totals: dict[str, int] = {}
    for pairs in client.run(received).values():
        for key, nbytes in pairs:
            totals[key_split(key)] = totals.get(key_split(key), 0) + nbytes
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def report_two_d(r: dict, write: bool) -> None:
    limit = TWO_D_WORKER_MEMORY / 2**20
    per_iteration = f"{r['per_iteration']:.1f} s" if r["per_iteration"] else "–"
    lines = [
        "## 2-D blocks, sparse (`benchmarks/bench_scale.py --two-d`)",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine()}. X = {r['n']:,} × {r['n']:,} "
        f"float32 CSR with {r['nnz']:,} stored entries (a CSR Zarr store), k = {TWO_D_K}, "
        f"random init, {r['n_iter']} iterations, tol 0, default settings, on a LocalCluster "
        f"of 2 worker processes × 1 thread with {limit:.0f} MiB each; then in memory on the "
        "same blocks.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| completed | {'yes' if r['error'] is None else 'no: ' + r['error'][:300]} |",
        f"| any worker restarted | {'yes' if r['restarted'] else 'no'} |",
        f"| panel budget from the workers | {r['budget'] / 2**20:.0f} MiB |",
    ]
    if r["error"] is None:
        layout = r["layout"]
        lines += [
            f"| layout taken | {layout['scheme']}, {' × '.join(map(str, layout['blocks']))}, "
            f"{'cached' if layout['cached'] else 'streamed'}, "
            f"{'with' if layout['extrapolated'] else 'without'} extrapolation |",
            f"| median time per iteration, cluster | {per_iteration} |",
            f"| median time per iteration, in memory (2 threads) | "
            f"{r['memory_per_iteration']:.1f} s |",
            f"| bytes sent between workers per iteration (median between iterations; model "
            f"2·(w − 1)·k·n·b = {2 * TWO_D_K * r['n'] * 4 / 2**20:,.0f} MiB) | "
            f"{r['moved'] / 2**20:,.0f} MiB |",
            f"| bytes sent by the workers over the whole fit, W and H to the client included, "
            f"/ iterations | {r['moved_whole'] / 2**20:,.0f} MiB |",
            "| of which, by the task that made the data (the workers' transfer logs, whole fit "
            "/ iterations) | "
            + ", ".join(
                f"{name} {nbytes / 2**20:,.0f} MiB"
                for name, nbytes in list(r["moved_by"].items())[:6]
            )
            + " |",
            f"| tasks per iteration (median between iterations; 2·S·Q + S + Q + the summary "
            f"= {2 * 2 * layout['blocks'][1] + 2 + layout['blocks'][1] + 1} for S = 2 worker "
            f"threads, Q = {layout['blocks'][1]} column blocks) | {r['tasks']:.0f} |",
            f"| cluster = in memory, bit for bit | {'yes' if r['identical'] else 'no'} |",
            f"| largest difference, H / W (relative to the largest entry) | "
            f"{r['diff_H']:.1e} / {r['diff_W']:.1e} |",
            f"| reconstruction error, cluster / in memory | {r['errors'][0]:.6g} / "
            f"{r['errors'][1]:.6g} |",
        ]
    for name, peak in r["peak"].items():
        lines.append(f"| peak RSS, {name} (limit {limit:.0f} MiB) | {peak / 2**20:.0f} MiB |")
    text = "\n".join(lines)
    print(text)
    if write:
        write_section("scale-two-d", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-workers", action="store_true")
    parser.add_argument("--many-panels", action="store_true")
    parser.add_argument("--scheduler-state", action="store_true")
    parser.add_argument("--cost-model", action="store_true")
    parser.add_argument("--two-d", action="store_true")
    parser.add_argument("--threads", action="store_true")
    parser.add_argument("--two-d-size", type=int, default=TWO_D_SIZE)
    parser.add_argument("--two-d-nnz", type=int, default=TWO_D_NNZ)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="store in benchmarks/RESULTS.md")
    args = parser.parse_args()
    scenarios = (args.small_workers, args.many_panels, args.scheduler_state, args.cost_model)
    if not (any(scenarios) or args.two_d or args.threads):
        parser.error(
            "choose a scenario (--small-workers, --many-panels, --scheduler-state, --cost-model, "
            "--two-d, --threads)"
        )
    if args.threads:
        report_threads(threads(8), args.write)
    if args.two_d:
        report_two_d(two_d(args.iterations, args.two_d_size, args.two_d_nnz), args.write)
    if args.cost_model:
        report_cost_model(cost_model(), args.write)
    if args.many_panels:
        report_many_panels(many_panels(8), args.write)
    if args.scheduler_state:
        report_scheduler_state(scheduler_state(), args.write)
    if args.small_workers:
        report_small_workers(small_workers(args.iterations), args)


def report_many_panels(r: dict, write: bool) -> None:
    lines = [
        "## 10 panels against 10,000 (`benchmarks/bench_scale.py --many-panels`)",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine()}. X = {MANY_ROWS:,} × "
        f"{MANY_COLS} float32, k = {K}, random init, tol 0, otherwise default settings; "
        f"median time between iterations of an 8-iteration fit; on the cluster X is persisted "
        "(2 worker processes × 1 thread) and each size ran once before, to warm the workers "
        f"up; row panels forced (`layout='rows'`); the median of {ROUNDS} rounds, the sizes "
        "alternating. *Stacked*: the panels a task updates at once (`layout_['stacked']`).",
        "",
        "| where | panels | stacked | ms per iteration | task states on the scheduler "
        "| 10,000 panels / 10 |",
        "|---|---|---|---|---|---|",
    ]
    for where, label in (("memory", "in memory, 2 threads"), ("cluster", "LocalCluster 2 × 1")):
        few, many = r[where, FEW], r[where, MANY]
        for n_panels, x in ((FEW, few), (MANY, many)):
            ratio = f"**{many['per_iteration'] / few['per_iteration']:.2f}×**" if x is many else ""
            tasks = "–" if x["tasks"] is None else f"{x['tasks']:.0f}"
            lines.append(
                f"| {label} | {n_panels:,} | {x['stacked']} | {1000 * x['per_iteration']:.1f} "
                f"| {tasks} | {ratio} |"
            )
    for n_panels in (FEW, MANY):
        ratio = r["cluster", n_panels]["per_iteration"] / r["memory", n_panels]["per_iteration"]
        lines.append("")
        lines.append(f"Cluster against memory, {n_panels:,} panels: {ratio:.2f}×.")
    text = "\n".join(lines)
    print(text)
    if write:
        write_section("scale-many-panels", text)


def report_scheduler_state(r: dict, write: bool) -> None:
    lines = [
        "## Scheduler state over 500 iterations (`benchmarks/bench_scale.py --scheduler-state`)",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine()}. A 400 × 30 matrix in 8 panels, "
        "k = 4, 500 iterations on a LocalCluster of 2 worker processes; the task states the "
        "scheduler holds (the maximum over the 20 iterations before each point, a full period "
        "of the lineage cut).",
        "",
        "| lineage | after 50 iterations | after 500 iterations |",
        "|---|---|---|",
    ]
    for name, (early, late) in r.items():
        lines.append(f"| {name} | {early} | {late} |")
    text = "\n".join(lines)
    print(text)
    if write:
        write_section("scale-scheduler-state", text)


def report_small_workers(r: dict, args) -> None:
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
