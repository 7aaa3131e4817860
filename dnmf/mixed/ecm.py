"""Engine B of :func:`dnmf.nmfre`: the ECM fit of current upstream nmfkc (spec/nmfre.md §5).

An outer loop estimates σ² and τ² by EM M-steps; each outer iteration runs an inner loop at
fixed λ = σ²/τ² that alternates

1. the U step ``U = (XᵀX + λI)⁻¹Xᵀ(Y − XΘA)`` (no centring);
2. the X step: semi-NMF (signed, with the posterior-variance term ``N·σ²·M⁻¹``) or the
   positive-part multiplicative update (``C_signed=False``);
3. the Θ step: exact separable least squares ``(XᵀX)⁻¹Xᵀ(Y − XU)Aᵀ(AAᵀ)⁻¹`` (signed; a
   Sylvester ridge solve when ``C_L2 > 0``) or the multiplicative update (non-negative).

The marginal negative log-likelihood (§5.5) decreases monotonically and is recorded per
inner iteration in ``nll_trace``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..covariates._common import EPS, LAMBDA_FLOOR, cholesky_spd, clip_var, normalize_columns, ridge_solve, safe_div

logger = logging.getLogger(__name__)

__all__ = ["ECMOptions", "ECMState", "fit_ecm", "marginal_nll", "x_penalty"]


@dataclass(frozen=True)
class ECMOptions:
    """Constants of one Engine-B fit (spec §5.1)."""

    rank: int
    C_signed: bool = True
    epsilon: float = 1e-5
    maxit: int = 5000
    inner_maxit: int = 10000
    outer_maxit: int = 500
    epsilon_outer: float = 1e-6
    x_postvar: bool = True
    X_L2_ortho: float = 0.0
    X_L2_smooth: float = 0.0
    C_L2: float = 0.0
    sigma2_update: bool = True
    tau2_update: bool = True
    print_trace: bool = False


@dataclass
class ECMState:
    """Mutable state of the ECM loops."""

    X: np.ndarray
    C: np.ndarray
    U: np.ndarray
    sigma2: float
    tau2: float
    total_iter: int = 0
    outer: int = 0
    rel: float = np.nan
    objfunc_iter: list = field(default_factory=list)
    rss_trace: list = field(default_factory=list)
    nll_trace: list = field(default_factory=list)
    converged: bool = False
    stop_reason: str = "maxit"


def marginal_nll(Y: np.ndarray, X: np.ndarray, C: np.ndarray, A: np.ndarray, sigma2: float, tau2: float) -> float:
    """Marginal negative log-likelihood of Y under ``y_n ~ N(XΘa_n, σ²I + τ²XXᵀ)`` (spec §5.5).

    ``ℓ = ½[N(P log 2π + P log σ² + log|I + (τ²/σ²)XᵀX|) + (‖R‖² − tr{(XᵀR)ᵀ(XᵀX+λI)⁻¹XᵀR})/σ²]``
    with ``R = Y − XΘA`` and λ = σ²/τ², via the Woodbury identity (only Q × Q matrices).
    """
    P, N = Y.shape
    Q = X.shape[1]
    lam = sigma2 / tau2
    R = Y - X @ (C @ A)
    XtX = X.T @ X
    XtR = X.T @ R
    logdet = np.linalg.slogdet(np.eye(Q) + (tau2 / sigma2) * XtX)[1]
    quad = float(np.sum(R * R)) - float(np.sum(XtR * np.linalg.solve(XtX + lam * np.eye(Q), XtR)))
    return 0.5 * (N * (P * np.log(2 * np.pi) + P * np.log(sigma2) + logdet) + quad / sigma2)


def _offdiag(G: np.ndarray) -> np.ndarray:
    out = G.copy()
    np.fill_diagonal(out, 0.0)
    return out


def x_penalty_terms(X: np.ndarray, ortho: float, smooth: float) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator additions of the X-step penalties (spec §2, §5.3)."""
    num = np.zeros_like(X)
    den = np.zeros_like(X)
    if ortho > 0:
        den += ortho * (X @ _offdiag(X.T @ X))
    if smooth > 0 and X.shape[0] > 1:
        nb = np.zeros_like(X)
        nb[1:] += X[:-1]
        nb[:-1] += X[1:]
        deg = np.full((X.shape[0], 1), 2.0)
        deg[0] = deg[-1] = 1.0
        num += smooth * nb
        den += smooth * deg * X
    return num, den


def x_penalty(X: np.ndarray, ortho: float, smooth: float) -> float:
    """``(ortho/2)‖offdiag XᵀX‖² + (smooth/2)Σ(X_{p+1,·} − X_{p,·})²``."""
    val = 0.0
    if ortho > 0:
        val += 0.5 * ortho * float(np.sum(_offdiag(X.T @ X) ** 2))
    if smooth > 0 and X.shape[0] > 1:
        val += 0.5 * smooth * float(np.sum(np.diff(X, axis=0) ** 2))
    return val


def _c_step_signed(X: np.ndarray, Y: np.ndarray, U: np.ndarray, A: np.ndarray, AAt: np.ndarray,
                   c_l2: float) -> np.ndarray:
    Q, K = X.shape[1], A.shape[0]
    XtX = X.T @ X
    rhs = X.T @ (Y - X @ U) @ A.T
    if c_l2 <= 0:
        left = np.linalg.solve(XtX + 1e-10 * np.eye(Q), rhs)
        return np.linalg.solve((AAt + 1e-10 * np.eye(K)).T, left.T).T
    ex, Vx = np.linalg.eigh(XtX)
    ea, Va = np.linalg.eigh(AAt)
    Z = (Vx.T @ rhs @ Va) / (np.outer(ex, ea) + c_l2)
    return Vx @ Z @ Va.T


def fit_ecm(Y: np.ndarray, A: np.ndarray, X: np.ndarray, C: np.ndarray, U: np.ndarray, sigma2: float,
            tau2: float, opt: ECMOptions) -> ECMState:
    """Run the ECM loops of spec §5.2–5.3 from the nmfkc start (X, C) and U.

    Parameters
    ----------
    Y : ndarray of shape (P, N)
    A : ndarray of shape (K, N)
    X : ndarray of shape (P, Q)
    C : ndarray of shape (Q, K)
    U : ndarray of shape (Q, N)
    sigma2, tau2 : float
        Starting variances.
    opt : ECMOptions

    Returns
    -------
    ECMState
        Final X, C, U (before basis reordering), variances and traces.
    """
    P, N = Y.shape
    Q = opt.rank
    eye = np.eye(Q)
    AAt = A @ A.T
    Ypos = np.maximum(Y, 0.0)
    C0 = C.copy() if opt.C_signed else np.maximum(C, EPS)
    X, dsc = normalize_columns(np.maximum(X, EPS))
    C = C0 * dsc[:, None]
    U = U * dsc[:, None]
    st = ECMState(X=X, C=C, U=U, sigma2=sigma2, tau2=tau2)
    stop_all = False
    for outer in range(1, opt.outer_maxit + 1):
        st.outer = outer
        st.sigma2, st.tau2 = clip_var(st.sigma2), clip_var(st.tau2)
        lam = st.sigma2 / st.tau2
        prev = np.inf
        for _inner in range(opt.inner_maxit):
            st.total_iter += 1
            # 1. U step (no centring)
            CA = C @ A
            L = cholesky_spd(X.T @ X + max(lam, LAMBDA_FLOOR) * eye)
            U = ridge_solve(L, X.T @ (Y - X @ CA))
            # 2. X step
            B = CA + U
            pnum, pden = x_penalty_terms(X, opt.X_L2_ortho, opt.X_L2_smooth)
            if opt.C_signed:
                G = B @ B.T
                if opt.x_postvar:
                    G = G + N * clip_var(st.sigma2) * ridge_solve(L, eye)
                YBt = Y @ B.T
                num = np.maximum(YBt, 0) + X @ np.maximum(-G, 0) + pnum
                den = np.maximum(-YBt, 0) + X @ np.maximum(G, 0) + pden
                X = X * np.sqrt(safe_div(num, den))
            else:
                Bp = np.maximum(B, 0.0)
                X = X * safe_div(Ypos @ Bp.T + pnum, X @ (Bp @ Bp.T) + pden)
            X = np.maximum(X, EPS)
            X, dsc = normalize_columns(X)
            C = C * dsc[:, None]
            U = U * dsc[:, None]
            X = np.maximum(X, EPS)
            if not opt.C_signed:
                C = np.maximum(C, EPS)
            # 3. Θ step
            if opt.C_signed:
                C = _c_step_signed(X, Y, U, A, AAt, opt.C_L2)
            else:
                num = X.T @ np.maximum(Ypos - X @ U, 0.0) @ A.T
                C = np.maximum(C * safe_div(num, (X.T @ X) @ C @ AAt + opt.C_L2 * C), EPS)
            # 4. objective at fixed λ
            R = Y - X @ (C @ A + U)
            rss = float(np.sum(R * R))
            obj = rss + lam * float(np.sum(U * U)) + x_penalty(X, opt.X_L2_ortho, opt.X_L2_smooth) \
                + opt.C_L2 * float(np.sum(C * C))
            if st.total_iter <= opt.maxit:
                st.objfunc_iter.append(obj)
                st.rss_trace.append(rss)
                st.nll_trace.append(marginal_nll(Y, X, C, A, st.sigma2, st.tau2))
            if not np.isfinite(obj):
                st.stop_reason, st.converged, stop_all = "nonfinite_obj", False, True
                break
            st.rel = abs(prev - obj) / (abs(prev) + 1e-10) if np.isfinite(prev) else np.inf
            if st.rel < opt.epsilon or st.total_iter >= opt.maxit:
                break
            prev = obj
        st.X, st.C, st.U = X, C, U
        if stop_all:
            break
        # EM M-steps with the current X (both use the old σ²)
        R = Y - X @ (C @ A + U)
        Minv = ridge_solve(cholesky_spd(X.T @ X + max(lam, LAMBDA_FLOOR) * eye), eye)
        trH = Q - lam * float(np.trace(Minv))
        s_old = st.sigma2
        s_new = clip_var(float(np.mean(R * R)) + s_old * N * trH / (P * N))
        t_new = clip_var(float(np.sum(U * U)) / (N * Q) + s_old * float(np.trace(Minv)) / Q)
        if opt.sigma2_update:
            st.sigma2 = s_new
        if opt.tau2_update:
            st.tau2 = t_new
        lam_new = st.sigma2 / st.tau2
        if opt.print_trace:
            logger.info("nmfre ecm outer %d: iter=%d sigma2=%.6g tau2=%.6g lambda=%.6g",
                        outer, st.total_iter, st.sigma2, st.tau2, lam_new)
        if not (opt.sigma2_update or opt.tau2_update):
            st.converged, st.stop_reason = True, "fixed_lambda"
            break
        if abs(lam_new - lam) / (abs(lam) + 1e-10) < opt.epsilon_outer:
            st.converged, st.stop_reason = True, "outer_lambda"
            break
        if st.total_iter >= opt.maxit:
            st.stop_reason = "maxit"
            break
    if st.stop_reason == "maxit" and not st.converged and st.outer >= opt.outer_maxit and st.total_iter < opt.maxit:
        st.stop_reason = "outer_maxit"
    return st
