"""Factors put aside on workers without lineage, and fetches that fail when they are lost.

``FutureOps.detach`` puts a value aside on its worker (``_park``) and takes it back with a task
that has no inputs (``_pick_up``), so that the scheduler keeps no task of the iterations that
made it. Such a value cannot be made again: when its worker dies, ``_pick_up`` fails with
``StateLostError`` and the fit starts again. ``Holders`` remembers the workers that hold the
values last detached, and fetches results so that such a loss always comes back as
``StateLostError`` — left to the scheduler it did not (``Holders.fetch``).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import TimeoutError as _Pending
from typing import Any

from dasknmf._workers_code import workers_now

#: Seconds between a waiting fetch's checks for lost detached factors (``Holders.fetch``).
LOSS_CHECK_EVERY = 1.0


class StateLostError(RuntimeError):
    """A value put aside on a worker (``FutureOps.detach``) is gone with its worker."""


#: Values put aside by ``_park`` in this (worker) process, until ``_pick_up`` takes them.
_PARKED: dict[str, Any] = {}


def _park(token: str, value) -> None:
    _PARKED[token] = value


def _pick_up(token: str):
    try:
        return _PARKED.pop(token)
    except KeyError:
        raise StateLostError(
            f"A factor block put aside on a worker ({token}) is gone; its worker was lost."
        ) from None


class Holders:
    """The workers that hold the factors last detached, and fetches that watch them."""

    def __init__(self, client):
        self.client = client
        self.on: frozenset[str] = frozenset()

    def fetch(self, obj):
        """The values of the futures in ``obj``; ``StateLostError`` as soon as a worker that
        holds detached factors has left the cluster with results that must be made again.

        The values made since the detach cannot be made again (``_pick_up`` ran once), and
        left to the scheduler their loss did not always come back as an error: ``_pick_up``
        failed, and in the cascade of errors over the released tasks between it and the
        awaited one, distributed (2026.8) set one of them waiting again on its erred input.
        Seen three ways: the awaited result never came; it erred without an exception (the
        gather failed with an ``AttributeError``); or it finished, was lost, and went back to
        pending while being gathered — each a fetch that hung for ever (a 2-D fit in about half
        the runs of the test that kills a worker). So the fetch first waits, then gathers, each
        in slices of ``LOSS_CHECK_EVERY``, asking the scheduler after each slice. A worker
        retired gracefully copies its results elsewhere first (``_lost``): the fetch waits on.
        """
        if not self.on:
            return self.client.gather(obj)
        self._wait(obj)
        return self._gather(obj)

    def _wait(self, obj) -> None:
        from distributed import futures_of, wait

        futures = futures_of(obj)
        while True:
            try:
                wait(futures, timeout=LOSS_CHECK_EVERY)
            except TimeoutError:
                self.check()
                continue
            failed = [f._state for f in futures if f.status == "error"]
            if not failed:
                return
            if failed[0].exception is None:  # its failing task released again
                raise StateLostError("A task failed after detached factors were lost.")
            raise failed[0].exception.with_traceback(failed[0].traceback)

    def _gather(self, obj):
        """``client.gather(obj)``, which can hang when a result is lost meanwhile (above): the
        gather runs on the client's event loop, and the driver checks for losses while it
        waits. Not a gather with a timeout, repeated: those cancelled gathers made CPython 3.11
        fail at exit (``SystemError: AST constructor recursion depth mismatch``, from tracebacks
        drawn in two threads at once)."""
        gathering = asyncio.run_coroutine_threadsafe(
            self.client._gather(obj), self.client.loop.asyncio_loop
        )
        while True:
            try:
                return gathering.result(timeout=LOSS_CHECK_EVERY)
            except _Pending:
                pass
            except Exception:
                self.check()  # a lost holder is the cause: say so
                raise
            try:
                self.check()
            except StateLostError:
                gathering.cancel()
                raise

    def check(self) -> None:
        """``StateLostError`` when a holder left without handing its results over."""
        left = self.on - workers_now(self.client).keys()
        gone = sorted(address for address in left if self._lost(address))
        self.on -= left  # retired ones moved their results elsewhere
        if gone:
            self.on = frozenset()  # the fit restarts without them
            raise StateLostError(
                f"The worker(s) {', '.join(gone)} left the cluster with factor blocks "
                "put aside on them; the fit must start again."
            )

    def _lost(self, address: str) -> bool:
        """Whether the worker at ``address`` left without handing its results over: not
        retired (a retirement's 'remove-worker' event is ``expected``, after its results were
        copied elsewhere; 'lost-computed-tasks' does not tell: a killed worker's results that
        nothing needed then are not listed, and are made again later)."""
        try:
            events = self.client.get_events(address)
        except Exception:  # a scheduler that keeps no events: say lost
            return True
        removals = [msg for _, msg in events if msg.get("action") == "remove-worker"]
        return not any(msg.get("expected") for msg in removals)
