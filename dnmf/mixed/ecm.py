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

The loop is written once on sufficient statistics (as Engine A in :mod:`.fit`): a *data
backend* runs the per-block passes over Y and returns block sums; X, Θ, σ², τ², the objective
and the marginal NLL are computed on the client from Q × Q, P × Q and Q × K matrices and the
constants ``‖Y‖²``, ``YAᵀ``, ``AAᵀ``. Per inner iteration:

pass 1 (:func:`u_chunk`, every iteration)
    ``U_j = M⁻¹(XᵀY_j − XᵀXΘA_j)``; returns ``Y_jB_jᵀ`` and ``B_jB_jᵀ`` (``B = ΘA + U``; their
    positive-part versions for the non-negative engine), ``Y_jU_jᵀ``, ``U_jU_jᵀ``, ``A_jU_jᵀ``
    and ``(XᵀY_j)(XᵀY_j)ᵀ`` — with the X of the previous iteration, whose marginal NLL needs it
    (so each NLL is completed one pass later; the last one by a final :func:`gram_chunk` pass).
pass 2 (:func:`c_chunk`, non-negative Θ only)
    ``U_j ← DU_j`` (the normalisation of X); returns ``Xᵀmax(Y_j − XU_j, 0)A_jᵀ``.

The signed Θ step ``rhs = XᵀYAᵀ − XᵀX·DUAᵀ``, the residual ``‖Y − X(ΘA + DU)‖²`` (Gram
identity), ``‖DU‖²`` and the NLL need no further pass. :class:`DenseECMData` is the in-memory
backend (one block, the same chunk functions); :mod:`dnmf.mixed.ecm_blocked` runs them on a
column-blocked Y through the executor, so a one-block blocked fit is bitwise the in-memory fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .._validation import param_error
from ._core import check_matrix_init
from ..covariates._common import (EPS, LAMBDA_FLOOR, cholesky_spd, clip_var, normalize_columns, ridge_solve,
                                  safe_div)

logger = logging.getLogger(__name__)

__all__ = ["ECMOptions", "ECMState", "DenseECMData", "fit_ecm", "run_ecm", "resolve_c_signed", "ecm_initialize",
           "nmfkc_c_stats", "check_x_init", "marginal_nll",
           "marginal_nll_stats", "x_penalty", "constants_chunk", "u_chunk", "c_chunk", "gram_chunk"]


#: The string forms of ``C_signed`` upstream accepts (spec §5.1), and the bool each means.
C_SIGNED_NAMES = {"signed": True, "nonneg": False}


def resolve_c_signed(value, func: str = "nmfre") -> bool:
    """``C_signed`` as a bool: True/False, or upstream's ``"signed"``/``"nonneg"`` (spec §5.1)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value in C_SIGNED_NAMES:
        return C_SIGNED_NAMES[value]
    raise param_error("C_signed", func, "a bool or one of 'signed', 'nonneg'", value)


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


def _c_step_signed_rhs(XtX: np.ndarray, rhs: np.ndarray, AAt: np.ndarray, c_l2: float) -> np.ndarray:
    """Signed Θ step from ``rhs = Xᵀ(Y − XU)Aᵀ``: exact LS, or the Sylvester ridge (spec §5.3)."""
    Q, K = XtX.shape[0], AAt.shape[0]
    if c_l2 <= 0:
        left = np.linalg.solve(XtX + 1e-10 * np.eye(Q), rhs)
        return np.linalg.solve((AAt + 1e-10 * np.eye(K)).T, left.T).T
    ex, Vx = np.linalg.eigh(XtX)
    ea, Va = np.linalg.eigh(AAt)
    Z = (Vx.T @ rhs @ Va) / (np.outer(ex, ea) + c_l2)
    return Vx @ Z @ Va.T


def _c_step_signed(X: np.ndarray, Y: np.ndarray, U: np.ndarray, A: np.ndarray, AAt: np.ndarray,
                   c_l2: float) -> np.ndarray:
    """Signed Θ step on the data (reference form of :func:`_c_step_signed_rhs`)."""
    return _c_step_signed_rhs(X.T @ X, X.T @ (Y - X @ U) @ A.T, AAt, c_l2)


def marginal_nll_stats(ysq: float, YAt: np.ndarray, AAt: np.ndarray, XtYYtX: np.ndarray, X: np.ndarray,
                       C: np.ndarray, n: int, sigma2: float, tau2: float) -> float:
    """:func:`marginal_nll` from ``‖Y‖²``, ``YAᵀ``, ``AAᵀ`` and ``XᵀYYᵀX`` (Q × Q, for this X).

    With ``R = Y − XΘA``: ``‖R‖² = ‖Y‖² − 2⟨X, YAᵀΘᵀ⟩ + ⟨XᵀX, ΘAAᵀΘᵀ⟩`` and
    ``XᵀRRᵀX = XᵀYYᵀX − T − Tᵀ + XᵀXΘAAᵀΘᵀXᵀX`` with ``T = XᵀYAᵀΘᵀXᵀX``.
    """
    P, Q = X.shape
    lam = sigma2 / tau2
    XtX = X.T @ X
    CAAtCt = C @ AAt @ C.T
    T = (X.T @ YAt) @ C.T @ XtX
    G = XtYYtX - T - T.T + XtX @ CAAtCt @ XtX
    rss0 = ysq - 2.0 * float(np.sum(X * (YAt @ C.T))) + float(np.sum(XtX * CAAtCt))
    logdet = np.linalg.slogdet(np.eye(Q) + (tau2 / sigma2) * XtX)[1]
    quad = rss0 - float(np.trace(np.linalg.solve(XtX + lam * np.eye(Q), G)))
    return 0.5 * (n * (P * np.log(2 * np.pi) + P * np.log(sigma2) + logdet) + quad / sigma2)


# ---------------------------------------------------------------------------------------------
# The start (spec §5.1-5.2)
# ---------------------------------------------------------------------------------------------


def nmfkc_c_stats(X: np.ndarray, C: np.ndarray, YAt: np.ndarray, AAt: np.ndarray, ysq: float, epsilon: float,
                  maxit: int = 5000) -> tuple[np.ndarray, int]:
    """nmfkc's EU iterations with X held fixed (``X.restriction="fixed"``), on sufficient statistics.

    ``Θ ← Θ∘[XᵀYAᵀ]/[XᵀXΘAAᵀ + eps]`` (with X fixed the stale ``XB`` of nmfkc is the current
    one); objective ``‖Y − XΘ_oldA‖²`` by the Gram identity; stop from iteration 10 when
    ``|Δobj|/max(|obj|, 1) ≤ ε`` (spec §2). Returns Θ and the iteration count.
    """
    XtYAt = X.T @ YAt
    XtX = X.T @ X
    obj_prev = None
    it = 0
    for it in range(1, maxit + 1):
        Co = C
        CAAt = Co @ AAt
        C = Co * XtYAt / (XtX @ CAAt + EPS)
        obj = ysq - 2.0 * float(np.sum(XtYAt * Co)) + float(np.sum(XtX * (CAAt @ Co.T)))
        if it >= 10 and obj_prev is not None and abs(obj - obj_prev) / max(abs(obj), 1.0) <= epsilon:
            break
        obj_prev = obj
    return C, it


def check_x_init(X_init, shape: tuple, func: str):
    """``X_init`` as (matrix or None, method name or None): a non-negative (P, Q) array or a name
    of :data:`dnmf.covariates.nmfkc.X_INIT_METHODS` (spec §5.1)."""
    from ..covariates.nmfkc import X_INIT_METHODS

    if X_init is None:
        return None, None
    if isinstance(X_init, str):
        if X_init not in X_INIT_METHODS:
            raise param_error("X_init", func, "an array of shape (P, Q) or one of "
                              + ", ".join(repr(m) for m in X_INIT_METHODS), X_init)
        return None, X_init
    X0 = check_matrix_init(X_init, "X_init", shape, func)
    if np.any(X0 < 0):
        raise param_error("X_init", func, f"a finite non-negative array of shape {shape}",
                          f"an array with minimum {float(X0.min())!r}", described=True)
    return X0, None


def ecm_initialize(Y: np.ndarray, A: np.ndarray, rank: int, *, X_init=None, C_init=None, epsilon: float = 1e-5,
                   seed: int = 1, nstart: int = 1, r_rng: bool = False, func: str = "nmfre"):
    """Engine B's start (X, Θ) (spec §5.1-5.2).

    * ``X_init`` and ``C_init`` both matrices: used as given (nmfkc is skipped);
    * ``X_init`` a matrix, no ``C_init``: ``nmfkc(Y, A, rank, X.init=X_init, X.restriction="fixed")``
      — X stays the given matrix, Θ comes from nmfkc's iterations with X fixed;
    * ``X_init`` a method name (``"kmeans"``, ``"kmeansar"``, ``"kmeans++"``, ``"kmeanspp"``,
      ``"runif"``, ``"nndsvd"``) or None (``"kmeans"``): forwarded to nmfkc with ``nstart``.

    ``C_init`` without a matrix ``X_init`` is not used (nmfkc starts Θ at ones, as upstream's
    nmfre, which forwards only ``X.init`` and ``nstart`` to nmfkc).
    """
    import warnings

    from ..covariates import nmfkc

    P, N = Y.shape
    K = A.shape[0]
    X0, method = check_x_init(X_init, (P, rank), func)
    C0 = check_matrix_init(C_init, "C_init", (rank, K), func)
    if X0 is not None and C0 is not None:
        return X0, C0
    kw = dict(rank=rank, epsilon=epsilon, seed=seed, nstart=nstart, r_rng=r_rng)
    if X0 is not None:
        kw.update(X_init=X0, X_restriction="fixed")
    elif method is not None:
        kw["X_init"] = method
    with warnings.catch_warnings():
        # nmfre warns about its rank itself, in its own name
        warnings.filterwarnings("ignore", message=r"nmfkc: rank = ", category=UserWarning)
        kc = nmfkc(Y, A, **kw)
    return np.array(kc.X, dtype=float), np.array(kc.C, dtype=float)


# ---------------------------------------------------------------------------------------------
# Per-block chunk functions (NumPy on one column block: Y_j (P × n_j), A_j (K × n_j))
# ---------------------------------------------------------------------------------------------


def constants_chunk(Y: np.ndarray, A: np.ndarray) -> tuple:
    """``(‖Y_j‖², Y_jA_jᵀ, A_jA_jᵀ)``: the constants of the ECM loop."""
    return float(np.sum(Y * Y)), Y @ A.T, A @ A.T


def u_chunk(Y: np.ndarray, A: np.ndarray, X: np.ndarray, C: np.ndarray, L: np.ndarray, signed: bool):
    """U step on one block; returns ``(U_j, (YBᵀ, BBᵀ, YUᵀ, UUᵀ, AUᵀ, XᵀYYᵀX))``.

    ``Xᵀ(Y_j − XΘA_j)`` is formed as ``XᵀY_j − (XᵀX)ΘA_j`` (no P × n_j temporary). For the
    non-negative engine the first two are ``max(Y,0)B⁺ᵀ`` and ``B⁺B⁺ᵀ`` with ``B⁺ = max(B, 0)``.
    """
    CA = C @ A
    XtY = X.T @ Y
    U = ridge_solve(L, XtY - (X.T @ X) @ CA)
    B = CA + U
    if signed:
        YBt, BBt = Y @ B.T, B @ B.T
    else:
        Bp = np.maximum(B, 0.0)
        YBt, BBt = np.maximum(Y, 0.0) @ Bp.T, Bp @ Bp.T
    return U, (YBt, BBt, Y @ U.T, U @ U.T, A @ U.T, XtY @ XtY.T)


def gram_chunk(Y: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``(XᵀY_j)(XᵀY_j)ᵀ`` (Q × Q): the last marginal NLL's statistic."""
    XtY = X.T @ Y
    return XtY @ XtY.T


def c_chunk(Y: np.ndarray, A: np.ndarray, U: np.ndarray, X: np.ndarray, d: np.ndarray):
    """``U_j ← DU_j``; returns ``(DU_j, Xᵀmax(max(Y_j,0) − XDU_j, 0)A_jᵀ)`` (non-negative Θ step)."""
    U = U * d[:, None]
    return U, X.T @ np.maximum(np.maximum(Y, 0.0) - X @ U, 0.0) @ A.T


def scale_chunk(U: np.ndarray, d: np.ndarray) -> np.ndarray:
    return U * d[:, None]


class DenseECMData:
    """In-memory data backend of :func:`run_ecm`: Y and A as one column block.

    Runs the same chunk functions as the blocked backend, so a one-block blocked fit equals
    this one bit for bit.
    """

    def __init__(self, Y: np.ndarray, A: np.ndarray):
        self.Y = np.ascontiguousarray(Y, dtype=np.float64)
        self.A = np.ascontiguousarray(A, dtype=np.float64)
        self.n_features, self.n_samples = self.Y.shape
        self.ysq, self.YAt, self.AAt = constants_chunk(self.Y, self.A)
        self.U = None
        self._d = None

    def u_pass(self, X, C, L, signed: bool) -> tuple:
        self.U, stats = u_chunk(self.Y, self.A, X, C, L, signed)
        self._d = None
        return stats

    def scale_u(self, d: np.ndarray) -> None:
        """U ← DU, deferred until the U blocks are needed (the next U step replaces them)."""
        self._d = d if self._d is None else self._d * d

    def c_pass(self, X, d) -> np.ndarray:
        self.U, num = c_chunk(self.Y, self.A, self.U, X, d)
        return num

    def gram_pass(self, X) -> np.ndarray:
        return gram_chunk(self.Y, X)

    def final_u(self) -> np.ndarray:
        if self._d is not None:
            self.U, self._d = scale_chunk(self.U, self._d), None
        return self.U


# ---------------------------------------------------------------------------------------------
# The loop on sufficient statistics
# ---------------------------------------------------------------------------------------------


def _fit_terms(ysq, YAt, AAt, XtX, X, C, YUt, UUt, AUt, d):
    """``(‖Y − X(ΘA + DU)‖², ‖DU‖²)`` by the Gram identity from the pass-1 sums of U."""
    YUt_d = YUt * d[None, :]
    AUt_d = AUt * d[None, :]
    UUt_d = UUt * np.outer(d, d)
    CAUt = C @ AUt_d
    YBt = YAt @ C.T + YUt_d
    BBt = C @ AAt @ C.T + CAUt + CAUt.T + UUt_d
    rss = ysq - 2.0 * float(np.sum(X * YBt)) + float(np.sum(XtX * BBt))
    return max(rss, 0.0) if np.isfinite(rss) else rss, float(np.trace(UUt_d))


def run_ecm(data, X: np.ndarray, C: np.ndarray, sigma2: float, tau2: float, opt: ECMOptions,
            callback=None) -> ECMState:
    """The ECM loops of spec §5.2–5.3 on a data backend (:class:`DenseECMData` or the blocked one).

    ``callback()``, when given, is called at the start of each inner iteration (timing).
    Returns the state with X and Θ; U stays in the backend (before basis reordering).
    """
    P, N = data.n_features, data.n_samples
    ysq, YAt, AAt = data.ysq, data.YAt, data.AAt
    Q = opt.rank
    eye = np.eye(Q)
    signed = opt.C_signed
    C0 = C.copy() if signed else np.maximum(C, EPS)
    X, dsc = normalize_columns(np.maximum(X, EPS))
    C = C0 * dsc[:, None]
    st = ECMState(X=X, C=C, U=None, sigma2=sigma2, tau2=tau2)
    stop_all = False
    nll_pending = None  # (X, Θ, N, σ², τ²) of the last recorded iteration: its NLL needs XᵀYYᵀX
    rss = usq = np.nan
    for outer in range(1, opt.outer_maxit + 1):
        st.outer = outer
        st.sigma2, st.tau2 = clip_var(st.sigma2), clip_var(st.tau2)
        lam = st.sigma2 / st.tau2
        prev = np.inf
        for _inner in range(opt.inner_maxit):
            st.total_iter += 1
            if callback is not None:
                callback()
            # 1. U step (no centring), on the blocks: returns the sums the X and Θ steps need
            L = cholesky_spd(X.T @ X + max(lam, LAMBDA_FLOOR) * eye)
            YBt, BBt, YUt, UUt, AUt, XtYYtX = data.u_pass(X, C, L, signed)
            if nll_pending is not None:  # X has not changed since: complete the last NLL
                st.nll_trace.append(marginal_nll_stats(ysq, YAt, AAt, XtYYtX, *nll_pending))
                nll_pending = None
            # 2. X step
            pnum, pden = x_penalty_terms(X, opt.X_L2_ortho, opt.X_L2_smooth)
            if signed:
                G = BBt
                if opt.x_postvar:
                    G = G + N * clip_var(st.sigma2) * ridge_solve(L, eye)
                num = np.maximum(YBt, 0) + X @ np.maximum(-G, 0) + pnum
                den = np.maximum(-YBt, 0) + X @ np.maximum(G, 0) + pden
                X = X * np.sqrt(safe_div(num, den))
            else:
                X = X * safe_div(YBt + pnum, X @ BBt + pden)
            X = np.maximum(X, EPS)
            X, dsc = normalize_columns(X)
            C = C * dsc[:, None]
            X = np.maximum(X, EPS)
            XtX = X.T @ X
            # 3. Θ step (U ← DU on the blocks)
            if signed:
                data.scale_u(dsc)
                rhs = X.T @ YAt - XtX @ (AUt * dsc[None, :]).T
                C = _c_step_signed_rhs(XtX, rhs, AAt, opt.C_L2)
            else:
                C = np.maximum(C, EPS)
                num = data.c_pass(X, dsc)
                C = np.maximum(C * safe_div(num, XtX @ C @ AAt + opt.C_L2 * C), EPS)
            # 4. objective at fixed λ
            rss, usq = _fit_terms(ysq, YAt, AAt, XtX, X, C, YUt, UUt, AUt, dsc)
            obj = rss + lam * usq + x_penalty(X, opt.X_L2_ortho, opt.X_L2_smooth) + opt.C_L2 * float(np.sum(C * C))
            if st.total_iter <= opt.maxit:
                st.objfunc_iter.append(obj)
                st.rss_trace.append(rss)
                nll_pending = (X, C, N, st.sigma2, st.tau2)
            if not np.isfinite(obj):
                st.stop_reason, st.converged, stop_all = "nonfinite_obj", False, True
                break
            st.rel = abs(prev - obj) / (abs(prev) + 1e-10) if np.isfinite(prev) else np.inf
            if st.rel < opt.epsilon or st.total_iter >= opt.maxit:
                break
            prev = obj
        st.X, st.C = X, C
        if stop_all:
            break
        # EM M-steps with the current X (both use the old σ²); ‖R‖², ‖U‖² of the last iteration
        Minv = ridge_solve(cholesky_spd(X.T @ X + max(lam, LAMBDA_FLOOR) * eye), eye)
        trH = Q - lam * float(np.trace(Minv))
        s_old = st.sigma2
        s_new = clip_var(rss / (P * N) + s_old * N * trH / (P * N))
        t_new = clip_var(usq / (N * Q) + s_old * float(np.trace(Minv)) / Q)
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
    if nll_pending is not None:
        st.nll_trace.append(marginal_nll_stats(ysq, YAt, AAt, data.gram_pass(nll_pending[0]), *nll_pending))
    if st.stop_reason == "maxit" and not st.converged and st.outer >= opt.outer_maxit and st.total_iter < opt.maxit:
        st.stop_reason = "outer_maxit"
    return st


def fit_ecm(Y: np.ndarray, A: np.ndarray, X: np.ndarray, C: np.ndarray, U: np.ndarray, sigma2: float,
            tau2: float, opt: ECMOptions) -> ECMState:
    """Run the ECM loops of spec §5.2–5.3 in memory from the nmfkc start (X, C).

    Parameters
    ----------
    Y : ndarray of shape (P, N)
    A : ndarray of shape (K, N)
    X : ndarray of shape (P, Q)
    C : ndarray of shape (Q, K)
    U : ndarray of shape (Q, N)
        Accepted for symmetry with engine "cap"; the first U step replaces it (as upstream).
    sigma2, tau2 : float
        Starting variances.
    opt : ECMOptions

    Returns
    -------
    ECMState
        Final X, C, U (before basis reordering), variances and traces.
    """
    data = DenseECMData(Y, A)
    st = run_ecm(data, X, C, sigma2, tau2, opt)
    st.U = data.final_u() if data.U is not None else np.asarray(U, dtype=float)
    return st
