"""Choosing k (``dasknmf.select_rank``): stacked replicates are the fits run alone, the
stability and held-out measures, the suggested rank on planted data, bad input."""

from __future__ import annotations

import dataclasses
import json

import click
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import last_json, low_rank, run_cli

import dasknmf
from dasknmf import NMF, _cli_rank, io, pipeline, select_rank
from dasknmf.rank import consensus_nmf, load_rank

FIT = dict(max_iter=30, tol=0)


def _alone(X, k, seed, **params):
    model = NMF(n_components=k, init="random", random_state=seed, extrapolate=False, **params)
    model.fit(X)
    return model


@pytest.mark.usefixtures("sync_scheduler")
def test_stacked_replicates_are_the_fits_run_alone(array_type):
    X = low_rank(120, 40, 3, seed=1)
    found = select_rank(
        array_type(X, 30), [2, 3], 3, random_state=5, heldout=False, panel_bytes=30 * 40 * 8, **FIT
    )
    assert found.seeds == [5, 6, 7]
    for k in (2, 3):
        assert found.n_iter[k] == 30
        for r, seed in enumerate(found.seeds):
            model = _alone(X, k, seed, **FIT)
            np.testing.assert_allclose(
                found.components[k][r * k : (r + 1) * k], model.components_, rtol=1e-9, atol=1e-12
            )
            assert found.errors[k][r] == pytest.approx(model.reconstruction_err_, rel=1e-9)
    assert found.norm_x == pytest.approx(np.linalg.norm(X))


def test_ranks_with_their_own_sweeps_are_the_fits_run_alone():
    """Sparse X with 12 stored entries per row: ``inner_iter='auto'`` gives each k its own
    sweeps of the W update (6, 4 and 2 for k = 2, 3, 5); stacked in one fit, each replicate
    keeps its own and equals its fit alone."""
    X = sp.random(150, 40, density=0.3, random_state=3, format="csr") * 5
    assert {k: NMF(k)._objective(150, 40, k, X.nnz).sweeps_w for k in (2, 3, 5)} == {
        2: 6,
        3: 4,
        5: 2,
    }
    found = select_rank(X, [2, 3, 5], 2, random_state=1, heldout=False, **FIT)
    for k in (2, 3, 5):
        for r, seed in enumerate(found.seeds):
            model = _alone(X, k, seed, **FIT)
            np.testing.assert_allclose(
                found.components[k][r * k : (r + 1) * k], model.components_, rtol=1e-9, atol=1e-12
            )
            assert found.errors[k][r] == pytest.approx(model.reconstruction_err_, rel=1e-9)


def test_ks_are_stacked_into_fits_that_hold_their_factors(monkeypatch):
    """The ks go into as few stacked fits as keep each within ``STACK_BYTES`` of factors; the
    results do not depend on how they were grouped."""
    from dasknmf import rank

    size = (60 + 20) * 2 * 8  # the factors of one component of 2 replicates
    assert rank.stacked_groups([1, 2, 3], 2, (60, 20), 8) == [[1, 2, 3]]
    monkeypatch.setattr(rank, "STACK_BYTES", 3 * size)
    assert rank.stacked_groups([1, 2, 3, 4], 2, (60, 20), 8) == [[1, 2], [3], [4]]
    X = low_rank(60, 20, 2, seed=4)
    apart = select_rank(X, [1, 2, 3], 2, random_state=0, heldout=False, **FIT)
    monkeypatch.setattr(rank, "STACK_BYTES", 2**30)
    together = select_rank(X, [1, 2, 3], 2, random_state=0, heldout=False, **FIT)
    for k in (1, 2, 3):
        np.testing.assert_allclose(together.components[k], apart.components[k], rtol=1e-9)
        np.testing.assert_allclose(together.errors[k], apart.errors[k], rtol=1e-9)
        assert together.cophenetic[k] == pytest.approx(apart.cophenetic[k])


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_heldout_errors_of_stacked_ks_are_those_of_each_k_alone(sparse):
    """On each fold the fits, transforms and least squares of all ks share the reads of the
    submatrices; each k's held-out error is the one it gets alone."""
    from dasknmf.heldout import heldout_errors

    X = low_rank(80, 40, 3, seed=6)
    X = sp.csr_array(X) if sparse else X
    settings = dict(init="random", extrapolate=False, max_iter=20, tol=0)
    together = heldout_errors(X, [1, 2, 4], settings, seed=3)
    for k in (1, 2, 4):
        assert together[k] == pytest.approx(heldout_errors(X, [k], settings, 3)[k], rel=1e-9)
    assert together[1] > together[2] > 0
    with pytest.raises(ValueError, match="too small for bi-cross-validation of rank 21"):
        heldout_errors(X, [2, 21], settings, 3)


def test_stacked_replicates_of_a_wide_matrix_are_the_fits_run_alone():
    """Xᵀ's row panels (a wide X): the replicates are stacked along the same component axis."""
    X = low_rank(30, 400, 3, seed=2)
    budget = 8 * 30 * 100  # full-width rows do not fit: the fit runs on Xᵀ
    found = select_rank(X, [3], 2, random_state=0, heldout=False, panel_bytes=budget, **FIT)
    for r, seed in enumerate(found.seeds):
        model = _alone(X, 3, seed, panel_bytes=budget, **FIT)
        assert model.layout_["scheme"] == "columns"
        np.testing.assert_allclose(found.components[3][3 * r : 3 * r + 3], model.components_)


def test_on_a_cluster_from_a_store(tmp_path, cluster):
    """Replicates of two ks read from a Zarr store on a LocalCluster, stacked in one fit,
    equal the in-memory fits alone."""
    X = low_rank(200, 50, 3, seed=3)
    path = tmp_path / "X.zarr"
    io.save_matrix(path, X, chunks=(50, 50))
    found = select_rank(str(path), [2, 3], 2, random_state=9, heldout=True, **FIT)
    for k in (2, 3):
        for r, seed in enumerate(found.seeds):
            model = _alone(X, k, seed, **FIT)
            np.testing.assert_allclose(found.components[k][k * r : k * r + k], model.components_)
    memory = select_rank(X, [3], 2, random_state=9, heldout=True, **FIT)
    # k = 3's held-out error does not depend on the k stacked with it (tol=0)
    assert found.heldout_error[3] == pytest.approx(memory.heldout_error[3], rel=1e-6)


def _planted(kind: str, seed: int):
    rng = np.random.default_rng(seed)
    W, H = rng.gamma(1.0, 1.0, (300, 5)), rng.gamma(1.0, 1.0, (5, 100))
    X = W @ H
    if kind == "dense":
        return np.maximum(X + 0.1 * X.std() * rng.standard_normal(X.shape), 0)
    return sp.csr_array(rng.poisson(X).astype(np.float64))  # counts, sparse


@pytest.mark.parametrize("kind", ["dense", "sparse-counts"])
def test_the_planted_rank_is_suggested(kind):
    found = select_rank(
        _planted(kind, 0), range(3, 8), 3, random_state=0, max_iter=300, consensus_samples=100
    )
    assert found.suggested_k == 5, found.as_dict()
    assert "held-out" in found.rule
    # Stability: five planted components cluster cleanly, seven do not.
    assert found.silhouette[5] > 0.9
    assert found.silhouette[7] < found.silhouette[5]
    # The held-out error falls to the planted rank and no further.
    assert found.heldout_error[3] > found.heldout_error[4] > 1.05 * found.heldout_error[5]
    report = json.loads(json.dumps(found.as_dict()))
    assert report["suggested_k"] == 5
    assert [entry["k"] for entry in report["per_k"]] == [3, 4, 5, 6, 7]
    assert all(len(entry["errors"]) == 3 for entry in report["per_k"])


def test_without_heldout_the_cophenetic_rule_is_stated():
    found = select_rank(low_rank(60, 20, 2, seed=4), [1, 2, 3], 2, random_state=0, heldout=False)
    assert found.heldout_error == {}
    assert "cophenetic" in found.rule or "largest k" in found.rule
    assert found.suggested_k in (1, 2, 3)


@pytest.mark.parametrize(
    ("ks", "params", "error", "match"),
    [
        ([0, 2], {}, ValueError, "at least 1"),
        ([2, 31], {}, ValueError, r"min\(n_samples, n_features\) = 30"),
        ([], {}, ValueError, "ks is empty"),
        ([2, 2], {}, ValueError, "duplicates"),
        ([2.5], {}, ValueError, "integers"),
        (5, {}, TypeError, "iterable"),
        ([2], {"n_replicates": 1}, ValueError, "n_replicates must be an integer of at least 2"),
        ([2], {"consensus_samples": 1}, ValueError, "consensus_samples"),
        ([2], {"solver": "als"}, ValueError, "'solver' parameter of select_rank"),
        ([2], {"max_iter": -1}, ValueError, "'max_iter' parameter of select_rank"),
        ([2], {"tol": -1}, ValueError, "'tol' parameter of select_rank"),
        ([2], {"alpha_W": "a"}, TypeError, "'alpha_W' parameter of select_rank"),
        ([2], {"random_state": 2**32 - 1}, ValueError, "below 2\\*\\*32"),
    ],
)
def test_bad_parameters(ks, params, error, match):
    with pytest.raises(error, match=match):
        select_rank(low_rank(40, 30, 2), ks, **{"n_replicates": 2, **params})


def test_bad_input():
    X = low_rank(40, 30, 2)
    X[0, 0] = -1
    with pytest.raises(ValueError, match="Negative values"):
        select_rank(X, [2], 2)
    with pytest.raises(ValueError, match="too small for bi-cross-validation"):
        select_rank(low_rank(5, 30, 2), [3], 2)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(init="nndsvda"), "init='nndsvda'"),
        (dict(shuffle=True), "shuffle=True"),
    ],
)
def test_stacking_refuses_what_couples_replicates(change, match):
    model = NMF(n_components=2, extrapolate=False)
    plan = pipeline.Plan(
        n_components=2,
        init="random",
        objective=model._objective,
        max_iter=5,
        tol=0,
        panel_bytes=2**20,
        random_state=(0, 1),
        ranks=(2, 2),
    )
    with pytest.raises(ValueError, match=match):
        pipeline.fit(low_rank(20, 10, 2), pipeline.dataclasses.replace(plan, **change))
    for seeds in (0, (0, 1, 2)):  # one seed per stacked fit
        with pytest.raises(ValueError, match="Stacked fits need one seed each"):
            pipeline.fit(
                low_rank(20, 10, 2), pipeline.dataclasses.replace(plan, random_state=seeds)
            )
    extrapolating = NMF(n_components=2)._objective
    with pytest.raises(ValueError, match="extrapolation"):
        pipeline.fit(
            low_rank(20, 10, 2), pipeline.dataclasses.replace(plan, objective=extrapolating)
        )


# ---- the commands -------------------------------------------------------------------------


def _planted_store(tmp_path):
    rng = np.random.default_rng(1)
    W, H = rng.gamma(1.0, 1.0, (240, 4)), rng.gamma(1.0, 1.0, (4, 60))
    X = np.maximum(W @ H + 0.1 * (W @ H).std() * rng.standard_normal((240, 60)), 0)
    io.save_matrix(tmp_path / "X.zarr", X, chunks=(60, 60))
    return X, tmp_path / "X.zarr"


def test_rank_consensus_plot_commands(tmp_path):
    """``dasknmf rank`` → ``consensus`` → ``info`` and ``plot`` of the results, on a
    LocalCluster of the command's own (the held-out fits on a cluster: see
    ``test_on_a_cluster_from_a_store``)."""
    X, store = _planted_store(tmp_path)
    rank = tmp_path / "rank.zarr"
    found = last_json(
        run_cli(
            *("rank", str(store), "-k", "3,4", "--replicates", "3", "-o", str(rank)),
            *("--random-state", "0", "--no-heldout", "--workers", "1", "--json"),
        )
    )
    expected = select_rank(X, [3, 4], 3, random_state=0, heldout=False)
    assert found["ks"] == [3, 4] and found["suggested_k"] == expected.suggested_k
    assert found["source"] == str(store)
    assert found["per_k"][1]["errors"] == pytest.approx(expected.errors[4].tolist(), rel=1e-6)
    assert found["per_k"][1]["heldout_error"] is None

    model = tmp_path / "model.zarr"
    made = last_json(run_cli("consensus", str(rank), "-k", "4", "-o", str(model), "--json"))
    assert made["n_components"] == 4 and made["pooled"] == 12
    fitted = dasknmf.load(model)
    assert fitted.components_.shape == (4, 60)
    assert made["reconstruction_err"] < 1.01 * min(expected.errors[4])
    assert fitted.transform(X).shape == (240, 4)
    info = last_json(run_cli("info", str(model), "--json"))
    assert info["kind"] == "model" and info["n_components"] == 4

    pytest.importorskip("matplotlib")
    for source, image in ((rank, "rank.png"), (model, "model.png")):
        plot = run_cli("plot", str(source), "-o", str(tmp_path / image))
        assert plot.returncode == 0, plot.stderr
        assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_commands_refuse_bad_input(tmp_path):
    """Exit 2 with one line, before any cluster starts (the Python errors behind them are
    tested above)."""
    X, store = _planted_store(tmp_path)
    found = select_rank(X, [2, 3], 2, random_state=0, heldout=False, max_iter=20)
    found.save(tmp_path / "rank.zarr")
    cases = [
        (("rank", str(store), "-k", "2:x", "-o", str(tmp_path / "r")), "-k must be a range"),
        (
            ("consensus", str(tmp_path / "rank.zarr"), "-k", "4", "-o", str(tmp_path / "m")),
            "Rank 4 was not run",
        ),
        (
            ("consensus", str(tmp_path / "rank.zarr"), "-k", "2", "-o", str(tmp_path / "m")),
            "does not say which X it was run on: pass --input",
        ),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("text", "ks"),
    [("2:5", [2, 3, 4, 5]), ("2:10:4", [2, 6, 10]), ("3,5,8", [3, 5, 8]), ("7", [7])],
)
def test_the_ks_of_the_command(text, ks):
    assert _cli_rank._ks(text) == ks


@pytest.mark.parametrize("text", ["2:x", "5:3", "2:10:0", "", "3,,5", "-1:3"])
def test_the_ks_of_the_command_refuse_what_is_not_a_range(text):
    with pytest.raises(click.ClickException, match="-k must be a range"):
        _cli_rank._ks(text)


def test_a_selection_saves_and_loads(tmp_path):
    X = low_rank(60, 30, 2, seed=5)
    found = select_rank(X, [1, 2, 3], 2, random_state=3, max_iter=50)
    found.save(tmp_path / "rank.zarr")
    back = load_rank(tmp_path / "rank.zarr")
    assert back.as_dict() == found.as_dict()
    for k in found.ks:
        np.testing.assert_array_equal(back.components[k], found.components[k])
    with pytest.raises(FileExistsError, match="already exists"):
        found.save(tmp_path / "rank.zarr")
    with pytest.raises(ValueError, match="is not a rank selection"):
        load_rank(tmp_path / "nothing.zarr")
    model = consensus_nmf(X, back, 2)
    assert model.components_.shape == (2, 30)
    np.testing.assert_allclose(model.components_.sum(axis=1), 1.0)
    assert model.reconstruction_err_ == pytest.approx(
        np.linalg.norm(X - model.W_ @ model.components_)
    )
    with pytest.raises(ValueError, match="was run on 30"):
        consensus_nmf(X[:, :20], back, 2)
    with pytest.raises(ValueError, match="Rank 5 was not run"):
        consensus_nmf(X, back, 5)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_stacked_replicates_on_2d_blocks_are_the_fits_run_alone(sparse):
    """X large in both dimensions for the stacked components: fits of ranks 2, 3 and 3 advance
    together over 2-D blocks (block-diagonal Gram matrices in the W and H updates), each equal
    to its fit run alone (by row panels) up to rounding, with its own final error."""
    X = low_rank(120, 90, 3, seed=4)
    data = sp.csr_array(X) if sparse else X
    ranks, seeds = (2, 3, 3), (0, 1, 2)
    plan = pipeline.Plan(
        n_components=3,
        init="random",
        objective=NMF(n_components=3, extrapolate=False)._objective,
        **FIT,
        panel_bytes=30 * 20 * 8,
        random_state=seeds,
        ranks=ranks,
    )
    fitted = pipeline.fit(data, plan)
    assert fitted.layout["scheme"] == "blocks" and min(fitted.layout["blocks"]) > 1
    starts = np.cumsum((0, *ranks))
    for r, (k, seed) in enumerate(zip(ranks, seeds, strict=True)):
        model = NMF(k, init="random", random_state=seed, extrapolate=False, layout="rows", **FIT)
        W = model.fit_transform(data)
        mine = slice(starts[r], starts[r + 1])
        np.testing.assert_allclose(fitted.components[mine], model.components_, rtol=1e-8)
        np.testing.assert_allclose(fitted.W[:, mine], W, rtol=1e-8, atol=1e-12)
        assert fitted.replicate_errors[r] == pytest.approx(model.reconstruction_err_, rel=1e-9)
    assert fitted.norm_x == pytest.approx(np.linalg.norm(X))


def _stacked_until_each_stops(data, ranks, seeds, solver, **options):
    plan = pipeline.Plan(
        n_components=max(ranks),
        init="random",
        objective=NMF(n_components=max(ranks), solver=solver, extrapolate=False)._objective,
        **{"max_iter": 400, **options},
        tol=STOP_TOL,
        random_state=seeds,
        ranks=ranks,
    )
    return pipeline.fit(data, plan)


#: A tolerance that stops the fits below of the same rank at different iterations.
STOP_TOL = 1e-3


def _each_is_its_fit_alone(fitted, X, ranks, seeds, solver, rtol, layout="auto"):
    starts = np.cumsum((0, *ranks))
    alone_iters = []
    for r, (k, seed) in enumerate(zip(ranks, seeds, strict=True)):
        model = NMF(
            k, init="random", random_state=seed, solver=solver, extrapolate=False, layout=layout
        )
        W = model.set_params(max_iter=400, tol=STOP_TOL).fit_transform(X)
        mine = slice(starts[r], starts[r + 1])
        alone_iters.append(model.n_iter_)
        np.testing.assert_allclose(fitted.components[mine], model.components_, rtol=rtol)
        np.testing.assert_allclose(np.asarray(fitted.W)[:, mine], W, rtol=rtol, atol=rtol * 1e-3)
        assert fitted.replicate_errors[r] == pytest.approx(model.reconstruction_err_, rel=rtol)
    assert fitted.replicate_n_iter == alone_iters
    assert len(set(alone_iters)) > 2  # the fits do stop at iterations of their own
    assert fitted.n_iter == max(alone_iters)


@pytest.mark.parametrize("solver", ["cd", "mu"])
@pytest.mark.parametrize("layout", ["rows", "columns", "blocks"])
def test_stacked_fits_stop_each_by_its_own_rule(solver, layout):
    """With tol > 0 each stacked fit stops by its own stopping rule, at the iteration its fit
    alone stops at: the stacked fit stops there, goes on with that fit frozen, and every fit
    ends with the factors, error and iterations of its fit alone — on row panels, on column
    panels (Xᵀ) and on 2-D blocks."""
    X = low_rank(300, 60, 4, seed=1) + 0.05 * np.random.default_rng(0).random((300, 60))
    ranks, seeds = (3, 3, 3, 4, 4), (5, 6, 7, 8, 9)
    budget = 60 * 30 * 8 if layout == "blocks" else 100 * 60 * 8
    fitted = _stacked_until_each_stops(X, ranks, seeds, solver, layout=layout, panel_bytes=budget)
    assert fitted.layout["scheme"] == layout
    alone = "columns" if layout == "columns" else "auto"  # Xᵀ updates H first: not the same
    _each_is_its_fit_alone(fitted, X, ranks, seeds, solver, rtol=1e-8, layout=alone)


def test_the_products_of_stacked_fits_that_stopped_are_no_longer_formed(monkeypatch):
    """Once a stacked fit has stopped, the panel tasks form the products (X_i·Hᵀ, W_iᵀ·X_i)
    of the fits still running only — a fit that stops early costs nothing after — and each
    fit is still its fit alone, and the stacked fit's objective is that of all of them (the
    stopped ones where they stopped)."""
    from dasknmf import kernels

    formed = []
    dot_h = kernels.dot_h

    def counting(x, h):
        formed.append(h.shape[0])
        return dot_h(x, h)

    monkeypatch.setattr(kernels, "dot_h", counting)
    X = low_rank(300, 60, 4, seed=1) + 0.05 * np.random.default_rng(0).random((300, 60))
    ranks, seeds = (3, 3, 3, 4, 4), (5, 6, 7, 8, 9)
    fitted = _stacked_until_each_stops(X, ranks, seeds, "cd", panel_bytes=100 * 60 * 8)
    stops = fitted.replicate_n_iter
    assert len(set(stops)) > 2  # the fits stop at different iterations
    # Per iteration, one product per panel (3) of the fits not stopped before it.
    running = [
        sum(k for k, stop in zip(ranks, stops, strict=True) if stop >= t)
        for t in range(1, max(stops) + 1)
    ]
    assert formed == [rows for rows in running for _ in range(3)]
    _each_is_its_fit_alone(fitted, X, ranks, seeds, "cd", rtol=1e-8)
    assert len(fitted.loss_history) == max(stops) + 1
    half_sq = 0.5 * np.sum(np.square(fitted.replicate_errors))
    np.testing.assert_allclose(fitted.loss_history[-1], half_sq, rtol=1e-6)


def test_a_frozen_fits_rows_of_a_live_product_are_zeros():
    """``Objective.live_product``: the rows of the fits not frozen as the product of all of
    them, the frozen fits' zeros; with none frozen, the product itself."""
    from dasknmf import kernels
    from dasknmf.objective import Objective

    rng = np.random.default_rng(2)
    x, h = rng.random((40, 30)), rng.random((7, 30))
    objective = Objective(7, ranks=(2, 3, 2))
    whole = kernels.dot_h(x, h)
    np.testing.assert_array_equal(objective.live_product(kernels.dot_h, x, h), whole)
    frozen = dataclasses.replace(objective, frozen=frozenset({1}))
    got = frozen.live_product(kernels.dot_h, x, h)
    np.testing.assert_allclose(got[[0, 1, 5, 6]], whole[[0, 1, 5, 6]], rtol=1e-14)
    assert not got[2:5].any() and got.shape == whole.shape


def test_stacked_fits_stop_each_by_its_own_rule_on_a_cluster(tmp_path, cluster):
    """The same from a Zarr store on a LocalCluster (where such a fit submits no iteration
    ahead of the summaries it has read, ``stacked.speculates``): each fit equals its
    in-memory fit alone."""
    X = low_rank(300, 60, 4, seed=1) + 0.05 * np.random.default_rng(0).random((300, 60))
    path = tmp_path / "X.zarr"
    io.save_matrix(path, X, chunks=(100, 60))
    data = io.open_matrix(path, panel_bytes=100 * 60 * 8)
    ranks, seeds = (3, 3, 3, 4, 4), (5, 6, 7, 8, 9)
    fitted = _stacked_until_each_stops(data, ranks, seeds, "cd", panel_bytes=100 * 60 * 8)
    assert fitted.layout["panels"] == 3
    _each_is_its_fit_alone(fitted, X, ranks, seeds, "cd", rtol=1e-8)


def test_stacked_fits_resume_from_a_checkpoint_with_those_stopped_frozen(tmp_path):
    """A checkpoint of stacked fits keeps which fits have stopped (in each fit's history): a
    fit cut at iteration 45, when two of five had stopped, resumes to the same bits as the
    fit never cut."""
    X = low_rank(300, 60, 4, seed=1) + 0.05 * np.random.default_rng(0).random((300, 60))
    ranks, seeds, budget = (3, 3, 3, 4, 4), (5, 6, 7, 8, 9), 100 * 60 * 8
    whole = _stacked_until_each_stops(X, ranks, seeds, "cd", panel_bytes=budget)
    saved = dict(checkpoint=tmp_path / "ckpt", checkpoint_every=5, panel_bytes=budget)
    cut = _stacked_until_each_stops(X, ranks, seeds, "cd", max_iter=45, **saved)
    assert cut.replicate_n_iter == [*whole.replicate_n_iter[:2], 45, 45, 45]
    resumed = _stacked_until_each_stops(X, ranks, seeds, "cd", resume=True, **saved)
    assert resumed.replicate_n_iter == whole.replicate_n_iter
    np.testing.assert_array_equal(resumed.components, whole.components)
    np.testing.assert_array_equal(resumed.W, whole.W)


def test_only_stacked_fits_that_stop_one_by_one_wait_for_each_summary():
    """On a cluster a fit submits iterations ahead of the summaries it has read, except stacked
    fits with a stopping rule: each of their stops would drop the iterations in flight."""
    from dasknmf import stacked
    from dasknmf.objective import Objective

    alone, both = Objective(3), Objective(5, ranks=(2, 3))
    assert stacked.speculates(alone, 1e-4) and stacked.speculates(both, 0)
    assert not stacked.speculates(both, 1e-4)
