"""Pooled arrays for what block tasks return (the H_j and the m × k partials).

Used by the block tasks of the ALS, masked, IRLS and KL loops (``engine/als.py``, ``masked.py``,
``irls.py``, ``kl.py``).

Every iteration each block task returns a new H_j (n_j × k) and an m × k partial, and the
reduction adds partials into new m × k sums; the previous iteration's are dropped. Dask's nanny
starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins glibc's mmap threshold at
128 KiB: each such array is then fresh memory from the kernel, faulted in page by page and
unmapped when dropped. On a 2-worker cluster (20,000 × 50,000 at 2 %, k = 10, 8 blocks) that was
~4,700 page faults per worker and iteration; with this pool ~1,400 (what is left is Dask's own
messages), and the workers' system time halved (``docs/architecture.md``, "Cluster overhead").

:func:`empty` hands out an array backed by a buffer from the pool (or a new one). The array's
owner is a small object (:class:`_Held`) that every view of the array keeps alive; when the last
array or view referring to it is gone, a finalizer puts the buffer back. So a buffer is reused
only once nothing can see it: results Dask still holds, arrays a user kept, a view made by a
later step are all safe. Buffers are matched by exact size (a fit's arrays recur with the same
shapes every iteration). :func:`release` empties the pool, and the arrays handed out before it
are not taken back when dropped: the engine calls it in every process of the fit when a fit
ends (``Executor.release_buffers``), so a finished fit's H_j and partials go back to the system
rather than stay pooled (``core.py``, around every engine loop).

Pooled arrays start on a 64-byte boundary (a cache line; :data:`~dnmf.io.blocks.ALIGN`), as do
the copies :func:`aligned` makes of arrays that arrive elsewhere (``docs/architecture.md``,
"Aligned arrays on workers").
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from ..io.blocks import ALIGN, realigned

__all__ = ["empty", "zeros", "copy_of", "aligned", "release", "pooled_bytes"]

#: Smaller arrays come from NumPy as usual (below glibc's default mmap threshold).
MIN_BYTES = 1 << 17
#: At most this many free buffers of one size are kept.
MAX_PER_SIZE = 64

_LOCK = threading.Lock()
_FREE: dict[int, list[np.ndarray]] = {}
_GENERATION = [0]  # bumped by release(): buffers handed out before it are not taken back


class _Held:
    """The owner of a pooled buffer as NumPy sees it (the base of every array made from it)."""

    __slots__ = ("raw", "__array_interface__", "__weakref__")

    def __init__(self, raw: np.ndarray, shape: tuple, dtype: np.dtype):
        self.raw = raw
        start = raw.ctypes.data + (-raw.ctypes.data % ALIGN)  # raw has ALIGN bytes to spare
        self.__array_interface__ = {"shape": shape, "typestr": dtype.str, "data": (start, False), "version": 3}


def _give_back(nbytes: int, raw: np.ndarray, generation: int) -> None:
    with _LOCK:
        if generation != _GENERATION[0]:
            return  # handed out before the last release(): a finished fit's result, say
        free = _FREE.setdefault(nbytes, [])
        if len(free) < MAX_PER_SIZE:
            free.append(raw)


def empty(shape, dtype=np.float64) -> np.ndarray:
    """An uninitialized C-contiguous array, from the pool when it is large enough."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape) if isinstance(shape, tuple) else (int(shape),)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    with _LOCK:
        free = _FREE.get(nbytes)
        raw = free.pop() if free else None
        generation = _GENERATION[0]
    if raw is None:
        raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    held = _Held(raw, shape, dtype)
    weakref.finalize(held, _give_back, nbytes, raw, generation).atexit = False
    return np.asarray(held)


def zeros(shape, dtype=np.float64) -> np.ndarray:
    """:func:`empty`, filled with zeros."""
    out = empty(shape, dtype)
    out.fill(0)
    return out


def copy_of(x) -> np.ndarray:
    """A float64 C-contiguous copy of ``x``, from the pool (``np.array(x, dtype=np.float64)``)."""
    x = np.asarray(x)
    out = empty(x.shape, np.float64)
    out[...] = x
    return out


def aligned(x: np.ndarray) -> np.ndarray:
    """``x``, or a pooled copy of it (same dtype) when ``x`` is large and C-contiguous but its data
    does not start on a 64-byte boundary (:func:`~dnmf.io.blocks.realigned`)."""
    if not isinstance(x, np.ndarray):
        return x
    return realigned(x, empty) if x.nbytes >= MIN_BYTES else realigned(x)  # smaller: not pooled


def release() -> int:
    """Drop every free buffer of this process, and let the arrays handed out so far go back to
    the system when dropped (not to the pool); returns the bytes dropped."""
    with _LOCK:
        freed = _free_bytes()
        _FREE.clear()
        _GENERATION[0] += 1
    return freed


def pooled_bytes() -> int:
    """Bytes held by free buffers of this process (the sizes of the arrays they back)."""
    with _LOCK:
        return _free_bytes()


def _free_bytes() -> int:
    # the arrays' bytes (each buffer has ALIGN bytes more, to start an array on a boundary)
    return sum(nbytes * len(free) for nbytes, free in _FREE.items())
