"""Result objects of the core NMF and the model utilities (RcppML spec §10).

:class:`NMFModel` is what :func:`dnmf.nmf` returns. Besides its factors it carries the
helpers of RcppML's ``nmf`` class: ``reconstruct`` (RcppML ``prod``), ``evaluate`` (mean loss on
data, computed blockwise), ``predict`` (project new samples onto W), ``align`` (reorder factors
to match another model), factor subsetting (``model[idx]``, ``subset``, ``head``, ``sort``),
``sparsity`` and ``transpose`` (RcppML ``t``), and for single-cell work the names of features and
samples (``feature_names``, ``sample_names``, used by ``predict`` and ``align`` to match features
by name) and ``top_features`` (a tidy table of each factor's top-loading features).

Module functions: :func:`cosine` (column-wise cosine similarity) and :func:`bipartite_match`
(Hungarian assignment, RcppML ``bipartiteMatch``).
"""

from __future__ import annotations

import logging
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._validation import check_bool_pair, check_float, check_option, param_error
from .exceptions import InputError
from ._losses import LOSSES, Loss, robust_delta, robust_loss

__all__ = ["NMFModel", "BipartiteMatch", "cosine", "bipartite_match", "LOSSES"]


logger = logging.getLogger(__name__)

#: Entries per chunk when fitted values are formed explicitly (bounds temporary memory to
#: about ``_CHUNK_ENTRIES · k · 8`` bytes for sparse blocks and ``_CHUNK_ENTRIES · 8`` for dense).
_CHUNK_ENTRIES = 1 << 20


# ---------------------------------------------------------------------------------------------
# Losses for ``evaluate``: the registry of dnmf.losses (spec §6.1)
# ---------------------------------------------------------------------------------------------


def _check_loss_params(params: dict, m: int, n: int, func: str) -> dict:
    """Each array-valued distribution parameter must broadcast as per row, per column or per entry."""
    allowed = {(1, 1), (m, 1), (1, n), (m, n)}
    for key, val in params.items():
        if isinstance(val, np.ndarray) and val.ndim > 0 and (val.ndim != 2 or val.shape not in allowed):
            raise param_error(key, func, f"a float or an array of shape ({m}, 1), (1, {n}) or ({m}, {n})",
                              f"an array of shape {val.shape}", described=True)
    return params


def _params_cols(params: dict, c0: int, c1: int, n: int) -> dict:
    """The parameters restricted to columns c0:c1 (per-column and per-entry arrays are sliced)."""
    return {key: (val[:, c0:c1] if isinstance(val, np.ndarray) and val.ndim == 2 and val.shape[1] == n else val)
            for key, val in params.items()}


def _params_at(params: dict, rows: np.ndarray, cols: np.ndarray) -> dict:
    """The parameters at entries (rows, cols) of a block, as 1-D arrays (scalars kept)."""
    out = {}
    for key, val in params.items():
        if isinstance(val, np.ndarray) and val.ndim == 2:
            val = val[rows if val.shape[0] > 1 else 0, cols if val.shape[1] > 1 else 0]
        out[key] = val
    return out


# ---------------------------------------------------------------------------------------------
# Module functions
# ---------------------------------------------------------------------------------------------


def _as_2d_columns(x: Any, name: str, func: str) -> tuple[Any, bool]:
    """Return (matrix with samples as columns, was_vector) for dense or scipy.sparse input."""
    if sp.issparse(x):
        x = sp.csc_array(x, dtype=np.float64)
        if not np.all(np.isfinite(x.data)):
            raise param_error(name, func, "a finite matrix", "a sparse matrix with NaN or Inf")
        return x, False
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise param_error(name, func, "a numeric vector or matrix", type(x).__name__) from e
    if arr.ndim == 1:
        return arr[:, None], True
    if arr.ndim != 2:
        raise param_error(name, func, "a vector or a 2-D matrix", f"an array with {arr.ndim} dimensions")
    if not np.all(np.isfinite(arr)):
        raise param_error(name, func, "a finite matrix", "a matrix with NaN or Inf")
    return arr, False


def _column_norms(x) -> np.ndarray:
    if sp.issparse(x):
        return np.sqrt(np.asarray(x.multiply(x).sum(axis=0)).ravel())
    return np.sqrt(np.einsum("ij,ij->j", x, x))


def cosine(x: Any, y: Any = None) -> np.ndarray | float:
    """Column-wise cosine similarity, ``diag(1/‖x_c‖) xᵀ y diag(1/‖y_c‖)`` (RcppML ``cosine``).

    Parameters
    ----------
    x : array-like or scipy.sparse matrix of shape (m, p), or vector of shape (m,)
    y : array-like or scipy.sparse matrix of shape (m, q), or vector of shape (m,), optional
        Defaults to ``x``.

    Returns
    -------
    ndarray of shape (p, q), or float
        Entry (a, b) is the cosine of column a of x and column b of y. A vector argument
        counts as one column and its axis is dropped (vector × vector gives a float). A
        zero column has similarity 0 with everything (not NaN).

    Notes
    -----
    RcppML 1.0 mis-normalizes the vector-versus-matrix case (multiplies by ‖x‖² instead of
    dividing by ‖x‖); here vectors are treated exactly like one-column matrices.

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.models import cosine
    >>> cosine(np.array([[1.0, 0.0], [0.0, 2.0]]))
    array([[1., 0.],
           [0., 1.]])
    """
    func = "cosine"
    xm, x_vec = _as_2d_columns(x, "x", func)
    if y is None:
        ym, y_vec = xm, x_vec
    else:
        ym, y_vec = _as_2d_columns(y, "y", func)
        if ym.shape[0] != xm.shape[0]:
            raise param_error("y", func, f"an array with {xm.shape[0]} rows (as many as x)",
                              f"{ym.shape[0]} rows")
    inner = xm.T @ ym
    inner = inner.toarray() if sp.issparse(inner) else np.asarray(inner, dtype=np.float64)
    nx, ny = _column_norms(xm), _column_norms(ym)
    with np.errstate(divide="ignore"):
        ix = np.where(nx > 0, 1.0 / nx, 0.0)
        iy = np.where(ny > 0, 1.0 / ny, 0.0)
    out = inner * ix[:, None] * iy[None, :]
    if x_vec and y_vec:
        return float(out[0, 0])
    if x_vec:
        return out[0]
    if y_vec:
        return out[:, 0]
    return out


@dataclass(frozen=True)
class BipartiteMatch:
    """A minimum- (or maximum-) cost assignment of rows to columns.

    Attributes
    ----------
    assignment : ndarray of int64, shape (n_rows,)
        0-based column matched to each row; -1 for rows left unmatched (more rows than columns).
    rows, cols : ndarray of int64, shape (min(n_rows, n_cols),)
        The matched pairs, sorted by row.
    cost : float
        Total cost of the matched pairs.
    """

    assignment: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    cost: float

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The matched (row, column) pairs as Python ints."""
        return [(int(r), int(c)) for r, c in zip(self.rows, self.cols)]


def bipartite_match(cost: Any, maximize: bool = False) -> BipartiteMatch:
    """Optimal assignment of rows to columns of a cost matrix (Hungarian algorithm).

    Parameters
    ----------
    cost : array-like of shape (n_rows, n_cols)
        Finite costs; the matrix may be rectangular, in which case ``min(n_rows, n_cols)``
        pairs are matched.
    maximize : bool, default False
        Maximize the total instead of minimizing it (e.g. on a similarity matrix).

    Returns
    -------
    BipartiteMatch
        ``assignment`` (column per row, 0-based), ``rows``/``cols`` (pairs) and total ``cost``.

    Notes
    -----
    RcppML's ``bipartiteMatch`` returns ``list(assignment, cost)`` and silently sets negative
    costs to 0; here costs are used as given (the assignment problem is well defined for any
    real costs), so pass ``np.maximum(cost, 0)`` to reproduce that quirk.

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.models import bipartite_match
    >>> bipartite_match(1 - np.eye(3)[[2, 0, 1]]).assignment
    array([2, 0, 1])
    """
    from scipy.optimize import linear_sum_assignment

    func = "bipartite_match"
    try:
        c = np.asarray(cost, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise param_error("cost", func, "a numeric 2-D matrix", type(cost).__name__) from e
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise param_error("cost", func, "a non-empty 2-D matrix", f"an array of shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise param_error("cost", func, "a finite matrix", "a matrix with NaN or Inf")
    if not isinstance(maximize, (bool, np.bool_)):
        raise param_error("maximize", func, "a bool", maximize)
    rows, cols = linear_sum_assignment(c, maximize=bool(maximize))
    assignment = np.full(c.shape[0], -1, dtype=np.int64)
    assignment[rows] = cols
    return BipartiteMatch(assignment=assignment, rows=rows.astype(np.int64), cols=cols.astype(np.int64),
                          cost=float(c[rows, cols].sum()))


# ---------------------------------------------------------------------------------------------
# Block helpers
# ---------------------------------------------------------------------------------------------


def _fitted_at(wd: np.ndarray, ht: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(wd @ htᵀ)[rows, cols]`` for index arrays, in bounded-memory chunks."""
    out = np.empty(rows.shape[0])
    k = max(wd.shape[1], 1)
    step = max(1, _CHUNK_ENTRIES // k)
    for s in range(0, rows.shape[0], step):
        e = min(s + step, rows.shape[0])
        out[s:e] = np.einsum("ij,ij->i", wd[rows[s:e]], ht[cols[s:e]])
    return out


def _csc_positions(indptr: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the stored entries of a CSC pattern."""
    cols = np.repeat(np.arange(indptr.shape[0] - 1, dtype=np.int64), np.diff(indptr))
    return indices.astype(np.int64, copy=False), cols


def _sparse_values_at(data, indices, indptr, m, rows, cols) -> np.ndarray:
    """Values of a CSC block (row indices sorted per column) at positions (rows, cols); 0 if absent."""
    a_rows, a_cols = _csc_positions(indptr, indices)
    key_a = a_cols * m + a_rows
    if key_a.shape[0] > 1 and np.any(key_a[1:] < key_a[:-1]):
        order = np.argsort(key_a, kind="stable")
        key_a, data = key_a[order], data[order]
    key = cols * m + rows
    pos = np.searchsorted(key_a, key)
    pos_c = np.minimum(pos, max(key_a.shape[0] - 1, 0))
    found = (pos < key_a.shape[0]) & (key_a[pos_c] == key) if key_a.shape[0] else np.zeros(key.shape, bool)
    out = np.zeros(key.shape[0])
    out[found] = data[pos_c[found]]
    return out


def _check_block_values(block, func: str, *, allow_negative: bool, why: str = "for this loss",
                        col0: int = 0) -> None:
    """Reject NaN/Inf (and negative values unless allowed) in one block of the data.

    ``col0`` is the block's first column, so the example position is in whole-matrix coordinates.
    """
    values = block if isinstance(block, np.ndarray) else block.data
    finite = np.isfinite(values)
    if not np.all(finite):
        n_bad = int(values.size - np.count_nonzero(finite))
        raise param_error("A", func, "finite data", f"data with {n_bad} NaN or Inf value(s) in columns "
                          f"{col0}..{col0 + block.shape[1] - 1}", described=True)
    if not allow_negative and values.size and values.min() < 0:
        raise param_error("A", func, f"non-negative data {why}",
                          f"data with {int(np.count_nonzero(values < 0))} negative value(s) in columns "
                          f"{col0}..{col0 + block.shape[1] - 1}, minimum {float(values.min())!r}", described=True)


def _masked_predict_block(block, w, hs, l2: float, zeros_missing: bool, pattern) -> np.ndarray:
    """H (k × n_j) of one block with W fixed and missing entries left out (the fit's masked pass)."""
    from .engine.masked import as_csc64
    from .kernels.column import column_terms
    from .kernels.masked import NO_PATTERN, csc_masked_pass

    csc = as_csc64(block)
    m, k = w.shape
    w = np.ascontiguousarray(w, dtype=np.float64)
    G = w.T @ w
    G[np.diag_indices(k)] += l2
    ht = np.zeros((csc.shape[1], k))
    if pattern is None:
        mk = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    else:
        mk = (np.asarray(pattern.indices, dtype=np.int64), np.asarray(pattern.indptr, dtype=np.int64))
    csc_masked_pass(csc.data, csc.indices, csc.indptr, m, 0, w, G, hs.L, float(l2), hs.l1, ht, np.ones(k),
                    column_terms(k), hs.solver, hs.nonneg, hs.cd_maxit, hs.cd_tol, False, zeros_missing, False,
                    np.uint64(1), np.uint64(0), mk[0], mk[1], np.zeros((0, 0)), 0.0, *NO_PATTERN, np.zeros((k, k)),
                    np.zeros(k))
    return ht.T


def _mask_pattern(mask: Any, shape: tuple[int, int], func: str) -> sp.csc_array:
    """A user mask (non-zero = masked) as a CSC pattern with sorted indices and no stored zeros."""
    try:
        if sp.issparse(mask):
            pat = sp.csc_array(mask)
        else:
            arr = np.asarray(mask)
            if arr.ndim != 2:
                raise param_error("mask", func, f"None, 'zeros' or a matrix of shape {shape}",
                                  f"an array of shape {arr.shape}")
            pat = sp.csc_array(arr != 0)
    except (TypeError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise param_error("mask", func, f"None, 'zeros' or a matrix of shape {shape}", type(mask).__name__) from e
    if pat.shape != tuple(shape):
        raise param_error("mask", func, f"None, 'zeros' or a matrix of shape {shape}", f"shape {pat.shape}")
    pat = sp.csc_array(pat != 0)  # NaN counts as masked (NaN != 0)
    pat.sum_duplicates()
    pat.sort_indices()
    return pat


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def _is_anndata(x: Any) -> bool:
    """True for an ``anndata.AnnData`` (checked by type name: anndata is imported only when used)."""
    return any(c.__name__ == "AnnData" and c.__module__.startswith("anndata") for c in type(x).__mro__)


def _names(names: Any, length: int) -> tuple[str, ...] | None:
    """``names`` as a tuple of str when it has ``length`` entries, else None."""
    if names is None:
        return None
    names = tuple(str(x) for x in names)
    return names if len(names) == length else None


def _name_positions(names: tuple, targets: tuple, what: str, func: str) -> np.ndarray:
    """Position of each of ``targets`` in ``names`` (-1 where absent); ``names`` must be unique."""
    import pandas as pd

    index = pd.Index(names)
    if not index.is_unique:
        dup = index[index.duplicated()][0]
        raise InputError(f"The feature names of {what} passed to {func} must be unique to match them by name; "
                         f"{dup!r} appears more than once. Make them unique first (AnnData.var_names_make_unique()).")
    return index.get_indexer(pd.Index(targets)).astype(np.int64)


def _factor_index(idx: Any, k: int, func: str) -> np.ndarray:
    """Normalize an int, slice, sequence of ints or boolean mask to an int64 index array."""
    if isinstance(idx, slice):
        return np.arange(k, dtype=np.int64)[idx]
    if isinstance(idx, numbers.Integral) and not isinstance(idx, (bool, np.bool_)):
        arr = np.array([int(idx)], dtype=np.int64)
    else:
        arr = np.asarray(idx)
        if arr.ndim != 1:
            raise param_error("idx", func, "an int, a slice, a 1-D sequence of ints or a boolean mask",
                              f"an array of shape {arr.shape}")
        if arr.dtype == bool:
            if arr.shape[0] != k:
                raise param_error("idx", func, f"a boolean mask of length {k}", f"length {arr.shape[0]}")
            return np.flatnonzero(arr).astype(np.int64)
        if arr.shape[0] == 0:
            arr = arr.astype(np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise param_error("idx", func, "an int, a slice, a 1-D sequence of ints or a boolean mask",
                              f"an array of dtype {arr.dtype}")
        arr = arr.astype(np.int64)
    bad = (arr < -k) | (arr >= k)
    if np.any(bad):
        raise param_error("idx", func, f"factor indices in [-{k}, {k - 1}]", int(arr[bad][0]))
    return np.where(arr < 0, arr + k, arr)


@dataclass(frozen=True)
class NMFModel:
    """A fitted model A ≈ W · diag(d) · H.

    Attributes
    ----------
    w : ndarray of shape (m, k)
        Feature loadings; columns have unit norm in the fit's ``norm``.
    d : ndarray of shape (k,)
        Scaling diagonal, decreasing when the fit sorted the model.
    h : ndarray of shape (k, n)
        Sample embeddings; rows have unit norm in the fit's ``norm``.
    misc : dict
        Fit record: ``iter`` (iterations run), ``runtime`` (s), ``loss`` (final training SSE),
        ``loss_history`` (SSE per iteration), ``tol_history`` (relative loss change per
        iteration), ``tol`` (last relative change), ``converged`` (bool), ``seed``,
        ``solver``, ``norm``, ``L1``, ``L2``, ``nonneg``, ``stopped_by_callback``, and
        ``row_names`` / ``col_names`` (the names of A's rows and columns, or None), which
        :attr:`feature_names` and :attr:`sample_names` expose.

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.models import NMFModel
    >>> model = NMFModel(w=np.eye(3)[:, :2], d=np.array([2.0, 1.0]), h=np.ones((2, 4)) / 4)
    >>> model.shape, model.reconstruct().shape
    ((3, 4, 2), (3, 4))
    >>> model[1].d
    array([1.])
    """

    w: np.ndarray
    d: np.ndarray
    h: np.ndarray
    misc: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.d.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(m, n, k), like RcppML's ``dim``."""
        return (self.w.shape[0], self.h.shape[1], self.k)

    @property
    def feature_names(self) -> tuple[str, ...] | None:
        """Names of the m features (rows of W, e.g. genes), or None when A had none.

        Taken from ``misc["row_names"]``, which :func:`dnmf.nmf` fills from its input (an AnnData's
        ``var_names``, a DataFrame's index, the features of a 10x file).
        """
        return _names(self.misc.get("row_names"), self.w.shape[0])

    @property
    def sample_names(self) -> tuple[str, ...] | None:
        """Names of the n samples (columns of H, e.g. cell barcodes), or None.

        Taken from ``misc["col_names"]`` (an AnnData's ``obs_names``, a DataFrame's columns, the
        barcodes of a 10x file).
        """
        return _names(self.misc.get("col_names"), self.h.shape[1])

    # -- presentation ------------------------------------------------------------------------

    def __repr__(self) -> str:
        m, n, k = self.shape
        parts = [f"m={m}", f"n={n}", f"k={k}"]
        if "iter" in self.misc:
            parts.append(f"iter={self.misc['iter']}")
        if "loss" in self.misc:
            parts.append(f"loss={float(self.misc['loss']):.6g}")
        if self.misc.get("projected"):
            parts.append("projected")
        shown = np.array2string(np.asarray(self.d[:8], dtype=float), precision=4, separator=", ")
        more = f" … ({k - 8} more)" if k > 8 else ""
        return f"NMFModel({', '.join(parts)})\n  d = {shown}{more}"

    def to_dict(self) -> dict:
        """``{"w", "d", "h", "misc"}`` (arrays not copied; ``misc`` shallow-copied)."""
        return {"w": self.w, "d": self.d, "h": self.h, "misc": dict(self.misc)}

    @classmethod
    def from_dict(cls, record: dict) -> "NMFModel":
        """Inverse of :meth:`to_dict`; checks that the factor shapes agree."""
        func = "NMFModel.from_dict"
        missing = [key for key in ("w", "d", "h") if key not in record]
        if missing:
            raise param_error("record", func, "a mapping with keys 'w', 'd', 'h' (and optionally 'misc')",
                              f"a mapping without {missing}")
        w, d, h = (np.asarray(record[key]) for key in ("w", "d", "h"))
        if w.ndim != 2 or d.ndim != 1 or h.ndim != 2 or w.shape[1] != d.shape[0] or h.shape[0] != d.shape[0]:
            raise param_error("record", func, "w (m, k), d (k,) and h (k, n) with one k",
                              f"shapes {w.shape}, {d.shape}, {h.shape}")
        return cls(w=w, d=d, h=h, misc=dict(record.get("misc") or {}))

    # -- algebra -----------------------------------------------------------------------------

    def reconstruct(self) -> np.ndarray:
        """The dense m × n product ``W · diag(d) · H`` (RcppML ``prod``). Small models only."""
        return (self.w * self.d[None, :]) @ self.h

    def transpose(self) -> "NMFModel":
        """The model of Aᵀ: ``w`` and ``h`` swapped (RcppML ``t``)."""
        misc = dict(self.misc)
        misc["row_names"], misc["col_names"] = self.misc.get("col_names"), self.misc.get("row_names")
        return NMFModel(w=self.h.T.copy(), d=self.d.copy(), h=self.w.T.copy(), misc=misc)

    # -- factor selection --------------------------------------------------------------------

    def subset(self, idx: Any) -> "NMFModel":
        """The model restricted to factors ``idx`` (int, slice, sequence of ints or bool mask).

        Factor ``i`` is ``w[:, i]``, ``d[i]``, ``h[i, :]``; the order of ``idx`` is kept, so
        ``subset(order)`` also permutes factors. An int keeps a one-factor model (2-D w and h).
        """
        sel = _factor_index(idx, self.k, "NMFModel.subset")
        return NMFModel(w=self.w[:, sel], d=self.d[sel], h=self.h[sel, :], misc=dict(self.misc))

    def __getitem__(self, idx: Any) -> "NMFModel":
        return self.subset(idx)

    def head(self, n: int = 6) -> "NMFModel":
        """The first ``min(n, k)`` factors (RcppML ``head``)."""
        if not isinstance(n, numbers.Integral) or isinstance(n, (bool, np.bool_)) or n < 1:
            raise param_error("n", "NMFModel.head", "an int in [1, inf)", n)
        return self.subset(slice(0, int(n)))

    def sort(self) -> "NMFModel":
        """Factors reordered by decreasing ``d`` (RcppML ``sort``; stable for ties)."""
        return self.subset(np.argsort(-np.asarray(self.d), kind="stable"))

    def sparsity(self):
        """Fraction of exactly-zero entries per factor, in W's columns and H's rows.

        Returns
        -------
        pandas.DataFrame
            Long table with 2k rows and columns ``factor`` (0-based), ``model`` ("w" or "h")
            and ``sparsity`` (in [0, 1]), as RcppML's ``sparsity()``.
        """
        import pandas as pd

        k = self.k
        w_frac = (np.asarray(self.w) == 0).mean(axis=0) if self.w.shape[0] else np.zeros(k)
        h_frac = (np.asarray(self.h) == 0).mean(axis=1) if self.h.shape[1] else np.zeros(k)
        return pd.DataFrame({
            "factor": np.concatenate([np.arange(k), np.arange(k)]),
            "model": ["w"] * k + ["h"] * k,
            "sparsity": np.concatenate([w_frac, h_frac]).astype(float),
        })

    def align(self, other: "NMFModel | np.ndarray") -> "NMFModel":
        """This model with its factors reordered to best match ``other`` (RcppML ``align``).

        Parameters
        ----------
        other : NMFModel or ndarray of shape (m, k_ref)
            Reference model, or its W.

        Returns
        -------
        NMFModel
            Factors permuted so that factor ``j`` matches ``other``'s factor ``j``; the cost is
            ``1 − cosine(self.w, other.w)`` minimized by :func:`bipartite_match`. When this
            model has more factors than the reference, the unmatched ones follow in their
            original order; with fewer, factors are ordered by the reference factor they match.
            ``misc["alignment"]`` holds the permutation applied (indices into this model).

        Notes
        -----
        When both models have :attr:`feature_names` (models fitted on different gene sets or
        gene orders), W's rows are matched by name and the cosines are computed over the
        features the two models share; they may then have different numbers of features. With a
        bare matrix, or without names, rows are matched by position.
        """
        func = "NMFModel.align"
        ref_w = other.w if isinstance(other, NMFModel) else other
        try:
            ref_w = np.asarray(ref_w, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise param_error("other", func, "an NMFModel or a matrix", type(other).__name__) from e
        self_w = np.asarray(self.w, dtype=np.float64)
        mine = self.feature_names
        theirs = other.feature_names if isinstance(other, NMFModel) and ref_w.ndim == 2 else None
        if mine is not None and theirs is not None and mine != theirs:
            pos = _name_positions(theirs, mine, "the reference model", func)
            shared = np.flatnonzero(pos >= 0)
            if shared.size == 0:
                raise InputError(f"The models passed to {func} share no feature names (e.g. {mine[0]!r} here, "
                                 f"{theirs[0]!r} in the reference); they cannot be aligned by name.")
            self_w, ref_w = self_w[shared], ref_w[pos[shared]]
        if ref_w.ndim != 2 or ref_w.shape[0] != self_w.shape[0]:
            raise param_error("other", func, f"an NMFModel or matrix with {self.w.shape[0]} rows (features)",
                              f"shape {ref_w.shape}")
        if not np.all(np.isfinite(ref_w)):
            raise param_error("other", func, "a finite W", "a W with NaN or Inf")
        match = bipartite_match(1.0 - cosine(self_w, ref_w))
        # self factor matched to each reference factor, in reference order; then leftovers.
        matched_self = match.rows[np.argsort(match.cols, kind="stable")]
        rest = np.setdiff1d(np.arange(self.k), matched_self)
        order = np.concatenate([matched_self, rest]).astype(np.int64)
        out = self.subset(order)
        out.misc["alignment"] = order
        return out

    def top_features(self, n: int = 10, by: str = "weight"):
        """The ``n`` top features of every factor, as a tidy table.

        Parameters
        ----------
        n : int, default 10
            Features per factor (all m when ``n > m``).
        by : {"weight", "specificity"}, default "weight"
            Rank features by their weight in the factor, or by their specificity to it.

        Returns
        -------
        pandas.DataFrame
            ``k · min(n, m)`` rows, factor by factor, with columns

            * ``factor`` — 0-based factor index;
            * ``rank`` — 1 for the top feature of the factor;
            * ``feature`` — the feature's name (:attr:`feature_names`), or its row index when
              the model has no names;
            * ``weight`` — the feature's share of the factor: ``W · diag(d)`` with every
              column scaled to sum to 1 (as RcppML's L1-normalized W);
            * ``specificity`` — the feature's weight in this factor as a z-score across the k
              factors (cNMF's gene-spectra score): ``(x_if − mean_f' x_if') / sd_f' x_if'``
              for the weights x of feature i, with the population sd; 0 for a feature whose
              weights are equal in all factors (e.g. all zero, or k = 1).

        Notes
        -----
        Ties are broken by row order (stable sort). Weight ranks what a factor is made of;
        specificity ranks what sets it apart from the others (a housekeeping gene can top every
        factor by weight but none by specificity).

        Examples
        --------
        >>> import numpy as np
        >>> from dnmf.models import NMFModel
        >>> w = np.array([[0.7, 0.1], [0.2, 0.1], [0.1, 0.8]])
        >>> model = NMFModel(w=w, d=np.array([2.0, 1.0]), h=np.ones((2, 3)) / 3,
        ...                  misc={"row_names": ("CD3E", "ACTB", "MS4A1")})
        >>> model.top_features(n=2)
           factor  rank feature  weight  specificity
        0       0     1    CD3E     0.7          1.0
        1       0     2    ACTB     0.2          1.0
        2       1     1   MS4A1     0.8          1.0
        3       1     2    CD3E     0.1         -1.0
        >>> model.top_features(n=1, by="specificity").feature.tolist()
        ['CD3E', 'MS4A1']
        """
        import pandas as pd

        func = "NMFModel.top_features"
        if not isinstance(n, numbers.Integral) or isinstance(n, (bool, np.bool_)) or n < 1:
            raise param_error("n", func, "an int in [1, inf)", n)
        by = check_option(by, "by", func, ("weight", "specificity"))
        m, _, k = self.shape
        weight = np.asarray(self.w, dtype=np.float64) * np.asarray(self.d, dtype=np.float64)[None, :]
        totals = weight.sum(axis=0)
        weight = weight / np.where(totals > 0, totals, 1.0)[None, :]
        mean = weight.mean(axis=1, keepdims=True)
        sd = weight.std(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            specificity = np.where(sd > 0, (weight - mean) / np.where(sd > 0, sd, 1.0), 0.0)
        score = weight if by == "weight" else specificity
        n_top = min(int(n), m)
        top = np.argsort(-score, axis=0, kind="stable")[:n_top].T  # k × n_top row indices
        names = self.feature_names
        rows = top.ravel()
        factors = np.repeat(np.arange(k), n_top)
        return pd.DataFrame({
            "factor": factors,
            "rank": np.tile(np.arange(1, n_top + 1), k),
            "feature": [names[i] for i in rows] if names is not None else rows,
            "weight": weight[rows, factors],
            "specificity": specificity[rows, factors],
        })

    # -- data-facing helpers -----------------------------------------------------------------

    def _blocked(self, A: Any, name: str, func: str, n_rows: int, n_cols: int | None = None):
        from .io import as_blocked

        blocked = as_blocked(A)
        m, n = blocked.shape
        if m != n_rows or (n_cols is not None and n != n_cols):
            want = f"({n_rows}, {n_cols})" if n_cols is not None else f"({n_rows}, n)"
            raise param_error(name, func, f"data of shape {want} (features × samples)", f"shape {(m, n)}")
        return blocked

    def _blocked_by_name(self, A: Any, func: str, w: np.ndarray):
        """(blocked A, W's rows laid out on A's features): matched by name when both have names.

        Without names, A must have W's m rows and W is returned as is. With names, row r of the
        returned matrix is W's row for A's feature r (zeros for features W does not know), so
        ``Wᵀa`` over the model's features, with the model's missing features as zeros, is
        ``returnedᵀ a``.
        """
        from .io import as_blocked

        names = self.feature_names
        if names is None:
            return self._blocked(A, "A", func, w.shape[0]), w
        blocked = as_blocked(A)
        data_names = _names(blocked.row_names, blocked.shape[0])
        if data_names is None or data_names == names:
            if blocked.shape[0] != w.shape[0]:
                raise param_error("A", func, f"data of shape ({w.shape[0]}, n) (features × samples)",
                                  f"shape {blocked.shape}")
            return blocked, w
        pos = _name_positions(data_names, names, "A", func)
        found = pos >= 0
        n_found = int(np.count_nonzero(found))
        if n_found == 0:
            raise InputError(f"None of the {blocked.shape[0]} feature names of the data A passed to {func} is a "
                             f"feature of the model (e.g. {data_names[0]!r} in A, {names[0]!r} in the model); "
                             f"A must be features × samples with the model's feature names.")
        if n_found < len(names):
            missing = [names[i] for i in np.flatnonzero(~found)[:3]]
            warnings.warn(f"{len(names) - n_found} of the model's {len(names)} features are missing from the data A "
                          f"passed to {func} (e.g. {', '.join(map(repr, missing))}) and are treated as zero.",
                          UserWarning, stacklevel=3)
        extra = blocked.shape[0] - n_found
        if extra:
            logger.info("%s: ignoring %d feature(s) of A the model does not have", func, extra)
        w_data = np.zeros((blocked.shape[0], w.shape[1]))
        w_data[pos[found]] = w[found]
        return blocked, w_data

    def evaluate(self, A: Any, loss: str = "mse", mask: Any = None, missing_only: bool = False,
                 robust: Any = False, **loss_params: Any) -> float:
        """Mean loss of the model on data A (RcppML ``evaluate``; spec §10.6).

        Parameters
        ----------
        A : array-like of shape (m, n)
            Data the model was fit to (features × samples); anything :func:`dnmf.io.as_blocked`
            accepts. Read block by block: a sparse A is never densified.
        loss : {"mse", "kl", "gp", "nb", "gamma", "inverse_gaussian", "tweedie"}, default "mse"
            A loss of :data:`dnmf.losses.LOSSES` (spec §6.1): ``"mse"``: ``(a − μ)²``; ``"kl"``:
            ``a log(a/μ) − a + μ`` (μ floored at 1e-10 where a > 0; μ where a = 0), the Poisson
            deviance / 2, RcppML ``loss="gp", dispersion="none"``; the others are the negative
            log-likelihoods (gp, nb, without ``log a!``) or unit deviances (gamma, inverse
            Gaussian, Tweedie) documented in :mod:`dnmf.losses`.
        mask : None, "zeros" or matrix of shape (m, n), optional
            Entries to treat as missing: ``"zeros"`` — the zero entries of A; a matrix — its
            non-zero entries (dense or scipy.sparse).
        missing_only : bool, default False
            Evaluate only the masked entries instead of the unmasked ones.
        robust : bool, float or "mae", default False
            Report instead the Huber loss (δ) of the Pearson residual ``(a − μ)/√V(μ)`` of the
            loss (spec §6.1): True → δ = 1.345, ``"mae"`` → δ = 1e-4, a positive number → δ.
            Its zeros are summed over μ formed in chunks (no closed form).
        **loss_params
            Distribution parameters of the loss: ``theta`` (gp, default 0.1), ``size`` (nb,
            default 10), ``phi`` (gamma, inverse_gaussian, tweedie; default 1), ``power``
            (tweedie, default 1.5). A float, or an array of shape (m, 1) (per feature), (1, n)
            (per sample) or (m, n).

        Returns
        -------
        float
            The loss averaged over the evaluated entries, in float64 — a **mean**, whereas
            ``misc["loss"]`` of a fit is a sum of squared errors.

        Notes
        -----
        For sparse blocks only stored entries are read: ``Σ_all ℓ(a, μ) = Σ_stored ℓ(a, μ) +
        (Σ_all ℓ(0, μ) − Σ_stored ℓ(0, μ))``. The total ``Σ_all ℓ(0, μ)`` is in closed form for
        mse (``tr((Wd)ᵀWd · HHᵀ)``), kl (``1ᵀWd·H1``) and gp (the same over 1+θ); for nb and
        Tweedie with p < 2 it is summed over μ formed in bounded chunks (m·n·k work, A still not
        densified). The zero-entry part is a sum of non-negative terms, clamped at 0 against
        rounding. Gamma, inverse Gaussian and Tweedie with p ≥ 2 have no zeros in their support:
        their mean is over the non-zero entries of A (dense and sparse alike; RcppML reports
        sparse non-MSE losses over the non-zeros too).
        """
        func = "NMFModel.evaluate"
        loss = check_option(loss, "loss", func, LOSSES)
        spec = LOSSES[loss]
        delta = robust_delta(robust, func)
        if not isinstance(missing_only, (bool, np.bool_)):
            raise param_error("missing_only", func, "a bool", missing_only)
        m, n, _ = self.shape
        params = _check_loss_params(spec.params(func, **loss_params), m, n, func)
        if delta is not None:
            spec = robust_loss(spec, delta)
        if isinstance(mask, str):
            check_option(mask, "mask", func, ("zeros",))
        elif missing_only and mask is None:
            raise param_error("missing_only", func, "False when no mask is given", missing_only)
        blocked = self._blocked(A, "A", func, m, n)
        pattern = None if mask is None or isinstance(mask, str) else _mask_pattern(mask, (m, n), func)
        mask_zeros = isinstance(mask, str)
        zeros_in = bool(spec.zero_in_support(**params))

        wd = np.asarray(self.w, dtype=np.float64) * np.asarray(self.d, dtype=np.float64)[None, :]
        h = np.asarray(self.h, dtype=np.float64)
        bounds = blocked.col_bounds
        total = 0.0  # over all evaluated entries (every entry, or the non-zeros when 0 is outside the support)
        n_all = 0  # their number
        part = 0.0  # over the "special" set: non-zeros (mask="zeros") or masked entries (matrix mask)
        count = 0  # size of the special set
        for j, block in enumerate(blocked.iter_blocks()):
            c0, c1 = int(bounds[j]), int(bounds[j + 1])
            _check_block_values(block, func, allow_negative=loss == "mse", col0=c0)
            hj = h[:, c0:c1]
            pj = _params_cols(params, c0, c1, n)
            positions = None
            if pattern is not None:
                mj = pattern[:, c0:c1]
                positions = _csc_positions(mj.indptr, mj.indices)
            terms = self._dense_block_terms if isinstance(block, np.ndarray) else self._sparse_block_terms
            t, na, p, c = terms(block, wd, hj, spec, pj, zeros_in, mask_zeros, positions)
            total += t
            n_all += na
            part += p
            count += c
        if mask is None:
            value, denom = total, n_all
        elif mask_zeros:
            # the special set is the non-zeros: they are the *unmasked* entries
            value, denom = (max(total - part, 0.0), n_all - count) if missing_only else (part, count)
        else:
            value, denom = (part, count) if missing_only else (max(total - part, 0.0), n_all - count)
        if denom == 0:
            raise param_error("mask", func, "a mask that leaves entries to evaluate",
                              "a mask that selects no entries" if missing_only else "a mask covering every entry")
        return float(value / denom)

    @staticmethod
    def _dense_block_terms(block, wd, hj, spec: Loss, params: dict, zeros_in: bool, mask_zeros: bool,
                           positions):
        """(Σ ℓ over the evaluated entries, their number, Σ ℓ over the special set, its size) of a dense block."""
        y_all = np.asarray(block, dtype=np.float64)
        m, nj = y_all.shape
        step = max(1, _CHUNK_ENTRIES // max(m, 1))
        total = part = 0.0
        n_all = count = 0
        if positions is not None:
            m_rows, m_cols = positions
        for s in range(0, nj, step):
            e = min(s + step, nj)
            y = y_all[:, s:e]
            nz = y != 0
            ell = spec.value(y, wd @ hj[:, s:e], **_params_cols(params, s, e, nj))
            if not zeros_in:
                ell = np.where(nz, ell, 0.0)
            total += float(ell.sum())
            n_all += y.size if zeros_in else int(nz.sum())
            if mask_zeros:
                part += float(ell[nz].sum())
                count += int(nz.sum())
            elif positions is not None:
                sel = (m_cols >= s) & (m_cols < e)
                r, c = m_rows[sel], m_cols[sel] - s
                part += float(ell[r, c].sum())
                count += int(sel.sum()) if zeros_in else int(nz[r, c].sum())
        return total, n_all, part, count

    @staticmethod
    def _sparse_block_terms(block, wd, hj, spec: Loss, params: dict, zeros_in: bool, mask_zeros: bool,
                            positions):
        """As ``_dense_block_terms`` for a CSC block, reading its stored entries only."""
        data = np.asarray(block.data, dtype=np.float64)
        m, nj = block.n_rows, hj.shape[1]
        rows, cols = _csc_positions(block.indptr, block.indices)
        ht = np.ascontiguousarray(hj.T)
        mu = _fitted_at(wd, ht, rows, cols)
        p_at = _params_at(params, rows, cols)
        nz = data != 0
        stored = spec.value(data, mu, **p_at)
        if zeros_in:
            stored_zero = float(spec.value(np.zeros_like(mu), mu, **p_at).sum())
            if spec.zero_total is not None:
                all_zero = spec.zero_total(wd, hj, **params)
            else:  # no closed form: ℓ(0, μ) over every entry, μ formed chunk by chunk
                step = max(1, _CHUNK_ENTRIES // max(m, 1))
                all_zero = 0.0
                for s in range(0, nj, step):
                    e = min(s + step, nj)
                    mu_c = wd @ hj[:, s:e]
                    all_zero += float(spec.value(np.zeros_like(mu_c), mu_c, **_params_cols(params, s, e, nj)).sum())
            total = float(stored.sum()) + max(all_zero - stored_zero, 0.0)
            n_all = m * nj
        else:
            total = float(stored[nz].sum())
            n_all = int(nz.sum())
        part = 0.0
        count = 0
        if mask_zeros:
            part = float(stored[nz].sum())
            count = int(nz.sum())
        elif positions is not None:
            m_rows, m_cols = positions
            y = _sparse_values_at(data, block.indices, block.indptr, m, m_rows, m_cols)
            ell = spec.value(y, _fitted_at(wd, ht, m_rows, m_cols), **_params_at(params, m_rows, m_cols))
            keep = np.ones(y.shape, bool) if zeros_in else y != 0
            part = float(ell[keep].sum())
            count = int(keep.sum())
        return total, n_all, part, count

    def predict(self, A: Any, L1: float | None = None, L2: float | None = None,
                nonneg: bool | None = None, mask: Any = None) -> np.ndarray:
        """Project new samples onto W: H for data A with W fixed (RcppML ``predict``; §10.1).

        Parameters
        ----------
        A : array-like of shape (m, n_new)
            New samples as columns (features × samples); anything :func:`dnmf.io.as_blocked`
            accepts, read block by block. Checked like the data of :func:`dnmf.nmf`: finite,
            non-negative, with as many rows as W (else :class:`~dnmf.exceptions.InputError`).
        L1, L2 : float, optional
            Lasso / ridge penalties of the projection; default: the model's H-side values
            (``misc["L1"][1]``, ``misc["L2"][1]``), 0 when unknown.
        nonneg : bool, optional
            Non-negativity of H; default: the model's H-side value, True when unknown.
        mask : None, "zeros" or matrix of shape (m, n_new), optional
            Missing entries of A, as in :func:`dnmf.nmf`: each column's problem leaves its masked
            rows out of both the right-hand side and the Gram (the fit's masked column pass,
            ``kernels/masked.py``). ``"zeros"``: only the stored entries are observed.

        Returns
        -------
        ndarray of shape (k, n_new), or (n_new, k) for an AnnData A
            Each column solves ``min_{h≥0} ‖a_j − W h‖² + L2‖h‖²`` with RHS ``Wᵀa_j − L1``
            exactly (active-set NNLS). ``d`` is **not** applied: W has unit-norm columns and h
            absorbs the scale, so ``A ≈ W @ H`` — on the training data H ≈ ``diag(d) @ model.h``.
            float32 data gives float32 output, anything else float64. For an AnnData A (cells ×
            genes) the result is transposed to cells × k, the layout of ``obsm["X_nmf"]``
            (``adata.obsm["X_nmf"] = model.predict(adata)``); every other input gives k × n_new,
            as RcppML's ``predict``.

        Notes
        -----
        When the model has :attr:`feature_names` and A has feature names too (an AnnData's
        ``var_names``, a DataFrame's index, a 10x file's features), A's features are matched to
        W's by name: features of A the model does not know are ignored, and the model's features
        missing from A are treated as zero (with a warning giving their number). No shared name
        at all is an error. Otherwise A must have W's features, in W's order.
        """
        from .kernels.nnls import SOLVER_EXACT
        from .solvers.hstep import h_step, solve_dense_columns

        func = "NMFModel.predict"
        misc_l1 = self.misc.get("L1", (0.0, 0.0))
        misc_l2 = self.misc.get("L2", (0.0, 0.0))
        misc_nonneg = self.misc.get("nonneg", (True, True))
        L1 = check_float(float(misc_l1[1]) if L1 is None else L1, "L1", func, low=0.0, high=1.0, high_open=True)
        L2 = check_float(float(misc_l2[1]) if L2 is None else L2, "L2", func, low=0.0)
        nonneg = check_bool_pair(bool(misc_nonneg[1]) if nonneg is None else nonneg, "nonneg", func)[0]
        m, _, k = self.shape
        w = np.ascontiguousarray(self.w, dtype=np.float64)
        blocked, w_data = self._blocked_by_name(A, func, w)
        # the H step of the fit with W fixed: exact NNLS (maxit/tol are the coordinate-descent
        # knobs and are unused by this solver), cold start, the fit's column step
        hs = h_step(w, l1=L1, l2=L2, solver=SOLVER_EXACT, nonneg=nonneg)
        bounds = blocked.col_bounds
        out = np.empty((k, blocked.shape[1]))
        if isinstance(mask, str):
            check_option(mask, "mask", func, ("zeros",))
        pattern = None if mask is None or isinstance(mask, str) else _mask_pattern(mask, blocked.shape, func)
        for j, block in enumerate(blocked.iter_blocks()):
            c0, c1 = int(bounds[j]), int(bounds[j + 1])
            # the same data check as the fit: nmf rejects negative data whatever ``nonneg`` is
            _check_block_values(block, func, allow_negative=False, why="(as in nmf)", col0=c0)
            if mask is not None:
                out[:, c0:c1] = _masked_predict_block(block, w_data, hs, L2, mask == "zeros" if isinstance(mask, str)
                                                      else False, None if pattern is None else pattern[:, c0:c1])
                continue
            if isinstance(block, np.ndarray):
                a = np.asarray(block, dtype=np.float64)
                B = np.ascontiguousarray(w_data.T @ a)
            else:
                a = block.to_scipy()
                B = np.ascontiguousarray((a.T @ w_data).T, dtype=np.float64)
            ht, _, _ = solve_dense_columns(B, hs, np.zeros((B.shape[1], k)), False)
            out[:, c0:c1] = ht.T
        if np.dtype(blocked.dtype) == np.float32:
            out = out.astype(np.float32)
        if _is_anndata(A):
            return np.ascontiguousarray(out.T)  # cells × k, like obsm
        return out
