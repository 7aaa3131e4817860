"""The ALS loop with missing entries: masks, NaN, zeros-as-missing and speckled cross-validation.

A fit whose columns *and rows* each have their own least-squares problem (``docs/
architecture.md``, "Per-row problems on the W side") runs this loop instead of the one fused
pass of :mod:`dnmf.engine.als`. Per iteration:

1. client: ``G = WᵀW + (ε + L2_H)·I`` as one :class:`~dnmf.solvers.hstep.HStep`;
2. one task per **column block** (CSC): the masked H update
   (:func:`~dnmf.kernels.masked.csc_masked_pass`) returning ``(H_jᵀ, H_j H_jᵀ, Σ|H_j|)``;
3. client: H is gathered (n × k), normalized (row norms → ``s``) and put on the cluster;
4. one task per **row block** (CSR, a second copy of A built once on the workers by a
   blockwise transpose): the masked W update of every row, solved on the spot
   (:func:`~dnmf.kernels.masked.csr_masked_pass`), returning the raw rows ``w_i d`` and the
   block's train/test squared errors;
5. client: W's rows are stacked and scaled into ``d``; losses and convergence.

Penalties (RcppML §8, ``solvers/penalties.py``) act on the same steps: the H side's graph and
L21 terms (from the previous Ĥ, on the client) join G in step 1 and the Grams the kernel builds,
its upper bound is applied in step 2 and its angular map in step 3 on the client; the W side's
terms in step 4 (per row, after L2 and before a target), its angular map on the client after
step 4, followed by a scoring row pass (no solve) so the losses are of the final W.

Projective and symmetric NMF (``opts.projective`` / ``opts.symmetric``, per model): step 2
projects each column over its observed entries instead of solving (``HStep.mode`` MODE_PROJECT,
``hs.w = W·diag(d)``); symmetric NMF skips step 2 — ``H = Wᵀ`` is formed on the client
(:func:`_symmetric_h`) — and, with a test set, holds out unordered pairs
(:func:`~dnmf.kernels.masked.held_out_pair`) so that no held-out ``a_ij`` enters W through its
twin ``a_ji`` (``docs/architecture.md``, "Variants").

H and W live on the client between iterations (n·k and m·k numbers), so a lost worker costs
only the re-placement of the blocks and a redo of the iteration in progress. The column and row
partitions are functions of the data only, and every sum is taken in block order, so results do
not depend on the number of workers.

Convergence: without a hold-out set as :func:`dnmf.engine.als.check_convergence` on the
training SSE (a sum over observed entries); with one as RcppML §3.2 — track the best test
loss, stop after ``patience`` iterations without a new best, or at once when the relative change
of the test loss falls below ``tol``. CV losses are means (§4.3).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

from ..exceptions import WorkerLostError
from ..io.blocks import BlockedMatrix, CSCBlock
from ..kernels.column import ColumnTerms, column_terms
from ..kernels.masked import (NO_PATTERN, csc_masked_pass, csr_masked_pass, holdout_pattern, holdout_seed,
                              holdout_threshold)
from ..solvers.hstep import MODE_PROJECT, HStep
from ..solvers.penalties import angular_matrix, apply_angular
from ..solvers.targets import FitTargets
from ..solvers.updates import scale_rows
from .als import (ALSOptions, ALSState, IterationRecord, _norms, block_terms, check_convergence, count_recovery,
                  h_task_step, load_block)
from . import buffers as _buf
from .executor import Executor
from .kernel_cache import ship_kernels

logger = logging.getLogger(__name__)

__all__ = ["MaskOptions", "MaskedState", "CSRBlock", "fit_masked", "fit_masked_many", "row_bounds_for"]

_EMPTY_IDX = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class MaskOptions:
    """Which entries of A are missing or held out.

    zeros_missing : only stored (non-zero) entries are observed (``mask="zeros"``).
    test_fraction, cv_seed : the §5.2 hold-out set (``test_fraction`` 0: none); ``cv_seed`` is
        the effective seed.
    mask : scipy.sparse CSC matrix (m × n, True = missing) or None.
    NaN entries of A are always missing.
    """

    zeros_missing: bool = False
    test_fraction: float = 0.0
    cv_seed: int = 0
    mask: Any = None

    @property
    def cv_on(self) -> bool:
        return self.test_fraction > 0


def _kernel_args(mo: MaskOptions) -> tuple:
    """(zeros_missing, cv_on, cv_seed (uint64), cv_threshold (uint64)): the kernels' mask arguments."""
    return (bool(mo.zeros_missing), bool(mo.cv_on), holdout_seed(mo.cv_seed), holdout_threshold(mo.test_fraction))


@dataclass(frozen=True)
class CSRBlock:
    """An m_b × n sparse row block as CSR triplets (float64 values, int64 indices)."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    n_cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.indptr) - 1, self.n_cols)

    def __sizeof__(self) -> int:  # dask's sizeof (see io/blocks.py::CSCBlock.__sizeof__)
        return int(self.data.nbytes + self.indices.nbytes + self.indptr.nbytes + 64)


@dataclass
class MaskedState(ALSState):
    """:class:`~dnmf.engine.als.ALSState` plus the hold-out bookkeeping (``ht`` holds arrays)."""

    test_history: list = field(default_factory=list)
    best_test: float = math.inf
    best_iter: int = 0  # 1-based iteration of the best test loss
    since_best: int = 0
    n_test: int = 0
    n_train: int = 0


def row_bounds_for(m: int, n_blocks: int) -> np.ndarray:
    """Equal row ranges, as many as there are column blocks (a function of the data only)."""
    n_rb = max(1, min(int(n_blocks), int(m)))
    return np.linspace(0, m, n_rb + 1).round().astype(np.int64)


def as_csc64(block) -> CSCBlock:
    """A block as float64 CSC with int64 indices (a dense block keeps its NaN; zeros dropped)."""
    block = load_block(block)
    if isinstance(block, CSCBlock):
        return CSCBlock(np.asarray(block.data, dtype=np.float64), np.asarray(block.indices, dtype=np.int64),
                        np.asarray(block.indptr, dtype=np.int64), block.n_rows)
    a = np.asarray(block, dtype=np.float64)
    csc = sp.csc_matrix(a)
    csc.sort_indices()
    return CSCBlock(csc.data, csc.indices.astype(np.int64), csc.indptr.astype(np.int64), a.shape[0])


def split_rows(block: CSCBlock, bounds: np.ndarray) -> tuple:
    """The block's rows cut at ``bounds``: one scipy CSR piece per row block."""
    csc = sp.csc_matrix((block.data, block.indices, block.indptr), shape=block.shape)
    csr = csc.tocsr()
    return tuple(csr[int(bounds[r]):int(bounds[r + 1])] for r in range(len(bounds) - 1))


def _whole_rows(block: CSCBlock):
    """The block as one CSR piece (a single row block)."""
    return sp.csc_matrix((block.data, block.indices, block.indptr), shape=block.shape).tocsr()


def join_rows(*pieces) -> CSRBlock:
    """One row block from its pieces of every column block, in column-block order."""
    csr = sp.hstack(pieces, format="csr") if len(pieces) > 1 else sp.csr_matrix(pieces[0])
    csr.sort_indices()
    return CSRBlock(np.asarray(csr.data, dtype=np.float64), csr.indices.astype(np.int64),
                    csr.indptr.astype(np.int64), csr.shape[1])


def _join_rows_at(anchor, *pieces) -> CSRBlock:
    """:func:`join_rows` of ``pieces``; ``anchor`` (one of them) only says where the task runs."""
    return join_rows(*pieces)


def _mask_parts(mask, bounds: np.ndarray, axis: int) -> list:
    """The user mask cut into column (axis 1, CSC) or row (axis 0, CSR) blocks: (indices, indptr)."""
    n_parts = len(bounds) - 1
    if mask is None:
        return [(_EMPTY_IDX, _EMPTY_IDX)] * n_parts
    full = mask.tocsc() if axis == 1 else mask.tocsr()
    parts = []
    for r in range(n_parts):
        lo, hi = int(bounds[r]), int(bounds[r + 1])
        piece = full[:, lo:hi] if axis == 1 else full[lo:hi]
        piece.sort_indices()
        parts.append((piece.indices.astype(np.int64), piece.indptr.astype(np.int64)))
    return parts


def tiny_blocks() -> tuple:
    """A 1 × 1 column block and the same entry as a row block, with the dtypes every block of
    the masked, IRLS and KL loops has (float64 values, int64 indices; :func:`as_csc64`,
    :func:`join_rows`), and an empty user mask for one outer vector: ``(CSCBlock, CSRBlock,
    (indices, indptr))``. The kernel warm-ups run the loops' block tasks on them."""
    col = as_csc64(CSCBlock(np.ones(1), np.zeros(1, dtype=np.int64), np.array([0, 1], dtype=np.int64), 1))
    return col, join_rows(_whole_rows(col)), (_EMPTY_IDX, np.zeros(2, dtype=np.int64))


def run_for_compilation(task: Callable, *args, **kwargs) -> None:
    """Call a block task on tiny inputs only to compile (or load) the kernels it calls; its
    result is dropped. numba compiles a kernel before running it, so an arithmetic error the
    tiny numbers raise (a Gram with nothing observed) comes after the compilation and is ignored."""
    try:
        task(*args, **kwargs)
    except ArithmeticError as exc:
        logger.debug("kernel warm-up of %s: %r on the tiny input (compiled before)", task.__name__, exc)


def warm_up_kernels(models: list, kargs: tuple, pair: bool) -> None:
    """Compile here, before any worker needs them, the kernels the block tasks of
    :func:`fit_masked_many` call for these models (``_Model`` list): one column-block and one
    row-block task of the first iteration on :func:`tiny_blocks`, with the models' own task
    arguments (later iterations pass the same numba types: warm starts and penalty Grams are
    float64 arrays of the same dimensions). Nothing of the results is kept.

    With the kernels in numba's on-disk cache, workers on this machine load them;
    ``fit_masked_many`` then ships the cache entries to workers elsewhere
    (``engine/kernel_cache.py``; docs/architecture.md, "Kernel compilation").
    """
    col, row, mk = tiny_blocks()
    solved = [mdl for mdl in models if not mdl.opts.symmetric]
    if solved:
        run_for_compilation(masked_h_many, col, mk, 0, [(None, mdl.terms[0]) for mdl in solved], kargs,
                            [_h_model_args(mdl) for mdl in solved])
    w_inputs = []
    for mdl in models:  # a made-up H of one column whose Gram stays positive definite when it is masked
        k = mdl.opts.k
        h = np.full((1, k), 1.0 / k)
        w_inputs.append(_w_model_inputs(mdl, [(h, h.T @ h + np.eye(k), h[0])], np.array([0, 1]), [0]))
    run_for_compilation(masked_w_many, row, mk, 0, [(None, wi["tws"][0]) for wi in w_inputs], kargs,
                        [(wi["hn"], wi["Qn"], wi["wside"], wi["wtarget"]) for wi in w_inputs], False, pair)


def masked_h_task(block: CSCBlock, mk: tuple, ht_prev, col0: int, terms: ColumnTerms | None, hs: HStep,
                  ridge: float, kargs: tuple, removal: tuple = (np.zeros((0, 0)), 0.0), pattern: tuple = NO_PATTERN,
                  gpen: np.ndarray | None = None):
    """Masked H update of one column block for one model: ``(H_jᵀ, H_j H_jᵀ, Σ|H_j|)``.

    ``ridge`` is the diagonal ``hs.G`` carries beyond ``WᵀW`` (guard + L2_H, + λ_H of an
    enrichment target); ``removal`` a removal target's (Γ, |λ_H|) for the Grams a column forms;
    ``pattern`` the block's held-out rows when several models share the pass (else hashed);
    ``gpen`` the H side's penalty Gram term that ``hs.G`` carries (graph, L21), for the Grams
    built from observed rows; ``hs.ub`` bounds each solved column. ``hs.mode`` MODE_PROJECT
    (projective NMF, ``hs.w = W·diag(d)``) projects each column's observed entries instead.
    """
    w = hs.w
    m, k = w.shape
    n_j = block.shape[1]
    warm = ht_prev is not None
    ht = _buf.copy_of(ht_prev) if warm else _buf.zeros((n_j, k))  # pooled: engine/buffers.py
    Q = np.zeros((k, k))
    hsum = np.zeros(k)
    csc_masked_pass(block.data, block.indices, block.indptr, m, int(col0), w, hs.G, hs.L, ridge, hs.l1, ht,
                    hs.warm_scale, column_terms(k) if terms is None else terms, hs.solver, hs.nonneg, hs.cd_maxit,
                    hs.cd_tol, warm, *kargs, mk[0], mk[1], removal[0], float(removal[1]), pattern[0], pattern[1],
                    Q, hsum, gpen, hs.ub, hs.mode == MODE_PROJECT)
    return ht, Q, hsum


def masked_w_task(block: CSRBlock, mk: tuple, wt_prev, row0: int, tw, hn: np.ndarray, Q: np.ndarray, wside: tuple,
                  kargs: tuple, wtarget: tuple = (0.0, np.zeros((0, 0))), pattern: tuple = NO_PATTERN,
                  fixed: bool = False, pair: bool = False):
    """Masked W update of one row block for one model: ``(raw rows w_i d, [train SSE, n, test SSE, n])``.

    ``tw`` is the block's rows of a W target (None: none); ``wtarget`` its (λ_W, Γ); ``pattern``
    the block's held-out columns per row when several models share the pass (else hashed).
    ``wside`` is ``(ridge, L1, L2, solver, nonneg, cd_maxit, cd_tol[, penalty Gram, upper bound])``;
    ``fixed`` takes ``wt_prev`` as the rows and only scores them (the loss pass after angular W);
    ``pair`` holds out unordered pairs (symmetric NMF, :func:`~dnmf.kernels.masked.held_out_pair`).
    """
    ridge, l1, l2, solver, nonneg, cd_maxit, cd_tol = wside[:7]
    gpen, ub = wside[7:9] if len(wside) > 7 else (None, 0.0)
    k = hn.shape[1]
    warm = wt_prev is not None
    wt = np.array(wt_prev, dtype=np.float64, copy=True) if warm else np.zeros((block.shape[0], k))
    sums = np.zeros(4)
    tw = np.zeros((0, k)) if tw is None else np.ascontiguousarray(tw, dtype=np.float64)
    csr_masked_pass(block.data, block.indices, block.indptr, block.n_cols, int(row0), hn, Q, ridge, l1, l2, wt,
                    solver, nonneg, cd_maxit, cd_tol, warm, *kargs, mk[0], mk[1], tw, float(wtarget[0]),
                    np.ascontiguousarray(wtarget[1], dtype=np.float64), pattern[0], pattern[1], sums, gpen, ub, fixed,
                    pair)
    return wt, sums


def _block_pattern(block, offset: int, n_inner: int, by_row: bool, kargs: tuple, n_models: int,
                   pair: bool = False) -> tuple:
    """The block's held-out pattern when several models share the pass; hashing otherwise."""
    zeros_missing, cv_on, seed, thr = kargs
    if n_models < 2 or not cv_on:
        return NO_PATTERN
    return holdout_pattern(int(offset), block.shape[0 if by_row else 1], int(n_inner), by_row, seed, thr,
                           zeros_missing, block.data, block.indices, block.indptr, pair)


def masked_h_many(block: CSCBlock, mk: tuple, col0: int, per_model: list, kargs: tuple, shared: list) -> list:
    """One column block, every model of a shared pass: the block's held-out rows are hashed once
    (:func:`~dnmf.kernels.masked.holdout_pattern`), then each model's masked H update runs on it.
    ``per_model``: the block's ``(ht_prev, terms)`` of each model; ``shared``: each model's
    ``(hs, ridge, removal)`` (one object for all blocks, sent once)."""
    pattern = _block_pattern(block, col0, block.shape[0], False, kargs, len(per_model))
    return [masked_h_task(block, mk, ht, col0, terms, hs, ridge, kargs, removal, pattern, *rest)
            for (ht, terms), (hs, ridge, removal, *rest) in zip(per_model, shared)]


def masked_w_many(block: CSRBlock, mk: tuple, row0: int, per_model: list, kargs: tuple, shared: list,
                  fixed: bool = False, pair: bool = False) -> list:
    """One row block, every model of a shared pass (see :func:`masked_h_many`).
    ``per_model``: the block's ``(wt_prev, tw)``; ``shared``: ``(hn, Q, wside, wtarget)`` per model;
    ``fixed``: score the given rows only (:func:`masked_w_task`); ``pair``: the symmetric
    held-out set of unordered pairs (every model of the pass is symmetric NMF)."""
    pattern = _block_pattern(block, row0, block.n_cols, True, kargs, len(per_model), pair)
    return [masked_w_task(block, mk, wt, row0, tw, hn, Q, wside, kargs, wtarget, pattern, fixed, pair)
            for (wt, tw), (hn, Q, wside, wtarget) in zip(per_model, shared)]


def _cv_stop(state: MaskedState, opts: ALSOptions) -> bool:
    """RcppML §3.2 on the test loss: patience without a new best, or a relative change < tol."""
    hist = state.test_history
    test = hist[-1]
    if test < state.best_test:
        state.best_test, state.best_iter, state.since_best = test, len(hist), 0
    else:
        state.since_best += 1
    if opts.patience > 0 and state.since_best >= opts.patience:
        state.tol_history.append(abs(hist[-2] - test) / (abs(hist[-2]) + 1e-15) if len(hist) > 1 else 0.0)
        return True
    if len(hist) < 2:
        state.tol_history.append(0.0)
        return False
    rel = abs(hist[-2] - test) / (abs(hist[-2]) + 1e-15)
    state.tol_history.append(rel)
    return rel < opts.tol


def record_iteration(state: MaskedState, opts: ALSOptions, train_total: float, n_train, test_total: float, n_test,
                     cv_on: bool, on_iteration: Callable | None) -> bool:
    """Record iteration ``state.iteration``'s losses and decide whether the fit stops there.

    With a hold-out set the losses are means (``train_total / n_train``, ``test_total / n_test``)
    and the stop is :func:`_cv_stop`; otherwise the train loss is the total and the stop
    :func:`~dnmf.engine.als.check_convergence`. Then ``on_iteration`` (StopIteration stops the
    fit). Returns True when the fit ends here (stopped, or ``maxit`` reached). Shared by the
    masked, KL and IRLS loops.
    """
    it = state.iteration
    state.n_train, state.n_test = int(n_train), int(n_test)
    if cv_on:
        train = train_total / max(n_train, 1.0)
        test = float(test_total / n_test) if n_test > 0 else float("nan")
        state.loss_history.append(train)
        state.test_history.append(test)
        stop = _cv_stop(state, opts)
    else:
        train, test = float(train_total), float("nan")
        state.loss_history.append(train)
        stop = check_convergence(state, opts)
    logger.debug("iteration %d train %.6g test %.6g", it, train, test)
    if on_iteration is not None:
        try:
            on_iteration(IterationRecord(it, train, test))
        except StopIteration:
            state.stopped_by_callback = True
            stop = True
    if stop:
        state.converged = not state.stopped_by_callback
    return stop or it >= opts.maxit


class _Placed:
    """Column and row blocks on the executor (rebuilt after a lost worker)."""

    def __init__(self, blocked: BlockedMatrix, executor: Executor, rb: np.ndarray):
        sources = list(blocked.sources)
        handles = executor.put_blocks([s.load() for s in sources] if blocked.in_memory else sources)
        self.cols = executor.map_blocks(as_csc64, handles)
        executor.release(handles)
        n_rb = len(rb) - 1
        if n_rb == 1:
            pieces = [(p,) for p in executor.map_blocks(_whole_rows, self.cols)]
        else:
            pieces = executor.map_blocks(split_rows, self.cols, args=(rb,), n_out=n_rb)
        # Row block r is joined where column block ⌊r·n_cols/n_rows⌋ lives (its first argument,
        # which map_blocks runs beside): the row blocks spread over the workers as the column
        # blocks do, instead of all joining — and every W-side task then running — on the worker
        # of column block 0. Placement only: each row block's arithmetic is the same anywhere.
        n_cb = len(pieces)
        anchors = [pieces[r * n_cb // n_rb][r] for r in range(n_rb)]
        self.rows = executor.map_blocks(_join_rows_at, anchors,
                                        *[[pieces[j][r] for r in range(n_rb)] for j in range(n_cb)])
        executor.release([p for ps in pieces for p in ps])

    def release(self, executor: Executor) -> None:
        executor.release(self.cols)
        executor.release(self.rows)


@dataclass
class _Model:
    """One model of a (shared) masked fit: its constants, targets, callback and state."""

    opts: ALSOptions
    state: MaskedState
    targets: FitTargets
    terms: list
    on_iteration: Callable | None
    done: bool = False


def fit_masked(
    blocked: BlockedMatrix,
    w0: np.ndarray,
    opts: ALSOptions,
    mo: MaskOptions,
    executor: Executor,
    *,
    on_iteration: Callable | None = None,
    targets: FitTargets | None = None,
):
    """Run the masked ALS loop; returns ``(MaskedState, ht_blocks)`` (raw H_jᵀ per column block).

    ``targets`` (guided NMF): the H target's per-column terms and Gram term (a removal target is
    applied to every Gram a column forms), the W target's per-row terms.
    A lost worker (:class:`~dnmf.exceptions.WorkerLostError` from any executor verb) re-places
    the blocks and redoes the iteration in progress from the client's W and H, at most
    ``executor.max_recoveries`` times.
    """
    ((state, ht),) = fit_masked_many(blocked, [w0], [opts], mo, executor, on_iteration=[on_iteration],
                                     targets=[targets])
    return state, ht


def fit_masked_many(
    blocked: BlockedMatrix,
    w0s: list,
    opts_list: list,
    mo: MaskOptions,
    executor: Executor,
    *,
    on_iteration: list | None = None,
    targets: list | None = None,
) -> list:
    """Several masked fits of the same A and held-out set sharing every pass over A.

    Each iteration runs one task per column block and one per row block for all models still
    running: the block's held-out entries are hashed once for all of them, and each model's
    update is the single-model one (bitwise: the pattern lists the same entries in the same
    order as hashing). Models stop independently (each by its own convergence rule). Returns
    ``[(MaskedState, ht_blocks)]`` in the order of ``w0s``.
    """
    m, n = blocked.shape
    cb = blocked.col_bounds
    rb = row_bounds_for(m, blocked.n_blocks)
    n_cb, n_rb = len(cb) - 1, len(rb) - 1
    mask = None if mo.mask is None else sp.csc_matrix(mo.mask, dtype=bool)
    cmasks = _mask_parts(mask, cb, axis=1)
    rmasks = _mask_parts(mask, rb, axis=0)
    kargs = _kernel_args(mo)
    # symmetric NMF holds out unordered pairs (a_ji is a_ij): one held-out set for the whole pass
    pair = mo.cv_on and any(o.symmetric for o in opts_list)
    if pair and not all(o.symmetric for o in opts_list):  # a caller's bug, not an input error
        raise ValueError("shared passes need one held-out set: symmetric and other fits cannot share them")
    col0s = [int(c) for c in cb[:-1]]
    row0s = [int(r) for r in rb[:-1]]
    n_models = len(w0s)
    on_iteration = on_iteration or [None] * n_models
    targets = targets or [None] * n_models
    models = []
    for w0, opts, cb_fn, tg in zip(w0s, opts_list, on_iteration, targets):
        state = MaskedState(w=np.ascontiguousarray(w0, dtype=np.float64), d=np.ones(opts.k), ht=[None] * n_cb,
                            h_scale=np.ones(opts.k))
        models.append(_Model(opts=opts, state=state, targets=tg if tg is not None else FitTargets(),
                             terms=block_terms(blocked, opts.k, tg), on_iteration=cb_fn,
                             done=opts.maxit < 1))
    if executor.distributed and not all(mdl.done for mdl in models):
        warm_up_kernels([mdl for mdl in models if not mdl.done], kargs, pair)
        ship_kernels(executor.client)  # workers without this cache load the compiled kernels
    placed = None
    recoveries = 0
    t0 = time.perf_counter()
    while True:
        active = [mdl for mdl in models if not mdl.done]
        if not active:
            break
        try:
            if placed is None:
                placed = _Placed(blocked, executor, rb)
            solved = [mdl for mdl in active if not mdl.opts.symmetric]  # symmetric NMF: H = Wᵀ, no pass
            hres = [[] for _ in range(n_cb)]
            if solved:
                shared = [_h_model_args(mdl) for mdl in solved]
                per_block = [[(mdl.state.ht[j], mdl.terms[j]) for mdl in solved] for j in range(n_cb)]
                outs = executor.map_blocks(masked_h_many, placed.cols, cmasks, col0s, per_block,
                                           args=(kargs, shared))
                hres = executor.gather(outs)
                executor.release(outs)
            slot = {id(mdl): a for a, mdl in enumerate(solved)}
            w_inputs = [_w_model_inputs(mdl, [hres[j][slot[id(mdl)]] for j in range(n_cb)] if id(mdl) in slot
                                        else _symmetric_h(mdl.state.w, cb), rb, row0s)
                        for mdl in active]
            shared = [(wi["hn"], wi["Qn"], wi["wside"], wi["wtarget"]) for wi in w_inputs]
            per_block = [[(wi["wprev"][r], wi["tws"][r]) for wi in w_inputs] for r in range(n_rb)]
            outs = executor.map_blocks(masked_w_many, placed.rows, rmasks, row0s, per_block,
                                       args=(kargs, shared, False, pair))
            wres = executor.gather(outs)
            executor.release(outs)
            wres = _angular_w(executor, placed, rmasks, row0s, kargs, active, w_inputs, wres, rb, pair)
        except WorkerLostError as exc:
            if placed is not None:
                placed.release(executor)
            placed = None
            recoveries = count_recovery(exc, recoveries, executor, "masked fit",
                                        min(mdl.state.iteration for mdl in active))
            continue
        for a, (mdl, wi) in enumerate(zip(active, w_inputs)):
            _finish_iteration(mdl, wi, [wres[r][a] for r in range(n_rb)], mo)
    runtime = time.perf_counter() - t0
    if placed is not None:
        placed.release(executor)
    out = []
    for mdl in models:
        if mdl.opts.symmetric:  # H ← Wᵀ after the last W update (RcppML §7, as engine/als.py)
            mdl.state.ht = [r[0] for r in _symmetric_h(mdl.state.w, cb)]
            mdl.state.h_scale = np.ones(mdl.opts.k)
        mdl.state.runtime = runtime
        out.append((mdl.state, mdl.state.ht))
    return out


def _angular_w(executor: Executor, placed: _Placed, rmasks: list, row0s: list, kargs: tuple, active: list,
               w_inputs: list, wres: list, rb: np.ndarray, pair: bool = False) -> list:
    """The angular step of W (exact, on the whole new W on the client) for the models that have
    one, and a second row pass that scores the mapped rows (the losses are of the final W).
    Returns ``wres`` with those models' rows and sums replaced."""
    which = [a for a, mdl in enumerate(active) if mdl.opts.penalties.angular[0] > 0]
    if not which:
        return wres
    n_rb = len(rb) - 1
    mapped = {}
    for a in which:
        wraw = np.concatenate([wres[r][a][0] for r in range(n_rb)], axis=0)
        wraw = apply_angular(wraw, angular_matrix(wraw.T @ wraw, active[a].opts.penalties.angular[0]))
        mapped[a] = [np.ascontiguousarray(wraw[int(rb[r]) - int(rb[0]):int(rb[r + 1]) - int(rb[0])])
                     for r in range(n_rb)]
    shared = [(w_inputs[a]["hn"], w_inputs[a]["Qn"], w_inputs[a]["wside"], w_inputs[a]["wtarget"]) for a in which]
    per_block = [[(mapped[a][r], w_inputs[a]["tws"][r]) for a in which] for r in range(n_rb)]
    outs = executor.map_blocks(masked_w_many, placed.rows, rmasks, row0s, per_block, args=(kargs, shared, True, pair))
    scored = executor.gather(outs)
    executor.release(outs)
    wres = [list(row) for row in wres]
    for t, a in enumerate(which):
        for r in range(n_rb):
            wres[r][a] = scored[r][t]
    return wres


def _symmetric_h(w: np.ndarray, cb: np.ndarray) -> list:
    """Symmetric NMF's H step on the client (A square: ``H = Wᵀ``, nothing solved): per column
    block the rows of W as ``(H_jᵀ, H_j H_jᵀ, Σ|H_j|)``, the column pass's results."""
    out = []
    for j in range(len(cb) - 1):
        ht = np.ascontiguousarray(w[int(cb[j]):int(cb[j + 1])], dtype=np.float64)
        out.append((ht, ht.T @ ht, np.abs(ht).sum(axis=0)))
    return out


def _h_model_args(mdl: _Model) -> tuple:
    """``(hs, ridge, removal, gpen)`` of a model's H step for its current W (and current Ĥ's
    penalty terms, ``solvers/penalties.py``)."""
    opts, t, state = mdl.opts, mdl.targets, mdl.state
    gpen = None
    if opts.penalties.gram_on(1) and state.ht[0] is not None:
        gpen = opts.penalties.gram(1, np.concatenate(state.ht, axis=0) * state.h_scale[None, :])
    # a removal target is applied per column by the kernel, to each column's own Gram
    hs = h_task_step(state.w, state.h_scale, opts, None if t.lam_h < 0 else t, d=state.d, penalty=gpen)
    ridge = 1e-15 + float(opts.L2[1]) + max(t.lam_h, 0.0)
    removal = (t.gamma_h, -t.lam_h) if t.lam_h < 0 else (np.zeros((0, 0)), 0.0)
    return hs, ridge, removal, gpen


def _w_model_inputs(mdl: _Model, hres: list, rb: np.ndarray, row0s: list) -> dict:
    """A model's W-step inputs from its H results (block order): normalized H, its Gram, warm starts."""
    opts, state, t = mdl.opts, mdl.state, mdl.targets
    k = opts.k
    pen = opts.penalties
    ht = [r[0] for r in hres]
    Q = np.zeros((k, k))
    hsum = np.zeros(k)
    for r in hres:  # block order: the same sums on any number of workers
        Q += r[1]
        hsum += r[2]
    if pen.angular[1] > 0:  # exact angular step of H: the whole new H is here on the client
        M = angular_matrix(Q, pen.angular[1])
        ht = [apply_angular(h, M) for h in ht]
        Q = np.zeros((k, k))
        hsum = np.zeros(k)
        for h in ht:
            Q += h.T @ h
            hsum += np.abs(h).sum(axis=0)
    s = _norms(hsum, Q, opts.norm)
    inv_s = 1.0 / s
    n_rb = len(rb) - 1
    if state.iteration >= 1:
        wraw = state.w * state.d[None, :]
        wprev = [wraw[row0s[r]:int(rb[r + 1])] for r in range(n_rb)]
    else:
        wprev = [None] * n_rb
    return {
        "ht": ht, "inv_s": inv_s, "wprev": wprev,
        "hn": np.ascontiguousarray(np.concatenate(ht, axis=0) * inv_s[None, :]),
        "Qn": Q * np.outer(inv_s, inv_s),
        "tws": [None if t.w is None else t.w[int(rb[r]):int(rb[r + 1])] for r in range(n_rb)],
        "wside": (1e-15, float(opts.L1[0]), float(opts.L2[0]), int(opts.solver), bool(opts.nonneg[0]),
                  int(opts.cd_maxit), float(opts.cd_tol), pen.gram(0, state.w), float(pen.upper_bound[0])),
        "wtarget": (t.lam_w, t.gamma_w if t.gamma_w is not None else np.zeros((0, 0))),
    }


def _finish_iteration(mdl: _Model, wi: dict, wres: list, mo: MaskOptions) -> None:
    """Client side of an iteration for one model: W scaled into d, losses, convergence, callback."""
    opts, state = mdl.opts, mdl.state
    sums = np.zeros(4)
    for r in wres:
        sums += r[1]
    wraw = np.concatenate([r[0] for r in wres], axis=0)
    w_new, d = scale_rows(wraw.T, opts.norm)
    state.w, state.d, state.h_scale, state.ht = np.ascontiguousarray(w_new.T), d, wi["inv_s"], wi["ht"]
    state.iteration += 1
    # a mean SSE from the Gram identity can round below 0: floored (the total is kept as it is)
    mdl.done = record_iteration(state, opts, max(sums[0], 0.0) if mo.cv_on else sums[0], sums[1], sums[2], sums[3],
                                mo.cv_on, mdl.on_iteration)
