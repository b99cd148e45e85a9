"""The engine: panel planning, fixed-order reductions, one iteration, graph hygiene."""

import itertools

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import low_rank

from dasknmf import NMF, engine, init, shards, steps
from dasknmf import panels as panels_module
from dasknmf.cuts import (
    coalesce_bounds,
    column_bounds,
    even_bounds,
    group_level,
    shard_layout,
)
from dasknmf.ops import EagerOps, continue_tree, reduce_to_fanin, tree_reduce
from dasknmf.panels import dask_panels, in_memory_panels, should_cache
from dasknmf.shards import Subtrees, combine_picked
from dasknmf.steps import sum_in_order


def test_even_bounds():
    assert even_bounds(10, 3) == [0, 3, 6, 10]
    assert even_bounds(2, 5) == [0, 1, 2]  # never an empty part
    assert even_bounds(7, 1) == [0, 7]


def test_coalesce_bounds_groups_whole_chunks_up_to_the_budget():
    assert coalesce_bounds([2, 2, 2, 2, 1], [20, 20, 20, 20, 10], 45) == [0, 4, 8, 9]
    # A chunk bigger than the budget stays whole, in a panel of its own.
    assert coalesce_bounds([5, 1, 1], [100, 10, 10], 30) == [0, 5, 7]


def test_column_bounds_follow_the_h_block_budget():
    with dask.config.set({"dasknmf.h-block-bytes": 4 * 10 * 8}):
        assert column_bounds(25, 4, 8) == [0, 8, 16, 25]
    assert column_bounds(25, 4, 8) == [0, 25]


def test_in_memory_panels_depend_on_shape_and_budget_only():
    X = np.ones((100, 10))
    panels = in_memory_panels(X, panel_bytes=100 * 10 * 8 // 4, n_threads=1)
    assert panels.row_bounds == [0, 25, 50, 75, 100]
    assert all(p.base is X for p in panels.items)  # views, no copies


def test_tree_reduce_has_a_fixed_shape():
    ops = EagerOps()
    calls = []

    def combine(*parts):
        calls.append(parts)
        return sum(parts)

    assert tree_reduce(ops, list(range(10)), combine, split_every=4) == 45
    assert calls == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9), (6, 22, 17)]
    assert tree_reduce(ops, [np.ones(2)]) is not None


def test_tree_reduce_sums_tuples_field_by_field():
    ops = EagerOps()
    parts = [(np.array([1.0]), np.array([2.0])), (np.array([3.0]), np.array([4.0]))]
    total = tree_reduce(ops, parts)
    assert [float(t[0]) for t in total] == [4.0, 6.0]


def test_reduce_to_fanin():
    ops = EagerOps()
    items, raw = reduce_to_fanin(ops, [1, 2, 3], sum, split_every=4)
    assert raw and items == [1, 2, 3]
    values = [np.array([float(i)]) for i in range(9)]
    items, raw = reduce_to_fanin(ops, values, lambda *a: sum(a), split_every=2)
    assert not raw and len(items) <= 2 and float(sum(items)[0]) == 36


def _setup(X, panel_rows, k=3, lazy=False):
    if lazy:
        panels = dask_panels(
            da.from_array(X, chunks=(panel_rows, X.shape[1])),
            panel_rows * X.shape[1] * X.itemsize,
            cache=False,
        )
    else:
        panels = in_memory_panels(X, panel_rows * X.shape[1] * X.itemsize, n_threads=2)
    stats = engine.check_values(panels)
    cols = column_bounds(X.shape[1], k, X.itemsize)
    wt, h = init.initialize(panels, "random", k, cols, stats.mean, random_state=0)
    return panels, stats, cols, wt, h


def test_iteration_summary_is_small():
    X = low_rank(60, 9, 3)
    panels, _, cols, wt, h = _setup(X, 20)
    states = panels.bundle(wt)
    new_wt, new_h, summary, momentum = engine.iterate(panels, engine.Objective(3), states, h, cols)
    assert momentum is None  # no extrapolation
    gram_h, h_stats, gram_w, panel_stats = summary
    assert gram_h.shape == gram_w.shape == (3, 3)
    assert h_stats.shape == (6,) and panel_stats.shape == (7,)
    assert [b.shape for s in new_wt for b in shards.shard_blocks(s)] == [(3, 20)] * 3
    assert len(new_wt) == 2  # one state per shard: two threads
    assert steps.h_array(new_h[0]).shape == (3, 9)


def test_graph_size_does_not_grow_with_iterations(sync_scheduler):
    X = low_rank(80, 9, 3)
    panels, _, cols, wt, h = _setup(X, 20, lazy=True)
    objective = engine.Objective(3)
    wt = list(dask.persist(*panels.bundle(wt)))
    sizes = []
    for _ in range(5):
        step = engine.iterate(panels, objective, wt, h, cols)
        sizes.append(
            len(
                dask.base.collections_to_expr(
                    list(dask.base.unpack_collections(step)[0])
                ).__dask_graph__()
            )
        )
        wt, h, _, _ = dask.persist(*step)
    assert len(set(sizes)) == 1, sizes


def test_loss_by_gram_identity_matches_the_direct_residual():
    X = low_rank(90, 12, 3)
    panels, stats, cols, wt, h = _setup(X, 30)
    result = engine.fit(panels, engine.Objective(3), wt, h, stats.sum_sq, cols, max_iter=5, tol=0)
    last = result.history.error[-1]
    direct, _ = engine.final_pass(panels, engine.Objective(3), result)
    assert last == pytest.approx(np.sqrt(2 * direct), rel=1e-6)
    assert len(result.history.error) == 6  # nothing was missing
    assert len(result.history.loss) == 6 and result.n_iter == 5


def test_eager_and_dask_runs_are_bit_identical(sync_scheduler):
    X = low_rank(90, 12, 3)
    results = []
    for lazy in (False, True):
        panels, stats, cols, wt, h = _setup(X, 30, lazy=lazy)
        objective = engine.Objective(3, sweeps_w=3, sweeps_h=2)
        result = engine.fit(panels, objective, wt, h, stats.sum_sq, cols, max_iter=4, tol=0)
        states, h = panels.ops.fetch((result.wt, result.h))
        results.append(([b for s in states for b in shards.shard_blocks(s)], h))
    (wt_a, h_a), (wt_b, h_b) = results
    for a, b in zip(wt_a + h_a, wt_b + h_b, strict=True):
        np.testing.assert_array_equal(a, b)


def test_check_values_rejects_bad_values():
    with pytest.raises(ValueError, match="Negative values in data passed to NMF"):
        engine.check_values(in_memory_panels(-np.ones((3, 3))))
    X = np.ones((3, 3))
    X[2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        engine.check_values(in_memory_panels(X))


def test_should_cache():
    assert should_cache(10, True) and not should_cache(10, False)
    assert should_cache(10, "auto")
    assert not should_cache(10**15, "auto")
    with dask.config.set({"dasknmf.cache-fraction": 0.0}):
        assert not should_cache(10, "auto")


def _levels(n: int, split_every: int) -> int:
    """How many levels ``reduce_to_fanin`` runs on ``n`` items."""
    levels = 0
    while n > split_every:
        n, levels = -(-n // split_every), levels + 1
    return levels


@pytest.mark.parametrize("split_every", [2, 3, 8])
@pytest.mark.parametrize("n_items", [1, 2, 7, 8, 9, 17, 64, 65, 100, 513])
def test_the_reduction_tree_can_be_cut_into_aligned_subtrees(n_items, split_every):
    """What a fit with one task per worker will rely on (issue 11): whole subtrees of the
    fixed reduction tree — runs of items aligned to split_every**L — can be summed anywhere
    (a worker's task) and the tree continued from their roots with the same bits as the tree
    over all items. For n ≤ split_every (no level runs) one subtree of all items stands for
    the consumer's own sum of the raw items."""
    ops = EagerOps()
    rng = np.random.default_rng(n_items)
    items = [rng.normal(size=3) * 10.0 ** rng.integers(-8, 8) for _ in range(n_items)]
    first = sum_in_order  # the partials of one H block: summed field by field in order

    def final(nodes, raw):
        return first(*nodes) if raw else sum_in_order(*nodes)

    whole = final(*reduce_to_fanin(ops, items, first, split_every=split_every))
    for level in range(1, max(1, _levels(n_items, split_every)) + 1):
        size = split_every**level
        roots = []  # each aligned run summed as its own task would: level by level
        for start in range(0, n_items, size):
            run = items[start : start + size]
            for depth in range(level):
                combine = first if depth == 0 else sum_in_order
                run = [combine(*run[i : i + split_every]) for i in range(0, len(run), split_every)]
            (root,) = run
            roots.append(root)
        rest = reduce_to_fanin(ops, roots, sum_in_order, split_every=split_every)[0]
        cut = sum_in_order(*rest)
        assert cut.tobytes() == whole.tobytes(), (level, n_items, split_every)


@pytest.mark.parametrize("split_every", [2, 3, 8])
@pytest.mark.parametrize("n_items", [1, 2, 7, 8, 9, 17, 64, 65, 100, 513])
def test_shards_sum_to_the_same_bits_as_the_tree_over_all_panels(n_items, split_every):
    """The engine's sums over shards (``cuts.shard_layout``, ``shards.Subtrees`` in each
    shard task, ``ops.continue_tree`` above them, the last level summed by the consumer) equal
    the fixed-order tree over all panels bit for bit, for every number of shards; a streamed
    running sum inside a shard is what makes them equal, so a wrong order fails here."""
    ops = EagerOps()
    rng = np.random.default_rng(n_items)
    leaves = [
        (rng.normal(size=3) * 10.0 ** rng.integers(-8, 8), rng.normal(size=2))
        for _ in range(n_items)
    ]
    root = tree_reduce(ops, leaves, split_every=split_every)
    fanin = sum_in_order(*reduce_to_fanin(ops, leaves, sum_in_order, split_every=split_every)[0])
    sizes = rng.integers(1, 50, size=n_items)
    for n_shards in (1, 2, 3, 5, 16):
        level, bounds = shard_layout(sizes, n_shards, split_every)
        assert bounds[0] == 0 and bounds[-1] == n_items and len(bounds) - 1 <= n_shards
        assert all(b % split_every**level == 0 for b in bounds[:-1])
        containers = []
        for a, b in itertools.pairwise(bounds):
            sums = Subtrees(level, split_every)
            for leaf in leaves[a:b]:
                sums.add(leaf)
            containers.append(sums.finish())
        counts = [len(c) for c in containers]
        for to_root, expected in ((True, root), (False, fanin)):
            used, picks = continue_tree(ops, containers, counts, None, split_every, to_root)
            assert len(picks) <= (1 if to_root else split_every)
            total = combine_picked(None, picks, *used)
            for got, want in zip(total, expected, strict=True):
                assert got.tobytes() == want.tobytes(), (n_shards, to_root)


def test_shard_layout_balances_rows_over_the_slots():
    assert shard_layout([10] * 64, 2, 8) == (1, [0, 32, 64])
    assert shard_layout([10] * 63, 2, 8) == (1, [0, 32, 63])
    assert shard_layout([10] * 56, 2, 8) == (0, [0, 28, 56])  # 7 subtrees of 8: too few
    level, bounds = shard_layout([10] * 5, 8, 8)  # fewer panels than slots: one panel each
    assert (level, bounds) == (0, [0, 1, 2, 3, 4, 5])
    assert shard_layout([10] * 10_000, 2, 8) == (3, [0, 5120, 10_000])
    assert shard_layout([100] * 2 + [1] * 30, 2, 2) == (2, [0, 4, 32])  # by rows, not panels
    # Shards hold whole groups of stacked panels: the level is at least the groups'.
    assert shard_layout([10] * 64, 2, 8, group=2) == (2, [0, 64])
    # Cut at the panel boundary nearest each share: a 20,000-row store in chunks of 8,388 rows
    # gives its two threads 42% and 58% of the rows (cut by the panels' starts: 84% and 16%).
    assert shard_layout([8388, 8388, 3224], 2, 8) == (0, [0, 1, 3])
    assert shard_layout([100, 1, 1], 3, 8) == (0, [0, 1, 2, 3])  # never an empty shard


def test_tiny_panels_are_stacked_in_aligned_groups_that_leave_enough_of_them():
    """``group_level``: the deepest level whose runs of split_every**g panels hold at most
    ``dasknmf.group-bytes`` and leave ``MIN_GROUPS`` runs; 0 for panels of ordinary size."""
    with dask.config.set({"dasknmf.group-bytes": "1MiB"}):
        assert group_level([4] * 10_000, 400, 8) == 3  # 512 panels of 1.6 kB: 20 groups
        assert group_level([4] * 1_000, 400, 8) == 2  # 16 groups of 64
        assert group_level([4] * 200, 400, 8) == 1  # 64 would leave 4 groups
        assert group_level([4] * 120, 400, 8) == 0  # 15 groups of 8: too few
        assert group_level([4000] * 10, 400, 8) == 0  # panels of 1.6 MB go alone
        assert group_level([], 400, 8) == 0
    with dask.config.set({"dasknmf.group-bytes": 0}):
        assert group_level([4] * 10_000, 400, 8) == 0  # 0 turns stacking off
    for bad, why in (("lots", "byte unit"), (-5, "negative"), (None, "NoneType")):
        with (
            dask.config.set({"dasknmf.group-bytes": bad}),
            pytest.raises(ValueError, match=f"dasknmf.group-bytes={bad!r} is not a size.*{why}"),
        ):
            group_level([4] * 10_000, 400, 8)


def test_w_of_stacked_panels_is_kept_by_group_between_iterations():
    """A shard task that updates stacked groups returns a block of Wᵀ per group
    (``ShardOut.sizes``), which the next task takes as it is (``group_blocks``); the panels'
    blocks are cut from it where they are needed (``shard_blocks``: checkpoints, W)."""
    from dasknmf.shards import ShardOut, group_blocks, group_sizes, shard_blocks

    rng = np.random.default_rng(0)
    first, second = rng.random((3, 5)), rng.random((3, 4))
    tree = (1, 2, 1)  # groups of 2 panels
    state = ShardOut((first, second), (), sizes=group_sizes(tree, [(2, 3), (4,)]))
    blocks = shard_blocks(state)
    assert [b.shape for b in blocks] == [(3, 2), (3, 3), (3, 4)]
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), np.hstack([first, second]))
    assert all(a is b for a, b in zip(group_blocks(tree, state), (first, second), strict=True))
    # the panels' blocks (an initialization, a checkpoint) are stacked by group
    stacked = group_blocks(tree, blocks)
    assert [b.shape for b in stacked] == [(3, 5), (3, 4)]
    np.testing.assert_array_equal(stacked[0], first)
    assert group_sizes((1, 2, 0), [(2,), (3,)]) is None  # unstacked: the blocks are the panels'
    with pytest.raises(ValueError):  # sizes that do not match the blocks
        shard_blocks(ShardOut((first,), (), sizes=((2, 3), (4,))))


@pytest.mark.parametrize(
    "settings",
    [
        dict(init="nndsvda"),  # HALS with extrapolation, the default
        dict(init="random", beta_loss="kullback-leibler", solver="mu"),
        dict(init="random", missing="nan"),  # the masked loss
    ],
    ids=["frobenius", "kl", "masked"],
)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_stacked_tiny_panels_change_only_the_rounding(settings, sparse, monkeypatch):
    """256 panels of 2 rows are updated 8 at a time, stacked (``layout_["stacked"]``): the
    factors are those of the panels one by one up to rounding, and the same bits on 1 thread
    as on 3 (shards of whole groups)."""
    X = low_rank(512, 12, 3, seed=4)
    X[X < np.quantile(X, 0.3)] = 0
    if sparse:
        X = sp.csr_array(X)
        settings = dict(settings, missing="unstored") if "missing" in settings else settings
    elif "missing" in settings:
        X[::7, 3] = np.nan
    budget = -(-panels_module._nbytes(X) // 256)  # 256 panels, whatever the format
    kwargs = dict(n_components=3, random_state=0, tol=0, max_iter=10, layout="rows")
    fits = {}
    for group_bytes, threads in (("1MiB", 1), ("1MiB", 3), (0, 3)):
        monkeypatch.setattr(panels_module.os, "cpu_count", lambda t=threads: t)
        with dask.config.set({"dasknmf.group-bytes": group_bytes}):
            model = NMF(panel_bytes=budget, **kwargs, **settings)
            fits[group_bytes, threads] = (model.fit_transform(X), model)
        assert model.layout_["panels"] == 256
        assert model.layout_.get("stacked") == (8 if group_bytes else None)
    (W1, one), (W3, three), (W0, alone) = fits.values()
    np.testing.assert_array_equal(W1, W3)
    np.testing.assert_array_equal(one.components_, three.components_)
    assert one.loss_history_ == three.loss_history_
    assert not np.array_equal(W1, W0)  # stacked, the sums are formed in another order
    scale = np.abs(W0).max()
    np.testing.assert_allclose(W1, W0, rtol=0, atol=1e-9 * scale)
    np.testing.assert_allclose(one.components_, alone.components_, rtol=1e-9, atol=1e-12)
    assert one.reconstruction_err_ == pytest.approx(alone.reconstruction_err_, rel=1e-9)
