"""The column step (kernels/column.py) and the passes that share it, against NumPy/SciPy references.

Problem per column: min_{x≥0} ½ xᵀ(G + gram_c)x − (b + rhs_c)ᵀx, with G = WᵀW and b = Wᵀa_c − L1.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import nnls as scipy_nnls

from dnmf.engine.als import h_update_task
from dnmf.io.blocks import CSCBlock
from dnmf.kernels.column import column_step, column_terms, has_terms
from dnmf.kernels.fused import csc_block_pass, dense_block_solve
from dnmf.kernels.nnls import SOLVER_CD, SOLVER_CHOLESKY, SOLVER_EXACT
from dnmf.solvers.hstep import h_step, solve_dense_columns
from dnmf.solvers.updates import cholesky_or_empty

# Random Gaussian designs with m ≥ 4k have cond(W) ≈ (√m + √k)/(√m − √k) ≲ 3, so the exact
# active-set solver and scipy's NNLS agree to a few hundred ulps of the solution's scale; 1e-9
# (relative to max|x|) leaves room for the conditioning of the normal equations (cond² ≲ 10)
# times the O(k) rounding of each inner Cholesky solve, and fails on any real disagreement.
EXACT_RTOL = 1e-9


def _design(rng, m, k):
    return rng.standard_normal((m, k))


def _step(G, b, solver, terms=None, c=0, nonneg=True, x0=None):
    k = G.shape[0]
    terms = column_terms(k) if terms is None else terms
    L = cholesky_or_empty(G, solver)
    x = np.zeros(k) if x0 is None else x0.copy()
    bb = b.copy()
    column_step(c, G, L, bb, x, terms, np.empty((k, k)), np.zeros((k, k)), solver, nonneg, 5000, 1e-14,
                x0 is not None)
    return x


def _close(x, ref, rtol=EXACT_RTOL):
    np.testing.assert_allclose(x, ref, rtol=0, atol=rtol * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("k", [1, 3, 8, 20])
def test_plain_step_matches_scipy_nnls(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        W = _design(rng, 6 * k, k)
        a = rng.standard_normal(6 * k)
        ref, _ = scipy_nnls(W, a)
        x = _step(W.T @ W, W.T @ a, SOLVER_EXACT)
        _close(x, ref)
        # coordinate descent with 5000 sweeps and tol 1e-14 reaches the same optimum; CD converges
        # linearly at a rate set by cond(G) ≲ 10 here, so 1e-7 is far above its stopping error
        # yet far below any wrong-support solution
        _close(_step(W.T @ W, W.T @ a, SOLVER_CD), ref, 1e-7)


def test_plain_cholesky_step_is_clipped_unconstrained():
    rng = np.random.default_rng(1)
    W = _design(rng, 40, 6)
    a = rng.standard_normal(40)
    x = _step(W.T @ W, W.T @ a, SOLVER_CHOLESKY)
    # Cholesky-clip = max(G⁻¹b, 0); one k = 6 triangular solve pair vs LAPACK lstsq: 1e-12
    # covers cond(G) ≲ 10 times a few ulps
    _close(x, np.maximum(np.linalg.lstsq(W, a, rcond=None)[0], 0.0), 1e-12)


@pytest.mark.parametrize("k", [2, 5, 12])
def test_gram_correction_is_the_masked_problem(k):
    """min ‖(a − Wx)_{¬S}‖² = the step with G − Σ_{i∈S} w_i w_iᵀ and b − Σ_{i∈S} a_i w_i."""
    rng = np.random.default_rng(10 + k)
    m = 8 * k
    W = np.abs(_design(rng, m, k))
    for _ in range(5):
        a = rng.standard_normal(m) + W @ np.abs(rng.standard_normal(k))
        S = rng.random(m) < 0.3
        keep = ~S
        gram = -(W[S].T @ W[S])[None]
        rhs = -(W[S].T @ a[S])[None]
        terms = column_terms(k, gram=gram, rhs=rhs)
        ref, _ = scipy_nnls(W[keep], a[keep])
        # reduced design: m·0.7 ≥ 5.6k rows of a non-negative design, cond² ≲ 100 — 1e-9 still
        # leaves ≥ 4 orders above rounding
        _close(_step(W.T @ W, W.T @ a, SOLVER_EXACT, terms), ref)
        # Cholesky-clip with a per-column factorization of the corrected Gram
        unc = np.linalg.lstsq(W[keep], a[keep], rcond=None)[0]
        _close(_step(W.T @ W, W.T @ a, SOLVER_CHOLESKY, terms), np.maximum(unc, 0.0), 1e-10)


def test_rhs_correction_alone():
    """b + r is the RHS of the data a' = a + W(WᵀW)⁻¹r (Wᵀa' = Wᵀa + r)."""
    rng = np.random.default_rng(3)
    k, m = 7, 50
    W = _design(rng, m, k)
    a = rng.standard_normal(m)
    r = rng.standard_normal(k)
    a2 = a + W @ np.linalg.solve(W.T @ W, r)
    ref, _ = scipy_nnls(W, a2)
    _close(_step(W.T @ W, W.T @ a, SOLVER_EXACT, column_terms(k, rhs=r[None])), ref)


def test_target_terms_are_an_augmented_least_squares():
    """Gram +λI and RHS +λt: min ‖a − Wx‖² + λ‖x − t‖² = NNLS of [W; √λI] x ≈ [a; √λ t]."""
    rng = np.random.default_rng(4)
    k, m, n, lam = 5, 30, 4, 2.5
    W = _design(rng, m, k)
    A = rng.standard_normal((m, n))
    T = np.abs(rng.standard_normal((n, k)))
    terms = column_terms(k, gram=np.broadcast_to(lam * np.eye(k), (n, k, k)), rhs=lam * T)
    aug = np.vstack([W, np.sqrt(lam) * np.eye(k)])
    for c in range(n):
        ref, _ = scipy_nnls(aug, np.concatenate([A[:, c], np.sqrt(lam) * T[c]]))
        # the ridge only improves conditioning: same tolerance as the plain problem
        _close(_step(W.T @ W, W.T @ A[:, c], SOLVER_EXACT, terms, c=c), ref)


def test_singular_corrected_gram_gives_no_nan():
    # every row but one masked: the corrected Gram has rank 1 < k; Cholesky-clip gets a ridge,
    # the exact solver its own — both finite and non-negative
    rng = np.random.default_rng(5)
    k, m = 4, 12
    W = np.abs(_design(rng, m, k))
    a = np.abs(rng.standard_normal(m))
    S = np.ones(m, bool)
    S[0] = False
    terms = column_terms(k, gram=-(W[S].T @ W[S])[None], rhs=-(W[S].T @ a[S])[None])
    for solver in (SOLVER_CHOLESKY, SOLVER_EXACT, SOLVER_CD):
        x = _step(W.T @ W, W.T @ a, solver, terms)
        assert np.all(np.isfinite(x)) and np.all(x >= 0)


def _block(rng, m, n, density):
    A = sp.random(m, n, density=density, random_state=rng, format="csc") * 3.0
    A.indptr = A.indptr.astype(np.int64)
    A.indices = A.indices.astype(np.int64)
    return sp.csc_array(A)


def _mask_terms(W, A, masks):
    """Per-column corrections of speckled-mask sets (dense boolean m × n here: test-sized)."""
    Ad = A.toarray()
    gram = np.stack([-(W[s].T @ W[s]) for s in masks.T])
    rhs = np.stack([-(W[s].T @ Ad[s, c]) for c, s in enumerate(masks.T)])
    return column_terms(W.shape[1], gram=gram, rhs=rhs)


@pytest.mark.parametrize("with_terms", [False, True])
@pytest.mark.parametrize("solver", [SOLVER_EXACT, SOLVER_CHOLESKY, SOLVER_CD])
def test_sparse_and_dense_passes_agree_with_numpy(solver, with_terms):
    rng = np.random.default_rng(7)
    m, n, k, l1 = 60, 25, 5, 0.01
    A = _block(rng, m, n, 0.3)
    W = np.ascontiguousarray(np.abs(rng.standard_normal((m, k))))
    masks = rng.random((m, n)) < 0.2
    terms = _mask_terms(W, A, masks) if with_terms else column_terms(k)
    G = W.T @ W
    L = cholesky_or_empty(G, solver)
    Ad = A.toarray()
    # NumPy loop: each column solved on its own by the reference of its solver
    H_ref = np.empty((n, k))
    for c in range(n):
        keep = ~masks[:, c] if with_terms else np.ones(m, bool)
        Wc, ac = W[keep], Ad[keep, c]
        bc = Wc.T @ ac - l1
        if solver == SOLVER_CHOLESKY:
            H_ref[c] = np.maximum(np.linalg.solve(Wc.T @ Wc, bc), 0.0)
        else:  # exact and (converged) CD: the NNLS optimum of ½xᵀGx − bᵀx, via scipy on a factor
            R = np.linalg.cholesky(Wc.T @ Wc).T  # RᵀR = G, so ‖Rx − R⁻ᵀb‖² = 2(½xᵀGx − bᵀx) + const
            H_ref[c], _ = scipy_nnls(R, np.linalg.solve(R.T, bc))
    # sparse pass
    ht_s = np.zeros((n, k))
    P, Q, hsum = np.zeros((m, k)), np.zeros((k, k)), np.zeros(k)
    csc_block_pass(A.data, A.indices, A.indptr, W, G, L, l1, ht_s, np.ones(k), terms, solver, True, 5000, 1e-14,
                   False, P, Q, hsum)
    # dense pass (the column-step kernel, also when the solver is Cholesky-clip)
    ht_d = np.zeros((n, k))
    Qd, hsd = np.zeros((k, k)), np.zeros(k)
    dense_block_solve(np.ascontiguousarray(W.T @ Ad), G, L, l1, ht_d, np.ones(k), terms, solver, True, 5000,
                      1e-14, False, Qd, hsd)
    # sparse vs dense: same solver on RHS summed in a different order (CSC loop vs BLAS), so they
    # differ by rounding of b (~1e-15 relative) amplified by cond(G) ≲ 100: 1e-11
    _close(ht_s, ht_d, 1e-11)
    # vs the reference: EXACT_RTOL for exact/Cholesky; CD stops at a mean relative change of
    # 1e-14 per sweep, which with cond(G) ≲ 100 leaves a solution error well below 1e-7
    _close(ht_s, H_ref, 1e-7 if solver == SOLVER_CD else EXACT_RTOL)
    # accumulated statistics: sums of the same products in the same column order, to rounding
    np.testing.assert_allclose(P, Ad @ ht_s, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Q, ht_s.T @ ht_s, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hsum, np.abs(ht_s).sum(axis=0), rtol=1e-12)
    # dense Q from the dense pass's H, which differs from the sparse one by rounding (above)
    np.testing.assert_allclose(Qd, Q, rtol=1e-10, atol=1e-12)
    if solver == SOLVER_CHOLESKY and not with_terms:
        # the LAPACK all-columns bypass and the column step solve the same problems
        hs = h_step(W, l1=l1, l2=0.0, solver=solver, nonneg=True)
        ht_b, Qb, hsb = solve_dense_columns(np.ascontiguousarray(W.T @ Ad), hs, np.zeros((n, k)), False)
        _close(ht_b, ht_d, 1e-12)  # LAPACK vs loop triangular solves: rounding only, cond(G) ≲ 100
    if with_terms:
        # with per-column terms the Cholesky solver leaves the bypass and takes the column step
        hs = h_step(W, l1=l1, l2=0.0, solver=solver, nonneg=True, cd_maxit=5000, cd_tol=1e-14)
        ht_t, _, _ = solve_dense_columns(np.ascontiguousarray(W.T @ Ad), hs, np.zeros((n, k)), False, terms)
        np.testing.assert_array_equal(ht_t, ht_d)  # the very same kernel call


@pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")  # maxit=5 on purpose
def test_predict_is_the_fit_h_step():
    import dnmf

    rng = np.random.default_rng(11)
    m, n, k = 40, 30, 4
    A = _block(rng, m, n, 0.4)
    model = dnmf.nmf(A, k, seed=1, client=False, maxit=5, tol=0.0, solver="exact")
    w = np.ascontiguousarray(model.w)
    hs = h_step(w, l1=0.0, l2=0.0, solver=SOLVER_EXACT, nonneg=True)
    # dense block: the fit's H step and predict form B with the same BLAS product and share the
    # column step, so they are bitwise equal
    ht_fit, _ = h_update_task(A.toarray(), None, hs)
    np.testing.assert_array_equal(model.predict(A.toarray()), ht_fit.T)
    # sparse block: the fit sums b over the CSC column in the kernel, predict with scipy — equal
    # to rounding of b amplified by cond(G) (a fitted non-negative W, cond ≲ 1e3 here): 1e-9
    block = CSCBlock(A.data, A.indices, A.indptr, m)
    ht_sp, _ = h_update_task(block, None, hs)
    _close(model.predict(A), ht_sp.T, 1e-9)


def test_column_terms_builder():
    t = column_terms(3)
    assert t.gram.shape == (0, 3, 3) and t.rhs.shape == (0, 3) and not has_terms(t) and not has_terms(None)
    assert has_terms(column_terms(3, rhs=np.zeros((2, 3))))
    with pytest.raises(ValueError, match="gram correction"):
        column_terms(3, gram=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="rhs correction"):
        column_terms(3, rhs=np.zeros((2, 4)))


def test_column_step_runs_without_jit():
    # the kernels are plain functions: the masked-problem check also holds under NUMBA_DISABLE_JIT
    code = """
import numpy as np
from scipy.optimize import nnls
from dnmf.kernels.column import column_terms
from dnmf.kernels.fused import csc_block_pass
from dnmf.kernels.nnls import SOLVER_EXACT
import scipy.sparse as sp
rng = np.random.default_rng(0)
m, n, k = 20, 4, 3
A = sp.random(m, n, density=0.5, random_state=rng, format="csc")
W = np.abs(rng.standard_normal((m, k)))
S = rng.random((m, n)) < 0.25
Ad = A.toarray()
terms = column_terms(k, gram=np.stack([-(W[s].T @ W[s]) for s in S.T]),
                     rhs=np.stack([-(W[s].T @ Ad[s, c]) for c, s in enumerate(S.T)]))
ht = np.zeros((n, k))
csc_block_pass(A.data, A.indices.astype(np.int64), A.indptr.astype(np.int64), W, W.T @ W, np.zeros((0, 0)),
               0.0, ht, np.ones(k), terms, SOLVER_EXACT, True, 100, 1e-8, False, np.zeros((m, k)),
               np.zeros((k, k)), np.zeros(k))
for c in range(n):
    ref = nnls(W[~S[:, c]], Ad[~S[:, c], c])[0]
    assert np.allclose(ht[c], ref, atol=1e-9), (ht[c], ref)
print("ok")
"""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
