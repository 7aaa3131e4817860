"""Plain NumPy/SciPy reference fits shared by the tests (written independently of dnmf's engine)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import nnls


def reference_masked_als(A, missing, w0, iters, h_solve=None):
    """Each column of H and row of W solves its masked least squares with scipy's nnls.

    ``h_solve(W_o, a_o, j)`` replaces the column's plain NNLS (e.g. a target-augmented one).
    Returns W (unit L1 columns), d, Ĥ and the residual ``A − W diag(d) Ĥ``.
    """
    m, n = A.shape
    k = w0.shape[1]
    W = w0.copy()
    for _ in range(iters):
        H = np.zeros((k, n))
        for j in range(n):
            o = ~missing[:, j]
            H[:, j] = nnls(W[o], A[o, j])[0] if h_solve is None else h_solve(W[o], A[o, j], j)
        Hn = H / (H.sum(axis=1) + 1e-15)[:, None]
        Wr = np.zeros((m, k))
        for i in range(m):
            o = ~missing[i]
            Wr[i] = nnls(Hn[:, o].T, A[i, o])[0]
        d = Wr.sum(axis=0) + 1e-15
        W = Wr / d
    return W, d, Hn, A - (W * d) @ Hn


def irls_system(F, a, x, loss, r, unit, zg=None):
    """One IRLS step's (G, b) with the library's zero rule (docs/architecture.md, "IRLS losses"):
    §6.2 weights from the registry at the non-zeros; zeros weight 1 for the power losses; for GP
    and NB curvature ω̄ = the weight at the zeros' mean prediction μ̄ and the exact-gradient RHS
    ``ω̄·G_zero·x − g·Σ_zeros f`` with g = ω·μ at a zero (GP 1, NB r/(r + μ̄)); ``zg``: NB's
    per-row factors of the H step instead (``Σ_zeros zg_i f_i``)."""
    from dnmf._losses import get_loss

    spec = get_loss(loss)
    par = {"size": r} if loss == "nb" else {}
    mu = F @ x
    zero = a == 0
    om = np.ones_like(a) if unit else spec.weight(a, mu, **par)
    if unit or loss not in ("gp", "nb") or not zero.any():
        om = np.where(zero, 1.0, om)
        return (F * om[:, None]).T @ F, F.T @ (om * a)
    mu_bar = max(mu[zero].mean(), 0.0)
    wz = float(spec.weight(0.0, mu_bar, **par))
    g = min(1.0, mu_bar / 1e-4) if loss == "gp" else r / (r + mu_bar)
    nz = ~zero
    Fz = F[zero]
    G = (F[nz] * om[nz, None]).T @ F[nz] + wz * Fz.T @ Fz
    grad = g * Fz.sum(axis=0) if zg is None else Fz.T @ zg[zero]
    b = F[nz].T @ (om[nz] * a[nz]) + wz * Fz.T @ (Fz @ x) - grad
    return G, b


def nnls_quadratic(G, b):
    """argmin_{x ≥ 0} ½ xᵀGx − bᵀx by scipy nnls on the Cholesky form ‖Lᵀx − L⁻¹b‖² (G
    symmetrized: a penalty term may arrive with rounding asymmetry)."""
    G = 0.5 * (G + G.T) + 1e-15 * np.eye(len(b))
    L = np.linalg.cholesky(G)
    return nnls(L.T, np.linalg.solve(L, b), maxiter=2000)[0]
