"""The ``dasknmf`` command line."""

from __future__ import annotations

import pathlib
import tempfile
import time

import click

from dasknmf import __version__


@click.group()
@click.version_option(__version__, prog_name="dasknmf")
def main() -> None:
    """Distributed, out-of-core Non-negative Matrix Factorization on Dask and Zarr."""


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
def demo(rows, cols, rank, n_components, max_iter, workers, workdir) -> None:
    """Generate an example matrix in Zarr, start a LocalCluster and factorize it."""
    if n_components > min(rows, cols):
        raise click.BadParameter(
            f"must be at most min(rows, cols) = {min(rows, cols)}", param_hint="'-k'"
        )
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        _demo(rows, cols, rank, n_components, max_iter, workers, workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="dasknmf-demo-") as tmp:
            _demo(rows, cols, rank, n_components, max_iter, workers, pathlib.Path(tmp))


def _demo(rows, cols, rank, n_components, max_iter, workers, workdir: pathlib.Path) -> None:
    import dask.array as da
    import numpy as np

    from dasknmf import NMF, save_matrix
    from dasknmf.cluster import connect

    with connect(n_workers=workers) as client:
        click.echo(
            f"LocalCluster: {len(client.scheduler_info()['workers'])} workers; "
            f"dashboard {client.dashboard_link}"
        )
        path = workdir / "example.zarr"
        click.echo(
            f"Writing a {rows} x {cols} float32 matrix of rank {rank} plus noise to {path} ..."
        )
        rng = da.random.default_rng(0)
        chunk_rows = max(1, 4_000_000 // cols)
        W = rng.uniform(size=(rows, rank), chunks=(chunk_rows, rank)).astype(np.float32)
        H = rng.uniform(size=(rank, cols), chunks=(rank, cols)).astype(np.float32)
        noise = rng.uniform(size=(rows, cols), chunks=(chunk_rows, cols)).astype(np.float32)
        save_matrix(path, W @ H + 0.1 * noise, chunks=(chunk_rows, cols), overwrite=True)

        click.echo(f"Fitting NMF with {n_components} components (HALS, nndsvda init) ...")
        start = time.perf_counter()
        model = NMF(n_components=n_components, max_iter=max_iter, random_state=0, progress=True)
        model.fit(str(path))
        seconds = time.perf_counter() - start
        norm_x = float(
            np.sqrt(da.from_zarr(str(path)).astype(np.float64).__pow__(2).sum().compute())
        )
    click.echo(
        f"Done in {seconds:.1f} s: {model.n_iter_} iterations, reconstruction error "
        f"{model.reconstruction_err_:.4g} (relative {model.reconstruction_err_ / norm_x:.2e}); "
        f"the noise alone is about {0.1 * np.sqrt(rows * cols / 12):.4g} around its mean."
    )
    click.echo(
        f"components_ (H) has shape {model.components_.shape}; the first row begins "
        f"{np.array2string(model.components_[0, :5], precision=3)}"
    )
