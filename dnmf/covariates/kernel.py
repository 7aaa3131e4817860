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


def _select_gmm(X: np.ndarray, max_components: int, seed: int):
    """GaussianMixture ("full" covariances) with the number of components chosen by BIC over
    1..min(max_components, n_samples), as mclust does for its VVV model."""
    from sklearn.mixture import GaussianMixture

    best, best_bic = None, np.inf
    for g in range(1, min(max_components, X.shape[0]) + 1):
        gm = GaussianMixture(n_components=g, covariance_type="full", random_state=seed).fit(X)
        bic = gm.bic(X)
        if bic < best_bic:
            best, best_bic = gm, bic
    return best


def _conditional_atoms(P: np.ndarray, gm):
    """Each column of P (K × N, NaN = missing) as a mixture of K-dim Gaussians ("atoms").

    A complete column is one atom: weight 1, mean the column, covariance 0. A column with the
    missing set m and observed set o gives one atom per GMM component g: weight
    τ_g ∝ π_g·N(x_o; μ_g,o, Σ_g,oo), mean x with x_m = μ_g,m + Σ_g,mo Σ_g,oo⁻¹ (x_o − μ_g,o) and
    covariance zero except the m block Σ_g,mm − Σ_g,mo Σ_g,oo⁻¹ Σ_g,om.

    Returns owner (n_atoms,), weight (n_atoms,), mean (n_atoms, K), cov (n_atoms, K, K) and
    uncertain (n_atoms,) (whether the covariance is non-zero).
    """
    K, N = P.shape
    miss = np.isnan(P)
    complete = ~miss.any(axis=0)
    owner = [np.flatnonzero(complete)]
    weight = [np.ones(owner[0].size)]
    mean = [P[:, complete].T]
    cov = [np.zeros((owner[0].size, K, K))]
    log_pi, mu, Sig = np.log(gm.weights_), gm.means_, gm.covariances_
    G = mu.shape[0]
    patterns, inverse = np.unique(miss[:, ~complete].T, axis=0, return_inverse=True)
    cols_incomplete = np.flatnonzero(~complete)
    for p_idx, pat in enumerate(patterns):
        cols = cols_incomplete[np.ravel(inverse) == p_idx]
        m, o = np.flatnonzero(pat), np.flatnonzero(~pat)
        Xo = P[np.ix_(o, cols)].T                                        # (n, |o|)
        n = cols.size
        logw = np.empty((n, G))
        means = np.repeat(P[:, cols].T[:, None, :], G, axis=1)          # (n, G, K)
        covs = np.zeros((n, G, K, K))
        for g in range(G):
            S = Sig[g]
            if o.size:
                Soo, Smo = S[np.ix_(o, o)], S[np.ix_(m, o)]
                L = np.linalg.cholesky(Soo)
                r = Xo - mu[g, o]                                        # (n, |o|)
                z = np.linalg.solve(L, r.T)                              # L⁻¹ r
                logw[:, g] = (log_pi[g] - 0.5 * (z * z).sum(axis=0) - np.log(np.diag(L)).sum()
                              - 0.5 * o.size * np.log(2.0 * np.pi))
                A = np.linalg.solve(Soo, Smo.T).T                        # Σ_mo Σ_oo⁻¹
                means[:, g, m] = mu[g, m] + r @ A.T
                Smm = S[np.ix_(m, m)] - A @ Smo.T
            else:
                logw[:, g] = log_pi[g]
                means[:, g, m] = mu[g, m]
                Smm = S[np.ix_(m, m)]
            covs[:, g][:, m[:, None], m[None, :]] = 0.5 * (Smm + Smm.T)
        logw -= logw.max(axis=1, keepdims=True)
        w = np.exp(logw)
        w /= w.sum(axis=1, keepdims=True)
        owner.append(np.repeat(cols, G))
        weight.append(w.ravel())
        mean.append(means.reshape(n * G, K))
        cov.append(covs.reshape(n * G, K, K))
    owner, weight = np.concatenate(owner), np.concatenate(weight)
    mean, cov = np.concatenate(mean), np.concatenate(cov)
    return owner, weight, mean, cov, np.abs(cov).sum(axis=(1, 2)) > 0


def _expected_gaussian_kernel(mean_a, cov_a, mean_b, cov_b, beta: float) -> np.ndarray:
    """E exp(−β‖a − b‖²) for a ~ N(mean_a, cov_a) broadcast against one b ~ N(mean_b, cov_b),
    a and b independent: det(I + 2βΣ)^(−1/2)·exp(−β δᵀ(I + 2βΣ)⁻¹δ), δ = mean_a − mean_b,
    Σ = cov_a + cov_b."""
    K = mean_a.shape[-1]
    M = np.eye(K) + 2.0 * beta * (cov_a + cov_b)
    d = mean_a - mean_b
    _, logdet = np.linalg.slogdet(M)
    q = (d * np.linalg.solve(M, d[..., None])[..., 0]).sum(axis=-1)
    return np.exp(-0.5 * logdet - beta * q)


def _gaussian_kernel_egk(U: np.ndarray, V: np.ndarray, beta: float, symmetric: bool,
                         max_components: int, seed: int):
    """Expected Gaussian kernel under a GMM of the coordinates (see nmfkc_kernel, Notes)."""
    pts = U if symmetric else np.concatenate([U, V], axis=1)
    fit_data = pts[:, ~np.isnan(pts).any(axis=0)].T
    if fit_data.shape[0] < 2:
        raise InputError(f"The 'U' parameter of {_FUNC} must have at least 2 complete columns for "
                         f"na_method='egk' (the GMM is fitted to them). Got {fit_data.shape[0]} instead.")
    gm = _select_gmm(fit_data, max_components, seed)
    oa, wa, ma, Sa, ua = _conditional_atoms(U, gm)
    ob, wb, mb, Sb, ub = (oa, wa, ma, Sa, ua) if symmetric else _conditional_atoms(V, gm)
    K = U.shape[0]
    # Pairs with cov_b = 0: with Mₐ = I + 2βΣₐ and Pₐ = Mₐ⁻¹,
    # δᵀPₐδ = mₐᵀPₐmₐ − 2 mₐᵀPₐm_b + Σ_kl Pₐ,kl m_b,k m_b,l (three matrix products).
    Ma = np.eye(K) + 2.0 * beta * Sa
    Pa = np.linalg.inv(Ma)
    _, logdet_a = np.linalg.slogdet(Ma)
    Pm = np.einsum("akl,al->ak", Pa, ma)
    q = ((ma * Pm).sum(axis=1)[:, None] - 2.0 * Pm @ mb.T
         + Pa.reshape(-1, K * K) @ (mb[:, :, None] * mb[:, None, :]).reshape(-1, K * K).T)
    Kab = np.exp(-0.5 * logdet_a[:, None] - beta * np.maximum(q, 0.0))
    # Columns whose atom is uncertain: the full formula, batched over the U atoms.
    for b in np.flatnonzero(ub):
        Kab[:, b] = _expected_gaussian_kernel(ma, Sa, mb[b], Sb[b], beta)
    # Mixture → weighted sum over the atom pairs of each (i, j).
    Wa = np.zeros((U.shape[1], oa.size))
    Wa[oa, np.arange(oa.size)] = wa
    Wb = np.zeros((V.shape[1], ob.size))
    Wb[ob, np.arange(ob.size)] = wb
    Kmat = Wa @ Kab @ Wb.T
    if symmetric:
        np.fill_diagonal(Kmat, 1.0)  # a point is at distance 0 from itself
    return Kmat, int(gm.n_components)


def nmfkc_kernel(
    U=None,
    V=None,
    kernel: str = "Gaussian",
    *,
    beta=None,
    degree: int = 2,
    na_method: str = "pds",
    dist=None,
    gmm_max_components: int = 9,
    seed: int = 0,
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
    na_method : {"pds", "egk"}, default "pds"
        Gaussian with NaN in U or V. ``"pds"``: the squared distance is taken over the rows
        observed in both points and scaled by K / K_observed. ``"egk"``: the expected Gaussian
        kernel under a Gaussian mixture fitted to the complete coordinates (upstream uses mclust;
        see Notes). Without NaN both give the plain kernel.
    dist : array-like of shape (N, M), optional
        A precomputed distance matrix D instead of coordinates (Gaussian, Exponential, Periodic):
        the kernel of D is returned (e.g. ``exp(-beta·D²)``).
    gmm_max_components : int, default 9
        ``na_method="egk"``: the number of mixture components is chosen by BIC over
        1..gmm_max_components (mclust's default G = 1:9), capped at the number of complete points.
    seed : int, default 0
        ``na_method="egk"``: ``random_state`` of scikit-learn's ``GaussianMixture`` (k-means
        initialisation), so the kernel is reproducible.

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

    **Expected Gaussian kernel** (``na_method="egk"``). A Gaussian mixture
    p(x) = Σ_g π_g N(x; μ_g, Σ_g) with full covariances is fitted (scikit-learn
    ``GaussianMixture``, ``random_state=seed``) to the complete columns of U and V; the number of
    components is the BIC minimiser over 1..``gmm_max_components`` (mclust's VVV model; mclust also
    searches constrained covariance models, which are not tried here). A column x with missing set
    m and observed set o is replaced by its conditional distribution given x_o, the mixture
    Σ_g τ_g N(m_g, S_g) with

    * τ_g ∝ π_g N(x_o; μ_g,o, Σ_g,oo) (posterior component weights; τ = π when nothing is observed),
    * m_g = x with x_m := μ_g,m + Σ_g,mo Σ_g,oo⁻¹ (x_o − μ_g,o),
    * S_g = 0 except S_g,mm = Σ_g,mm − Σ_g,mo Σ_g,oo⁻¹ Σ_g,om.

    A complete column is the single atom N(x, 0). For z ~ N(δ, Σ) in R^K,
    E exp(−β‖z‖²) = det(I + 2βΣ)^(−1/2) exp(−β δᵀ(I + 2βΣ)⁻¹δ) (complete the square in the
    Gaussian integral). Columns u_i and v_j are taken independent, so u − v is Gaussian with
    mean m_a − m_b and covariance S_a + S_b for each pair of atoms, and

        A_ij = Σ_a Σ_b τ_a τ_b det(I + 2β(S_a + S_b))^(−1/2)
               exp(−β (m_a − m_b)ᵀ (I + 2β(S_a + S_b))⁻¹ (m_a − m_b)).

    With V omitted (the symmetric kernel) the diagonal is 1: a point is at distance 0 from
    itself, not from an independent copy. The GMM fit is recorded in ``params``
    (``{"beta": β, "na_method": "egk", "gmm_components": G}``).

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.covariates import nmfkc_kernel
    >>> U = np.array([[0.0, 1.0, 3.0]])
    >>> np.round(np.asarray(nmfkc_kernel(U, beta=0.5)), 4)[0]
    array([1.    , 0.6065, 0.0111])
    """
    kernel = check_option(kernel, "kernel", _FUNC, KERNELS)
    na_method = check_option(na_method, "na_method", _FUNC, ("pds", "egk"))
    if na_method == "egk":
        if not isinstance(gmm_max_components, (int, np.integer)) or isinstance(gmm_max_components, bool) \
                or gmm_max_components < 1:
            raise param_error("gmm_max_components", _FUNC, "an int >= 1", gmm_max_components)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise param_error("seed", _FUNC, "a non-negative int", seed)
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
        symmetric = V is None
        V = U if symmetric else _coords(V, "V", _FUNC)
        if U.shape[0] != V.shape[0]:
            raise param_error("V", _FUNC, f"an array with {U.shape[0]} rows (as U)", f"shape {V.shape}")
        has_nan = np.isnan(U).any() or np.isnan(V).any()
        if has_nan and kernel != "Gaussian":
            raise InputError(f"The 'U' parameter of {_FUNC} may contain NaN only for the Gaussian kernel. "
                             f"Got NaN with kernel={kernel!r} instead.")
        if np.isinf(U).any() or np.isinf(V).any():
            raise param_error("U", _FUNC, "finite (NaN only for missing coordinates)", "Inf values")
        if has_nan and na_method == "egk":
            Kmat, n_comp = _gaussian_kernel_egk(U, V, b, symmetric, int(gmm_max_components), int(seed))
            out = np.where(Kmat < 0, 0.0, Kmat).view(KernelMatrix)
            out.kernel, out.function_name = kernel, "nmfkc.kernel"
            out.params = {"beta": b, "na_method": "egk", "gmm_components": n_comp}
            return out
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
