"""The fused block pass of one ALS iteration (DESIGN §3), numba kernels.

For a column block A_j (m × n_j) and the current W (m × k, C-contiguous) the pass computes, in
one task, without materializing anything of size m × n_j,

1. ``b = Wᵀ a_c − L1`` for each column c of the block,
2. ``h_c ← NNLS(G, b)`` with the chosen solver (warm-started from a scaled previous h_c),
3. the partial statistics ``P += a_c h_cᵀ`` (m × k), ``Q += h_c h_cᵀ`` (k × k) and
   ``hsum += |h_c|`` (k), all accumulated in float64.

H is stored transposed per block (``ht``, n_j × k, C-contiguous) so that a column's k values are
contiguous in memory. Sparse blocks are CSC triplets, swept twice: once for ``b`` and the solves
(gathering rows of W), then once for ``P`` (scattering into rows of P). A single sweep that does
both per column (the design until issue 12) keeps W and P in cache together: at m = 20,000,
k = 10 that is 3.2 MB against a 2 MB L2 per core, and the pass ran 1.3× slower than two sweeps
(16.1 against 12.4 ns per nonzero on one core, ``benchmarks/bench_nmf.py --kernel``); re-reading
the block's triplets costs less than the cache misses. P is accumulated in the same column
order either way, so the results are bitwise the same.

Prefetching W's and P's rows. Each stored entry of the block needs a row of W (first sweep) or
of P (second) at a row index that jumps at random; at m = 20,000, k = 10 those rows (1.6 MB each)
come from the last-level cache or from memory, and the core's out-of-order window alone keeps too
few of them in flight. Both sweeps therefore prefetch every cache line of the row that the entry
``AHEAD`` (8) positions on will need (``kernels/_prefetch.py``: ``llvm.prefetch``). A prefetch
changes no value: results are bitwise those of the pass without it
(``tests/test_block_pass_prefetch.py``). On one thread of an AMD EPYC (512 KiB L2, 32 MiB L3),
20,000 × 6,250 blocks at 2 %, medians of 20 interleaved rounds, the pass takes 0.66–0.71 of the
time of the pass before it at k = 10 and 0.70 at k = 30 (0.81–0.87× scipy's two products at
k = 10, against 1.28× before); at k = 50, where the CD solves set the time, and at 900 entries a
column it is unchanged (docs/architecture.md, "Prefetching W's and P's rows"). The pass before
swept W and P in row bands sized to the L2 cache instead (issue 12): with prefetching, one band
was the fastest at every k measured, so the bands are gone. The first sweep still keeps every
column's ``b`` in a scratch B (n_j × k) and solves the columns after it: solving each column
right after its ``b`` was as fast at k = 10 and 7 % slower at k = 50 with the CD solver
(RcppML's choice for k ≥ 32).

Fewer functions to compile. numba spends ~0.1–0.2 s on every function it compiles, however small
(the pipeline, an LLVM module, its finalization), so the pass compiles as few as it can: its
scratch (``B``, ``x``, and the column step's ``Gc``, ``Lc``) comes from the wrapper instead of
``np.empty``/``np.zeros`` inside (four array-constructor implementations); whether a block has
terms is the compile-time constant ``NO_TERMS`` of the variant, so numba prunes the other branch
(no ``any_terms``, no stand-in column step); and the per-solver column solves are inlined
(``kernels/column.py``). The default variant now compiles itself and ``chol_solve`` only. First
fit on an empty cache (300 × 400 at 10 %, 6 runs each, alternating with the code before): median
3.93 → 3.22 s (range 3.27–5.25 → 2.40–3.94) in a slow phase of the machine, 5 of 6 pairs faster;
the pass's own compile time, median 3.26 → 2.68 s for the first two changes and 2.32 → 2.01 s
for the inlining (6 pairs each). Results are bitwise unchanged.

Positions and row indices are cast to unsigned (``np.uintp``) before they index an array. With a
signed index numba emits a wrap-around branch for negative values on every access, which also
keeps LLVM from hoisting the row addressing; unsigned indices drop it. The values are the same,
so results are bitwise unchanged, and the pass runs ~15 % faster (k = 10, one thread: the
``WᵀA_j`` sweep 6.9 → 6.1 ns per nonzero, the ``P`` sweep 7.0 → 5.7; ``bench_nmf.py --kernel``).
CSC blocks never hold negative indices (``io/blocks.py`` builds them from scipy's).

Each column's problem is formed and solved by the one column step
(``kernels/column.py::column_step``), shared with ``NMFModel.predict``: per-column corrections
(masked entries, IRLS weights, targets, penalties) arrive in ``terms`` (a
:class:`~dnmf.kernels.column.ColumnTerms` of arrays, empty when unused) and change only how
``G`` and ``b`` are formed per column before the solve; the passes' loops and the accumulation
stay the same. A block without terms calls the solver directly (what ``column_step`` does then):
the per-column call of the step, which numba does not inline, cost ~100 ns per column (+25 % on
the hawaiibirds pass at k = 8).
"""

from __future__ import annotations

import numba
import numpy as np

from ._prefetch import AHEAD, prefetch_read, prefetch_write
from ._sources import guard_cache
from .column import (SOLVE_COLUMN_BY_SOLVER, accumulate_column, bound_column, column_step, compile_variant, has_terms,
                     solve_column)

__all__ = ["csc_block_pass", "dense_block_solve", "csc_sq_norm"]

# Unsigned steps for unsigned positions: numba types uintp + an int literal as float64.
_U1, _U2, _U3, _U4 = (np.uintp(i) for i in range(1, 5))


def _csc_block_pass(data, indices, indptr, w, G, L, l1, ht, warm_scale, terms, solver, nonneg, cd_maxit, cd_tol,
                    warm, P, Q, hsum, ub, B, x, Gc, Lc):
    """Fused H update and partial statistics for one sparse block (see module docstring).

    Parameters
    ----------
    data, indices, indptr : CSC triplets of the block (m × n_j)
    w : (m, k) float64, or float32 (``dtype="float32"``: half the bytes gathered per stored entry;
        each product is formed in float64 from the float32 values, exactly)
    G : (k, k) float64 — penalized Gram ``WᵀW + L2·I``
    L : (k, k) float64 — lower Cholesky factor of G (used by the cholesky solver only)
    l1 : float — L1 penalty subtracted from every RHS entry
    ht : (n_j, k) float64 — in: previous H of the block (raw), out: new H (raw)
    warm_scale : (k,) float64 — multiplies the previous H to give the warm start
    terms : ColumnTerms — per-column corrections of (G, b) (``kernels/column.py``); empty arrays
        when unused
    P : (m, k) float64, Q : (k, k) float64, hsum : (k,) float64 — accumulated in place
    ub : float — upper bound of H (RcppML §8.6), applied right after each solve, before the
        accumulation; 0: none
    B : (n_j, k) float64, x : (k,) float64 — scratch: the columns' RHS, a column's solution
    Gc, Lc : (k, k) float64 — scratch of the column step (terms only; Lc zeroed)
    """
    k = w.shape[1]
    n = indptr.shape[0] - 1
    last = np.uintp(indices.shape[0])  # entries prefetched ahead stay below it
    for c in range(n):
        p = np.uintp(indptr[c])
        end = np.uintp(indptr[c + 1])
        b = B[c]
        for r in range(k):
            b[r] = -l1
        # b += Σ_p a_p w_{i_p}, four entries per round: b[r] is loaded and stored once per four
        # products instead of once per product, and the additions keep their order, so b is
        # bitwise the one-at-a-time sum (~10 % less time on this sweep, bench_nmf.py --kernel).
        # The rows of W that the entries AHEAD positions on will need are prefetched now (the
        # next column's first ones near a column's end: the sweep's own order).
        while p + _U3 < end:
            q = p + AHEAD
            if q + _U3 < last:
                prefetch_read(w, np.uintp(indices[q]))
                prefetch_read(w, np.uintp(indices[q + _U1]))
                prefetch_read(w, np.uintp(indices[q + _U2]))
                prefetch_read(w, np.uintp(indices[q + _U3]))
            a0 = np.float64(data[p])  # float64 products also of float32 values and W (exact)
            a1 = np.float64(data[p + _U1])
            a2 = np.float64(data[p + _U2])
            a3 = np.float64(data[p + _U3])
            w0 = w[np.uintp(indices[p])]  # row views: let LLVM keep the addressing out of the r loop
            w1 = w[np.uintp(indices[p + _U1])]
            w2 = w[np.uintp(indices[p + _U2])]
            w3 = w[np.uintp(indices[p + _U3])]
            for r in range(k):
                b[r] = (((b[r] + a0 * w0[r]) + a1 * w1[r]) + a2 * w2[r]) + a3 * w3[r]
            p += _U4
        while p < end:
            a = np.float64(data[p])
            wrow = w[np.uintp(indices[p])]
            for r in range(k):
                b[r] += a * wrow[r]
            p += _U1
    for c in range(n):
        b = B[c]
        if warm:
            for r in range(k):
                x[r] = ht[c, r] * warm_scale[r]
        else:
            for r in range(k):
                x[r] = 0.0
        if NO_TERMS:  # = column_step with no terms, without its per-column call (module docstring)
            solve_column(G, L, b, x, solver, nonneg, cd_maxit, cd_tol, warm)
        else:
            column_step(c, G, L, b, x, terms, Gc, Lc, solver, nonneg, cd_maxit, cd_tol, warm)
        bound_column(x, ub)
        for r in range(k):
            ht[c, r] = x[r]
        accumulate_column(x, hsum, Q)
    # P = A_j H_jᵀ in a second sweep over the block (module docstring: W and P together overflow
    # a core's L2 cache at m = 20,000, k = 10); P gets its additions in column order.
    # Two entries per round: h[r] is loaded once for two rows of P (a column's rows are distinct,
    # so each row still gets one addition per column, in column order). One thread, best of 10
    # interleaved runs against one entry per round: k = 8 −2 %, k = 10 −5 to −7 %, k = 50 −4 %
    # per block pass; four per round was slower at k = 10 (+4 %). Rows of P prefetched as above.
    for c in range(n):
        hi = np.uintp(indptr[c + 1])
        hrow = ht[c]
        p = np.uintp(indptr[c])
        while p + _U1 < hi:
            q = p + AHEAD
            if q + _U1 < last:
                prefetch_write(P, np.uintp(indices[q]))
                prefetch_write(P, np.uintp(indices[q + _U1]))
            a0 = data[p]
            a1 = data[p + _U1]
            p0 = P[np.uintp(indices[p])]
            p1 = P[np.uintp(indices[p + _U1])]
            for r in range(k):
                h = hrow[r]
                p0[r] += a0 * h
                p1[r] += a1 * h
            p += _U2
        if p < hi:
            a = data[p]
            prow = P[np.uintp(indices[p])]
            for r in range(k):
                prow[r] += a * hrow[r]


#: Bound per compiled variant (:func:`_variants`): True in the passes compiled for blocks without
#: column terms, where numba prunes the column step's branch, so that nothing of it is compiled.
NO_TERMS = True


def _variants(fn, name):
    """Compiled variants of a pass, by (solver, with terms): each compiles one solver, and the
    column step only where terms are used (docs/architecture.md, "Kernel compilation")."""
    out = {}
    for solver, solve in SOLVE_COLUMN_BY_SOLVER.items():
        out[solver, False] = compile_variant(fn, f"{name}_s{solver}", solve_column=solve, NO_TERMS=True)
        out[solver, True] = compile_variant(fn, f"{name}_s{solver}_terms", solve_column=solve, NO_TERMS=False)
    return out


_CSC_BLOCK_PASS = _variants(_csc_block_pass, "_csc_block_pass")


_INT32_MAX = np.iinfo(np.int32).max


def csc_block_pass(data, indices, indptr, w, G, L, l1, ht, warm_scale, terms, solver, nonneg, cd_maxit, cd_tol,
                   warm, P, Q, hsum, ub=0.0, empty=np.empty):
    """:func:`_csc_block_pass` (same arguments), compiled for ``solver`` and for whether
    ``terms`` holds corrections; its scratch from ``empty(shape, dtype)`` (e.g. a pool's).

    The pass is compiled for one index layout, the one every block of the library has (int32 row
    indices, int64 ``indptr``; ``io/memory.py::index_dtype``): other index dtypes are converted
    here, so that they do not each compile the whole pass again (~1.5 s apiece). Row indices stay
    int64 only for m ≥ 2³¹ rows."""
    m, k = w.shape
    if indptr.dtype != np.int64:
        indptr = indptr.astype(np.int64)
    if indices.dtype != np.int32 and m <= _INT32_MAX:
        indices = indices.astype(np.int32)
    B = empty((indptr.shape[0] - 1, k), np.float64)
    x = empty((k,), np.float64)
    Gc = np.empty((k, k))  # the column step's per-column Gram (with a Gram correction only)
    Lc = np.zeros((k, k))
    _CSC_BLOCK_PASS[int(solver), has_terms(terms)](data, indices, indptr, w, G, L, l1, ht, warm_scale, terms, solver,
                                                   nonneg, cd_maxit, cd_tol, warm, P, Q, hsum, float(ub), B, x, Gc,
                                                   Lc)


def _dense_block_solve(B, G, L, l1, ht, warm_scale, terms, solver, nonneg, cd_maxit, cd_tol, warm, Q, hsum, ub):
    """NNLS for the columns of a dense block's RHS ``B = WᵀA_j`` (k × n_j); fills ``ht``, Q, hsum.

    The arguments are those of :func:`csc_block_pass`; each column goes through the same column
    step. Also the solve of ``NMFModel.predict`` (with throw-away Q, hsum). ``ub`` > 0 bounds
    each solved column (as :func:`csc_block_pass`).
    """
    k = B.shape[0]
    n = B.shape[1]
    b = np.empty(k)
    x = np.empty(k)
    Gc = np.empty((k, k))
    Lc = np.zeros((k, k))
    for c in range(n):
        for r in range(k):
            b[r] = B[r, c] - l1
        if warm:
            for r in range(k):
                x[r] = ht[c, r] * warm_scale[r]
        else:
            for r in range(k):
                x[r] = 0.0
        if NO_TERMS:  # = column_step with no terms, without its per-column call (module docstring)
            solve_column(G, L, b, x, solver, nonneg, cd_maxit, cd_tol, warm)
        else:
            column_step(c, G, L, b, x, terms, Gc, Lc, solver, nonneg, cd_maxit, cd_tol, warm)
        bound_column(x, ub)
        for r in range(k):
            ht[c, r] = x[r]
        accumulate_column(x, hsum, Q)


_DENSE_BLOCK_SOLVE = _variants(_dense_block_solve, "_dense_block_solve")


def dense_block_solve(B, G, L, l1, ht, warm_scale, terms, solver, nonneg, cd_maxit, cd_tol, warm, Q, hsum, ub=0.0):
    """:func:`_dense_block_solve` (same arguments), compiled for ``solver`` and for whether
    ``terms`` holds corrections."""
    _DENSE_BLOCK_SOLVE[int(solver), has_terms(terms)](B, G, L, l1, ht, warm_scale, terms, solver, nonneg, cd_maxit,
                                                      cd_tol, warm, Q, hsum, float(ub))


def _csc_sq_norm(data):
    s = 0.0
    for v in data:
        s += float(v) * float(v)
    return s


csc_sq_norm = numba.njit(cache=True, nogil=True)(_csc_sq_norm)


guard_cache(__name__, globals())  # drop cache entries compiled from other kernel sources (kernels/_sources.py)
