"""Planted-factor test data: ``simulate_nmf`` (RcppML ``simulateNMF``, spec/rcppml.md §10.10)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ._typing import SeedLike
from ._validation import check_float, check_int, check_option, param_error

__all__ = ["SimulatedNMF", "simulate_nmf"]


@dataclass(frozen=True, eq=False)
class SimulatedNMF:
    """A simulated data set with its true factors.

    Attributes
    ----------
    A : ndarray of shape (m, n)
        Non-negative data ``w @ h`` plus clipped Gaussian noise, with dropout.
    w : ndarray of shape (m, k)
        True feature factors; every column sums to 1.
    h : ndarray of shape (k, n)
        True sample factors; every row sums to 1.
    """

    A: np.ndarray
    w: np.ndarray
    h: np.ndarray

    def __iter__(self):
        """Unpack as ``A, w, h = simulate_nmf(...)``."""
        return iter((self.A, self.w, self.h))


def _block_factor(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
    """A size × k factor: factor i is |N(1, 0.3)| on its contiguous block of rows, plus |N(0, 0.05)|."""
    f = np.zeros((size, k))
    step = size // k
    for i in range(k):
        stop = size if i == k - 1 else (i + 1) * step
        f[i * step:stop, i] = np.abs(rng.normal(1.0, 0.3, size=stop - i * step))
    f += np.abs(rng.normal(0.0, 0.05, size=(size, k)))
    return f


_DISTRIBUTIONS = ("gaussian", "poisson", "gp", "nb", "gamma", "inverse_gaussian", "tweedie")
_DEFAULT_DISPERSION = {"gp": 0.3, "nb": 5.0, "gamma": 0.5, "inverse_gaussian": 0.5, "tweedie": 1.0}


def _draw_gp(rng: np.random.Generator, mu: np.ndarray, theta: float) -> np.ndarray:
    """Generalized Poisson draws by inversion: λ₁ = μ/(1+θ), λ₂ = θ/(1+θ),
    ``P(y) = λ₁(λ₁ + λ₂y)^(y−1) e^(−λ₁−λ₂y) / y!``."""
    from scipy.special import gammaln

    l1 = mu / (1.0 + theta)
    l2 = theta / (1.0 + theta)
    u = rng.random(size=mu.shape)
    out = np.zeros(mu.shape)
    cdf = np.zeros(mu.shape)
    done = np.zeros(mu.shape, dtype=bool)
    y_max = int(np.ceil(10.0 * (mu.max() / (1.0 - l2) + 10.0) / (1.0 - l2)))
    for y in range(y_max + 1):
        with np.errstate(divide="ignore"):
            logp = np.log(l1) + (y - 1) * np.log(l1 + l2 * y) - l1 - l2 * y - gammaln(y + 1.0)
        cdf += np.exp(logp)
        hit = ~done & (u <= cdf)
        out[hit] = y
        done |= hit
        if done.all():
            break
    out[~done] = y_max
    return out


def _draw(rng: np.random.Generator, mu: np.ndarray, distribution: str, dispersion, power: float) -> np.ndarray:
    """One draw per entry from ``distribution`` with mean ``mu`` (see :func:`simulate_nmf`)."""
    disp = _DEFAULT_DISPERSION.get(distribution) if dispersion is None else float(dispersion)
    if distribution == "poisson":
        return rng.poisson(mu).astype(np.float64)
    if distribution == "gp":
        return _draw_gp(rng, mu, disp)
    if distribution == "nb":
        return rng.negative_binomial(disp, disp / (disp + mu)).astype(np.float64)
    if distribution == "gamma":
        return rng.gamma(1.0 / disp, mu * disp)
    if distribution == "inverse_gaussian":
        return rng.wald(mu, 1.0 / disp)
    # Tweedie compound Poisson–gamma, 1 < p < 2
    p = power
    counts = rng.poisson(mu ** (2.0 - p) / (disp * (2.0 - p)))
    shape = (2.0 - p) / (p - 1.0)
    scale = disp * (p - 1.0) * mu ** (p - 1.0)
    out = np.zeros(mu.shape)
    pos = counts > 0
    out[pos] = rng.gamma(counts[pos] * shape, scale[pos])
    return out


def simulate_nmf(
    m: int,
    n: int,
    k: int,
    noise: float = 0.5,
    dropout: float = 0.0,
    seed: SeedLike = None,
    distribution: str = "gaussian",
    mean: float = 5.0,
    dispersion: float | None = None,
    power: float = 1.5,
) -> SimulatedNMF:
    """Simulate non-negative data with k planted, block-structured factors.

    Parameters
    ----------
    m, n : int
        Rows (features) and columns (samples) of A; both at least ``k``.
    k : int
        Number of planted factors, ≥ 1.
    noise : float, default 0.5
        Standard deviation of the additive Gaussian noise **relative to the mean of the clean
        matrix** (sd = ``noise · mean(w @ h)``); 0 gives the exact product.
    dropout : float in [0, 1), default 0
        Probability that an entry is set to zero after the noise.
    seed : None, int, SeedSequence or Generator
        Seed of ``numpy.random.default_rng``.
    distribution : {"gaussian", "poisson", "gp", "nb", "gamma", "inverse_gaussian", "tweedie"}
        ``"gaussian"`` (default): the recipe below. Otherwise A is drawn entry-wise from that
        distribution with mean ``μ = c·w h``, c chosen so that ``mean(μ) = mean`` (``noise``
        is then not used; ``dropout`` still applies): Poisson; generalized Poisson with
        dispersion θ (mean μ, variance μ/(1−λ₂)² with λ₂ = θ/(1+θ), the parametrization of
        ``dnmf.losses``); negative binomial with size r (variance μ + μ²/r); gamma and inverse
        Gaussian with dispersion φ (variance φμ², φμ³); Tweedie compound Poisson–gamma with
        power ``power`` in (1, 2) and dispersion φ (variance φμ^p).
    mean : float, default 5.0
        Mean of μ for the non-Gaussian distributions.
    dispersion : float, optional
        θ (gp, default 0.3), r (nb, default 5), φ (gamma, inverse Gaussian, Tweedie; default
        0.5, 0.5, 1).
    power : float, default 1.5
        Tweedie power, in (1, 2).

    Returns
    -------
    SimulatedNMF
        ``A`` (m × n), ``w`` (m × k, columns sum to 1), ``h`` (k × n, rows sum to 1). For the
        non-Gaussian distributions ``E[A] = c·w h`` with ``c = mean / mean(w h)``.

    Notes
    -----
    RcppML's recipe, with NumPy's generator instead of R's (same distributions, different
    draws):

    1. w: rows are split into k contiguous blocks of ``m // k`` rows (the last block takes the
       remainder); factor i draws ``|N(1, 0.3)|`` on block i, then every entry gets
       ``+|N(0, 0.05)|``. h is built the same way over columns (k × n).
    2. Columns of w and rows of h are scaled to sum to 1; ``A = w h``.
    3. If ``noise > 0``: ``A += N(0, noise · mean(A))`` entry-wise, negatives set to 0.
    4. If ``dropout > 0``: each entry is kept with probability ``1 − dropout``.

    Examples
    --------
    >>> import dnmf
    >>> sim = dnmf.simulate_nmf(200, 80, k=5, noise=3.0, seed=42)
    >>> sim.A.shape, sim.w.shape, sim.h.shape
    ((200, 80), (200, 5), (5, 80))
    """
    func = "simulate_nmf"
    k = check_int(k, "k", func, low=1)
    m = check_int(m, "m", func, low=k)
    n = check_int(n, "n", func, low=k)
    noise = check_float(noise, "noise", func, low=0.0)
    dropout = check_float(dropout, "dropout", func, low=0.0)
    if dropout >= 1.0:
        raise param_error("dropout", func, "a float in [0.0, 1.0)", dropout)
    if not (seed is None or isinstance(seed, (np.random.SeedSequence, np.random.Generator))
            or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0)):
        raise param_error("seed", func, "None, a non-negative int, a SeedSequence or a Generator", seed)
    distribution = check_option(distribution, "distribution", func, _DISTRIBUTIONS)
    if distribution != "gaussian":
        mean = check_float(mean, "mean", func, low=0.0, low_open=True)
        if dispersion is not None:
            dispersion = check_float(dispersion, "dispersion", func, low=0.0, low_open=distribution != "gp")
        if distribution == "tweedie":
            power = check_float(power, "power", func, low=1.0, high=2.0, low_open=True, high_open=True)
    rng = np.random.default_rng(seed)

    w = _block_factor(rng, m, k)
    h = np.ascontiguousarray(_block_factor(rng, n, k).T)
    w /= w.sum(axis=0, keepdims=True)
    h /= h.sum(axis=1, keepdims=True)
    A = w @ h
    if distribution != "gaussian":
        A = _draw(rng, A * (mean / A.mean()), distribution, dispersion, power)
    elif noise > 0:
        A += rng.normal(0.0, noise * A.mean(), size=A.shape)
        np.maximum(A, 0.0, out=A)
    if dropout > 0:
        A *= rng.random(size=A.shape) >= dropout
    return SimulatedNMF(A=A, w=w, h=h)
