"""One Dask task per worker over its contiguous run of blocks (issue 12, cluster overhead).

``DaskExecutor.map_blocks`` runs the blocks placed on a worker as one chunk task there, whose
``nthreads`` threads take the blocks in turn (each calls the block function on one block); the
handles designate a block's item of the chunk's tuple (block order). Checked on real ``LocalCluster``s: fits bitwise equal to the
in-process fit, the number of tasks per round, and the verbs on part handles against
:class:`LocalExecutor` and plain NumPy.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp

import dnmf
from dnmf.engine.executor import DaskExecutor, LocalExecutor
from dnmf.io.blocks import InMemorySource

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")

#: 400 × 300 at 5 % with block_nnz=700: 9 column blocks, so 2 workers hold runs of 5 and 4
#: blocks (block j on worker ⌊2j/9⌋), one chunk task each, whose 2 threads take the blocks in turn.
KW = dict(seed=11, maxit=4, tol=0, block_nnz=700, solver="cd")
N_BLOCKS = 9


@pytest.fixture(scope="module")
def a():
    return sp.random(400, 300, density=0.05, random_state=3, format="csc")


@pytest.fixture(scope="module")
def cluster22():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        yield cluster


@pytest.fixture
def client22(cluster22):
    with distributed.Client(cluster22) as client:
        yield client


def _keys(stream, prefix):
    return [t["key"] for t in stream.data if str(t["key"]).startswith(prefix + "-")]


def test_fits_bitwise_equal_in_process_with_uneven_chunks(a, client22):
    assert dnmf.io.as_blocked(a, block_nnz=KW["block_nnz"]).n_blocks == N_BLOCKS
    local = dnmf.nmf(a, 5, client=False, **KW)
    with distributed.get_task_stream(client22) as stream:
        two = dnmf.nmf(a, 5, client=client22, **KW)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as c1, distributed.Client(c1) as client:
        one = dnmf.nmf(a, 5, client=client, **KW)
    for other in (one, two):
        assert other.misc["executor"] == "distributed"
        # Bitwise: each block's H solve is the same call, and the reduction tree is fixed by
        # the block layout, whatever tasks the blocks are grouped into.
        assert np.array_equal(other.w, local.w)
        assert np.array_equal(other.d, local.d)
        assert np.array_equal(other.h, local.h)
        assert np.array_equal(other.misc["loss_history"], local.misc["loss_history"])
    # One H-step round per iteration, 2 chunk tasks each (one per worker) instead of 9.
    assert len(_keys(stream, "_h_task")) == 2 * KW["maxit"]


def _twice_and_sums(block, scale):
    """A block function with two results: the block scaled, and its column sums."""
    return block * scale, block.sum(axis=0)


def _joined(x, y):
    # Concatenation is not commutative: any change of order or grouping of the leaves shows.
    return np.concatenate([x, y])


def _slow_where(block, j, delays):
    """A block function that takes ``delays[j]`` seconds and reports the thread that ran it."""
    time.sleep(delays[j])
    return j, threading.get_ident()


def test_a_workers_threads_take_its_blocks_in_turn(client22):
    # Worker 0 holds blocks 0-4. Block 0 takes 0.4 s, the others 0.05 s: with the blocks split
    # 2 + 3 between the two threads (as before) one thread ran blocks 0 and 1; taken in turn, the
    # other thread runs blocks 1-4 while the first runs block 0.
    ex = DaskExecutor(client22)
    handles = ex.put_blocks(_blocks())
    delays = [0.4] + [0.05] * (N_BLOCKS - 1)
    got = ex.gather(ex.map_blocks(_slow_where, handles, list(range(N_BLOCKS)), args=(delays,)))
    assert [j for j, _ in got] == list(range(N_BLOCKS))  # results in block order
    first = [tid for j, tid in got[:5]]  # worker 0's run
    assert first[0] not in first[1:5] and len(set(first[1:5])) == 1  # one thread took all four
    ex.release(handles)


def _blocks():
    rng = np.random.default_rng(0)
    return [rng.random((3, j + 1)) for j in range(N_BLOCKS)]


def _gone(cluster, keys, timeout=10.0):
    """Whether none of ``keys`` is known to the scheduler any more (forgetting is asynchronous)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(k in cluster.scheduler.tasks for k in keys):
            return True
        time.sleep(0.05)
    return False


def test_verbs_on_part_handles_match_local(client22, cluster22):
    blocks = _blocks()
    ref_outs = LocalExecutor(1).map_blocks(_twice_and_sums, blocks, args=(2.0,), n_out=2)
    ex = DaskExecutor(client22)
    handles = ex.put_blocks(blocks)
    with distributed.get_task_stream(client22) as stream:
        outs = ex.map_blocks(_twice_and_sums, handles, args=(2.0,), n_out=2)
        distributed.wait([p.future for o in outs for p in o])
    assert len(_keys(stream, "_twice_and_sums")) == 2  # one chunk per worker: 5 and 4 blocks
    chunk_keys = {p.key for o in outs for p in o}
    assert len(chunk_keys) == 2

    # gather: the items asked for, in the order asked (here reversed, one twice).
    want = [o[0] for o in reversed(outs)] + [outs[4][1]]
    got = ex.gather(want)
    expected = [blocks[j] * 2.0 for j in reversed(range(N_BLOCKS))] + [blocks[4].sum(axis=0)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert np.array_equal(g, e)

    # tree_reduce: the fixed tree in block order — the same as locally and as one plain concatenation.
    with distributed.get_task_stream(client22) as stream:
        sums = ex.tree_reduce(_joined, [o[1] for o in outs])
    # The tree of 9 leaves cut at the workers' runs (blocks 0-4 | 5-8) leaves 2 subtrees on the
    # first worker and 3 on the second: one task per worker evaluates its subtrees.
    assert len(stream.data) == 2
    assert np.array_equal(sums, LocalExecutor(1).tree_reduce(_joined, [o[1] for o in ref_outs]))
    assert np.array_equal(sums, np.concatenate([b.sum(axis=0) for b in blocks]))

    # Parts as per-block arguments of the next round (chunked again on the same workers).
    again = ex.map_blocks(_twice_and_sums, [o[0] for o in outs], args=(0.5,), n_out=1)
    got = ex.gather(again)  # every block of each chunk: the chunks' tuples fetched whole
    for g, b in zip(got, blocks):
        assert np.array_equal(g[0], b) and np.array_equal(g[1], (b * 2.0).sum(axis=0))
    ex.release(again)

    # standalone: futures of their own, which the client itself fetches (results handed to users).
    own = ex.standalone([o[0] for o in outs])
    assert all(isinstance(f, distributed.Future) for f in own)
    for g, b in zip(client22.gather(own), blocks):
        assert np.array_equal(g, b * 2.0)
    ex.release(own)

    # release: a chunk's result stays on its worker until every part of it is released.
    first_chunk = outs[0][0].key
    keep = outs[0][1]
    ex.release([p for o in outs for p in o if p is not keep])
    assert _gone(cluster22, chunk_keys - {first_chunk})
    assert first_chunk in cluster22.scheduler.tasks
    (kept,) = ex.gather([keep])
    assert np.array_equal(kept, blocks[0].sum(axis=0))
    ex.release([keep])
    assert _gone(cluster22, {first_chunk})
    ex.release(handles)


def test_reduction_tasks_are_released_with_the_next_round(a, client22, cluster22):
    # The tasks the executor makes to fetch results (a reduction's subtree tasks, gather's
    # picking tasks) are released together with the next round's submission, not as their
    # results arrive: the client sends the scheduler its messages in batches at least 10 ms
    # apart, and a release sent then held up the next round's tasks, submitted right after the
    # client's W update, while the workers idled (docs/architecture.md, "Cluster overhead").
    ex = DaskExecutor(client22)
    handles = ex.put_blocks(_blocks())
    outs = ex.map_blocks(_twice_and_sums, handles, args=(2.0,), n_out=2)
    distributed.wait([p.future for o in outs for p in o])
    with distributed.get_task_stream(client22) as stream:
        ex.tree_reduce(_joined, [o[1] for o in outs])
        ex.gather([o[1] for o in outs])  # items of the chunks' results: one picking task per chunk
    subtree_keys, picking = set(_keys(stream, "_call_picking")), set(_keys(stream, "_pick_paths"))
    assert len(subtree_keys) == 2 and len(picking) == 2  # one of each per worker
    # A release sent would have been handled within this: the client's batched stream waits at
    # most 10 ms, and the scheduler forgets a released key at once.
    time.sleep(1.0)
    assert all(k in cluster22.scheduler.tasks for k in subtree_keys | picking)
    again = ex.map_blocks(_twice_and_sums, [o[0] for o in outs], args=(0.5,))
    assert _gone(cluster22, subtree_keys | picking)
    ex.release([*again, *(p for o in outs for p in o), *handles])

    # A whole fit leaves nothing on the cluster.
    with distributed.get_task_stream(client22) as stream:
        dnmf.nmf(a, 5, client=client22, **KW)
    assert _gone(cluster22, {t["key"] for t in stream.data})


def _scaled(block, scale):
    return np.asarray(block.load() if hasattr(block, "load") else block) * scale


def test_lazy_sources_run_one_task_per_worker(client22):
    blocks = _blocks()
    ex = DaskExecutor(client22)
    sources = ex.put_blocks([InMemorySource(b) for b in blocks])
    placed = ex.put_blocks(blocks)
    streamed = ex.map_blocks(_scaled, sources, args=(3.0,))
    chunked = ex.map_blocks(_scaled, placed, args=(3.0,))
    got_streamed, got_chunked = ex.gather(streamed), ex.gather(chunked)
    # Blocks read from disk by their tasks go in one chunk per worker, as blocks held by the
    # workers do (one task per streamed block cost ~12 % of an out-of-core iteration:
    # docs/architecture.md, "Streaming reads"): 2 workers, 2 chunk tasks per round, each
    # block's handle a part of its worker's chunk.
    for handles in (streamed, chunked):
        assert len({h.future.key for h in handles}) == 2
    for s, c, b in zip(got_streamed, got_chunked, blocks):
        assert np.array_equal(s, b * 3.0) and np.array_equal(c, b * 3.0)
    ex.release([*streamed, *chunked, *sources, *placed])


def test_one_thread_workers_one_task_per_worker(a):
    # 1-thread workers: a worker's whole run is one task; a fit stays bitwise the in-process one.
    local = dnmf.nmf(a, 5, client=False, **KW)
    with distributed.LocalCluster(n_workers=3, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as c3, distributed.Client(c3) as client:
        with distributed.get_task_stream(client) as stream:
            three = dnmf.nmf(a, 5, client=client, **KW)
    assert np.array_equal(three.w, local.w) and np.array_equal(three.h, local.h)
    assert np.array_equal(three.misc["loss_history"], local.misc["loss_history"])
    assert len(_keys(stream, "_h_task")) == 3 * KW["maxit"]
