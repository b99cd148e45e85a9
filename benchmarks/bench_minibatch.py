"""Mini-batch benchmark: dasknmf's MiniBatchNMF against scikit-learn's in the same run.

The matrices are the other benchmarks' (``bench_dense.make_x``: 20,000 × 2,000 dense float32;
``bench_sparse.make_x``: 100,000 × 20,000 CSR, density 0.002), k = 20, batches of 1,024 rows,
``tol=0`` and ``max_no_improvement=None`` so that every contender runs exactly the same number
of epochs, from the same start (``init='custom'``: W and H drawn as sqrt(mean(X)/k) · U(0.5, 1.5)
from ``default_rng(5)``). Cases: dense Frobenius, sparse Frobenius, sparse Kullback–Leibler.

Contenders, each in a fresh process, rounds interleaved, medians:

- ``sklearn``: ``sklearn.decomposition.MiniBatchNMF``;
- ``dasknmf``: ``dasknmf.MiniBatchNMF`` on the same numpy / scipy.sparse matrix (the same steps
  as scikit-learn's, batch for batch);
- ``cluster``: ``dasknmf.MiniBatchNMF`` on the matrix as a Zarr store, LocalCluster of 2 worker
  processes × 1 thread (``parallel_batches=2``: two batches per step, their statistics summed —
  not scikit-learn's sequence, so its error differs).

Measured: seconds per epoch (the fit's wall time over its epochs; data loading excluded), the
error after those epochs (‖X − WH‖_F or the KL divergence of the W that ``fit_transform``
returns, evaluated in float64 by scikit-learn's ``_beta_divergence`` for every contender) and
the peak resident memory above the start (workers included).

``--out-of-core`` measures instead, on the out-of-core benchmark's 2 GB store (250,000 × 2,000,
written by ``bench_out_of_core.py``; ``--rows 1000000``: its 8 GB store) and a LocalCluster
of 2 workers × 1 thread with 1 GiB each: the error of ``NMF`` with its defaults, and how many
epochs (passes over X) and seconds ``MiniBatchNMF`` needs to reach it.

    python benchmarks/bench_minibatch.py --write
    python benchmarks/bench_minibatch.py --out-of-core --write
    python benchmarks/bench_minibatch.py --out-of-core --rows 1000000 --epochs 1,2,4,8 --write
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import PeakMemory, machine, run_child, write_section

K, BATCH = 20, 1024
#: case -> (matrix, beta_loss, epochs)
CASES = {
    "dense-frobenius": ("dense", "frobenius", 3),
    "sparse-frobenius": ("sparse", "frobenius", 3),
    "sparse-kl": ("sparse", "kullback-leibler", 2),
}
CONTENDERS = ("sklearn", "dasknmf", "cluster")


def matrix(kind: str):
    if kind == "dense":
        from bench_dense import make_x
    else:
        from bench_sparse import make_x
    return make_x()


def store(kind: str, X) -> str:
    """The matrix as a Zarr store in ``_data/`` in chunks of ``BATCH`` rows, so that its
    batches are scikit-learn's (written once)."""
    from bench_sparse import DATA

    from dasknmf import save_matrix

    path = DATA / f"minibatch_{kind}.zarr"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        save_matrix(path, X, chunks=(BATCH, X.shape[1]))
    return str(path)


def start(X):
    rng = np.random.default_rng(5)
    scale = np.sqrt(X.mean() / K)
    W = (scale * rng.uniform(0.5, 1.5, (X.shape[0], K))).astype(np.float32)
    H = (scale * rng.uniform(0.5, 1.5, (K, X.shape[1]))).astype(np.float32)
    return W, H


def error(X, W, H, beta_loss: str) -> float:
    from sklearn.decomposition._nmf import _beta_divergence

    X64 = X.astype(np.float64)
    beta = {"frobenius": 2, "kullback-leibler": 1}[beta_loss]
    W64, H64 = np.asarray(W, dtype=np.float64), np.asarray(H, dtype=np.float64)
    return float(_beta_divergence(X64, W64, H64, beta, square_root=True))


def child(contender: str, case: str) -> dict:
    warnings.simplefilter("ignore")
    kind, beta_loss, epochs = CASES[case]
    X = matrix(kind)
    W0, H0 = start(X)
    params = dict(
        n_components=K,
        init="custom",
        batch_size=BATCH,
        beta_loss=beta_loss,
        max_iter=epochs,
        tol=0,
        max_no_improvement=None,
    )
    data = store(kind, X) if contender == "cluster" else X
    W_start, H_start = W0.copy(), H0.copy()  # scikit-learn updates a custom H in place
    with contextlib.ExitStack() as stack:
        if contender == "sklearn":
            from sklearn.decomposition import MiniBatchNMF
        else:
            from dasknmf import MiniBatchNMF
        if contender == "cluster":
            from distributed import Client, LocalCluster

            cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
            stack.enter_context(Client(stack.enter_context(cluster)))
        memory = stack.enter_context(PeakMemory())
        begin = time.perf_counter()
        model = MiniBatchNMF(**params)
        W = np.asarray(model.fit_transform(data, W=W_start, H=H_start))
        seconds = time.perf_counter() - begin
    return dict(
        per_epoch=seconds / epochs,
        n_steps=int(model.n_steps_),
        error=error(X, W, model.components_, beta_loss),
        peak_extra=memory.extra,
    )


#: The out-of-core benchmark's stores (written once): 2 GB, and its 8 GB one.
STORE_ROWS = {250_000: "2 GB", 1_000_000: "8 GB"}


def child_out_of_core(n_rows: int, epoch_counts: list[int]) -> dict:
    """NMF's defaults on the out-of-core benchmark's store of ``n_rows`` rows, then
    MiniBatchNMF for each of ``epoch_counts`` until its error is NMF's (each a fresh fit from
    the same seed)."""
    import bench_out_of_core as ooc
    from distributed import Client, LocalCluster

    from dasknmf import NMF, MiniBatchNMF

    path = ooc.make_store(n_rows)
    out = {}
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit=ooc.WORKER_MEMORY,
            dashboard_address=None,
        ) as cluster,
        Client(cluster),
    ):
        begin = time.perf_counter()
        nmf = NMF(K, init="random", random_state=0).fit(str(path))
        out["nmf"] = dict(
            seconds=time.perf_counter() - begin,
            n_iter=int(nmf.n_iter_),
            error=float(nmf.reconstruction_err_),
        )
        print(json.dumps(out["nmf"]), file=sys.stderr, flush=True)
        out["minibatch"] = []
        for epochs in epoch_counts:
            begin = time.perf_counter()
            model = MiniBatchNMF(
                K, init="random", random_state=0, max_iter=epochs, tol=0, max_no_improvement=None
            ).fit(str(path))
            seconds = time.perf_counter() - begin
            out["minibatch"].append(
                dict(epochs=epochs, seconds=seconds, error=float(model.reconstruction_err_))
            )
            print(json.dumps(out["minibatch"][-1]), file=sys.stderr, flush=True)
            if model.reconstruction_err_ <= out["nmf"]["error"]:
                break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--out-of-core", action="store_true")
    parser.add_argument(
        "--rows", type=int, default=250_000, choices=sorted(STORE_ROWS), help="--out-of-core store"
    )
    parser.add_argument("--epochs", default="1,2,4,8,16", help="--out-of-core: epochs to try")
    parser.add_argument("--write", action="store_true", help="store in benchmarks/RESULTS.md")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        if args.child[0] == "ooc":
            result = child_out_of_core(int(args.child[1]), [int(e) for e in args.child[2:]])
        else:
            result = child(*args.child)
        print(json.dumps(result))
        return
    stamp = f"Run {datetime.date.today()} on {machine()}."
    if args.out_of_core:
        epochs = args.epochs.split(",")
        out = run_child(__file__, "--child", "ooc", str(args.rows), *epochs)
        text = out_of_core_section(out, stamp, args.rows)
        print(text)
        if args.write:
            suffix = "" if args.rows == 250_000 else "-8gb"
            write_section("minibatch-out-of-core" + suffix, text)
        return
    runs = {(case, c): [] for case in args.cases for c in CONTENDERS}
    for r in range(args.rounds):
        for case in args.cases:
            for contender in CONTENDERS:
                runs[case, contender].append(run_child(__file__, "--child", contender, case))
                last = runs[case, contender][-1]
                print(f"round {r + 1} {case} {contender}: {last}", file=sys.stderr, flush=True)
    text = section(runs, args.cases, args.rounds, stamp)
    print(text)
    if args.write:
        write_section("minibatch", text)


def section(runs: dict, cases: list, rounds: int, stamp: str) -> str:
    def med(case, contender, key):
        return statistics.median(r[key] for r in runs[case, contender])

    lines = [
        "## MiniBatchNMF against scikit-learn's (`benchmarks/bench_minibatch.py`)",
        "",
        f"{stamp} k = {K}, batches of {BATCH:,} rows, the same start for all, every contender "
        f"the same epochs; medians of {rounds} rounds, each measurement in a fresh process. "
        "Errors in float64 by scikit-learn's `_beta_divergence` (‖X − WH‖_F, or the KL "
        "divergence's square root as scikit-learn reports it).",
        "",
        "| case (epochs) | contender | s / epoch | speed-up | error | error / scikit-learn's "
        "| peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {
        "sklearn": "scikit-learn, in memory",
        "dasknmf": "dasknmf, in memory",
        "cluster": "dasknmf, Zarr store, LocalCluster 2 × 1",
    }
    for case in cases:
        base_time, base_error = med(case, "sklearn", "per_epoch"), med(case, "sklearn", "error")
        for contender in CONTENDERS:
            t, e = med(case, contender, "per_epoch"), med(case, contender, "error")
            lines.append(
                f"| {case} ({CASES[case][2]}) | {names[contender]} | {t:.3f} | "
                f"{base_time / t:.2f}× | {e:.6g} | {e / base_error:.6f} | "
                f"{med(case, contender, 'peak_extra') / 2**20:.0f} MiB |"
            )
    return "\n".join(lines)


def out_of_core_section(out: dict, stamp: str, n_rows: int) -> str:
    nmf, size = out["nmf"], STORE_ROWS[n_rows]
    option = "" if n_rows == 250_000 else f" --rows {n_rows}"
    lines = [
        f"## MiniBatchNMF out of core, {size} "
        f"(`benchmarks/bench_minibatch.py --out-of-core{option}`)",
        "",
        f"{stamp} X is the out-of-core benchmark's {size} store ({n_rows:,} × 2,000 float32, "
        "rank 20 plus noise); LocalCluster of 2 workers × 1 thread with 1 GiB each; k = 20, "
        "random init, `batch_size=1024` — a batch is a stored chunk, 2,048 rows here (a dense "
        "store is read in whole chunks) —, two batches per step (`parallel_batches=2`).",
        "",
        f"`NMF` with its defaults: {nmf['n_iter']} iterations (each one pass over X, plus the "
        f"validation and error passes) in {nmf['seconds']:.0f} s, error {nmf['error']:.6g}.",
        "",
        "| MiniBatchNMF epochs (passes over X) | seconds | error | error / NMF's |",
        "|---|---|---|---|",
    ]
    for row in out["minibatch"]:
        lines.append(
            f"| {row['epochs']} | {row['seconds']:.0f} | {row['error']:.6g} | "
            f"{row['error'] / nmf['error']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
