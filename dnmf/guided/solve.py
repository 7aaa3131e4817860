"""Public non-negative least squares for one factor given the other (rcppml spec §10.2)."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from .._validation import check_float, check_int, check_option, param_error
from ..kernels.nnls import SOLVER_CD, SOLVER_CHOLESKY, SOLVER_EXACT, nnls_batch
from ..solvers.updates import cholesky_or_empty
from .target import _as_matrix
from ..solvers.targets import apply_target

__all__ = ["nnls", "NNLS_SOLVERS"]

#: Solvers by name (kernels/nnls.py): exact active set, RcppML coordinate descent, Cholesky-clip.
NNLS_SOLVERS = {"exact": SOLVER_EXACT, "cd": SOLVER_CD, "cholesky": SOLVER_CHOLESKY}


def _as_data(A: Any, func: str):
    if sp.issparse(A):
        A = sp.csc_array(A, dtype=np.float64)
        if not np.all(np.isfinite(A.data)):
            raise param_error("A", func, "a finite matrix", "a sparse matrix with NaN or Inf", described=True)
        return A
    return _as_matrix(A, "A", func)


def nnls(A: Any, w: Any = None, h: Any = None, *, L1: float = 0.0, L2: float = 0.0, nonneg: bool = True,
         target: Any = None, target_lambda: float = 0.0, solver: str = "exact", cd_maxit: int = 100,
         cd_tol: float = 1e-8) -> np.ndarray:
    """Solve for one NMF factor given the other: ``min ‖A − W H‖²`` over H ≥ 0 (or W ≥ 0).

    Parameters
    ----------
    A : array-like or scipy.sparse matrix of shape (m, n)
        Data, features × samples.
    w : array-like of shape (m, k), optional
        Fixed W; the function returns H (k × n). Used as given (no normalization, no d).
    h : array-like of shape (k, n), optional
        Fixed H; the function returns W (m × k). Exactly one of ``w`` and ``h`` must be given.
    L1, L2 : float, default 0
        Lasso (subtracted from every right-hand side entry) and ridge (added to the Gram diagonal).
    nonneg : bool, default True
        Constrain the solution to be non-negative (False: plain least squares, clipped nowhere).
    target : array-like of shape (k, n) when solving H, (k, m) when solving W; optional
        Target of the solved factor (e.g. from :func:`compute_target`), column j for sample j.
    target_lambda : float, default 0
        Target strength: > 0 pulls the solution toward ``target`` (ridge toward t), < 0 removes
        target-aligned structure (PROJ_ADV), 0 disables; see :func:`dnmf.guided.apply_target`.
    solver : {"exact", "cd", "cholesky"}, default "exact"
        Exact active-set NNLS, RcppML's coordinate descent, or RcppML's Cholesky-then-clip
        (unconstrained solve, negatives set to 0 — not an exact NNLS).
    cd_maxit, cd_tol : int, float
        Sweep cap and tolerance of the coordinate-descent solver.

    Returns
    -------
    ndarray
        H of shape (k, n) when ``w`` is given, W of shape (m, k) when ``h`` is given.

    Notes
    -----
    Per sample column j (H shown; W is the same with A transposed): ``G = WᵀW + L2·I``,
    ``b_j = Wᵀa_j − L1``, then the target terms — λ > 0: ``G + λI``, ``b_j + λt_j`` (the normal
    equations of ``‖a_j − W h_j‖² + λ‖h_j − t_j‖²``); λ < 0: G deflated along ``Γ = TTᵀ/n``
    (guided spec §2.4) — and ``min_{x ≥ 0} ½xᵀGx − b_jᵀx``. RcppML delegates target requests to
    a one-iteration ``nmf()`` with the given factor as seed; the H half of that iteration is this
    solve. Unlike RcppML, a target of the wrong shape is an error.

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.guided import nnls
    >>> w = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> nnls(np.array([[1.0], [-1.0], [0.0]]), w=w).round(6)
    array([[0.5],
           [0. ]])
    """
    func = "nnls"
    A = _as_data(A, func)
    m, n = A.shape
    if (w is None) == (h is None):
        raise param_error("w", func, "given alone or with 'h' None (exactly one of 'w' and 'h')",
                          "both None" if w is None else "both 'w' and 'h'", described=True)
    L1 = check_float(L1, "L1", func, low=0.0)
    L2 = check_float(L2, "L2", func, low=0.0)
    lam = check_float(target_lambda, "target_lambda", func)
    if not isinstance(nonneg, (bool, np.bool_)):
        raise param_error("nonneg", func, "a bool", nonneg)
    code = NNLS_SOLVERS[check_option(solver, "solver", func, NNLS_SOLVERS)]
    cd_maxit = check_int(cd_maxit, "cd_maxit", func, low=1)
    cd_tol = check_float(cd_tol, "cd_tol", func, low=0.0)
    if w is not None:
        F = _as_matrix(w, "w", func)
        if F.shape[0] != m:
            raise param_error("w", func, f"a matrix with {m} rows (nrow(A))", f"shape {F.shape}", described=True)
        B = np.asarray(A.T @ F).T if sp.issparse(A) else F.T @ A  # k × n
        n_cols, side = n, "n = ncol(A)"
    else:
        F = _as_matrix(h, "h", func).T  # n × k
        if F.shape[0] != n:
            raise param_error("h", func, f"a matrix with {n} columns (ncol(A))", f"shape {F.T.shape}",
                              described=True)
        B = np.asarray(A @ F).T  # k × m
        n_cols, side = m, "m = nrow(A)"
    k = F.shape[1]
    T = None
    if target is not None and lam != 0.0:
        T = _as_matrix(target, "target", func)
        if T.shape != (k, n_cols):
            raise param_error("target", func, f"a matrix of shape ({k}, {n_cols}) (k × {side})",
                              f"shape {T.shape}", described=True)
    G = F.T @ F
    G[np.diag_indices(k)] += L2
    G, B = apply_target(G, np.ascontiguousarray(B, dtype=np.float64), T, lam)
    G = np.ascontiguousarray(G)
    L = cholesky_or_empty(G, code)
    X = np.zeros((k, n_cols))
    nnls_batch(G, np.ascontiguousarray(L, dtype=np.float64), np.ascontiguousarray(B), X, code, bool(nonneg),
               cd_maxit, cd_tol, False, L1)
    return X if w is not None else X.T
