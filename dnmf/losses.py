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

Module functions: :func:`get_loss` (lookup by name), :func:`update_dispersion` (§6.4),
:func:`huber` / :func:`robust_weight` (§6.1–6.2 ``robust``), :func:`evaluate` / :func:`mse`
(RcppML §10.6) and :func:`suggest_loss` (RcppML ``auto_nmf_distribution``, §6.6).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from scipy.special import gammaln, xlogy

from ._validation import check_float, check_int, check_option, param_error

__all__ = ["Loss", "LOSSES", "get_loss", "update_dispersion", "huber", "robust_weight", "evaluate", "mse",
           "suggest_loss", "LossSuggestion", "REFERENCE_POWERS"]

#: Floor of y and μ inside logarithms and ratios (spec §6.1).
FLOOR = 1e-10
#: Floor of μ in the NB / gamma / IG / Tweedie IRLS weights and their cap (spec §6.2).
_W_MU_FLOOR, _W_CAP = 1e-15, 1e6
#: Floor of μ in the KL / GP IRLS weight (spec §6.2).
_KL_W_FLOOR = 1e-4


# ---------------------------------------------------------------------------------------------
# Elementwise values, weights, variances
# ---------------------------------------------------------------------------------------------


def _f(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _mse_value(y, mu):
    r = _f(y) - _f(mu)
    return r * r


def _mse_zero_total(wd, h):
    # Σ_ij (W d H)_ij² = tr((W d)ᵀ(W d) · H Hᵀ)
    return float(np.sum((wd.T @ wd) * (h @ h.T)))


def _kl_value(y, mu):
    # y log(y/μ) − y + μ with μ floored at 1e-10 where y > 0; 0·log 0 = 0, so ℓ(0, μ) = μ exactly
    # (which keeps the total over the zeros of sparse data in closed form).
    y, mu = np.broadcast_arrays(_f(y), _f(mu))
    out = np.array(mu, dtype=np.float64)
    pos = y > 0
    yp, mu_pos = y[pos], np.maximum(mu[pos], FLOOR)
    out[pos] = yp * np.log(yp / mu_pos) - yp + mu_pos
    return out


def _kl_zero_total(wd, h):
    # Σ_ij μ_ij = (1ᵀ W d)(H 1)
    return float(wd.sum(axis=0) @ h.sum(axis=1))


def _kl_weight(y, mu):
    return 1.0 / np.maximum(_f(mu), _KL_W_FLOOR)


def _gp_value(y, mu, theta=0.1):
    # Generalized Poisson with mean μ and dispersion θ: λ₁ = μ/(1+θ), λ₂ = θ/(1+θ),
    # P(y) = λ₁ (λ₁ + λ₂ y)^(y−1) exp(−λ₁ − λ₂ y) / y!;  ℓ = −log P(y) − log y!.
    y, mu, theta = np.broadcast_arrays(_f(y), _f(mu), _f(theta))
    one_t = 1.0 + theta
    mu_f = np.maximum(mu, FLOOR)
    pos = y >= 1
    lin = (mu_f + theta * y) / one_t
    log_term = np.where(pos, (y - 1.0) * np.log(np.maximum(lin, FLOOR)), 0.0)
    # y = 0: P(0) = exp(−λ₁), ℓ = λ₁ (spec §6.1's table writes −log λ₁ + λ₁ there [quirk]; that is
    # not a log-likelihood, and it would leave Σ over the zeros without a closed form)
    return np.where(pos, -np.log(mu_f / one_t) - log_term + lin, mu / one_t)


def _gp_zero_total(wd, h, theta=0.1):
    # ℓ(0, μ) = μ/(1+θ): Σ_ij c_ij μ_ij for c = 1/(1+θ) scalar, per row (m, 1) or per column (1, n)
    c = 1.0 / (1.0 + _f(theta))
    if c.ndim == 0 or c.size == 1:
        return float(c.reshape(()) * (wd.sum(axis=0) @ h.sum(axis=1)))
    if c.shape[-1] == 1:  # per row
        return float(c.reshape(-1) @ wd @ h.sum(axis=1))
    if c.ndim == 2 and c.shape[0] == 1:  # per column
        return float(wd.sum(axis=0) @ (h @ c.reshape(-1)))
    return float(np.sum(c * (wd @ h)))


def _nb_value(y, mu, size=10.0):
    # ℓ = −lgamma(y+r) + lgamma(r) − r log(r/(r+μ)) − y log(μ/(r+μ))  (= −log P_NB(y) − log y!)
    y, mu, r = np.broadcast_arrays(_f(y), _f(mu), _f(size))
    mu_f = np.maximum(mu, FLOOR)
    return (-gammaln(y + r) + gammaln(r) + r * np.log1p(mu / r)
            - xlogy(y, mu_f) + xlogy(y, r + mu_f))


def _nb_weight(y, mu, size=10.0):
    mu = np.maximum(_f(mu), _W_MU_FLOOR)
    r = _f(size)
    return np.minimum(r / (mu * (r + mu)), _W_CAP)


def _gamma_value(y, mu, phi=1.0):
    y = np.maximum(_f(y), FLOOR)
    mu = np.maximum(_f(mu), FLOOR)
    return 2.0 * (-np.log(y / mu) + (y - mu) / mu) / _f(phi)


def _ig_value(y, mu, phi=1.0):
    y = np.maximum(_f(y), FLOOR)
    mu = np.maximum(_f(mu), FLOOR)
    r = y - mu
    return r * r / (mu * mu * y) / _f(phi)


def _tweedie_value(y, mu, power=1.5, phi=1.0):
    p = float(power)
    y, mu = np.broadcast_arrays(_f(y), _f(mu))
    if p == 0:
        dev = (y - mu) ** 2
    elif p == 1:
        dev = 2.0 * _kl_value(y, mu)
    elif p == 2:
        dev = _gamma_value(y, mu)
    else:
        mu = np.maximum(mu, FLOOR)
        y_term = np.power(np.maximum(y, 0.0), 2.0 - p) if p < 2 else np.power(np.maximum(y, FLOOR), 2.0 - p)
        dev = 2.0 * (y_term / ((1.0 - p) * (2.0 - p)) - y * np.power(mu, 1.0 - p) / (1.0 - p)
                     + np.power(mu, 2.0 - p) / (2.0 - p))
    return dev / _f(phi)


def _power_weight(power):
    def weight(y, mu, **params):
        p = float(params.get("power", power))
        mu = np.maximum(_f(mu), _W_MU_FLOOR)
        return np.minimum(np.power(mu, -p), _W_CAP)
    return weight


def _unit_weight(y, mu, **params):
    return np.ones(np.broadcast_shapes(np.shape(y), np.shape(mu)))


def _check_positive(name, func):
    def check(value):
        return _check_param_array(value, name, func, low=0.0, low_open=True)
    return check


def _check_param_array(value, name, func, *, low=None, low_open=False):
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return check_float(value, name, func, low=low, low_open=low_open)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise param_error(name, func, "a float or an array of floats", type(value).__name__) from e
    bad = ~np.isfinite(arr)
    if low is not None:
        bad |= (arr <= low) if low_open else (arr < low)
    if arr.ndim > 2 or np.any(bad):
        interval = f"{'(' if low_open else '['}{low}, inf)" if low is not None else "(-inf, inf)"
        raise param_error(name, func, f"a float or a (m, 1) / (1, n) array of floats in {interval}",
                          f"an array of shape {arr.shape} with {int(np.sum(bad))} value(s) outside it",
                          described=True)
    return arr


@dataclass(frozen=True)
class Loss:
    """One loss of the registry.

    Attributes
    ----------
    name : str
        Registry key.
    defaults : dict
        The distribution parameters and their defaults (RcppML's ``*_init`` values).
    value : callable ``(y, mu, **params) -> ndarray``
        The elementwise loss ℓ(y, μ) of spec §6.1 (float64, broadcast shape of y and μ).
    weight : callable ``(y, mu, **params) -> ndarray``
        The IRLS weight of spec §6.2.
    variance : callable ``(mu, **params) -> ndarray``
        The variance function V(μ) (up to the dispersion), used for Pearson residuals.
    zero_total : callable ``(wd, h, **params) -> float`` or None
        ``Σ_ij ℓ(0, μ_ij)`` over every entry of ``μ = wd @ h`` without forming μ, where a closed
        form exists; None otherwise.
    zero_in_support : callable ``(**params) -> bool``
        Whether y = 0 is a possible observation (else zeros are left out of evaluations).
    """

    name: str
    defaults: Mapping[str, float]
    value: Callable[..., np.ndarray]
    weight: Callable[..., np.ndarray]
    variance: Callable[..., np.ndarray]
    zero_total: Callable[..., float] | None = None
    zero_in_support: Callable[..., bool] = field(default=lambda **p: True)

    def params(self, func: str = "loss", **params: Any) -> dict:
        """Validated distribution parameters with defaults filled in.

        Raises
        ------
        InputError
            On a parameter this loss does not take, or an invalid value.
        """
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(repr(p) for p in self.defaults) or "none"
            raise param_error(unknown[0], func, f"a parameter of loss {self.name!r} (valid: {valid})",
                              params[unknown[0]])
        out = dict(self.defaults)
        for key, val in params.items():
            if val is None:
                continue
            if key == "power":
                p = check_float(val, "power", func)
                if 0 < p < 1:
                    raise param_error("power", func, "a Tweedie power p <= 0 or p >= 1", val)
                out[key] = p
            else:
                out[key] = _check_param_array(val, key, func, low=0.0, low_open=key != "theta")
        return out


LOSSES: dict[str, Loss] = {
    "mse": Loss("mse", {}, _mse_value, _unit_weight, lambda mu: np.ones_like(_f(mu)), _mse_zero_total),
    "kl": Loss("kl", {}, _kl_value, _kl_weight, lambda mu: _f(mu), _kl_zero_total),
    "gp": Loss("gp", {"theta": 0.1}, _gp_value, lambda y, mu, theta=0.1: _kl_weight(y, mu),
               lambda mu, theta=0.1: _f(mu), _gp_zero_total),  # V = μ for Pearson residuals (§6.1)
    "nb": Loss("nb", {"size": 10.0}, _nb_value, _nb_weight, lambda mu, size=10.0: _f(mu) + _f(mu) ** 2 / _f(size)),
    "gamma": Loss("gamma", {"phi": 1.0}, _gamma_value, _power_weight(2.0),
                  lambda mu, phi=1.0: _f(mu) ** 2, zero_in_support=lambda **p: False),
    "inverse_gaussian": Loss("inverse_gaussian", {"phi": 1.0}, _ig_value, _power_weight(3.0),
                             lambda mu, phi=1.0: _f(mu) ** 3, zero_in_support=lambda **p: False),
    "tweedie": Loss("tweedie", {"power": 1.5, "phi": 1.0}, _tweedie_value, _power_weight(1.5),
                    lambda mu, power=1.5, phi=1.0: np.power(_f(mu), float(power)),
                    zero_in_support=lambda power=1.5, **p: float(power) < 2),
}


def get_loss(name: str, func: str = "get_loss") -> Loss:
    """The registered :class:`Loss` called ``name``; an unknown name lists the valid ones.

    Examples
    --------
    >>> from dnmf.losses import get_loss
    >>> float(get_loss("kl").value(2.0, 1.0))  # 2 log 2 − 2 + 1
    0.3862943611198906
    """
    return LOSSES[check_option(name, "loss", func, LOSSES)]


# ---------------------------------------------------------------------------------------------
# Robust (Huber on Pearson residuals), spec §6.1–6.2
# ---------------------------------------------------------------------------------------------


def huber(y, mu, delta: float, loss: str = "mse", **params) -> np.ndarray:
    """Huber loss of the Pearson residual ``ρ = (y − μ)/√V(μ)`` (the reported loss with ``robust``).

    Returns ``½ρ²`` where ``|ρ| ≤ δ``, else ``δ|ρ| − ½δ²``.
    """
    spec = get_loss(loss, "huber")
    pars = spec.params("huber", **params)
    pars.pop("phi", None)
    v = np.maximum(spec.variance(mu, **pars), FLOOR)
    rho = np.abs(_f(y) - _f(mu)) / np.sqrt(v)
    return np.where(rho <= delta, 0.5 * rho * rho, delta * rho - 0.5 * delta * delta)


def robust_weight(w, y, mu, delta: float) -> np.ndarray:
    """IRLS weight times the Huber factor: ``w·h(ρ)``, ``ρ = (y − μ)√max(w, 1e-15)``, spec §6.2."""
    w = _f(w)
    rho = np.abs((_f(y) - _f(mu)) * np.sqrt(np.maximum(w, 1e-15)))
    return w * np.where(rho <= delta, 1.0, delta / (rho + 1e-15))


# ---------------------------------------------------------------------------------------------
# Dispersion updates, spec §6.4
# ---------------------------------------------------------------------------------------------

_DISPERSION = ("per_row", "per_col", "global", "none")


def _oriented(y, mu, dispersion):
    y, mu = np.broadcast_arrays(np.atleast_2d(_f(y)), np.atleast_2d(_f(mu)))
    return (y.T, mu.T) if dispersion == "per_col" else (y, mu)


def _shape_back(values, dispersion, agg):
    if dispersion == "global":
        return float(agg(values))
    return values[:, None] if dispersion == "per_row" else values[None, :]


def update_dispersion(loss: str, y, mu, *, dispersion: str = "per_row", current=None,
                      theta_max: float = 5.0, theta_min: float = 0.0, size_min: float = 0.01,
                      size_max: float = 1e6, phi_min: float = 1e-6, phi_max: float = 1e4,
                      power: float = 1.5, n_iter: int = 5):
    """One dispersion update of RcppML (spec §6.4) from data y and predictions μ = W·diag(d)·H.

    Parameters
    ----------
    loss : {"gp", "nb", "gamma", "inverse_gaussian", "tweedie"}
    y, mu : ndarray of shape (m, n)
        Data and predictions over all entries (a row block for per-row, a column block for
        per-column estimates).
    dispersion : {"per_row", "per_col", "global", "none"}, default "per_row"
    current : float or ndarray, optional
        Current θ (GP only; the MM iterations start from it); default 0.1 (``theta_init``).
    theta_max, theta_min, size_min, size_max, phi_min, phi_max : float
        Caps and floors (``theta_*``, ``nb_size_*``, ``gamma_phi_*`` of spec §1.2).
    power : float, default 1.5
        Tweedie power (the φ of gamma / IG uses p = 2 / 3).
    n_iter : int, default 5
        MM iterations of the GP θ update.

    Returns
    -------
    float or ndarray of shape (m, 1) / (1, n)
        θ (gp), r (nb) or φ (gamma / IG / Tweedie): a float for ``"global"`` (the mean of the
        per-row θ, the median of per-row r or φ, as RcppML), else per row / per column, shaped to
        broadcast against y. ``"none"`` gives θ = 0, r = ``size_max``, φ = 1.

    Notes
    -----
    * GP θ (per row i; entries with y ≥ 1): ``η = μ/(μ + θy)``, ``α = n₊ + Σ(y−1)η``,
      ``γ = Σ(y−1)(1−η)``, ``β = Σy − Σμ − γ + α`` (Σμ over all entries),
      ``θ ← min(θ_max, (−β + √(β² + 4αγ))/(2α))`` when α > 1e-15, the discriminant is positive and
      the result finite and ≥ 0, repeated ``n_iter`` times; floored at ``theta_min``.
    * NB r (moments): ``r = Σμ² / Σ[(y − μ)² − μ]`` over all entries, clamped to
      [size_min, size_max]; ``size_max`` when numerator or denominator ≤ 1e-10.
    * φ: mean over y > 0 of ``(y − μ)²/μ^p``, clamped to [phi_min, phi_max].
    """
    func = "update_dispersion"
    loss = check_option(loss, "loss", func, ("gp", "nb", "gamma", "inverse_gaussian", "tweedie"))
    dispersion = check_option(dispersion, "dispersion", func, _DISPERSION)
    check_int(n_iter, "n_iter", func, low=1)
    if dispersion == "none":
        return {"gp": 0.0, "nb": float(size_max)}.get(loss, 1.0)
    # per-row estimates (rows of the transpose for per-column); "global" aggregates them
    y_rows, mu_rows = _oriented(y, mu, dispersion)
    if loss == "gp":
        n_groups = y_rows.shape[0]
        start = np.ravel(_f(0.1 if current is None else current))
        if start.size not in (1, n_groups):
            raise param_error("current", func, f"a float or {n_groups} values", f"{start.size} values",
                              described=True)
        theta = np.broadcast_to(start, (n_groups,)).copy()
        pos = y_rows >= 1
        ym1 = np.where(pos, y_rows - 1.0, 0.0)
        n_pos = pos.sum(axis=1)
        s_y = y_rows.sum(axis=1)
        s_mu = mu_rows.sum(axis=1)
        for _ in range(n_iter):
            den = mu_rows + theta[:, None] * y_rows
            eta = np.where(pos, mu_rows / np.where(den > 0, den, 1.0), 0.0)
            alpha = n_pos + np.sum(ym1 * eta, axis=1)
            gamma_ = np.sum(ym1 * (1.0 - eta), axis=1)
            beta = s_y - s_mu - gamma_ + alpha
            disc = beta * beta + 4.0 * alpha * gamma_
            with np.errstate(divide="ignore", invalid="ignore"):
                new = (-beta + np.sqrt(np.maximum(disc, 0.0))) / (2.0 * alpha)
            ok = (alpha > 1e-15) & (disc > 0) & np.isfinite(new) & (new >= 0)
            theta = np.where(ok, np.minimum(theta_max, new), theta)
        theta = np.maximum(theta, theta_min)
        return _shape_back(theta, dispersion, np.mean)
    if loss == "nb":
        num = np.sum(mu_rows * mu_rows, axis=1)
        den = np.sum((y_rows - mu_rows) ** 2 - mu_rows, axis=1)
        ok = (num > 1e-10) & (den > 1e-10)
        r = np.where(ok, np.clip(num / np.where(ok, den, 1.0), size_min, size_max), size_max)
        return _shape_back(r, dispersion, np.median)
    p = {"gamma": 2.0, "inverse_gaussian": 3.0}.get(loss, float(power))
    pos = y_rows > 0
    mu_f = np.maximum(mu_rows, FLOOR)
    terms = np.where(pos, (y_rows - mu_rows) ** 2 / np.power(mu_f, p), 0.0)
    cnt = pos.sum(axis=1)
    phi = np.where(cnt > 0, terms.sum(axis=1) / np.maximum(cnt, 1), 1.0)
    phi = np.clip(phi, phi_min, phi_max)
    return _shape_back(phi, dispersion, np.median)


# ---------------------------------------------------------------------------------------------
# Stand-alone helpers (RcppML §10.6)
# ---------------------------------------------------------------------------------------------


def evaluate(model, A: Any, loss: str = "mse", mask: Any = None, missing_only: bool = False,
             **loss_params: Any) -> float:
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
    return model.evaluate(A, loss=loss, mask=mask, missing_only=missing_only, **loss_params)


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
