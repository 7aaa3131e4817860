"""Masked block passes: NNLS with missing entries, on both sides (numba kernels).

A fit with missing entries — a user mask, NaN in the data, zeros declared missing, or the
speckled hold-out set of cross-validation — gives every column of H *and every row of W* its
own least-squares problem (``docs/architecture.md``, "Per-row problems on the W side"). Two
passes, one per orientation, share one structure:

* :func:`csc_masked_pass` — one column block (CSC) of A and the current W: for each column
  ``c`` the masked rows ``S_c`` are collected (hash of §5.2 over all rows, user-mask entries,
  NaN entries), then ``b_c = Σ_{i∉S_c} a_ic w_i − L1`` and ``G_c = G − Σ_{i∈S_c} w_i w_iᵀ``;
  the solve is the one column step (``kernels/column.py::column_step``), so per-column terms
  (targets, weights) compose with the mask. Returns nothing but H and its Gram/sums.
* :func:`csr_masked_pass` — one row block (CSR) of A and the normalized H (``Ĥᵀ``, n × k):
  the mirrored problem for each row of W, solved on the spot, plus the row's share of the
  train and test squared errors (computed right after the solve, from the raw row ``w_i d``).

With ``zeros_missing`` only the stored entries are observed: the Gram is built from the
observed entries (``Σ_{i observed} w_i w_iᵀ``) instead of corrected, and the hold-out is drawn
among stored entries only.

The hold-out test set is RcppML's (spec/rcppml.md §5.2): a pure function of (i, j, seed),
computed wherever it is needed and never stored or sent. :func:`holdout_threshold` turns a
``test_fraction`` into the integer threshold of the hash (realised fraction ``1/⌊1/f⌋``);
:func:`holdout_mask` evaluates the same hash vectorized (NumPy) for reference and evaluation.
Symmetric NMF holds out unordered pairs instead (:func:`held_out_pair`: the hash of
``(min(i, j), max(i, j))``; the row pass's and :func:`holdout_pattern`'s ``pair`` flag).
Projective NMF uses the column pass's ``project`` flag: the projection over the observed entries.

Positions and row / column indices are cast to unsigned (``np.uintp``) before they index an
array, as in ``kernels/fused.py`` (its module docstring): numba drops the wrap-around branch for
negative indices. The values are the same, so the results are bitwise unchanged.

Functions are plain Python compiled with ``numba.njit(cache=True, nogil=True)`` so they also
run under ``NUMBA_DISABLE_JIT=1``.
"""

from __future__ import annotations

import numba
import numpy as np

from ._prefetch import AHEAD, prefetch_read
from ._sources import guard_cache
from .column import accumulate_column, bound_column, chol_factor, column_step, solve_column
from .nnls import SOLVER_CHOLESKY

__all__ = ["holdout_threshold", "holdout_seed", "holdout_mask", "held_out", "held_out_pair", "holdout_pattern",
           "csc_masked_pass", "csr_masked_pass", "NO_PATTERN"]

#: ``(ho_indices, ho_indptr)`` meaning "hash the held-out entries" (no precomputed pattern).
NO_PATTERN = (np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64))

_C_I = np.uint64(0x9E3779B97F4A7C15)
_C_J = np.uint64(0x6C62272E07BB0142)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_U64_MAX = (1 << 64) - 1


def holdout_seed(cv_seed: int) -> np.uint64:
    """The hash seed of §5.2: ``uint32(cv_seed)``, with 0 → 12345."""
    s = int(cv_seed) & 0xFFFFFFFF
    return np.uint64(12345 if s == 0 else s)


def holdout_threshold(test_fraction: float) -> np.uint64:
    """``⌊(2⁶⁴−1) / inv⌋`` with ``inv = ⌊1 / float32(test_fraction)⌋`` (§5.2; fraction 1/inv).

    0 (no hold-out) when ``test_fraction`` is 0.
    """
    if test_fraction <= 0:
        return np.uint64(0)
    inv = int(np.floor(1.0 / float(np.float32(test_fraction))))
    return np.uint64(_U64_MAX // max(inv, 1))


def _held_out(seed, i, j, threshold):
    """Whether entry (i, j) (0-based) is in the hold-out set (§5.2 hash, uint64 wrap-around)."""
    z = seed + np.uint64(i) * _C_I + np.uint64(j) * _C_J
    z = z ^ (z >> _S30)
    z = z * _M1
    z = z ^ (z >> _S27)
    z = z * _M2
    z = z ^ (z >> _S31)
    return z < threshold


held_out = numba.njit(cache=True, nogil=True)(_held_out)


def _held_out_pair(seed, i, j, threshold):
    """Whether the unordered pair {i, j} is held out: the §5.2 hash of ``(min, max)`` — the
    symmetric test set of symmetric NMF (``a_ij`` and its twin ``a_ji`` held out together)."""
    i = np.uint64(i)  # unsigned first: a signed i against an unsigned j would compare as float64
    j = np.uint64(j)
    if i <= j:
        return held_out(seed, i, j, threshold)
    return held_out(seed, j, i, threshold)


held_out_pair = numba.njit(cache=True, nogil=True)(_held_out_pair)


def holdout_mask(rows, cols, cv_seed: int, test_fraction: float) -> np.ndarray:
    """Vectorized §5.2 hash: a boolean array, True where (rows[t], cols[t]) is held out."""
    rows = np.asarray(rows, dtype=np.uint64)
    cols = np.asarray(cols, dtype=np.uint64)
    seed, thr = holdout_seed(cv_seed), holdout_threshold(test_fraction)
    with np.errstate(over="ignore"):
        z = seed + rows * _C_I + cols * _C_J
        z ^= z >> _S30
        z *= _M1
        z ^= z >> _S27
        z *= _M2
        z ^= z >> _S31
    return z < thr


def _mix_below(z, threshold):
    """The SplitMix64 finalizer of §5.2 applied to z, compared with the threshold."""
    z = z ^ (z >> _S30)
    z = z * _M1
    z = z ^ (z >> _S27)
    z = z * _M2
    z = z ^ (z >> _S31)
    return z < threshold


mix_below = numba.njit(cache=True, nogil=True)(_mix_below)


def _holdout_pattern(outer0, n_outer, n_inner, by_row, seed, thr, zeros_missing, data, indices, indptr, pair):
    """The held-out entries of a block, listed per column (CSC block) or per row (CSR block).

    For each of the block's ``n_outer`` columns (rows with ``by_row``; global index ``outer0 + o``)
    the inner indices the §5.2 hash holds out, in the order the passes would find them: every
    inner index ascending, or with ``zeros_missing`` the stored non-NaN entries in stored order.
    Returns ``(indices (int32), indptr (int64))``. Several models sharing one pass over the
    block hash it once with this and hand the pattern to each model's pass. Two passes (count,
    then fill) keep the hash loop free of appends, so it vectorizes. ``pair``: the held-out set
    of unordered pairs (:func:`held_out_pair`, symmetric NMF).
    """
    c_outer = _C_I if by_row else _C_J
    c_inner = _C_J if by_row else _C_I
    counts = np.zeros(n_outer + 1, dtype=np.int64)
    for o in range(n_outer):
        base = seed + np.uint64(outer0 + o) * c_outer
        c = 0
        if zeros_missing:
            for p in range(np.uintp(indptr[o]), np.uintp(indptr[o + 1])):  # unsigned (module docstring)
                a = data[p]
                if a == a and (held_out_pair(seed, outer0 + o, indices[p], thr) if pair
                               else mix_below(base + np.uint64(indices[p]) * c_inner, thr)):
                    c += 1
        else:
            if pair:
                for inner in range(n_inner):
                    if held_out_pair(seed, outer0 + o, inner, thr):
                        c += 1
            else:
                for inner in range(n_inner):
                    if mix_below(base + np.uint64(inner) * c_inner, thr):
                        c += 1
        counts[o + 1] = counts[o] + c
    out = np.empty(counts[n_outer], dtype=np.int32)
    for o in range(n_outer):
        base = seed + np.uint64(outer0 + o) * c_outer
        t = counts[o]
        if zeros_missing:
            for p in range(np.uintp(indptr[o]), np.uintp(indptr[o + 1])):  # unsigned (module docstring)
                a = data[p]
                if a == a and (held_out_pair(seed, outer0 + o, indices[p], thr) if pair
                               else mix_below(base + np.uint64(indices[p]) * c_inner, thr)):
                    out[t] = indices[p]
                    t += 1
        else:
            for inner in range(n_inner):
                if (held_out_pair(seed, outer0 + o, inner, thr) if pair
                        else mix_below(base + np.uint64(inner) * c_inner, thr)):
                    out[t] = inner
                    t += 1
    return out, counts


_holdout_pattern_jit = numba.njit(cache=True, nogil=True)(_holdout_pattern)


def holdout_pattern(outer0, n_outer, n_inner, by_row, seed, thr, zeros_missing, data, indices, indptr, pair=False):
    """:func:`_holdout_pattern` (same arguments); ``pair`` optional (default: the ordered §5.2 set)."""
    return _holdout_pattern_jit(outer0, n_outer, n_inner, by_row, seed, thr, zeros_missing, data, indices, indptr,
                                bool(pair))


def _proj_adv(Gc, gamma, lam_abs):
    """Guided spec §2.4 on one Gram, in place: ``G − |λ|·tr(G)/tr(Γ)·Γ``, eigenvalues below 1e-8
    raised to 1e-8 (the matrix rebuilt only when one was)."""
    k = Gc.shape[0]
    tr_g = 0.0
    tr_y = 0.0
    for r in range(k):
        tr_g += Gc[r, r]
        tr_y += gamma[r, r]
    s = tr_g / tr_y if tr_y > 1e-10 else 0.0
    for r in range(k):
        for c in range(k):
            Gc[r, c] -= lam_abs * s * gamma[r, c]
    e, V = np.linalg.eigh(Gc)
    low = False
    for r in range(k):
        if e[r] < 1e-8:
            e[r] = 1e-8
            low = True
    if low:
        for r in range(k):
            for c in range(k):
                acc = 0.0
                for t in range(k):
                    acc += V[r, t] * e[t] * V[c, t]
                Gc[r, c] = acc


proj_adv = numba.njit(cache=True, nogil=True)(_proj_adv)


#: Below these sizes the missing rows' Gram is a plain loop, above it a BLAS product of the
#: gathered rows (measured on a 4,000-row column pass with ~210 held-out rows per column: the
#: product wins from k = 2 — 3.8 against 5.1 ms at k = 2, 4.7 against 7.3 ms at k = 3).
_GRAM_BLAS_MIN_K = 2
_GRAM_BLAS_MIN_ROWS = 24


def _masked_gram(Gc, G, diag, F, idx, n_idx, buf):
    """``Gc = G + diag·I − Σ_t F[idx[t]] F[idx[t]]ᵀ`` (t < n_idx): a column's (row's) Gram with its
    missing entries' rank-1 terms removed. Shared by both passes (inlined).

    Few or narrow rows: G's lower triangle is mirrored (a symmetric start), then full rows of
    rank-1 updates (the contiguous inner loop vectorizes; fr·fs = fs·fr keeps Gc symmetric).
    Otherwise the rows are gathered into ``buf`` (≥ n_idx × k scratch) and ``Σ f fᵀ`` is one BLAS
    product, 2.5–3× faster than the loop at k ≥ 10 (``benchmarks/bench_cv_shared.py``); its lower triangle
    is mirrored so Gc is exactly symmetric. Per column either way: the same result for any
    number of workers.
    """
    k = G.shape[0]
    if k < _GRAM_BLAS_MIN_K or n_idx < _GRAM_BLAS_MIN_ROWS:
        for r in range(k):
            for s in range(r + 1):
                Gc[r, s] = G[r, s]
                Gc[s, r] = G[r, s]
            Gc[r, r] += diag
        for t in range(n_idx):
            frow = F[np.uintp(idx[t])]  # unsigned index (module docstring)
            for r in range(k):
                fr = frow[r]
                Gr = Gc[r]
                for s in range(k):
                    Gr[s] -= fr * frow[s]
        return
    for t in range(n_idx):
        frow = F[np.uintp(idx[t])]
        brow = buf[t]
        for r in range(k):
            brow[r] = frow[r]
    sub = buf[:n_idx]
    S = np.dot(sub.T, sub)
    for r in range(k):
        for s in range(r + 1):
            v = G[r, s] - S[r, s]
            Gc[r, s] = v
            Gc[s, r] = v
        Gc[r, r] += diag


masked_gram = numba.njit(cache=True, nogil=True, inline="always")(_masked_gram)


def _finish_lower(Gc, diag):
    """Add ``diag`` to the diagonal of a Gram accumulated in its lower triangle, and mirror it."""
    k = Gc.shape[0]
    for r in range(k):
        Gc[r, r] += diag
        for s in range(r):
            Gc[s, r] = Gc[r, s]


finish_lower = numba.njit(cache=True, nogil=True, inline="always")(_finish_lower)


def _csc_masked_pass(data, indices, indptr, m, col0, w, G, L, ridge, l1, ht, warm_scale, terms, solver, nonneg,
                     cd_maxit, cd_tol, warm, zeros_missing, cv_on, cv_seed, cv_thr, mk_indices, mk_indptr, gamma,
                     lam_abs, ho_indices, ho_indptr, Q, hsum, gpen, ub, project):
    """Masked H update for one sparse column block (see module docstring).

    Parameters
    ----------
    data, indices, indptr : CSC triplets of the block (m × n_j); NaN values are missing
    m : int — rows of A; col0 : int — global index of the block's first column (for the hash)
    w : (m, k) — current W; G : (k, k) — ``WᵀW + ridge + L2``; L : its Cholesky factor (or empty)
    ridge : float — the whole diagonal added to ``WᵀW`` in G (guard + L2; used when the Gram is
        built from the observed rows, ``zeros_missing``)
    l1 : float; ht : (n_j, k) in: previous raw H, out: new H; warm_scale : (k,)
    terms : ColumnTerms — further per-column corrections (column step)
    zeros_missing : bool — only stored entries are observed
    cv_on, cv_seed, cv_thr — the §5.2 hold-out (``cv_on`` False: none)
    mk_indices, mk_indptr : the block's user mask in CSC (True entries = missing); empty indptr
        (length 0) when there is none
    gamma, lam_abs : a removal target's Γ (k × k) and |λ| (0: none) — applied (:func:`proj_adv`)
        to every column's Gram, which the pass then forms itself from G (G must arrive without it)
    ho_indices, ho_indptr : the block's held-out rows from :func:`holdout_pattern` (used instead
        of hashing when ``cv_on`` and ho_indptr is not empty: the same rows in the same order,
        so the result is bitwise that of hashing)
    Q : (k, k), hsum : (k,) — accumulated in place (``H_j H_jᵀ``, ``Σ|h|``)
    gpen : (k, k) or (0, 0) — penalty Gram term (graph, L21; ``solvers/penalties.py``) that G
        already carries; added here to the Grams built from the observed rows (``zeros_missing``)
    ub : float — upper bound of each solved column, applied before accumulating (0: none)
    project : bool — projective NMF: no solve, ``h_c = Σ_{i observed in c} a_ic w_i`` (``w`` is
        then ``W·diag(d)``; no L1, bound, Gram or terms), the projection over the observed
        entries only — held-out and missing entries never reach H
    """
    k = w.shape[1]
    n = indptr.shape[0] - 1
    # the sweeps over stored entries prefetch the rows of the entry AHEAD positions on (kernels/
    # _prefetch.py, as in the fused pass), below the block's last entry
    last = np.uintp(indices.shape[0])
    has_pen = gpen.shape[0] > 0
    b = np.empty(k)
    x = np.empty(k)
    Gc = np.empty((k, k))
    Lc = np.zeros((k, k))
    Gt = np.empty((k, k))  # column step scratch (its own terms)
    Lt = np.zeros((k, k))
    mark = np.full(m, -1, dtype=np.int64)
    hmark = np.full(m, -1, dtype=np.int64)  # held-out rows of column c (from the pattern)
    mrows = np.empty(m, dtype=np.int64)
    gbuf = np.empty((m, k))  # masked_gram's gathered rows
    has_mask = mk_indptr.shape[0] > 0
    pattern = cv_on and ho_indptr.shape[0] > 0
    for c in range(n):
        jg = np.uint64(col0 + c)
        # positions and row indices unsigned (module docstring)
        if pattern and zeros_missing:
            for p in range(np.uintp(ho_indptr[c]), np.uintp(ho_indptr[c + 1])):
                hmark[np.uintp(ho_indices[p])] = c
        for r in range(k):
            b[r] = 0.0 if project else -l1
        nmask = 0
        if has_mask:
            for p in range(np.uintp(mk_indptr[c]), np.uintp(mk_indptr[c + 1])):
                i = np.uintp(mk_indices[p])
                if mark[i] != c:
                    mark[i] = c
                    mrows[nmask] = i
                    nmask += 1
        if zeros_missing:
            for r in range(k):
                for s in range(r + 1):
                    Gc[r, s] = 0.0
            for p in range(np.uintp(indptr[c]), np.uintp(indptr[c + 1])):
                q = p + AHEAD
                if q < last:
                    prefetch_read(w, np.uintp(indices[q]))
                a = data[p]
                i = np.uintp(indices[p])
                if a != a or mark[i] == c:
                    continue
                if cv_on and (hmark[i] == c if pattern else held_out(cv_seed, np.uint64(i), jg, cv_thr)):
                    continue
                wrow = w[i]
                if project:
                    for r in range(k):
                        b[r] += a * wrow[r]
                    continue
                for r in range(k):
                    b[r] += a * wrow[r]
                    for s in range(r + 1):
                        Gc[r, s] += wrow[r] * wrow[s]
            finish_lower(Gc, ridge)
            if has_pen:
                for r in range(k):
                    for s in range(k):
                        Gc[r, s] += gpen[r, s]
            use_own = True
        else:
            if pattern:
                for p in range(np.uintp(ho_indptr[c]), np.uintp(ho_indptr[c + 1])):
                    i = np.uintp(ho_indices[p])
                    if mark[i] != c:
                        mark[i] = c
                        mrows[nmask] = i
                        nmask += 1
            elif cv_on:
                for i in range(m):
                    if mark[i] != c and held_out(cv_seed, i, jg, cv_thr):
                        mark[i] = c
                        mrows[nmask] = i
                        nmask += 1
            for p in range(np.uintp(indptr[c]), np.uintp(indptr[c + 1])):
                q = p + AHEAD
                if q < last:
                    prefetch_read(w, np.uintp(indices[q]))
                a = data[p]
                i = np.uintp(indices[p])
                if a != a:
                    if mark[i] != c:
                        mark[i] = c
                        mrows[nmask] = i
                        nmask += 1
                    continue
                if mark[i] == c:
                    continue
                wrow = w[i]
                for r in range(k):
                    b[r] += a * wrow[r]
            use_own = nmask > 0 or lam_abs > 0.0
            if use_own and not project:
                masked_gram(Gc, G, 0.0, w, mrows, nmask, gbuf)
        if project:
            for r in range(k):
                x[r] = b[r]
        elif warm:
            for r in range(k):
                x[r] = ht[c, r] * warm_scale[r]
        else:
            for r in range(k):
                x[r] = 0.0
        if project:
            pass
        elif use_own:
            if lam_abs > 0.0:
                proj_adv(Gc, gamma, lam_abs)
            if solver == SOLVER_CHOLESKY:
                chol_factor(Gc, Lc)
            column_step(c, Gc, Lc, b, x, terms, Gt, Lt, solver, nonneg, cd_maxit, cd_tol, warm)
        else:
            column_step(c, G, L, b, x, terms, Gt, Lt, solver, nonneg, cd_maxit, cd_tol, warm)
        if not project:
            bound_column(x, ub)
        for r in range(k):
            ht[c, r] = x[r]
        accumulate_column(x, hsum, Q)


_csc_masked_pass_jit = numba.njit(cache=True, nogil=True)(_csc_masked_pass)

_NO_PEN = np.zeros((0, 0))


def csc_masked_pass(data, indices, indptr, m, col0, w, G, L, ridge, l1, ht, warm_scale, terms, solver, nonneg,
                    cd_maxit, cd_tol, warm, zeros_missing, cv_on, cv_seed, cv_thr, mk_indices, mk_indptr, gamma,
                    lam_abs, ho_indices, ho_indptr, Q, hsum, gpen=None, ub=0.0, project=False):
    """:func:`_csc_masked_pass` (same arguments); ``gpen`` (None: no penalty term), ``ub`` and
    ``project`` optional."""
    _csc_masked_pass_jit(data, indices, indptr, m, col0, w, G, L, ridge, l1, ht, warm_scale, terms, solver, nonneg,
                         cd_maxit, cd_tol, warm, zeros_missing, cv_on, cv_seed, cv_thr, mk_indices, mk_indptr, gamma,
                         lam_abs, ho_indices, ho_indptr, Q, hsum, _NO_PEN if gpen is None else gpen, float(ub),
                         bool(project))


def _csr_masked_pass(data, indices, indptr, n, row0, hn, Q, ridge, l1, l2, wt, solver, nonneg, cd_maxit, cd_tol,
                     warm, zeros_missing, cv_on, cv_seed, cv_thr, mk_indices, mk_indptr, tw, lam_w, gamma, ho_indices,
                     ho_indptr, sums, gpen, ub, fixed, pair):
    """Masked W update for one sparse row block, and the block's squared errors.

    Parameters
    ----------
    data, indices, indptr : CSR triplets of the row block (m_b × n); NaN values are missing
    n : int — columns of A; row0 : int — global index of the block's first row
    hn : (n, k) — normalized H transposed (Ĥᵀ); Q : (k, k) — ĤĤᵀ (unpenalized)
    ridge, l1, l2 : W-side diagonal guard and penalties
    wt : (m_b, k) — in: warm start (previous raw rows of W), out: the new raw rows ``w_i d``
    zeros_missing, cv_on, cv_seed, cv_thr, mk_indices, mk_indptr : as :func:`csc_masked_pass`
        (the user mask of the row block in CSR)
    tw, lam_w, gamma : a target of W's rows (m_b × k, or (0, k) for none), its λ and Γ: λ > 0 adds
        λ to the Gram's diagonal and ``λ t_i`` to the RHS; λ < 0 applies :func:`proj_adv` with
        Γ to each row's Gram (the losses use the plain Gram)
    ho_indices, ho_indptr : the block's held-out columns per row (:func:`holdout_pattern`), used
        instead of hashing when ``cv_on`` and ho_indptr is not empty (bitwise the same result)
    sums : (4,) — accumulated in place: train SSE, train count, test SSE, test count. The train
        set is every observed entry (not missing, not held out); the test set the held-out
        entries that are otherwise observed.
    gpen : (k, k) or (0, 0) — the W side's penalty Gram term (graph, L21), added after L2 and
        before a target; ub : float — upper bound of the solved row (0: none)
    fixed : bool — take the rows in ``wt`` as they are (no solve) and only accumulate the squared
        errors: the loss pass after a post-solve map of the whole W (angular)
    pair : bool — hold out unordered pairs (:func:`held_out_pair`; symmetric NMF, where ``a_ji``
        is ``a_ij``: the ordered set would let a held-out value in through its twin)
    """
    k = hn.shape[1]
    last = np.uintp(indices.shape[0])  # prefetches as in _csc_masked_pass
    m_b = indptr.shape[0] - 1
    has_pen = gpen.shape[0] > 0
    b = np.empty(k)
    p_full = np.empty(k)
    x = np.empty(k)
    Gc = np.empty((k, k))
    Lc = np.zeros((k, k))
    mark = np.full(n, -1, dtype=np.int64)  # ≥ 0: masked in this row (value = row), see `kind`
    kind = np.zeros(n, dtype=np.int8)  # 1: held out (a test entry), 2: missing (user mask or NaN)
    aval = np.zeros(n)
    mcols = np.empty(n, dtype=np.int64)
    gbuf = np.empty((n, k))  # masked_gram's gathered rows
    hmark = np.full(n, -1, dtype=np.int64)  # held-out columns of row r_ (from the pattern)
    has_mask = mk_indptr.shape[0] > 0
    pattern = cv_on and ho_indptr.shape[0] > 0
    for r_ in range(m_b):
        ig = np.uint64(row0 + r_)
        # positions and column indices unsigned (module docstring)
        if pattern and zeros_missing:
            for p in range(np.uintp(ho_indptr[r_]), np.uintp(ho_indptr[r_ + 1])):
                hmark[np.uintp(ho_indices[p])] = r_
        nmask = 0
        if has_mask:
            for p in range(np.uintp(mk_indptr[r_]), np.uintp(mk_indptr[r_ + 1])):
                j = np.uintp(mk_indices[p])
                if mark[j] != r_:
                    mark[j] = r_
                    kind[j] = 2
                    mcols[nmask] = j
                    nmask += 1
        for r in range(k):
            b[r] = -l1
            p_full[r] = 0.0
        sq = 0.0
        if zeros_missing:
            for r in range(k):
                for s in range(r + 1):
                    Gc[r, s] = 0.0
            for p in range(np.uintp(indptr[r_]), np.uintp(indptr[r_ + 1])):
                q = p + AHEAD
                if q < last:
                    prefetch_read(hn, np.uintp(indices[q]))
                a = data[p]
                j = np.uintp(indices[p])
                if a != a or mark[j] == r_:
                    continue
                if cv_on and (hmark[j] == r_ if pattern else (held_out_pair(cv_seed, row0 + r_, j, cv_thr) if pair
                                                               else held_out(cv_seed, ig, np.uint64(j), cv_thr))):
                    mark[j] = r_
                    kind[j] = 1
                    mcols[nmask] = j
                    nmask += 1
                    continue
                if fixed:  # the scoring pass needs no Gram
                    continue
                hrow = hn[j]
                for r in range(k):
                    b[r] += a * hrow[r]
                    for s in range(r + 1):
                        Gc[r, s] += hrow[r] * hrow[s]
            finish_lower(Gc, ridge + l2)
        else:
            if pattern:
                for p in range(np.uintp(ho_indptr[r_]), np.uintp(ho_indptr[r_ + 1])):
                    j = np.uintp(ho_indices[p])
                    if mark[j] != r_:
                        mark[j] = r_
                        kind[j] = 1
                        mcols[nmask] = j
                        nmask += 1
            elif cv_on:
                for j in range(n):
                    if mark[j] != r_ and (held_out_pair(cv_seed, row0 + r_, j, cv_thr) if pair
                                          else held_out(cv_seed, ig, np.uint64(j), cv_thr)):
                        mark[j] = r_
                        kind[j] = 1
                        mcols[nmask] = j
                        nmask += 1
            for p in range(np.uintp(indptr[r_]), np.uintp(indptr[r_ + 1])):
                q = p + AHEAD
                if q < last:
                    prefetch_read(hn, np.uintp(indices[q]))
                a = data[p]
                j = np.uintp(indices[p])
                if a != a:
                    if mark[j] != r_:
                        mark[j] = r_
                        mcols[nmask] = j
                        nmask += 1
                    kind[j] = 2
                    continue
                hrow = hn[j]
                sq += a * a
                for r in range(k):
                    p_full[r] += a * hrow[r]
                if mark[j] == r_:
                    aval[j] = a
                    continue
                for r in range(k):
                    b[r] += a * hrow[r]
            if not fixed:  # the scoring pass needs no Gram
                masked_gram(Gc, Q, ridge + l2, hn, mcols, nmask, gbuf)
        if has_pen and not fixed:
            for r in range(k):
                for s in range(k):
                    Gc[r, s] += gpen[r, s]
        if tw.shape[0] > 0 and not fixed:
            if lam_w > 0.0:
                for r in range(k):
                    Gc[r, r] += lam_w
                    b[r] += lam_w * tw[r_, r]
            elif lam_w < 0.0:
                proj_adv(Gc, gamma, -lam_w)
        if warm or fixed:
            for r in range(k):
                x[r] = wt[r_, r]
        else:
            for r in range(k):
                x[r] = 0.0
        if not fixed:
            if solver == SOLVER_CHOLESKY:
                chol_factor(Gc, Lc)
            solve_column(Gc, Lc, b, x, solver, nonneg, cd_maxit, cd_tol, warm)
            bound_column(x, ub)
        for r in range(k):
            wt[r_, r] = x[r]
        # This row's squared errors, from the raw row x = w_i d and Ĥ.
        if zeros_missing:
            for p in range(np.uintp(indptr[r_]), np.uintp(indptr[r_ + 1])):
                q = p + AHEAD
                if q < last:
                    prefetch_read(hn, np.uintp(indices[q]))
                a = data[p]
                j = np.uintp(indices[p])
                if a != a or (mark[j] == r_ and kind[j] == 2):
                    continue
                pred = 0.0
                hrow = hn[j]
                for r in range(k):
                    pred += x[r] * hrow[r]
                e = (a - pred) * (a - pred)
                if mark[j] == r_:
                    sums[2] += e
                    sums[3] += 1.0
                else:
                    sums[0] += e
                    sums[1] += 1.0
        else:
            # Whole row by the Gram identity, then the masked entries one by one.
            full = sq
            for r in range(k):
                full -= 2.0 * x[r] * p_full[r]
                for s in range(k):
                    full += x[r] * Q[r, s] * x[s]
            masked_sse = 0.0
            for t in range(nmask):
                j = np.uintp(mcols[t])
                pred = 0.0
                hrow = hn[j]
                for r in range(k):
                    pred += x[r] * hrow[r]
                e = (aval[j] - pred) * (aval[j] - pred)
                masked_sse += e
                if kind[j] == 1:
                    sums[2] += e
                    sums[3] += 1.0
                aval[j] = 0.0
            sums[0] += full - masked_sse
            sums[1] += n - nmask


_csr_masked_pass_jit = numba.njit(cache=True, nogil=True)(_csr_masked_pass)


def csr_masked_pass(data, indices, indptr, n, row0, hn, Q, ridge, l1, l2, wt, solver, nonneg, cd_maxit, cd_tol,
                    warm, zeros_missing, cv_on, cv_seed, cv_thr, mk_indices, mk_indptr, tw, lam_w, gamma, ho_indices,
                    ho_indptr, sums, gpen=None, ub=0.0, fixed=False, pair=False):
    """:func:`_csr_masked_pass` (same arguments); ``gpen`` (None: none), ``ub``, ``fixed`` and ``pair``
    optional."""
    _csr_masked_pass_jit(data, indices, indptr, n, row0, hn, Q, ridge, l1, l2, wt, solver, nonneg, cd_maxit, cd_tol,
                         warm, zeros_missing, cv_on, cv_seed, cv_thr, mk_indices, mk_indptr, tw, lam_w, gamma,
                         ho_indices, ho_indptr, sums, _NO_PEN if gpen is None else gpen, float(ub), bool(fixed),
                         bool(pair))


guard_cache(__name__, globals())  # drop cache entries compiled from other kernel sources (kernels/_sources.py)
