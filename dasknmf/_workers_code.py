"""The workers of a cluster: which there are now (``workers_now``), and whether they run this
dasknmf — tasks are dasknmf's functions, which each worker imports from its own copy
(``check_workers_code``)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from dasknmf import _version


def workers_now(client) -> dict:
    """The scheduler's workers now, ``{address: info}``, asked of the scheduler itself.

    Not ``client.scheduler_info(n_workers=-1)["workers"]``: that returns the client's shared
    copy of the scheduler's identity, which the client's periodic refresh (every
    ``distributed.client.scheduler-info-interval``, with no workers listed) can overwrite
    between the query and the read — an empty view in 290 of 22,127 calls with a 10 ms
    interval. A fit that watched its workers through it saw them all gone: on the 8 GB
    benchmark store a fit restarted from its initialization."""
    return dict(_identity(client, n_workers=-1)["workers"])


def scheduler_id(client) -> str:
    """The scheduler's id (a restarted scheduler at the same address has another)."""
    return str(_identity(client, n_workers=0)["id"])


def _identity(client, n_workers: int) -> dict:
    """The scheduler's identity (its id, and ``n_workers`` of its workers; -1: all), asked of
    the scheduler itself (see ``workers_now``)."""
    return client.sync(client.scheduler.identity, n_workers=n_workers)


class WorkerCodeError(ValueError):
    """The workers run another dasknmf than this process (or none)."""


@functools.cache
def code_digest() -> str:
    """This dasknmf: its version and a digest of its source files."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{_version.__version__} ({digest.hexdigest()[:12]})"


#: How each refusal ends.
_INSTALL = (
    "Install the same dasknmf on the workers (tasks are dasknmf's functions, imported there)."
)

#: Per scheduler (its id, as ``ops._NEVER_STOLEN``: a restarted scheduler at the same address
#: whose workers come back at the old addresses has checked none of them), the workers whose
#: dasknmf was found to be this one.
_SAME_CODE: dict[str, set[str]] = {}


def check_workers_code(client) -> None:
    """Raise ``WorkerCodeError`` unless every worker imports the dasknmf this process runs.
    Tasks name dasknmf's functions, which a worker takes from its own copy: with a missing or
    another one, the first task it was sent failed in its connection to the scheduler, the
    worker left, and the fit waited for ever (seen with an older checkout on the workers'
    path). Each worker is asked once per scheduler; workers that join later are not."""
    identity = _identity(client, n_workers=-1)
    known = _SAME_CODE.setdefault(identity["id"], set())
    workers = set(identity["workers"])
    if workers <= known:
        return
    mine = code_digest()
    found = client.run(code_digest, workers=sorted(workers - known), on_error="return")
    failed = {worker: error for worker, error in found.items() if _cannot_import(error)}
    if failed:  # no dasknmf there, or one without ``code_digest``
        listed = "; ".join(f"{worker}: {error!r}" for worker, error in sorted(failed.items()))
        raise WorkerCodeError(
            f"Workers cannot import this process's dasknmf {mine}: {listed}. {_INSTALL}"
        )
    found = {worker: code for worker, code in found.items() if isinstance(code, str)}
    other = {worker: code for worker, code in found.items() if code != mine}
    if other:
        listed = "; ".join(f"{worker}: {code}" for worker, code in sorted(other.items()))
        raise WorkerCodeError(
            f"Workers run another dasknmf than this process ({mine}): {listed}. {_INSTALL}"
        )
    known.update(found)


def _cannot_import(error) -> bool:
    """Whether ``client.run``'s result for a worker says it could not import the function
    (distributed sends a worker's error that fails to pickle as ``Exception(repr(error))``).
    Other errors (a worker leaving meanwhile) leave that worker unchecked."""
    if isinstance(error, (ImportError, AttributeError)):
        return True
    text = str(error.args[0]) if isinstance(error, Exception) and error.args else ""
    return text.startswith(("AttributeError(", "ImportError(", "ModuleNotFoundError("))
