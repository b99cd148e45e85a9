"""Fits that go on after the cluster lost data: a worker died with blocks that nothing can
recompute, and the fit starts again from its newest checkpoint or its initialization — which
gives the factors of an undisturbed fit (the iterations are deterministic)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

from dasknmf import engine

logger = logging.getLogger(__name__)

#: Restarts of a fit after a worker loss, before the error is raised.
MAX_RECOVERIES = 3


def recovering(attempt: Callable, restart: Callable, ckpt, report, dying: Callable):
    """``attempt()``, again after each loss of data on the cluster (up to ``MAX_RECOVERIES``
    times): a worker died with blocks of W or H that nothing can recompute (their inputs, the
    previous iteration's blocks, are gone), so ``restart(from_checkpoint)`` sets the fit to
    start again from the newest checkpoint, else from the initialization, and returns the
    iteration it starts from (``report``, if any, is told). Either gives exactly the factors of
    an undisturbed fit. A task that took down worker after worker (``KilledWorker``) would only
    run again: ``dying(error)`` is raised instead."""
    for n_attempt in itertools.count(1):
        try:
            return attempt()
        except engine.KILLED_WORKER as error:
            raise dying(error) from error
        except engine.LOST_DATA as error:
            if n_attempt > MAX_RECOVERIES:
                raise
            from_checkpoint = ckpt is not None and ckpt.latest() is not None
            logger.warning(
                "Data lost on the cluster (%s: %s); restarting the fit from %s",
                type(error).__name__,
                error,
                "the checkpoint" if from_checkpoint else "the initialization",
            )
            n_start = restart(from_checkpoint)
            if report is not None:
                report.restart(n_start)
