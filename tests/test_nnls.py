"""NNLS kernels against scipy.optimize.nnls on hundreds of random problems."""

import numpy as np
import pytest
from scipy.optimize import nnls as scipy_nnls

from dnmf.kernels.nnls import (SOLVER_CD, SOLVER_CHOLESKY, SOLVER_EXACT, active_set_solve, cd_solve, chol_solve,
                               nnls_batch)


def _problem(rng, k, m=None, cond=None):
    """A least-squares problem min‖F x − a‖ with F (m × k); optionally ill-conditioned."""
    m = m or 3 * k + 5
    F = rng.standard_normal((m, k))
    if cond is not None:
        U, _, Vt = np.linalg.svd(F, full_matrices=False)
        F = U @ np.diag(np.logspace(0, -np.log10(cond), k)) @ Vt
    a = rng.standard_normal(m) + 0.5 * F @ np.abs(rng.standard_normal(k))
    return F, a


def _objective(F, a, x):
    return float(np.sum((F @ x - a) ** 2))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 13, 21, 32, 48, 64])
def test_exact_matches_scipy(k):
    rng = np.random.default_rng(k)
    for _ in range(30):
        F, a = _problem(rng, k)
        G, b = F.T @ F, F.T @ a
        ref, _ = scipy_nnls(F, a, maxiter=50 * k)
        x = np.zeros(k)
        active_set_solve(G, b, x, True, False)
        # Both are exact solvers of a strictly convex problem; the solution is unique and the
        # difference is rounding in the normal equations (cond(G) = cond(F)^2 ≲ 1e4 here).
        np.testing.assert_allclose(x, ref, rtol=1e-7, atol=1e-9 * np.abs(ref).max())
        assert (x >= 0).all()


@pytest.mark.parametrize("k", [4, 10, 24])
@pytest.mark.parametrize("cond", [1e4, 1e6])
def test_exact_ill_conditioned_objective(k, cond):
    rng = np.random.default_rng(int(cond) + k)
    for _ in range(20):
        F, a = _problem(rng, k, cond=cond)
        G, b = F.T @ F, F.T @ a
        ref, _ = scipy_nnls(F, a, maxiter=50 * k)
        x = np.zeros(k)
        active_set_solve(G, b, x, True, False)
        # The solver works on the normal equations, so cond(G) = cond(F)² up to 1e12 and the
        # minimizer is ill-determined along the weak directions; the objective is not: its
        # relative excess is second order in the ~eps·cond(G) = 1e-4 solution error, ≲ 1e-9
        # (measured: 1e-11 at cond(F) = 1e6; at cond(F) = 1e7 the normal equations lose it).
        f_ref, f = _objective(F, a, ref), _objective(F, a, x)
        assert (x >= 0).all() and np.isfinite(x).all()
        assert f <= f_ref * (1 + 1e-9) + 1e-12


def test_exact_warm_start_same_solution():
    rng = np.random.default_rng(7)
    for _ in range(50):
        k = int(rng.integers(2, 30))
        F, a = _problem(rng, k)
        G, b = F.T @ F, F.T @ a
        ref, _ = scipy_nnls(F, a, maxiter=50 * k)
        x = np.abs(rng.standard_normal(k)) * (rng.random(k) < 0.5)  # arbitrary warm support
        active_set_solve(G, b, x, True, True)
        np.testing.assert_allclose(x, ref, rtol=1e-7, atol=1e-9 * max(np.abs(ref).max(), 1))  # as above


def test_exact_unconstrained_and_singular():
    rng = np.random.default_rng(3)
    F, a = _problem(rng, 6)
    G, b = F.T @ F, F.T @ a
    x = np.zeros(6)
    active_set_solve(G, b, x, False, False)
    np.testing.assert_allclose(x, np.linalg.lstsq(F, a, rcond=None)[0], rtol=1e-9)  # well-conditioned lstsq
    # A zero column in F (a collapsed factor) makes G singular: no NaN, that coordinate stays 0.
    F[:, 2] = 0
    G, b = F.T @ F, F.T @ a
    x = np.zeros(6)
    active_set_solve(G, b, x, True, False)
    ref, _ = scipy_nnls(F, a)
    assert np.isfinite(x).all() and x[2] == 0
    assert _objective(F, a, x) <= _objective(F, a, ref) * (1 + 1e-9)


@pytest.mark.parametrize("k", [2, 5, 10, 20])
def test_cd_converges_to_scipy(k):
    rng = np.random.default_rng(100 + k)
    for _ in range(25):
        F, a = _problem(rng, k)
        G, b = F.T @ F, F.T @ a
        ref, _ = scipy_nnls(F, a, maxiter=50 * k)
        x = np.zeros(k)
        cd_solve(G, b, x, True, 5000, 1e-14, False)
        # CD converges linearly; after up to 5000 sweeps with tol 1e-14 the objective gap is
        # at rounding level relative to the optimum.
        assert _objective(F, a, x) <= _objective(F, a, ref) * (1 + 1e-8) + 1e-12
        assert (x >= 0).all()


def test_cd_matches_rcppml_rule():
    """One sweep of the spec's pseudo-code (rcppml.md §2.5), written out in NumPy."""
    rng = np.random.default_rng(11)
    F, a = _problem(rng, 6)
    G, b = F.T @ F, F.T @ a
    x_ref = np.zeros(6)
    r = b.copy()
    for i in range(6):
        delta = r[i] / G[i, i]
        if x_ref[i] + delta < 0:
            delta = -x_ref[i]
        x_ref[i] += delta
        r -= G[:, i] * delta
    x = np.zeros(6)
    assert cd_solve(G, b, x, True, 1, 0.0, False) == 1
    np.testing.assert_allclose(x, x_ref, rtol=1e-14)  # same arithmetic, same order


def test_cd_warm_start_and_tolerance():
    rng = np.random.default_rng(12)
    F, a = _problem(rng, 8)
    G, b = F.T @ F, F.T @ a
    ref, _ = scipy_nnls(F, a)
    x = ref.copy()
    sweeps = cd_solve(G, b, x, True, 100, 1e-8, True)
    assert sweeps <= 2  # started at the optimum: the first sweep changes nothing measurable
    np.testing.assert_allclose(x, ref, rtol=1e-8, atol=1e-12)
    y = np.zeros(8)
    cold = cd_solve(G, b, y, True, 100, 1e-8, False)
    assert cold > sweeps


def test_cholesky_clip_is_clipped_unconstrained():
    rng = np.random.default_rng(5)
    F, a = _problem(rng, 7)
    G, b = F.T @ F, F.T @ a
    x = np.zeros(7)
    chol_solve(np.linalg.cholesky(G), b, x, True)
    np.testing.assert_allclose(x, np.maximum(np.linalg.solve(G, b), 0), rtol=1e-10)  # well-conditioned
    chol_solve(np.linalg.cholesky(G), b, x, False)
    np.testing.assert_allclose(x, np.linalg.solve(G, b), rtol=1e-10)


@pytest.mark.parametrize("solver", [SOLVER_CD, SOLVER_CHOLESKY, SOLVER_EXACT])
def test_batch_with_l1(solver):
    rng = np.random.default_rng(21)
    k, n = 6, 40
    F = np.abs(rng.standard_normal((30, k)))
    A = np.abs(rng.standard_normal((30, n)))
    G = F.T @ F
    B = np.ascontiguousarray(F.T @ A)
    l1 = 0.3
    X = np.zeros((k, n))
    L = np.linalg.cholesky(G) if solver == SOLVER_CHOLESKY else np.zeros((0, 0))
    nnls_batch(G, L, B, X, solver, True, 2000, 1e-14, False, l1)
    for c in range(n):
        if solver == SOLVER_CHOLESKY:
            ref = np.maximum(np.linalg.solve(G, B[:, c] - l1), 0)
            np.testing.assert_allclose(X[:, c], ref, rtol=1e-10, atol=1e-12)
        else:
            # NNLS of (G, b − l1) is the lasso-penalized problem; reference via an augmented
            # system: min ‖Fx − a‖²/2 + l1·Σx  ⇔  scipy nnls on [F; ·] is awkward, so compare the
            # KKT conditions directly: x ≥ 0, grad ≥ −tol, x·grad ≈ 0.
            x = X[:, c]
            grad = G @ x - (B[:, c] - l1)
            assert (x >= 0).all()
            assert grad.min() > -1e-7 * np.abs(B[:, c]).max()  # dual feasibility to CD accuracy
            assert abs(x @ grad) < 1e-7 * np.abs(B[:, c]).max() * max(x.sum(), 1)


@pytest.mark.parametrize("solver", [SOLVER_CD, SOLVER_EXACT])
def test_w_update_on_threads_is_bitwise_one_thread(monkeypatch, solver):
    # The W update solves its rows in ranges on a thread pool (solvers/updates.py::_solve_rows);
    # rows are independent, so W must equal the one-call solve bit for bit, warm start included.
    import dnmf.solvers.updates as updates

    rng = np.random.default_rng(8)
    k, m = 7, 2_003  # ranges of uneven sizes
    H = np.abs(rng.standard_normal((k, 300)))
    A = np.abs(rng.standard_normal((m, 300)))
    G, P = H @ H.T, A @ H.T
    w_prev = np.abs(rng.standard_normal((m, k)))
    B = np.ascontiguousarray(P.T)
    one = np.ascontiguousarray(w_prev.T)
    nnls_batch(G, np.zeros((0, 0)), B, one, solver, True, 50, 1e-8, True, 0.01)
    monkeypatch.setattr(updates, "_THREADED_MIN_ROWS", 100)
    threaded = updates.update_factor(G, P, 0.01, 0.0, solver, True, 50, 1e-8, w_prev=w_prev, n_threads=3)
    np.testing.assert_array_equal(threaded, one.T)
    # and it is the NNLS solution: scipy on a few rows (G = HHᵀ, p_i − l1 ⇔ the normal equations)
    if solver == SOLVER_EXACT:
        Lh = np.linalg.cholesky(G)
        for i in (0, 1000, m - 1):
            rhs = np.linalg.solve(Lh, P[i] - 0.01)
            ref, _ = scipy_nnls(Lh.T, rhs)
            np.testing.assert_allclose(threaded[i], ref, rtol=1e-8, atol=1e-10)  # two exact NNLS methods
