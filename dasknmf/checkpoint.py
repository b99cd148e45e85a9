"""Checkpoints of a running fit, written atomically every N iterations and read to resume.

A checkpoint is a folder. Each save writes a complete generation ``iter-NNNNNNNN/`` — the blocks
of Wᵀ and H as they are in the fit (one Zarr array per block, written by the task holding it,
so W never passes through this process; for a fit with extrapolation also the plain blocks of
Wᵀ, the previous blocks of H and, when older than the iteration, the factors of its best
iterate, ``wtb-*`` and ``hb-*``), and ``state.json`` with the iteration, the history, the
state of the shuffling generator (and of the extrapolation) and the fingerprint of the
settings and the input — under a temporary name, and renames it into place when complete. A
rename within a folder is atomic, so every ``iter-*`` generation is whole; older ones are
removed after the new one is in place, and the newest is the checkpoint. A process killed at
any moment leaves either the previous checkpoint or the new one.

Resuming reads the newest generation into the same panel layout and continues the loop from
the next iteration: the factors are bit-identical to those of an uninterrupted run.
The folder must be reachable at the same path from the workers (a shared file system), as
Zarr inputs are, or be an object-store URL. An object store has no rename: there a generation
is written under its final name and counts once its ``state.json``, written last, is there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from dasknmf import storage
from dasknmf.shards import shard_blocks
from dasknmf.solvers import extrapolation
from dasknmf.steps import control_of, h_array
from dasknmf.storage import CorruptStoreError, Location

logger = logging.getLogger(__name__)

#: Version of the checkpoint layout.
FORMAT = 1
_GENERATION = re.compile(r"^iter-(\d{8})$")


class CheckpointError(ValueError):
    """No usable checkpoint: none there, or written for other settings or another input."""


@dataclass
class State:
    """What a checkpoint holds, the factors as ``ops`` objects of the resumed fit."""

    n_iter: int
    history: dict
    shuffle_state: tuple | None
    wt: list
    h: list
    momentum: tuple | None = None  # of an extrapolated fit (see ``engine.iterate``)
    # its best iterate when older than n_iter: (iteration, Wᵀ blocks, H blocks) (``history.Best``)
    best: tuple | None = None


def _write_block(where: Location, block) -> int:
    """Write one factor block to its own Zarr array (runs where the block is), its one chunk
    stored even if it holds only zeros."""
    array = np.ascontiguousarray(h_array(block))
    zarr.create_array(
        where.store(),
        data=array,
        chunks=array.shape,
        overwrite=True,
        compressors=storage.compressors(),
        config=storage.complete_chunks_config(),
        attributes={storage.CHUNKS_ATTRIBUTE: 1},
    )
    return array.size


def _read_block(where: Location) -> np.ndarray:
    array = zarr.open_array(where.store(read_only=True), mode="r")
    missing = storage.missing_chunks(array, tuple(slice(None) for _ in array.shape))
    if missing:
        raise CorruptStoreError(f"Checkpoint block {where} lost its stored chunk {missing[0]}.")
    return np.ascontiguousarray(array[...])


def _read_factors(panels, folder: Location, names, n_wt: int, n_h: int) -> tuple[list, list]:
    """Blocks of Wᵀ and H named ``names[0]-i`` and ``names[1]-j`` in ``folder``, read by tasks
    (those of Wᵀ placed with their panels) and persisted."""
    w_name, h_name = names
    wt = panels.map(_read_block, [(folder.child(f"{w_name}-{i}"),) for i in range(n_wt)])
    h = panels.ops.map(_read_block, [(folder.child(f"{h_name}-{j}"),) for j in range(n_h)])
    wt, h = panels.ops.persist(wt, h)
    return list(wt), list(h)


def _write_shard(folder: Location, name: str, first: int, plain: bool, state) -> int:
    """Write the blocks of Wᵀ of a shard (see ``steps.shard_blocks``), numbered by panel."""
    blocks = shard_blocks(state, plain)
    return sum(_write_block(folder.child(f"{name}-{first + i}"), b) for i, b in enumerate(blocks))


def _write_factors(panels, folder: Location, names, wt: list, h: list, plain=False) -> list:
    """Tasks writing the blocks of Wᵀ (from the shards' states, each where it is) and of H
    (see ``_read_factors``)."""
    w_name, h_name = names
    ranges = zip(wt, panels.shard_ranges, strict=True)
    shards = [(folder, w_name, a, plain, state) for state, (a, _) in ranges]
    return panels.shard_map(_write_shard, shards, data=False) + panels.ops.map(
        _write_block, [(folder.child(f"{h_name}-{j}"), b) for j, b in enumerate(h)]
    )


def _rng_state_to_json(state) -> list | None:
    if state is None:
        return None
    name, keys, pos, has_gauss, cached = state
    return [name, [int(v) for v in keys], int(pos), int(has_gauss), float(cached)]


def _rng_state_from_json(value) -> tuple | None:
    if value is None:
        return None
    name, keys, pos, has_gauss, cached = value
    return (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)


def _fsync_dir(where: Location) -> None:
    if where.remote:
        return
    path = where.path
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def fingerprint(plan, parts, stats, objective, col_bounds, layout: str | None = None) -> dict:
    """What the iterates of a fit (a ``pipeline.Plan`` on ``parts``, its panels or 2-D blocks)
    depend on, for checking that a checkpoint fits: the update rule, the initialization, the
    layout and the input (its statistics from the validation pass stand for its contents).
    ``layout``: a scheme other than row panels (whose checkpoints carry no such entry)."""
    seed = plan.random_state
    layout_entry = {} if layout is None else {"settings.layout": layout}
    return {
        **layout_entry,
        **{
            f"settings.{key}": value
            for key, value in dataclasses.asdict(objective).items()
            if key != "frozen"  # stacked fits stopped so far: state, kept in the history
        },
        "settings.init": plan.init,
        "settings.random_state": seed
        if seed is None or _is_int(seed)
        else list(seed)
        if isinstance(seed, tuple)
        else type(seed).__name__,
        "settings.shuffle": bool(plan.shuffle),
        "settings.panels": list(map(int, parts.row_bounds)),
        "settings.column_blocks": list(map(int, col_bounds)),
        "input.shape": list(parts.shape),
        "input.dtype": str(parts.dtype),
        "input.sparse": bool(parts.sparse),
        "input.nnz": stats.nnz,
        "input.sum": stats.sum,
        "input.sum_sq": stats.sum_sq,
        "input.min": stats.min,
    }


class Checkpoint:
    """The checkpoint folder ``path`` of a fit with the given ``fingerprint`` (a JSON-able
    dict of everything the iterates depend on: settings, input statistics, panel layout)."""

    def __init__(self, path, every: int, fingerprint: dict[str, Any], storage_options=None):
        self.path = storage.location(path, storage_options)
        self.every = int(every)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back

    # ---- reading ----------------------------------------------------------------------------

    def latest(self) -> Location | None:
        """The newest complete generation (one with its ``state.json``), if any."""
        for name in reversed([n for n in self.path.listdir() if _GENERATION.match(n)]):
            generation = self.path.child(name)
            if generation.child("state.json").exists():
                return generation
        return None

    def require_latest(self) -> Location:
        """The newest complete generation; raises ``CheckpointError`` when there is none."""
        generation = self.latest()
        if generation is None:
            raise CheckpointError(
                f"Cannot resume: no checkpoint in {self.path} (it is written every "
                "checkpoint_every iterations of a fit with checkpoint set)."
            )
        return generation

    def probe(self, client) -> None:
        """Check that the workers of ``client`` share the folder (they write W's blocks there):
        fail now, before the first iteration, rather than at the first checkpoint."""
        self.path.makedirs()
        storage.probe_shared(client, self.path.store(), "", str(self.path))

    def load(self, panels) -> State:
        """Read the newest generation into ``panels``' layout; its blocks are read by tasks,
        those of Wᵀ placed with their panels. Raises ``CheckpointError`` when there is none or when
        it was written for other settings or another input."""
        generation = self.require_latest()
        state = json.loads(generation.child("state.json").read_text())
        if state.get("format") != FORMAT:
            raise CheckpointError(
                f"Cannot resume from {generation}: checkpoint format {state.get('format')!r}, "
                f"this dasknmf reads format {FORMAT}."
            )
        self._check_fingerprint(state["fingerprint"], generation)
        counts = state["n_wt"], state["n_h"]
        momentum = None
        if state.get("control") is not None:
            wt_plain, h_previous = _read_factors(panels, generation, ("wtp", "hp"), *counts)
            momentum = (wt_plain, h_previous, extrapolation.Control(**state["control"]))
        best = None
        if state.get("best") is not None:
            best = (int(state["best"]), *_read_factors(panels, generation, ("wtb", "hb"), *counts))
        wt, h = _read_factors(panels, generation, ("wt", "h"), *counts)
        logger.info("Resuming from %s (iteration %d)", generation, state["n_iter"])
        return State(
            n_iter=int(state["n_iter"]),
            history=state["history"],
            shuffle_state=_rng_state_from_json(state["shuffle_state"]),
            wt=list(wt),
            h=list(h),
            momentum=momentum,
            best=best,
        )

    def _check_fingerprint(self, stored: dict, generation: Location) -> None:
        mine = self.fingerprint
        if stored == mine:
            return
        differ = sorted(
            key for key in stored.keys() | mine.keys() if stored.get(key) != mine.get(key)
        )
        kind = "other settings"
        if all(key.startswith("input.") for key in differ):
            kind = "another input"
        details = "; ".join(
            f"{key}: checkpoint {stored.get(key)!r}, now {mine.get(key)!r}" for key in differ
        )
        raise CheckpointError(
            f"Cannot resume from {generation}: it was written for {kind} ({details})."
        )

    # ---- writing ----------------------------------------------------------------------------

    def due(self, n_iter: int) -> bool:
        return n_iter % self.every == 0

    def save(
        self,
        panels,
        n_iter: int,
        wt: list,
        h: list,
        history,
        shuffle_state,
        momentum=None,
        best=None,
    ):
        """Write the factors after iteration ``n_iter`` (W as the shards' states, H's blocks as
        ``panels.ops`` holds them) and, for an extrapolated fit, its ``momentum`` and its
        ``best`` iterate when that is older, (iteration, W's states, H's blocks), as a new
        generation, atomically."""
        ops = panels.ops
        self.path.makedirs()
        name = f"iter-{n_iter:08d}"
        final = self.path.child(name)
        if self.path.remote:  # no rename: write in place, state.json last marks it complete
            if final.child("state.json").exists():
                return
            final.remove()
            tmp = final
        else:
            tmp = self.path.child(f".{name}.partial-{uuid.uuid4().hex[:8]}")
            tmp.makedirs()
        try:
            written = _write_factors(panels, tmp, ("wt", "h"), wt, h)
            control = None
            if momentum is not None:
                wt_plain, h_previous, control = momentum
                written += _write_factors(
                    panels, tmp, ("wtp", "hp"), wt_plain, h_previous, plain=True
                )
                control = control_of(ops.fetch(control)).as_dict()
            if best is not None:
                written += _write_factors(panels, tmp, ("wtb", "hb"), *best[1:])
            ops.fetch(written)
            state = {
                "format": FORMAT,
                "n_iter": int(n_iter),
                "n_wt": len(panels.items),
                "n_h": len(h),
                "history": history.as_dict(),
                "shuffle_state": _rng_state_to_json(shuffle_state),
                "control": control,
                "best": None if best is None else int(best[0]),
                "fingerprint": self.fingerprint,
            }
            tmp.child("state.json").write_text(json.dumps(state))
            if tmp != final and not final.exists():  # else the same iteration is there, whole
                os.rename(tmp.path, final.path)
            _fsync_dir(self.path)
        finally:
            if tmp != final and tmp.exists():
                tmp.remove()
        for old in self.path.listdir():
            if old != name and (_GENERATION.match(old) or ".partial-" in old):
                self.path.child(old).remove()
        logger.info("Checkpoint: iteration %d written to %s", n_iter, final)
