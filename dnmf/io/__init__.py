"""Readers and writers: everything becomes a column-blocked matrix (features × samples)."""

from .blocks import BlockedMatrix, BlockSource, CSCBlock, InMemorySource
from .hdf5 import H5DenseSource, H5SparseSource
from .readers import as_blocked, peek_shape
from .tenx import read_10x
from .writers import write_zarr
from .zarr_store import ZarrBlockSource, ZarrDenseSource

__all__ = [
    "as_blocked",
    "peek_shape",
    "read_10x",
    "write_zarr",
    "BlockedMatrix",
    "BlockSource",
    "CSCBlock",
    "InMemorySource",
    "ZarrBlockSource",
    "ZarrDenseSource",
    "H5SparseSource",
    "H5DenseSource",
]
