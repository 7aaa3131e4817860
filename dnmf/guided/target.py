"""Class targets from labels (RcppML ``compute_target``, guided spec §1)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validation import param_error
from ._labels import as_factor

__all__ = ["compute_target", "oas_shrinkage", "zca_matrix"]


def _as_matrix(H: Any, name: str, func: str) -> np.ndarray:
    """``H`` as a finite 2-D float64 array (k × n), else InputError naming ``name``."""
    try:
        arr = np.asarray(H.toarray() if hasattr(H, "toarray") else H, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise param_error(name, func, "a k x n numeric matrix", type(H).__name__, described=True) from e
    if arr.ndim != 2:
        raise param_error(name, func, "a k x n matrix (2-D)", f"an array with {arr.ndim} dimension(s)",
                          described=True)
    if not np.all(np.isfinite(arr)):
        raise param_error(name, func, "a finite k x n matrix", "a matrix with NaN or Inf", described=True)
    return arr


def oas_shrinkage(S: np.ndarray, n_eff: float) -> float:
    """RcppML's OAS shrinkage intensity ρ for a k × k scatter ``S`` (guided spec §1.2).

    ``ρ = ((1 − 2/k)·tr(S²) + tr(S)²) / ((n_eff + 1 − 2/k)·(tr(S²) − tr(S)²/k))``, clipped to
    [0, 1], and 1 when the denominator is below 1e-12 in absolute value (an absolute threshold,
    kept literally). This is Chen et al.'s original OAS formula; scikit-learn's ``OAS`` uses a
    different (corrected) numerator and denominator and an exact-zero test, so it is not used.
    """
    k = S.shape[0]
    tr = float(np.trace(S))
    tr2 = float(np.sum(S * S))
    num = (1.0 - 2.0 / k) * tr2 + tr * tr
    den = (n_eff + 1.0 - 2.0 / k) * (tr2 - tr * tr / k)
    if abs(den) < 1e-12:
        return 1.0
    return float(min(max(num / den, 0.0), 1.0))


def zca_matrix(S: np.ndarray, n_eff: float) -> np.ndarray:
    """ZCA whitening matrix ``Z = V diag(1/√s) Vᵀ`` of the OAS-shrunk scatter (spec §1.2)."""
    k = S.shape[0]
    rho = oas_shrinkage(S, n_eff)
    shrunk = (1.0 - rho) * S + rho * (np.trace(S) / k) * np.eye(k)
    s, V = np.linalg.eigh(shrunk)
    s = np.maximum(s, 1e-10)
    return (V / np.sqrt(s)) @ V.T


def compute_target(H: Any, labels: Any, whiten: bool = True) -> np.ndarray:
    """Build a k × n class target for guided NMF (RcppML ``compute_target``).

    Parameters
    ----------
    H : array-like of shape (k, n)
        An embedding with samples as columns, usually ``model.h`` of a previous fit. To target W
        pass a k × m matrix (e.g. ``model.w.T``) yourself.
    labels : array-like of shape (n,)
        Class of each sample; missing values (None, NaN) mark unlabeled samples. Coerced like
        R's ``as.factor`` (sorted unique values; a pandas Categorical keeps its levels, unused
        ones included).
    whiten : bool, default True
        Whiten the centroids with the OAS-shrunk ZCA transform of the between-class scatter.

    Returns
    -------
    ndarray of shape (k, n), float64
        ``T[:, j] = μ_{y_j} − ḡ`` (class centroid minus the unweighted mean of non-empty class
        centroids, whitened when asked); 0 for unlabeled samples.

    Raises
    ------
    InputError
        If ``H`` is not a finite 2-D matrix or ``labels`` does not have length n.

    Notes
    -----
    With C levels (empty ones included), n_c labeled samples in class c and N = Σ n_c:
    μ_c = mean of class c's columns (0 if empty), ḡ = mean of the non-empty μ_c. When whitening
    and C > 1, X has columns √max(n_c, 1)·(μ_c − ḡ), S = XXᵀ/N, ρ = OAS shrinkage
    (:func:`oas_shrinkage`, with RcppML's absolute 1e-12 test), S* = (1−ρ)S + ρ·tr(S)/k·I,
    Z = S*^{-1/2} (eigenvalues floored at 1e-10), μ_c ← Zμ_c, ḡ ← Zḡ. An empty level adds the
    column −ḡ to X (an RcppML quirk, kept). Whitening is skipped when C = 1.

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.guided import compute_target
    >>> H = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    >>> compute_target(H, ["a", "a", "b", "b"], whiten=False)
    array([[ 0.5,  0.5, -0.5, -0.5],
           [-0.5, -0.5,  0.5,  0.5]])
    """
    func = "compute_target"
    H = _as_matrix(H, "H", func)
    k, n = H.shape
    codes, levels = as_factor(labels, n, "labels", func)
    if not isinstance(whiten, (bool, np.bool_)):
        raise param_error("whiten", func, "a bool", whiten)
    C = len(levels)
    T = np.zeros((k, n))
    if C == 0:
        return T
    counts = np.bincount(codes[codes >= 0], minlength=C).astype(np.float64)
    mu = np.zeros((k, C))
    labeled = codes >= 0
    np.add.at(mu.T, codes[labeled], H[:, labeled].T)
    nonempty = counts > 0
    mu[:, nonempty] /= counts[nonempty]
    g = mu[:, nonempty].mean(axis=1)
    if whiten and C > 1:
        X = (mu - g[:, None]) * np.sqrt(np.maximum(counts, 1.0))
        N = counts.sum()
        Z = zca_matrix(X @ X.T / N, N)
        mu = Z @ mu  # empty levels stay 0
        g = Z @ g
    T[:, labeled] = mu[:, codes[labeled]] - g[:, None]
    return T
