"""Choosing k: what stacked replicates cost, and whether select_rank finds a planted rank.

``replicates`` (the default part): 20 replicates of one k stacked in one fit
(``select_rank``'s fit, ``pipeline.Plan(ranks=(20,) * 20)``) against one fit of the same k and
the same iterations (``tol=0``), each in a fresh process, rounds interleaved, medians:

- ``dense``: the dense benchmark's matrix (``bench_dense.make_x``: 20,000 × 2,000 float32) in
  memory, k = 20, 20 iterations;
- ``sparse``: the sparse benchmark's matrix (``bench_sparse.make_x``: 100,000 × 20,000 CSR,
  density 0.002) in memory, k = 20, 10 iterations;
- ``streamed``: the dense matrix as a Zarr store (``_data/dense.zarr``), read again in every
  iteration (``cache=False``) on a LocalCluster of 2 worker processes × 1 thread, k = 20,
  10 iterations (the store is in the page cache: reading costs decompression, not the disk).

Measured: seconds of the fit (data loading excluded) and the peak resident memory above the
start (workers included); the ratio is replicates over one fit. The replicates' errors are
checked against their fits alone elsewhere (tests/test_rank.py).

``--several-ks``: ``select_rank`` of ks 2…10, 10 replicates each, 10 iterations, with its
held-out error, all ks stacked in one fit (and in one per fold) against a stacked fit per k
(``rank.STACK_BYTES`` set to 0: the only way before 2026-12-04): the dense matrix in memory,
and streamed from its store in every iteration on a LocalCluster of 2 worker processes
(``dasknmf.cache-fraction`` 0) — there the ks share each read of X. Also the largest relative
differences of a replicate's error and of a held-out error between the two ways (the same fits
up to rounding).

``--stops``: ``select_rank`` of ks 2…10, 10 replicates each, on the planted matrices (below),
each replicate stopping by its own rule (``tol=1e-4``, ``max_iter=200``, no held-out error):
the panel tasks forming the products of the replicates still running only, against forming
them for the stopped (frozen) ones too (``Objective.live_product`` replaced by the whole
product: the only way before 2026-12-05); in memory, each in a fresh process, the two ways
alternating, medians. Also the share of the products the frozen replicates made before (Σ over
replicates of k × iterations after its stop, over k × iterations of the stacked fit) and
the largest relative difference of a replicate's error between the two ways.

``--planted``: ``select_rank`` on matrices of a known rank — dense (1,000 × 300, rank 8, W and
H from Γ(1, 1), Gaussian noise of 0.1 × the std of W·H, clipped at 0) and sparse counts
(Poisson draws of W·H with W, H from Γ(0.3, 1), scaled to a mean of 1: 55% zeros, CSR) —
ks 4…12, 10 replicates: the suggested k and the time.

``--digits``: scikit-learn's digits (1,797 images × 64 pixels), ks 2, 4, …, 32, 10 replicates: the
measures per k, written to RESULTS.md and drawn to ``docs/guide/rank-digits.png``.

    python benchmarks/bench_rank.py --write
    python benchmarks/bench_rank.py --several-ks --write
    python benchmarks/bench_rank.py --stops --write
    python benchmarks/bench_rank.py --planted --write
    python benchmarks/bench_rank.py --digits --write
    python -m pip install ".[bench-rank]" && python benchmarks/bench_rank.py --cnmf --write

``--cnmf``: against the ``cnmf`` package (Kotliar et al. 2019; installed by the ``bench-rank``
extra) on the same matrix and settings: planted sparse counts (3,000 cells × 1,000 genes, rank
8, as ``--planted``'s), which cnmf's ``prepare`` normalizes (all 1,000 genes kept as highly
variable); its normalized matrix is the input of both. Timed: cnmf's ``factorize`` (20
replicates of k = 8, scikit-learn's coordinate descent from random starts, ``tol=1e-4``,
``max_iter=1000``, one worker), ``combine`` and ``consensus`` (density threshold 0.5, no
clustergram, usages refitted to the normalized counts) against ``select_rank(X, [8], 20,
heldout=False)`` with the same tolerance and iteration limit and ``consensus_nmf`` (density
threshold 0.5); each in a fresh process (imports, and numba's load of the compiled kernel by a
tiny fit, before the clock), medians of the rounds. Also the relative error
‖X − W·H‖ / ‖X‖ of each consensus model.
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
from pathlib import Path

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import PeakMemory, machine, run_child, write_section

K, REPLICATES = 20, 20
#: case -> iterations
CASES = {"dense": 20, "sparse": 10, "streamed": 10}
PLOT = Path(__file__).resolve().parents[1] / "docs" / "guide" / "rank-digits.png"


def data(case: str):
    if case == "sparse":
        from bench_sparse import make_x

        return make_x()
    from bench_dense import make_x

    X = make_x()
    if case == "dense":
        return X
    from bench_sparse import DATA

    from dasknmf import save_matrix

    path = DATA / "dense.zarr"
    if not path.exists():
        DATA.mkdir(exist_ok=True)
        save_matrix(path, X)
    return str(path)


def child(case: str, replicates: int) -> dict:
    """One fit of ``replicates`` stacked replicates (1: a plain fit) of ``case``."""
    warnings.simplefilter("ignore")
    from dasknmf import NMF, pipeline

    X = data(case)
    iterations = CASES[case]
    with contextlib.ExitStack() as stack:
        if case == "streamed":
            from distributed import Client, LocalCluster

            from dasknmf import open_matrix

            cluster = stack.enter_context(
                LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
            )
            stack.enter_context(Client(cluster))
            X = open_matrix(X)
        model = NMF(n_components=K, init="random", extrapolate=False, max_iter=iterations, tol=0)
        plan = pipeline.Plan(
            n_components=K,
            init="random",
            objective=model._objective,
            max_iter=iterations,
            tol=0,
            panel_bytes=model._panel_budget(X.shape, 4, K * replicates, case == "streamed"),
            random_state=tuple(range(replicates)) if replicates > 1 else 0,
            ranks=(K,) * replicates if replicates > 1 else (),
            cache=False if case == "streamed" else "auto",
        )
        with PeakMemory() as memory:
            start = time.perf_counter()
            fitted = pipeline.fit(X, plan)
            seconds = time.perf_counter() - start
    errors = fitted.replicate_errors or [fitted.reconstruction_err]
    return dict(seconds=seconds, peak_extra=memory.extra, n_iter=fitted.n_iter, errors=errors)


def replicates_part(rounds: int) -> str:
    lines = [
        f"Machine: {machine()}. {datetime.date.today()}. k = {K}; {REPLICATES} replicates "
        f"stacked against one fit of the same iterations; medians of {rounds} rounds, each fit "
        "in a fresh process.",
        "",
        "| case | iterations | one fit (s) | 20 replicates (s) | ratio | peak extra memory, "
        "one / 20 (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for case, iterations in CASES.items():
        runs: dict[int, list] = {1: [], REPLICATES: []}
        for _ in range(rounds):
            for r in runs:
                runs[r].append(run_child(__file__, "--child", case, str(r)))
        one, many = (statistics.median(x["seconds"] for x in runs[r]) for r in runs)
        mem = [statistics.median(x["peak_extra"] for x in runs[r]) / 2**20 for r in runs]
        lines.append(
            f"| {case} | {iterations} | {one:.2f} | {many:.2f} | {many / one:.2f}× | "
            f"{mem[0]:.0f} / {mem[1]:.0f} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


#: Several ks in one stacked fit against a stacked fit per k (``--several-ks``).
KS, KS_REPLICATES, KS_ITER = tuple(range(2, 11)), 10, 10


def ks_child(case: str, together: bool) -> dict:
    """``select_rank`` of ``KS`` (``KS_REPLICATES`` each, ``KS_ITER`` iterations, held-out
    error included) on ``case``: all ks stacked in one fit (and one per fold), or
    (``together`` False, the only way before 2026-12-04) a stacked fit per k (and per k and
    fold)."""
    warnings.simplefilter("ignore")
    import dask

    from dasknmf import rank, select_rank

    X = data(case)
    if not together:
        rank.STACK_BYTES = 0  # every k a stacked fit of its own
    with contextlib.ExitStack() as stack:
        if case == "streamed":  # read from the store in every iteration
            from distributed import Client, LocalCluster

            cluster = stack.enter_context(
                LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
            )
            stack.enter_context(Client(cluster))
            stack.enter_context(dask.config.set({"dasknmf.cache-fraction": 0}))
        with PeakMemory() as memory:
            start = time.perf_counter()
            found = select_rank(X, KS, KS_REPLICATES, max_iter=KS_ITER, tol=0, random_state=0)
            seconds = time.perf_counter() - start
    errors = {k: found.errors[k].tolist() for k in KS}
    heldout = {k: found.heldout_error[k] for k in KS}
    return dict(seconds=seconds, peak_extra=memory.extra, errors=errors, heldout=heldout)


def several_ks_part(rounds: int) -> str:
    lines = [
        f"Machine: {machine()}. {datetime.date.today()}. `select_rank` of ks "
        f"{KS[0]}…{KS[-1]}, {KS_REPLICATES} replicates each, {KS_ITER} iterations, `tol=0`, "
        "held-out error included (its folds' fits also 10 iterations); the dense benchmark's "
        "matrix (20,000 × 2,000 float32) in memory, "
        "and streamed from its Zarr store in every iteration on a LocalCluster of 2 worker "
        "processes (`dasknmf.cache-fraction` 0); medians of "
        f"{rounds} rounds, each in a fresh process, the two ways alternating.",
        "",
        "| case | reads of X per iteration, per k / together | a stacked fit per k (s) | "
        "all ks in one fit (s) | speed-up | peak extra memory, per k / together (MiB) | "
        "largest relative difference, replicates' errors / held-out errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in ("dense", "streamed"):
        runs = _alternating(rounds, "--ks-child", case)
        apart, joint = (statistics.median(x["seconds"] for x in runs[t]) for t in runs)
        mem = [statistics.median(x["peak_extra"] for x in runs[t]) / 2**20 for t in runs]
        joint_run, apart_run = runs[True][0], runs[False][0]
        worst = _worst_difference(joint_run["errors"], apart_run["errors"])
        worst_heldout = max(
            abs(joint_run["heldout"][k] - apart_run["heldout"][k]) / apart_run["heldout"][k]
            for k in map(str, KS)
        )
        lines.append(
            f"| {case} | {len(KS)} / 1 | {apart:.1f} | {joint:.1f} | {apart / joint:.2f}× | "
            f"{mem[0]:.0f} / {mem[1]:.0f} | {worst:.1e} / {worst_heldout:.1e} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


#: ``--stops``: ks, replicates and iteration limit.
STOPS_KS, STOPS_REPLICATES, STOPS_ITER = tuple(range(2, 11)), 10, 200


def stops_child(kind: str, skip: bool) -> dict:
    """``select_rank`` of ``STOPS_KS`` on the planted ``kind`` matrix, replicates stopping by
    their own rule; ``skip`` False: the frozen replicates' products formed too. Also the
    iterations each replicate of each k ran (read off its stacked fit)."""
    warnings.simplefilter("ignore")
    from dasknmf import rank
    from dasknmf.objective import Objective

    if not skip:
        Objective.live_product = lambda self, product, x, f: product(x, f)
    stops: dict = {}
    fit = rank.stacked_fit

    def recording(X, ranks, *args, **kwargs):
        fitted, other = fit(X, ranks, *args, **kwargs)
        for k, n in zip(ranks, fitted.replicate_n_iter, strict=True):
            stops.setdefault(k, []).append(n)
        return fitted, other

    rank.stacked_fit = recording
    X = planted(kind)
    start = time.perf_counter()
    found = rank.select_rank(X, STOPS_KS, STOPS_REPLICATES, max_iter=STOPS_ITER, heldout=False,
                             random_state=0)  # fmt: skip
    seconds = time.perf_counter() - start
    errors = {k: found.errors[k].tolist() for k in STOPS_KS}
    return dict(seconds=seconds, errors=errors, stops=stops)


def stops_part(rounds: int) -> str:
    lines = [
        f"Machine: {machine()}. {datetime.date.today()}. `select_rank` of ks "
        f"{STOPS_KS[0]}…{STOPS_KS[-1]}, {STOPS_REPLICATES} replicates each, `tol=1e-4`, "
        f"`max_iter={STOPS_ITER}`, no held-out error, in memory, on the planted matrices of "
        "`--planted` (1,000 × 300); medians of "
        f"{rounds} rounds, each in a fresh process, the two ways alternating.",
        "",
        "| matrix | iterations, first and last stop | products of stopped replicates | "
        "frozen products formed (s) | not formed (s) | speed-up | "
        "largest relative difference of a replicate's error |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in ("dense", "sparse"):
        runs = _alternating(rounds, "--stops-child", kind)
        before, now = (statistics.median(x["seconds"] for x in runs[s]) for s in runs)
        stops = {int(k): n for k, n in runs[True][0]["stops"].items()}
        first, last = min(map(min, stops.values())), max(map(max, stops.values()))
        total = last * sum(STOPS_KS) * STOPS_REPLICATES
        used = sum(k * sum(n) for k, n in stops.items())
        worst = _worst_difference(runs[True][0]["errors"], runs[False][0]["errors"])
        lines.append(
            f"| {kind} | {first}, {last} | "
            f"{1 - used / total:.0%} | {before:.1f} | {now:.1f} | {before / now:.2f}× | "
            f"{worst:.1e} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def _alternating(rounds: int, flag: str, case: str) -> dict[bool, list]:
    """``rounds`` rounds of the child ``flag`` on ``case`` both ways (0, then 1), each in a
    fresh process, the ways alternating: the children's results by way."""
    runs: dict[bool, list] = {False: [], True: []}
    for _ in range(rounds):
        for way in runs:
            runs[way].append(run_child(__file__, flag, case, str(int(way))))
    return runs


def _worst_difference(errors: dict, reference: dict) -> float:
    """The largest relative difference of a replicate's error from its ``reference`` (per k)."""
    return max(
        abs(a - b) / b for k in reference for a, b in zip(errors[k], reference[k], strict=True)
    )


def planted(kind: str, seed: int = 0):
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    if kind == "dense":
        W, H = rng.gamma(1.0, 1.0, (1000, 8)), rng.gamma(1.0, 1.0, (8, 300))
        X = W @ H
        return np.maximum(X + 0.1 * X.std() * rng.standard_normal(X.shape), 0)
    W, H = rng.gamma(0.3, 1.0, (1000, 8)), rng.gamma(0.3, 1.0, (8, 300))
    X = W @ H
    return sp.csr_array(rng.poisson(X / X.mean()).astype(np.float64))


def planted_part() -> str:
    from dasknmf import select_rank

    lines = [
        f"Machine: {machine()}. {datetime.date.today()}. Planted rank 8; ks 4…12, 10 "
        "replicates each, `max_iter=300`, `random_state=0`.",
        "",
        "| matrix | suggested k | rule | held-out error at k = 7, 8, 9 | seconds |",
        "|---|---|---|---|---|",
    ]
    for kind in ("dense", "sparse counts"):
        start = time.perf_counter()
        found = select_rank(planted(kind.split()[0]), range(4, 13), 10, random_state=0,
                            max_iter=300)  # fmt: skip
        seconds = time.perf_counter() - start
        held = ", ".join(f"{found.heldout_error[k]:.4f}" for k in (7, 8, 9))
        lines.append(f"| {kind} | {found.suggested_k} | {found.rule} | {held} | {seconds:.0f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def digits_part() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.datasets import load_digits

    from dasknmf import select_rank
    from dasknmf._cli_rank import draw_selection

    X = load_digits().data
    start = time.perf_counter()
    found = select_rank(X, range(2, 33, 2), 10, random_state=0, max_iter=400)
    seconds = time.perf_counter() - start
    figure = draw_selection(plt, found)
    figure.savefig(PLOT, dpi=80)
    lines = [
        f"Machine: {machine()}. {datetime.date.today()}. scikit-learn's digits (1,797 × 64), "
        f"ks 2, 4, …, 32, 10 replicates, `max_iter=400`, `random_state=0`: {seconds:.0f} s in all. "
        f"Suggested k = {found.suggested_k} ({found.rule}).",
        "",
        "| k | relative error | cophenetic | dispersion | silhouette | held-out error |",
        "|---|---|---|---|---|---|",
    ]
    for entry in found.as_dict()["per_k"]:
        lines.append(
            f"| {entry['k']} | {entry['relative_error']:.4f} | {entry['cophenetic']:.3f} | "
            f"{entry['dispersion']:.3f} | {entry['silhouette']:.3f} | "
            f"{entry['heldout_error']:.4f} |"
        )
    return "\n".join(lines)


CNMF_K, CNMF_REPLICATES = 8, 20


def cnmf_data(folder: Path) -> tuple[str, str]:
    """The counts as ``counts.h5ad`` and cnmf's run ``bench`` prepared from them in
    ``folder`` (written once): (output directory, the normalized counts' path)."""
    import anndata
    from cnmf import cNMF

    out = folder / "cnmf"
    run = cNMF(output_dir=str(out), name="bench")
    if not Path(run.paths["normalized_counts"]).exists():
        counts = folder / "counts.h5ad"
        rng = np.random.default_rng(0)
        W, H = rng.gamma(0.3, 1.0, (3000, CNMF_K)), rng.gamma(0.3, 1.0, (CNMF_K, 1000))
        X = rng.poisson(W @ H / (W @ H).mean()).astype(np.float32)
        import scipy.sparse as sp

        adata = anndata.AnnData(sp.csr_matrix(X))
        adata.obs_names = [f"cell{i}" for i in range(X.shape[0])]
        adata.var_names = [f"gene{j}" for j in range(X.shape[1])]
        adata.write_h5ad(counts)
        with contextlib.redirect_stdout(sys.stderr):
            settings = dict(num_highvar_genes=1000, beta_loss="frobenius", max_NMF_iter=1000)
            run.prepare(
                str(counts), components=[CNMF_K], n_iter=CNMF_REPLICATES, seed=0, **settings
            )
    return str(out), run.paths["normalized_counts"]


def cnmf_child(contender: str) -> dict:
    warnings.simplefilter("ignore")
    import anndata
    from bench_sparse import DATA

    out, normalized = cnmf_data(DATA)
    X = anndata.read_h5ad(normalized).X
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    if contender == "cnmf":
        from cnmf import cNMF
        from cnmf.cnmf import load_df_from_npz

        run = cNMF(output_dir=out, name="bench")
        for path in Path(out, "bench", "cnmf_tmp").glob("*.iter_*"):
            path.unlink()  # the replicates of an earlier round
        with PeakMemory() as memory, contextlib.redirect_stdout(sys.stderr):
            start = time.perf_counter()
            run.factorize(worker_i=0, total_workers=1)
            run.combine()
            run.consensus(CNMF_K, density_threshold=0.5, show_clustering=False, refit_usage=False)
            seconds = time.perf_counter() - start
        usages = load_df_from_npz(run.paths["consensus_usages"] % (CNMF_K, "0_5")).values
        spectra = load_df_from_npz(run.paths["consensus_spectra"] % (CNMF_K, "0_5")).values
    else:
        from dasknmf import consensus_nmf, select_rank

        # Imports and the compiled kernel's load from numba's cache before the clock, as
        # cnmf's imports (scanpy, scikit-learn) are: a tiny stacked fit.
        select_rank(X[:40, :40], [2], 2, max_iter=2, heldout=False)
        with PeakMemory() as memory:
            start = time.perf_counter()
            found = select_rank(X, [CNMF_K], CNMF_REPLICATES, tol=1e-4, max_iter=1000,
                                heldout=False, random_state=0)  # fmt: skip
            model = consensus_nmf(X, found, CNMF_K, density_threshold=0.5)
            seconds = time.perf_counter() - start
        usages, spectra = model.W_, model.components_
    error = np.linalg.norm(X - usages @ spectra) / np.linalg.norm(X)
    return dict(seconds=seconds, peak_extra=memory.extra, relative_error=float(error))


def cnmf_part(rounds: int) -> str:
    runs: dict[str, list] = {"cnmf": [], "dasknmf": []}
    for _ in range(rounds):
        for contender in runs:
            runs[contender].append(run_child(__file__, "--cnmf-child", contender))
    seconds = {c: statistics.median(r["seconds"] for r in runs[c]) for c in runs}
    lines = [
        f"Machine: {machine()}. {datetime.date.today()}. Planted counts 3,000 × 1,000 (rank "
        f"8) normalized by cnmf's `prepare`; {CNMF_REPLICATES} replicates of k = {CNMF_K}, "
        f"`tol=1e-4`, `max_iter=1000`, consensus at density threshold 0.5; medians of "
        f"{rounds} rounds, each in a fresh process.",
        "",
        "| contender | seconds to the consensus | relative error of the consensus | peak extra "
        "memory (MiB) |",
        "|---|---|---|---|",
    ]
    for contender, found in runs.items():
        error = statistics.median(r["relative_error"] for r in found)
        memory = statistics.median(r["peak_extra"] for r in found) / 2**20
        lines.append(f"| {contender} | {seconds[contender]:.1f} | {error:.4f} | {memory:.0f} |")
    lines += [
        "",
        f"dasknmf is {seconds['cnmf'] / seconds['dasknmf']:.1f}× faster to the consensus.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("CASE", "REPLICATES"))
    parser.add_argument("--ks-child", nargs=2, metavar=("CASE", "TOGETHER"))
    parser.add_argument("--several-ks", action="store_true")
    parser.add_argument("--stops", action="store_true")
    parser.add_argument("--stops-child", nargs=2, metavar=("KIND", "SKIP"))
    parser.add_argument("--planted", action="store_true")
    parser.add_argument("--digits", action="store_true")
    parser.add_argument("--cnmf", action="store_true")
    parser.add_argument("--cnmf-child", choices=["cnmf", "dasknmf"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="Write RESULTS.md.")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    if args.ks_child:
        print(json.dumps(ks_child(args.ks_child[0], bool(int(args.ks_child[1])))))
        return
    if args.stops_child:
        print(json.dumps(stops_child(args.stops_child[0], bool(int(args.stops_child[1])))))
        return
    if args.cnmf_child:
        print(json.dumps(cnmf_child(args.cnmf_child)))
        return
    if args.cnmf:
        name, text = "rank-cnmf", cnmf_part(args.rounds)
    elif args.several_ks:
        name, text = "rank-ks", several_ks_part(args.rounds)
    elif args.stops:
        name, text = "rank-stops", stops_part(args.rounds)
    elif args.planted:
        name, text = "rank-planted", planted_part()
    elif args.digits:
        name, text = "rank-digits", digits_part()
    else:
        name, text = "rank", replicates_part(args.rounds)
    print(text)
    if args.write:
        write_section(name, text)


if __name__ == "__main__":
    main()
