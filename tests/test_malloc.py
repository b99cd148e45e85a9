"""glibc's mmap threshold in Dask worker processes (``dasknmf._malloc``): a fit on a cluster
lets workers take temporaries from malloc's heap instead of mapping each afresh, on the
workers there and on those that join later; the config turns it off; bad sizes are refused.
glibc only (``mallinfo2``, glibc 2.33 or later, tells whether a block was mapped)."""

import warnings

import dask
import dask.array as da
import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from dasknmf import NMF, _malloc


def _mapped_in_tasks(client, size: int) -> dict:
    """``mapped`` run as a task on each worker (in its task thread). Defined here, so that it
    is sent by value: a worker that imported this module would import scikit-learn with it
    (too much for a small worker)."""

    def mapped(size: int) -> list[int]:
        """For three allocations of ``size`` bytes by malloc, one after another (each freed before
        the next), whether malloc mapped it afresh (1) or took it from its heap (0): the change
        in glibc's count of mapped blocks (``mallinfo2``) while it is held."""
        import ctypes

        fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks")
        fields += ("uordblks", "fordblks", "keepcost")

        class Mallinfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in fields]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Mallinfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        found = []
        for _ in range(3):
            before = libc.mallinfo2().hblks
            block = libc.malloc(size)
            found.append(libc.mallinfo2().hblks - before)
            libc.free(block)
        return found

    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    futures = [
        client.submit(mapped, size, pure=False, workers=[w], allow_other_workers=False)
        for w in workers
    ]
    return dict(zip(workers, client.gather(futures), strict=True))


def _all(found: dict, expected: list[int]) -> bool:
    return all(each == expected for each in found.values())


def _small_fit():
    X = da.from_array(np.random.default_rng(0).random((200, 30)), chunks=(50, 30))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        NMF(n_components=2, max_iter=3, random_state=0).fit(X)


MAPPED, FROM_THE_HEAP = [1, 1, 1], [0, 0, 0]
MiB = 2**20


def test_a_fit_on_a_cluster_lets_its_workers_reuse_freed_arrays():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        # distributed's MALLOC_TRIM_THRESHOLD_ fixed the threshold at 128 KiB
        before = _mapped_in_tasks(client, MiB)
        assert _all(before, MAPPED), before
        _small_fit()
        after = _mapped_in_tasks(client, MiB)
        assert _all(after, FROM_THE_HEAP), after
        above = _mapped_in_tasks(client, 8 * MiB)  # above 4 MiB: a panel, say
        assert _all(above, MAPPED), above
        cluster.scale(3)  # a worker that joins later is set up too
        client.wait_for_workers(3)
        joined = _mapped_in_tasks(client, MiB)
        assert len(joined) == 3 and _all(joined, FROM_THE_HEAP), joined


def test_the_config_false_leaves_the_workers_malloc_alone():
    from distributed import Client, LocalCluster

    with (
        dask.config.set({_malloc.KEY: False}),
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        _small_fit()
        after = _mapped_in_tasks(client, MiB)
        assert _all(after, MAPPED), after


@pytest.mark.parametrize(
    "value, expected",
    [(False, None), (None, None), (0, None), ("1MiB", 2**20), (4096, 4096), ("32MiB", 2**25)],
)
def test_the_configured_threshold(value, expected):
    with dask.config.set({_malloc.KEY: value}):
        assert _malloc.configured_threshold() == expected


@pytest.mark.parametrize(
    "value, match",
    [
        ("64MiB", "above glibc's largest mmap threshold"),
        ("lots", "is not a size"),
        (-1, "is not a size .it is negative"),
        ([1], "is not a size"),
    ],
)
def test_a_bad_configured_threshold_is_refused_naming_the_key(value, match):
    with dask.config.set({_malloc.KEY: value}), pytest.raises(ValueError, match=match) as error:
        _malloc.configured_threshold()
    assert _malloc.KEY in str(error.value)


def test_a_bad_configured_threshold_fails_a_cluster_fit_before_any_work():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster),
        dask.config.set({_malloc.KEY: "1GiB"}),
        pytest.raises(ValueError, match="worker-mmap-threshold"),
    ):
        _small_fit()


@pytest.mark.parametrize(
    "size, limit, expected",
    [
        (4 * 2**20, None, 4 * 2**20),
        (4 * 2**20, 0, 4 * 2**20),
        (4 * 2**20, 12 * 2**30, 4 * 2**20),
        (4 * 2**20, 1 * 2**30, 2**20),  # a 1024th of the limit
        (4 * 2**20, 128 * 2**20, None),  # 128 KiB: what glibc has already
        (2**17, None, None),
    ],
)
def test_the_threshold_is_a_small_share_of_the_workers_memory(size, limit, expected):
    assert _malloc.threshold_for(size, limit) == expected


def test_workers_with_little_memory_get_a_smaller_threshold():
    """A worker of 512 MiB (a 1024th: 512 KiB): blocks of 1 MiB are still mapped afresh,
    blocks of 256 KiB come from the heap."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, memory_limit="512MiB", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        assert _all(_mapped_in_tasks(client, MiB // 4), MAPPED)
        _small_fit()
        assert _all(_mapped_in_tasks(client, MiB), MAPPED)
        quarters = _mapped_in_tasks(client, MiB // 4)
        assert _all(quarters, FROM_THE_HEAP), quarters


@pytest.mark.parametrize(
    "memory, limit, trims",
    [(600, 1000, True), (400, 1000, False), (600, None, False), (600, 0, False)],
)
def test_a_worker_gives_free_memory_back_only_when_half_used(memory, limit, trims):
    assert _malloc.needs_trim(memory, limit, 0.5) is trims


@pytest.mark.parametrize("trim_above, gives_back", [(0.0, True), (1.0, False)])
def test_after_a_task_a_worker_over_the_share_gives_malloc_s_free_memory_back(
    trim_above, gives_back
):
    from distributed import Client, LocalCluster

    def rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def leave_free(megabytes: int) -> None:  # sent by value: no import of this module there
        """A task that leaves ``megabytes`` MiB free in malloc's heap, below a block it keeps (so
        that free() cannot give it back from the top)."""
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        blocks = [libc.malloc(2**20) for _ in range(megabytes)]
        for block in blocks:
            libc.memset(block, 1, 2**20)  # resident
        libc.malloc(2**16)  # kept, above them
        for block in blocks:
            libc.free(block)

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(_malloc._worker_plugin()(4 * MiB, trim_above))
        assert _all(_mapped_in_tasks(client, MiB), FROM_THE_HEAP)
        (before,) = client.run(rss).values()
        client.submit(leave_free, 200, pure=False).result()
        (after,) = client.run(rss).values()
    kept = (after - before) / MiB
    assert (kept < 50) if gives_back else (kept > 150), kept


@pytest.mark.parametrize(
    "environ, fixed",
    [
        ({"MALLOC_TRIM_THRESHOLD_": "65536"}, True),
        ({"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "131072"}, False),
        ({}, False),
    ],
)
def test_only_a_threshold_fixed_by_the_trim_variable_is_raised(environ, fixed, monkeypatch):
    assert _malloc.fixed_by_environment(environ) is fixed
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    if not fixed:  # in this process: nothing to do, nothing done
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        assert _malloc.raise_threshold(2**20) is False
