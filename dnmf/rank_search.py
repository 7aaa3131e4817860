"""Automatic rank search (RcppML ``k = "auto"``, spec §5.7): exponential bracketing, then golden section.

A pure search over ranks: it knows nothing of the data or the engine. The caller supplies
``evaluate(r) -> (train_loss, test_loss)``, the final train and test loss of a cross-validated
fit at rank r (spec §5.6 fits with ``test_fraction`` 0.1 by default); :func:`rank_search` decides
which ranks to fit and returns the chosen rank with the record of every fit, for
``misc["rank_search"]`` of the final model.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, NamedTuple

from ._validation import check_int, param_error
from .exceptions import InputError

__all__ = ["rank_search", "RankSearchResult", "RankEvaluation", "TRAIN_RTOL", "GOLDEN_TOL"]

#: Exponential phase: a relative change of the train loss below this counts as "flat".
TRAIN_RTOL = 0.01
#: Golden-section phase: stop when ``k_high − k_low`` is at most this.
GOLDEN_TOL = 2
_PHI = (1.0 + math.sqrt(5.0)) / 2.0
_FUNC = "rank_search"


class RankEvaluation(NamedTuple):
    """One fit of the search: its rank, final train and test loss, and the phase that asked for it
    (``"exponential"`` or ``"golden"``)."""

    rank: int
    train: float
    test: float
    phase: str


@dataclass(frozen=True)
class RankSearchResult:
    """Result of :func:`rank_search`.

    Attributes
    ----------
    k_optimal : int
        The chosen rank: ``k_low`` at the end of the golden-section phase when overfitting was
        detected, else the last rank of the exponential phase (``k_max``).
    k_low, k_high : int
        The bracket at the end of the search. With overfitting, the golden-section bracket
        (``k_high − k_low ≤ 2``, or wider when a golden step stopped on its integer rules).
        Without it no bracket was found and both equal ``k_optimal`` (the spec leaves them
        unspecified in that case).
    overfitting_detected : bool
        True when the exponential phase saw the train loss flatten (relative change below
        :data:`TRAIN_RTOL`) while the test loss rose.
    evaluations : tuple of RankEvaluation
        Every fit, once per rank, in the order it was made.
    k_min, k_max : int
        The search range.
    """

    k_optimal: int
    k_low: int
    k_high: int
    overfitting_detected: bool
    evaluations: tuple
    k_min: int
    k_max: int

    @property
    def table(self):
        """The fits in evaluation order: columns ``rank``, ``train``, ``test``, ``phase`` (DataFrame)."""
        import pandas as pd

        return pd.DataFrame(list(self.evaluations), columns=list(RankEvaluation._fields))

    def as_misc(self) -> dict:
        """RcppML's ``misc$rank_search``: ``{k_optimal, k_low, k_high, overfitting_detected}``."""
        return {"k_optimal": self.k_optimal, "k_low": self.k_low, "k_high": self.k_high,
                "overfitting_detected": self.overfitting_detected}

    def plot(self, ax=None):
        """Final train and test loss of the fits against rank (test on a second axis), golden-
        section fits marked with open circles and ``k_optimal`` with a dashed line. Returns the
        matplotlib Figure."""
        from ._plotting import figure_axes

        fig, ax = figure_axes(ax, (6, 4))
        t = self.table.sort_values("rank", kind="stable")
        ax.plot(t["rank"], t["train"], "o-", color="#377eb8", label="train")
        ax.set_xlabel("k")
        ax.set_ylabel("train loss", color="#377eb8")
        ax2 = ax.twinx()
        ax2.plot(t["rank"], t["test"], "s-", color="#e41a1c", label="test")
        golden = t[t["phase"] == "golden"]
        ax2.plot(golden["rank"], golden["test"], "o", mfc="none", mec="black", ms=10, label="golden-section fit")
        ax2.set_ylabel("test loss", color="#e41a1c")
        ax.axvline(self.k_optimal, color="grey", ls="--", lw=1)
        ax.set_title(f"Rank search: k = {self.k_optimal}"
                     + ("" if self.overfitting_detected else " (no overfitting up to k_max)"))
        return fig

    def __str__(self) -> str:
        head = (f"rank search in [{self.k_min}, {self.k_max}]: k_optimal = {self.k_optimal} "
                f"(bracket [{self.k_low}, {self.k_high}], overfitting "
                f"{'detected' if self.overfitting_detected else 'not detected'})")
        return head + "\n" + self.table.to_string(index=False)


def _losses(value, r: int) -> tuple[float, float]:
    """``evaluate(r)``'s result as two finite floats, or an error naming ``evaluate`` and r."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if ok:
        try:
            pair = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            ok = False
        else:
            ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value) and all(
                math.isfinite(v) for v in pair)
    if not ok:
        raise InputError(f"The 'evaluate' parameter of {_FUNC} must return (train_loss, test_loss), two finite "
                         f"real numbers. Got {value!r} instead, at rank {r}.")
    return pair


def rank_search(evaluate: Callable[[int], tuple[float, float]], k_min: int = 2, k_max: int = 50) -> RankSearchResult:
    """Find the rank where cross-validated NMF starts to overfit (RcppML's ``k = "auto"``).

    Parameters
    ----------
    evaluate : callable
        ``evaluate(r) -> (train_loss, test_loss)``: the **final** train and test loss of a
        cross-validated fit at rank r. Called at most once per rank (results are memoized).
    k_min : int, default 2
        Smallest rank tried, at least 1 (RcppML's ``cv_k_range[1]``).
    k_max : int, default 50
        Largest rank tried, at least ``k_min`` (``cv_k_range[2]``).

    Returns
    -------
    RankSearchResult
        ``k_optimal``, ``k_low``, ``k_high``, ``overfitting_detected`` and the fits made
        (``.evaluations``, ``.table``).

    Raises
    ------
    InputError
        ``k_min`` or ``k_max`` not an int in range, ``evaluate`` not callable, or ``evaluate``
        returning anything but two finite numbers.

    Notes
    -----
    Spec §5.7, step for step:

    1. **Exponential phase.** Fit r = k_min, 2·k_min, 4·k_min, … while r ≤ k_max; when the
       next doubling would exceed k_max and the last r < k_max, fit k_max once. After every fit
       but the first, with ``prev`` the fit before it: if
       ``|train_r − train_prev| / (train_prev + 1e-15) < 0.01`` **and** ``test_r > test_prev``,
       set ``k_low = prev``, ``k_high = r``, overfitting detected, and go to step 2. If that
       never happens, ``k_optimal`` is the last rank fitted.
    2. **Golden section** (tolerance 2). While ``k_high − k_low > 2``, with φ = (1 + √5)/2:
       ``k1 = int(k_high − (k_high − k_low)/φ + 0.5)``, ``k2 = int(k_low + (k_high − k_low)/φ
       + 0.5)``; stop if ``k1 ≤ k_low`` or ``k2 ≥ k_high`` or ``k1 ≥ k2``; fit both; if
       ``test(k1) < test(k2)`` then ``k_high = k2`` else ``k_low = k1``. ``k_optimal = k_low``.

    Each step shrinks ``k_high − k_low`` by at least 1, so the search ends. A rank asked for
    again (a golden point that was fitted before) is taken from the earlier fit.

    Examples
    --------
    >>> from dnmf.rank_search import rank_search
    >>> res = rank_search(lambda r: (1 + 1 / r**3, (r - 11) ** 2 + 5), k_min=2, k_max=50)
    >>> res.k_optimal, res.overfitting_detected, [e.rank for e in res.evaluations]
    (10, True, [2, 4, 8, 16, 11, 13, 10, 12])
    """
    if not callable(evaluate):
        raise param_error("evaluate", _FUNC, "a callable evaluate(r) -> (train_loss, test_loss)", evaluate)
    k_min = check_int(k_min, "k_min", _FUNC, low=1)
    k_max = check_int(k_max, "k_max", _FUNC, low=k_min)

    fits: dict[int, RankEvaluation] = {}
    order: list[RankEvaluation] = []

    def fit(r: int, phase: str) -> RankEvaluation:
        if r not in fits:
            train, test = _losses(evaluate(r), r)
            fits[r] = RankEvaluation(r, train, test, phase)
            order.append(fits[r])
        return fits[r]

    # 1. exponential phase
    bracket = None
    prev = None
    r = k_min
    while True:
        cur = fit(r, "exponential")
        if prev is not None and (abs(cur.train - prev.train) / (prev.train + 1e-15) < TRAIN_RTOL
                                 and cur.test > prev.test):
            bracket = (prev.rank, cur.rank)
            break
        prev = cur
        if 2 * r <= k_max:
            r = 2 * r
        elif r < k_max:
            r = k_max
        else:
            break
    if bracket is None:
        return RankSearchResult(k_optimal=r, k_low=r, k_high=r, overfitting_detected=False,
                                evaluations=tuple(order), k_min=k_min, k_max=k_max)

    # 2. golden-section phase
    k_low, k_high = bracket
    while k_high - k_low > GOLDEN_TOL:
        span = (k_high - k_low) / _PHI
        k1 = int(k_high - span + 0.5)
        k2 = int(k_low + span + 0.5)
        if k1 <= k_low or k2 >= k_high or k1 >= k2:
            break
        t1 = fit(k1, "golden").test
        t2 = fit(k2, "golden").test
        if t1 < t2:
            k_high = k2
        else:
            k_low = k1
    return RankSearchResult(k_optimal=k_low, k_low=k_low, k_high=k_high, overfitting_detected=True,
                            evaluations=tuple(order), k_min=k_min, k_max=k_max)
