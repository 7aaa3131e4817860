"""NMF with random effects, ``Y = X(ΘA + U) + E`` (spec/nmfre.md §3, §5).

Two engines share the initialiser (nmfkc's EU fit, :func:`initialize`), the inference, the
summary formats and the result type:

* ``engine="cap"`` (default): the df-cap design of the 2026-03 vignette and the paper abstract
  (nmfkc commit ``56d65eb``): the random-effect degrees of freedom are held at or below
  ``df_rate·N·Q`` by raising λ = σ²/τ², Θ and X by multiplicative updates.
* ``engine="ecm"``: the current upstream design (HEAD ``4e9ed50``): σ² and τ² estimated by EM
  M-steps in an outer loop, sign-free Θ and a semi-NMF X step (:mod:`dnmf.mixed.ecm`).

Engine A is written once on sufficient statistics: the loop below asks a *data backend* for the
block sums it needs (``YB⁺ᵀ``, ``B⁺B⁺ᵀ``, ``Xᵀmax(Y − XU, 0)Aᵀ``, ``‖R‖²``), so the in-memory fit
(:class:`DenseData`) and the column-blocked fit on a Dask cluster
(:class:`dnmf.mixed.blocks.BlockedData`) run the same arithmetic on the client.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np
import scipy.linalg
import scipy.optimize

from .._validation import check_float, check_int, check_option, param_error
from ..covariates._common import axis_names as _names
from ..covariates._common import check_rank_vs_shape
from ..exceptions import ConvergenceWarning, DnmfError, InputError

logger = logging.getLogger(__name__)

__all__ = [
    "nmfre",
    "NMFREResult",
    "DenseData",
    "CapOptions",
    "fit_cap",
    "df_u",
    "lambda_for_cap",
    "ENGINES",
]

#: Engines of :func:`nmfre` (spec §0).
ENGINES = ("cap", "ecm")

EPS = 1e-10  # multiplicative-update guard (spec §1)
CLIP_LO, CLIP_HI = 1e-12, 1e12  # bounds of σ², τ² (spec §1)
LAMBDA_FLOOR = 1e-12
DEFAULT_RATES = tuple(np.round(np.arange(1, 11) / 10, 10))  # 0.1, …, 1.0 (spec §4.1)


# ---------------------------------------------------------------------------------------------
# §1 scalar helpers
# ---------------------------------------------------------------------------------------------


def clip_var(v: float) -> float:
    """``min(max(v, 1e-12), 1e12)``, applied to σ² and τ² (spec §1)."""
    return float(min(max(v, CLIP_LO), CLIP_HI))


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / max(den, 1e-10)`` elementwise with NaN/±Inf set to 0 (R ``.nmfre.safe.div``)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = num / np.maximum(den, 1e-10)
    out[~np.isfinite(out)] = 0.0
    return out


def normalize_columns(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column sums ``d`` (floored at 1e-12) and ``X D⁻¹`` (spec §1 normalisation).

    The caller applies ``C ← D C`` and ``U ← D U`` so that ``X(CA + U)`` is unchanged.
    """
    d = np.maximum(X.sum(axis=0), 1e-12)
    return X / d, d


def basis_order(X: np.ndarray) -> np.ndarray:
    """Stable ascending order of the basis scores ``Σ_p (p/P)·X_pq`` (spec §1 reordering)."""
    P = X.shape[0]
    score = (np.arange(1, P + 1) / P) @ X
    return np.argsort(score, kind="stable")


def df_u(d: np.ndarray, n: int, lam: float) -> float:
    """Random-effect degrees of freedom ``N·Σ_q d_q/(d_q + λ)`` (spec §1).

    Parameters
    ----------
    d : ndarray of shape (Q,)
        Eigenvalues of XᵀX, clipped at 0.
    n : int
        N, the number of columns of Y.
    lam : float
        Ridge penalty λ = σ²/τ².
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        r = d / (d + lam)
    r = np.where(np.isfinite(r), r, 0.0)
    return float(n * r.sum())


def gram_eigenvalues(XtX: np.ndarray) -> np.ndarray:
    """Eigenvalues of the symmetric Q × Q Gram, clipped at 0."""
    return np.maximum(np.linalg.eigvalsh(XtX), 0.0)


def lambda_for_cap(d: np.ndarray, n: int, target: float, lam_min: float, lam_max: float = 1e12) -> float:
    """Smallest λ ≥ ``lam_min`` with ``df_u(λ) ≤ target`` (R ``.nmfre.lambda.for.dfU.cap``).

    Returns ``lam_min`` when it already satisfies the cap; otherwise grows an upper bracket from
    ``lam_min`` (×10 per step, from 1e-6 when it is 0) and solves ``df_u(λ) = target`` with
    Brent's method. R's ``uniroot`` stops at tolerance 1e-8; here the root is solved to machine
    precision (so the result differs from R's by less than that tolerance and does not depend
    on the bracket). With one basis the root has the closed form ``λ* = d(N − target)/target``,
    used exactly. ``lam_max`` (1e12) is returned when no bracket exists.
    """
    lam_min = max(float(lam_min), 0.0)
    if df_u(d, n, lam_min) <= target:
        return lam_min
    if d.shape[0] == 1 and target > 0:
        return float(min(max(d[0] * (n - target) / target, lam_min), lam_max))
    hi = lam_min
    while df_u(d, n, hi) > target:
        hi = max(1e-12, 1e-6 if hi == 0 else 10.0 * hi)
        if hi > lam_max:
            return lam_max
    return float(scipy.optimize.brentq(lambda x: df_u(d, n, x) - target, lam_min, hi, xtol=1e-300, rtol=1e-15,
                                       maxiter=500))


def cholesky_spd(M: np.ndarray, what: str = "X'X + lambda*I") -> np.ndarray:
    """Lower Cholesky factor of the ridge matrix M; a clear error when M is not SPD."""
    try:
        return np.linalg.cholesky(M)
    except np.linalg.LinAlgError as e:
        raise DnmfError(f"nmfre: {what} is not symmetric positive definite (Cholesky failed).") from e


def ridge_solve(L: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``M⁻¹ rhs`` from the lower Cholesky factor ``L`` of M."""
    return scipy.linalg.cho_solve((L, True), rhs, check_finite=False)


def colnorm(B: np.ndarray) -> np.ndarray:
    """Each column divided by ``max(colSum, 1e-12)`` (spec §3.5 ``B.prob``)."""
    return B / np.maximum(B.sum(axis=0), 1e-12)


@contextlib.contextmanager
def executor_for(client):
    """The executor of ``client`` (see :func:`dnmf.engine.executor.get_executor`), closed after use."""
    from ..engine.executor import get_executor

    ex = get_executor(client)
    try:
        yield ex
    finally:
        close = getattr(ex, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """Validated data of one fit: Y (P × N), A (K × N) and their labels."""

    Y: np.ndarray
    A: np.ndarray
    feature_names: Optional[tuple]
    sample_names: Optional[tuple]
    covariate_names: Optional[tuple]
    A_given: bool


def _to_matrix(value, name: str, func: str) -> np.ndarray:
    try:
        arr = np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else
                         (value.toarray() if hasattr(value, "toarray") else value), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise param_error(name, func, "a numeric 2-D array", type(value).__name__) from e
    return arr


def validate_inputs(Y, A, func: str) -> Inputs:
    """Check and convert Y (non-negative, finite, P × N) and A (finite, K × N; default 1 × N ones).

    pandas DataFrames keep their labels: Y's index and columns name features and samples, A's
    index names the covariates (R's ``rownames(A)``).
    """
    if Y is None:
        raise param_error("Y", func, "a non-negative 2-D array of shape (P, N)", None)
    Yv = _to_matrix(Y, "Y", func)
    if Yv.ndim != 2 or Yv.shape[0] < 1 or Yv.shape[1] < 1:
        raise param_error("Y", func, "a non-negative 2-D array of shape (P, N)", f"shape {Yv.shape}")
    if not np.all(np.isfinite(Yv)):
        raise param_error("Y", func, "finite (no NaN or Inf)", f"{int(np.sum(~np.isfinite(Yv)))} non-finite values")
    if Yv.min() < 0:
        raise param_error("Y", func, "non-negative", f"minimum {Yv.min():g}")
    P, N = Yv.shape
    if not Yv.max() > 0:
        # every multiplicative update is 0/0: the fit would return NaN factors
        raise param_error("Y", func, "an array with at least one positive entry", f"an all-zero {P} × {N} array",
                          described=True)
    if A is None:
        Av = np.ones((1, N))
        cov = None
    else:
        Av = _to_matrix(A, "A", func)
        if Av.ndim == 1:
            Av = Av[None, :]
        if Av.ndim != 2:
            raise param_error("A", func, f"a 2-D array of shape (K, {N})", f"shape {Av.shape}")
        if Av.shape[1] != N:
            raise param_error("A", func, f"an array with {N} columns (one per column of Y)",
                              f"{Av.shape[1]} columns")
        if not np.all(np.isfinite(Av)):
            raise param_error("A", func, "finite (no NaN or Inf)", f"{int(np.sum(~np.isfinite(Av)))} non-finite values")
        cov = _names(A, 0)
    return Inputs(Yv, np.ascontiguousarray(Av), _names(Y, 0), _names(Y, 1), cov, A is not None)


def check_matrix_init(value, name: str, shape: tuple, func: str) -> Optional[np.ndarray]:
    """A user-supplied starting matrix of the given shape, or None."""
    if value is None:
        return None
    arr = _to_matrix(value, name, func)
    if arr.shape != shape or not np.all(np.isfinite(arr)):
        raise param_error(name, func, f"a finite array of shape {shape}", f"shape {arr.shape}")
    return arr.copy()


def check_seed_int(seed, name: str, func: str) -> int:
    """R-style integer seed (None means the function's default, as R's ``...`` quirk, §12.15)."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise param_error(name, func, "a non-negative int", seed)
    return int(seed)


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NMFREResult:
    """A fitted NMF-RE model ``Y ≈ X(ΘA + U)`` (spec §3.5, §5.4), with optional inference on Θ.

    Shapes: Y is P × N, X is P × Q, Θ = ``C`` is Q × K, A is K × N, U is Q × N.

    Attributes
    ----------
    X : ndarray of shape (P, Q)
        Non-negative basis; columns sum to 1.
    C : ndarray of shape (Q, K)
        Θ, the covariate effects (non-negative for ``engine="cap"`` and ``C_signed=False``).
    U : ndarray of shape (Q, N)
        Random effects (BLUP). Engine "cap" row-centres them (U·1 = 0).
    sigma2, tau2 : float
        Residual and random-effect variances (see the Notes of :func:`nmfre` for what the
        "cap" engine does with them).
    lambda_ : float
        σ²/τ² (R ``lambda``; ``lambda`` is a Python keyword).
    engine : str
        ``"cap"`` or ``"ecm"``.
    converged : bool
    stop_reason : str
        ``"epsilon"``, ``"maxit"``, ``"nonfinite_obj"`` (cap); ``"outer_lambda"``,
        ``"fixed_lambda"``, ``"maxit"``, ``"outer_maxit"``, ``"nonfinite_obj"`` (ecm).
    n_iter : int
        Iterations run (R ``iter``; inner iterations in total for "ecm").
    maxit : int
    epsilon : float
    objfunc : float
        Last objective ``‖Y − X(CA+U)‖² + λ‖U‖²``.
    rel_change_final : float
        Last relative objective change.
    objfunc_iter : ndarray of shape (n_iter,)
        Objective per iteration.
    rss_trace : ndarray of shape (n_iter,)
        ``‖Y − X(CA+U)‖²`` per iteration.
    dfU : float
        Random-effect degrees of freedom ``N·tr[XᵀX(XᵀX + λI)⁻¹]`` on the final X.
    dfU_cap : float
        ``max(rate·N·Q, 1)`` (NaN for "ecm").
    dfU_cap_rate : float or None
        The df rate used (``None`` for "ecm").
    dfU_cap_scan : DfUScanResult or None
        The automatic scan when ``df_rate=None``.
    lambda_enforced : float
        Final λ.
    dfU_hit_cap : bool
        True when the cap bound in at least one iteration.
    dfU_hit_iter : tuple of int
        Iterations where the cap bound.
    dfU_frac, dfU_cap_frac : float
        ``dfU/(NQ)`` and ``dfU_cap/(NQ)``.
    B : ndarray of shape (Q, N)
        Fixed scores ``CA``.
    B_prob : ndarray of shape (Q, N)
        ``max(B, 0)`` with columns scaled to sum 1.
    B_blup, B_blup_pos, B_blup_prob : ndarray of shape (Q, N)
        ``CA + U``, its positive part, and that with columns scaled to sum 1.
    XB, XB_blup : ndarray of shape (P, N)
        Fixed-effect fit ``XCA`` and BLUP fit ``X(CA+U)``.
    X_prob : ndarray of shape (P, Q)
        Rows of X scaled to sum 1; ``X_cluster`` (P,) their argmax (0-based).
    r_squared, r_squared_fixed : float
        R² of the BLUP and fixed fits: ``1 − SSE/Σ(Y − mean(Y))²`` for "cap" (the reference
        commit's definition, printed by the vignette); ``cor(Y, fit)²`` for "ecm".
    r_squared_cor2, r_squared_fixed_cor2, r_squared_uncentered, r_squared_fixed_uncentered,
    r_squared_centered, r_squared_fixed_centered : float
        The other definitions: squared correlation, ``1 − SSE/ΣY²`` and
        ``1 − SSE/Σ(Y − rowmean)²``.
    ICC : float
        ``τ²·tr(XᵀX) / (τ²·tr(XᵀX) + σ²·P)``.
    C_signed : bool
        Θ sign-free ("ecm" default) or non-negative.
    outer_iter, outer_maxit : int or None
        Outer (EM) iterations of "ecm".
    nll_trace : ndarray or None
        Marginal negative log-likelihood per inner iteration ("ecm").
    sigma2_used : float or None
        Inference: residual-df-corrected variance ``RSS/max(PN − dfU − QK, 1)``.
    C_vec_cov : ndarray of shape (QK, QK) or None
        Sandwich covariance of vec(Θ) (column-major).
    C_se, C_se_boot, C_ci_lower, C_ci_upper : ndarray of shape (Q, K) or None
        Sandwich SE, wild-bootstrap SD and percentile interval of Θ.
    C_p_side : str or None
        ``"one.sided"`` or ``"two.sided"``.
    wild_B, wild_level : int, float or None
        Bootstrap replicates and interval level.
    coefficients : pandas.DataFrame or None
        One row per (basis, covariate) in vec(Θ) order: ``Basis, Covariate, Estimate, SE,
        BSE, z_value, Wald, p_value, p_two_sided, p_one_sided, p_side_used, CI_low, CI_high``.
    basis_names : tuple of str
        ``prefix1..prefixQ``.
    covariate_names, feature_names, sample_names : tuple of str or None
        Row names of A, row and column names of Y.
    dims : str
        ``"Y(P,N)~X(P,Q)C(Q,K)A(K,N)"``.
    call : str
    runtime : float
        Seconds.
    """

    X: np.ndarray
    C: np.ndarray
    U: np.ndarray
    sigma2: float
    tau2: float
    lambda_: float
    engine: str
    converged: bool
    stop_reason: str
    n_iter: int
    maxit: int
    epsilon: float
    objfunc: float
    rel_change_final: float
    objfunc_iter: np.ndarray
    rss_trace: np.ndarray
    dfU: float
    dfU_cap: float
    dfU_cap_rate: Optional[float]
    dfU_cap_scan: Any
    lambda_enforced: float
    dfU_hit_cap: bool
    dfU_hit_iter: tuple
    dfU_frac: float
    dfU_cap_frac: float
    B: np.ndarray
    B_prob: np.ndarray
    B_blup: np.ndarray
    B_blup_pos: np.ndarray
    B_blup_prob: np.ndarray
    XB: np.ndarray
    XB_blup: np.ndarray
    X_prob: np.ndarray
    X_cluster: np.ndarray
    r_squared: float
    r_squared_fixed: float
    r_squared_cor2: float
    r_squared_fixed_cor2: float
    r_squared_uncentered: float
    r_squared_fixed_uncentered: float
    r_squared_centered: float
    r_squared_fixed_centered: float
    ICC: float
    C_signed: bool
    basis_names: tuple
    covariate_names: Optional[tuple]
    feature_names: Optional[tuple]
    sample_names: Optional[tuple]
    dims: str
    call: str
    runtime: float
    outer_iter: Optional[int] = None
    outer_maxit: Optional[int] = None
    nll_trace: Optional[np.ndarray] = None
    sigma2_used: Optional[float] = None
    C_vec_cov: Optional[np.ndarray] = None
    C_se: Optional[np.ndarray] = None
    C_se_boot: Optional[np.ndarray] = None
    C_ci_lower: Optional[np.ndarray] = None
    C_ci_upper: Optional[np.ndarray] = None
    C_p_side: Optional[str] = None
    wild_B: Optional[int] = None
    wild_level: Optional[float] = None
    coefficients: Any = field(default=None, repr=False)

    # -- shapes -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(P, N, Q, K)."""
        return (self.X.shape[0], self.U.shape[1], self.X.shape[1], self.C.shape[1])

    @property
    def covariate_labels(self) -> tuple:
        """Covariate names, or ``Cov1..CovK`` when A had none (spec §6.1 item 9)."""
        if self.covariate_names is not None:
            return self.covariate_names
        return tuple(f"Cov{k + 1}" for k in range(self.C.shape[1]))

    # -- R-style accessors --------------------------------------------------------------------
    def coef(self):
        """The coefficient table when inference was run, else Θ (R ``coef.nmf``)."""
        return self.coefficients if self.coefficients is not None else self.C

    def fitted(self, type: str = "blup") -> np.ndarray:  # noqa: A002 - R's argument name
        """``XB_blup`` (``type="blup"``) or ``XB`` (``"fixed"``), shape (P, N)."""
        type = check_option(type, "type", "NMFREResult.fitted", ("blup", "fixed"))
        return self.XB_blup if type == "blup" else self.XB

    def residuals(self, Y, type: str = "blup") -> np.ndarray:  # noqa: A002
        """``Y − fitted(type)``, shape (P, N)."""
        Yv = _to_matrix(Y, "Y", "NMFREResult.residuals")
        if Yv.shape != self.XB.shape:
            raise param_error("Y", "NMFREResult.residuals", f"an array of shape {self.XB.shape}", f"shape {Yv.shape}")
        return Yv - self.fitted(type)

    def predict(self, new_A=None) -> np.ndarray:
        """``X·C·new_A`` (P × M) for new covariates ``new_A`` (K × M); ``XB_blup`` when None."""
        if new_A is None:
            return self.XB_blup
        A = _to_matrix(new_A, "new_A", "NMFREResult.predict")
        if A.ndim == 1:
            A = A[:, None] if A.shape[0] == self.C.shape[1] else A[None, :]
        if A.ndim != 2 or A.shape[0] != self.C.shape[1] or not np.all(np.isfinite(A)):
            raise param_error("new_A", "NMFREResult.predict", f"a finite array with {self.C.shape[1]} rows",
                              f"shape {A.shape}")
        return self.X @ (self.C @ A)

    # -- labelled views -------------------------------------------------------------------------
    def frame(self, name: str):
        """``X``, ``C`` or ``U`` as a pandas DataFrame with their row and column labels."""
        import pandas as pd

        name = check_option(name, "name", "NMFREResult.frame", ("X", "C", "U"))
        if name == "X":
            return pd.DataFrame(self.X, index=self.feature_names, columns=list(self.basis_names))
        if name == "C":
            return pd.DataFrame(self.C, index=list(self.basis_names), columns=self.covariate_names)
        return pd.DataFrame(self.U, index=list(self.basis_names), columns=self.sample_names)

    # -- text and plots -------------------------------------------------------------------------
    def summary(self, show_ci: bool = False, max_coef: int = 20, by: str = "covariate") -> str:
        """The R ``summary()`` text: spec §7.1 for "cap", §7.2 for "ecm" fits."""
        from .summary import format_summary

        return format_summary(self, show_ci=show_ci, max_coef=max_coef, by=by)

    def __str__(self) -> str:
        from .summary import format_print

        return format_print(self)

    def plot_convergence(self, ax=None):
        """Objective per iteration (marginal NLL for "ecm"), titled with R² (R ``plot.nmfre``).

        Returns the matplotlib Figure.
        """
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(5, 4))
            ax = fig.add_subplot(1, 1, 1)
        else:
            fig = ax.figure
        if self.nll_trace is not None and len(self.nll_trace):
            y, ylab = self.nll_trace, "marginal NLL"
        else:
            y, ylab = self.objfunc_iter, "objfunc"
        ax.plot(np.arange(1, len(y) + 1), y, "-")
        ax.set_xlabel("iter")
        ax.set_ylabel(ylab)
        ax.set_title(f"R2 = {round(self.r_squared, 3)}")
        return fig


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


def r_squared_all(Y: np.ndarray, fit: np.ndarray) -> dict:
    """R² variants of one fit: grand-mean (56d65eb), cor², uncentered and row-centered."""
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
    r2b = r_squared_all(Y, XB_blup)
    r2f = r_squared_all(Y, XB)
    trXtX = float(np.sum(X * X))
    icc = tau2 * trXtX / (tau2 * trXtX + sigma2 * P)
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
        ICC=float(icc), C_signed=bool(C_signed),
        basis_names=tuple(f"{prefix}{q + 1}" for q in range(Q)),
        covariate_names=inp.covariate_names, feature_names=inp.feature_names, sample_names=inp.sample_names,
        dims=f"Y({P},{N})~X({P},{Q})C({Q},{K})A({K},{N})",
        **extra,
    )


# ---------------------------------------------------------------------------------------------
# Initialisation (nmfkc) and the public function
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


def _call_string(name: str, given: dict) -> str:
    parts = ["Y"] + (["A"] if given.pop("_A", False) else [])
    parts += [f"{k}={v!r}" for k, v in given.items()]
    return f"{name}({', '.join(parts)})"


def nmfre(
    Y,
    A=None,
    rank: int = 2,
    df_rate: Optional[float] = None,
    engine: str = "cap",
    wild_bootstrap: bool = True,
    wild_B: int = 500,
    wild_level: float = 0.95,
    prefix: str = "Basis",
    epsilon: float = 1e-5,
    maxit: Optional[int] = None,
    X_init=None,
    C_init=None,
    U_init=None,
    seed: int = 1,
    r_rng: bool = False,
    client=None,
    *,
    wild_seed=123,
    C_signed: bool = True,
    C_p_side: Optional[str] = None,
    sigma2: float = 1.0,
    tau2: float = 1.0,
    sigma2_update: bool = True,
    tau2_update: bool = True,
    dfu_control: str = "cap",
    nstart: int = 1,
    inner_maxit: int = 10000,
    outer_maxit: int = 500,
    epsilon_outer: float = 1e-6,
    x_postvar: bool = True,
    X_L2_ortho: float = 0.0,
    X_L2_smooth: float = 0.0,
    C_L2: float = 0.0,
    print_trace: bool = False,
) -> NMFREResult:
    """Fit NMF with random effects, ``Y = X(ΘA + U) + E`` (spec/nmfre.md §3, §5).

    Parameters
    ----------
    Y : array-like of shape (P, N)
        Non-negative data; columns are units (subjects), rows features (time points). A
        pandas DataFrame keeps its labels.
    A : array-like of shape (K, N), optional
        Covariates, one column per unit; default a single intercept row of ones. A DataFrame's
        index names the covariates.
    rank : int, default 2
        Q, the number of basis vectors.
    df_rate : float, optional
        Engine "cap": the random effects may use at most ``max(df_rate·N·Q, 1)`` degrees of
        freedom. ``None`` runs :func:`nmfre_dfu_scan` over 0.1, …, 1.0 and takes its
        automatic choice (spec §4.1). Ignored by "ecm".
    engine : {"cap", "ecm"}, default "cap"
        df-cap engine (spec §3) or the ECM engine of current upstream (spec §5).
    wild_bootstrap : bool, default True
        Run the inference of :func:`nmfre_inference` inline (engine "cap" only, as upstream;
        call :func:`nmfre_inference` for "ecm" fits).
    wild_B, wild_level : int, float
        Bootstrap replicates and the percentile-interval level.
    prefix : str, default "Basis"
        Basis labels ``prefix1..prefixQ``.
    epsilon : float, default 1e-5
        Relative objective change that stops the (inner) iterations.
    maxit : int, optional
        Iteration cap; default 50000 for "cap" (the reference commit) and 5000 for "ecm".
    X_init, C_init : array-like of shapes (P, Q) and (Q, K), optional
        Starting values; when either is missing both come from
        ``nmfkc(Y, A, rank, epsilon=epsilon, seed=seed)`` (see :func:`initialize`).
    U_init : array-like of shape (Q, N), optional
        Default zeros.
    seed : int, default 1
        Seed of the nmfkc initialiser (k-means; deterministic for rank 1).
    r_rng : bool, default False
        Reproduce R's random streams (bootstrap multipliers, k-means) bit for bit.
    client : distributed.Client, optional
        Runs the df scan's rates and the bootstrap chunks as parallel tasks.
    wild_seed : int or SeedSequence, default 123
        Seed of the wild bootstrap (see :func:`nmfre_inference`).
    C_signed : bool, default True
        Engine "ecm": sign-free least-squares Θ (True) or multiplicative non-negative Θ.
    C_p_side : {"one.sided", "two.sided"}, optional
        p-value side; default one-sided for "cap" (and ``C_signed=False``), two-sided otherwise.
    sigma2, tau2 : float, default 1
        Starting variances.
    sigma2_update, tau2_update : bool, default True
    dfu_control : {"cap", "off"}, default "cap"
        Engine "cap": enforce the cap, or run the damped τ² moment update without it.
    nstart : int, default 1
        k-means restarts of the initialiser.
    inner_maxit, outer_maxit, epsilon_outer : int, int, float
        Engine "ecm" loop controls (10000, 500, 1e-6).
    x_postvar : bool, default True
        Engine "ecm": add the posterior-variance term ``N·σ²·M⁻¹`` to the X-step Gram.
    X_L2_ortho, X_L2_smooth, C_L2 : float, default 0
        Engine "ecm" penalties (spec §5.3).
    print_trace : bool, default False
        Log progress every 100 iterations (logger ``dnmf.mixed.nmfre``, level INFO).

    Returns
    -------
    NMFREResult

    Raises
    ------
    InputError
        Negative or non-finite Y, A with the wrong number of columns or with NaN, rank < 1,
        df_rate not a positive finite number, bad option values; or no rate of the automatic
        scan qualifies.

    Notes
    -----
    Engine "cap", per iteration (spec §3.3): λ = σ²/τ², raised to the λ* with
    ``N·tr[XᵀX(XᵀX+λ*I)⁻¹] = cap`` when the cap binds (then τ² = σ²/λ*);
    ``U = (XᵀX+λI)⁻¹Xᵀ(Y − XΘA)`` row-centred; ``X ← X∘[YB⁺ᵀ]/[XB⁺B⁺ᵀ]`` with
    ``B⁺ = max(ΘA+U, 0)``; column normalisation; ``Θ ← Θ∘[Xᵀmax(Y−XU,0)Aᵀ]/[XᵀXΘAAᵀ]``;
    σ² damped from iteration 50 every 10 iterations; objective ``‖Y−X(ΘA+U)‖² + λ‖U‖²``.
    With the defaults τ² is never estimated — it moves only through the cap — and σ² stays 1
    when the fit converges before iteration 50 (spec §3.6). This is the reference behaviour,
    kept for parity; ``engine="ecm"`` estimates both variances.

    Examples
    --------
    >>> import dnmf
    >>> from dnmf.datasets.orthodont import load_orthodont
    >>> Y, A = load_orthodont()                                     # doctest: +SKIP
    >>> fit = dnmf.nmfre(Y, A, rank=1, df_rate=0.2, prefix="Trend")  # doctest: +SKIP
    >>> print(fit.summary())                                         # doctest: +SKIP
    """
    t0 = time.perf_counter()
    func = "nmfre"
    engine = check_option(engine, "engine", func, ENGINES)
    # an Inputs object is the private path of nmfre_ecv (imputed cells may be negative)
    inp = Y if isinstance(Y, Inputs) else validate_inputs(Y, A, func)
    rank = check_int(rank, "rank", func, low=1)
    epsilon = check_float(epsilon, "epsilon", func, low=0.0)
    maxit = check_int(50000 if maxit is None and engine == "cap" else (5000 if maxit is None else maxit),
                      "maxit", func, low=1)
    prefix = str(prefix)
    seed = check_seed_int(1 if seed is None else seed, "seed", func)
    if df_rate is not None:
        df_rate = check_float(df_rate, "df_rate", func, low=0.0, low_open=True)
    dfu_control = check_option(dfu_control, "dfu_control", func, ("cap", "off"))
    sigma2 = check_float(sigma2, "sigma2", func, low=0.0, low_open=True)
    tau2 = check_float(tau2, "tau2", func, low=0.0, low_open=True)
    if not isinstance(C_signed, (bool, np.bool_)):
        raise param_error("C_signed", func, "a bool", C_signed)
    if C_p_side is not None:
        C_p_side = check_option(C_p_side, "C_p_side", func, ("one.sided", "two.sided"))
    wild_B = check_int(wild_B, "wild_B", func, low=2)
    wild_level = check_float(wild_level, "wild_level", func, low=0.0, high=1.0, low_open=True)
    P, N = inp.Y.shape
    check_rank_vs_shape(rank, P, N, func)
    if np.any(inp.A < 0):
        # the nmfkc initialiser and the multiplicative Θ updates need A ≥ 0; only the signed ECM
        # engine started from given X_init and C_init can use a signed A
        if engine == "cap" or not C_signed:
            raise param_error("A", func, f"non-negative for engine={engine!r}" + ("" if engine == "cap" else
                              " with C_signed=False"), f"an array with minimum {float(inp.A.min())!r}",
                              described=True)
        if X_init is None or C_init is None:
            raise param_error("A", func, "non-negative unless X_init and C_init are both given (the nmfkc "
                              "initialiser needs A ≥ 0)", f"an array with minimum {float(inp.A.min())!r}",
                              described=True)
    given = {"_A": inp.A_given, "rank": rank}
    if df_rate is not None:
        given["df_rate"] = df_rate
    if engine != "cap":
        given["engine"] = engine
    if prefix != "Basis":
        given["prefix"] = prefix
    if not wild_bootstrap:
        given["wild_bootstrap"] = False
    call = _call_string(func, given)

    X, C = initialize(inp, rank, epsilon=epsilon, seed=seed, X_init=X_init, C_init=C_init, nstart=nstart,
                      r_rng=r_rng)
    U0 = check_matrix_init(U_init, "U_init", (rank, N), func)
    U = np.zeros((rank, N)) if U0 is None else U0

    if engine == "ecm":
        from .ecm import ECMOptions, fit_ecm

        opt = ECMOptions(
            rank=rank, C_signed=bool(C_signed), epsilon=epsilon, maxit=maxit, inner_maxit=inner_maxit,
            outer_maxit=outer_maxit, epsilon_outer=epsilon_outer, x_postvar=x_postvar,
            X_L2_ortho=X_L2_ortho, X_L2_smooth=X_L2_smooth, C_L2=C_L2, sigma2_update=sigma2_update,
            tau2_update=tau2_update, print_trace=print_trace,
        )
        st = fit_ecm(inp.Y, inp.A, X, C, U, sigma2, tau2, opt)
        extra = dict(
            converged=st.converged, stop_reason=st.stop_reason, n_iter=st.total_iter, maxit=maxit,
            epsilon=epsilon, objfunc=float(st.objfunc_iter[-1]) if st.objfunc_iter else float("nan"),
            rel_change_final=float(st.rel), objfunc_iter=np.asarray(st.objfunc_iter),
            rss_trace=np.asarray(st.rss_trace), dfU_cap_scan=None, dfU_hit_cap=False, dfU_hit_iter=(),
            call=call, runtime=time.perf_counter() - t0, outer_iter=st.outer, outer_maxit=outer_maxit,
            nll_trace=np.asarray(st.nll_trace),
        )
        if st.stop_reason in ("maxit", "outer_maxit"):
            warnings.warn(f"nmfre (engine='ecm') stopped at {st.stop_reason} ({st.total_iter} iterations) "
                          f"before converging; increase maxit (currently {maxit}) or outer_maxit "
                          f"(currently {outer_maxit}).", ConvergenceWarning, stacklevel=2)
        res = finalize(inp, st.X, st.C, st.U, st.sigma2, st.tau2, engine="ecm", prefix=prefix,
                       C_signed=C_signed, rate=None, cap=float("nan"), extra=extra)
        res = replace(res, runtime=time.perf_counter() - t0)
        return res

    # ----- engine "cap" -----
    scan = None
    rate = df_rate
    if rate is None and dfu_control == "cap":
        from .scan import nmfre_dfu_scan

        scan = nmfre_dfu_scan(DEFAULT_RATES, inp.Y, inp.A, rank=rank, X_init=X, C_init=C, U_init=U,
                              maxit=maxit, epsilon=epsilon, seed=seed, client=client,
                              sigma2=sigma2, tau2=tau2, sigma2_update=sigma2_update)
        if not np.isfinite(scan.cap_rate):
            raise InputError("nmfre: no df_rate of the automatic scan qualifies (safeguard, hit and converged); "
                             "pass df_rate explicitly. Scan table:\n" + str(scan))
        rate = float(scan.cap_rate)
    if rate is None:
        rate = 0.10
    X = np.maximum(X, EPS)
    C = np.maximum(C, EPS)
    X, dsc = normalize_columns(X)
    C = C * dsc[:, None]
    U = U * dsc[:, None]
    opt = CapOptions(rank=rank, rate=rate, epsilon=epsilon, maxit=maxit, dfu_control=dfu_control,
                     sigma2_update=sigma2_update, tau2_update=tau2_update, print_trace=print_trace)
    data = DenseData(inp.Y, inp.A, U)
    st = fit_cap(data, CapState(X=X, C=C, sigma2=sigma2, tau2=tau2), opt)
    if st.stop_reason == "maxit":
        warnings.warn(f"nmfre reached maxit ({maxit}) before the relative objective change fell below "
                      f"epsilon ({epsilon}); increase maxit (currently {maxit}).", ConvergenceWarning, stacklevel=2)
    extra = cap_extra(st, opt, scan, call, maxit, epsilon, t0)
    res = finalize(inp, st.X, st.C, data.U, st.sigma2, st.tau2, engine="cap", prefix=prefix, C_signed=False,
                   rate=rate, cap=max(rate * N * rank, 1.0), extra=extra)
    if wild_bootstrap:
        from .inference import nmfre_inference

        res = nmfre_inference(res, inp.Y, inp.A, wild_B=wild_B, wild_level=wild_level, side=C_p_side,
                              seed=wild_seed, r_rng=r_rng, client=client)
    return replace(res, runtime=time.perf_counter() - t0)


def cap_extra(st: CapState, opt: CapOptions, scan, call: str, maxit: int, epsilon: float, t0: float) -> dict:
    """Convergence and cap fields of an Engine-A result."""
    return dict(
        converged=st.converged, stop_reason=st.stop_reason, n_iter=st.iteration, maxit=maxit, epsilon=epsilon,
        objfunc=float(st.objfunc_iter[-1]) if st.objfunc_iter else float("nan"),
        rel_change_final=float(st.rel), objfunc_iter=np.asarray(st.objfunc_iter),
        rss_trace=np.asarray(st.rss_trace), dfU_cap_scan=scan, dfU_hit_cap=bool(st.hit_iter),
        dfU_hit_iter=tuple(st.hit_iter), call=call, runtime=time.perf_counter() - t0,
    )
