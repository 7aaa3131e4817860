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
