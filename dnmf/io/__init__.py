"""Readers and writers: everything becomes a column-blocked matrix (features × samples)."""

from .blocks import BlockedMatrix, BlockSource, CSCBlock, InMemorySource
from .readers import as_blocked
from .writers import write_zarr
from .zarr_store import ZarrBlockSource, ZarrDenseSource

__all__ = [
    "as_blocked",
    "write_zarr",
    "BlockedMatrix",
    "BlockSource",
    "CSCBlock",
    "InMemorySource",
    "ZarrBlockSource",
    "ZarrDenseSource",
]
