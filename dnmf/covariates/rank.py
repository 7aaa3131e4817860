"""``nmfkc_rank``: the rank-selection table and plot of R ``nmfkc.rank`` (spec §9).

Each rank is fitted (``detail="fast"``) and tabulated with R² (cor²), the effective rank, its
ratio to Q, the broken-stick expectation e^{H_Q−1} and the [0, 1] effective-rank index; with
``detail="full"`` the element-wise CV error ``sigma_ecv`` of :func:`nmfkc_ecv` is added. The
recommended rank is the ECV minimum when available, else the knee of the R² curve.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .._validation import check_option, param_error
from ..exceptions import ConvergenceWarning
from ._common import effective_rank_expected, effective_rank_index

__all__ = ["RankResult", "nmfkc_rank", "r2_knee"]

_FUNC = "nmfkc_rank"


def r2_knee(ranks: Sequence[int], r2: Sequence[float]):
    """The rank farthest from the chord of the min–max-normalised (index, R²) curve (R's
    ``.rank.finish`` elbow); None with fewer than 3 ranks.

    The x axis is the position 1..n (not the rank value), as upstream.
    """
    n = len(ranks)
    if n < 3:
        return None
    y = np.asarray(r2, dtype=float)
    x = np.arange(1, n + 1, dtype=float)
    yr, xr = np.nanmax(y) - np.nanmin(y), x[-1] - x[0]
    yn = (y - np.nanmin(y)) / yr if yr > 0 else np.full(n, 0.5)
    xn = (x - x[0]) / xr if xr > 0 else np.full(n, 0.5)
    x1, y1, x2, y2 = xn[0], yn[0], xn[-1], yn[-1]
    den = np.hypot(y2 - y1, x2 - x1)
    d = np.abs((y2 - y1) * xn - (x2 - x1) * yn + x2 * y1 - y2 * x1) / den if den > 0 else np.zeros(n)
    return int(ranks[int(np.nanargmax(d))])


@dataclass(frozen=True)
class RankResult:
    """Result of :func:`nmfkc_rank` (R class ``nmf.rank``).

    Attributes
    ----------
    criteria : pandas.DataFrame
        One row per rank: ``rank``, ``r_squared``, ``effective_rank``, ``effective_rank_ratio``,
        ``effective_rank_expected``, ``effective_rank_index``, and ``sigma_ecv`` (NaN unless
        ``detail="full"``).
    rank_best : int
        ``best_ecv`` when available, else ``best_r2``.
    best_ecv, best_r2 : int or None
        The ECV minimum; the R² knee (needs ≥ 3 ranks).
    """

    criteria: object
    rank_best: Optional[int]
    best_ecv: Optional[int]
    best_r2: Optional[int]

    def __str__(self) -> str:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 20):
            table = self.criteria.to_string(index=False)
        return "\n".join([table, f"Best rank: {self.rank_best}"
                          + (" (ECV minimum)" if self.best_ecv is not None else " (R-squared elbow)")])

    def plot(self, ax=None, main: str = "Rank Selection Diagnostics"):
        """R², the effective-rank index (left axis, 0–1) and sigma_ecv (right axis), with the
        "Best (Elbow)" and "Best (Min)" markers. Returns the matplotlib Figure."""
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(6, 4.5))
            ax = fig.add_subplot(1, 1, 1)
        else:
            fig = ax.figure
        c = self.criteria
        rk = c["rank"].to_numpy()
        ax.plot(rk, c["r_squared"], "-o", color="red", lw=2, label="r.squared")
        if self.best_r2 is not None:
            j = int(np.flatnonzero(rk == self.best_r2)[0])
            ax.plot([rk[j]], [c["r_squared"].iloc[j]], "o", color="red", ms=10)
            ax.annotate("Best (Elbow)", (rk[j], c["r_squared"].iloc[j]), color="red", xytext=(5, 0),
                        textcoords="offset points")
        idx = c["effective_rank_index"].to_numpy(dtype=float)
        if np.isfinite(idx).any():
            ax.plot(rk, idx, "-o", color="forestgreen", lw=2, label="eff.rank.idx")
        ax.set_ylim(0, 1)
        ax.set_xlabel("Rank (Q)")
        ax.set_ylabel("R-squared / eff.rank (0-1)")
        ax.set_title(main)
        handles = ax.get_legend_handles_labels()
        sig = c["sigma_ecv"].to_numpy(dtype=float)
        if np.isfinite(sig).any():
            ax2 = ax.twinx()
            ax2.plot(rk, sig, "-o", color="blue", lw=2, label="sigma.ecv")
            j = int(np.nanargmin(sig))
            ax2.plot([rk[j]], [sig[j]], "o", color="blue", ms=10)
            ax2.annotate("Best (Min)", (rk[j], sig[j]), color="blue", xytext=(5, 0), textcoords="offset points")
            ax2.set_ylabel("ECV Sigma (RMSE)", color="blue")
            h2 = ax2.get_legend_handles_labels()
            handles = (handles[0] + h2[0], handles[1] + h2[1])
        ax.legend(*handles, loc="center right")
        return fig


def nmfkc_rank(
    Y,
    A=None,
    rank: Sequence[int] = (1, 2),
    *,
    detail: str = "full",
    nfolds: int = 5,
    seed: Optional[int] = 123,
    r_rng: bool = False,
    client=None,
    **nmfkc_kwargs,
) -> RankResult:
    """Rank-selection diagnostics for ``nmfkc`` (R ``nmfkc.rank``).

    Parameters
    ----------
    Y, A
        As :func:`dnmf.nmfkc` (A optional).
    rank : sequence of int, default (1, 2)
    detail : {"full", "fast"}, default "full"
        ``"full"`` adds ``sigma_ecv`` from :func:`dnmf.nmfkc_ecv` (same ``nfolds``, ``seed``).
    nfolds : int, default 5
        ECV folds.
    seed : int, default 123
        Seed of the fits' initialisation and of the ECV folds.
    r_rng : bool, default False
        R's random streams (k-means starts, fold draw).
    client : distributed.Client, optional
        The ECV's (rank, fold) fits run as parallel tasks.
    **nmfkc_kwargs
        Other arguments of :func:`dnmf.nmfkc` (``method``, ``epsilon``, ``maxit``, …).

    Returns
    -------
    RankResult
    """
    import pandas as pd

    from .ecv import nmfkc_ecv
    from .nmfkc import nmfkc

    detail = check_option(detail, "detail", _FUNC, ("full", "fast"))
    try:
        ranks = [int(q) for q in np.atleast_1d(rank).tolist()]
    except (TypeError, ValueError) as e:
        raise param_error("rank", _FUNC, "a sequence of positive ints", rank) from e
    if not ranks or min(ranks) < 1 or len(set(ranks)) != len(ranks):
        raise param_error("rank", _FUNC, "a sequence of distinct positive ints", rank)
    nmfkc_kwargs.pop("detail", None)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for q in ranks:
            f = nmfkc(Y, A, rank=q, detail="fast", seed=seed, r_rng=r_rng, **nmfkc_kwargs)
            er = f.criterion.get("effective_rank", float("nan"))
            rows.append({
                "rank": q,
                "r_squared": f.r_squared,
                "effective_rank": er,
                "effective_rank_ratio": er / q if np.isfinite(er) else float("nan"),
                "effective_rank_expected": effective_rank_expected(q),
                "effective_rank_index": effective_rank_index(er, q),
            })
    crit = pd.DataFrame(rows)
    crit["sigma_ecv"] = np.nan
    best_ecv = None
    if detail == "full":
        ecv = nmfkc_ecv(Y, A, rank=ranks, nfolds=nfolds, seed=seed, r_rng=r_rng, client=client, **nmfkc_kwargs)
        crit["sigma_ecv"] = np.asarray(ecv.sigma, dtype=float)
        if np.isfinite(crit["sigma_ecv"]).any():
            best_ecv = int(ranks[int(np.nanargmin(crit["sigma_ecv"]))])
    best_r2 = r2_knee(ranks, crit["r_squared"].to_numpy(dtype=float))
    rank_best = best_ecv if best_ecv is not None else best_r2
    return RankResult(criteria=crit, rank_best=rank_best, best_ecv=best_ecv, best_r2=best_r2)
