"""``NMF.predict`` and ``NMF.recommend`` (``dasknmf.recommend``): scores of pairs and top-n
columns per row, in memory and with W on a cluster, and their bad input."""

from __future__ import annotations

import pickle

import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning

from dasknmf import NMF, load
from dasknmf.io import save_matrix

pytestmark = pytest.mark.filterwarnings("ignore", category=ConvergenceWarning)


@pytest.fixture(scope="module")
def ratings():
    """A 120 × 40 rank-3 matrix with 40% of its entries observed, as sparse X."""
    rng = np.random.default_rng(0)
    X = rng.uniform(size=(120, 3)) @ rng.uniform(size=(3, 40))
    mask = rng.uniform(size=X.shape) < 0.4
    rows, cols = np.nonzero(mask)
    return sp.csr_matrix((X[rows, cols], (rows, cols)), shape=X.shape), mask


def fitted(S, **params):
    return NMF(3, missing="unstored", init="random", random_state=0, max_iter=40, **params).fit(S)


def brute_force_top(model, mask, row, n):
    scores = np.asarray(model.W_[row]) @ model.components_
    scores = np.where(mask[row], -np.inf, scores)
    order = np.argsort(-scores, kind="stable")[:n]
    return order, scores[order]


def test_predict_scores_pairs(ratings):
    S, _ = ratings
    model = fitted(S)
    rows, cols = np.array([0, 5, 5, 119]), np.array([3, 0, 39, 7])
    full = model.W_ @ model.components_
    np.testing.assert_allclose(model.predict_pairs(rows, cols), full[rows, cols], rtol=1e-12)
    assert model.predict_pairs(7, 2).shape == (1,)


def test_recommend_leaves_out_what_the_fit_saw(ratings):
    S, mask = ratings
    model = fitted(S)
    cols, scores = model.recommend([0, 17, 3], n=5)
    assert cols.shape == scores.shape == (3, 5) and cols.dtype == np.int64
    for t, row in enumerate([0, 17, 3]):
        expected, expected_scores = brute_force_top(model, mask, row, 5)
        np.testing.assert_array_equal(cols[t], expected)
        np.testing.assert_allclose(scores[t], expected_scores)
        assert not mask[row, cols[t]].any()
    everything, _ = model.recommend([0], n=40, exclude_observed=False)
    assert sorted(everything[0]) == list(range(40))


def test_a_row_with_fewer_columns_left_than_n(ratings):
    S, mask = ratings
    model = fitted(S)
    left = int((~mask[2]).sum())
    cols, scores = model.recommend([2], n=40)
    assert (cols[0, :left] >= 0).all() and (cols[0, left:] == -1).all()
    assert np.isneginf(scores[0, left:]).all() and np.isfinite(scores[0, :left]).all()


def test_without_missing_the_nonzero_entries_are_left_out():
    """Implicit feedback: counts fitted with missing=None; a row's items are its nonzeros."""
    X = sp.random(60, 30, density=0.2, random_state=1, format="csr") * 5
    model = NMF(3, init="random", random_state=0, max_iter=30).fit(X)
    cols, _ = model.recommend(np.arange(60), n=3)
    seen = X.toarray() != 0
    assert not any(seen[row, cols[row][cols[row] >= 0]].any() for row in range(60))


def test_on_a_cluster_blockwise(cluster, ratings, tmp_path):
    """W on the cluster and X in a CSR store: all rows' top-n found block by block there."""
    S, mask = ratings
    path = save_matrix(tmp_path / "S.zarr", S)
    model = NMF(
        3, missing="unstored", init="random", random_state=0, max_iter=40, panel_bytes=4000
    ).fit(str(path))
    assert isinstance(model.W_, da.Array) and model.layout_["panels"] > 1
    cols, scores = model.recommend(n=4)
    assert cols.shape == (120, 4)
    for row in (0, 50, 119):
        expected, expected_scores = brute_force_top(model, mask, row, 4)
        np.testing.assert_array_equal(cols[row], expected)
        np.testing.assert_allclose(scores[row], expected_scores)
    some, _ = model.recommend([119, 0], n=4)
    np.testing.assert_array_equal(some, cols[[119, 0]])
    expected = model.W_[3].compute() @ model.components_[:, 4]
    np.testing.assert_allclose(model.predict_pairs([3], [4]), [expected])


def test_bad_input_is_named(ratings, tmp_path):
    S, _ = ratings
    model = fitted(S)
    with pytest.raises(ValueError, match=r"rows \[120, -1\] are not rows of the fitted data"):
        model.predict_pairs([120, -1, 3], [0, 0, 0])
    with pytest.raises(ValueError, match=r"cols \[40\] are not columns"):
        model.predict_pairs([1], [40])
    with pytest.raises(ValueError, match="same length"):
        model.predict_pairs([1, 2], [3])
    with pytest.raises(TypeError, match="1-D sequence of integers"):
        model.predict_pairs([1.5], [3])
    with pytest.raises(ValueError, match="n must be a positive integer"):
        model.recommend([0], n=0)
    with pytest.raises(ValueError, match=r"rows \[500\]"):
        model.recommend([500])
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        NMF(3).predict_pairs([0], [0])
    # A model without its training data: pickled, or saved and loaded.
    for other in (pickle.loads(pickle.dumps(model)), load(model.save(tmp_path / "m.zarr"))):
        with pytest.raises(ValueError, match="exclude_observed=True needs the X"):
            other.recommend([0])
        cols, _ = other.recommend([0], n=3, exclude_observed=False)
        np.testing.assert_array_equal(cols, model.recommend([0], n=3, exclude_observed=False)[0])


# ---- ratings as records: dasknmf convert --triples, ids in predict and recommend ---------------

RECORDS = """user,item,rating,timestamp
u2,apple,4,1
u1,apple,3.5,2
u1,pear,5,3
u3,fig,1,4
u2,fig,0,5
u10,pear,2,6
"""


def test_records_become_a_store_of_exactly_those_entries(tmp_path):
    from dasknmf import convert, open_matrix
    from dasknmf.csr import read_ids

    (tmp_path / "r.csv").write_text(RECORDS)
    path = convert(tmp_path / "r.csv", tmp_path / "r.zarr", triples="user,item,rating")
    X = open_matrix(path).compute()
    import zarr

    rows, cols = read_ids(zarr.open_group(str(path), mode="r"))
    assert list(rows) == ["u1", "u10", "u2", "u3"] and list(cols) == ["apple", "fig", "pear"]
    expected = np.array([[3.5, 0, 5], [0, 0, 2], [4, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(X.toarray(), expected)
    assert X.nnz == 6  # the rating 0 of (u2, fig) is stored: an observed zero
    # A small store's arrays are one chunk of their own size (a chunk is decoded whole).
    group = zarr.open_group(str(path), mode="r")
    sizes = {name: group[name].chunks for name in ("data", "indptr", "row_ids", "col_ids")}
    assert sizes == {"data": (6,), "indptr": (5,), "row_ids": (4,), "col_ids": (3,)}
    # Integer ids are kept as integers, sorted as numbers; Parquet reads the same.
    import pandas as pd

    frame = pd.DataFrame({"u": [10, 9, 10], "i": [3, 3, 1], "r": [1.0, 2.0, 3.0]})
    frame.to_parquet(tmp_path / "r.parquet")
    path = convert(tmp_path / "r.parquet", tmp_path / "p.zarr", triples=("u", "i", "r"))
    rows, cols = read_ids(zarr.open_group(str(path), mode="r"))
    assert rows.dtype == np.int64 and list(rows) == [9, 10] and list(cols) == [1, 3]
    np.testing.assert_array_equal(open_matrix(path).compute().toarray(), [[0, 2], [3, 1]])


def test_a_model_fitted_on_records_speaks_their_ids(tmp_path):
    from dasknmf import convert

    rng = np.random.default_rng(3)
    users, items = [f"user{i}" for i in range(40)], [f"item{j}" for j in range(15)]
    truth = rng.uniform(size=(40, 2)) @ rng.uniform(size=(2, 15))
    lines = ["user,item,rating"]
    for i in range(40):
        for j in rng.choice(15, size=6, replace=False):
            lines.append(f"{users[i]},{items[j]},{truth[i, j]:.6f}")
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    path = convert(tmp_path / "r.csv", tmp_path / "r.zarr", triples="user,item,rating")
    model = NMF(2, missing="unstored", init="random", random_state=0, max_iter=30).fit(str(path))
    assert list(model.row_ids_) == sorted(users) and list(model.col_ids_) == sorted(items)
    position = (
        {u: i for i, u in enumerate(sorted(users))},
        {t: j for j, t in enumerate(sorted(items))},
    )
    W = model.W_.compute()
    score = model.predict_pairs(["user3", "user17"], ["item0", "item9"])
    expected = [
        W[position[0][u]] @ model.components_[:, position[1][t]]
        for u, t in (("user3", "item0"), ("user17", "item9"))
    ]
    np.testing.assert_allclose(score, expected)
    columns, _ = model.recommend(["user3"], n=20)
    assert columns.dtype == object and set(columns[0][:9]) <= set(items) and columns[0][-1] is None
    with pytest.raises(ValueError, match=r"rows \['nobody'\] are not ids of the fitted data"):
        model.predict_pairs(["nobody"], ["item0"])
    loaded = load(model.save(tmp_path / "model.zarr"))
    np.testing.assert_array_equal(loaded.col_ids_, model.col_ids_)
    np.testing.assert_allclose(loaded.predict_pairs(["user3"], ["item0"]), score[:1])


@pytest.mark.parametrize(
    "text, triples, match",
    [
        (RECORDS, "user,item", "three different columns"),
        (RECORDS, "user,item,score", r"has no column \['score'\]"),
        (RECORDS, None, "holds records: say which of its columns"),
        (
            RECORDS + "u1,pear,4,7\n",
            "user,item,rating",
            r"record \(u1, pear\) appears more than once",
        ),
        (
            RECORDS + "u4,fig,good,8\n",
            "user,item,rating",
            r"'rating' of the record \(u4, fig\) is 'good'",
        ),
        (RECORDS + "u4,fig,,8\n", "user,item,rating", r"'rating' of the record \(u4, fig\)"),
        ("user,item,rating\n", "user,item,rating", "holds no records"),
    ],
)
def test_bad_records_are_named_and_nothing_is_written(tmp_path, text, triples, match):
    from dasknmf import convert

    (tmp_path / "r.csv").write_text(text)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=match):
        convert(tmp_path / "r.csv", tmp_path / "out" / "r.zarr", triples=triples)
    assert list((tmp_path / "out").iterdir()) == []


def test_the_command_line_from_records_to_a_table(tmp_path, cluster):
    """convert --triples, fit --missing unstored, recommend to Parquet and CSV (on the running
    cluster): the tables hold what the Python API gives; bad requests exit 2 and write
    nothing."""
    import pandas as pd
    from conftest import last_json, run_cli

    where = cluster.scheduler.address
    rng = np.random.default_rng(4)
    truth = rng.uniform(size=(30, 2)) @ rng.uniform(size=(2, 12))
    lines = ["user,item,rating"] + [
        f"u{i},i{j},{truth[i, j]:.5f}"
        for i in range(30)
        for j in rng.choice(12, size=5, replace=False)
    ]
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    store, model_path = tmp_path / "r.zarr", tmp_path / "model.zarr"
    last_json(
        run_cli(
            "convert",
            str(tmp_path / "r.csv"),
            str(store),
            "--triples",
            "user,item,rating",
            "--json",
        )
    )
    fit = ["fit", str(store), "-o", str(model_path), "-k", "2", "--missing", "unstored"]
    last_json(
        run_cli(
            *fit,
            "--init",
            "random",
            "--random-state",
            "0",
            "--max-iter",
            "20",
            "--scheduler-address",
            where,
            "--json",
        )
    )
    table = tmp_path / "top.parquet"
    out = last_json(
        run_cli(
            "recommend",
            str(model_path),
            "-n",
            "3",
            "--input",
            str(store),
            "-o",
            str(table),
            "--scheduler-address",
            where,
            "--json",
        )
    )
    assert out["rows"] == 30 and out["n"] == 3
    frame = pd.read_parquet(table)
    assert list(frame.columns) == ["row", "rank", "column", "score"] and len(frame) == 90
    model = load(model_path)
    columns, scores = model.recommend(["u7"], n=3, X=str(store))
    mine = frame[frame.row == "u7"].sort_values("rank")
    assert list(mine.column) == list(columns[0]) and np.allclose(mine.score, scores[0])
    csv = tmp_path / "some.csv"
    last_json(
        run_cli(
            "recommend",
            str(model_path),
            "--rows",
            "u7,u1",
            "--include-observed",
            "-o",
            str(csv),
            "--scheduler-address",
            where,
            "--json",
        )
    )
    assert set(pd.read_csv(csv).row) == {"u7", "u1"}
    for bad, match in (
        (["--rows", "nobody", "--include-observed"], "are not ids of the fitted data"),
        ([], "needs the fitted X: give --input"),
        (["--include-observed", "-o", str(tmp_path / "t.json")], "a .parquet or a .csv file"),
    ):
        output = [] if "-o" in bad else ["-o", str(tmp_path / "bad.parquet")]
        result = run_cli("recommend", str(model_path), *output, *bad)  # fails before a cluster
        assert result.returncode == 2 and match in result.stderr, result.stderr
    assert not (tmp_path / "bad.parquet").exists() and not (tmp_path / "t.json").exists()
