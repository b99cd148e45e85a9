"""What the ``dasknmf`` commands share: exit codes and one-line errors, logging, paths and
URLs, the common options and the connection to a Dask cluster (``dasknmf.cli``)."""

from __future__ import annotations

import functools
import json
import logging
import pathlib

import click

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
    from dasknmf._workers_code import workers_now

    workers = workers_now(client)
    logger.info("Dask cluster: %d workers, dashboard %s", len(workers), client.dashboard_link)


def _probe_output(client, output) -> None:
    """Check that the workers share OUTPUT's folder (they write W's chunks there) before any
    work, rather than after the fit."""
    from dasknmf.storage import location, probe_shared

    folder = location(output).parent
    probe_shared(client, folder.store(), "", str(folder))
