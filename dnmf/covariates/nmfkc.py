"""``nmfkc``: NMF with covariates, Y ≈ X C A = X B (spec ``nmfre.md`` §2).

A port of R ``nmfkc()`` (package nmfkc, HEAD ``4e9ed50``) with its exact multiplicative
updates, including the quirks needed for parity:

* the C step uses the *new* X but the *stale* ``XB`` computed at the start of the iteration;
* the objective recorded for iteration i is evaluated with that stale ``XB``;
* convergence is tested from iteration 10 on, and ``objfunc_iter`` keeps iterations 10..end.

It is also the initialiser of :func:`dnmf.nmfre`. The data are small dense matrices (P × N
with P the number of measurements), so the fit runs in-process with NumPy; the parallel
parts of this module family (bootstrap replicates, CV folds) go through
:mod:`dnmf.engine.executor`.
"""

from __future__ import annotations

import logging
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .._plotting import figure_axes
from .._validation import check_float, check_int, check_option, param_error
from ..exceptions import ConvergenceWarning, DnmfError, InputError
from .._losses import LOSSES
from ..formula import formula_inputs, is_formula, normalize_formula
from ._text import RawArg, format_call
from ._common import (
    EPS,
    as_covariate_matrix,
    as_data_matrix,
    basis_names,
    basis_order,
    check_rank_vs_shape,
    effective_rank,
    effective_rank_expected,
    effective_rank_index,
    r_squared_all,
)

logger = logging.getLogger(__name__)

__all__ = ["NMFKCResult", "nmfkc", "X_INIT_METHODS", "X_RESTRICTIONS"]

_FUNC = "nmfkc"
X_RESTRICTIONS = ("colSums", "colSqSums", "totalSum", "none", "fixed")
X_INIT_METHODS = ("kmeans", "kmeansar", "kmeans++", "kmeanspp", "runif", "nndsvd")
_DETAILS = ("full", "fast", "minimal")


@dataclass(frozen=True)
class NMFKCResult:
    """A fitted ``nmfkc`` model Y ≈ X C A = X B.

    Shapes: Y is P × N, X is P × Q, C (Θ) is Q × K (Q × N when A is None, where B = C),
    A is K × N, B = C A is Q × N.

    Attributes
    ----------
    X : ndarray of shape (P, Q)
        Basis; columns sum to 1 under ``X_restriction="colSums"``; ordered by
        ``Σ_p (p/P)·X_pq`` when Q > 1.
    C : ndarray of shape (Q, K) or (Q, N)
        Parameter matrix Θ (``C`` in R).
    B : ndarray of shape (Q, N)
        Coefficients ``C A`` (or ``C`` without A).
    XB : ndarray of shape (P, N) or None
        Fitted values (None when ``detail="minimal"``; see :meth:`fitted`).
    B_prob : ndarray of shape (Q, N) or None
        ``B / (colSums(B) + 1e-10)``: soft clustering of the columns.
    B_cluster : ndarray of int of shape (N,) or None
        0-based argmax of each column of ``B_prob``; -1 where the column is all zero.
    X_prob : ndarray of shape (P, Q) or None
        ``X / (rowSums(X) + 1e-10)``.
    X_cluster : ndarray of int of shape (P,) or None
        0-based argmax of each row of ``X_prob``.
    objfunc : float
        Final loss ``Σ W (Y − XB)²`` (EU) or ``Σ W [−Y log(XB + 1e-10) + XB]`` (KL),
        recomputed after the loop, without penalties.
    objfunc_iter : ndarray of shape (n_iter − 9,)
        Objective (with penalties) of iterations 10..n_iter (all iterations if fewer than 10).
    n_iter : int
        Iterations run.
    maxit, epsilon : int, float
        The iteration cap and tolerance used.
    converged : bool
        Whether the relative objective change fell below ``epsilon``.
    r_squared, r_squared_uncentered, r_squared_centered : float
        cor(Y, XB)², 1 − SSE/ΣY², 1 − SSE/Σ(Y − row mean)² over cells with weight > 0.
    sigma : float
        Standard deviation (n − 1) of the residuals of cells with weight > 0.
    mae : float
        Mean absolute residual over those cells.
    criterion : dict
        ``ICp1``, ``ICp2``, ``ICp3``, ``ICp``, ``AIC``, ``BIC`` (EU only), ``B_prob_sd_min``,
        ``B_prob_max_mean``, ``B_prob_entropy_mean``, ``effective_rank`` (NaN at Q = 1),
        ``effective_rank_expected`` = e^{H_Q − 1}, ``effective_rank_index`` ∈ [0, 1],
        and with ``detail="full"`` (no zero weights) ``silhouette``, ``CPCC``, ``dist_cor``.
    method : str
        ``"EU"`` or ``"KL"``.
    X_restriction : str
    rank : int
        Q.
    n_missing, n_total : int
        Cells with weight 0, and P·N.
    has_A : bool
        Whether a covariate matrix was given.
    basis_names : tuple of str
        ``prefix1..prefixQ``: the columns of X and rows of C and B.
    covariate_names : tuple of str or None
        Columns of C: ``rownames(A)`` (index of a DataFrame A), else ``Cov1..CovK``;
        None without A.
    feature_names, sample_names : tuple of str or None
        Row and column names of Y (from a DataFrame).
    dims : str
        ``"Y(P,N)~X(P,Q)C(Q,K)A(K,N)=XB(Q,N)"`` (or ``"Y(P,N)~X(P,Q)B(Q,N)"``).
    runtime : float
        Seconds.
    seed : int or None
        The seed used for the initialisation.
    init : str
        The X initialisation actually used (``"matrix"`` for a given matrix).
    C_signed : bool
        Always False (C ≥ 0); read by :func:`dnmf.nmfkc_dot`.
    coefficients : None
        No inference table on a plain fit (see :func:`dnmf.nmfkc_inference`).
    call : str
        The call as given, R style (``nmfkc(Y = Y, A = A, rank = 2)``; arrays are shown by
        parameter name, scalars by value); printed by ``str(fit)`` and :meth:`summary`.
    formula_meta : dict or None
        Formula mode only: ``{"formula", "Y_cols", "A_cols"}`` (R's ``formula.meta``).

    Printing a result gives R's ``print.nmf`` text; :meth:`summary` gives ``summary.nmfkc``.
    """

    X: np.ndarray
    C: np.ndarray
    B: np.ndarray
    XB: Optional[np.ndarray]
    B_prob: Optional[np.ndarray]
    B_cluster: Optional[np.ndarray]
    X_prob: Optional[np.ndarray]
    X_cluster: Optional[np.ndarray]
    objfunc: float
    objfunc_iter: np.ndarray
    n_iter: int
    maxit: int
    epsilon: float
    converged: bool
    r_squared: float
    r_squared_uncentered: float
    r_squared_centered: float
    sigma: float
    mae: float
    criterion: dict
    method: str
    X_restriction: str
    rank: int
    n_missing: int
    n_total: int
    has_A: bool
    basis_names: tuple
    covariate_names: Optional[tuple]
    feature_names: Optional[tuple]
    sample_names: Optional[tuple]
    dims: str
    runtime: float
    seed: Optional[int] = None
    init: str = "kmeans"
    C_signed: bool = False
    coefficients: Any = field(default=None, repr=False)
    call: str = ""
    formula_meta: Optional[dict] = None

    # -- R-style accessors and text ------------------------------------------------------------
    def coef(self):
        """Θ (Q × K), or the coefficient table when one is attached (R ``coef.nmf``)."""
        return self.coefficients if self.coefficients is not None else self.C

    def summary(self) -> str:
        """R's ``summary(fit)`` text (``print.summary.nmfkc``): call, dimensions, fit statistics,
        structure diagnostics."""
        from ._text import format_summary

        return format_summary(self)

    def __str__(self) -> str:
        from ._text import format_print

        return format_print(self)

    __repr__ = __str__

    def plot(self, ax=None):
        """Objective per iteration (``objfunc_iter``), titled ``r.squared=<R²>`` (R ``plot.nmfkc``).

        Returns the matplotlib Figure.
        """
        fig, ax = figure_axes(ax, (5, 4))
        y = np.asarray(self.objfunc_iter)
        ax.plot(np.arange(1, len(y) + 1), y, "o", markerfacecolor="none", color="black")
        ax.set_xlabel("iter")
        ax.set_ylabel("objfunc")
        ax.set_title(f"r.squared={round(float(self.r_squared), 3)}")
        return fig

    def fitted(self) -> np.ndarray:
        """Fitted values X·B (P × N), recomputed when ``detail="minimal"`` dropped them."""
        return self.XB if self.XB is not None else self.X @ self.B

    def predict(self, new_A=None, newdata=None) -> np.ndarray:
        """X·C·new_A (P × M) for new covariates (K × M); the fitted values when None.

        A formula-mode fit also takes ``newdata``, a frame with the right-hand-side columns
        (one row per new unit).
        """
        if newdata is not None:
            if self.formula_meta is None:
                raise InputError("The 'newdata' parameter of predict can only be used for a fit in formula mode.")
            from ..formula import new_covariates

            new_A = new_covariates(self.formula_meta, newdata)
        if new_A is None:
            return self.fitted()
        if not self.has_A:
            raise InputError("The 'new_A' parameter of predict must be None for a fit without A. Got an array instead.")
        new_A = np.asarray(new_A, dtype=float)
        if new_A.ndim == 1:
            new_A = new_A[:, None]
        if new_A.shape[0] != self.C.shape[1]:
            raise param_error("new_A", "predict", f"an array with {self.C.shape[1]} rows", f"shape {new_A.shape}")
        return self.X @ (self.C @ new_A)


# ------------------------------------------------------------------------------ helpers


def _xnorm(X: np.ndarray, restriction: str) -> np.ndarray:
    if restriction == "colSums":
        return X / X.sum(axis=0)[None, :]
    if restriction == "colSqSums":
        return X / np.sqrt((X * X).sum(axis=0))[None, :]
    if restriction == "totalSum":
        return X / X.sum()
    return X


def _x_penalties(num, den, X, ortho: float, smooth: float):
    """Add the X-step penalty terms to the multiplicative update's numerator and denominator:
    orthogonality (``ortho``·X·(XᵀX − diag)) and smoothness between neighbouring rows."""
    if ortho > 0:
        G = X.T @ X
        np.fill_diagonal(G, 0.0)
        den = den + ortho * (X @ G)
    if smooth > 0:
        nb, deg = _neighbour_sum(X)
        num = num + smooth * nb
        den = den + smooth * deg[:, None] * X
    return num, den


def _neighbour_sum(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the neighbouring rows, degree) for the X.L2.smooth penalty."""
    nb = np.zeros_like(X)
    nb[1:] += X[:-1]
    nb[:-1] += X[1:]
    deg = np.full(X.shape[0], 2.0)
    deg[0] = deg[-1] = 1.0
    if X.shape[0] == 1:
        deg[0] = 0.0
    return nb, deg


def _penalty(X, C, C_L1, ortho, smooth) -> float:
    pen = 0.0
    if C_L1 != 0:
        pen += C_L1 * float(C.sum())
    if ortho != 0:
        G = X.T @ X
        np.fill_diagonal(G, 0.0)
        pen += ortho / 2.0 * float(np.sum(G * G))
    if smooth != 0:
        pen += smooth / 2.0 * float(np.sum(np.diff(X, axis=0) ** 2))
    return pen


#: The weighted per-entry objectives of the two methods, from the loss registry (dnmf._losses):
#: EU ``W (Y − XB)²``, KL ``−W Y log(XB + 1e-10) + W XB``.
_OBJECTIVE = {"EU": LOSSES["mse"].objective, "KL": LOSSES["kl"].objective}
#: Their multiplicative-step matrices (N, D), from the same registry.
_MU_TERMS = {"EU": LOSSES["mse"].mu_terms, "KL": LOSSES["kl"].mu_terms}


def _loss(Y, XB, W, method) -> float:
    return float(np.sum(_OBJECTIVE[method](Y, XB, W)))


def mu_iterate(
    Y: np.ndarray,
    A: Optional[np.ndarray],
    X: np.ndarray,
    C: np.ndarray,
    W: np.ndarray,
    *,
    method: str = "EU",
    X_restriction: str = "colSums",
    update_X: bool = True,
    epsilon: float = 1e-4,
    maxit: int = 5000,
    C_L1: float = 0.0,
    X_L2_ortho: float = 0.0,
    X_L2_smooth: float = 0.0,
):
    """The multiplicative-update loop of R ``nmfkc`` (numbered steps of spec §2).

    Parameters
    ----------
    Y : ndarray of shape (P, N)
        Data with masked cells already set to 0.
    A : ndarray of shape (K, N) or None
    X : ndarray of shape (P, Q)
        Restricted initial basis.
    C : ndarray of shape (Q, K) or (Q, N)
    W : ndarray of shape (P, N)
        Cell weights (0 = missing / held out).
    update_X : bool
        False keeps X fixed (P = 1 or ``X_restriction="fixed"``).

    Returns
    -------
    X, C : ndarray
    objs : ndarray of shape (n_iter,)
        Objective of every iteration (stale ``XB``, penalties included).
    converged : bool
    """
    At = None if A is None else A.T
    objs = np.empty(maxit)
    converged = False
    n = 0
    # the loss's pieces, looked up once: N, D of the multiplicative step (EU (W Y, W XB), KL
    # (W Y/(XB + ε), W)), the objective, the L1 term of the C denominator; KL's W Aᵀ is constant
    mu_terms, objective = _MU_TERMS[method], _OBJECTIVE[method]
    l1_den = C_L1 if method == "KL" else C_L1 / 2.0
    WAt = W @ At if method == "KL" and A is not None else None
    for i in range(1, maxit + 1):
        # 1. B and XB at the start of the iteration (XB stays stale below)
        B = C if A is None else C @ A
        XB = X @ B
        num_m, den_m = mu_terms(Y, XB, W)
        # 2. X step
        if update_X:
            num = num_m @ B.T
            den = den_m @ B.T
            num, den = _x_penalties(num, den, X, X_L2_ortho, X_L2_smooth)
            X = _xnorm(X * (num / (den + EPS)), X_restriction)
        # 3. C step: new X, stale XB
        if A is None:
            num_C = X.T @ num_m
            den_C = X.T @ den_m
        else:
            num_C = X.T @ num_m @ At
            den_C = X.T @ den_m @ At if WAt is None else X.T @ WAt
        if C_L1 != 0:
            den_C = den_C + l1_den
        C = C * (num_C / (den_C + EPS))
        obj = float(np.sum(objective(Y, XB, W)))
        # 4. objective with penalties at the updated factors
        obj += _penalty(X, C, C_L1, X_L2_ortho, X_L2_smooth)
        objs[i - 1] = obj
        n = i
        # 5. convergence from iteration 10
        if i >= 10:
            rel = abs(obj - objs[i - 2]) / max(abs(obj), 1.0)
            if rel <= abs(epsilon):
                converged = True
                break
    return X, C, objs[:n], converged


# ---------------------------------------------------------------------- initialisation


def _nndsvdar(Y: np.ndarray, Q: int, runif) -> np.ndarray:
    P = Y.shape[0]
    U, s, Vt = np.linalg.svd(Y, full_matrices=False)
    W = np.zeros((P, Q))
    W[:, 0] = np.sqrt(s[0]) * np.abs(U[:, 0])
    for q in range(1, min(Q, len(s))):
        u, v = U[:, q], Vt[q, :]
        up, un, vp, vn = np.maximum(u, 0), np.maximum(-u, 0), np.maximum(v, 0), np.maximum(-v, 0)
        nup, nun, nvp, nvn = (np.linalg.norm(z) for z in (up, un, vp, vn))
        mp, mn = nup * nvp, nun * nvn
        tiny = np.finfo(float).eps
        if mp > mn:
            W[:, q] = up * (np.sqrt(s[q]) * mp / (nup if nup > 0 else tiny))
        else:
            W[:, q] = un * (np.sqrt(s[q]) * mn / (nun if nun > 0 else tiny))
    W[~np.isfinite(W)] = 0.0
    W[W < 0] = 0.0
    zero = W == 0
    n_zero = int(zero.sum())
    if n_zero:
        # R fills in column-major order
        fill = runif(n_zero) * float(Y.mean()) / 100.0
        Wf = W.reshape(-1, order="F")
        Wf[np.flatnonzero(zero.reshape(-1, order="F"))] = fill
        W = Wf.reshape(W.shape, order="F")
    return W


def _kmeans_centers(Yt: np.ndarray, Q: int, nstart: int, maxit: int, seed_int: int, plus_plus: bool) -> np.ndarray:
    """Cluster centres (Q × P) of the rows of ``Yt`` (N × P) by scikit-learn's k-means."""
    from sklearn.cluster import KMeans

    km = KMeans(
        n_clusters=Q,
        init="k-means++" if plus_plus else "random",
        n_init=nstart,
        max_iter=maxit,
        random_state=seed_int,
        algorithm="lloyd",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        km.fit(Yt)
    return km.cluster_centers_


def initial_X(
    Y_init: np.ndarray,
    Q: int,
    X_init,
    *,
    seed: Optional[int],
    nstart: int,
    maxit: int,
    r_rng: bool,
) -> tuple[np.ndarray, str]:
    """Initial basis (P × Q) by name, as R ``.nmfkc_init_X`` / ``.init_X_method``.

    ``kmeans`` at Q = 1 is deterministic (the row means: R's k = 1 MacQueen returns the
    mean). For Q ≥ 2: with ``r_rng=True`` the initial centres are drawn with R's
    ``sample.int`` from the emulated R stream and refined by Hartigan–Wong
    (:func:`dnmf.covariates._kmeans.kmeans_hw`), as R's ``stats::kmeans``; otherwise
    scikit-learn's k-means (Lloyd) with a seed derived from ``seed`` — numerically different
    from R's, but a valid k-means start.
    """
    P, N = Y_init.shape
    if r_rng:
        from ..rrng import RRandom

        rr = RRandom(123 if seed is None else seed)
        runif = rr.runif
    else:
        rng = np.random.default_rng(seed)
        runif = lambda n: rng.random(int(n))  # noqa: E731

    def runif_matrix():
        return runif(P * Q).reshape((P, Q), order="F")

    method = X_init
    if method == "runif" and nstart > 1:
        best, X = np.inf, None
        for _ in range(nstart):
            Xs = runif_matrix()
            Bs = runif(Q * N).reshape((Q, N), order="F")
            for _it in range(10):
                Bs = Bs * (Xs.T @ Y_init) / (Xs.T @ Xs @ Bs + EPS)
                Xs = Xs * (Y_init @ Bs.T) / (Xs @ Bs @ Bs.T + EPS)
            obj = float(np.sum(_OBJECTIVE["EU"](Y_init, Xs @ Bs)))
            if obj < best:
                best, X = obj, Xs
        return X, method
    if method == "runif":
        return runif_matrix(), method
    if method == "nndsvd":
        if Q <= min(P, N):
            return _nndsvdar(Y_init, Q, runif), method
        return runif_matrix(), method
    # kmeans family
    if N < Q:
        return runif_matrix(), "runif"
    plus_plus = method in ("kmeans++", "kmeanspp")
    if r_rng and not plus_plus:
        from ._kmeans import r_kmeans

        try:
            X = r_kmeans(Y_init.T, Q, rr, iter_max=maxit, nstart=nstart).T.copy()
        except DnmfError as e:  # R's tryCatch(kmeans(...)) falls back to runif
            logger.debug("k-means failed (%s); runif start", e)
            return runif_matrix(), "runif"
    elif Q == 1 and not plus_plus:
        X = Y_init.mean(axis=1, keepdims=True)
    else:
        seed_int = int(np.random.default_rng(seed).integers(0, 2**31 - 1)) if not r_rng else int(seed or 0)
        X = _kmeans_centers(Y_init.T, Q, nstart, maxit, seed_int, plus_plus).T.copy()
    if method == "kmeansar":
        zero = X == 0
        n_zero = int(zero.sum())
        if n_zero:
            Xf = X.reshape(-1, order="F")
            Xf[np.flatnonzero(zero.reshape(-1, order="F"))] = runif(n_zero) * float(Y_init.mean()) / 100.0
            X = Xf.reshape(X.shape, order="F")
    return X, method


def _weights(Y: np.ndarray, Y_weights, func: str) -> tuple[np.ndarray, np.ndarray]:
    """(Y with masked cells zeroed, W) following R's weight handling."""
    P, N = Y.shape
    nan = np.isnan(Y)
    if Y_weights is None:
        W = np.ones((P, N))
    else:
        w = np.asarray(Y_weights, dtype=float)
        if w.ndim == 0:
            W = np.full((P, N), float(w))
        elif w.ndim == 1:
            if w.shape[0] != N:
                raise param_error("Y_weights", func, f"a scalar, a length-{N} vector or a ({P}, {N}) array", f"length {w.shape[0]}")
            W = np.tile(w, (P, 1))
        elif w.shape == (P, N):
            W = w.copy()
        else:
            raise param_error("Y_weights", func, f"a scalar, a length-{N} vector or a ({P}, {N}) array", f"shape {w.shape}")
        W[np.isnan(W)] = 0.0
        if np.isinf(W).any() or (W < 0).any():
            raise param_error("Y_weights", func, "finite and non-negative", "an array with negative or infinite values")
    W[nan] = 0.0
    Y = np.where(nan, 0.0, Y)
    Y[W == 0] = 0.0
    return Y, W


def _silhouette_centroid(B_prob: np.ndarray, cluster: np.ndarray) -> float:
    """Mean silhouette with the neighbour cluster picked by nearest centroid (R ``.silhouette.simple``)."""
    keep = cluster >= 0
    Bp = B_prob[:, keep]
    cl = cluster[keep]
    Q = B_prob.shape[0]
    if Q < 2 or Bp.shape[1] == 0:
        return float("nan")
    D = np.sqrt(np.maximum(((Bp[:, :, None] - Bp[:, None, :]) ** 2).sum(axis=0), 0.0))
    ns = np.array([(cl == q).sum() for q in range(Q)])
    means = np.array([Bp[:, cl == q].mean(axis=1) if ns[q] else np.full(Q, np.nan) for q in range(Q)]).T
    d2 = (Bp * Bp).sum(axis=0)[:, None] + (means * means).sum(axis=0)[None, :] - 2 * Bp.T @ means
    d2 = np.where(np.isnan(d2), np.inf, np.maximum(d2, 0.0))
    si = np.zeros(cl.shape[0])
    for i in range(cl.shape[0]):
        q = cl[i]
        order = np.argsort(d2[i], kind="stable")
        qn = order[1] if order[0] == q else order[0]
        if ns[q] == 1 or ns[qn] == 0:
            si[i] = 0.0
            continue
        a = D[i, cl == q].sum() / (ns[q] - 1)
        b = D[i, cl == qn].sum() / ns[qn]
        m = max(a, b)
        si[i] = (b - a) / m if m > 0 else 0.0
    return float(si.mean())


def criteria(
    Y: np.ndarray,
    W: np.ndarray,
    X: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    XB: np.ndarray,
    *,
    method: str,
    X_restriction: str,
    has_A: bool,
    detail: str,
) -> dict:
    """Fit statistics and rank criteria of R ``nmfkc.criterion`` (keys are snake_case)."""
    P, N = Y.shape
    Q = X.shape[1]
    nan = float("nan")
    valid = W > 0
    n_obs = int(valid.sum())
    objfunc = float(np.sum(W * (Y - XB) ** 2))
    if X_restriction == "fixed":
        npx = 0
    elif X_restriction == "totalSum":
        npx = P * Q - 1
    else:
        npx = (P - 1) * Q
    nparam = npx + (C.size if has_A else B.size)
    crit: dict = {}
    if method == "EU" and n_obs > 0:
        s2 = objfunc / n_obs
        g1 = (P + N) / (P * N) * np.log(P * N)
        g2 = (P + N) / (P * N) * np.log(min(P, N))
        g3 = np.log(min(P, N)) / min(P, N)
        crit.update(
            ICp1=float(np.log(s2) + nparam * g1),
            ICp2=float(np.log(s2) + nparam * g2),
            ICp3=float(np.log(s2) + nparam * g3),
        )
        crit["ICp"] = min(crit["ICp1"], crit["ICp2"], crit["ICp3"])
        crit["AIC"] = float(n_obs * np.log(s2) + 2 * nparam)
        crit["BIC"] = float(n_obs * np.log(s2) + nparam * np.log(n_obs))
    else:
        crit.update(ICp1=nan, ICp2=nan, ICp3=nan, ICp=nan, AIC=nan, BIC=nan)
    out = {"criterion": crit}
    if detail == "minimal":
        out.update(
            r_squared=nan, r_squared_uncentered=nan, r_squared_centered=nan, sigma=nan, mae=nan,
            B_prob=None, B_cluster=None, X_prob=None, X_cluster=None,
        )
        crit.update(B_prob_sd_min=nan, B_prob_max_mean=nan, B_prob_entropy_mean=nan,
                    effective_rank=nan, effective_rank_expected=effective_rank_expected(Q),
                    effective_rank_index=nan, silhouette=nan, CPCC=nan, dist_cor=nan)
        return out
    out.update(r_squared_all(Y, XB, W))
    res = (Y - XB)[valid]
    out["sigma"] = float(np.std(res, ddof=1)) if res.size > 1 else nan
    out["mae"] = float(np.mean(np.abs(res))) if res.size else nan
    B_prob = B / (B.sum(axis=0) + EPS)[None, :]
    if Q > 1:
        crit["B_prob_sd_min"] = float(np.min(np.std(B_prob, axis=1, ddof=1))) if N > 1 else nan
        crit["B_prob_max_mean"] = float(np.mean(B_prob.max(axis=0)))
        pe = B_prob + EPS
        crit["B_prob_entropy_mean"] = float(-np.mean((pe * np.log(pe)).sum(axis=0)) / np.log(Q))
    else:
        crit.update(B_prob_sd_min=0.0, B_prob_entropy_mean=0.0, B_prob_max_mean=1.0)
    B_cluster = np.argmax(B_prob, axis=0).astype(np.int64)
    B_cluster[B_prob.sum(axis=0) == 0] = -1
    X_prob = X / (X.sum(axis=1) + EPS)[:, None]
    X_cluster = np.argmax(X_prob, axis=1).astype(np.int64)
    er = effective_rank(B)
    crit["effective_rank"] = er
    crit["effective_rank_expected"] = effective_rank_expected(Q)
    crit["effective_rank_index"] = effective_rank_index(er, Q)
    if detail == "full" and not (W == 0).any():
        from scipy.cluster.hierarchy import cophenet, linkage
        from scipy.spatial.distance import pdist, squareform

        crit["silhouette"] = _silhouette_centroid(B_prob, B_cluster)
        if N > 2:
            dY, dB = pdist(Y.T), pdist(B.T)
            crit["dist_cor"] = float(np.corrcoef(dY, dB)[0, 1]) if dY.std() > 0 and dB.std() > 0 else nan
        else:
            crit["dist_cor"] = nan
        if Q >= 2 and N > 2:
            M = B_prob.T @ B_prob
            Dm = 1.0 - M
            np.fill_diagonal(Dm, 0.0)
            cond = squareform(Dm, checks=False)
            coph = cophenet(linkage(cond, method="complete"))
            crit["CPCC"] = float(np.corrcoef(coph, cond)[0, 1]) if cond.std() > 0 and coph.std() > 0 else nan
        else:
            crit["CPCC"] = nan
    else:
        crit.update(silhouette=nan, CPCC=nan, dist_cor=nan)
    out.update(B_prob=B_prob, B_cluster=B_cluster, X_prob=X_prob, X_cluster=X_cluster)
    return out


# ------------------------------------------------------------------------------- main


def nmfkc(
    Y,
    A=None,
    rank: Optional[int] = None,
    data=None,
    *,
    epsilon: float = 1e-4,
    maxit: int = 5000,
    method: str = "EU",
    X_restriction: str = "colSums",
    X_init: Any = "kmeans",
    nstart: int = 1,
    seed: Optional[int] = 123,
    C_init=None,
    C_L1: float = 0.0,
    X_L2_ortho: float = 0.0,
    X_L2_smooth: float = 0.0,
    Y_weights=None,
    prefix: str = "Basis",
    detail: str = "fast",
    r_rng: bool = False,
    verbose: bool = False,
    Q: Optional[int] = None,
) -> NMFKCResult:
    """Fit NMF with covariates, Y ≈ X C A with X ≥ 0 and C ≥ 0 (R ``nmfkc``).

    Parameters
    ----------
    Y : array-like of shape (P, N), or str
        Non-negative data; columns are units (subjects, samples). NaN marks a missing cell
        (weight 0). A 1-D vector is one row. A pandas DataFrame gives the row/column names.
        Formula mode: a string ``"y1 + y2 ~ x1 + x2"`` with ``data`` (see :mod:`dnmf.formula`):
        Y's rows are the left-hand columns of ``data`` and A's rows the right-hand ones, each
        transposed so that the rows of ``data`` are the units. No intercept is added (as in R).
    A : array-like of shape (K, N) or None
        Non-negative covariates, one column per column of Y. None fits plain NMF Y ≈ X B
        (C is then Q × N). A DataFrame's index names the covariates.
    rank : int, optional
        Q, the number of basis vectors; default ``Q`` if given, else 2 (R's ``rank=NULL``).
    data : pandas.DataFrame, optional
        Formula mode only: one row per unit.
    epsilon : float, default 1e-4
        Tolerance on the relative objective change ``|f_i − f_{i−1}| / max(|f_i|, 1)``,
        checked from iteration 10.
    maxit : int, default 5000
        Iteration cap (also the k-means ``iter.max``).
    method : {"EU", "KL"}
        Euclidean (least squares) or Kullback–Leibler loss.
    X_restriction : {"colSums", "colSqSums", "totalSum", "none", "fixed"}
        Normalisation of X after each update; ``"fixed"`` keeps a given ``X_init`` unchanged.
    X_init : {"kmeans", "kmeansar", "kmeans++", "kmeanspp", "runif", "nndsvd"} or array
        Initial basis (P × Q array, or a method name). ``"kmeans"`` uses the k-means centres
        of the columns of Y; at Q = 1 this is the row means, exactly as in R. For Q ≥ 2 it
        matches R only with ``r_rng=True`` (R's ``sample.int`` starts + Hartigan–Wong).
    nstart : int, default 1
        k-means restarts (and multi-starts for ``"runif"``).
    seed : int or None, default 123
        Seed of the initialisation (R's ``set.seed(seed)`` when ``r_rng``). None means the
        default 123, as in R (where ``seed=NULL`` in ``...`` falls back to the default).
    C_init : array-like of shape (Q, K) (or (Q, N) without A), optional
        Initial C; default all ones.
    C_L1 : float, default 0
        L1 penalty on C (adds ``C_L1/2`` to the EU C-denominator, ``C_L1·ΣC`` to the objective).
    X_L2_ortho : float, default 0
        Orthogonality penalty ``(X_L2_ortho/2)·‖offdiag(XᵀX)‖²``.
    X_L2_smooth : float, default 0
        Row-smoothness penalty ``(X_L2_smooth/2)·Σ_p ‖X_{p+1,·} − X_{p,·}‖²``.
    Y_weights : scalar, array of shape (N,) or (P, N), optional
        Non-negative cell weights (a length-N vector is recycled over rows); 0 excludes a cell.
    prefix : str, default "Basis"
        Basis labels ``prefix1..prefixQ``.
    detail : {"fast", "full", "minimal"}, default "fast"
        ``"full"`` adds the distance-based criteria (silhouette, CPCC, dist_cor);
        ``"minimal"`` skips fit statistics and drops ``XB`` (upstream HEAD default "fast").
    r_rng : bool, default False
        Use the emulated R random stream (:mod:`dnmf.rrng`) for random initialisations.
    verbose : bool, default False
        Log the dimensions and runtime at INFO level.
    Q : int, optional
        Alias of ``rank`` (R's backward-compatible ``Q``); ``rank`` wins when both are given.

    Returns
    -------
    NMFKCResult

    Notes
    -----
    With W the cell weights, B = CA and XB computed once at the start of iteration i::

        X ← X ∘ [(W∘Y)Bᵀ] / ([(W∘XB)Bᵀ] + 1e-10),  then the X restriction
        C ← C ∘ [Xᵀ(W∘Y)Aᵀ] / ([Xᵀ(W∘XB)Aᵀ] + C_L1/2 + 1e-10)

    The C step uses the new X with the stale XB (R's behaviour, kept for parity); the
    objective f_i = Σ W(Y − XB)² (+ penalties) also uses the stale XB. After the loop B, XB
    and the basis order (ascending ``Σ_p (p/P)·X_pq``) are finalised once.

    Examples
    --------
    >>> from dnmf.datasets.orthodont import load_orthodont
    >>> from dnmf import nmfkc
    >>> Y, A, _ = load_orthodont()
    >>> fit = nmfkc(Y, A, rank=1)
    >>> fit.n_iter, round(float(fit.C[0, 0]), 4)
    (76, 90.1422)
    """
    given = _given_args(dict(locals()))
    t0 = time.perf_counter()
    Y, A, formula_meta = formula_inputs(Y, A, data, _FUNC)
    if rank is None:
        rank = 2 if Q is None else Q
    if seed is None:
        seed = 123  # R: seed=NULL in ... means the default
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise param_error("rank", _FUNC, "an int in [1, inf)", rank)
    Q = int(rank)
    epsilon = check_float(epsilon, "epsilon", _FUNC, low=0.0)
    maxit = check_int(maxit, "maxit", _FUNC, low=1)
    method = check_option(method, "method", _FUNC, ("EU", "KL"))
    X_restriction = check_option(X_restriction, "X_restriction", _FUNC, X_RESTRICTIONS)
    nstart = check_int(nstart, "nstart", _FUNC, low=1)
    C_L1 = check_float(C_L1, "C_L1", _FUNC, low=0.0)
    X_L2_ortho = check_float(X_L2_ortho, "X_L2_ortho", _FUNC, low=0.0)
    X_L2_smooth = check_float(X_L2_smooth, "X_L2_smooth", _FUNC, low=0.0)
    detail = check_option(detail, "detail", _FUNC, _DETAILS)
    if not isinstance(prefix, str):
        raise param_error("prefix", _FUNC, "a str", prefix)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise param_error("seed", _FUNC, "an int or None", seed)

    Y, feat_names, samp_names = as_data_matrix(Y, _FUNC)
    P, N = Y.shape
    if A is not None:
        A, cov_names = as_covariate_matrix(A, N, _FUNC)
        K = A.shape[0]
        if cov_names is None:
            cov_names = tuple(f"Cov{k + 1}" for k in range(K))
    else:
        cov_names = None
        K = N
    Y, W = _weights(Y, Y_weights, _FUNC)
    if not (W > 0).any():
        raise param_error("Y_weights", _FUNC, "positive on at least one cell", "all-zero weights")
    if not (Y[W > 0] > 0).any():
        # every update is 0/0: the fit would return NaN factors
        what = "an all-zero" if (W > 0).all() else "a (weighted, non-missing part) all-zero"
        raise param_error("Y", _FUNC, "an array with at least one positive observed cell",
                          f"{what} {P} × {N} array", described=True)
    check_rank_vs_shape(Q, P, N, _FUNC, "Y")

    if A is None:
        dims = f"Y({P},{N})~X({P},{Q})B({Q},{N})"
    else:
        dims = f"Y({P},{N})~X({P},{Q})C({Q},{K})A({K},{N})=XB({Q},{N})"
    logger.log(logging.INFO if verbose else logging.DEBUG, "%s...", dims)

    # --- initial X
    update_X = True
    if isinstance(X_init, str):
        if X_init not in X_INIT_METHODS:
            raise param_error("X_init", _FUNC, "an array of shape (P, Q) or one of " + ", ".join(repr(m) for m in X_INIT_METHODS), X_init)
        if X_restriction == "fixed":
            raise param_error("X_init", _FUNC, "an array of shape (P, Q) when X_restriction='fixed'", X_init)
    else:
        Xg = np.array(X_init, dtype=float)
        if Xg.ndim == 1 and Q == 1:
            Xg = Xg[:, None]
        if Xg.shape != (P, Q) or not np.isfinite(Xg).all() or (Xg < 0).any():
            raise param_error("X_init", _FUNC, f"a finite non-negative array of shape ({P}, {Q}) or a method name", f"shape {Xg.shape}")
    init_used = "matrix"
    if P == 1:
        X = np.ones((1, 1)) if Q == 1 else np.ones((1, Q))
        update_X = False
        init_used = "scalar"
    elif not isinstance(X_init, str):
        X = Xg.copy()
    else:
        Y_init = Y.copy()
        if (W == 0).any():
            row_means = Y.sum(axis=1) / (W.sum(axis=1) + EPS)
            miss = W == 0
            Y_init[miss] = np.broadcast_to(row_means[:, None], Y.shape)[miss]
        X, init_used = initial_X(Y_init, Q, X_init, seed=seed, nstart=nstart, maxit=maxit, r_rng=r_rng)
    if X_restriction == "fixed":
        update_X = False
    X = _xnorm(np.asarray(X, dtype=float), X_restriction)

    # --- initial C
    c_shape = (Q, K)
    if C_init is None:
        C = np.ones(c_shape)
    else:
        C = np.array(C_init, dtype=float)
        if C.shape != c_shape or not np.isfinite(C).all() or (C < 0).any():
            raise param_error("C_init", _FUNC, f"a finite non-negative array of shape {c_shape}", f"shape {C.shape}")

    X, C, objs, converged = mu_iterate(
        Y, A, X, C, W, method=method, X_restriction=X_restriction, update_X=update_X,
        epsilon=epsilon, maxit=maxit, C_L1=C_L1, X_L2_ortho=X_L2_ortho, X_L2_smooth=X_L2_smooth,
    )
    n_iter = objs.shape[0]
    if not converged:
        warnings.warn(
            f"nmfkc: maximum iterations ({maxit}) reached before the relative objective change "
            f"fell below epsilon={epsilon:g}. Increase maxit (currently {maxit}).",
            ConvergenceWarning,
            stacklevel=2,
        )

    # --- finishing steps (once)
    B = C if A is None else C @ A
    XB = X @ B
    objfunc = _loss(Y, XB, W, method)
    objfunc_iter = objs[9:] if n_iter >= 10 else objs.copy()
    if Q > 1 and X_restriction != "fixed" and update_X:
        o = basis_order(X)
        X, B, C = X[:, o], B[o, :], C[o, :]
    crit = criteria(Y, W, X, B, C, XB, method=method, X_restriction=X_restriction, has_A=A is not None, detail=detail)
    runtime = time.perf_counter() - t0
    logger.log(logging.INFO if verbose else logging.DEBUG, "%s done in %.3fs (%d iterations)", dims, runtime, n_iter)
    return NMFKCResult(
        X=X,
        C=C,
        B=B,
        XB=None if detail == "minimal" else XB,
        B_prob=crit["B_prob"],
        B_cluster=crit["B_cluster"],
        X_prob=crit["X_prob"],
        X_cluster=crit["X_cluster"],
        objfunc=objfunc,
        objfunc_iter=objfunc_iter,
        n_iter=n_iter,
        maxit=maxit,
        epsilon=epsilon,
        converged=converged,
        r_squared=crit["r_squared"],
        r_squared_uncentered=crit["r_squared_uncentered"],
        r_squared_centered=crit["r_squared_centered"],
        sigma=crit["sigma"],
        mae=crit["mae"],
        criterion=crit["criterion"],
        method=method,
        X_restriction=X_restriction,
        rank=Q,
        n_missing=int((W == 0).sum()),
        n_total=P * N,
        has_A=A is not None,
        basis_names=basis_names(prefix, Q),
        covariate_names=cov_names,
        feature_names=feat_names,
        sample_names=samp_names,
        dims=dims,
        runtime=runtime,
        seed=int(seed),
        init=init_used,
        call=format_call(_FUNC, given),
        formula_meta=formula_meta,
    )


def _given_args(args: dict) -> list[tuple[str, Any]]:
    """The arguments of an ``nmfkc`` call that differ from the defaults, in signature order
    (R's ``match.call()`` keeps the arguments given; unchanged defaults are left out)."""
    import inspect

    out = []
    for name, par in inspect.signature(nmfkc).parameters.items():
        v = args.get(name, par.default)
        if name == "Y":
            out.append(("Y", v if not is_formula(v) else RawArg(normalize_formula(v))))
            continue
        d = par.default
        if v is None or (v is d):
            continue
        if isinstance(v, (str, numbers.Number)) and isinstance(d, (str, numbers.Number)) and v == d \
                and type(v) is not bool:
            continue
        out.append((name, v))
    return out

