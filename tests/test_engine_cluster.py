"""The engine on a real Dask cluster: worker-count independence, out-of-core, checkpoints."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp

import dnmf

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def a():
    return sp.random(400, 300, density=0.05, random_state=3, format="csc")


@pytest.fixture(scope="module")
def cluster2():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        yield cluster


def test_one_vs_two_workers_and_threads_identical(a, cluster2):
    kw = dict(seed=11, maxit=8, tol=0, block_nnz=700, solver="cd")
    local = dnmf.nmf(a, 5, client=False, **kw)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as c1, distributed.Client(c1) as client:
        one = dnmf.nmf(a, 5, client=client, **kw)
    with distributed.Client(cluster2) as client:
        two = dnmf.nmf(a, 5, client=client, **kw)
        # the active default client is used when client=None
        default = dnmf.nmf(a, 5, **kw)
    assert one.misc["executor"] == "distributed" and default.misc["executor"] == "distributed"
    for other in (one, two, default):
        # Bitwise identical: the reduction tree is fixed by the block layout.
        assert np.array_equal(other.w, local.w)
        assert np.array_equal(other.h, local.h)
        assert np.array_equal(other.misc["loss_history"], local.misc["loss_history"])


@dataclasses.dataclass(frozen=True)
class _RandomCSCSource:
    """A lazy block source generating a sparse column block from its own seed (never in memory
    as a whole): lets the test write a store larger than the workers' memory limit."""

    m: int
    n_cols: int
    per_col: int
    seed: int

    @property
    def nnz(self) -> int:
        return self.n_cols * self.per_col

    def load(self):
        rng = np.random.default_rng(self.seed)
        rows = np.sort(rng.random((self.n_cols, self.m)).argpartition(self.per_col, axis=1)[:, :self.per_col], axis=1)
        vals = rng.gamma(1.0, 1.0, self.nnz).astype(np.float32)
        indptr = np.arange(0, self.nnz + 1, self.per_col, dtype=np.int64)
        return dnmf.io.CSCBlock(vals, rows.ravel().astype(np.int32), indptr, self.m)


def test_out_of_core_fit_with_small_worker_memory(tmp_path):
    # 600 × 152,000 with 400 stored entries per column: 60.8 M entries × 8 B = 486 MB of A,
    # more than each worker's 450 MiB (472 MB) limit. A worker's own footprint is 220-300 MB
    # (numba's JIT included), so not even half of A could be held per worker; only streaming
    # from disk completes (dask pauses a worker at 80 % of its limit).
    m, n_blocks, cols, per_col = 600, 76, 2000, 400
    sources = tuple(_RandomCSCSource(m, cols, per_col, seed) for seed in range(n_blocks))
    lazy = dnmf.io.BlockedMatrix(shape=(m, n_blocks * cols), dtype=np.dtype(np.float32), sources=sources,
                                 sparse=True, in_memory=False)
    path = str(tmp_path / "big.zarr")
    dnmf.io.write_zarr(lazy, path, block_nnz=cols * per_col)
    a_bytes = lazy.nnz * 8
    limit = 450 * 2**20
    assert a_bytes > limit
    # No manual warm-up: the engine compiles the float32 kernels in this process first, so the
    # workers load them from numba's on-disk cache (compiling adds ~150 MB to a process, which
    # would push a worker past dask's pause threshold at 80 % of its limit).
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=limit,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        model = dnmf.nmf(path, 4, seed=1, maxit=3, tol=0, client=client)  # out_of_core chosen automatically
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2  # no worker was killed
    assert model.misc["out_of_core"] and model.misc["iter"] == 3
    # The same store fitted in-process (streaming as well): the block layout and arithmetic are
    # the same, so the factors are bitwise equal.
    ref = dnmf.nmf(path, 4, seed=1, maxit=3, tol=0, client=False)
    assert np.array_equal(model.w, ref.w) and np.array_equal(model.h, ref.h)


def test_checkpoint_resume_reproduces_uninterrupted(tmp_path, a):
    kw = dict(seed=5, tol=0, block_nnz=700, solver="cd", client=False)
    full = dnmf.nmf(a, 4, maxit=12, **kw)
    ck = str(tmp_path / "ck.zarr")

    def stop_at_7(rec):
        if rec.iteration == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dnmf.nmf(a, 4, maxit=12, checkpoint=ck, checkpoint_every=3, on_iteration=stop_at_7, **kw)
    resumed = dnmf.nmf(a, 4, maxit=12, checkpoint=ck, checkpoint_every=3, resume=True, **kw)
    assert np.array_equal(resumed.w, full.w) and np.array_equal(resumed.h, full.h)
    assert np.array_equal(resumed.misc["loss_history"], full.misc["loss_history"])
    # a checkpoint of another fit is refused
    with pytest.raises(dnmf.InputError, match="another matrix"):
        dnmf.nmf(a, 3, maxit=12, checkpoint=ck, resume=True, **kw)


def test_killed_worker_recovers(a):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        kw = dict(seed=5, tol=0, block_nnz=700, maxit=10)
        ref = dnmf.nmf(a, 4, client=False, **kw)
        killed = []

        def kill_one(rec):
            if rec.iteration == 4 and not killed:
                addr = sorted(client.scheduler_info()["workers"])[0]
                try:
                    client.run(lambda: __import__("os")._exit(1), workers=[addr])
                except OSError:  # the worker dies before it can answer: expected
                    pass
                killed.append(addr)

        model = dnmf.nmf(a, 4, client=client, on_iteration=kill_one, **kw)
    assert killed
    # Cholesky solves ignore warm starts, so rebuilding lost H blocks cold changes nothing.
    np.testing.assert_array_equal(model.w, ref.w)


def test_partials_report_their_size_to_dask():
    from dask.sizeof import sizeof

    from dnmf.engine.als import BlockStats

    stats = BlockStats(np.zeros((3000, 10)), np.zeros((10, 10)), np.zeros(10))
    nbytes = 3000 * 10 * 8 + 100 * 8 + 10 * 8
    assert nbytes <= sizeof(stats) <= nbytes + 1_000  # the arrays plus a small header
