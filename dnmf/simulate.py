"""Planted-factor test data: ``simulate_nmf`` (RcppML ``simulateNMF``, spec/rcppml.md §10.10)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ._typing import SeedLike
from ._validation import check_float, check_int, param_error

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


def simulate_nmf(
    m: int,
    n: int,
    k: int,
    noise: float = 0.5,
    dropout: float = 0.0,
    seed: SeedLike = None,
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

    Returns
    -------
    SimulatedNMF
        ``A`` (m × n), ``w`` (m × k, columns sum to 1), ``h`` (k × n, rows sum to 1).

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
    rng = np.random.default_rng(seed)

    w = _block_factor(rng, m, k)
    h = np.ascontiguousarray(_block_factor(rng, n, k).T)
    w /= w.sum(axis=0, keepdims=True)
    h /= h.sum(axis=1, keepdims=True)
    A = w @ h
    if noise > 0:
        A += rng.normal(0.0, noise * A.mean(), size=A.shape)
        np.maximum(A, 0.0, out=A)
    if dropout > 0:
        A *= rng.random(size=A.shape) >= dropout
    return SimulatedNMF(A=A, w=w, h=h)
