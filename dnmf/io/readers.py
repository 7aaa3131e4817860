"""Turn any supported input into a :class:`~dnmf.io.blocks.BlockedMatrix`.

:func:`as_blocked` is the single entry point of the data layer. It accepts in-memory matrices
(NumPy, ``scipy.sparse``, pydata ``sparse``, Dask arrays), AnnData objects and paths to files
or stores, and returns an m × n (features × samples) matrix cut into column blocks whose sizes
are balanced by stored entries (nnz), ready for the engine. In-memory inputs and the blocking
rule are in :mod:`dnmf.io.memory`, Zarr stores in :mod:`dnmf.io.zarr_store`; this module adds
the file readers.

Imports go one way: ``blocks`` ← ``validate`` ← ``memory`` ← ``zarr_store`` ← ``hdf5`` ←
``tenx`` ← ``readers`` ← ``writers``.

File readers
------------
Each reader parses its file inside one ``try``: a truncated or corrupt file (and a file whose
content does not match its suffix) raises :class:`~dnmf.exceptions.InputError` naming the file
and the expected format, chained to the parser's error. ``.npz``/``.npy`` files are read with
``allow_pickle=False``, always. Reading ``.h5ad`` files needs ``anndata``.

``.h5ad`` files whose matrix is CSR or dense, and 10x Genomics ``.h5`` files, are opened lazily
with h5py (:mod:`dnmf.io.hdf5`, :mod:`dnmf.io.tenx`): their blocks are read on every ``load()``,
so they stream like Zarr stores when they do not fit in memory. Other ``.h5ad`` layouts are read
with ``anndata.read_h5ad``.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Any

import numpy as np

from .._validation import check_int, param_error
from ..exceptions import InputError
from .blocks import BlockedMatrix
from .memory import (
    _check_dtype_param,
    _is_anndata,
    column_block_bounds,
    dense_block_width,
    from_anndata,
    from_memory,
    index_dtype,
    rebalance_blocks,
)
from .hdf5 import H5_ERRORS, read_h5ad
from .tenx import is_10x_folder, read_10x
from .validate import parse_error as _parse_error
from .zarr_store import read_zarr

__all__ = [
    "as_blocked",
    "peek_shape",
    "index_dtype",
    "column_block_bounds",
    "dense_block_width",
    "rebalance_blocks",
    "READERS",
]

_FUNC = "as_blocked"


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


#: What a parser raises on a truncated, corrupt or mistyped file (InputError, also a ValueError,
#: is never raised inside a parse step).
_PARSE_ERRORS = (ValueError, EOFError, OSError, KeyError, IndexError, zipfile.BadZipFile, zlib.error)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


def _from_file(path: str, convert, *args) -> BlockedMatrix:
    """``convert(*args)`` on the matrix read from ``path``; its data errors also name the file."""
    try:
        return convert(*args)
    except InputError as e:
        if hasattr(e, "parameter"):  # a parameter error (layer=...) is not about the file's content
            raise
        raise InputError(f"{e} A was read from {path!r}.") from e


def _starts_with(path: str, magics) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return any(head.startswith(m) for m in magics)


def _read_mtx(path: str, block_nnz: int, layer, dtype) -> BlockedMatrix:
    import scipy.io

    kind = "a MatrixMarket file" + (" (gzip-compressed)" if path.lower().endswith(".gz") else "")
    try:
        matrix = scipy.io.mmread(path)
    except _PARSE_ERRORS as e:
        raise _parse_error(path, kind, e) from e
    return _from_file(path, from_memory, matrix, block_nnz, dtype)


def _read_npz(path: str, block_nnz: int, layer, dtype) -> BlockedMatrix:
    import scipy.sparse as sp

    kind = "a .npz sparse matrix (scipy.sparse.save_npz format) or single array (numpy.savez)"
    if not _starts_with(path, _ZIP_MAGIC):
        raise _parse_error(path, kind, "it is not a zip archive, which every .npz file is")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if "format" in keys and {"data", "shape"} <= set(keys):
                matrix = sp.load_npz(path)
            elif len(keys) == 1:
                matrix = f[keys[0]]
            else:
                matrix = None
    except _PARSE_ERRORS as e:
        raise _parse_error(path, kind, e) from e
    if matrix is None:
        raise InputError(
            f"The .npz file {path!r} passed to {_FUNC} must hold a scipy.sparse matrix (save_npz) or a "
            f"single array; it holds the arrays {', '.join(map(repr, keys))}."
        )
    return _from_file(path, from_memory, matrix, block_nnz, dtype)


def _read_npy(path: str, block_nnz: int, layer, dtype) -> BlockedMatrix:
    kind = "a .npy array (numpy.save format)"
    if not _starts_with(path, (_NPY_MAGIC,)):
        raise _parse_error(path, kind, "it does not start with the .npy header")
    try:
        matrix = np.load(path, allow_pickle=False)
    except _PARSE_ERRORS as e:
        raise _parse_error(path, kind, e) from e
    return _from_file(path, from_memory, matrix, block_nnz, dtype)


def _read_h5ad(path: str, block_nnz: int, layer, dtype) -> BlockedMatrix:
    try:
        import anndata
    except ImportError as e:
        raise InputError("Reading .h5ad files needs the 'anndata' package: pip install anndata") from e

    def in_memory() -> BlockedMatrix:
        try:
            adata = anndata.read_h5ad(path)
        except _PARSE_ERRORS + (TypeError,) as e:
            raise _parse_error(path, "an AnnData .h5ad file", e) from e
        return _from_file(path, from_anndata, adata, block_nnz, layer, dtype)

    return read_h5ad(path, block_nnz=block_nnz, layer=layer, dtype=dtype, fallback=in_memory)


def _read_h5(path: str, block_nnz: int, layer, dtype) -> BlockedMatrix:
    """A 10x Genomics .h5 file, or an AnnData file named .h5."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            encoding = f.attrs.get("encoding-type")
    except H5_ERRORS as e:
        raise _parse_error(path, "an HDF5 file (10x Genomics .h5 or AnnData)", e) from e
    if encoding in ("anndata", b"anndata"):
        return _read_h5ad(path, block_nnz, layer, dtype)
    if layer is not None:
        raise param_error("layer", _FUNC, "None for a non-AnnData input", layer)
    return read_10x(path, block_nnz=block_nnz, dtype=dtype)


def _read_10x_folder(path: str, block_nnz: int, layer, dtype) -> BlockedMatrix:
    return read_10x(path, block_nnz=block_nnz, dtype=dtype)


def _read_zarr(path: str, block_nnz: int, layer, dtype) -> BlockedMatrix:
    return read_zarr(path, block_nnz=block_nnz, layer=layer, dtype=dtype)


#: File readers by suffix (lower case). A directory is a 10x Genomics matrix folder when it holds
#: matrix.mtx[.gz], else a Zarr store whatever its name.
READERS = {
    ".mtx": _read_mtx,
    ".mtx.gz": _read_mtx,
    ".npz": _read_npz,
    ".npy": _read_npy,
    ".h5ad": _read_h5ad,
    ".h5": _read_h5,
    ".zarr": _read_zarr,
}


def _reader_for(path: str):
    if os.path.isdir(path):
        return _read_10x_folder if is_10x_folder(path) else _read_zarr
    lower = path.lower()
    for suffix in sorted(READERS, key=len, reverse=True):
        if lower.endswith(suffix):
            return READERS[suffix]
    raise InputError(
        f"The path A passed to {_FUNC} must name a file of a known type "
        f"({', '.join(sorted(READERS))}) or a Zarr store; got {path!r} instead."
    )


def _from_path(path, block_nnz: int, layer, dtype) -> BlockedMatrix:
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise InputError(f"The path A passed to {_FUNC} does not exist: {path!r}.")
    reader = _reader_for(path)
    if layer is not None and reader not in (_read_h5ad, _read_h5, _read_zarr):
        raise param_error("layer", _FUNC, "None for a non-AnnData input", layer)
    return reader(path, block_nnz, layer, dtype)


def peek_shape(path, layer: str | None = None) -> tuple[int, int] | None:
    """(m, n) = (features, samples) of a file or store without reading its values.

    ``.zarr`` (dense array, sparse group, AnnData store): metadata; ``.h5ad``: h5py attributes
    (cells × genes, transposed); ``.mtx``: the header; ``.npz``: the ``shape`` entry (or the
    array header); ``.npy``: the header. ``None`` when the shape cannot be known this cheaply
    (a path that does not exist or of an unknown type; 10x inputs, whose feature count depends
    on ``gex_only``).
    Raises ``OSError`` / ``ValueError`` / ``KeyError`` when the file cannot be read at all.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        return None
    try:
        reader = _reader_for(path)
    except InputError:  # not a matrix type dnmf reads: unknown here, as_blocked names the problem
        return None
    if reader is _read_zarr:
        return _zarr_shape(path, layer)
    if reader is _read_h5ad:
        return _h5ad_shape(path, layer)
    if reader is _read_mtx:
        import scipy.io

        rows, cols = scipy.io.mminfo(path)[:2]
        return (int(rows), int(cols))
    if reader is _read_npz:
        with np.load(path, allow_pickle=False) as f:
            if "shape" in f.files and "format" in f.files:
                return _matrix_shape(f["shape"])
            if len(f.files) == 1:
                with f.zip.open(f"{f.files[0]}.npy") as member:
                    return _matrix_shape(_npy_header_shape(member))
        return None
    if reader is _read_npy:
        with open(path, "rb") as fh:
            return _matrix_shape(_npy_header_shape(fh))
    return None


def _matrix_shape(shape) -> tuple[int, int] | None:
    shape = tuple(int(s) for s in shape)
    return shape if len(shape) == 2 else None


def _npy_header_shape(fh) -> tuple:
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(fh)[0]


def _h5ad_shape(path: str, layer: str | None) -> tuple[int, int] | None:
    import h5py

    with h5py.File(path, "r") as f:
        node = f.get("X") if layer is None else f.get("layers", {}).get(layer)
        if node is None:
            return None
        shape = node.shape if isinstance(node, h5py.Dataset) else node.attrs.get("shape")
        if shape is None:
            return None
        cells, genes = (int(s) for s in shape)
        return (genes, cells)  # AnnData is cells × genes; dnmf factorizes genes × cells


def _zarr_shape(path: str, layer: str | None) -> tuple[int, int] | None:
    import zarr

    node = zarr.open(path, mode="r")
    if isinstance(node, zarr.Array):
        return _matrix_shape(node.shape)
    attrs = dict(node.attrs)
    if attrs.get("encoding-type") == "anndata":
        try:
            x = node["X"] if layer is None else node["layers"][layer]
        except KeyError:
            return None
        shape = x.shape if isinstance(x, zarr.Array) else x.attrs.get("shape")
        if shape is None:
            return None
        cells, genes = (int(s) for s in shape)
        return (genes, cells)
    shape = attrs.get("shape") or attrs.get("h5sparse_shape")
    return _matrix_shape(shape) if shape is not None else None


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def as_blocked(A: Any, *, block_nnz: int = 1_000_000, layer: str | None = None, dtype: Any = None) -> BlockedMatrix:
    """Return ``A`` as a column-blocked matrix (features × samples).

    Parameters
    ----------
    A : array-like of shape (m, n), AnnData, BlockedMatrix or path
        * ``numpy.ndarray`` (2-D, numeric) or anything ``numpy.asarray`` turns into one;
        * ``scipy.sparse`` matrix or array (csr, csc, coo, ...);
        * pydata ``sparse`` array (COO, GCXS) with fill value 0;
        * ``dask.array.Array`` with dense or sparse chunks (computed one column chunk at a
          time, or whole when it fits in one block);
        * ``anndata.AnnData`` (cells × genes), transposed to genes × cells;
        * a :class:`BlockedMatrix`, returned unchanged;
        * a path (``str`` or ``os.PathLike``) to a Zarr store (our own stores from
          :func:`dnmf.io.write_zarr`, a dense array, an AnnData-style ``csr``/``csc`` group or an
          AnnData store), a ``.h5ad`` file (lazy when its matrix is CSR or dense), a 10x Genomics
          matrix folder or ``.h5`` file (gene symbols as row names, "Gene Expression" features
          only: see :func:`dnmf.io.read_10x` for the options; the ``.h5`` is lazy), a
          MatrixMarket ``.mtx``/``.mtx.gz`` file, a ``.npz`` file (``scipy.sparse.save_npz`` or
          a single array) or a ``.npy`` file.
    block_nnz : int, default 1_000_000
        Target stored entries per column block (dense blocks count all m·n_j entries). Stores
        written by :func:`dnmf.io.write_zarr` keep their stored blocking and ignore it.
    layer : str, optional
        AnnData layer to use instead of ``.X`` (AnnData objects, ``.h5ad`` files and AnnData
        Zarr stores only).
    dtype : {None, float32, float64}, optional
        Value dtype. By default float32 and float64 are kept and everything else becomes
        float64 (float16 becomes float32).

    Returns
    -------
    BlockedMatrix
        ``in_memory`` is False for lazy matrices (Zarr stores, ``.h5ad`` and 10x ``.h5`` files),
        whose blocks are read from disk on every ``load()``.

    Raises
    ------
    InputError
        For arrays that are not 2-D, have no rows or columns, hold non-numeric values, for
        unsupported types, missing paths, unknown layers and bad parameters; for sparse
        matrices whose index arrays are out of range or inconsistent (checked before any
        conversion); for truncated, corrupt or mistyped files and unreadable or incomplete
        Zarr stores (a missing chunk), naming the file or store.

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.io import as_blocked
    >>> A = as_blocked(np.ones((4, 6), dtype=np.int64), block_nnz=8)
    >>> A.shape, A.dtype, A.n_blocks, A.col_bounds.tolist()
    ((4, 6), dtype('float64'), 3, [0, 2, 4, 6])
    """
    if isinstance(A, BlockedMatrix):
        return A
    block_nnz = check_int(block_nnz, "block_nnz", _FUNC, low=1)
    if dtype is not None:
        _check_dtype_param(dtype)
    if isinstance(A, (str, bytes, os.PathLike)):
        return _from_path(A, block_nnz, layer, dtype)
    if _is_anndata(A):
        return from_anndata(A, block_nnz, layer, dtype)
    if layer is not None:
        raise param_error("layer", _FUNC, "None for a non-AnnData input", layer)
    return from_memory(A, block_nnz, dtype)
