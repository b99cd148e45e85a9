"""A fixed BLAS thread count, so that results do not depend on how many threads BLAS uses.

With OpenBLAS, X @ H.T computed with 1 and with 2 threads differs in the last bits, so kernels
run with one BLAS thread and parallelism comes from tasks. The driver process limits BLAS for
the duration of a fit (``single_blas_thread``); a Dask worker process pins itself once
(``pin_worker_blas``), which is what its nanny's environment asks for anyway.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from threadpoolctl import ThreadpoolController


@functools.cache
def _controller() -> ThreadpoolController:
    return ThreadpoolController()


@contextlib.contextmanager
def single_blas_thread() -> Iterator[None]:
    """Limit BLAS to one thread in this process while the block runs."""
    with _controller().limit(limits=1, user_api="blas"):
        yield


_worker_pinned = False


def pin_worker_blas() -> None:
    """In a Dask worker process, limit BLAS to one thread for good; elsewhere do nothing."""
    global _worker_pinned
    if _worker_pinned:
        return
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return
    _controller().limit(limits=1, user_api="blas")
    _worker_pinned = True
