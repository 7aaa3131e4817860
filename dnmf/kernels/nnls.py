"""NNLS for many right-hand sides sharing one Gram matrix (numba kernels).

Every solver minimizes, per column, ``½ xᵀ G x − bᵀ x`` subject to ``x ≥ 0`` (or unconstrained
when ``nonneg`` is False), where ``G = FᵀF (+ L2·I)`` is a k × k symmetric positive
(semi-)definite Gram matrix and ``b = Fᵀa (− L1)``. That is the least-squares problem
``min ‖F x − a‖²`` written in its normal-equation form, which is all the ALS engine ever
needs: the data enter only through ``b``.

Three solvers, selected by an integer code so the fused block kernels can dispatch without
Python objects:

``SOLVER_CD`` (0)
    RcppML's coordinate descent on the residual form (spec/rcppml.md §2.5): natural coordinate
    order, at most ``maxit`` sweeps, stop when the mean relative coordinate change of a sweep
    falls below ``tol``. With ``warm`` the initial ``x`` is the caller's; otherwise it starts at 0.
``SOLVER_CHOLESKY`` (1)
    RcppML's default for k < 32 without L1: the unconstrained solution ``G⁻¹b`` from a
    precomputed lower Cholesky factor ``L``, with negatives clipped to zero. Fast, but *not* an
    exact NNLS solution (documented quirk kept for numerical parity with RcppML).
``SOLVER_EXACT`` (2)
    An exact active-set solver (Lawson–Hanson on the normal equations), warm-startable from the
    support of the given ``x``. Agrees with ``scipy.optimize.nnls`` to rounding.
"""

from __future__ import annotations

import numba
import numpy as np

from ._sources import guard_cache

__all__ = [
    "SOLVER_CD",
    "SOLVER_CHOLESKY",
    "SOLVER_EXACT",
    "cd_solve",
    "chol_solve",
    "active_set_solve",
    "nnls_batch",
    "compile_variant",
]

SOLVER_CD = 0
SOLVER_CHOLESKY = 1
SOLVER_EXACT = 2

_jit = numba.njit(cache=True, nogil=True)


def compile_variant(fn, name: str, **fixed):
    """``numba.njit(cache=True, nogil=True)`` of a copy of the plain function ``fn`` in which
    the module-level names in ``fixed`` are bound to other functions — a compile-time choice
    (e.g. the solver), so a variant compiles only the code it calls. The copy is named ``name``
    (numba's cache files are named after it) and still runs under ``NUMBA_DISABLE_JIT=1``.
    """
    import types

    g = dict(fn.__globals__)
    g.update(fixed)
    copy = types.FunctionType(fn.__code__, g, name, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = name
    copy.__module__ = fn.__module__
    copy.__doc__ = fn.__doc__
    return numba.njit(cache=True, nogil=True)(copy)


@_jit
def cd_solve(G, b, x, nonneg, maxit, tol, warm):
    """Coordinate descent for one column, in place in ``x``; returns the sweeps run.

    ``b`` is not modified (a residual copy is used). ``warm`` keeps the incoming ``x`` as the
    start; otherwise ``x`` is reset to 0.
    """
    k = G.shape[0]
    r = np.empty(k)
    if warm:
        for i in range(k):
            acc = b[i]
            for j in range(k):
                acc -= G[i, j] * x[j]
            r[i] = acc
    else:
        for i in range(k):
            x[i] = 0.0
            r[i] = b[i]
    sweeps = 0
    for _ in range(maxit):
        sweeps += 1
        s = 0.0
        for i in range(k):
            gii = G[i, i]
            if gii <= 0.0:
                continue
            delta = r[i] / gii
            x_new = x[i] + delta
            if nonneg and x_new < 0.0:
                delta = -x[i]
                x[i] = 0.0
            else:
                x[i] = x_new
            if delta == 0.0:
                continue
            s += abs(delta) / (abs(x[i]) + 1e-15)
            for j in range(k):
                r[j] -= G[j, i] * delta
        if tol > 0.0 and s / k < tol:
            break
    return sweeps


@_jit
def chol_solve(L, b, x, nonneg):
    """``x = (L Lᵀ)⁻¹ b``, then ``x ← max(x, 0)`` when ``nonneg`` (RcppML's Cholesky-clip)."""
    k = L.shape[0]
    # forward substitution L y = b (y stored in x)
    for i in range(k):
        acc = b[i]
        for j in range(i):
            acc -= L[i, j] * x[j]
        x[i] = acc / L[i, i]
    # back substitution Lᵀ x = y
    for i in range(k - 1, -1, -1):
        acc = x[i]
        for j in range(i + 1, k):
            acc -= L[j, i] * x[j]
        x[i] = acc / L[i, i]
    if nonneg:
        for i in range(k):
            if x[i] < 0.0:
                x[i] = 0.0


@_jit
def _solve_sub(G, b, idx, n_act, out, work):
    """Solve ``G[idx, idx] s = b[idx]`` for the first ``n_act`` entries of ``idx`` into ``out``.

    A Cholesky factorization with a pivot check. A (numerically) singular subsystem — e.g. a
    factor that collapsed to zero — is refactorized with a small ridge on the diagonal,
    growing ×100 until it succeeds, so rank-deficient Grams never produce NaN (a zero column
    of the design gets exactly 0). Plain loops, no LAPACK: compiles in a fraction of the time.
    """
    dmax = 0.0
    for a in range(n_act):
        dmax = max(dmax, G[idx[a], idx[a]])
    ridge = 0.0
    for _attempt in range(12):
        ok = True
        for a in range(n_act):
            ia = idx[a]
            for c in range(a + 1):
                acc = G[ia, idx[c]]
                if a == c:
                    acc += ridge
                for t in range(c):
                    acc -= work[a, t] * work[c, t]
                if a == c:
                    if acc <= 1e-13 * max(G[ia, ia], 1e-300) or acc <= 0.0:
                        ok = False
                        break
                    work[a, a] = np.sqrt(acc)
                else:
                    work[a, c] = acc / work[c, c]
            if not ok:
                break
        if ok:
            break
        ridge = 1e-12 * max(dmax, 1e-300) if ridge == 0.0 else ridge * 100.0
    for a in range(n_act):
        acc = b[idx[a]]
        for t in range(a):
            acc -= work[a, t] * out[t]
        out[a] = acc / work[a, a]
    for a in range(n_act - 1, -1, -1):
        acc = out[a]
        for t in range(a + 1, n_act):
            acc -= work[t, a] * out[t]
        out[a] = acc / work[a, a]


@_jit
def active_set_solve(G, b, x, nonneg, warm):
    """Exact NNLS for one column by Lawson–Hanson on the normal equations, in place in ``x``.

    ``warm`` starts from the support of the incoming ``x`` (entries > 0), which usually saves
    most iterations in ALS where the support changes little between iterations. Without
    ``nonneg`` the unconstrained solution of ``G x = b`` is returned. Returns the number of
    inner solves.
    """
    k = G.shape[0]
    idx = np.empty(k, dtype=np.int64)
    work = np.zeros((k, k))
    s = np.empty(k)
    if not nonneg:
        for i in range(k):
            idx[i] = i
        _solve_sub(G, b, idx, k, s, work)
        for i in range(k):
            x[i] = s[i]
        return 1
    passive = np.zeros(k, dtype=np.bool_)
    if warm:
        for i in range(k):
            if x[i] > 0.0:
                passive[i] = True
            else:
                x[i] = 0.0
    else:
        for i in range(k):
            x[i] = 0.0
    bmax = 0.0
    gmax = 0.0
    for i in range(k):
        bmax = max(bmax, abs(b[i]))
        gmax = max(gmax, G[i, i])
    solves = 0
    max_outer = 3 * k + 10
    first = warm
    for _outer in range(max_outer):
        if not first:
            # dual w = b − G x ; pick the most violated coordinate outside the passive set
            xmax = 0.0
            for i in range(k):
                xmax = max(xmax, abs(x[i]))
            thresh = 64.0 * k * 2.220446049250313e-16 * (bmax + gmax * xmax * k)
            best = -1
            best_w = thresh
            for i in range(k):
                if passive[i]:
                    continue
                wi = b[i]
                for j in range(k):
                    wi -= G[i, j] * x[j]
                if wi > best_w:
                    best_w = wi
                    best = i
            if best < 0:
                break
            passive[best] = True
        first = False
        # inner loop: make the passive-set solution feasible
        for _inner in range(3 * k + 10):
            n_act = 0
            for i in range(k):
                if passive[i]:
                    idx[n_act] = i
                    n_act += 1
            if n_act == 0:
                break
            _solve_sub(G, b, idx, n_act, s, work)
            solves += 1
            feasible = True
            for a in range(n_act):
                if s[a] <= 0.0:
                    feasible = False
                    break
            if feasible:
                for i in range(k):
                    x[i] = 0.0
                for a in range(n_act):
                    x[idx[a]] = s[a]
                break
            # step from x towards s until the first passive coordinate hits zero
            alpha = 1.0
            hit = -1
            for a in range(n_act):
                if s[a] <= 0.0:
                    xi = x[idx[a]]
                    denom = xi - s[a]
                    ratio = xi / denom if denom > 0.0 else 0.0
                    if ratio < alpha:
                        alpha = ratio
                        hit = idx[a]
            for a in range(n_act):
                i = idx[a]
                x[i] = x[i] + alpha * (s[a] - x[i])
            if hit >= 0:
                x[hit] = 0.0
            for a in range(n_act):
                i = idx[a]
                if x[i] <= 0.0:
                    x[i] = 0.0
                    passive[i] = False
    return solves


def _nnls_batch(G, L, B, X, solver, nonneg, maxit, tol, warm, l1, c0, c1):
    """Solve columns ``c0:c1`` of ``B − l1`` (k × n) into those of ``X`` (k × n) in place.

    ``L`` is the lower Cholesky factor of ``G`` for ``SOLVER_CHOLESKY`` (ignored otherwise);
    ``X`` holds the warm start when ``warm`` is True. Columns are independent, so ranges may be
    solved by concurrent threads (the kernel releases the GIL).
    """
    k = B.shape[0]
    b = np.empty(k)
    x = np.empty(k)
    for c in range(c0, c1):
        for r in range(k):
            b[r] = B[r, c] - l1
            x[r] = X[r, c]
        if solver == SOLVER_CD:
            cd_solve(G, b, x, nonneg, maxit, tol, warm)
        elif solver == SOLVER_CHOLESKY:
            chol_solve(L, b, x, nonneg)
        else:
            active_set_solve(G, b, x, nonneg, warm)
        for r in range(k):
            X[r, c] = x[r]


def _cd_unused(G, b, x, nonneg, maxit, tol, warm):
    raise RuntimeError("solver not compiled in this variant")


def _chol_unused(L, b, x, nonneg):
    raise RuntimeError("solver not compiled in this variant")


def _exact_unused(G, b, x, nonneg, warm):
    raise RuntimeError("solver not compiled in this variant")


_unused = {"cd_solve": _jit(_cd_unused), "chol_solve": _jit(_chol_unused), "active_set_solve": _jit(_exact_unused)}
# solver code -> nnls_batch compiled with that solver only (the others are stubs never reached).
_NNLS_BATCH = {
    code: compile_variant(_nnls_batch, f"_nnls_batch_s{code}", **{n: f for n, f in _unused.items() if n != keep})
    for code, keep in ((SOLVER_CD, "cd_solve"), (SOLVER_CHOLESKY, "chol_solve"), (SOLVER_EXACT, "active_set_solve"))
}


def nnls_batch(G, L, B, X, solver, nonneg, maxit, tol, warm, l1, c0=0, c1=None):
    """:func:`_nnls_batch` (same arguments; all columns by default), compiled for ``solver``
    alone (docs/architecture.md, "Kernel compilation")."""
    _NNLS_BATCH[int(solver)](G, L, B, X, solver, nonneg, maxit, tol, warm, l1, int(c0),
                             B.shape[1] if c1 is None else int(c1))


guard_cache(__name__, globals())  # drop cache entries compiled from other kernel sources (kernels/_sources.py)
