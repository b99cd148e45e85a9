"""Properties that hold for any small non-negative matrix (hypothesis): dense and sparse, with
zero rows and columns, duplicated rows, constant and all-zero matrices. The factors are
non-negative and finite, the objective never increases (with extrapolation: ends below where
it started), and the result does not depend on how X is cut into panels or Dask chunks beyond
float tolerance."""

import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dasknmf import NMF

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOLVERS = [
    {"solver": "cd"},  # with extrapolation ('auto')
    {"solver": "cd", "extrapolate": False},
    {"solver": "mu"},
    {"solver": "mu", "beta_loss": "kullback-leibler"},
]


@st.composite
def matrices(draw):
    """A small non-negative matrix with, at random, zero rows/columns, duplicated rows, or a
    constant or all-zero value, at times scaled far from 1 (1e-200 … 1e90: where squares
    underflow or products approach float64's limits)."""
    m, n = draw(st.integers(2, 14)), draw(st.integers(2, 9))
    values = st.one_of(st.just(0.0), st.floats(0.0, 100.0, allow_subnormal=False))
    X = draw(arrays(np.float64, (m, n), elements=values))
    kind = draw(st.sampled_from(["any", "zero-rows-cols", "duplicated", "constant", "zero"]))
    if kind == "zero-rows-cols":
        X[draw(st.integers(0, m - 1))] = 0
        X[:, draw(st.integers(0, n - 1))] = 0
    elif kind == "duplicated":
        X[m // 2 :] = X[: m - m // 2]
    elif kind == "constant":
        X[:] = draw(st.floats(0.01, 10.0))
    elif kind == "zero":
        X[:] = 0
    return X * draw(st.sampled_from([1.0, 1.0, 1.0, 1e-200, 1e-100, 1e50, 1e90]))


def _fit(X, solver, k, **kwargs):
    model = NMF(k, init="random", random_state=0, tol=0, max_iter=12, **solver, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        W = model.fit_transform(X)
    return (W.compute() if isinstance(W, da.Array) else W), model


def _spiked(first: float, second: float) -> np.ndarray:
    """Values of 1e50 on a background of 1e-128 (found by hypothesis)."""
    X = np.full((11, 6), 1.05258366e-128)
    X[[0, 0, 1, 10], [1, 2, 1, 3]] = [first, second, 1e50, 1e50]
    return X


@SETTINGS
@given(X=matrices(), solver=st.sampled_from(SOLVERS), k=st.integers(1, 4), sparse=st.booleans())
@example(  # balancing a component of 1e-161 overflowed: NaN factors (found by hypothesis)
    X=np.array([[3.03883136e-161, 0, 0], [0, 0, 0], [0, 0, 1.0]]),
    solver={"solver": "cd"},
    k=2,
    sparse=False,
)
@example(  # cut by max_iter = 12 right after a push that raised the objective 8.3-fold
    X=np.array(
        [
            [55.84424345, 25.70370308, 92.74129709, 19.06330567, 74.40416333, 54.80969841, 0.8406],
            [56.71174617, 12.30132115, 24.1499001, 31.03537436, 97.04793986, 77.98756658, 49.2198],
            [94.47146974, 72.213155, 93.23769838, 33.43965275, 98.83789546, 16.30739865, 11.0986],
            [39.51144501, 71.68339118, 38.51082748, 40.19037606, 96.14596508, 32.12761294, 51.2297],
        ]
    ),
    solver={"solver": "cd"},
    k=1,
    sparse=False,
)
@example(  # a push left a component near zero; HALS divided by it and overflowed
    X=_spiked(1.5e50, 1e50), solver={"solver": "cd"}, k=2, sparse=False
)
@example(  # a push left all of H near zero: the fit stops at its best iterate, with a warning
    X=_spiked(2e50, 7e50), solver={"solver": "cd"}, k=2, sparse=False
)
def test_factors_are_non_negative_finite_and_the_objective_never_increases(X, solver, k, sparse):
    W, model = _fit(sp.csr_matrix(X) if sparse else X, solver, k)
    H = model.components_
    for factor in (W, H):
        assert np.all(np.isfinite(factor)) and np.all(factor >= 0)
    loss = np.array(model.loss_history_)
    assert np.all(np.isfinite(loss)) and len(loss) == model.n_iter_ + 1
    # rounding: the loss comes from the Gram identity, whose error scales with ‖X‖² (a fit
    # that reaches X of 1e50 to rounding is at 0, then at 1e84)
    slack = 1e-9 * loss[0] + 1e-13 * float(np.sum(X**2)) + 1e-12
    if model.solver == "cd" and model.extrapolate in ("auto", True):
        # A pushed point may raise the objective for an iteration (then the next restarts);
        # the fit returns its iterate of the lowest objective (``history.Best``).
        assert 0.5 * model.reconstruction_err_**2 <= loss.min() + slack
    else:
        # Each update minimizes (HALS) or majorizes (MU) the objective: rounding aside, it
        # never goes up.
        assert np.all(np.diff(loss) <= slack), np.diff(loss).max()
    if not X.any():
        assert model.reconstruction_err_ == 0


def _close(a, b, scale):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7 * (1.0 + scale))


@SETTINGS
@given(
    X=matrices(),
    solver=st.sampled_from(SOLVERS),
    k=st.integers(1, 3),
    rows=st.integers(1, 6),
)
@example(  # one fit at the objective's rounding floor, one mid-restart (found by hypothesis)
    X=np.ones((11, 3)), solver={"solver": "cd"}, k=2, rows=1
)
@example(  # a restart decided by rounding on a plateau parted the paths (found by hypothesis)
    X=np.array(
        [[0.0] * 5 + [1, 0], [0.0] * 5 + [85, 0]]
        + [[0.0] * 7] * 6
        + [[0.0] * 5 + [2, 54]]
        + [[0.0] * 7]
        + [[0.0] * 6 + [43]]
        + [[0.0] * 7]
    ),
    solver={"solver": "cd"},
    k=1,
    rows=1,
)
@example(  # extrapolation's paths part on a flat objective (found by hypothesis)
    X=np.array([[0.0, 59], [0, 0], [0, 0], [62, 0], [0, 0], [2, 0.5], [0, 0]]),
    solver={"solver": "cd"},
    k=1,
    rows=1,
)
@example(  # tied singular values: two factorizations with the same error (found by hypothesis)
    X=np.array([[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]),
    solver={"solver": "cd"},
    k=1,
    rows=1,
)
def test_the_result_does_not_depend_on_the_panels_or_chunks(X, solver, k, rows):
    """One panel, panels of about ``rows`` rows in memory, and Dask chunks of ``rows`` rows:
    the same error, and the same W·H where it is unique.

    (The panel budget stays above what a one-row task needs: below it, X is factorized as Xᵀ,
    which updates H before W — the same fixed points, but on a degenerate X, such as
    [[1, 0], [0, 1]] with k = 1, not the same one. Where the k-th and (k+1)-th singular values
    of X are tied, the rounding of other sums may pick another of its equally good
    factorizations — [[1, 0, 0], [0, 0, 0], [0, 1, 0]] with k = 1 did — so W·H is compared only
    where they are apart. Where a fit reaches X to rounding, the objective is computed at its
    floor, ‖X‖² − 2⟨X, W·H⟩ + ⟨WᵀW, HHᵀ⟩ ≈ ε·‖X‖², and extrapolation's restarts follow that
    noise: on an 11 × 3 matrix of ones with k = 2 one fit stopped at an error of 0 and another
    mid-restart at 0.0012 (both near 1e-15 two iterations later; at 1e-98 a 3-row X reached
    1.9e-3 of ‖X‖), so there the errors are only held under 1% of ‖X‖. And extrapolation
    pushes along Y − Y′, a difference of nearly equal iterates when the steps are small, which
    multiplies the rounding of the sums: on a flat objective two layouts' paths part (a 7 × 2
    X, k = 1: 7e-9 apart in the objective after 7 iterations, W·H 0.23 against 0.14 where X
    has a 0 after 12, errors within 1e-7); where the objectives part, only the errors are
    compared.)"""
    one = _fit(X, solver, k)
    one_row_task = (3 * k + 1) * X.shape[1] * 8
    many = _fit(X, solver, k, panel_bytes=max(rows * X.shape[1] * 8, one_row_task))
    with dask.config.set(scheduler="synchronous"):
        chunked = _fit(da.from_array(X, chunks=(rows, X.shape[1])), solver, k)
    scale = float(X.max())
    s = np.linalg.svd(X, compute_uv=False)
    tied = k < len(s) and s[k - 1] - s[k] <= 1e-6 * (1.0 + s[0])
    sq_norm = float(np.sum(X**2))
    exact = one[1].reconstruction_err_ ** 2 <= 1e-10 * sq_norm
    for W, model in (many, chunked):
        path = np.array(model.loss_history_)
        parted = not np.allclose(path, one[1].loss_history_, rtol=1e-9, atol=1e-13 * sq_norm)
        pushed = model.solver == "cd" and model.extrapolate in ("auto", True)
        if not tied and not (parted and pushed):
            _close(W @ model.components_, one[0] @ one[1].components_, scale)
        if exact:
            assert model.reconstruction_err_**2 <= 1e-4 * sq_norm
        else:
            _close(model.reconstruction_err_, one[1].reconstruction_err_, scale)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, bool, np.float16])
def test_integer_bool_and_half_inputs_are_converted_as_scikit_learn_does(dtype):
    from sklearn.decomposition import NMF as SklearnNMF

    X = (np.random.default_rng(0).uniform(size=(30, 8)) * 3).astype(dtype)
    ours = NMF(2, init="random", random_state=0, max_iter=20, tol=0).fit(X)
    theirs = SklearnNMF(2, init="random", random_state=0, max_iter=20, tol=0).fit(X)
    assert ours.components_.dtype == theirs.components_.dtype == np.float64
    with dask.config.set(scheduler="synchronous"):
        lazy = NMF(2, init="random", random_state=0, max_iter=20, tol=0).fit(da.from_array(X))
    assert lazy.components_.dtype == np.float64
    np.testing.assert_allclose(lazy.components_, ours.components_, rtol=1e-10)


def test_float32_stays_float32_on_every_path():
    X = np.random.default_rng(0).uniform(size=(30, 8)).astype(np.float32)
    kwargs = dict(n_components=2, init="random", random_state=0, max_iter=5)
    assert NMF(**kwargs).fit_transform(X).dtype == np.float32
    assert NMF(**kwargs).fit_transform(sp.csr_matrix(X)).dtype == np.float32
    with dask.config.set(scheduler="synchronous"):
        model = NMF(**kwargs)
        W = model.fit_transform(da.from_array(X, chunks=(10, 8)))
    assert W.dtype == np.float32 and model.components_.dtype == np.float32
