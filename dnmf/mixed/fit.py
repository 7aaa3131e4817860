"""Engine A of NMF-RE (the df-cap design), the finishing steps and the initialiser (spec §2–§5).

Engine A is written once on sufficient statistics: the loop asks a *data backend* for the
block sums it needs (``YB⁺ᵀ``, ``B⁺B⁺ᵀ``, ``Xᵀmax(Y − XU, 0)Aᵀ``, ``‖R‖²``), so the in-memory fit
(:class:`DenseData`) and the column-blocked fit on a Dask cluster
(:class:`dnmf.mixed.blocks.BlockedData`) run the same arithmetic on the client.
:func:`finalize` and :func:`initialize` are shared by both engines of :func:`dnmf.nmfre`.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..covariates._common import (
    EPS,
    LAMBDA_FLOOR,
    basis_names,
    basis_order,
    cholesky_spd,
    clip_var,
    colnorm,
    icc,
    normalize_columns,
    ridge_solve,
    safe_div,
)
from ._core import Inputs, check_matrix_init, df_u, gram_eigenvalues, lambda_for_cap
from .result import NMFREResult

logger = logging.getLogger("dnmf.mixed.nmfre")  # the logger print_trace documents

__all__ = [
    "CapOptions",
    "CapState",
    "DenseData",
    "check_convergence",
    "fit_cap",
    "r_squared_variants",
    "finalize",
    "nmfkc_eu_stats",
    "kmeans_start",
    "initialize",
    "cap_extra",
]


# ---------------------------------------------------------------------------------------------
# Engine A on sufficient statistics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapOptions:
    """Constants of one Engine-A fit (spec §3.1)."""

    rank: int
    rate: float
    epsilon: float = 1e-5
    maxit: int = 50000
    dfu_control: str = "cap"
    sigma2_update: bool = True
    tau2_update: bool = True
    sigma2_start: int = 50  # σ² update from this iteration …
    sigma2_every: int = 10  # … every this many iterations
    sigma2_rate: float = 0.05  # damping of the σ² update
    tau2_rate: float = 0.2  # damping of the τ² moment update ("off" only)
    print_trace: bool = False


@dataclass
class CapState:
    """Mutable state of the Engine-A loop (X, Θ on the client; U lives in the data backend)."""

    X: np.ndarray
    C: np.ndarray
    sigma2: float = 1.0
    tau2: float = 1.0
    lam: float = 1.0
    iteration: int = 0
    obj_prev: float = np.inf
    rel: float = np.nan
    objfunc_iter: list = field(default_factory=list)
    rss_trace: list = field(default_factory=list)
    hit_iter: list = field(default_factory=list)
    converged: bool = False
    stop_reason: str = "maxit"


class DenseData:
    """In-memory data backend of the Engine-A loop: Y (P × N), A (K × N) and U (Q × N)."""

    def __init__(self, Y: np.ndarray, A: np.ndarray, U: np.ndarray):
        self.Y = Y
        self.A = A
        self.U = U
        self.n_samples = Y.shape[1]
        self.n_features = Y.shape[0]
        self.AAt = A @ A.T

    def u_step(self, X: np.ndarray, C: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """U ← M⁻¹Xᵀ(Y − XCA), row-centred; return (``YB⁺ᵀ``, ``B⁺B⁺ᵀ``, ``‖U‖²``), B = CA + U."""
        CA = C @ self.A
        U = ridge_solve(L, X.T @ (self.Y - X @ CA))
        U -= U.mean(axis=1, keepdims=True)
        self.U = U
        Bp = np.maximum(CA + U, 0.0)
        return self.Y @ Bp.T, Bp @ Bp.T, float(np.sum(U * U))

    def c_step(self, X: np.ndarray, d: np.ndarray) -> np.ndarray:
        """U ← DU (normalisation); return ``Xᵀ max(Y − XU, 0) Aᵀ`` (Q × K)."""
        self.U = self.U * d[:, None]
        return X.T @ np.maximum(self.Y - X @ self.U, 0.0) @ self.A.T

    def rss(self, X: np.ndarray, C: np.ndarray) -> tuple[float, float]:
        """(``‖Y − X(CA+U)‖²``, ``‖U‖²``)."""
        R = self.Y - X @ (C @ self.A + self.U)
        return float(np.sum(R * R)), float(np.sum(self.U * self.U))


def check_convergence(state: CapState, obj: float, epsilon: float) -> bool:
    """Spec §3.3 step 10; updates ``state`` and returns True when the loop must stop."""
    prev = state.obj_prev
    state.rel = abs(prev - obj) / (abs(prev) + 1e-10) if np.isfinite(prev) else np.inf
    if not np.isfinite(obj):
        state.stop_reason, state.converged = "nonfinite_obj", False
        return True
    if np.isfinite(prev) and state.rel < epsilon:
        state.stop_reason, state.converged = "epsilon", True
        return True
    state.obj_prev = obj
    return False


def fit_cap(data, state: CapState, opt: CapOptions) -> CapState:
    """Run the Engine-A iterations (spec §3.3) on a data backend; X, Θ, σ², τ² on the client.

    ``data`` provides ``u_step``, ``c_step``, ``rss``, ``AAt``, ``n_samples`` and
    ``n_features`` (:class:`DenseData`, :class:`dnmf.mixed.blocks.BlockedData`).
    """
    N, P, Q = data.n_samples, data.n_features, opt.rank
    cap = max(opt.rate * N * Q, 1.0)
    eye = np.eye(Q)
    X, C = state.X, state.C
    for it in range(1, opt.maxit + 1):
        state.iteration = it
        # 1. variances and λ
        state.tau2, state.sigma2 = clip_var(state.tau2), clip_var(state.sigma2)
        lam = state.sigma2 / state.tau2
        XtX = X.T @ X
        # 2. cap enforcement: raise λ until dfU ≤ cap; τ² follows from λ
        if opt.dfu_control == "cap":
            d = gram_eigenvalues(XtX)
            if df_u(d, N, lam) > cap:
                lam = lambda_for_cap(d, N, cap, lam)
                state.tau2 = clip_var(state.sigma2 / max(lam, LAMBDA_FLOOR))
                state.hit_iter.append(it)
        state.lam = lam
        # 3. U step (ridge / BLUP, row-centred) and the X-step statistics
        L = cholesky_spd(XtX + max(lam, LAMBDA_FLOOR) * eye)
        YBt, BBt, u_sq = data.u_step(X, C, L)
        # 4. τ² moment update (never under the cap)
        if opt.tau2_update and opt.dfu_control != "cap":
            tr_minv = float(np.trace(ridge_solve(L, eye)))
            t_new = clip_var(u_sq / (N * Q) + state.sigma2 * tr_minv / Q)
            state.tau2 = (1 - opt.tau2_rate) * state.tau2 + opt.tau2_rate * t_new
        # 5. X step: positive-part multiplicative update
        X = np.maximum(X * safe_div(YBt, X @ BBt), EPS)
        # 6. normalise (X, C, U)
        X, dsc = normalize_columns(X)
        C = C * dsc[:, None]
        X = np.maximum(X, EPS)
        C = np.maximum(C, EPS)
        # 7. Θ step on the RE-adjusted response
        num = data.c_step(X, dsc)
        C = np.maximum(C * safe_div(num, (X.T @ X) @ C @ data.AAt), EPS)
        # 8. damped σ² update
        rss, u_sq = data.rss(X, C)
        if opt.sigma2_update and it >= opt.sigma2_start and it % opt.sigma2_every == 0:
            s_new = clip_var(rss / (P * N))
            state.sigma2 = (1 - opt.sigma2_rate) * state.sigma2 + opt.sigma2_rate * s_new
        # 9. objective
        obj = rss + state.sigma2 / clip_var(state.tau2) * u_sq
        state.objfunc_iter.append(obj)
        state.rss_trace.append(rss)
        state.X, state.C = X, C
        if opt.print_trace and it % 100 == 0:
            logger.info("nmfre iter %d: obj=%.6g rel=%.3g lambda=%.4g", it, obj, state.rel, lam)
        # 10. convergence
        if check_convergence(state, obj, opt.epsilon):
            break
    return state


# ---------------------------------------------------------------------------------------------
# Finalisation shared by both engines
# ---------------------------------------------------------------------------------------------


def r_squared_variants(Y: np.ndarray, fit: np.ndarray) -> dict:
    """R² variants of one NMF-RE fit: grand-mean (56d65eb), cor², uncentered and row-centered.

    Not nmfkc's :func:`dnmf.covariates._common.r_squared_all` (weighted, no grand-mean R²): the
    two differ in definitions and in summation order, and each is pinned to its R reference.
    """
    R = Y - fit
    sse = float(np.sum(R * R))
    sst = float(np.sum((Y - Y.mean()) ** 2))
    sst_row = float(np.sum((Y - Y.mean(axis=1, keepdims=True)) ** 2))
    y, f = Y.ravel(), fit.ravel()
    if np.std(y) > 0 and np.std(f) > 0:
        cor2 = float(np.corrcoef(y, f)[0, 1] ** 2)
    else:
        cor2 = float("nan")
    return {
        "grand": 1 - sse / sst if sst > 0 else float("nan"),
        "cor2": cor2,
        "uncentered": 1 - sse / float(np.sum(Y * Y)) if np.sum(Y * Y) > 0 else float("nan"),
        "centered": 1 - sse / sst_row if sst_row > 0 else float("nan"),
    }


def finalize(inp: Inputs, X, C, U, sigma2, tau2, *, engine, prefix, C_signed, rate, cap, extra) -> NMFREResult:
    """Spec §3.4 / §5.4: reorder the basis, fits, dfU, R², ICC; build the result."""
    Y, A = inp.Y, inp.A
    P, N = Y.shape
    Q, K = C.shape
    if Q > 1:
        o = basis_order(X)
        X, C, U = X[:, o], C[o, :], U[o, :]
    B = C @ A
    B_blup = B + U
    XB = X @ B
    XB_blup = X @ B_blup
    lam = sigma2 / clip_var(tau2)
    dfu = df_u(gram_eigenvalues(X.T @ X), N, lam)
    r2b = r_squared_variants(Y, XB_blup)
    r2f = r_squared_variants(Y, XB)
    main = "grand" if engine == "cap" else "cor2"
    B_blup_pos = np.maximum(B_blup, 0.0)
    X_prob = X / (X.sum(axis=1, keepdims=True) + EPS)
    return NMFREResult(
        X=X, C=C, U=U, sigma2=float(sigma2), tau2=float(tau2), lambda_=float(lam), engine=engine,
        dfU=dfu, dfU_cap=float(cap), dfU_cap_rate=rate, lambda_enforced=float(lam),
        dfU_frac=dfu / (N * Q), dfU_cap_frac=float(cap) / (N * Q),
        B=B, B_prob=colnorm(np.maximum(B, 0.0)), B_blup=B_blup, B_blup_pos=B_blup_pos,
        B_blup_prob=colnorm(B_blup_pos), XB=XB, XB_blup=XB_blup,
        X_prob=X_prob, X_cluster=np.argmax(X_prob, axis=1),
        r_squared=r2b[main], r_squared_fixed=r2f[main],
        r_squared_cor2=r2b["cor2"], r_squared_fixed_cor2=r2f["cor2"],
        r_squared_uncentered=r2b["uncentered"], r_squared_fixed_uncentered=r2f["uncentered"],
        r_squared_centered=r2b["centered"], r_squared_fixed_centered=r2f["centered"],
        ICC=icc(X, sigma2, tau2), C_signed=bool(C_signed),
        basis_names=basis_names(prefix, Q),
        covariate_names=inp.covariate_names, feature_names=inp.feature_names, sample_names=inp.sample_names,
        dims=f"Y({P},{N})~X({P},{Q})C({Q},{K})A({K},{N})",
        **extra,
    )


# ---------------------------------------------------------------------------------------------
# Initialisation (nmfkc)
# ---------------------------------------------------------------------------------------------


def nmfkc_eu_stats(X: np.ndarray, C: np.ndarray, YAt: np.ndarray, AAt: np.ndarray, ysq: float,
                   epsilon: float, maxit: int = 5000) -> tuple[np.ndarray, np.ndarray, int]:
    """nmfkc's EU iterations (spec §2, ``X.restriction="colSums"``, unit weights, no penalties).

    With B = ΘA every quantity is a function of the constants ``YAᵀ`` (P × K), ``AAᵀ`` (K × K)
    and ``‖Y‖²``: ``YBᵀ = YAᵀΘᵀ``, ``XBBᵀ = XΘAAᵀΘᵀ``; the Θ step keeps upstream's stale
    ``XB`` (``X_newᵀX_oldΘAAᵀ``) and the objective ``‖Y − X_oldΘA‖²`` comes from the Gram
    identity. So the initialiser needs no pass over Y per iteration (the blocked fit uses it
    at any N).

    Returns
    -------
    X : ndarray of shape (P, Q)
    C : ndarray of shape (Q, K)
    n_iter : int
    """
    obj_prev = None
    it = 0
    for it in range(1, maxit + 1):
        Xo, Co = X, C
        CAAt = Co @ AAt
        X = Xo * (YAt @ Co.T) / (Xo @ (CAAt @ Co.T) + EPS)
        X = X / X.sum(axis=0)
        C = Co * (X.T @ YAt) / (X.T @ Xo @ CAAt + EPS)
        obj = ysq - 2.0 * float(np.sum(Xo * (YAt @ Co.T))) + float(np.sum((Xo.T @ Xo) * (CAAt @ Co.T)))
        if it >= 10 and obj_prev is not None and abs(obj - obj_prev) / max(abs(obj), 1.0) <= epsilon:
            break
        obj_prev = obj
    return X, C, it


def kmeans_start(Y: np.ndarray, rank: int, seed: int, nstart: int = 1) -> np.ndarray:
    """nmfkc's starting basis: k-means centres of the columns of Y, columns scaled to sum 1.

    Rank 1 is R's deterministic case (X ∝ rowMeans(Y)); rank ≥ 2 uses scikit-learn's k-means
    seeded by ``seed`` (not R's Hartigan–Wong stream).
    """
    if rank == 1:
        X = Y.mean(axis=1, keepdims=True)
    else:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=rank, n_init=nstart, random_state=seed).fit(Y.T)
        X = km.cluster_centers_.T.copy()
    return X / np.maximum(X.sum(axis=0), 1e-300)


def initialize(inp: Inputs, rank: int, *, epsilon: float, seed: int, X_init, C_init, nstart: int = 1,
               r_rng: bool = False):
    """X (P × Q) and Θ (Q × K) from ``nmfkc(Y, A, rank, epsilon, seed)`` unless both are given.

    Uses :func:`dnmf.nmfkc` when the package provides it; otherwise nmfkc's EU iterations on
    the sufficient statistics (:func:`nmfkc_eu_stats`) from :func:`kmeans_start`, which is
    the same computation at rank 1.
    """
    P, N = inp.Y.shape
    K = inp.A.shape[0]
    X0 = check_matrix_init(X_init, "X_init", (P, rank), "nmfre")
    C0 = check_matrix_init(C_init, "C_init", (rank, K), "nmfre")
    if X0 is not None and C0 is not None:
        return X0, C0
    try:
        from ..covariates import nmfkc
    except ImportError:
        nmfkc = None
    if nmfkc is not None:
        extra = {}
        if nstart != 1:
            extra["nstart"] = nstart
        if r_rng:
            extra["r_rng"] = True
        with warnings.catch_warnings():
            # nmfre warns about its rank itself, in its own name
            warnings.filterwarnings("ignore", message=r"nmfkc: rank = ", category=UserWarning)
            kc = nmfkc(inp.Y, inp.A, rank=rank, epsilon=epsilon, seed=seed, **extra)
        return np.array(kc.X, dtype=float), np.array(kc.C, dtype=float)
    Y, A = inp.Y, inp.A
    X, C, _ = nmfkc_eu_stats(kmeans_start(Y, rank, seed, nstart), np.ones((rank, K)), Y @ A.T, A @ A.T,
                             float(np.sum(Y * Y)), epsilon)
    if rank > 1:
        o = basis_order(X)
        X, C = X[:, o], C[o, :]
    return X, C


def cap_extra(st: CapState, opt: CapOptions, scan, call: str, maxit: int, epsilon: float, t0: float) -> dict:
    """Convergence and cap fields of an Engine-A result."""
    return dict(
        converged=st.converged, stop_reason=st.stop_reason, n_iter=st.iteration, maxit=maxit, epsilon=epsilon,
        objfunc=float(st.objfunc_iter[-1]) if st.objfunc_iter else float("nan"),
        rel_change_final=float(st.rel), objfunc_iter=np.asarray(st.objfunc_iter),
        rss_trace=np.asarray(st.rss_trace), dfU_cap_scan=scan, dfU_hit_cap=bool(st.hit_iter),
        dfU_hit_iter=tuple(st.hit_iter), call=call, runtime=time.perf_counter() - t0,
    )

