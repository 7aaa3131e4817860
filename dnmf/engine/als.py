"""The distributed alternating-NNLS loop (DESIGN §3): one fused pass over A per iteration.

Per iteration, with W (unit-norm columns) and d on the client:

1. client: ``G = WᵀW + L2_H·I`` (+ its Cholesky factor); W is put on the cluster;
2. one task per column block j: ``H_j ← NNLS(G, WᵀA_j − L1_H)`` (fused kernel), returning the
   partials ``P_j = A_j H_jᵀ``, ``Q_j = H_j H_jᵀ`` and ``hsum_j = Σ|H_j|`` (chunk);
   H_j stays where it was computed as the next warm start;
3. the partials are summed by a fixed binary tree in block order (combine) — bitwise the same
   result for any number of workers or threads;
4. client (aggregate): H is normalized implicitly (``s`` = its row norms), ``W ← NNLS(Q̂ + L2_W,
   P̂ᵀ − L1_W)``, d ← scaling of W, loss by the Gram identity, convergence check.

Only m·k + k² + k numbers per block travel per iteration; each block is read by one task.

Penalties (RcppML §8, ``solvers/penalties.py``): the H side's graph and L21 terms join G in step
1 (from the previous Ĥ: its norms from step 4's statistics, Ĥ itself gathered when graph_H is
on), its upper bound is applied in the block pass; an angular H adds a second round of block
tasks after step 3 (:func:`angular_task`: the map needs the whole new H's Gram) — A is then read
twice. The W side's terms act in step 4.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np

from ..exceptions import WorkerLostError
from ..io.blocks import BlockedMatrix, CSCBlock
from ..io.chunks import transient_reads
from ..kernels.column import ColumnTerms, column_terms
from ..kernels.fused import csc_block_pass, csc_sq_norm
from ..kernels.nnls import SOLVER_CHOLESKY
from ..solvers.hstep import MODE_FIXED, MODE_NNLS, MODE_PROJECT, HStep, h_step, solve_dense_columns
from ..solvers.penalties import Penalties, angular_matrix, apply_angular, apply_bound
from ..solvers.targets import FitTargets
from ..solvers.updates import cholesky_or_empty, scale_rows, update_factor
from . import buffers as _buf
from .executor import Executor, usable_cores
from .kernel_cache import ship_kernels

logger = logging.getLogger(__name__)

__all__ = ["ALSOptions", "ALSState", "IterationRecord", "BlockStats", "fit_als", "check_convergence"]


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
    projective: bool = False  # H = diag(d)·WᵀA, no NNLS (RcppML §7)
    symmetric: bool = False  # A ≈ W diag(d) Wᵀ: H is W's transpose, only W is solved (RcppML §7)
    penalties: Penalties = field(default_factory=Penalties)  # L21, angular, bounds, graphs (RcppML §8)
    float32: bool = False  # dtype="float32": the fused pass multiplies with a float32 copy of W


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
    # The current normalized Ĥ for the H side's penalty terms (solvers/penalties.py), kept on the
    # client only when needed: its squared row norms (L21) and Ĥᵀ itself (n × k, graph_H).
    h_sq: np.ndarray | None = None
    h_hat: np.ndarray | None = None


@dataclass(frozen=True)
class BlockStats:
    """Per-block partial statistics (float64)."""

    P: np.ndarray  # (m, k) = A_j H_jᵀ
    Q: np.ndarray  # (k, k) = H_j H_jᵀ
    hsum: np.ndarray  # (k,) = Σ_c |H_j[:, c]|

    def __sizeof__(self) -> int:
        # dask's sizeof (see io/blocks.py::CSCBlock.__sizeof__); without it dask would count the
        # m × k partial as a ~50-byte object.
        return int(self.P.nbytes + self.Q.nbytes + self.hsum.nbytes + 64)


def combine_stats(a: BlockStats, b: BlockStats) -> BlockStats:
    """Sum two partials (the combine step of the tree reduction)."""
    return BlockStats(np.add(a.P, b.P, out=_buf.empty(a.P.shape)), a.Q + b.Q, a.hsum + b.hsum)


def load_block(source):
    """Materialize a block from its source (a lazy Zarr source or an in-memory one), with its
    values as stored: a store's float64 values held exactly in float32 stay float32
    (``io/zarr_store.py``, "Values"), since the ALS passes form every product in float64 from
    each value (``kernels/fused.py``); loops that need float64 blocks convert them
    (``engine/masked.py::as_csc64``)."""
    return _load_stored(source) if hasattr(source, "load") else source


def _load_stored(source):
    stored = getattr(source, "load_stored", None)
    return stored() if stored is not None else source.load()


@contextlib.contextmanager
def loaded(source):
    """The block of ``source``, for a task that drops it before it returns.

    A lazy source (a block streamed from disk) is read into this thread's reused buffers
    (``io/chunks.py``, "Reused buffers"): no fresh pages per block and iteration. What the task
    returns must not be, or view, the block's arrays.
    """
    if not hasattr(source, "load"):
        yield source
        return
    with transient_reads():
        yield _load_stored(source)


def warm_up_kernels(source, k: int, opts: "ALSOptions", with_terms: bool = False) -> None:
    """Compile the block kernel for this fit's dtypes here, before any worker needs it.

    numba writes the compiled code to its on-disk cache, so Dask workers on this machine (or on a
    shared file system) load it instead of each compiling it — a fresh worker otherwise spends
    seconds and ~150 MB of LLVM memory per kernel signature; ``fit_als`` then ships the cache
    entries to workers on other nodes (``engine/kernel_cache.py``). Costs milliseconds once cached.
    The kernel is compiled for the fit's solver only, and for blocks with per-column terms when
    ``with_terms`` (docs/architecture.md, "Kernel compilation").
    """
    block = load_block(source)
    if isinstance(block, CSCBlock):
        tiny = CSCBlock(np.ones(1, dtype=block.data.dtype), np.zeros(1, dtype=block.indices.dtype),
                        np.array([0, 1], dtype=block.indptr.dtype), 1)
    else:
        tiny = np.ones((1, 1), dtype=block.dtype)
    G = np.eye(k)
    hs = HStep(np.ones((1, k), dtype=np.float32 if opts.float32 else np.float64), G, cholesky_or_empty(G, opts.solver),
               0.0, np.ones(k), int(opts.solver), True, int(opts.cd_maxit), float(opts.cd_tol))
    h_update_task(tiny, None, hs)
    if with_terms:
        h_update_task(tiny, None, hs, column_terms(k, rhs=np.zeros((tiny.shape[1], k))))


def block_sq_norm(block) -> float:
    """‖A_j‖²_F in float64."""
    with loaded(block) as block:
        if isinstance(block, CSCBlock):
            return float(csc_sq_norm(block.data))
        return float(np.einsum("ij,ij->", block, block, dtype=np.float64))


def h_update_task(block, ht_prev, hs: HStep, terms: ColumnTerms | None = None):
    """Step 2 for one block: H_j update and its partial statistics (the chunk function).

    ``hs`` holds the arguments every block shares (:func:`~dnmf.solvers.hstep.h_step`);
    ``terms`` the block's per-column corrections (none in a plain fit). Returns
    ``(ht, BlockStats)``: the new raw H_jᵀ (n_j × k) and the partials.
    """
    with loaded(block) as block:
        return _h_update(block, ht_prev, hs, terms)


def _h_update(block, ht_prev, hs: HStep, terms: ColumnTerms | None):
    w = hs.w
    m, k = w.shape
    n_j = block.shape[1]
    if hs.mode != MODE_NNLS:  # projective (H = wᵀA_j, w = W·diag(d)) or symmetric (H_j given: W's rows)
        a = block.to_scipy() if isinstance(block, CSCBlock) else np.asarray(block, dtype=np.float64)
        ht = (np.asarray(a.T @ w, dtype=np.float64) if hs.mode == MODE_PROJECT
              else np.array(ht_prev, dtype=np.float64, copy=True))
        return ht, BlockStats(np.asarray(a @ ht, dtype=np.float64), ht.T @ ht, np.abs(ht).sum(axis=0))
    warm = ht_prev is not None
    # pooled (engine/buffers.py): no fresh pages per block and iteration on a Dask worker
    ht = _buf.copy_of(ht_prev) if warm else _buf.zeros((n_j, k))
    if isinstance(block, CSCBlock):
        P = _buf.zeros((m, k))
        Q = np.zeros((k, k))
        hsum = np.zeros(k)
        csc_block_pass(block.data, block.indices, block.indptr, w, hs.G, hs.L, hs.l1, ht, hs.warm_scale,
                       column_terms(k) if terms is None else terms, hs.solver, hs.nonneg, hs.cd_maxit, hs.cd_tol,
                       warm, P, Q, hsum, hs.ub, _buf.empty)
    else:
        a = block if block.dtype == np.float64 else block.astype(np.float64)
        ht, Q, hsum = solve_dense_columns(w.T @ a, hs, ht, warm, terms)
        P = a @ ht
    return ht, BlockStats(P, Q, hsum)


def _h_task(block, ht_prev, terms, hs: HStep):
    """:func:`h_update_task` with the block's terms among the per-block arguments (map_blocks order)."""
    return h_update_task(block, ht_prev, hs, terms)


def block_terms(blocked: BlockedMatrix, k: int, targets: FitTargets | None) -> list:
    """Each column block's :class:`~dnmf.kernels.column.ColumnTerms` (None where it has none)."""
    bounds = blocked.col_bounds
    out = []
    for j in range(blocked.n_blocks):
        rhs = None if targets is None else targets.h_rhs(int(bounds[j]), int(bounds[j + 1]))
        out.append(None if rhs is None else column_terms(k, rhs=rhs))
    return out


def count_recovery(exc: WorkerLostError, recoveries: int, executor: Executor, what: str, done: int,
                   hint: str = "") -> int:
    """A loop's bookkeeping after a lost worker: the new recovery count, after a warning; or the
    WorkerLostError saying the fit (``what``) gave up, once ``executor.max_recoveries`` are spent."""
    recoveries += 1
    if recoveries > executor.max_recoveries:
        raise WorkerLostError(
            f"{str(exc).rstrip('.')}. The {what} gave up after {recoveries - 1} recoveries (max_recoveries="
            f"{executor.max_recoveries}) with {done} iterations done{hint}.", worker=exc.worker) from exc
    logger.warning("%s; re-placing the blocks on the live workers (recovery %d of at most %d)",
                   exc, recoveries, executor.max_recoveries)
    return recoveries


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


def _place_blocks(blocked: BlockedMatrix, executor: Executor, stream: bool) -> list:
    """Block handles on the executor's live workers (or in memory locally).

    In-memory blocks are placed as they are; lazy sources are either loaded once on the
    workers (they fit in memory) or, with ``stream``, passed as-is so every task reads its block
    from disk (out-of-core).
    """
    sources = list(blocked.sources)
    if stream:
        return executor.put_blocks(sources)
    if blocked.in_memory:
        return executor.put_blocks([src.load() for src in sources])
    return executor.map_blocks(load_block, executor.put_blocks(sources))


def h_task_step(w: np.ndarray, h_scale: np.ndarray, opts: ALSOptions, targets: FitTargets | None = None,
                d: np.ndarray | None = None, penalty: np.ndarray | None = None) -> HStep:
    """Step 1: the block tasks' shared arguments for the current W — its Gram
    ``G = WᵀW + L2_H·I`` (then ``penalty``, the H side's graph and L21 terms, then the H target's
    Gram term, guided spec §2.2) and G's Cholesky factor, with the H-side penalties, upper
    bound, warm-start scale and solver settings, as one :class:`~dnmf.solvers.hstep.HStep`.
    Projective NMF projects with ``W·diag(d)`` instead; symmetric NMF takes H as given (W's
    rows, see :func:`_h_inputs`)."""
    hs = h_step(w, l1=opts.L1[1], l2=opts.L2[1], solver=opts.solver, nonneg=opts.nonneg[1], cd_maxit=opts.cd_maxit,
                cd_tol=opts.cd_tol, warm_scale=h_scale, ridge=1e-15, penalty=penalty,
                ub=opts.penalties.upper_bound[1])
    if targets is not None and targets.h is not None:
        G = targets.h_gram(hs.G)
        hs = hs._replace(G=G, L=cholesky_or_empty(G, opts.solver))
    if opts.projective:
        hs = hs._replace(w=np.ascontiguousarray(w * d[None, :]) if d is not None else w, mode=MODE_PROJECT)
    elif opts.symmetric:
        hs = hs._replace(mode=MODE_FIXED)
    return hs


def _h_task_args(state: ALSState, opts: ALSOptions, targets: FitTargets | None = None) -> tuple:
    """:func:`h_task_step` for the current W (and the current Ĥ's penalty terms), in a 1-tuple
    for ``map_blocks``. With ``opts.float32`` the block tasks get W rounded to float32 for their
    products ``WᵀA_j`` (half the bytes per stored entry gathered, half sent to each worker); G, its
    factor and every sum stay float64 (docs/architecture.md, "One iteration")."""
    penalty = opts.penalties.gram(1, state.h_hat, state.h_sq)
    hs = h_task_step(state.w, state.h_scale, opts, targets, state.d, penalty)
    if opts.float32 and hs.mode == MODE_NNLS:
        hs = hs._replace(w=hs.w.astype(np.float32))
    return (hs,)


def angular_task(block, ht, M: np.ndarray):
    """The H side's angular step on one block (``H_j ← max(0, H_j − M H_j)``, M from the whole new
    H's Gram, ``solvers/penalties.py``) and the block's partials recomputed from the new H_j —
    the second pass over A that an exact angular H costs (``docs/architecture.md``)."""
    ht = apply_angular(np.asarray(ht, dtype=np.float64), M)
    with loaded(block) as block:
        a = block.to_scipy() if isinstance(block, CSCBlock) else np.asarray(block, dtype=np.float64)
        P = np.asarray(a @ ht, dtype=np.float64)
    return ht, BlockStats(np.ascontiguousarray(P), ht.T @ ht, np.abs(ht).sum(axis=0))


def _h_inputs(state: ALSState, opts: ALSOptions, blocked: BlockedMatrix, ht: list) -> list:
    """What the block tasks start from: the previous H (warm start), or for symmetric NMF the
    current W's rows of the block's columns (A is square: H = Wᵀ)."""
    if not opts.symmetric:
        return ht
    bounds = blocked.col_bounds
    return [np.ascontiguousarray(state.w[int(bounds[j]):int(bounds[j + 1])]) for j in range(blocked.n_blocks)]


def _solve_h(executor: Executor, blocks: list, ht: list, terms: list, h_args: tuple) -> tuple[list, list]:
    """Step 2 on every block (warm-started from ``ht``): handles of the new H_jᵀ and of the partials."""
    outs = executor.map_blocks(_h_task, blocks, ht, terms, args=h_args, n_out=2)
    return [o[0] for o in outs], [o[1] for o in outs]


def _angular_h(executor: Executor, blocks: list, ht: list, stats: BlockStats, lam: float):
    """The exact angular step of H (second pass): ``(new H handles, partial handles, summed stats)``;
    the handles given are released."""
    outs = executor.map_blocks(angular_task, blocks, ht, args=(angular_matrix(stats.Q, lam),), n_out=2)
    new_ht, parts = [o[0] for o in outs], [o[1] for o in outs]
    stats = executor.tree_reduce(combine_stats, parts)
    return new_ht, parts, stats


def _update_w(state: ALSState, stats: BlockStats, opts: ALSOptions, sq_norm_a: float, it: int,
              targets: FitTargets | None = None) -> float:
    """Step 4 (aggregate): normalize H into ``s``, update W, scale it into d; returns the loss.

    The W side's §8 penalties (``opts.penalties``): graph and L21 terms of the current W on the
    Gram (after L2, before a target), then the upper bound and the angular map of the new W.
    Sets ``state.w``, ``state.d`` and ``state.h_scale`` (and ``state.h_sq`` for an H-side L21).
    The loss is the Gram identity
    ``‖A − W diag(d) Ĥ‖² = ‖A‖² − 2 Σ_r d_r ⟨w_r, (AĤᵀ)_r⟩ + Σ_rs d_r d_s (WᵀW)_rs (ĤĤᵀ)_rs``.
    """
    s = _norms(stats.hsum, stats.Q, opts.norm)
    inv_s = 1.0 / s
    Qn = stats.Q * np.outer(inv_s, inv_s)  # Ĥ Ĥᵀ
    Pn = stats.P * inv_s[None, :]  # A Ĥᵀ
    Gw = Qn.copy()
    Gw[np.diag_indices(opts.k)] += 1e-15
    Gs, Ps, l2 = Gw, Pn, opts.L2[0]
    pen = opts.penalties
    penalty = pen.gram(0, state.w)  # graph and L21 of the current W (solvers/penalties.py)
    if penalty is not None or (targets is not None and targets.w is not None):
        # L2, then graph and L21, then the target (RcppML §8, guided spec §2.2)
        Gs = Gw + l2 * np.eye(opts.k)
        if penalty is not None:
            Gs = Gs + penalty
        if targets is not None and targets.w is not None:
            Gs, Ps = targets.w_problem(Gs, Pn)
        l2 = 0.0
    w_new = update_factor(Gs, Ps, opts.L1[0], l2, opts.solver, opts.nonneg[0], opts.cd_maxit, opts.cd_tol,
                          w_prev=state.w if it > 1 else None, n_threads=usable_cores())
    w_new = apply_bound(w_new, pen.upper_bound[0])
    if pen.angular[0] > 0:
        w_new = apply_angular(w_new, angular_matrix(w_new.T @ w_new, pen.angular[0]))
    w_new, d = scale_rows(w_new.T, opts.norm)
    w_new = np.ascontiguousarray(w_new.T)
    state.w, state.d, state.h_scale = w_new, d, inv_s
    if pen.L21[1] > 0:
        state.h_sq = np.diag(Qn).copy()
    cross = float(np.sum(d * np.einsum("ir,ir->r", w_new, Pn)))
    quad = float(np.sum(np.outer(d, d) * (w_new.T @ w_new) * Gw))
    return sq_norm_a - 2.0 * cross + quad


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
    targets: FitTargets | None = None,
):
    """Run the ALS loop; returns ``(state, ht_blocks)`` with ht_blocks the gathered raw H_jᵀ.

    ``targets`` (guided NMF) adds the H target's Gram term to the shared G, its ``λ t_c`` to each
    column's right-hand side (per-block column terms) and the W target's terms to the W update;
    the loss stays the reconstruction loss.

    ``state`` resumes a checkpointed fit (its ``ht`` entries are arrays then). ``stream=True``
    reads each block from its source in every task (out-of-core); otherwise blocks are
    loaded once onto the workers (or kept in memory locally).

    A worker lost at any moment — placing blocks, broadcasting W, block tasks, the reduction,
    a checkpoint, the final gather — makes an executor verb raise
    :class:`~dnmf.exceptions.WorkerLostError`. The fit then re-places the blocks on the live
    workers and redoes the interrupted step from the current W with H solved cold (H of the last
    iteration is re-solved from the W that produced it when a checkpoint or the result needs it);
    the Cholesky solver ignores warm starts, so the result is bitwise that of an undisturbed fit.
    After ``executor.max_recoveries`` recoveries the WorkerLostError is raised, pointing to
    ``--resume``.
    """
    n_blocks = len(blocked.sources)
    terms = block_terms(blocked, opts.k, targets)
    if state is None:
        if executor.distributed:
            warm_up_kernels(blocked.sources[0], opts.k, opts, with_terms=any(t is not None for t in terms))
            ship_kernels(executor.client)  # workers without this cache load the compiled variant
        state = ALSState(w=np.ascontiguousarray(w0, dtype=np.float64), d=np.ones(opts.k), ht=[None] * n_blocks,
                         h_scale=np.ones(opts.k))
    # Where H comes from when the blocks are (re-)placed: a resumed fit's arrays until its first
    # iteration; after that the task arguments that produced state.ht (to re-solve them cold).
    resumed_ht = state.ht if state.ht[0] is not None else None
    pen = opts.penalties
    ang_h = pen.angular[1] if not (opts.projective or opts.symmetric) else 0.0
    if resumed_ht is not None and pen.gram_on(1):  # the H side's terms need the current Ĥ
        state.h_hat = np.concatenate(resumed_ht, axis=0) * state.h_scale[None, :]
        state.h_sq = None
    h_args = None
    h_state = state  # the W (for symmetric NMF) behind h_args
    blocks = None  # block handles; None until (re-)placed
    in_flight: list = []  # handles of the step under way, dropped when a worker is lost
    stale: list = []  # handles of the last iteration no longer needed, dropped in the next one
    done = state.converged or state.stopped_by_callback or state.iteration >= opts.maxit
    pending_save = False
    recoveries = 0
    t0 = time.perf_counter()
    while True:
        try:
            if blocks is None:
                blocks = _place_blocks(blocked, executor, stream)
                if resumed_ht is not None:
                    state.ht = executor.put_blocks(resumed_ht)
                elif h_args is not None and (pending_save or done):
                    # A checkpoint or the result needs the lost H of the last iteration.
                    state.ht, parts = _solve_h(executor, blocks, _h_inputs(h_state, opts, blocked, [None] * n_blocks),
                                               terms, h_args)
                    if ang_h > 0:
                        first = state.ht
                        state.ht, parts2, _ = _angular_h(executor, blocks, first, executor.tree_reduce(
                            combine_stats, parts), ang_h)
                        executor.release([*first, *parts])
                        parts = parts2
                    executor.release(parts)
                else:
                    state.ht = [None] * n_blocks  # the next iteration starts cold
            if sq_norm_a is None:
                sq_norm_a = float(executor.tree_reduce(operator.add, executor.map_blocks(block_sq_norm, blocks)))
            if pending_save:
                checkpointer.save(state, executor)
                pending_save = False
            if done:
                ht_blocks = executor.gather(state.ht)
                break
            it = state.iteration + 1
            # 1.-2. Gram of the current (normalized) W; fused block pass (chunk), warm-started
            # from the normalized previous H.
            args = _h_task_args(state, opts, targets)
            h_state = ALSState(w=state.w, d=state.d, ht=[], h_scale=state.h_scale)  # W the H step used
            new_ht, parts = _solve_h(executor, blocks, _h_inputs(state, opts, blocked, state.ht), terms, args)
            in_flight = new_ht + parts
            # The last iteration's handles are dropped only now, while the block tasks run: on a
            # cluster in this process (processes=False) the scheduler's work of forgetting them
            # would otherwise hold the GIL against step 4 (docs/architecture.md, "Cluster overhead").
            executor.release(stale)
            # 3. deterministic tree reduction of the partials (combine).
            stats = executor.tree_reduce(combine_stats, parts)
            if ang_h > 0:  # the exact angular step of H needs the whole new H's Gram: a second pass
                first, first_parts = new_ht, parts
                new_ht, parts, stats = _angular_h(executor, blocks, new_ht, stats, ang_h)
                in_flight += new_ht + parts
                executor.release([*first, *first_parts])
            # graph_H needs the whole new H (n × k) on the client (n·k numbers per iteration):
            # gathered before the client's step, so a lost worker cannot interrupt it half-way
            h_raw = np.concatenate(executor.gather(new_ht), axis=0) if pen.graph(1) is not None else None
            stale = [*parts, *state.ht]
            state.ht, h_args, resumed_ht, in_flight = new_ht, args, None, []
            # 4. aggregate on the client: normalize H, update W, scale, loss, convergence.
            loss = _update_w(state, stats, opts, sq_norm_a, it, targets)
            if h_raw is not None:
                state.h_hat = h_raw * state.h_scale[None, :]
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
            done = stop or it >= opts.maxit
            pending_save = checkpointer is not None and (done or it % opts.checkpoint_every == 0)
        except WorkerLostError as exc:
            executor.release([*in_flight, *(blocks or ()), *state.ht, *stale])
            in_flight, blocks, stale = [], None, []
            recoveries = count_recovery(exc, recoveries, executor, "fit", state.iteration,
                                        "; `dnmf run CONFIG --resume` continues from the last checkpoint (in "
                                        "Python: nmf(..., checkpoint=PATH, resume=True))")
    if opts.symmetric:  # H ← Wᵀ after the last W update (RcppML §7)
        ht_blocks = _h_inputs(state, opts, blocked, ht_blocks)
        state.h_scale = np.ones(opts.k)
    state.runtime = time.perf_counter() - t0
    executor.release(stale)
    executor.release(state.ht)
    executor.release(blocks)
    return state, ht_blocks
