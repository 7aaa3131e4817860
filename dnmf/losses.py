"""One registry of the NMF losses of RcppML (spec §6): value, zeros in closed form, IRLS weight,
variance function and dispersion update, each defined once.

Each :class:`Loss` works on arrays of observed values ``y`` and predictions ``μ`` of the same
(broadcastable) shape, in float64, so it can be applied to a dense block, to the stored entries of
a sparse block (1-D arrays), or chunk by chunk. Distribution parameters are scalars or arrays that
broadcast against ``y`` (per row: shape ``(m, 1)``; per column: ``(1, n)``).

=====================  ==========  ====================================================  ==============
name                   parameters  ℓ(y, μ) (§6.1)                                        zeros of sparse
=====================  ==========  ====================================================  ==============
``mse``                —           (y − μ)²                                              Gram identity
``kl``                 —           y log(y/μ) − y + μ (Poisson deviance / 2)             1ᵀWd · H1
``gp``                 theta       −log P_GP(y; μ, θ) − log y!                           1ᵀWd · H1 / (1+θ)
``nb``                 size        −log P_NB(y; μ, r) − log y!                           explicit
``gamma``              phi         2(−log(y/μ) + (y − μ)/μ) / φ                          outside support
``inverse_gaussian``   phi         (y − μ)² / (μ² y) / φ                                 outside support
``tweedie``            power, phi  Tweedie unit deviance / φ                             explicit (p<2)
=====================  ==========  ====================================================  ==============

"Zeros of sparse" says how ``Σ ℓ(0, μ)`` over the implicit zeros of a sparse matrix is obtained:
in closed form from the factors (``zero_total``), explicitly by forming μ chunk by chunk (the data
are never densified, but the cost is m·n·k), or not at all where y = 0 is outside the support of
the distribution (gamma, inverse Gaussian, Tweedie with p ≥ 2): those losses are evaluated over the
non-zero entries only, for dense and sparse data alike.

IRLS weights (§6.2, ``Loss.weight``): 1 (mse); ``1/max(μ, 1e-4)`` (kl, and gp whatever θ);
``r/(μ(r+μ))`` (nb); ``μ^−p`` with p = 2, 3, ``power`` (gamma, inverse Gaussian, Tweedie), μ ≥
1e-15 and capped at 1e6. ``Loss.objective`` is the weighted per-entry objective that the
multiplicative updates of :func:`dnmf.nmfkc` monitor (mse: ``w (y − μ)²``; kl: ``−w y log(μ + 1e-10)
+ w μ``, i.e. KL without its μ-free part ``y log y − y``).

Where this differs from spec §6.1 on purpose:

* gp at y = 0 is ``μ/(1+θ)`` (−log P(0)); the spec's table gives ``−log(μ/(1+θ)) + μ/(1+θ)``
  there, which is not a log-likelihood and does not reduce to Poisson at θ = 0. With this choice
  the §6.4 θ update converges to the maximum-likelihood θ of this loss (tested).
* kl at y = 0 is μ exactly (0·log 0 = 0) rather than flooring y at 1e-10, so that the zeros of
  sparse data sum in closed form.

The registry itself lives in ``dnmf._losses`` (pure NumPy, importable by the model and the
covariate layers); this module re-exports it on top of the helpers that fit models.

Module functions: :func:`get_loss` (lookup by name), :func:`update_dispersion` and
:func:`update_dispersion_sparse` (§6.4; the latter at nnz cost),
:func:`huber` / :func:`robust_weight` (§6.1–6.2 ``robust``), :func:`evaluate` / :func:`mse`
(RcppML §10.6) and :func:`suggest_loss` (RcppML ``auto_nmf_distribution``, §6.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._losses import (FLOOR, KL_OBJECTIVE_EPS, LOSSES, Loss, get_loss, huber, robust_delta, robust_loss,
                      robust_weight, update_dispersion, update_dispersion_sparse)
from ._validation import check_float, check_int, param_error

__all__ = ["Loss", "LOSSES", "get_loss", "update_dispersion", "update_dispersion_sparse", "huber", "robust_weight",
           "robust_delta", "robust_loss", "FLOOR", "KL_OBJECTIVE_EPS", "evaluate", "mse", "suggest_loss", "LossSuggestion", "REFERENCE_POWERS"]


# ---------------------------------------------------------------------------------------------
# Stand-alone helpers (RcppML §10.6)
# ---------------------------------------------------------------------------------------------


def evaluate(model, A: Any, loss: str = "mse", mask: Any = None, missing_only: bool = False,
             robust: Any = False, **loss_params: Any) -> float:
    """Mean loss of a fitted model on data A (RcppML ``evaluate``, spec §10.6).

    The same as :meth:`dnmf.NMFModel.evaluate`: double precision, a **mean** over the evaluated
    entries, sparse data read block by block and never densified.

    Parameters
    ----------
    model : NMFModel
    A : array-like of shape (m, n)
    loss : str, default "mse"
        A name of :data:`LOSSES`.
    mask : None, "zeros" or matrix of shape (m, n), optional
    missing_only : bool, default False
    robust : bool, float or "mae", default False
        Report Huber of the Pearson residual instead (True: δ = 1.345; "mae": δ = 1e-4; a
        number: δ).
    **loss_params
        ``theta``, ``size``, ``phi``, ``power`` as the loss takes them.

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.models import NMFModel
    >>> from dnmf.losses import evaluate
    >>> m = NMFModel(w=np.ones((2, 1)), d=np.array([2.0]), h=np.ones((1, 2)))
    >>> evaluate(m, np.array([[2.0, 3.0], [2.0, 1.0]]))
    0.5
    """
    from .models import NMFModel

    if not isinstance(model, NMFModel):
        raise param_error("model", "evaluate", "an NMFModel", type(model).__name__, described=True)
    return model.evaluate(A, loss=loss, mask=mask, missing_only=missing_only, robust=robust, **loss_params)


def mse(model_or_w, A: Any, d: Any = None, h: Any = None, *, mask: Any = None,
        missing_only: bool = False) -> float:
    """Mean squared error ``mean((A − W diag(d) H)²)`` (RcppML ``mse(w, d, h, data)``, spec §10.6).

    Parameters
    ----------
    model_or_w : NMFModel or array-like of shape (m, k)
        A fitted model, or its W.
    A : array-like of shape (m, n)
        The data; sparse data is read block by block (zeros in closed form).
    d : array-like of shape (k,), optional
        Scaling diagonal when W is given; default ones.
    h : array-like of shape (k, n)
        H, required when W is given.
    mask, missing_only
        As :meth:`dnmf.NMFModel.evaluate`.

    Returns
    -------
    float
    """
    from .models import NMFModel

    func = "mse"
    if isinstance(model_or_w, NMFModel):
        if d is not None or h is not None:
            raise param_error("d", func, "None when a model is given (its d and h are used)", "a value",
                              described=True)
        model = model_or_w
    else:
        w = np.asarray(model_or_w, dtype=np.float64)
        if w.ndim != 2:
            raise param_error("model_or_w", func, "an NMFModel or a matrix W of shape (m, k)",
                              f"an array of shape {w.shape}", described=True)
        if h is None:
            raise param_error("h", func, "a matrix of shape (k, n) when W is given", None)
        h = np.asarray(h, dtype=np.float64)
        d = np.ones(w.shape[1]) if d is None else np.asarray(d, dtype=np.float64).reshape(-1)
        if h.ndim != 2 or h.shape[0] != w.shape[1] or d.shape[0] != w.shape[1]:
            raise param_error("h", func, f"a ({w.shape[1]}, n) matrix and d of length {w.shape[1]} (k of W)",
                              f"h of shape {h.shape} and d of length {d.shape[0]}", described=True)
        model = NMFModel(w=w, d=d, h=h)
    return model.evaluate(A, loss="mse", mask=mask, missing_only=missing_only)


# ---------------------------------------------------------------------------------------------
# suggest_loss (RcppML auto_nmf_distribution, spec §6.6)
# ---------------------------------------------------------------------------------------------

#: Reference variance powers and the loss each points to (spec §6.6).
REFERENCE_POWERS = {0.0: "mse", 1.0: "gp", 2.0: "gamma", 3.0: "inverse_gaussian"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LossSuggestion:
    """What :func:`suggest_loss` found.

    Attributes
    ----------
    loss : str
        The recommended loss (a name of :data:`LOSSES`).
    loss_params : dict
        Parameters to fit it with (``{"power": p}`` for Tweedie, else empty).
    power : float
        Estimated variance–mean power p of ``Var(y) ∝ μ^p``: the slope of the weighted
        least-squares line of log(mean squared residual) on log(mean μ) over the bins.
    power_se : float
        Standard error of that slope (from the weighted fit's residuals).
    intercept : float
        Intercept of the line (log of the dispersion at μ = 1).
    table : pandas.DataFrame
        The evidence, one row per μ bin: ``mu_low``, ``mu_high`` (bin edges), ``n`` (entries),
        ``mean_mu``, ``mean_y``, ``variance`` (mean squared residual), ``zero_fraction``,
        ``used`` (bin had at least ``min_count`` entries and entered the fit).
    fit_sse : dict
        Sum of squared log-residuals (weighted) over the used bins of the one-parameter fits
        ``Var = φ μ^p`` for p = 0, 1, 2, 3, of the free-power line (``"power"``) and of
        ``Var = a μ + b μ²`` (``"nb"``, negative-binomial shape).
    model : NMFModel
        The MSE fit the residuals come from.
    """

    loss: str
    loss_params: dict
    power: float
    power_se: float
    intercept: float
    table: Any
    fit_sse: dict
    model: Any

    def plot(self, ax=None):
        """Variance against mean on log-log axes: the bins, the fitted line and the reference
        powers 0, 1, 2, 3 through the bins' weighted centre. Returns the matplotlib Figure."""
        from ._plotting import figure_axes

        fig, ax = figure_axes(ax, (5.0, 4.0))
        t = self.table
        used = t["used"].to_numpy()
        mu = t["mean_mu"].to_numpy()
        var = t["variance"].to_numpy()
        ax.scatter(mu[used], var[used], color="k", s=18, zorder=3, label="bins")
        if np.any(~used):
            ax.scatter(mu[~used], var[~used], color="0.6", s=10, zorder=2, label="bins (too few entries)")
        x = np.geomspace(mu[used].min(), mu[used].max(), 50)
        lx = np.log(x)
        w = t["n"].to_numpy()[used]
        cx = np.average(np.log(mu[used]), weights=w)
        cy = np.average(np.log(var[used]), weights=w)
        for k, p in enumerate(REFERENCE_POWERS):
            ax.plot(x, np.exp(cy + p * (lx - cx)), ls=":", color=f"C{k + 1}", lw=1,
                    label=f"p = {p:g} ({REFERENCE_POWERS[p]})")
        ax.plot(x, np.exp(self.intercept + self.power * lx), color="C0", lw=2,
                label=f"fit: p = {self.power:.2f} ± {self.power_se:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("mean of μ in bin")
        ax.set_ylabel("mean squared residual")
        ax.set_title(f"suggested loss: {self.loss}")
        ax.legend(fontsize="small")
        return fig


def _dense_chunks(blocked):
    """(first column, dense float64 chunk of A) over blocked A, at most ~_CHUNK entries each."""
    import scipy.sparse as sp

    bounds = blocked.col_bounds
    for j, block in enumerate(blocked.iter_blocks()):
        c0 = int(bounds[j])
        m, nj = block.shape
        step = max(1, _CHUNK // max(m, 1))
        if not isinstance(block, np.ndarray):
            block = sp.csc_array((block.data, block.indices, block.indptr), shape=(m, nj))
        for s in range(0, nj, step):
            e = min(s + step, nj)
            part = block[:, s:e]
            yield c0 + s, np.asarray(part.toarray() if sp.issparse(part) else part, dtype=np.float64)


def _weighted_line(x, y, w):
    """Weighted least-squares (intercept, slope, slope standard error, weighted SSE)."""
    X = np.column_stack([np.ones_like(x), x])
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)
    res = y - X @ coef
    sse = float(np.sum(w * res * res))
    dof = max(x.shape[0] - 2, 1)
    cov = sse / dof * np.linalg.inv((X * w[:, None]).T @ X)
    return float(coef[0]), float(coef[1]), float(np.sqrt(max(cov[1, 1], 0.0))), sse


def suggest_loss(A: Any, k: int, *, seed: int | None = 0, n_bins: int = 20, min_count: int = 30,
                 power_tol: float = 0.3, client: Any = None,
                 **nmf_kwargs: Any) -> LossSuggestion:
    """Recommend a loss for A from the variance–mean relation of an MSE fit's residuals
    (RcppML ``auto_nmf_distribution``, spec §6.6).

    Parameters
    ----------
    A : array-like of shape (m, n)
        Non-negative data (features × samples), anything :func:`dnmf.nmf` accepts.
    k : int
        Rank of the MSE fit.
    seed : int or None, default 0
        Seed of the fit.
    n_bins : int, default 20
        Number of log-spaced bins of μ.
    min_count : int, default 30
        Bins with fewer entries are shown but left out of the fit.
    power_tol : float, default 0.3
        A power within this distance of a reference power 0, 1, 2, 3 recommends that power's
        loss; otherwise Tweedie with the estimated power.
    client : distributed.Client, optional
        Passed to :func:`dnmf.nmf`.
    **nmf_kwargs
        Other arguments of :func:`dnmf.nmf` (``tol``, ``maxit``, ...).

    Returns
    -------
    LossSuggestion

    Notes
    -----
    With μ = W diag(d) H of the MSE fit, the entries (zeros included) are put in ``n_bins``
    log-spaced bins of μ; in each, ``variance`` is the mean of (y − μ)². The power p is the slope
    of log variance on log mean μ (bins weighted by their entry count). Rule (spec §6.6): p near 0 →
    ``"mse"``, near 1 → ``"gp"``, near 2 → ``"gamma"`` (or ``"nb"`` for integer-valued data on which
    the quadratic-plus-linear variance ``a μ + b μ²`` fits better than ``φ μ²``), near 3 → ``"inverse_gaussian"``, otherwise ``"tweedie"`` with power p
    (or, for 0 < p < 1, where no Tweedie distribution exists, the nearer of mse and gp).
    The ``a μ + b μ²`` shape alone does not tell NB from gamma: the error of the fitted μ adds
    variance at small μ, which a linear term absorbs, so continuous (non-integer) data are never
    called NB. The data are read in column chunks of about 2²⁰ entries (a sparse chunk is made dense to form
    the residuals of its zeros), twice: once for the range of μ, once for the bins.

    Examples
    --------
    >>> import numpy as np, dnmf
    >>> rng = np.random.default_rng(0)
    >>> mu = rng.uniform(1, 5, (60, 3)) @ rng.uniform(1, 5, (3, 80))
    >>> s = dnmf.suggest_loss(rng.poisson(mu).astype(float), k=3)
    >>> s.loss
    'gp'
    """
    import pandas as pd

    from .core import nmf
    from .io import as_blocked

    func = "suggest_loss"
    check_int(k, "k", func, low=1)
    check_int(n_bins, "n_bins", func, low=3)
    check_int(min_count, "min_count", func, low=1)
    check_float(power_tol, "power_tol", func, low=0.0, low_open=True, high=0.5)
    model = nmf(A, k, seed=seed, client=client, **nmf_kwargs)
    blocked = as_blocked(A)
    wd = np.asarray(model.w, dtype=np.float64) * np.asarray(model.d, dtype=np.float64)[None, :]
    h = np.asarray(model.h, dtype=np.float64)
    # 1. range of μ over the entries with μ > 0
    lo, hi = np.inf, 0.0
    for c0, y in _dense_chunks(blocked):
        mu = wd @ h[:, c0:c0 + y.shape[1]]
        pos = mu[mu > 1e-12]
        if pos.size:
            lo, hi = min(lo, float(pos.min())), max(hi, float(pos.max()))
    if not hi > lo:
        raise param_error("A", func, "data whose MSE fit has a range of positive predictions",
                          "a fit with constant or zero predictions", described=True)
    edges = np.geomspace(lo, hi * (1 + 1e-12), n_bins + 1)
    # 2. per-bin sums
    cnt, s_mu, s_y, s_r2, n_zero = (np.zeros(n_bins) for _ in range(5))
    integer_valued = True
    for c0, y in _dense_chunks(blocked):
        integer_valued = integer_valued and bool(np.all(y == np.round(y)))
        mu = wd @ h[:, c0:c0 + y.shape[1]]
        keep = mu > 1e-12
        b = np.clip(np.searchsorted(edges, mu[keep], side="right") - 1, 0, n_bins - 1)
        yk, mk = y[keep], mu[keep]
        cnt += np.bincount(b, minlength=n_bins)
        s_mu += np.bincount(b, mk, minlength=n_bins)
        s_y += np.bincount(b, yk, minlength=n_bins)
        s_r2 += np.bincount(b, (yk - mk) ** 2, minlength=n_bins)
        n_zero += np.bincount(b, (yk == 0).astype(float), minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_mu, mean_y, var, zf = s_mu / cnt, s_y / cnt, s_r2 / cnt, n_zero / cnt
    used = (cnt >= min_count) & (var > 0)
    table = pd.DataFrame({"mu_low": edges[:-1], "mu_high": edges[1:], "n": cnt.astype(np.int64),
                          "mean_mu": mean_mu, "mean_y": mean_y, "variance": var, "zero_fraction": zf,
                          "used": used})
    if used.sum() < 3:
        raise param_error("A", func, f"at least 3 bins of μ with {min_count} or more entries",
                          f"{int(used.sum())} such bins", described=True)
    lx, ly, wt = np.log(mean_mu[used]), np.log(var[used]), cnt[used]
    intercept, power, power_se, sse_line = _weighted_line(lx, ly, wt)
    fit_sse = {"power": sse_line}
    for p in REFERENCE_POWERS:
        r = ly - p * lx
        c = np.average(r, weights=wt)
        fit_sse[f"p={p:g}"] = float(np.sum(wt * (r - c) ** 2))
    # Var = a μ + b μ² (a, b ≥ 0) by non-negative least squares on the relative scale
    from scipy.optimize import nnls

    mu_u, var_u = mean_mu[used], var[used]
    sw = np.sqrt(wt) / var_u
    ab, _ = nnls(np.column_stack([mu_u, mu_u ** 2]) * sw[:, None], var_u * sw)
    pred = np.maximum(ab[0] * mu_u + ab[1] * mu_u ** 2, 1e-300)
    fit_sse["nb"] = float(np.sum(wt * (ly - np.log(pred)) ** 2))
    ref = min(REFERENCE_POWERS, key=lambda p: abs(power - p))
    params: dict = {}
    if abs(power - ref) <= power_tol:
        loss = REFERENCE_POWERS[ref]
        if loss == "gamma" and integer_valued and fit_sse["nb"] < fit_sse["p=2"]:
            loss = "nb"
    elif 0.0 < power < 1.0:  # no Tweedie distribution has 0 < p < 1: the nearer of mse and gp
        loss = "mse" if power < 0.5 else "gp"
    else:
        loss, params = "tweedie", {"power": float(power)}
    return LossSuggestion(loss=loss, loss_params=params, power=power, power_se=power_se, intercept=intercept,
                          table=table, fit_sse=fit_sse, model=model)
