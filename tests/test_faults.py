"""A Dask worker lost at any moment of a fit (issue 11): the fit recovers, or fails typed.

Real worker processes are SIGKILLed (the nanny restarts them) between iterations, while W is
put on the cluster, while block tasks run, at increasing delays into an iteration, in the last
iteration of a fit stopped by tol, during a checkpoint save and the final gather, and at seeded
random moments, also in fits that stream their blocks from a Zarr store every iteration. Every
fit must end within a bounded time with the factors of the undisturbed fit — bitwise, since the
default Cholesky solver ignores the warm starts that a recovery loses — or, when recoveries are
exhausted, raise WorkerLostError naming the worker.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import dask
import numpy as np
import pytest
import scipy.sparse as sp

import dnmf
from dnmf.engine.als import ALSOptions, fit_als
from dnmf.engine.executor import DaskExecutor, LocalExecutor, get_executor, scheduler_workers
from dnmf.exceptions import WorkerLostError

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")

#: Longest a disturbed fit may take (an undisturbed one takes ~1 s here; a recovery adds a
#: re-placement and one cold iteration). A hang — the bug of issue 11 — fails the test.
FIT_TIMEOUT = 60.0
KW = dict(seed=5, tol=0, maxit=8, block_nnz=1000)  # 300 × 400 at 5 %: 6 blocks of ~1000 nonzeros


@pytest.fixture(scope="module")
def a():
    return sp.random(300, 400, density=0.05, random_state=3, format="csc")


@pytest.fixture(scope="module")
def a_tall():
    # W is 4000 × 4 float64 = 128 kB, above the 100 kB under which put() passes values inline:
    # W really is scattered to a worker every iteration.
    return sp.random(4000, 400, density=0.01, random_state=4, format="csc")


@pytest.fixture(scope="module")
def client():
    # A LocalCluster closes the nanny of a worker that has not come back after
    # lost-worker-timeout (15 s); on a loaded 2-core machine a restart can take longer.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "300s"}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="2GiB",
                                           dashboard_address=None)
        client = distributed.Client(cluster)
        try:
            yield client
        finally:
            client.close()
            try:
                cluster.close()
            except KeyError:
                # distributed's SpecCluster closes its scheduler and workers first, then its status
                # watcher may meet the removal of a worker it no longer lists (a replacement the
                # nanny started for a worker these tests killed): KeyError in _update_worker_status.
                # Everything is closed by then; seen once in CI (test_kl_fit_killed_at_a_random_moment).
                pass


@pytest.fixture
def workers(client):
    """Two live workers before the test (the nanny restarts a killed one in a few seconds)."""
    client.wait_for_workers(2, timeout=60)
    deadline = time.monotonic() + 60
    while True:
        try:
            pids = client.run(os.getpid)
        except OSError:  # a worker still starting or closing
            pids = {}
        if len(pids) == 2:
            return pids
        assert time.monotonic() < deadline, "the cluster did not get back to two workers"
        time.sleep(0.1)


def kill(pids, index=0):
    """SIGKILL worker ``index`` (by address) from ``pids`` (address → pid); returns its address."""
    addr, pid = sorted(pids.items())[index]
    os.kill(pid, signal.SIGKILL)
    return addr


def within(fn, timeout=FIT_TIMEOUT):
    """``fn()`` run in a thread; fails if it has not returned after ``timeout`` seconds."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the fit hung (still running after {timeout:.0f} s)"
    if "error" in out:
        raise out["error"]
    return out["value"]


def assert_same_fit(model, ref):
    # Bitwise: the block layout fixes the reduction tree, and a recovery's cold H solves are
    # what the Cholesky solver computes anyway.
    np.testing.assert_array_equal(model.w, ref.w)
    np.testing.assert_array_equal(model.d, ref.d)
    np.testing.assert_array_equal(model.h, ref.h)
    np.testing.assert_array_equal(model.misc["loss_history"], ref.misc["loss_history"])


@pytest.fixture(scope="module")
def ref(a):
    return dnmf.nmf(a, 4, client=False, **KW)


def test_killed_between_iterations(a, ref, client, workers):
    killed = []

    def on_iteration(rec):
        if rec.iteration == 2:
            killed.append(kill(workers))

    model = within(lambda: dnmf.nmf(a, 4, client=client, on_iteration=on_iteration, **KW))
    assert killed and model.misc["iter"] == KW["maxit"]
    assert_same_fit(model, ref)


@pytest.mark.parametrize("delay", [0.0, 0.005], ids=["before-put", "during-put"])
def test_killed_while_w_is_put(a_tall, client, workers, delay):
    ref = dnmf.nmf(a_tall, 4, client=False, **{**KW, "block_nnz": 3000})
    timer = []

    def on_iteration(rec):
        # the next cluster call after the callback is put(W) of the next iteration
        if rec.iteration == 2:
            timer.append(threading.Timer(delay, kill, (workers,)))
            timer[0].start()

    model = within(lambda: dnmf.nmf(a_tall, 4, client=client, on_iteration=on_iteration,
                                    **{**KW, "block_nnz": 3000}))
    timer[0].join()
    assert_same_fit(model, ref)


def test_killed_while_block_tasks_run(a, ref, client, workers):
    # 30 ms into the next iteration: its block tasks or the reduction are under way
    timer = []

    def on_iteration(rec):
        if rec.iteration == 3:
            timer.append(threading.Timer(0.03, kill, (workers, 1)))
            timer[0].start()

    model = within(lambda: dnmf.nmf(a, 4, client=client, on_iteration=on_iteration, **KW))
    timer[0].join()
    assert_same_fit(model, ref)


def test_killed_in_the_last_iteration_of_a_fit_stopped_by_tol(a, client, workers):
    # A fit that stops on tol (not maxit): a worker lost in the callback of its last iteration
    # takes H blocks with it, and the final gather of H recovers them (re-solved from the W that
    # produced them) without running another iteration.
    kw = {**KW, "tol": 1e-2, "maxit": 100}
    ref = dnmf.nmf(a, 4, client=False, **kw)
    n = ref.misc["iter"]
    assert ref.misc["converged"] and n < kw["maxit"]
    killed = []

    def on_iteration(rec):
        if rec.iteration == n:
            killed.append(kill(workers))

    model = within(lambda: dnmf.nmf(a, 4, client=client, on_iteration=on_iteration, **kw))
    assert killed and model.misc["iter"] == n and model.misc["converged"]
    assert_same_fit(model, ref)


@pytest.mark.parametrize("delay", [0.0, 0.003, 0.01, 0.02, 0.04])
def test_killed_at_increasing_delays_into_an_iteration(a_tall, client, workers, delay):
    # After the callback of iteration 2, iteration 3 puts W, runs its block tasks, reduces the
    # partials on the workers and fetches them: kills at increasing delays land in each.
    kw = {**KW, "block_nnz": 3000}
    ref = dnmf.nmf(a_tall, 4, client=False, **kw)
    timer = []

    def on_iteration(rec):
        if rec.iteration == 2:
            timer.append(threading.Timer(delay, kill, (workers, 1)))
            timer[0].start()

    model = within(lambda: dnmf.nmf(a_tall, 4, client=client, on_iteration=on_iteration, **kw))
    timer[0].join()
    assert_same_fit(model, ref)


@pytest.mark.parametrize("kill_at", [3, KW["maxit"]], ids=["checkpoint", "last-checkpoint-and-gather"])
def test_killed_before_checkpoint_and_final_gather(a, ref, client, workers, tmp_path, kill_at):
    # After the callback of iteration 3 (and of the last) come the checkpoint save — which
    # gathers the H blocks from the workers — and, at the end, the final gather of H.
    ck = str(tmp_path / "ck.zarr")

    def on_iteration(rec):
        if rec.iteration == kill_at:
            kill(workers)

    model = within(lambda: dnmf.nmf(a, 4, client=client, on_iteration=on_iteration, checkpoint=ck,
                                    checkpoint_every=3, **KW))
    assert_same_fit(model, ref)
    # the checkpoint written after the recovery holds the right H: resuming the finished fit
    # returns it unchanged
    resumed = within(lambda: dnmf.nmf(a, 4, client=client, checkpoint=ck, checkpoint_every=3, resume=True, **KW))
    assert_same_fit(resumed, ref)


@pytest.mark.parametrize("seed", range(6))
def test_killed_at_a_random_moment(a, ref, client, workers, seed, tmp_path):
    rnd = random.Random(seed)
    t0 = time.perf_counter()
    within(lambda: dnmf.nmf(a, 4, client=client, **KW))  # undisturbed: how long a fit takes now
    delay = rnd.uniform(0.0, 0.9 * (time.perf_counter() - t0))
    # odd seeds save a checkpoint every 2 iterations, so the kill may also hit a save
    ck = dict(checkpoint=str(tmp_path / "ck.zarr"), checkpoint_every=2) if seed % 2 else {}
    timer = threading.Timer(delay, kill, (workers, rnd.randrange(2)))
    timer.start()
    model = within(lambda: dnmf.nmf(a, 4, client=client, **ck, **KW))
    timer.join()
    assert_same_fit(model, ref)


@pytest.fixture(scope="module")
def store(a, tmp_path_factory):
    """``a`` as a dnmf Zarr store with the fits' blocks (the streamed fits read it every iteration)."""
    return dnmf.io.write_zarr(a, tmp_path_factory.mktemp("faults") / "a.zarr", block_nnz=KW["block_nnz"])


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.04])
def test_streamed_fit_killed_while_block_tasks_run(store, ref, client, workers, delay, caplog):
    # out_of_core=True: each worker's chunk task reads its run of blocks from the store in every
    # iteration; a worker killed before, while or after it reads re-places the sources and redoes
    # the iteration: the factors are the in-memory fit's, bitwise (same blocks, same tree).
    timer = []

    def on_iteration(rec):
        if rec.iteration == 3:
            timer.append(threading.Timer(delay, kill, (workers, 1)))
            timer[0].start()

    with caplog.at_level("WARNING", logger="dnmf.engine.als"):
        model = within(lambda: dnmf.nmf(store, 4, client=client, out_of_core=True, on_iteration=on_iteration, **KW))
    timer[0].join()
    assert model.misc["out_of_core"] is True
    assert any("re-placing the blocks" in r.getMessage() for r in caplog.records)  # the kill was met
    assert_same_fit(model, ref)


@pytest.mark.parametrize("seed", range(2))
def test_streamed_fit_killed_at_a_random_moment(store, ref, client, workers, seed):
    rnd = random.Random(100 + seed)
    t0 = time.perf_counter()
    within(lambda: dnmf.nmf(store, 4, client=client, out_of_core=True, **KW))  # undisturbed: its time now
    timer = threading.Timer(rnd.uniform(0.0, 0.9 * (time.perf_counter() - t0)), kill, (workers, rnd.randrange(2)))
    timer.start()
    model = within(lambda: dnmf.nmf(store, 4, client=client, out_of_core=True, **KW))
    timer.join()
    assert_same_fit(model, ref)


def test_recoveries_exhausted_raise_worker_lost(a, client, workers):
    blocked = dnmf.io.as_blocked(a, block_nnz=KW["block_nnz"])
    w0 = np.random.default_rng(0).uniform(size=(a.shape[0], 4))
    killed = []

    def on_iteration(rec):
        if rec.iteration == 2:
            killed.append(kill(workers))

    ex = DaskExecutor(client, max_recoveries=0)
    with pytest.raises(WorkerLostError) as info:
        within(lambda: fit_als(blocked, w0, ALSOptions(k=4, tol=0, maxit=6), ex, on_iteration=on_iteration))
    assert info.value.worker == killed[0]
    msg = str(info.value)
    assert msg.startswith(f"A Dask worker was lost ({killed[0]}) during ")
    assert "gave up after 0 recoveries (max_recoveries=0) with 2 iterations done" in msg
    assert "`dnmf run CONFIG --resume` continues from the last checkpoint" in msg
    assert isinstance(info.value, dnmf.DnmfError)


def test_scatter_to_a_worker_that_left_the_cluster_is_a_loss_not_a_hang(client, workers):
    # The race of a kill just before a recovery's re-placement (seen in CI): the executor lists
    # the workers, one of them dies and the scheduler removes it, then a scatter is sent to it.
    # distributed's direct scatter waits, up to its timeout (600 s), for a target to run; a worker
    # that left never does. Each scatter path must fail fast as a lost worker instead.
    ex = DaskExecutor(client)
    x = np.arange(40_000, dtype=float)  # 320 kB: scattered, not inline
    handles = ex.put_blocks([x, x + 1])  # probes both workers: direct transfers from here on
    dead = kill(workers)
    deadline = time.monotonic() + 60
    while dead in scheduler_workers(client):
        assert time.monotonic() < deadline, "the scheduler did not remove the killed worker"
        time.sleep(0.05)
    ex.release(handles)
    for scatter in (lambda: ex._scatter([x], workers=[dead]), lambda: ex._scatter_direct([x], [dead])):
        t0 = time.perf_counter()
        with pytest.raises(WorkerLostError, match="left the cluster before the scatter reached it"):
            within(scatter, timeout=30)
        assert time.perf_counter() - t0 < 10  # one poll of the scheduler (0.25 s), not 600 s


def test_task_errors_are_not_worker_losses(client, workers):
    # An OSError raised by a task is the task's own error, not a lost worker.
    def read_missing(path):
        return open(path)

    with pytest.raises(FileNotFoundError):
        DaskExecutor(client).map(read_missing, ["/nonexistent/dnmf-test"])


def test_client_must_be_a_client_false_or_none(a):
    msg = "The 'client' parameter of nmf must be a distributed.Client, False or None. Got 'foo' instead."
    with pytest.raises(dnmf.InputError) as info:
        get_executor("foo")
    assert str(info.value) == msg
    with pytest.raises(dnmf.InputError) as info:
        dnmf.nmf(a, 4, client="foo", **KW)
    assert str(info.value) == msg


def test_executor_memory_and_context_manager(client, workers):
    with get_executor(False, n_threads=2) as ex:
        assert isinstance(ex, LocalExecutor) and ex.available_memory() > 0
    with pytest.raises(RuntimeError):  # closed on exit
        ex._pool.submit(print)
    with DaskExecutor(client) as ex:
        assert ex.available_memory() == 2 * 2**30  # the workers' memory_limit


# ---------------------------------------------------------------------------------------------
# The masked loop (engine/masked.py): its own placement (column blocks, the row-block
# transpose), column tasks, gather of H, row tasks and gather of W — a kill at any of them
# ---------------------------------------------------------------------------------------------

MASKED_KW = dict(KW, test_fraction=0.1, cv_seed=2, patience=100)


@pytest.fixture(scope="module")
def masked_ref(a):
    return dnmf.nmf(a, 4, client=False, **MASKED_KW)


def assert_same_masked_fit(model, ref):
    assert_same_fit(model, ref)
    np.testing.assert_array_equal(model.misc["test_loss_history"], ref.misc["test_loss_history"])


def test_masked_fit_killed_between_iterations(a, masked_ref, client, workers):
    killed = []

    def on_iteration(rec):
        if rec.iteration == 2:
            killed.append(kill(workers))

    model = within(lambda: dnmf.nmf(a, 4, client=client, on_iteration=on_iteration, **MASKED_KW))
    assert killed and model.misc["iter"] == MASKED_KW["maxit"]
    assert_same_masked_fit(model, masked_ref)


@pytest.mark.parametrize("seed", range(4))
def test_masked_fit_killed_at_a_random_moment(a, masked_ref, client, workers, seed):
    # The first call also times an undisturbed fit; the kill then lands anywhere in the next
    # one: placement and transpose, column tasks, the H gather, row tasks or the W gather.
    rnd = random.Random(100 + seed)
    t0 = time.perf_counter()
    within(lambda: dnmf.nmf(a, 4, client=client, **MASKED_KW))
    delay = rnd.uniform(0.0, 0.9 * (time.perf_counter() - t0))
    timer = threading.Timer(delay, kill, (workers, rnd.randrange(2)))
    timer.start()
    model = within(lambda: dnmf.nmf(a, 4, client=client, **MASKED_KW))
    timer.join()
    assert_same_masked_fit(model, masked_ref)


# ---------------------------------------------------------------------------------------------
# The KL loop (engine/kl.py): placement, block tasks, the reduction and the gather of H
# ---------------------------------------------------------------------------------------------

KL_KW = dict(KW, loss="kl")


@pytest.fixture(scope="module")
def kl_ref(a):
    return dnmf.nmf(a, 4, client=False, **KL_KW)


def test_kl_fit_killed_between_iterations(a, kl_ref, client, workers):
    killed = []

    def on_iteration(rec):
        if rec.iteration == 2:
            killed.append(kill(workers))

    model = within(lambda: dnmf.nmf(a, 4, client=client, on_iteration=on_iteration, **KL_KW))
    assert killed and model.misc["iter"] == KL_KW["maxit"]
    assert_same_fit(model, kl_ref)  # H is on the client: the redone iteration is the same arithmetic


@pytest.mark.parametrize("seed", range(3))
def test_kl_fit_killed_at_a_random_moment(a, kl_ref, client, workers, seed):
    rnd = random.Random(200 + seed)
    t0 = time.perf_counter()
    within(lambda: dnmf.nmf(a, 4, client=client, **KL_KW))
    delay = rnd.uniform(0.0, 0.9 * (time.perf_counter() - t0))
    timer = threading.Timer(delay, kill, (workers, rnd.randrange(2)))
    timer.start()
    model = within(lambda: dnmf.nmf(a, 4, client=client, **KL_KW))
    timer.join()
    assert_same_fit(model, kl_ref)
