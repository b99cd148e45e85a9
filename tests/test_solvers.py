"""Update rules against scikit-learn's own implementation of the same step."""

import dataclasses

import dask
import numpy as np
import pytest
from sklearn.decomposition._nmf import _multiplicative_update_w, _update_coordinate_descent

from dasknmf.objective import Objective
from dasknmf.solvers import get_solver, hals, mu

rng = np.random.default_rng(1)
X = rng.uniform(size=(50, 20))
W0 = rng.uniform(size=(50, 4))
H = rng.uniform(size=(4, 20))


@pytest.mark.parametrize("l1, l2", [(0.0, 0.0), (0.3, 0.0), (0.0, 2.0), (0.5, 1.0)])
def test_one_hals_sweep_is_sklearn_cd_update(l1, l2):
    W_sk = W0.copy()
    violation_sk = _update_coordinate_descent(
        X, W_sk, np.ascontiguousarray(H.T), l1, l2, shuffle=False, random_state=None
    )
    F, violation = hals.update(W0.T.copy(), H @ H.T, H @ X.T, l1=l1, l2=l2, n_sweeps=1)
    np.testing.assert_allclose(F.T, W_sk, rtol=1e-10, atol=1e-12)
    assert violation == pytest.approx(violation_sk, rel=1e-10)


def test_hals_follows_the_given_component_order():
    order = [2, 0, 3, 1]
    F_ordered, _ = hals.update(W0.T.copy(), H @ H.T, H @ X.T, order=order)
    # Visiting in ``order`` is the plain sweep on permuted components.
    F_perm, _ = hals.update(W0.T[order].copy(), (H @ H.T)[np.ix_(order, order)], (H @ X.T)[order])
    np.testing.assert_allclose(F_ordered[order], F_perm, rtol=1e-12)


def test_hals_sweeps_decrease_the_objective_to_the_nnls_solution():
    def objective(F):
        return 0.5 * np.sum((X - F.T @ H) ** 2)

    F = W0.T.copy()
    values = [objective(F)]
    for _ in range(200):
        F, _ = hals.update(F, H @ H.T, H @ X.T)
        values.append(objective(F))
    assert np.all(np.diff(values) <= 1e-12)
    # KKT conditions of min ½‖X − Fᵀ H‖², F ≥ 0: gradient ≥ 0, zero where F > 0.
    gradient = H @ H.T @ F - H @ X.T
    assert np.all(F >= 0)
    assert np.all(gradient >= -1e-6)
    np.testing.assert_allclose(gradient[F > 1e-8], 0, atol=1e-6)


def test_hals_leaves_a_component_with_zero_curvature_alone():
    gram = H @ H.T
    gram[1, :] = gram[:, 1] = 0
    F, _ = hals.update(W0.T.copy(), gram, H @ X.T)
    np.testing.assert_array_equal(F[1], W0.T[1])


@pytest.mark.parametrize("stacked", [False, True])
def test_hals_leaves_a_component_with_curvature_below_rounding_alone(stacked):
    """A component of the other factor at 1e-20 of the rest (curvature 1e-40 of the largest,
    below ε²): the coupling's rounding divided by it would be the step (an extrapolated fit
    turned such a component of W into 1e130 and overflowed). At 1e-10 it is updated."""
    cross = H @ X.T
    for factor, moved in ((1e-20, False), (1e-10, True)):
        h = H.copy()
        h[1] *= factor
        gram, cross_1 = h @ h.T, cross.copy()
        cross_1[1] *= factor
        F0 = W0.T.copy()
        if stacked:
            F, _ = hals.update(F0[None].copy(), gram[None], cross_1[None])
            F = F[0]
        else:
            F, _ = hals.update(F0.copy(), gram, cross_1)
        assert np.array_equal(F[1], F0[1]) != moved
        assert np.all(np.isfinite(F)) and not np.array_equal(F[0], F0[0])


def _hals_by_component(F, gram, cross, n_sweeps, order):
    """HALS as written component by component, its violation summed as each is met."""
    diag = np.diag(gram).copy()
    violation = 0.0
    for sweep in range(n_sweeps):
        for t in order:
            if diag[t] == 0:
                grad = gram[t] @ F - cross[t]
            else:
                unclipped = F[t] + (cross[t] - gram[t] @ F) / diag[t]
                grad = diag[t] * (F[t] - unclipped)
            if sweep == 0:
                projected = np.where(F[t] == 0, np.minimum(grad, 0), grad)
                violation += float(np.abs(projected).sum(dtype=np.float64))
            if diag[t] != 0:
                F[t] = np.maximum(unclipped, 0)
    return F, violation


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_hals_violation_is_the_first_sweeps_projected_gradient_met_component_by_component(dtype):
    """The violation is formed after the first sweep from all components at once: the same
    value as summing each component's projected gradient when its update is met (zeros in F,
    a flat component, an order of visits), and the same factor."""
    gram, cross = H @ H.T, H @ X.T
    gram[2, :] = gram[:, 2] = 0
    F0 = W0.T.astype(dtype)
    F0[:, ::3] = 0
    order = [3, 1, 2, 0]
    F, violation = hals.update(F0.copy(), gram, cross, n_sweeps=3, order=order)
    F_ref, violation_ref = _hals_by_component(F0.copy(), gram, cross, 3, order)
    np.testing.assert_allclose(F, F_ref, rtol=1e-5 if dtype == np.float32 else 1e-12)
    assert violation == pytest.approx(violation_ref, rel=1e-5 if dtype == np.float32 else 1e-12)
    assert violation > 0
    F, violation = hals.update(F0.copy(), gram, cross, n_sweeps=0)
    np.testing.assert_array_equal(F, F0)
    assert violation == 0.0


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("l2", [0.0, 0.2])
def test_stacked_hals_problems_are_each_solved_alone(compiled, dtype, l2):
    """``hals.update`` on (R, k, r) problems (stacked replicates, compiled or numpy) is the
    update of each problem alone, penalties, component order and a flat component included;
    its violation is each problem's."""
    rng = np.random.default_rng(2)
    F0 = rng.uniform(size=(3, 4, 50)).astype(dtype)
    Hs = rng.uniform(size=(3, 4, 20))
    grams = (Hs @ Hs.transpose(0, 2, 1)).astype(dtype)
    grams[1, 2, :] = grams[1, :, 2] = 0  # problem 1's component 2 is flat: left alone
    cross = (Hs @ X.T).astype(dtype)
    params = dict(l1=0.1, l2=l2, n_sweeps=3, order=[2, 0, 3, 1])
    with dask.config.set({"dasknmf.compiled": compiled}):
        F, violation = hals.update(F0.copy(), grams, cross, **params)
    alone = [hals.update(F0[r].copy(), grams[r], cross[r], **params) for r in range(3)]
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for r, (F_r, _) in enumerate(alone):
        np.testing.assert_allclose(F[r], F_r, rtol=rtol, atol=rtol)
    if not l2:  # (an L2 penalty gives the flat component a curvature)
        np.testing.assert_array_equal(F[1, 2], F0[1, 2])
    assert violation.shape == (3,)
    np.testing.assert_allclose(violation, [v for _, v in alone], rtol=rtol)


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_stacked_fits_of_several_ranks_are_each_updated_alone(solver, contiguous):
    """``Objective.update`` on stacked fits of ranks (2, 2, 3, 1) with their own sweeps: each
    fit's block of F is its update alone (with its diagonal block of the Gram matrix), in
    place; the violation is each fit's. A frozen fit is left as it is, its violation 0."""
    ranks, sweeps = (2, 2, 3, 1), (3, 3, 2, 4)
    objective = Objective(sum(ranks), solver=solver, ranks=ranks)
    rng = np.random.default_rng(5)
    F0 = rng.uniform(size=(sum(ranks), 50))
    H_all = rng.uniform(size=(sum(ranks), 20))
    gram = objective.gram(H_all)
    cross = H_all @ X.T
    F = F0.copy() if contiguous else np.asfortranarray(F0)
    out, violation = objective.update(F, gram, cross, l1=0.1, l2=0.2, n_sweeps=sweeps, order=None)
    assert out is F
    alone = []
    for part, n in zip(objective.fit_slices(), sweeps, strict=True):
        assert not gram[part, : part.start].any() and not gram[part, part.stop :].any()
        f, v = get_solver(solver).update(
            F0[part].copy(), gram[part, part], cross[part], l1=0.1, l2=0.2, n_sweeps=n
        )
        np.testing.assert_allclose(F[part], f, rtol=1e-12, atol=1e-14)
        alone.append(v)
    np.testing.assert_allclose(violation, alone, rtol=1e-12)  # NaN for 'mu'
    objective = dataclasses.replace(objective, frozen=frozenset({0, 2}))
    F = F0.copy()
    _, violation = objective.update(F, gram, cross, l1=0.1, l2=0.2, n_sweeps=sweeps, order=None)
    parts = objective.fit_slices()
    for i in (0, 2):
        np.testing.assert_array_equal(F[parts[i]], F0[parts[i]])
        assert violation[i] == 0
    for i in (1, 3):
        assert not np.array_equal(F[parts[i]], F0[parts[i]])
    np.testing.assert_allclose(violation[[1, 3]], np.array(alone)[[1, 3]], rtol=1e-12)


@pytest.mark.parametrize("l1, l2", [(0.0, 0.0), (0.3, 0.7)])
def test_one_mu_update_is_sklearn_mu_update(l1, l2):
    W_sk, *_ = _multiplicative_update_w(
        X, W0.copy(), H, beta_loss=2, l1_reg_W=l1, l2_reg_W=l2, gamma=1.0
    )
    F, violation = mu.update(W0.T.copy(), H @ H.T, H @ X.T, l1=l1, l2=l2)
    np.testing.assert_allclose(F.T, W_sk, rtol=1e-12)
    assert np.isnan(violation)


def test_mu_guards_a_zero_denominator():
    F = np.zeros((2, 3))
    F, _ = mu.update(F, np.zeros((2, 2)), np.ones((2, 3)))
    assert np.all(np.isfinite(F))


def test_stopping_rules():
    assert not hals.converged(2, 1e-2, {"violation": [10.0, 1.0]})
    assert hals.converged(2, 1e-1, {"violation": [10.0, 1.0]})
    assert hals.converged(1, 1e-4, {"violation": [0.0]})  # already stationary
    errors = [10.0] + [5.0] * 20
    assert not mu.converged(5, 1e-4, {"error": errors})  # only every 10 iterations
    assert mu.converged(20, 1e-4, {"error": errors})  # no change between checks 10 and 20
    assert not mu.converged(10, 1e-4, {"error": errors})  # halved since the initialization
    assert not mu.converged(10, 1e-4, {"error": [0.0] * 11})  # no measure (was 0 / 0)


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("scale", [0.0, 1e-200], ids=["zero", "squares-underflow"])
def test_mu_fits_x_whose_error_at_the_start_is_zero(beta_loss, scale):
    """The 'mu' rule divided by the error at the initialization: a zero X (or one of 1e-200,
    whose squares underflow) raised ZeroDivisionError. An error of zero there measures
    nothing: the fit goes on to max_iter, as scikit-learn's (stopping at the first check
    left X·1e-200 at 1.8 times the relative error of X's fit). KL at 1e-200 scales with X and
    does not underflow: it stops by its rule."""
    from dasknmf import NMF

    X = np.random.default_rng(0).uniform(size=(6, 4))
    model = NMF(2, solver="mu", beta_loss=beta_loss, init="random", random_state=0)
    W = model.fit_transform(X * scale)
    assert np.all(np.isfinite(model.components_))
    if beta_loss == "frobenius" or not scale:
        assert model.n_iter_ == 200
    else:
        assert model.n_iter_ < 200
    if scale and beta_loss == "frobenius":  # X's fit, scaled (KL clips W·H at 1e-16, as
        # scikit-learn does: at small scales it fits another problem, the same as there)
        reference = NMF(2, solver="mu", beta_loss=beta_loss, init="random", random_state=0)
        W_x = reference.fit_transform(X)
        c = np.sqrt(scale)
        error = np.linalg.norm(X - (W / c) @ (model.components_ / c))
        assert error <= np.linalg.norm(X - W_x @ reference.components_) * 1.01


def test_get_solver_names():
    assert get_solver("cd") is get_solver("hals") is hals
    assert get_solver("mu") is mu
    with pytest.raises(ValueError, match="Unknown solver 'bpp'"):
        get_solver("bpp")
