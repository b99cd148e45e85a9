"""glibc's mmap threshold in Dask worker processes.

distributed starts worker processes with ``MALLOC_TRIM_THRESHOLD_`` set
(``distributed.nanny.pre-spawn-environ``), so that freed memory goes back to the system. Setting
it also turns off glibc's dynamic mmap threshold, which stays at 128 KiB: every array over
128 KiB is then a new mapping whose pages fault in on first touch, and is unmapped when freed.
An iteration makes many such temporaries (a panel's C = H·X_iᵀ, its float64 copies, the
partials): the GEMMs of a shard's update on two 5000 × 2000 panels took 48–52 ms in a worker
process against 40 ms in a thread of the driver (docs/design.md). Unless told otherwise
(``dasknmf.worker-mmap-threshold``), a fit on a cluster raises the threshold in each worker
process where the trim threshold is set and the mmap threshold is not (``WorkerMalloc``), to
at most 1/1024 of the worker's memory limit (``threshold_for``): arrays up to it come from
malloc's free lists again, and freed ones stay resident for reuse — until the end of the task,
on a worker that uses more than a tenth of its limit (``needs_trim``). Freed memory at the top
of a heap still goes back to the system (the trim threshold is unchanged), and arrays above the
threshold — panels — are still mapped and unmapped: at 32 MiB, workers streaming panels of
8 MiB kept freed ones resident and paused for lack of memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

import dask.config

from dasknmf._config import get_bytes

logger = logging.getLogger(__name__)

#: glibc's ``mallopt`` parameter for the mmap threshold (malloc.h).
M_MMAP_THRESHOLD = -3
#: glibc refuses a threshold above this (HEAP_MAX_SIZE / 2 on 64-bit systems).
MAX_THRESHOLD = 32 * 2**20
#: glibc's threshold when fixed by the trim variable: a smaller one is no raise.
FIXED_THRESHOLD = 128 * 2**10
#: The threshold is at most this fraction of a worker's memory limit: freed arrays below it stay
#: resident for reuse. At 4 MiB a 2-D fit's workers of 1.4 GiB peaked 40 MiB higher (93% of
#: their limit before) and were restarted, and workers streaming 8 MiB panels 13 MiB higher; at
#: 1.4 MiB (1/1024), with ``TRIM_ABOVE``, the 2-D fit peaked as without.
LIMIT_SHARE = 1 / 1024
#: A worker using more than this share of its memory limit gives what malloc keeps free back to
#: the system after each task. Kept across tasks, it took the 2-D fit's workers (93% used) past
#: their limit at a 1.4 MiB threshold (and at 0.5 of the limit, read from distributed's monitor,
#: once); given back after every task, it cost the dense benchmark most of the raise's gain (its
#: workers use 2% of theirs).
TRIM_ABOVE = 0.1
#: The key of dasknmf's config that sets the threshold (false: leave the workers' malloc alone).
KEY = "dasknmf.worker-mmap-threshold"


def configured_threshold() -> int | None:
    """The threshold ``dasknmf.worker-mmap-threshold`` asks for, in bytes; None when it is
    false, null or 0. A ValueError for a size glibc would refuse."""
    value = dask.config.get(KEY, None)
    if value is None or value is False or value == 0:
        return None
    size = get_bytes(KEY)
    if size > MAX_THRESHOLD:
        raise ValueError(
            f"The dask config {KEY}={value!r} is above glibc's largest mmap threshold "
            f"({MAX_THRESHOLD} bytes, 32 MiB)."
        )
    return size or None


def threshold_for(size: int, memory_limit: int | None) -> int | None:
    """The threshold for a worker with ``memory_limit`` bytes (None or 0: no limit): ``size``,
    at most ``LIMIT_SHARE`` of the limit; None when that is no raise."""
    if memory_limit:
        size = min(size, int(memory_limit * LIMIT_SHARE))
    return size if size > FIXED_THRESHOLD else None


def needs_trim(memory: int, memory_limit: int | None, above: float) -> bool:
    """Whether a worker using ``memory`` bytes of ``memory_limit`` (None or 0: no limit) gives
    malloc's free memory back after a task: when more than ``above`` of its limit is used."""
    return bool(memory_limit) and memory > above * memory_limit


def fixed_by_environment(environ=os.environ) -> bool:
    """Whether this process's malloc runs with the mmap threshold fixed by a trim threshold
    from the environment, and no mmap threshold of its own (``MALLOC_MMAP_THRESHOLD_``)."""
    return "MALLOC_TRIM_THRESHOLD_" in environ and "MALLOC_MMAP_THRESHOLD_" not in environ


@functools.cache
def _glibc():
    """glibc, or None on another C library (where ``mallopt`` means something else or
    nothing); loaded once per process."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def raise_threshold(size: int) -> bool:
    """Set this process's mmap threshold to ``size`` bytes if distributed's trim threshold fixed
    it (``fixed_by_environment``); whether it was set."""
    if not fixed_by_environment():
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(size)))


def _worker_plugin():
    from distributed.diagnostics.plugin import WorkerPlugin

    class WorkerMalloc(WorkerPlugin):
        """Raises the mmap threshold in each worker process (``raise_threshold``), on the
        workers there now and on those that join or restart later; and, after each task of a
        worker whose memory is more than ``trim_above`` used, gives what malloc keeps free back
        to the system (``malloc_trim``; ``needs_trim``)."""

        name = "dasknmf-worker-malloc"
        idempotent = True  # registered by every fit on a cluster: once is enough

        def __init__(self, size: int, trim_above: float = TRIM_ABOVE):
            self.size, self.trim_above = size, trim_above
            self._trim = self._limit = self._process = None

        def setup(self, worker) -> None:
            manager = getattr(worker, "memory_manager", None)
            self._limit = getattr(manager, "memory_limit", None)
            size = threshold_for(self.size, self._limit)
            if size is not None and raise_threshold(size):
                import psutil

                self._trim, self._process = _glibc().malloc_trim, psutil.Process()
                logger.debug("mmap threshold of %s set to %d bytes", worker.address, size)

        def transition(self, key, start, finish, **kwargs) -> None:
            if self._trim is None or start != "executing":
                return
            if needs_trim(self._process.memory_info().rss, self._limit, self.trim_above):
                self._trim(0)  # the task is done: what it left free goes back

    return WorkerMalloc


def tune_workers(client) -> None:
    """Register ``WorkerMalloc`` on ``client``'s cluster, unless the config says not to."""
    size = configured_threshold()
    if size is None:
        return
    try:
        client.register_plugin(_worker_plugin()(size), name="dasknmf-worker-malloc")
    except Exception as error:  # not a reason to refuse the fit
        logger.warning("Could not set the workers' mmap threshold: %s", error)
