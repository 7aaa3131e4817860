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

Row bands. Each sweep goes band by band over the block's rows: with nb bands, first the
entries of rows [0, m/nb) of every column, then the next band's, and so on (:func:`row_bands`).
One band of W (the first sweep) or of P (the second) is then at most half a core's L2 cache,
but at least 1 MiB (``BAND_BYTES``, the L2 read from sysfs), and stays near the core while its
entries are swept, instead of W's or P's rows coming from L3 for every stored entry. The first sweep keeps each column's partial
``b`` in a scratch B (n_j × k, also with one band) and solves the columns after the last band. Rows are
sorted within a column and each row lies in one band, so every ``b_c`` and every row of P get the
same additions in the same order as in one sweep: results are bitwise those of the one-band
pass. A band keeps at least ``BAND_MIN_ENTRIES`` entries per column on average (short columns:
fewer bands); ``tests/test_row_bands.py`` checks the bitwise equality. Measured on one thread
against the one-band pass, best of 7 interleaved runs on gamma-planted blocks: m = 20,000 at 2 %,
k = 10 (2 bands) 13.0 → 11.9 ns per stored entry; m = 30,000 at 3 %, k = 30 (7 bands) 29.2 → 21.0;
k = 50 (12 bands) 48.9 → 29.7. At 150 entries per column (k = 30, 4 bands) the solves dominate
and the pass moved by ~2 %. Compiling it costs more: the first fit on an empty numba cache took
a median 3.24 s against 2.83 s for the one-band pass (5 runs each, alternating, 300 × 400 at
10 %), with the loops written once (see the comment in the pass); two copies of the W sweep and
eight entries per round cost 1–2 s more still.

Fewer functions to compile. numba spends ~0.1–0.2 s on every function it compiles, however small
(the pipeline, an LLVM module, its finalization), so the pass compiles as few as it can: its
scratch (``x``, and the column step's ``Gc``, ``Lc``) comes from the wrapper instead of
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

from ._sources import guard_cache
from .column import (SOLVE_COLUMN_BY_SOLVER, accumulate_column, bound_column, column_step, compile_variant, has_terms,
                     solve_column)

__all__ = ["csc_block_pass", "dense_block_solve", "csc_sq_norm"]

# Unsigned steps for unsigned positions: numba types uintp + an int literal as float64.
_U1, _U2, _U3, _U4 = (np.uintp(i) for i in range(1, 5))


def _csc_block_pass(data, indices, indptr, w, G, L, l1, ht, warm_scale, terms, solver, nonneg, cd_maxit, cd_tol,
                    warm, P, Q, hsum, ub, bounds, pos, B, x, Gc, Lc):
    """Fused H update and partial statistics for one sparse block (see module docstring).

    Parameters
    ----------
    data, indices, indptr : CSC triplets of the block (m × n_j), rows sorted within each column
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
    bounds : (nb + 1,) int64 — the row bands' boundaries, 0 … m (:func:`row_bands`)
    pos : (nb − 1, n_j) uintp, B : (n_j, k) float64, x : (k,) float64 — scratch (pos: with
        nb > 1 only)
    Gc, Lc : (k, k) float64 — scratch of the column step (terms only; Lc zeroed)
    """
    k = w.shape[1]
    n = indptr.shape[0] - 1
    nb = bounds.shape[0] - 1
    if nb > 1:  # pos[t - 1, c]: column c's first entry in row band t (rows are sorted: a binary search)
        for c in range(n):
            lo = np.uintp(indptr[c])
            hi = np.uintp(indptr[c + 1])
            for t in range(1, nb):
                row = bounds[t]
                z = hi
                while lo < z:
                    mid = (lo + z) >> _U1
                    if indices[mid] < row:
                        lo = mid + _U1
                    else:
                        z = mid
                pos[t - 1, c] = lo
    # b_c = Wᵀa_c − L1 of every column into row c of B, band by band (module docstring, "Row
    # bands"); one band is one sweep. The code is written once, inline: a second copy of this
    # loop (one for one band, one for several) or a helper function per step cost ~0.5 s more
    # to compile on a fresh install, and eight entries per round instead of four ~1–2 s more.
    for t in range(nb):
        for c in range(n):
            p = np.uintp(indptr[c]) if t == 0 else np.uintp(pos[t - 1, c])
            end = np.uintp(indptr[c + 1]) if t == nb - 1 else np.uintp(pos[t, c])
            bc = B[c]
            if t == 0:
                for r in range(k):
                    bc[r] = -l1
            # b += Σ_p a_p w_{i_p}, four entries per round: b[r] is loaded and stored once per four
            # products instead of once per product, and the additions keep their order, so b is
            # bitwise the one-at-a-time sum (~10 % less time on this sweep, bench_nmf.py --kernel).
            while p + _U3 < end:
                a0 = np.float64(data[p])  # float64 products also of float32 values and W (exact)
                a1 = np.float64(data[p + _U1])
                a2 = np.float64(data[p + _U2])
                a3 = np.float64(data[p + _U3])
                w0 = w[np.uintp(indices[p])]  # row views: let LLVM keep the addressing out of the r loop
                w1 = w[np.uintp(indices[p + _U1])]
                w2 = w[np.uintp(indices[p + _U2])]
                w3 = w[np.uintp(indices[p + _U3])]
                for r in range(k):
                    bc[r] = (((bc[r] + a0 * w0[r]) + a1 * w1[r]) + a2 * w2[r]) + a3 * w3[r]
                p += _U4
            while p < end:
                a = np.float64(data[p])
                wrow = w[np.uintp(indices[p])]
                for r in range(k):
                    bc[r] += a * wrow[r]
                p += _U1
    for c in range(n):
        b = B[c]  # the column's RHS (the column step may add its corrections in place)
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
    # a core's L2 cache at m = 20,000, k = 10), band by band. Row i lies in one band, so P[i]
    # gets its additions in the same column order as in one sweep: P is bitwise unchanged.
    # Two entries per round: h[r] is loaded once for two rows of P (a column's rows are distinct,
    # so each row still gets one addition per column, in column order). One thread, best of 10
    # interleaved runs against one entry per round: k = 8 −2 %, k = 10 −5 to −7 %, k = 50 −4 %
    # per block pass; four per round was slower at k = 10 (+4 %).
    for t in range(nb):
        for c in range(n):
            lo = np.uintp(indptr[c]) if t == 0 else np.uintp(pos[t - 1, c])
            hi = np.uintp(indptr[c + 1]) if t == nb - 1 else np.uintp(pos[t, c])
            hrow = ht[c]
            p = lo
            while p + _U1 < hi:
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


def l2_cache_bytes(default: int = 2 * 1024 * 1024) -> int:
    """This machine's L2 cache per core, in bytes (Linux sysfs; ``default`` where unknown)."""
    import glob

    for folder in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(f"{folder}/level") as f:
                level = f.read().strip()
            with open(f"{folder}/type") as f:
                kind = f.read().strip()
            with open(f"{folder}/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        if level == "2" and kind in ("Unified", "Data"):
            scale = {"K": 1024, "M": 1024 * 1024}.get(size[-1:].upper(), 1)
            try:
                return int(size.rstrip("KkMm")) * scale
            except ValueError:
                break
    return default


# Row bands (module docstring, "Row bands"): one band of W's rows takes at most half a core's L2
# cache, and never less than 1 MiB, so it stays near the core while the block's entries of that
# band are swept; and a band keeps at least BAND_MIN_ENTRIES stored entries per column on
# average, so that the per-column work of a band (b loaded and stored, a segment found) stays
# small beside its products. The 1 MiB floor: on a CPU with 512 KiB of L2 (and a large L3) half
# the L2 gave 7 bands at k = 10, 25-45 % slower than 1-3; bands of ~1 MiB were the best measured
# there at k = 10, 30 and 50, and are what 2 MiB L2 gave before (docs/architecture.md, "On
# another CPU").
BAND_BYTES = max(1024 * 1024, l2_cache_bytes() // 2)
BAND_MIN_ENTRIES = 32


def row_bands(m: int, k: int, itemsize: int, nnz: int, n_cols: int) -> np.ndarray:
    """The row bands' boundaries ``[0, …, m]`` (int64) for a block pass: as few equal bands as
    keep one band of W within ``BAND_BYTES``, fewer where the block's columns are short."""
    nb = -(-(m * k * itemsize) // BAND_BYTES)
    nb = max(1, min(nb, nnz // max(n_cols * BAND_MIN_ENTRIES, 1), m))
    return (np.arange(nb + 1, dtype=np.int64) * m) // nb


_NO_POS = np.empty((0, 0), np.uintp)  # the band positions of a one-band pass: none
_INT32_MAX = np.iinfo(np.int32).max


def csc_block_pass(data, indices, indptr, w, G, L, l1, ht, warm_scale, terms, solver, nonneg, cd_maxit, cd_tol,
                   warm, P, Q, hsum, ub=0.0, empty=np.empty):
    """:func:`_csc_block_pass` (same arguments), compiled for ``solver`` and for whether
    ``terms`` holds corrections; the row bands chosen by :func:`row_bands`, their scratch from
    ``empty(shape, dtype)`` (e.g. a pool's).

    The pass is compiled for one index layout, the one every block of the library has (int32 row
    indices, int64 ``indptr``; ``io/memory.py::index_dtype``): other index dtypes are converted
    here, so that they do not each compile the whole pass again (~1.5 s apiece). Row indices stay
    int64 only for m ≥ 2³¹ rows."""
    m, k = w.shape
    if indptr.dtype != np.int64:
        indptr = indptr.astype(np.int64)
    if indices.dtype != np.int32 and m <= _INT32_MAX:
        indices = indices.astype(np.int32)
    n = indptr.shape[0] - 1
    bounds = row_bands(m, k, w.dtype.itemsize, data.shape[0], n)
    nb = bounds.shape[0] - 1
    pos = empty((nb - 1, n), np.uintp) if nb > 1 else _NO_POS
    B = empty((n, k), np.float64)
    x = empty((k,), np.float64)
    Gc = np.empty((k, k))  # the column step's per-column Gram (with a Gram correction only)
    Lc = np.zeros((k, k))
    _CSC_BLOCK_PASS[int(solver), has_terms(terms)](data, indices, indptr, w, G, L, l1, ht, warm_scale, terms, solver,
                                                   nonneg, cd_maxit, cd_tol, warm, P, Q, hsum, float(ub), bounds,
                                                   pos, B, x, Gc, Lc)



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
