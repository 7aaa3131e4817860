"""Single-cell preprocessing on column-blocked matrices: library-size normalization, log1p, feature selection.

The common scanpy recipe before a factorization of counts::

    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000)   # a variance rule, see select_features

written for dnmf's features × samples (genes × cells) :class:`dnmf.io.BlockedMatrix`. Every
function accepts anything :func:`dnmf.io.as_blocked` accepts and returns a BlockedMatrix with
the same column blocks:

* sparse stays sparse: ``normalize_total`` and ``log1p`` map 0 to 0, so the stored pattern is
  kept and nothing is densified;
* in-memory blocks are transformed once, here; lazy (on-disk) blocks are wrapped in a
  :class:`TransformedSource` whose ``load()`` applies the transforms on the worker, each time
  the block is read, so an out-of-core matrix is never held whole;
* the dtype is kept (float32 in, float32 out); arithmetic is done in float64;
* feature (row) names follow the selection; sample names are kept.

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
from .io.blocks import BlockedMatrix, CSCBlock, InMemorySource, _WrappedSource

__all__ = [
    "NORMALIZATIONS",
    "CP10K_TARGET_SUM",
    "normalize_total",
    "log1p",
    "feature_variances",
    "select_features",
    "recipe",
    "TransformedSource",
]

#: ``normalize`` choices of :func:`preprocess` (and of the factorize pipeline's ``input.normalize``).
NORMALIZATIONS = ("none", "log1p", "cp10k_log1p")

#: Total per sample after ``cp10k_log1p``'s library-size scaling (counts per 10,000; scanpy's
#: ``normalize_total(target_sum=1e4)``).
CP10K_TARGET_SUM = 1e4


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


def feature_variances(data: Any, *, block_nnz: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of every feature (row) over the samples, in one pass of block sums.

    Returns
    -------
    mean, var : ndarray of shape (m,)
        ``mean_i = Σ_j a_ij / n`` and the sample variance (ddof = 1, as scanpy's
        ``_get_mean_var``) ``var_i = (Σ_j a_ij² − n·mean_i²) / (n − 1)``, accumulated block by
        block in float64 (0 when n = 1; clipped at 0 against rounding).
    """
    blocked = _as_blocked(data, block_nnz)
    m, n = blocked.shape
    s1 = np.zeros(m)
    s2 = np.zeros(m)
    for block in blocked.iter_blocks():
        if isinstance(block, CSCBlock):
            values = block.data.astype(np.float64)
            s1 += np.bincount(block.indices, weights=values, minlength=m)
            s2 += np.bincount(block.indices, weights=values * values, minlength=m)
        else:
            values = np.asarray(block, dtype=np.float64)
            s1 += values.sum(axis=1)
            s2 += (values * values).sum(axis=1)
    mean = s1 / max(n, 1)
    var = np.maximum(s2 - n * mean * mean, 0.0) / (n - 1) if n > 1 else np.zeros(m)
    return mean, var


def select_features(data: Any, n_top_features: int, *, block_nnz: int | None = None) -> BlockedMatrix:
    """Keep the ``n_top_features`` features (rows) of highest variance, in their original order.

    The rule: rank features by their sample variance over the samples (:func:`feature_variances`,
    ddof = 1) of ``data`` as given — call it on normalized, log-transformed data, as
    :func:`preprocess` does — highest first, ties broken by row order; keep the top
    ``min(n_top_features, m)`` and return them in their original row order (names follow).

    This is a lighter cousin of scanpy's ``highly_variable_genes(flavor="seurat")``, which ranks
    by a dispersion normalized within 20 bins of mean expression; here the plain variance is
    ranked, with no binning (one pass of block sums, no second pass).
    """
    func = "select_features"
    if not isinstance(n_top_features, numbers.Integral) or isinstance(n_top_features, bool) or n_top_features < 1:
        raise param_error("n_top_features", func, "an int in [1, inf)", n_top_features)
    blocked = _as_blocked(data, block_nnz)
    m = blocked.shape[0]
    if n_top_features >= m:
        return blocked
    _, var = feature_variances(blocked)
    keep = np.sort(np.argsort(-var, kind="stable")[:n_top_features])
    names = blocked.row_names
    row_names = tuple(names[i] for i in keep) if names is not None else None
    return _apply(blocked, SelectRows(keep, m), n_rows=len(keep), row_names=row_names)


def recipe(data: Any, normalize: str = "cp10k_log1p", n_top_features: int | None = None, *,
               block_nnz: int | None = None) -> BlockedMatrix:
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
        Then keep this many features by :func:`select_features` (variance of the transformed
        data); default: all.
    block_nnz : int, optional
        Column blocking when ``data`` is not a BlockedMatrix yet.

    Returns
    -------
    BlockedMatrix of shape (min(m, n_top_features), n)
    """
    normalize = check_option(normalize, "normalize", "recipe", NORMALIZATIONS)
    blocked = _as_blocked(data, block_nnz)
    if normalize == "cp10k_log1p":
        blocked = normalize_total(blocked, CP10K_TARGET_SUM)
    if normalize in ("cp10k_log1p", "log1p"):
        blocked = log1p(blocked)
    if n_top_features is not None:
        blocked = select_features(blocked, n_top_features)
    return blocked
