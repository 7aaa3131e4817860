"""NMF under the KL (Poisson) loss on the blocked engine: multiplicative updates, one pass over A.

Per pass, with W (unit L1 columns) and H (its blocks Hⱼᵀ, carrying the scale) on the client:

1. one task per column block (:func:`~dnmf.kernels.kl.csc_kl_pass`): the objective of the
   incoming (W, H) — train divergence over the observed entries, test divergence over the
   held-out ones — read together with H's multiplicative update
   ``h_c ← h_c ∘ [Σ_obs (a/μ) w_i] / [Σ_obs w_i + L1 + L2·h_c]``; then with the new H the W update's
   statistics ``P = Σ_c (a_c/μ'_c) h_cᵀ``, ``hsum = Σ_c h_c`` and the missing rows' partial ``R``;
2. the partials are summed in block order (any number of workers: the same bits);
3. client: the objective of the incoming state is recorded (iteration t's, when the pass is
   t + 1's) and the convergence test run on it; if the fit goes on, ``W ← W ∘ P / (D + L1 +
   L2·W)`` with the row denominators ``D_i = Σ_{j obs in row i} h_j`` (``hsum − R_i``),
   its columns rescaled to unit L1 norm with the scale moved into H (``μ`` unchanged).

The zeros of sparse A enter only through ``Σ_obs μ = Σ_c den_c·h_c`` in closed form, and
missing entries (mask, NaN, the §5.2 hold-out set; ``mask="zeros"``: every unstored entry) only
through the denominators, so a fit with missing entries is still one pass over the stored
entries per iteration. Since the objective of an iteration's result is read in the next pass,
a fit of t iterations makes t + 1 passes (the last one's updates are dropped), and the history
holds the objective of the factors returned: ``loss_history[-1]`` is the divergence of the
model, and with a hold-out set ``test_loss_history[t−1]`` that of iteration t's factors.
Without penalties every step is non-increasing for the divergence over the observed entries,
so the history is too.

The penalties are those of the standard penalized multiplicative updates (L1 and L2 added to
the MU denominators, ``+ L1 + L2·x``), applied to the factors as they are updated — H with the
scale, W with unit-L1 columns — not RcppML's penalties applied inside an NNLS solve. ``nmf``
refuses L1 for this loss: with ``Σ_i w_ir = 1`` it only rescales H, which the W step's
normalization moves back (docs/architecture.md, "Losses").

H lives on the client between iterations (n·k numbers), so a lost worker costs a re-placement
and a redo of the pass in progress.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import scipy.sparse as sp

from ..exceptions import WorkerLostError
from ..io.blocks import BlockedMatrix
from ..kernels.column import column_terms
from ..kernels.kl import KL_OUT, csc_kl_pass
from ..kernels.masked import NO_PATTERN, csc_masked_pass
from ..kernels.nnls import SOLVER_EXACT
from .als import ALSOptions, count_recovery
from . import buffers as _buf
from .executor import Executor
from .kernel_cache import ship_kernels
from .masked import (MaskedState, MaskOptions, _kernel_args, _mask_parts, as_csc64, record_iteration,
                     run_for_compilation, tiny_blocks)

logger = logging.getLogger(__name__)

__all__ = ["KLStats", "fit_kl", "kl_task", "lsq_start", "LSQ_FLOOR"]

_NO_MASK = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
_NO_CV = (False, False, np.uint64(0), np.uint64(0))

#: The first H's entries are floored at this fraction of their column's mean (see :func:`lsq_start`).
LSQ_FLOOR = 0.01


class KLStats(NamedTuple):
    """Per-block partials of the KL pass (float64)."""

    P: np.ndarray  # (m, k) Σ_c (a_c/μ'_c) h_cᵀ over observed stored entries
    hsum: np.ndarray  # (k,) Σ_c h_c
    R: np.ndarray  # (m, k) Σ_c h_c over the missing rows of c (zeros missing: the observed); (0, k): none
    out: np.ndarray  # (KL_OUT,) the incoming objective's parts (kernels/kl.py::csc_kl_pass)
    # dask's sizeof of a tuple of at most 10 items sums its items' (the arrays' nbytes)


def combine_kl(a: KLStats, b: KLStats) -> KLStats:
    return KLStats(a.P + b.P, a.hsum + b.hsum, a.R + b.R, a.out + b.out)


def kl_task(block, mk: tuple, ht_prev, col0: int, w: np.ndarray, colsum: np.ndarray, scale: np.ndarray, hside: tuple,
            kargs: tuple, track: bool):
    """One column block (float64 CSC, :func:`~dnmf.engine.masked.as_csc64`): ``(new H_jᵀ, KLStats)``.

    ``colsum``: W's column sums; ``mk``: the block's user mask (CSC indices, indptr; empty: none);
    ``hside``: H's (L1, L2); ``kargs``: the kernel's hold-out arguments (:func:`~dnmf.engine.masked._kernel_args`);
    ``track``: form the missing rows' partial R (a fit with missing entries). Without a
    previous H the pass starts from :func:`lsq_start`.
    """
    m, k = w.shape
    ht = lsq_start(block, mk, col0, w, kargs) if ht_prev is None else _buf.copy_of(ht_prev)
    P = _buf.zeros((m, k))  # pooled: engine/buffers.py
    hsum = np.zeros(k)
    R = _buf.zeros((m if track else 0, k))
    out = np.zeros(KL_OUT)
    csc_kl_pass(block.data, block.indices, block.indptr, int(col0), w, colsum, ht,
                np.ones(k) if ht_prev is None else scale, float(hside[0]), float(hside[1]), *kargs, mk[0], mk[1],
                P, hsum, R, out)
    return ht, KLStats(P, hsum, R, out)


def lsq_start(block, mk: tuple, col0: int, w: np.ndarray, kargs: tuple) -> np.ndarray:
    """The first H of a KL fit (H_jᵀ, n_j × k): each column's non-negative least squares on its
    observed entries given W₀ (exact NNLS on the masked Gram, ``kernels/masked.py``), every entry
    then raised to :data:`LSQ_FLOOR` × its column's mean.

    Why not a flat start (every h_c constant): W₀'s random columns are nearly alike after
    normalization, and from a flat H the multiplicative updates need many iterations to tell the
    factors apart. Measured on a planted Poisson 300 × 400, k = 4: the loss moved < 0.5 % per
    iteration for the first ~6, and the held-out loss rose over them, so CV's early stopping
    (§3.2, patience 5, tol 1e-4) stopped fits at iteration ~6 with the best at 1 and ``k="auto"``
    found no overfitting; from the least-squares H the held-out loss falls from the start (as an
    ALS fit's, whose first H is this solve). The floor keeps every entry movable (the updates never
    move a zero). Held-out and missing entries are not read.
    """
    m, k = w.shape
    G = w.T @ w
    ridge = 1e-12 * float(np.trace(G)) / k  # keeps a column with < k observed rows solvable
    G = G + ridge * np.eye(k)
    ht = np.zeros((block.shape[1], k))
    csc_masked_pass(block.data, block.indices, block.indptr, m, int(col0), w, G, np.zeros((k, k)), ridge, 0.0, ht,
                    np.ones(k), column_terms(k), SOLVER_EXACT, True, 100, 0.0, False, *kargs, mk[0], mk[1],
                    np.zeros((0, 0)), 0.0, NO_PATTERN[0], NO_PATTERN[1], np.zeros((k, k)), np.zeros(k))
    return np.maximum(ht, LSQ_FLOOR * ht.mean(axis=1, keepdims=True))


def warm_up_kernels(k: int, hside: tuple, kargs: tuple, track: bool) -> None:
    """Compile here, before any worker needs them, the kernels :func:`kl_task` calls in this fit
    (:func:`lsq_start`'s masked solve, then the KL pass, with the fit's hold-out arguments): its
    first and a later iteration on a 1 × 1 block (:func:`~dnmf.engine.masked.tiny_blocks`,
    :func:`~dnmf.engine.masked.run_for_compilation`). The results are dropped. ``fit_kl`` then
    ships numba's cache entries to the workers (``engine/kernel_cache.py``; docs/architecture.md,
    "Kernel compilation")."""
    col, _, mk = tiny_blocks()
    w = np.full((1, k), 1.0 / k)
    run_for_compilation(kl_task, col, mk, None, 0, w, w.sum(axis=0), np.ones(k), hside, kargs, track)
    run_for_compilation(kl_task, col, mk, np.ones((1, k)), 0, w, w.sum(axis=0), np.ones(k), hside, kargs, track)


@dataclass
class KLState(MaskedState):
    """:class:`~dnmf.engine.masked.MaskedState` with the scale H takes at its next update."""

    scale: np.ndarray = None


def _w_update(w: np.ndarray, stats: KLStats, zeros_missing: bool, l1: float, l2: float) -> tuple:
    """``W ∘ P / (D + L1 + L2·W)`` with unit-L1 columns: ``(W, scale moved into H)``. Where a
    denominator is 0 (a row with nothing observed) the entry is kept."""
    if stats.R.shape[0] == 0:
        D = np.broadcast_to(stats.hsum[None, :], w.shape)
    else:
        D = stats.R if zeros_missing else np.maximum(stats.hsum[None, :] - stats.R, 0.0)
    den = D + l1 + l2 * w
    w_new = w * np.divide(stats.P, den, out=np.ones_like(stats.P), where=den > 0)
    s = w_new.sum(axis=0)
    s = np.where(s > 0, s, 1.0)
    return np.ascontiguousarray(w_new / s[None, :]), s


def fit_kl(blocked: BlockedMatrix, w0: np.ndarray, opts: ALSOptions, executor: Executor, *,
           mo: MaskOptions | None = None, on_iteration: Callable | None = None):
    """Run the KL loop; returns ``(state, ht_blocks)`` as :func:`~dnmf.engine.als.fit_als` does:
    ``state.w`` with unit-L1 columns, ``state.d`` the scale, and the raw H blocks with
    ``state.h_scale = 1/d`` (so ``Ĥ = Hᵀ·h_scale`` and ``μ = W·diag(d)·Ĥ``).

    ``mo``: the missing and held-out entries (None: none). ``loss_history`` holds the divergence
    over the observed entries — with a hold-out set, as the masked squared-error loop, its mean
    over the training entries, ``test_history`` the mean over the test entries, and the stop is
    RcppML's §3.2 rule on the test loss (:func:`~dnmf.engine.masked._cv_stop`); otherwise
    :func:`~dnmf.engine.als.check_convergence` on the total. ``on_iteration`` gets
    ``(iteration, train, test)``, test NaN without a hold-out set.
    """
    k = opts.k
    n_blocks = blocked.n_blocks
    cb = blocked.col_bounds
    cv_on = mo is not None and mo.cv_on
    zeros_missing = mo is not None and mo.zeros_missing
    track = mo is not None
    mask = None if mo is None or mo.mask is None else sp.csc_matrix(mo.mask, dtype=bool)
    cmasks = _mask_parts(mask, cb, axis=1) if mask is not None else [_NO_MASK] * n_blocks
    kargs = _kernel_args(mo) if mo is not None else _NO_CV
    col0s = [int(c) for c in cb[:-1]]
    hside = (float(opts.L1[1]), float(opts.L2[1]))
    w = np.ascontiguousarray(w0, dtype=np.float64)
    w = w / (w.sum(axis=0) + 1e-300)[None, :]
    state = KLState(w=w, d=np.ones(k), ht=[None] * n_blocks, h_scale=np.ones(k), scale=np.ones(k))
    if executor.distributed and opts.maxit >= 1:
        warm_up_kernels(k, hside, kargs, track)
        ship_kernels(executor.client)  # workers without this cache load the compiled kernels
    blocks = None
    recoveries = 0
    t0 = time.perf_counter()
    while opts.maxit >= 1:
        it = state.iteration
        try:
            if blocks is None:
                sources = list(blocked.sources)
                raw = executor.put_blocks([s.load() for s in sources] if blocked.in_memory else sources)
                blocks = executor.map_blocks(as_csc64, raw)  # float64 CSC once, not in every iteration
                executor.release(raw)
            outs = executor.map_blocks(kl_task, blocks, cmasks, state.ht, col0s,
                                       args=(state.w, state.w.sum(axis=0), state.scale, hside, kargs, track),
                                       n_out=2)
            stats = executor.tree_reduce(combine_kl, [o[1] for o in outs])
            ht = executor.gather([o[0] for o in outs])
            executor.release([h for o in outs for h in o])
        except WorkerLostError as exc:
            executor.release(blocks or [])
            blocks = None
            recoveries = count_recovery(exc, recoveries, executor, "KL fit", state.iteration)
            continue
        if it >= 1 and _record(state, stats.out, opts, cv_on, on_iteration):
            break  # the factors of iteration `it` are kept; this pass's updates are dropped
        state.w, state.scale = _w_update(state.w, stats, zeros_missing, float(opts.L1[0]), float(opts.L2[0]))
        state.ht = ht
        state.iteration = it + 1
    state.runtime = time.perf_counter() - t0
    executor.release(blocks or [])
    final = [None if h is None else h * state.scale[None, :] for h in state.ht]
    if final and final[0] is not None:
        state.d = np.concatenate(final, axis=0).sum(axis=0) + 1e-15
        state.h_scale = 1.0 / state.d
    return state, final


def _record(state: KLState, out: np.ndarray, opts: ALSOptions, cv_on: bool, on_iteration) -> bool:
    """Record iteration ``state.iteration``'s objective (read by the pass after it): convergence,
    callback; True when the fit stops here."""
    return record_iteration(state, opts, float(out[0] + out[1]), out[2], out[3], out[4], cv_on, on_iteration)
