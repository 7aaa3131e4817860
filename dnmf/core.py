"""``dnmf.nmf`` (module ``dnmf.core``): RcppML-style NMF, A ≈ W·diag(d)·H, by alternating NNLS on blocks."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import numpy as np
from threadpoolctl import threadpool_limits

from ._validation import param_error
from .engine.als import ALSOptions, fit_als
from .engine.checkpoint import Checkpointer, fingerprint
from .engine.executor import get_executor
from .cv import auto_rank, cross_validate
from .engine.irls import IRLSCheckpointer, IRLSOptions, fit_irls
from .engine.kl import fit_kl
from .engine.masked import MaskOptions, fit_masked, fit_masked_many
from .solvers.penalties import check_penalty_use, fit_penalties
from .solvers.targets import FitTargets
from .engine.svd import truncated_svd
from .exceptions import ConvergenceWarning, DnmfError, InputError
from .io.blocks import CSCBlock, _WrappedSource
from .io.validate import SAFE_MAX_RANGE, data_scale
from .kernels.nnls import SOLVER_CD, SOLVER_CHOLESKY, SOLVER_EXACT
from .models import NMFModel
from .params import INITS, NMF_PARAMS, SOLVER_NAMES
from .params import validate as validate_params

logger = logging.getLogger(__name__)

__all__ = ["nmf", "NMFFitRecord", "FitRecordView", "SOLVERS", "INITS", "default_block_nnz"]

#: NNLS solver registry: name -> kernel code (the names are declared in :mod:`dnmf.params`).
SOLVERS = dict(zip(SOLVER_NAMES, (SOLVER_CD, SOLVER_CHOLESKY, SOLVER_EXACT)))


def _resolve_solver(solver: str, k: int, l1: tuple, irls: bool = False) -> str:
    """RcppML §1.5 on the CPU: cholesky(-clip) when k < 32 and no L1, coordinate descent otherwise
    (always for an IRLS loss)."""
    if solver != "auto":
        return solver
    if irls:
        return "cd"
    return "cholesky" if k < 32 and l1 == (0.0, 0.0) else "cd"


def _seed_sequence(seed) -> tuple[np.random.SeedSequence, int | None]:
    """The fit's SeedSequence (fresh entropy for None) and the int seed given, if any (validated seed)."""
    if isinstance(seed, np.random.SeedSequence):
        return seed, None
    if seed is None:
        return np.random.SeedSequence(), None
    return np.random.SeedSequence(int(seed)), int(seed)


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


@dataclass(frozen=True)
class ScaledSource(_WrappedSource):
    """A block source whose blocks are multiplied by ``scale`` (a power of two: exact) and
    stored in ``dtype`` (None: the source's; float32 for ``dtype="float32"`` on float64 input)."""

    source: Any
    scale: float
    dtype: Any = None

    def _times(self, x: np.ndarray) -> np.ndarray:
        out = x.dtype if self.dtype is None else self.dtype
        if self.scale == 1.0:
            return x.astype(out, copy=False)
        # in float64, then to the stored dtype: a float32 scale could overflow (2**130 for
        # subnormal float32 data) although the scaled values are in [0.5, 1)
        return np.multiply(x, self.scale, dtype=np.float64).astype(out, copy=False)

    def load(self):
        block = self.source.load()
        if isinstance(block, CSCBlock):
            return CSCBlock(self._times(block.data), block.indices, block.indptr, block.n_rows)
        return self._times(np.asarray(block))

    def __sizeof__(self) -> int:  # dask's sizeof (see io/blocks.py::CSCBlock.__sizeof__)
        from dask.sizeof import sizeof

        return sizeof(self.source) + 64


def _scaled(blocked, scale: float, dtype=None):
    """``blocked`` with every block multiplied by ``scale`` when it is not 1, and stored in
    ``dtype`` when given (lazily, per load)."""
    dtype = blocked.dtype if dtype is None else np.dtype(dtype)
    if scale == 1.0 and dtype == blocked.dtype:
        return blocked
    return replace(blocked, sources=tuple(ScaledSource(src, scale, dtype) for src in blocked.sources), dtype=dtype)


def _check_init(init, m: int, k: int, nonneg_w: bool, func: str) -> np.ndarray:
    """A user initial W as an m × k float64 copy (a k × m matrix is transposed)."""
    try:
        w0 = np.asarray(init, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise param_error("init", func, "None, one of " + ", ".join(repr(i) for i in INITS) + " or a matrix",
                          type(init).__name__) from e
    if w0.shape == (k, m) and (m, k) != (k, m):
        w0 = w0.T
    if w0.shape != (m, k):
        raise param_error("init", func, f"a matrix of shape ({m}, {k}) or ({k}, {m})", f"shape {w0.shape}")
    if not np.all(np.isfinite(w0)):
        raise param_error("init", func, "a finite matrix", "a matrix with NaN or Inf")
    if nonneg_w and np.any(w0 < 0):
        raise param_error("init", func, "non-negative when W is non-negative (nonneg[0] is True)",
                          f"a matrix with {int(np.sum(w0 < 0))} negative entries, minimum {float(w0.min())!r}",
                          described=True)
    dead = np.flatnonzero(~np.any(w0 != 0, axis=0))
    if dead.size:
        # a zero column of W gives a zero row of H, which gives a zero column of W: a dead factor
        what = "an all-zero matrix" if dead.size == k else f"a matrix whose column(s) {dead.tolist()} are all zero"
        raise param_error("init", func, "a matrix with a non-zero entry in every column", what, described=True)
    return np.array(w0, copy=True)


def _check_factors(w, d, h, *, iteration: int, L1: tuple, nonneg: tuple, norm: str, solver: str, k: int,
                   func: str, angular: tuple = (0.0, 0.0)) -> None:
    """The final check of a fit: no NaN/Inf, no all-zero model; warn about zero factors."""
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(d)) and np.all(np.isfinite(h))):
        causes = []
        if not all(nonneg):
            causes.append(f"nonneg = {nonneg} lets the unconstrained side diverge")
        if norm == "none":
            causes.append("norm = 'none' lets the factors grow without bound")
        if solver == "cholesky":
            causes.append("solver = 'cholesky' on a rank-deficient Gram (try solver='cd' or L2 > 0)")
        causes.append(f"k = {k} too large for the data (try a smaller k or L2 > 0)")
        raise DnmfError(
            f"{func} produced NaN or Inf factors (W, d or H) after {iteration} iteration(s). Likely cause: "
            + "; ".join(causes) + "."
        )
    zero = ~np.any(w != 0, axis=0) | ~np.any(h != 0, axis=1)
    if not zero.any():
        return
    penalized = any(v > 0 for v in L1)
    if zero.all():
        if any(v > 0 for v in angular):
            raise InputError(f"All factors were zeroed by angular = {tuple(angular)}; lower angular. (The map "
                             "X ← max(0, X − λ·diag(n)·C·X̂) removes from each factor λ times its cosine-weighted "
                             "overlap with the others: strongly correlated factors need a small λ.)")
        if penalized:
            raise InputError(f"All factors were zeroed by L1 = {tuple(L1)}; lower L1. (L1 is subtracted from "
                             f"the NNLS right-hand side, which is of the order of the data's values.)")
        raise DnmfError(f"{func} returned an all-zero model (every column of W or row of H is zero) after "
                        f"{iteration} iteration(s); check the data and lower k (currently {k}).")
    knob = f"lower L1 (currently {tuple(L1)}) or k (currently {k})" if penalized else f"lower k (currently {k})"
    warnings.warn(
        f"{func}: {int(zero.sum())} of {k} factors are all zero (factor(s) {np.flatnonzero(zero).tolist()} have "
        f"a zero column of W or row of H); {knob}.",
        UserWarning,
        stacklevel=5,  # _check_factors ← _build_model ← _nmf ← nmf ← the caller
    )


class _StdoutHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is at emit time (a notebook replaces it)."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record):
        if self.stream is not sys.stdout:
            self.setStream(sys.stdout)
        super().emit(record)


def _emits(log: logging.Logger, level: int) -> bool:
    """Whether a record of ``level`` on ``log`` already reaches a handler that shows it."""
    current = log
    while current is not None:
        if any(h.level <= level for h in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


@contextlib.contextmanager
def verbose_logging(verbose: bool):
    """Show the 'dnmf' loggers' INFO records for the duration of a fit when ``verbose``.

    Lowers the 'dnmf' logger to INFO if it is above (restored on exit) and, unless a configured
    handler already shows INFO records, attaches a handler writing bare messages to
    ``sys.stdout`` (removed on exit). Never changes logging for good.
    """
    if not verbose:
        yield
        return
    log = logging.getLogger("dnmf")
    old_level = log.level
    handler = None
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    if not _emits(log, logging.INFO):
        handler = _StdoutHandler()
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            log.removeHandler(handler)
        log.setLevel(old_level)


def _progress_callback(on_iteration, loss_scale: float, func: str):
    """Wrap ``on_iteration``: log each iteration at INFO (shown by ``verbose``), then call the user's."""
    state = {"prev": None}

    def callback(record):
        prev = state["prev"]  # the relative change is computed in the fit's units (no underflow)
        state["prev"] = record.train_loss
        loss = record.train_loss * loss_scale
        if prev is None:
            logger.info("%s iter %4d  loss %.6e", func, record.iteration, loss)
        else:
            rel = abs(prev - record.train_loss) / (abs(prev) + 1e-15)
            logger.info("%s iter %4d  loss %.6e  rel %.3e", func, record.iteration, loss, rel)
        if on_iteration is not None:
            on_iteration(record._replace(train_loss=loss, test_loss=record.test_loss * loss_scale))

    return callback


def _available_memory(executor) -> float:
    """Bytes the blocks may use when held in memory: half the workers' (or this machine's) memory.

    The blocks are spread over the workers, so the budget is half of the smallest worker's
    memory times the number of workers (the executor's ``available_memory``/``n_workers``).
    """
    n_workers = max(1, int(executor.n_workers or 1)) if executor.distributed else 1
    return 0.5 * n_workers * float(executor.available_memory())


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
    r_rng: bool = False,
    L1: float | tuple = (0.0, 0.0),
    L2: float | tuple = (0.0, 0.0),
    L21: float | tuple = (0.0, 0.0),
    angular: float | tuple = (0.0, 0.0),
    upper_bound: float | tuple = (0.0, 0.0),
    graph_W: Any = None,
    graph_H: Any = None,
    graph_lambda: float | tuple = (0.0, 0.0),
    nonneg: bool | tuple = (True, True),
    norm: str = "L1",
    sort_model: bool = True,
    init: Any = None,
    solver: str = "auto",
    cd_maxit: int = 100,
    cd_tol: float = 1e-8,
    patience: int = 5,
    loss: str = "mse",
    robust: Any = False,
    dispersion: str = "per_row",
    theta_init: float = 0.1,
    theta_max: float = 5.0,
    theta_min: float = 0.0,
    nb_size_init: float = 10.0,
    nb_size_max: float = 1e6,
    nb_size_min: float = 0.01,
    gamma_phi_init: float = 1.0,
    gamma_phi_max: float = 1e4,
    gamma_phi_min: float = 1e-6,
    tweedie_power: float = 1.5,
    irls_max_iter: int = 5,
    irls_tol: float = 1e-4,
    zi: str = "none",
    zi_em_iters: int = 1,
    projective: bool = False,
    symmetric: bool = False,
    target_H: Any = None,
    target_W: Any = None,
    target_lambda: float | tuple = (0.0, 0.0),
    mask: Any = None,
    test_fraction: float = 0.0,
    cv_seed: Any = None,
    mask_zeros: bool = False,
    on_iteration: Callable | None = None,
    client: Any = None,
    block_nnz: int | None = None,
    out_of_core: bool | None = None,
    dtype: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    verbose: bool = False,
) -> NMFModel:
    """Non-negative matrix factorization ``A ≈ W · diag(d) · H`` by alternating NNLS.

    The parameters after ``A`` are declared once, in :data:`dnmf.params.NMF_PARAMS` (types,
    ranges, defaults; shared with :class:`dnmf.NMF` and the YAML ``model:`` section).

    Parameters
    ----------
    A : array-like of shape (m, n)
        Features × samples. Anything :func:`dnmf.io.as_blocked` accepts: numpy, scipy.sparse,
        pydata sparse, dask arrays, Zarr stores, ``.mtx``/``.npz``/``.npy``/``.h5ad`` paths,
        AnnData (cells × genes is read as genes × cells without a copy) or a BlockedMatrix.
    k : int, list of int or "auto"
        Rank, 1 ≤ k ≤ min(m, n). A list of ranks runs rank cross-validation and returns a
        :class:`dnmf.cv.CVResult` (every (replicate, rank) fit a parallel task; see
        :func:`dnmf.cv.cross_validate`); ``"auto"`` searches the rank by cross-validation
        (RcppML §5.6–5.7) and returns the model at the chosen rank with ``misc["rank_search"]``.
    tol : float, default 1e-4
        Stop when the relative change of the training loss stays below ``tol`` for
        ``patience`` consecutive iterations (RcppML 1.0's rule).
    maxit : int, default 100
        Maximum number of alternating iterations.
    seed : int, list of int or None
        Seed of the random initial W (``numpy.random.default_rng``) and of the SVD sketch.
        ``None`` draws fresh entropy, which is recorded in ``misc["seed_entropy"]``. A list of
        seeds is a multi-start (RcppML §1.3): one fit per seed, run as parallel tasks (whole
        fits on the workers for a matrix held in memory), the fit with the lowest final loss is
        returned and ``misc["all_inits"]`` lists every start (seed, loss, iterations, selected).
    r_rng : bool, default False
        Draw the random W exactly as R's ``set.seed(seed); matrix(runif(m * k), m, k)``, so a
        fit starts where an RcppML fit with the same seed starts (needs an integer seed).
    L1, L2 : float or (float, float), default 0
        Lasso (subtracted from the NNLS right-hand side) and ridge (added to the Gram diagonal)
        penalties, as (W side, H side); a scalar applies to both. L1 is in [0, 1) (RcppML's
        range); it is in the units of the data, so a value near max(A) zeroes every factor,
        which raises an InputError naming L1.
    L21 : float or (float, float), default 0
        Group sparsity (RcppML §8): each factor r's Gram diagonal gets ``L21 / ‖F_r‖₂`` of the
        side's current factor, so weak factors shrink to zero as a whole. (W side, H side).
    angular : float or (float, float), default 0
        Angular decorrelation after each solve: ``X ← max(0, X − λ·diag(n)·C·X̂)`` with X̂ the
        new factor's unit rows, n their norms and C their cosines (zero diagonal); larger values
        make the factors less correlated. Exact on both sides (on H a second pass over A).
    upper_bound : float or (float, float), default 0
        Solved values are clamped to ≤ bound right after each solve (0: no bound), in the units
        of the unnormalized factor (before the scale goes to d).
    graph_W, graph_H : matrix or None, default None
        Feature graph (m × m) and sample graph (n × n), sparse or dense, used as given as the
        Laplacian ``L`` of the term ``λ·F L Fᵀ`` added to the side's Gram (F its current factor;
        the symmetric part for a non-symmetric L). Build one from an adjacency with
        :func:`dnmf.laplacian`. Used only where the matching ``graph_lambda`` is > 0.
    graph_lambda : float or (float, float), default 0
        Strength of the graph terms (W side, H side); > 0 needs the matching graph.
        These four penalties work with ``loss="mse"`` and the IRLS losses (not ``loss="kl"``);
        on the H side they are refused with ``projective`` or ``symmetric``. They work with
        masks and cross-validation.
    nonneg : bool or (bool, bool), default True
        Non-negativity of (W, H). ``False`` on a side gives semi-NMF on that side.
    norm : {"L1", "L2", "none"}, default "L1"
        Norm of W's columns and H's rows after each update; their scale goes to ``d``.
    sort_model : bool, default True
        Sort factors by decreasing ``d``.
    init : None, "random", "svd", "lanczos", "irlba", "randomized", array of shape (m, k) or list
        Initial W. The SVD inits use a randomized truncated SVD computed on the blocks:
        ``W = |U|·√σ`` (RcppML's convention); a user matrix may be m × k or k × m. A list of
        matrices is a multi-start, as a list of seeds.
    solver : {"auto", "cholesky", "cd", "exact"}, default "auto"
        NNLS solver. "cholesky" solves the unconstrained normal equations and clips negatives
        (RcppML's default for k < 32 without L1; fast, not an exact NNLS); "cd" is coordinate
        descent with warm starts (``cd_maxit`` sweeps, tolerance ``cd_tol``); "exact" is an
        active-set solver. "auto" picks "cholesky" when k < 32 and L1 == 0, else "cd".
    cd_maxit : int, default 100
        Coordinate-descent sweeps per NNLS solve (``solver="cd"``).
    cd_tol : float, default 1e-8
        Coordinate-descent tolerance.
    patience : int, default 5
        Consecutive iterations below ``tol`` needed to stop. With a test set (``test_fraction``)
        the fit stops after ``patience`` iterations without a new best test loss, or as soon as
        the relative change of the test loss is below ``tol`` (RcppML §3.2).
    loss : {"mse", "kl"}, default "mse"
        The loss fitted. ``"kl"`` minimizes the generalized KL divergence (Poisson deviance / 2)
        ``Σ a log(a/μ) − a + μ`` by Lee–Seung multiplicative updates on the blocks: one pass over
        the stored entries per iteration, the zeros of sparse A entering in closed form through
        ``Σμ``; ``misc["loss"]`` is then that divergence over the observed entries, of the factors
        returned. Masks, NaN, ``mask="zeros"`` and test sets enter only H's and W's MU
        denominators (still one pass per iteration); with a test set train/test losses are
        means, as for "mse". L2 is the standard penalized MU (``+ L2·x`` in the denominators,
        not RcppML's NNLS penalty). L1 (with W's unit-L1 columns it only rescales the Poisson
        fit), targets, projective/symmetric, ``norm`` other than "L1", signed factors and
        checkpoints are refused (docs/architecture.md, "Losses").
        ``"gp"`` (generalized Poisson), ``"nb"`` (negative binomial), ``"gamma"``,
        ``"inverse_gaussian"`` and ``"tweedie"`` are fitted by IRLS (RcppML §6): every column of
        H and row of W solves ``irls_max_iter`` weighted least-squares problems with the loss's
        weights at the stored entries; zeros are never visited (GP: their exact contribution to
        the gradient in closed form; NB: taken at their mean prediction; Tweedie: weight 1, as
        RcppML), the same for sparse and dense input, so both give the same fit, at the cost
        of the stored entries only (docs/architecture.md, "IRLS losses"). ``misc["loss"]`` is the loss in
        the fitted distribution (a sum; with a test set train/test losses are means): over all
        entries for GP (its zeros have a closed form), over the stored non-zero entries for the
        others (``misc["loss_covers"]``); test losses cover every held-out entry in the loss's
        support. Works with masks, NaN and cross-validation; refuses targets, projective /
        symmetric and checkpoints with missing entries; the §8 penalties join every weighted solve
        (docs/architecture.md, "IRLS losses").
    robust : bool, "mae" or float, default False
        Huber weights on the Pearson residual (any IRLS loss, or ``"mse"``): True is δ = 1.345,
        ``"mae"`` δ = 1e-4, a positive number that δ. The reported loss is then the Huber loss of
        the Pearson residuals over the stored non-zero entries.
    dispersion : {"per_row", "per_col", "global", "none"}, default "per_row"
        How the dispersion (GP θ, NB size r, φ of gamma / inverse Gaussian / Tweedie) is
        estimated after every iteration (RcppML §6.4); ``"none"``: θ = 0, r = ``nb_size_max``,
        φ = 1. The final value is ``misc["dispersion"]`` (an array per row / column, or a float),
        its per-iteration value (the median of per-row / per-column values) is
        ``misc["dispersion_history"]``. θ and φ do not change the fit (GP uses Poisson weights);
        r does (NB weights).
    theta_init, theta_max, theta_min : float, default 0.1, 5.0, 0.0
        GP θ start, cap and floor.
    nb_size_init, nb_size_max, nb_size_min : float, default 10, 1e6, 0.01
        NB size r start, cap and floor.
    gamma_phi_init, gamma_phi_max, gamma_phi_min : float, default 1, 1e4, 1e-6
        φ start, cap and floor (gamma, inverse Gaussian, Tweedie).
    tweedie_power : float, default 1.5
        Tweedie variance power p (p ≤ 0 or p ≥ 1).
    irls_max_iter, irls_tol : int, float, default 5, 1e-4
        IRLS inner iterations per column / row and their stopping tolerance (largest relative
        change of the solution).
    zi, zi_em_iters : {"none", "row", "col"}, int, default "none", 1
        Zero-inflation (RcppML §6.5; ``loss="gp"`` or ``"nb"``): a structural-zero probability π
        per row or per column, updated by ``zi_em_iters`` EM steps after the dispersion every
        iteration; from the next iteration on each observed zero enters the fit with the imputed
        value ``z·μ`` (z its posterior of being structural), formed inside the passes (no dense
        copy; every zero then enters the weighted Gram: O(m·n·k²) per IRLS inner iteration).
        ``misc["zi_pi"]`` is π, ``misc["zi_pi_history"]`` its mean per
        iteration; ``misc["loss"]`` is then the zero-inflated loss (−log-likelihood, §6.1
        constants) over every observed entry (docs/architecture.md, "IRLS losses").
    projective : bool, default False
        Projective NMF (RcppML §7): each iteration sets ``H = diag(d)·WᵀA`` (no NNLS, no
        H-side penalties) and solves only W; its W is more orthogonal than standard NMF's. With
        a mask, NaN or a test set, H's columns are projections over the observed entries only
        (held-out values never reach H, unlike RcppML's CV).
    symmetric : bool, default False
        Symmetric NMF of a square symmetric A (a cell–cell kNN graph, a similarity matrix):
        ``A ≈ W·diag(d)·Wᵀ``. Each iteration solves W with W's transpose as H; the returned ``h``
        is ``wᵀ``. Refuses ``projective=True`` and a non-square or non-symmetric A (compared on
        the pairs observed on both sides). A test set holds out unordered pairs ``{i, j}`` (both
        ``a_ij`` and ``a_ji``; docs/architecture.md, "Variants").
    target_H, target_W : array of shape (k, n) / (m, k), optional
        Guided NMF (guided spec §2): targets of H's columns and of W's rows, e.g. from
        :func:`dnmf.compute_target`. With λ > 0 every column solves
        ``min_{h≥0} ‖a − W h‖² + λ‖h − t‖²`` (Gram ``+ λI``, right-hand side ``+ λt``); with
        λ < 0 target-correlated structure is removed by the projected adversarial update
        (``G − |λ|·tr(G)/tr(Γ)·Γ``, ``Γ = TTᵀ/n``, eigenvalues floored at 1e-8; the right-hand
        side unchanged). The target's row i acts on factor i of the fit (before sorting), and is
        compared with the unnormalized factor (``d ⊙ ĥ``), as RcppML. The reported loss is the
        reconstruction loss only. Works with masks and cross-validation.
    target_lambda : float or (float, float), default 0
        (λ_W, λ_H); a scalar λ means (0, λ) (RcppML). 0 disables a side.
    mask : None, "zeros", "NA", boolean matrix, or a list of "zeros" and a matrix
        Missing entries, which take part in neither side's right-hand side nor Gram: a sparse or
        dense m × n matrix whose non-zero entries are missing; ``"zeros"`` makes every zero
        missing (only stored entries are fitted). NaN entries of A are always missing (``"NA"``
        says so explicitly). A masked fit gives every column of H and every row of W its own
        Gram (``docs/architecture.md``); its ``loss`` is the SSE over the observed entries.
    test_fraction : float in [0, 1), default 0
        Hold out a speckled test set of this fraction of all entries (of the stored entries with
        ``mask_zeros``): RcppML's hash of (i, j, cv_seed), §5.2, so dnmf and RcppML hold out the
        same entries; the realised fraction is ``1/⌊1/f⌋`` (0.05 → 1/19). ``misc`` then has
        ``test_loss`` (best test MSE), ``train_loss``, ``best_iter`` and
        ``test_loss_history``; ``loss_history`` holds train MSEs (means, §4.3).
    cv_seed : int, list of int or None
        Seed of the held-out set; None uses ``seed`` (or 12345 when ``seed`` is None or 0). A
        list gives one replicate per seed in rank cross-validation.
    mask_zeros : bool, default False
        Zeros are missing (as ``mask="zeros"``): only stored entries are fitted and held out.
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
    dtype : {None, "float32", "float64"}
        Precision of A's stored values and of the block pass's products with W. ``"float32"``
        stores A's values in float32 (rounded, relative error ≤ 6e-8, for float64 input; half
        the memory) and multiplies them with a float32 copy of W in the fused pass of the ALS
        loop, which reads half the bytes per stored entry (the pass ~1.25× faster on one thread,
        ``benchmarks/bench_nmf.py --kernel``; whole iterations gain less); every sum, Gram, solve
        and the loss stay float64, so the
        fit differs from float64's by rounding only (final loss 1e-11 relative on the benchmark
        matrix). The factors are returned in the input's dtype (float64 input: float64, also
        when its magnitudes exceed float32's range: A is then scaled by a power of two before
        it is stored, see Notes). ``"float64"`` multiplies with W in float64
        (float32 input stays stored in float32: exact). ``None`` (default): ``"float32"`` for
        float32 input, else ``"float64"``. The masked, IRLS and KL loops fit the values as
        rounded to the chosen dtype, widened to float64 when their blocks are placed.
    checkpoint : path, optional
        Zarr group where W, d, H and the loop state are saved every ``checkpoint_every``
        iterations (default 10, and at the end).
    resume : bool, default False
        Continue from ``checkpoint`` (requires it); a fit that stopped at ``maxit`` continues
        when ``maxit`` is larger.
    verbose : bool
        Show one line per iteration (``nmf iter   12  loss 1.234e+05  rel 3.2e-05``) and a
        summary: the 'dnmf' logger's INFO records are shown on ``sys.stdout`` for the duration
        of the fit (through the handlers already configured when they show INFO). The logger's
        level is restored afterwards.

    Returns
    -------
    NMFModel
        ``w`` (m × k), ``d`` (k,), ``h`` (k × n) in A's float dtype and ``misc``, a read-only
        mapping over the frozen :class:`NMFFitRecord` (``misc.record``): ``iter``,
        ``runtime``, ``loss`` (final SSE ‖A − W diag(d) H‖²), ``loss_history``,
        ``tol_history``, ``tol``, ``converged``, ``seed``, ``solver``, ``scale`` (the power of
        two A was multiplied by for the fit, 1.0 unless max|A| is outside
        :data:`SAFE_MAX_RANGE`), ...

    Raises
    ------
    InputError
        Invalid parameters; A with NaN/Inf, negative entries or no positive entry; an initial W
        that is negative or has an all-zero column; L1 so large that every factor is zero.
    DnmfError
        The fit produced NaN or Inf factors (the message names the likely cause) or an all-zero
        model.

    Notes
    -----
    Each iteration updates H then W (RcppML §2.1). For a fixed W (unit-norm columns) every
    column solves ``min_{h≥0} ‖a_j − W h‖² + L2_H‖h‖²`` with RHS ``Wᵀa_j − L1_H``; the H rows
    are normalized into d, then W solves the same problem with ``ĤĤᵀ`` and ``AĤᵀ``. The loss is
    ``‖A‖² − 2 tr(diag(d)Wᵀ(AĤᵀ)) + tr(diag(d)WᵀW diag(d) ĤĤᵀ)``, from the same statistics, so
    A is read once per iteration. Differences from RcppML 1.0: float64 arithmetic (RcppML
    uses float32; ``dtype="float32"`` rounds A and W to float32 but keeps float64 sums), and
    ``patience`` is honoured (RcppML hard-codes 5).

    When max|A| is outside :data:`SAFE_MAX_RANGE` the fit runs on ``s·A`` with ``s`` a power of
    two (:func:`data_scale`; exact, no rounding) and ``s·L1``, and ``d``, the losses and the
    losses given to ``on_iteration`` are divided by ``s`` (``s²``): the model is that of A,
    without overflow of ‖A‖² near 1e160 or the 1e-15 guards swamping values near 1e-6. With
    ``dtype="float32"`` float64 input whose max|A| exceeds 2**100 is scaled the same way into
    [0.5, 1) before it is rounded to float32, so no value overflows.

    Examples
    --------
    >>> import dnmf
    >>> sim = dnmf.simulate_nmf(100, 60, 3, noise=0.1, seed=1)
    >>> model = dnmf.nmf(sim.A, 3, seed=1, client=False)
    >>> model.w.shape, model.h.shape
    ((100, 3), (3, 60))
    """
    args = dict(locals())  # the arguments (no other local exists yet)
    with verbose_logging(verbose):
        if isinstance(k, (list, tuple, range, np.ndarray)):
            A = args.pop("A")
            return cross_validate(_blocked(A, block_nnz), list(args.pop("k")), nmf, fit_shared=_fit_shared, **args)
        if isinstance(k, str) and k == "auto":
            A = args.pop("A")
            return auto_rank(_blocked(A, block_nnz), nmf, args)
        if isinstance(seed, (list, tuple, range, np.ndarray)) or isinstance(init, list):
            from .multistart import multi_start

            A = args.pop("A")
            opts = _validate(args, "nmf")  # the list arguments are checked here, before any fit
            return multi_start(_blocked(A, block_nnz), nmf, args, func="nmf", r_rng_init=_r_rng_w,
                               multi_seed=isinstance(opts["seed"], tuple), multi_init=isinstance(opts["init"], tuple))
        return _nmf(args.pop("A"), args, "nmf")


# ---------------------------------------------------------------------------------------------
# The steps of a fit: validate → plan blocks → initialize → fit → build the model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NMFFitRecord:
    """What a fit of :func:`nmf` recorded besides the factors (``model.misc`` is a view of it).

    Attributes
    ----------
    iter : int
        Iterations completed.
    runtime : float
        Seconds from the call to the model.
    loss : float
        Final sum of squared errors ‖A − W diag(d) H‖² (NaN before the first iteration).
    loss_history, tol_history : ndarray of shape (iter,)
        Training loss and relative loss change of every iteration.
    tol : float
        The last relative loss change.
    converged, stopped_by_callback : bool
        Whether the fit stopped by ``tol``/``patience`` or because ``on_iteration`` raised
        ``StopIteration``.
    seed : int or None
        The integer seed given (None for fresh entropy or a SeedSequence).
    seed_entropy : int
        The entropy of the SeedSequence the initialization was drawn from.
    init, solver, norm : str
        The initialization ("user" for a matrix), the NNLS solver "auto" chose, the norm.
    L1, L2 : (float, float)
        The penalties, as (W side, H side).
    L21, angular, upper_bound, graph_lambda : (float, float)
        The §8 penalties as given (W side, H side); ``upper_bound`` in A's units.
    nonneg : (bool, bool)
        Non-negativity of (W, H).
    scale : float
        The power of two A was multiplied by for the fit (:func:`data_scale`).
    n_blocks : int
        Column blocks of the fit.
    out_of_core : bool
        Whether blocks were streamed from disk in every iteration.
    executor : {"distributed", "threads"}
        Where the block tasks ran.
    row_names, col_names : sequence of str or None
        Names of A's rows and columns, when the input had them.
    mask : str
        "none", or what was missing: a combination of "zeros", "matrix" and "NaN".
    test_fraction, cv_seed : float, int or None
        The hold-out set (``test_fraction`` 0 and ``cv_seed`` None without one).
    test_loss, train_loss : float
        Best test loss and last train loss of a fit with a test set, means over the entries in
        ``loss_type``'s units (MSE, mean KL divergence, …; NaN without a test set).
    best_iter : int
        Iteration (1-based) of the best test loss (0 without a test set).
    test_loss_history : ndarray
        Test loss (a mean, as ``test_loss``) of every iteration (empty without a test set).
    n_test : int
        Held-out entries scored by the test loss.
    all_inits : pandas.DataFrame or None
        A multi-start's starts (init, seed, loss, iter, selected); None for a single start.
    loss_type : {"mse", "kl", "gp", "nb", "gamma", "inverse_gaussian", "tweedie"}
        The loss fitted; ``loss`` and ``loss_history`` are in its units (SSE, the KL
        divergence, or the §6.1 loss of the distribution; Huber of Pearson residuals with
        ``robust``).
    dispersion : float, ndarray or None
        IRLS losses: the final GP θ, NB size r or φ (gamma / inverse Gaussian / Tweedie), per
        row (m,), per column (n,) or global (a float); None for mse / kl.
    dispersion_history : ndarray
        Its value after every iteration (the median of per-row / per-column values).
    loss_covers : {"all", "nonzero"}
        The entries the training loss sums over: every observed entry, or (IRLS losses without
        a closed form for their zeros) the stored non-zero observed entries.
    zi_pi, zi_pi_history : ndarray or None, ndarray
        Zero-inflation: π per row (m,) or per column (n,) and its mean after every iteration.
    rank_search : dict or None
        ``k="auto"``: k_optimal, k_low, k_high, overfitting_detected and the table of the search's
        fits (RcppML §5.7); None otherwise.
    """

    iter: int
    runtime: float
    loss: float
    loss_history: np.ndarray
    tol_history: np.ndarray
    tol: float
    converged: bool
    stopped_by_callback: bool
    seed: int | None
    seed_entropy: Any
    init: str
    solver: str
    norm: str
    L1: tuple
    L2: tuple
    nonneg: tuple
    scale: float
    n_blocks: int
    out_of_core: bool
    executor: str
    row_names: Any
    col_names: Any
    mask: str = "none"
    test_fraction: float = 0.0
    cv_seed: int | None = None
    test_loss: float = float("nan")
    train_loss: float = float("nan")
    best_iter: int = 0
    test_loss_history: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_test: int = 0
    all_inits: Any = None
    rank_search: Any = None
    loss_type: str = "mse"
    dispersion: Any = None
    dispersion_history: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loss_covers: str = "all"
    zi_pi: Any = None
    zi_pi_history: np.ndarray = field(default_factory=lambda: np.zeros(0))
    L21: tuple = (0.0, 0.0)
    angular: tuple = (0.0, 0.0)
    upper_bound: tuple = (0.0, 0.0)
    graph_lambda: tuple = (0.0, 0.0)


class FitRecordView(Mapping):
    """A read-only mapping over an :class:`NMFFitRecord`: ``model.misc["iter"]`` and friends.

    ``record`` is the frozen record itself. ``dict(view)`` is a plain, mutable copy.
    """

    def __init__(self, record: NMFFitRecord):
        self.record = record

    def __getitem__(self, key: str):
        if key in _RECORD_KEYS:
            return getattr(self.record, key)
        raise KeyError(key)

    def __iter__(self):
        return iter(_RECORD_FIELDS)

    def __len__(self) -> int:
        return len(_RECORD_FIELDS)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"


_RECORD_FIELDS = tuple(f.name for f in fields(NMFFitRecord))
#: nmf's defaults (after A and k), from the declaration
NMF_DEFAULTS = {p.name: p.default for p in NMF_PARAMS if p.name != "k"}
_RECORD_KEYS = frozenset(_RECORD_FIELDS)


@dataclass(frozen=True)
class _Plan:
    """The data side of a fit, fixed before the loop: blocks, rank, solver, scale, executor."""

    blocked: Any  # the BlockedMatrix of A
    fit_blocked: Any  # the blocks the loop reads: A, or s·A (see data_scale)
    summary: Any  # check_data's one pass over A (max, min, squared norm)
    k: int
    solver: str  # the resolved solver name
    scale: float
    executor: Any
    stream: bool  # blocks read from disk in every iteration
    masked: MaskOptions | None = None  # missing or held-out entries (the masked loop), else None
    float32: bool = False  # dtype="float32": float32 storage and products with W (fit_blocked holds float32)


def _fit_shared(blocked, tasks: list, kwargs: dict, client) -> list:
    """The CV fits of one replicate (same held-out set, one per rank) sharing every pass over A.

    Each fit is validated, planned, started and recorded exactly as ``nmf(blocked, task.k,
    init=engine_init(...), seed=task.init_seed, cv_seed=task.cv_seed, **kwargs)`` would; the
    loop is :func:`~dnmf.engine.masked.fit_masked_many`, which hashes each block's held-out
    entries once per iteration for all ranks. Returns the models in task order.
    """
    from .cv import engine_init
    from .io.validate import check_rank

    func = "nmf"
    t_start = time.perf_counter()
    m = blocked.shape[0]
    values = [dict(NMF_DEFAULTS, **kwargs, k=t.k, init=engine_init(m, t.k, t.init_seed), seed=t.init_seed,
                   cv_seed=t.cv_seed, client=client) for t in tasks]
    opts_list = [_validate(v, func) for v in values]
    top = max(range(len(tasks)), key=lambda i: tasks[i].k)
    plan = _plan_blocks(blocked, opts_list[top], func)
    try:
        fits = []
        for t, opts in enumerate(opts_list):
            seq, seed_int = _seed_sequence(opts["seed"])
            p = replace(plan, k=check_rank(opts["k"], blocked.shape, func),
                        solver=_resolve_solver(opts["solver"], opts["k"], opts["L1"]))
            p = replace(p, masked=_mask_options(opts, blocked, plan.summary, seed_int, func))
            if t == 0:  # projective / symmetric, penalties: the same checks as a single fit (same A, options)
                _check_variant(p, opts, func)
                check_penalty_use(opts, func)
            w0, init_name = _initialize(p, opts, seq, func)
            fits.append((p, opts, seq, seed_int, w0, init_name))
        mos = {None if f[0].masked is None else (f[0].masked.zeros_missing, f[0].masked.test_fraction,
                                                 f[0].masked.cv_seed) for f in fits}
        if len(mos) != 1 or None in mos:  # a caller's bug, not an input error
            raise ValueError("shared passes need one held-out set for every fit")
        results = fit_masked_many(plan.fit_blocked, [f[4] for f in fits], [_als_options(f[0], f[1]) for f in fits],
                                  fits[0][0].masked, plan.executor)
    finally:
        plan.executor.release_buffers()  # pooled task outputs, here or on the workers
        if not plan.executor.distributed:
            plan.executor.close()
    return [_build_model(p, opts, state, ht, init_name=init_name, seq=seq, seed_int=seed_int, t_start=t_start,
                         func=func)
            for (p, opts, seq, seed_int, _, init_name), (state, ht) in zip(fits, results)]


def _blocked(A, block_nnz):
    """A as column blocks with the fit's block size."""
    from .io import as_blocked

    return as_blocked(A, block_nnz=block_nnz or default_block_nnz(A))


def _r_rng_w(m: int, k: int, seed: int) -> np.ndarray:
    """R's ``set.seed(seed); matrix(runif(m * k), m, k)`` (column-major fill)."""
    from .rrng import RRandom

    return RRandom(seed).runif(m * k).reshape((m, k), order="F")


def _validate(values: dict, func: str) -> dict:
    """Check every argument against :data:`dnmf.params.NMF_PARAMS` (plus the rules across them).

    The rank and a user initial W are checked later, against the data.
    """
    opts = validate_params(NMF_PARAMS, values, func)
    if opts["resume"] and opts["checkpoint"] is None:
        raise param_error("resume", func, "False unless 'checkpoint' is given", opts["resume"])
    if opts["projective"] and opts["symmetric"]:
        raise param_error("symmetric", func, "False when projective=True (they exclude each other)",
                          opts["symmetric"])
    if opts["r_rng"] and not (isinstance(opts["seed"], (int, tuple)) and opts["init"] in (None, "random")):
        raise param_error("r_rng", func, "False unless seed is an integer (or a list) and init is random",
                          opts["r_rng"])
    if isinstance(opts["cv_seed"], tuple):
        raise param_error("cv_seed", func, "an int or None for a single rank (a list of seeds gives the "
                          "replicates of rank cross-validation: pass k as a list of ranks)", list(opts["cv_seed"]))
    return opts


def _mask_options(opts: dict, blocked, summary, seed_int: int | None, func: str) -> MaskOptions | None:
    """What is missing or held out in this fit, or None for the plain fit (one fused pass)."""
    masks = opts["mask"] if isinstance(opts["mask"], tuple) else (opts["mask"],)
    zeros = bool(opts["mask_zeros"]) or any(isinstance(mk, str) and mk == "zeros" for mk in masks)
    matrix = None
    for mk in masks:
        if mk is not None and not isinstance(mk, str):
            matrix = _check_mask_matrix(mk, blocked.shape, func)
    tf = float(opts["test_fraction"])
    if not (zeros or matrix is not None or tf > 0 or summary.n_nan):
        return None
    cv_seed = opts["cv_seed"]
    if not cv_seed:  # None, or 0 which RcppML treats as "not given" (§5.2)
        cv_seed = seed_int or 0
    return MaskOptions(zeros_missing=zeros, test_fraction=tf, cv_seed=int(cv_seed), mask=matrix)


def _check_mask_matrix(mask, shape: tuple, func: str):
    """The user mask as a boolean scipy CSC matrix of A's shape (non-zero = missing)."""
    import scipy.sparse as sp

    if tuple(mask.shape) != tuple(shape):
        raise param_error("mask", func, f"a boolean matrix of A's shape {shape[0]} × {shape[1]}",
                          f"a matrix of shape {' × '.join(map(str, mask.shape))}", described=True)
    if hasattr(mask, "to_scipy_sparse"):  # pydata sparse
        mask = mask.to_scipy_sparse()
    out = sp.csc_matrix(mask)
    if out.nnz and not np.all(np.isfinite(out.data.astype(np.float64))):
        raise param_error("mask", func, "a boolean matrix (True or non-zero = missing)",
                          "a matrix with NaN or Inf entries", described=True)
    out = sp.csc_matrix(out != 0, dtype=bool)
    out.eliminate_zeros()
    return out


def _plan_blocks(A, opts: dict, func: str) -> _Plan:
    """Read A into column blocks, check it once (NaN/Inf, negatives, rank), choose scale and streaming."""
    from .io import as_blocked
    from .io.validate import check_data, check_rank

    blocked = as_blocked(A, block_nnz=opts["block_nnz"] or default_block_nnz(A))
    executor = get_executor(opts["client"])
    try:
        # NaN marks a missing entry (RcppML §5.1 [recommend]); ±Inf is an error.
        summary = check_data(blocked, func=func, executor=executor, allow_nan=True)
        m, n = blocked.shape
        if not summary.max > 0:
            raise param_error("A", func, "a matrix with at least one positive entry",
                              f"an all-zero {m} × {n} matrix", described=True)
        k = check_rank(opts["k"], (m, n), func)
    except BaseException:  # the in-process thread pool is ours to close; a cluster is left as it was
        if not executor.distributed:
            executor.close()
        raise
    # Out-of-range magnitudes (overflow of ‖A‖², or values swamped by the 1e-15 guards) are fit
    # as s·A with s a power of two; s·L1 keeps the problem the same, and d is divided by s.
    max_abs = max(abs(summary.max), abs(summary.min))
    scale = data_scale(max_abs)
    # dtype="float32" multiplies with a float32 W (fused pass); float64 input is then stored in
    # float32 too, scaled into [0.5, 1) first (exact) when its magnitudes exceed float32's range.
    float32 = opts["dtype"] == "float32" or (opts["dtype"] is None and np.dtype(blocked.dtype) == np.float32)
    to32 = np.float32 if float32 and np.dtype(blocked.dtype) != np.float32 else None
    if to32 is not None and scale == 1.0 and max_abs > 2.0 ** 100:
        scale = math.ldexp(1.0, -math.frexp(max_abs)[1])
    if scale != 1.0:
        logger.info("%s: max|A| = %.3g is outside [%.3g, %.3g]; fitting %.17g·A (exact) and rescaling d", func,
                    summary.max, *SAFE_MAX_RANGE, scale)
    if opts["out_of_core"] is None:
        stream = (not blocked.in_memory) and _block_bytes(blocked) > _available_memory(executor)
    else:
        stream = bool(opts["out_of_core"]) and not blocked.in_memory
    return _Plan(blocked=blocked, fit_blocked=_scaled(blocked, scale, to32), summary=summary, k=k,
                 solver=_resolve_solver(opts["solver"], k, opts["L1"], _is_irls(opts)), scale=scale, executor=executor,
                 stream=stream, float32=float32)


def _initialize(plan: _Plan, opts: dict, seq: np.random.SeedSequence, func: str) -> tuple[np.ndarray, str]:
    """The initial W (m × k) and the name of the initialization ("user" for a matrix).

    "random" draws uniform [0, 1) entries; the SVD inits take ``|U|·√σ`` of a randomized
    truncated SVD computed on the blocks (RcppML's convention).
    """
    m, k = plan.blocked.shape[0], plan.k
    init_seq, svd_seq = seq.spawn(2)
    init = opts["init"]
    if init is None or isinstance(init, str):
        name = init or "random"
        if name == "random":
            if opts["r_rng"]:
                return _r_rng_w(m, k, int(opts["seed"])), "random (R stream)"
            return np.random.default_rng(init_seq).uniform(size=(m, k)), name
        if plan.summary.n_nan:
            raise param_error("init", func, '"random" or a matrix when A has NaN (missing) entries', name)
        u, sigma = truncated_svd(plan.fit_blocked, k, plan.executor, seed=svd_seq)
        return np.abs(u) * np.sqrt(sigma)[None, :], name
    return _check_init(init, m, k, opts["nonneg"][0], func), "user"


def _targets(plan: _Plan, opts: dict, func: str) -> FitTargets | None:
    """The fit's targets, checked against k and A (scaled with A: they are compared with the
    unnormalized factors), or None."""
    lam_w, lam_h = opts["target_lambda"]
    m, n = plan.blocked.shape
    k = plan.k
    out = {}
    for side, key, lam, shape in (("h", "target_H", lam_h, (k, n)), ("w", "target_W", lam_w, (m, k))):
        target = opts[key]
        if target is None:
            if lam != 0.0:
                raise param_error("target_lambda", func, f"0 on the {side.upper()} side unless {key} is given",
                                  opts["target_lambda"])
            continue
        try:
            t = np.asarray(target.toarray() if hasattr(target, "toarray") else target, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise param_error(key, func, f"a numeric matrix of shape {shape}", type(target).__name__) from e
        if t.shape != shape:
            raise param_error(key, func, f"a matrix of shape {shape[0]} × {shape[1]} ({'k × n' if side == 'h' else 'm × k'})",
                              f"shape {t.shape[0]} × {t.shape[1]}", described=True)
        if not np.all(np.isfinite(t)):
            raise param_error(key, func, "a finite matrix", "a matrix with NaN or Inf", described=True)
        out[side] = t * plan.scale
    if not out:
        return None
    return FitTargets.build(h=out.get("h"), lam_h=lam_h, w=out.get("w"), lam_w=lam_w)


def _als_options(plan: _Plan, opts: dict) -> ALSOptions:
    """The engine's constants; L1 is scaled with A (see :func:`data_scale`)."""
    L1 = opts["L1"]
    return ALSOptions(k=plan.k, tol=opts["tol"], maxit=opts["maxit"], L1=(L1[0] * plan.scale, L1[1] * plan.scale),
                      L2=opts["L2"], nonneg=opts["nonneg"], norm=opts["norm"], solver=SOLVERS[plan.solver],
                      cd_maxit=opts["cd_maxit"], cd_tol=opts["cd_tol"], patience=opts["patience"],
                      checkpoint_every=opts["checkpoint_every"], projective=bool(opts["projective"]),
                      symmetric=bool(opts["symmetric"]), penalties=fit_penalties(opts, plan.blocked.shape, plan.scale),
                      float32=plan.float32)


def _check_kl(plan: _Plan, opts: dict, targets, func: str) -> None:
    """loss="kl" fits by multiplicative updates (masks, NaN, test sets and L2 included): refuse what it lacks."""
    if any(opts["L1"]):  # KL + λ·Σh with Σ_i w_ir = 1 is KL against μ·(1 + λ): the optimum only rescaled
        raise param_error("L1", func, '(0.0, 0.0) with loss="kl" (with W\'s unit-L1 columns an L1 penalty only '
                          "rescales the Poisson fit, which the normalization moves back: it cannot sparsify; use L2)",
                          opts["L1"])
    refused = [("target_lambda", targets is not None, (0.0, 0.0)),
               ("projective", opts["projective"], False), ("symmetric", opts["symmetric"], False),
               ("nonneg", not all(opts["nonneg"]), (True, True)), ("norm", opts["norm"] != "L1", "L1"),
               ("checkpoint", opts["checkpoint"] is not None, None)]
    for name, bad, expected in refused:
        if bad:
            raise param_error(name, func, f'{expected!r} with loss="kl" (the KL fit has no targets, projective or '
                              "symmetric variants, signed factors, other norms or checkpoints)", opts.get(name))


#: the losses fitted by IRLS (engine/irls.py); "mse" with ``robust`` too
IRLS_LOSSES = ("gp", "nb", "gamma", "inverse_gaussian", "tweedie")


def _is_irls(opts: dict) -> bool:
    return opts["loss"] in IRLS_LOSSES or (opts["loss"] == "mse" and opts.get("robust", False) is not False)


def _check_irls(plan: _Plan, opts: dict, targets, func: str) -> IRLSOptions:
    """The IRLS fit's options; refuses what the IRLS loop does not do, naming the parameter."""
    from ._losses import robust_delta

    loss = opts["loss"]
    why = f"with loss={loss!r}" + (" and robust" if loss == "mse" else "")
    if opts["zi"] != "none":
        if loss not in ("gp", "nb"):
            raise param_error("zi", func, f'"none" with loss={loss!r} (zero-inflation needs loss="gp" or "nb")',
                              opts["zi"])
        if opts["robust"] is not False:
            raise param_error("robust", func, "False with zero-inflation (zi)", opts["robust"])
        if plan.masked is not None and plan.masked.zeros_missing:
            raise param_error("zi", func, '"none" with mask="zeros" (every zero is missing: nothing to inflate)',
                              opts["zi"])
    refused = [("target_lambda", targets is not None, (0.0, 0.0)),
               ("projective", opts["projective"], False), ("symmetric", opts["symmetric"], False),
               ("checkpoint", opts["checkpoint"] is not None and plan.masked is not None, None),
               ("solver", plan.solver == "cholesky", '"auto", "cd" or "exact"')]
    for name, bad, expected in refused:
        if bad:
            raise param_error(name, func, f"{expected} {why} (the IRLS fit has no targets, projective or symmetric "
                              "variants, Cholesky-clip solves, or checkpoints with missing entries)",
                              opts.get(name))
    if opts["zi"] != "none" and opts.get("angular", (0.0, 0.0))[0] > 0:
        raise param_error("angular", func, "0 on the W side with zero-inflation (zi) (the angular map of W is "
                          "rescored without a solve, which the zeros' imputed values cannot follow)", opts["angular"])
    if plan.scale != 1.0:
        raise param_error("A", func, f"values within {SAFE_MAX_RANGE} {why} (a distribution loss is not scale "
                          "invariant, so A cannot be rescaled for the fit)", f"max |A| = {plan.summary.max:.3g}",
                          described=True)
    delta = robust_delta(opts["robust"], func) or 0.0
    if loss == "gp":
        init, low, high = opts["theta_init"], opts["theta_min"], opts["theta_max"]
        names = ("theta_init", "theta_min", "theta_max")
    elif loss == "nb":
        init, low, high = opts["nb_size_init"], opts["nb_size_min"], opts["nb_size_max"]
        names = ("nb_size_init", "nb_size_min", "nb_size_max")
    else:
        init, low, high = opts["gamma_phi_init"], opts["gamma_phi_min"], opts["gamma_phi_max"]
        names = ("gamma_phi_init", "gamma_phi_min", "gamma_phi_max")
    if low > high:
        raise param_error(names[1], func, f"at most {names[2]} = {high}", low)
    return IRLSOptions(loss=loss, robust=float(delta), dispersion="none" if loss == "mse" else opts["dispersion"],
                       init=float(init),
                       low=float(low), high=float(high), tweedie_power=float(opts["tweedie_power"]),
                       irls_max_iter=int(opts["irls_max_iter"]), irls_tol=float(opts["irls_tol"]),
                       zi=opts["zi"], zi_em_iters=int(opts["zi_em_iters"]))


def _check_variant(plan: _Plan, opts: dict, func: str) -> None:
    """Projective and symmetric NMF: no H target (H is not solved); symmetric NMF needs a square
    A symmetric on its observed entries — ``a_ij = a_ji`` wherever both are observed (not NaN,
    not in the mask, stored for ``mask="zeros"``); checked on its blocks, assembled (a
    graph-sized matrix). Masks, NaN and test sets run the masked loop (docs/architecture.md,
    "Variants")."""
    for name in ("projective", "symmetric"):
        if not opts[name]:
            continue
        if opts["target_H"] is not None:
            raise param_error(name, func, "False with target_H (H is not solved)", True)
    if opts["symmetric"]:
        m, n = plan.blocked.shape
        if m != n:
            raise param_error("symmetric", func, "False for a non-square A (symmetric NMF needs A square and "
                              "symmetric)", f"True with A of shape {m} × {n}", described=True)
        import scipy.sparse as sp

        a = sp.csr_matrix(plan.blocked.to_scipy(), dtype=np.float64)
        mo, missing = plan.masked, None
        if mo is not None:  # compare only the pairs observed on both sides of the diagonal
            nan = np.isnan(a.data)
            missing = sp.csr_matrix((nan.astype(np.float64), a.indices.copy(), a.indptr.copy()), shape=a.shape)
            if mo.mask is not None:
                missing = missing + sp.csr_matrix(mo.mask, dtype=np.float64)
            a.data[nan] = 0.0
        diff = abs(a - a.T).tocsr()
        if missing is not None:
            if mo.zeros_missing:  # an unstored entry is missing too: pairs stored on both sides
                stored = sp.csr_matrix((np.ones(a.nnz), a.indices, a.indptr), shape=a.shape)
                diff = diff.multiply(stored.multiply(stored.T)).tocsr()
            diff = (diff - diff.multiply((missing + missing.T) > 0)).tocsr()
        worst = float(diff.max()) if diff.nnz else 0.0
        scale = float(np.abs(a.data).max()) if a.nnz else 0.0
        if worst > 1e-10 * max(float(scale), 1e-300):
            raise param_error("symmetric", func, "False for a non-symmetric A (symmetric NMF needs a_ij = a_ji "
                              "wherever both are observed)",
                              f"True with max|A − Aᵀ| = {worst:.3g}", described=True)


def _fit(plan: _Plan, opts: dict, w0: np.ndarray, init_name: str, seed_int: int | None, func: str):
    """Run the ALS loop (resuming from the checkpoint when asked): ``(ALSState, H blocks)``.

    A fit with missing or held-out entries runs the masked loop (:mod:`dnmf.engine.masked`).
    """
    als = _als_options(plan, opts)
    blocked = plan.blocked
    _check_variant(plan, opts, func)
    targets = _targets(plan, opts, func)
    check_penalty_use(opts, func)  # the §8 penalties: not with loss="kl" (and need H solved)
    if opts["loss"] == "kl" and opts["robust"] is not False:
        raise param_error("robust", func, 'False with loss="kl" (for a robust Poisson fit use loss="gp", '
                          'dispersion="none")', opts["robust"])
    if opts["zi"] != "none" and opts["loss"] not in ("gp", "nb"):
        raise param_error("zi", func, f'"none" with loss={opts["loss"]!r} (zero-inflation needs loss="gp" or "nb")',
                          opts["zi"])
    if _is_irls(opts):
        ro = _check_irls(plan, opts, targets, func)
        callback = opts["on_iteration"]
        if opts["verbose"]:
            callback = _progress_callback(callback, 1.0, func)
        checkpointer = state = None
        if opts["checkpoint"] is not None:
            fp = fingerprint(blocked.shape, blocked.col_bounds,
                             {**als.__dict__, **{f"irls_{key}": val for key, val in ro.__dict__.items()},
                              "init": init_name, "seed": seed_int, "w0": float(np.sum(w0))})
            checkpointer = IRLSCheckpointer(Checkpointer(os.fspath(opts["checkpoint"]), fp, blocked.n_blocks))
            if opts["resume"]:
                state = checkpointer.load()
                if state is not None:
                    logger.info("resuming from iteration %d (%s)", state.iteration, opts["checkpoint"])
        with _one_blas_thread(plan.executor):
            return fit_irls(plan.fit_blocked, w0, als, ro, plan.masked or MaskOptions(), plan.executor,
                            on_iteration=callback, checkpointer=checkpointer, state=state)
    if opts["loss"] == "kl":
        _check_kl(plan, opts, targets, func)
        callback = opts["on_iteration"]
        if opts["verbose"] or plan.scale != 1.0:
            callback = _progress_callback(callback, 1.0 / plan.scale, func)
        # the fit of s·A: W (unit columns) and its denominators Σh carry s, H's denominators do not
        L1, L2, s = opts["L1"], opts["L2"], plan.scale
        als = replace(als, L1=(L1[0] * s, L1[1]), L2=(L2[0] * s, L2[1] / s))
        with _one_blas_thread(plan.executor):
            return fit_kl(plan.fit_blocked, w0, als, plan.executor, mo=plan.masked, on_iteration=callback)
    if plan.masked is not None:
        if opts["checkpoint"] is not None:
            raise param_error("checkpoint", func, "None for a fit with a mask, NaN entries or a test set (such fits "
                              "are not checkpointed per iteration; the cv pipeline checkpoints each finished fit)",
                              opts["checkpoint"])
        callback = opts["on_iteration"]
        if opts["verbose"] or plan.scale != 1.0:
            callback = _progress_callback(callback, 1.0 / plan.scale / plan.scale, func)
        with _one_blas_thread(plan.executor):
            return fit_masked(plan.fit_blocked, w0, als, plan.masked, plan.executor, on_iteration=callback,
                              targets=targets)
    checkpointer = state = None
    if opts["checkpoint"] is not None:
        fp = fingerprint(blocked.shape, blocked.col_bounds,
                         {**als.__dict__, "init": init_name, "seed": seed_int, "w0": float(np.sum(w0)),
                          "targets": None if targets is None else [float(np.sum(t)) if t is not None else None
                                                                   for t in (targets.h, targets.w)]
                          + [targets.lam_h, targets.lam_w]})
        checkpointer = Checkpointer(os.fspath(opts["checkpoint"]), fp, blocked.n_blocks)
        if opts["resume"]:
            state = checkpointer.load()
            if state is not None:
                logger.info("resuming from iteration %d (%s)", state.iteration, opts["checkpoint"])

    callback = opts["on_iteration"]
    if opts["verbose"] or plan.scale != 1.0:
        callback = _progress_callback(callback, 1.0 / plan.scale / plan.scale, func)
    executor = plan.executor
    with _one_blas_thread(executor):
        return fit_als(plan.fit_blocked, w0, als, executor,
                       sq_norm_a=plan.summary.sq_norm if plan.scale == 1.0 else None,
                       on_iteration=callback, checkpointer=checkpointer, state=state, stream=plan.stream,
                       targets=targets)


def _one_blas_thread(executor):
    """BLAS pinned to one thread in this process around a fit loop (DESIGN §3), unless the loop
    runs alone on a one-thread executor.

    In-process, the block tasks already run in parallel threads, so BLAS threads (dense blocks)
    would oversubscribe the cores. With a Dask client, this process only does the small client
    steps (the W update on m × k statistics), and an idle OpenBLAS thread busy-waits after each
    call: on a LocalCluster it took a third of a core from the workers' kernels (issue 12,
    docs/architecture.md "Cluster overhead"). Workers are pinned by their nannies
    (OMP/OPENBLAS/MKL_NUM_THREADS=1). The client's steps then use one BLAS thread on every
    path, in-process or distributed, as the bitwise comparisons of the cluster tests assume.
    """
    if executor.distributed or getattr(executor, "n_threads", 1) > 1:
        return threadpool_limits(limits=1, user_api="blas")
    return contextlib.nullcontext()


def _build_model(plan: _Plan, opts: dict, state, ht_blocks, *, init_name: str, seq: np.random.SeedSequence,
                 seed_int: int | None, t_start: float, func: str) -> NMFModel:
    """Check the factors, undo the scaling, sort, warn when not converged, and record the fit."""
    h = np.concatenate(ht_blocks, axis=0).T * state.h_scale[:, None]  # normalized Ĥ, k × n
    w, d = state.w, state.d
    kl = opts.get("loss") == "kl"
    _check_factors(w, d, h, iteration=state.iteration, L1=opts["L1"], nonneg=opts["nonneg"], norm=opts["norm"],
                   angular=opts.get("angular", (0.0, 0.0)),
                   solver=plan.solver, k=plan.k, func=func)
    d = d / plan.scale
    if opts["sort_model"]:
        order = np.argsort(-d, kind="stable")
        w, d, h = w[:, order], d[order], h[order]
    if not state.converged and not state.stopped_by_callback:
        warnings.warn(
            f"{func} stopped at maxit={opts['maxit']} before the relative loss change stayed below "
            f"tol={opts['tol']} for {opts['patience']} iterations. Increase maxit (currently {opts['maxit']}) or tol.",
            ConvergenceWarning,
            stacklevel=4,  # _build_model ← _nmf ← nmf ← the caller
        )
    # squared error scales with s², the KL divergence with s
    loss_history = np.asarray(state.loss_history) * (1.0 / plan.scale if kl else 1.0 / plan.scale / plan.scale)
    blocked = plan.blocked
    mo = plan.masked
    cv = {}
    if mo is not None:
        what = [name for name, on in (("zeros", mo.zeros_missing), ("matrix", mo.mask is not None),
                                      ("NaN", plan.summary.n_nan > 0)) if on]
        cv = dict(mask="+".join(what) or "none", test_fraction=mo.test_fraction,
                  cv_seed=mo.cv_seed if mo.cv_on else None, n_test=state.n_test)
        if mo.cv_on:
            test_scale = 1.0 / plan.scale if kl else 1.0 / plan.scale / plan.scale  # KL scales with s, SSE with s²
            test_history = np.asarray(state.test_history) * test_scale
            cv.update(test_loss=float(np.nanmin(test_history)) if test_history.size else float("nan"),
                      train_loss=float(loss_history[-1]) if loss_history.size else float("nan"),
                      best_iter=int(state.best_iter), test_loss_history=test_history)
    record = NMFFitRecord(
        iter=state.iteration,
        runtime=time.perf_counter() - t_start,
        loss=float(loss_history[-1]) if loss_history.size else float("nan"),
        loss_history=loss_history,
        tol_history=np.asarray(state.tol_history),
        tol=state.tol_history[-1] if state.tol_history else 0.0,
        converged=bool(state.converged),
        stopped_by_callback=bool(state.stopped_by_callback),
        seed=seed_int,
        seed_entropy=seq.entropy,
        init=init_name,
        solver=plan.solver,
        norm=opts["norm"],
        L1=opts["L1"],
        L2=opts["L2"],
        nonneg=opts["nonneg"],
        scale=plan.scale,
        n_blocks=blocked.n_blocks,
        out_of_core=plan.stream,
        executor="distributed" if plan.executor.distributed else "threads",
        row_names=blocked.row_names,
        col_names=blocked.col_names,
        loss_type=opts.get("loss", "mse"),
        **{name: tuple(opts.get(name, (0.0, 0.0))) for name in ("L21", "angular", "upper_bound", "graph_lambda")},
        **_irls_record(opts, state),
        **cv,
    )
    logger.info("%s: %s after %d iteration(s), loss %.6e, %.2f s", func,
                "converged" if state.converged else ("stopped by on_iteration" if state.stopped_by_callback
                                                     else "reached maxit"),
                record.iter, record.loss, record.runtime)
    out_dtype = np.float32 if np.dtype(blocked.dtype) == np.float32 else np.float64  # the input's
    return NMFModel(w=w.astype(out_dtype), d=d.astype(out_dtype), h=h.astype(out_dtype), misc=FitRecordView(record))


def _irls_record(opts: dict, state) -> dict:
    """The record's dispersion fields of an IRLS fit (empty for the other loops)."""
    if not hasattr(state, "dispersion_history"):
        return {}
    zi = getattr(state, "zi_pi", None) is not None
    covers = "all" if ((opts["loss"] == "gp" and opts["robust"] is False) or zi) else "nonzero"
    if opts["loss"] == "mse":
        return {"loss_covers": covers}
    disp = state.dispersion
    out = {"dispersion": float(disp) if np.ndim(disp) == 0 else np.asarray(disp),
           "dispersion_history": np.asarray(state.dispersion_history, dtype=np.float64), "loss_covers": covers}
    if zi:
        out.update(zi_pi=np.asarray(state.zi_pi, dtype=np.float64),
                   zi_pi_history=np.asarray(state.zi_pi_history, dtype=np.float64))
    return out


def _nmf(A, values: dict, func: str) -> NMFModel:
    """The body of :func:`nmf`: its named steps, in order."""
    t_start = time.perf_counter()
    opts = _validate(values, func)
    seq, seed_int = _seed_sequence(opts["seed"])
    plan = _plan_blocks(A, opts, func)
    try:
        plan = replace(plan, masked=_mask_options(opts, plan.blocked, plan.summary, seed_int, func))
        w0, init_name = _initialize(plan, opts, seq, func)
        state, ht_blocks = _fit(plan, opts, w0, init_name, seed_int, func)
    finally:  # the in-process thread pool is ours to close; a cluster is left as it was
        plan.executor.release_buffers()  # pooled task outputs and read buffers, here or on the workers
        if not plan.executor.distributed:
            plan.executor.close()
    return _build_model(plan, opts, state, ht_blocks, init_name=init_name, seq=seq, seed_int=seed_int,
                        t_start=t_start, func=func)
