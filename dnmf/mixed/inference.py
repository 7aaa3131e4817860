"""Inference on Θ for NMF-RE fits (spec/nmfre.md §6.1): sandwich SE and a wild bootstrap.

Everything is conditional on the fitted X̂ and Û:

1. ``R = Y − XÛ − XΘ̂A``, ``σ²_used = ‖R‖² / max(PN − dfU − QK, 1)`` with
   ``dfU = N·tr[XᵀX(XᵀX + λI)⁻¹]``;
2. the information of vec(Θ) after profiling U out (the (I − H) correction)
   ``Info = AAᵀ ⊗ (XᵀX − XᵀX M⁻¹ XᵀX) / σ²_used + ridge·I``, ``M = XᵀX + λI``;
3. scores ``s_n = −(a_n ⊗ Xᵀr_n)/σ²_used`` (column-major vec), the CR1 meat
   ``J = N/(N−1)·Σ s_n s_nᵀ`` and the sandwich ``V = Info⁻¹ J Info⁻¹``;
4. the one-step wild bootstrap ``θ_b = vec(Θ̂) − Info⁻¹ S w_b`` with ``w_b`` i.i.d. Exp(1) − 1
   (projected on θ ≥ 0 for non-negative fits); BSE = sd, CI = type-7 percentiles.

z and p use the sandwich SE (the bootstrap SD is shown beside it, §6.1 item 9).

The bootstrap is one matrix product ``S·W`` (QK × N times N × B). The formulas (scores,
information, its one inversion, the sandwich) and the bootstrap driver are nmfkc's too, in one
module (:mod:`dnmf.covariates._theta_inference`): with ``r_rng=False`` the product is cut into
chunks of :data:`BOOT_CHUNK` replicates, each an independent task whose multipliers come from
the key ``(block, chunk)`` under the root ``SeedSequence`` of ``seed`` — so the draws do not
depend on the number of workers. With ``r_rng=True`` the multipliers are R's
``set.seed(seed); rexp(N·B) − 1`` stream (Appendix A), so BSE and the CI equal R's.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import replace
from typing import Optional

import numpy as np
import scipy.linalg
from scipy import stats

from .._validation import check_float, check_int, check_option, param_error
from ..covariates._common import LAMBDA_FLOOR, cholesky_spd
from ..covariates._theta_inference import (
    BOOT_CHUNK,
    COV_RIDGE,
    bootstrap_chunks,
    chunk_bounds,
    chunk_seed,
    invert_information,
    multipliers,
    sandwich_covariance,
    seed_root,
    theta_information,
)
from ..covariates._theta_inference import theta_scores as score_matrix
from ..rrng import RRandom
from ._core import validate_inputs
from .result import NMFREResult

logger = logging.getLogger(__name__)

__all__ = [
    "nmfre_inference",
    "BOOT_CHUNK",
    "chunk_bounds",
    "multipliers",
    "score_matrix",
    "sandwich",
    "boot_chunk",
    "seed_root",
    "chunk_seed",
    "summarize_boot",
    "coefficient_table",
    "r_exp_multipliers",
]

SIDES = ("one.sided", "two.sided")


def sandwich(XtX: np.ndarray, AAt: np.ndarray, lam: float, n: int, p: int, rss: float, StS: np.ndarray,
             cov_ridge: float = COV_RIDGE) -> dict:
    """Information, its inverse and the sandwich covariance from sufficient statistics.

    Parameters
    ----------
    XtX : ndarray of shape (Q, Q)
    AAt : ndarray of shape (K, K)
    lam : float
        λ = σ²/max(τ², 1e-12) of the fit.
    n, p : int
        N and P.
    rss : float
        ``‖Y − XÛ − XΘ̂A‖²``.
    StS : ndarray of shape (QK, QK)
        ``S̃S̃ᵀ`` of the unscaled scores.
    cov_ridge : float
        Ridge added to the information.

    Returns
    -------
    dict with ``sigma2_used``, ``dfU``, ``Hinv`` (QK × QK), ``V`` (QK × QK), ``se`` (QK,).
    """
    Q, K = XtX.shape[0], AAt.shape[0]
    L = cholesky_spd(XtX + max(lam, LAMBDA_FLOOR) * np.eye(Q))
    Minv = scipy.linalg.cho_solve((L, True), np.eye(Q))
    trH = float(np.trace(Minv @ XtX))
    dfu = n * trH
    s2u = rss / max(p * n - dfu - Q * K, 1.0)
    info = theta_information(XtX, AAt, s2u, Minv, cov_ridge)
    Hinv = invert_information(info)
    V = sandwich_covariance(Hinv, StS / s2u**2, n)
    se = np.sqrt(np.maximum(np.diag(V), 0.0))
    return {"sigma2_used": s2u, "dfU": dfu, "Hinv": Hinv, "V": V, "se": se}


# --------------------------------------------------------------------------------- seeds ------


def boot_chunk(S: np.ndarray, root: np.random.SeedSequence, block: int, chunk: int, n_rep: int) -> np.ndarray:
    """``S̃ W`` for one replicate chunk of one column block, shape (QK, n_rep)."""
    W = multipliers(chunk_seed(root, block, chunk), S.shape[1], n_rep)
    return S @ W


def _boot_task(item, S):
    """``S̃ W`` for one chunk of the driver (:func:`bootstrap_chunks`), shape (QK, n_rep)."""
    ss, n_rep = item
    return S @ multipliers(ss, S.shape[1], n_rep)


def r_exp_multipliers(seed: int, n: int, n_rep: int) -> np.ndarray:
    """R's ``set.seed(seed); matrix(rexp(n·n_rep) − 1, n, n_rep)`` (spec Appendix A), shape (n, n_rep)."""
    return (RRandom(seed).rexp(n * n_rep) - 1.0).reshape(n_rep, n).T


def summarize_boot(cvec: np.ndarray, Hinv: np.ndarray, SW: np.ndarray, s2u: float, level: float,
                   project: bool) -> dict:
    """Replicates ``θ_b = vec(Θ̂) − Hinv·(−S̃W/σ²)``, optional projection, SD and type-7 CI."""
    draws = cvec[:, None] + Hinv @ (SW / s2u)
    if project:
        draws = np.maximum(draws, 0.0)
    alpha = 1.0 - level
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2], axis=1, method="linear")
    return {"bse": draws.std(axis=1, ddof=1), "lo": lo, "hi": hi, "draws": draws}


def coefficient_table(basis: tuple, covariates: tuple, est: np.ndarray, se: np.ndarray, bse: np.ndarray,
                      lo: np.ndarray, hi: np.ndarray, side: str):
    """The coefficient DataFrame of spec §3.5/§6.1 in vec(Θ) order (basis fastest)."""
    import pandas as pd

    Q, K = len(basis), len(covariates)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, est / np.where(se > 0, se, 1.0), np.nan)
    p_one = stats.norm.sf(z)
    p_two = stats.chi2.sf(z * z, 1)
    return pd.DataFrame({
        "Basis": [basis[i % Q] for i in range(Q * K)],
        "Covariate": [covariates[i // Q] for i in range(Q * K)],
        "Estimate": est,
        "SE": se,
        "BSE": bse,
        "z_value": z,
        "Wald": z * z,
        "p_value": p_one if side == "one.sided" else p_two,
        "p_two_sided": p_two,
        "p_one_sided": p_one,
        "p_side_used": side,
        "CI_low": lo,
        "CI_high": hi,
    })


def default_side(fit: NMFREResult) -> str:
    """One-sided for non-negative Θ (engine "cap", ``C_signed=False``), two-sided otherwise."""
    if fit.engine == "ecm" and fit.C_signed:
        return "two.sided"
    return "one.sided"


def nmfre_inference(
    fit: NMFREResult,
    Y,
    A=None,
    wild_B: int = 500,
    wild_level: float = 0.95,
    side: Optional[str] = None,
    seed=123,
    r_rng: bool = False,
    client=None,
    *,
    wild_bootstrap: bool = True,
    cov_ridge: float = 1e-8,
) -> NMFREResult:
    """Sandwich SE, z, p and the one-step wild bootstrap for Θ of an NMF-RE fit (spec §6.1).

    Parameters
    ----------
    fit : NMFREResult
        A fit of :func:`dnmf.nmfre` (either engine).
    Y : array-like of shape (P, N)
        The data the fit used.
    A : array-like of shape (K, N), optional
        The covariates the fit used (default the intercept row).
    wild_B : int, default 500
        Bootstrap replicates.
    wild_level : float, default 0.95
        Level of the percentile interval.
    side : {"one.sided", "two.sided"}, optional
        p-value side; default one-sided for non-negative Θ (engine "cap" or ``C_signed=False``),
        two-sided for sign-free Θ (upstream HEAD). One-sided tests ``Θ_qk > 0``.
    seed : int, SeedSequence or Generator, default 123
        Bootstrap seed (R's ``wild.seed``). With ``r_rng=True`` it must be an int.
    r_rng : bool, default False
        Draw the multipliers from R's Mersenne-Twister stream (``set.seed(seed); rexp``) so
        the bootstrap matches R to rounding; serial, for small N.
    client : distributed.Client, optional
        Bootstrap chunks run as tasks on it (default: the active client, else threads).
    wild_bootstrap : bool, default True
        False skips the bootstrap (BSE and CI are NaN).
    cov_ridge : float, default 1e-8
        Ridge added to the information matrix.

    Returns
    -------
    NMFREResult
        ``fit`` with ``sigma2_used``, ``C_vec_cov``, ``C_se``, ``C_se_boot``, ``C_ci_lower``,
        ``C_ci_upper``, ``C_p_side``, ``wild_B``, ``wild_level`` and ``coefficients`` set.

    Notes
    -----
    σ²_used cancels in V and in the bootstrap draws (apart from the ridge); it is reported.
    For rank ≥ 2 the entries of Θ are identified only up to X → XT, Θ → T⁻¹Θ; do not read
    entrywise p-values as identified (spec §12.12).
    """
    func = "nmfre_inference"
    if not isinstance(fit, NMFREResult):
        raise param_error("fit", func, "an NMFREResult", type(fit).__name__)
    inp = validate_inputs(Y, A, func)
    P, N, Q, K = fit.shape
    if inp.Y.shape != (P, N):
        raise param_error("Y", func, f"an array of shape {(P, N)} (the fitted data)", f"shape {inp.Y.shape}")
    if inp.A.shape != (K, N):
        raise param_error("A", func, f"an array of shape {(K, N)} (the fitted covariates)", f"shape {inp.A.shape}")
    wild_B = check_int(wild_B, "wild_B", func, low=2)
    wild_level = check_float(wild_level, "wild_level", func, low=0.0, high=1.0, low_open=True)
    side = default_side(fit) if side is None else check_option(side, "side", func, SIDES)
    cov_ridge = check_float(cov_ridge, "cov_ridge", func, low=0.0)
    if r_rng and not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        raise param_error("seed", func, "an int when r_rng=True (R's set.seed)", seed)

    X, C, U = fit.X, fit.C, fit.U
    Yv, Av = inp.Y, inp.A
    lam = fit.sigma2 / max(fit.tau2, 1e-12)
    R = Yv - X @ U - X @ (C @ Av)
    rss = float(np.sum(R * R))
    S = score_matrix(X, R, Av)
    st = sandwich(X.T @ X, Av @ Av.T, lam, N, P, rss, S @ S.T, cov_ridge)
    cvec = C.ravel(order="F")
    project = fit.engine == "cap" or not fit.C_signed
    nan = np.full(Q * K, np.nan)
    bse, lo, hi = nan, nan, nan
    if wild_bootstrap:
        if r_rng:
            SW = S @ r_exp_multipliers(int(seed), N, wild_B)
        else:
            parts = bootstrap_chunks(_boot_task, wild_B, seed=seed, args=(S,), client=client, func=func)
            SW = np.concatenate(parts, axis=1)
        bs = summarize_boot(cvec, st["Hinv"], SW, st["sigma2_used"], wild_level, project)
        bse, lo, hi = bs["bse"], bs["lo"], bs["hi"]
    table = coefficient_table(fit.basis_names, fit.covariate_labels, cvec, st["se"], bse, lo, hi, side)
    shape = lambda v: np.asarray(v).reshape(Q, K, order="F")  # noqa: E731
    return replace(
        fit,
        sigma2_used=float(st["sigma2_used"]),
        C_vec_cov=st["V"],
        C_se=shape(st["se"]),
        C_se_boot=shape(bse),
        C_ci_lower=shape(lo),
        C_ci_upper=shape(hi),
        C_p_side=side,
        wild_B=wild_B if wild_bootstrap else None,
        wild_level=wild_level,
        coefficients=table,
    )
