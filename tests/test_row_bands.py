"""Row bands of the sparse block pass (kernels/fused.py, "Row bands").

The pass sweeps a block band by band so that one band of W (and of P) stays in a core's L2 cache.
Rows are sorted within each column and every row lies in one band, so each b_c and each row of P
get the same additions in the same order as in one sweep: the banded pass must be *bitwise* the
one-band pass, whatever the number of bands. Both are also checked against NumPy.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

from dnmf.engine import buffers
from dnmf.engine.als import h_update_task
from dnmf.io.blocks import CSCBlock
from dnmf.kernels import fused
from dnmf.kernels.column import column_terms
from dnmf.kernels.fused import csc_block_pass, dense_block_solve, row_bands
from dnmf.kernels.nnls import SOLVER_CD, SOLVER_CHOLESKY, SOLVER_EXACT
from dnmf.solvers.hstep import h_step
from dnmf.solvers.updates import cholesky_or_empty


def test_row_bands_split_rows_evenly_by_the_cache_budget(monkeypatch):
    monkeypatch.setattr(fused, "BAND_BYTES", 1 << 20)
    monkeypatch.setattr(fused, "BAND_MIN_ENTRIES", 32)
    # W of 20,000 × 10 float64 = 1.6 MB: two bands of 10,000 rows
    np.testing.assert_array_equal(row_bands(20000, 10, 8, 2_500_000, 6250), [0, 10000, 20000])
    # float32 W (0.8 MB) fits one band
    np.testing.assert_array_equal(row_bands(20000, 10, 4, 2_500_000, 6250), [0, 20000])
    # 30,000 × 30 float64 = 7.2 MB: ⌈7.2 MB / 1 MiB⌉ = 7 bands, boundaries ⌊t·m/7⌋
    b = row_bands(30000, 30, 8, 4_000_000, 4000)
    np.testing.assert_array_equal(b, (np.arange(8) * 30000) // 7)
    # short columns cap the count: 150 entries per column allow ⌊150/32⌋ = 4 bands
    assert len(row_bands(30000, 30, 8, 150 * 4000, 4000)) - 1 == 4
    # fewer than 32 entries per column: one band
    np.testing.assert_array_equal(row_bands(30000, 30, 8, 20 * 4000, 4000), [0, 30000])
    # never more bands than rows
    monkeypatch.setattr(fused, "BAND_BYTES", 1)
    np.testing.assert_array_equal(row_bands(3, 1000, 8, 10**6, 10), [0, 1, 2, 3])


def test_l2_cache_bytes_is_positive():
    assert fused.l2_cache_bytes() > 0
    assert fused.BAND_BYTES >= 1 << 20  # the floor (kernels/fused.py, docs/architecture.md "On another CPU")


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


@pytest.mark.parametrize("solver", [SOLVER_CHOLESKY, SOLVER_CD, SOLVER_EXACT])
@pytest.mark.parametrize("case", ["plain", "terms_l1_ub", "float32_skew"])
def test_banded_pass_is_bitwise_the_one_band_pass(monkeypatch, solver, case):
    rng = np.random.default_rng(solver * 10 + len(case))
    m, n, k = 997, 120, 6  # m prime: bands of unequal size
    A = _block(rng, m, n, 0.3, skew=case == "float32_skew")
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
    ht0 = rng.random((n, k))
    monkeypatch.setattr(fused, "BAND_MIN_ENTRIES", 1)
    outs = {}
    for band_bytes in (1 << 30, m * k * W.itemsize // 2 + 1, m * k * W.itemsize // 7 + 1, 1):
        monkeypatch.setattr(fused, "BAND_BYTES", band_bytes)
        nb = len(row_bands(m, k, W.itemsize, A.nnz, n)) - 1
        outs[nb] = _pass(A, W, solver, l1, terms, True, ht0, ub)
    # up to as many bands as a column's mean count of entries (BAND_MIN_ENTRIES = 1)
    assert sorted(outs) == [1, 2, 7, A.nnz // n]
    one = outs[1]
    for nb, out in outs.items():
        for a, b in zip(out[:4], one[:4]):
            assert np.array_equal(a, b), f"{nb} bands differ from one band"
    # and the one-band pass against NumPy: P = A H (same additions up to order: 1e-12 relative),
    # H against the dense pass on Wᵀa computed by BLAS (the RHS summed in another order, ~1e-15
    # relative, times cond(G) ≲ 1e3 for this W: 1e-10)
    ht, P, Q, hsum, G, L = one
    Ad = A.toarray().astype(np.float64)
    np.testing.assert_allclose(P, Ad @ ht, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Q, ht.T @ ht, rtol=1e-12, atol=1e-12)
    ht_d = ht0.copy()
    dense_block_solve(np.ascontiguousarray(W.astype(np.float64).T @ Ad), G, L, l1, ht_d, np.full(k, 0.9), terms,
                      solver, True, 200, 1e-12, True, np.zeros((k, k)), np.zeros(k), ub)
    np.testing.assert_allclose(ht, ht_d, rtol=1e-10, atol=1e-10 * np.abs(ht_d).max())


def test_h_update_task_with_pooled_scratch_matches_one_band(monkeypatch):
    """The engine's task passes pooled scratch (engine/buffers.py) to the banded pass."""
    rng = np.random.default_rng(7)
    m, n, k = 4000, 300, 8
    A = _block(rng, m, n, 0.2)
    W = np.ascontiguousarray(rng.random((m, k)))
    block = CSCBlock(A.data, A.indices, A.indptr, m)
    hs = h_step(W, l1=0.0, l2=0.0, solver=SOLVER_CHOLESKY, nonneg=True)
    monkeypatch.setattr(fused, "BAND_BYTES", 1 << 30)
    ht1, s1 = h_update_task(block, None, hs)
    monkeypatch.setattr(fused, "BAND_BYTES", m * k * 8 // 5)
    assert len(row_bands(m, k, 8, A.nnz, n)) - 1 == 5
    for _ in range(3):  # the pool's buffers reused across calls
        ht5, s5 = h_update_task(block, None, hs)
        assert np.array_equal(ht1, ht5) and np.array_equal(s1.P, s5.P) and np.array_equal(s1.Q, s5.Q)
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
