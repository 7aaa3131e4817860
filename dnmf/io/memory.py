"""In-memory inputs as column-blocked matrices, and the blocking policies of the data layer.

:func:`from_memory` turns an in-memory matrix (NumPy, ``scipy.sparse``, pydata ``sparse``, Dask
arrays) and :func:`from_anndata` an AnnData object into an m × n (features × samples)
:class:`~dnmf.io.blocks.BlockedMatrix` cut into column blocks whose sizes are balanced by stored
entries (nnz). :func:`dnmf.io.as_blocked`, the entry point of the data layer, calls them, and so
do the Zarr readers for what they hold in memory. This module imports only ``blocks`` and
``validate``, so every other I/O module can build on it (no import cycle).

Conventions applied to every input
----------------------------------
* Values are float32 or float64: integer and boolean data become float64, float16 becomes
  float32, float32 and float64 stay as they are; ``dtype=`` overrides.
* Sparse blocks are :class:`~dnmf.io.blocks.CSCBlock` triplets in canonical form (row indices
  sorted within each column, duplicates summed; explicit zeros may remain). Row indices are
  int32 unless the matrix has 2**31 or more stored entries (then int64, see
  :func:`index_dtype`); ``indptr`` is always int64.
* Sparse structure is checked on the caller's arrays before SciPy converts them (SciPy's C++
  conversions, like our kernels, trust the indices): an index out of range, a decreasing or
  mis-sized ``indptr`` or COO coordinates outside the shape raise InputError
  (:func:`dnmf.io.validate.check_compressed`, :func:`~dnmf.io.validate.check_coo`). Sparse
  chunks of a Dask array are checked chunk by chunk, before Dask stacks them.
  Unsorted and duplicate indices are valid input: they are sorted and summed, on a copy.
* A pandas DataFrame is features × samples, like any array; its index and columns become
  ``row_names`` and ``col_names`` (unless they are a default ``RangeIndex``).
* AnnData is cells × genes; it is transposed to genes × cells, with ``row_names`` taken from
  ``var_names`` and ``col_names`` from ``obs_names``. A CSR ``.X`` *is* a CSC genes × cells
  matrix, so no data is copied for it.

Block balancing
---------------
Column c, holding ``nnz_c`` entries, belongs to block ``floor((N_c + nnz_c / 2) / block_nnz)``
where ``N_c`` is the number of entries stored before column c: every column goes to the block
in which its "centre of mass" falls. Blocks are therefore consecutive column ranges of about
``block_nnz`` entries each (off by at most one column's entries), every block holds at least
one column, and the rule depends only on prefix sums, so a stream of blocks can be re-balanced
on the fly (:func:`rebalance_blocks`) with exactly the result of balancing the whole matrix.
Dense matrices use a fixed width of ``max(1, round(block_nnz / m))`` columns per block, which
keeps Zarr chunks of dense stores regular.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator

import numpy as np

from .._validation import param_error
from ..exceptions import InputError
from .blocks import Block, BlockedMatrix, CSCBlock, InMemorySource
from .validate import check_compressed, check_coo

__all__ = [
    "from_memory",
    "from_anndata",
    "index_dtype",
    "column_block_bounds",
    "dense_block_width",
    "rebalance_blocks",
]

_FUNC = "as_blocked"
_INT32_LIMIT = 2**31


# ---------------------------------------------------------------------------------------------
# Small policies
# ---------------------------------------------------------------------------------------------


def index_dtype(nnz: int, n_rows: int = 0) -> np.dtype:
    """The dtype of row indices for a matrix with ``nnz`` stored entries and ``n_rows`` rows.

    int32 halves the memory traffic of the sparse kernels; int64 is used once the entry count
    (or the row count) no longer fits in a signed 32-bit integer.
    """
    if int(nnz) >= _INT32_LIMIT or int(n_rows) >= _INT32_LIMIT:
        return np.dtype(np.int64)
    return np.dtype(np.int32)


def dense_block_width(n_rows: int, block_nnz: int) -> int:
    """Columns per dense block: the width whose m·n_j is nearest to ``block_nnz`` (at least 1)."""
    return max(1, int(round(block_nnz / max(int(n_rows), 1))))


def _block_labels(col_nnz: np.ndarray, offset: int, block_nnz: int) -> np.ndarray:
    """Block label of each column: ``floor((N_c + nnz_c / 2) / block_nnz)`` in exact integers.

    ``offset`` is the number of entries stored before the first column of ``col_nnz``.
    """
    col_nnz = np.asarray(col_nnz, dtype=np.int64)
    before = offset + np.cumsum(col_nnz) - col_nnz
    return (2 * before + col_nnz) // (2 * int(block_nnz))


def column_block_bounds(col_nnz: np.ndarray, block_nnz: int) -> np.ndarray:
    """Column boundaries of nnz-balanced blocks.

    Parameters
    ----------
    col_nnz : array of shape (n,)
        Stored entries per column.
    block_nnz : int
        Target entries per block.

    Returns
    -------
    ndarray of shape (n_blocks + 1,), int64
        Block j covers columns ``bounds[j]:bounds[j + 1]``; ``bounds[0] = 0``, ``bounds[-1] = n``.
    """
    col_nnz = np.asarray(col_nnz, dtype=np.int64)
    n = len(col_nnz)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    labels = _block_labels(col_nnz, 0, block_nnz)
    starts = np.flatnonzero(np.diff(labels)) + 1
    return np.concatenate([[0], starts, [n]]).astype(np.int64)


def _dense_bounds(n_rows: int, n_cols: int, block_nnz: int) -> np.ndarray:
    width = dense_block_width(n_rows, block_nnz)
    return np.append(np.arange(0, n_cols, width, dtype=np.int64), np.int64(n_cols))


def _value_dtype(dt: np.dtype, dtype: Any) -> np.dtype:
    """The float dtype the values of an input of dtype ``dt`` are stored in."""
    dt = np.dtype(dt)
    if dt.kind not in "iubf":
        raise InputError(
            f"The data A passed to {_FUNC} must hold real numbers (int, uint, bool or float); "
            f"got dtype {dt} instead."
        )
    if dtype is not None:
        return _check_dtype_param(dtype)
    if dt == np.float32 or dt == np.float64:
        return dt
    if dt == np.float16:
        return np.dtype(np.float32)
    return np.dtype(np.float64)  # integers, bool, long double


def _check_dtype_param(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise param_error("dtype", _FUNC, "None, float32 or float64", dtype)
    return dt


def _check_shape(shape: tuple, what: str = "A") -> tuple[int, int]:
    if len(shape) != 2:
        raise InputError(
            f"The data {what} passed to {_FUNC} must be a 2-D matrix (features × samples); "
            f"got a {len(shape)}-D array of shape {tuple(shape)} instead."
        )
    m, n = (int(s) for s in shape)
    if m == 0 or n == 0:
        raise InputError(
            f"The data {what} passed to {_FUNC} must have at least one row and one column; "
            f"got shape ({m}, {n}) instead."
        )
    return m, n


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def _csc_block(data, indices, indptr, n_rows: int, dtype: np.dtype, idx_dtype: np.dtype) -> CSCBlock:
    """A CSCBlock with the requested dtypes (views when no conversion is needed)."""
    indptr = np.asarray(indptr, dtype=np.int64)
    if indptr[0] != 0:
        indptr = indptr - indptr[0]
    return CSCBlock(
        data=np.asarray(data, dtype=dtype),
        indices=np.asarray(indices, dtype=idx_dtype),
        indptr=indptr,
        n_rows=int(n_rows),
    )


def _slice_csc(block: CSCBlock, c0: int, c1: int) -> CSCBlock:
    """Columns ``c0:c1`` of a CSC block (views of its arrays)."""
    lo, hi = int(block.indptr[c0]), int(block.indptr[c1])
    return CSCBlock(block.data[lo:hi], block.indices[lo:hi], block.indptr[c0 : c1 + 1] - lo, block.n_rows)


def _hstack_csc(pieces: list[CSCBlock]) -> CSCBlock:
    """Concatenate CSC blocks side by side (the pieces are returned as is when there is one)."""
    if len(pieces) == 1:
        return pieces[0]
    offsets = np.cumsum([0] + [p.nnz for p in pieces[:-1]])
    indptr = np.concatenate([pieces[0].indptr[:1]] + [p.indptr[1:] + off for p, off in zip(pieces, offsets)])
    return CSCBlock(
        data=np.concatenate([p.data for p in pieces]),
        indices=np.concatenate([p.indices for p in pieces]),
        indptr=indptr.astype(np.int64),
        n_rows=pieces[0].n_rows,
    )


def _dense_block(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A dense block as a contiguous float array; a contiguous slice of the right dtype is kept."""
    if a.dtype == dtype and (a.flags.c_contiguous or a.flags.f_contiguous):
        return a
    return np.ascontiguousarray(a, dtype=dtype)


def rebalance_blocks(blocks: Iterable[Block], n_rows: int, block_nnz: int, *, sparse: bool) -> Iterator[Block]:
    """Re-cut a stream of column blocks into nnz-balanced blocks, holding one output block at a time.

    The output is the same as balancing the whole matrix at once (see the module notes), so a
    matrix that is already balanced for ``block_nnz`` passes through unchanged.

    Parameters
    ----------
    blocks : iterable of CSCBlock or ndarray
        Consecutive column blocks of an m × n matrix (all sparse or all dense).
    n_rows : int
        m.
    block_nnz : int
        Target stored entries per output block.
    sparse : bool
        Whether the blocks are CSCBlocks.

    Yields
    ------
    CSCBlock or ndarray
        Consecutive output blocks covering the same columns.
    """
    pending: list = []
    pending_label = None
    offset = 0  # entries (sparse) or columns (dense) before the current input block
    width = dense_block_width(n_rows, block_nnz)
    for block in blocks:
        n_j = block.shape[1]
        if n_j == 0:
            continue
        if sparse:
            labels = _block_labels(np.diff(block.indptr), offset, block_nnz)
            offset += block.nnz
        else:
            labels = (offset + np.arange(n_j, dtype=np.int64)) // width
            offset += n_j
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(labels)) + 1, [n_j]])
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            label = labels[c0]
            piece = _slice_csc(block, c0, c1) if sparse else block[:, c0:c1]
            if label != pending_label and pending:
                yield _hstack_csc(pending) if sparse else np.hstack(pending)
                pending = []
            pending.append(piece)
            pending_label = label
    if pending:
        yield _hstack_csc(pending) if sparse else np.hstack(pending)


def _canonical_csc(x, dtype: np.dtype):
    """``x`` (any scipy.sparse matrix or array) as a canonical ``csc_array`` of ``dtype``.

    The caller's matrix is never modified: sorting and summing duplicates work on a copy.
    """
    import scipy.sparse as sp

    csc = sp.csc_array(x)  # shares arrays with x when x is already CSC
    if csc.dtype != dtype:
        csc = csc.astype(dtype)
    if not csc.has_canonical_format:
        csc = csc.copy()  # its arrays may be (views of) the caller's
        csc.sum_duplicates()  # sorts indices too
    return csc


def _blocked_from_csc(csc, block_nnz: int, names=(None, None)) -> BlockedMatrix:
    m, n = _check_shape(csc.shape)
    idx = index_dtype(csc.nnz, m)
    bounds = column_block_bounds(np.diff(csc.indptr), block_nnz)
    whole = _csc_block(csc.data, csc.indices, csc.indptr, m, csc.dtype, idx)
    sources = tuple(InMemorySource(_slice_csc(whole, c0, c1)) for c0, c1 in zip(bounds[:-1], bounds[1:]))
    return BlockedMatrix(
        shape=(m, n), dtype=np.dtype(csc.dtype), sources=sources, sparse=True, in_memory=True,
        row_names=names[0], col_names=names[1],
    )


def _blocked_from_dense(a: np.ndarray, block_nnz: int, dtype: Any, names=(None, None)) -> BlockedMatrix:
    m, n = _check_shape(a.shape)
    dt = _value_dtype(a.dtype, dtype)
    bounds = _dense_bounds(m, n, block_nnz)
    sources = tuple(InMemorySource(_dense_block(a[:, c0:c1], dt)) for c0, c1 in zip(bounds[:-1], bounds[1:]))
    return BlockedMatrix(
        shape=(m, n), dtype=dt, sources=sources, sparse=False, in_memory=True,
        row_names=names[0], col_names=names[1],
    )


# ---------------------------------------------------------------------------------------------
# In-memory inputs
# ---------------------------------------------------------------------------------------------


def _is_scipy_sparse(x) -> bool:
    sp = sys.modules.get("scipy.sparse")
    return sp is not None and sp.issparse(x)


def _is_pydata_sparse(x) -> bool:
    pkg = sys.modules.get("sparse")
    return pkg is not None and isinstance(x, getattr(pkg, "SparseArray", ()))


def _is_dask_array(x) -> bool:
    da = sys.modules.get("dask.array")
    return da is not None and isinstance(x, da.Array)


def _is_data_frame(x) -> bool:
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(x, pd.DataFrame)


def _frame_names(frame) -> tuple:
    """(row_names, col_names) of a features × samples DataFrame: its index and columns as str,
    each None when it is a default RangeIndex (no names)."""
    import pandas as pd

    def names(index):
        return None if isinstance(index, pd.RangeIndex) else tuple(str(x) for x in index)

    return names(frame.index), names(frame.columns)


def _is_anndata(x) -> bool:
    ad = sys.modules.get("anndata")
    return ad is not None and isinstance(x, ad.AnnData)


_SPARSE_WHAT = f"The sparse data A passed to {_FUNC}"


def _check_scipy_structure(x, what: str = _SPARSE_WHAT) -> None:
    """Check the index arrays of a scipy.sparse matrix or array before SciPy converts it.

    SciPy re-checks them only on construction: arrays changed in place (or built with
    ``check=False``) reach its C++ conversions, which trust them. Formats without index arrays
    (DIA, LIL, DOK) are converted by NumPy/Python code and need no check here.
    """
    fmt = x.format
    if fmt in ("csr", "csc"):
        check_compressed(x.indptr, x.indices, x.data, x.shape, fmt=fmt, what=what)
    elif fmt == "coo":
        coords = getattr(x, "coords", None) or (x.row, x.col)
        if len(coords) != 2:
            _check_shape(x.shape)
        check_coo(coords[0], coords[1], x.data, x.shape, what=what)
    elif fmt == "bsr":
        r, c = (int(b) for b in x.blocksize)
        m, n = (int(d) for d in x.shape)
        if r < 1 or c < 1 or m % r or n % c or np.ndim(x.data) != 3:
            raise InputError(f"{what} is not a valid BSR matrix of shape ({m}, {n}): its blocks of {r} × {c} "
                             f"must tile the matrix and its data must be a 3-D array of blocks.")
        check_compressed(x.indptr, x.indices, x.data[:, 0, 0], (m // r, n // c), fmt="csr",
                         what=f"{what} (its grid of {r} × {c} blocks)")


def _check_pydata_structure(x, what: str = _SPARSE_WHAT) -> None:
    """Check the coordinates (COO) or index arrays (2-D GCXS) of a pydata sparse array."""
    coords = getattr(x, "coords", None)
    if coords is not None:
        coords = np.asarray(coords)
        if coords.ndim != 2 or coords.shape[0] != 2:
            raise InputError(f"{what} is not a valid COO array of shape {tuple(x.shape)}: its coords must "
                             f"be a 2 × nnz array; got shape {coords.shape} instead.")
        check_coo(coords[0], coords[1], x.data, x.shape, what=what)
    elif hasattr(x, "indptr") and hasattr(x, "compressed_axes"):
        fmt = "csr" if tuple(x.compressed_axes) == (0,) else "csc"
        check_compressed(x.indptr, x.indices, x.data, x.shape, fmt=fmt, what=what)


def _checked_chunk(chunk):
    """A chunk of a Dask array, returned after its sparse structure is checked.

    Mapped over the chunks before anything is computed, so a malformed chunk is rejected before
    Dask stacks chunks together (SciPy's stacking trusts the index arrays too).
    """
    what = f"A chunk of the dask array A passed to {_FUNC}"
    if _is_scipy_sparse(chunk):
        _check_scipy_structure(chunk, what=what)
    elif _is_pydata_sparse(chunk) and chunk.ndim == 2:
        _check_pydata_structure(chunk, what=what)
    return chunk


def _pydata_to_scipy(x):
    if x.ndim != 2:
        _check_shape(x.shape)
    if not x.fill_value == 0:
        raise InputError(
            f"The data A passed to {_FUNC} must be a pydata sparse array with fill value 0; "
            f"got fill value {x.fill_value!r} instead."
        )
    _check_pydata_structure(x)
    try:
        return x.to_scipy_sparse()
    except (ValueError, IndexError) as e:
        raise InputError(f"{_SPARSE_WHAT} could not be converted to a scipy.sparse matrix: {e}") from e


def _to_canonical_csc(x, dtype: np.dtype):
    """:func:`_canonical_csc` of a caller's matrix, after checking its structure."""
    _check_scipy_structure(x)
    try:
        return _canonical_csc(x, dtype)
    except (ValueError, IndexError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{_SPARSE_WHAT} could not be converted to CSC: {e}") from e


def _from_scipy(x, block_nnz: int, dtype: Any, names=(None, None)) -> BlockedMatrix:
    _check_shape(x.shape)
    dt = _value_dtype(x.dtype, dtype)
    return _blocked_from_csc(_to_canonical_csc(x, dt), block_nnz, names)


def _part_to_block(part, dtype: np.dtype, sparse: bool, idx: np.dtype) -> Block:
    """One computed column range of a Dask array as a block."""
    if _is_pydata_sparse(part):
        part = _pydata_to_scipy(part)
    if sparse:
        if not _is_scipy_sparse(part):
            import scipy.sparse as sp

            part = sp.csc_array(np.asarray(part))
        csc = _to_canonical_csc(part, dtype)
        return _csc_block(csc.data, csc.indices, csc.indptr, csc.shape[0], dtype, idx)
    if _is_scipy_sparse(part):
        part = part.toarray()
    return _dense_block(np.asarray(part), dtype)


def _from_dask(x, block_nnz: int, dtype: Any, names=(None, None)) -> BlockedMatrix:
    """A Dask array, computed one column chunk at a time (or whole when it fits one block)."""
    m, n = _check_shape(x.shape)
    dt = _value_dtype(x.dtype, dtype)
    meta = getattr(x, "_meta", None)
    sparse = _is_scipy_sparse(meta) or _is_pydata_sparse(meta)
    x = x.map_blocks(_checked_chunk, dtype=x.dtype, meta=meta)
    if m * n <= block_nnz:
        whole = x.compute()
        if _is_pydata_sparse(whole):
            whole = _pydata_to_scipy(whole)
        if _is_scipy_sparse(whole):
            return _from_scipy(whole, block_nnz, dtype, names)
        return _blocked_from_dense(np.asarray(whole), block_nnz, dtype, names)
    # The exact nnz is unknown before computing; int32 row indices are safe unless the dense
    # size itself could exceed 2**31 entries.
    idx = index_dtype(m * n if sparse else 0, m)
    col_chunks = np.cumsum((0,) + tuple(x.chunks[1]))

    def parts():
        for c0, c1 in zip(col_chunks[:-1], col_chunks[1:]):
            yield _part_to_block(x[:, int(c0) : int(c1)].compute(), dt, sparse, idx)

    blocks = list(rebalance_blocks(parts(), m, block_nnz, sparse=sparse))
    return BlockedMatrix(
        shape=(m, n), dtype=dt, sources=tuple(InMemorySource(b) for b in blocks), sparse=sparse,
        in_memory=True, row_names=names[0], col_names=names[1],
    )


def from_anndata(adata, block_nnz: int, layer: str | None, dtype: Any) -> BlockedMatrix:
    """AnnData (cells × genes) as genes × cells, named by var_names × obs_names."""
    if layer is None:
        x = adata.X
        if x is None:
            raise InputError(f"The AnnData passed to {_FUNC} has no .X; pass layer= to use one of its layers.")
    else:
        layers = list(adata.layers.keys())
        if not isinstance(layer, str) or layer not in layers:
            options = ", ".join(repr(k) for k in layers) or "(it has no layers)"
            raise param_error("layer", _FUNC, f"None or a layer of the AnnData: {options}", layer)
        x = adata.layers[layer]
    if hasattr(x, "to_memory"):  # backed sparse datasets
        x = x.to_memory()
    elif type(x).__module__.startswith("h5py"):
        x = x[()]
    names = (tuple(str(v) for v in adata.var_names), tuple(str(o) for o in adata.obs_names))
    if _is_scipy_sparse(x):
        _check_scipy_structure(x, what=f"The AnnData {'.X' if layer is None else f'layer {layer!r}'} passed to {_FUNC}")
    return from_memory(x.T, block_nnz, dtype, names)


def from_memory(A, block_nnz: int, dtype: Any, names=(None, None)) -> BlockedMatrix:
    """An in-memory matrix (not a path, not AnnData) as a :class:`BlockedMatrix`.

    Parameters
    ----------
    A : numpy array or array-like, scipy.sparse matrix or array, pydata sparse array or dask array
        Shape (m, n), features × samples.
    block_nnz : int
        Target stored entries per column block.
    dtype : {None, float32, float64}
        Value dtype (see the module notes).
    names : (row_names, col_names)
        Optional names, kept on the result.

    Raises
    ------
    InputError
        Not 2-D, empty, non-numeric, an unsupported type, or a sparse matrix whose index arrays
        are broken (see the module notes).
    """
    if _is_scipy_sparse(A):
        return _from_scipy(A, block_nnz, dtype, names)
    if _is_pydata_sparse(A):
        _check_shape(A.shape)
        return _from_scipy(_pydata_to_scipy(A), block_nnz, dtype, names)
    if _is_dask_array(A):
        return _from_dask(A, block_nnz, dtype, names)
    if isinstance(A, np.ndarray) or hasattr(A, "__array__") or isinstance(A, (list, tuple)):
        if names == (None, None) and _is_data_frame(A):
            names = _frame_names(A)
        try:
            a = np.asarray(A)
        except (TypeError, ValueError) as e:
            raise InputError(f"The data A passed to {_FUNC} could not be read as a numeric array: {e}") from e
        if a.dtype == object:
            raise InputError(
                f"The data A passed to {_FUNC} must hold real numbers; got an array of dtype object "
                f"(mixed or non-numeric values) instead."
            )
        _check_shape(a.shape)
        return _blocked_from_dense(a, block_nnz, dtype, names)
    raise InputError(
        f"The data A passed to {_FUNC} must be a numpy array, a scipy.sparse matrix or array, a pydata "
        f"sparse array, a dask array, an AnnData, a BlockedMatrix or a path (.zarr, .h5ad, .mtx, .mtx.gz, "
        f".npz, .npy); got {type(A).__module__}.{type(A).__qualname__} instead."
    )
