"""NMF-RE inputs and df algebra, shared by every module of :mod:`dnmf.mixed` (spec §1, §4).

The bottom layer of the package: the engines (:mod:`.fit`, :mod:`.ecm`), the scan, the
inference, the cross-validation and the blocked fit import it; it imports none of them. The
numerics common with nmfkc (EPS, the variance clip, the ridge solve, the ICC, …) live in
:mod:`dnmf.covariates._common`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .._validation import param_error
from ..covariates._common import axis_names

__all__ = [
    "ENGINES",
    "DEFAULT_RATES",
    "df_u",
    "gram_eigenvalues",
    "lambda_for_cap",
    "Inputs",
    "to_matrix",
    "validate_inputs",
    "check_matrix_init",
    "check_seed_int",
]

#: Engines of :func:`dnmf.nmfre` (spec §0).
ENGINES = ("cap", "ecm")
#: df rates of the automatic scan: 0.1, …, 1.0 (spec §4.1).
DEFAULT_RATES = tuple(np.round(np.arange(1, 11) / 10, 10))


# ---------------------------------------------------------------------------------------------
# §1 random-effect degrees of freedom
# ---------------------------------------------------------------------------------------------


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
    import scipy.optimize  # here, not at import: `import dnmf.mixed` stays light

    return float(scipy.optimize.brentq(lambda x: df_u(d, n, x) - target, lam_min, hi, xtol=1e-300, rtol=1e-15,
                                       maxiter=500))


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


def to_matrix(value, name: str, func: str) -> np.ndarray:
    """``value`` (array, DataFrame or sparse matrix) as a float64 ndarray; a clear error otherwise."""
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
    Yv = to_matrix(Y, "Y", func)
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
        Av = to_matrix(A, "A", func)
        if Av.ndim == 1:
            Av = Av[None, :]
        if Av.ndim != 2:
            raise param_error("A", func, f"a 2-D array of shape (K, {N})", f"shape {Av.shape}")
        if Av.shape[1] != N:
            raise param_error("A", func, f"an array with {N} columns (one per column of Y)",
                              f"{Av.shape[1]} columns")
        if not np.all(np.isfinite(Av)):
            raise param_error("A", func, "finite (no NaN or Inf)", f"{int(np.sum(~np.isfinite(Av)))} non-finite values")
        cov = axis_names(A, 0)
    return Inputs(Yv, np.ascontiguousarray(Av), axis_names(Y, 0), axis_names(Y, 1), cov, A is not None)


def check_matrix_init(value, name: str, shape: tuple, func: str) -> Optional[np.ndarray]:
    """A user-supplied starting matrix of the given shape, or None."""
    if value is None:
        return None
    arr = to_matrix(value, name, func)
    if arr.shape != shape or not np.all(np.isfinite(arr)):
        raise param_error(name, func, f"a finite array of shape {shape}", f"shape {arr.shape}")
    return arr.copy()


def check_seed_int(seed, name: str, func: str) -> int:
    """R-style integer seed (None means the function's default, as R's ``...`` quirk, §12.15)."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise param_error(name, func, "a non-negative int", seed)
    return int(seed)
