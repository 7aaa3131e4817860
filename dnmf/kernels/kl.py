"""The KL (Poisson) block pass: multiplicative updates with the zeros in closed form (numba).

For the generalized KL divergence ``D(A‖WH) = Σ a log(a/μ) − a + μ`` over the observed entries
the (penalized) multiplicative update of H's column c (Lee & Seung) is

    ``h_c ← h_c ∘ [Σ_{i obs} (a_ic/μ_ic) w_i] / [Σ_{i obs} w_i + L1 + L2·h_c]``.

``a/μ`` is zero wherever ``a`` is, so only the stored entries of a sparse column enter the
numerator; the denominator is ``colsum(W) − Σ_{i missing in c} w_i`` (missing: the user mask,
NaN entries, the §5.2 held-out set), or with ``zeros_missing`` ``Σ_{i stored, observed} w_i``.
With W's columns of unit L1 norm and nothing missing it is ``1``. In the same read of the
column the pass forms, from the new ``h_c``, the W update's statistics — ``P_i += (a_ic/μ'_ic) h_c``
over observed stored entries, ``hsum += h_c`` and the row-denominator partial ``R`` (``R_i += h_c``
for the column's missing rows, so that ``Σ_{j obs in row i} h_j = hsum − R_i``; with
``zeros_missing`` for its observed rows, ``R_i`` *is* the denominator) — and, from the *incoming*
``h_c``, the objective of the incoming (W, H): the stored part ``Σ a log(a/μ) − a`` plus
``Σ_{i obs} μ_ic = den_c · h_c`` in closed form, and the test divergence over the column's
held-out entries (stored or not). The cost is nnz·k per iteration plus, with a hold-out set,
the §5.2 hash of every row of every column (as the masked squared-error passes).

Positions and row indices are cast to unsigned (``np.uintp``) before they index an array, and
the list of a column's missing rows is a ``uintp`` array, as in ``kernels/fused.py`` (its module
docstring): numba drops the wrap-around branch for negative indices. The values are the same,
so the results are bitwise unchanged.

Functions are plain Python compiled with ``numba.njit(cache=True, nogil=True)``.
"""

from __future__ import annotations

import numba
import numpy as np

from ._prefetch import AHEAD, prefetch_read, prefetch_write
from ._sources import guard_cache
from .masked import held_out

__all__ = ["csc_kl_pass", "MU_FLOOR", "KL_OUT"]

#: Floor of μ where a stored entry is positive (its ratio a/μ is otherwise unbounded).
MU_FLOOR = 1e-12

#: Length of the pass's ``out`` partial: stored part of the train objective, its closed-form
#: ``Σ_obs μ`` part, number of observed entries, test divergence, number of test entries.
KL_OUT = 5


def _floored_mu(wrow, h):
    """``μ = w_i·h_c``, floored at :data:`MU_FLOOR` (used where a stored entry is positive)."""
    mu = 0.0
    for r in range(h.shape[0]):
        mu += wrow[r] * h[r]
    return mu if mu >= MU_FLOOR else MU_FLOOR


floored_mu = numba.njit(cache=True, nogil=True, inline="always")(_floored_mu)


def _csc_kl_pass(data, indices, indptr, col0, w, colsum, ht, scale, l1, l2, zeros_missing, cv_on, cv_seed,
                 cv_thr, mk_indices, mk_indptr, P, hsum, R, out):
    """One column block: the incoming objective, H's multiplicative update, the W update's statistics.

    Parameters
    ----------
    data, indices, indptr : CSC triplets of the block (m × n_j), values ≥ 0; NaN values are missing
    col0 : int — global index of the block's first column (for the §5.2 hash)
    w : (m, k) — W with unit-L1 columns; colsum : (k,) — its column sums
    ht : (n_j, k) — in: H_jᵀ of the last iteration (carrying the scale; the first pass gets
        ``engine/kl.py::lsq_start``), out: the updated H_jᵀ
    scale : (k,) — multiplies the incoming H (the scale moved out of W's columns at the client)
    l1, l2 : float — H's L1 and L2 penalties (added to the MU denominator, ``l2`` times ``h``)
    zeros_missing : bool — only stored entries are observed
    cv_on, cv_seed, cv_thr — the §5.2 hold-out (``cv_on`` False: none)
    mk_indices, mk_indptr : the block's user mask in CSC (True entries = missing); empty indptr
        (length 0) when there is none
    P : (m, k), hsum : (k,) — accumulated: Σ_c (a_ic/μ'_ic) h_c over observed stored entries, Σ_c h_c
    R : (m, k) or (0, k) — accumulated: Σ_c h_c over the column's missing rows (with
        ``zeros_missing``: over its observed rows); (0, k): nothing is missing (no mask, no
        hold-out, no zeros missing and no NaN in the block) — the pass then skips every test
    out : (:data:`KL_OUT`,) — accumulated, for the incoming (W, H): Σ_obs,stored a log(a/μ) − a,
        Σ_obs μ, the number of observed entries, the test divergence Σ_test a log(a/μ) − a + μ,
        the number of test entries (held out and otherwise observed)
    """
    m, k = w.shape
    n = indptr.shape[0] - 1
    last = np.uintp(indices.shape[0])  # entries prefetched ahead stay below it
    num = np.empty(k)
    den = np.empty(k)
    h = np.empty(k)
    mark = np.full(m, -1, dtype=np.int64)  # = c: row missing or held out in column c (see kind)
    kind = np.zeros(m, dtype=np.int8)  # 1: held out (a test entry), 2: missing (user mask or NaN)
    mrows = np.empty(m, dtype=np.uintp)  # row indices: unsigned (module docstring)
    aval = np.zeros(m)  # a_ic of the held-out rows of column c (0 where not stored)
    has_mask = mk_indptr.shape[0] > 0
    track = R.shape[0] > 0
    for c in range(n):
        jg = np.uint64(col0 + c)
        start = np.uintp(indptr[c])  # positions and row indices unsigned (module docstring)
        end = np.uintp(indptr[c + 1])
        # 1. the column's missing and held-out rows, its MU denominator and observed sum
        nmiss = 0
        if has_mask:
            for p in range(np.uintp(mk_indptr[c]), np.uintp(mk_indptr[c + 1])):
                i = np.uintp(mk_indices[p])
                if mark[i] != c:
                    mark[i] = c
                    kind[i] = 2
                    mrows[nmiss] = i
                    nmiss += 1
        n_obs = 0
        if zeros_missing:
            for r in range(k):
                den[r] = 0.0
            for p in range(start, end):
                a = data[p]
                i = np.uintp(indices[p])
                if a != a or mark[i] == c:
                    continue
                if cv_on and held_out(cv_seed, np.uint64(i), jg, cv_thr):
                    mark[i] = c
                    kind[i] = 1
                    aval[i] = a
                    mrows[nmiss] = i
                    nmiss += 1
                    continue
                wrow = w[i]
                for r in range(k):
                    den[r] += wrow[r]
                n_obs += 1
        elif track:
            if cv_on:
                for i in range(m):
                    if mark[i] != c and held_out(cv_seed, np.uint64(i), jg, cv_thr):
                        mark[i] = c
                        kind[i] = 1
                        aval[i] = 0.0
                        mrows[nmiss] = i
                        nmiss += 1
            for p in range(start, end):
                a = data[p]
                i = np.uintp(indices[p])
                if a != a:
                    if mark[i] != c:
                        mark[i] = c
                        mrows[nmiss] = i
                        nmiss += 1
                    kind[i] = 2
                elif mark[i] == c and kind[i] == 1:
                    aval[i] = a
            for r in range(k):
                den[r] = colsum[r]
            for t in range(nmiss):
                wrow = w[mrows[t]]
                for r in range(k):
                    den[r] -= wrow[r]
            n_obs = m - nmiss
        else:  # nothing missing (and no NaN: the caller's contract)
            for r in range(k):
                den[r] = colsum[r]
            n_obs = m
        # 2. the incoming h_c; the objective of (W, h_c) and the MU numerator in one read
        for r in range(k):
            h[r] = ht[c, r] * scale[r]
        mu_obs = 0.0
        for r in range(k):
            num[r] = 0.0
            mu_obs += den[r] * h[r]
        acc = 0.0
        test = 0.0
        for p in range(start, end):
            q = p + AHEAD  # prefetched rows (kernels/_prefetch.py): as in the fused pass
            if q < last:
                prefetch_read(w, np.uintp(indices[q]))
            a = data[p]
            if a != a or a == 0.0:
                continue
            i = np.uintp(indices[p])
            wrow = w[i]
            if track and mark[i] == c:
                continue
            q = a / floored_mu(wrow, h)
            acc += a * np.log(q) - a
            for r in range(k):
                num[r] += q * wrow[r]
        n_test = 0
        for t in range(nmiss):
            i = mrows[t]
            if kind[i] == 1:
                wrow = w[i]
                mu = 0.0
                for r in range(k):
                    mu += wrow[r] * h[r]
                test += mu
                n_test += 1
                a = aval[i]
                if a > 0.0:
                    test += a * np.log(a / (mu if mu >= MU_FLOOR else MU_FLOOR)) - a
        out[0] += acc
        out[1] += mu_obs
        out[2] += n_obs
        out[3] += test
        out[4] += n_test
        # 3. H's multiplicative update (an empty denominator — nothing observed — keeps h)
        for r in range(k):
            dr = den[r] + l1 + l2 * h[r]
            if dr > 0.0:
                h[r] = h[r] * num[r] / dr
            ht[c, r] = h[r]
            hsum[r] += h[r]
        # 4. the W update's statistics with the new h_c
        for p in range(start, end):
            q = p + AHEAD
            if q < last:
                prefetch_read(w, np.uintp(indices[q]))
                prefetch_write(P, np.uintp(indices[q]))
            a = data[p]
            if a != a:
                continue
            i = np.uintp(indices[p])
            if track and mark[i] == c:
                continue
            if zeros_missing:
                rrow = R[i]
                for r in range(k):
                    rrow[r] += h[r]
            if a == 0.0:
                continue
            q = a / floored_mu(w[i], h)
            prow = P[i]
            for r in range(k):
                prow[r] += q * h[r]
        if track and not zeros_missing:
            for t in range(nmiss):
                rrow = R[mrows[t]]
                for r in range(k):
                    rrow[r] += h[r]


csc_kl_pass = numba.njit(cache=True, nogil=True)(_csc_kl_pass)


guard_cache(__name__, globals())  # drop cache entries compiled from other kernel sources (kernels/_sources.py)
