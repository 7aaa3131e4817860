"""Pooled task outputs (dnmf/engine/buffers.py): reuse only once nothing can see a buffer."""

from __future__ import annotations

import pickle

import numpy as np

from dnmf.engine import buffers

SHAPE = (400, 100)  # 320,000 bytes: pooled (≥ MIN_BYTES)


def setup_function():
    buffers.release()


def test_a_dropped_array_is_reused_and_a_small_one_is_plain():
    a = buffers.zeros(SHAPE)
    assert a.shape == SHAPE and a.dtype == np.float64 and a.flags.c_contiguous and a.flags.writeable
    assert not a.any()
    addr = a.ctypes.data
    del a
    assert buffers.pooled_bytes() == 400 * 100 * 8
    b = buffers.empty(SHAPE)
    assert b.ctypes.data == addr and buffers.pooled_bytes() == 0
    small = buffers.empty((10, 10))
    assert small.base is None  # NumPy's own
    other = buffers.empty((100, 400), np.float32)  # another size: a buffer of its own
    assert not np.shares_memory(other, b)


def test_a_buffer_seen_by_a_view_or_a_kept_result_is_not_reused():
    a = buffers.empty(SHAPE)
    a[:] = 7.0
    view = a[1:, ::2]
    del a
    b = buffers.empty(SHAPE)  # the view keeps a's buffer out of the pool
    b[:] = -1.0
    assert not np.shares_memory(b, view) and np.all(view == 7.0)
    del view
    c = buffers.empty(SHAPE)
    c[:] = 3.0
    assert np.all(b == -1.0)
    # pickled (sent to another process): the values, as a plain array
    back = pickle.loads(pickle.dumps(c))
    assert np.array_equal(back, c) and not np.shares_memory(back, c)


def test_release_empties_the_pool_and_does_not_take_back_older_arrays():
    a = buffers.empty(SHAPE)
    b = buffers.empty(SHAPE)
    del a
    assert buffers.pooled_bytes() > 0
    assert buffers.release() == 400 * 100 * 8 and buffers.pooled_bytes() == 0
    del b  # handed out before the release: back to the system, not to the pool
    assert buffers.pooled_bytes() == 0
    c = buffers.empty(SHAPE)
    del c
    assert buffers.pooled_bytes() == 400 * 100 * 8


def test_at_most_max_per_size_free_buffers_are_kept(monkeypatch):
    monkeypatch.setattr(buffers, "MAX_PER_SIZE", 2)
    arrays = [buffers.empty(SHAPE) for _ in range(4)]
    del arrays
    assert buffers.pooled_bytes() == 2 * 400 * 100 * 8


def test_copy_of_is_a_float64_copy_from_the_pool():
    x = np.arange(400 * 100, dtype=np.float32).reshape(SHAPE) / 3
    c = buffers.copy_of(x)
    assert c.dtype == np.float64 and c.flags.c_contiguous and not np.shares_memory(c, x)
    assert np.array_equal(c, np.array(x, dtype=np.float64))  # what the tasks computed before
    addr = c.ctypes.data
    del c
    assert buffers.copy_of(x).ctypes.data == addr


def test_pooled_arrays_start_on_a_cache_line():
    arrays = [buffers.empty(SHAPE), buffers.zeros((1000, 33)), buffers.empty((70_001,), np.float32),
              buffers.empty((40_000,), np.int32)]
    assert [a.ctypes.data % 64 for a in arrays] == [0, 0, 0, 0]
    del arrays
    again = buffers.empty((70_001,), np.float32)  # from the pool: still on a boundary
    assert buffers.pooled_bytes() == 400 * 100 * 8 + 1000 * 33 * 8 + 40_000 * 4
    assert again.ctypes.data % 64 == 0


def _misaligned(a, by):
    """A copy of ``a`` whose data starts ``by`` bytes after a 64-byte boundary."""
    raw = np.empty(a.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data % 64) + by
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def test_aligned_copies_only_large_contiguous_arrays_off_a_boundary():
    rng = np.random.default_rng(1)
    for dtype, shape in [(np.float64, (3000, 10)), (np.float32, (200_000,)), (np.float64, (20_000, 10))]:
        x = rng.random(shape).astype(dtype)
        for by in (4, 8, 16, 48):
            odd = _misaligned(x, by)
            assert odd.ctypes.data % 64 == by
            got = buffers.aligned(odd)
            assert got.ctypes.data % 64 == 0 and got.dtype == x.dtype and got.shape == x.shape
            assert np.array_equal(got, x) and not np.shares_memory(got, odd)
        on = _misaligned(x, 0)
        assert buffers.aligned(on) is on  # already on a boundary: no copy
    small = _misaligned(np.ones(1000), 8)  # 8 kB: left as it is
    assert buffers.aligned(small) is small
    strided = _misaligned(np.ones((4000, 10)), 8)[:, ::2]  # not C-contiguous: left as it is
    assert buffers.aligned(strided) is strided


def test_a_block_unpickled_from_buffers_off_a_boundary_is_realigned():
    """As ``distributed`` delivers a block (pickle protocol 5, its arrays out of band, the first
    at wherever the message's header ended), its arrays come back on 64-byte boundaries."""
    from dnmf.io.blocks import CSCBlock

    rng = np.random.default_rng(2)
    nnz, m = 30_000, 5000
    block = CSCBlock(rng.random(nnz), rng.integers(0, m, nnz).astype(np.int32),
                     np.linspace(0, nnz, 41).astype(np.int64), m)
    bufs = []
    header = pickle.dumps(block, protocol=5, buffer_callback=bufs.append)
    assert len(bufs) == 3  # data, indices, indptr out of band
    odd = [_misaligned(np.frombuffer(b.raw(), np.uint8), by) for b, by in zip(bufs, (12, 4, 8))]
    got = pickle.loads(header, buffers=odd)
    assert isinstance(got, CSCBlock) and got.n_rows == m
    assert got.data.ctypes.data % 64 == 0 and got.indices.ctypes.data % 64 == 0  # 240 kB, 120 kB
    assert got.indptr.ctypes.data % 64 == 8  # 328 bytes: below the 64 kB floor, not copied
    for name in ("data", "indices", "indptr"):
        assert np.array_equal(getattr(got, name), getattr(block, name))
        assert getattr(got, name).dtype == getattr(block, name).dtype
