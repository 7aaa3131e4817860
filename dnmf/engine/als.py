"""The distributed alternating-NNLS loop (DESIGN §3): one fused pass over A per iteration.

Per iteration, with W (unit-norm columns) and d on the client:

1. client: ``G = WᵀW + L2_H·I`` (+ its Cholesky factor), broadcast W, G;
2. one task per column block j: ``H_j ← NNLS(G, WᵀA_j − L1_H)`` (fused kernel), returning the
   partials ``P_j = A_j H_jᵀ``, ``Q_j = H_j H_jᵀ`` and ``hsum_j = Σ|H_j|`` (chunk);
   H_j stays where it was computed as the next warm start;
3. the partials are summed by a fixed binary tree in block order (combine) — bitwise the same
   result for any number of workers or threads;
4. client (aggregate): H is normalized implicitly (``s`` = its row norms), ``W ← NNLS(Q̂ + L2_W,
   P̂ᵀ − L1_W)``, d ← scaling of W, loss by the Gram identity, convergence check.

Only m·k + k² + k numbers per block travel per iteration; A is read once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
from dask.sizeof import sizeof

from ..io.blocks import BlockedMatrix, CSCBlock
from ..kernels.fused import csc_block_pass, csc_sq_norm, dense_block_solve
from ..kernels.nnls import SOLVER_CHOLESKY
from ..solvers.updates import cho_solve_lower, cholesky_or_empty, scale_rows, update_factor
from .executor import Executor

logger = logging.getLogger(__name__)

__all__ = ["ALSOptions", "ALSState", "IterationRecord", "BlockStats", "fit_als", "check_convergence"]

NORM_CODES = {"L1": 1, "L2": 2, "none": 0}


class IterationRecord(NamedTuple):
    """What ``on_iteration`` receives after each iteration (frozen; unpacks like RcppML's args)."""

    iteration: int
    train_loss: float
    test_loss: float


@dataclass(frozen=True)
class ALSOptions:
    """Constants of one fit."""

    k: int
    tol: float = 1e-4
    maxit: int = 100
    L1: tuple = (0.0, 0.0)
    L2: tuple = (0.0, 0.0)
    nonneg: tuple = (True, True)
    norm: str = "L1"
    solver: int = SOLVER_CHOLESKY
    cd_maxit: int = 100
    cd_tol: float = 1e-8
    patience: int = 5
    checkpoint_every: int = 10


@dataclass
class ALSState:
    """Mutable state of the loop. ``w`` is m × k with unit-norm columns (d carries the scale)."""

    w: np.ndarray
    d: np.ndarray
    ht: list  # per-block handles of raw H_jᵀ (n_j × k) or None before the first iteration
    h_scale: np.ndarray  # 1 / (row norms of raw H) from the last iteration
    iteration: int = 0  # iterations completed
    loss_history: list = field(default_factory=list)
    tol_history: list = field(default_factory=list)
    below_tol: int = 0
    converged: bool = False
    stopped_by_callback: bool = False


@dataclass(frozen=True)
class BlockStats:
    """Per-block partial statistics (float64)."""

    P: np.ndarray  # (m, k) = A_j H_jᵀ
    Q: np.ndarray  # (k, k) = H_j H_jᵀ
    hsum: np.ndarray  # (k,) = Σ_c |H_j[:, c]|


@sizeof.register(BlockStats)
def _sizeof_block_stats(stats: BlockStats) -> int:
    # Without this dask would count the m × k partial as a ~50-byte object.
    return int(stats.P.nbytes + stats.Q.nbytes + stats.hsum.nbytes + 64)


def combine_stats(a: BlockStats, b: BlockStats) -> BlockStats:
    """Sum two partials (the combine step of the tree reduction)."""
    return BlockStats(a.P + b.P, a.Q + b.Q, a.hsum + b.hsum)


def load_block(source):
    """Materialize a block from its source (a lazy Zarr source or an in-memory one)."""
    return source.load() if hasattr(source, "load") else source


def warm_up_kernels(source, k: int, opts: "ALSOptions") -> None:
    """Compile the block kernel for this fit's dtypes here, before any worker needs it.

    numba writes the compiled code to its on-disk cache, so Dask workers on this machine (or on a
    shared file system) load it instead of each compiling it — a fresh worker otherwise spends
    seconds and ~150 MB of LLVM memory per kernel signature. Costs milliseconds once cached.
    """
    block = load_block(source)
    if isinstance(block, CSCBlock):
        tiny = CSCBlock(np.ones(1, dtype=block.data.dtype), np.zeros(1, dtype=block.indices.dtype),
                        np.array([0, 1], dtype=block.indptr.dtype), 1)
    else:
        tiny = np.ones((1, 1), dtype=block.dtype)
    w = np.ones((1, k))
    G = np.eye(k)
    L = cholesky_or_empty(G, opts.solver)
    h_update_task(tiny, None, w, G, L, 0.0, np.ones(k), opts.solver, True, opts.cd_maxit, opts.cd_tol)


def block_sq_norm(block) -> float:
    """‖A_j‖²_F in float64."""
    block = load_block(block)
    if isinstance(block, CSCBlock):
        return float(csc_sq_norm(block.data))
    return float(np.einsum("ij,ij->", block, block, dtype=np.float64))


def h_update_task(block, ht_prev, w, G, L, l1, warm_scale, solver, nonneg, cd_maxit, cd_tol):
    """Step 2 for one block: H_j update and its partial statistics (the chunk function).

    Returns ``(ht, BlockStats)``: the new raw H_jᵀ (n_j × k) and the partials.
    """
    block = load_block(block)
    m, k = w.shape
    n_j = block.shape[1]
    warm = ht_prev is not None
    ht = np.array(ht_prev, dtype=np.float64, copy=True) if warm else np.zeros((n_j, k))
    P = np.zeros((m, k))
    Q = np.zeros((k, k))
    hsum = np.zeros(k)
    if isinstance(block, CSCBlock):
        csc_block_pass(block.data, block.indices, block.indptr, w, G, L, l1, ht, warm_scale, solver, nonneg,
                       cd_maxit, cd_tol, warm, P, Q, hsum)
    else:
        a = block if block.dtype == np.float64 else block.astype(np.float64)
        B = w.T @ a
        if solver == SOLVER_CHOLESKY:
            # Cholesky-clip ignores warm starts: solve all columns at once with LAPACK/BLAS.
            ht = cho_solve_lower(L, B - l1 if l1 else B).T
            if nonneg:
                np.maximum(ht, 0.0, out=ht)
            Q = ht.T @ ht
            hsum = np.abs(ht).sum(axis=0)
        else:
            dense_block_solve(B, G, L, l1, ht, warm_scale, solver, nonneg, cd_maxit, cd_tol, warm, Q, hsum)
        P = a @ ht
    return ht, BlockStats(P, Q, hsum)


def check_convergence(state: ALSState, opts: ALSOptions) -> bool:
    """RcppML 1.0 rule: relative loss change below ``tol`` on ``patience`` consecutive iterations."""
    hist = state.loss_history
    if len(hist) < 2:
        state.tol_history.append(0.0)
        return False
    prev, cur = hist[-2], hist[-1]
    rel = abs(prev - cur) / (abs(prev) + 1e-15)
    state.tol_history.append(rel)
    state.below_tol = state.below_tol + 1 if rel < opts.tol else 0
    return state.below_tol >= opts.patience


def _norms(hsum: np.ndarray, Q: np.ndarray, norm: str) -> np.ndarray:
    if norm == "L1":
        return hsum + 1e-15
    if norm == "L2":
        return np.sqrt(np.maximum(np.diag(Q), 0.0)) + 1e-15
    return np.ones_like(hsum)


def fit_als(
    blocked: BlockedMatrix,
    w0: np.ndarray,
    opts: ALSOptions,
    executor: Executor,
    *,
    sq_norm_a: float | None = None,
    on_iteration: Callable | None = None,
    checkpointer: Any = None,
    state: ALSState | None = None,
    stream: bool = False,
):
    """Run the ALS loop; returns ``(state, ht_blocks)`` with ht_blocks the gathered raw H_jᵀ.

    ``state`` resumes a checkpointed fit (its ``ht`` entries are arrays then). ``stream=True``
    reads each block from its source in every task (out-of-core); otherwise blocks are
    loaded once onto the workers (or kept in memory locally).
    """
    m, n = blocked.shape
    k = opts.k
    solver_code = opts.solver
    nonneg_w, nonneg_h = opts.nonneg
    l1_w, l1_h = opts.L1
    l2_w, l2_h = opts.L2

    # Place the blocks: in-memory blocks once; lazy sources are either loaded once on the
    # workers (fits in memory) or passed as-is so every task reads its block from disk.
    sources = list(blocked.sources)

    def place_blocks():
        if stream:
            return executor.put_blocks(sources)
        if blocked.in_memory:
            return executor.put_blocks([src.load() for src in sources])
        return executor.map_blocks(load_block, executor.put_blocks(sources))

    if executor.distributed and state is None:
        warm_up_kernels(sources[0], k, opts)
    block_handles = place_blocks()

    if sq_norm_a is None:
        sq_parts = executor.gather(executor.map_blocks(block_sq_norm, block_handles))
        sq_norm_a = float(_tree_sum(sq_parts))

    if state is None:
        state = ALSState(w=np.ascontiguousarray(w0, dtype=np.float64), d=np.ones(k), ht=[None] * len(sources),
                         h_scale=np.ones(k))
    else:
        state.ht = [None if h is None else h for h in state.ht]
        if executor.distributed and state.ht[0] is not None:
            state.ht = executor.put_blocks(state.ht)

    t0 = time.perf_counter()
    it = opts.maxit + 1 if (state.converged or state.stopped_by_callback) else state.iteration + 1
    h_args = None
    recoveries = 0
    while it <= opts.maxit:
        # 1. Gram of the current (normalized) W, with H-side penalties.
        w = state.w
        G = w.T @ w
        G[np.diag_indices(k)] += 1e-15 + l2_h
        L = cholesky_or_empty(G, solver_code)
        h_args = (w, G, L, l1_h, state.h_scale, solver_code, nonneg_h, opts.cd_maxit, opts.cd_tol)
        # 2. fused block pass (chunk), warm-started from the normalized previous H.
        outs = executor.map_blocks(h_update_task, block_handles, state.ht, args=h_args, n_out=2)
        new_ht = [o[0] for o in outs]
        # 3. deterministic tree reduction of the partials (combine).
        try:
            stats = executor.tree_reduce(combine_stats, [o[1] for o in outs])
        except Exception as exc:  # a lost worker: rebuild its blocks, redo the iteration cold
            if not executor.is_data_loss(exc) or recoveries >= 3:
                raise
            recoveries += 1
            logger.warning("iteration %d lost data on a worker (%s); re-placing blocks and solving H cold",
                           it, type(exc).__name__)
            executor.release([o for pair in outs for o in pair])
            executor.release(state.ht)
            executor.release(block_handles)
            block_handles = place_blocks()
            state.ht = [None] * len(sources)
            continue
        executor.release([o[1] for o in outs])
        executor.release(state.ht)
        state.ht = new_ht
        # 4. aggregate on the client: normalize H, update W, scale, loss, convergence.
        s = _norms(stats.hsum, stats.Q, opts.norm)
        inv_s = 1.0 / s
        Qn = stats.Q * np.outer(inv_s, inv_s)  # Ĥ Ĥᵀ
        Pn = stats.P * inv_s[None, :]  # A Ĥᵀ
        Gw = Qn.copy()
        Gw[np.diag_indices(k)] += 1e-15
        w_new = update_factor(Gw, Pn, l1_w, l2_w, solver_code, nonneg_w, opts.cd_maxit, opts.cd_tol,
                              w_prev=state.w if it > 1 else None)
        w_new, d = scale_rows(w_new.T, opts.norm)
        w_new = np.ascontiguousarray(w_new.T)
        state.w, state.d, state.h_scale = w_new, d, inv_s
        # ‖A − W diag(d) Ĥ‖² = ‖A‖² − 2 Σ_r d_r ⟨w_r, (AĤᵀ)_r⟩ + Σ_rs d_r d_s (WᵀW)_rs (ĤĤᵀ)_rs
        cross = float(np.sum(d * np.einsum("ir,ir->r", w_new, Pn)))
        quad = float(np.sum(np.outer(d, d) * (w_new.T @ w_new) * Gw))
        loss = sq_norm_a - 2.0 * cross + quad
        state.loss_history.append(loss)
        state.iteration = it
        stop = check_convergence(state, opts)
        logger.debug("iteration %d loss %.6g rel %.3g", it, loss, state.tol_history[-1])
        if on_iteration is not None:
            try:
                on_iteration(IterationRecord(it, loss, float("nan")))
            except StopIteration:
                state.stopped_by_callback = True
                stop = True
        if stop:
            state.converged = not state.stopped_by_callback
        if checkpointer is not None and (stop or it % opts.checkpoint_every == 0 or it == opts.maxit):
            checkpointer.save(state, executor)
        if stop:
            break
        it += 1
    state.runtime = time.perf_counter() - t0
    try:
        ht_blocks = executor.gather(state.ht)
    except Exception as exc:
        if h_args is None or not executor.is_data_loss(exc):
            raise
        # H blocks of the last iteration were lost with a worker: re-solve them (cold) from
        # the W that produced them.
        logger.warning("final H blocks lost with a worker (%s); re-solving them", type(exc).__name__)
        block_handles = place_blocks()
        outs = executor.map_blocks(h_update_task, block_handles, [None] * len(sources), args=h_args, n_out=2)
        ht_blocks = executor.gather([o[0] for o in outs])
    executor.release(state.ht)
    executor.release(block_handles)
    return state, ht_blocks


def _tree_sum(values):
    level = list(values)
    while len(level) > 1:
        nxt = [level[i] + level[i + 1] for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]
