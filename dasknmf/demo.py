"""``dasknmf demo``: a matrix of known structure, written to Zarr and factorized on a
LocalCluster, with the error it ends at set against the error it could end at.

X = W·H + 0.1·U, with W, H and U uniform on [0, 1): a rank-``rank`` part plus noise. No rank-k
factorization can remove the noise's fluctuation around its mean, ‖0.1·(U − ½)‖_F ≈
0.1·√(m·n/12): that is the error a fit that found all the structure ends near (the mean itself
is absorbed by the factors).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable

import numpy as np

NOISE = 0.1


def noise_floor(rows: int, cols: int) -> float:
    """‖0.1·(U − ½)‖_F for U uniform on [0, 1): the error no rank-k fit removes."""
    return NOISE * float(np.sqrt(rows * cols / 12))


def run(
    rows: int,
    cols: int,
    workdir: pathlib.Path,
    *,
    rank: int = 10,
    n_components: int = 10,
    max_iter: int = 200,
    tol: float = 1e-6,
    workers: int | None = None,
    echo: Callable[[str], None] = print,
):
    """Write the example matrix to ``workdir/example.zarr``, fit it on a new LocalCluster with
    a progress bar, and report; returns the fitted ``NMF``."""
    import dask.array as da

    from dasknmf import NMF, save_matrix
    from dasknmf._workers_code import workers_now
    from dasknmf.cluster import connect

    with connect(n_workers=workers) as client:
        echo(f"LocalCluster: {len(workers_now(client))} workers; dashboard {client.dashboard_link}")
        path = workdir / "example.zarr"
        echo(f"Writing a {rows} x {cols} float32 matrix of rank {rank} plus noise to {path} ...")
        rng = da.random.default_rng(0)
        chunk_rows = max(1, 4_000_000 // cols)
        W = rng.uniform(size=(rows, rank), chunks=(chunk_rows, rank)).astype(np.float32)
        H = rng.uniform(size=(rank, cols), chunks=(rank, cols)).astype(np.float32)
        noise = rng.uniform(size=(rows, cols), chunks=(chunk_rows, cols)).astype(np.float32)
        save_matrix(path, W @ H + NOISE * noise, chunks=(chunk_rows, cols), overwrite=True)

        echo(f"Fitting NMF with {n_components} components (HALS, nndsvda init, tol {tol:g}) ...")
        start = time.perf_counter()
        model = NMF(
            n_components=n_components, max_iter=max_iter, tol=tol, random_state=0, progress=True
        )
        model.fit(str(path))
        seconds = time.perf_counter() - start
    floor = noise_floor(rows, cols)
    echo(
        f"Done in {seconds:.1f} s: {model.n_iter_} iterations, reconstruction error "
        f"{model.reconstruction_err_:.4g}, {model.reconstruction_err_ / floor:.3f}x the noise's "
        f"{floor:.4g} (the error no rank-{n_components} fit can remove: 1.00x means all the "
        "structure there is was found)."
    )
    echo(
        f"components_ (H) has shape {model.components_.shape}; the first row begins "
        f"{np.array2string(model.components_[0, :5], precision=3)}"
    )
    return model
