"""Rank-2 NMF divisive clustering (RcppML ``bipartition`` and ``dclust``, guided spec §5.2–§5.3).

:func:`bipartition` splits a set of samples (columns) by a rank-2 :func:`dnmf.nmf` fit: samples
are assigned by the sign of the difference between the larger and the smaller factor's H rows.
:func:`dclust` splits recursively until the pieces are too small (or too similar). Splits of
independent subtrees are independent tasks: the tree is grown one level (wave) at a time, each
wave's splits run through the executor (a Dask cluster when a client is given, a thread pool
otherwise), and the leaves are returned in RcppML's depth-first order — so the result does not
depend on where or in which order the splits ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from .._validation import check_float, check_int, param_error
from ..engine.executor import get_executor

__all__ = ["Bipartition", "bipartition", "Cluster", "DClustResult", "dclust"]


@dataclass(frozen=True)
class Bipartition:
    """Result of :func:`bipartition`.

    Attributes
    ----------
    v : ndarray of shape (s,)
        ``h[a] − h[b]`` per selected sample, a = the factor with the larger d.
    dist : float
        RcppML's relative cosine distance between the two clusters (−1 when not computed).
    size1, size2 : int
    samples1, samples2 : ndarray of int
        0-based column indices of A in each cluster (``v > 0`` and ``v ≤ 0``).
    center1, center2 : ndarray of shape (m,)
        Mean column of each cluster (zeros when the distance is not computed).
    """

    v: np.ndarray
    dist: float
    size1: int
    size2: int
    samples1: np.ndarray
    samples2: np.ndarray
    center1: np.ndarray = field(repr=False)
    center2: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Cluster:
    """A leaf of :func:`dclust`: ``id`` is its path ("" root, "0"/"1" per split), ``samples`` 0-based."""

    id: str
    samples: np.ndarray
    center: np.ndarray = field(repr=False)

    @property
    def size(self) -> int:
        return int(self.samples.size)


@dataclass(frozen=True)
class DClustResult:
    """Result of :func:`dclust`.

    Attributes
    ----------
    clusters : tuple of Cluster
        Leaves in RcppML's emission order (depth first, "1" branches first).
    n_samples : int
    """

    clusters: tuple
    n_samples: int

    @property
    def labels(self) -> np.ndarray:
        """Index of each sample's cluster in :attr:`clusters` (length n)."""
        out = np.full(self.n_samples, -1, dtype=np.int64)
        for i, c in enumerate(self.clusters):
            out[c.samples] = i
        return out

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.clusters]

    def __len__(self) -> int:
        return len(self.clusters)


def _as_data(A: Any, func: str):
    if sp.issparse(A):
        A = sp.csc_array(A, dtype=np.float64)
        values = A.data
    else:
        try:
            A = np.asarray(A, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise param_error("A", func, "a numeric m x n matrix", type(A).__name__, described=True) from e
        if A.ndim != 2:
            raise param_error("A", func, "a 2-D m x n matrix", f"an array with {A.ndim} dimension(s)", described=True)
        values = A
    if not np.all(np.isfinite(values)):
        raise param_error("A", func, "finite data", "data with NaN or Inf", described=True)
    if values.size and values.min() < 0:
        raise param_error("A", func, "non-negative data", f"minimum {float(values.min())!r}", described=True)
    return A


def _col_mean(A_S) -> np.ndarray:
    if A_S.shape[1] == 0:
        return np.zeros(A_S.shape[0])
    return np.asarray(A_S.mean(axis=1)).ravel()


def _relative_cosine_distance(A1, A2, c1, c2, m: int) -> float:
    """RcppML's distance (spec §5.2 step 4), literally: divided by 2·(number of features)."""
    if A1.shape[1] == 0 or A2.shape[1] == 0:
        return 0.0
    n1, n2 = np.linalg.norm(c1), np.linalg.norm(c2)
    with np.errstate(divide="ignore", invalid="ignore"):
        x1c1, x1c2 = np.asarray(A1.T @ c1).ravel(), np.asarray(A1.T @ c2).ravel()
        x2c1, x2c2 = np.asarray(A2.T @ c1).ravel(), np.asarray(A2.T @ c2).ravel()
        s1 = np.sum(np.sqrt(x1c2) * n1 / (np.sqrt(x1c1) * n2))
        s2 = np.sum(np.sqrt(x2c1) * n2 / (np.sqrt(x2c2) * n1))
    return float((s1 + s2) / (2 * m))


def _split(A, samples: np.ndarray, tol: float, maxit: int, nonneg: bool, seed: int, calc_dist: bool) -> Bipartition:
    """Rank-2 fit of A[:, samples] and the sign split (the work of one task)."""
    from ..core import nmf

    A_S = A[:, samples]
    model = nmf(A_S, 2, tol=tol, maxit=maxit, seed=seed, nonneg=nonneg, client=False)
    a = int(np.argmax(model.d))  # ties → the first factor
    v = model.h[a] - model.h[1 - a]
    in1 = v > 0
    s1, s2 = samples[in1], samples[~in1]
    m = A.shape[0]
    if calc_dist:
        A1, A2 = A_S[:, np.flatnonzero(in1)], A_S[:, np.flatnonzero(~in1)]
        c1, c2 = _col_mean(A1), _col_mean(A2)
        dist = _relative_cosine_distance(A1, A2, c1, c2, m)
    else:
        c1, c2, dist = np.zeros(m), np.zeros(m), -1.0
    return Bipartition(v=v, dist=dist, size1=int(s1.size), size2=int(s2.size), samples1=s1, samples2=s2,
                       center1=c1, center2=c2)


def _check_common(tol, maxit, nonneg, seed, func):
    tol = check_float(tol, "tol", func, low=0.0)
    maxit = check_int(maxit, "maxit", func, low=1)
    if not isinstance(nonneg, (bool, np.bool_)):
        raise param_error("nonneg", func, "a bool", nonneg)
    seed = check_int(seed, "seed", func, low=0)
    return tol, maxit, bool(nonneg), seed


def bipartition(A: Any, *, samples: Any = None, tol: float = 1e-5, maxit: int = 100, nonneg: bool = True,
                seed: int = 0, calc_dist: bool = True) -> Bipartition:
    """Split samples (columns of A) in two with a rank-2 NMF.

    Parameters
    ----------
    A : array-like or scipy.sparse matrix of shape (m, n)
        Non-negative data, features × samples.
    samples : array-like of int, optional
        0-based columns to split (default all); at least 2.
    tol, maxit : float, int
        Convergence tolerance and iteration cap of the rank-2 :func:`dnmf.nmf` fit.
    nonneg : bool, default True
    seed : int, default 0
        Seed of the rank-2 fit's initialization.
    calc_dist : bool, default True
        Compute the relative cosine distance and the cluster centres.

    Returns
    -------
    Bipartition

    Notes
    -----
    With the fit ``A_S ≈ W diag(d) H`` (rows of H L1-normalized) and a the factor with the
    larger d, ``v_j = H[a, j] − H[b, j]``; cluster 1 = {v > 0}, cluster 2 = {v ≤ 0}. The distance
    is RcppML's ``[Σ_{x∈1} √(x·c₂)‖c₁‖/(√(x·c₁)‖c₂‖) + Σ_{x∈2} √(x·c₁)‖c₂‖/(√(x·c₂)‖c₁‖)] / (2m)``
    with c₁, c₂ the cluster mean columns and m the number of features (kept literally; 0 when a
    cluster is empty). RcppML fits the rank-2 model with its own 2 × 2 Cramer-rule ALS and a
    SplitMix64 initialization; here :func:`dnmf.nmf` does the fit, so splits agree in
    structure, not bit for bit.

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.guided import bipartition
    >>> A = np.kron(np.eye(2), np.ones((3, 4))) + 0.01
    >>> sorted(map(sorted, (bipartition(A).samples1.tolist(), bipartition(A).samples2.tolist())))
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    func = "bipartition"
    A = _as_data(A, func)
    n = A.shape[1]
    tol, maxit, nonneg, seed = _check_common(tol, maxit, nonneg, seed, func)
    if samples is None:
        idx = np.arange(n)
    else:
        idx = np.asarray(samples).ravel()
        if (not np.issubdtype(idx.dtype, np.integer) or idx.size < 2 or idx.min() < 0 or idx.max() >= n
                or np.unique(idx).size != idx.size):
            raise param_error("samples", func, f"at least 2 distinct 0-based column indices in [0, {n - 1}]",
                              samples if idx.size <= 10 else f"{idx.size} values", described=idx.size > 10)
        idx = idx.astype(np.int64)
    if idx.size < 2:
        raise param_error("A", func, "at least 2 samples (columns)", f"{idx.size}", described=True)
    if not isinstance(calc_dist, (bool, np.bool_)):
        raise param_error("calc_dist", func, "a bool", calc_dist)
    return _split(A, idx, tol, maxit, nonneg, seed, bool(calc_dist))


def _pack(A, ex) -> tuple:
    """A's arrays placed once on the executor (sparse: its three CSC arrays)."""
    if sp.issparse(A):
        return ("csc", ex.put(A.data), ex.put(A.indices), ex.put(A.indptr), A.shape)
    return ("dense", ex.put(A), None, None, A.shape)


def _unpack(kind, p0, p1, p2, shape):
    return sp.csc_array((p0, p1, p2), shape=shape) if kind == "csc" else p0


def _split_task(samples, kind, p0, p1, p2, shape, tol, maxit, nonneg, seed, calc_dist):
    """One wave task: the bipartition of ``samples`` (module level, so a worker can import it)."""
    b = _split(_unpack(kind, p0, p1, p2, shape), samples, tol, maxit, nonneg, seed, calc_dist)
    return b.samples1, b.samples2, b.dist


def _emission_key(path: str) -> str:
    """Depth-first order with "1" children first (RcppML's LIFO stack): sort with 1 before 0."""
    return path.translate(str.maketrans("01", "10"))


def dclust(A: Any, min_samples: int, *, min_dist: float = 0.0, tol: float = 1e-5, maxit: int = 100,
           nonneg: bool = True, seed: int = 0, client: Any = None) -> DClustResult:
    """Divisive clustering of samples by recursive rank-2 NMF bipartitions (RcppML ``dclust``).

    Parameters
    ----------
    A : array-like or scipy.sparse matrix of shape (m, n)
        Non-negative data, features × samples.
    min_samples : int ≥ 1
        A cluster with fewer than ``2·min_samples`` samples is not split; a split is accepted only
        if both halves have at least ``min_samples`` samples.
    min_dist : float ≥ 0, default 0
        When > 0, a split is accepted only if its relative cosine distance (:func:`bipartition`)
        is at least ``min_dist``.
    tol, maxit, nonneg : see :func:`bipartition`
    seed : int, default 0
        Seed of every rank-2 fit (the same for all splits, as in RcppML).
    client : distributed.Client, False or None
        Where the splits run: a Dask cluster (independent subtrees as parallel tasks), False for
        in-process threads, None for the active default client if any. The result is the same.

    Returns
    -------
    DClustResult
        Leaves (``id``, ``samples`` 0-based, ``center`` = mean column, ``size``) in depth-first
        order with "1" branches first, and ``labels`` (leaf index per sample).

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.guided import dclust
    >>> A = np.kron(np.eye(3), np.ones((4, 10))) + 0.01
    >>> sorted(c.size for c in dclust(A, min_samples=5, client=False).clusters)
    [10, 10, 10]
    """
    func = "dclust"
    A = _as_data(A, func)
    min_samples = check_int(min_samples, "min_samples", func, low=1)
    min_dist = check_float(min_dist, "min_dist", func, low=0.0)
    tol, maxit, nonneg, seed = _check_common(tol, maxit, nonneg, seed, func)
    n = A.shape[1]
    leaves: list[tuple[str, np.ndarray]] = []
    with get_executor(client, func=func) as ex:
        packed = _pack(A, ex)
        frontier = [("", np.arange(n, dtype=np.int64))]
        while frontier:
            todo = [(p, s) for p, s in frontier if s.size >= 2 * min_samples]
            leaves += [(p, s) for p, s in frontier if s.size < 2 * min_samples]
            splits = ex.map(_split_task, [s for _, s in todo],
                            args=(*packed, tol, maxit, nonneg, seed, min_dist > 0)) if todo else []
            frontier = []
            for (path, s), (s1, s2, dist) in zip(todo, splits):
                if s1.size >= min_samples and s2.size >= min_samples and (min_dist == 0 or dist >= min_dist):
                    frontier += [(path + "0", s1), (path + "1", s2)]
                else:
                    leaves.append((path, s))
    leaves.sort(key=lambda leaf: _emission_key(leaf[0]))
    clusters = tuple(Cluster(id=p, samples=s, center=_col_mean(A[:, s])) for p, s in leaves)
    return DClustResult(clusters=clusters, n_samples=n)
