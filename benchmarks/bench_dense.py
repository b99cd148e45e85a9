"""Dense benchmark: dasknmf against scikit-learn's NMF in the same run.

X = W·H + 0.1·noise, float32, 20000 × 2000 (W 20000×20, H 20×2000 and the noise all uniform from
``numpy.random.default_rng(0)`` in that order), k = 20, init 'nndsvda', tol 1e-4.

Speed is judged as time to the same error: scikit-learn's 'cd' runs to its own stop and its final
error E is the target; dasknmf (default settings, tol=0) runs exactly as many iterations as it
needs to reach E, found from a first exploratory run. Each contender runs in a fresh process per
round, the rounds interleave the contenders, and medians are reported. Peak memory is the
resident memory above what was resident before the fit, sampled every 5 ms (workers included).

    python benchmarks/bench_dense.py            # print the results
    python benchmarks/bench_dense.py --write    # and store them in benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import PeakMemory, machine, run_child, write_section

M, N, K = 20000, 2000, 20


def make_x() -> np.ndarray:
    rng = np.random.default_rng(0)
    W = rng.uniform(size=(M, K))
    H = rng.uniform(size=(K, N))
    noise = rng.uniform(size=(M, N))
    return (W @ H + 0.1 * noise).astype(np.float32)


def child_sklearn() -> dict:
    from sklearn.decomposition import NMF

    X = make_x()
    with PeakMemory() as memory:
        start = time.perf_counter()
        model = NMF(n_components=K, init="nndsvda", tol=1e-4, random_state=0, max_iter=1000)
        model.fit(X)
        seconds = time.perf_counter() - start
    return dict(
        seconds=seconds,
        n_iter=model.n_iter_,
        error=float(model.reconstruction_err_),
        peak_extra=memory.extra,
    )


def child_dasknmf(max_iter: int, tol: float, setting: str) -> dict:
    """A dasknmf fit; ``setting`` is ``inner_iter`` ('auto' or a number), with ``-plain`` for
    ``extrapolate=False``."""
    from dasknmf import NMF

    X = make_x()
    inner, _, plain = setting.partition("-")
    inner_iter = inner if inner == "auto" else int(inner)
    with PeakMemory() as memory, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        model = NMF(
            n_components=K,
            init="nndsvda",
            tol=tol,
            random_state=0,
            max_iter=max_iter,
            inner_iter=inner_iter,
            extrapolate=False if plain else "auto",
        )
        model.fit(X)
        seconds = time.perf_counter() - start
    errors = [float(np.sqrt(2 * loss)) for loss in model.loss_history_]
    return dict(
        seconds=seconds,
        n_iter=model.n_iter_,
        error=float(model.reconstruction_err_),
        peak_extra=memory.extra,
        errors=errors,
    )


def child_per_iteration(where: str, n_iter: int) -> dict:
    """Median wall time between consecutive iterations, in memory or on a LocalCluster (2
    workers × 1 thread, X persisted): the steady state, without the validation pass, the
    initialization and the final error pass, whose cost varies from fit to fit."""
    import dask.array as da

    from dasknmf import NMF, engine

    X = make_x()
    stamps = []
    record = engine.History.record

    def timed_record(self, *args, **kwargs):
        stamps.append(time.perf_counter())
        record(self, *args, **kwargs)

    engine.History.record = timed_record

    def per_iteration(data):
        stamps.clear()
        NMF(
            n_components=K,
            init="random",
            random_state=0,
            tol=0,
            max_iter=n_iter,
            panel_bytes=5000 * N * 4,
            cache=True,
        ).fit(data)
        # stamps[0] and [1] are both taken after iteration 1 (the init and iteration 1).
        return statistics.median(np.diff(stamps[1:]))

    if where == "memory":
        return dict(per_iter=per_iteration(X))
    import dask
    from distributed import Client, LocalCluster

    if where == "processes-malloc-untouched":  # as before dasknmf raised the workers' threshold
        dask.config.set({"dasknmf.worker-mmap-threshold": False})
        where = "processes"

    layout = {
        "processes": dict(n_workers=2, threads_per_worker=1, processes=True),
        "threads": dict(n_workers=1, threads_per_worker=2, processes=False),
    }[where]
    with (
        LocalCluster(dashboard_address=None, **layout) as cluster,
        Client(cluster),
    ):
        data = da.from_array(X, chunks=(5000, N)).persist()
        per_iteration(data)  # warm the workers up
        return dict(per_iter=per_iteration(data))


def first_reaching(errors: list[float], target: float) -> int | None:
    for n_iter, error in enumerate(errors):
        if n_iter and error <= target:
            return n_iter
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="store in benchmarks/RESULTS.md")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {
            "sklearn": child_sklearn,
            "dasknmf": lambda: child_dasknmf(int(rest[0]), float(rest[1]), rest[2]),
            "per-iteration": lambda: child_per_iteration(rest[0], int(rest[1])),
        }[kind]()
        print(json.dumps(result))
        return

    me = __file__
    settings = ("auto", "auto-plain", "10", "1-plain")
    explore = {inner: run_child(me, "--child", "dasknmf", "60", "0", inner) for inner in settings}
    rows = {"sklearn": [], "auto-own-stop": [], **{inner: [] for inner in settings}}
    targets = {}
    for round_ in range(args.rounds):
        sk = run_child(me, "--child", "sklearn")
        rows["sklearn"].append(sk)
        for inner in settings:
            n = first_reaching(explore[inner]["errors"], sk["error"])
            targets[inner] = n
            if n is not None:
                rows[inner].append(run_child(me, "--child", "dasknmf", str(n), "0", inner))
        rows["auto-own-stop"].append(run_child(me, "--child", "dasknmf", "1000", "1e-4", "auto"))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    # Interleaved by round, so that a noisy spell of the machine hits all three alike.
    places = ("memory", "processes", "threads", "processes-malloc-untouched")
    samples = {where: [] for where in places}
    for _ in range(args.rounds):
        for where in places:
            samples[where].append(
                run_child(me, "--child", "per-iteration", where, "30")["per_iter"]
            )
    per_iter = {where: statistics.median(values) for where, values in samples.items()}

    def med(name, key):
        return statistics.median(r[key] for r in rows[name])

    sk_time, sk_error = med("sklearn", "seconds"), med("sklearn", "error")
    lines = [
        "## Dense 20000 × 2000 float32, k = 20 (`benchmarks/bench_dense.py`)",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine()}. Medians of {args.rounds} "
        "rounds; each fit in a fresh process; rounds interleave the contenders.",
        "",
        "| contender | iterations | seconds | final error | speed-up vs scikit-learn | "
        "peak extra memory |",
        "|---|---|---|---|---|---|",
        f"| scikit-learn `cd`, tol 1e-4 (its own stop) | {med('sklearn', 'n_iter'):.0f} | "
        f"{sk_time:.2f} | {sk_error:.2f} | 1.00× | "
        f"{med('sklearn', 'peak_extra') / 2**20:.0f} MiB |",
    ]
    for inner, label in (
        ("auto", "dasknmf, default (`inner_iter='auto'`: 10 and 10 here; extrapolation)"),
        ("auto-plain", "dasknmf, `extrapolate=False`"),
        ("10", "dasknmf, `inner_iter=10`"),
        ("1-plain", "dasknmf, `inner_iter=1, extrapolate=False` (scikit-learn's step)"),
    ):
        if not rows[inner]:
            lines.append(f"| {label} | did not reach {sk_error:.2f} in 60 iterations | | | | |")
            continue
        t = med(inner, "seconds")
        lines.append(
            f"| {label}, to scikit-learn's error | {targets[inner]} | {t:.2f} | "
            f"{med(inner, 'error'):.2f} | {sk_time / t:.2f}× | "
            f"{med(inner, 'peak_extra') / 2**20:.0f} MiB |"
        )
    t = med("auto-own-stop", "seconds")
    lines.append(
        f"| dasknmf default, tol 1e-4 (its own stop) | {med('auto-own-stop', 'n_iter'):.0f} | "
        f"{t:.2f} | {med('auto-own-stop', 'error'):.2f} | {sk_time / t:.2f}× | "
        f"{med('auto-own-stop', 'peak_extra') / 2**20:.0f} MiB |"
    )
    lines += [
        "",
        "Per iteration (random init, tol 0, panels of 5000 rows; median interval between "
        "iterations of a 30-iteration fit, X persisted on the cluster):",
        "",
        "| where | ms per iteration | ratio to in memory |",
        "|---|---|---|",
        f"| in memory (2 threads) | {1000 * per_iter['memory']:.1f} | 1.00× |",
    ]
    for where, label in (
        ("processes", "LocalCluster, 2 worker processes × 1 thread"),
        ("threads", "LocalCluster, 1 in-process worker × 2 threads"),
        (
            "processes-malloc-untouched",
            "LocalCluster, 2 worker processes, their malloc left alone "
            "(`dasknmf.worker-mmap-threshold: false`)",
        ),
    ):
        lines.append(
            f"| {label} | {1000 * per_iter[where]:.1f} | "
            f"{per_iter[where] / per_iter['memory']:.2f}× |"
        )
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("dense", text)


if __name__ == "__main__":
    main()
