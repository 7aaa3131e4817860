"""Column-blocked Zarr v3 stores: the out-of-core format of dnmf.

:func:`dnmf.io.write_zarr` (through :func:`write_blocked`) writes any input of
:func:`dnmf.io.as_blocked` one nnz-balanced column block at a time (a lazy
:class:`~dnmf.io.blocks.BlockedMatrix` is never materialized), and :func:`read_zarr` opens such
a store, or a Zarr matrix written by others, as a lazy matrix whose blocks are read from disk on
every ``load()``.

Sparse layout (``dnmf_format = "csc-blocked"``)
------------------------------------------------
A Zarr v3 group holding

``indptr`` : int64, shape (n + 1,)
    The CSC column pointer of the whole m × n matrix: column c has
    ``indptr[c + 1] - indptr[c]`` entries.
``block_bounds`` : int64, shape (n_blocks + 1,)
    Block j covers columns ``block_bounds[j]:block_bounds[j + 1]``.
``block_offsets`` : int64, shape (n_blocks,)
    Position of block j's first entry in ``data`` and ``indices``.
``data``, ``indices`` : 1-D, chunks of ``chunk_length`` entries
    Values and row indices. Block j's entries are
    ``data[block_offsets[j] : block_offsets[j] + nnz_j]`` (columns in order, rows sorted).
``row_names``, ``col_names`` : string, shape (m,) and (n,); optional
    Feature and sample names when the written matrix had them (an ``.h5ad``'s ``var_names`` and
    ``obs_names``, a DataFrame's labels); read back into :class:`BlockedMatrix` ``row_names`` /
    ``col_names``, so a fit from the store has names.

Every block's segment starts on a chunk boundary: the gap after a block, up to the next
multiple of ``chunk_length``, is padding (fill values, never referenced). So different blocks never
share a chunk, and writers of different blocks — threads, processes or Dask tasks — never
read-modify-write the same chunk (partial-chunk writes from two writers corrupt Zarr data).
We chose padding with plain chunks over sharding: Zarr's chunk grid is regular, so one shard per
block is impossible for blocks of unequal size, and padding to a whole shard would waste more
space than padding to a chunk. The chunk length is about an eighth of ``block_nnz`` (a power of
two between 256 and 2**22), which bounds the padding to ~1/8 of a block (~6 % on average)
before compression; in a compressed array the constant padding costs almost nothing (a raw one,
see :func:`resolve_compressors`, stores it).

Root attributes: ``{"dnmf_format": "csc-blocked", "version": 1, "shape": [m, n], "nnz": ...,
"chunk_length": ...}``; with ``"version": 2`` and ``"value_dtype": "float64"`` when float64 values
are stored in float32 (below; a reader of version 1 only refuses such a store rather than take it
for a float32 matrix).

Values. Float64 values that float32 holds exactly — counts, the usual single-cell and omics
data — are stored in float32 when the written matrix is in memory (every value checked, NaN
included, and a largest magnitude the fit does not rescale): half the bytes to read and decode
in every iteration of an out-of-core fit, and a third less memory for blocks held by workers. The
``value_dtype`` attribute says the matrix is float64: :func:`read_zarr` opens it as float64, and
its blocks load as float64 (``ZarrBlockSource.load``: what preprocessing, exports and every other
reader see), except in the ALS passes, which read the values as stored
(``ZarrBlockSource.load_stored``: streamed, or held by the workers) and form every product in
float64 from each value (exact). Fits are bitwise those of the float64 matrix
(``tests/test_float32_values.py``). Values that float32 would round, and lazy sources (not read
twice to check), stay float64.

Dense layout (``dnmf_format = "dense-blocked"``)
------------------------------------------------
A 2-D Zarr v3 array of shape (m, n) with chunks (m, w), ``w = max(1, round(block_nnz / m))``:
one chunk per column block. Attributes: ``{"dnmf_format": "dense-blocked", "version": 1,
"shape": [m, n], "block_cols": w}``, plus ``"row_names"`` / ``"col_names"`` (lists of str) when the
written matrix had names.

Missing chunks
--------------
Zarr reads a chunk whose file is missing as the array's fill value, so a store that lost a file
(an interrupted copy or sync) would give a plausible, wrong matrix. Stores written by dnmf are
protected twice, at no cost to a streaming read:

* Every chunk is written (``write_empty_chunks=True``), so a complete store has all of them.
  :func:`read_zarr` checks, when it opens a store, that every chunk of every data array
  (``data``, ``indices``, ``indptr``, ``block_bounds``, ``block_offsets``, or the dense array)
  exists (one ``stat`` per chunk file, no data read) and raises InputError naming the store,
  the array and a missing chunk, asking to re-run ``dnmf convert``.
* Fill values that valid data never holds: NaN for values, -1 for ``indices``, ``indptr``,
  ``block_bounds`` and ``block_offsets``. A chunk lost after the store was opened reads as
  NaN (rejected by :func:`dnmf.io.validate.check_data`) or -1 (rejected by the structure
  checks of every block load).

Checksums were not chosen: they would need a second read of every chunk, and a corrupted
(rather than missing) compressed chunk mostly fails to decompress already; a truncated raw chunk
has the wrong size, which the reader rejects.

Stores written by others: for a sparse group (``data``/``indices``/``indptr``, also the
``X`` or layer of an AnnData store) every chunk must exist too; a writer that skips chunks equal
to the fill value (Zarr 3's default ``write_empty_chunks=False``) can leave out an all-zero
chunk legitimately, which is rare in these arrays, and the error says how to re-write the
store. A dense array is checked only when its fill value is NaN: with fill value 0, a missing
chunk cannot be told from an all-zero one, and reads as zeros. The sparse structure
(``indptr`` when the store is opened, the indices of each block when it is loaded) is checked
for every store, ours or not.

Atomicity
---------
A store is written under a hidden temporary name beside ``path`` and renamed to ``path`` only
when complete, so an interrupted write never leaves a complete-looking store at ``path``.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validation import check_int, param_error
from ..exceptions import InputError
from .blocks import BlockedMatrix, CSCBlock, _StoredCSCRange
from .chunks import read_range
from .memory import (
    _canonical_csc,
    _check_dtype_param,
    _check_shape,
    _dense_block,
    _from_scipy,
    _value_dtype,
    column_block_bounds,
    dense_block_width,
    from_anndata,
    index_dtype,
    rebalance_blocks,
)
from .validate import check_compressed, check_indptr, data_scale

__all__ = ["read_zarr", "write_blocked", "chunk_length", "ZarrBlockSource", "ZarrDenseSource", "SPARSE_FORMAT",
           "DENSE_FORMAT"]

SPARSE_FORMAT = "csc-blocked"
DENSE_FORMAT = "dense-blocked"
FORMAT_VERSION = 1
#: Version of a sparse store whose float64 values are stored in float32 ("value_dtype", module
#: docstring, "Values"): a reader of version 1 only would take it for a float32 matrix, so it refuses it.
VALUE_DTYPE_VERSION = 2
_MIN_CHUNK = 256
_MAX_CHUNK = 2**22
#: Zarr 3 skips chunks equal to the fill value by default; ours are all written, so that a
#: missing chunk always means a lost file.
_EVERY_CHUNK = {"write_empty_chunks": True}


# ---------------------------------------------------------------------------------------------
# Lazy block sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZarrBlockSource(_StoredCSCRange):
    """Block j of a CSC matrix stored in Zarr, read from disk on every :meth:`load`.

    Small and picklable: the engine ships it to a worker, which reads the block itself.

    Attributes
    ----------
    path : str
        Absolute path of the Zarr store.
    j : int
        Block number.
    col_start, col_stop : int
        The block's columns in the whole matrix.
    entry_start, entry_stop : int
        The block's entries in the ``data`` and ``indices`` arrays.
    n_rows : int
        m.
    group : str
        Path of the group holding ``data``, ``indices`` and ``indptr`` inside the store
        ("" for the root).
    dtype : str or None
        Cast values to this dtype on load (None: keep the stored dtype).
    index_dtype : str
        dtype of the row indices returned.
    canonicalize : bool
        Sort row indices and sum duplicates on load (for stores not written by dnmf).
    """

    path: str
    j: int
    col_start: int
    col_stop: int
    entry_start: int
    entry_stop: int
    n_rows: int
    group: str = ""
    dtype: str | None = None
    index_dtype: str = "int32"
    canonicalize: bool = False

    def load_stored(self) -> CSCBlock:
        """:meth:`load`, except that float32 values are not widened to a float64 ``dtype`` (an
        exact cast; module docstring, "Values"): for the passes that form every product in
        float64 from each value (``engine/als.py``), half the value bytes to read, decode and hold."""
        return self.load(widen=False)

    def load(self, widen: bool = True) -> CSCBlock:
        """Read the block: a :class:`CSCBlock` of shape (n_rows, n_cols) with indptr from 0.

        The block's structure is checked before it is returned (before canonicalization, for
        foreign stores): its ``indptr`` against the entries recorded when the store was opened,
        and its row indices against ``n_rows`` (a min/max over the indices, a few per cent of
        the read itself), so no kernel ever sees an index outside the block.

        The three ranges are read by :func:`dnmf.io.chunks.read_range`: straight from the chunk
        files for stores in dnmf's own layouts (raw or Blosc chunks), by zarr otherwise.
        """
        member = f"{self.group.strip('/')}/" if self.group.strip("/") else ""
        indptr = np.asarray(read_range(self.path, member + "indptr", self.col_start, self.col_stop + 1),
                            dtype=np.int64)
        indptr = indptr - indptr[0]
        if int(indptr[-1]) != self.nnz:
            raise InputError(
                f"The Zarr store {self.path!r} changed after it was opened: block {self.j} "
                f"(columns {self.col_start}:{self.col_stop}) holds {int(indptr[-1])} entries, expected {self.nnz}."
            )
        data = read_range(self.path, member + "data", self.entry_start, self.entry_stop)
        indices = read_range(self.path, member + "indices", self.entry_start, self.entry_stop)
        check_compressed(indptr, indices, data, (self.n_rows, self.n_cols), fmt="csc",
                         what=f"The Zarr store {self.path!r} (block of columns {self.col_start}:{self.col_stop})",
                         col0=self.col_start)
        # widened before canonicalization, whose sums of duplicates must be float64 ones
        exact = data.dtype == np.float32 and self.dtype == "float64" and not self.canonicalize
        if self.dtype is not None and (widen or not exact):
            data = data.astype(self.dtype, copy=False)
        indices = indices.astype(self.index_dtype, copy=False)
        if self.canonicalize:
            import scipy.sparse as sp

            csc = _canonical_csc(sp.csc_array((data, indices, indptr), shape=(self.n_rows, self.n_cols)), data.dtype)
            data, indptr = csc.data, csc.indptr.astype(np.int64, copy=False)
            indices = csc.indices.astype(self.index_dtype, copy=False)
        return CSCBlock(data=data, indices=indices, indptr=indptr, n_rows=self.n_rows)


@dataclass(frozen=True)
class ZarrDenseSource:
    """Columns ``col_start:col_stop`` of a dense 2-D Zarr array, read on every :meth:`load`.

    Attributes
    ----------
    path : str
        Absolute path of the Zarr store.
    col_start, col_stop : int
        The block's columns.
    n_rows : int
        m.
    array : str
        Path of the array inside the store ("" for the root).
    dtype : str or None
        Cast values to this dtype on load (None: keep the stored dtype).
    """

    path: str
    col_start: int
    col_stop: int
    n_rows: int
    array: str = ""
    dtype: str | None = None

    @property
    def n_cols(self) -> int:
        return self.col_stop - self.col_start

    @property
    def nnz(self) -> int:
        return self.n_rows * self.n_cols

    def load(self) -> np.ndarray:
        """Read the block: a C-contiguous float array of shape (n_rows, n_cols)."""
        import zarr

        arr = zarr.open_array(self.path, mode="r", path=self.array or None)
        block = np.asarray(arr[:, self.col_start : self.col_stop])
        return _dense_block(block, np.dtype(self.dtype or block.dtype))


def _sizeof_source(src) -> int:
    # A source holds a path and a few integers; its block is read where it is loaded.
    return 200 + len(src.path)


# dask's sizeof (its default calls sys.getsizeof, which calls __sizeof__; io/blocks.py::CSCBlock)
ZarrBlockSource.__sizeof__ = ZarrDenseSource.__sizeof__ = _sizeof_source


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _sparse_attrs(attrs: dict) -> tuple[str, tuple[int, int]] | None:
    """("csr" | "csc", shape) for an AnnData/h5sparse-style sparse group, else None."""
    fmt = attrs.get("encoding-type") or attrs.get("format") or attrs.get("h5sparse_format")
    shape = attrs.get("shape") or attrs.get("h5sparse_shape")
    fmt = {"csr_matrix": "csr", "csc_matrix": "csc"}.get(fmt, fmt)
    if fmt in ("csr", "csc") and shape is not None and len(shape) == 2:
        return fmt, (int(shape[0]), int(shape[1]))
    return None


def _missing_chunks(arr) -> tuple[int, int, str | None]:
    """(missing, expected, first missing key) of the stored objects (chunks or shards) of ``arr``.

    On a local store each expected object is looked up with one ``stat`` (zarr's own
    ``nchunks_initialized`` compares key lists in quadratic time); on other stores zarr's count
    is used and no key is named.
    """
    if arr.size == 0:
        return 0, 0, None
    per_object = arr.shards or arr.chunks
    grid = [-(-int(size) // int(c)) for size, c in zip(arr.shape, per_object)]
    expected = math.prod(grid)
    root = getattr(arr.store_path.store, "root", None)
    if root is None:
        per_shard = math.prod(-(-int(s) // int(c)) for s, c in zip(per_object, arr.chunks)) if arr.shards else 1
        return expected - int(arr.nchunks_initialized) // per_shard, expected, None
    base = os.path.join(os.fspath(root), arr.store_path.path)
    missing, first = 0, None
    for coords in itertools.product(*(range(g) for g in grid)):
        key = arr.metadata.encode_chunk_key(coords)
        if not os.path.exists(os.path.join(base, key)):
            missing += 1
            first = first or key
    return missing, expected, first


def _check_chunks(path: str, arr, name: str | None, *, own: bool) -> None:
    """Raise InputError if a stored chunk of the data array ``name`` of the store is missing.

    ``name`` is the array's path in the store (None for a store that is one array). Zarr reads
    a missing chunk as the array's fill value, so a store that lost a file would otherwise give
    a plausible, wrong matrix.
    """
    missing, expected, first = _missing_chunks(arr)
    if not missing:
        return
    fill = arr.fill_value
    fill = float(fill) if np.dtype(arr.dtype).kind == "f" else int(fill)
    array = "its array" if name is None else f"its '{name}' array"
    where = f"e.g. {first if name is None else name + '/' + first}" if first else "counted by zarr"
    head = (f"The Zarr store {path!r} is incomplete: {array} is missing {missing} of its {expected} "
            f"stored chunks ({where}), which Zarr would read as the fill value {fill}.")
    if own:
        raise InputError(f"{head} Files of the store were lost after it was written; re-run `dnmf convert` (or "
                         f"dnmf.io.write_zarr) from the original data to rewrite it.")
    raise InputError(f"{head} Re-write the store from its source, with every chunk (Zarr 3 omits chunks equal to "
                     f"the fill value unless written with write_empty_chunks=True), or convert the original file "
                     f"with `dnmf convert`.")


def _nan_fill(arr) -> bool:
    """Whether ``arr``'s fill value is NaN: then no valid chunk is all fill, and none may be missing."""
    fill = arr.fill_value
    return np.dtype(arr.dtype).kind == "f" and fill is not None and bool(np.isnan(fill))


def _read_own_sparse(path: str, g, dtype: Any) -> BlockedMatrix:
    attrs = dict(g.attrs)
    if attrs.get("version") not in (FORMAT_VERSION, VALUE_DTYPE_VERSION):
        raise InputError(
            f"The Zarr store {path!r} has dnmf_format version {attrs.get('version')!r}; "
            f"this dnmf reads versions {FORMAT_VERSION} and {VALUE_DTYPE_VERSION}."
        )
    for name in ("block_bounds", "block_offsets", "indptr", "data", "indices"):
        _check_chunks(path, g[name], name, own=True)
    m, n = (int(s) for s in attrs["shape"])
    bounds = np.asarray(g["block_bounds"][:], dtype=np.int64)
    offsets = np.asarray(g["block_offsets"][:], dtype=np.int64)
    n_entries = min(g["data"].shape[0], g["indices"].shape[0])
    ok = (len(bounds) >= 1 and bounds[0] == 0 and bounds[-1] == n and np.all(np.diff(bounds) > 0)
          and len(offsets) == len(bounds) - 1 and int(g["indptr"].shape[0]) == n + 1)
    counts = np.diff(np.asarray(g["indptr"].vindex[bounds], dtype=np.int64)) if ok else None
    if not ok or np.any(counts < 0) or np.any(offsets < 0) or np.any(offsets + counts > n_entries):
        raise InputError(
            f"The Zarr store {path!r} is corrupt: its block_bounds, block_offsets and indptr arrays do not describe "
            f"blocks of a ({m}, {n}) matrix inside its {n_entries} stored entries. Re-run `dnmf convert` (or "
            f"dnmf.io.write_zarr) from the original data to rewrite it."
        )
    stored = np.dtype(g["data"].dtype)
    # float64 values stored exactly in float32 ("value_dtype"): the matrix is float64; its blocks
    # load as float64, and as stored in the ALS passes (load_stored; module docstring, "Values")
    logical = np.dtype(attrs.get("value_dtype", stored.name))
    dt = _check_dtype_param(dtype) if dtype is not None else logical
    idx = str(np.dtype(g["indices"].dtype))
    sources = tuple(
        ZarrBlockSource(
            path=path, j=j, col_start=int(bounds[j]), col_stop=int(bounds[j + 1]),
            entry_start=int(offsets[j]), entry_stop=int(offsets[j] + counts[j]), n_rows=m,
            dtype=None if dt == stored else str(dt), index_dtype=idx,
        )
        for j in range(len(offsets))
    )
    return BlockedMatrix(shape=(m, n), dtype=dt, sources=sources, sparse=True, in_memory=False,
                         row_names=_read_names(g, "row_names", m), col_names=_read_names(g, "col_names", n))


def _read_foreign_sparse(path: str, g, fmt: str, shape: tuple[int, int], block_nnz: int, dtype: Any):
    import scipy.sparse as sp

    m, n = _check_shape(shape)
    for name in ("indptr", "data", "indices"):
        _check_chunks(path, g[name], name, own=False)
    stored = np.dtype(g["data"].dtype)
    dt = _value_dtype(stored, dtype)
    what = f"The Zarr store {path!r}"
    if fmt == "csr":  # rows are features: no column access without a transpose, read it whole
        data, indices, indptr = g["data"][:], g["indices"][:], g["indptr"][:]
        check_compressed(indptr, indices, data, (m, n), fmt="csr", what=what)
        return _from_scipy(sp.csr_array((data, indices, indptr), shape=(m, n)), block_nnz, dtype)
    indptr = np.asarray(g["indptr"][:])
    check_indptr(indptr, g["indices"].shape[0], g["data"].shape[0], (m, n), fmt="csc", what=what)
    indptr = indptr.astype(np.int64, copy=False)
    bounds = column_block_bounds(np.diff(indptr), block_nnz)
    idx = str(index_dtype(int(indptr[-1] - indptr[0]), m))
    sources = tuple(
        ZarrBlockSource(
            path=path, j=j, col_start=int(c0), col_stop=int(c1), entry_start=int(indptr[c0]),
            entry_stop=int(indptr[c1]), n_rows=m, dtype=None if dt == stored else str(dt), index_dtype=idx,
            canonicalize=True,
        )
        for j, (c0, c1) in enumerate(zip(bounds[:-1], bounds[1:]))
    )
    return BlockedMatrix(shape=(m, n), dtype=dt, sources=sources, sparse=True, in_memory=False)


def _read_dense(path: str, arr, block_nnz: int, dtype: Any) -> BlockedMatrix:
    m, n = _check_shape(arr.shape)
    stored = np.dtype(arr.dtype)
    dt = _value_dtype(stored, dtype)
    own = arr.attrs.get("dnmf_format") == DENSE_FORMAT
    if _nan_fill(arr):  # with fill value 0, a missing chunk cannot be told from an all-zero one
        _check_chunks(path, arr, arr.name.strip("/") or None, own=own)
    chunk_cols = int(arr.chunks[1])
    if own:
        width = chunk_cols  # our stores: one chunk per block
    else:
        width = dense_block_width(m, block_nnz)
        if width >= chunk_cols:  # whole chunks per block: no chunk is read twice
            width = max(1, round(width / chunk_cols)) * chunk_cols
    starts = range(0, n, width)
    sources = tuple(
        ZarrDenseSource(path=path, col_start=c0, col_stop=min(c0 + width, n), n_rows=m,
                        dtype=None if dt == stored else str(dt))
        for c0 in starts
    )
    names = {}
    if own:
        for key, length in (("row_names", m), ("col_names", n)):
            value = arr.attrs.get(key)
            if isinstance(value, list) and len(value) == length:
                names[key] = tuple(str(v) for v in value)
    return BlockedMatrix(shape=(m, n), dtype=dt, sources=sources, sparse=False, in_memory=False, **names)


def _check_anndata_chunks(path: str, g, layer: str | None) -> None:
    """Check the chunks of the AnnData matrix that will be read (``X`` or ``layers/<layer>``)."""
    import zarr

    key = "X" if layer is None else f"layers/{layer}"
    try:
        node = g[key]
    except KeyError:
        return  # no such matrix: from_anndata names the valid layers
    if isinstance(node, zarr.Array):
        if _nan_fill(node):
            _check_chunks(path, node, key, own=False)
    elif {"data", "indices", "indptr"} <= set(node.keys()):
        for name in ("indptr", "data", "indices"):
            _check_chunks(path, node[name], f"{key}/{name}", own=False)


def _open_matrix(path: str, node, block_nnz: int, layer, dtype) -> BlockedMatrix:
    import zarr

    attrs = dict(node.attrs)
    is_anndata = isinstance(node, zarr.Group) and attrs.get("encoding-type") == "anndata"
    if layer is not None and not is_anndata:
        raise param_error("layer", "as_blocked", "None for a store that is not an AnnData store", layer)
    if isinstance(node, zarr.Array):
        return _read_dense(path, node, block_nnz, dtype)
    if attrs.get("dnmf_format") == SPARSE_FORMAT:
        return _read_own_sparse(path, node, dtype)
    if is_anndata:
        _check_anndata_chunks(path, node, layer)
        try:
            import anndata
        except ImportError as e:
            raise InputError("Reading AnnData Zarr stores needs the 'anndata' package: pip install anndata") from e
        return from_anndata(anndata.read_zarr(path), block_nnz, layer, dtype)
    sparse = _sparse_attrs(attrs)
    if sparse is not None and {"data", "indices", "indptr"} <= set(node.keys()):
        return _read_foreign_sparse(path, node, sparse[0], sparse[1], block_nnz, dtype)
    raise InputError(
        f"The Zarr store {path!r} passed to as_blocked is not a matrix: expected a 2-D array, a store written "
        f"by dnmf.io.write_zarr, a csr/csc group (data, indices, indptr and a 'shape' attribute) or an AnnData "
        f"store; found a group with members {sorted(node.keys())} and attributes {sorted(attrs)}."
    )


def read_zarr(path: str, *, block_nnz: int = 1_000_000, layer: str | None = None, dtype: Any = None) -> BlockedMatrix:
    """Open a Zarr store as a :class:`BlockedMatrix` (``as_blocked`` on a store path).

    Parameters
    ----------
    path : str
        A store written by :func:`write_zarr` (lazy, stored blocking; ``block_nnz`` is ignored),
        a dense 2-D array (lazy blocks of about ``block_nnz`` entries), a sparse group with
        ``data``/``indices``/``indptr`` arrays and AnnData (``encoding-type``) or h5sparse
        (``format``/``h5sparse_format``) attributes and a ``shape`` (CSC: lazy blocks; CSR: read
        whole), or an AnnData store (read with ``anndata.read_zarr`` and transposed to
        genes × cells).
    block_nnz : int, default 1_000_000
        Target entries per block for stores not written by dnmf.
    layer : str, optional
        AnnData layer (AnnData stores only).
    dtype : {None, float32, float64}, optional
        Value dtype (see :func:`dnmf.io.as_blocked`).

    Returns
    -------
    BlockedMatrix

    Raises
    ------
    InputError
        The store cannot be opened or its metadata read (naming the store), it is not a matrix,
        a chunk of a data array is missing (see the module notes), or its sparse structure is
        broken.
    """
    import zarr
    import zarr.errors

    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    block_nnz = check_int(block_nnz, "block_nnz", "as_blocked", low=1)
    try:
        node = zarr.open(path, mode="r")
        return _open_matrix(path, node, block_nnz, layer, dtype)
    except InputError:
        raise
    except (FileNotFoundError, ValueError, KeyError, OSError, zarr.errors.BaseZarrError) as e:
        cause = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(f"The path A passed to as_blocked is not a readable Zarr store: {path!r} "
                         f"({type(e).__name__}: {cause}). Check the store is complete, or re-write it.") from e


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def chunk_length(block_nnz: int) -> int:
    """Entries per chunk of ``data``/``indices``: a power of two near ``block_nnz / 8``."""
    target = max(1, math.ceil(block_nnz / 8))
    return int(min(max(2 ** math.ceil(math.log2(target)), _MIN_CHUNK), _MAX_CHUNK))


def _round_up(x: int, step: int) -> int:
    return -(-x // step) * step


def _write_sparse(blocked: BlockedMatrix, tmp: str, block_nnz: int, compressors) -> None:
    import zarr

    m, n = blocked.shape
    dt = np.dtype(blocked.dtype)
    logical = dt  # the values' dtype when read back (the "value_dtype" attribute when dt differs)
    if dt == np.float64 and _exact_in_float32(blocked):
        dt = np.dtype(np.float32)
    declared = int(blocked.nnz)
    idx = index_dtype(declared, m)
    clen = chunk_length(block_nnz)
    root = zarr.open_group(tmp, mode="w", zarr_format=3)
    blocks = iter(rebalance_blocks(blocked.iter_blocks(), m, block_nnz, sparse=True))
    first = next(blocks, None)  # the first block's entries are the sample of compressors="auto"
    head = min(first.nnz, clen) if isinstance(first, CSCBlock) else 0
    capacity = declared + (declared // block_nnz + 1) * clen  # each block pads < clen entries
    data = root.create_array("data", shape=(capacity,), chunks=(clen,), dtype=dt,
                             compressors=resolve_compressors(compressors, first.data[:head] if head else (), dt),
                             fill_value=np.nan, config=_EVERY_CHUNK)
    indices = root.create_array("indices", shape=(capacity,), chunks=(clen,), dtype=idx,
                                compressors=resolve_compressors(compressors, first.indices[:head] if head else (), idx),
                                fill_value=-1, config=_EVERY_CHUNK)
    indptr_parts = [np.zeros(1, dtype=np.int64)]
    bounds, offsets = [0], []
    nnz = 0  # entries written
    start = 0  # chunk-aligned position of the next block
    end = 0
    for block in itertools.chain([first] if first is not None else [], blocks):
        if not isinstance(block, CSCBlock) or block.n_rows != m:
            raise InputError(
                f"A source of the sparse BlockedMatrix passed to write_zarr returned a {type(block).__name__} "
                f"of shape {block.shape}; expected a CSCBlock with {m} rows."
            )
        z = block.nnz
        if start + z > capacity:  # a source declared fewer entries than it holds
            capacity = max(start + z, 2 * capacity)
            data.resize((capacity,))
            indices.resize((capacity,))
        if z:
            data[start : start + z] = np.asarray(block.data[:z], dtype=dt)
            indices[start : start + z] = np.asarray(block.indices[:z], dtype=idx)
        indptr_parts.append(np.asarray(block.indptr[1:], dtype=np.int64) + nnz)
        offsets.append(start)
        bounds.append(bounds[-1] + block.shape[1])
        nnz += z
        end = start + z
        start = _round_up(end, clen)
    if bounds[-1] != n:
        raise InputError(f"The BlockedMatrix passed to write_zarr has {n} columns but its blocks cover {bounds[-1]}.")
    data.resize((end,))
    indices.resize((end,))
    indptr = np.concatenate(indptr_parts)
    root.create_array("indptr", data=indptr, chunks=(min(len(indptr), 2**20),),
                      compressors=resolve_compressors(compressors, indptr[:clen], indptr.dtype),
                      fill_value=-1, config=_EVERY_CHUNK)
    root.create_array("block_bounds", data=np.asarray(bounds, dtype=np.int64), chunks=(len(bounds),),
                      fill_value=-1, config=_EVERY_CHUNK)
    root.create_array("block_offsets", data=np.asarray(offsets, dtype=np.int64), chunks=(max(len(offsets), 1),),
                      fill_value=-1, config=_EVERY_CHUNK)
    _write_names(root, blocked)
    root.attrs.update({"dnmf_format": SPARSE_FORMAT, "version": FORMAT_VERSION, "shape": [m, n], "nnz": nnz,
                       "chunk_length": clen})
    if dt != logical:
        root.attrs.update({"version": VALUE_DTYPE_VERSION, "value_dtype": logical.name})


def _exact_in_float32(blocked: BlockedMatrix) -> bool:
    """Whether float64 values may be stored in float32 without changing a fit (module docstring,
    "Values"): an in-memory sparse matrix every stored value of which — counts, NaN for missing —
    float32 holds exactly, with a largest magnitude the fit does not rescale
    (:func:`~dnmf.io.validate.data_scale` 1). Lazy sources are not read twice: they keep float64."""
    if not (blocked.in_memory and blocked.sparse):
        return False
    top = 0.0
    for block in blocked.iter_blocks():
        d = np.asarray(block.data)
        if d.size:
            with np.errstate(over="ignore"):  # a value past float32's range casts to inf: not exact
                if not np.array_equal(d.astype(np.float32), d, equal_nan=True):
                    return False
            top = max(top, float(np.nanmax(d, initial=0.0)), -float(np.nanmin(d, initial=0.0)))
    return data_scale(top) == 1.0


def _write_names(root, blocked: BlockedMatrix) -> None:
    """Feature and sample names of ``blocked`` as string arrays ``row_names`` (m) and ``col_names`` (n)."""
    for key, names in (("row_names", blocked.row_names), ("col_names", blocked.col_names)):
        if names is None:
            continue
        arr = root.create_array(key, shape=(len(names),), dtype=str, chunks=(max(1, min(len(names), 2**20)),),
                                config=_EVERY_CHUNK)
        if len(names):
            arr[...] = np.asarray([str(v) for v in names], dtype=object)


def _read_names(g, key: str, length: int) -> tuple | None:
    """The names written by :func:`_write_names` (None when absent or of the wrong length)."""
    if key not in g:
        return None
    names = tuple(str(v) for v in np.asarray(g[key][...]).tolist())
    return names if len(names) == length else None


def _write_dense(blocked: BlockedMatrix, tmp: str, block_nnz: int, compressors) -> None:
    import zarr

    m, n = blocked.shape
    dt = np.dtype(blocked.dtype)
    width = dense_block_width(m, block_nnz)
    blocks = iter(rebalance_blocks(blocked.iter_blocks(), m, block_nnz, sparse=False))
    first = next(blocks, None)  # the sample of compressors="auto": the first block's leading values
    sample = np.asarray(first).reshape(-1)[:AUTO_SAMPLE] if first is not None else ()
    arr = zarr.create_array(tmp, shape=(m, n), chunks=(m, width), dtype=dt,
                            compressors=resolve_compressors(compressors, sample, dt),
                            zarr_format=3, fill_value=np.nan, config=_EVERY_CHUNK)
    col = 0
    for block in itertools.chain([first] if first is not None else [], blocks):
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[0] != m:
            raise InputError(
                f"A source of the dense BlockedMatrix passed to write_zarr returned an array of shape "
                f"{block.shape}; expected {m} rows."
            )
        arr[:, col : col + block.shape[1]] = block.astype(dt, copy=False)
        col += block.shape[1]
    if col != n:
        raise InputError(f"The BlockedMatrix passed to write_zarr has {n} columns but its blocks cover {col}.")
    names = {key: [str(v) for v in value] for key, value in
             (("row_names", blocked.row_names), ("col_names", blocked.col_names)) if value is not None}
    arr.attrs.update({"dnmf_format": DENSE_FORMAT, "version": FORMAT_VERSION, "shape": [m, n], "block_cols": width,
                      **names})


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def default_compressors() -> tuple:
    """The codec of dnmf's own stores where one pays (:func:`resolve_compressors`): Blosc LZ4
    with byte shuffle.

    An out-of-core fit decodes every block in every iteration, so decoding speed is what counts.
    On a 10,000 × 100,000 float64 matrix at 1 % (``benchmarks/bench_out_of_core.py``'s; one
    thread, best of 3) reading all blocks took 0.26 s with Zarr's default Zstandard (level 0,
    94.7 MB), 0.14 s with Blosc LZ4 + shuffle (89.4 MB) and 0.08 s uncompressed (126.6 MB;
    ``compressors=None``); Blosc Zstandard level 1 + shuffle 0.17 s (87.4 MB).

    Blosc blocks of 64 KiB (``blocksize=8192``, which Blosc scales by the item size and floors
    at 64 KiB: 64 KiB for 2-, 4- and 8-byte items). Left at 0, Blosc makes each chunk one block
    (1 MiB for a float64 chunk of 131,072 entries), and its decoder allocates a scratch buffer
    of the block's size per call: above glibc's 128 KiB mmap threshold, which Dask's workers
    pin (``MALLOC_TRIM_THRESHOLD_``), that is ~257 page faults per chunk. With 64 KiB blocks a
    block read (1 M entries) took 0.09–0.10 s instead of 0.13–0.16 s on one thread with ~10×
    fewer faults, for a store 2 % larger (87.1 against 85.3 MiB).
    """
    from zarr.codecs import BloscCodec

    return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", blocksize=8192),)


#: ``compressors="auto"`` compresses an array only where Blosc LZ4 + shuffle saves at least this
#: fraction of a sample's bytes (:func:`resolve_compressors`), and samples this many entries.
AUTO_MIN_SAVING = 0.2
AUTO_SAMPLE = 131_072


def resolve_compressors(compressors: Any, sample: Any, dtype: Any) -> Any:
    """The codecs of one stored array: ``compressors`` as given, or for ``"auto"``
    :func:`default_compressors` where they shrink ``sample`` (the array's leading values, cast to
    ``dtype``) by at least ``AUTO_MIN_SAVING``, otherwise none (the array is stored raw).

    Why per array: an out-of-core fit decodes every block in every iteration, and what Blosc LZ4
    + shuffle gains differs by array. On ``benchmarks/bench_out_of_core.py``'s matrix, per
    million entries on one thread: continuous float64 values shrink 1.06× and take 4.7 ms to
    decode against 0.7 ms to copy raw; integer counts stored as float64 shrink 6.3× (3.0 ms);
    int32 row indices 2.5× (1.3 ms against 0.3 ms). So continuous values are stored raw and
    counts and indices compressed. An empty sample gets the default codecs.
    """
    if not (isinstance(compressors, str) and compressors == "auto"):
        return compressors
    sample = np.ascontiguousarray(np.asarray(sample, dtype=dtype).reshape(-1)[:AUTO_SAMPLE])
    if sample.size == 0:
        return default_compressors()
    from numcodecs import Blosc

    # the encoder of default_compressors(): LZ4 level 5, byte shuffle of the item size, the same
    # blocksize argument (which Blosc scales by the item size: 64 KiB blocks of float64)
    frame = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE, blocksize=8192).encode(sample)
    return default_compressors() if len(frame) <= (1.0 - AUTO_MIN_SAVING) * sample.nbytes else ()


def write_blocked(blocked: BlockedMatrix, path: str, *, block_nnz: int, compressors: Any = "auto") -> str:
    """Write ``blocked`` as a store at ``path`` (absolute), atomically, replacing what is there.

    ``compressors="auto"`` chooses per array (:func:`resolve_compressors`); anything else goes to
    Zarr as given.

    The store is written under a hidden temporary name beside ``path`` and renamed when complete;
    on any error the temporary store is removed and ``path`` is left as it was. The public
    entry point is :func:`dnmf.io.write_zarr`, which checks its arguments and accepts any input.
    """
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        if blocked.sparse:
            _write_sparse(blocked, tmp, block_nnz, compressors)
        else:
            _write_dense(blocked, tmp, block_nnz, compressors)
        if os.path.lexists(path):
            old = tmp + ".old"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)  # put the previous store back
                raise
            _remove(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path
