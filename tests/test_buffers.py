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
