"""The column step: one numba function that forms and solves one column's NNLS problem.

Every column of H solves ``min_{x≥0} ½ xᵀ G_c x − b_cᵀ x`` with

* ``G_c = G + gram[c]`` — the shared Gram ``WᵀW + L2·I`` plus a per-column Gram correction,
  e.g. ``−Σ_{i masked in c} w_i w_iᵀ`` for a speckled mask, or a guidance/penalty term;
* ``b_c = b + rhs[c]`` — the RHS ``Wᵀa_c − L1`` the pass computed from the column's data, plus
  a per-column RHS correction, e.g. ``−Σ_{i masked in c} a_ic w_i``, or ``λ t_c`` for a target.

The corrections travel as :class:`ColumnTerms`, a NamedTuple of arrays built by
:func:`column_terms`; a member that is not used is an *empty* array (leading dimension 0) so
that numba sees one static type whatever is in use (None would make a second type). The
sparse pass, the dense pass (``kernels/fused.py``) and ``NMFModel.predict`` all call
:func:`column_step`; later capabilities (masks, IRLS weights, targets, penalties) add members to
``ColumnTerms`` and lines to :func:`form_column` (and :func:`has_terms`) only, never to the
passes' loops.

With no corrections the step is exactly the solve the passes did before (same arithmetic on the
same ``G``, ``L`` and ``b``), so today's fits are bitwise unchanged; the passes then call
:func:`solve_column` directly (their variant compiled for blocks without terms, chosen per block
with :func:`has_terms`), which saves the step's per-column call (numba does not inline it). A
member added to ``ColumnTerms`` is added to :func:`has_terms` too. With a Gram correction and the
Cholesky-clip solver the corrected Gram is factorized per column (:func:`chol_factor`).

Functions are written as plain Python and compiled with ``numba.njit(cache=True, nogil=True)``
so they also run under ``NUMBA_DISABLE_JIT=1``.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from ._sources import guard_cache
from .nnls import SOLVER_CD, SOLVER_CHOLESKY, SOLVER_EXACT, active_set_solve, cd_solve, chol_solve, compile_variant

__all__ = ["ColumnTerms", "column_terms", "has_terms", "form_column", "column_step", "chol_factor",
           "bound_column", "accumulate_column",
           "solve_column", "SOLVE_COLUMN_BY_SOLVER", "compile_variant"]


class ColumnTerms(NamedTuple):
    """Per-column corrections of a block's NNLS problems (float64, C-contiguous).

    gram : (n_c, k, k) or (0, k, k)
        Added to the shared Gram for column c (symmetric).
    rhs : (n_c, k) or (0, k)
        Added to column c's right-hand side.
    """

    gram: np.ndarray
    rhs: np.ndarray


def column_terms(k: int, gram: np.ndarray | None = None, rhs: np.ndarray | None = None) -> ColumnTerms:
    """Build the :class:`ColumnTerms` of a block; members not given are empty arrays."""
    g = np.zeros((0, k, k)) if gram is None else np.ascontiguousarray(gram, dtype=np.float64)
    r = np.zeros((0, k)) if rhs is None else np.ascontiguousarray(rhs, dtype=np.float64)
    if g.ndim != 3 or g.shape[1:] != (k, k):
        raise ValueError(f"gram correction must have shape (n_c, {k}, {k}); got {g.shape}")
    if r.ndim != 2 or r.shape[1] != k:
        raise ValueError(f"rhs correction must have shape (n_c, {k}); got {r.shape}")
    return ColumnTerms(g, r)


def has_terms(terms: ColumnTerms | None) -> bool:
    """Whether any per-column correction is in use (else the all-columns fast paths apply)."""
    return terms is not None and any(a.shape[0] > 0 for a in terms)


def _chol_factor(G, L):
    """Lower Cholesky factor of G into L (plain loops); a tiny ridge ∝ trace when G is singular.

    The same fallback as ``solvers.updates.cholesky_or_empty`` (ridge ``1e-12·trace/k``), retried
    ×100 until the factorization exists, so a corrected Gram that lost rank gives no NaN.
    """
    k = G.shape[0]
    tr = 0.0
    for i in range(k):
        tr += G[i, i]
    ridge = 0.0
    for _attempt in range(12):
        ok = True
        for i in range(k):
            for j in range(i + 1):
                acc = G[i, j]
                if i == j:
                    acc += ridge
                for t in range(j):
                    acc -= L[i, t] * L[j, t]
                if i == j:
                    if acc <= 0.0:
                        ok = False
                        break
                    L[i, i] = np.sqrt(acc)
                else:
                    L[i, j] = acc / L[j, j]
            if not ok:
                break
        if ok:
            for i in range(k):
                for j in range(i + 1, k):
                    L[i, j] = 0.0
            return
        ridge = 1e-12 * max(tr / k, 1e-300) if ridge == 0.0 else ridge * 100.0


chol_factor = numba.njit(cache=True, nogil=True)(_chol_factor)


def _solve_column(G, L, b, x, solver, nonneg, cd_maxit, cd_tol, warm):
    if solver == SOLVER_CD:
        cd_solve(G, b, x, nonneg, cd_maxit, cd_tol, warm)
    elif solver == SOLVER_CHOLESKY:
        chol_solve(L, b, x, nonneg)
    else:
        active_set_solve(G, b, x, nonneg, warm)


solve_column = numba.njit(cache=True, nogil=True)(_solve_column)


# One solver each, with solve_column's arguments: a pass compiled against one of these compiles
# that solver only (``kernels/fused.py``; docs/architecture.md, "Kernel compilation"). Inlined
# into the pass (numba IR), so they are not functions of their own to compile (~0.3 s less on a
# fresh install's first fit).
def _solve_column_cd(G, L, b, x, solver, nonneg, cd_maxit, cd_tol, warm):
    cd_solve(G, b, x, nonneg, cd_maxit, cd_tol, warm)


def _solve_column_cholesky(G, L, b, x, solver, nonneg, cd_maxit, cd_tol, warm):
    chol_solve(L, b, x, nonneg)


def _solve_column_exact(G, L, b, x, solver, nonneg, cd_maxit, cd_tol, warm):
    active_set_solve(G, b, x, nonneg, warm)


#: solver code -> the column solve of that solver alone (what solve_column does for that code).
SOLVE_COLUMN_BY_SOLVER = {
    SOLVER_CD: numba.njit(cache=True, nogil=True, inline="always")(_solve_column_cd),
    SOLVER_CHOLESKY: numba.njit(cache=True, nogil=True, inline="always")(_solve_column_cholesky),
    SOLVER_EXACT: numba.njit(cache=True, nogil=True, inline="always")(_solve_column_exact),
}


def _form_column(c, G, b, Gc, terms):
    """Add column c's corrections to ``b`` (in place) and, if any, write ``G + gram[c]`` to Gc.

    Returns True when ``Gc`` holds a corrected Gram (the solve must use it), False when the
    shared ``G`` applies unchanged. This is the one place later corrections are added.
    """
    k = b.shape[0]
    rhs = terms.rhs
    if rhs.shape[0] > 0:
        for r in range(k):
            b[r] += rhs[c, r]
    gram = terms.gram
    if gram.shape[0] > 0:
        for r in range(k):
            for s in range(k):
                Gc[r, s] = G[r, s] + gram[c, r, s]
        return True
    return False


form_column = numba.njit(cache=True, nogil=True)(_form_column)


def _column_step(c, G, L, b, x, terms, Gc, Lc, solver, nonneg, cd_maxit, cd_tol, warm):
    """Form column c's problem from (G, b) and its terms, and solve it into ``x`` (in place).

    ``b`` holds the column's base RHS ``Wᵀa_c − L1`` and is modified; ``x`` holds the warm start
    when ``warm``. ``Gc``, ``Lc`` are k × k scratch arrays (used only with a Gram correction);
    ``L`` is G's lower Cholesky factor for the Cholesky-clip solver (empty otherwise).
    """
    Gs = G
    Ls = L
    if form_column(c, G, b, Gc, terms):
        if solver == SOLVER_CHOLESKY:
            chol_factor(Gc, Lc)
        Gs = Gc
        Ls = Lc
    solve_column(Gs, Ls, b, x, solver, nonneg, cd_maxit, cd_tol, warm)


column_step = numba.njit(cache=True, nogil=True)(_column_step)


def _bound_column(x, ub):
    """§8's upper bound on a solved column (row), in place: ``x ← min(x, ub)``; ``ub`` 0 is none."""
    if ub > 0.0:
        for r in range(x.shape[0]):
            if x[r] > ub:
                x[r] = ub


bound_column = numba.njit(cache=True, nogil=True, inline="always")(_bound_column)


def _accumulate_column(x, hsum, Q):
    """A block pass's statistics of a solved column: ``hsum += |x|``, ``Q += x xᵀ`` (in place)."""
    k = x.shape[0]
    for r in range(k):
        hsum[r] += abs(x[r])
        for s in range(k):
            Q[r, s] += x[r] * x[s]


accumulate_column = numba.njit(cache=True, nogil=True, inline="always")(_accumulate_column)


guard_cache(__name__, globals())  # drop cache entries compiled from other kernel sources (kernels/_sources.py)
