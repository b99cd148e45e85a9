"""The commands of choosing k: ``dasknmf rank`` (many fits per rank, their stability and
held-out error), ``dasknmf consensus`` (a model from the replicates of one rank) and the drawing
of a rank selection for ``dasknmf plot``."""

from __future__ import annotations

import re
import time

import click

from dasknmf._cli import (
    _INPUT,
    _OUTPUT,
    BadInput,
    _announce,
    _check_output,
    _common,
    _connect,
    _emit,
    _fails_cleanly,
    _probe_output,
    _setup_logging,
    _where_to_run,
)


def _ks(text: str) -> list[int]:
    """``2:10`` (both ends included), ``2:10:2``, or ``3,5,8``."""
    if re.fullmatch(r"\d+(,\d+)*", text):
        return [int(k) for k in text.split(",")]
    match = re.fullmatch(r"(\d+):(\d+)(?::(\d+))?", text)
    if not match or int(match[3] or 1) < 1 or int(match[1]) > int(match[2]):
        raise BadInput(f"-k must be a range START:STOP[:STEP] or a list like 3,5,8, got {text!r}.")
    return list(range(int(match[1]), int(match[2]) + 1, int(match[3] or 1)))


@click.command("rank")
@click.argument("input_path", metavar="INPUT", type=_INPUT)
@click.option("-k", "ks", required=True, help="Ranks to try: 2:10 (inclusive), 2:10:2 or 3,5,8.")
@click.option("--replicates", default=10, show_default=True, type=click.IntRange(min=2))
@click.option("-o", "--output", required=True, type=_OUTPUT, help="The selection (Zarr group).")
@click.option("--component", help="The matrix inside a Zarr group, e.g. X of an AnnData store.")
@click.option("--solver", default="cd", show_default=True, type=click.Choice(["cd", "hals", "mu"]))
@click.option("--max-iter", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--tol", default=1e-4, show_default=True, type=click.FloatRange(min=0))
@click.option("--random-state", type=int, help="Seed of the first replicate (r: seed + r).")
@click.option("--no-heldout", is_flag=True, help="Skip the bi-cross-validation fits.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_where_to_run
@_common
@_fails_cleanly
def rank(input_path, ks, replicates, output, component, solver, max_iter, tol, random_state,
         no_heldout, overwrite, cluster, scheduler_address, scheduler_file, workers,
         wait_for_workers, as_json, quiet, verbose):  # fmt: skip
    """Fit REPLICATES NMFs for each k of -k to INPUT; write errors, stability and held-out
    error per k, and the suggested k, to OUTPUT."""
    from dasknmf import open_matrix
    from dasknmf.rank import check_ks, select_rank

    _setup_logging(verbose, quiet)
    _check_output(output, overwrite)
    X = open_matrix(input_path, component)
    ks = check_ks(_ks(ks), X.shape)  # before a cluster starts
    with _connect(cluster, scheduler_address, scheduler_file, workers) as client:
        _announce(client, wait_for_workers)
        _probe_output(client, output)
        start = time.perf_counter()
        found = select_rank(
            X,
            ks,
            replicates,
            solver=solver,
            max_iter=max_iter,
            tol=tol,
            random_state=random_state,
            heldout=not no_heldout,
            progress=not quiet,
        )
        seconds = time.perf_counter() - start
    found.source = str(input_path) if component is None else f"{input_path}::{component}"
    found.save(output, overwrite=overwrite)
    record = {"command": "rank", "output": str(output), "seconds": round(seconds, 3)}
    record.update(found.as_dict())
    lines = [
        f"k={k}: error {entry['relative_error']:.4g} (relative), cophenetic "
        f"{_fmt(entry['cophenetic'])}, silhouette {_fmt(entry['silhouette'])}, held-out "
        f"{_fmt(entry['heldout_error'])}"
        for k, entry in zip(found.ks, record["per_k"], strict=True)
    ]
    lines.append(f"suggested k = {found.suggested_k} ({found.rule}); written to {output}")
    _emit(as_json, record, "\n".join(lines), quiet)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


@click.command("consensus")
@click.argument("rank_path", metavar="RANK", type=_INPUT)
@click.option("-k", "k", required=True, type=click.IntRange(min=1), help="A rank that was run.")
@click.option("-o", "--output", required=True, type=_OUTPUT, help="The model (a Zarr group).")
@click.option("--input", "input_path", type=_INPUT, help="X [default: the one RANK was run on].")
@click.option("--density-threshold", default=0.5, show_default=True, type=float,
              help="Drop pooled components whose local density is above this.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_where_to_run
@_common
@_fails_cleanly
def consensus(rank_path, k, output, input_path, density_threshold, overwrite, cluster,
              scheduler_address, scheduler_file, workers, wait_for_workers, as_json, quiet,
              verbose):  # fmt: skip
    """Write the consensus model of rank K (cNMF) from the replicates in RANK to OUTPUT."""
    from dasknmf import open_matrix
    from dasknmf.rank import consensus_nmf, load_rank

    _setup_logging(verbose, quiet)
    _check_output(output, overwrite)
    selection = load_rank(rank_path)
    selection.check_rank(k)
    source = input_path if input_path is not None else selection.source
    if source is None:
        raise BadInput(f"{rank_path} does not say which X it was run on: pass --input.")
    path, _, component = str(source).partition("::")
    X = open_matrix(path, component or None)
    with _connect(cluster, scheduler_address, scheduler_file, workers) as client:
        _announce(client, wait_for_workers)
        _probe_output(client, output)
        model = consensus_nmf(X, selection, k, density_threshold=density_threshold)
        model.save(output, overwrite=overwrite)
    kept = model.consensus_["kept"]
    record = {
        "command": "consensus",
        "rank": str(rank_path),
        "output": str(output),
        "n_components": k,
        "kept": int(kept.sum()),
        "pooled": int(kept.size),
        "silhouette": model.consensus_["silhouette"],
        "reconstruction_err": model.reconstruction_err_,
    }
    _emit(
        as_json,
        record,
        f"consensus of {int(kept.sum())} of {kept.size} components, reconstruction error "
        f"{model.reconstruction_err_:.6g}; model written to {output}",
        quiet,
    )


def rank_figure(plt, path):
    """A figure of the rank selection at ``path`` — relative error, stability and held-out
    error against k — or None when ``path`` is not one."""
    from dasknmf.rank import is_rank, load_rank

    return draw_selection(plt, load_rank(path)) if is_rank(path) else None


def draw_selection(plt, selection):
    """The figure of a ``RankSelection`` (see ``rank_figure``)."""
    import numpy as np

    ks = selection.ks
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    errors = [np.asarray(selection.errors[k]) / selection.norm_x for k in ks]
    axes[0].plot(ks, [e.mean() for e in errors], marker="o", label="replicates' mean")
    for k, e in zip(ks, errors, strict=True):
        axes[0].scatter([k] * len(e), e, s=8, color="grey")
    axes[0].set_ylabel("‖X − WH‖ / ‖X‖")
    for name in ("cophenetic", "dispersion", "silhouette"):
        axes[1].plot(ks, [getattr(selection, name)[k] for k in ks], marker="o", label=name)
    axes[1].set_ylabel("stability")
    axes[1].legend()
    if selection.heldout_error:
        axes[2].plot(ks, [selection.heldout_error[k] for k in ks], marker="o")
    axes[2].set_ylabel("held-out error (bi-cross-validation)")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axvline(selection.suggested_k, color="red", alpha=0.4)
        ax.set_xlabel("k")
        ax.grid(True, alpha=0.3)
    figure.suptitle(f"{selection.n_replicates} replicates per k; suggested k = "
                    f"{selection.suggested_k}")  # fmt: skip
    figure.tight_layout()
    return figure
