"""A worker lost at a chosen moment, deterministically and in-process (shared by the fault tests
of the masked, KL, IRLS and penalized loops)."""

from __future__ import annotations


class FlakyExecutor:
    """A one-thread LocalExecutor whose ``verb`` (``map_blocks``, ``gather``, ``tree_reduce`` …)
    raises WorkerLostError on its ``at``-th call (1-based), once, as a lost Dask worker would;
    every other call goes to the executor. ``calls`` counts the calls of ``verb``."""

    def __init__(self, verb: str, at: int):
        from dnmf.engine.executor import LocalExecutor

        self._ex = LocalExecutor(1)
        self.verb, self.at, self.calls = verb, at, 0
        self.max_recoveries = 2

    def __getattr__(self, name):
        fn = getattr(self._ex, name)
        if name != self.verb:
            return fn

        def verb(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                from dnmf.exceptions import WorkerLostError

                raise WorkerLostError(f"A Dask worker was lost (tcp://test) during {name}", worker="tcp://test")
            return fn(*args, **kwargs)

        return verb
