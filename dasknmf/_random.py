"""Random numbers keyed by position, so that a block's values do not depend on the blocking.

Rows of an endless (·, width) matrix of N(0, 1) draws come in fixed blocks of ``RANDOM_BLOCK``
rows, block b drawn from ``SeedSequence(entropy, spawn_key=(stream, b))``; a panel draws the
blocks it overlaps and keeps its rows.
"""

from __future__ import annotations

import functools
import numbers

import numpy as np

RANDOM_BLOCK = 4096


def seed_entropy(random_state) -> int:
    """An integer seed from scikit-learn's ``random_state`` (None, int or RandomState)."""
    if random_state is None:
        return int(np.random.SeedSequence().entropy)
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(np.iinfo(np.int32).max))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(np.iinfo(np.int64).max))
    raise ValueError(f"{random_state!r} cannot be used to seed a numpy.random.RandomState instance")


def normal_rows(entropy: int, stream: int, start: int, stop: int, width: int) -> np.ndarray:
    """Rows ``start:stop`` of the endless (·, width) matrix of N(0, 1) draws of ``stream``
    (read-only: it may be a view of a block kept for the next panels)."""
    parts = []
    for block in range(start // RANDOM_BLOCK, (stop - 1) // RANDOM_BLOCK + 1):
        values = _drawn_block(entropy, stream, block, width)
        first = max(start - block * RANDOM_BLOCK, 0)
        last = min(stop - block * RANDOM_BLOCK, RANDOM_BLOCK)
        parts.append(values[first:last])
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


#: The last blocks drawn are kept (up to this many bytes each) for the next panels: panels of a
#: few rows would otherwise draw a whole block each (10,000 panels of 4 rows: 20 s of drawing).
KEPT_BLOCK_BYTES = 4 * 2**20


def _drawn_block(entropy: int, stream: int, block: int, width: int) -> np.ndarray:
    if RANDOM_BLOCK * width * 8 > KEPT_BLOCK_BYTES:
        return _draw_block(entropy, stream, block, width)
    return _kept_block(entropy, stream, block, width)


def _draw_block(entropy: int, stream: int, block: int, width: int) -> np.ndarray:
    seed = np.random.SeedSequence(entropy, spawn_key=(stream, block))
    values = np.random.default_rng(seed).standard_normal((RANDOM_BLOCK, width))
    values.flags.writeable = False
    return values


_kept_block = functools.lru_cache(maxsize=4)(_draw_block)
