"""``nmfre_ecv``: element-wise cross-validation of the NMF-RE rank (spec/nmfre.md §4.2).

The cells of Y are split into ``nfolds`` folds once (the same folds for every rank). For each
rank and fold the held-out cells are filled with the row means of Y (upstream takes them over all
cells, held-out ones included; kept for parity), then
``rounds`` imputation rounds each refit :func:`dnmf.nmfre` (warm-started from the previous
round) and replace the held-out cells by the fit's ``XB_blup``. The score is
``sigma(Q) = sqrt(SSE/count)`` over the held-out cells of all folds, with the last round's
prediction; ``best`` is the rank of the smallest sigma.

Every (rank, fold) pair is an independent task (the folds are drawn before the sweep), so the
result does not depend on the number of workers.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .._validation import check_int, check_option, param_error
from ..covariates._common import executor_for
from ..exceptions import ConvergenceWarning, DnmfError
from ._core import Inputs, validate_inputs
from .nmfre import nmfre

logger = logging.getLogger(__name__)

__all__ = ["nmfre_ecv", "NMFREECVResult", "ecv_folds"]


def ecv_folds(P: int, N: int, nfolds: int, seed, r_rng: bool = False) -> np.ndarray:
    """Fold label (1..nfolds) of every cell, shape (P, N).

    ``sample(rep(1:nfolds, length.out = P·N))`` filled column-major: with ``r_rng=True`` R's
    ``set.seed(seed)`` stream (spec Appendix A), else a NumPy permutation seeded by ``seed``.
    """
    labels = np.resize(np.arange(1, nfolds + 1), P * N)
    if r_rng:
        from ..rrng import RRandom

        perm = RRandom(int(seed)).sample_int(P * N)
    else:
        perm = np.random.default_rng(seed).permutation(P * N)
    return labels[perm].reshape((P, N), order="F")


@dataclass(frozen=True)
class NMFREECVResult:
    """Result of :func:`nmfre_ecv`.

    Attributes
    ----------
    rank : tuple of int
    sigma : ndarray of shape (n_ranks,)
        Root mean squared error on the held-out cells, per rank.
    best : int
        Rank of the smallest sigma.
    nfolds, rounds : int
    C_signed : bool
    engine : str
    sse, count : ndarray of shape (n_ranks, nfolds)
        Held-out squared error and cell count per rank and fold (NaN / 0 where a fit failed).
    folds : ndarray of shape (P, N)
        Fold label (1..nfolds) of every cell.
    """

    rank: tuple
    sigma: np.ndarray
    best: int
    nfolds: int
    rounds: int
    C_signed: bool
    engine: str
    sse: np.ndarray
    count: np.ndarray
    folds: np.ndarray

    def __str__(self) -> str:
        ranks = [str(r) for r in self.rank]
        sig = [f"{s:.7g}" if np.isfinite(s) else "NA" for s in self.sigma]
        wr = max(len("rank"), *(len(r) for r in ranks))
        ws = max(len("sigma"), *(len(s) for s in sig))
        lines = [f"NMF-RE element-wise CV ({self.nfolds}-fold, {self.rounds} imputation rounds, "
                 f"C.signed={'TRUE' if self.C_signed else 'FALSE'})",
                 "rank".rjust(wr) + " " + "sigma".rjust(ws)]
        lines += [r.rjust(wr) + " " + s.rjust(ws) for r, s in zip(ranks, sig)]
        lines.append(f"Best rank (min sigma): {self.best}")
        return "\n".join(lines)

    def plot(self, ax=None):
        """sigma against rank, the minimum marked in red ("Best (Min)"); returns the Figure."""
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(5, 4))
            ax = fig.add_subplot(1, 1, 1)
        else:
            fig = ax.figure
        ax.plot(self.rank, self.sigma, "o-", color="black")
        i = int(np.nanargmin(self.sigma))
        ax.plot([self.rank[i]], [self.sigma[i]], "o", color="red", label="Best (Min)")
        ax.set_xlabel("rank")
        ax.set_ylabel("sigma (ECV)")
        ax.legend()
        return fig


def _fold_task(item, Y, A, folds, covariate_names, rounds, kw):
    """SSE and count on the held-out cells of one (rank, fold) pair; (nan, 0) if a fit fails."""
    rank, k = item
    mask = folds == k
    # upstream fills with the row means of the full Y (held-out cells included)
    fill = np.where(mask, Y.mean(axis=1)[:, None], Y)
    prev = None
    try:
        for _ in range(rounds):
            inp = Inputs(fill, A, None, None, covariate_names, True)
            init = {} if prev is None else {"X_init": prev.X, "C_init": prev.C, "U_init": prev.U}
            prev = nmfre(inp, None, rank=rank, wild_bootstrap=False, client=False, **init, **kw)
            fill = np.where(mask, prev.XB_blup, fill)
    except (DnmfError, np.linalg.LinAlgError, FloatingPointError) as e:
        logger.warning("nmfre_ecv: rank %d fold %d failed (%s); left out", rank, k, e)
        return float("nan"), 0
    resid = (Y - prev.XB_blup)[mask]
    return float(np.sum(resid * resid)), int(mask.sum())


def nmfre_ecv(
    Y,
    A=None,
    rank: Sequence[int] = (1, 2, 3),
    engine: str = "ecm",
    C_signed: bool = True,
    nfolds: int = 5,
    rounds: int = 4,
    seed=1,
    r_rng: bool = False,
    client=None,
    *,
    epsilon: float = 1e-5,
    epsilon_outer: float = 1e-3,
    inner_maxit: int = 1500,
    outer_maxit: int = 80,
    maxit: int = 40000,
    df_rate: Optional[float] = None,
    **kwargs,
) -> NMFREECVResult:
    """Choose the NMF-RE rank by element-wise cross-validation with imputation (spec §4.2).

    Parameters
    ----------
    Y : array-like of shape (P, N)
        Non-negative data.
    A : array-like of shape (K, N), optional
        Covariates (default the intercept row).
    rank : sequence of int, default (1, 2, 3)
        Ranks to compare.
    engine : {"ecm", "cap"}, default "ecm"
        Engine of the refits (upstream's function belongs to the ECM engine).
    C_signed : bool, default True
        Engine "ecm": sign-free Θ.
    nfolds : int, default 5
    rounds : int, default 4
        Imputation rounds per fold.
    seed : int, default 1
        Seed of the fold assignment.
    r_rng : bool, default False
        Reproduce R: draw the folds from R's stream (``set.seed(seed); sample(...)``) and start
        each round-1 refit from R's k-means (``set.seed(init_seed); kmeans(...)``, rank ≥ 2).
    client : distributed.Client, optional
        The (rank, fold) fits run as parallel tasks.
    epsilon, epsilon_outer, inner_maxit, outer_maxit, maxit
        Loosened fit controls (upstream defaults).
    df_rate : float, optional
        For ``engine="cap"``: the df rate of every refit (None runs the automatic scan per fit).
    **kwargs
        Other arguments of :func:`dnmf.nmfre` (``prefix``, ``x_postvar``, ``seed`` of the
        initialiser is ``init_seed`` here).

    Returns
    -------
    NMFREECVResult
    """
    func = "nmfre_ecv"
    inp = validate_inputs(Y, A, func)
    try:
        ranks = tuple(check_int(r, "rank", func, low=1) for r in np.atleast_1d(rank).tolist())
    except TypeError as e:
        raise param_error("rank", func, "a sequence of positive ints", rank) from e
    engine = check_option(engine, "engine", func, ("ecm", "cap"))
    nfolds = check_int(nfolds, "nfolds", func, low=2)
    rounds = check_int(rounds, "rounds", func, low=1)
    P, N = inp.Y.shape
    if nfolds > P * N:
        raise param_error("nfolds", func, f"at most the number of cells ({P * N})", nfolds)
    folds = ecv_folds(P, N, nfolds, seed, r_rng)
    # r_rng reaches the refits too: their nmfkc initialiser runs R's k-means at rank >= 2
    kw = dict(epsilon=epsilon, maxit=maxit, engine=engine, seed=kwargs.pop("init_seed", 1), r_rng=bool(r_rng))
    if engine == "ecm":
        kw.update(C_signed=bool(C_signed), epsilon_outer=epsilon_outer, inner_maxit=inner_maxit,
                  outer_maxit=outer_maxit)
    else:
        kw.update(df_rate=df_rate)
    kw.update(kwargs)
    items = [(q, k) for q in ranks for k in range(1, nfolds + 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # loosened controls by design
        with executor_for(client) as ex:
            out = ex.map(_fold_task, items, args=(inp.Y, inp.A, folds, inp.covariate_names, rounds, kw))
    sse = np.array([o[0] for o in out]).reshape(len(ranks), nfolds)
    cnt = np.array([o[1] for o in out]).reshape(len(ranks), nfolds)
    ok = cnt > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = np.sqrt(np.where(ok, sse, 0.0).sum(axis=1) / cnt.sum(axis=1))
    if not np.any(np.isfinite(sigma)):
        raise DnmfError("nmfre_ecv: every fit failed; check the data and the controls.")
    best = ranks[int(np.nanargmin(sigma))]
    return NMFREECVResult(rank=ranks, sigma=sigma, best=best, nfolds=nfolds, rounds=rounds,
                          C_signed=bool(C_signed), engine=engine, sse=np.where(ok, sse, np.nan), count=cnt,
                          folds=folds)
