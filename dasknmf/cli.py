"""The ``dasknmf`` command line: fit, transform, recommend, convert, info, plot and demo.

Exit codes: 0 on success; 2 for usage errors and bad input (a one-line message, no
traceback); 1 for any other failure. ``--json`` prints one JSON object as the last line of
standard output. Outputs are written to a temporary sibling and renamed when complete, so a
failed or killed run never leaves anything that looks like a finished result.
"""

from __future__ import annotations

import logging
import pathlib
import tempfile
import time

import click

from dasknmf import __version__, _cli_rank
from dasknmf._cli import (
    _INPUT,
    _LOCAL_INPUT,
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

logger = logging.getLogger("dasknmf")


@click.group()
@click.version_option(__version__, prog_name="dasknmf")
def main() -> None:
    """Distributed, out-of-core Non-negative Matrix Factorization on Dask and Zarr."""


main.add_command(_cli_rank.rank)
main.add_command(_cli_rank.consensus)


def _beta_loss(value: str):
    try:
        return float(value)
    except ValueError:
        return value


@main.command()
@click.argument("input_path", metavar="INPUT", type=_INPUT)
@click.option("-k", "--n-components", required=True, type=click.IntRange(min=1))
@click.option("-o", "--output", required=True, type=_OUTPUT, help="The model (a Zarr group).")
@click.option("--component", help="The matrix inside a Zarr group, e.g. X of an AnnData store.")
@click.option("--solver", default="cd", show_default=True, type=click.Choice(["cd", "hals", "mu"]))
@click.option(
    "--beta-loss",
    default="frobenius",
    show_default=True,
    help="frobenius, kullback-leibler, itakura-saito or a number (not 2: --solver mu).",
)
@click.option(
    "--init",
    type=click.Choice(["random", "nndsvd", "nndsvda", "nndsvdar"]),
    help="[default: nndsvda when k <= min(shape), else random]",
)
@click.option("--max-iter", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--tol", default=1e-4, show_default=True, type=click.FloatRange(min=0))
@click.option("--random-state", type=int, help="Seed of the initialization.")
@click.option("--alpha-w", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--alpha-h", default="same", show_default=True, help="A number, or 'same'.")
@click.option("--l1-ratio", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option(
    "--extrapolate/--no-extrapolate",
    default=None,
    help="Push W and H along their last step (HALS only) [default: on for cd/hals].",
)
@click.option(
    "--checkpoint",
    type=_OUTPUT,
    help="Checkpoint folder [default: OUTPUT.checkpoint, with --checkpoint-every or --resume].",
)
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="Iterations between them.")
@click.option("--layout", default="auto", show_default=True, help="How X is cut into tasks.",
              type=click.Choice(["auto", "rows", "columns", "blocks"]))  # fmt: skip
@click.option(
    "--missing", type=click.Choice(["nan", "unstored"]),
    help="Fit the observed entries only: NaN entries of a dense store (nan) or the entries a "
    "sparse store does not store (unstored).",
)  # fmt: skip
@click.option("--resume", is_flag=True, help="Continue from the checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_where_to_run
@_common
@_fails_cleanly
def fit(input_path, n_components, output, component, solver, beta_loss, init, max_iter, tol,
        random_state, alpha_w, alpha_h, l1_ratio, extrapolate, checkpoint, checkpoint_every, layout,
        missing, resume, overwrite, cluster, scheduler_address, scheduler_file, workers,
        wait_for_workers, as_json, quiet, verbose):  # fmt: skip
    """Fit NMF to the matrix in INPUT (a Zarr store) and write the model to OUTPUT."""
    from dasknmf import NMF, open_matrix
    from dasknmf.checkpoint import Checkpoint
    from dasknmf.io import matrix_ids

    _setup_logging(verbose, quiet)
    _check_output(output, overwrite)
    if alpha_h != "same":
        try:
            alpha_h = float(alpha_h)
        except ValueError:
            raise BadInput(f"--alpha-h must be a number or 'same', got {alpha_h!r}.") from None
    if checkpoint is None and (checkpoint_every is not None or resume):
        checkpoint = f"{output}.checkpoint"
    X = open_matrix(input_path, component)
    model = NMF(
        n_components=n_components,
        solver=solver,
        beta_loss=_beta_loss(beta_loss),
        init=init,
        max_iter=max_iter,
        tol=tol,
        random_state=random_state,
        alpha_W=alpha_w,
        alpha_H=alpha_h,
        l1_ratio=l1_ratio,
        extrapolate="auto" if extrapolate is None else extrapolate,
        progress=not quiet,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every or 10,
        resume=resume,
        layout=layout,
        missing=missing,
    )
    model._validate_params()  # before a cluster starts
    if resume:  # and the checkpoint
        Checkpoint(checkpoint, 1, {}).require_latest()
    with _connect(cluster, scheduler_address, scheduler_file, workers) as client:
        _announce(client, wait_for_workers)
        _probe_output(client, output)
        start = time.perf_counter()
        model.fit(X)
        seconds = time.perf_counter() - start
        if component is None:  # the ids of a store written from records (convert --triples)
            model._keep_ids(matrix_ids(input_path))
        model.save(output, overwrite=overwrite)
    record = {
        "command": "fit",
        "input": str(input_path),
        "output": str(output),
        "shape": list(X.shape),
        "n_components": model.n_components_,
        "n_iter": model.n_iter_,
        "reconstruction_err": model.reconstruction_err_,
        "seconds": round(seconds, 3),
        "checkpoint": None if checkpoint is None else str(checkpoint),
    }
    _emit(
        as_json,
        record,
        f"{model.n_iter_} iterations in {seconds:.1f} s, reconstruction error "
        f"{model.reconstruction_err_:.6g}; model written to {output}",
        quiet,
    )


@main.command()
@click.argument("model_path", metavar="MODEL", type=_INPUT)
@click.argument("input_path", metavar="INPUT", type=_INPUT)
@click.option("-o", "--output", required=True, type=_OUTPUT, help="W, as a Zarr array.")
@click.option("--component", help="The matrix inside a Zarr group, e.g. X of an AnnData store.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_where_to_run
@_common
@_fails_cleanly
def transform(model_path, input_path, output, component, overwrite, cluster, scheduler_address,
              scheduler_file, workers, wait_for_workers, as_json, quiet, verbose):  # fmt: skip
    """Write W for the matrix in INPUT under the fitted MODEL (H fixed) to OUTPUT."""
    from dasknmf import load, open_matrix, save_matrix

    _setup_logging(verbose, quiet)
    _check_output(output, overwrite)
    model = load(model_path)
    X = open_matrix(input_path, component)
    with _connect(cluster, scheduler_address, scheduler_file, workers) as client:
        _announce(client, wait_for_workers)
        _probe_output(client, output)
        start = time.perf_counter()
        W = model.transform(X)
        save_matrix(output, W, overwrite=overwrite)
        seconds = time.perf_counter() - start
    record = {
        "command": "transform",
        "model": str(model_path),
        "input": str(input_path),
        "output": str(output),
        "shape": list(W.shape),
        "seconds": round(seconds, 3),
    }
    _emit(as_json, record, f"W {W.shape[0]} x {W.shape[1]} written to {output}", quiet)


@main.command()
@click.argument("model_path", metavar="MODEL", type=_INPUT)
@click.argument("input_path", metavar="INPUT", type=_INPUT)
@click.option("-o", "--output", required=True, type=_OUTPUT, help="The updated model.")
@click.option("--component", help="The matrix inside a Zarr group, e.g. X of an AnnData store.")
@click.option("--beta-loss", help="Refuse a MODEL fitted with another loss than this one.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_where_to_run
@_common
@_fails_cleanly
def update(model_path, input_path, output, component, beta_loss, overwrite, cluster,
           scheduler_address, scheduler_file, workers, wait_for_workers, as_json, quiet,
           verbose):  # fmt: skip
    """Update a MiniBatchNMF MODEL with the new rows in INPUT (one partial_fit step from the
    running sums kept in MODEL) and write it, with W of the new rows, to OUTPUT."""
    from dasknmf import MiniBatchNMF, load, open_matrix
    from dasknmf._params import beta

    _setup_logging(verbose, quiet)
    _check_output(output, overwrite)
    model = load(model_path)
    if not isinstance(model, MiniBatchNMF):
        raise BadInput(
            f"{model_path} is a {type(model).__name__} model, which keeps no running sums to "
            "update: fit a MiniBatchNMF (dasknmf.MiniBatchNMF) to update it with new rows."
        )
    if beta_loss is not None and beta(_beta_loss(beta_loss)) != beta(model.beta_loss):
        raise BadInput(
            f"{model_path} was fitted with beta_loss={model.beta_loss!r}, not {beta_loss!r}."
        )
    X = open_matrix(input_path, component)
    with _connect(cluster, scheduler_address, scheduler_file, workers) as client:
        _announce(client, wait_for_workers)
        _probe_output(client, output)
        start = time.perf_counter()
        model.partial_fit(X)
        model.W_ = model.transform(X)
        model.save(output, overwrite=overwrite)
        seconds = time.perf_counter() - start
    record = {
        "command": "update",
        "model": str(model_path),
        "input": str(input_path),
        "output": str(output),
        "rows": int(X.shape[0]),
        "n_steps": int(model.n_steps_),
        "seconds": round(seconds, 3),
    }
    _emit(as_json, record, f"{X.shape[0]} rows taken in; model written to {output}", quiet)


@main.command("recommend")
@click.argument("model_path", metavar="MODEL", type=_INPUT)
@click.option("-o", "--output", required=True, type=_OUTPUT,
              help="A .parquet or .csv table: row, rank, column, score.")  # fmt: skip
@click.option("-n", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--rows", help="Comma-separated rows: their ids, or positions [default: all].")
@click.option("--input", "input_path", type=_INPUT,
              help="The X the model was fitted on: its observed entries are left out.")  # fmt: skip
@click.option("--include-observed", is_flag=True, help="Keep what the model was fitted on.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_where_to_run
@_common
@_fails_cleanly
def recommend_command(model_path, output, n, rows, input_path, include_observed, overwrite,
                      cluster, scheduler_address, scheduler_file, workers, wait_for_workers,
                      as_json, quiet, verbose):  # fmt: skip
    """Write the top-N columns of each row of the fitted MODEL (all rows, or --rows) to
    OUTPUT, leaving out the entries of the fitted X given as --input."""
    from dasknmf import load
    from dasknmf.recommend import check_table_path, row_labels, write_table

    _setup_logging(verbose, quiet)
    check_table_path(output, overwrite)
    model = load(model_path)
    if input_path is None and not include_observed:
        raise BadInput(
            "Leaving out the observed entries needs the fitted X: give --input X.zarr, or "
            "--include-observed."
        )
    if rows is not None:
        ids = getattr(model, "row_ids_", None)
        rows = [r.strip() for r in rows.split(",") if r.strip()]
        if ids is None or ids.dtype.kind == "i":
            bad = [r for r in rows if not r.lstrip("-").isdigit()]
            if bad:
                raise BadInput(f"--rows {bad[:5]} are not integers (positions, or integer ids).")
            rows = [int(r) for r in rows]
        model._positions(rows, 0)  # unknown rows: an error before a cluster starts
    with _connect(cluster, scheduler_address, scheduler_file, workers) as client:
        _announce(client, wait_for_workers)
        start = time.perf_counter()
        columns, scores = model.recommend(rows, n, not include_observed, X=input_path)
        seconds = time.perf_counter() - start
    labels = row_labels(model, rows)
    write_table(output, labels, columns, scores, overwrite=overwrite)
    record = {
        "command": "recommend",
        "model": str(model_path),
        "output": str(output),
        "rows": len(labels),
        "n": int(columns.shape[1]),
        "seconds": round(seconds, 3),
    }
    _emit(
        as_json, record, f"top {columns.shape[1]} of {len(labels)} rows written to {output}", quiet
    )


@main.command("convert")
@click.argument("src", type=_LOCAL_INPUT)
@click.argument("dst", type=_OUTPUT)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option(
    "--triples", metavar="ROW,COL,VALUE",
    help="SRC is a .csv, .tsv or .parquet file of records: these columns hold the row id, the "
    "column id and the value (e.g. user,item,rating). DST stores exactly the records, with "
    "the ids.",
)  # fmt: skip
@_common
@_fails_cleanly
def convert_command(src, dst, overwrite, triples, as_json, quiet, verbose):
    """Convert SRC (.npy, .npz, .mtx, .h5ad, or records with --triples) to a Zarr store DST."""
    from dasknmf import convert
    from dasknmf.io import describe_matrix

    _setup_logging(verbose, quiet)
    _check_output(dst, overwrite)
    start = time.perf_counter()
    convert(src, dst, triples=triples, overwrite=overwrite)
    info = describe_matrix(dst, count=False)  # no second read of what was just written
    record = {"command": "convert", "input": str(src), "output": str(dst), **info}
    record["seconds"] = round(time.perf_counter() - start, 3)
    shape = " x ".join(map(str, info["shape"]))
    _emit(as_json, record, f"{shape} {info['format']} {info['dtype']} written to {dst}", quiet)


def _describe(path: pathlib.Path, component):
    import zarr

    from dasknmf.io import _open_node

    node, where = _open_node(path)
    if isinstance(node, zarr.Group) and "dasknmf" in node.attrs and component is None:
        attributes = dict(node.attrs)
        return "model", {
            "path": where,
            "n_components": attributes["n_components"],
            "n_samples": attributes.get("n_samples"),
            "n_features": attributes["n_features"],
            "dtype": attributes["dtype"],
            "n_iter": attributes["n_iter"],
            "reconstruction_err": attributes["reconstruction_err"],
            "layout": attributes.get("layout"),
            "version": attributes["dasknmf"].get("version"),
            "params": attributes["params"],
        }
    from dasknmf.io import describe_matrix

    return "matrix", describe_matrix(path, component)


@main.command()
@click.argument("path", type=_INPUT)
@click.option("--component", help="The matrix inside a Zarr group, e.g. X of an AnnData store.")
@_common
@_fails_cleanly
def info(path, component, as_json, quiet, verbose):
    """Describe a stored matrix (shape, dtype, dense/CSR, chunks, nnz) or a fitted model.

    For a dense matrix, counting the non-zeros reads the whole store once."""
    _setup_logging(verbose, quiet)
    kind, record = _describe(path, component)
    record = {"command": "info", "kind": kind, **record}
    lines = [f"{key}: {value}" for key, value in record.items() if key not in ("command",)]
    _emit(as_json, record, "\n".join(lines), quiet)


@main.command()
@click.argument("model_path", metavar="MODEL", type=_INPUT)
@click.option("-o", "--output", required=True, type=_OUTPUT, help="The image (.png, .pdf, .svg).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_common
@_fails_cleanly
def plot(model_path, output, overwrite, as_json, quiet, verbose):
    """Draw the convergence curve (objective per iteration) of a fitted MODEL, or error,
    stability and held-out error against k of a rank selection (``dasknmf rank``)."""
    from dasknmf import load
    from dasknmf.io import atomic_path

    _setup_logging(verbose, quiet)
    _check_output(output, overwrite)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException(
            'dasknmf plot needs matplotlib: pip install "dasknmf[plot]"'
        ) from None
    figure = _cli_rank.rank_figure(plt, model_path)  # a rank selection, or None
    if figure is None:
        model = load(model_path)
        loss = model.loss_history_
        figure, axes = plt.subplots(figsize=(6, 4))
        axes.semilogy(range(len(loss)), loss, marker="." if len(loss) < 50 else None)
        axes.set_xlabel("iteration")
        axes.set_ylabel("objective")
        axes.set_title(f"NMF, {model.n_components_} components: {model.n_iter_} iterations")
        axes.grid(True, which="both", alpha=0.3)
        figure.tight_layout()
    suffix = pathlib.PurePosixPath(str(output)).suffix
    with atomic_path(output, overwrite) as tmp:
        fs, where = tmp.filesystem()
        with fs.open(where, "wb") as f:
            figure.savefig(f, format=suffix.lstrip(".") or "png")
    plt.close(figure)
    record = {"command": "plot", "model": str(model_path), "output": str(output)}
    _emit(as_json, record, f"Convergence curve written to {output}", quiet)


@main.command()
@click.option(
    "--rows",
    default=100_000,
    show_default=True,
    type=click.IntRange(min=2),
    help="Rows of the generated matrix.",
)
@click.option(
    "--cols",
    default=1_000,
    show_default=True,
    type=click.IntRange(min=2),
    help="Columns of the generated matrix.",
)
@click.option(
    "--rank",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rank of its noiseless part.",
)
@click.option(
    "-k",
    "--n-components",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Components to fit.",
)
@click.option("--max-iter", default=200, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--tol",
    default=1e-6,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Stopping tolerance (NMF's tol): small, so that the fit reaches the matrix's noise.",
)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=1),
    help="Worker processes of the LocalCluster [default: one per core].",
)
@click.option(
    "--workdir",
    default=None,
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    help="Where the example matrix is written [default: a temporary folder, removed afterwards].",
)
def demo(rows, cols, rank, n_components, max_iter, tol, workers, workdir) -> None:
    """Generate an example matrix in Zarr, start a LocalCluster and factorize it."""
    from dasknmf.demo import run

    if n_components > min(rows, cols):
        raise click.BadParameter(
            f"must be at most min(rows, cols) = {min(rows, cols)}", param_hint="'-k'"
        )
    settings = dict(rank=rank, n_components=n_components, max_iter=max_iter, tol=tol)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        run(rows, cols, workdir, workers=workers, echo=click.echo, **settings)
    else:
        with tempfile.TemporaryDirectory(prefix="dasknmf-demo-") as tmp:
            run(rows, cols, pathlib.Path(tmp), workers=workers, echo=click.echo, **settings)
