"""HDF5 inputs read lazily with h5py: AnnData ``.h5ad`` files (and the 10x ``.h5`` files of
:mod:`dnmf.io.tenx`), one column block at a time.

A column block of A (features × samples) is a contiguous range of samples. Both on-disk layouts
store samples contiguously:

* an ``.h5ad`` file's ``X`` (cells × genes) in CSR is genes × cells in CSC: a range of cells is
  a slice of ``indptr`` and the matching slice of ``data`` and ``indices``;
* a 10x ``.h5`` file stores genes × cells in CSC directly;
* a dense ``X`` (a 2-D dataset, cells × genes) gives a block as a slice of its rows, transposed.

So a block is read with one hyperslab read per array, and a file larger than memory streams:
:class:`H5SparseSource` and :class:`H5DenseSource` hold only the path, the names of the arrays
and the slice, and open the file inside :meth:`load` (on the worker), read, and close it.
Each sparse block's structure is checked as it is loaded (:func:`dnmf.io.validate.check_compressed`),
like the blocks of a Zarr store.

An ``.h5ad`` file whose matrix is CSC on disk (cells × genes CSC = genes × cells CSR: no column
access without a transpose) is read whole, as before. Names come from the ``obs``/``var``
dataframes of AnnData's on-disk format: the group attribute ``_index`` names the index column.
Anything this module does not recognize (legacy files, unknown encodings) is read by
``anndata.read_h5ad``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._validation import param_error
from ..exceptions import InputError
from .blocks import BlockedMatrix, CSCBlock, _StoredCSCRange
from .memory import (
    _canonical_csc,
    _check_shape,
    _dense_bounds,
    _dense_block,
    _from_scipy,
    _value_dtype,
    column_block_bounds,
    index_dtype,
)
from .validate import check_compressed, check_indptr, parse_error

__all__ = ["H5SparseSource", "H5DenseSource", "read_h5ad", "h5_sparse_blocked", "h5_strings", "H5_ERRORS"]

_FUNC = "as_blocked"

#: What h5py raises on a truncated, corrupt or changed file.
H5_ERRORS = (OSError, KeyError, ValueError, TypeError)


def _open(path: str):
    import h5py

    return h5py.File(path, "r")


# ---------------------------------------------------------------------------------------------
# Lazy block sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class H5SparseSource(_StoredCSCRange):
    """Columns ``col_start:col_stop`` of a CSC matrix stored in an HDF5 group, read on every :meth:`load`.

    Small and picklable (a path, array names and integers): the engine ships it to a worker,
    which opens the file, reads the block and closes the file.

    Attributes
    ----------
    path : str
        Absolute path of the HDF5 file.
    group : str
        Path of the group holding ``data``, ``indices`` and ``indptr``.
    col_start, col_stop : int
        The block's columns (positions in ``indptr``).
    entry_start, entry_stop : int
        The block's entries in ``data`` and ``indices`` (``indptr[col_start]``, ``indptr[col_stop]``).
    n_rows : int
        m, the rows of the block returned.
    dtype : str or None
        Cast values to this dtype on load (None: keep the stored dtype).
    index_dtype : str
        dtype of the row indices returned.
    row_map : ndarray of int64 or None
        For a subset of the stored rows (10x feature types): the new row of each stored row, -1
        for rows left out. None keeps every row.
    """

    path: str
    group: str
    col_start: int
    col_stop: int
    entry_start: int
    entry_stop: int
    n_rows: int
    dtype: str | None = None
    index_dtype: str = "int32"
    row_map: np.ndarray | None = field(default=None, compare=False, repr=False)

    def load(self) -> CSCBlock:
        """Read the block: a canonical :class:`CSCBlock` of shape (n_rows, n_cols), indptr from 0.

        The structure is checked before anything indexes with it: the block's ``indptr`` against
        the entries recorded when the file was opened, and its row indices against the stored
        row count.
        """
        what = f"The HDF5 file {self.path!r} (block of columns {self.col_start}:{self.col_stop})"
        try:
            with _open(self.path) as f:
                g = f[self.group]
                indptr = np.asarray(g["indptr"][self.col_start : self.col_stop + 1], dtype=np.int64)
                data = g["data"][self.entry_start : self.entry_stop]
                indices = g["indices"][self.entry_start : self.entry_stop]
        except H5_ERRORS as e:
            raise InputError(f"{what} could not be read: {type(e).__name__}: {e}. Check the file is complete "
                             f"and was not changed after it was opened.") from e
        if len(indptr) != self.n_cols + 1 or int(indptr[0]) != self.entry_start or int(indptr[-1]) != self.entry_stop:
            raise InputError(f"The HDF5 file {self.path!r} changed after it was opened: block of columns "
                             f"{self.col_start}:{self.col_stop} no longer holds entries "
                             f"{self.entry_start}:{self.entry_stop}.")
        indptr -= indptr[0]
        n_stored = self.n_rows if self.row_map is None else len(self.row_map)
        check_compressed(indptr, indices, data, (n_stored, self.n_cols), fmt="csc", what=what, col0=self.col_start)
        if self.dtype is not None:
            data = data.astype(self.dtype, copy=False)
        if self.row_map is not None:
            new = self.row_map[indices]
            keep = new >= 0
            indptr = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])[indptr]  # kept entries before each
            data, indices = data[keep], new[keep]
        import scipy.sparse as sp

        csc = sp.csc_array((data, indices, indptr), shape=(self.n_rows, self.n_cols))
        csc = _canonical_csc(csc, data.dtype)  # a no-op view when already sorted and unique
        return CSCBlock(data=csc.data, indices=csc.indices.astype(self.index_dtype, copy=False),
                        indptr=csc.indptr.astype(np.int64, copy=False), n_rows=self.n_rows)


@dataclass(frozen=True)
class H5DenseSource:
    """Rows ``row_start:row_stop`` of a dense 2-D HDF5 dataset (samples × features), as the
    features × samples block of columns ``row_start:row_stop`` of A, read on every :meth:`load`.

    Attributes
    ----------
    path : str
        Absolute path of the HDF5 file.
    dataset : str
        Path of the dataset.
    row_start, row_stop : int
        The samples of the block (rows of the dataset).
    n_rows : int
        m, the features (columns of the dataset).
    dtype : str
        Value dtype of the block returned.
    """

    path: str
    dataset: str
    row_start: int
    row_stop: int
    n_rows: int
    dtype: str = "float64"

    @property
    def n_cols(self) -> int:
        return self.row_stop - self.row_start

    @property
    def nnz(self) -> int:
        return self.n_rows * self.n_cols

    def load(self) -> np.ndarray:
        """Read the block: a float array of shape (n_rows, n_cols) (the transpose of the rows read)."""
        try:
            with _open(self.path) as f:
                rows = f[self.dataset][self.row_start : self.row_stop]
        except H5_ERRORS as e:
            raise InputError(f"The HDF5 file {self.path!r} (rows {self.row_start}:{self.row_stop} of "
                             f"{self.dataset!r}) could not be read: {type(e).__name__}: {e}. Check the file is "
                             f"complete and was not changed after it was opened.") from e
        return _dense_block(np.asarray(rows).T, np.dtype(self.dtype))


def _sizeof_source(src) -> int:
    # A path and a few integers (plus the row map of a feature subset); the block is read where
    # it is loaded.
    row_map = getattr(src, "row_map", None)
    return 200 + len(src.path) + (0 if row_map is None else int(row_map.nbytes))


# dask's sizeof (its default calls sys.getsizeof, which calls __sizeof__; io/blocks.py::CSCBlock)
H5SparseSource.__sizeof__ = H5DenseSource.__sizeof__ = _sizeof_source


# ---------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------


def h5_strings(node) -> tuple[str, ...] | None:
    """The strings of an HDF5 string dataset or AnnData categorical group, or None."""
    import h5py

    if isinstance(node, h5py.Dataset) and node.ndim == 1:
        if node.dtype.kind in "SO" or h5py.check_string_dtype(node.dtype) is not None:
            return tuple(str(x) for x in node.asstr()[()])
        return tuple(str(x) for x in node[()])
    if isinstance(node, h5py.Group) and {"categories", "codes"} <= set(node.keys()):
        categories = h5_strings(node["categories"])
        codes = np.asarray(node["codes"][()], dtype=np.int64)
        if categories is None or (codes.size and (codes.min() < 0 or codes.max() >= len(categories))):
            return None  # missing values in an index: not names
        return tuple(categories[c] for c in codes)
    return None


def h5_sparse_blocked(path: str, g, group: str, shape: tuple[int, int], block_nnz: int, dtype: Any,
                      *, names=(None, None), row_map: np.ndarray | None = None) -> BlockedMatrix:
    """A lazy BlockedMatrix over the CSC (features × samples) arrays of the HDF5 group ``g``.

    Only ``indptr`` is read here (one integer per sample); ``shape`` is the stored (m, n). With
    ``row_map`` the result keeps the stored rows ``row_map >= 0``, renumbered.
    """
    m, n = _check_shape(shape)
    what = f"The HDF5 file {path!r} ('{group}')"
    indptr = np.asarray(g["indptr"][()])
    check_indptr(indptr, g["indices"].shape[0], g["data"].shape[0], (m, n), fmt="csc", what=what)
    indptr = indptr.astype(np.int64, copy=False)
    stored = np.dtype(g["data"].dtype)
    dt = _value_dtype(stored, dtype)
    m_out = m if row_map is None else int(np.count_nonzero(row_map >= 0))
    bounds = column_block_bounds(np.diff(indptr), block_nnz)
    idx = str(index_dtype(int(indptr[-1]), m_out))
    sources = tuple(
        H5SparseSource(path=path, group=group, col_start=int(c0), col_stop=int(c1), entry_start=int(indptr[c0]),
                       entry_stop=int(indptr[c1]), n_rows=m_out, dtype=None if dt == stored else str(dt),
                       index_dtype=idx, row_map=row_map)
        for c0, c1 in zip(bounds[:-1], bounds[1:])
    )
    return BlockedMatrix(shape=(m_out, n), dtype=dt, sources=sources, sparse=True, in_memory=False,
                         row_names=names[0], col_names=names[1])


def _dataframe_index(f, key: str) -> tuple[str, ...] | None:
    """The index of the AnnData dataframe ``key`` ("obs" or "var"), or None if not readable."""
    import h5py

    node = f.get(key)
    if not isinstance(node, h5py.Group):
        return None
    column = node.attrs.get("_index")
    if isinstance(column, bytes):
        column = column.decode()
    if not isinstance(column, str) or column not in node:
        return None
    return h5_strings(node[column])


class _Fallback(Exception):
    """The file is valid AnnData this module does not read itself: use anndata."""


def _encoding(node) -> str | None:
    """AnnData's ``encoding-type``, or the ``h5sparse_format`` of files written by anndata < 0.7."""
    enc = node.attrs.get("encoding-type")
    if enc is None:
        legacy = node.attrs.get("h5sparse_format")
        legacy = legacy.decode() if isinstance(legacy, bytes) else legacy
        enc = {"csr": "csr_matrix", "csc": "csc_matrix"}.get(legacy)
    return enc.decode() if isinstance(enc, bytes) else enc


def _sparse_shape(node) -> tuple[int, ...]:
    shape = node.attrs.get("shape")
    if shape is None:
        shape = node.attrs.get("h5sparse_shape", ())
    return tuple(int(s) for s in shape)


def _open_h5ad(path: str, f, block_nnz: int, layer, dtype) -> BlockedMatrix:
    import h5py
    import scipy.sparse as sp

    if layer is None:
        key = "X"
        if key not in f:
            raise InputError(f"The AnnData passed to {_FUNC} has no .X; pass layer= to use one of its layers.")
    else:
        layers = list(f["layers"].keys()) if isinstance(f.get("layers"), h5py.Group) else []
        if not isinstance(layer, str) or layer not in layers:
            options = ", ".join(repr(k) for k in layers) or "(it has no layers)"
            raise param_error("layer", _FUNC, f"None or a layer of the AnnData: {options}", layer)
        key = f"layers/{layer}"
    node = f[key]
    var, obs = _dataframe_index(f, "var"), _dataframe_index(f, "obs")
    if var is None or obs is None:
        raise _Fallback
    enc = _encoding(node)
    if isinstance(node, h5py.Group) and enc in ("csr_matrix", "csc_matrix") and \
            {"data", "indices", "indptr"} <= set(node.keys()):
        shape = _sparse_shape(node)
        if len(shape) != 2 or shape != (len(obs), len(var)):
            raise _Fallback
        n_cells, n_genes = shape
        if enc == "csr_matrix":  # cells × genes CSR = genes × cells CSC: lazy
            return h5_sparse_blocked(path, node, key, (n_genes, n_cells), block_nnz, dtype, names=(var, obs))
        data, indices, indptr = node["data"][()], node["indices"][()], node["indptr"][()]
        what = f"The AnnData {'.X' if layer is None else f'layer {layer!r}'} in {path!r} passed to {_FUNC}"
        check_compressed(indptr, indices, data, shape, fmt="csc", what=what)
        x = sp.csc_array((data, indices, indptr), shape=shape)
        return _from_scipy(x.T, block_nnz, dtype, (var, obs))
    if isinstance(node, h5py.Dataset) and node.ndim == 2 and node.dtype.kind in "iubf":
        if tuple(node.shape) != (len(obs), len(var)):
            raise _Fallback
        m, n = _check_shape((node.shape[1], node.shape[0]))
        dt = _value_dtype(node.dtype, dtype)
        bounds = _dense_bounds(m, n, block_nnz)
        sources = tuple(H5DenseSource(path=path, dataset=key, row_start=int(c0), row_stop=int(c1), n_rows=m,
                                      dtype=str(dt))
                        for c0, c1 in zip(bounds[:-1], bounds[1:]))
        return BlockedMatrix(shape=(m, n), dtype=dt, sources=sources, sparse=False, in_memory=False,
                             row_names=var, col_names=obs)
    raise _Fallback


def read_h5ad(path: str, *, block_nnz: int, layer: str | None = None, dtype: Any = None,
              fallback=None) -> BlockedMatrix:
    """Open an AnnData ``.h5ad`` file as genes × cells, lazily when its matrix is CSR or dense.

    Parameters
    ----------
    path : str
        The file.
    block_nnz : int
        Target stored entries per column block.
    layer : str, optional
        ``layers/<layer>`` instead of ``X``.
    dtype : {None, float32, float64}
        Value dtype (see :func:`dnmf.io.as_blocked`).
    fallback : callable, optional
        ``fallback()`` reads the file in memory (with anndata) when its layout is not one this
        module reads (legacy dataframes, other encodings). Without it, such a file is an error.

    Returns
    -------
    BlockedMatrix
        Named by ``var`` (rows) and ``obs`` (columns); ``in_memory`` False for a lazy matrix.

    Raises
    ------
    InputError
        The file cannot be opened as HDF5, its sparse structure is broken, the layer does not
        exist.
    """
    shown, path = path, os.path.abspath(path)
    try:
        f = _open(path)
    except H5_ERRORS as e:
        raise parse_error(shown, "an AnnData .h5ad file", e) from e
    try:
        with f:
            return _open_h5ad(path, f, block_nnz, layer, dtype)
    except InputError:
        raise
    except H5_ERRORS as e:
        raise parse_error(shown, "an AnnData .h5ad file", e) from e
    except _Fallback:
        if fallback is None:
            raise InputError(f"The .h5ad file {path!r} has a layout dnmf does not read lazily; read it with "
                             f"anndata.read_h5ad and pass the AnnData.") from None
        return fallback()
