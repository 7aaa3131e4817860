"""The result type of an NMF-RE fit (spec §3.5, §5.4).

:class:`NMFREResult` is shared by both engines, the scan, the inference and the column-blocked
fit (:class:`dnmf.mixed.blocks.NMFREBlockedResult` subclasses it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .._plotting import figure_axes
from .._validation import check_option, param_error
from ._core import to_matrix

__all__ = ["NMFREResult"]


@dataclass(frozen=True, kw_only=True)
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
    formula_meta : dict or None
        Formula mode only: ``{"formula", "Y_cols", "A_cols"}`` (as :func:`dnmf.nmfkc`).
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
    formula_meta: Optional[dict] = None

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
        Yv = to_matrix(Y, "Y", "NMFREResult.residuals")
        if Yv.shape != self.XB.shape:
            raise param_error("Y", "NMFREResult.residuals", f"an array of shape {self.XB.shape}", f"shape {Yv.shape}")
        return Yv - self.fitted(type)

    def predict(self, new_A=None) -> np.ndarray:
        """``X·C·new_A`` (P × M) for new covariates ``new_A`` (K × M); ``XB_blup`` when None."""
        if new_A is None:
            return self.XB_blup
        A = to_matrix(new_A, "new_A", "NMFREResult.predict")
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
        fig, ax = figure_axes(ax, (5, 4))
        if self.nll_trace is not None and len(self.nll_trace):
            y, ylab = self.nll_trace, "marginal NLL"
        else:
            y, ylab = self.objfunc_iter, "objfunc"
        ax.plot(np.arange(1, len(y) + 1), y, "-")
        ax.set_xlabel("iter")
        ax.set_ylabel(ylab)
        ax.set_title(f"R2 = {round(self.r_squared, 3)}")
        return fig
