"""Executing the tasks of a phase: at once, as ``dask.delayed`` tasks, or as futures.

The iteration is written once, against the small ``Ops`` interface (``map``, ``call``, ``item``,
``share``, ``persist``, ``fetch``). ``EagerOps`` calls the functions at once on in-memory panels
(numpy or scipy.sparse), running the panels of a phase in a thread pool; ``DaskOps`` wraps them in
``dask.delayed``; ``FutureOps`` submits them to a distributed Client. All run the same functions
in the same order, so the same panels give bit-identical factors either way. Sums go through
trees of fixed shape and order (``tree_reduce``, ``reduce_to_fanin``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import operator
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask

from dasknmf import _malloc
from dasknmf._workers_code import check_workers_code, scheduler_id
from dasknmf.detached import Holders, _park, _pick_up
from dasknmf.shards import combine_picked, sum_in_order

logger = logging.getLogger(__name__)


class EagerOps:
    """Run functions at once on in-memory data; the items of a ``map`` go to a thread pool."""

    is_lazy = False
    is_async = False

    def __init__(self, n_threads: int = 1):
        self.n_threads = max(1, n_threads)
        self._pool = ThreadPoolExecutor(self.n_threads) if self.n_threads > 1 else None

    def map(self, fn: Callable, items: Sequence[tuple], *common: Any, workers=None) -> list:
        """``[fn(*common, *item) for item in items]``; ``workers`` is ignored."""
        if self._pool is None or len(items) < 2:
            return [fn(*common, *item) for item in items]
        return list(self._pool.map(lambda item: fn(*common, *item), items))

    def call(self, fn: Callable, *args: Any):
        return fn(*args)

    def item(self, obj, index: int):
        """``obj[index]`` of a task's tuple of outputs."""
        return obj[index]

    def share(self, value):
        """A value that many tasks read, made once."""
        return value

    def persist(self, *objs):
        return objs

    def fetch(self, obj):
        return obj

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


class DaskOps:
    """Build ``dask.delayed`` tasks; they run on the current scheduler when persisted or
    computed (or stay lazy, for results returned as Dask arrays)."""

    is_lazy = True
    is_async = False

    def map(self, fn: Callable, items: Sequence[tuple], *common: Any, workers=None) -> list:
        """One task per item; ``workers[i]``, if given, is where item i's task should run (the
        worker holding its panel of X), so that the scheduler neither moves nor steals it."""
        task = dask.delayed(fn, pure=False)
        if workers is None:
            return [task(*common, *item) for item in items]
        tasks = []
        for item, worker in zip(items, workers, strict=True):
            with dask.annotate(workers=[worker], allow_other_workers=True):
                tasks.append(task(*common, *item))
        return tasks

    def call(self, fn: Callable, *args: Any):
        return dask.delayed(fn, pure=False)(*args)

    def item(self, obj, index: int):
        return obj[index]

    def share(self, value):
        # One key that every task reads, instead of a copy embedded in (and traversed for) each
        # task: building tasks around a dataclass or list argument cost ~10 ms per iteration.
        return dask.delayed(value, pure=True, traverse=False)

    def persist(self, *objs):
        return dask.persist(*objs)

    def fetch(self, obj):
        return dask.compute(obj)[0]

    def close(self) -> None:
        pass


def _the(value):
    return value


def _loose_restrictions_plugin():
    from distributed.diagnostics.plugin import SchedulerPlugin

    class LooseRestrictions(SchedulerPlugin):
        """Sends tasks pinned to a worker that is gone to the workers that run now.

        dasknmf places a task with its panel (``workers=[w]``, ``allow_other_workers=True``).
        When every worker dies, such tasks wait in the 'no-worker' state, and distributed, when
        a worker starts running, reschedules only the tasks whose restrictions that worker
        meets — never these — so the fit would wait forever. This does what the loose
        restrictions mean, whenever a worker joins or turns to 'running': a restarted worker
        may register while still starting up and run only later, when ``add_worker`` has
        already passed (a fit then hung in one of about ten runs of the all-workers-killed test).

        ``_pick_up`` (``FutureOps.detach``) is pinned strictly: with loose restrictions it ran
        on the other worker while its own was paused (memory), where the value is not, and
        failed as if that worker had died. When the worker it is pinned to has left, this
        loosens it, so that it runs elsewhere and fails (the fit then restarts from its
        checkpoint) rather than waiting for ever.
        """

        name = "dasknmf-loose-restrictions"
        idempotent = True  # registered by every fit: once is enough (and no warning)

        async def start(self, scheduler) -> None:
            self.scheduler = scheduler

        def add_worker(self, scheduler, worker):
            self._unpin_soon(scheduler, worker)

        def remove_worker(self, scheduler, worker, **kwargs):
            self._unpin_soon(scheduler, worker)

        def log_event(self, topic, msg):
            if (
                isinstance(msg, dict)
                and msg.get("action") == "worker-status-change"
                and msg.get("status") == "running"
            ):
                self._unpin_soon(self.scheduler, topic)

        @staticmethod
        def _unpin_soon(scheduler, worker) -> None:
            # After the scheduler's own handling of the event, which adds the worker to the
            # running ones (the status-change event is logged before that).
            asyncio.get_running_loop().call_soon(LooseRestrictions._unpin, scheduler, worker)

        @staticmethod
        def _unpin(scheduler, worker) -> None:
            if not scheduler.running:
                return
            stuck = []
            for ts in scheduler.unrunnable:
                gone = (
                    ts.worker_restrictions and not ts.worker_restrictions & scheduler.workers.keys()
                )
                if ts.prefix.name == "pick_up" and gone:  # ``_pick_up``'s key prefix
                    ts.loose_restrictions = True
                valid = scheduler.valid_workers(ts)
                if ts.loose_restrictions and valid is not None and not valid:
                    stuck.append(ts.key)
            if stuck:
                scheduler.transitions(
                    dict.fromkeys(stuck, "processing"), stimulus_id=f"dasknmf-unpin-{worker}"
                )

    return LooseRestrictions()


def _pause_memory_manager(client) -> bool:
    """Stop the scheduler's Active Memory Manager while dasknmf fits; True when it was running.

    dasknmf places each task with its data and chains tasks along rows and columns. The AMM's
    ReduceReplicas drops the extra copies of a value that two workers hold — and the copy it
    drops may be the producer's, whose later tasks in a chain (not yet running, so not counted
    as needing it) then fetch it back: on a 2-D fit with extrapolation every pushed H block
    crossed twice, 2.2× the bytes between workers of the cost model (measured in
    ``bench_scale.py --two-d``; with the AMM stopped, the model's). ``FutureOps.close`` starts it
    again."""
    try:
        if not client.amm.running():
            return False
        client.amm.stop()
    except Exception as error:  # an older or a remote scheduler without it
        logger.info("Could not stop the Active Memory Manager: %s", error)
        return False
    return True


#: Per scheduler (its id: a new scheduler at the address of an old one has been told nothing),
#: the task prefixes it has been told never to steal (``_steal_none_of``): a round trip per
#: name and scheduler, not per fit.
_NEVER_STOLEN: dict[str, set[str] | None] = {}


def _steal_none_of(names: list[str], dask_scheduler=None) -> None:
    """On the scheduler: work stealing passes over the tasks named ``names`` (the prefixes
    it takes for tasks too short to move). dasknmf places a task with its block of X, its
    band's W and the sums it continues; stolen by an idle worker, it takes them along — on a
    2-D fit, 1.3× the bytes of the cost model with stealing on (``bench_scale.py --two-d``)."""
    from distributed import stealing

    stealing.fast_tasks.update(names)


#: ``FutureOps.map`` submits more tasks than this as one graph (building it costs the driver
#: more than a few submissions).
ONE_GRAPH_ABOVE = 64


class FutureOps:
    """Submit tasks to a distributed Client at once, as futures.

    Used to fit on a distributed cluster: the work of an iteration starts while the driver is
    still submitting it, and nothing is spent building and optimizing ``dask.delayed`` graphs
    (22 ms of driver CPU per iteration, a third of a core on a 2-core machine). Panels of X are
    futures (cached) or ``StreamedPanel``s (read by the task that uses them).
    """

    is_lazy = True
    is_async = True

    def __init__(self, client):
        self.client = client
        check_workers_code(client)
        try:
            client.register_plugin(_loose_restrictions_plugin(), name="dasknmf-loose-restrictions")
        except Exception as error:  # e.g. a remote scheduler without dasknmf installed
            logger.warning("Could not register dasknmf's scheduler plugin: %s", error)
        _malloc.tune_workers(client)
        self._amm_paused = _pause_memory_manager(client)
        # The prefixes this scheduler already never steals (once told, it keeps them); None:
        # it cannot be told.
        self._scheduler = scheduler_id(client)
        self._pinned = _NEVER_STOLEN.setdefault(self._scheduler, set())
        self._holders = Holders(client)  # of the factors last detached

    def map(self, fn: Callable, items: Sequence[tuple], *common: Any, workers=None) -> list:
        """One task per item; ``workers[i]``, if given, is where item i's task should run.
        Submitted as one graph: a submission per task costs the scheduler a message each,
        and thousands of them (a pass over 10,000 panels) kept its event loop so busy that the
        client's connection timed out."""
        if workers is not None:
            self.never_steal(fn)
        if len(items) > ONE_GRAPH_ABOVE:
            tasks = DaskOps().map(fn, items, *common, workers=workers)
            return self.client.compute(tasks, optimize_graph=False)
        if workers is None:
            return [self.client.submit(fn, *common, *item, pure=False) for item in items]
        return [
            self.client.submit(
                fn, *common, *item, pure=False, workers=[worker], allow_other_workers=True
            )
            for item, worker in zip(items, workers, strict=True)
        ]

    def call(self, fn: Callable, *args: Any):
        return self.client.submit(fn, *args, pure=False)

    def item(self, obj, index: int):
        return self.client.submit(operator.getitem, obj, index, pure=False)

    def share(self, value):
        # A task that returns the value, rather than scattered data: a task has lineage, so the
        # scheduler makes the value again if its worker dies (scattered data would be lost for
        # good, and a broadcast scatter waits on every worker the scheduler knows of, even one
        # that is dying).
        return self.client.submit(_the, value, pure=False)

    def persist(self, *objs):
        return objs

    def fetch(self, obj):
        return self._holders.fetch(obj)

    def forget_detached(self) -> None:
        """The fit starts again (after a loss): the factors detached before are not its own."""
        self._holders.on = frozenset()

    def detach(self, futures: list) -> list:
        """The values of ``futures`` as new futures without lineage, on the same workers.

        The scheduler keeps the tasks a result was made from (released, not forgotten) as long
        as the result is held, so that it can make it again: a fit, each iteration made from the
        previous one, would make it keep every task of every iteration. A detached value was
        put aside on its worker (``_park``) and taken back by a task with no inputs
        (``_pick_up``): nothing before it is kept. It cannot be made again either: if its
        worker dies, ``_pick_up`` fails with ``StateLostError`` and the fit starts again from
        its checkpoint or its initialization, as after any loss of its factors.
        """
        from distributed import wait

        tokens = [uuid.uuid4().hex for _ in futures]
        parked = [
            self.client.submit(_park, token, future, pure=False)
            for token, future in zip(tokens, futures, strict=True)
        ]
        wait(parked)
        for future in parked:
            if future.status == "error":
                future.result()  # the error of the value's own task
        holders = self.client.who_has(parked)
        self._holders.on = frozenset(w for f in parked for w in holders[f.key])
        # A task with no inputs is the first that work stealing moves to an idle worker, where
        # the value is not: it would fail as if the value's worker had died.
        self.never_steal(_pick_up)
        return [
            self.client.submit(
                _pick_up,
                token,
                pure=False,
                workers=sorted(holders[f.key])[:1] or None,
                # Strictly there, even while its worker is paused; if that worker leaves,
                # ``LooseRestrictions`` lets it run elsewhere and fail (StateLostError).
                allow_other_workers=False,
            )
            for token, f in zip(tokens, parked, strict=True)
        ]

    def never_steal(self, fn: Callable) -> None:
        """Tell the scheduler never to steal the tasks of ``fn``, which run where their data
        is (``_steal_none_of``)."""
        name = dask.utils.key_split(dask.utils.funcname(fn))  # the prefix of its tasks' keys
        if self._pinned is None or name in self._pinned:
            return
        try:
            self.client.run_on_scheduler(_steal_none_of, [name])
        except Exception as error:  # e.g. a remote scheduler without dasknmf installed
            logger.info("Could not keep the scheduler from stealing placed tasks: %s", error)
            _NEVER_STOLEN[self._scheduler] = self._pinned = None
            return
        self._pinned.add(name)

    def close(self) -> None:
        if self._amm_paused:
            with contextlib.suppress(Exception):  # the cluster may be gone already
                self.client.amm.start()


@contextlib.contextmanager
def closed_on_error(ops):
    """Close ``ops`` if the block raises: a ``FutureOps`` stopped the cluster's Active Memory
    Manager, which must run again when the fit fails before its ops are handed over."""
    try:
        yield ops
    except BaseException:
        ops.close()
        raise


def tree_reduce(
    ops,
    items: list,
    combine: Callable = sum_in_order,
    first: Callable | None = None,
    split_every: int | None = None,
):
    """Combine ``items`` by a tree of fixed shape and order (groups of ``split_every``).

    ``first``, when given, combines the leaves instead of ``combine`` — it can pick the fields
    to sum out of a task's tuple of outputs, which saves one ``getitem`` task per field.
    """
    if split_every is None:
        split_every = int(dask.config.get("dasknmf.split-every"))
    split_every = max(2, split_every)
    level = first or combine
    if first is None and len(items) == 1:
        return items[0]
    while True:
        items = [
            ops.call(level, *items[start : start + split_every])
            for start in range(0, len(items), split_every)
        ]
        level = combine
        if len(items) == 1:
            return items[0]


def reduce_to_fanin(ops, items: list, first: Callable, split_every: int | None = None):
    """Reduce ``items`` by a fixed-order tree until at most ``split_every`` remain, so that the
    consumer can run the last level itself. Returns ``(items, raw)``: ``raw`` is True when no
    level ran (the items are the original ones, not sums made by ``first``)."""
    if split_every is None:
        split_every = int(dask.config.get("dasknmf.split-every"))
    split_every = max(2, split_every)
    if len(items) <= split_every:
        return items, True
    level = first
    while len(items) > split_every:
        items = [
            ops.call(level, *items[start : start + split_every])
            for start in range(0, len(items), split_every)
        ]
        level = sum_in_order
    return items, False


def shard_level(n_leaves: int, n_shards: int, split_every: int) -> int:
    """The level of the fixed-order tree over ``n_leaves`` (groups of ``split_every``) whose
    subtrees make up shards: the deepest with at least ``SUBTREES_PER_SHARD`` nodes per shard,
    so that shards of whole subtrees can be balanced within about 1/SUBTREES_PER_SHARD."""
    level = 0
    wanted = max(2, SUBTREES_PER_SHARD * n_shards)
    while math.ceil(n_leaves / split_every ** (level + 1)) >= wanted:
        level += 1
    return level


#: Subtrees (at least) per shard, for balance; a shard returns as many nodes of the tree.
SUBTREES_PER_SHARD = 4


def continue_tree(
    ops, containers: list, counts: list[int], block: int | None, split_every: int, root=False
):
    """Continue the fixed-order tree from the nodes that shards returned (``counts[c]`` nodes
    in ``containers[c]``, together the nodes of one level, in order), with the same groups as
    ``tree_reduce`` over all leaves: levels run until at most ``split_every`` nodes remain
    (``root``: one). Returns ``(containers, picks)`` for ``steps.picked``: the consumer sums
    the picked nodes itself (``steps.h_step``, ``steps.combine_picked``)."""
    split_every = max(2, split_every)
    picks = [(c, i) for c, count in enumerate(counts) for i in range(count)]
    limit = 1 if root else split_every
    while len(picks) > limit:
        sums = []
        for start in range(0, len(picks), split_every):
            group = picks[start : start + split_every]
            used = sorted({c for c, _ in group})
            where = {c: n for n, c in enumerate(used)}
            local = tuple((where[c], i) for c, i in group)
            sums.append(ops.call(combine_picked, block, local, *(containers[c] for c in used)))
        containers, picks, block = sums, [(c, None) for c in range(len(sums))], None
    used = sorted({c for c, _ in picks})
    where = {c: n for n, c in enumerate(used)}
    return [containers[c] for c in used], tuple((where[c], i) for c, i in picks)
