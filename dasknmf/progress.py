"""What a fit shows while it runs: scikit-learn style lines and a progress bar."""

from __future__ import annotations

from dasknmf.history import History
from dasknmf.storage import distributed_client


class Reporter:
    """Per-iteration output: scikit-learn style lines (verbose) and/or a tqdm bar (progress).

    The bar shows the lowest objective so far and how often the objective rose (with
    extrapolation: a restart from the plain iterates), not the raw value, which jumps up at a
    restart and reads as a fault; the verbose lines keep the raw value, as scikit-learn's do.
    """

    def __init__(self, verbose: int, progress: bool, max_iter: int, start: int = 0):
        self.verbose = verbose
        self.progress = progress
        self.max_iter = max_iter
        self.start = start
        self._bar = None
        self.best = float("inf")
        self.rises = 0

    def __enter__(self):
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.max_iter, initial=self.start, desc="NMF", unit="it")
            client = distributed_client()
            if client is not None:
                self._bar.write(f"Dask dashboard: {client.dashboard_link}")
        return self

    def restart(self, n_iter: int) -> None:
        """The fit starts again after ``n_iter`` iterations (after a worker loss)."""
        self.best, self.rises = float("inf"), 0
        if self._bar is not None:
            self._bar.reset(total=self.max_iter)
            self._bar.update(n_iter)

    def __call__(self, n_iter: int, history: History) -> None:
        loss, before = history.loss[-1], history.loss[-2]
        change = (before - loss) / abs(before) if before else 0.0
        self.best = min(self.best, *history.loss[-2:])
        self.rises += loss > before
        if self.verbose:
            print(f"Iteration {n_iter:4d}  objective {loss:.6g}  relative decrease {change:.3e}")
        if self._bar is not None:
            self._bar.set_postfix(best_objective=f"{self.best:.6g}", restarts=self.rises)
            self._bar.update(1)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()
