"""Column-blocked matrices: the one data structure the engine consumes.

A :class:`BlockedMatrix` is an m × n matrix (features × samples) cut into column blocks.
Each block is either

* a :class:`CSCBlock` — raw CSC triplets (``data``, ``indices``, ``indptr``) of an
  m × n_j sparse block, handled directly by our numba kernels, or
* a dense ``numpy.ndarray`` of shape (m, n_j).

Blocks come from :class:`BlockSource` objects. An :class:`InMemorySource` holds its block;
a lazy source (for example :class:`dnmf.io.zarr_store.ZarrBlockSource`) reads it from disk
on every :meth:`BlockSource.load` call, which is how a matrix larger than memory streams.
Sources are small, picklable objects, so the engine can ship them to Dask workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Union, runtime_checkable

import numpy as np

__all__ = [
    "ALIGN",
    "realigned",
    "CSCBlock",
    "Block",
    "BlockSource",
    "InMemorySource",
    "BlockedMatrix",
    "block_nnz",
    "block_shape",
]


#: Byte alignment (a cache line) of the arrays the block kernels read: see :func:`realigned`.
ALIGN = 64
#: Arrays smaller than this are left where they are by :func:`realigned`.
ALIGN_MIN_BYTES = 1 << 16


def _aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on an :data:`ALIGN` boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def realigned(a, empty=_aligned_empty):
    """``a`` itself, or a copy from ``empty(shape, dtype)`` when ``a`` is a C-contiguous array of
    at least 64 KiB whose data does not start on an :data:`ALIGN` (64-byte) boundary.

    Arrays that reach a Dask worker can start anywhere: ``distributed`` reads the first large
    buffer of a message into the same receive buffer as the message's header, right after it, so
    its address is the header's length away from an allocation — on a 2-worker fit, W arrived 4
    bytes off an 8-byte boundary. The block kernels, which read W's rows at random, then load
    values that straddle two cache lines (at a 4-byte offset one double in eight does) and took
    ~15 % longer (59–69 against 50–60 ms a block); a copy costs one pass over the array
    (docs/architecture.md, "Aligned arrays on workers")."""
    if (not isinstance(a, np.ndarray) or a.nbytes < ALIGN_MIN_BYTES or not a.flags.c_contiguous
            or a.ctypes.data % ALIGN == 0):
        return a
    out = empty(a.shape, a.dtype)
    out[...] = a
    return out


def _unpickled_block(data, indices, indptr, n_rows) -> "CSCBlock":
    """A :class:`CSCBlock` as it arrives in another process: its arrays realigned (:func:`realigned`)."""
    return CSCBlock(realigned(data), realigned(indices), realigned(indptr), n_rows)


@dataclass(frozen=True)
class CSCBlock:
    """An m × n_j sparse column block as CSC triplets.

    Attributes
    ----------
    data : ndarray of shape (nnz,), float32 or float64
    indices : ndarray of shape (nnz,), int32 or int64
        Row index of each stored value; sorted within each column.
    indptr : ndarray of shape (n_j + 1,), int32 or int64
        int64 whenever nnz ≥ 2**31.
    n_rows : int
        m, the number of features.
    """

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    n_rows: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, len(self.indptr) - 1)

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def to_scipy(self):
        """Return the block as a ``scipy.sparse.csc_array`` (no copy)."""
        import scipy.sparse as sp

        return sp.csc_array((self.data, self.indices, self.indptr), shape=self.shape)

    def toarray(self) -> np.ndarray:
        return self.to_scipy().toarray()

    def __reduce__(self):
        # Blocks are placed on workers once and read in every iteration: realigned on arrival.
        return _unpickled_block, (self.data, self.indices, self.indptr, self.n_rows)

    def __sizeof__(self) -> int:
        # What dask counts for a block (its default ``sizeof`` is ``sys.getsizeof``, which calls
        # this): defined here rather than registered with dask, so that importing dnmf does not
        # import dask (an in-process fit never needs it; issue 12, first fit).
        return int(self.data.nbytes + self.indices.nbytes + self.indptr.nbytes + 64)


Block = Union[CSCBlock, np.ndarray]


def block_shape(block: Block) -> tuple[int, int]:
    return block.shape  # both CSCBlock and ndarray have .shape


def block_nnz(block: Block) -> int:
    """Stored entries of a block (all m·n_j entries for a dense block)."""
    if isinstance(block, CSCBlock):
        return block.nnz
    return int(block.size)


@runtime_checkable
class BlockSource(Protocol):
    """Anything that yields one block: ``load()`` plus its static description."""

    n_cols: int
    nnz: int

    def load(self) -> Block:  # pragma: no cover - protocol
        ...


class _StoredCSCRange:
    """``n_cols`` and ``nnz`` of a source reading columns ``col_start:col_stop`` of a stored CSC
    matrix, whose entries are ``entry_start:entry_stop`` (HDF5 and Zarr block sources)."""

    @property
    def n_cols(self) -> int:
        return self.col_stop - self.col_start

    @property
    def nnz(self) -> int:
        """Stored entries read (an upper bound of the block's entries when a source drops rows on load)."""
        return self.entry_stop - self.entry_start


class _WrappedSource:
    """``n_cols`` and ``nnz`` of a source that wraps another one, ``self.source`` (its blocks
    changed on load); ``nnz`` is the wrapped source's (an upper bound when the wrapper drops rows)."""

    @property
    def n_cols(self) -> int:
        return self.source.n_cols

    @property
    def nnz(self) -> int:
        return self.source.nnz


@dataclass(frozen=True)
class InMemorySource:
    """A block held in memory."""

    block: Block

    @property
    def n_cols(self) -> int:
        return block_shape(self.block)[1]

    @property
    def nnz(self) -> int:
        return block_nnz(self.block)

    def load(self) -> Block:
        return self.block

    def __sizeof__(self) -> int:  # dask's sizeof (see CSCBlock.__sizeof__)
        from dask.sizeof import sizeof

        return sizeof(self.block) + 64


@dataclass(frozen=True)
class BlockedMatrix:
    """An m × n matrix split into column blocks.

    Attributes
    ----------
    shape : (m, n)
    dtype : numpy dtype of the values (float32 or float64)
    sources : tuple of BlockSource
        Block j covers columns ``col_bounds[j]:col_bounds[j+1]``.
    sparse : bool
        True when blocks are :class:`CSCBlock`, False when dense ndarrays.
    in_memory : bool
        True when every source holds its block (no disk reads per iteration).
    row_names, col_names : optional sequences of str
    """

    shape: tuple[int, int]
    dtype: np.dtype
    sources: tuple
    sparse: bool
    in_memory: bool = True
    row_names: tuple | None = field(default=None, compare=False)
    col_names: tuple | None = field(default=None, compare=False)

    @property
    def n_blocks(self) -> int:
        return len(self.sources)

    @property
    def col_bounds(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([s.n_cols for s in self.sources])]).astype(np.int64)

    @property
    def nnz(self) -> int:
        return int(sum(s.nnz for s in self.sources))

    def load_block(self, j: int) -> Block:
        return self.sources[j].load()

    def iter_blocks(self):
        for s in self.sources:
            yield s.load()

    def to_scipy(self):
        """Assemble the whole matrix as a CSC array (sparse) or ndarray (dense). Small data only."""
        import scipy.sparse as sp

        blocks = list(self.iter_blocks())
        if self.sparse:
            return sp.hstack([b.to_scipy() for b in blocks], format="csc")
        return np.hstack(blocks)
