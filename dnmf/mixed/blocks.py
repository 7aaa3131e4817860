"""NMF-RE on a column-blocked Y (spec/nmfre.md §10, DESIGN.md §6): :func:`nmfre_blocked`.

This module holds the df-cap engine on blocks, the scale-out initialiser and the shared finish
and inference passes; the block container and its chunk functions are in
:mod:`dnmf.mixed.blocked_data`, and ``engine="ecm"`` runs :func:`dnmf.mixed.ecm.run_ecm` on the
backend of :mod:`dnmf.mixed.ecm_blocked` (a subclass of :class:`BlockedData`).

Y (P × N) is a :class:`~dnmf.io.blocks.BlockedMatrix`; A (K × N) is cut into the same column
blocks. Each block ``(Y_j, A_j)`` is placed once on a worker (or read from its source every pass
when the source is lazy); the random effects ``U_j`` (Q × n_j) are computed and kept on the
worker that holds the block. Per iteration the client sees only small statistics:

pass 1 (``u_chunk``)
    ``U_j = M⁻¹Xᵀ(Y_j − XΘA_j) − ū`` (ridge/BLUP step; the row mean ū of U is computed on the
    client as ``M⁻¹Xᵀ(ȳ − XΘā)`` from the constant row means of Y and A, so centring needs no
    extra pass), returning ``Y_jB⁺_jᵀ`` (P × Q), ``B⁺_jB⁺_jᵀ`` (Q × Q), ``‖U_j‖²``;
pass 2 (``c_chunk``)
    ``U_j ← DU_j`` (the normalisation of X), returning ``Xᵀmax(Y_j − XU_j, 0)A_jᵀ`` (Q × K)
    and ``Y_jU_jᵀ``, ``U_jU_jᵀ``, ``A_jU_jᵀ``, from which the client gets
    ``‖Y − X(ΘA + U)‖²`` by the Gram identity for any Θ.

Partials are summed by the executor's fixed binary tree (``combine`` = elementwise sum), so
the result does not depend on the number of workers; X, Θ, σ², τ², λ and dfU are updated on
the client by the same code as the in-memory fit (:func:`dnmf.mixed.nmfre.fit_cap`).
Inference adds one pass: the residual sum of squares, the score Gram ``S̃_jS̃_jᵀ`` and the
bootstrap products ``S̃_jW_j`` per block (multipliers from the key (block, chunk)).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from threadpoolctl import threadpool_limits

from .._validation import check_float, check_int, check_option, param_error
from ..exceptions import ConvergenceWarning, InputError
from ..io.blocks import BlockedMatrix, InMemorySource
from ..covariates._common import (
    EPS,
    axis_names,
    basis_names,
    basis_order,
    clip_var,
    executor_for,
    icc,
    normalize_columns,
)
from ._core import DEFAULT_RATES, ENGINES, check_matrix_init, df_u, gram_eigenvalues, to_matrix
from .ecm import ECMOptions, check_x_init, nmfkc_c_stats, resolve_c_signed
from .fit import CapOptions, CapState, fit_cap, kmeans_start, nmfkc_eu_stats
from .inference import (
    BOOT_CHUNK,
    chunk_bounds,
    coefficient_table,
    r_exp_multipliers,
    sandwich,
    seed_root,
    summarize_boot,
)
from .blocked_data import BlockedData, NMFREBlockedResult, REBlock, _add, infer_chunk, split_columns
from .ecm_blocked import ECMBlockedData, _blocked_final_stats, ecm_blocked_result, fit_ecm_blocked
from .scan_table import COLUMNS, DfUScanResult, choose_rate, scan_row

logger = logging.getLogger(__name__)

__all__ = ["nmfre_blocked", "NMFREBlockedResult", "BlockedData", "REBlock", "split_columns"]


# ---------------------------------------------------------------------------------------------
# The initialiser at scale
# ---------------------------------------------------------------------------------------------


def _subsample_start(data: BlockedData, Y: BlockedMatrix, rank: int, n_cols: int, seed: int):
    """nmfkc's k-means start (:func:`kmeans_start`) on at most ``n_cols`` evenly spaced columns.

    Only this subsample (P × n_cols) is gathered on the client.
    """
    return kmeans_start(_subsample(data, Y, n_cols), rank, seed)


def _subsample_named_start(data: BlockedData, Y: BlockedMatrix, rank: int, n_cols: int, method: str, seed: int,
                           r_rng: bool):
    """nmfkc's start ``X.init=method`` (:func:`dnmf.covariates.nmfkc.initial_X`) on the column
    subsample of :func:`_subsample_start`, columns scaled to sum 1."""
    from ..covariates.nmfkc import initial_X

    X, _ = initial_X(_subsample(data, Y, n_cols), rank, method, seed=seed, nstart=1, maxit=5000, r_rng=r_rng)
    return X / np.maximum(X.sum(axis=0), 1e-300)


def _subsample(data: BlockedData, Y: BlockedMatrix, n_cols: int) -> np.ndarray:
    """At most ``n_cols`` evenly spaced columns of Y (P × n_cols), gathered on the client."""
    N = Y.shape[1]
    cols = np.unique(np.linspace(0, N - 1, min(n_cols, N)).round().astype(np.int64))
    parts = []
    for j in range(Y.n_blocks):
        lo, hi = data.bounds[j], data.bounds[j + 1]
        sel = cols[(cols >= lo) & (cols < hi)] - lo
        if len(sel):
            parts.append((j, sel))
    blocks = data.ex.gather(data.ex.map_blocks(_take_cols, [data.blocks[j] for j, _ in parts],
                                               [s for _, s in parts]))
    return np.concatenate(blocks, axis=1)


def _take_cols(blk: REBlock, sel):
    return blk.load()[:, sel]


def _as_blocked_y(Y, n_blocks: Optional[int], func: str) -> BlockedMatrix:
    """A BlockedMatrix as is; a dense array cut into ``n_blocks`` (default 1) column blocks.

    Private to :func:`nmfre_blocked` (its ``n_blocks`` rule); not :func:`dnmf.io.as_blocked`.
    """
    if isinstance(Y, BlockedMatrix):
        return Y
    Yv = to_matrix(Y, "Y", func)
    if Yv.ndim != 2:
        raise param_error("Y", func, "a BlockedMatrix or a 2-D array", f"shape {Yv.shape}")
    nb = 1 if n_blocks is None else check_int(n_blocks, "n_blocks", func, low=1, high=max(1, Yv.shape[1]))
    bounds = np.linspace(0, Yv.shape[1], nb + 1).round().astype(np.int64)
    sources = tuple(InMemorySource(np.ascontiguousarray(Yv[:, bounds[j]:bounds[j + 1]])) for j in range(nb))
    rn, cn = axis_names(Y, 0), axis_names(Y, 1)
    return BlockedMatrix(shape=Yv.shape, dtype=np.dtype(np.float64), sources=sources, sparse=False, in_memory=True,
                         row_names=rn, col_names=cn)


def nmfre_blocked(
    Y,
    A=None,
    rank: int = 2,
    df_rate: Optional[float] = None,
    wild_bootstrap: bool = True,
    wild_B: int = 500,
    wild_level: float = 0.95,
    prefix: str = "Basis",
    epsilon: float = 1e-5,
    maxit: Optional[int] = None,
    X_init=None,
    C_init=None,
    U_init=None,
    seed: int = 1,
    r_rng: bool = False,
    client=None,
    *,
    engine: str = "cap",
    wild_seed=123,
    n_blocks: Optional[int] = None,
    covariate_names: Optional[tuple] = None,
    gather_U: bool = False,
    C_p_side: Optional[str] = None,
    sigma2: float = 1.0,
    tau2: float = 1.0,
    sigma2_update: bool = True,
    tau2_update: bool = True,
    init_sample: int = 20000,
    C_signed: bool = True,
    inner_maxit: int = 10000,
    outer_maxit: int = 500,
    epsilon_outer: float = 1e-6,
    x_postvar: bool = True,
    X_L2_ortho: float = 0.0,
    X_L2_smooth: float = 0.0,
    C_L2: float = 0.0,
) -> NMFREBlockedResult:
    """:func:`dnmf.nmfre` (engine "cap" or "ecm") on a column-blocked Y, through a Dask cluster.

    Same model, defaults and numbers as ``nmfre(..., engine=engine)`` (to summation order; for
    "ecm" with one block, bit for bit); Y and U are never gathered on the client during the fit.

    Parameters
    ----------
    Y : BlockedMatrix or array-like of shape (P, N)
        Non-negative data; dense or CSC blocks (densified per block), in memory or lazy
        (e.g. Zarr: read once per pass). An array is cut into ``n_blocks`` column blocks.
    A : array-like of shape (K, N), optional
        Covariates (default the intercept row); cut into Y's column blocks.
    rank, df_rate, wild_bootstrap, wild_B, wild_level, prefix, epsilon, maxit, X_init, C_init,
    U_init, seed, wild_seed, r_rng
        As in :func:`dnmf.nmfre` (``maxit`` default 50000 for "cap", 5000 for "ecm"; ``df_rate``
        is ignored by "ecm", and so is ``U_init``: its first U step replaces U). For "cap",
        ``df_rate=None`` scans 0.1..1.0 with blocked fits, one after another. Unlike
        :func:`dnmf.nmfre`, ``wild_bootstrap=True`` runs the blocked inference for "ecm" too
        (``nmfre_inference`` needs Y and U in memory). Without ``X_init``/``C_init`` the
        initialiser is nmfkc's EU iterations on
        the sufficient statistics ``YAᵀ``, ``AAᵀ``, ``‖Y‖²`` (:func:`nmfkc_eu_stats`), from
        ``X ∝ rowMeans(Y)`` at rank 1 (nmfkc's exact start) and from k-means centres of
        ``init_sample`` evenly spaced columns at rank ≥ 2 (:func:`kmeans_start`).
    client : distributed.Client, optional
        Default: the active client, else a thread pool.
    n_blocks : int, optional
        Column blocks for an array Y (default 1).
    covariate_names : tuple of str, optional
        Names of A's rows (taken from a DataFrame A when not given).
    gather_U : bool, default False
        Return U (Q × N) on the client at the end.
    engine : {"cap", "ecm"}, default "cap"
        df-cap engine (spec §3) or the ECM engine (spec §5, :mod:`dnmf.mixed.ecm_blocked`).
    C_p_side : {"one.sided", "two.sided"}, optional
        Default one-sided for "cap" and ``C_signed=False``, two-sided for signed "ecm".
    sigma2, tau2, sigma2_update, tau2_update
        Starting variances and the variance update switches (``tau2_update``: "ecm" only).
    init_sample : int, default 20000
        Columns used by the rank ≥ 2 initialiser.
    C_signed, inner_maxit, outer_maxit, epsilon_outer, x_postvar, X_L2_ortho, X_L2_smooth, C_L2
        Engine "ecm" options, as in :func:`dnmf.nmfre`.

    Returns
    -------
    NMFREBlockedResult

    Notes
    -----
    The bootstrap multipliers of column block j and replicate chunk c come from the key
    (j, c) under ``wild_seed``: the draws depend on the block layout, not on the number of
    workers; with one block they equal :func:`dnmf.nmfre_inference`'s.
    """

    t0 = time.perf_counter()
    func = "nmfre_blocked"
    engine = check_option(engine, "engine", func, ENGINES)
    Yb = _as_blocked_y(Y, n_blocks, func)
    P, N = Yb.shape
    rank = check_int(rank, "rank", func, low=1)
    epsilon = check_float(epsilon, "epsilon", func, low=0.0)
    maxit = check_int((50000 if engine == "cap" else 5000) if maxit is None else maxit, "maxit", func, low=1)
    if df_rate is not None:
        df_rate = check_float(df_rate, "df_rate", func, low=0.0, low_open=True)
    if engine == "ecm":
        C_signed = resolve_c_signed(C_signed, func)
        ecm_opt = ECMOptions(
            rank=rank, C_signed=C_signed, epsilon=epsilon, maxit=maxit,
            inner_maxit=check_int(inner_maxit, "inner_maxit", func, low=1),
            outer_maxit=check_int(outer_maxit, "outer_maxit", func, low=1),
            epsilon_outer=check_float(epsilon_outer, "epsilon_outer", func, low=0.0), x_postvar=bool(x_postvar),
            X_L2_ortho=check_float(X_L2_ortho, "X_L2_ortho", func, low=0.0),
            X_L2_smooth=check_float(X_L2_smooth, "X_L2_smooth", func, low=0.0),
            C_L2=check_float(C_L2, "C_L2", func, low=0.0), sigma2_update=bool(sigma2_update),
            tau2_update=bool(tau2_update))
    if C_p_side is None:
        C_p_side = "two.sided" if engine == "ecm" and C_signed else "one.sided"
    C_p_side = check_option(C_p_side, "C_p_side", func, ("one.sided", "two.sided"))
    wild_B = check_int(wild_B, "wild_B", func, low=2)
    wild_level = check_float(wild_level, "wild_level", func, low=0.0, high=1.0, low_open=True)
    if A is None:
        Av = np.ones((1, N))
    else:
        Av = to_matrix(A, "A", func)
        if Av.ndim == 1:
            Av = Av[None, :]
        if Av.ndim != 2 or Av.shape[1] != N:
            raise param_error("A", func, f"an array with {N} columns (one per column of Y)", f"shape {Av.shape}")
        if not np.all(np.isfinite(Av)):
            raise param_error("A", func, "finite (no NaN or Inf)", "non-finite values")
        if covariate_names is None:
            covariate_names = axis_names(A, 0)
    K = Av.shape[0]
    x_method = None
    if engine == "ecm":  # a matrix or nmfkc's method name (spec §5.1)
        X0, x_method = check_x_init(X_init, (P, rank), func)
    else:
        X0 = check_matrix_init(X_init, "X_init", (P, rank), func)
    C0 = check_matrix_init(C_init, "C_init", (rank, K), func)
    U0 = check_matrix_init(U_init, "U_init", (rank, N), func)

    timings = {}
    # one BLAS thread per task: the executor's threads (or workers) are the parallelism, and
    # nested OpenBLAS threads on top of them oversubscribe the cores (2× slower on 2 cores)
    with threadpool_limits(1, user_api="blas"), executor_for(client) as ex:
        tp = time.perf_counter()
        data = BlockedData(ex, Yb, Av) if engine == "cap" else ECMBlockedData(ex, Yb, Av)
        timings["place_and_constants"] = time.perf_counter() - tp
        tp = time.perf_counter()
        if engine == "ecm" and X0 is not None and C0 is None:
            # nmfkc with X.restriction="fixed": X as given, Θ from nmfkc's iterations (spec §5.1)
            C0, _ = nmfkc_c_stats(X0, np.ones((rank, K)), data.YAt, data.AAt, data.ysq, epsilon)
        elif X0 is None or C0 is None:
            if rank == 1 and x_method in (None, "kmeans"):  # R's k-means with one centre: the row means
                Xs = data.ymean_rows[:, None] / data.ymean_rows.sum()
            elif x_method is not None:  # nmfkc's named start on the column subsample
                Xs = _subsample_named_start(data, Yb, rank, init_sample, x_method, seed, r_rng)
            else:
                Xs = _subsample_start(data, Yb, rank, init_sample, seed)
            X0, C0, _ = nmfkc_eu_stats(Xs, np.ones((rank, K)), data.YAt, data.AAt, data.ysq, epsilon)
            if rank > 1:
                o = basis_order(X0)
                X0, C0 = X0[:, o], C0[o, :]
        timings["initialiser"] = time.perf_counter() - tp
        tp = time.perf_counter()
        if engine == "ecm":
            st, iter_times = fit_ecm_blocked(data, X0, C0, sigma2, tau2, ecm_opt)
            if st.stop_reason in ("maxit", "outer_maxit"):
                warnings.warn(f"nmfre_blocked (engine='ecm') stopped at {st.stop_reason} ({st.total_iter} "
                              f"iterations) before converging; increase maxit (currently {maxit}) or outer_maxit "
                              f"(currently {outer_maxit}).", ConvergenceWarning, stacklevel=2)
            timings["fit"] = time.perf_counter() - tp
            tp = time.perf_counter()
            out = ecm_blocked_result(st, ecm_opt, data, Yb, prefix, covariate_names, iter_times)
        else:
            out = _cap_blocked(data, Yb, Av, X0, C0, U0, rank, df_rate, epsilon, maxit, sigma2, tau2, sigma2_update,
                               prefix, covariate_names, timings, tp)
            tp += timings["fit"]
        timings["finalise"] = time.perf_counter() - tp
        tp = time.perf_counter()
        if wild_bootstrap:
            out = _infer_blocked(out, data, Av, wild_B, wild_level, C_p_side, wild_seed, r_rng)
        timings["inference"] = time.perf_counter() - tp
        U = data.gather_u() if gather_U else None
    from dataclasses import replace

    return replace(out, U=U, timings=timings, runtime=time.perf_counter() - t0)


def _cap_blocked(data, Yb, Av, X0, C0, U0, rank, df_rate, epsilon, maxit, sigma2, tau2, sigma2_update, prefix,
                 covariate_names, timings, tp):
    """Engine "cap": the df scan (``df_rate=None``), the fit and its result."""
    scan = None
    rate = df_rate
    common = dict(data=data, Yb=Yb, X0=X0, C0=C0, U0=U0, rank=rank, epsilon=epsilon, maxit=maxit,
                  sigma2=sigma2, tau2=tau2, sigma2_update=sigma2_update)
    if rate is None:
        scan = _blocked_scan(common)
        if not np.isfinite(scan.cap_rate):
            raise InputError("nmfre_blocked: no df_rate of the automatic scan qualifies; pass df_rate. "
                             "Scan table:\n" + str(scan))
        rate = float(scan.cap_rate)
    res = _fit_blocked(rate=rate, **common)
    if res["st"].stop_reason == "maxit":
        warnings.warn(f"nmfre_blocked reached maxit ({maxit}) before converging; increase maxit "
                      f"(currently {maxit}).", ConvergenceWarning, stacklevel=3)
    timings["fit"] = time.perf_counter() - tp
    return _result(res, data, Yb, Av, rate, prefix, covariate_names, maxit, epsilon, scan)


def _fit_blocked(data, Yb, X0, C0, U0, rank, rate, epsilon, maxit, sigma2, tau2, sigma2_update):
    data.set_u(U0, rank)
    X = np.maximum(X0, EPS)
    C = np.maximum(C0, EPS)
    X, d = normalize_columns(X)
    C = C * d[:, None]
    if U0 is not None:
        data.scale_u(d)
    opt = CapOptions(rank=rank, rate=rate, epsilon=epsilon, maxit=maxit, sigma2_update=sigma2_update)
    timer = _Timer(data)
    st = fit_cap(timer, CapState(X=X, C=C, sigma2=sigma2, tau2=tau2), opt)
    timer.stamps.append(time.perf_counter())
    return {"st": st, "opt": opt, "iter_times": np.diff(np.asarray(timer.stamps))}


class _Timer:
    """Wraps a backend to stamp the start of each iteration (its U step)."""

    def __init__(self, data):
        self._d = data
        self.stamps = []

    def __getattr__(self, name):
        return getattr(self._d, name)

    def u_step(self, *a):
        self.stamps.append(time.perf_counter())
        return self._d.u_step(*a)


def _blocked_scan(common):
    import pandas as pd

    rows = []
    for r in DEFAULT_RATES:
        res = _fit_blocked(rate=r, **common)
        st = res["st"]
        X = st.X
        lam = st.sigma2 / clip_var(st.tau2)
        N = common["data"].n_samples
        cap = max(r * N * common["rank"], 1.0)
        view = _ScanView(df_u(gram_eigenvalues(X.T @ X), N, lam), cap, bool(st.hit_iter), st.converged,
                         st.tau2, st.sigma2, icc(X, st.sigma2, st.tau2))
        rows.append(scan_row(r, view))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table["safeguard"] = table["safeguard"].astype(object)
    return DfUScanResult(table=table, cap_rate=choose_rate(table), fits=())


@dataclass(frozen=True)
class _ScanView:
    dfU: float
    dfU_cap: float
    dfU_hit_cap: bool
    converged: bool
    tau2: float
    sigma2: float
    ICC: float


def _result(res, data: BlockedData, Yb, A, rate, prefix, covariate_names, maxit, epsilon, scan) -> NMFREBlockedResult:
    st = res["st"]
    X, C, P, N, Q, K, r2b, r2f, lam, dfu = _blocked_final_stats(st, data, Yb)
    cap = max(rate * N * Q, 1.0)
    return NMFREBlockedResult(
        X=X, C=C, U=None, U_blocks=data.ex.standalone(data.U), col_bounds=np.asarray(data.bounds),
        sigma2=float(st.sigma2), tau2=float(st.tau2), lambda_=float(lam), dfU=dfu, dfU_cap=cap, dfU_cap_rate=rate,
        dfU_frac=dfu / (N * Q), dfU_cap_frac=cap / (N * Q), lambda_enforced=float(lam),
        dfU_hit_cap=bool(st.hit_iter), dfU_hit_iter=tuple(st.hit_iter), converged=st.converged,
        stop_reason=st.stop_reason, n_iter=st.iteration, maxit=maxit, epsilon=epsilon,
        objfunc=float(st.objfunc_iter[-1]), rel_change_final=float(st.rel), objfunc_iter=np.asarray(st.objfunc_iter),
        rss_trace=np.asarray(st.rss_trace),
        r_squared=r2b["grand"], r_squared_fixed=r2f["grand"], r_squared_cor2=r2b["cor2"],
        r_squared_fixed_cor2=r2f["cor2"], r_squared_uncentered=r2b["uncentered"],
        r_squared_fixed_uncentered=r2f["uncentered"], r_squared_centered=r2b["centered"],
        r_squared_fixed_centered=r2f["centered"],
        ICC=icc(X, st.sigma2, st.tau2), engine="cap", C_signed=False, call="", runtime=0.0,
        basis_names=basis_names(prefix, Q),
        covariate_names=None if covariate_names is None else tuple(covariate_names),
        feature_names=Yb.row_names, sample_names=Yb.col_names,
        dims=f"Y({P},{N})~X({P},{Q})C({Q},{K})A({K},{N})", iter_times=res["iter_times"], dfU_cap_scan=scan,
    )


def _infer_blocked(out: NMFREBlockedResult, data: BlockedData, A, wild_B, wild_level, side, seed, r_rng):
    from dataclasses import replace

    X, C = out.X, out.C
    P, N, Q, K = out.shape
    ex = data.ex
    js = list(range(len(data.blocks)))
    if r_rng:
        W = r_exp_multipliers(int(seed), N, wild_B)
        Wb = split_columns(W.T, data.bounds)
        handles = ex.map_blocks(_infer_r, data.blocks, data.U, js, [w.T.copy() for w in Wb], args=(X, C))
    else:
        root = seed_root(seed)
        bounds = chunk_bounds(wild_B, BOOT_CHUNK)
        handles = ex.map_blocks(infer_chunk, data.blocks, data.U, js, args=(X, C, root, bounds))
    rss, StS, SW = ex.tree_reduce(_add, handles)
    lam = out.sigma2 / max(out.tau2, 1e-12)
    st = sandwich(X.T @ X, data.AAt, lam, N, P, rss, StS)
    cvec = C.ravel(order="F")
    # Θ ≥ 0 (engine "cap", or "ecm" with C_signed=False): replicates projected on θ ≥ 0 (§6.1 item 7)
    project = out.engine == "cap" or not out.C_signed
    bs = summarize_boot(cvec, st["Hinv"], SW, st["sigma2_used"], wild_level, project=project)
    table = coefficient_table(out.basis_names, out.covariate_labels, cvec, st["se"], bs["bse"], bs["lo"], bs["hi"],
                              side)
    shape = lambda v: np.asarray(v).reshape(Q, K, order="F")  # noqa: E731
    return replace(out, sigma2_used=float(st["sigma2_used"]), C_vec_cov=st["V"], C_se=shape(st["se"]),
                   C_se_boot=shape(bs["bse"]), C_ci_lower=shape(bs["lo"]), C_ci_upper=shape(bs["hi"]),
                   C_p_side=side, wild_B=wild_B, wild_level=wild_level, coefficients=table)


def _infer_r(blk, U, j, W, X, C):
    return infer_chunk(blk, U, j, X, C, None, (), W)
