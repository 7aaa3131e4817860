"""Single-cell preprocessing on column-blocked matrices: library-size normalization, log1p, feature selection.

The common scanpy recipe before a factorization of counts::

    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000)   # flavor="seurat", or plain variance

written for dnmf's features × samples (genes × cells) :class:`dnmf.io.BlockedMatrix`. Every
transform accepts anything :func:`dnmf.io.as_blocked` accepts and returns a BlockedMatrix with
the same column blocks:

* sparse stays sparse: ``normalize_total`` and ``log1p`` map 0 to 0, so the stored pattern is
  kept and nothing is densified;
* in-memory blocks are transformed once, here; lazy (on-disk) blocks are wrapped in a
  :class:`TransformedSource` whose ``load()`` applies the transforms on the worker, each time
  the block is read, so an out-of-core matrix is never held whole;
* the dtype is kept (float32 in, float32 out); arithmetic is done in float64;
* feature (row) names follow the selection; sample names are kept.

The per-feature statistics of feature selection (:func:`feature_variances`,
:func:`feature_dispersions`) are a chunk → combine → aggregate reduction run as block tasks on
dnmf's executor (:func:`dnmf.engine.executor.get_executor`: the ``client`` given, else the
default Dask client, else a thread pool): each task reads one block — on a cluster, a lazy block
is read and transformed by the worker — and returns two length-m vectors of sums (sparse blocks
through their stored entries only), which are added up in a fixed tree in block order. Only
those vectors reach the client, never the matrix; in-memory blocks, already on the client, are
summed there (as :func:`dnmf.io.validate.check_data` does) rather than shipped to the workers.

Examples
--------
>>> import numpy as np, scipy.sparse as sp
>>> import dnmf.preprocess as pp
>>> A = sp.random(100, 30, density=0.2, random_state=0, format="csc") * 10
>>> B = pp.recipe(A, normalize="cp10k_log1p", n_top_features=20)
>>> B.shape, B.sparse
((20, 30), True)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._validation import check_option, param_error
from .exceptions import WorkerLostError
from .io.blocks import BlockedMatrix, CSCBlock, InMemorySource, _WrappedSource

__all__ = [
    "NORMALIZATIONS",
    "FEATURE_FLAVORS",
    "CP10K_TARGET_SUM",
    "SEURAT_N_BINS",
    "normalize_total",
    "log1p",
    "feature_variances",
    "feature_dispersions",
    "FeatureDispersions",
    "select_features",
    "recipe",
    "TransformedSource",
]

#: ``normalize`` choices of :func:`preprocess` (and of the factorize pipeline's ``input.normalize``).
NORMALIZATIONS = ("none", "log1p", "cp10k_log1p")

#: Total per sample after ``cp10k_log1p``'s library-size scaling (counts per 10,000; scanpy's
#: ``normalize_total(target_sum=1e4)``).
CP10K_TARGET_SUM = 1e4

#: ``flavor`` choices of :func:`select_features` (``feature_flavor`` of :func:`recipe`, and of
#: the factorize pipeline's ``input.feature_flavor``): rank features by their plain variance, or
#: by scanpy's ``flavor="seurat"`` normalized dispersion (:func:`feature_dispersions`).
FEATURE_FLAVORS = ("variance", "seurat")

#: Number of mean-expression bins of the "seurat" flavor (scanpy's default ``n_bins``).
SEURAT_N_BINS = 20


# ---------------------------------------------------------------------------------------------
# Per-block transforms (small, picklable callables: block -> block)
# ---------------------------------------------------------------------------------------------


def _column_totals(block) -> np.ndarray:
    if isinstance(block, CSCBlock):
        counts = np.diff(block.indptr)
        totals = np.zeros(len(counts))
        nonempty = counts > 0
        if block.data.size:  # reduceat gives an empty column the next value: non-empty ones only
            totals[nonempty] = np.add.reduceat(block.data.astype(np.float64), block.indptr[:-1][nonempty])
        return totals
    return np.asarray(block, dtype=np.float64).sum(axis=0)


@dataclass(frozen=True)
class NormalizeTotal:
    """Scale every column (sample) to sum to ``target_sum``; a column summing to 0 stays 0."""

    target_sum: float = CP10K_TARGET_SUM

    def __call__(self, block):
        totals = _column_totals(block)
        scale = np.divide(self.target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        if isinstance(block, CSCBlock):
            data = block.data.astype(np.float64) * np.repeat(scale, np.diff(block.indptr))
            return CSCBlock(data.astype(block.data.dtype), block.indices, block.indptr, block.n_rows)
        return (np.asarray(block, dtype=np.float64) * scale[None, :]).astype(block.dtype)


@dataclass(frozen=True)
class Log1p:
    """log(1 + x) of every value."""

    def __call__(self, block):
        if isinstance(block, CSCBlock):
            data = np.log1p(block.data.astype(np.float64)).astype(block.data.dtype)
            return CSCBlock(data, block.indices, block.indptr, block.n_rows)
        return np.log1p(np.asarray(block, dtype=np.float64)).astype(block.dtype)


@dataclass(frozen=True, eq=False)
class SelectRows:
    """Keep the rows ``keep`` (sorted, distinct) of the m-row block, in their original order."""

    keep: np.ndarray
    n_rows: int

    def __call__(self, block):
        if isinstance(block, CSCBlock):
            new_index = np.full(self.n_rows, -1, dtype=np.int64)
            new_index[self.keep] = np.arange(len(self.keep))
            mapped = new_index[block.indices]
            stored = mapped >= 0
            kept_before = np.concatenate([[0], np.cumsum(stored, dtype=np.int64)])
            indptr = kept_before[block.indptr].astype(block.indptr.dtype)
            return CSCBlock(block.data[stored], mapped[stored].astype(block.indices.dtype), indptr, len(self.keep))
        return np.ascontiguousarray(np.asarray(block)[self.keep])


@dataclass(frozen=True)
class TransformedSource(_WrappedSource):
    """A lazy block source: ``source.load()`` with ``transforms`` applied in order, on ``load()``.

    Small and picklable (the transforms are frozen dataclasses), so the engine ships it to a
    worker, which reads and transforms its block there.
    """

    source: Any
    transforms: tuple
    n_rows: int | None = None

    def load(self):
        block = self.source.load()
        for t in self.transforms:
            block = t(block)
        return block


def _as_blocked(data, block_nnz: int | None) -> BlockedMatrix:
    from .core import default_block_nnz
    from .io import as_blocked

    if isinstance(data, BlockedMatrix):
        return data
    return as_blocked(data, block_nnz=block_nnz or default_block_nnz(data))


def _apply(blocked: BlockedMatrix, transform, n_rows: int | None = None, row_names=None) -> BlockedMatrix:
    """``blocked`` with ``transform`` applied to every block (eagerly in memory, lazily otherwise)."""
    if blocked.in_memory:
        sources = tuple(InMemorySource(transform(s.load())) for s in blocked.sources)
    else:
        sources = tuple(
            TransformedSource(s.source, (*s.transforms, transform), n_rows) if isinstance(s, TransformedSource)
            else TransformedSource(s, (transform,), n_rows) for s in blocked.sources)
    shape = (blocked.shape[0] if n_rows is None else n_rows, blocked.shape[1])
    return BlockedMatrix(shape=shape, dtype=blocked.dtype, sources=sources, sparse=blocked.sparse,
                         in_memory=blocked.in_memory, row_names=blocked.row_names if n_rows is None else row_names,
                         col_names=blocked.col_names)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def normalize_total(data: Any, target_sum: float = CP10K_TARGET_SUM, *, block_nnz: int | None = None) -> BlockedMatrix:
    """Scale every sample (column) to sum to ``target_sum`` (scanpy's ``normalize_total``).

    Parameters
    ----------
    data : array-like of shape (m, n)
        Features × samples; anything :func:`dnmf.io.as_blocked` accepts (AnnData is read as
        genes × cells).
    target_sum : float, default 1e4
        Total of every sample afterwards (counts per 10,000). A sample summing to 0 stays 0.
    block_nnz : int, optional
        Column blocking when ``data`` is not a BlockedMatrix yet (default: the one
        :func:`dnmf.nmf` would choose, so the blocks match the fit's).

    Returns
    -------
    BlockedMatrix of shape (m, n)
        ``a_ij · target_sum / Σ_i a_ij``.
    """
    if not isinstance(target_sum, numbers.Real) or isinstance(target_sum, bool) or not target_sum > 0 \
            or not np.isfinite(target_sum):
        raise param_error("target_sum", "normalize_total", "a float in (0, inf)", target_sum)
    return _apply(_as_blocked(data, block_nnz), NormalizeTotal(float(target_sum)))


def log1p(data: Any, *, block_nnz: int | None = None) -> BlockedMatrix:
    """log(1 + x) of every value (scanpy's ``log1p``, natural log); zeros stay zeros.

    Parameters and return as :func:`normalize_total`.
    """
    return _apply(_as_blocked(data, block_nnz), Log1p())


# ---------------------------------------------------------------------------------------------
# Per-feature statistics: chunk -> combine -> aggregate, as block tasks on the executor
# ---------------------------------------------------------------------------------------------


def feature_moments_chunk(source, n_rows: int, expm1: bool = False) -> np.ndarray:
    """Sums of one column block, per feature: a (2, m) float64 array ``[Σ_j x_ij, Σ_j x_ij²]``.

    ``x = a``, or ``x = exp(a) − 1`` with ``expm1`` (scanpy's "seurat" flavor undoes log1p).
    ``source`` is a block source (``load()`` gives the block: read and transformed where this
    runs). A sparse block is summed over its stored entries only (x(0) = 0 both ways).
    """
    block = source.load()
    if isinstance(block, CSCBlock):
        values = block.data.astype(np.float64)
        if expm1:
            values = np.expm1(values)
        return np.stack([np.bincount(block.indices, weights=values, minlength=n_rows),
                         np.bincount(block.indices, weights=values * values, minlength=n_rows)])
    values = np.asarray(block, dtype=np.float64)
    if expm1:
        values = np.expm1(values)
    return np.stack([values.sum(axis=1), (values * values).sum(axis=1)])


def feature_moments_combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Add the sums of two groups of blocks."""
    return a + b


def feature_moments_agg(sums: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample variance (ddof = 1) per feature from the summed moments of ``n`` samples.

    ``var_i = (Σ_j x_ij² − n·mean_i²) / (n − 1)``, clipped at 0 against rounding (0 when n = 1).
    """
    s1, s2 = sums
    m = s1.shape[0]
    mean = s1 / max(n, 1)
    var = np.maximum(s2 - n * mean * mean, 0.0) / (n - 1) if n > 1 else np.zeros(m)
    return mean, var


def _feature_moments(blocked: BlockedMatrix, expm1: bool, client: Any, func: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of every feature of ``blocked``: block tasks on the executor for ``client``."""
    from .engine.executor import LocalExecutor, get_executor

    m, n = blocked.shape
    sources = list(blocked.sources)
    executor = get_executor(client, func=func)
    if executor.distributed and blocked.in_memory:
        # the blocks are here already: shipping them to the workers would only send A once more
        executor = LocalExecutor()
    try:
        for attempt in range(executor.max_recoveries + 1):
            try:
                sums = executor.tree_reduce(feature_moments_combine,
                                            executor.map_blocks(feature_moments_chunk, sources, args=(m, expm1)))
                break
            except WorkerLostError:  # idempotent: run it again on the live workers
                if attempt == executor.max_recoveries:
                    raise
    finally:
        if not executor.distributed:  # the thread pool is ours; a cluster is left as it was
            executor.close()
    return feature_moments_agg(sums, n)


def feature_variances(data: Any, *, block_nnz: int | None = None, client: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of every feature (row) over the samples, in one pass of block sums.

    Parameters
    ----------
    data : array-like of shape (m, n)
        Features × samples; anything :func:`dnmf.io.as_blocked` accepts.
    block_nnz : int, optional
        Column blocking when ``data`` is not a BlockedMatrix yet.
    client : distributed.Client, False or None, default None
        Where the block tasks run, as :func:`dnmf.nmf`'s ``client``: None uses the default Dask
        client if there is one, else a thread pool here; False always the thread pool.

    Returns
    -------
    mean, var : ndarray of shape (m,)
        ``mean_i = Σ_j a_ij / n`` and the sample variance (ddof = 1, as scanpy's
        ``_get_mean_var``) ``var_i = (Σ_j a_ij² − n·mean_i²) / (n − 1)``, from float64 block sums
        added in a fixed tree in block order (0 when n = 1; clipped at 0 against rounding).
    """
    return _feature_moments(_as_blocked(data, block_nnz), False, client, "feature_variances")


@dataclass(frozen=True)
class FeatureDispersions:
    """Per-feature statistics of scanpy's ``highly_variable_genes(flavor="seurat")``.

    Named as the ``adata.var`` columns scanpy writes. All arrays have shape (m,), one entry per
    feature (row) in row order.

    Attributes
    ----------
    means : ndarray
        ``log1p(μ_i)``, μ_i the mean of ``expm1(a_ij)`` over the samples (0 replaced by 1e-12).
    dispersions : ndarray
        ``log(σ²_i / μ_i)`` (σ² with ddof = 1); NaN where σ² = 0.
    mean_bin : ndarray of int
        Bin of ``means``: ``n_bins`` bins of equal width over [min, max] (``pandas.cut(means,
        n_bins)``), numbered from 0.
    dispersions_norm : ndarray
        ``(dispersions − avg_b) / dev_b`` with avg_b, dev_b the mean and standard deviation
        (ddof = 1, NaN left out) of the dispersions in the feature's bin b; in a bin where dev_b is
        undefined (a single feature) avg_b = 0 and dev_b = its dispersion, so the feature scores 1.
        NaN where ``dispersions`` is NaN.
    """

    means: np.ndarray
    dispersions: np.ndarray
    mean_bin: np.ndarray
    dispersions_norm: np.ndarray


def _mean_bins(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of every x among ``n_bins`` equal-width right-closed bins over [min, max]: ``pandas.cut(x, n_bins)``.

    pandas widens the first bin's left edge by 0.1 % of the range so min(x) falls in bin 0 (and
    widens both ends by 0.1 % of |x| when all x are equal).
    """
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        lo, hi = lo - (0.001 * abs(lo) if lo != 0 else 0.001), hi + (0.001 * abs(hi) if hi != 0 else 0.001)
        edges = np.linspace(lo, hi, n_bins + 1)
    else:
        edges = np.linspace(lo, hi, n_bins + 1)
        edges[0] -= (hi - lo) * 0.001
    return np.clip(np.searchsorted(edges, x, side="left") - 1, 0, n_bins - 1)


def seurat_dispersions(mean: np.ndarray, var: np.ndarray, n_bins: int = SEURAT_N_BINS) -> FeatureDispersions:
    """The "seurat" normalized dispersions from each feature's mean and variance of ``expm1(a)``.

    The aggregate step of :func:`feature_dispersions` (NumPy on m-vectors, on the client);
    follows scanpy's ``_highly_variable_genes_single_batch`` step by step (see
    :class:`FeatureDispersions`).
    """
    mean = np.where(mean == 0, 1e-12, mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersions = var / mean
        dispersions[dispersions == 0] = np.nan
        dispersions = np.log(dispersions)
    means = np.log1p(mean)
    mean_bin = _mean_bins(means, n_bins)
    valid = ~np.isnan(dispersions)
    count = np.bincount(mean_bin[valid], minlength=n_bins).astype(np.float64)
    total = np.bincount(mean_bin[valid], weights=dispersions[valid], minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        avg = total / count  # NaN for a bin without a finite dispersion
        centred = dispersions[valid] - avg[mean_bin[valid]]
        dev = np.sqrt(np.bincount(mean_bin[valid], weights=centred * centred, minlength=n_bins) / (count - 1))
    dev[count < 2] = np.nan  # pandas' std of fewer than two values
    single = np.isnan(dev)  # scanpy: such a bin's features get a normalized dispersion of 1
    dev[single], avg[single] = avg[single], 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = (dispersions - avg[mean_bin]) / dev[mean_bin]
    return FeatureDispersions(means=means, dispersions=dispersions, mean_bin=mean_bin, dispersions_norm=norm)


def feature_dispersions(data: Any, *, n_bins: int = SEURAT_N_BINS, block_nnz: int | None = None,
                        client: Any = None) -> FeatureDispersions:
    """scanpy's ``flavor="seurat"`` binned, normalized dispersion of every feature (row).

    ``data`` is log1p-transformed (as scanpy expects: :func:`recipe`'s ``cp10k_log1p`` or
    ``log1p``). The statistics are those of ``x = expm1(a)``, the data before log1p:

    1. μ_i and σ²_i, the mean and the variance (ddof = 1) of x_i over the samples — one pass of
       block sums on the executor (:func:`feature_moments_chunk` with ``expm1``), sparse blocks
       through their stored entries;
    2. on the client: μ_i = 0 becomes 1e-12; dispersion ``d_i = log(σ²_i / μ_i)`` (NaN where
       σ²_i = 0) and ``means_i = log1p(μ_i)``;
    3. ``means`` is cut into ``n_bins`` bins of equal width; within each bin the dispersions are
       z-scored by the bin's mean and standard deviation (ddof = 1, NaN left out); a bin with a
       single feature scores it 1 (scanpy's rule).

    Parameters
    ----------
    data : array-like of shape (m, n)
        Features × samples, log1p-transformed; anything :func:`dnmf.io.as_blocked` accepts.
    n_bins : int, default 20
        Number of mean-expression bins (scanpy's ``n_bins``).
    block_nnz, client
        As :func:`feature_variances`.

    Returns
    -------
    FeatureDispersions
        ``means``, ``dispersions``, ``mean_bin`` and ``dispersions_norm``, each of shape (m,).
    """
    if not isinstance(n_bins, numbers.Integral) or isinstance(n_bins, bool) or n_bins < 1:
        raise param_error("n_bins", "feature_dispersions", "an int in [1, inf)", n_bins)
    mean, var = _feature_moments(_as_blocked(data, block_nnz), True, client, "feature_dispersions")
    return seurat_dispersions(mean, var, int(n_bins))


def select_features(data: Any, n_top_features: int, *, flavor: str = "variance", block_nnz: int | None = None,
                    client: Any = None) -> BlockedMatrix:
    """Keep the ``n_top_features`` most variable features (rows), in their original order.

    The rule: rank the features of ``data`` as given — call it on normalized, log-transformed
    data, as :func:`recipe` does — highest score first, ties broken by row order; keep the top
    ``min(n_top_features, m)`` and return them in their original row order (names follow). The
    score, by ``flavor``:

    * ``"variance"`` — the sample variance over the samples (:func:`feature_variances`,
      ddof = 1): a lighter cousin of scanpy's ``highly_variable_genes``, with no binning, so it
      favours highly expressed features;
    * ``"seurat"`` — scanpy's ``highly_variable_genes(flavor="seurat", n_top_genes=...)``
      normalized dispersion (:func:`feature_dispersions`, 20 bins of mean expression), which
      compares each feature's dispersion with features of similar mean. Features whose
      dispersion is undefined (constant ones) rank last. scanpy keeps every gene scoring at
      least the n-th highest score, so exact ties at the cut-off can make it keep more than n;
      here exactly n are kept.

    Either way the statistics are one pass of block tasks on the executor (see the module
    docstring): a cluster run reads the blocks on the workers and only m-vectors travel.

    Parameters
    ----------
    data : array-like of shape (m, n)
        Features × samples; anything :func:`dnmf.io.as_blocked` accepts.
    n_top_features : int
        How many features to keep (all when ≥ m).
    flavor : {"variance", "seurat"}, default "variance"
        The score ranked (:data:`FEATURE_FLAVORS`).
    block_nnz, client
        As :func:`feature_variances`.

    Returns
    -------
    BlockedMatrix of shape (min(m, n_top_features), n)
    """
    func = "select_features"
    if not isinstance(n_top_features, numbers.Integral) or isinstance(n_top_features, bool) or n_top_features < 1:
        raise param_error("n_top_features", func, "an int in [1, inf)", n_top_features)
    flavor = check_option(flavor, "flavor", func, FEATURE_FLAVORS)
    blocked = _as_blocked(data, block_nnz)
    m = blocked.shape[0]
    if n_top_features >= m:
        return blocked
    if flavor == "variance":
        _, score = feature_variances(blocked, client=client)
    else:
        score = feature_dispersions(blocked, client=client).dispersions_norm
        score = np.where(np.isnan(score), -np.inf, score)
    keep = np.sort(np.argsort(-score, kind="stable")[:n_top_features])
    names = blocked.row_names
    row_names = tuple(names[i] for i in keep) if names is not None else None
    return _apply(blocked, SelectRows(keep, m), n_rows=len(keep), row_names=row_names)


def recipe(data: Any, normalize: str = "cp10k_log1p", n_top_features: int | None = None, *,
           feature_flavor: str = "variance", block_nnz: int | None = None, client: Any = None) -> BlockedMatrix:
    """The common single-cell recipe: normalize, log-transform, then optionally select features.

    Parameters
    ----------
    data : array-like of shape (m, n)
        Features × samples (genes × cells); anything :func:`dnmf.io.as_blocked` accepts.
    normalize : {"cp10k_log1p", "log1p", "none"}, default "cp10k_log1p"
        ``cp10k_log1p``: :func:`normalize_total` to 10,000 then :func:`log1p` (scanpy's
        ``normalize_total(target_sum=1e4)`` + ``log1p``); ``log1p`` alone; ``none``: values as
        stored.
    n_top_features : int, optional
        Then keep this many features by :func:`select_features` (scored on the transformed
        data); default: all.
    feature_flavor : {"variance", "seurat"}, default "variance"
        The score of that selection (:func:`select_features`'s ``flavor``); "seurat" expects
        log-transformed data (``normalize`` not "none", unless the values already are).
    block_nnz : int, optional
        Column blocking when ``data`` is not a BlockedMatrix yet.
    client : distributed.Client, False or None, default None
        Where the selection's statistics are computed (:func:`feature_variances`).

    Returns
    -------
    BlockedMatrix of shape (min(m, n_top_features), n)
    """
    normalize = check_option(normalize, "normalize", "recipe", NORMALIZATIONS)
    feature_flavor = check_option(feature_flavor, "feature_flavor", "recipe", FEATURE_FLAVORS)
    blocked = _as_blocked(data, block_nnz)
    if normalize == "cp10k_log1p":
        blocked = normalize_total(blocked, CP10K_TARGET_SUM)
    if normalize in ("cp10k_log1p", "log1p"):
        blocked = log1p(blocked)
    if n_top_features is not None:
        blocked = select_features(blocked, n_top_features, flavor=feature_flavor, client=client)
    return blocked
