"""The column-blocked NMF-RE fit (dnmf.mixed.blocks) against the in-memory fit, and the
parallel sweeps (scan rates, bootstrap chunks, ECV folds) on a real LocalCluster.

The blocked path runs the same client-side updates on block sums (U never leaves the
workers), so it must reproduce the in-memory numbers up to summation order.
"""

from __future__ import annotations

import warnings

import distributed
import numpy as np
import pytest

import dnmf
from orthodont_data import load_orthodont_frames
from dnmf.exceptions import InputError
from dnmf.io.blocks import BlockedMatrix, CSCBlock, InMemorySource
from dnmf.mixed import nmfre_blocked
from dnmf.mixed.fit import kmeans_start, nmfkc_eu_stats

# in-memory vs blocked: the same arithmetic with other summation orders and the Gram identity
# for ‖R‖² (cancellation ~‖Y‖²/‖R‖² · 1e-16 ≈ 1e-14 on Orthodont); 1e-8 is the brief's bound.
TOL = 1e-8


def rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.fixture(scope="module")
def orthodont():
    return load_orthodont_frames()


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def reference(orthodont):
    Y, A = orthodont
    return dnmf.nmfre(Y, A, rank=1, df_rate=0.2, prefix="Trend", r_rng=True, client=False)


def blocked_matrix(Y: np.ndarray, bounds) -> BlockedMatrix:
    srcs = tuple(InMemorySource(np.ascontiguousarray(Y[:, a:b])) for a, b in zip(bounds[:-1], bounds[1:]))
    return BlockedMatrix(shape=Y.shape, dtype=np.dtype(np.float64), sources=srcs, sparse=False)


def assert_same_fit(b, f, with_inference=True):
    assert b.n_iter == f.n_iter and b.stop_reason == f.stop_reason
    for name in ("X", "C", "U", "objfunc_iter", "rss_trace"):
        assert rel(getattr(b, name), getattr(f, name)) < TOL, name
    for name in ("sigma2", "tau2", "lambda_", "dfU", "ICC", "r_squared", "r_squared_fixed", "r_squared_cor2",
                 "r_squared_centered", "r_squared_uncentered", "dfU_cap"):
        assert rel(getattr(b, name), getattr(f, name)) < TOL, name
    assert b.dfU_hit_iter == f.dfU_hit_iter
    if with_inference:
        for name in ("C_se", "C_se_boot", "C_ci_lower", "C_ci_upper", "sigma2_used"):
            assert rel(getattr(b, name), getattr(f, name)) < TOL, name


@pytest.mark.parametrize("bounds", [[0, 7, 13, 20, 27], [0, 27]])
def test_blocked_local_executor_equals_in_memory(orthodont, reference, bounds):
    Y, A = orthodont
    Yb = blocked_matrix(np.asarray(Y, float), bounds)
    b = nmfre_blocked(Yb, A, rank=1, df_rate=0.2, prefix="Trend", r_rng=True, gather_U=True, client=False)
    assert_same_fit(b, reference)
    assert b.summary() == reference.summary()  # same labels, same printed numbers


def test_blocked_sparse_blocks_equal_in_memory(orthodont, reference):
    """CSC blocks (densified block by block inside the tasks) give the dense numbers."""
    import scipy.sparse as sp

    Y, A = orthodont
    Yv = np.asarray(Y, float)
    bounds = [0, 9, 18, 27]
    srcs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        m = sp.csc_array(Yv[:, a:b])
        srcs.append(InMemorySource(CSCBlock(m.data, m.indices, m.indptr, Yv.shape[0])))
    Yb = BlockedMatrix(shape=Yv.shape, dtype=np.dtype(np.float64), sources=tuple(srcs), sparse=True)
    b = nmfre_blocked(Yb, A, rank=1, df_rate=0.2, prefix="Trend", r_rng=True, gather_U=True, client=False)
    assert_same_fit(b, reference)


def test_blocked_cluster_equals_in_memory(orthodont, reference, client):
    Y, A = orthodont
    b = nmfre_blocked(Y, A, rank=1, df_rate=0.2, prefix="Trend", r_rng=True, gather_U=True, client=client,
                      n_blocks=5)
    assert len(b.U_blocks) == 5 and all(hasattr(h, "key") for h in b.U_blocks)  # U stayed on workers
    assert_same_fit(b, reference)


def test_blocked_default_stream_equals_one_block_inference(orthodont, reference, client):
    """Bootstrap keys are (block, chunk): with one block the draws equal nmfre_inference's, and
    neither depends on the number of workers."""
    Y, A = orthodont
    b = nmfre_blocked(Y, A, rank=1, df_rate=0.2, client=client, n_blocks=1)
    local = dnmf.nmfre_inference(reference, Y, A, client=False)
    on_cluster = dnmf.nmfre_inference(reference, Y, A, client=client)
    assert np.array_equal(local.C_se_boot, on_cluster.C_se_boot)  # bitwise: worker count is irrelevant
    assert rel(b.C_se_boot, local.C_se_boot) < TOL and rel(b.C_ci_upper, local.C_ci_upper) < TOL


def test_blocked_long_run_rank2(client):
    """Rank 2, 60 iterations (the damped σ² update runs at 50 and 60, and the cap binds)."""
    rng = np.random.default_rng(3)
    P, N, Q = 8, 300, 2
    Xt = rng.dirichlet(np.ones(P), size=Q).T
    A = np.vstack([np.ones(N), rng.integers(0, 2, N), rng.uniform(0, 1, N)])
    Y = np.maximum(Xt @ (rng.uniform(5, 20, (Q, 3)) @ A + rng.normal(0, 2, (Q, N))) + rng.normal(0, 0.5, (P, N)), 0)
    X0 = rng.uniform(0.5, 1.5, (P, Q))
    C0 = np.ones((Q, 3))
    kw = dict(rank=Q, df_rate=0.05, X_init=X0, C_init=C0, epsilon=1e-14, maxit=60, wild_B=300, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dnmf.ConvergenceWarning)  # maxit is the point here
        f = dnmf.nmfre(Y, A, client=False, wild_seed=5, **kw)
        b = nmfre_blocked(blocked_matrix(Y, [0, 100, 180, 300]), A, client=client, gather_U=True,
                          wild_seed=5, **kw)
        b1 = nmfre_blocked(Y, A, client=False, gather_U=True, n_blocks=1, wild_seed=5, **kw)
    assert f.n_iter == 60 and f.sigma2 != 1.0 and f.dfU_hit_cap
    assert_same_fit(b, f, with_inference=False)
    assert rel(b.C_se, f.C_se) < TOL
    assert rel(b1.C_se_boot, f.C_se_boot) < TOL  # one block: the same bootstrap keys


def test_initialiser_on_statistics_matches_nmfkc_reference(orthodont):
    """nmfkc's EU iterations on (YAᵀ, AAᵀ, ‖Y‖²) reproduce R's ``nmfkc(Y, A, rank=1)`` (spec §2)."""
    Y, A = (np.asarray(v, float) for v in orthodont)
    X0 = Y.mean(axis=1, keepdims=True)
    X, C, it = nmfkc_eu_stats(X0 / X0.sum(), np.ones((1, 2)), Y @ A.T, A @ A.T, float(np.sum(Y * Y)), 1e-4)
    assert it == 76
    # 1e-9: R's values are quoted to 15 digits; the Gram-identity objective only decides when to stop
    assert rel(X[:, 0], [0.230755140755678, 0.240915975321876, 0.256568648997442, 0.271760234925003]) < 1e-9
    assert rel(C[0], [90.1421957894414, 10.0103775071928]) < 1e-9


def test_blocked_default_init_rank2(client):
    """Rank 2 without starting values: k-means on the column subsample (all columns here),
    then nmfkc's EU iterations on the block statistics, then the same fit as in memory."""
    rng = np.random.default_rng(8)
    P, N = 6, 120
    A = np.vstack([np.ones(N), rng.integers(0, 2, N)])
    Y = np.maximum(rng.dirichlet(np.ones(P), 2).T @ (np.array([[20.0, 4.0], [6.0, 9.0]]) @ A
                                                     + rng.normal(0, 2, (2, N))), 0)
    b = nmfre_blocked(Y, A, rank=2, df_rate=0.3, n_blocks=3, client=client, gather_U=True, wild_bootstrap=False,
                      seed=3, init_sample=N)
    X0, C0, _ = nmfkc_eu_stats(kmeans_start(Y, 2, 3), np.ones((2, 2)), Y @ A.T, A @ A.T, float(np.sum(Y * Y)), 1e-5)
    o = np.argsort((np.arange(1, P + 1) / P) @ X0, kind="stable")
    f = dnmf.nmfre(Y, A, rank=2, df_rate=0.3, X_init=X0[:, o], C_init=C0[o], wild_bootstrap=False)
    assert_same_fit(b, f, with_inference=False)


def test_blocked_auto_scan(orthodont, client):
    Y, A = orthodont
    b = nmfre_blocked(Y, A, rank=1, n_blocks=3, client=client, wild_bootstrap=False)
    assert b.dfU_cap_rate == 0.3 and round(b.dfU, 2) == 5.42
    assert b.dfU_cap_scan.table["hit"].tolist() == [True, True] + [False] * 8


def test_blocked_rejects_bad_data(orthodont):
    Y, A = (np.asarray(v, float).copy() for v in orthodont)
    Y[1, 20] = -0.5
    with pytest.raises(InputError, match="'Y'.*non-negative"):
        nmfre_blocked(Y, A, rank=1, df_rate=0.2, n_blocks=3, client=False)
    with pytest.raises(InputError, match="'A'"):
        nmfre_blocked(np.abs(Y), A[:, :10], rank=1, df_rate=0.2, client=False)
    with pytest.raises(InputError, match="'df_rate'"):
        nmfre_blocked(np.abs(Y), A, rank=1, df_rate=-1.0, client=False)


def test_sweeps_on_cluster_equal_local(orthodont, client):
    Y, A = orthodont
    s1 = dnmf.nmfre_dfu_scan(None, Y, A, rank=1, client=client)
    s0 = dnmf.nmfre_dfu_scan(None, Y, A, rank=1, client=False)
    assert s1.table.equals(s0.table) and s1.cap_rate == s0.cap_rate == 0.3
    e1 = dnmf.nmfre_ecv(Y, A, rank=[1, 2], rounds=2, client=client, seed=4)
    e0 = dnmf.nmfre_ecv(Y, A, rank=[1, 2], rounds=2, client=False, seed=4)
    assert np.array_equal(e1.sigma, e0.sigma) and np.array_equal(e1.folds, e0.folds)
