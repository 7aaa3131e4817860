"""Kernel covariates for ``nmfkc``: ``nmfkc_kernel`` and ``nmfkc_kernel_beta_nearest_med`` (spec §9).

A kernel matrix A (N × M) built from covariate coordinates U (K × N) and V (K × M) — or from a
given distance matrix — is used as the covariate matrix of :func:`dnmf.nmfkc`, so that
B = Θ·A is a smooth function of the coordinates (R ``nmfkc.kernel``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .._validation import check_option, param_error
from ..exceptions import InputError

logger = logging.getLogger(__name__)

__all__ = ["KERNELS", "KernelMatrix", "nmfkc_kernel", "nmfkc_kernel_beta_nearest_med", "BetaMedianResult"]

KERNELS = ("Gaussian", "Exponential", "Periodic", "Linear", "NormalizedLinear", "Polynomial")
_FUNC = "nmfkc_kernel"
_T_GRIDS = {"7points": (-1.0, -2.0 / 3.0, -1.0 / 3.0, 0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0),
            "4points": (-0.5, 0.0, 0.5, 1.0)}


class KernelMatrix(np.ndarray):
    """An ndarray (N × M) carrying R's attributes: ``kernel``, ``params``, ``function_name``."""

    kernel: str
    params: object
    function_name: str

    def __array_finalize__(self, obj):
        if obj is None:
            return
        self.kernel = getattr(obj, "kernel", None)
        self.params = getattr(obj, "params", None)
        self.function_name = getattr(obj, "function_name", "nmfkc_kernel")


def _coords(M, name: str, func: str) -> np.ndarray:
    arr = np.asarray(M.to_numpy() if hasattr(M, "to_numpy") else M, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise param_error(name, func, "a 2-D array of shape (K, N) (columns are points)", f"shape {arr.shape}")
    return arr


def _sq_dist(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """max(‖u‖² + ‖v‖² − 2uᵀv, 0) for all column pairs (N × M)."""
    G = U.T @ V
    return np.maximum((U * U).sum(axis=0)[:, None] + (V * V).sum(axis=0)[None, :] - 2.0 * G, 0.0)


def _sq_dist_pds(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Partial-distance strategy: D² over the rows observed in both points, scaled by K/K_obs."""
    K = U.shape[0]
    ou, ov = ~np.isnan(U), ~np.isnan(V)
    U0, V0 = np.where(ou, U, 0.0), np.where(ov, V, 0.0)
    ouf, ovf = ou.astype(float), ov.astype(float)
    # Σ_k o_uk o_vk (u_k − v_k)² = Σ o_v u² + Σ o_u v² − 2 Σ u v (missing entries are 0 in U0/V0)
    d2 = (U0 * U0).T @ ovf + ouf.T @ (V0 * V0) - 2.0 * (U0.T @ V0)
    n_obs = ouf.T @ ovf
    with np.errstate(invalid="ignore", divide="ignore"):
        d2 = np.where(n_obs > 0, np.maximum(d2, 0.0) * K / n_obs, np.nan)
    return d2


def nmfkc_kernel(
    U=None,
    V=None,
    kernel: str = "Gaussian",
    *,
    beta=None,
    degree: int = 2,
    na_method: str = "pds",
    dist=None,
) -> KernelMatrix:
    """Kernel matrix between the columns of U and V, used as nmfkc's covariates (R ``nmfkc.kernel``).

    Parameters
    ----------
    U : array-like of shape (K, N)
        Coordinates of the N units (columns). NaN marks a missing coordinate (Gaussian only).
    V : array-like of shape (K, M), optional
        Coordinates of M points (default U, which gives the symmetric N × N kernel).
    kernel : {"Gaussian", "Exponential", "Periodic", "Linear", "NormalizedLinear", "Polynomial"}
    beta : float or (float, float), optional
        Gaussian / Exponential: 0.5; Periodic: (1, 1); Polynomial: 0.
    degree : int, default 2
        Polynomial degree.
    na_method : {"pds"}, default "pds"
        Gaussian with NaN in U or V: the squared distance is taken over the rows observed in both
        points and scaled by K / K_observed (upstream's ``"egk"`` GMM method is not provided).
    dist : array-like of shape (N, M), optional
        A precomputed distance matrix D instead of coordinates (Gaussian, Exponential, Periodic):
        the kernel of D is returned (e.g. ``exp(-beta·D²)``).

    Returns
    -------
    KernelMatrix of shape (N, M)
        Negative entries are set to 0. Attributes ``kernel``, ``params`` and
        ``function_name="nmfkc.kernel"``.

    Notes
    -----
    With G = UᵀV and D² = max(‖u‖² + ‖v‖² − 2G, 0): Gaussian exp(−β·D²), Exponential
    exp(−β·D), Periodic exp(−β₁·sin²(β₂·D)), Linear G, NormalizedLinear G/(‖u‖‖v‖),
    Polynomial (G + β)^degree.

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.covariates import nmfkc_kernel
    >>> U = np.array([[0.0, 1.0, 3.0]])
    >>> np.round(np.asarray(nmfkc_kernel(U, beta=0.5)), 4)[0]
    array([1.    , 0.6065, 0.0111])
    """
    kernel = check_option(kernel, "kernel", _FUNC, KERNELS)
    na_method = check_option(na_method, "na_method", _FUNC, ("pds",))
    if kernel in ("Gaussian", "Exponential"):
        b = 0.5 if beta is None else float(beta)
        params = b
    elif kernel == "Periodic":
        b = (1.0, 1.0) if beta is None else tuple(float(x) for x in np.atleast_1d(beta))
        if len(b) < 2:
            raise param_error("beta", _FUNC, "a pair (beta1, beta2) for the Periodic kernel", beta)
        params = b
    elif kernel == "Polynomial":
        b = 0.0 if beta is None else float(beta)
        params = {"beta": b, "degree": int(degree)}
    else:
        b, params = None, None
    if dist is not None:
        if kernel not in ("Gaussian", "Exponential", "Periodic"):
            raise param_error("dist", _FUNC, "None for the Linear / NormalizedLinear / Polynomial kernels",
                              "a distance matrix", described=True)
        D = np.asarray(dist.to_numpy() if hasattr(dist, "to_numpy") else dist, dtype=float)
        if D.ndim != 2 or np.any(D < 0) or not np.all(np.isfinite(D)):
            raise param_error("dist", _FUNC, "a finite non-negative 2-D distance matrix", f"shape {D.shape}")
        D2 = D * D
    else:
        if U is None:
            raise param_error("U", _FUNC, "an array of shape (K, N) (or pass dist)", None)
        U = _coords(U, "U", _FUNC)
        V = U if V is None else _coords(V, "V", _FUNC)
        if U.shape[0] != V.shape[0]:
            raise param_error("V", _FUNC, f"an array with {U.shape[0]} rows (as U)", f"shape {V.shape}")
        has_nan = np.isnan(U).any() or np.isnan(V).any()
        if has_nan and kernel != "Gaussian":
            raise InputError(f"The 'U' parameter of {_FUNC} may contain NaN only for the Gaussian kernel. "
                             f"Got NaN with kernel={kernel!r} instead.")
        if np.isinf(U).any() or np.isinf(V).any():
            raise param_error("U", _FUNC, "finite (NaN only for missing coordinates)", "Inf values")
        D2 = _sq_dist_pds(U, V) if has_nan else _sq_dist(U, V)
    if kernel == "Gaussian":
        Kmat = np.exp(-b * D2)
    elif kernel == "Exponential":
        Kmat = np.exp(-b * np.sqrt(D2))
    elif kernel == "Periodic":
        Kmat = np.exp(-b[0] * np.sin(b[1] * np.sqrt(D2)) ** 2)
    else:
        G = U.T @ V
        if kernel == "Linear":
            Kmat = G
        elif kernel == "NormalizedLinear":
            eps = np.finfo(float).eps
            nu = np.sqrt((U * U).sum(axis=0))
            nv = np.sqrt((V * V).sum(axis=0))
            Kmat = G / np.outer(np.where(nu == 0, eps, nu), np.where(nv == 0, eps, nv))
        else:
            Kmat = (G + b) ** int(degree)
    Kmat = np.where(Kmat < 0, 0.0, Kmat)
    out = np.asarray(Kmat, dtype=float).view(KernelMatrix)
    out.kernel, out.params, out.function_name = kernel, params, "nmfkc.kernel"
    return out


@dataclass(frozen=True)
class BetaMedianResult:
    """Result of :func:`nmfkc_kernel_beta_nearest_med`.

    Attributes
    ----------
    beta : float
        β₀ = 1 / (2σ₀²).
    beta_candidates : ndarray
        β₀·10^(−2t) over the t grid (a bandwidth grid σ₀·10^t), for cross-validation.
    dist_median : float
        σ₀: the median nearest-neighbour (or nearest-landmark) distance.
    sample_size_used : int
    uk_is_u : bool or None
        With landmarks: whether Uk was detected as U (then self-distances are excluded).
    """

    beta: float
    beta_candidates: np.ndarray
    dist_median: float
    sample_size_used: int
    uk_is_u: Optional[bool] = None


def nmfkc_kernel_beta_nearest_med(
    U,
    Uk=None,
    *,
    candidates="7points",
    sample_size: Optional[int] = None,
    seed=None,
    block_size: int = 1000,
) -> BetaMedianResult:
    """A data-driven Gaussian β from the median nearest-neighbour distance (R
    ``nmfkc.kernel.beta.nearest.med``).

    Parameters
    ----------
    U : array-like of shape (K, N)
        Coordinates (columns are points), N ≥ 2.
    Uk : array-like of shape (K, M), optional
        Landmarks: σ₀ is then the median distance from each point of U to its nearest landmark
        (self-distances excluded when Uk equals U).
    candidates : {"7points", "4points"} or sequence of float, default "7points"
        The t grid: t ∈ {−1, −2/3, …, 1} (7 points) or {−1/2, 0, 1/2, 1}.
    sample_size : int, optional
        Use a random subset of this many columns of U (seeded by ``seed``).
    seed : int, optional
        Seed of the subsample.
    block_size : int, default 1000
        Columns of U per distance block (memory control only; the result does not depend on it).

    Returns
    -------
    BetaMedianResult
    """
    func = "nmfkc_kernel_beta_nearest_med"
    U = _coords(U, "U", func)
    if np.isnan(U).any() or np.isinf(U).any():
        raise param_error("U", func, "finite", "NaN or Inf values")
    if isinstance(candidates, str):
        if candidates not in _T_GRIDS:
            raise param_error("candidates", func, "'7points', '4points' or a sequence of floats", candidates)
        t_grid = np.array(_T_GRIDS[candidates])
    else:
        t_grid = np.asarray(candidates, dtype=float).ravel()
    N = U.shape[1]
    if N < 2:
        raise param_error("U", func, "an array with at least 2 columns", f"shape {U.shape}")
    if sample_size is not None:
        if int(sample_size) < 2:
            raise param_error("sample_size", func, "an int >= 2", sample_size)
        if int(sample_size) < N:
            idx = np.random.default_rng(seed).choice(N, int(sample_size), replace=False)
            U = U[:, np.sort(idx)]
            N = U.shape[1]
    block = max(1, int(block_size))
    uk_is_u = None
    if Uk is None:
        ref, exclude_self = U, True
    else:
        ref = _coords(Uk, "Uk", func)
        if ref.shape[0] != U.shape[0]:
            raise param_error("Uk", func, f"an array with {U.shape[0]} rows (as U)", f"shape {ref.shape}")
        uk_is_u = bool(ref.shape == U.shape and np.allclose(ref, U, rtol=1.5e-8, atol=0))
        exclude_self = uk_is_u
    min_d2 = np.empty(N)
    for i0 in range(0, N, block):
        i1 = min(i0 + block, N)
        d2 = _sq_dist(U[:, i0:i1], ref)
        if exclude_self:
            d2[np.arange(i1 - i0), np.arange(i0, i1)] = np.inf
        min_d2[i0:i1] = d2.min(axis=1)
    d_med = float(np.median(np.sqrt(min_d2)))
    if d_med <= 0:
        logger.warning("%s: the median nearest-neighbour distance is 0 (identical points); using sqrt(eps).", func)
        d_med = float(np.sqrt(np.finfo(float).eps))
    beta = 1.0 / (2.0 * d_med ** 2)
    return BetaMedianResult(beta=beta, beta_candidates=beta * 10.0 ** (-2.0 * t_grid), dist_median=d_med,
                            sample_size_used=N, uk_is_u=uk_is_u)
