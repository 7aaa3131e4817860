"""Two executors for the same block tasks: a Dask ``distributed`` client and a thread pool.

The engine (and every algorithm built on it) talks to an :class:`Executor` only through
these verbs, so the same code runs on a cluster and in a notebook without one:

``put(value)``
    make a value available to tasks (scatter + broadcast on a cluster, identity locally).
``put_blocks(sources)``
    place one object per column block (persist on workers, or keep locally).
``map_blocks(fn, *per_block, args=(), n_out=1)``
    run ``fn(*per_block_j, *args)`` for every block j; returns one handle per block (or a tuple
    of ``n_out`` handles per block when ``fn`` returns a tuple). Handles of the distributed
    executor are futures that stay on the worker that computed them.
``tree_reduce(combine, handles)``
    combine per-block results with a fixed binary tree in block order, so the result does not
    depend on which task finished first nor on the number of workers.
``gather(handles)`` / ``map(fn, items)``
    fetch results; run independent tasks (sweeps, bootstrap chunks) and return them in order.

Handles are opaque: only pass them back into the executor that made them.
"""

from __future__ import annotations

import abc
import logging
import operator
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

__all__ = ["Executor", "LocalExecutor", "DaskExecutor", "get_executor", "tree_order"]


def tree_order(n: int) -> list[tuple[int, int]]:
    """Pairs combined level by level by a fixed binary tree over ``n`` leaves (for tests/docs)."""
    pairs = []
    level = list(range(n))
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level) - 1, 2):
            pairs.append((level[i], level[i + 1]))
            nxt.append(level[i])
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return pairs


class Executor(abc.ABC):
    """Interface shared by :class:`LocalExecutor` and :class:`DaskExecutor`."""

    n_workers: int = 1
    distributed: bool = False

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

    def is_data_loss(self, exc: BaseException) -> bool:
        """True when ``exc`` means results were lost with a worker (recoverable by recomputing)."""
        return False


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
        self.n_threads = n_threads or os.cpu_count() or 1
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
    """Executor over a ``distributed.Client``: futures stay on workers between iterations."""

    distributed = True

    def __init__(self, client, wait_timeout: float = 60.0):
        from ..exceptions import DnmfError

        self.client = client
        try:
            # A freshly started cluster (or one whose workers are restarting) may have none yet.
            client.wait_for_workers(1, timeout=wait_timeout)
        except TimeoutError as exc:
            raise DnmfError(f"The Dask cluster at {client.scheduler.address} has no workers "
                            f"(waited {wait_timeout:.0f} s). Start workers or pass client=False.") from exc
        self.n_workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))

    def put(self, value):
        if _is_small(value):
            return value
        return self.client.scatter(value, broadcast=True, hash=False)

    def put_blocks(self, values):
        # Contiguous runs of blocks per worker (block j on worker ⌊j·W/n⌋): the fixed reduction
        # tree pairs neighbouring blocks, so all but its top log2(W) levels combine partials
        # already on the same worker instead of shipping each m × k partial across.
        workers = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
        if not workers:
            self.client.wait_for_workers(1, timeout=60)
            workers = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
        values = list(values)
        n = len(values)
        return [self.client.scatter(v, workers=[workers[j * len(workers) // max(n, 1)]], hash=False)
                for j, v in enumerate(values)]

    def map_blocks(self, fn, *per_block, args=(), n_out=1):
        args = tuple(self.put(a) for a in args)
        n = len(per_block[0])
        futs = [
            self.client.submit(fn, *(p[j] for p in per_block), *args, pure=False, key=_key(fn, j))
            for j in range(n)
        ]
        if n_out == 1:
            return futs
        return [
            tuple(self.client.submit(operator.getitem, f, i, pure=False) for i in range(n_out)) for f in futs
        ]

    def tree_reduce(self, combine, handles):
        level = list(handles)
        while len(level) > 1:
            nxt = [
                self.client.submit(combine, level[i], level[i + 1], pure=False)
                for i in range(0, len(level) - 1, 2)
            ]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        (res,) = self.client.gather([level[0]]) if hasattr(level[0], "key") else [level[0]]
        return res

    def gather(self, handles):
        return self.client.gather(list(handles))

    def map(self, fn, items, *, args=()):
        args = tuple(self.put(a) for a in args)
        futs = [self.client.submit(fn, it, *args, pure=False) for it in items]
        return self.client.gather(futs)

    def is_data_loss(self, exc):
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker

        if isinstance(exc, (FutureCancelledError, KilledWorker)):
            return True
        text = str(exc).lower()
        return "lost" in text or "worker" in text and ("died" in text or "closed" in text)

    def release(self, handles):
        for h in handles:
            if isinstance(h, tuple):
                self.release(h)
            elif hasattr(h, "release"):
                h.release()


def _key(fn, j):
    import uuid

    return f"{getattr(fn, '__name__', 'task')}-{j}-{uuid.uuid4().hex[:12]}"


def _is_small(value) -> bool:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.nbytes < 100_000
    return not hasattr(value, "nbytes")


def get_executor(client=None, n_threads: int | None = None) -> Executor:
    """The executor for ``client``; the active default client if None; else a thread pool.

    ``client=False`` forces the in-process thread pool even when a default client exists.
    """
    if client is False:
        return LocalExecutor(n_threads)
    if client is None:
        try:
            from distributed import default_client

            client = default_client()
        except (ImportError, ValueError):
            client = None
    if client is None:
        return LocalExecutor(n_threads)
    return DaskExecutor(client)
