"""Engine "ecm" of NMF-RE on a column-blocked Y through the executor (spec §5, §10; DESIGN.md §6).

The loop is :func:`dnmf.mixed.ecm.run_ecm`, the same client-side code as the in-memory fit;
this module supplies its data backend over the blocks of :class:`dnmf.mixed.blocked_data.BlockedData`.
Each block ``(Y_j, A_j)`` is placed once on a worker; ``U_j`` (Q × n_j) is computed there and
stays there. Per inner iteration the client receives only the tree-reduced block sums

pass 1, every iteration (:func:`dnmf.mixed.ecm.u_chunk`)
    ``Σ Y_jB_jᵀ`` (P × Q), ``Σ B_jB_jᵀ`` (Q × Q) — positive parts for ``C_signed=False`` —
    ``Σ Y_jU_jᵀ`` (P × Q), ``Σ U_jU_jᵀ`` (Q × Q), ``Σ A_jU_jᵀ`` (K × Q) and
    ``Σ (XᵀY_j)(XᵀY_j)ᵀ`` (Q × Q, for the previous iteration's marginal NLL);
pass 2, ``C_signed=False`` only (:func:`dnmf.mixed.ecm.c_chunk`)
    ``Σ Xᵀmax(Y_j − XDU_j, 0)A_jᵀ`` (Q × K), with ``U_j ← DU_j`` on the worker.

That is (2P + 3Q + K)·Q numbers per block per iteration (+ QK for the non-negative engine).
The signed Θ step, ``‖Y − X(ΘA + U)‖²``, ``‖U‖²`` (for the objective and the EM M-steps) and
the marginal NLL come from these and the constants ``‖Y‖²``, ``YAᵀ``, ``AAᵀ`` (one pass at
placement); the last NLL takes one extra pass (``Σ (XᵀY_j)(XᵀY_j)ᵀ``) after the loop. The normalisation ``U ← DU`` of the signed engine is deferred: the next
U step replaces U, so it is applied once, after the loop.

The partials are summed by the executor's fixed binary tree in block order, so the fit does
not depend on the number of workers; with one block it is bitwise the in-memory fit
(:class:`dnmf.mixed.ecm.DenseECMData` runs the same chunk functions on the same arrays).
"""

from __future__ import annotations

import time

import numpy as np

from ..covariates._common import basis_names, basis_order, clip_var, icc
from ._core import df_u, gram_eigenvalues
from .blocked_data import BlockedData, NMFREBlockedResult, REBlock, _add1, _r2
from .ecm import ECMOptions, ECMState, c_chunk, gram_chunk, run_ecm, u_chunk

__all__ = ["ECMBlockedData", "fit_ecm_blocked", "ecm_blocked_result"]


def u_task(blk: REBlock, X, C, L, signed):
    """Pass 1 on one placed block (see :func:`dnmf.mixed.ecm.u_chunk`)."""
    return u_chunk(blk.load(), blk.a, X, C, L, signed)


def gram_task(blk: REBlock, X):
    """The last NLL's statistic on one placed block (see :func:`dnmf.mixed.ecm.gram_chunk`)."""
    return gram_chunk(blk.load(), X)


def c_task(blk: REBlock, U, X, d):
    """Pass 2 on one placed block (see :func:`dnmf.mixed.ecm.c_chunk`); partial as a 1-tuple."""
    U, num = c_chunk(blk.load(), blk.a, U, X, d)
    return U, (num,)


class ECMBlockedData(BlockedData):
    """The ECM data backend over an executor (the interface of :class:`dnmf.mixed.ecm.DenseECMData`).

    Blocks, U blocks, the constants, R² sums and inference come from
    :class:`BlockedData`; this adds the two ECM passes and the deferred scaling of U.
    """

    def __init__(self, executor, Y, A):
        super().__init__(executor, Y, A)
        self._d = None

    def u_pass(self, X, C, L, signed: bool) -> tuple:
        outs = self.ex.map_blocks(u_task, self.blocks, args=(X, C, L, bool(signed)), n_out=2)
        self._d = None
        return self._swap_u(outs)

    def scale_u(self, d: np.ndarray) -> None:
        """U ← DU, deferred (applied by :meth:`finish_u`, or dropped by the next U step)."""
        self._d = d if self._d is None else self._d * d

    def c_pass(self, X, d) -> np.ndarray:
        outs = self.ex.map_blocks(c_task, self.blocks, self.U, args=(X, d), n_out=2)
        (num,) = self._swap_u(outs)
        return num

    def gram_pass(self, X) -> np.ndarray:
        return self.ex.tree_reduce(_add1, self.ex.map_blocks(gram_task, self.blocks, args=(X,)))

    def finish_u(self) -> None:
        """Apply a pending U ← DU on the workers."""
        if self._d is not None:
            d, self._d = self._d, None
            BlockedData.scale_u(self, d)


def fit_ecm_blocked(data: ECMBlockedData, X0, C0, sigma2, tau2, opt: ECMOptions) -> tuple[ECMState, np.ndarray]:
    """Run :func:`run_ecm` on the blocks; returns the state and the wall time of each iteration."""
    stamps: list[float] = []
    st = run_ecm(data, X0, C0, sigma2, tau2, opt, callback=lambda: stamps.append(time.perf_counter()))
    stamps.append(time.perf_counter())
    data.finish_u()
    return st, np.diff(np.asarray(stamps))


def _blocked_final_stats(st, data, Yb):
    """The fitted model's final statistics on the blocks, shared by the ECM and cap engines.

    Puts the bases in basis order (permuting ``data``'s U blocks to match), then returns
    ``(X, C, P, N, Q, K, r2b, r2f, lam, dfu)``: the ordered X and C, the shapes, the R² variants
    of the full and fixed-effects fits, λ = σ²/τ² and dfU.
    """
    X, C = st.X, st.C
    P, N = Yb.shape
    Q, K = C.shape
    if Q > 1:
        o = basis_order(X)
        X, C = X[:, o], C[o, :]
        data.permute_u(o)
    sums = data.final_sums(X, C)
    n = P * N
    sst_grand, sst_row = sums[8], sums[9]
    r2b = _r2(*sums[0:4], data.ysum, data.ysq, n, sst_grand, sst_row)
    r2f = _r2(*sums[4:8], data.ysum, data.ysq, n, sst_grand, sst_row)
    lam = st.sigma2 / clip_var(st.tau2)
    dfu = df_u(gram_eigenvalues(X.T @ X), N, lam)
    return X, C, P, N, Q, K, r2b, r2f, lam, dfu


def ecm_blocked_result(st: ECMState, opt: ECMOptions, data: ECMBlockedData, Yb, prefix, covariate_names,
                       iter_times) -> NMFREBlockedResult:
    """Spec §5.4 on the blocks: basis order, dfU, the R² variants (cor² first), ICC, X.prob."""
    X, C, P, N, Q, K, r2b, r2f, lam, dfu = _blocked_final_stats(st, data, Yb)
    X_prob = X / (X.sum(axis=1, keepdims=True) + 1e-10)
    nan = float("nan")
    return NMFREBlockedResult(
        X=X, C=C, U=None, U_blocks=data.ex.standalone(data.U), col_bounds=np.asarray(data.bounds),
        sigma2=float(st.sigma2), tau2=float(st.tau2), lambda_=float(lam), dfU=dfu, dfU_cap=nan, dfU_cap_rate=None,
        dfU_frac=dfu / (N * Q), dfU_cap_frac=nan, lambda_enforced=float(lam), dfU_hit_cap=False, dfU_hit_iter=(),
        converged=st.converged, stop_reason=st.stop_reason, n_iter=st.total_iter, maxit=opt.maxit,
        epsilon=opt.epsilon, objfunc=float(st.objfunc_iter[-1]) if st.objfunc_iter else nan,
        rel_change_final=float(st.rel), objfunc_iter=np.asarray(st.objfunc_iter), rss_trace=np.asarray(st.rss_trace),
        r_squared=r2b["cor2"], r_squared_fixed=r2f["cor2"], r_squared_cor2=r2b["cor2"],
        r_squared_fixed_cor2=r2f["cor2"], r_squared_uncentered=r2b["uncentered"],
        r_squared_fixed_uncentered=r2f["uncentered"], r_squared_centered=r2b["centered"],
        r_squared_fixed_centered=r2f["centered"],
        ICC=icc(X, st.sigma2, st.tau2), engine="ecm", C_signed=bool(opt.C_signed), call="", runtime=0.0,
        basis_names=basis_names(prefix, Q),
        covariate_names=None if covariate_names is None else tuple(covariate_names),
        feature_names=Yb.row_names, sample_names=Yb.col_names,
        dims=f"Y({P},{N})~X({P},{Q})C({Q},{K})A({K},{N})", iter_times=iter_times,
        outer_iter=st.outer, outer_maxit=opt.outer_maxit, nll_trace=np.asarray(st.nll_trace),
        X_prob=X_prob, X_cluster=np.argmax(X_prob, axis=1),
    )
