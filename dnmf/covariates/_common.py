"""Helpers shared by ``nmfkc`` and ``nmfre`` (spec ``nmfre.md`` §1).

Everything here is small dense NumPy on factor-sized arrays (P × Q, Q × K, Q × N) and is
part of the contract between :mod:`dnmf.covariates` and :mod:`dnmf.mixed`; signatures are
kept stable.

Conventions (R's): ``vec`` is column-major, so element (q, k) of a Q × K matrix sits at
position ``q + Q·k`` of ``vec_cm``; the Hessian of ‖Y − XCA‖² in vec(C) is
``kron(A Aᵀ, Xᵀ X)``.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Sequence

import numpy as np

from .._validation import param_error

__all__ = [
    "EPS_MU",
    "CLIP_LO",
    "CLIP_HI",
    "clip_variance",
    "safe_div",
    "normalize_X",
    "basis_order",
    "reorder_basis",
    "basis_names",
    "dfU_from_lambda",
    "icc_trace",
    "r_squared_all",
    "r_squared_grand_mean",
    "colnorm",
    "effective_rank",
    "effective_rank_expected",
    "effective_rank_index",
    "vec_cm",
    "unvec_cm",
    "quantile_type7",
    "as_data_matrix",
    "as_covariate_matrix",
    "dot_id",
]

EPS_MU = 1e-10
"""Multiplicative-update guard ``eps`` of the R code (``.eps``)."""
CLIP_LO = 1e-12
CLIP_HI = 1e12


def clip_variance(v: float) -> float:
    """``min(max(v, 1e-12), 1e12)``: the clip applied to σ² and τ²."""
    return float(min(max(float(v), CLIP_LO), CLIP_HI))


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / max(den, 1e-10)`` elementwise with NaN/±Inf results set to 0 (``.nmfre.safe.div``)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = np.asarray(num, dtype=float) / np.maximum(den, 1e-10)
    out[~np.isfinite(out)] = 0.0
    return out


def normalize_X(X: np.ndarray, C: np.ndarray, U: np.ndarray | None = None):
    """Rescale columns of X to sum 1, moving the scale into C (and U): X(CA + U) unchanged.

    Parameters
    ----------
    X : ndarray of shape (P, Q)
    C : ndarray of shape (Q, K)
    U : ndarray of shape (Q, N) or None

    Returns
    -------
    X, C, U
        New arrays; ``d_q = max(colSum_q(X), 1e-12)``, X ← X D⁻¹, C ← D C, U ← D U.
    """
    d = np.maximum(X.sum(axis=0), 1e-12)
    X = X / d[None, :]
    C = C * d[:, None]
    if U is not None:
        U = U * d[:, None]
    return X, C, U


def basis_order(X: np.ndarray) -> np.ndarray:
    """Permutation sorting the basis by ``score_q = Σ_p (p/P)·X_pq`` (stable, like R ``order``)."""
    P = X.shape[0]
    w = np.arange(1, P + 1, dtype=float) / P
    score = w @ X
    return np.argsort(score, kind="stable")


def reorder_basis(order: np.ndarray, X: np.ndarray, *row_mats: np.ndarray | None):
    """Apply a basis permutation: columns of ``X``, rows of each of ``row_mats`` (None passes)."""
    out = [X[:, order]]
    for M in row_mats:
        out.append(None if M is None else M[order, ...])
    return tuple(out)


def basis_names(prefix: str, Q: int) -> tuple[str, ...]:
    """``paste0(prefix, 1:Q)``."""
    return tuple(f"{prefix}{q + 1}" for q in range(Q))


def dfU_from_lambda(d: np.ndarray, N: int, lam: float) -> float:
    """``df_U(λ) = N·Σ_q d_q/(d_q + λ)`` with ``d`` the eigenvalues of XᵀX (clipped at 0)."""
    d = np.maximum(np.asarray(d, dtype=float), 0.0)
    lam = max(float(lam), 1e-12)
    return float(N * np.sum(d / (d + lam)))


def icc_trace(X: np.ndarray, sigma2: float, tau2: float) -> float:
    """Trace ICC: ``τ²·tr(XᵀX) / (τ²·tr(XᵀX) + σ²·P)``."""
    tr = float(np.sum(X * X))
    P = X.shape[0]
    den = tau2 * tr + sigma2 * P
    return float(tau2 * tr / den) if den > 0 else float("nan")


def r_squared_all(Y: np.ndarray, fit: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """The three R² of ``.r.squared.all`` over cells with weight > 0.

    Returns
    -------
    dict
        ``r_squared`` = cor(Y, fit)², ``r_squared_uncentered`` = 1 − SSE/ΣY²,
        ``r_squared_centered`` = 1 − SSE/Σ(Y − row mean)²; NaN where undefined.
    """
    Y = np.asarray(Y, dtype=float)
    valid = np.ones(Y.shape, dtype=bool) if weights is None else (np.asarray(weights) > 0)
    nan = float("nan")
    if valid.sum() < 2:
        return {"r_squared": nan, "r_squared_uncentered": nan, "r_squared_centered": nan}
    y = Y[valid]
    f = np.asarray(fit, dtype=float)[valid]
    sse = float(np.sum((y - f) ** 2))
    sy, sf = np.std(y), np.std(f)
    r2 = float(np.corrcoef(y, f)[0, 1] ** 2) if sy > 0 and sf > 0 else nan
    ss_y = float(np.sum(y * y))
    r2u = 1.0 - sse / ss_y if np.isfinite(ss_y) and ss_y > 0 else nan
    cnt = valid.sum(axis=1)
    rsum = np.where(valid, Y, 0.0).sum(axis=1)
    rmean = np.divide(rsum, cnt, out=np.zeros_like(rsum), where=cnt > 0)
    ss_c = float(np.sum(np.where(valid, (Y - rmean[:, None]) ** 2, 0.0)))
    r2c = 1.0 - sse / ss_c if np.isfinite(ss_c) and ss_c > 0 else nan
    return {"r_squared": r2, "r_squared_uncentered": r2u, "r_squared_centered": r2c}


def r_squared_grand_mean(Y: np.ndarray, fit: np.ndarray) -> float:
    """``1 − ‖Y − fit‖² / Σ(Y − mean(Y))²`` (the legacy R² of nmfre at 56d65eb)."""
    Y = np.asarray(Y, dtype=float)
    sst = float(np.sum((Y - Y.mean()) ** 2))
    return 1.0 - float(np.sum((Y - fit) ** 2)) / sst if sst > 0 else float("nan")


def colnorm(B: np.ndarray) -> np.ndarray:
    """Divide each column by ``max(colSum, 1e-12)``."""
    return B / np.maximum(B.sum(axis=0), 1e-12)[None, :]


def effective_rank(B: np.ndarray) -> float:
    """exp(Shannon entropy) of the row-variance shares of B (Q × N); NaN when Q < 2 or N < 2."""
    Q, N = B.shape
    if Q < 2 or N < 2:
        return float("nan")
    v = np.var(B, axis=1, ddof=1)
    s = float(np.nansum(v))
    if not np.isfinite(s) or s <= 0:
        return float("nan")
    p = v / s
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def effective_rank_expected(Q: int) -> float:
    """``exp(H_Q − 1)`` with H_Q the Q-th harmonic number (expected value for flat shares)."""
    h = sum(1.0 / i for i in range(1, int(Q) + 1))
    return float(math.exp(h - 1.0))


def effective_rank_index(r: float, Q: int) -> float:
    """``(r − e^{H_Q−1}) / (Q − e^{H_Q−1})`` clamped to [0, 1]; NaN when undefined (Q = 1)."""
    e = effective_rank_expected(Q)
    if not np.isfinite(r) or Q - e <= 0:
        return float("nan")
    return float(min(1.0, max(0.0, (r - e) / (Q - e))))


def vec_cm(M: np.ndarray) -> np.ndarray:
    """Column-major vec (R ``as.vector``)."""
    return np.asarray(M).reshape(-1, order="F")


def unvec_cm(v: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`vec_cm`."""
    return np.asarray(v).reshape(shape, order="F")


def quantile_type7(x: np.ndarray, probs: Sequence[float], axis: int = -1) -> np.ndarray:
    """R's default ``quantile(type=7)`` (NumPy's ``linear`` method)."""
    return np.quantile(x, probs, axis=axis, method="linear")


def axis_names(obj, axis: int):
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        return None
    if isinstance(obj, pd.DataFrame):
        idx = obj.index if axis == 0 else obj.columns
        if isinstance(idx, pd.RangeIndex):
            return None
        return tuple(str(v) for v in idx)
    return None


def as_data_matrix(Y: Any, func: str, name: str = "Y", *, allow_nan: bool = True):
    """Validate Y: a non-negative 2-D real array (a 1-D vector is one row, like R).

    NaN cells are allowed (they get weight 0) when ``allow_nan``; ±Inf and negative values
    raise :class:`~dnmf.exceptions.InputError`.

    Returns
    -------
    Y : ndarray of shape (P, N), float64
    row_names, col_names : tuple of str or None
        From a pandas DataFrame's index/columns (like R's dimnames), else None.
    """
    rows, cols = axis_names(Y, 0), axis_names(Y, 1)
    try:
        arr = np.array(Y, dtype=float)
    except (TypeError, ValueError) as e:
        raise param_error(name, func, "a 2-D array of non-negative reals", type(Y).__name__) from e
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise param_error(name, func, "a non-empty 2-D array of shape (P, N)", f"an array of shape {arr.shape}")
    if np.isinf(arr).any():
        raise param_error(name, func, "finite (NaN marks a missing cell)", "an array containing Inf")
    if not allow_nan and np.isnan(arr).any():
        raise param_error(name, func, "free of NaN", "an array containing NaN")
    if np.isnan(arr).all():
        raise param_error(name, func, "an array with at least one observed cell", "an all-NaN array")
    if np.nanmin(arr) < 0:
        raise param_error(name, func, "non-negative", f"an array with minimum {float(np.nanmin(arr))!r}")
    return arr, rows, cols


def as_covariate_matrix(A: Any, N: int, func: str, *, nonneg: bool = True):
    """Validate A (K × N): finite, no NaN, ``N`` columns, non-negative when ``nonneg``.

    Returns
    -------
    A : ndarray of shape (K, N), float64
    names : tuple of str or None
        ``rownames(A)`` from a DataFrame index.
    """
    names = axis_names(A, 0)
    try:
        arr = np.array(A, dtype=float)
    except (TypeError, ValueError) as e:
        raise param_error("A", func, "a 2-D real array of shape (K, N)", type(A).__name__) from e
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise param_error("A", func, f"a 2-D array of shape (K, {N})", f"an array of shape {arr.shape}")
    if arr.shape[1] != N:
        raise param_error("A", func, f"an array with {N} columns (one per column of Y)", f"shape {arr.shape}")
    if np.isnan(arr).any():
        raise param_error("A", func, "free of NaN (impute or remove missing covariates)", "an array containing NaN")
    if np.isinf(arr).any():
        raise param_error("A", func, "finite", "an array containing Inf")
    if nonneg and arr.min() < 0:
        raise param_error("A", func, "non-negative", f"an array with minimum {float(arr.min())!r}")
    return arr, names


def check_rank_vs_shape(Q: int, P: int, N: int, func: str, data_name: str = "Y") -> None:
    """Warn when the rank exceeds min(P, N): accepted (as in R), but the basis is not identifiable."""
    if Q > min(P, N):
        warnings.warn(
            f"{func}: rank = {Q} is above min(P, N) = {min(P, N)} for the {P} × {N} {data_name}; the fit runs (as "
            f"in R) but some basis vectors are redundant and not identifiable. Lower rank (currently {Q}).",
            UserWarning,
            stacklevel=3,
        )


_DOT_BAD = re.compile(r"[^A-Za-z0-9_.]")


def dot_id(s: str) -> str:
    """A DOT node id: characters outside ``[A-Za-z0-9_.]`` replaced by ``_``."""
    return _DOT_BAD.sub("_", str(s))


def stars(p: float) -> str:
    """Significance stars (a single space when none)."""
    if not np.isfinite(p):
        return " "
    if p < 0.001:
        return "***"
    if p < 0.01:
        return "**"
    if p < 0.05:
        return "*"
    if p < 0.1:
        return "."
    return " "
