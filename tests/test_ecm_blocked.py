"""Engine "ecm" of NMF-RE on a column-blocked Y (dnmf.mixed.ecm_blocked) and the ECM gaps of
spec §5.1 (``C_signed`` names, ``X_init`` forms).

The ECM loop is written once on block sums (:func:`dnmf.mixed.ecm.run_ecm`). The in-memory
fit runs it on one block, so: one block = the in-memory fit bit for bit; several blocks differ
only by summation order; the same blocks on 1 or 2 workers are bitwise identical (the executor
sums partials in a fixed tree in block order). The loop on the data as it was written before
(``reference_ecm`` below, a plain-NumPy transcription of spec §5.3) checks the statistics
rewrite itself.
"""

from __future__ import annotations

import warnings

import distributed
import numpy as np
import pytest

import dnmf
from orthodont_data import load_orthodont_frames
from dnmf.covariates._common import EPS, LAMBDA_FLOOR, cholesky_spd, clip_var, normalize_columns, ridge_solve, safe_div
from dnmf.engine import executor as executor_mod
from dnmf.mixed import nmfre_blocked
from dnmf.mixed.ecm import (ECMOptions, ECMState, _c_step_signed, fit_ecm, marginal_nll, marginal_nll_stats,
                            x_penalty, x_penalty_terms)
from dnmf.mixed.fit import nmfkc_eu_stats
from dnmf.exceptions import InputError

# spec §11.2 numbers, quoted to 7-15 digits (as tests/test_nmfre.py)
RTOL = 1e-6
# the statistics form vs the data form of the same loop, and several blocks vs one: only the
# summation order and the Gram identity for ‖R‖² differ (cancellation ‖Y‖²/‖R‖²·1e-16 ≈ 1e-13
# on Orthodont, amplified by at most ~40 iterations of a contracting map): 1e-10 is the brief's bound
TOL = 1e-10

FIT_FIELDS = ("X", "C", "U", "objfunc_iter", "rss_trace", "nll_trace")
SCALARS = ("sigma2", "tau2", "lambda_", "dfU", "ICC", "r_squared", "r_squared_fixed", "r_squared_uncentered",
           "r_squared_fixed_uncentered", "r_squared_centered", "r_squared_fixed_centered")


def rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.fixture(scope="module")
def orthodont():
    Y, A = load_orthodont_frames()
    return Y, A


@pytest.fixture(scope="module")
def start(orthodont):
    """nmfkc(Y, A, rank=1) (spec §2): the common start of the in-memory and blocked fits."""
    Y, A = (np.asarray(v, float) for v in orthodont)
    X0 = Y.mean(axis=1, keepdims=True)
    X, C, _ = nmfkc_eu_stats(X0 / X0.sum(), np.ones((1, 2)), Y @ A.T, A @ A.T, float(np.sum(Y * Y)), 1e-5)
    return X, C


@pytest.fixture(scope="module")
def fit_mem(orthodont, start):
    Y, A = orthodont
    return dnmf.nmfre(Y, A, rank=1, prefix="Trend", engine="ecm", X_init=start[0], C_init=start[1])


@pytest.fixture(scope="module")
def clients():
    """LocalClusters with 1 and 2 workers (threads: quick to start, same arithmetic)."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as c1, \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                     dashboard_address=":0") as c2, \
            distributed.Client(c1, set_as_default=False) as k1, distributed.Client(c2, set_as_default=False) as k2:
        yield k1, k2


@pytest.fixture
def gathered(monkeypatch):
    """Shapes of the arrays the client receives from the cluster, by spying on the executor."""
    shapes = []

    def collect(obj):
        if isinstance(obj, np.ndarray):
            shapes.append(obj.shape)
        elif isinstance(obj, (tuple, list)):
            for o in obj:
                collect(o)

    orig = executor_mod.DaskExecutor._results

    def spy(self, futures, timeout, what):
        out = orig(self, futures, timeout, what)
        collect(out)
        return out

    monkeypatch.setattr(executor_mod.DaskExecutor, "_results", spy)
    return shapes


def assert_bitwise(a, b):
    assert (a.n_iter, a.outer_iter, a.stop_reason) == (b.n_iter, b.outer_iter, b.stop_reason)
    for name in ("X", "C", "objfunc_iter", "rss_trace", "nll_trace"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for name in ("sigma2", "tau2", "lambda_", "dfU"):
        assert getattr(a, name) == getattr(b, name), name


def assert_close(a, b, tol=TOL, fields=FIT_FIELDS):
    assert (a.n_iter, a.outer_iter, a.stop_reason) == (b.n_iter, b.outer_iter, b.stop_reason)
    for name in fields:
        assert rel(getattr(a, name), getattr(b, name)) < tol, name
    for name in SCALARS:
        assert rel(getattr(a, name), getattr(b, name)) < tol, name


# ------------------------------------------------------------------------------------------
# The loop on the data (before the statistics rewrite): an independent reference
# ------------------------------------------------------------------------------------------


def reference_ecm(Y, A, X, C, U, sigma2, tau2, opt):
    """The ECM loops written on the data (Y, U in memory), as before the statistics rewrite."""
    P, N = Y.shape
    Q = opt.rank
    eye = np.eye(Q)
    AAt = A @ A.T
    Ypos = np.maximum(Y, 0.0)
    C0 = C.copy() if opt.C_signed else np.maximum(C, EPS)
    X, dsc = normalize_columns(np.maximum(X, EPS))
    C = C0 * dsc[:, None]
    U = U * dsc[:, None]
    st = ECMState(X=X, C=C, U=U, sigma2=sigma2, tau2=tau2)
    stop_all = False
    for outer in range(1, opt.outer_maxit + 1):
        st.outer = outer
        st.sigma2, st.tau2 = clip_var(st.sigma2), clip_var(st.tau2)
        lam = st.sigma2 / st.tau2
        prev = np.inf
        for _inner in range(opt.inner_maxit):
            st.total_iter += 1
            # 1. U step (no centring)
            CA = C @ A
            L = cholesky_spd(X.T @ X + max(lam, LAMBDA_FLOOR) * eye)
            U = ridge_solve(L, X.T @ (Y - X @ CA))
            # 2. X step
            B = CA + U
            pnum, pden = x_penalty_terms(X, opt.X_L2_ortho, opt.X_L2_smooth)
            if opt.C_signed:
                G = B @ B.T
                if opt.x_postvar:
                    G = G + N * clip_var(st.sigma2) * ridge_solve(L, eye)
                YBt = Y @ B.T
                num = np.maximum(YBt, 0) + X @ np.maximum(-G, 0) + pnum
                den = np.maximum(-YBt, 0) + X @ np.maximum(G, 0) + pden
                X = X * np.sqrt(safe_div(num, den))
            else:
                Bp = np.maximum(B, 0.0)
                X = X * safe_div(Ypos @ Bp.T + pnum, X @ (Bp @ Bp.T) + pden)
            X = np.maximum(X, EPS)
            X, dsc = normalize_columns(X)
            C = C * dsc[:, None]
            U = U * dsc[:, None]
            X = np.maximum(X, EPS)
            if not opt.C_signed:
                C = np.maximum(C, EPS)
            # 3. Θ step
            if opt.C_signed:
                C = _c_step_signed(X, Y, U, A, AAt, opt.C_L2)
            else:
                num = X.T @ np.maximum(Ypos - X @ U, 0.0) @ A.T
                C = np.maximum(C * safe_div(num, (X.T @ X) @ C @ AAt + opt.C_L2 * C), EPS)
            # 4. objective at fixed λ
            R = Y - X @ (C @ A + U)
            rss = float(np.sum(R * R))
            obj = rss + lam * float(np.sum(U * U)) + x_penalty(X, opt.X_L2_ortho, opt.X_L2_smooth) \
                + opt.C_L2 * float(np.sum(C * C))
            if st.total_iter <= opt.maxit:
                st.objfunc_iter.append(obj)
                st.rss_trace.append(rss)
                st.nll_trace.append(marginal_nll(Y, X, C, A, st.sigma2, st.tau2))
            if not np.isfinite(obj):
                st.stop_reason, st.converged, stop_all = "nonfinite_obj", False, True
                break
            st.rel = abs(prev - obj) / (abs(prev) + 1e-10) if np.isfinite(prev) else np.inf
            if st.rel < opt.epsilon or st.total_iter >= opt.maxit:
                break
            prev = obj
        st.X, st.C, st.U = X, C, U
        if stop_all:
            break
        # EM M-steps with the current X (both use the old σ²)
        R = Y - X @ (C @ A + U)
        Minv = ridge_solve(cholesky_spd(X.T @ X + max(lam, LAMBDA_FLOOR) * eye), eye)
        trH = Q - lam * float(np.trace(Minv))
        s_old = st.sigma2
        s_new = clip_var(float(np.mean(R * R)) + s_old * N * trH / (P * N))
        t_new = clip_var(float(np.sum(U * U)) / (N * Q) + s_old * float(np.trace(Minv)) / Q)
        if opt.sigma2_update:
            st.sigma2 = s_new
        if opt.tau2_update:
            st.tau2 = t_new
        lam_new = st.sigma2 / st.tau2
        if not (opt.sigma2_update or opt.tau2_update):
            st.converged, st.stop_reason = True, "fixed_lambda"
            break
        if abs(lam_new - lam) / (abs(lam) + 1e-10) < opt.epsilon_outer:
            st.converged, st.stop_reason = True, "outer_lambda"
            break
        if st.total_iter >= opt.maxit:
            st.stop_reason = "maxit"
            break
    if st.stop_reason == "maxit" and not st.converged and st.outer >= opt.outer_maxit and st.total_iter < opt.maxit:
        st.stop_reason = "outer_maxit"
    return st


# ------------------------------------------------------------------------------------------
# In memory: the statistics form equals the data form
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_statistics_loop_equals_data_loop(orthodont, start, signed):
    Y, A = (np.asarray(v, float) for v in orthodont)
    opt = ECMOptions(rank=1, C_signed=signed)
    got = fit_ecm(Y, A, *start, np.zeros((1, 27)), 1.0, 1.0, opt)
    want = reference_ecm(Y, A, *start, np.zeros((1, 27)), 1.0, 1.0, opt)
    assert (got.total_iter, got.outer, got.stop_reason) == (want.total_iter, want.outer, want.stop_reason)
    for name in ("X", "C", "U", "sigma2", "tau2", "objfunc_iter", "rss_trace", "nll_trace"):
        assert rel(getattr(got, name), getattr(want, name)) < TOL, name


def test_statistics_loop_rank2_penalties():
    """Rank 2 with both X penalties and the Sylvester ridge Θ step, signed and non-negative."""
    rng = np.random.default_rng(4)
    P, N, Q = 9, 80, 2
    A = np.vstack([np.ones(N), rng.integers(0, 2, N)])
    Y = np.maximum(rng.dirichlet(np.ones(P), Q).T @ (np.array([[20.0, 4.0], [6.0, 9.0]]) @ A
                                                     + rng.normal(0, 2, (Q, N))) + rng.normal(0, 0.3, (P, N)), 0)
    X0, C0 = rng.uniform(0.5, 1.5, (P, Q)), np.ones((Q, 2))
    for signed in (True, False):
        opt = ECMOptions(rank=Q, C_signed=signed, maxit=60, X_L2_ortho=0.3, X_L2_smooth=0.2, C_L2=0.5)
        got = fit_ecm(Y, A, X0, C0, np.zeros((Q, N)), 1.0, 1.0, opt)
        want = reference_ecm(Y, A, X0, C0, np.zeros((Q, N)), 1.0, 1.0, opt)
        assert got.total_iter == want.total_iter
        for name in ("X", "C", "U", "sigma2", "tau2", "nll_trace"):
            # 60 iterations of a rank-2 fit: the 1e-16 rounding differences grow to ~1e-12
            assert rel(getattr(got, name), getattr(want, name)) < 1e-9, (signed, name)


def test_marginal_nll_from_statistics_equals_data_form():
    rng = np.random.default_rng(2)
    P, N, Q, K = 6, 40, 2, 3
    Y, A, X, C = rng.random((P, N)), rng.random((K, N)), rng.random((P, Q)), rng.normal(size=(Q, K))
    want = marginal_nll(Y, X, C, A, 1.7, 3.1)
    got = marginal_nll_stats(float(np.sum(Y * Y)), Y @ A.T, A @ A.T, X.T @ Y @ Y.T @ X, X, C, N, 1.7, 3.1)
    assert got == pytest.approx(want, rel=1e-12)  # two algebraic forms of one number


# ------------------------------------------------------------------------------------------
# Blocked = in memory (spec §11.2)
# ------------------------------------------------------------------------------------------


def test_blocked_one_block_is_the_in_memory_fit(orthodont, start, fit_mem):
    Y, A = orthodont
    b = nmfre_blocked(Y, A, rank=1, prefix="Trend", engine="ecm", X_init=start[0], C_init=start[1], n_blocks=1,
                      client=False, gather_U=True, wild_B=1000)
    assert_bitwise(b, fit_mem)
    assert np.array_equal(b.U, fit_mem.U)
    # R² from block sums vs from the in-memory fitted matrix: summation order only
    assert_close(b, fit_mem)
    # one block: the bootstrap keys (block 0, chunk c) of nmfre_inference
    inf = dnmf.nmfre_inference(fit_mem, Y, A, wild_B=1000, client=False)
    assert b.C_p_side == inf.C_p_side == "two.sided"
    for name in ("C_se", "C_se_boot", "C_ci_lower", "C_ci_upper", "sigma2_used"):
        assert rel(getattr(b, name), getattr(inf, name)) < TOL, name


def test_blocked_default_init_matches_r(orthodont):
    """Spec §11.2 from the blocked initialiser (nmfkc's EU iterations on the block statistics)."""
    Y, A = orthodont
    f = nmfre_blocked(Y, A, rank=1, prefix="Trend", engine="ecm", n_blocks=4, client=False, wild_B=1000,
                      r_rng=True)
    assert (f.n_iter, f.outer_iter, f.stop_reason, f.converged) == (41, 20, "outer_lambda", True)
    assert rel(f.X[:, 0], [0.230812395272797, 0.240801738512061, 0.256734995577784, 0.271650870637359]) < RTOL
    assert rel(f.C[0], [90.5057742127883, 9.42269696507409]) < RTOL
    for got, want in zip((f.sigma2, f.tau2, f.lambda_, f.dfU, f.ICC),
                         (1.9327950810, 48.1907922508, 0.0401071448, 23.2796650689, 0.6100380531)):
        assert rel(got, want) < RTOL
    assert [round(v, 4) for v in (f.r_squared, f.r_squared_fixed)] == [0.8246, 0.4167]
    assert round(f.nll_trace[0], 4) == 331.9187 and round(f.nll_trace[-1], 4) == 215.5869
    t = f.coefficients
    assert rel(f.sigma2_used, 1.9795258633) < RTOL
    assert rel(t["SE"], [2.471719, 3.056691]) < RTOL
    assert rel(t["BSE"], [2.524297, 3.070269]) < RTOL  # R's stream (r_rng=True)
    assert rel(t["CI_low"], [85.377703, 3.549886]) < RTOL


def test_blocked_nonneg_matches_r(orthodont):
    Y, A = orthodont
    f = nmfre_blocked(Y, A, rank=1, engine="ecm", C_signed="nonneg", n_blocks=3, client=False, wild_B=500,
                      r_rng=True)
    assert (f.n_iter, f.outer_iter, f.C_signed, f.C_p_side) == (38, 19, False, "one.sided")
    assert rel(f.C[0], [90.431326, 9.543432]) < RTOL
    for got, want in zip((f.sigma2, f.tau2, f.lambda_, f.dfU, f.ICC),
                         (1.9318793, 48.2777650, 0.0400159, 23.28696, 0.6105796)):
        assert rel(got, want) < RTOL
    assert rel(f.coefficients["SE"], [2.460762, 3.043119]) < RTOL


def test_blocked_on_one_and_two_workers(orthodont, start, fit_mem, clients, gathered):
    """Same blocks on 1 and 2 workers: bitwise identical fits and bootstrap; Y and U stay there."""
    Y, A = orthodont
    kw = dict(rank=1, prefix="Trend", engine="ecm", X_init=start[0], C_init=start[1], n_blocks=4, wild_B=300,
              wild_seed=7)
    fits = [nmfre_blocked(Y, A, client=c, **kw) for c in clients]
    P, N, QK = 4, 27, 2
    # the client received only statistics — P × K, K × K, P × Q, Q × Q, K × Q and the bootstrap
    # partials QK × wild_B — never an array with an axis of length N (Y_j, U_j, a score block)
    assert gathered and all(N not in shape for shape in gathered)
    assert max(int(np.prod(s)) for s in gathered) == QK * 300
    for f in fits:
        assert f.U is None and len(f.U_blocks) == 4 and all(hasattr(h, "key") for h in f.U_blocks)
    a, b = fits
    assert_bitwise(a, b)
    for name in ("C_se", "C_se_boot", "C_ci_lower", "C_ci_upper"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    # four blocks vs the in-memory fit: summation order only
    loc = nmfre_blocked(Y, A, client=False, gather_U=True, **kw)
    assert_close(loc, fit_mem)
    assert_bitwise(loc, a)  # the thread pool and the cluster sum in the same tree
    assert np.array_equal(loc.C_se_boot, a.C_se_boot)
    U = np.concatenate(clients[0].gather(a.U_blocks), axis=1)  # the U blocks stayed on the worker
    assert np.array_equal(U, loc.U)


def test_blocked_rank2_sparse_blocks_equal_in_memory():
    """Rank 2, CSC blocks of unequal width, penalties: the blocked fit = the in-memory fit."""
    import scipy.sparse as sp

    from dnmf.io.blocks import BlockedMatrix, CSCBlock, InMemorySource

    rng = np.random.default_rng(5)
    P, N, Q = 7, 150, 2
    A = np.vstack([np.ones(N), rng.integers(0, 2, N), rng.uniform(0, 1, N)])
    Y = np.maximum(rng.dirichlet(np.ones(P), Q).T @ (rng.uniform(3, 12, (Q, 3)) @ A + rng.normal(0, 2, (Q, N)))
                   + rng.normal(0, 0.5, (P, N)) - 0.3, 0)
    bounds = [0, 20, 90, 150]
    srcs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        m = sp.csc_array(Y[:, lo:hi])
        srcs.append(InMemorySource(CSCBlock(m.data, m.indices, m.indptr, P)))
    Yb = BlockedMatrix(shape=Y.shape, dtype=np.dtype(np.float64), sources=tuple(srcs), sparse=True)
    X0, C0 = rng.uniform(0.5, 1.5, (P, Q)), np.ones((Q, 3))
    kw = dict(rank=Q, engine="ecm", X_init=X0, C_init=C0, maxit=80, X_L2_ortho=0.2, C_L2=0.1, wild_bootstrap=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dnmf.ConvergenceWarning)
        f = dnmf.nmfre(Y, A, **kw)
        b = nmfre_blocked(Yb, A, client=False, gather_U=True, **kw)
    # 80 iterations of a rank-2 fit: rounding differences grow to ~1e-12
    assert_close(b, f, tol=1e-9)
    assert np.array_equal(b.X_cluster, f.X_cluster)


def test_c_signed_names(orthodont, start):
    Y, A = orthodont
    kw = dict(rank=1, engine="ecm", X_init=start[0], C_init=start[1], n_blocks=2, client=False, wild_bootstrap=False)
    assert_bitwise(nmfre_blocked(Y, A, C_signed="signed", **kw), nmfre_blocked(Y, A, C_signed=True, **kw))
    assert_bitwise(nmfre_blocked(Y, A, C_signed="nonneg", **kw), nmfre_blocked(Y, A, C_signed=False, **kw))
    with pytest.raises(InputError, match="'C_signed'.*'signed', 'nonneg'"):
        nmfre_blocked(Y, A, C_signed="positive", **kw)


# ------------------------------------------------------------------------------------------
# Spec §5.1: X_init forms
# ------------------------------------------------------------------------------------------


def test_x_init_matrix_without_c_init_holds_x_fixed_in_nmfkc(orthodont):
    """nmfkc(X.init=X, X.restriction="fixed") gives Θ; the start is used, not dropped."""
    from dnmf.mixed.ecm import ecm_initialize, nmfkc_c_stats

    Y, A = (np.asarray(v, float) for v in orthodont)
    Xg = np.array([[0.3], [0.2], [0.25], [0.25]])
    X, C = ecm_initialize(Y, A, 1, X_init=Xg)
    assert np.array_equal(X, Xg)
    C_stats, _ = nmfkc_c_stats(Xg, np.ones((1, 2)), Y @ A.T, A @ A.T, float(np.sum(Y * Y)), 1e-5)
    assert rel(C, C_stats) < 1e-10  # nmfkc on the data vs its iterations on the statistics
    opt = ECMOptions(rank=1)
    from_x = fit_ecm(Y, A, X, C, None, 1.0, 1.0, opt)
    default = fit_ecm(Y, A, *ecm_initialize(Y, A, 1), None, 1.0, 1.0, opt)
    assert from_x.total_iter != default.total_iter  # a different start, a different path
    b = nmfre_blocked(Y, A, rank=1, engine="ecm", X_init=Xg, n_blocks=3, client=False, wild_bootstrap=False)
    assert b.n_iter == from_x.total_iter
    assert rel(b.C, from_x.C) < TOL and rel(b.X, from_x.X) < TOL


@pytest.mark.parametrize("method", ["kmeans", "runif", "nndsvd", "kmeans++"])
def test_x_init_method_names(method):
    """A method name is nmfkc's start; blocked (all columns in the subsample) = in memory."""
    from dnmf.mixed.ecm import ecm_initialize

    rng = np.random.default_rng(8)
    P, N = 6, 120
    A = np.vstack([np.ones(N), rng.integers(0, 2, N)])
    Y = np.maximum(rng.dirichlet(np.ones(P), 2).T @ (np.array([[20.0, 4.0], [6.0, 9.0]]) @ A
                                                     + rng.normal(0, 2, (2, N))), 0)
    X0, C0 = ecm_initialize(Y, A, 2, X_init=method, seed=3)
    opt = ECMOptions(rank=2, maxit=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dnmf.ConvergenceWarning)  # 30 iterations: the start is the point
        f = fit_ecm(Y, A, X0, C0, None, 1.0, 1.0, opt)
        b = nmfre_blocked(Y, A, rank=2, engine="ecm", X_init=method, seed=3, init_sample=N, n_blocks=3, maxit=30,
                          client=False, wild_bootstrap=False)
    o = np.argsort((np.arange(1, P + 1) / P) @ f.X, kind="stable")  # the result's basis order
    # nmfkc on the data vs its EU iterations on the block statistics (1e-12), then 30 iterations
    assert rel(b.X, f.X[:, o]) < 1e-8 and rel(b.C, f.C[o]) < 1e-8


def test_x_init_rejects_unknown_names(orthodont):
    from dnmf.mixed.ecm import ecm_initialize

    Y, A = (np.asarray(v, float) for v in orthodont)
    with pytest.raises(InputError, match="'X_init'.*'nndsvd'"):
        ecm_initialize(Y, A, 1, X_init="svd")
    with pytest.raises(InputError, match="'X_init'.*'kmeans'"):
        nmfre_blocked(Y, A, rank=1, engine="ecm", X_init="svd", client=False)
    with pytest.raises(InputError, match="'X_init'"):
        ecm_initialize(Y, A, 1, X_init=-np.ones((4, 1)))


def test_nmfre_ecm_accepts_spec_x_init_and_c_signed_forms(orthodont):
    Y, A = orthodont
    Xg = np.array([[0.3], [0.2], [0.25], [0.25]])
    f = dnmf.nmfre(Y, A, rank=1, engine="ecm", X_init=Xg)
    b = nmfre_blocked(Y, A, rank=1, engine="ecm", X_init=Xg, client=False, wild_bootstrap=False)
    assert f.n_iter == b.n_iter
    assert dnmf.nmfre(Y, A, rank=1, engine="ecm", X_init="nndsvd").converged
    assert not dnmf.nmfre(Y, A, rank=1, engine="ecm", C_signed="nonneg").C_signed
