"""``nmfkc_inference``: sandwich standard errors and a wild bootstrap for Θ (spec §6.2).

Everything is conditional on the fitted basis X̂. With R = Y − X̂ĈA:

* σ² = ‖R‖² / max(PN − QK, 1);
* Info = (AAᵀ ⊗ X̂ᵀX̂)/σ² + 1e-8·I (column-major vec, so vec(C)[q + Qk] = C[q, k]);
* scores s_n = −vec(X̂ᵀ r_n a_nᵀ)/σ², stacked as S (QK × N);
* sandwich V = H⁻¹ J H⁻¹ with J = N/(N−1)·S Sᵀ (CR1), SE = sqrt(diag V);
* one-step wild bootstrap c_b = max(vec(Ĉ) − H⁻¹ S w_b, 0), w_b i.i.d. Exp(1) − 1;
* or, with ``method="refit"``, Y*_b = max(Ŷ + W_b∘R, 0) and Θ re-estimated with X̂ fixed.

The mathematics and the bootstrap driver are NMF-RE's, in one module
(:mod:`dnmf.covariates._theta_inference`): the information is NMF-RE's with no random effect,
inverted one way; replicates run in chunks of :data:`BOOT_CHUNK` as independent tasks on the
executor, chunk c seeded by the key ``(0, c)`` under ``SeedSequence(seed)`` (an unblocked
NMF-RE fit's key), so the draws do not depend on the number of workers. With ``r_rng=True``
the multipliers come serially from one emulated R stream (:mod:`dnmf.rrng`), reproducing R's
``set.seed(wild.seed)`` draws exactly.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .._validation import check_float, check_int, check_option, param_error
from ..exceptions import InputError
from ._common import as_covariate_matrix, as_data_matrix, quantile_type7, stars, unvec_cm, vec_cm
from ._theta_inference import (
    BOOT_CHUNK,
    COV_RIDGE,
    bootstrap_chunks,
    invert_information,
    sandwich_covariance,
    theta_information,
    theta_scores,
    wild_multipliers,
)
from .nmfkc import NMFKCResult

logger = logging.getLogger(__name__)

__all__ = [
    "BOOT_CHUNK",
    "NMFKCInference",
    "nmfkc_inference",
    "score_matrix",
    "wild_multipliers",
    "basic_bootstrap_p",
    "coefficient_table",
]

_FUNC = "nmfkc_inference"


@dataclass(frozen=True)
class NMFKCInference:
    """Inference on Θ (= ``C``) of an ``nmfkc`` fit.

    Shapes: Q × K for the matrices (K = N when the fit had no A), QK for vectors in
    column-major vec order, B_rep replicates.

    Attributes
    ----------
    fit : NMFKCResult
        The fit the inference is conditional on.
    sigma2_used : float
        RSS / max(PN − QK, 1).
    C_vec_cov : ndarray of shape (QK, QK)
        Sandwich covariance of vec(C) (H⁻¹ when ``sandwich=False``).
    C_se : ndarray of shape (Q, K)
        Sandwich (or Hessian) standard errors (``C.se.sandwich`` in R).
    C_se_boot : ndarray of shape (Q, K) or None
        Bootstrap SD of the replicates (n − 1 denominator).
    C_ci_lower, C_ci_upper : ndarray of shape (Q, K) or None
        Percentile interval (R type-7 quantiles) at ``wild_level``.
    C_boot_draws : ndarray of shape (QK, B_rep) or None
        The bootstrap replicates of vec(C).
    coefficients : pandas.DataFrame
        One row per entry of C in column-major order, columns ``Basis``, ``Covariate``,
        ``Estimate``, ``SE``, ``BSE``, ``z_value``, ``p_value``, ``p_one_sided``,
        ``p_two_sided``, ``p_side_used``, ``CI_low``, ``CI_high``, ``on_boundary``.
        With ``method="onestep"`` z = Estimate/SE (sandwich) and p from the normal; with
        ``"refit"`` SE is the bootstrap SD, z = Estimate/BSE and p is the basic-bootstrap
        p-value P*(c* ≥ 2ĉ) (two-sided: 2·min(p₁, 1 − p₁)).
    C_p_side : str
        ``"one.sided"`` or ``"two.sided"``: which p is in ``p_value``.
    boot_method : str or None
        ``"onestep"``, ``"refit"``, or None without bootstrap.
    wild_dist : str or None
        Multiplier distribution (``"exp"``, ``"rademacher"``, ``"mammen"``).
    wild_B, wild_level, seed : int, float, int
    r_rng : bool
        Whether the multipliers came from the emulated R stream.
    """

    fit: NMFKCResult
    sigma2_used: float
    C_vec_cov: np.ndarray
    C_se: np.ndarray
    C_se_boot: Optional[np.ndarray]
    C_ci_lower: Optional[np.ndarray]
    C_ci_upper: Optional[np.ndarray]
    C_boot_draws: Optional[np.ndarray]
    coefficients: Any = field(repr=False)
    C_p_side: str = "one.sided"
    boot_method: Optional[str] = "onestep"
    wild_dist: Optional[str] = "exp"
    wild_B: int = 500
    wild_level: float = 0.95
    seed: int = 123
    r_rng: bool = False

    # duck-typed fields read by nmfkc_dot and friends
    @property
    def X(self) -> np.ndarray:
        """The fit's basis (P × Q)."""
        return self.fit.X

    @property
    def C(self) -> np.ndarray:
        """The fit's Θ (Q × K)."""
        return self.fit.C

    @property
    def B(self) -> np.ndarray:
        """The fit's B = CA (Q × N)."""
        return self.fit.B

    @property
    def basis_names(self) -> tuple:
        return self.fit.basis_names

    @property
    def covariate_names(self):
        return self.fit.covariate_names

    @property
    def feature_names(self):
        return self.fit.feature_names

    @property
    def C_signed(self) -> bool:
        return False

    @property
    def call(self) -> str:
        """The fit's call (R keeps ``object$call`` through ``nmfkc.inference``)."""
        return self.fit.call

    def coef(self):
        """The coefficient table (R ``coef.nmf`` on an inference result)."""
        return self.coefficients

    def __str__(self) -> str:
        """R's ``print.nmf`` of the fit: call, model, convergence, R², and the hint line."""
        from ._text import format_print

        return format_print(self.fit)

    __repr__ = __str__

    def summary(self) -> str:
        """A text summary: call, model, convergence, and the coefficient table with stars."""
        f = self.fit
        status = "converged" if f.converged else "NOT converged"
        lines = (["", "Call:", f.call, ""] if f.call else []) + [
            f"Model:       {f.dims}",
            f"Convergence: {f.n_iter} / {f.maxit} ({status})  epsilon = {f.epsilon:g}",
            f"R-squared:   {f.r_squared:.4g}",
            "",
            "Coefficients:",
        ]
        tab = self.coefficients
        labels = [f"{c}:{b}" for b, c in zip(tab["Basis"], tab["Covariate"])]
        w = max(len(s) for s in labels)
        header = " " * w + " " + " ".join(
            [f"{'Estimate':>9}", f"{'Std. Error':>10}"]
            + ([f"{'(Boot)':>6}"] if np.isfinite(tab["BSE"]).any() and self.boot_method == "onestep" else [])
            + [f"{'z value':>7}", f"{'Pr(>z)' if self.C_p_side == 'one.sided' else 'Pr(>|z|)':>8}", ""]
        )
        lines.append(header)
        show_b = np.isfinite(tab["BSE"]).any() and self.boot_method == "onestep"
        for lab, (_, r) in zip(labels, tab.iterrows()):
            p = r["p_value"]
            if not np.isfinite(p):
                ps = "      NA"
            elif p < 2.2e-16:
                ps = "  <2e-16"
            else:
                ps = f"{p:.4g}".rjust(8)
            fields = [f"{r['Estimate']:9.3f}", f"{r['SE']:10.3f}"]
            if show_b:
                fields.append(f"{r['BSE']:6.3f}")
            fields += [f"{r['z_value']:7.2f}", ps, stars(p)]
            lines.append(lab.rjust(w) + " " + " ".join(fields))
        lines.append("---")
        lines.append("Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1")
        return "\n".join(lines)


def score_matrix(X: np.ndarray, R: np.ndarray, A: np.ndarray, sigma2: float) -> np.ndarray:
    """Per-column scores S (QK × N): ``s_n = −vec(Xᵀ r_n a_nᵀ)/σ²`` (column-major vec)."""
    return -theta_scores(X, R, A) / sigma2


def _r_multipliers(rr, n: int, dist: str) -> np.ndarray:
    """R's ``.wild.multipliers(n, dist)`` on the emulated stream."""
    if dist == "exp":
        return rr.rexp(n) - 1.0
    if dist == "rademacher":
        return np.array([-1.0, 1.0])[rr.sample_int(2, n, replace=True)]
    a = -(np.sqrt(5.0) - 1.0) / 2.0
    b = (np.sqrt(5.0) + 1.0) / 2.0
    pa = (np.sqrt(5.0) + 1.0) / (2.0 * np.sqrt(5.0))
    return np.where(rr.runif(n) < pa, a, b)


def basic_bootstrap_p(draws: np.ndarray, est: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Basic-bootstrap p-values of H0: c = 0 from replicates centred at the estimate.

    ``p₁ = mean(c*_b ≥ 2ĉ)`` (i.e. P*(c* − ĉ ≥ ĉ)); one-sided ``min(1, p₁)``, two-sided
    ``min(1, 2·min(p₁, 1 − p₁))``. Non-finite replicates are ignored (R ``.boot.summarize``).

    Parameters
    ----------
    draws : ndarray of shape (QK, B)
    est : ndarray of shape (QK,)

    Returns
    -------
    p_one, p_two : ndarray of shape (QK,)
    """
    draws = np.asarray(draws, dtype=float)
    fin = np.isfinite(draws)
    n = fin.sum(axis=1)
    hit = (fin & (draws >= 2.0 * np.asarray(est, dtype=float)[:, None])).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p1 = np.where(n > 0, hit / np.maximum(n, 1), np.nan)
    return np.minimum(1.0, p1), np.minimum(1.0, 2.0 * np.minimum(p1, 1.0 - p1))


def coefficient_table(basis: tuple, covariates: tuple, est, se, bse, p_one, p_two, side, lo, hi, z, boundary_tol):
    """The coefficient DataFrame (rows in column-major vec order of C)."""
    import pandas as pd

    Q, K = len(basis), len(covariates)
    p_used = p_one if side == "one.sided" else p_two
    return pd.DataFrame(
        {
            "Basis": [basis[i % Q] for i in range(Q * K)],
            "Covariate": [covariates[i // Q] for i in range(Q * K)],
            "Estimate": est,
            "SE": se,
            "BSE": bse,
            "z_value": z,
            "p_value": p_used,
            "p_one_sided": p_one,
            "p_two_sided": p_two,
            "p_side_used": side,
            "CI_low": lo,
            "CI_high": hi,
            "on_boundary": est <= boundary_tol,
        }
    )


# ------------------------------------------------------------------------ tasks


def _onestep_task(item, c_hat, HinvS, dist):
    """One chunk of one-step replicates: max(ĉ − H⁻¹S·W, 0) for its multipliers."""
    source, n_rep = item
    if isinstance(source, np.random.SeedSequence):
        W = wild_multipliers(np.random.default_rng(source), (HinvS.shape[1], n_rep), dist)
    else:
        W = source
    return np.maximum(c_hat[:, None] - HinvS @ W, 0.0)


def _refit_task(item, Yhat, R, X, A, C_hat, dist, unit, epsilon, maxit):
    """One chunk of refit replicates: re-estimate Θ with X fixed on Y* = max(Ŷ + W∘R, 0)."""
    from .nmfkc import mu_iterate

    source, n_rep = item
    P, N = R.shape
    seeded = isinstance(source, np.random.SeedSequence)
    rng = np.random.default_rng(source) if seeded else None
    out = np.empty((C_hat.size, n_rep))
    ones = np.ones((P, N))
    for b in range(n_rep):
        if seeded:
            if unit == "column":
                Wm = np.broadcast_to(wild_multipliers(rng, (N,), dist)[None, :], (P, N))
            else:
                Wm = wild_multipliers(rng, (P, N), dist)
        else:
            Wm = source[b]
        Ys = np.maximum(Yhat + Wm * R, 0.0)
        _, C, _, _ = mu_iterate(Ys, A, X, C_hat.copy(), ones, update_X=False, X_restriction="fixed",
                                epsilon=epsilon, maxit=maxit)
        out[:, b] = vec_cm(C)
    return out


def _r_given(rr, method: str, P: int, N: int, dist: str, unit: str):
    """``given(b0, b1)`` for :func:`bootstrap_chunks`: the next replicates' multipliers from R's stream."""

    def given(b0, b1):
        if method == "onestep":
            W = np.empty((N, b1 - b0))
            for b in range(b1 - b0):
                W[:, b] = _r_multipliers(rr, N, dist)
            return W
        mats = []
        for _ in range(b1 - b0):
            if unit == "column":
                w = _r_multipliers(rr, N, dist)
                mats.append(np.broadcast_to(w[None, :], (P, N)).copy())
            else:
                mats.append(_r_multipliers(rr, P * N, dist).reshape((P, N), order="F"))
        return mats

    return given


# -------------------------------------------------------------------------- main


def nmfkc_inference(
    result: NMFKCResult,
    Y,
    A=None,
    wild_bootstrap: bool = True,
    *,
    wild_B: int = 500,
    wild_level: float = 0.95,
    side: str = "one.sided",
    seed: int = 123,
    method: str = "onestep",
    wild_dist: Optional[str] = None,
    wild_unit: str = "element",
    sandwich: bool = True,
    refit_epsilon: float = 1e-8,
    refit_maxit: int = 100_000,
    boundary_tol: float = 1e-3,
    r_rng: bool = False,
    client=None,
) -> NMFKCInference:
    """Standard errors, p-values and bootstrap intervals for Θ of an ``nmfkc`` fit.

    Parameters
    ----------
    result : NMFKCResult
        A fit from :func:`dnmf.nmfkc` (EU loss).
    Y : array-like of shape (P, N)
        The data the fit used (no missing cells).
    A : array-like of shape (K, N) or None
        The covariates the fit used; None means the identity (K = N), as for a fit without A.
    wild_bootstrap : bool, default True
        Run the bootstrap (otherwise only the analytic part).
    wild_B : int, default 500
        Replicates.
    wild_level : float, default 0.95
        Level of the percentile interval.
    side : {"one.sided", "two.sided"}, default "one.sided"
        Which p-value goes in ``p_value`` (one-sided tests H0: Θ_qk = 0 vs Θ_qk > 0).
    seed : int, default 123
        Bootstrap seed (R's ``wild.seed``).
    method : {"onestep", "refit"}, default "onestep"
        One-step Newton replicates, or re-estimation of Θ with X fixed on perturbed data.
    wild_dist : {"exp", "rademacher", "mammen"} or None
        Multipliers; default ``"exp"`` (Exp(1) − 1) for onestep, ``"rademacher"`` for refit.
    wild_unit : {"element", "column"}, default "element"
        Refit only: one multiplier per cell, or per column shared over rows.
    sandwich : bool, default True
        Sandwich covariance (else the inverse information).
    refit_epsilon, refit_maxit : float, int
        Tolerance and cap of each refit (tight by default: pitfall §12.8).
    boundary_tol : float, default 1e-3
        ``on_boundary`` flags estimates ≤ this value.
    r_rng : bool, default False
        Draw the multipliers serially from the emulated R stream after ``set.seed(seed)``
        (R parity); otherwise each chunk of replicates has its own child seed of
        ``SeedSequence(seed)``, and results agree with R's up to Monte-Carlo error.
    client : distributed.Client, False or None
        Where replicate chunks run (:func:`dnmf.engine.executor.get_executor`).

    Returns
    -------
    NMFKCInference

    Notes
    -----
    σ² cancels in the sandwich and the one-step draws apart from the 1e-8 ridge; it is
    reported as ``sigma2_used``. Two-sided p-values use ``chi2.sf(z², 1)``, which does not
    underflow to 0 as R's ``1 − pchisq`` does.

    Examples
    --------
    >>> from dnmf.datasets.orthodont import load_orthodont
    >>> from dnmf import nmfkc, nmfkc_inference
    >>> Y, A, _ = load_orthodont()
    >>> inf = nmfkc_inference(nmfkc(Y, A, rank=1), Y, A, r_rng=True, client=False)
    >>> [round(float(s), 4) for s in inf.C_se.ravel()]
    [2.4742, 3.0591]
    """
    if not isinstance(result, NMFKCResult):
        raise param_error("result", _FUNC, "an NMFKCResult from nmfkc()", type(result).__name__)
    if result.method != "EU":
        raise param_error("result", _FUNC, "a fit with method='EU'", result.method)
    if not isinstance(wild_bootstrap, (bool, np.bool_)):
        raise param_error("wild_bootstrap", _FUNC, "a bool", wild_bootstrap)
    wild_B = check_int(wild_B, "wild_B", _FUNC, low=2)
    wild_level = check_float(wild_level, "wild_level", _FUNC, low=0.0, high=1.0, low_open=True)
    side = check_option(side, "side", _FUNC, ("one.sided", "two.sided"))
    method = check_option(method, "method", _FUNC, ("onestep", "refit"))
    if wild_dist is None:
        wild_dist = "exp" if method == "onestep" else "rademacher"
    wild_dist = check_option(wild_dist, "wild_dist", _FUNC, ("exp", "rademacher", "mammen"))
    wild_unit = check_option(wild_unit, "wild_unit", _FUNC, ("element", "column"))
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise param_error("seed", _FUNC, "an int", seed)
    refit_epsilon = check_float(refit_epsilon, "refit_epsilon", _FUNC, low=0.0)
    refit_maxit = check_int(refit_maxit, "refit_maxit", _FUNC, low=1)
    boundary_tol = check_float(boundary_tol, "boundary_tol", _FUNC, low=0.0)

    Y, _, _ = as_data_matrix(Y, _FUNC, allow_nan=False)
    P, N = Y.shape
    X, C = result.X, result.C
    Q, K = C.shape
    if X.shape[0] != P or result.B.shape[1] != N:
        raise param_error("Y", _FUNC, f"an array of shape {(X.shape[0], result.B.shape[1])} (the fitted data)", f"shape {(P, N)}")
    if A is None:
        if K != N:
            raise param_error("A", _FUNC, f"the ({K}, {N}) covariate matrix the fit used", None)
        A = np.eye(N)
        cov_names = result.sample_names or tuple(f"Cov{k + 1}" for k in range(K))
    else:
        A, _ = as_covariate_matrix(A, N, _FUNC, nonneg=False)
        if A.shape[0] != K:
            raise param_error("A", _FUNC, f"an array with {K} rows (C is {Q} x {K})", f"shape {A.shape}")
        cov_names = result.covariate_names or tuple(f"Cov{k + 1}" for k in range(K))

    # 1. residuals and σ²
    Yhat = X @ C @ A
    R = Y - Yhat
    rss = float(np.sum(R * R))
    sigma2 = rss / max(P * N - Q * K, 1)
    if not sigma2 > 0:
        raise InputError(f"The 'Y' parameter of {_FUNC} must leave a positive residual sum of squares. Got RSS = {rss!r} instead.")
    # 2. information and its inverse
    Info = theta_information(X.T @ X, A @ A.T, sigma2, ridge=COV_RIDGE)
    Hinv = invert_information(Info)
    # 3. scores and sandwich
    S = score_matrix(X, R, A, sigma2)
    if sandwich:
        V = sandwich_covariance(Hinv, S @ S.T, N)
    else:
        V = Hinv
    se_vec = np.sqrt(np.maximum(np.diag(V), 0.0))
    c_hat = vec_cm(C).astype(float)

    bse_vec = lo = hi = draws = None
    if wild_bootstrap:
        given = None
        if r_rng:
            from ..rrng import RRandom

            given = _r_given(RRandom(int(seed)), method, P, N, wild_dist, wild_unit)
        if method == "onestep":
            task, args = _onestep_task, (c_hat, Hinv @ S, wild_dist)
        else:
            task, args = _refit_task, (Yhat, R, X, A, C, wild_dist, wild_unit, refit_epsilon, refit_maxit)
        parts = bootstrap_chunks(task, wild_B, seed=int(seed), given=given, args=args, client=client, func=_FUNC)
        draws = np.concatenate(parts, axis=1)
        bse_vec = np.std(draws, axis=1, ddof=1)
        alpha = 1.0 - wild_level
        q = quantile_type7(draws, [alpha / 2.0, 1.0 - alpha / 2.0], axis=1)
        lo, hi = q[0], q[1]

    # 4. table
    if method == "refit" and draws is not None:
        se_used = bse_vec
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(bse_vec > 0, c_hat / bse_vec, np.nan)
        p_one, p_two = basic_bootstrap_p(draws, c_hat)
    else:
        se_used = se_vec
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(se_vec > 0, c_hat / se_vec, np.nan)
        from scipy import stats  # here, not at import: `import dnmf.covariates` stays light

        p_one = stats.norm.sf(z)
        p_two = stats.chi2.sf(z * z, 1)
    nanv = np.full(Q * K, np.nan)
    table = coefficient_table(
        result.basis_names, tuple(cov_names), c_hat, se_used,
        bse_vec if bse_vec is not None else nanv, p_one, p_two, side,
        lo if lo is not None else nanv, hi if hi is not None else nanv, z, boundary_tol,
    )
    return NMFKCInference(
        fit=result,
        sigma2_used=float(sigma2),
        C_vec_cov=V,
        C_se=unvec_cm(se_vec, (Q, K)),
        C_se_boot=None if bse_vec is None else unvec_cm(bse_vec, (Q, K)),
        C_ci_lower=None if lo is None else unvec_cm(lo, (Q, K)),
        C_ci_upper=None if hi is None else unvec_cm(hi, (Q, K)),
        C_boot_draws=draws,
        coefficients=table,
        C_p_side=side,
        boot_method=method if wild_bootstrap else None,
        wild_dist=wild_dist if wild_bootstrap else None,
        wild_B=wild_B,
        wild_level=wild_level,
        seed=int(seed),
        r_rng=bool(r_rng),
    )
