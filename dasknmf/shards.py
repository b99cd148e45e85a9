"""Shards: runs of consecutive row panels that one task handles per iteration, and the pieces
of the fixed-order reduction tree that cross them.

The partial sums of the H update (and of the other passes) are summed by a tree of fixed
shape over the panels: groups of ``split_every`` consecutive leaves, then groups of those
sums, and so on. A shard that starts at a multiple of split_every**L panels holds whole
subtrees of level L; it sums them itself (``Subtrees``) and returns their roots, the nodes of
level L. The levels above run as tasks over the shards' nodes (``ops.continue_tree``, with
``picked`` and ``combine_picked``). Every sum is then the one a tree over all panels forms,
wherever and in however many shards the panels ran: the factors are the same bits for any
number of workers and in memory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from dask.sizeof import sizeof


class ShardOut(NamedTuple):
    """What a ``shard_step`` returns: the new blocks of Wᵀ of its panels, the nodes of the
    reduction tree of the H partials that its panels make (see ``Subtrees``) and, with
    extrapolation, the plain blocks of Wᵀ. With ``sizes``, the shard's panels were updated in
    stacked groups (``groups``) and ``wt`` and ``plain`` hold a block per group, as the next
    iteration takes them; ``sizes`` holds each group's panels' numbers of rows. ``h``: the H
    update of the iteration before, when the task ran it (``fold.folded_shard_step``)."""

    wt: tuple
    nodes: tuple
    plain: tuple | None = None
    sizes: tuple | None = None
    h: tuple | None = None


def shard_blocks(state, plain: bool = False) -> tuple:
    """The blocks of Wᵀ of a shard's panels, held as a tuple (from the initialization or a
    checkpoint) or as the ``ShardOut`` of the iteration that made them (its plain blocks if
    ``plain``); a group's block cut into its panels' (views)."""
    if not isinstance(state, ShardOut):
        return state
    blocks = state.plain if plain else state.wt
    if state.sizes is None:
        return blocks
    pieces = zip(blocks, state.sizes, strict=True)
    return tuple(b for block, sizes in pieces for b in split_columns(block, sizes))


def group_blocks(tree: tuple, state, plain: bool = False) -> Sequence:
    """The blocks of Wᵀ of a shard's groups of stacked panels (``groups``), one per group:
    as the ``ShardOut`` of the last iteration holds them, or stacked from the panels'."""
    if isinstance(state, ShardOut) and state.sizes is not None:
        return state.plain if plain else state.wt
    return [stacked_columns(run) for (run,) in groups(tree, shard_blocks(state, plain))]


def group_sizes(tree: tuple, sizes: list) -> tuple | None:
    """``ShardOut.sizes`` for a shard's groups of panels of ``sizes`` rows each (None when
    each group is one panel: its blocks are then the panels')."""
    return None if tree[2] == 0 else tuple(sizes)


def resumable(state):
    """What the next iteration needs of a shard's state: its nodes (and H) dropped."""
    return state._replace(nodes=(), h=None) if isinstance(state, ShardOut) else state


def shard_panels(data: tuple) -> tuple:
    """The panels of a shard: passed one by one, or as one tuple (``StreamedPanel``s, shared
    once; a ``PanelBundle`` of cached panels)."""
    return data[0] if len(data) == 1 and isinstance(data[0], tuple) else data


class ShardStates(list):
    """Blocks of Wᵀ made as one state per shard (a tuple of its panels' blocks) rather than
    one per panel: ``Panels.bundle`` passes them on as they are."""


class PanelBundle(tuple):
    """A shard's cached panels as one value on its worker (``bundled``), so that its task names
    one input per iteration rather than one per panel. The panels stay held under their own
    keys: dask counts a bundle's size as the tuple's alone, not its panels' a second time."""

    __slots__ = ()


def bundled(*panels) -> PanelBundle:
    """The task that bundles a shard's cached panels (``Panels.shard_map``)."""
    return PanelBundle(panels)


@sizeof.register(PanelBundle)
def _sizeof_bundle(bundle: PanelBundle) -> int:
    return sys.getsizeof(bundle)


def groups(tree: tuple, *runs: Sequence):
    """The runs side by side in the groups of panels that a task updates as one
    (``stacked_rows``): consecutive pieces of split_every**group, ``tree`` being ``(level,
    split_every, group)`` (``cuts.group_level``); the last may be shorter."""
    _, split_every, group = tree
    size = split_every**group
    for start in range(0, len(runs[0]), size):
        yield tuple(run[start : start + size] for run in runs)


def stacked_rows(panels: Sequence):
    """Consecutive row panels as one (the panel itself when alone)."""
    if len(panels) == 1:
        return panels[0]
    if sp.issparse(panels[0]):
        return sp.vstack(panels, format="csr")
    return np.concatenate(panels, axis=0)


def stacked_columns(blocks: Sequence) -> np.ndarray:
    """Blocks of Wᵀ (component-major) of consecutive panels as one (the block when alone)."""
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)


def split_columns(block: np.ndarray, sizes: Sequence[int]) -> tuple:
    """A stacked block of Wᵀ cut back into the panels' blocks of ``sizes`` rows of W."""
    if len(sizes) == 1:
        return (block,)
    ends = np.cumsum(sizes).tolist()
    return tuple(block[:, end - size : end] for end, size in zip(ends, sizes, strict=True))


class Subtrees:
    """Sums of consecutive leaves in groups of ``split_every``, level by level up to ``level``,
    as ``ops.tree_reduce`` forms them, fed one leaf at a time: the nodes at ``level`` of the
    fixed-order tree over a run of leaves that starts at a multiple of split_every**level.
    Holds at most ``level`` partial sums; ``combine`` defaults to ``sum_in_order`` (whose
    running sum gives the same bits as summing a whole group at once)."""

    def __init__(self, level: int, split_every: int, group: int = 0):
        self.level, self.split_every = level, split_every
        self.group = group  # the level of the nodes ``add`` is fed by default (stacked groups)
        self._sums: list = [None] * level  # (count, running sum) per level below ``level``
        self.nodes: list = []

    def add(self, node, at: int | None = None) -> None:
        at = self.group if at is None else at
        while at < self.level:
            count, total = self._sums[at] or (0, None)
            total = _copy(node) if total is None else _add_to(total, node)
            if count + 1 < self.split_every:
                self._sums[at] = (count + 1, total)
                return
            self._sums[at] = None
            node, at = total, at + 1
        self.nodes.append(node)

    def finish(self) -> tuple:
        for at in range(self.level):
            if self._sums[at] is not None:
                total = self._sums[at][1]
                self._sums[at] = None
                self.add(total, at + 1)
        return tuple(self.nodes)


def _copy(node):
    return tuple(_copy(f) for f in node) if isinstance(node, tuple) else node.copy()


def _add_to(total, node):
    if isinstance(total, tuple):
        return tuple(_add_to(t, n) for t, n in zip(total, node, strict=True))
    total += node
    return total


def picked(block: int | None, picks, containers) -> list:
    """The nodes ``picks`` names among ``containers``: ``(c, i)`` is node i of a shard's
    nodes (a ``ShardOut`` or its ``nodes``), read at column block ``block`` unless that is None;
    ``(c, None)`` is container c itself, a sum made by ``combine_picked``."""
    nodes = []
    for c, i in picks:
        container = containers[c]
        if isinstance(container, ShardOut):
            container = container.nodes
        node = container if i is None else container[i]
        nodes.append(node if i is None or block is None else node[block])
    return nodes


def combine_picked(block: int | None, picks, *containers):
    """A node of the reduction tree above the shards: Σ, in order, of the nodes picked."""
    return sum_in_order(*picked(block, picks, containers))


def sum_in_order(*parts):
    """Σ parts, left to right; tuples are summed field by field."""
    if isinstance(parts[0], tuple):
        return tuple(sum_in_order(*fields) for fields in zip(*parts, strict=True))
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total
