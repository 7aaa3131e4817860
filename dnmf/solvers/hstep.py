"""The H step's arguments and its dense-block solve (NumPy on small statistics).

:class:`HStep` is the frozen set of arguments every H solve shares — the fit's block tasks, a
lost worker's cold rebuild, the kernel warm-up and ``NMFModel.predict`` — built by one function,
:func:`h_step`, instead of a positional tuple at each call site.

:func:`solve_dense_columns` is the one entry for the NNLS of a dense block's columns: the
Cholesky-clip solver with no per-column corrections takes the all-columns LAPACK path
(``updates.cholesky_clip_columns``, one triangular solve for the block — a speed optimisation
that gives the same H as the column step up to the order of floating-point operations); every
other case (another solver, or per-column :class:`~dnmf.kernels.column.ColumnTerms`) goes
column by column through the numba column step (``kernels/fused.py::dense_block_solve``).
Both use the same Gram ``G`` and factor ``L`` from :func:`h_step`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..kernels.column import ColumnTerms, column_terms, has_terms
from ..kernels.fused import dense_block_solve
from ..kernels.nnls import SOLVER_CHOLESKY
from .updates import cholesky_clip_columns, cholesky_or_empty

__all__ = ["HStep", "h_step", "solve_dense_columns", "MODE_NNLS", "MODE_PROJECT", "MODE_FIXED"]


class HStep(NamedTuple):
    """Arguments shared by every H solve of one iteration (or one ``predict``)."""

    w: np.ndarray  # (m, k) float64 C-contiguous — W (unit-norm columns in a fit); float32 for dtype="float32"
    G: np.ndarray  # (k, k) — WᵀW + (ridge + L2)·I
    L: np.ndarray  # (k, k) lower Cholesky factor of G for the Cholesky-clip solver; (0, 0) otherwise
    l1: float  # L1 penalty subtracted from every RHS entry
    warm_scale: np.ndarray  # (k,) multiplies the previous raw H to give the warm start
    solver: int  # kernels.nnls.SOLVER_*
    nonneg: bool
    cd_maxit: int
    cd_tol: float
    mode: int = 0  # MODE_NNLS; MODE_PROJECT: H = wᵀA (w = W·diag(d)); MODE_FIXED: H as given (ht_prev)
    ub: float = 0.0  # upper bound of each solved h (RcppML §8.6, solvers/penalties.py); 0: none


#: How a block task forms H: NNLS (the fit), a projection (projective NMF), or fixed (symmetric NMF).
MODE_NNLS, MODE_PROJECT, MODE_FIXED = 0, 1, 2


def h_step(w: np.ndarray, *, l1: float, l2: float, solver: int, nonneg: bool, cd_maxit: int = 100,
           cd_tol: float = 1e-8, warm_scale: np.ndarray | None = None, ridge: float = 0.0,
           penalty: np.ndarray | None = None, ub: float = 0.0) -> HStep:
    """Build the :class:`HStep` for W: ``G = WᵀW + (ridge + l2)·I`` and its Cholesky factor.

    ``ridge`` is the fit's 1e-15 that keeps G definite; ``predict`` uses none. ``penalty`` is a
    k × k Gram term added after L2 (the H side's graph and L21 terms, ``solvers/penalties.py``);
    ``ub`` the upper bound of every solved column (0: none).
    """
    k = w.shape[1]
    G = w.T @ w
    G[np.diag_indices(k)] += ridge + l2
    if penalty is not None:
        G = G + penalty
    L = cholesky_or_empty(G, solver)
    return HStep(w, G, L, float(l1), np.ones(k) if warm_scale is None else warm_scale, int(solver), bool(nonneg),
                 int(cd_maxit), float(cd_tol), ub=float(ub))


def solve_dense_columns(B: np.ndarray, hs: HStep, ht: np.ndarray, warm: bool, terms: ColumnTerms | None = None):
    """NNLS of every column of a dense block's RHS ``B = WᵀA_j`` (k × n_j).

    ``ht`` (n_j × k) holds the previous raw H (the warm start when ``warm``) and is overwritten
    when the column step runs. Returns ``(ht, Q, hsum)``: the new raw H_jᵀ, ``H_j H_jᵀ`` and
    ``Σ_c |h_c|``.
    """
    k = B.shape[0]
    if hs.solver == SOLVER_CHOLESKY and not has_terms(terms):
        # Cholesky-clip ignores warm starts: solve all columns at once with LAPACK/BLAS.
        ht = cholesky_clip_columns(hs.L, B, hs.l1, hs.nonneg).T
        if hs.ub > 0:
            np.minimum(ht, hs.ub, out=ht)
        return ht, ht.T @ ht, np.abs(ht).sum(axis=0)
    Q = np.zeros((k, k))
    hsum = np.zeros(k)
    dense_block_solve(B, hs.G, hs.L, hs.l1, ht, hs.warm_scale, column_terms(k) if terms is None else terms,
                      hs.solver, hs.nonneg, hs.cd_maxit, hs.cd_tol, warm, Q, hsum, hs.ub)
    return ht, Q, hsum
