"""How X and its factors are cut, as functions of sizes alone: row panels of whole storage
chunks up to a byte budget, the layout (row panels of X or of Xᵀ, or 2-D blocks), column
blocks of H, shards of panels for the threads, and groups of tiny panels updated at once.
Nothing here touches data or a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dasknmf._config import get_bytes
from dasknmf.ops import shard_level


def even_bounds(n: int, n_parts: int) -> list[int]:
    """Boundaries of ``n_parts`` near-equal consecutive ranges of ``range(n)``."""
    n_parts = max(1, min(n_parts, n))
    return [part * n // n_parts for part in range(n_parts + 1)]


def coalesce_bounds(chunks: Sequence[int], chunk_nbytes: Sequence[float], budget: int) -> list[int]:
    """Group consecutive chunks into panels of at most ``budget`` bytes (at least one chunk each);
    return the row boundaries. Chunks are never split, so panels stay aligned to storage."""
    bounds = [0]
    size = 0.0
    end = 0
    for rows, nbytes in zip(chunks, chunk_nbytes, strict=True):
        if size and size + nbytes > budget:
            bounds.append(end)
            size = 0.0
        end += rows
        size += nbytes
    bounds.append(end)
    return bounds


def nearest_cuts(sizes: Sequence[float], n_parts: int) -> list[int]:
    """Indices cutting consecutive items of ``sizes`` into ``n_parts`` runs (at most one per
    item) as near equal as whole items allow: each cut at the boundary nearest its share."""
    n_parts = max(1, min(n_parts, len(sizes)))
    before = np.cumsum([0.0, *sizes])
    cuts = [0]
    for part in range(1, n_parts):
        share = before[-1] * part / n_parts
        at = int(np.searchsorted(before, share))
        if at > 0 and share - before[at - 1] <= before[min(at, len(sizes))] - share:
            at -= 1
        cuts.append(min(max(at, cuts[-1] + 1), len(sizes) - (n_parts - part)))
    return [*cuts, len(sizes)]


def choose_layout(shape, n_components: int, itemsize: int, budget: int, layout="auto") -> str:
    """How to cut X: "rows" (row panels), "columns" (row panels of Xᵀ) or "blocks" (2-D).

    'auto': row panels when a task on a one-row panel — the row, H and the k×n partials —
    fits ``budget``; else row panels of Xᵀ when a one-column task is smaller and fits; else
    2-D blocks (``dasknmf.blocks``), whose tasks hold a block of each factor only."""
    if layout != "auto":
        return layout
    n_rows, n_cols = shape
    per_row_task = (3 * n_components + 1) * n_cols * itemsize
    per_column_task = (3 * n_components + 1) * n_rows * itemsize
    if per_row_task <= budget:
        return "rows"
    if per_column_task < per_row_task and per_column_task <= budget:
        return "columns"
    return "blocks"


def column_bounds(n_features: int, n_components: int, itemsize: int) -> list[int]:
    """Column blocks of H (and of the A partials) of at most ``dasknmf.h-block-bytes``."""
    budget = get_bytes("dasknmf.h-block-bytes")
    n_blocks = math.ceil(n_components * n_features * itemsize / budget)
    return even_bounds(n_features, n_blocks)


def shard_layout(row_sizes: Sequence[int], n_slots: int, split_every: int, group: int = 0):
    """Shards for ``n_slots`` tasks at once: ``(level, bounds)``, the panels cut at multiples
    of split_every**level (``ops.shard_level``, and at least ``group``: a shard holds whole
    groups) into at most ``n_slots`` runs, each cut at the boundary nearest its share of the
    rows (``nearest_cuts``). The bounds are panel indices."""
    n_panels = len(row_sizes)
    level = max(group, shard_level(n_panels, n_slots, split_every))
    size = split_every**level
    subtree_rows = [sum(row_sizes[g : g + size]) for g in range(0, n_panels, size)]
    cuts = nearest_cuts(subtree_rows, n_slots)
    return level, [min(cut * size, n_panels) for cut in cuts]


#: Groups of panels (``group_level``) are made only while at least this many remain, so that
#: shards of whole groups still spread over many workers.
MIN_GROUPS = 16


def group_level(row_sizes: Sequence[int], row_nbytes: int, split_every: int) -> int:
    """The level g of the reduction tree whose subtrees — aligned runs of split_every**g
    consecutive panels — a task updates at once, as one stacked panel: the deepest whose runs
    hold at most ``dasknmf.group-bytes`` (dense bytes) and that leaves ``MIN_GROUPS`` of them;
    0 (each panel alone) for panels of ordinary size. Fixed by the panels alone, so the
    factors are the same bits in memory and on any number of workers."""
    budget = get_bytes("dasknmf.group-bytes")
    largest = max(row_sizes, default=0) * row_nbytes
    level = 0
    while (
        split_every ** (level + 1) * largest <= budget
        and math.ceil(len(row_sizes) / split_every ** (level + 1)) >= MIN_GROUPS
    ):
        level += 1
    return level
