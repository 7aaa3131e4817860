"""Prefetching in the sparse block pass (kernels/fused.py, "Prefetching W's and P's rows").

Both sweeps of the pass prefetch the rows of W and P that the entries a few positions ahead will
need (kernels/_prefetch.py). A prefetch must change no value: the pass is checked *bitwise*
against the same pass compiled with the prefetches bound to no-ops, on blocks whose columns are
longer and shorter than the prefetch distance (and empty), where the prefetched positions run
into the next columns and up to the block's last entry. The pass is also checked against NumPy
and against the dense solve, for every solver, with and without column terms.
"""

import functools
import types
from types import SimpleNamespace

import numba
import numpy as np
import pytest
import scipy.sparse as sp

from dnmf.engine import buffers
from dnmf.engine.als import h_update_task
from dnmf.io.blocks import CSCBlock
from dnmf.kernels import fused
from dnmf.kernels.column import SOLVE_COLUMN_BY_SOLVER, column_terms
from dnmf.kernels.fused import csc_block_pass, dense_block_solve
from dnmf.kernels.nnls import SOLVER_CD, SOLVER_CHOLESKY, SOLVER_EXACT
from dnmf.solvers.hstep import h_step
from dnmf.solvers.updates import cholesky_or_empty


def _block(rng, m, n, density, skew=False):
    """A canonical CSC block with some empty columns; ``skew`` puts most entries in the first
    rows, so that many (column, band) segments are empty."""
    A = sp.random(m, n, density=density, format="csc", random_state=rng, data_rvs=lambda s: rng.gamma(1.0, 1.0, s))
    if skew:
        A = sp.csc_matrix(A.multiply(np.where(np.arange(m) < m // 5, 1.0, rng.random(m) < 0.1)[:, None]))
    A = sp.csc_matrix(A)
    for c in (0, n // 2):
        A.data[A.indptr[c]:A.indptr[c + 1]] = 0.0
    A.eliminate_zeros()
    A.sort_indices()
    return A


def _pass(A, W, solver, l1, terms, warm, ht0, ub):
    m, k = W.shape
    G = W.astype(np.float64).T @ W.astype(np.float64) + 1e-3 * np.eye(k)
    L = cholesky_or_empty(G, solver)
    ht = ht0.copy()
    P, Q, hsum = np.zeros((m, k)), np.zeros((k, k)), np.zeros(k)
    csc_block_pass(A.data, A.indices, A.indptr, W, G, L, l1, ht, np.full(k, 0.9), terms, solver, True, 200, 1e-12,
                   warm, P, Q, hsum, ub)
    return ht, P, Q, hsum, G, L


def _inputs(case, solver):
    rng = np.random.default_rng(solver * 10 + len(case))
    m, n, k = 997, 120, 6
    # "short": ~5 entries per column, fewer than the prefetch distance (AHEAD = 8)
    A = _block(rng, m, n, 0.005 if case == "short" else 0.3, skew=case == "float32_skew")
    W = np.ascontiguousarray(rng.random((m, k)))
    if case == "float32_skew":
        W = W.astype(np.float32)
        A = sp.csc_matrix((A.data.astype(np.float32), A.indices, A.indptr), shape=A.shape)
    terms = column_terms(k)
    l1, ub = 0.0, 0.0
    if case == "terms_l1_ub":
        terms = column_terms(k, gram=np.broadcast_to(0.01 * np.eye(k), (n, k, k)).copy(),
                             rhs=rng.standard_normal((n, k)) * 0.1)
        l1, ub = 0.05, 0.8
    return A, W, terms, l1, ub, rng.random((n, k))


@functools.lru_cache(maxsize=None)
def _no_prefetch_pass():
    """The pass's default variant (cholesky, no terms) with both prefetches bound to no-ops."""
    def noop(a, i):
        pass

    fn = fused._csc_block_pass
    g = dict(fn.__globals__, prefetch_read=numba.njit(noop), prefetch_write=numba.njit(noop), NO_TERMS=True,
             solve_column=SOLVE_COLUMN_BY_SOLVER[SOLVER_CHOLESKY])
    return numba.njit(nogil=True)(types.FunctionType(fn.__code__, g, "no_prefetch_pass"))


@pytest.mark.parametrize("case", ["plain", "short", "float32_skew"])
def test_prefetching_changes_no_value(case):
    A, W, terms, l1, ub, ht0 = _inputs(case, SOLVER_CHOLESKY)
    A.indices = A.indices.astype(np.int32)
    A.indptr = A.indptr.astype(np.int64)
    ref = _pass(A, W, SOLVER_CHOLESKY, l1, terms, True, ht0, ub)
    m, k = W.shape
    ht = ht0.copy()
    P, Q, hsum = np.zeros((m, k)), np.zeros((k, k)), np.zeros(k)
    _no_prefetch_pass()(A.data, A.indices, A.indptr, W, ref[4], ref[5], l1, ht, np.full(k, 0.9), terms,
                        SOLVER_CHOLESKY, True, 200, 1e-12, True, P, Q, hsum, ub, np.empty((len(ht), k)), np.empty(k),
                        np.empty((k, k)), np.zeros((k, k)))
    for a, b in zip((ht, P, Q, hsum), ref[:4]):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("solver", [SOLVER_CHOLESKY, SOLVER_CD, SOLVER_EXACT])
@pytest.mark.parametrize("case", ["plain", "terms_l1_ub", "float32_skew", "short"])
def test_pass_matches_numpy_and_the_dense_solve(solver, case):
    A, W, terms, l1, ub, ht0 = _inputs(case, solver)
    ht, P, Q, hsum, G, L = _pass(A, W, solver, l1, terms, True, ht0, ub)
    # P = A H and Q = HᵀH: the same additions up to order (1e-12 relative); H against the dense
    # pass on Wᵀa computed by BLAS (the RHS summed in another order, ~1e-15 relative, times
    # cond(G) ≲ 1e3 for this W: 1e-10)
    Ad = A.toarray().astype(np.float64)
    np.testing.assert_allclose(P, Ad @ ht, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Q, ht.T @ ht, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hsum, np.abs(ht).sum(axis=0), rtol=1e-12, atol=1e-12)
    ht_d = ht0.copy()
    k = W.shape[1]
    dense_block_solve(np.ascontiguousarray(W.astype(np.float64).T @ Ad), G, L, l1, ht_d, np.full(k, 0.9), terms,
                      solver, True, 200, 1e-12, True, np.zeros((k, k)), np.zeros(k), ub)
    np.testing.assert_allclose(ht, ht_d, rtol=1e-10, atol=1e-10 * np.abs(ht_d).max())


def test_h_update_task_with_pooled_buffers_is_the_direct_pass():
    """The engine's task takes H and P from the pool (engine/buffers.py); reused buffers give
    bitwise the pass on fresh arrays."""
    rng = np.random.default_rng(7)
    m, n, k = 4000, 300, 8
    A = _block(rng, m, n, 0.2)
    W = np.ascontiguousarray(rng.random((m, k)))
    block = CSCBlock(A.data, A.indices, A.indptr, m)
    hs = h_step(W, l1=0.0, l2=0.0, solver=SOLVER_CHOLESKY, nonneg=True)
    ht = np.zeros((n, k))
    P, Q, hsum = np.zeros((m, k)), np.zeros((k, k)), np.zeros(k)
    csc_block_pass(A.data, A.indices, A.indptr, W, hs.G, hs.L, hs.l1, ht, hs.warm_scale, column_terms(k), hs.solver,
                   True, hs.cd_maxit, hs.cd_tol, False, P, Q, hsum, hs.ub)
    for _ in range(3):  # the pool's buffers reused across calls
        ht5, s5 = h_update_task(block, None, hs)
        assert np.array_equal(ht, ht5) and np.array_equal(P, s5.P) and np.array_equal(Q, s5.Q)
        del ht5, s5
    buffers.release()


def test_other_index_dtypes_run_the_one_compiled_layout():
    """The pass is compiled for the library's index layout (int32 rows, int64 indptr); a block
    with other index dtypes (scipy's int32 indptr, int64 rows) is converted by the wrapper, not
    compiled again (~1.5 s a layout), and gives bitwise the same result."""
    rng = np.random.default_rng(3)
    m, n, k = 500, 80, 5
    A = _block(rng, m, n, 0.2)
    W = np.ascontiguousarray(rng.random((m, k)))
    ht0 = rng.random((n, k))
    canon = SimpleNamespace(data=A.data, indices=A.indices.astype(np.int32), indptr=A.indptr.astype(np.int64))
    ref = _pass(canon, W, SOLVER_CHOLESKY, 0.0, column_terms(k), True, ht0, 0.0)
    dispatcher = fused._CSC_BLOCK_PASS[SOLVER_CHOLESKY, False]
    before = set(dispatcher.signatures)
    for idx, ptr in ((np.int64, np.int64), (np.int32, np.int32), (np.int64, np.int32)):
        other = SimpleNamespace(data=A.data, indices=A.indices.astype(idx), indptr=A.indptr.astype(ptr))
        out = _pass(other, W, SOLVER_CHOLESKY, 0.0, column_terms(k), True, ht0, 0.0)
        for a, b in zip(out[:4], ref[:4]):
            assert np.array_equal(a, b)
    assert set(dispatcher.signatures) == before
    assert {(s[1].dtype.name, s[2].dtype.name) for s in before} == {("int32", "int64")}
