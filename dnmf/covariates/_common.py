"""Helpers shared by ``nmfkc`` (:mod:`dnmf.covariates`) and NMF-RE (:mod:`dnmf.mixed`).

The one module both packages import for their common numerics (spec ``nmfre.md`` §1):
constants, the variance clip, the guarded division, the column normalisation, the basis
order, the ridge Cholesky solve, the ICC, the executor context, labels, significance stars
and input checks. Everything is small dense NumPy on factor-sized arrays (P × Q, Q × K,
Q × N). It imports nothing from either package, so both import it downwards.

Conventions (R's): ``vec`` is column-major, so element (q, k) of a Q × K matrix sits at
position ``q + Q·k`` of ``vec_cm``; the Hessian of ‖Y − XCA‖² in vec(C) is
``kron(A Aᵀ, Xᵀ X)``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import warnings
from typing import Any, Sequence

import numpy as np

from .._validation import param_error
from ..exceptions import DnmfError

__all__ = [
    "EPS",
    "CLIP_LO",
    "CLIP_HI",
    "LAMBDA_FLOOR",
    "clip_var",
    "safe_div",
    "normalize_columns",
    "basis_order",
    "basis_names",
    "colnorm",
    "cholesky_spd",
    "ridge_solve",
    "icc",
    "executor_for",
    "theta_scores",
    "theta_information",
    "seed_root",
    "chunk_seed",
    "chunk_bounds",
    "r_squared_all",
    "effective_rank",
    "effective_rank_expected",
    "effective_rank_index",
    "vec_cm",
    "unvec_cm",
    "quantile_type7",
    "axis_names",
    "as_data_matrix",
    "as_covariate_matrix",
    "check_rank_vs_shape",
    "dot_id",
    "stars",
]

EPS = 1e-10
"""Multiplicative-update guard ``eps`` of the R code (``.eps``; spec §1)."""
CLIP_LO, CLIP_HI = 1e-12, 1e12
"""Bounds of σ² and τ² (spec §1)."""
LAMBDA_FLOOR = 1e-12
"""Smallest ridge λ = σ²/τ² used by the NMF-RE solves."""


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
    """Permutation sorting the basis by ``score_q = Σ_p (p/P)·X_pq`` (stable, like R ``order``)."""
    P = X.shape[0]
    w = np.arange(1, P + 1, dtype=float) / P
    score = w @ X
    return np.argsort(score, kind="stable")


def basis_names(prefix: str, Q: int) -> tuple[str, ...]:
    """``paste0(prefix, 1:Q)``."""
    return tuple(f"{prefix}{q + 1}" for q in range(Q))


def colnorm(B: np.ndarray) -> np.ndarray:
    """Each column divided by ``max(colSum, 1e-12)`` (spec §3.5 ``B.prob``)."""
    return B / np.maximum(B.sum(axis=0), 1e-12)[None, :]


def cholesky_spd(M: np.ndarray, what: str = "X'X + lambda*I", func: str = "nmfre") -> np.ndarray:
    """Lower Cholesky factor of the ridge matrix M; a clear error when M is not SPD."""
    try:
        return np.linalg.cholesky(M)
    except np.linalg.LinAlgError as e:
        raise DnmfError(f"{func}: {what} is not symmetric positive definite (Cholesky failed).") from e


def ridge_solve(L: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``M⁻¹ rhs`` from the lower Cholesky factor ``L`` of M (LAPACK potrs, called directly: the
    ECM loop solves in every iteration)."""
    from ..solvers._lapack import cho_solve_lower  # here, not at import: `import dnmf.covariates` stays light

    return cho_solve_lower(L, np.asarray(rhs, dtype=np.float64))


def icc(X: np.ndarray, sigma2: float, tau2: float) -> float:
    """Trace ICC ``τ²·tr(XᵀX) / (τ²·tr(XᵀX) + σ²·P)`` (NaN when the denominator is not positive)."""
    tr = float(np.sum(X * X))
    den = tau2 * tr + sigma2 * X.shape[0]
    return float(tau2 * tr / den) if den > 0 else float("nan")


@contextlib.contextmanager
def executor_for(client):
    """The executor of ``client`` (see :func:`dnmf.engine.executor.get_executor`), closed after use.

    ``client=None`` gives a local thread pool: leaving the context closes it, so no call leaks
    threads.
    """
    from ..engine.executor import get_executor

    ex = get_executor(client)
    try:
        yield ex
    finally:
        close = getattr(ex, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------------------------------------
# Inference on Θ: one set of formulas and one bootstrap seeding scheme for nmfkc and NMF-RE
# ---------------------------------------------------------------------------------------------


def theta_scores(X: np.ndarray, R: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Unscaled scores ``S̃[:, n] = a_n ⊗ Xᵀr_n`` of vec(Θ) (column-major), shape (QK, N).

    The score of column n is ``−S̃[:, n]/σ²``; both inference modules scale it themselves.
    """
    XtR = X.T @ R  # Q × N
    K, N = A.shape
    return (A[:, None, :] * XtR[None, :, :]).reshape(K * XtR.shape[0], N)


def theta_information(XtX: np.ndarray, AAt: np.ndarray, sigma2: float, Minv: np.ndarray | None = None,
                      ridge: float = 1e-8) -> np.ndarray:
    """Information of vec(Θ): ``AAᵀ ⊗ (XᵀX − XᵀX M⁻¹ XᵀX) / σ² + ridge·I`` (QK × QK).

    NMF-RE profiles the random effects out with ``M = XᵀX + λI``; nmfkc has none, which is
    ``M⁻¹ = 0`` (``Minv=None``: the Gram is used as is, with no subtraction).
    """
    G = XtX if Minv is None else XtX - XtX @ Minv @ XtX
    return np.kron(AAt, G) / sigma2 + ridge * np.eye(G.shape[0] * AAt.shape[0])


def seed_root(seed, func: str = "nmfre_inference") -> np.random.SeedSequence:
    """The root SeedSequence of a ``seed`` argument (int, SeedSequence, Generator or None)."""
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, np.random.Generator):
        return np.random.SeedSequence(int(seed.integers(0, 2**63)))
    if seed is None:
        return np.random.SeedSequence()
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0:
        return np.random.SeedSequence(int(seed))
    raise param_error("seed", func, "None, a non-negative int, a SeedSequence or a Generator", seed)


def chunk_seed(root: np.random.SeedSequence, *key: int) -> np.random.SeedSequence:
    """Seed of the bootstrap task addressed by ``key`` under ``root``.

    Equal to a ``root.spawn`` child addressed by key instead of by spawn order (``key=(i,)``
    is the i-th child), so any task can rebuild its own seed: nmfkc keys its chunks by
    ``(chunk,)``, NMF-RE by ``(column block, chunk)``.
    """
    return np.random.SeedSequence(root.entropy, spawn_key=tuple(root.spawn_key) + tuple(int(k) for k in key),
                                  pool_size=root.pool_size)


def chunk_bounds(n_rep: int, chunk: int) -> list[tuple[int, int]]:
    """Replicate ranges ``[b0, b1)`` of the bootstrap tasks, fixed by ``n_rep`` and ``chunk`` alone.

    So the draws never depend on the number of workers.
    """
    return [(b0, min(b0 + chunk, n_rep)) for b0 in range(0, n_rep, chunk)]


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


def check_rank_vs_shape(Q: int, P: int, N: int, func: str, data_name: str = "Y", stacklevel: int = 3) -> None:
    """Warn when the rank exceeds min(P, N): accepted (as in R), but the basis is not identifiable."""
    if Q > min(P, N):
        warnings.warn(
            f"{func}: rank = {Q} is above min(P, N) = {min(P, N)} for the {P} × {N} {data_name}; the fit runs (as "
            f"in R) but some basis vectors are redundant and not identifiable. Lower rank (currently {Q}).",
            UserWarning,
            stacklevel=stacklevel,
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
