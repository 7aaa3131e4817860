"""The §8 penalties (L21, angular, upper_bound, graph_W / graph_H) against a plain-NumPy reference.

The reference below is written from spec/rcppml.md §2.1 and §8 only: dense alternating NNLS,
each column of H and row of W solved exactly (scipy.optimize.nnls on the Cholesky transform of
the penalized Gram), with the penalties applied as the spec says — graph and L21 on the Gram
from the side's *current* factor (none for H in the first iteration: there is no H yet), the
upper bound and the angular map after the solve, then the L1 scaling. The fits use
``solver="exact"`` (Lawson–Hanson on the normal equations), so both sides solve the same
strictly convex problems exactly and differ by rounding only.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import nnls

import dnmf
from dnmf.exceptions import ConvergenceWarning, InputError
from dnmf.kernels.masked import holdout_mask

from flaky import FlakyExecutor

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")

M_, N_, K_ = 24, 30, 3


def _nnls_gram(G, b):
    """argmin_{x ≥ 0} ½xᵀGx − bᵀx for a positive definite G (scipy nnls on G = RᵀR)."""
    R = np.linalg.cholesky(0.5 * (G + G.T)).T
    return nnls(R, np.linalg.solve(R.T, b), maxiter=2000)[0]


def _pen_gram(F, l21, lam, Lap):
    """RcppML §8.3–8.4 for a factor F (k × cols): λ·F L Fᵀ (its symmetric part) + diag(L21 / ‖F_r‖)."""
    k = F.shape[0]
    out = np.zeros((k, k))
    if lam > 0 and Lap is not None:
        T = F @ Lap @ F.T
        out += lam * (T + T.T) / 2
    if l21 > 0:
        for r in range(k):
            nr = np.linalg.norm(F[r])
            if nr > 1e-10:
                out[r, r] += l21 / nr
    return out


def _angular(X, lam):
    """RcppML §8.7 on a factor X (k × cols)."""
    n = np.linalg.norm(X, axis=1)
    Xh = X.copy()
    for r in range(X.shape[0]):
        if n[r] > 1e-15:
            Xh[r] = X[r] / n[r]
    C = Xh @ Xh.T
    np.fill_diagonal(C, 0.0)
    return np.maximum(X - lam * np.diag(n) @ C @ Xh, 0.0)


def reference_fit(A, W0, iters, *, L21=(0, 0), angular=(0, 0), ub=(0, 0), graph_lambda=(0, 0), graph_W=None,
                  graph_H=None, missing=None):
    """Dense ALS with the §8 penalties (and missing entries left out of each problem)."""
    m, n = A.shape
    k = W0.shape[1]
    missing = np.zeros((m, n), dtype=bool) if missing is None else missing
    LW = None if graph_W is None else np.asarray(graph_W.todense() if sp.issparse(graph_W) else graph_W)
    LH = None if graph_H is None else np.asarray(graph_H.todense() if sp.issparse(graph_H) else graph_H)
    W = W0.copy()
    Hn = None
    for _ in range(iters):
        penH = np.zeros((k, k)) if Hn is None else _pen_gram(Hn, L21[1], graph_lambda[1], LH)
        H = np.zeros((k, n))
        for j in range(n):
            o = ~missing[:, j]
            G = W[o].T @ W[o] + 1e-15 * np.eye(k) + penH
            H[:, j] = _nnls_gram(G, W[o].T @ A[o, j])
        if ub[1] > 0:
            H = np.minimum(H, ub[1])
        if angular[1] > 0:
            H = _angular(H, angular[1])
        Hn = H / (H.sum(axis=1) + 1e-15)[:, None]
        penW = _pen_gram(W.T, L21[0], graph_lambda[0], LW)
        Wt = np.zeros((k, m))
        for i in range(m):
            o = ~missing[i]
            G = Hn[:, o] @ Hn[:, o].T + 1e-15 * np.eye(k) + penW
            Wt[:, i] = _nnls_gram(G, Hn[:, o] @ A[i, o])
        if ub[0] > 0:
            Wt = np.minimum(Wt, ub[0])
        if angular[0] > 0:
            Wt = _angular(Wt, angular[0])
        d = Wt.sum(axis=1) + 1e-15
        W = (Wt / d[:, None]).T
    return W, d, Hn


def _data(seed=0):
    rng = np.random.default_rng(seed)
    W = rng.random((M_, K_)) ** 2
    H = rng.random((K_, N_)) ** 2
    A = W @ H + 0.05 * rng.random((M_, N_))
    A[rng.random((M_, N_)) < 0.3] = 0.0  # sparse, so the fused sparse pass runs
    return A


def _graph(size, seed):
    """A Laplacian of a random symmetric adjacency (with a chain so it is connected)."""
    adj = sp.random(size, size, density=0.15, random_state=seed)
    adj = adj + adj.T + sp.diags(np.ones(size - 1), 1) + sp.diags(np.ones(size - 1), -1)
    return dnmf.laplacian(adj)


def _w0(seed=3):
    return np.random.default_rng(seed).random((M_, K_))


#: One penalty on one side each (W side first); values large enough to change the fit visibly.
CASES = {
    "L21_W": dict(L21=(0.3, 0.0)),
    "L21_H": dict(L21=(0.0, 0.3)),
    "angular_W": dict(angular=(0.5, 0.0)),
    "angular_H": dict(angular=(0.0, 0.5)),
    "upper_bound_W": dict(upper_bound=(4.0, 0.0)),
    "upper_bound_H": dict(upper_bound=(0.0, 4.0)),
    "graph_W": dict(graph_lambda=(0.5, 0.0), graph_W="W"),
    "graph_H": dict(graph_lambda=(0.0, 0.5), graph_H="H"),
}


def _kwargs(case):
    kw = dict(CASES[case])
    if kw.get("graph_W") == "W":
        kw["graph_W"] = _graph(M_, 11)
    if kw.get("graph_H") == "H":
        kw["graph_H"] = _graph(N_, 12)
    return kw


def _ref_kwargs(kw):
    out = {("ub" if key == "upper_bound" else key): val for key, val in kw.items()}
    return out


def _fit(A, kw, iters, **extra):
    return dnmf.nmf(A, K_, init=_w0(), maxit=iters, tol=0.0, solver="exact", sort_model=False, client=False,
                    **kw, **extra)


# Tolerance: both sides solve the same strictly convex NNLS problems exactly (active sets found
# exactly by Lawson–Hanson and by scipy's nnls), so they differ by rounding (~1e-15 relative per
# solve), amplified over 4 iterations by the conditioning of the Grams (< 1e4 here): 1e-8 leaves
# a wide margin while a wrong penalty term changes the factors at 1e-3 or more (checked below).
RTOL, ATOL = 1e-8, 1e-10


@pytest.mark.parametrize("case", list(CASES))
def test_penalty_alone_matches_reference(case):
    A = _data()
    kw = _kwargs(case)
    model = _fit(sp.csc_matrix(A), kw, 4)
    W, d, H = reference_fit(A, _w0(), 4, **_ref_kwargs(kw))
    np.testing.assert_allclose(model.w, W, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(model.d, d, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(model.h, H, rtol=RTOL, atol=ATOL)
    # the penalty does something: the unpenalized reference is far from the penalized fit
    W0, d0, _ = reference_fit(A, _w0(), 4)
    assert np.max(np.abs(W0 - W)) > 1e-3 or np.max(np.abs(d0 - d) / d0) > 1e-3
    for name, val in CASES[case].items():  # the record keeps what was asked
        if name in model.misc:
            assert model.misc[name] == tuple(val)


@pytest.mark.parametrize("case", list(CASES))
def test_masked_penalty_matches_reference(case):
    """A user mask (the masked loop: per-column and per-row Grams) with each penalty."""
    A = _data(1)
    mask = np.random.default_rng(5).random(A.shape) < 0.1
    kw = _kwargs(case)
    model = _fit(sp.csc_matrix(A), kw, 4, mask=mask)
    W, d, H = reference_fit(A, _w0(), 4, missing=mask, **_ref_kwargs(kw))
    np.testing.assert_allclose(model.w, W, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(model.d, d, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(model.h, H, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", ["L21_H", "angular_W", "upper_bound_W", "graph_H"])
def test_cv_penalty_matches_reference(case):
    """A speckled test set (§5.2 hash) and zeros missing: the held-out entries are left out of both
    sides' problems; the test loss is the MSE of the final factors on them."""
    A = _data(2)
    kw = _kwargs(case)
    model = _fit(sp.csc_matrix(A), kw, 4, test_fraction=0.2, cv_seed=7, mask="zeros")
    rows, cols = np.nonzero(A)
    held = np.zeros(A.shape, dtype=bool)
    held[rows, cols] = holdout_mask(rows, cols, 7, 0.2)
    missing = held | (A == 0)
    W, d, H = reference_fit(A, _w0(), 4, missing=missing, **_ref_kwargs(kw))
    np.testing.assert_allclose(model.w, W, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(model.h, H, rtol=RTOL, atol=ATOL)
    test_mse = np.mean((A - (W * d) @ H)[held] ** 2)
    assert model.misc["test_loss_history"][-1] == pytest.approx(test_mse, rel=1e-8)


COMBINED = dict(L21=(0.1, 0.2), angular=(0.2, 0.3), upper_bound=(6.0, 5.0), graph_lambda=(0.3, 0.4))


def _combined():
    return dict(COMBINED, graph_W=_graph(M_, 21), graph_H=_graph(N_, 22))


def test_combined_dense_matches_reference():
    """Every penalty on both sides at once, dense A (the dense block pass)."""
    A = _data(3)
    model = _fit(A, _combined(), 4)
    W, d, H = reference_fit(A, _w0(), 4, **_ref_kwargs(_combined()))
    np.testing.assert_allclose(model.w, W, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(model.h, H, rtol=RTOL, atol=ATOL)


def test_combined_on_cluster_identical_to_in_process():
    """Several column blocks on a 2-worker LocalCluster: bitwise the in-process fit, plain and masked."""
    from distributed import Client, LocalCluster

    A = sp.csc_matrix(_data(4))
    kw = _combined()
    mask = np.random.default_rng(6).random(A.shape) < 0.1
    common = dict(init=_w0(), maxit=6, tol=0.0, sort_model=False, block_nnz=100, solver="exact", **kw)
    local = dnmf.nmf(A, K_, client=False, **common)
    local_m = dnmf.nmf(A, K_, client=False, mask=mask, **common)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        dist = dnmf.nmf(A, K_, client=client, **common)
        dist_m = dnmf.nmf(A, K_, client=client, mask=mask, **common)
    for a, b in ((local, dist), (local_m, dist_m)):
        np.testing.assert_array_equal(a.w, b.w)
        np.testing.assert_array_equal(a.d, b.d)
        np.testing.assert_array_equal(a.h, b.h)
        np.testing.assert_array_equal(a.misc["loss_history"], b.misc["loss_history"])
    W, d, H = reference_fit(A.toarray(), _w0(), 6, **_ref_kwargs(kw))
    np.testing.assert_allclose(local.h, H, rtol=1e-7, atol=1e-9)  # 6 iterations: same margin argument


# ---------------------------------------------------------------------------------------------
# Spec §13.6 invariants
# ---------------------------------------------------------------------------------------------


def _planted(seed=0, m=60, n=80, k=4):
    rng = np.random.default_rng(seed)
    W = rng.random((m, k)) + 0.5 * rng.random((m, 1))  # correlated factors
    H = rng.random((k, n))
    return W @ H + 0.05 * rng.random((m, n))


def _mean_offdiag_cos(W):
    Wn = W / np.linalg.norm(W, axis=0)
    C = Wn.T @ Wn
    k = C.shape[0]
    return (C.sum() - np.trace(C)) / (k * (k - 1))


def test_larger_angular_lowers_w_cosine():
    A = _planted()
    cos = [_mean_offdiag_cos(dnmf.nmf(A, 4, seed=1, maxit=60, angular=(lam, 0.0), client=False).w)
           for lam in (0.0, 0.2, 1.0)]
    assert cos[0] > cos[1] > cos[2]


def test_upper_bound_respected():
    A = _planted()
    free = dnmf.nmf(A, 4, seed=1, maxit=30, client=False)
    bound = 0.5 * float((free.w * free.d).max())
    model = dnmf.nmf(A, 4, seed=1, maxit=30, upper_bound=(bound, 0.0), client=False)
    raw = model.w * model.d  # the solved W before its scale went to d
    assert raw.max() <= bound * (1 + 1e-12)
    assert (free.w * free.d).max() > bound * 1.5  # the bound binds


def test_l21_decouples_factors_as_it_grows():
    """§8's L21 adds ``L21/‖F_r‖₂`` of the unit-norm current factor to the Gram diagonal: a
    per-factor ridge. Each factor is renormalized after the solve, so it shrinks no factor to
    zero (measured: a 6-factor fit of rank-4 data loses one factor without L21 and none with L21
    from 0.1 to 100 on either side); as it grows the factors decouple, and the W update tends to
    its diagonal-Gram limit
    ``W ∝ (AĤᵀ − L1)₊`` column by column. Checked: the distance to that limit falls monotonically
    in L21 and vanishes for a dominant L21."""
    A = _planted(k=4)

    def dist(lam):
        model = dnmf.nmf(A, 4, seed=2, maxit=20, L21=(lam, 0.0), client=False)
        limit = np.maximum(A @ model.h.T, 0.0)
        limit /= limit.sum(axis=0)
        return float(np.abs(model.w - limit).max())

    gaps = [dist(lam) for lam in (0.0, 0.1, 1.0, 1e6)]
    assert all(a > b for a, b in zip(gaps, gaps[1:]))
    assert gaps[0] > 1e-2 and gaps[-1] < 1e-7  # ridge/Gram ≈ 1e8 at the largest L21


def test_graph_h_smooths_along_the_graph():
    """Planted: samples on a chain whose factor loadings drift slowly, observed with heavy noise;
    with graph_H (the chain's Laplacian) neighbours' H columns are closer than without."""
    rng = np.random.default_rng(4)
    m, n, k = 40, 60, 3
    t = np.linspace(0, 1, n)
    H = np.vstack([np.exp(-((t - c) ** 2) / 0.05) for c in (0.2, 0.5, 0.8)])
    W = rng.random((m, k))
    A = np.maximum(W @ H + 0.4 * rng.standard_normal((m, n)), 0.0)
    adj = sp.diags(np.ones(n - 1), 1) + sp.diags(np.ones(n - 1), -1)
    lap = dnmf.laplacian(adj)

    def roughness(model):
        return float(np.mean(np.linalg.norm(np.diff(model.h, axis=1), axis=0)))

    plain = dnmf.nmf(A, k, seed=1, maxit=50, client=False)
    smooth = dnmf.nmf(A, k, seed=1, maxit=50, graph_H=lap, graph_lambda=(0.0, 5.0), client=False)
    assert roughness(smooth) < 0.7 * roughness(plain)


# ---------------------------------------------------------------------------------------------
# The helper and the errors
# ---------------------------------------------------------------------------------------------


def test_laplacian_helper():
    adj = np.array([[0, 2, 0], [2, 0, 1], [0, 1, 5.0]])  # the self-loop (5) is ignored
    L = dnmf.laplacian(adj)
    np.testing.assert_array_equal(L.toarray(), [[2, -2, 0], [-2, 3, -1], [0, -1, 1]])
    Ln = dnmf.laplacian(sp.csr_matrix(adj), normalized=True).toarray()
    deg = np.array([2.0, 3.0, 1.0])
    a0 = adj.copy()
    np.fill_diagonal(a0, 0)
    np.testing.assert_allclose(Ln, np.eye(3) - a0 / np.sqrt(np.outer(deg, deg)))
    with pytest.raises(InputError, match="'adjacency' parameter of laplacian must be a square"):
        dnmf.laplacian(np.ones((2, 3)))
    with pytest.raises(InputError, match="non-negative edge weights"):
        dnmf.laplacian(-np.eye(2) + np.ones((2, 2)) * -1)


def test_errors():
    A = _data()
    with pytest.raises(InputError, match=r"'graph_H' parameter of nmf must be a sample graph .* 30 × 30"):
        dnmf.nmf(A, 2, graph_H=sp.eye(5), graph_lambda=(0, 1.0), client=False)
    with pytest.raises(InputError, match=r"'graph_W' parameter of nmf must be a feature graph .* 24 × 24"):
        dnmf.nmf(A, 2, graph_W=np.eye(30), graph_lambda=1.0, client=False)
    with pytest.raises(InputError, match="'graph_W' parameter of nmf must be a finite matrix"):
        dnmf.nmf(A, 2, graph_W=np.full((24, 24), np.nan), graph_lambda=1.0, client=False)
    with pytest.raises(InputError, match="'graph_lambda' parameter of nmf must be 0 on the H side unless graph_H"):
        dnmf.nmf(A, 2, graph_lambda=(0.0, 1.0), client=False)
    for name in ("L21", "angular", "upper_bound", "graph_lambda"):
        with pytest.raises(InputError, match=f"'{name}' parameter of nmf must be a float in"):
            dnmf.nmf(A, 2, **{name: -1.0}, client=False)
    for name, val in (("L21", 0.1), ("angular", (0.0, 0.2)), ("upper_bound", 3.0)):
        with pytest.raises(InputError, match=f"'{name}' parameter of nmf must be 0 with loss='kl'.*loss=\"mse\".*dispersion=\"none\""):
            dnmf.nmf(A, 2, loss="kl", **{name: val}, client=False)
    with pytest.raises(InputError, match="'graph_lambda' parameter of nmf must be 0 with loss='kl'"):
        dnmf.nmf(A, 2, loss="kl", graph_H=_graph(N_, 1), graph_lambda=(0.0, 1.0), client=False)
    with pytest.raises(InputError, match=r"All factors were zeroed by angular = \(0.0, 5.0\); lower angular"):
        dnmf.nmf(_planted(), 4, seed=1, maxit=5, angular=(0.0, 5.0), client=False)
    with pytest.raises(InputError, match="'L21' parameter of nmf must be 0 on the H side with projective=True"):
        dnmf.nmf(A, 2, projective=True, L21=(0.0, 0.1), client=False)


def test_estimator_and_config_carry_the_pairs():
    from dnmf.params import NMF_PARAMS, config_section

    est = dnmf.NMF(n_components=2, L21=(0.1, 0.0), angular=0.2, upper_bound=(0, 3.0), graph_lambda=0.0)
    params = est.get_params()
    assert params["L21"] == (0.1, 0.0) and params["angular"] == 0.2 and params["upper_bound"] == (0, 3.0)
    est.fit(_data())
    fields = {f.name for f in __import__("dataclasses").fields(config_section(NMF_PARAMS, "Model"))}
    assert {"L21", "angular", "upper_bound", "graph_lambda"} <= fields
    assert not {"graph_W", "graph_H"} & fields


def test_no_penalty_is_bitwise_unchanged():
    """Zero penalties take exactly the code path of a fit without them."""
    A = sp.csc_matrix(_data())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = dnmf.nmf(A, K_, seed=1, maxit=5, client=False)
        b = dnmf.nmf(A, K_, seed=1, maxit=5, client=False, L21=0.0, angular=0.0, upper_bound=0.0,
                     graph_W=_graph(M_, 1), graph_lambda=0.0)
    np.testing.assert_array_equal(a.w, b.w)
    np.testing.assert_array_equal(a.h, b.h)


def test_rank_cv_shared_passes_with_penalties_equal_separate_fits():
    """Rank CV's shared passes (several ranks per pass over A, fit_masked_many) with every penalty:
    each rank's histories are bitwise those of the fit alone."""
    from dnmf.cv import engine_init

    A = sp.csc_matrix(_data(5))
    kw = dict(test_fraction=0.2, maxit=6, **_combined())
    res = dnmf.nmf(A, [2, 3], cv_seed=[4], client=False, **kw)
    for rep, k, s in zip(res.table["rep"], res.table["k"], res.table["cv_seed"]):
        alone = dnmf.nmf(A, int(k), init=engine_init(A.shape[0], int(k), int(s + k)), seed=int(s + k),
                         cv_seed=int(s), client=False, **kw)
        train, test = res.histories[(rep, k)]
        np.testing.assert_array_equal(test, alone.misc["test_loss_history"])
        np.testing.assert_array_equal(train, alone.misc["loss_history"])


def test_resume_with_h_side_penalties(tmp_path):
    """A checkpointed fit resumed past its last checkpoint continues the uninterrupted one: the H
    side's terms are rebuilt from the checkpoint's H blocks (Ĥ for graph_H, its norms for L21)."""
    A = sp.csc_matrix(_data(6))
    kw = dict(init=_w0(), tol=0.0, sort_model=False, block_nnz=150, checkpoint_every=2, client=False, **_combined())
    full = dnmf.nmf(A, K_, maxit=6, checkpoint=str(tmp_path / "a"), **kw)
    dnmf.nmf(A, K_, maxit=4, checkpoint=str(tmp_path / "b"), **kw)
    resumed = dnmf.nmf(A, K_, maxit=6, checkpoint=str(tmp_path / "b"), resume=True, **kw)
    assert resumed.misc["iter"] == 6
    # Not bitwise: after a resume L21_H's norms come from the checkpointed Ĥ (‖ĥ_r‖² summed over
    # its entries) rather than the reduced diag(ĤĤᵀ); the two differ by rounding (1e-16 relative),
    # which two iterations of well-conditioned solves keep far below 1e-10.
    np.testing.assert_allclose(resumed.w, full.w, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(resumed.h, full.h, rtol=1e-10, atol=1e-13)
    # the penalties are part of the fingerprint: another graph refuses the checkpoint
    other = dict(kw, graph_H=_graph(N_, 99))
    with pytest.raises(Exception, match="(?i)checkpoint"):
        dnmf.nmf(A, K_, maxit=6, checkpoint=str(tmp_path / "b"), resume=True, **other)


@pytest.mark.parametrize("verb, at", [("map_blocks", 9), ("gather", 5), ("gather", 7), ("tree_reduce", 6)])
def test_lost_worker_in_the_penalized_loop_recovers_bitwise(verb, at):
    """A lost worker during the angular second pass, the graph_H gather, the final gather (H of
    the last iteration rebuilt: solve and angular pass again) or a reduction: the fit redoes the
    step and ends bitwise as the undisturbed one (Cholesky-clip ignores the lost warm starts)."""
    from dnmf.engine.als import ALSOptions, fit_als
    from dnmf.engine.executor import LocalExecutor
    from dnmf.io import as_blocked
    from dnmf.solvers.penalties import fit_penalties

    A = sp.csc_matrix(_data(7))
    blocked = as_blocked(A, block_nnz=150)
    opts = ALSOptions(k=K_, tol=0.0, maxit=6, penalties=fit_penalties(_combined(), A.shape))
    ref_state, ref_ht = fit_als(blocked, _w0(), opts, LocalExecutor(1))
    flaky = FlakyExecutor(verb, at)
    state, ht = fit_als(blocked, _w0(), opts, flaky)
    assert flaky.calls >= at  # the failure happened
    np.testing.assert_array_equal(state.w, ref_state.w)
    np.testing.assert_array_equal(state.d, ref_state.d)
    np.testing.assert_array_equal(np.concatenate(ht), np.concatenate(ref_ht))
    assert state.loss_history == ref_state.loss_history


def test_yaml_model_section_carries_the_penalties(tmp_path):
    """The factorize ``model:`` section accepts the pairs (a scalar recycled), refuses a negative
    one naming the key, and what it hands to nmf (``config_kwargs``) is the direct call's fit."""
    from dnmf.config import JobConfig
    from dnmf.params import NMF_PARAMS, config_kwargs

    A = _data(8)
    np.save(tmp_path / "a.npy", A)
    model = {"k": 3, "seed": 4, "maxit": 5, "L21": [0.1, 0.0], "angular": 0.2, "upper_bound": [0, 5]}
    cfg = JobConfig.from_dict({"pipeline": "factorize", "input": {"path": str(tmp_path / "a.npy")}, "model": model})
    kw = config_kwargs(NMF_PARAMS, cfg.section("model"))
    assert kw["L21"] == (0.1, 0.0) and kw["angular"] == (0.2, 0.2) and kw["upper_bound"] == (0.0, 5.0)
    via_yaml = dnmf.nmf(A, **{**kw, "client": False})
    direct = dnmf.nmf(A, 3, seed=4, maxit=5, L21=(0.1, 0.0), angular=0.2, upper_bound=(0, 5), client=False)
    np.testing.assert_array_equal(via_yaml.w, direct.w)
    with pytest.raises(dnmf.ConfigError, match=r"'model.L21' must be a float in \[0.0, inf\)"):
        JobConfig.from_dict({"pipeline": "factorize", "input": {"path": str(tmp_path / "a.npy")},
                             "model": {"k": 3, "L21": -1}})
