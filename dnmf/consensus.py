"""Consensus over random NMF restarts: RcppML's ``consensus_nmf`` and cNMF's consensus programs.

Both run ``reps`` independent NMF fits per rank as parallel tasks through the executor (one
small :func:`dnmf.nmf` with ``client=False`` per task; DESIGN §5). Every restart's seed is fixed
before submission, so results do not depend on scheduling or on the number of workers.

* :func:`consensus_nmf` (RcppML 1.0 ``consensus_nmf``, spec §9; Brunet et al. 2004): co-clustering
  frequencies of the objects across restarts, average-linkage clustering of ``1 − consensus``,
  cophenetic correlation, dispersion (Kim & Park 2007) and PAC (Şenbabaoğlu et al. 2014).
* :func:`cnmf_consensus` / :func:`cnmf_k_selection` (cNMF, Kotliar et al. 2019): the programs of
  all restarts are pooled, outliers dropped by local density, the rest k-means clustered; the
  median program per cluster is the consensus program, with the silhouette of the clustering as
  its stability and the error of an NNLS refit of the usages.

``ConsensusNMFResult.from_models`` and ``CNMFResult.from_models`` form the same results from
restarts fitted elsewhere (the consensus job pipeline fits and checkpoints each restart as a
task of its own).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from ._plotting import figure_axes
from ._typing import ArrayLike
from ._validation import check_float, check_int, check_option, param_error
from .exceptions import DnmfError, InputError
from .models import NMFModel

logger = logging.getLogger(__name__)

__all__ = ["consensus_nmf", "ConsensusNMFResult", "ConsensusNMFSweep", "cnmf_consensus", "cnmf_k_selection",
           "CNMFResult", "CNMFSelection", "hard_connectivity", "knn_jaccard_connectivity", "cut_linkage"]

METHODS = ("hard", "knn_jaccard")
AXES = ("features", "samples")
#: nmf arguments a restart cannot take: the consensus owns seeding and parallelism, and
#: independent restarts must not share a checkpoint.
_RESERVED = ("seed", "client", "checkpoint", "checkpoint_every", "resume")


# ---------------------------------------------------------------------------------------------
# Restarts as parallel tasks
# ---------------------------------------------------------------------------------------------


def _check_ks(k: Any, func: str) -> tuple[int, ...]:
    """One rank or a sequence of distinct ranks, each ≥ 1."""
    values = [k] if isinstance(k, (int, np.integer)) else np.atleast_1d(np.asarray(k, dtype=object)).tolist()
    if not values:
        raise param_error("k", func, "a positive int or a non-empty sequence of them", k)
    ks = tuple(check_int(q, "k", func, low=1) for q in values)
    if len(set(ks)) != len(ks):
        raise param_error("k", func, "a sequence of distinct ranks", k)
    return ks


def _check_nmf_kwargs(nmf_kwargs: dict, func: str) -> dict:
    """Reject arguments nmf does not know, or that the consensus sets itself, before any task runs."""
    from .core import nmf

    known = set(inspect.signature(nmf).parameters) - {"A", "k"}
    for name in nmf_kwargs:
        if name in _RESERVED:
            raise param_error(name, func, "left unset (each restart is an in-process fit seeded by the "
                              "consensus)", nmf_kwargs[name])
        if name not in known:
            raise param_error("**nmf_kwargs", func, "arguments of dnmf.nmf (" + ", ".join(
                sorted(known - set(_RESERVED))) + ")", name)
    return dict(nmf_kwargs)


def replicate_seeds(seed: Any, reps: int, func: str = "replicate_seeds") -> tuple[tuple, Any]:
    """The seeds of restarts 1..reps, fixed before anything is submitted.

    An int ``s`` gives ``s + 1, …, s + reps`` (RcppML: replicate i uses ``seed + i``). None or a
    ``numpy.random.SeedSequence`` gives its children (``spawn_key + (i,)``, i = 0..reps−1; the
    same as ``SeedSequence.spawn`` on a fresh sequence, without mutating the one given).

    Returns
    -------
    seeds : tuple
        Ints or SeedSequences, one per restart.
    entropy : int or None
        The entropy the children derive from (None for an int seed); record it to rerun.
    """
    if seed is None or isinstance(seed, np.random.SeedSequence):
        seq = np.random.SeedSequence() if seed is None else seed
        key = tuple(seq.spawn_key)
        seeds = tuple(np.random.SeedSequence(seq.entropy, spawn_key=key + (i,), pool_size=seq.pool_size)
                      for i in range(reps))
        return seeds, seq.entropy
    if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)):
        raise param_error("seed", func, "None, a non-negative int or a numpy SeedSequence", seed)
    s = check_int(int(seed), "seed", func, low=0)
    return tuple(s + i for i in range(1, reps + 1)), None


def _loadings(model: NMFModel, axis: str) -> np.ndarray:
    """Objects × factors: W (features) or Hᵀ (samples), unit-norm factors, without d (as RcppML)."""
    x = model.w if axis == "features" else model.h.T
    # one memory layout whatever the model's: BLAS rounding (x xᵀ) must not depend on it
    return np.ascontiguousarray(x, dtype=np.float64)


def hard_labels(x: np.ndarray) -> np.ndarray:
    """Dominant factor of each row of x (objects × factors); the first one on ties (R which.max)."""
    return np.argmax(x, axis=1).astype(np.int64)


def knn_sets(x: np.ndarray, knn: int) -> np.ndarray:
    """Sorted indices of each row's ``min(knn, N − 1)`` nearest other rows by cosine similarity.

    Rows are L2-normalized (an all-zero row stays zero: similarity 0 with every row) and
    S = X Xᵀ. Ties are broken toward the lower index (RcppML's partial sort leaves them
    unspecified).
    """
    n = x.shape[0]
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    xn = x / np.where(norms > 0, norms, 1.0)[:, None]
    s = xn @ xn.T
    np.fill_diagonal(s, -np.inf)
    kk = min(int(knn), n - 1)
    nearest = np.argsort(-s, axis=1, kind="stable")[:, :kk]
    return np.sort(nearest, axis=1)


def _restart_task(item, A, nmf_kwargs: dict, summary: str | None, knn: int, axis: str):
    """One restart: the fitted model and, for consensus_nmf, its per-object summary."""
    from .core import nmf

    k, seed = item
    model = nmf(A, k, seed=seed, client=False, **nmf_kwargs)
    if summary is None:
        return model, None
    return model, _summary(_loadings(model, axis), summary, knn)


def _summary(x: np.ndarray, method: str, knn: int) -> np.ndarray:
    """One restart's per-object summary: hard labels or kNN sets of its loadings x."""
    return hard_labels(x) if method == "hard" else knn_sets(x, knn)


def _run_restarts(A, ks, seeds, nmf_kwargs, client, func, summary=None, knn=10, axis="features") -> dict:
    """All restarts of all ranks submitted together; {k: [(model, summary), …] in replicate order}."""
    from .engine.executor import get_executor

    items = [(q, s) for q in ks for s in seeds]
    with get_executor(client, func=func) as ex:
        logger.info("%s: %d restarts (%d ranks × %d) on %s", func, len(items), len(ks), len(seeds),
                    type(ex).__name__)
        if ex.distributed:  # the restarts run whole on the workers: compile their kernels here first
            from .engine.kernel_cache import compile_for_workers, quiet_kwargs

            compile_for_workers(ex.client, lambda small: _restart_task(items[0], small, quiet_kwargs(nmf_kwargs), None,
                                                                       knn, axis), A, items[0][0])
        out = ex.map(_restart_task, items, args=(A, nmf_kwargs, summary, knn, axis))
    reps = len(seeds)
    return {q: out[i * reps:(i + 1) * reps] for i, q in enumerate(ks)}


# ---------------------------------------------------------------------------------------------
# consensus_nmf (RcppML)
# ---------------------------------------------------------------------------------------------


def hard_connectivity(labels: np.ndarray, k: int) -> np.ndarray:
    """Connectivity Σ_r 1[label_r(a) = label_r(b)] of hard labels (reps × N) over k factors.

    Computed as Z Zᵀ with Z the N × (reps·k) one-hot indicator of (replicate, factor): exact
    integer counts in float64, symmetric, diagonal = reps.
    """
    labels = np.asarray(labels, dtype=np.int64)
    reps, n = labels.shape
    cols = (np.arange(reps)[:, None] * k + labels).ravel()
    rows = np.tile(np.arange(n), reps)
    z = sp.csr_array((np.ones(reps * n), (rows, cols)), shape=(n, reps * k))
    return np.asarray((z @ z.T).toarray(), dtype=np.float64)


def knn_jaccard_connectivity(sets: Sequence[np.ndarray]) -> np.ndarray:
    """Connectivity Σ_r J_r(a, b): Jaccard index of the kNN sets of a and b in replicate r.

    ``sets`` holds one N × kk array of neighbour indices per replicate (:func:`knn_sets`).
    |S_a ∩ S_b| comes from M Mᵀ (M the N × N neighbour indicator), |S_a ∪ S_b| = 2kk − |S_a ∩ S_b|;
    the diagonal is 1 per replicate (RcppML ``c_knn_jaccard``). Summed in replicate order.
    """
    conn = None
    for s in sets:
        n, kk = s.shape
        m = sp.csr_array((np.ones(n * kk), (np.repeat(np.arange(n), kk), s.ravel())), shape=(n, n))
        inter = np.asarray((m @ m.T).toarray(), dtype=np.float64)
        jac = inter / (2.0 * kk - inter) if kk > 0 else np.eye(n)
        conn = jac if conn is None else conn + jac
    return conn


def _dispersion(c: np.ndarray) -> float:
    """Kim & Park (2007): mean over all N² entries of 4(c − ½)²; 1 for a crisp (0/1) consensus."""
    return float(np.mean(4.0 * (c - 0.5) ** 2))


def _pac(c: np.ndarray, lower: float = 0.1, upper: float = 0.9) -> float:
    """Share of object pairs (a < b) whose consensus lies in (lower, upper); 0 when crisp."""
    iu = np.triu_indices(c.shape[0], k=1)
    v = c[iu]
    return float(np.mean((v > lower) & (v < upper))) if v.size else float("nan")


def cut_linkage(z: np.ndarray, k: int) -> np.ndarray:
    """R's ``cutree(tree, k)`` on a scipy linkage: the groups left after its first n − k merges.

    Groups are numbered from 0 in order of first appearance (R's numbering minus one). Each
    group is a subtree of ``z``, so it is contiguous in the leaf order. (``scipy``'s
    ``cut_tree`` does not always follow the merge order when merges tie in height.)
    """
    z = np.asarray(z)
    n = z.shape[0] + 1
    merged = n - min(max(int(k), 1), n)
    children = z[:merged, :2].astype(np.int64)
    taken = np.zeros(n + merged, dtype=bool)
    taken[children.ravel()] = True
    labels = np.empty(n, dtype=np.int64)
    for group, root in enumerate(np.flatnonzero(~taken)):  # the n − merged = k roots
        stack = [int(root)]
        while stack:
            node = stack.pop()
            if node < n:
                labels[node] = group
            else:
                stack.extend(children[node - n].tolist())
    # number groups in order of first appearance, as R's cutree does
    uniq, first = np.unique(labels, return_index=True)
    rank = np.empty(uniq.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(uniq.size)
    return rank[np.searchsorted(uniq, labels)]


def _cluster(c: np.ndarray, k: int):
    """hclust(as.dist(1 − c), "average"), cutree(k) and the cophenetic correlation."""
    from scipy.cluster.hierarchy import cophenet, leaves_list, linkage
    from scipy.spatial.distance import squareform

    if c.shape[0] < 2:
        raise InputError(f"consensus_nmf needs at least 2 objects to cluster; got {c.shape[0]}. "
                         "Use axis='samples' or axis='features' for the longer side of A.")
    dist = 1.0 - c
    np.fill_diagonal(dist, 0.0)
    d = squareform(dist, checks=False)
    z = linkage(d, method="average")
    coph = float(cophenet(z, d)[0]) if d.size and np.ptp(d) > 0 else float("nan")
    return z, leaves_list(z).astype(np.int64), cut_linkage(z, k), coph


@dataclass(frozen=True, eq=False)
class ConsensusNMFResult:
    """Result of :func:`consensus_nmf` for one rank (R class ``consensus_nmf``).

    Attributes
    ----------
    consensus : ndarray of shape (N, N)
        Connectivity / reps: the share of restarts in which two objects co-cluster (``"hard"``)
        or the mean Jaccard index of their kNN sets (``"knn_jaccard"``). N is the number of
        objects: m (features, rows of A) for ``axis="features"``, n for ``axis="samples"``.
    clusters : ndarray of int64, shape (N,)
        Cut of the average-linkage tree of ``1 − consensus`` into k clusters: the groups left
        after the tree's first N − k merges (R's ``cutree``; :func:`cut_linkage`), numbered from
        0 in order of first appearance (R's numbering minus one).
    cophenetic : float
        Pearson correlation of ``1 − consensus`` with the tree's cophenetic distances (object
        pairs); NaN when all distances are equal.
    dispersion : float
        Mean of ``4(consensus − ½)²`` over all N² entries (Kim & Park 2007); 1 when crisp.
    pac : float
        Proportion of ambiguous clustering: share of object pairs a < b with consensus in
        (0.1, 0.9); 0 when crisp.
    linkage : ndarray of shape (N − 1, 4)
        The scipy linkage matrix (R's ``hclust``).
    order : ndarray of int64, shape (N,)
        Leaf order of the tree (``scipy.cluster.hierarchy.leaves_list``), used by :meth:`plot`.
    models : tuple of NMFModel
        The restarts, in replicate order.
    k, reps : int
    method : {"hard", "knn_jaccard"}
    knn : int or None
        Neighbours per object for ``"knn_jaccard"``, else None.
    axis : {"features", "samples"}
    seeds : tuple
        Seed of each restart (ints, or SeedSequences derived from ``seed_entropy``).
    seed_entropy : int or None
        Entropy of the restarts' SeedSequence when ``seed`` was None or a SeedSequence.
    """

    consensus: np.ndarray
    clusters: np.ndarray
    cophenetic: float
    dispersion: float
    pac: float
    linkage: np.ndarray
    order: np.ndarray
    models: tuple
    k: int
    reps: int
    method: str
    knn: int | None
    axis: str
    seeds: tuple
    seed_entropy: Any = None

    @classmethod
    def from_models(cls, models: Sequence[NMFModel], *, method: str = "hard", knn: int = 10,
                    axis: str = "features", seeds: tuple = (), seed_entropy: Any = None,
                    summaries: Sequence[np.ndarray] | None = None) -> "ConsensusNMFResult":
        """The consensus of restarts fitted elsewhere (one rank; e.g. checkpointed job tasks).

        Parameters
        ----------
        models : sequence of NMFModel
            The restarts, all of the same shape (m, n, k), in replicate order.
        method, knn, axis
            As :func:`consensus_nmf`.
        seeds : tuple, optional
            Seed of each restart, recorded in the result.
        seed_entropy : int, optional
            Recorded in the result.
        summaries : sequence of ndarray, optional
            Per-restart object summaries already computed (hard labels or kNN sets of the
            loadings, as :func:`consensus_nmf`'s tasks return them); computed here if None.

        Returns
        -------
        ConsensusNMFResult
            ``consensus_nmf(A, k, reps, method, knn, seed, axis=axis)`` equals this result on
            that call's ``models``.
        """
        func = "ConsensusNMFResult.from_models"
        method = check_option(method, "method", func, METHODS)
        knn = check_int(knn, "knn", func, low=1)
        axis = check_option(axis, "axis", func, AXES)
        models = tuple(models)
        shapes = {m.shape for m in models}
        if not models or len(shapes) != 1:
            raise param_error("models", func, "a non-empty sequence of NMFModels of one shape (m, n, k)",
                              f"shapes {sorted(shapes)}" if models else "an empty sequence", described=True)
        k = models[0].k
        if summaries is None:
            summaries = [_summary(_loadings(m, axis), method, knn) for m in models]
        conn = (hard_connectivity(np.stack(summaries), k) if method == "hard"
                else knn_jaccard_connectivity(summaries))
        cons = conn / len(models)
        z, order, clusters, coph = _cluster(cons, k)
        return cls(consensus=cons, clusters=clusters, cophenetic=coph, dispersion=_dispersion(cons), pac=_pac(cons),
                   linkage=z, order=order, models=models, k=k, reps=len(models), method=method,
                   knn=knn if method == "knn_jaccard" else None, axis=axis, seeds=tuple(seeds),
                   seed_entropy=seed_entropy)

    def plot(self, ax=None, cmap: str = "Reds", show_clusters: bool = True):
        """Heatmap of the consensus matrix in the tree's leaf order (R ``plot.consensus_nmf``).

        Cluster boundaries are drawn as black lines when ``show_clusters``. Returns the
        matplotlib Figure.
        """
        fig, ax = figure_axes(ax, (5.5, 4.5))
        o = self.order
        im = ax.imshow(self.consensus[np.ix_(o, o)], cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(im, ax=ax, label="Consensus")
        if show_clusters:
            for b in np.flatnonzero(np.diff(self.clusters[o]) != 0):
                ax.axhline(b + 0.5, color="black", lw=1)
                ax.axvline(b + 0.5, color="black", lw=1)
        ax.set_xticks([])
        ax.set_yticks([])
        what = "Feature" if self.axis == "features" else "Sample"
        ax.set_xlabel(what)
        ax.set_ylabel(what)
        ax.set_title(f"Consensus matrix ({self.reps} replicates, k={self.k})\n"
                     f"cophenetic correlation {self.cophenetic:.3f}")
        return fig

    def __str__(self) -> str:
        sizes = np.bincount(self.clusters, minlength=self.k)
        iu = np.triu_indices(self.consensus.shape[0], k=1)
        v = self.consensus[iu]
        lines = [f"Consensus NMF ({self.method}, axis={self.axis!r}): k={self.k}, {self.reps} replicates, "
                 f"{self.consensus.shape[0]} objects",
                 f"cophenetic {self.cophenetic:.4f}, dispersion {self.dispersion:.4f}, PAC {self.pac:.4f}",
                 "cluster sizes: " + ", ".join(str(int(s)) for s in sizes)]
        if v.size:
            lines.append(f"consensus off-diagonal: min {v.min():.3f}, median {np.median(v):.3f}, "
                         f"mean {v.mean():.3f}, max {v.max():.3f}")
        return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class _RankSweep:
    """Per-rank results in the order given: ``sweep[k]`` is rank k's result."""

    ks: tuple
    results: dict

    def __getitem__(self, k: int):
        return self.results[k]

    def _table(self, **columns):
        """One row per rank: ``k``, then each ``column=attribute`` of the rank's result, in order."""
        import pandas as pd

        r = [self.results[q] for q in self.ks]
        return pd.DataFrame({"k": list(self.ks), **{c: [getattr(x, a) for x in r] for c, a in columns.items()}})

    def _best_k(self, criterion: str, criteria: dict, func: str) -> int:
        """The rank that maximizes (or, for criteria marked ``"min"``, minimizes) ``criterion``;
        the smallest such rank on ties; NaN values never win."""
        criterion = check_option(criterion, "criterion", func, tuple(criteria))
        values = np.array([getattr(self.results[q], criterion) for q in self.ks], dtype=np.float64)
        if np.all(np.isnan(values)):
            raise DnmfError(f"{func}: {criterion} is NaN at every rank ({', '.join(map(str, self.ks))}); "
                            "no rank can be chosen by it. Use another criterion or more ranks.")
        score = -values if criteria[criterion] == "min" else values
        score = np.where(np.isnan(score), -np.inf, score)
        return int(self.ks[int(np.argmax(score))])  # argmax: the first (given order) of equal best


@dataclass(frozen=True, eq=False)
class ConsensusNMFSweep(_RankSweep):
    """Result of :func:`consensus_nmf` for several ranks.

    Attributes
    ----------
    ks : tuple of int
        The ranks, in the order given.
    results : dict of int to ConsensusNMFResult
        The full result per rank.
    """

    @property
    def table(self):
        """One row per rank: ``k``, ``cophenetic``, ``dispersion``, ``PAC`` (pandas DataFrame)."""
        return self._table(cophenetic="cophenetic", dispersion="dispersion", PAC="pac")

    def best_k(self, criterion: str = "cophenetic") -> int:
        """The rank the statistic ``criterion`` prefers: the highest ``"cophenetic"`` correlation
        (Brunet et al. 2004) or ``"dispersion"`` (Kim & Park 2007), or the lowest ``"pac"``
        (Şenbabaoğlu et al. 2014). Ties go to the rank given first; NaN never wins."""
        return self._best_k(criterion, {"cophenetic": "max", "dispersion": "max", "pac": "min"},
                            "ConsensusNMFSweep.best_k")

    def plot(self, ax=None):
        """Cophenetic correlation, dispersion and PAC against k; returns the Figure."""
        fig, ax = figure_axes(ax, (5.5, 4))
        t = self.table
        for col, style in (("cophenetic", "-o"), ("dispersion", "-s"), ("PAC", "-^")):
            ax.plot(t["k"], t[col], style, label=col)
        ax.set_xlabel("k")
        ax.set_ylabel("statistic")
        ax.set_xticks(list(t["k"]))
        ax.legend()
        ax.set_title("Consensus NMF: rank selection")
        return fig

    def __str__(self) -> str:
        return "Consensus NMF rank sweep\n" + self.table.to_string(index=False)


def consensus_nmf(
    A: ArrayLike,
    k: int | Sequence[int],
    reps: int = 50,
    method: str = "hard",
    knn: int = 10,
    seed: Any = None,
    client: Any = None,
    *,
    axis: str = "features",
    **nmf_kwargs,
) -> ConsensusNMFResult | ConsensusNMFSweep:
    """Consensus clustering over random NMF restarts (RcppML ``consensus_nmf``; spec §9).

    Parameters
    ----------
    A : array-like of shape (m, n)
        Features × samples; anything :func:`dnmf.nmf` accepts. Every restart is an in-process
        fit (``client=False``) on one worker, so A must fit in one worker's memory.
    k : int or sequence of int
        Rank; a sequence gives one consensus per rank (:class:`ConsensusNMFSweep`).
    reps : int, default 50
        Restarts per rank.
    method : {"hard", "knn_jaccard"}, default "hard"
        ``"hard"``: each object goes to its dominant factor (argmax of its loadings; first on
        ties) and the connectivity counts co-membership. ``"knn_jaccard"``: loadings are
        L2-normalized per object, S = cosine similarity, each object's ``knn`` most similar other
        objects form its neighbour set, and the connectivity adds the Jaccard index of the two
        objects' sets (1 on the diagonal).
    knn : int, default 10
        Neighbours per object for ``"knn_jaccard"`` (at most N − 1 are used).
    seed : None, int or numpy.random.SeedSequence
        An int s seeds restart i (1..reps) with ``s + i`` (RcppML); the same seeds are used for
        every rank. None or a SeedSequence seeds restart i with its child ``spawn_key + (i,)``;
        the entropy is kept in ``seed_entropy``.
    client : distributed.Client, False or None
        Where the restarts run (:func:`dnmf.engine.executor.get_executor`): the default Dask
        client if None and one exists, else a local thread pool. Results do not depend on it.
    axis : {"features", "samples"}, default "features"
        The objects clustered. RcppML clusters the **rows of its data** through W; in dnmf's
        features × samples orientation those are the **features** (rows of A, loadings W,
        N = m), the default. ``"samples"`` clusters the columns of A through Hᵀ (N = n) —
        what RcppML gives on transposed data, and the usual choice for cells.
    **nmf_kwargs
        Other arguments of :func:`dnmf.nmf` (``tol``, ``maxit``, ``L1``, ``init``, …), the same
        for every restart; ``seed``, ``client`` and checkpointing are set by the consensus.

    Returns
    -------
    ConsensusNMFResult or ConsensusNMFSweep
        One result for an int ``k``; for a sequence, a sweep with ``.table`` (k, cophenetic,
        dispersion, PAC) and the per-rank results.

    Notes
    -----
    With connectivity C = Σ_r C_r over the restarts, consensus = C / reps; the objects are
    clustered by ``hclust(as.dist(1 − consensus), "average")`` (scipy ``linkage``) and cut into k
    clusters, and the cophenetic correlation is ``cor(1 − consensus, cophenetic distances)`` over
    object pairs (Brunet et al. 2004). Dispersion = mean of 4(c − ½)² over all entries (Kim &
    Park 2007) and PAC = share of pairs with c in (0.1, 0.9) (Şenbabaoğlu et al. 2014). A crisp
    consensus has cophenetic 1, dispersion 1, PAC 0. The consensus matrix is dense N × N.

    Examples
    --------
    >>> import dnmf
    >>> from dnmf.consensus import consensus_nmf
    >>> sim = dnmf.simulate_nmf(60, 40, 3, noise=0.3, seed=1)
    >>> res = consensus_nmf(sim.A, 3, reps=5, seed=1, client=False)
    >>> res.consensus.shape, round(res.dispersion, 3)
    ((60, 60), 1.0)
    """
    func = "consensus_nmf"
    ks = _check_ks(k, func)
    reps = check_int(reps, "reps", func, low=1)
    method = check_option(method, "method", func, METHODS)
    knn = check_int(knn, "knn", func, low=1)
    axis = check_option(axis, "axis", func, AXES)
    nmf_kwargs = _check_nmf_kwargs(nmf_kwargs, func)
    seeds, entropy = replicate_seeds(seed, reps, func)
    runs = _run_restarts(A, ks, seeds, nmf_kwargs, client, func, summary=method, knn=knn, axis=axis)
    results = {q: ConsensusNMFResult.from_models([m for m, _ in runs[q]], method=method, knn=knn, axis=axis,
                                                 seeds=seeds, seed_entropy=entropy,
                                                 summaries=[x for _, x in runs[q]]) for q in ks}
    if isinstance(k, (int, np.integer)):
        return results[ks[0]]
    return ConsensusNMFSweep(ks=ks, results=results)


# ---------------------------------------------------------------------------------------------
# cNMF consensus programs (Kotliar et al. 2019)
# ---------------------------------------------------------------------------------------------


def local_density(x: np.ndarray, n_neighbors: int) -> np.ndarray:
    """cNMF's local density of each row of x: mean Euclidean distance to its n nearest other rows.

    Computed as cNMF does: the sum of the ``n_neighbors + 1`` smallest distances of the row
    (itself, at distance 0, included) divided by ``n_neighbors``.
    """
    from scipy.spatial.distance import pdist, squareform

    dist = squareform(pdist(x, metric="euclidean"))
    nearest = np.partition(dist, n_neighbors, axis=1)[:, :n_neighbors + 1]
    return nearest.sum(axis=1) / n_neighbors


def _l2_columns(w: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->j", w, w))
    return w / np.where(norms > 0, norms, 1.0)[None, :]


@dataclass(frozen=True, eq=False)
class CNMFResult:
    """Result of :func:`cnmf_consensus` for one rank.

    Attributes
    ----------
    programs : ndarray of shape (m, k)
        Consensus programs over features: the element-wise median of the L2-normalized restart
        programs in each k-means cluster, scaled so each column sums to 1 (cNMF's median
        spectra). Column j is cluster j.
    usage : ndarray of shape (k, n)
        Usages refit with the programs fixed: column j solves ``min_{h ≥ 0} ‖a_j − programs·h‖²``
        (:meth:`dnmf.NMFModel.predict`), so ``A ≈ programs @ usage``.
    stability : float
        Silhouette score (Euclidean) of the k-means clustering of the programs that passed the
        density filter; 0 when every program is its own cluster, NaN for k = 1.
    error : float
        Reconstruction error ``‖A − programs · usage‖²_F`` (a sum, as cNMF's prediction error).
    k, reps : int
    density_threshold, local_neighborhood_size : float
    n_neighbors : int
        ``int(local_neighborhood_size · reps)`` neighbours used for the local density.
    replicate_programs : ndarray of shape (m, reps·k)
        The L2-normalized W columns of all restarts; column ``r·k + j`` is factor j of restart r.
    local_density : ndarray of shape (reps·k,)
        Mean distance of each restart program to its ``n_neighbors`` nearest others.
    kept : ndarray of bool, shape (reps·k,)
        ``local_density < density_threshold``: the programs that were clustered.
    labels : ndarray of int64, shape (reps·k,)
        k-means cluster of each kept program, −1 for programs dropped as outliers.
    seeds : tuple
        Seed of each restart.
    seed_entropy : int or None
    feature_names, sample_names : tuple of str or None
        Names of A's rows and columns, when A had them.
    """

    programs: np.ndarray
    usage: np.ndarray
    stability: float
    error: float
    k: int
    reps: int
    density_threshold: float
    local_neighborhood_size: float
    n_neighbors: int
    replicate_programs: np.ndarray
    local_density: np.ndarray
    kept: np.ndarray
    labels: np.ndarray
    seeds: tuple
    seed_entropy: Any = None
    feature_names: tuple | None = None
    sample_names: tuple | None = None

    @classmethod
    def from_models(cls, A: ArrayLike, models: Sequence[NMFModel], *, density_threshold: float = 0.5,
                    local_neighborhood_size: float = 0.30, kmeans_seed: int = 1, seeds: tuple = (),
                    seed_entropy: Any = None) -> "CNMFResult":
        """cNMF's consensus of restarts fitted elsewhere (one rank; e.g. checkpointed job tasks).

        ``A`` is the matrix the restarts were fitted on (the usages are refit on it); the other
        parameters are as :func:`cnmf_consensus`, which equals this on its own restarts.
        """
        func = "CNMFResult.from_models"
        models = tuple(models)
        shapes = {m.shape for m in models}
        if len(models) < 2 or len(shapes) != 1:
            raise param_error("models", func, "at least 2 NMFModels of one shape (m, n, k)",
                              f"{len(models)} model(s) of shapes {sorted(shapes)}", described=True)
        density_threshold = check_float(density_threshold, "density_threshold", func, low=0.0)
        local_neighborhood_size = check_float(local_neighborhood_size, "local_neighborhood_size", func, low=0.0)
        kmeans_seed = check_int(kmeans_seed, "kmeans_seed", func, low=0)
        return _cnmf_one(A, models[0].k, models, density_threshold=density_threshold,
                         local_neighborhood_size=local_neighborhood_size, kmeans_seed=kmeans_seed,
                         seeds=tuple(seeds), entropy=seed_entropy, func=func)

    def to_model(self) -> NMFModel:
        """The consensus as an NMFModel: ``w = programs``, ``d`` = row sums of the usage,
        ``h`` = usage rows scaled to sum to 1 (a zero row stays zero)."""
        d = self.usage.sum(axis=1)
        h = self.usage / np.where(d > 0, d, 1.0)[:, None]
        return NMFModel(w=self.programs, d=d, h=h, misc={"row_names": self.feature_names,
                                                          "col_names": self.sample_names})

    def plot(self, ax=None, bins: int = 30):
        """Histogram of the restart programs' local density with the threshold marked (cNMF's
        outlier diagnostic). Returns the matplotlib Figure."""
        fig, ax = figure_axes(ax, (5, 3.5))
        ax.hist(self.local_density, bins=bins, color="grey")
        ax.axvline(self.density_threshold, color="red", ls="--", label="density_threshold")
        ax.set_xlabel("local density (mean distance to nearest programs)")
        ax.set_ylabel("programs")
        ax.set_title(f"cNMF k={self.k}: {int(self.kept.sum())} of {self.kept.size} programs kept, "
                     f"stability {self.stability:.3f}")
        ax.legend()
        return fig

    def __str__(self) -> str:
        return (f"cNMF consensus: k={self.k}, {self.reps} restarts, {int(self.kept.sum())}/{self.kept.size} "
                f"programs kept (density_threshold={self.density_threshold})\n"
                f"stability (silhouette) {self.stability:.4f}, error {self.error:.6g}")


@dataclass(frozen=True, eq=False)
class CNMFSelection(_RankSweep):
    """Result of :func:`cnmf_k_selection`: stability and error against k (cNMF's k selection).

    Attributes
    ----------
    ks : tuple of int
    results : dict of int to CNMFResult
    """

    @property
    def table(self):
        """One row per rank: ``k``, ``stability``, ``error`` (pandas DataFrame)."""
        return self._table(stability="stability", error="error")

    def best_k(self, criterion: str = "stability") -> int:
        """The rank of highest ``"stability"`` (silhouette; cNMF's usual choice) or of lowest
        ``"error"``. Ties go to the rank given first; NaN never wins."""
        return self._best_k(criterion, {"stability": "max", "error": "min"}, "CNMFSelection.best_k")

    def plot(self, ax=None):
        """Stability (left axis) and error (right axis) against k, as cNMF's
        ``k_selection_plot``. Returns the matplotlib Figure."""
        fig, ax = figure_axes(ax, (6, 4))
        t = self.table
        ax.plot(t["k"], t["stability"], "o-", color="#377eb8")
        ax.set_ylabel("Stability (silhouette)", color="#377eb8")
        ax.set_xlabel("k")
        ax.set_xticks(list(t["k"]))
        ax2 = ax.twinx()
        ax2.plot(t["k"], t["error"], "o-", color="#e41a1c")
        ax2.set_ylabel("Error", color="#e41a1c")
        ax.set_title("cNMF: stability and error against k")
        return fig

    def __str__(self) -> str:
        return "cNMF k selection\n" + self.table.to_string(index=False)


def _cnmf_one(A, k: int, models: Sequence[NMFModel], *, density_threshold: float, local_neighborhood_size: float,
              kmeans_seed: int, seeds: tuple, entropy: Any, func: str) -> CNMFResult:
    """cNMF's ``consensus`` step on the W of the restarts of one rank."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    reps = len(models)
    # C-ordered whatever the layout of the models' W: the norms, distances, k-means and
    # silhouette round the same way for a restart fitted here and one read back from a store
    programs_all = _l2_columns(np.concatenate([np.ascontiguousarray(m.w, dtype=np.float64) for m in models],
                                              axis=1))
    spectra = np.ascontiguousarray(programs_all.T)  # (reps·k) × m, cNMF's l2_spectra
    n_neighbors = int(local_neighborhood_size * spectra.shape[0] / k)
    if n_neighbors < 1 or n_neighbors >= spectra.shape[0]:
        raise param_error("local_neighborhood_size", func, f"such that 1 ≤ int(local_neighborhood_size · reps) < "
                          f"reps·k = {spectra.shape[0]}", local_neighborhood_size)
    density = local_density(spectra, n_neighbors)
    kept = density < density_threshold
    if kept.sum() < k:
        raise DnmfError(f"{func}: only {int(kept.sum())} of {kept.size} restart programs passed the density filter "
                        f"at k={k}; at least k are needed. Increase density_threshold (currently "
                        f"{density_threshold}; 2 disables the filter) or reps (currently {reps}).")
    x = spectra[kept]
    km = KMeans(n_clusters=k, n_init=10, random_state=kmeans_seed).fit(x)
    km_labels = km.labels_.astype(np.int64)
    n_labels = np.unique(km_labels).size
    if n_labels < 2:
        stability = float("nan")
    elif n_labels == x.shape[0]:
        stability = 0.0  # cNMF: every program its own cluster
    else:
        stability = float(silhouette_score(x, km_labels, metric="euclidean"))
    median = np.stack([np.median(x[km_labels == c], axis=0) for c in range(k)], axis=1)  # m × k
    sums = median.sum(axis=0)
    programs = median / np.where(sums > 0, sums, 1.0)[None, :]
    misc = models[0].misc
    names = (misc.get("row_names"), misc.get("col_names")) if hasattr(misc, "get") else (None, None)
    n = models[0].h.shape[1]
    fixed = NMFModel(w=programs, d=np.ones(k), h=np.zeros((k, n)), misc={"row_names": names[0],
                                                                         "col_names": names[1]})
    # as_blocked: predict gives k × n for it (an AnnData itself would give cells × k, obsm's layout)
    from .io import as_blocked

    usage = np.asarray(fixed.predict(as_blocked(A), L1=0.0, L2=0.0, nonneg=True), dtype=np.float64)
    refit = NMFModel(w=programs, d=np.ones(k), h=usage, misc=fixed.misc)
    error = float(refit.evaluate(A, loss="mse")) * programs.shape[0] * n
    labels = np.full(kept.size, -1, dtype=np.int64)
    labels[kept] = km_labels
    return CNMFResult(programs=programs, usage=usage, stability=stability, error=error, k=k, reps=reps,
                      density_threshold=density_threshold, local_neighborhood_size=local_neighborhood_size,
                      n_neighbors=n_neighbors, replicate_programs=programs_all, local_density=density, kept=kept,
                      labels=labels, seeds=seeds, seed_entropy=entropy,
                      feature_names=None if names[0] is None else tuple(names[0]),
                      sample_names=None if names[1] is None else tuple(names[1]))


def _cnmf(A, k, reps, density_threshold, local_neighborhood_size, seed, client, kmeans_seed, nmf_kwargs, func):
    ks = _check_ks(k, func)
    reps = check_int(reps, "reps", func, low=2)
    density_threshold = check_float(density_threshold, "density_threshold", func, low=0.0)
    local_neighborhood_size = check_float(local_neighborhood_size, "local_neighborhood_size", func, low=0.0)
    kmeans_seed = check_int(kmeans_seed, "kmeans_seed", func, low=0)
    nmf_kwargs = _check_nmf_kwargs(nmf_kwargs, func)
    seeds, entropy = replicate_seeds(seed, reps, func)
    runs = _run_restarts(A, ks, seeds, nmf_kwargs, client, func)
    return ks, {q: _cnmf_one(A, q, [m for m, _ in runs[q]], density_threshold=density_threshold,
                             local_neighborhood_size=local_neighborhood_size, kmeans_seed=kmeans_seed,
                             seeds=seeds, entropy=entropy, func=func) for q in ks}


def cnmf_consensus(
    A: ArrayLike,
    k: int,
    reps: int = 100,
    *,
    density_threshold: float = 0.5,
    local_neighborhood_size: float = 0.30,
    seed: Any = None,
    client: Any = None,
    kmeans_seed: int = 1,
    **nmf_kwargs,
) -> CNMFResult:
    """Consensus programs over random NMF restarts, as cNMF does (Kotliar et al. 2019).

    Parameters
    ----------
    A : array-like of shape (m, n)
        Features × samples (genes × cells); anything :func:`dnmf.nmf` accepts. Restarts are
        in-process fits on one worker each, so A must fit in one worker's memory.
    k : int
        Number of programs.
    reps : int, default 100
        Restarts (cNMF's ``n_iter``), at least 2.
    density_threshold : float, default 0.5
        Programs whose local density is not below it are dropped as outliers; 2 keeps all
        (distances between unit vectors are at most 2).
    local_neighborhood_size : float, default 0.30
        Neighbours for the local density, as a fraction of ``reps``:
        ``n = int(local_neighborhood_size · reps)``.
    seed : None, int or numpy.random.SeedSequence
        Seeds of the restarts, as :func:`consensus_nmf` (int s: restart i uses s + i).
    client : distributed.Client, False or None
        Where the restarts run; results do not depend on it.
    kmeans_seed : int, default 1
        ``random_state`` of scikit-learn's KMeans (cNMF fixes it to 1), ``n_init=10``.
    **nmf_kwargs
        Other arguments of :func:`dnmf.nmf`, the same for every restart.

    Returns
    -------
    CNMFResult
        ``programs`` (m × k, columns sum to 1), ``usage`` (k × n), ``stability``, ``error`` and
        the filtering and clustering record.

    Notes
    -----
    1. The W columns (programs over features) of all ``reps`` restarts are L2-normalized and
       stacked: reps·k programs.
    2. Local density of a program = mean Euclidean distance to its n nearest other programs;
       programs with density ≥ ``density_threshold`` are dropped.
    3. k-means (k clusters) on the kept programs; stability = their silhouette score.
    4. Consensus program = element-wise median of the cluster's programs, scaled to sum 1.
    5. Usages are refit by NNLS with the programs fixed, and error = ‖A − programs·usage‖²_F.

    cNMF fits on variance-normalized counts of highly variable genes and refits the final
    spectra on TPM; pass the matrix you want factorized (normalization is up to the caller).

    Examples
    --------
    >>> import dnmf
    >>> from dnmf.consensus import cnmf_consensus
    >>> sim = dnmf.simulate_nmf(60, 40, 3, noise=0.3, seed=1)
    >>> res = cnmf_consensus(sim.A, 3, reps=10, seed=1, client=False)
    >>> res.programs.shape, res.usage.shape
    ((60, 3), (3, 40))
    """
    func = "cnmf_consensus"
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise param_error("k", func, "a positive int (use cnmf_k_selection for several)", k)
    ks, results = _cnmf(A, k, reps, density_threshold, local_neighborhood_size, seed, client, kmeans_seed,
                        nmf_kwargs, func)
    return results[ks[0]]


def cnmf_k_selection(
    A: ArrayLike,
    ks: Sequence[int],
    reps: int = 100,
    *,
    density_threshold: float = 0.5,
    local_neighborhood_size: float = 0.30,
    seed: Any = None,
    client: Any = None,
    kmeans_seed: int = 1,
    **nmf_kwargs,
) -> CNMFSelection:
    """:func:`cnmf_consensus` for several ranks: cNMF's k-selection table and plot.

    All restarts of all ranks are submitted together; every rank uses the same restart seeds
    (so ``cnmf_k_selection(A, ks, seed=s)[k]`` equals ``cnmf_consensus(A, k, seed=s)`` for an
    int or SeedSequence seed). Parameters as :func:`cnmf_consensus`.

    Returns
    -------
    CNMFSelection
        ``.table`` (k, stability, error), ``.plot()`` (both against k) and ``.results``.
    """
    func = "cnmf_k_selection"
    ks, results = _cnmf(A, ks, reps, density_threshold, local_neighborhood_size, seed, client, kmeans_seed,
                        nmf_kwargs, func)
    return CNMFSelection(ks=ks, results=results)
