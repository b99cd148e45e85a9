"""The ``dasknmf`` command line: fit, transform, convert, info, plot and demo.

Exit codes: 0 on success; 2 for usage errors and bad input (a one-line message, no
traceback); 1 for any other failure. ``--json`` prints one JSON object as the last line of
standard output. Outputs are written to a temporary sibling and renamed when complete, so a
failed or killed run never leaves anything that looks like a finished result.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import tempfile
import time

import click

from dasknmf import __version__

logger = logging.getLogger("dasknmf")


class BadInput(click.ClickException):
    """Bad input or settings: exit code 2, like click's usage errors."""

    exit_code = 2


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _fails_cleanly(command):
    """Map exceptions to exit codes: ``ValueError``/``TypeError``/missing or existing paths
    (bad input) to 2, anything else to 1; one line on standard error, no traceback (run with
    ``-vv`` to log it)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise
        except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
            logger.debug("bad input", exc_info=True)
            raise BadInput(_one_line(error)) from None
        except Exception as error:
            logger.debug("failure", exc_info=True)
            raise click.ClickException(f"{type(error).__name__}: {_one_line(error)}") from None

    return wrapper


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("dasknmf").setLevel(level)
    # distributed logs every worker start and stop at INFO on its own handler; only -vv shows it.
    for name in ("distributed", "tornado", "bokeh"):
        logging.getLogger(name).setLevel(level if verbose >= 2 else max(level, logging.WARNING))
    logging.captureWarnings(True)  # ConvergenceWarning and others as one log line each


def _emit(as_json: bool, record: dict, text: str, quiet: bool) -> None:
    if as_json:
        click.echo(json.dumps(record))
    elif not quiet:
        click.echo(text)


def _check_output(path: pathlib.Path, overwrite: bool) -> None:
    """Refuse an OUTPUT before any work (the write itself checks again)."""
    from dasknmf.io import check_output

    check_output(path, overwrite, how="--overwrite")


class _Where(click.ParamType):
    """A local path (made absolute: the workers may run in another directory) or an fsspec
    URL (s3://, gs://, abfs://, ...), configured the usual fsspec ways: environment variables
    such as AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL, and fsspec's config files."""

    name = "path"

    def __init__(self, exists: bool = False):
        self.exists = exists

    def convert(self, value, param, ctx):
        from dasknmf.storage import is_url

        if isinstance(value, str) and is_url(value):
            return value  # checked where it is opened, with a one-line error
        path = pathlib.Path(value).expanduser().absolute()
        if self.exists and not path.exists():
            self.fail(f"Path '{value}' does not exist.", param, ctx)
        return path


_INPUT = _Where(exists=True)
_OUTPUT = _Where()
_LOCAL_INPUT = click.Path(exists=True, path_type=pathlib.Path)


def _common(command):
    """Options every command has: --json, --quiet, -v."""
    for decorator in reversed(
        [
            click.option(
                "--json", "as_json", is_flag=True, help="Print one JSON object as the last line."
            ),
            click.option("-q", "--quiet", is_flag=True, help="No progress bar, no messages."),
            click.option(
                "-v", "--verbose", count=True, help="Log progress (-v) or debug details (-vv)."
            ),
        ]
    ):
        command = decorator(command)
    return command


def _where_to_run(command):
    """Options choosing the Dask cluster."""
    for decorator in reversed(
        [
            click.option(
                "--cluster",
                type=_LOCAL_INPUT,
                help="A cluster spec (YAML, see cluster_configs/) to start and use.",
            ),
            click.option("--scheduler-address", help="Connect to a running scheduler."),
            click.option(
                "--scheduler-file",
                type=_LOCAL_INPUT,
                help="Connect to the scheduler in this file.",
            ),
            click.option(
                "--workers",
                type=click.IntRange(min=1),
                help="Worker processes of the default LocalCluster [default: one per core].",
            ),
            click.option(
                "--wait-for-workers",
                type=click.FloatRange(min=0),
                help="Fail (exit 1) if no worker has joined after this many seconds "
                "[default: wait as long as it takes, e.g. for a batch queue].",
            ),
        ]
    ):
        command = decorator(command)
    return command


def _connect(cluster, scheduler_address, scheduler_file, workers):
    from dasknmf.cluster import connect

    given = [cluster, scheduler_address, scheduler_file]
    if sum(value is not None for value in given) > 1:
        raise click.UsageError(
            "Give at most one of --cluster, --scheduler-address and --scheduler-file."
        )
    if workers is not None and any(value is not None for value in given):
        raise click.UsageError("--workers sizes the default LocalCluster only.")
    local = {"n_workers": workers} if workers is not None else {}
    return connect(address=scheduler_address, scheduler_file=scheduler_file, spec=cluster, **local)


def _announce(client, wait_for_workers: float | None) -> None:
    """Wait for a worker if asked to, and log the cluster (the progress bar shows the
    dashboard link)."""
    if wait_for_workers is not None:
        try:
            client.wait_for_workers(1, timeout=wait_for_workers)
        except TimeoutError:
            raise click.ClickException(
                f"No Dask worker joined {client.scheduler.address} within {wait_for_workers:g} s."
            ) from None
    workers = client.scheduler_info(n_workers=-1)["workers"]
    logger.info("Dask cluster: %d workers, dashboard %s", len(workers), client.dashboard_link)


def _probe_output(client, output) -> None:
    """Check that the workers share OUTPUT's folder (they write W's chunks there) before any
    work, rather than after the fit."""
    from dasknmf.storage import location, probe_shared

    folder = location(output).parent
    probe_shared(client, folder.store(), "", str(folder))


@click.group()
@click.version_option(__version__, prog_name="dasknmf")
def main() -> None:
    """Distributed, out-of-core Non-negative Matrix Factorization on Dask and Zarr."""


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
@click.option("--resume", is_flag=True, help="Continue from the checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_where_to_run
@_common
@_fails_cleanly
def fit(input_path, n_components, output, component, solver, beta_loss, init, max_iter, tol,
        random_state, alpha_w, alpha_h, l1_ratio, extrapolate, checkpoint, checkpoint_every, layout,
        resume, overwrite, cluster, scheduler_address, scheduler_file, workers, wait_for_workers,
        as_json, quiet, verbose):  # fmt: skip
    """Fit NMF to the matrix in INPUT (a Zarr store) and write the model to OUTPUT."""
    from dasknmf import NMF, open_matrix

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
    )
    model._validate_params()  # before a cluster starts
    with _connect(cluster, scheduler_address, scheduler_file, workers) as client:
        _announce(client, wait_for_workers)
        _probe_output(client, output)
        start = time.perf_counter()
        model.fit(X)
        seconds = time.perf_counter() - start
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


@main.command("convert")
@click.argument("src", type=_LOCAL_INPUT)
@click.argument("dst", type=_OUTPUT)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@_common
@_fails_cleanly
def convert_command(src, dst, overwrite, as_json, quiet, verbose):
    """Convert SRC (.npy, .npz, .mtx, .h5ad) to a Zarr store DST."""
    from dasknmf import convert
    from dasknmf.io import describe_matrix

    _setup_logging(verbose, quiet)
    _check_output(dst, overwrite)
    start = time.perf_counter()
    convert(src, dst, overwrite=overwrite)
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
    """Draw the convergence curve (objective per iteration) of a fitted MODEL."""
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
