"""Two executors for the same block tasks: a Dask ``distributed`` client and a thread pool.

The engine (and every algorithm built on it) talks to an :class:`Executor` only through
these verbs, so the same code runs on a cluster and in a notebook without one:

``put(value)``
    make a value available to tasks (scattered to one worker on a cluster, from which the
    workers fetch it; identity locally).
``put_blocks(sources)``
    place one object per column block (block j on one live worker, or kept locally).
``map_blocks(fn, *per_block, args=(), n_out=1)``
    run ``fn(*per_block_j, *args)`` for every block j; returns one handle per block (or a tuple
    of ``n_out`` handles per block when ``fn`` returns a tuple). Handles of the distributed
    executor are futures that stay on the worker that computed them; a task preferably runs
    on the worker holding its first per-block argument (a handle from ``put_blocks``), or
    anywhere when that argument is a plain value (a small picklable object, e.g. a lazy
    block source).
``tree_reduce(combine, handles)``
    combine per-block results with a fixed binary tree in block order, so the result does not
    depend on which task finished first nor on the number of workers.
``gather(handles)`` / ``map(fn, items)``
    fetch results; run independent tasks (sweeps, bootstrap chunks) and return them in order.

Handles are opaque: only pass them back into the executor that made them.

Faults
------
A lost worker is the executor's business (CONVENTIONS §10): every verb of
:class:`DaskExecutor` that talks to the cluster waits at most ``timeout`` seconds and reports a
lost worker — a closed comm, a cancelled or ``KilledWorker`` future, scattered data gone with
its worker, a wait that timed out — as :class:`~dnmf.exceptions.WorkerLostError`, recognized
by exception type. An error raised by a task itself is re-raised unchanged. Callers catch
``WorkerLostError`` only, re-place their blocks (``put_blocks`` uses the live workers) and
redo the lost work, at most ``max_recoveries`` times.
"""

from __future__ import annotations

import abc
import logging
import operator
import os
import uuid
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any, Callable, Sequence

from ..exceptions import DnmfError, WorkerLostError

logger = logging.getLogger(__name__)

__all__ = ["Executor", "LocalExecutor", "DaskExecutor", "get_executor", "scheduler_workers",
           "DEFAULT_TIMEOUT", "DEFAULT_MAX_RECOVERIES"]

#: Longest wait (seconds) for one call to the cluster: a scatter, or the results of one round
#: of block tasks (an ALS iteration). Past it the worker is considered lost.
DEFAULT_TIMEOUT = 600.0
#: How many lost-worker recoveries a fit attempts before it raises WorkerLostError.
DEFAULT_MAX_RECOVERIES = 3


class Executor(abc.ABC):
    """Interface shared by :class:`LocalExecutor` and :class:`DaskExecutor`.

    Usable as a context manager: ``with get_executor(client) as ex: ...`` closes it.
    """

    n_workers: int = 1
    distributed: bool = False
    #: Lost-worker recoveries a fit may attempt (none are needed in-process).
    max_recoveries: int = 0

    @abc.abstractmethod
    def put(self, value: Any) -> Any:
        """See the module docstring."""

    @abc.abstractmethod
    def put_blocks(self, values: Sequence[Any]) -> list:
        """See the module docstring."""

    @abc.abstractmethod
    def map_blocks(self, fn: Callable, *per_block: Sequence, args: tuple = (), n_out: int = 1) -> list:
        """See the module docstring."""

    @abc.abstractmethod
    def tree_reduce(self, combine: Callable, handles: Sequence) -> Any:
        """See the module docstring."""

    @abc.abstractmethod
    def gather(self, handles: Sequence) -> list:
        """See the module docstring."""

    @abc.abstractmethod
    def map(self, fn: Callable, items: Sequence, *, args: tuple = ()) -> list:
        """See the module docstring."""

    def release(self, handles: Sequence) -> None:
        """Drop handles so a cluster can free their memory (no-op locally)."""

    def available_memory(self) -> float:
        """Bytes of memory of one worker: here, this machine's available memory."""
        import psutil

        return float(psutil.virtual_memory().available)

    def close(self) -> None:
        """Free what the executor holds (its thread pool; a Dask client stays open)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under ``taskset``), else all."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _tree_reduce_local(combine: Callable, values: list) -> Any:
    level = list(values)
    while len(level) > 1:
        nxt = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class LocalExecutor(Executor):
    """In-process executor: block tasks on a thread pool (numba kernels release the GIL).

    Used when no distributed client exists, so a notebook call on a small matrix costs
    milliseconds instead of a cluster start-up.
    """

    def __init__(self, n_threads: int | None = None):
        self.n_threads = n_threads or _usable_cores()
        self.n_workers = 1
        self._pool = ThreadPoolExecutor(self.n_threads) if self.n_threads > 1 else None

    def put(self, value):
        return value

    def put_blocks(self, values):
        return list(values)

    def _run(self, fn, calls):
        if self._pool is None or len(calls) == 1:
            return [fn(*c) for c in calls]
        return list(self._pool.map(lambda c: fn(*c), calls))

    def map_blocks(self, fn, *per_block, args=(), n_out=1):
        calls = [tuple(p[j] for p in per_block) + tuple(args) for j in range(len(per_block[0]))]
        out = self._run(fn, calls)
        if n_out == 1:
            return out
        return [tuple(o) for o in out]

    def tree_reduce(self, combine, handles):
        return _tree_reduce_local(combine, list(handles))

    def gather(self, handles):
        return list(handles)

    def map(self, fn, items, *, args=()):
        return self._run(fn, [(it, *args) for it in items])

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class DaskExecutor(Executor):
    """Executor over a ``distributed.Client``: futures stay on workers between iterations.

    Parameters
    ----------
    client : distributed.Client
    timeout : float, default DEFAULT_TIMEOUT
        Longest wait in seconds for one call to the cluster (a scatter; the results of one
        round of block tasks, i.e. one ALS iteration); past it the call raises WorkerLostError.
        ``map`` waits for its tasks without a limit (sweep tasks may run for long).
    max_recoveries : int, default DEFAULT_MAX_RECOVERIES
        Lost-worker recoveries a fit on this executor attempts before it gives up.
    wait_timeout : float, default 60
        How long to wait for a first worker (a fresh or restarting cluster may have none).
    """

    distributed = True

    def __init__(self, client, *, timeout: float = DEFAULT_TIMEOUT, max_recoveries: int = DEFAULT_MAX_RECOVERIES,
                 wait_timeout: float = 60.0):
        self.client = client
        self.timeout = float(timeout)
        self.max_recoveries = int(max_recoveries)
        self.wait_timeout = float(wait_timeout)
        try:
            self._workers = self._live_workers()
        except WorkerLostError as exc:
            raise DnmfError(f"The Dask cluster at {client.scheduler.address} has no workers (waited "
                            f"{wait_timeout:.0f} s). Start workers or pass client=False.") from exc
        self.n_workers = len(self._workers)
        self._home: dict = {}  # future key -> address of the worker its block task is pinned to

    # -- talking to the cluster, with bounded waits and typed worker losses --------------------

    def _bounded(self, call: Callable, timeout: float | None, what: str, futures: Sequence = (), *,
                 scatter: bool = False):
        """``call()`` — a client method called with ``asynchronous=True`` — run on the client's
        event loop for at most ``timeout`` seconds; worker losses raise WorkerLostError."""

        async def run():
            return await call()

        try:
            return self.client.sync(run, callback_timeout=timeout)
        except Exception as exc:
            if not _is_worker_loss(exc, futures, scatter=scatter):
                raise
            self._drain(futures)
            raise self._lost(what, exc) from exc

    def _drain(self, futures: Sequence) -> None:
        """Wait (at most ``timeout``) until none of ``futures`` is still running, so that a retry
        of the failed call cannot race its left-over tasks (e.g. two checkpoint writers)."""
        from distributed import wait

        try:
            wait([f for f in futures if hasattr(f, "key")], timeout=self.timeout)
        except (CancelledError, OSError):  # some were cancelled (lost) or the wait timed out
            pass

    def _lost(self, what: str, exc: BaseException) -> WorkerLostError:
        """The WorkerLostError for ``exc``, naming the workers gone since the blocks were placed."""
        try:
            live = set(scheduler_workers(self.client))
        except OSError:  # the scheduler itself is unreachable
            live = set()
        gone = sorted(set(self._workers) - live)
        worker = gone[0] if gone else getattr(getattr(exc, "last_worker", None), "address", None)
        who = ", ".join(gone) if gone else (worker or "address unknown")
        return WorkerLostError(f"A Dask worker was lost ({who}) during {what}: {type(exc).__name__}: {exc}",
                               worker=worker)

    def _live_workers(self) -> list[str]:
        """Addresses of the workers alive now, waiting up to ``wait_timeout`` for a first one."""
        try:
            workers = sorted(scheduler_workers(self.client))
            if not workers:
                self.client.wait_for_workers(1, timeout=self.wait_timeout)
                workers = sorted(scheduler_workers(self.client))
        except OSError as exc:  # TimeoutError is an OSError
            raise WorkerLostError(f"No Dask worker is left (waited {self.wait_timeout:.0f} s for one): "
                                  f"{type(exc).__name__}: {exc}") from exc
        return workers

    def _scatter(self, values: list, workers: list | None = None) -> list:
        # Never broadcast=True: the scheduler's replicate loop never ends when a target worker
        # dies during it (and holds its replica lock while looping).
        def call():
            return self.client.scatter(values, workers=workers, hash=False, asynchronous=True)

        return self._bounded(call, self.timeout, "a scatter", scatter=True)

    def _results(self, futures: list, timeout: float | None, what: str) -> list:
        def call():
            return self.client.gather(futures, asynchronous=True)

        return self._bounded(call, timeout, what, futures)

    # -- the verbs -----------------------------------------------------------------------------

    def put(self, value):
        if _is_small(value):
            return value
        (handle,) = self._scatter([value])
        return handle

    def put_blocks(self, values):
        # Contiguous runs of blocks per live worker (block j on worker ⌊j·W/n⌋): the fixed
        # reduction tree pairs neighbouring blocks, so all but its top log2(W) levels combine
        # partials already on the same worker instead of shipping each m × k partial across.
        values = list(values)
        self._workers = workers = self._live_workers()
        self.n_workers = len(workers)
        n = len(values)
        runs: dict[str, list[int]] = {}
        for j in range(n):
            runs.setdefault(workers[j * len(workers) // n], []).append(j)
        handles: list = [None] * n
        for addr, js in runs.items():
            for j, fut in zip(js, self._scatter([values[j] for j in js], workers=[addr])):
                handles[j] = fut
                self._home[fut.key] = addr
        return handles

    def map_blocks(self, fn, *per_block, args=(), n_out=1):
        from distributed import Future

        homes = [self._home_of(h) for h in per_block[0]]
        shared = self._put_near(tuple(args), homes)
        out = []
        for j, home in enumerate(homes):
            # Run where the block is (a loose restriction: elsewhere if that worker is gone),
            # rather than where a large shared argument happens to be.
            fut = self._submit(fn, (*(p[j] for p in per_block), *shared.get(home, shared[None])), home,
                               key=_key(fn, j))
            if home is not None:
                self._home[fut.key] = home
            if n_out == 1:
                out.append(fut)
            else:
                # One handle per item of the result, with no task of its own: the tasks that
                # take a part index the tuple themselves (n_out getitem tasks per block cost
                # a scheduler round each; docs/architecture.md, "Cluster overhead").
                out.append(tuple(_Part(Future(fut.key, self.client), i, home) for i in range(n_out)))
                fut.release()
        return out

    def _put_near(self, args: tuple, homes: list) -> dict:
        """The shared ``args`` of one round of block tasks, by worker: each large one (W in the
        H step) sent once to each worker that runs a task, small ones inline.

        Inline, a large argument would be pickled into every task and pass through the
        scheduler once per block. Here it is the inline argument of one small task per worker
        (``_shared_value``, loosely pinned there), which the block tasks depend on: one message
        per worker, no round trip for the client to wait on (a scatter is one), and a task the
        scheduler recomputes elsewhere if its worker is lost (docs/architecture.md, "Cluster
        overhead"). Returns ``{address: args, None: args}``.
        """
        large = [i for i, a in enumerate(args) if not _is_small(a)]
        targets = sorted({h for h in homes if h is not None})
        if not large or not targets:
            return {None: tuple(self.put(a) for a in args)}
        out = {}
        for addr in targets:
            full = list(args)
            for i in large:
                full[i] = self._submit(_shared_value, (args[i],), addr)
            out[addr] = tuple(full)
        out[None] = out[targets[0]]
        return out

    def _home_of(self, handle):
        """Worker the handle's data lives on (None for a plain value or an unplaced result)."""
        if isinstance(handle, _Part):
            return handle.home
        return self._home.get(getattr(handle, "key", None))

    def _submit(self, fn, values: tuple, home, *, key=None):
        """``client.submit(fn, *values)`` preferring worker ``home``; part handles among
        ``values`` are passed as their task's future and indexed inside the task."""
        picks = tuple(v.index if isinstance(v, _Part) else None for v in values)
        if any(p is not None for p in picks):
            values = (fn, picks, *(v.future if isinstance(v, _Part) else v for v in values))
            fn = _call_picking
        return self.client.submit(fn, *values, pure=False, key=key or _key(fn, "c"),
                                  workers=None if home is None else [home],
                                  allow_other_workers=home is not None)

    def tree_reduce(self, combine, handles):
        # The fixed tree of _tree_reduce_local, cut where its leaves stop sharing a worker:
        # every largest subtree whose blocks live on one worker is combined by one task there
        # (its leaves are already local), and the few subtree results are combined here by the
        # rest of the tree. The same additions in the same order for any number of workers;
        # one task per worker instead of one per tree node (docs/architecture.md, "Cluster
        # overhead").
        handles = list(handles)
        tree = _tree_shape(len(handles))
        homes = [self._home_of(h) for h in handles]
        tops: list = []
        made: list = []  # the subtree tasks submitted here (released once fetched)

        def cut(node):
            leaves = _tree_leaves(node)
            if len({homes[i] for i in leaves}) == 1:
                if len(leaves) == 1 and not isinstance(handles[leaves[0]], _Part):
                    tops.append(handles[leaves[0]])
                else:
                    local = _relabel(node, {i: t for t, i in enumerate(leaves)})
                    made.append(self._submit(_combine_subtree, (combine, local, *(handles[i] for i in leaves)),
                                             homes[leaves[0]]))
                    tops.append(made[-1])
                return len(tops) - 1
            return (cut(node[0]), cut(node[1]))

        top = cut(tree)
        futs = [t for t in tops if hasattr(t, "key")]
        got = iter(self._results(futs, self.timeout, "a reduction of block results") if futs else ())
        values = [next(got) if hasattr(t, "key") else t for t in tops]
        self.release(made)
        return _eval_tree(combine, top, values)

    def gather(self, handles):
        handles = list(handles)
        # A part is fetched alone (a small indexing task where it lives), not with its tuple.
        picked = [self._submit(operator.getitem, (h.future, h.index), h.home) if isinstance(h, _Part) else h
                  for h in handles]
        try:
            return self._results(picked, self.timeout, "a gather of block results")
        finally:
            self.release([p for p, h in zip(picked, handles) if p is not h])

    def map(self, fn, items, *, args=()):
        args = tuple(self.put(a) for a in args)
        futs = [self._submit(fn, (it, *args), None) for it in items]
        return self._results(futs, None, "independent tasks")

    def release(self, handles):
        for h in handles:
            if isinstance(h, tuple):
                self.release(h)
            elif isinstance(h, _Part):
                h.future.release()
            elif hasattr(h, "release"):
                self._home.pop(h.key, None)
                h.release()

    def available_memory(self):
        """Bytes of memory of the smallest worker (its ``memory_limit``); this machine's
        available memory when a worker has no limit."""
        limits = [w.get("memory_limit") or 0 for w in scheduler_workers(self.client).values()]
        if limits and all(limits):
            return float(min(limits))
        return super().available_memory()

    def close(self):
        self._home.clear()


class _Part:
    """Handle of item ``index`` of a task's tuple result (``map_blocks(..., n_out=...)``).

    Holds its own reference to the task's future, so the tuple stays on its worker until every
    part is released; the tasks that take a part index the tuple themselves.
    """

    __slots__ = ("future", "index", "home")

    def __init__(self, future, index: int, home: str | None):
        self.future, self.index, self.home = future, index, home

    @property
    def key(self):
        return self.future.key

    @property
    def status(self) -> str:
        return self.future.status


def _shared_value(value):
    """Task: ``value`` itself (an argument shared by the block tasks of one worker)."""
    return value


def _call_picking(fn, picks, *args):
    """``fn(*args)`` with ``args[i][picks[i]]`` for each part handle (``picks[i]`` not None)."""
    return fn(*(a if p is None else a[p] for a, p in zip(args, picks)))


def _tree_shape(n: int):
    """The fixed binary tree of :func:`_tree_reduce_local` over leaves 0..n-1, as nested pairs."""
    level: list = list(range(n))
    while len(level) > 1:
        nxt = [(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _tree_leaves(node) -> list:
    return [node] if isinstance(node, int) else _tree_leaves(node[0]) + _tree_leaves(node[1])


def _relabel(node, new: dict):
    return new[node] if isinstance(node, int) else (_relabel(node[0], new), _relabel(node[1], new))


def _eval_tree(combine, node, values):
    """Combine ``values`` along ``node`` (nested pairs of indices into ``values``)."""
    if isinstance(node, int):
        return values[node]
    return combine(_eval_tree(combine, node[0], values), _eval_tree(combine, node[1], values))


def _combine_subtree(combine, node, *values):
    """Task: one subtree of the reduction over values already on this worker."""
    return _eval_tree(combine, node, values)


def scheduler_workers(client) -> dict:
    """Address → info of every worker of ``client``'s cluster.

    ``Client.scheduler_info`` lists only five workers by default since distributed 2025.1
    (``n_workers=-1`` lists all); older versions list all and take no ``n_workers``.
    """
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:
        info = client.scheduler_info()
    return dict(info.get("workers", {}))


def _is_worker_loss(exc: BaseException, futures: Sequence = (), *, scatter: bool = False) -> bool:
    """Whether ``exc``, raised while waiting for ``futures`` (or by a scatter), means a lost worker.

    By type only: a task killed with its worker (``KilledWorker``), futures cancelled because
    their data went with a worker, comm failures and timeouts (``OSError``s:
    ``CommClosedError``, ``TimeoutError``, ...) unless a task raised that ``OSError`` itself (its
    future is then in state "error"), and — from a scatter — the scheduler's ``KeyError`` for a
    target worker it has just removed.
    """
    from distributed import KilledWorker

    if isinstance(exc, (KilledWorker, CancelledError)):
        return True
    if scatter:
        return isinstance(exc, (OSError, KeyError))
    return isinstance(exc, OSError) and not any(getattr(f, "status", None) == "error" for f in futures)


def _key(fn, j) -> str:
    return f"{getattr(fn, '__name__', 'task')}-{j}-{uuid.uuid4().hex[:12]}"


def _is_small(value) -> bool:
    """Whether ``value`` travels inline in a task (under 100 kB by dask's ``sizeof``: arrays,
    and tuples of them such as the H step's arguments)."""
    import numpy as np
    from dask.sizeof import sizeof

    if isinstance(value, np.ndarray):
        return value.nbytes < 100_000
    if isinstance(value, tuple):
        return sizeof(value) < 100_000
    return not hasattr(value, "nbytes")


def get_executor(client=None, n_threads: int | None = None, *, func: str = "nmf", timeout: float = DEFAULT_TIMEOUT,
                 max_recoveries: int = DEFAULT_MAX_RECOVERIES) -> Executor:
    """The executor for ``client``; the active default client if None; else a thread pool.

    ``client=False`` forces the in-process thread pool even when a default client exists.
    Anything else that is not a ``distributed.Client`` raises InputError (naming ``func``).
    ``timeout`` and ``max_recoveries`` configure a :class:`DaskExecutor`.
    """
    from .._validation import param_error

    if client is False:
        return LocalExecutor(n_threads)
    try:
        from distributed import Client, default_client
    except ImportError:
        Client = default_client = None
    if client is not None and (Client is None or not isinstance(client, Client)):
        raise param_error("client", func, "a distributed.Client, False or None", client)
    if client is None and default_client is not None:
        try:
            client = default_client()
        except ValueError:
            client = None
    if client is None:
        return LocalExecutor(n_threads)
    return DaskExecutor(client, timeout=timeout, max_recoveries=max_recoveries)
