"""``dnmf.nmf`` (module ``dnmf.core``): RcppML-style NMF, A ≈ W·diag(d)·H, by alternating NNLS on blocks."""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import time
import warnings
from typing import Any, Callable

import numpy as np
from threadpoolctl import threadpool_limits

from ._validation import check_bool_pair, check_float, check_int, check_option, check_pair, param_error
from .engine.als import ALSOptions, fit_als
from .engine.checkpoint import Checkpointer, fingerprint
from .engine.executor import get_executor
from .engine.svd import truncated_svd
from .exceptions import ConvergenceWarning
from .kernels.nnls import SOLVER_CD, SOLVER_CHOLESKY, SOLVER_EXACT
from .models import NMFModel

logger = logging.getLogger(__name__)

__all__ = ["nmf", "SOLVERS", "INITS", "default_block_nnz"]

#: NNLS solver registry: name -> kernel code.
SOLVERS = {"cd": SOLVER_CD, "cholesky": SOLVER_CHOLESKY, "exact": SOLVER_EXACT}
#: Named initializations (a user matrix is accepted too).
INITS = ("random", "svd", "lanczos", "irlba", "randomized")


def _resolve_solver(solver: str, k: int, l1: tuple) -> str:
    """RcppML §1.5 on the CPU: cholesky(-clip) when k < 32 and no L1, coordinate descent otherwise."""
    if solver != "auto":
        return solver
    return "cholesky" if k < 32 and l1 == (0.0, 0.0) else "cd"


def _normalize_seed(seed) -> tuple[np.random.SeedSequence, int | None]:
    if isinstance(seed, np.random.SeedSequence):
        return seed, None
    if seed is None:
        ss = np.random.SeedSequence()
        return ss, None
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0:
        return np.random.SeedSequence(int(seed)), int(seed)
    raise param_error("seed", "nmf", "None, a non-negative int or a numpy SeedSequence", seed)


#: Bounds of the default block size (stored entries per column block).
MIN_BLOCK_NNZ = 1_000_000
MAX_BLOCK_NNZ = 8_000_000


def default_block_nnz(A) -> int:
    """The default ``block_nnz``: about nnz / 8, within [1 M, 8 M] stored entries.

    A function of the data only — never of the cluster — so the block layout, and with it every
    bit of the result, is the same on any number of workers or threads. Fewer, larger blocks
    cut the per-task scheduling cost of an iteration (on 20 M nonzeros, 8 blocks instead of 20
    take ~30 % less time per iteration on 2 workers, ~12 % in-process); 1 M keeps small matrices split for
    parallel work, 8 M bounds a task's memory. On-disk stores keep their stored blocking.
    """
    stored = None
    if isinstance(A, np.ndarray) and A.ndim == 2:
        stored = A.size
    elif hasattr(A, "nnz") and hasattr(A, "shape"):
        try:
            stored = int(A.nnz)
        except (TypeError, ValueError):
            stored = None
    if stored is None:
        return MIN_BLOCK_NNZ
    return int(min(MAX_BLOCK_NNZ, max(MIN_BLOCK_NNZ, -(-stored // 8))))


def _available_memory(executor) -> float:
    """Bytes the blocks may use when held in memory: half the workers' (or this machine's) memory."""
    if executor.distributed:
        workers = executor.client.scheduler_info(n_workers=-1)["workers"].values()
        limits = [w.get("memory_limit") or 0 for w in workers]
        if all(limits):
            return 0.5 * float(sum(limits))
    import psutil

    return 0.5 * float(psutil.virtual_memory().available)


def _block_bytes(blocked) -> float:
    itemsize = np.dtype(blocked.dtype).itemsize
    if blocked.sparse:
        return float(blocked.nnz) * (itemsize + 8) + 8.0 * (blocked.shape[1] + blocked.n_blocks)
    return float(blocked.shape[0]) * blocked.shape[1] * itemsize


def nmf(
    A: Any,
    k: int,
    *,
    tol: float = 1e-4,
    maxit: int = 100,
    seed: int | None = None,
    L1: float | tuple = (0.0, 0.0),
    L2: float | tuple = (0.0, 0.0),
    nonneg: bool | tuple = (True, True),
    norm: str = "L1",
    sort_model: bool = True,
    init: Any = None,
    solver: str = "auto",
    cd_maxit: int = 100,
    cd_tol: float = 1e-8,
    patience: int = 5,
    on_iteration: Callable | None = None,
    client: Any = None,
    block_nnz: int | None = None,
    out_of_core: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    verbose: bool = False,
) -> NMFModel:
    """Non-negative matrix factorization ``A ≈ W · diag(d) · H`` by alternating NNLS.

    Parameters
    ----------
    A : array-like of shape (m, n)
        Features × samples. Anything :func:`dnmf.io.as_blocked` accepts: numpy, scipy.sparse,
        pydata sparse, dask arrays, Zarr stores, ``.mtx``/``.npz``/``.npy``/``.h5ad`` paths,
        AnnData (cells × genes is read as genes × cells without a copy) or a BlockedMatrix.
    k : int
        Rank, 1 ≤ k ≤ min(m, n).
    tol : float, default 1e-4
        Stop when the relative change of the training loss stays below ``tol`` for
        ``patience`` consecutive iterations (RcppML 1.0's rule).
    maxit : int, default 100
        Maximum number of alternating iterations.
    seed : int or None
        Seed of the random initial W (``numpy.random.default_rng``) and of the SVD sketch.
        ``None`` draws fresh entropy, which is recorded in ``misc["seed_entropy"]``.
    L1, L2 : float or (float, float), default 0
        Lasso (subtracted from the NNLS right-hand side) and ridge (added to the Gram diagonal)
        penalties, as (W side, H side); a scalar applies to both.
    nonneg : bool or (bool, bool), default True
        Non-negativity of (W, H). ``False`` on a side gives semi-NMF on that side.
    norm : {"L1", "L2", "none"}, default "L1"
        Norm of W's columns and H's rows after each update; their scale goes to ``d``.
    sort_model : bool, default True
        Sort factors by decreasing ``d``.
    init : None, "random", "svd", "lanczos", "irlba", "randomized" or array of shape (m, k)
        Initial W. The SVD inits use a randomized truncated SVD computed on the blocks:
        ``W = |U|·√σ`` (RcppML's convention); a user matrix may be m × k or k × m.
    solver : {"auto", "cholesky", "cd", "exact"}, default "auto"
        NNLS solver. "cholesky" solves the unconstrained normal equations and clips negatives
        (RcppML's default for k < 32 without L1; fast, not an exact NNLS); "cd" is coordinate
        descent with warm starts (``cd_maxit`` sweeps, tolerance ``cd_tol``); "exact" is an
        active-set solver. "auto" picks "cholesky" when k < 32 and L1 == 0, else "cd".
    patience : int, default 5
        Consecutive iterations below ``tol`` needed to stop.
    on_iteration : callable, optional
        Called after every iteration with an :class:`~dnmf.engine.als.IterationRecord`
        ``(iteration, train_loss, test_loss)`` (test_loss is NaN outside cross-validation).
        Raising ``StopIteration`` stops the fit cleanly (``misc["stopped_by_callback"]``).
    client : distributed.Client, False or None
        Cluster to run on. ``None`` uses the active default client when there is one, else an
        in-process thread pool; ``False`` forces the thread pool.
    block_nnz : int, optional
        Target stored entries per column block. Default: :func:`default_block_nnz` (about
        nnz / 8 within [1 M, 8 M]; a function of the data only, so results never depend on
        the number of workers).
    out_of_core : bool or None
        ``True`` streams each block from disk in every iteration; ``None`` decides from the
        matrix size and the workers' memory (lazy Zarr/h5ad inputs that do not fit stream).
    checkpoint : path, optional
        Zarr group where W, d, H and the loop state are saved every ``checkpoint_every``
        iterations (and at the end). With ``resume=True`` the fit continues from it.
    verbose : bool
        Log progress at INFO level.

    Returns
    -------
    NMFModel
        ``w`` (m × k), ``d`` (k,), ``h`` (k × n) in A's float dtype and ``misc``: ``iter``,
        ``runtime``, ``loss`` (final SSE ‖A − W diag(d) H‖²), ``loss_history``,
        ``tol_history``, ``tol``, ``converged``, ``seed``, ``solver``, ...

    Notes
    -----
    Each iteration updates H then W (RcppML §2.1). For a fixed W (unit-norm columns) every
    column solves ``min_{h≥0} ‖a_j − W h‖² + L2_H‖h‖²`` with RHS ``Wᵀa_j − L1_H``; the H rows
    are normalized into d, then W solves the same problem with ``ĤĤᵀ`` and ``AĤᵀ``. The loss is
    ``‖A‖² − 2 tr(diag(d)Wᵀ(AĤᵀ)) + tr(diag(d)WᵀW diag(d) ĤĤᵀ)``, from the same statistics, so
    A is read once per iteration. Differences from RcppML 1.0: float64 arithmetic (RcppML
    uses float32), and ``patience`` is honoured (RcppML hard-codes 5).

    Examples
    --------
    >>> import dnmf
    >>> sim = dnmf.simulate_nmf(100, 60, 3, noise=0.1, seed=1)
    >>> model = dnmf.nmf(sim.A, 3, seed=1, client=False)
    >>> model.w.shape, model.h.shape
    ((100, 3), (3, 60))
    """
    from .io import as_blocked
    from .io.validate import check_data, check_rank

    func = "nmf"
    t_start = time.perf_counter()
    if verbose:
        logging.getLogger("dnmf").setLevel(logging.INFO)
    tol = check_float(tol, "tol", func, low=0.0)
    maxit = check_int(maxit, "maxit", func, low=1)
    L1 = check_pair(L1, "L1", func, low=0.0)
    L2 = check_pair(L2, "L2", func, low=0.0)
    nonneg = check_bool_pair(nonneg, "nonneg", func)
    norm = check_option(norm, "norm", func, ("L1", "L2", "none"))
    solver = check_option(solver, "solver", func, ("auto", *SOLVERS))
    cd_maxit = check_int(cd_maxit, "cd_maxit", func, low=1)
    cd_tol = check_float(cd_tol, "cd_tol", func, low=0.0)
    patience = check_int(patience, "patience", func, low=1)
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every", func, low=1)
    if not isinstance(sort_model, (bool, np.bool_)):
        raise param_error("sort_model", func, "a bool", sort_model)
    if on_iteration is not None and not callable(on_iteration):
        raise param_error("on_iteration", func, "a callable or None", on_iteration)
    if resume and checkpoint is None:
        raise param_error("resume", func, "False unless 'checkpoint' is given", resume)
    if block_nnz is not None:
        block_nnz = check_int(block_nnz, "block_nnz", func, low=1)
    seq, seed_int = _normalize_seed(seed)

    blocked = as_blocked(A, block_nnz=block_nnz or default_block_nnz(A))
    summary = check_data(blocked, func=func)
    m, n = blocked.shape
    k = check_rank(k, (m, n), func)
    solver_name = _resolve_solver(solver, k, L1)

    executor = get_executor(client)
    if out_of_core is None:
        stream = (not blocked.in_memory) and _block_bytes(blocked) > _available_memory(executor)
    else:
        stream = bool(out_of_core) and not blocked.in_memory
    opts = ALSOptions(k=k, tol=tol, maxit=maxit, L1=L1, L2=L2, nonneg=nonneg, norm=norm,
                      solver=SOLVERS[solver_name], cd_maxit=cd_maxit, cd_tol=cd_tol, patience=patience,
                      checkpoint_every=checkpoint_every)

    # Initial W.
    init_seq, svd_seq = seq.spawn(2)
    init_name = "random" if init is None else init
    if isinstance(init_name, str):
        init_name = check_option(init_name, "init", func, INITS)
        if init_name == "random":
            w0 = np.random.default_rng(init_seq).uniform(size=(m, k))
        else:
            u, sigma = truncated_svd(blocked, k, executor, seed=svd_seq)
            w0 = np.abs(u) * np.sqrt(sigma)[None, :]
    else:
        w0 = np.asarray(init, dtype=np.float64)
        if w0.shape == (k, m) and (m, k) != (k, m):
            w0 = w0.T
        if w0.shape != (m, k):
            raise param_error("init", func, f"a matrix of shape ({m}, {k}) or ({k}, {m})", f"shape {w0.shape}")
        if not np.all(np.isfinite(w0)):
            raise param_error("init", func, "a finite matrix", "a matrix with NaN or Inf")
        init_name = "user"
        w0 = np.array(w0, copy=True)

    checkpointer = state = None
    if checkpoint is not None:
        fp = fingerprint((m, n), blocked.col_bounds,
                         {**opts.__dict__, "init": init_name, "seed": seed_int, "w0": float(np.sum(w0))})
        checkpointer = Checkpointer(os.fspath(checkpoint), fp, blocked.n_blocks)
        if resume:
            state = checkpointer.load()
            if state is not None:
                logger.info("resuming from iteration %d (%s)", state.iteration, checkpoint)

    # Block tasks already run in parallel (threads here, workers on a cluster, whose nannies set
    # OMP/OPENBLAS/MKL_NUM_THREADS=1): pin BLAS to one thread in-process so dense blocks do not
    # oversubscribe the cores (DESIGN §3).
    blas_limit = (threadpool_limits(limits=1, user_api="blas")
                  if not executor.distributed and getattr(executor, "n_threads", 1) > 1 else contextlib.nullcontext())
    try:
        with blas_limit:
            state, ht_blocks = fit_als(blocked, w0, opts, executor, sq_norm_a=summary.sq_norm,
                                       on_iteration=on_iteration, checkpointer=checkpointer, state=state,
                                       stream=stream)
    finally:
        if not executor.distributed:
            executor.close()

    h = np.concatenate(ht_blocks, axis=0).T * state.h_scale[:, None]  # normalized Ĥ, k × n
    w, d = state.w, state.d
    if sort_model:
        order = np.argsort(-d, kind="stable")
        w, d, h = w[:, order], d[order], h[order]
    out_dtype = np.float32 if np.dtype(blocked.dtype) == np.float32 else np.float64
    if not state.converged and not state.stopped_by_callback:
        warnings.warn(
            f"nmf stopped at maxit={maxit} before the relative loss change stayed below tol={tol} for "
            f"{patience} iterations. Increase maxit (currently {maxit}) or tol.",
            ConvergenceWarning,
            stacklevel=2,
        )
    misc = {
        "iter": state.iteration,
        "runtime": time.perf_counter() - t_start,
        "loss": state.loss_history[-1] if state.loss_history else float("nan"),
        "loss_history": np.asarray(state.loss_history),
        "tol_history": np.asarray(state.tol_history),
        "tol": state.tol_history[-1] if state.tol_history else 0.0,
        "converged": bool(state.converged),
        "stopped_by_callback": bool(state.stopped_by_callback),
        "seed": seed_int,
        "seed_entropy": seq.entropy,
        "init": init_name,
        "solver": solver_name,
        "norm": norm,
        "L1": L1,
        "L2": L2,
        "nonneg": nonneg,
        "n_blocks": blocked.n_blocks,
        "out_of_core": stream,
        "executor": "distributed" if executor.distributed else "threads",
        "row_names": blocked.row_names,
        "col_names": blocked.col_names,
    }
    return NMFModel(w=w.astype(out_dtype), d=d.astype(out_dtype), h=h.astype(out_dtype), misc=misc)
