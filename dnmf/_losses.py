"""The loss registry of :mod:`dnmf.losses` (spec §6), imported by the layers below the public
helpers (``NMFModel.evaluate``, ``nmfkc``), so that :mod:`dnmf.losses` itself (which also fits
models for ``suggest_loss``) stays on top and no import cycle forms. See :mod:`dnmf.losses` for
the table of losses.

Each per-entry formula is defined once, here, as a scalar plain-Python function
(section "Scalar formulas"): the elementwise values of mse, kl, gp, nb, gamma, inverse Gaussian
and Tweedie, the IRLS weights, the variance functions, the Huber weight factor and the Huber
loss of the Pearson residual, with their floors (:data:`FLOOR`, ``_W_MU_FLOOR``, ``_W_CAP``,
``_KL_W_FLOOR``), and the GP θ MM step of §6.4 (``_gp_eta``, ``_gp_theta_root``). The IRLS kernel (``kernels/irls.py``) compiles these functions with
``numba.njit`` and calls them (it only dispatches on a loss code), and the registry's array
functions apply the same Python functions as numba ufuncs compiled on first use, so the kernel
and :meth:`NMFModel.evaluate` agree bitwise. This module never imports ``dnmf.kernels``, and
imports numba only when an array function first runs. Plain NumPy remains where the kernel has
no twin: the closed-form totals over the zeros (``*_zero_total``), the nmfkc objectives and
multiplicative terms (``_mse_objective``, ``_kl_objective``, ``_*_mu_terms``, with their own
ε = :data:`KL_OBJECTIVE_EPS`), ``zero_in_support``, the NB r and φ moment updates of §6.4, and the GP θ
step's sums α, γ (vectorized over groups with ``bincount`` here, a loop over one group's
entries in the kernel's ``gp_theta_mm``: two summation orders of the same sums).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ._validation import check_float, check_int, check_option, param_error

__all__ = ["Loss", "LOSSES", "get_loss", "update_dispersion", "update_dispersion_sparse", "huber",
           "robust_weight", "robust_delta", "robust_loss", "FLOOR", "KL_OBJECTIVE_EPS"]

#: Floor of y and μ inside logarithms and ratios (spec §6.1).
FLOOR = 1e-10
#: Floor of μ in the NB / gamma / IG / Tweedie IRLS weights and their cap (spec §6.2).
_W_MU_FLOOR, _W_CAP = 1e-15, 1e6
#: ε added to μ inside the log of the KL objective of multiplicative-update loops (nmfkc).
KL_OBJECTIVE_EPS = 1e-10
#: Floor of μ in the KL / GP IRLS weight (spec §6.2).
_KL_W_FLOOR = 1e-4


# ---------------------------------------------------------------------------------------------
# Scalar formulas: the one definition of each elementwise loss, IRLS weight, variance and Huber
# factor. Plain Python (``math``, ``max``, ``min``): the IRLS kernel (``kernels/irls.py``)
# compiles them with numba.njit, and the array functions below apply the same Python functions
# as numba ufuncs, so both evaluate one formula with one operation order.
# Uniform signatures ``(y, mu, disp, power)`` (values, weights) and ``(mu, disp, power)``
# (variances): ``disp`` = GP θ or NB r, ``power`` = the variance power; unused arguments are
# ignored. Values are unit losses (φ = 1; the array functions divide by φ).
# ---------------------------------------------------------------------------------------------


def _mse_elem(y, mu, disp, power):
    return (y - mu) * (y - mu)


def _kl_elem(y, mu, disp, power):
    # y log(y/μ) − y + μ with μ floored at 1e-10 where y > 0; 0·log 0 = 0, so ℓ(0, μ) = μ exactly
    # (which keeps the total over the zeros of sparse data in closed form)
    if y > 0.0:
        mf = max(mu, FLOOR)
        return y * math.log(y / mf) - y + mf
    return mu


def _gp_elem(y, mu, disp, power):
    # Generalized Poisson with mean μ and dispersion θ = disp: λ₁ = μ/(1+θ), λ₂ = θ/(1+θ),
    # P(y) = λ₁ (λ₁ + λ₂ y)^(y−1) exp(−λ₁ − λ₂ y) / y!;  ℓ = −log P(y) − log y!.
    # y < 1 (y = 0, or a fraction): P(0) = exp(−λ₁), ℓ = λ₁ (spec §6.1's table writes −log λ₁ + λ₁
    # there [quirk]; that is not a log-likelihood, and it would leave Σ over the zeros without a
    # closed form)
    one_t = 1.0 + disp
    if y >= 1.0:
        mu_f = max(mu, FLOOR)
        lin = (mu_f + disp * y) / one_t
        return -math.log(mu_f / one_t) - (y - 1.0) * math.log(max(lin, FLOOR)) + lin
    return mu / one_t


def _nb_elem(y, mu, disp, power):
    # ℓ = −lgamma(y+r) + lgamma(r) − r log(r/(r+μ)) − y log(μ/(r+μ))  (= −log P_NB(y) − log y!),
    # r = disp; y log x is 0 at y = 0
    r = disp
    mu_f = max(mu, FLOOR)
    ylog_mu = 0.0 if y == 0.0 else y * math.log(mu_f)
    ylog_rmu = 0.0 if y == 0.0 else y * math.log(r + mu_f)
    return -math.lgamma(y + r) + math.lgamma(r) + r * math.log1p(mu / r) - ylog_mu + ylog_rmu


def _gamma_elem(y, mu, disp, power):
    yf = max(y, FLOOR)
    mf = max(mu, FLOOR)
    return 2.0 * (-math.log(yf / mf) + (yf - mf) / mf)


def _ig_elem(y, mu, disp, power):
    yf = max(y, FLOOR)
    mf = max(mu, FLOOR)
    r = yf - mf
    return r * r / (mf * mf * yf)


def _tweedie_elem(y, mu, disp, power):
    # unit Tweedie deviance of power p ∉ {0, 1, 2} (those are the squared error, 2·KL and the
    # gamma deviance: callers take _mse_elem, 2·_kl_elem, _gamma_elem there)
    p = power
    mf = max(mu, FLOOR)
    if p < 2.0:
        y_term = max(y, 0.0) ** (2.0 - p)
    else:
        y_term = max(y, FLOOR) ** (2.0 - p)
    return 2.0 * (y_term / ((1.0 - p) * (2.0 - p)) - y * mf ** (1.0 - p) / (1.0 - p) + mf ** (2.0 - p) / (2.0 - p))



def _weight_unit(y, mu, disp, power):
    return 1.0


def _weight_kl(y, mu, disp, power):
    # KL / GP IRLS weight 1/μ, μ floored at 1e-4 (§6.2)
    return 1.0 / max(mu, _KL_W_FLOOR)


def _weight_nb(y, mu, disp, power):
    # NB weight r/(μ(r + μ)), r = disp, μ floored at 1e-15, capped at 1e6 (§6.2)
    mu = max(mu, _W_MU_FLOOR)
    return min(disp / (mu * (disp + mu)), _W_CAP)


def _weight_power(y, mu, disp, power):
    # gamma (p = 2) / inverse Gaussian (p = 3) / Tweedie weight μ^−p, μ floored at 1e-15, capped at 1e6
    mu = max(mu, _W_MU_FLOOR)
    return min(mu ** (-power), _W_CAP)


def _variance_unit(mu, disp, power):
    return 1.0


def _variance_mu(mu, disp, power):
    return mu


def _variance_nb(mu, disp, power):
    return mu + mu * mu / disp


def _variance_gamma(mu, disp, power):
    return mu * mu


def _variance_ig(mu, disp, power):
    return mu * mu * mu


def _variance_power(mu, disp, power):
    return mu ** power if mu > 0.0 else 0.0


def _huber_weight(w, y, mu, delta):
    # IRLS weight w times the Huber factor h(ρ) = min(1, δ/ρ), ρ = |y − μ|·√max(w, 1e-15) (§6.2)
    rho = abs((y - mu) * math.sqrt(max(w, 1e-15)))
    if rho > delta:
        w *= delta / (rho + 1e-15)
    return w


def _huber_pearson(y, mu, v, delta):
    # Huber (δ) of the Pearson residual ρ = |y − μ|/√max(V, 1e-10): ½ρ² for ρ ≤ δ, else δρ − ½δ²
    v = max(v, FLOOR)
    rho = abs(y - mu) / math.sqrt(v)
    if rho <= delta:
        return 0.5 * rho * rho
    return delta * rho - 0.5 * delta * delta


def _gp_eta(y, mu, theta):
    # η = μ/(μ + θy) of the GP θ MM step (§6.4), for an entry with y ≥ 1 (μ where μ + θy ≤ 0)
    den = mu + theta * y
    return mu / den if den > 0.0 else mu


def _gp_theta_root(alpha, gamma, s_y, s_mu, theta, theta_max):
    # one GP θ MM step of a group (§6.4): the root (−β + √(β² + 4αγ))/(2α), β = Σy − Σμ − γ + α,
    # with α = n₊ + Σ₊(y − 1)η and γ = Σ₊(y − 1)(1 − η) over the entries y ≥ 1; capped at
    # theta_max; θ is kept where α ≤ 1e-15, the discriminant is ≤ 0 or the root is not finite ≥ 0
    beta = s_y - s_mu - gamma + alpha
    disc = beta * beta + 4.0 * alpha * gamma
    if alpha > 1e-15 and disc > 0.0:
        new = (-beta + math.sqrt(disc)) / (2.0 * alpha)
        if math.isfinite(new) and new >= 0.0:
            return min(theta_max, new)
    return theta


_UFUNCS: dict = {}


def _ufunc(fn):
    """The array form of the scalar formula ``fn``: a numba ufunc (broadcasting its inputs),
    compiled on first use and cached on disk. numba is imported only then, so that importing the
    registry stays light (``pipelines.nmfre`` validation imports it without numba)."""
    u = _UFUNCS.get(fn)
    if u is None:
        import numba

        u = _UFUNCS[fn] = numba.vectorize(cache=True, nopython=True)(fn)
    return u


# ---------------------------------------------------------------------------------------------
# Elementwise values, weights, variances
# ---------------------------------------------------------------------------------------------


def _f(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _mse_value(y, mu):
    return _ufunc(_mse_elem)(_f(y), _f(mu), 0.0, 0.0)


def _mse_zero_total(wd, h):
    # Σ_ij (W d H)_ij² = tr((W d)ᵀ(W d) · H Hᵀ)
    return float(np.sum((wd.T @ wd) * (h @ h.T)))


def _kl_value(y, mu):
    return _ufunc(_kl_elem)(_f(y), _f(mu), 0.0, 0.0)


def _kl_zero_total(wd, h):
    # Σ_ij μ_ij = (1ᵀ W d)(H 1)
    return float(wd.sum(axis=0) @ h.sum(axis=1))


def _mse_objective(y, mu, w=None):
    # w (y − μ)², evaluated as (w·R)·R (the operation order of nmfkc's loops)
    R = y - mu
    return R * R if w is None else w * R * R


def _kl_objective(y, mu, w=None):
    # the μ-dependent part of KL: −(w y) log(μ + ε) + w μ, ε = 1e-10 added (not a floor), as the
    # multiplicative updates of nmfkc (Lee–Seung) monitor it; KL = this + w (y log y − y)
    if w is None:
        return -y * np.log(mu + KL_OBJECTIVE_EPS) + mu
    return -(w * y) * np.log(mu + KL_OBJECTIVE_EPS) + w * mu


def _mse_mu_terms(y, mu, w):
    # Lee–Seung for w (y − μ)², μ = XB: X ← X ⊙ ((w y) Bᵀ) / ((w μ) Bᵀ)
    return w * y, w * mu


def _kl_mu_terms(y, mu, w):
    # Lee–Seung for KL, μ = XB: X ← X ⊙ ((w y/(μ + ε)) Bᵀ) / (w Bᵀ)
    return w * (y / (mu + KL_OBJECTIVE_EPS)), w


def _kl_weight(y, mu):
    return _ufunc(_weight_kl)(_f(y), _f(mu), 0.0, 0.0)


def _gp_value(y, mu, theta=0.1):
    return _ufunc(_gp_elem)(_f(y), _f(mu), _f(theta), 0.0)


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
    return _ufunc(_nb_elem)(_f(y), _f(mu), _f(size), 0.0)


def _nb_weight(y, mu, size=10.0):
    return _ufunc(_weight_nb)(_f(y), _f(mu), _f(size), 0.0)


def _gamma_value(y, mu, phi=1.0):
    return _ufunc(_gamma_elem)(_f(y), _f(mu), 0.0, 0.0) / _f(phi)


def _ig_value(y, mu, phi=1.0):
    return _ufunc(_ig_elem)(_f(y), _f(mu), 0.0, 0.0) / _f(phi)


def _tweedie_value(y, mu, power=1.5, phi=1.0):
    p = float(power)
    y, mu = _f(y), _f(mu)
    if p == 0:
        dev = _ufunc(_mse_elem)(y, mu, 0.0, p)
    elif p == 1:
        dev = 2.0 * _ufunc(_kl_elem)(y, mu, 0.0, p)
    elif p == 2:
        dev = _ufunc(_gamma_elem)(y, mu, 0.0, p)
    else:
        dev = _ufunc(_tweedie_elem)(y, mu, 0.0, p)
    return dev / _f(phi)


def _power_weight(power):
    def weight(y, mu, **params):
        return _ufunc(_weight_power)(_f(y), _f(mu), 0.0, float(params.get("power", power)))
    return weight


def _unit_weight(y, mu, **params):
    return _ufunc(_weight_unit)(_f(y), _f(mu), 0.0, 0.0)


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
    objective : callable ``(y, mu, w=None) -> ndarray`` or None
        The per-entry objective that multiplicative-update loops (:func:`dnmf.nmfkc`) monitor,
        optionally weighted by ``w``: for mse ``w (y − μ)²``, for kl ``−w y log(μ + 1e-10) + w μ``
        (KL without its μ-free part ``y log y − y``). None for the IRLS-only losses.
    mu_terms : callable ``(y, mu, w) -> (N, D)`` or None
        The matrices of the multiplicative (Lee–Seung) step for ``μ = X B`` with entry weights
        w: ``X ← X ⊙ (N Bᵀ)/(D Bᵀ)`` and ``B ← B ⊙ (Xᵀ N)/(Xᵀ D)``; mse: ``(w y, w μ)``, kl:
        ``(w y/(μ + 1e-10), w)``. None for the IRLS-only losses.
    """

    name: str
    defaults: Mapping[str, float]
    value: Callable[..., np.ndarray]
    weight: Callable[..., np.ndarray]
    variance: Callable[..., np.ndarray]
    zero_total: Callable[..., float] | None = None
    zero_in_support: Callable[..., bool] = field(default=lambda **p: True)
    objective: Callable[..., np.ndarray] | None = None
    mu_terms: Callable[..., tuple] | None = None

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
    "mse": Loss("mse", {}, _mse_value, _unit_weight, lambda mu: _ufunc(_variance_unit)(_f(mu), 0.0, 0.0), _mse_zero_total,
                objective=_mse_objective, mu_terms=_mse_mu_terms),
    "kl": Loss("kl", {}, _kl_value, _kl_weight, lambda mu: _ufunc(_variance_mu)(_f(mu), 0.0, 0.0), _kl_zero_total, objective=_kl_objective,
                mu_terms=_kl_mu_terms),
    "gp": Loss("gp", {"theta": 0.1}, _gp_value, lambda y, mu, theta=0.1: _kl_weight(y, mu),
               lambda mu, theta=0.1: _ufunc(_variance_mu)(_f(mu), 0.0, 0.0), _gp_zero_total),  # V = μ for Pearson residuals (§6.1)
    "nb": Loss("nb", {"size": 10.0}, _nb_value, _nb_weight, lambda mu, size=10.0: _ufunc(_variance_nb)(_f(mu), _f(size), 0.0)),
    "gamma": Loss("gamma", {"phi": 1.0}, _gamma_value, _power_weight(2.0),
                  lambda mu, phi=1.0: _ufunc(_variance_gamma)(_f(mu), 0.0, 0.0), zero_in_support=lambda **p: False),
    "inverse_gaussian": Loss("inverse_gaussian", {"phi": 1.0}, _ig_value, _power_weight(3.0),
                             lambda mu, phi=1.0: _ufunc(_variance_ig)(_f(mu), 0.0, 0.0), zero_in_support=lambda **p: False),
    "tweedie": Loss("tweedie", {"power": 1.5, "phi": 1.0}, _tweedie_value, _power_weight(1.5),
                    lambda mu, power=1.5, phi=1.0: _ufunc(_variance_power)(_f(mu), 0.0, float(power)),
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


def _huber_values(spec: Loss, y, mu, delta: float, params: dict) -> np.ndarray:
    pars = {key: val for key, val in params.items() if key != "phi"}
    return _ufunc(_huber_pearson)(_f(y), _f(mu), _f(spec.variance(mu, **pars)), float(delta))


def huber(y, mu, delta: float, loss: str = "mse", **params) -> np.ndarray:
    """Huber loss of the Pearson residual ``ρ = (y − μ)/√V(μ)`` (the reported loss with ``robust``).

    Returns ``½ρ²`` where ``|ρ| ≤ δ``, else ``δ|ρ| − ½δ²``, with V = 1 (mse), μ (kl, gp),
    μ + μ²/r (nb), μ² (gamma), μ³ (inverse Gaussian), μ^p (Tweedie), floored at 1e-10.
    """
    spec = get_loss(loss, "huber")
    return _huber_values(spec, y, mu, float(delta), spec.params("huber", **params))


def robust_delta(robust: Any, func: str) -> float | None:
    """RcppML's ``robust`` argument as a Huber δ: False → None, True → 1.345, ``"mae"`` → 1e-4,
    a positive number → itself."""
    if robust is False or robust is None or (isinstance(robust, np.bool_) and not robust):
        return None
    if robust is True or (isinstance(robust, np.bool_) and robust):
        return 1.345
    if isinstance(robust, str):
        check_option(robust, "robust", func, ("mae",))
        return 1e-4
    return check_float(robust, "robust", func, low=0.0, low_open=True)


def robust_loss(spec: Loss, delta: float) -> Loss:
    """The loss ``spec`` reported robustly: Huber (δ) of its Pearson residual (spec §6.1). Its
    zeros have no closed form; y = 0 stays in the support exactly when it is in ``spec``'s."""
    return Loss(f"{spec.name}+huber", spec.defaults,
                lambda y, mu, **p: _huber_values(spec, y, mu, delta, p),
                lambda y, mu, **p: robust_weight(spec.weight(y, mu, **p), y, mu, delta),
                spec.variance, None, spec.zero_in_support)


def robust_weight(w, y, mu, delta: float) -> np.ndarray:
    """IRLS weight times the Huber factor: ``w·h(ρ)``, ``ρ = (y − μ)√max(w, 1e-15)``, spec §6.2."""
    return _ufunc(_huber_weight)(_f(w), _f(y), _f(mu), float(delta))


# ---------------------------------------------------------------------------------------------
# Dispersion updates, spec §6.4
# ---------------------------------------------------------------------------------------------

_DISPERSION = ("per_row", "per_col", "global", "none")


def _shape_back(values, dispersion, agg):
    if dispersion == "global":
        return float(agg(values))
    return values[:, None] if dispersion == "per_row" else values[None, :]


def _dispersion_from_entries(loss, g, y, mu, n_groups, s_mu, s_mu2, *, dispersion, current, theta_max, theta_min,
                             size_min, size_max, phi_min, phi_max, power, n_iter, func):
    """The §6.4 updates from entries (group g, value y, prediction μ) — every entry of a dense
    matrix, or the stored entries of a sparse one — and, per group, ``s_mu = Σ μ`` and
    ``s_mu2 = Σ μ²`` over **all** entries (zeros included)."""
    if loss == "gp":
        start = np.ravel(_f(0.1 if current is None else current))
        if start.size not in (1, n_groups):
            raise param_error("current", func, f"a float or {n_groups} values", f"{start.size} values",
                              described=True)
        theta = np.broadcast_to(start, (n_groups,)).copy()
        pos = y >= 1
        gp, yp, mp = g[pos], y[pos], mu[pos]
        ym1 = yp - 1.0
        n_pos = np.bincount(gp, minlength=n_groups)
        s_y = np.bincount(g, y, minlength=n_groups)
        eta_of, root_of = _ufunc(_gp_eta), _ufunc(_gp_theta_root)
        for _ in range(n_iter):
            eta = eta_of(yp, mp, theta[gp])
            alpha = n_pos + np.bincount(gp, ym1 * eta, minlength=n_groups)
            gamma_ = np.bincount(gp, ym1 * (1.0 - eta), minlength=n_groups)
            theta = root_of(alpha, gamma_, _f(s_y), _f(s_mu), theta, float(theta_max))
        theta = np.maximum(theta, theta_min)
        return _shape_back(theta, dispersion, np.mean)
    if loss == "nb":
        # Σ_all [(y − μ)² − μ] = Σ_entries [(y − μ)² − μ] + Σ_other entries (μ² − μ)
        stored = np.bincount(g, (y - mu) ** 2 - mu, minlength=n_groups)
        rest_mu2 = s_mu2 - np.bincount(g, mu * mu, minlength=n_groups)
        rest_mu = s_mu - np.bincount(g, mu, minlength=n_groups)
        num, den = s_mu2, stored + rest_mu2 - rest_mu
        ok = (num > 1e-10) & (den > 1e-10)
        r = np.where(ok, np.clip(num / np.where(ok, den, 1.0), size_min, size_max), size_max)
        return _shape_back(r, dispersion, np.median)
    p = {"gamma": 2.0, "inverse_gaussian": 3.0}.get(loss, float(power))
    pos = y > 0
    terms = np.bincount(g[pos], (y[pos] - mu[pos]) ** 2 / np.power(np.maximum(mu[pos], FLOOR), p),
                        minlength=n_groups)
    cnt = np.bincount(g[pos], minlength=n_groups)
    phi = np.clip(np.where(cnt > 0, terms / np.maximum(cnt, 1), 1.0), phi_min, phi_max)
    return _shape_back(phi, dispersion, np.median)


def _check_dispersion_args(loss, dispersion, n_iter, func):
    loss = check_option(loss, "loss", func, ("gp", "nb", "gamma", "inverse_gaussian", "tweedie"))
    dispersion = check_option(dispersion, "dispersion", func, _DISPERSION)
    check_int(n_iter, "n_iter", func, low=1)
    return loss, dispersion


def _none_dispersion(loss, size_max):
    return {"gp": 0.0, "nb": float(size_max)}.get(loss, 1.0)


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
        per-column estimates). For sparse data use :func:`update_dispersion_sparse`, which reads
        the stored entries only.
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
      the result finite and ≥ 0, repeated ``n_iter`` times; floored at ``theta_min``. Its fixed
      point is the maximum-likelihood θ of the GP loss of this module.
    * NB r (moments): ``r = Σμ² / Σ[(y − μ)² − μ]`` over all entries, clamped to
      [size_min, size_max]; ``size_max`` when numerator or denominator ≤ 1e-10.
    * φ: mean over y > 0 of ``(y − μ)²/μ^p``, clamped to [phi_min, phi_max].
    """
    func = "update_dispersion"
    loss, dispersion = _check_dispersion_args(loss, dispersion, n_iter, func)
    if dispersion == "none":
        return _none_dispersion(loss, size_max)
    y, mu = np.broadcast_arrays(np.atleast_2d(_f(y)), np.atleast_2d(_f(mu)))
    if dispersion == "per_col":  # per-row estimates of the transpose; "global" aggregates per-row ones
        y, mu = y.T, mu.T
    n_groups, n_other = y.shape
    g = np.repeat(np.arange(n_groups), n_other)
    return _dispersion_from_entries(loss, g, y.ravel(), mu.ravel(), n_groups, mu.sum(axis=1), (mu * mu).sum(axis=1),
                                    dispersion=dispersion, current=current, theta_max=theta_max,
                                    theta_min=theta_min, size_min=size_min, size_max=size_max, phi_min=phi_min,
                                    phi_max=phi_max, power=power, n_iter=n_iter, func=func)


def update_dispersion_sparse(loss: str, A, wd, h, *, dispersion: str = "per_row", current=None,
                             theta_max: float = 5.0, theta_min: float = 0.0, size_min: float = 0.01,
                             size_max: float = 1e6, phi_min: float = 1e-6, phi_max: float = 1e4,
                             power: float = 1.5, n_iter: int = 5):
    """:func:`update_dispersion` for sparse data at nnz cost: μ = wd @ h is formed at the stored
    entries only; the sums of μ and μ² over all entries of a row (column) come in closed form,
    ``(Wd H1)_i`` and ``(Wd HHᵀ (Wd)ᵀ)_ii``.

    Parameters
    ----------
    loss, dispersion, current, theta_max, theta_min, size_min, size_max, phi_min, phi_max, power, n_iter
        As :func:`update_dispersion`.
    A : scipy.sparse matrix of shape (m, n)
        The data (stored zeros are allowed).
    wd : ndarray of shape (m, k)
        W diag(d).
    h : ndarray of shape (k, n)

    Returns
    -------
    float or ndarray of shape (m, 1) / (1, n)
        As :func:`update_dispersion` on the dense ``A`` and ``wd @ h`` (equal to rounding).
    """
    import scipy.sparse as sp

    func = "update_dispersion_sparse"
    loss, dispersion = _check_dispersion_args(loss, dispersion, n_iter, func)
    if not sp.issparse(A):
        raise param_error("A", func, "a scipy.sparse matrix", type(A).__name__, described=True)
    wd, h = _f(wd), _f(h)
    if wd.ndim != 2 or h.ndim != 2 or wd.shape[1] != h.shape[0] or A.shape != (wd.shape[0], h.shape[1]):
        raise param_error("A", func, "shapes A (m, n), wd (m, k), h (k, n)",
                          f"A {A.shape}, wd {wd.shape}, h {h.shape}", described=True)
    if dispersion == "none":
        return _none_dispersion(loss, size_max)
    coo = sp.coo_array(A)
    rows, cols, y = coo.row.astype(np.int64), coo.col.astype(np.int64), _f(coo.data)
    mu = np.einsum("ij,ji->i", wd[rows], h[:, cols])
    if dispersion == "per_col":
        g, n_groups = cols, h.shape[1]
        s_mu = wd.sum(axis=0) @ h
        s_mu2 = np.einsum("kj,kl,lj->j", h, wd.T @ wd, h)
    else:
        g, n_groups = rows, wd.shape[0]
        s_mu = wd @ h.sum(axis=1)
        s_mu2 = np.einsum("ik,kl,il->i", wd, h @ h.T, wd)
    return _dispersion_from_entries(loss, g, y, mu, n_groups, s_mu, s_mu2, dispersion=dispersion, current=current,
                                    theta_max=theta_max, theta_min=theta_min, size_min=size_min,
                                    size_max=size_max, phi_min=phi_min, phi_max=phi_max, power=power,
                                    n_iter=n_iter, func=func)


