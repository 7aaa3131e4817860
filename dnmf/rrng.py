"""Emulation of R's default random-number stream (spec ``nmfre.md`` Appendix A).

R parity for seeded results (bootstrap draws, fold assignments, k-means starts) needs the
exact stream R produces after ``set.seed(s)`` with the default generator kinds
(``RNGkind("Mersenne-Twister", "Inversion", "Rejection")``, R ≥ 3.6). This module
reproduces it:

* ``set.seed(s)`` — the seed is scrambled 50 times by ``s ← 69069·s + 1 (mod 2³²)``, then 625
  words are filled with the same recurrence; word 0 (the position) is forced to 624 and words
  1..624 are the MT19937 key. NumPy's :class:`numpy.random.MT19937` with that key and
  ``pos=624`` then yields R's 32-bit outputs.
* ``unif_rand`` — ``y · 2.3283064365386963e-10`` clamped into (0, 1).
* ``norm_rand`` (Inversion) — ``u = ⌊2²⁷·u₁⌋ + u₂``, ``qnorm(u / 2²⁷)``.
* ``exp_rand`` — Ahrens & Dieter (1972) algorithm SA, as in R's ``sexp.c``; it consumes a
  *variable* number of uniforms, so an R stream that mixes ``rexp`` draws cannot be split.
* ``R_unif_index`` (rejection sampling) and ``sample`` (swap-with-last permutation).

The state is private to an :class:`RRandom` instance: nothing here touches NumPy's global
generator or any other stream.

Examples
--------
>>> from dnmf.rrng import RRandom
>>> RRandom(42).runif(1)            # R: set.seed(42); runif(1)
array([0.91480604])
>>> RRandom(1).sample(5) + 1        # R: set.seed(1); sample(5)  (0-based here)
array([1, 4, 3, 5, 2])
"""

from __future__ import annotations

import math
from typing import Sequence

import numba
import numpy as np
from scipy.special import ndtri

__all__ = ["RRandom", "r_seed_key"]

_U32 = 0xFFFFFFFF
_I2_32M1 = 2.328306437080797e-10  # 1 / (2^32 - 1), R's fixup bound
_MT_SCALE = 2.3283064365386963e-10  # 2^-32
_BIG = 134217728.0  # 2^27, R's norm_rand INVERSION precision trick

# q[k-1] = sum_{i<=k} ln(2)^i / i!, k = 1..16, exactly as tabulated in R's sexp.c.
_Q_EXP = np.array(
    [
        0.6931471805599453,
        0.9333736875190459,
        0.9888777961838675,
        0.9984959252914960040,
        0.9998292811061389,
        0.9999833164100727,
        0.9999985508193580,
        0.9999998906925558,
        0.9999999924734159,
        0.9999999995283275,
        0.9999999999728814,
        0.9999999999985598,
        0.9999999999999289,
        0.9999999999999968,
        0.9999999999999999,
        1.0000000000000000,
    ]
)


def r_seed_key(seed: int) -> np.ndarray:
    """The 624-word MT19937 key R builds for ``set.seed(seed)`` (``uint32``)."""
    s = int(seed) & _U32
    for _ in range(50):
        s = (69069 * s + 1) & _U32
    words = np.empty(625, dtype=np.uint32)
    for j in range(625):
        s = (69069 * s + 1) & _U32
        words[j] = s
    return words[1:].copy()


def _fixup(u: np.ndarray) -> np.ndarray:
    """R's ``fixup``: keep uniforms strictly inside (0, 1)."""
    u = np.where(u <= 0.0, 0.5 * _I2_32M1, u)
    return np.where(1.0 - u <= 0.0, 1.0 - 0.5 * _I2_32M1, u)


@numba.njit(cache=True, nogil=True)
def _exp_from_uniforms(u, q, out, start):
    """Ahrens–Dieter ``exp_rand`` (R ``sexp.c``) on a buffer of uniforms.

    Fills ``out[start:]`` while uniforms last. A draw that would run out of uniforms is not
    started (or is abandoned and not counted), so the caller can refill and resume.

    Returns
    -------
    (int, int)
        Index of the next unfilled entry of ``out`` and number of uniforms consumed by the
        completed draws.
    """
    n_u = u.shape[0]
    pos = 0
    k = start
    while k < out.shape[0]:
        p = pos
        if p >= n_u:
            break
        a = 0.0
        v = u[p]
        p += 1
        while True:
            v += v
            if v > 1.0:
                break
            a += q[0]
        v -= 1.0
        if v <= q[0]:
            out[k] = a + v
            k += 1
            pos = p
            continue
        # need at least one u* then more until v <= q[i]; at most 16 more uniforms
        if p >= n_u:
            break
        ustar = u[p]
        p += 1
        umin = ustar
        i = 0
        ok = True
        while True:
            if p >= n_u:
                ok = False
                break
            ustar = u[p]
            p += 1
            umin = min(umin, ustar)
            i += 1
            if not (v > q[i]):
                break
        if not ok:
            break
        out[k] = a + umin * q[0]
        k += 1
        pos = p
    return k, pos


class RRandom:
    """One R random stream, as after ``set.seed(seed)`` in a fresh R session.

    Parameters
    ----------
    seed : int
        The argument of R's ``set.seed`` (taken modulo 2³², as R's ``(Int32)`` cast does).

    Notes
    -----
    Methods draw in the same order and quantity as the R function of the same name, so a
    sequence of calls reproduces the corresponding sequence of R calls. Indices returned by
    :meth:`sample_int` are 0-based (R's are 1-based).
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._bitgen = np.random.MT19937()
        self._bitgen.state = {
            "bit_generator": "MT19937",
            "state": {"key": r_seed_key(seed), "pos": 624},
        }

    # ------------------------------------------------------------------ state -----------
    def get_state(self) -> dict:
        """A copy of the generator state (restore it with :meth:`set_state`)."""
        return self._bitgen.state

    def set_state(self, state: dict) -> None:
        """Restore a state from :meth:`get_state`."""
        self._bitgen.state = state

    # ---------------------------------------------------------------- uniforms ----------
    def unif_rand(self, n: int) -> np.ndarray:
        """``n`` draws of R's ``unif_rand()`` (shape (n,))."""
        n = int(n)
        if n <= 0:
            return np.empty(0)
        raw = self._bitgen.random_raw(n).astype(np.float64)
        return _fixup(raw * _MT_SCALE)

    def runif(self, n: int, min: float = 0.0, max: float = 1.0) -> np.ndarray:  # noqa: A002
        """R's ``runif(n, min, max)``."""
        if min == max:
            return np.full(int(n), float(min))
        return min + (max - min) * self.unif_rand(n)

    def rnorm(self, n: int, mean: float = 0.0, sd: float = 1.0) -> np.ndarray:
        """R's ``rnorm(n, mean, sd)`` with the default INVERSION normal generator."""
        n = int(n)
        u = self.unif_rand(2 * n).reshape(n, 2)
        v = (np.floor(_BIG * u[:, 0]) + u[:, 1]) / _BIG
        return mean + sd * ndtri(v)

    def exp_rand(self, n: int) -> np.ndarray:
        """``n`` draws of R's ``exp_rand()`` (standard exponential, Ahrens–Dieter 1972)."""
        n = int(n)
        out = np.empty(n)
        k = 0
        while k < n:
            state = self._bitgen.state
            n_u = max(64, int(1.6 * (n - k)) + 32)
            u = self.unif_rand(n_u)
            k, used = _exp_from_uniforms(u, _Q_EXP, out, k)
            # rewind to the start of the chunk and advance by exactly the consumed uniforms
            self._bitgen.state = state
            if used:
                self._bitgen.random_raw(used)
        return out

    def rexp(self, n: int, rate: float = 1.0) -> np.ndarray:
        """R's ``rexp(n, rate)``."""
        return self.exp_rand(n) / rate

    # ----------------------------------------------------------------- sampling ---------
    def unif_index(self, dn: int) -> int:
        """R's ``R_unif_index(dn)`` under ``sample.kind = "Rejection"``: an int in [0, dn)."""
        if dn <= 0:
            return 0
        bits = int(math.ceil(math.log2(dn)))
        n_chunks = bits // 16 + 1
        mask = (1 << bits) - 1
        while True:
            v = 0
            for u in self.unif_rand(n_chunks):
                v = 65536 * v + int(math.floor(u * 65536.0))
            v &= mask
            if v < dn:
                return v

    def sample_int(self, n: int, size: int | None = None, replace: bool = False) -> np.ndarray:
        """R's ``sample.int(n, size, replace)`` without ``prob``, as 0-based indices."""
        n = int(n)
        size = n if size is None else int(size)
        if replace or size < 2:
            return np.array([self.unif_index(n) for _ in range(size)], dtype=np.int64)
        if size > n:
            raise ValueError(f"cannot take a sample of size {size} larger than the population {n}")
        x = list(range(n))
        out = np.empty(size, dtype=np.int64)
        m = n
        for i in range(size):
            j = self.unif_index(m)
            out[i] = x[j]
            m -= 1
            x[j] = x[m]
        return out

    def sample(self, x: int | Sequence, size: int | None = None, replace: bool = False) -> np.ndarray:
        """R's ``sample(x, size, replace)``.

        An int ``x`` means ``sample(x)`` over 1..x in R; here the result is the 0-based
        permutation/indices (add 1 for R's values). A sequence is permuted/sampled as R does.
        """
        if isinstance(x, (int, np.integer)):
            return self.sample_int(int(x), size, replace)
        arr = np.asarray(x)
        return arr[self.sample_int(arr.shape[0], size, replace)]
