"""NMF under the KL (Poisson) loss on the blocked engine: multiplicative updates, one pass over A.

Per iteration, with W (unit L1 columns) and H (its blocks Hⱼᵀ, carrying the scale) on the client:

1. one task per column block (:func:`~dnmf.kernels.kl.csc_kl_pass`): H's multiplicative update
   ``h_c ← h_c ∘ Wᵀ(a_c/μ_c)`` (``Wᵀ1 = 1``), then with the new H the W update's statistics
   ``P = Σ_c (a_c/μ'_c) h_cᵀ``, ``hsum = Σ_c h_c`` and the stored part of the objective;
2. the partials are summed in block order (any number of workers: the same bits);
3. client: ``W ← W ∘ P / hsum`` (Lee–Seung), its columns rescaled to unit L1 norm with the
   scale moved into H (``μ`` unchanged), the objective ``Σ_stored (a log(a/μ') − a) + Σ hsum``
   — the zeros of sparse A enter only through ``Σ μ`` in closed form — and the convergence test.

The objective reported for an iteration is that of (its new H, the W it started from); both
half-steps are non-increasing for the KL divergence, so the history is too. H lives on the
client between iterations (n·k numbers), so a lost worker costs a re-placement and a redo of the
iteration in progress.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
from dask.sizeof import sizeof

from ..exceptions import WorkerLostError
from ..io.blocks import BlockedMatrix
from ..kernels.kl import csc_kl_pass
from .als import ALSOptions, ALSState, IterationRecord, check_convergence, count_recovery
from .executor import Executor
from .masked import as_csc64

logger = logging.getLogger(__name__)

__all__ = ["KLStats", "fit_kl", "kl_task"]


class KLStats(NamedTuple):
    """Per-block partials of the KL pass (float64)."""

    P: np.ndarray  # (m, k) Σ_c (a_c/μ'_c) h_cᵀ
    hsum: np.ndarray  # (k,) Σ_c h_c
    stored: np.ndarray  # (1,) Σ_stored a log(a/μ') − a


@sizeof.register(KLStats)
def _sizeof_kl_stats(stats: KLStats) -> int:
    return int(stats.P.nbytes + stats.hsum.nbytes + 72)


def combine_kl(a: KLStats, b: KLStats) -> KLStats:
    return KLStats(a.P + b.P, a.hsum + b.hsum, a.stored + b.stored)


def kl_task(block, ht_prev, w: np.ndarray, scale: np.ndarray):
    """One column block (float64 CSC, :func:`~dnmf.engine.masked.as_csc64`): ``(new H_jᵀ, KLStats)``.
    Without a previous H the start is ``h_c = (Σ_i a_ic / k)·1`` (positive wherever the column is
    not empty)."""
    m, k = w.shape
    if ht_prev is None:
        colsum = np.add.reduceat(block.data, block.indptr[:-1]) if block.data.size else np.zeros(block.shape[1])
        colsum[np.diff(block.indptr) == 0] = 0.0  # reduceat repeats the next value for an empty column
        ht = np.repeat(colsum[:, None] / k, k, axis=1)
        scale = np.ones(k)
    else:
        ht = np.array(ht_prev, dtype=np.float64, copy=True)
    P = np.zeros((m, k))
    hsum = np.zeros(k)
    out = np.zeros(1)
    csc_kl_pass(block.data, block.indices, block.indptr, w, ht, scale, P, hsum, out)
    return ht, KLStats(P, hsum, out)


@dataclass
class KLState(ALSState):
    """:class:`~dnmf.engine.als.ALSState` with the scale H takes at its next update."""

    scale: np.ndarray = None


def fit_kl(blocked: BlockedMatrix, w0: np.ndarray, opts: ALSOptions, executor: Executor, *,
           on_iteration: Callable | None = None):
    """Run the KL loop; returns ``(state, ht_blocks)`` as :func:`~dnmf.engine.als.fit_als` does:
    ``state.w`` with unit-L1 columns, ``state.d`` the scale, and the raw H blocks with
    ``state.h_scale = 1/d`` (so ``Ĥ = Hᵀ·h_scale`` and ``μ = W·diag(d)·Ĥ``)."""
    k = opts.k
    n_blocks = blocked.n_blocks
    w = np.ascontiguousarray(w0, dtype=np.float64)
    w = w / (w.sum(axis=0) + 1e-300)[None, :]
    state = KLState(w=w, d=np.ones(k), ht=[None] * n_blocks, h_scale=np.ones(k), scale=np.ones(k))
    blocks = None
    recoveries = 0
    t0 = time.perf_counter()
    while state.iteration < opts.maxit:
        it = state.iteration + 1
        try:
            if blocks is None:
                sources = list(blocked.sources)
                raw = executor.put_blocks([s.load() for s in sources] if blocked.in_memory else sources)
                blocks = executor.map_blocks(as_csc64, raw)  # float64 CSC once, not in every iteration
                executor.release(raw)
            outs = executor.map_blocks(kl_task, blocks, state.ht, args=(state.w, state.scale), n_out=2)
            parts = [o[1] for o in outs]
            stats = executor.tree_reduce(combine_kl, parts)
            ht = executor.gather([o[0] for o in outs])
            executor.release([h for o in outs for h in o])
        except WorkerLostError as exc:
            executor.release(blocks or [])
            blocks = None
            recoveries = count_recovery(exc, recoveries, executor, "KL fit", state.iteration)
            continue
        loss = float(stats.stored[0] + stats.hsum.sum())  # W's columns sum to 1: Σμ' = Σ hsum
        grow = np.divide(stats.P, stats.hsum[None, :], out=np.ones_like(stats.P), where=stats.hsum[None, :] > 0)
        w_new = state.w * grow
        s = w_new.sum(axis=0)
        s = np.where(s > 0, s, 1.0)
        state.w, state.scale, state.ht = np.ascontiguousarray(w_new / s[None, :]), s, ht
        state.iteration = it
        state.loss_history.append(loss)
        stop = check_convergence(state, opts)
        logger.debug("iteration %d KL %.6g", it, loss)
        if on_iteration is not None:
            try:
                on_iteration(IterationRecord(it, loss, float("nan")))
            except StopIteration:
                state.stopped_by_callback = True
                stop = True
        if stop:
            state.converged = not state.stopped_by_callback
            break
    state.runtime = time.perf_counter() - t0
    executor.release(blocks or [])
    final = [None if h is None else h * state.scale[None, :] for h in state.ht]
    if final and final[0] is not None:
        state.d = np.concatenate(final, axis=0).sum(axis=0) + 1e-15
        state.h_scale = 1.0 / state.d
    return state, final
