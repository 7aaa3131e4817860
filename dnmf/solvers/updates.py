"""Client-side updates on small statistics: the W step and the diagonal scaling (RcppML §2.6)."""

from __future__ import annotations

import numpy as np

from ..kernels.nnls import SOLVER_CHOLESKY, nnls_batch
from ._lapack import cho_solve_lower

__all__ = ["cholesky_or_empty", "cholesky_clip_columns", "update_factor", "scale_rows"]

_EMPTY = np.zeros((0, 0))


def cholesky_or_empty(G: np.ndarray, solver: int) -> np.ndarray:
    """Lower Cholesky factor of G for the cholesky solver, an empty array otherwise.

    A Gram that is numerically singular (e.g. a factor that collapsed to zero) gets a tiny
    ridge proportional to its trace so the factorization exists.
    """
    if solver != SOLVER_CHOLESKY:
        return _EMPTY
    try:
        return np.linalg.cholesky(G)
    except np.linalg.LinAlgError:
        k = G.shape[0]
        ridge = 1e-12 * max(float(np.trace(G)) / k, 1e-300)
        return np.linalg.cholesky(G + ridge * np.eye(k))


def cholesky_clip_columns(L: np.ndarray, B: np.ndarray, l1: float, nonneg: bool) -> np.ndarray:
    """Cholesky-clip NNLS of every column of ``B − l1`` (k × n) at once: ``max((LLᵀ)⁻¹(B − l1), 0)``.

    The all-columns LAPACK fast path of the Cholesky-clip solver, used whenever the columns share
    one Gram (no per-column corrections): by the W update (rows of W) and by the dense H step
    (``solvers/hstep.py::solve_dense_columns``). It computes what the column step
    (``kernels/column.py``) computes column by column with the same factor ``L``, in one
    triangular solve. Returns X (k × n).
    """
    X = cho_solve_lower(L, B - l1 if l1 else B)
    if nonneg:
        np.maximum(X, 0.0, out=X)
    return X


def update_factor(G, P, l1, l2, solver, nonneg, cd_maxit, cd_tol, w_prev=None, n_threads=1) -> np.ndarray:
    """Solve ``min ‖A − F Ĥ‖`` for the other factor F (m × k) from ``G = ĤĤᵀ`` and ``P = AĤᵀ``.

    Each row f_i solves NNLS(G + l2·I, p_i − l1); warm start from ``w_prev`` (m × k) when given.
    With the CD or exact solver the rows are solved on up to ``n_threads`` threads
    (:func:`_solve_rows`); F is bitwise the same for any number.
    """
    k = G.shape[0]
    G = G.copy()
    G[np.diag_indices(k)] += l2
    L = cholesky_or_empty(G, solver)
    if solver == SOLVER_CHOLESKY:
        # Cholesky-clip ignores warm starts: all rows in one LAPACK triangular solve.
        return cholesky_clip_columns(L, P.T, l1, nonneg).T
    B = np.ascontiguousarray(P.T)  # k × m
    if w_prev is not None:
        X = np.ascontiguousarray(w_prev.T, dtype=np.float64)
        warm = True
    else:
        X = np.zeros_like(B)
        warm = False
    _solve_rows(G, L, B, X, solver, nonneg, cd_maxit, cd_tol, warm, l1, n_threads)
    return X.T


#: Rows of W below which one thread solves them all (a thread hand-off costs more than the work).
_THREADED_MIN_ROWS = 2048


def _solve_rows(G, L, B, X, solver, nonneg, cd_maxit, cd_tol, warm, l1, n_threads) -> None:
    """``nnls_batch`` over the columns of B (the rows of W) on up to ``n_threads`` threads.

    The W update runs on the client while the block tasks wait for it: with the CD or exact
    solver it was one thread's work (1.05 s per iteration at m = 20,000, k = 50, against ~1.6 s
    for the H pass on two threads). Rows are independent and each is solved by the same
    arithmetic in whichever range it falls, so W is bitwise the same for any number of threads.
    Ranges are several per thread (CD's sweeps differ between rows) and run on a kept pool
    (``engine/executor.py::thread_pool``; the kernel releases the GIL).
    """
    from ..engine.executor import thread_pool

    m = B.shape[1]
    n_threads = min(int(n_threads), m // _THREADED_MIN_ROWS)
    if n_threads <= 1:
        nnls_batch(G, L, B, X, solver, nonneg, cd_maxit, cd_tol, warm, l1)
        return
    cuts = np.linspace(0, m, 4 * n_threads + 1).astype(int)
    pool = thread_pool(n_threads, "dnmf-w-update")
    list(pool.map(lambda r: nnls_batch(G, L, B, X, solver, nonneg, cd_maxit, cd_tol, warm, l1, cuts[r], cuts[r + 1]),
                  range(len(cuts) - 1)))


def scale_rows(F: np.ndarray, norm: str):
    """Extract the scaling of a factor stored as k rows: returns (F / d[:, None], d)."""
    if norm == "L1":
        d = np.abs(F).sum(axis=1) + 1e-15
    elif norm == "L2":
        d = np.sqrt((F * F).sum(axis=1)) + 1e-15
    else:
        return F, np.ones(F.shape[0])
    return F / d[:, None], d
