"""The KL (Poisson) block pass: multiplicative updates with the zeros in closed form (numba).

For the generalized KL divergence ``D(A‖WH) = Σ a log(a/μ) − a + μ`` the multiplicative update
of H (Lee & Seung) is ``h_c ← h_c ∘ Wᵀ(a_c / μ_c) / Wᵀ1``. With W's columns of unit L1 norm,
``Wᵀ1 = 1``, and ``a_c / μ_c`` is zero wherever ``a_c`` is: only the stored entries of a sparse
column are visited. In the same read of the column the pass then forms the W update's statistics
from the new ``h_c`` — ``P_i += (a_ic / μ'_ic) h_c`` over stored entries and ``hsum += h_c`` (the
W update's denominator ``Σ_c h_c``) — and the stored part of the objective,
``Σ a log(a/μ') − a``; the rest, ``Σ μ' = Σ_r (Σ_i W_ir)(Σ_c H_rc) = Σ hsum``, is closed form.
The cost is nnz·k per iteration, zeros included at no cost.

Functions are plain Python compiled with ``numba.njit(cache=True, nogil=True)``.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["csc_kl_pass", "MU_FLOOR"]

#: Floor of μ where a stored entry is positive (its ratio a/μ is otherwise unbounded).
MU_FLOOR = 1e-12


def _floored_mu(wrow, h):
    """``μ = w_i·h_c``, floored at :data:`MU_FLOOR` (used where a stored entry is positive)."""
    mu = 0.0
    for r in range(h.shape[0]):
        mu += wrow[r] * h[r]
    return mu if mu >= MU_FLOOR else MU_FLOOR


floored_mu = numba.njit(cache=True, nogil=True, inline="always")(_floored_mu)


def _csc_kl_pass(data, indices, indptr, w, ht, scale, P, hsum, out):
    """One column block: H's multiplicative update, then the W update's statistics and the loss.

    Parameters
    ----------
    data, indices, indptr : CSC triplets of the block (m × n_j), values ≥ 0
    w : (m, k) — W with unit-L1 columns
    ht : (n_j, k) — in: H_jᵀ of the last iteration (carrying the scale), out: the updated H_jᵀ
    scale : (k,) — multiplies the incoming H (the scale moved out of W's columns at the client)
    P : (m, k), hsum : (k,) — accumulated: Σ_c (a_ic/μ'_ic) h_c over stored entries, Σ_c h_c
    out : (1,) — accumulated: Σ_stored a log(a/μ') − a (with the new H and this W)
    """
    k = w.shape[1]
    n = indptr.shape[0] - 1
    num = np.empty(k)
    h = np.empty(k)
    for c in range(n):
        for r in range(k):
            h[r] = ht[c, r] * scale[r]
            num[r] = 0.0
        start = indptr[c]
        end = indptr[c + 1]
        for p in range(start, end):
            a = data[p]
            if a == 0.0:
                continue
            wrow = w[indices[p]]
            q = a / floored_mu(wrow, h)
            for r in range(k):
                num[r] += q * wrow[r]
        for r in range(k):
            h[r] *= num[r]
            ht[c, r] = h[r]
            hsum[r] += h[r]
        acc = 0.0
        for p in range(start, end):
            a = data[p]
            if a == 0.0:
                continue
            i = indices[p]
            wrow = w[i]
            q = a / floored_mu(wrow, h)
            acc += a * np.log(q) - a
            prow = P[i]
            for r in range(k):
                prow[r] += q * h[r]
        out[0] += acc


csc_kl_pass = numba.njit(cache=True, nogil=True)(_csc_kl_pass)
