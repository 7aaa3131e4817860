"""The IRLS loop: NMF under the distribution losses of spec §6 (gp, nb, gamma, inverse_gaussian,
tweedie, and any loss with ``robust``) on the blocked engine.

Per iteration, with W (unit-norm columns), d, H's raw blocks and the dispersion on the client:

1. client: ``G = WᵀW`` and ``Σ_i w_i``;
2. one task per **column block** (CSC): the IRLS H update of every column
   (:func:`~dnmf.kernels.irls.csc_irls_zi_pass`), returning ``(H_jᵀ, H_j H_jᵀ, Σ|H_j|)`` and, for
   a GP θ per column, the block's new θ;
3. client: H is gathered, normalized (row norms → ``s``) and sent with ``ĤĤᵀ``;
4. one task per **row block** (CSR, built once on the workers from the column blocks): the IRLS
   update of every row of W (:func:`~dnmf.kernels.irls.csr_irls_zi_pass`), right after each row's
   solve its train / test losses in the fitted distribution and its dispersion statistics;
5. client: W's rows are stacked and scaled into ``d``; the dispersion is updated from the
   statistics (per row: the rows' own values; per column: per-column sums finished with
   ``Σ x xᵀ`` and Ĥ; global: the mean (θ) or median (r, φ) of the per-row values, as RcppML);
   losses and convergence as :mod:`dnmf.engine.masked`.

So an iteration is **two passes over A** (columns, then rows), each running ``irls_max_iter``
weighted solves per column / row on the stored entries; weights are computed inside the block
task and never stored. Zeros are never visited: those of a column / row share one weight (the
GP / NB weight at their mean prediction, or 1; ``kernels/irls.py``). A GP θ per column is
estimated in the column pass (its μ uses the W the pass solved against); every other
dispersion in the row pass, from μ = W·diag(d)·Ĥ of the new factors, as RcppML. The dispersion found in iteration t is used from iteration t + 1 on (the
losses of iteration t use the dispersion its weights used). A lost worker costs a re-placement
of the blocks and a redo of the iteration in progress (H, W and the dispersion live on the
client). Column and row partitions are functions of the data only and every sum is taken in
block order, so results do not depend on the number of workers.

The §8 penalties (``solvers/penalties.py``): each side's penalty Gram term (from the current W /
the previous Ĥ, on the client) joins every weighted Gram of its pass, its upper bound clamps
after every inner solve, and its angular map acts on the whole new factor on the client (W's
followed by a scoring row pass with no solve, so the losses are of the final W).

With zero-inflation (``zi``, §6.5) a third pass per iteration runs the E-step over the blocks
whose outer index carries π (:func:`zi_estep_task`) and yields the zero-inflated losses; from
the next iteration on both IRLS passes add every observed zero to their entries with the
imputed value ``z·μ'`` (μ' from the previous factors), formed in the task.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import scipy.sparse as sp

from ..exceptions import CheckpointError, WorkerLostError
from ..io.blocks import BlockedMatrix
from ..kernels.irls import (DISP_INNER, DISP_NONE, DISP_OUTER, LOSS_CODES, ZI_INNER, ZI_NONE, ZI_OUTER,
                            csc_irls_zi_pass, csr_irls_zi_pass, zi_estep_pass)
from ..solvers.penalties import angular_matrix, apply_angular
from ..solvers.updates import scale_rows
from .als import ALSOptions, ALSState, _norms, count_recovery
from .checkpoint import Checkpointer
from . import buffers as _buf
from .executor import Executor
from .kernel_cache import ship_kernels
from .masked import (MaskedState, MaskOptions, _kernel_args, _mask_parts, _Placed, record_iteration, row_bounds_for,
                     run_for_compilation, tiny_blocks)

logger = logging.getLogger(__name__)

__all__ = ["IRLSOptions", "IRLSState", "IRLSCheckpointer", "fit_irls", "irls_h_task", "irls_w_task"]

_POWER = {"mse": 0.0, "gp": 1.0, "nb": 0.0, "gamma": 2.0, "inverse_gaussian": 3.0}


@dataclass(frozen=True)
class IRLSOptions:
    """The loss of an IRLS fit and its controls (spec §1.2)."""

    loss: str
    robust: float = 0.0  # Huber δ; 0: not robust
    dispersion: str = "per_row"  # per_row, per_col, global, none
    init: float = 0.1  # θ, r or φ to start from
    low: float = 0.0  # floor of the dispersion
    high: float = 5.0  # cap of the dispersion
    tweedie_power: float = 1.5
    irls_max_iter: int = 5
    irls_tol: float = 1e-4
    zi: str = "none"  # zero-inflation (§6.5): none, row, col
    zi_em_iters: int = 1

    @property
    def code(self) -> int:
        return LOSS_CODES[self.loss]

    @property
    def power(self) -> float:
        return self.tweedie_power if self.loss == "tweedie" else _POWER[self.loss]

    @property
    def none_value(self) -> float:
        """The dispersion with ``dispersion="none"``: θ = 0 (Poisson), r = its cap, φ = 1."""
        return {"gp": 0.0, "nb": self.high}.get(self.loss, 1.0)

    @property
    def closed_zeros(self) -> bool:
        """Whether the reported loss covers the zeros (closed form Σ ℓ(0, μ) exists: GP, not robust)."""
        return self.loss == "gp" and self.robust <= 0.0


@dataclass
class IRLSState(MaskedState):
    """:class:`~dnmf.engine.masked.MaskedState` plus the dispersion (per row (m,), per column
    (n,), or a float) and its history (per iteration: the value, or the median of the values)."""

    dispersion: object = None
    dispersion_history: list = field(default_factory=list)
    zi_pi: object = None  # zero-inflation: π per row (m,) or per column (n,) after the last E-step
    zi_pi_history: list = field(default_factory=list)  # mean π after each iteration


class IRLSCheckpointer:
    """Per-iteration checkpoints of an IRLS fit: the ALS state (W, d, H, histories) through
    :class:`~dnmf.engine.checkpoint.Checkpointer`, and the dispersion with its history in a side
    file ``<path>.dispersion-<iteration>.npz`` written (atomically) *before* the checkpoint's slot
    is flipped, so every valid slot has its file. Only the files of the last two saves are kept
    (the two slots)."""

    def __init__(self, inner: Checkpointer):
        self.inner = inner
        self.saved: list = []

    def _file(self, iteration: int) -> str:
        return f"{self.inner.path}.dispersion-{int(iteration)}.npz"

    def save(self, state: "IRLSState", executor: Executor) -> None:
        path = self._file(state.iteration)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        zi = {} if state.zi_pi is None else {"zi_pi": np.asarray(state.zi_pi, dtype=np.float64),
                                             "zi_history": np.asarray(state.zi_pi_history, dtype=np.float64)}
        np.savez(tmp, dispersion=np.asarray(state.dispersion, dtype=np.float64),
                 history=np.asarray(state.dispersion_history, dtype=np.float64), **zi)
        os.replace(tmp, path)
        self.inner.save(state, executor)
        self.saved = [*self.saved, path][-2:]
        import glob

        for old in glob.glob(glob.escape(str(self.inner.path)) + ".dispersion-*.npz"):
            if old not in self.saved:
                os.remove(old)

    def load(self) -> "IRLSState | None":
        base = self.inner.load()
        if base is None:
            return None
        path = self._file(base.iteration)
        try:
            with np.load(path) as f:
                disp, hist = f["dispersion"], f["history"]
                zi_pi = f["zi_pi"] if "zi_pi" in f else None
                zi_hist = f["zi_history"] if "zi_history" in f else np.zeros(0)
        except (OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"The checkpoint at {self.inner.path!r} has no readable dispersion file for its "
                                  f"iteration {base.iteration} ({path}: {e}). Start the fit again without resuming "
                                  "from it.", path=self.inner.path, problems={"dispersion": str(e)}) from e
        if hist.shape != (base.iteration,):
            raise CheckpointError(f"The dispersion file {path} does not match the checkpoint's iteration "
                                  f"{base.iteration}.", path=self.inner.path, problems={"dispersion": "history"})
        self.saved = [path]
        state = IRLSState(**{f.name: getattr(base, f.name) for f in fields(ALSState)})
        state.dispersion = float(disp) if disp.ndim == 0 else disp
        state.dispersion_history = [float(x) for x in hist]
        state.zi_pi, state.zi_pi_history = zi_pi, [float(x) for x in zi_hist]
        return state


def _side(ro: IRLSOptions) -> tuple:
    return (ro.code, float(ro.power), float(ro.robust), int(ro.irls_max_iter), float(ro.irls_tol))


def irls_h_task(block, mk: tuple, ht_prev, col0: int, dcol: np.ndarray, w: np.ndarray, G: np.ndarray,
                wsum: np.ndarray, warm_scale: np.ndarray, hside: tuple, side: tuple, disp: tuple, kargs: tuple,
                zg: tuple = (np.zeros(0), None), zi: tuple = (ZI_NONE, np.zeros(0)), pen: tuple = (None, 0.0)):
    """IRLS H update of one column block: ``(H_jᵀ, H_j H_jᵀ, Σ|H_j|, new θ of its columns)``.

    ``dcol`` is the block's per-column dispersion; ``disp`` = (per-row dispersion (m,), whether
    the dispersion is per row (else per column), whether this pass computes θ per column, lo, hi);
    ``zg`` = (NB's zero-gradient factor per row (m,) or empty, Σ_i zg_i w_i); ``zi`` = (ZI mode
    of this pass, π per row (m,) (ZI_INNER) or per column (n,) (ZI_OUTER, sliced to the block)):
    the zeros' imputed values come from W and the warm start (the previous iteration's μ);
    ``pen`` = (the H side's §8 penalty Gram term (k × k) or None, its upper bound (0: none)).
    """
    m, k = w.shape
    n_j = block.shape[1]
    diag, l1, solver, nonneg, cd_maxit, cd_tol = hside
    code, power, delta, it_max, it_tol = side
    drow, on_rows, mode, lo, hi = disp
    warm = ht_prev is not None
    # pooled (engine/buffers.py); the same products as ht_prev * warm_scale
    ht = np.multiply(ht_prev, warm_scale[None, :], out=_buf.empty((n_j, k))) if warm else _buf.zeros((n_j, k))
    Q = np.zeros((k, k))
    hsum = np.zeros(k)
    hraw = np.zeros(k)
    dnew = np.array(dcol, dtype=np.float64, copy=True)
    zi_mode = zi[0] if warm else ZI_NONE
    zi_pi = zi[1] if zi_mode == ZI_INNER else zi[1][int(col0):int(col0) + n_j]
    csc_irls_zi_pass(block.data, block.indices, block.indptr, m, int(col0), w, G, diag, l1, ht, warm, code, power,
                     delta, drow, np.ascontiguousarray(dcol, dtype=np.float64), bool(on_rows), it_max, it_tol, solver,
                     nonneg, cd_maxit, cd_tol, *kargs, mk[0], mk[1], mode, lo, hi, wsum, zg[0],
                     np.zeros(k) if zg[1] is None else zg[1], Q, hsum, hraw, dnew, zi_mode,
                     np.ascontiguousarray(zi_pi, dtype=np.float64), w, _gpen(pen[0], k), float(pen[1]))
    return ht, Q, hsum, dnew


def irls_w_task(block, mk: tuple, wt_prev, row0: int, drow: np.ndarray, hn: np.ndarray, Qn: np.ndarray,
                hsum_n: np.ndarray, zc: np.ndarray, wside: tuple, side: tuple, disp: tuple, kargs: tuple,
                zi: tuple = (ZI_NONE, np.zeros(0), None), pen: tuple = (None, 0.0)):
    """IRLS W update of one row block: ``(raw rows w_i d, [train loss, n, test loss, n], Σ x xᵀ,
    Σ x, new per-row dispersion, per-column sums (3, n))``. ``zi`` = (ZI mode of this pass, π per
    column (n,) (ZI_INNER) or per row (m,) (ZI_OUTER, sliced to the block), the previous
    iteration's Ĥ (n × k): μ' = its rows · the warm start); ``pen`` = (the W side's §8 penalty
    Gram term (k × k) or None, its upper bound (0: none)). With ``side``'s ``irls_max_iter`` 0 the
    rows ``wt_prev`` are only scored (losses and dispersion statistics of fixed rows)."""
    n, k = hn.shape
    diag, l1, solver, nonneg, cd_maxit, cd_tol = wside
    code, power, delta, it_max, it_tol = side
    dcol, on_cols, mode, lo, hi = disp
    m_b = block.shape[0]
    warm = wt_prev is not None
    wt = np.array(wt_prev, dtype=np.float64, copy=True) if warm else np.zeros((m_b, k))
    sums = np.zeros(4)
    XtX = np.zeros((k, k))
    xabs = np.zeros(k)
    xsum = np.zeros(k)
    dnew = np.array(drow, dtype=np.float64, copy=True)
    colstat = np.zeros((3, n if mode == DISP_INNER else 0))
    zi_mode = zi[0] if (warm and zi[2] is not None) else ZI_NONE
    zi_pi = zi[1] if zi_mode == ZI_INNER else zi[1][int(row0):int(row0) + m_b]
    zi_f = zi[2] if zi_mode != ZI_NONE else np.zeros((0, k))
    csr_irls_zi_pass(block.data, block.indices, block.indptr, n, int(row0), hn, Qn, diag, l1, wt, warm, code, power,
                     delta, dcol, np.ascontiguousarray(drow, dtype=np.float64), bool(on_cols), it_max, it_tol, solver,
                     nonneg, cd_maxit, cd_tol, *kargs, mk[0], mk[1], mode, lo, hi, hsum_n, zc, XtX, xabs, xsum, sums,
                     dnew, colstat, zi_mode, np.ascontiguousarray(zi_pi, dtype=np.float64), zi_f, _gpen(pen[0], k),
                     float(pen[1]))
    return wt, sums, XtX, xsum, dnew, colstat


def _gpen(g, k: int) -> np.ndarray:
    return np.zeros((k, k)) if g is None else np.ascontiguousarray(g, dtype=np.float64)


def zi_estep_task(block, mk: tuple, x_blk, pi_blk, outer0: int, d_out, by_row: bool, F: np.ndarray,
                  d_in: np.ndarray, on_inner: bool, code: int, init: bool, em_iters: int, kargs: tuple):
    """The §6.5 E-step of one block whose outer index carries π (a CSR row block for ``zi="row"``,
    a CSC column block for ``zi="col"``) at μ = ``F[i]·x_blk[o]``: ``(new π of its outer vectors,
    [zero-inflated train loss, n, test loss, n])`` (:func:`~dnmf.kernels.irls.zi_estep_pass`)."""
    pi = np.array(pi_blk, dtype=np.float64, copy=True)
    sums = np.zeros(4)
    zeros_missing, cv_on, cv_seed, cv_thr = kargs
    zi_estep_pass(bool(by_row), block.data, block.indices, block.indptr, F.shape[0], int(outer0), F,
                  np.ascontiguousarray(x_blk, dtype=np.float64), code, np.ascontiguousarray(d_in, dtype=np.float64),
                  np.ascontiguousarray(d_out, dtype=np.float64), bool(on_inner), cv_on, cv_seed, cv_thr, mk[0], mk[1],
                  bool(init), int(em_iters), pi, sums)
    return pi, sums


def warm_up_kernels(k: int, ro: IRLSOptions, kargs: tuple, hside: tuple, wside: tuple, modes: tuple,
                    ub: tuple) -> None:
    """Compile here, before any worker needs them, the kernels this fit's block tasks call: one
    :func:`irls_h_task` and one :func:`irls_w_task` (and with zero-inflation one
    :func:`zi_estep_task`) on a 1 × 1 block (:func:`~dnmf.engine.masked.tiny_blocks`,
    :func:`~dnmf.engine.masked.run_for_compilation`) with the fit's loss, dispersion modes,
    solver and hold-out arguments. Later iterations pass the same
    numba types (warm starts, NB's zero-gradient factors, π and penalty Grams are float64 arrays
    of the same dimensions), so these are all the signatures. The results are dropped.
    ``fit_irls`` then ships numba's cache entries to the workers (``engine/kernel_cache.py``;
    docs/architecture.md, "Kernel compilation").

    ``modes``: the (H, W) passes' dispersion modes; ``ub``: the (W, H) upper bounds.
    """
    col, row, mk = tiny_blocks()
    side = _side(ro)
    lo, hi = float(ro.low), float(ro.high)
    one, f = np.ones(1), np.full((1, k), 1.0 / k)
    run_for_compilation(irls_h_task, col, mk, None, 0, one, f, np.eye(k), np.ones(k), np.ones(k), hside, side,
                        (one, ro.dispersion != "per_col", modes[0], lo, hi), kargs, pen=(None, float(ub[1])))
    run_for_compilation(irls_w_task, row, mk, None, 0, one, f, f.T @ f + np.eye(k), f[0], f[0], wside, side,
                        (one, ro.dispersion == "per_col", modes[1], lo, hi), kargs, pen=(None, float(ub[0])))
    if ro.zi != "none":
        by_row = ro.zi == "row"
        run_for_compilation(zi_estep_task, row if by_row else col, mk, f, np.zeros(1), 0, one, by_row, f, one,
                            ro.dispersion == "per_col" if by_row else ro.dispersion != "per_col", ro.code, True,
                            ro.zi_em_iters, kargs)


def _dispersion_arrays(ro: IRLSOptions, value, m: int, n: int) -> tuple:
    """(per-row values (m,), per-column values (n,)) in effect; the unused side is ones."""
    if ro.dispersion == "per_row":
        return np.ascontiguousarray(value, dtype=np.float64), np.ones(n)
    if ro.dispersion == "per_col":
        return np.ones(m), np.ascontiguousarray(value, dtype=np.float64)
    return np.full(m, float(value)), np.ones(n)


def _initial_dispersion(ro: IRLSOptions, m: int, n: int):
    if ro.dispersion == "none":
        return ro.none_value
    if ro.dispersion == "global":
        return float(ro.init)
    return np.full(m if ro.dispersion == "per_row" else n, float(ro.init))


def fit_irls(
    blocked: BlockedMatrix,
    w0: np.ndarray,
    opts: ALSOptions,
    ro: IRLSOptions,
    mo: MaskOptions,
    executor: Executor,
    *,
    on_iteration: Callable | None = None,
    checkpointer: IRLSCheckpointer | None = None,
    state: IRLSState | None = None,
):
    """Run the IRLS loop; returns ``(IRLSState, ht_blocks)`` as :func:`~dnmf.engine.masked.fit_masked`.

    ``checkpointer`` saves the state every ``opts.checkpoint_every`` iterations and at the end
    (fits without missing entries only); ``state`` is a state to resume from (its loaded checkpoint).

    ``loss_history`` holds the training loss in the fitted distribution: a sum (no test set) or
    a mean (with one, §4.3) over the observed entries the loss covers (all of them for GP, whose
    zeros have a closed form; the stored non-zeros otherwise — see docs/architecture.md), and
    ``test_history`` the mean loss over the held-out entries (zeros included where the loss's
    support has them).
    """
    m, n = blocked.shape
    k = opts.k
    cb = blocked.col_bounds
    rb = row_bounds_for(m, blocked.n_blocks)
    n_cb, n_rb = len(cb) - 1, len(rb) - 1
    mask = None if mo.mask is None else sp.csc_matrix(mo.mask, dtype=bool)
    cmasks = _mask_parts(mask, cb, axis=1)
    rmasks = _mask_parts(mask, rb, axis=0)
    kargs = _kernel_args(mo)
    col0s = [int(c) for c in cb[:-1]]
    row0s = [int(r) for r in rb[:-1]]
    side = _side(ro)
    lo, hi = float(ro.low), float(ro.high)
    per_col_gp = ro.dispersion == "per_col" and ro.loss == "gp"
    if ro.dispersion == "none" or ro.loss == "mse":
        h_mode, w_mode = DISP_NONE, DISP_NONE
    elif ro.dispersion == "per_col":
        h_mode, w_mode = (DISP_OUTER, DISP_NONE) if per_col_gp else (DISP_NONE, DISP_INNER)
    else:
        h_mode, w_mode = DISP_NONE, DISP_OUTER
    hside = (1e-15 + float(opts.L2[1]), float(opts.L1[1]), int(opts.solver), bool(opts.nonneg[1]),
             int(opts.cd_maxit), float(opts.cd_tol))
    wside = (1e-15 + float(opts.L2[0]), float(opts.L1[0]), int(opts.solver), bool(opts.nonneg[0]),
             int(opts.cd_maxit), float(opts.cd_tol))
    if state is None:
        state = IRLSState(w=np.ascontiguousarray(w0, dtype=np.float64), d=np.ones(k), ht=[None] * n_cb,
                          h_scale=np.ones(k), dispersion=_initial_dispersion(ro, m, n))
    placed = None
    recoveries = 0
    zi_on = ro.zi != "none"
    pen = opts.penalties
    t0 = time.perf_counter()
    done = opts.maxit <= state.iteration or state.converged or state.stopped_by_callback
    if executor.distributed and not done:
        warm_up_kernels(k, ro, kargs, hside, wside, (h_mode, w_mode), tuple(pen.upper_bound))
        ship_kernels(executor.client)  # workers without this cache load the compiled kernels
    while not done:
        try:
            if placed is None:
                placed = _Placed(blocked, executor, rb)
            # 1.–2. H
            drow, dcol = _dispersion_arrays(ro, state.dispersion, m, n)
            w = state.w
            G = w.T @ w
            wsum = w.sum(axis=0)
            warm_scale = state.h_scale * state.d
            disp_h = (drow, ro.dispersion != "per_col", h_mode, lo, hi)
            dcols = [dcol[col0s[j]:int(cb[j + 1])] for j in range(n_cb)]
            zg = _zero_gradient_rows(ro, state, w, warm_scale, drow, dcol, dcols, n)
            zi_ready = zi_on and state.zi_pi is not None and state.ht[0] is not None
            zi_h = ((ZI_INNER if ro.zi == "row" else ZI_OUTER, state.zi_pi) if zi_ready else (ZI_NONE, np.zeros(0)))
            gpen_h = None  # §8: from the previous Ĥ (none in the first iteration), as engine/masked.py
            if pen.gram_on(1) and state.ht[0] is not None:
                gpen_h = pen.gram(1, np.concatenate(state.ht, axis=0) * state.h_scale[None, :])
            outs = executor.map_blocks(irls_h_task, placed.cols, cmasks, state.ht, col0s, dcols,
                                       args=(w, G, wsum, warm_scale, hside, side, disp_h, kargs, zg, zi_h,
                                             (gpen_h, float(pen.upper_bound[1]))))
            hres = executor.gather(outs)
            executor.release(outs)
            # 3. normalized H (after §8's angular map of the whole new H, here on the client)
            ht = [r[0] for r in hres]
            if pen.angular[1] > 0:
                M = angular_matrix(_sum_blocks([r[1] for r in hres], (k, k)), pen.angular[1])
                ht = [apply_angular(h, M) for h in ht]
                Q = _sum_blocks([h.T @ h for h in ht], (k, k))
                hsum = _sum_blocks([np.abs(h).sum(axis=0) for h in ht], (k,))
            else:
                Q = _sum_blocks([r[1] for r in hres], (k, k))
                hsum = _sum_blocks([r[2] for r in hres], (k,))
            s = _norms(hsum, Q, opts.norm)
            inv_s = 1.0 / s
            hn = np.ascontiguousarray(np.concatenate(ht, axis=0) * inv_s[None, :])
            Qn = Q * np.outer(inv_s, inv_s)
            if per_col_gp:
                dcol = np.concatenate([r[3] for r in hres])
            hsum_n = hn.sum(axis=0)
            zc = hn.T @ (1.0 / (1.0 + dcol)) if (ro.loss == "gp" and ro.dispersion == "per_col") else hsum_n
            # 4. W, losses, dispersion statistics
            if state.iteration >= 1:
                wraw = state.w * state.d[None, :]
                wprev = [wraw[row0s[r]:int(rb[r + 1])] for r in range(n_rb)]
            else:
                wprev = [None] * n_rb
            drows = [drow[row0s[r]:int(rb[r + 1])] for r in range(n_rb)]
            disp_w = (dcol, ro.dispersion == "per_col", w_mode, lo, hi)
            if zi_ready:  # the zeros' imputed values: μ' = W d (previous) · the previous Ĥ
                hn_prev = np.ascontiguousarray(np.concatenate(state.ht, axis=0) * state.h_scale[None, :])
                zi_w = (ZI_OUTER if ro.zi == "row" else ZI_INNER, state.zi_pi, hn_prev)
            else:
                zi_w = (ZI_NONE, np.zeros(0), None)
            wpen = (pen.gram(0, w), float(pen.upper_bound[0]))
            outs = executor.map_blocks(irls_w_task, placed.rows, rmasks, wprev, row0s, drows,
                                       args=(hn, Qn, hsum_n, zc, wside, side, disp_w, kargs, zi_w, wpen))
            wres = executor.gather(outs)
            executor.release(outs)
            if pen.angular[0] > 0:  # §8 angular map of the whole new W, then a scoring row pass (no solve)
                wraw = np.concatenate([r[0] for r in wres], axis=0)
                wraw = apply_angular(wraw, angular_matrix(wraw.T @ wraw, pen.angular[0]))
                mapped = [np.ascontiguousarray(wraw[row0s[r]:int(rb[r + 1])]) for r in range(n_rb)]
                outs = executor.map_blocks(irls_w_task, placed.rows, rmasks, mapped, row0s, drows,
                                           args=(hn, Qn, hsum_n, zc, wside, side[:3] + (0,) + side[4:], disp_w,
                                                 kargs, zi_w))
                wres = executor.gather(outs)
                executor.release(outs)
        except WorkerLostError as exc:
            if placed is not None:
                placed.release(executor)
            placed = None
            recoveries = count_recovery(exc, recoveries, executor, "IRLS fit", state.iteration)
            continue
        # 5. client: W, d, dispersion, losses, convergence
        sums = np.zeros(4)
        XtX = np.zeros((k, k))
        xsum = np.zeros(k)
        colstat = np.zeros((3, n)) if w_mode == DISP_INNER else None
        for r in wres:  # block order
            sums += r[1]
            XtX += r[2]
            xsum += r[3]
            if colstat is not None:
                colstat += r[5]
        wraw = np.concatenate([r[0] for r in wres], axis=0)
        w_new, d = scale_rows(wraw.T, opts.norm)
        state.w, state.d, state.h_scale, state.ht = np.ascontiguousarray(w_new.T), d, inv_s, ht
        if ro.dispersion != "none" and ro.loss != "mse":
            state.dispersion = _new_dispersion(ro, per_col_gp, dcol, wres, colstat, XtX, xsum, hn, mo)
            val = state.dispersion
            state.dispersion_history.append(float(val) if np.ndim(val) == 0 else float(np.median(val)))
        else:
            state.dispersion_history.append(float(state.dispersion))
        if zi_on:  # §6.5: the E-step after the dispersion; the loss under the zero-inflated model
            while True:
                try:
                    if placed is None:
                        placed = _Placed(blocked, executor, rb)
                    state.zi_pi, sums = _zi_estep(ro, state, hn, placed, cmasks, rmasks, cb, rb, kargs, executor)
                    break
                except WorkerLostError as exc:
                    if placed is not None:
                        placed.release(executor)
                    placed = None
                    recoveries = count_recovery(exc, recoveries, executor, "IRLS fit (zero-inflation)",
                                                state.iteration)
            state.zi_pi_history.append(float(np.mean(state.zi_pi)))
        it = state.iteration = state.iteration + 1
        done = record_iteration(state, opts, sums[0], sums[1], sums[2], sums[3], mo.cv_on, on_iteration)
        if checkpointer is not None and (done or it % opts.checkpoint_every == 0):
            checkpointer.save(state, executor)
    state.runtime = time.perf_counter() - t0
    if placed is not None:
        placed.release(executor)
    return state, state.ht


def _sum_blocks(parts: list, shape: tuple) -> np.ndarray:
    """Σ parts in block order (the same sum on any number of workers)."""
    out = np.zeros(shape)
    for p in parts:
        out += p
    return out


def _zi_estep(ro: IRLSOptions, state: IRLSState, hn, placed, cmasks, rmasks, cb, rb, kargs, executor):
    """The §6.5 E-step pass over the blocks whose outer index carries π (rows for ``zi="row"``,
    columns for ``"col"``) at the iteration's μ = W·diag(d)·Ĥ and its new dispersion: ``(π, [ZI
    train loss, n, test loss, n])``, sums in block order. π starts from ``min(0.5·zero rate,
    0.3)`` at the first E-step."""
    m, n = state.w.shape[0], hn.shape[0]
    drow, dcol = _dispersion_arrays(ro, state.dispersion, m, n)
    wd = np.ascontiguousarray(state.w * state.d[None, :])
    init = state.zi_pi is None
    if ro.zi == "row":
        bounds, blocks, masks, X, F = rb, placed.rows, rmasks, wd, hn
        d_out, d_in, on_inner = drow, dcol, ro.dispersion == "per_col"
    else:
        bounds, blocks, masks, X, F = cb, placed.cols, cmasks, hn, wd
        d_out, d_in, on_inner = dcol, drow, ro.dispersion != "per_col"
    pi = np.zeros(len(X)) if init else state.zi_pi
    o0 = [int(b) for b in bounds[:-1]]
    sl = [slice(int(bounds[j]), int(bounds[j + 1])) for j in range(len(o0))]
    outs = executor.map_blocks(zi_estep_task, blocks, masks, [X[s] for s in sl], [pi[s] for s in sl], o0,
                               [d_out[s] for s in sl],
                               args=(ro.zi == "row", F, d_in, on_inner, ro.code, init, ro.zi_em_iters, kargs))
    res = executor.gather(outs)
    executor.release(outs)
    sums = np.zeros(4)
    for r in res:  # block order
        sums += r[1]
    return np.concatenate([r[0] for r in res]), sums


def _zero_gradient_rows(ro: IRLSOptions, state: IRLSState, w, warm_scale, drow, dcol, dcols, n: int) -> tuple:
    """NB's zero-gradient factors for the column pass: ``ω·μ = r/(r + μ̄_i)`` at a zero of row i,
    μ̄_i = row i's mean prediction over all columns from W and the warm-start H (the zeros of a
    column span rows whose μ differ by orders of magnitude; one mean per column was far off).
    Empty (the per-column μ̄ rule) for other losses and on the first iteration (no H yet)."""
    if ro.loss != "nb" or state.ht[0] is None:
        return (np.zeros(0), None)
    hsum = np.zeros(w.shape[1])
    for h in state.ht:  # block order
        hsum += h.sum(axis=0)
    mu_bar = np.maximum(w @ (hsum * warm_scale) / n, 0.0)
    r = drow if ro.dispersion != "per_col" else np.full(w.shape[0], float(np.median(dcol)))
    zg = r / (r + mu_bar)
    return (np.ascontiguousarray(zg), np.ascontiguousarray(w.T @ zg))


def _new_dispersion(ro: IRLSOptions, per_col_gp: bool, dcol, wres, colstat, XtX, xsum, hn, mo: MaskOptions):
    """The dispersion after an iteration from the passes' statistics (§6.4)."""
    lo, hi = float(ro.low), float(ro.high)
    if ro.dispersion == "per_col":
        if per_col_gp:
            return dcol
        if ro.loss == "nb":
            closed = not mo.zeros_missing
            t_mu2 = colstat[1] + (np.einsum("jk,kl,jl->j", hn, XtX, hn) if closed else 0.0)
            t_mu = colstat[2] + (hn @ xsum if closed else 0.0)
            num, den = t_mu2, colstat[0] + t_mu2 - t_mu
            ok = (num > 1e-10) & (den > 1e-10)
            return np.where(ok, np.clip(num / np.where(ok, den, 1.0), lo, hi), hi)
        cnt = colstat[1]
        return np.clip(np.where(cnt > 0, colstat[0] / np.maximum(cnt, 1.0), 1.0), lo, hi)
    per_row = np.concatenate([r[4] for r in wres])
    if ro.dispersion == "per_row":
        return per_row
    return float(np.mean(per_row)) if ro.loss == "gp" else float(np.median(per_row))
