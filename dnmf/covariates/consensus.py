"""``nmfkc_consensus``: Brunet-style consensus clustering over random restarts (spec §9, §11.3).

For each rank, ``nrun`` fits from random starts (``X_init="runif"``; run r of rank index i is
seeded ``seed + 1000·i + r``, so every run is an independent task and the result does not
depend on the number of workers) give hard clusters (column argmax of B); their connectivity
matrices 1[cl_i = cl_j] are averaged into the consensus matrix C̄ (N × N), summarised by

* dispersion = Σ 4(C̄ − ½)² / N²  (1 for a crisp consensus),
* PAC = share of the lower-triangle entries in (0.1, 0.9)  (0 for a crisp consensus),
* cophenetic = cor(d, cophenetic(hclust(d, "average"))) with d = 1 − C̄.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .._validation import check_int, param_error
from ..exceptions import ConvergenceWarning
from ._common import executor_for

__all__ = ["ConsensusResult", "nmfkc_consensus", "consensus_stats"]

_FUNC = "nmfkc_consensus"


def consensus_stats(Cbar: np.ndarray) -> dict:
    """Dispersion, PAC and cophenetic correlation of a consensus matrix (N × N)."""
    from scipy.cluster.hierarchy import cophenet, linkage
    from scipy.spatial.distance import squareform

    N = Cbar.shape[0]
    dispersion = float(np.sum(4.0 * (Cbar - 0.5) ** 2) / N ** 2)
    low = Cbar[np.tril_indices(N, k=-1)]
    pac = float(np.mean((low > 0.1) & (low < 0.9))) if low.size else float("nan")
    coph = float("nan")
    if N >= 3:
        D = 1.0 - Cbar
        np.fill_diagonal(D, 0.0)
        d = squareform(D, checks=False)
        if np.ptp(d) > 0:
            c, _ = cophenet(linkage(d, method="average"), d)
            coph = float(c)
    return {"dispersion": dispersion, "PAC": pac, "cophenetic": coph}


def _run_task(item, Y, A, kwargs):
    """Cluster labels (length N; −1 for an all-zero column) of one random-start fit."""
    from .nmfkc import nmfkc

    q, run_seed = item
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        f = nmfkc(Y, A, rank=q, X_init="runif", seed=run_seed, detail="fast", **kwargs)
    B = f.B
    cl = np.argmax(B, axis=0)
    cl[~(B.sum(axis=0) > 0)] = -1
    return cl


@dataclass(frozen=True)
class ConsensusResult:
    """Result of :func:`nmfkc_consensus`.

    Attributes
    ----------
    rank : tuple of int
    dispersion, PAC, cophenetic : ndarray of shape (n_ranks,)
    nrun : int
    consensus : dict of int to ndarray (N × N) or None
        The consensus matrices, when ``keep_consensus=True``.
    """

    rank: tuple
    dispersion: np.ndarray
    PAC: np.ndarray
    cophenetic: np.ndarray
    nrun: int
    consensus: Optional[dict] = None

    def table(self):
        """The per-rank statistics as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame({"rank": self.rank, "dispersion": self.dispersion, "PAC": self.PAC,
                             "cophenetic": self.cophenetic})

    def __str__(self) -> str:
        return f"Consensus clustering ({self.nrun} runs per rank)\n" + self.table().to_string(index=False)


def nmfkc_consensus(
    Y,
    A=None,
    rank: Sequence[int] = (2, 3, 4),
    nrun: int = 30,
    *,
    seed: int = 123,
    keep_consensus: bool = False,
    client=None,
    **nmfkc_kwargs,
) -> ConsensusResult:
    """Consensus clustering of the columns of Y across random restarts (R ``nmfkc.consensus``).

    Parameters
    ----------
    Y, A
        As :func:`dnmf.nmfkc`.
    rank : sequence of int, default (2, 3, 4)
    nrun : int, default 30
        Random restarts per rank.
    seed : int, default 123
        Run r (1..nrun) of the i-th rank (1-based) uses ``seed + 1000·i + r``.
    keep_consensus : bool, default False
        Return the consensus matrices.
    client : distributed.Client, optional
        Runs the restarts as parallel tasks.
    **nmfkc_kwargs
        Other arguments of :func:`dnmf.nmfkc` (``epsilon``, ``maxit``, ``method``, …).

    Returns
    -------
    ConsensusResult
    """
    from .nmfkc import nmfkc  # noqa: F401  (import check before the sweep)

    nrun = check_int(nrun, "nrun", _FUNC, low=1)
    seed = check_int(seed, "seed", _FUNC)
    try:
        ranks = tuple(int(q) for q in np.atleast_1d(rank).tolist())
    except (TypeError, ValueError) as e:
        raise param_error("rank", _FUNC, "a sequence of positive ints", rank) from e
    if not ranks or min(ranks) < 1:
        raise param_error("rank", _FUNC, "a sequence of positive ints", rank)
    for k in ("X_init", "seed", "rank", "detail"):
        nmfkc_kwargs.pop(k, None)
    items = [(q, seed + 1000 * i + r) for i, q in enumerate(ranks, start=1) for r in range(1, nrun + 1)]
    with executor_for(client) as ex:
        labels = ex.map(_run_task, items, args=(Y, A, nmfkc_kwargs))
    disp, pac, coph, mats = [], [], [], {}
    for i, q in enumerate(ranks):
        L = np.asarray(labels[i * nrun:(i + 1) * nrun])  # nrun × N
        conn = (L[:, :, None] == L[:, None, :]) & (L[:, :, None] >= 0)
        Cbar = conn.mean(axis=0)
        s = consensus_stats(Cbar)
        disp.append(s["dispersion"])
        pac.append(s["PAC"])
        coph.append(s["cophenetic"])
        if keep_consensus:
            mats[q] = Cbar
    return ConsensusResult(rank=ranks, dispersion=np.array(disp), PAC=np.array(pac), cophenetic=np.array(coph),
                           nrun=nrun, consensus=mats if keep_consensus else None)
