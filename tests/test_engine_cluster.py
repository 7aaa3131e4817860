"""The engine on a real Dask cluster: worker-count independence, out-of-core, checkpoints."""

from __future__ import annotations

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


def test_out_of_core_fit_with_small_worker_memory(tmp_path):
    rng = np.random.default_rng(0)
    m, n = 300, 4000
    A = sp.random(m, n, density=0.2, random_state=rng, format="csc", dtype=np.float64)
    path = str(tmp_path / "big.zarr")
    dnmf.io.write_zarr(A, path, block_nnz=20_000)
    nbytes = A.data.nbytes + A.indices.nbytes
    limit = nbytes // 3  # worker memory below the matrix size
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=int(limit) + 60e6,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        model = dnmf.nmf(path, 4, seed=1, maxit=5, tol=0, client=client, out_of_core=True)
    ref = dnmf.nmf(A, 4, seed=1, maxit=5, tol=0, client=False, block_nnz=20_000)
    assert model.misc["out_of_core"]
    # identical block layout and arithmetic: bitwise equal factors
    assert np.array_equal(model.w, ref.w)


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
