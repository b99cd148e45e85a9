"""The 2-D block scheme (issue 11, point 3): the same factorization as the row panels, chosen
when a task can hold neither a whole row with H nor a whole column with W, or forced."""

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import low_rank, run_cli

from dasknmf import NMF, block_steps, blocks, init, load, save_matrix
from dasknmf._params import InvalidParameterError
from dasknmf.ops import DaskOps
from dasknmf.steps import Objective

KWARGS = dict(n_components=4, init="random", random_state=0, tol=0, max_iter=15, extrapolate=False)
# Budgets that cut X (120 × 90) into 4 × 3 blocks, and into 12 × 9: more column blocks than
# the tree's fan-in, so that H·Hᵀ is summed over two levels.
FEW_BLOCKS, MANY_BLOCKS = 30 * 30 * 8, 10 * 10 * 8


def _fit(X, **kwargs):
    model = NMF(**{**KWARGS, **kwargs})
    return model.fit_transform(X), model


@pytest.fixture(scope="module")
def X():
    return low_rank(120, 90, 4)


def test_blocks_cut_both_dimensions_within_the_budgets():
    rows, cols = blocks.grid_bounds((1000, 900), 4, 8, 20 * 30 * 8)
    assert rows[0] == 0 and rows[-1] == 1000 and cols[0] == 0 and cols[-1] == 900
    assert len(rows) > 2 and len(cols) > 2
    assert max(np.diff(rows)) * max(np.diff(cols)) * 8 <= 20 * 30 * 8 * 1.1


def _same_as_rows(data, panel_bytes, rtol=1e-8, **settings):
    """Fit ``data`` by row panels and by 2-D blocks (more than one column block); the factors
    agree within ``rtol``, the objectives and final errors to 1e-9 or better. Returns both."""
    W_rows, rows = _fit(data, layout="rows", **settings)
    W_blocks, two_d = _fit(data, layout="blocks", panel_bytes=panel_bytes, **settings)
    assert rows.layout_["scheme"] == "rows"
    assert two_d.layout_["scheme"] == "blocks" and two_d.layout_["blocks"][1] > 1
    np.testing.assert_allclose(two_d.components_, rows.components_, rtol=rtol, atol=1e-10)
    np.testing.assert_allclose(W_blocks, W_rows, rtol=rtol, atol=1e-10)
    np.testing.assert_allclose(two_d.loss_history_, rows.loss_history_, rtol=1e-9)
    assert two_d.reconstruction_err_ == pytest.approx(rows.reconstruction_err_, rel=1e-9)
    return rows, two_d


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_blocks_give_the_row_panel_factors_up_to_rounding(X, sparse):
    _same_as_rows(sp.csr_array(X) if sparse else X, 30 * 20 * 8)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_extrapolated_blocks_give_the_row_panel_factors(sparse):
    """HALS with extrapolation over 2-D blocks (H_j pushed by a task of its own, W_i in its
    band's W update): the iterates, the stopping iteration and the factors of the row panels
    up to rounding — and not those of plain HALS."""
    X = low_rank(120, 90, 4) + 0.05 * np.random.default_rng(1).random((120, 90))
    data = sp.csr_array(X) if sparse else X
    settings = dict(extrapolate=True, max_iter=60, tol=1e-3)
    rows, two_d = _same_as_rows(data, 30 * 20 * 8, rtol=1e-7, **settings)
    assert two_d.n_iter_ == rows.n_iter_ < 60
    plain = _fit(data, layout="blocks", panel_bytes=30 * 20 * 8, max_iter=10)[1]
    assert plain.loss_history_[10] != pytest.approx(two_d.loss_history_[10], rel=1e-4)


def _with_missing(X, missing):
    """X with 60% of its entries unobserved: NaN, or not stored."""
    hidden = np.random.default_rng(3).random(X.shape) < 0.6
    if missing == "nan":
        return np.where(hidden, np.nan, X)
    return sp.csr_array(np.where(hidden, 0, X))


@pytest.mark.parametrize("missing", ["nan", "unstored"])
@pytest.mark.parametrize(
    "solver",
    [dict(solver="cd"), dict(solver="mu", beta_loss="kullback-leibler")],
    ids=["als", "kl"],
)
def test_the_masked_loss_on_blocks_gives_the_row_panel_factors(X, missing, solver):
    """The loss over the observed entries only: each row's problem (its packed Gram matrix,
    C_i, count) or multiplicative-update statistics summed along its row of blocks, each
    column's down its column; = the row panels up to rounding, penalties by counts."""
    data = _with_missing(X, missing)
    settings = dict(missing=missing, alpha_W=0.01, alpha_H="same", l1_ratio=0.5, **solver)
    two_d = _same_as_rows(data, 20 * 20 * 8, **settings)[1]
    assert min(two_d.layout_["blocks"]) > 1
    assert len(two_d.loss_history_) == KWARGS["max_iter"] + 1


def test_a_masked_block_fit_on_a_cluster_equals_it_in_memory_and_resumes(cluster, X, tmp_path):
    data = _with_missing(X, "nan")
    settings = dict(layout="blocks", panel_bytes=20 * 20 * 8, missing="nan")
    W_ref, reference = _fit(data, **settings)
    lazy = da.from_array(data, chunks=(40, 45))
    W, model = _fit(lazy, cache=True, **settings)
    np.testing.assert_array_equal(model.components_, reference.components_)
    np.testing.assert_array_equal(W.compute(), W_ref)
    assert model.loss_history_ == reference.loss_history_
    checkpoint = dict(checkpoint=tmp_path, checkpoint_every=4)
    _fit(lazy, cache=True, max_iter=9, **checkpoint, **settings)
    W, resumed = _fit(lazy, cache=True, resume=True, **checkpoint, **settings)
    np.testing.assert_array_equal(resumed.components_, reference.components_)
    np.testing.assert_array_equal(W.compute(), W_ref)
    assert resumed.loss_history_ == reference.loss_history_


def test_data_crosses_between_workers_once_as_the_cost_model_says(cluster, X):
    """On a cluster the 2-D tasks run where their data is: W (the bands' states) never moves,
    and each pushed H block and each column's partial sums cross to the other worker once —
    not again because the scheduler stole a task or dropped the producer's copy (both are
    held off during a fit: the memory manager restarts after it)."""
    from dask.utils import key_split

    def received(dask_worker):
        return [key for t in dask_worker.transfer_incoming_log for key in t["keys"]]

    cluster.run(lambda dask_worker: dask_worker.transfer_incoming_log.clear())
    settings = dict(layout="blocks", panel_bytes=FEW_BLOCKS, extrapolate=True, cache=True)
    _fit(da.from_array(X, chunks=(40, 45)), **settings)
    assert cluster.amm.running()  # started again when the fit ended
    keys = [key for keys in cluster.run(received).values() for key in keys]
    moved = {}
    for key in keys:
        moved.setdefault(key_split(key), []).append(key)
    assert "band_cross" not in moved and "band_w_step" not in moved
    n_iter, n_cols = KWARGS["max_iter"], 3  # FEW_BLOCKS: 4 × 3 blocks, in 2 bands
    for name in ("pushed_block", "band_partial"):
        assert len(moved[name]) == len(set(moved[name])) == n_iter * n_cols, name


def test_extrapolation_gives_way_where_its_copies_do_not_fit_the_workers(cluster, X, caplog):
    """Extrapolation keeps five copies of W and H (pushed and plain W, H, the H before, the
    best iterate), a plain fit two: on workers that hold two but not five, 'auto' fits
    without it (and says so), True is an error before any work. The workers' room is set
    through the pause fraction the check reads: between the two needs."""
    import dask

    from dasknmf import panels

    k, itemsize = KWARGS["n_components"], X.dtype.itemsize
    need_plain = 2 * k * sum(X.shape) * itemsize
    limit = panels.worker_memory()
    pause = (panels.WORKER_BASELINE + 0.75 * need_plain) / limit  # both workers: 1.5 × plain
    settings = dict(layout="blocks", panel_bytes=FEW_BLOCKS, extrapolate="auto")
    lazy = da.from_array(X, chunks=(40, 45))
    W_plain, plain = _fit(X, **dict(settings, extrapolate=False))
    with dask.config.set({"distributed.worker.memory.pause": pause}):
        caplog.set_level("INFO", logger="dasknmf")
        W, model = _fit(lazy, cache=True, **settings)
        assert "without extrapolation" in caplog.text
        with pytest.raises(ValueError, match="extrapolate=True on 2-D blocks keeps five copies"):
            _fit(lazy, cache=True, **dict(settings, extrapolate=True))
    np.testing.assert_array_equal(model.components_, plain.components_)
    np.testing.assert_array_equal(W.compute(), W_plain)
    extrapolated = _fit(lazy, cache=True, **settings)[1]  # room for five copies
    assert extrapolated.loss_history_ != plain.loss_history_


@pytest.mark.parametrize(
    "init, sparse",
    [("nndsvd", True), ("nndsvda", False), ("nndsvdar", False)],
)
def test_nndsvd_starts_on_blocks_give_the_row_panel_factors(X, init, sparse):
    """NNDSVD from the randomized SVD over the blocks (``svd.randomized_svd_blocks``): the
    row panels' start and factors up to rounding."""
    _same_as_rows(sp.csr_array(X) if sparse else X, 30 * 20 * 8, init=init)


def test_an_nndsvd_start_on_a_cluster_equals_it_in_memory(cluster, X):
    """The SVD's chains run where the cached blocks are; the factors are the in-memory bits."""
    settings = dict(layout="blocks", panel_bytes=30 * 20 * 8, init="nndsvda")
    W_ref, reference = _fit(X, **settings)
    W, model = _fit(da.from_array(X, chunks=(40, 45)), cache=True, **settings)
    np.testing.assert_array_equal(model.components_, reference.components_)
    np.testing.assert_array_equal(W.compute(), W_ref)
    assert model.loss_history_ == reference.loss_history_


def test_blocks_on_a_cluster_equal_blocks_in_memory(cluster, X, tmp_path):
    W_ref, reference = _fit(X, layout="blocks", panel_bytes=30 * 20 * 8)
    for cache, data in ((True, da.from_array(X, chunks=(40, 45))), (False, None)):
        if data is None:
            data = str(save_matrix(tmp_path / "X.zarr", X, chunks=(30, 30)))
        W, model = _fit(data, layout="blocks", panel_bytes=30 * 20 * 8, cache=cache)
        np.testing.assert_array_equal(model.components_, reference.components_)
        np.testing.assert_array_equal(W.compute(), W_ref)
        assert model.loss_history_ == reference.loss_history_


@pytest.mark.parametrize(
    "beta, sparse",
    [
        ("kullback-leibler", True),
        ("kullback-leibler", False),
        ("itakura-saito", False),
        (1.5, False),
    ],
)
def test_beta_divergences_on_blocks_give_the_row_panel_factors(X, beta, sparse):
    """Multiplicative updates over 2-D blocks: each row's statistics summed along its row of
    blocks, each column's along its column; the factors and the objectives of row panels up to
    rounding."""
    data = sp.csr_array(np.where(X > np.median(X), X, 0)) if sparse else X + 0.01
    two_d = _same_as_rows(data, FEW_BLOCKS, rtol=1e-10, solver="mu", beta_loss=beta)[1]
    assert len(two_d.loss_history_) == KWARGS["max_iter"] + 1


def test_kullback_leibler_blocks_on_a_cluster_equal_them_in_memory(cluster, X, tmp_path):
    data = sp.csr_array(np.where(X > np.median(X), X, 0))
    path = str(save_matrix(tmp_path / "X.zarr", data))
    settings = dict(layout="blocks", panel_bytes=FEW_BLOCKS, solver="mu", beta_loss=1, cache=True)
    W_ref, reference = _fit(data, **settings)
    W, model = _fit(path, **settings)
    np.testing.assert_array_equal(model.components_, reference.components_)
    np.testing.assert_array_equal(W.compute(), W_ref)
    assert model.loss_history_ == reference.loss_history_


def _unaligned(a):
    """A copy of ``a`` one byte off its dtype's alignment, as an array received over the
    network can be."""
    buffer = np.empty(a.nbytes + 1, dtype=np.uint8)
    out = buffer[1:].view(a.dtype).reshape(a.shape)
    out[:] = a
    assert not out.flags.aligned
    return out


def test_block_tasks_give_the_same_bits_for_arrays_at_any_address():
    # numpy's matmul skips BLAS for an unaligned operand, and its loop rounds b @ b.T
    # differently from BLAS's syrk with some kernels (OpenBLAS on SkylakeX).
    rng = np.random.default_rng(0)
    h = [rng.random((4, 23)) for _ in range(4)]
    for block in h:
        moved = block_steps.gram_of(Objective(4), _unaligned(block))
        assert np.array_equal(moved, block_steps.gram_of(Objective(4), block))
    wt, x = rng.random((4, 24)), rng.random((24, 23))
    w_out = (wt, wt @ wt.T, np.zeros(7))
    moved = (_unaligned(wt), w_out[1], w_out[2])
    frobenius = Objective(4)
    pairs = zip(
        block_steps.block_partial(frobenius, None, moved, x),
        block_steps.block_partial(frobenius, None, w_out, x),
        strict=True,
    )
    for a, b in pairs:
        assert np.array_equal(a, b)


def test_blocks_are_chosen_when_no_row_or_column_fits_a_task(X, caplog):
    caplog.set_level("INFO", logger="dasknmf")
    _, model = _fit(X, panel_bytes=1000)  # a row with H needs 13·90·8 bytes, a column 13·120·8
    assert model.layout_["scheme"] == "blocks"
    assert "2-D blocks" in caplog.text
    _, model = _fit(X, panel_bytes=1000, layout="rows")  # forced: one row per panel
    assert model.layout_["scheme"] == "rows"


def test_the_cli_reports_the_blocks(X, tmp_path):
    path = save_matrix(tmp_path / "X.zarr", X, chunks=(30, 30))
    out = tmp_path / "model.zarr"
    result = run_cli(
        "fit",
        str(path),
        "-k",
        "4",
        "--init",
        "random",
        "--max-iter",
        "5",
        "--layout",
        "blocks",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert load(out).layout_["scheme"] == "blocks"
    info = run_cli("info", str(out))
    assert "blocks" in info.stdout


@pytest.mark.parametrize(
    "settings",
    [
        dict(beta_loss="kullback-leibler"),
        dict(beta_loss="kullback-leibler", sparse=True),
        dict(beta_loss=0.5),
        dict(missing="nan"),
    ],
    ids=["kl", "kl-csr", "beta-0.5", "masked"],
)
def test_inner_sweeps_of_a_multiplicative_update_on_blocks(X, settings):
    """Each sweep reads the rows of blocks again for the statistics at the W it starts from;
    the iteration's objective is that of its first sweep's W, as on row panels."""
    settings = dict(settings)
    data = X + 0.01
    if settings.pop("sparse", False):
        data = sp.csr_array(np.where(X > np.median(X), X, 0))
    if settings.get("missing"):
        data = _with_missing(X, "nan")
    two_d = _same_as_rows(data, FEW_BLOCKS, rtol=1e-9, solver="mu", inner_iter=3, **settings)[1]
    once = _fit(data, layout="blocks", panel_bytes=FEW_BLOCKS, solver="mu", **settings)[1]
    assert two_d.reconstruction_err_ < once.reconstruction_err_


@pytest.mark.parametrize(
    "settings",
    [
        dict(panel_bytes=FEW_BLOCKS),
        dict(panel_bytes=MANY_BLOCKS, shuffle=True),
        dict(panel_bytes=FEW_BLOCKS, solver="mu", beta_loss="kullback-leibler"),
        dict(panel_bytes=MANY_BLOCKS, extrapolate=True),
    ],
    ids=["4x3", "12x9-shuffled", "4x3-kullback-leibler", "12x9-extrapolated"],
)
def test_a_resumed_block_fit_is_bit_identical(X, tmp_path, settings):
    """A 2-D fit stopped after 7 iterations (its checkpoint: iteration 6) and resumed to 15
    ends with the bits of the uninterrupted 15 iterations."""
    settings = dict(settings, layout="blocks")
    W_ref, reference = _fit(X, **settings)
    blocks_shape = reference.layout_["blocks"]
    if settings["panel_bytes"] == MANY_BLOCKS:
        assert blocks_shape[1] > 8, blocks_shape
    _fit(X, max_iter=7, checkpoint=tmp_path, checkpoint_every=3, **settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter-00000006"]
    W, resumed = _fit(X, checkpoint=tmp_path, checkpoint_every=3, resume=True, **settings)
    np.testing.assert_array_equal(resumed.components_, reference.components_)
    np.testing.assert_array_equal(W, W_ref)
    assert resumed.loss_history_ == reference.loss_history_
    assert resumed.n_iter_ == reference.n_iter_ == KWARGS["max_iter"]


def test_a_block_fit_resumes_on_a_cluster_from_a_store(cluster, X, tmp_path):
    """With extrapolation: its plain W and the H before are in the checkpoint too."""
    path = str(save_matrix(tmp_path / "X.zarr", X, chunks=(30, 30)))
    settings = dict(layout="blocks", panel_bytes=FEW_BLOCKS, cache=True, extrapolate=True)
    W_ref, reference = _fit(X, **settings)
    checkpoint = tmp_path / "ckpt"
    _fit(path, max_iter=6, checkpoint=checkpoint, checkpoint_every=4, **settings)
    W, resumed = _fit(path, checkpoint=checkpoint, resume=True, **settings)
    np.testing.assert_array_equal(resumed.components_, reference.components_)
    np.testing.assert_array_equal(W.compute(), W_ref)
    assert resumed.loss_history_ == reference.loss_history_


class _CountingOps(DaskOps):
    """Builds the tasks that a cluster runs (here on the synchronous scheduler), counting them."""

    tasks = 0

    def map(self, fn, items, *common, workers=None):
        self.tasks += len(items)
        return super().map(fn, items, *common, workers=workers)

    def call(self, fn, *args):
        self.tasks += 1
        return super().call(fn, *args)


def _fit_grid(X, band_bounds, n_iter):
    """W, H and the tasks of a 2-D fit in memory (the tasks a cluster would run)."""
    g = blocks.grid(X, 4, MANY_BLOCKS)
    g.ops = _CountingOps()
    g.band_bounds = band_bounds
    with dask.config.set(scheduler="synchronous"):
        stats = blocks.check_values(g)
        wt, h = init.initialize(g, "random", 4, g.col_bounds, stats.mean, 0)
        g.ops.tasks = 0
        result = blocks.fit(g, Objective(4), wt, h, stats.sum_sq, max_iter=n_iter, tol=0)
        tasks = g.ops.tasks
        W = blocks.w_blocks(g, result, 4).compute()
        H = np.concatenate(g.ops.fetch(result.h), axis=1)
    return W, H, tasks


def _per_iteration(X, band_bounds):
    """W, H after 5 iterations and the tasks of one iteration."""
    W, H, tasks = _fit_grid(X, band_bounds, 5)
    return W, H, (tasks - _fit_grid(X, band_bounds, 1)[2]) / 4


def test_the_stored_entries_are_counted_block_by_block(monkeypatch, sync_scheduler):
    """(Without a meta, dask also called the counting function on X's empty meta.)"""
    from dasknmf import grid

    seen, count = [], grid._count
    monkeypatch.setattr(grid, "_count", lambda block: seen.append(block.shape) or count(block))
    S = sp.random(40, 30, density=0.1, format="csr", random_state=0)
    X = da.from_array(S, chunks=(10, 30), asarray=False)
    assert grid.count_stored(X) == S.nnz
    assert seen == [(10, 30)] * 4
    assert grid.count_stored(da.from_array(S.toarray())) is None  # dense: nothing to count


def test_bands_group_tasks_not_sums(X):
    """An iteration runs one task per band (a worker thread's rows) and column block in each
    chain, not one per block: 2·S·Q + S + Q for S bands and Q column blocks, plus the small
    summary tree. The bands group tasks only: any grouping of the rows gives the same bits."""
    n_rows = len(blocks.grid(X, 4, MANY_BLOCKS).items)  # 12 rows × 9 columns of blocks
    summary = 3  # the tree over 9 H blocks: two sums of the first level, one above
    W_ref, H_ref, per_row = _per_iteration(X, list(range(n_rows + 1)))
    assert per_row == 2 * n_rows * 9 + n_rows + 9 + summary
    for bands in ([0, n_rows], [0, 5, n_rows], [0, 1, 2, 7, n_rows]):
        W, H, tasks = _per_iteration(X, bands)
        np.testing.assert_array_equal(W, W_ref)
        np.testing.assert_array_equal(H, H_ref)
        n_bands = len(bands) - 1
        assert tasks == 2 * n_bands * 9 + n_bands + 9 + summary


def test_transform_runs_over_blocks_where_a_fit_would(X, monkeypatch, cluster):
    """A model whose rows with H do not fit its panel budget transforms over 2-D blocks (one
    read of X, no task with the whole of H): the W of the row-panel transform up to rounding;
    a Dask X gives a lazy W with the bits of the in-memory one, and sparse X the same W."""
    model = NMF(**dict(KWARGS, panel_bytes=1000)).fit(X)  # 'auto': blocks
    assert model.layout_["scheme"] == "blocks"
    calls = []
    transform = blocks.transform
    monkeypatch.setattr(blocks, "transform", lambda *a: calls.append(1) or transform(*a))
    W = model.transform(X)
    assert len(calls) == 1
    rows = NMF(**dict(KWARGS, layout="rows")).fit(X)
    rows.components_ = model.components_
    W_rows = rows.transform(X)
    assert len(calls) == 1  # forced to row panels
    np.testing.assert_allclose(W, W_rows, rtol=1e-10, atol=1e-12)
    lazy = model.transform(da.from_array(X, chunks=(50, 40)))
    assert isinstance(lazy, da.Array) and len(calls) == 2
    np.testing.assert_array_equal(lazy.compute(), W)
    np.testing.assert_allclose(model.transform(sp.csr_array(X)), W, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("missing", ["nan", "unstored"])
def test_a_masked_transform_runs_over_blocks(X, missing, monkeypatch):
    """Each row's least squares over its observed entries, its problem summed along its row
    of blocks: the row panels' W up to rounding, lazily from a Dask X with the same bits."""
    data = _with_missing(X, missing)
    model = NMF(**dict(KWARGS, missing=missing, layout="blocks", panel_bytes=FEW_BLOCKS))
    model.fit(data)
    calls = []
    transform = blocks.transform
    monkeypatch.setattr(blocks, "transform", lambda *a: calls.append(1) or transform(*a))
    W = model.transform(data)
    assert len(calls) == 1
    rows = NMF(**dict(KWARGS, missing=missing, layout="rows")).fit(data)
    rows.components_ = model.components_
    np.testing.assert_allclose(W, rows.transform(data), rtol=1e-10, atol=1e-12)
    assert len(calls) == 1
    if missing == "nan":
        lazy = model.transform(da.from_array(data, chunks=(50, 40)))
        np.testing.assert_array_equal(lazy.compute(), W)
    hidden = data.copy() if missing == "nan" else data.toarray()
    hidden[0, 0] = -1.0
    with pytest.raises(ValueError, match="Negative values"):
        model.transform(hidden if missing == "nan" else sp.csr_array(hidden))


@pytest.mark.parametrize(
    "settings",
    [
        dict(solver="mu", beta_loss="kullback-leibler", alpha_W=0.01, l1_ratio=0.5),
        dict(solver="mu", beta_loss=0.5),
        dict(solver="mu", beta_loss="kullback-leibler", missing="nan"),
        dict(solver="mu", missing="unstored", alpha_W=0.01),
    ],
    ids=["kl", "beta-0.5", "masked-kl", "masked-frobenius-mu"],
)
def test_a_multiplicative_transform_runs_over_blocks(X, settings, monkeypatch):
    """A β-divergence model (or a masked one fitted by MU), whose transform iterates
    multiplicative updates, iterates each row of blocks with its statistics summed along the
    row, no task holding the whole of H: the W of row panels of the same rows up to rounding,
    stopping where they stop; lazily from a Dask X with the same bits, blocks of the row read
    once."""
    missing = settings.get("missing")
    data = X + 0.05 if missing is None else _with_missing(X, missing)
    model = NMF(**dict(KWARGS, layout="blocks", panel_bytes=FEW_BLOCKS, **settings)).fit(data)
    model.max_iter, model.tol = 60, 1e-3
    rows, _ = blocks.grid_bounds(X.shape, 3 * 4 + 1, 8, FEW_BLOCKS, None, 2)
    calls = []
    transform = blocks.transform
    monkeypatch.setattr(blocks, "transform", lambda *a: calls.append(1) or transform(*a))
    W = model.transform(data)
    assert len(calls) == 1
    by_rows = NMF(**dict(KWARGS, layout="rows", panel_bytes=rows[1] * 90 * 8, **settings))
    by_rows.fit(data).components_ = model.components_
    by_rows.max_iter, by_rows.tol = model.max_iter, model.tol
    np.testing.assert_allclose(W, by_rows.transform(data), rtol=1e-10, atol=1e-12)
    assert len(calls) == 1
    model.tol = 0  # the updates stopped before max_iter above
    assert not np.allclose(model.transform(data), W, rtol=1e-6)
    model.tol = 1e-3
    if missing != "unstored":
        reads = []
        source = da.from_array(data, chunks=(50, 40))
        read = da.map_blocks(lambda b: reads.append(1) or b, source, meta=np.empty((0, 0)))
        lazy = model.transform(read)
        graph = dict(lazy.__dask_graph__())
        whole_h = [v for v in graph.values() if getattr(v, "shape", None) == (4, 90)]
        assert not whole_h
        np.testing.assert_array_equal(lazy.compute(scheduler="sync"), W)
        assert len(reads) == source.npartitions


def test_a_multiplicative_transform_over_blocks_on_a_cluster(X, cluster):
    """The lazy row chains of a β-divergence transform, run by a cluster of worker
    processes: the bits of the in-memory transform."""
    settings = dict(layout="blocks", panel_bytes=FEW_BLOCKS, solver="mu", beta_loss=1, tol=1e-3)
    model = NMF(**dict(KWARGS, **settings)).fit(X)
    lazy = model.transform(da.from_array(X, chunks=(50, 40)))
    np.testing.assert_array_equal(cluster.compute(lazy).result(), model.transform(X))


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
def test_transform_over_blocks_refuses_bad_values(X, beta_loss):
    solver = "cd" if beta_loss == "frobenius" else "mu"
    settings = dict(layout="blocks", panel_bytes=FEW_BLOCKS, beta_loss=beta_loss, solver=solver)
    model = NMF(**dict(KWARGS, **settings)).fit(X)
    bad = X.copy()
    bad[-1, -1] = -1.0  # in the last block
    with pytest.raises(ValueError, match="Negative values in data passed to .*NMF"):
        model.transform(bad)
    lazy = model.transform(da.from_array(bad, chunks=(60, 45)))  # lazy: at compute
    with pytest.raises(ValueError, match="Negative values in data passed to .*NMF"):
        lazy.compute()


def test_a_checkpoint_of_the_other_layout_is_refused(X, tmp_path):
    """Row panels and 2-D blocks sum in other orders: neither resumes from the other."""
    settings = dict(panel_bytes=FEW_BLOCKS, checkpoint=tmp_path, checkpoint_every=2, max_iter=2)
    _fit(X, layout="rows", **settings)
    with pytest.raises(ValueError, match="other settings.*settings.layout"):
        _fit(X, layout="blocks", resume=True, **settings)


def test_an_unknown_layout_is_refused(X):
    with pytest.raises(InvalidParameterError, match="layout"):
        _fit(X, layout="diagonal")


def test_sparse_blocks_are_sized_by_their_stored_entries():
    shape, k, budget = (1_000_000, 800_000), 4, 2**20
    dense = blocks.grid_bounds(shape, k, 8, budget)
    rows, cols = blocks.grid_bounds(shape, k, 8, budget, stored=2_000_000)
    assert (len(rows) - 1) * (len(cols) - 1) < (len(dense[0]) - 1) * (len(dense[1]) - 1) / 100
    cell = 12 * 2_000_000 / (shape[0] * shape[1])  # value and column index per stored entry
    block_rows, block_cols = max(np.diff(rows)), max(np.diff(cols))
    assert block_rows * block_cols * cell + 8 * block_rows <= budget * 1.01
    assert k * max(block_rows, block_cols) * 8 <= 16 * 2**20  # dasknmf.h-block-bytes


def test_sparse_blocks_from_a_store_on_a_cluster_equal_them_in_memory(cluster, X, tmp_path):
    data = sp.csr_array(np.where(X > np.quantile(X, 0.7), X, 0))
    path = str(save_matrix(tmp_path / "X.zarr", data))
    settings = dict(layout="blocks", panel_bytes=4000, max_iter=3)  # a streamed block: ~60 ms
    W_ref, reference = _fit(data, **settings)
    assert reference.layout_["blocks"][0] > 2 and reference.layout_["blocks"][1] > 1
    # Streamed (cached sparse blocks from a store: the Kullback–Leibler test above).
    W, model = _fit(path, cache=False, **settings)
    assert model.layout_ == dict(reference.layout_, cached=False)
    np.testing.assert_array_equal(model.components_, reference.components_)
    np.testing.assert_array_equal(W.compute(), W_ref)


def test_cached_blocks_lie_in_bands_of_rows_one_per_worker(cluster, X):
    g = blocks.grid(da.from_array(X, chunks=(40, 45)), 4, 30 * 20 * 8, cache=True)
    try:
        workers = sorted(cluster.scheduler_info()["workers"])
        n_rows = len(g.items)
        assert g.locations == [workers[i * 2 // n_rows] for i in range(n_rows)]
        first_of_second = next(i for i in range(n_rows) if i * 2 // n_rows == 1)
        assert g.band_bounds == [0, first_of_second, n_rows]  # a band per worker thread
        holders = cluster.who_has([x for row in g.items for x in row])
        for i, row in enumerate(g.items):
            assert all(holders[x.key] == (g.locations[i],) for x in row)
    finally:
        g.close()
