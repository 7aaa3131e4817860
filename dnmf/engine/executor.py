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
    executor designate results that stay on the worker that computed them. When every first
    per-block argument lives on a worker (a handle from ``put_blocks`` — a block held in
    memory or a lazy source its task streams from disk — or a result of an earlier
    ``map_blocks`` on them), the blocks of each worker — a contiguous run — are one chunk task
    there, whose threads (as many as the worker has) take the next block of the run as each
    finishes: a round costs a scheduler hop per worker instead of per block, and a thread that
    runs faster takes more blocks. The results are those of one call per block, so nothing
    numerical depends on the chunking. Otherwise — a plain value as first argument — there is
    one task per block, which the scheduler places and balances.
``tree_reduce(combine, handles)``
    combine per-block results with a fixed binary tree in block order, so the result does not
    depend on which task finished first nor on the number of workers.
``gather(handles)`` / ``map(fn, items)``
    fetch results; run independent tasks (sweeps, bootstrap chunks) and return them in order.
``standalone(handles)``
    handles that a ``distributed.Client`` fetches by itself (``client.gather``), one per block,
    for results handed to users (``nmfre_blocked``'s ``U_blocks``); the values locally.

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
import asyncio
import functools
import logging
import os
import sys
import uuid
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any, Callable, Sequence

from ..exceptions import DnmfError, WorkerLostError

logger = logging.getLogger(__name__)

#: Seconds a fit's end waits for its workers to free their pooled buffers.
RELEASE_TIMEOUT = 10.0

__all__ = ["Executor", "LocalExecutor", "DaskExecutor", "get_executor", "scheduler_workers", "usable_cores",
           "DEFAULT_TIMEOUT", "DEFAULT_MAX_RECOVERIES"]

#: Longest wait (seconds) for one call to the cluster: a scatter, or the results of one round
#: of block tasks (an ALS iteration). Past it the worker is considered lost.
DEFAULT_TIMEOUT = 600.0
#: How many lost-worker recoveries a fit attempts before it raises WorkerLostError.
DEFAULT_MAX_RECOVERIES = 3

# Seconds to wait for a worker's reply over a direct connection before this client sends its data
# through the scheduler instead (DaskExecutor._direct).
DIRECT_PROBE_TIMEOUT = 5.0
#: Seconds between the checks, while a scatter to given workers is pending, that its targets are
#: still workers of the cluster (DaskExecutor._bounded).
SCATTER_TARGET_POLL = 0.25


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

    def standalone(self, handles: Sequence) -> list:
        """See the module docstring."""
        return list(handles)

    def release_buffers(self) -> None:
        """Free the pooled task outputs (``engine/buffers.py``) and the threads' reused
        block-read buffers (``io/chunks.py``, "Reused buffers") here, or on every worker:
        called when a fit ends."""
        release_pooled_buffers()

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


def usable_cores() -> int:
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
        self.n_threads = n_threads or usable_cores()
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
        self._reachable: dict = {}  # worker address -> whether this client reaches it directly
        self._later: list = []  # handles released with the next round's submission (:meth:`_release_later`)

    # -- talking to the cluster, with bounded waits and typed worker losses --------------------

    def _bounded(self, call: Callable, timeout: float | None, what: str, futures: Sequence = (), *,
                 scatter: bool = False, targets: Sequence[str] = ()):
        """``call()`` — a client method called with ``asynchronous=True`` — run on the client's
        event loop for at most ``timeout`` seconds; worker losses raise WorkerLostError.

        ``targets``: the workers a scatter sends to. ``distributed``'s direct scatter waits, up to
        its timeout, while none of its target workers is running: right for a worker paused for
        memory, but one that has left the cluster never runs again. A worker that died after
        :meth:`_live_workers` listed it, before the scatter reached it, hung the fit's recovery
        for the whole ``timeout`` (600 s). While such a scatter is pending, the scheduler is asked
        every :data:`SCATTER_TARGET_POLL` seconds whether its targets are still workers of the
        cluster; one that is not is a lost worker."""

        async def run():
            if not targets:
                return await call()
            return await self._unless_targets_leave(call(), targets)

        try:
            return self.client.sync(run, callback_timeout=timeout)
        except Exception as exc:
            if not _is_worker_loss(exc, futures, scatter=scatter):
                raise
            self._drain(futures)
            raise self._lost(what, exc) from exc

    async def _unless_targets_leave(self, awaitable, targets: Sequence[str]):
        """``await awaitable``; CommClosedError as soon as one of ``targets`` has left the cluster."""
        from distributed.comm import CommClosedError

        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=SCATTER_TARGET_POLL)
                if done:
                    return task.result()
                known = await self.client.scheduler.ncores(workers=list(targets))
                gone = sorted(set(targets) - set(known))
                if gone:
                    raise CommClosedError(f"worker {', '.join(gone)} left the cluster before the scatter reached it")
        finally:
            if not task.done():
                task.cancel()

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
        """Addresses of the workers alive now, waiting up to ``wait_timeout`` for a first one;
        their thread counts are kept in ``_nthreads`` (the chunks of ``map_blocks``)."""
        try:
            info = scheduler_workers(self.client)
            if not info:
                self.client.wait_for_workers(1, timeout=self.wait_timeout)
                info = scheduler_workers(self.client)
        except OSError as exc:  # TimeoutError is an OSError
            raise WorkerLostError(f"No Dask worker is left (waited {self.wait_timeout:.0f} s for one): "
                                  f"{type(exc).__name__}: {exc}") from exc
        self._nthreads = {addr: max(1, int(w.get("nthreads") or 1)) for addr, w in info.items()}
        return sorted(info)

    def _scatter(self, values: list, workers: list | None = None) -> list:
        # Never broadcast=True: the scheduler's replicate loop never ends when a target worker
        # dies during it (and holds its replica lock while looping).
        # Straight to the workers when this client reaches them (not through the scheduler).
        direct = self._direct(workers if workers is not None else self._workers)

        def call():
            # timeout: how long a direct scatter waits for a paused target worker to run again
            return self.client.scatter(values, workers=workers, hash=False, asynchronous=True, direct=direct,
                                       timeout=self.timeout)

        return self._bounded(call, self.timeout, "a scatter", scatter=True, targets=workers or ())

    def _results(self, futures: list, timeout: float | None, what: str) -> list:
        # Straight from the workers that hold them when this client reaches those workers, not
        # through the scheduler (docs/architecture.md, "Cluster overhead": "Direct transfers");
        # keys a worker no longer has are asked of the scheduler then (distributed's fallback).
        direct = self._direct(self._workers)

        def call():
            return self.client.gather(futures, asynchronous=True, direct=direct)

        return self._bounded(call, timeout, what, futures)

    def _direct(self, addresses) -> bool:
        """Whether data may go between this client and the workers at ``addresses`` directly.

        The client's own ``direct_to_workers`` decides when set. Otherwise each worker is asked
        for its identity over a direct connection, once per executor and worker, with a short
        timeout: a client that cannot reach the workers (a laptop outside the cluster's network,
        behind the scheduler's address only) keeps sending through the scheduler, as Dask does.
        """
        chosen = getattr(self.client, "direct_to_workers", None)
        if chosen is not None:
            return bool(chosen)
        new = sorted({a for a in addresses if a not in self._reachable})
        if new:
            async def probe(addr):
                try:
                    await asyncio.wait_for(self.client.rpc(addr).identity(), DIRECT_PROBE_TIMEOUT)
                    return True
                except Exception:  # unreachable, refused, or gone: not direct
                    return False

            async def probe_all():
                return await asyncio.gather(*(probe(a) for a in new))

            try:
                got = self.client.sync(probe_all)
            except Exception:
                got = [False] * len(new)
            self._reachable.update(zip(new, got))
        return all(self._reachable.get(a, False) for a in addresses)

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
        homes = [self._home_of(h) for h in per_block[0]]
        shared = self._put_near(tuple(args), homes)
        out: list = [None] * len(homes)
        for js in self._chunks(homes):
            home = homes[js[0]]
            # Run where the blocks are (a loose restriction: elsewhere if that worker is gone),
            # rather than where a large shared argument happens to be.
            near = shared.get(home, shared[None])
            if len(js) == 1:
                fut = self._submit(_run_block, (fn, len(per_block), *(p[js[0]] for p in per_block), *near), home,
                                   key=_key(fn, js[0]))
                out[js[0]] = self._result_handles(fut, home, (), n_out, 1)
            else:
                flat = tuple(p[j] for j in js for p in per_block)
                fut = self._submit(_run_chunk, (fn, len(per_block), len(js), self._nthreads.get(home, 1), *flat,
                                                *near), home, key=_key(fn, js[0]))
                for pos, j in enumerate(js):
                    out[j] = self._result_handles(fut, home, (pos,), n_out, len(js))
            if out[js[0]] is not fut:
                fut.release()  # the handles hold their own references
        self.release(())  # what waited for this round's submission (_release_later)
        return out

    def _chunks(self, homes: list) -> list[list[int]]:
        """The blocks of each task of a ``map_blocks`` round: per worker, its blocks (one chunk,
        run by the worker's threads, :func:`_run_chunk`), lazy sources streamed from disk
        included; one block per task when a block has no home."""
        if any(h is None for h in homes):
            return [[j] for j in range(len(homes))]
        runs: dict[str, list[int]] = {}
        for j, home in enumerate(homes):
            runs.setdefault(home, []).append(j)
        return list(runs.values())

    def _result_handles(self, fut, home, path: tuple, n_out: int, size: int):
        """The handle(s) of one block's result: ``fut`` itself (a one-block task, ``n_out == 1``),
        else parts designating item ``path`` (its position in a chunk's tuple) of ``fut``'s
        result, then each of its ``n_out`` items. Parts have no task of their own: the tasks that
        take a part index the result themselves (a getitem task per part would cost a scheduler
        round each; docs/architecture.md, "Cluster overhead")."""
        from distributed import Future

        if n_out == 1 and not path:
            if home is not None:
                self._home[fut.key] = home
            return fut
        if n_out == 1:
            return _Part(Future(fut.key, self.client), path, home, size)
        return tuple(_Part(Future(fut.key, self.client), (*path, i), home, 0) for i in range(n_out))

    def _put_near(self, args: tuple, homes: list) -> dict:
        """The shared ``args`` of one round of block tasks, by worker: each large one (W in the
        H step) sent once to each worker that runs a task, small ones inline.

        Inline, a large argument would be pickled into every task and pass through the
        scheduler once per block. Where this client reaches the workers (:meth:`_direct`) it is
        scattered to each of them over direct connections, all at once: it never passes through
        the scheduler, which on a LocalCluster shares the client's event-loop thread (and, on a
        real cluster, serves every client and worker). Otherwise it is the inline argument of one
        small task per worker (``_shared_value``, loosely pinned there), which the block tasks
        depend on. A worker lost with its copy loses the round's blocks with it: the fit's
        recovery re-places them (docs/architecture.md, "Cluster overhead"). Returns
        ``{address: args, None: args}``.
        """
        large = [i for i, a in enumerate(args) if not _is_small(a)]
        targets = sorted({h for h in homes if h is not None})
        if not large or not targets:
            return {None: tuple(self.put(a) for a in args)}
        if self._direct(targets):  # per target, the handles of its copies of the large arguments
            copies = self._scatter_direct([args[i] for i in large], targets)
        else:
            copies = [[self._submit(_shared_value, (args[i],), addr) for i in large] for addr in targets]
        out = {}
        for addr, handles in zip(targets, copies):
            full = list(args)
            for i, handle in zip(large, handles):
                full[i] = handle
            out[addr] = tuple(full)
        out[None] = out[targets[0]]
        return out

    def _scatter_direct(self, values: list, targets: list) -> list:
        """``values`` sent to each worker of ``targets`` over direct connections, all at once:
        per target, the futures of its copies. A target paused for memory is waited for (the
        scatter's check of running workers) as long as a round of tasks would be, ``timeout``."""
        async def call():
            return await asyncio.gather(*(self.client.scatter(values, workers=[addr], direct=True, hash=False,
                                                              asynchronous=True, timeout=self.timeout)
                                          for addr in targets))

        return self._bounded(call, self.timeout, "a scatter of shared arguments", scatter=True, targets=targets)

    def _home_of(self, handle):
        """Worker the handle's data lives on (None for a plain value or an unplaced result)."""
        if isinstance(handle, _Part):
            return handle.home
        return self._home.get(getattr(handle, "key", None))

    def _submit(self, fn, values: tuple, home, *, key=None):
        """``client.submit(fn, *values)`` preferring worker ``home``; part handles among
        ``values`` are passed as their task's future and indexed (along their path) inside the task."""
        picks = tuple(v.path if isinstance(v, _Part) else None for v in values)
        if any(p is not None for p in picks):
            values = (fn, picks, *(v.future if isinstance(v, _Part) else v for v in values))
            fn = _call_picking
        return self.client.submit(fn, *values, pure=False, key=key or _key(fn, "c"),
                                  workers=None if home is None else [home],
                                  allow_other_workers=home is not None)

    def tree_reduce(self, combine, handles):
        # The fixed tree of _tree_reduce_local, cut where its leaves stop sharing a worker:
        # every largest subtree whose blocks live on one worker is combined there (its leaves
        # are already local) — all of one worker's subtrees by one task — and the few subtree
        # results are combined here by the rest of the tree. The same additions in the same
        # order for any number of workers; one task per worker instead of one per tree node
        # (docs/architecture.md, "Cluster overhead").
        handles = list(handles)
        tree = _tree_shape(len(handles))
        homes = [self._home_of(h) for h in handles]
        tops: list = []  # a handle fetched as it is, or (home, subtree, its leaves)

        def cut(node):
            leaves = _tree_leaves(node)
            if len({homes[i] for i in leaves}) == 1:
                if len(leaves) == 1 and not isinstance(handles[leaves[0]], _Part):
                    tops.append(handles[leaves[0]])
                else:
                    tops.append((homes[leaves[0]], node, leaves))
                return len(tops) - 1
            return (cut(node[0]), cut(node[1]))

        top = cut(tree)
        by_home: dict = {}
        for t, spec in enumerate(tops):
            if isinstance(spec, tuple):
                by_home.setdefault(spec[0], []).append(t)
        fetch: list = []
        where: list = [None] * len(tops)  # per top: (index into fetch, item of it or None)
        made: list = []  # the subtree tasks submitted here (released once fetched)
        for home, ts in by_home.items():
            nodes, leaf_handles = [], []
            for q, t in enumerate(ts):
                _, node, leaves = tops[t]
                nodes.append(_relabel(node, {i: len(leaf_handles) + r for r, i in enumerate(leaves)}))
                leaf_handles.extend(handles[i] for i in leaves)
                where[t] = (len(fetch), q)
            made.append(self._submit(_combine_subtrees, (combine, tuple(nodes), *leaf_handles), home))
            fetch.append(made[-1])
        for t, spec in enumerate(tops):
            if not isinstance(spec, tuple):
                where[t] = (len(fetch), None)
                fetch.append(spec)
        futs = [f for f in fetch if hasattr(f, "key")]
        got = iter(self._results(futs, self.timeout, "a reduction of block results") if futs else ())
        fetched = [next(got) if hasattr(f, "key") else f for f in fetch]
        self._release_later(made)
        return _eval_tree(combine, top, [fetched[f] if q is None else fetched[f][q] for f, q in where])

    def gather(self, handles):
        handles = list(handles)
        # The parts of one task's result are fetched together: the whole result when they are
        # all of it (every block of a chunk), else the items asked for, picked by one small task
        # where the result lives (not the rest of it, e.g. a block's partials with its H).
        fetch: list = []  # futures to fetch
        where: list = []  # per handle: (index into fetch, path into what it fetches)
        parts: dict = {}
        for i, h in enumerate(handles):
            if isinstance(h, _Part):
                parts.setdefault(h.key, []).append(i)
                where.append(None)
            else:
                where.append((len(fetch), ()))
                fetch.append(h)
        made = []
        for idx in parts.values():
            first = handles[idx[0]]
            paths = list(dict.fromkeys(handles[i].path for i in idx))
            if first.size and sorted(paths) == [(q,) for q in range(first.size)]:
                for i in idx:
                    where[i] = (len(fetch), handles[i].path)
                fetch.append(first.future)
            else:
                for i in idx:
                    where[i] = (len(fetch), (paths.index(handles[i].path),))
                made.append(self._submit(_pick_paths, (first.future, tuple(paths)), first.home))
                fetch.append(made[-1])
        try:
            got = self._results(fetch, self.timeout, "a gather of block results")
        finally:
            self._release_later(made)
        return [_index_path(got[f], path) for f, path in where]

    def map(self, fn, items, *, args=()):
        args = tuple(self.put(a) for a in args)
        futs = [self._submit(fn, (it, *args), None) for it in items]
        return self._results(futs, None, "independent tasks")

    def standalone(self, handles):
        # A part designates an item of a chunk's result: a small task where it lives picks it
        # into a future of its own (once, for results that outlive a fit).
        out = []
        for h in handles:
            if isinstance(h, _Part):
                fut = self._submit(_index_path, (h.future, h.path), h.home)
                if h.home is not None:
                    self._home[fut.key] = h.home
                h = fut
            out.append(h)
        return out

    def _release_later(self, handles: list) -> None:
        """Release ``handles`` (results already fetched) together with the next message this
        client sends the scheduler anyway: the next round's tasks (:meth:`map_blocks`), a
        :meth:`release`, :meth:`close`.

        The client's messages to the scheduler go out in batches at least 10 ms apart
        (``distributed``'s batched stream). A release sent as a reduction's sums arrive went out
        at once, and the next round's tasks, submitted a few milliseconds later after the
        client's W update, then waited for the rest of those 10 ms while both workers idled
        (docs/architecture.md, "Cluster overhead")."""
        self._later.extend(handles)

    def release(self, handles):
        if self._later:
            handles, self._later = [*handles, *self._later], []
        for h in handles:
            if isinstance(h, tuple):
                self.release(h)
            elif isinstance(h, _Part):
                h.future.release()
            elif hasattr(h, "release"):
                self._home.pop(h.key, None)
                h.release()

    def release_buffers(self):
        release_pooled_buffers()  # a processes=False cluster's workers share this process
        # Hygiene, not results: bounded (a fit must not hang on a stuck worker at its very end),
        # and a worker lost meanwhile has freed its buffers anyway.
        try:
            self._bounded(lambda: self.client.run(release_pooled_buffers, asynchronous=True),
                          min(self.timeout, RELEASE_TIMEOUT), "releasing the workers' buffers")
        except Exception as exc:  # noqa: BLE001
            logger.debug("release_buffers on the workers failed: %r", exc)

    def available_memory(self):
        """Bytes of memory of the smallest worker (its ``memory_limit``); this machine's
        available memory when a worker has no limit."""
        limits = [w.get("memory_limit") or 0 for w in scheduler_workers(self.client).values()]
        if limits and all(limits):
            return float(min(limits))
        return super().available_memory()

    def close(self):
        self.release(())
        self._home.clear()


class _Part:
    """Handle of one item of a task's tuple result: ``result[path[0]][path[1]]...`` — a block's
    result in a chunk's tuple (``(pos,)``), or item ``i`` of it with ``n_out > 1`` (``(pos, i)``,
    or ``(i,)`` for a one-block task).

    Holds its own reference to the task's future, so the result stays on its worker until every
    part is released; the tasks that take a part index the result themselves. ``size`` is the
    number of items of the result when ``path`` has one level over a chunk's tuple (so that
    ``gather`` fetches a whole chunk at once), else 0.
    """

    __slots__ = ("future", "path", "home", "size")

    def __init__(self, future, path: tuple, home: str | None, size: int = 0):
        self.future, self.path, self.home, self.size = future, tuple(path), home, int(size)

    @property
    def key(self):
        return self.future.key

    @property
    def status(self) -> str:
        return self.future.status


def release_pooled_buffers() -> int:
    """Free this process's pooled task outputs and reused read buffers; returns the bytes."""
    from ..io.chunks import release_read_buffers
    from . import buffers

    return buffers.release() + release_read_buffers()


def _shared_value(value):
    """Task: ``value`` itself (an argument shared by the block tasks of one worker)."""
    return value


def _index_path(value, path: tuple):
    """``value[path[0]][path[1]]...``."""
    for i in path:
        value = value[i]
    return value


def _call_picking(fn, picks, *args):
    """``fn(*args)`` with ``args[i]`` indexed along ``picks[i]`` for each part handle (``picks[i]``
    not None)."""
    return fn(*(a if p is None else _index_path(a, p) for a, p in zip(args, picks)))


def _pick_paths(value, paths):
    """Task: the items of ``value`` at ``paths``, as a tuple (what ``gather`` fetches of a result)."""
    return tuple(_index_path(value, p) for p in paths)


def _run_chunk(fn, n_per: int, n_blocks: int, n_threads: int, *values):
    """Task: ``fn(*per_block_j, *shared)`` for each block of a chunk; ``values`` holds the
    ``n_per`` per-block arguments of each block, then the shared ones. Returns the tuple of the
    blocks' results in block order.

    With ``n_threads`` > 1 (the worker's threads) the blocks go to a pool of that many threads,
    each taking the next block when it finishes one (the block kernels release the GIL), as the
    in-process executor does. A fixed split of a worker's blocks among its threads made a round
    as slow as its slowest thread: on the 2-core development machine two busy cores ran at
    unequal speeds (the same 4-block loop alone 142 ms, on both cores at once 145 and 240 ms),
    and a 1 × 2-thread cluster's two chunks of the same size took 155–179 and 229–269 ms
    (docs/architecture.md, "Cluster overhead")."""
    shared = _realigned_args(values[n_per * n_blocks:])
    calls = [values[b * n_per:(b + 1) * n_per] for b in range(n_blocks)]
    if n_threads <= 1 or n_blocks <= 1:
        return tuple(fn(*c, *shared) for c in calls)
    return tuple(thread_pool(min(n_threads, n_blocks), "dnmf-chunk").map(lambda c: fn(*c, *shared), calls))


def _run_block(fn, n_per: int, *values):
    """Task: ``fn(*values)`` for one block; ``values`` holds its ``n_per`` per-block arguments,
    then the shared ones (realigned as in :func:`_run_chunk`)."""
    return fn(*values[:n_per], *_realigned_args(values[n_per:]))


def _realigned_args(values: tuple, depth: int = 3) -> tuple:
    """The shared arguments of a round of block tasks with their large arrays realigned (W in
    the H step's arguments; ``io/blocks.py::realigned``), in (named) tuples and lists too.

    They come anew with every round, and ``distributed`` may deliver them at any byte offset;
    the block kernels read W's rows at random, once per stored entry. Placed blocks are realigned
    once, on arrival (``CSCBlock.__reduce__``). The other per-block arguments are left as they
    are: mostly results computed on the worker (the ALS loop's H_j, the NMF-RE loop's U_j), which
    a copy here would duplicate in every round whenever they are not 64-byte aligned; the H_j the
    masked, KL and IRLS loops send from the client, read column after column, were not measured."""
    from .buffers import aligned

    return tuple(_realigned(v, depth, aligned) for v in values)


def _realigned(value, depth: int, aligned: Callable):
    if hasattr(value, "__array_interface__"):
        return aligned(value)
    if depth and isinstance(value, (tuple, list)):
        items = [_realigned(v, depth - 1, aligned) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return value._make(items) if hasattr(value, "_make") else type(value)(items)
    return value


@functools.lru_cache(maxsize=None)
def thread_pool(n_threads: int, name: str) -> ThreadPoolExecutor:
    """This process's thread pool of ``n_threads`` threads for ``name`` (a worker's chunk tasks,
    the client's W update), made on first use and kept."""
    return ThreadPoolExecutor(n_threads, thread_name_prefix=name)


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


def _combine_subtrees(combine, nodes, *values):
    """Task: the subtrees ``nodes`` of the reduction over values already on this worker (each a
    nested pair of indices into ``values``), as a tuple."""
    return tuple(_eval_tree(combine, node, values) for node in nodes)


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
    """Whether ``value`` travels inline in a task (under 100 kB: arrays, and tuples of them such
    as the H step's arguments, :func:`_inline_nbytes`)."""
    import numpy as np

    if isinstance(value, (np.ndarray, tuple)):
        return _inline_nbytes(value) < 100_000
    return not hasattr(value, "nbytes")


def _inline_nbytes(value) -> int:
    """The bytes of ``value``, every item of a tuple or list counted (recursively).

    Not dask's ``sizeof`` of the tuple: it estimates a collection of more than 10 items from 10
    drawn at random, and the H step's arguments (:class:`~dnmf.solvers.hstep.HStep`, 11 fields)
    missed W in about 1 draw in 11. W, the one large field, then went inline in that round's
    tasks, through the scheduler, on either transfer path (docs/architecture.md, "Cluster
    overhead"); which rounds did was random.
    """
    import numpy as np
    from dask.sizeof import sizeof

    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(_inline_nbytes(v) for v in value)
    return sizeof(value)


def get_executor(client=None, n_threads: int | None = None, *, func: str = "nmf", timeout: float = DEFAULT_TIMEOUT,
                 max_recoveries: int = DEFAULT_MAX_RECOVERIES) -> Executor:
    """The executor for ``client``; the active default client if None; else a thread pool.

    ``client=False`` forces the in-process thread pool even when a default client exists.
    Anything else that is not a ``distributed.Client`` raises InputError (naming ``func``).
    ``timeout`` and ``max_recoveries`` configure a :class:`DaskExecutor`.
    """
    from .._validation import param_error

    if client is False or (client is None and "distributed" not in sys.modules):
        # Without distributed imported there is no default client to find: an in-process fit
        # does not pay for importing it (~0.3 s of a first fit's imports).
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
