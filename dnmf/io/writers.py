"""Write any input of :func:`dnmf.io.as_blocked` as a column-blocked Zarr store.

The store layout, the lazy readers and the atomic write are in :mod:`dnmf.io.zarr_store`; this
module only adds the entry point that accepts everything ``as_blocked`` does, so it sits above
``readers`` and the I/O modules import one way (``zarr_store`` never imports ``readers``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._validation import check_int, param_error
from ..exceptions import InputError
from .blocks import BlockedMatrix
from .readers import as_blocked
from .zarr_store import write_blocked

__all__ = ["write_zarr"]


def write_zarr(
    A: Any,
    path: str | os.PathLike,
    *,
    block_nnz: int = 1_000_000,
    overwrite: bool = False,
    compressors: Any = "auto",
    layer: str | None = None,
) -> str:
    """Write ``A`` as a column-blocked Zarr v3 store for out-of-core fitting.

    Parameters
    ----------
    A : anything :func:`dnmf.io.as_blocked` accepts, shape (m, n)
        A lazy :class:`BlockedMatrix` is written one block at a time, never materialized.
    path : str or os.PathLike
        Target directory.
    block_nnz : int, default 1_000_000
        Target stored entries per column block (the blocks the engine will use).
    overwrite : bool, default False
        Replace an existing ``path`` (only once the new store is complete).
    compressors : default "auto"
        Codecs of the stored arrays, passed to ``zarr.create_array``. "auto" chooses per array,
        since an out-of-core fit decodes every block in every iteration: Blosc LZ4 with byte
        shuffle in 64 KiB blocks (fast to decode) where it saves at least a fifth of a sample's
        bytes — row indices, integer counts — and no codec where it does not, as for continuous
        values (:func:`dnmf.io.zarr_store.resolve_compressors` has the rule and the
        measurements). None stores every array uncompressed; ``zarr_store.default_compressors()``
        puts Blosc LZ4 on every array.
    layer : str, optional
        AnnData layer, when ``A`` is AnnData or an AnnData file.

    Float64 values that float32 holds exactly (counts) are stored in float32 when ``A`` is in
    memory: the store still reads as the float64 matrix, and fits on it are bitwise those of
    the float64 matrix, with half the value bytes to read per out-of-core iteration
    (:mod:`dnmf.io.zarr_store`, "Values").

    Returns
    -------
    str
        The absolute path of the store.

    Notes
    -----
    See :mod:`dnmf.io.zarr_store` for the layout and how a lost chunk is detected. The store
    is written under a temporary name beside ``path`` and renamed when complete; on any error
    the temporary store is removed and nothing appears at ``path``.

    Examples
    --------
    >>> import os, tempfile
    >>> import scipy.sparse as sp
    >>> from dnmf.io import as_blocked, write_zarr
    >>> A = sp.random(50, 40, density=0.1, random_state=0, format="csc")
    >>> out = write_zarr(A, os.path.join(tempfile.mkdtemp(), "a.zarr"), block_nnz=60)
    >>> B = as_blocked(out)
    >>> B.in_memory, B.shape, (B.to_scipy() != A).nnz
    (False, (50, 40), 0)
    """
    func = "write_zarr"
    block_nnz = check_int(block_nnz, "block_nnz", func, low=1)
    if not isinstance(overwrite, (bool, np.bool_)):
        raise param_error("overwrite", func, "a bool", overwrite)
    if not isinstance(path, (str, os.PathLike)):
        raise param_error("path", func, "a str or os.PathLike", path)
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.lexists(path) and not overwrite:
        raise InputError(f"The path {path!r} passed to {func} exists; pass overwrite=True to replace it.")
    blocked = A if isinstance(A, BlockedMatrix) else as_blocked(A, block_nnz=block_nnz, layer=layer)
    return write_blocked(blocked, path, block_nnz=block_nnz, compressors=compressors)
