"""Cross-validation for ``nmfkc``: element-wise (Wold) ECV and column-wise K-fold (spec §9).

Folds are drawn once, before any fit; every (rank, fold) fit is then an independent task on
the executor (:func:`dnmf.engine.executor.get_executor`), so results do not depend on the
number of workers. ``r_rng=True`` draws the folds from the emulated R stream
(:mod:`dnmf.rrng`) after ``set.seed(seed)`` and reproduces R's ``nmfkc.ecv`` / ``nmfkc.cv``
partitions exactly.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .._validation import check_int, check_option, param_error
from ..exceptions import ConvergenceWarning
from ._common import EPS, as_covariate_matrix, as_data_matrix, executor_for
from .nmfkc import _MU_TERMS, _OBJECTIVE, nmfkc

__all__ = ["ECVResult", "CVResult", "nmfkc_ecv", "nmfkc_cv", "element_folds", "column_blocks"]


@dataclass(frozen=True)
class ECVResult:
    """Element-wise cross-validation of ``nmfkc`` over ranks.

    Attributes
    ----------
    rank : tuple of int
        Ranks evaluated (length R).
    objfunc : ndarray of shape (R,)
        Mean over folds of the held-out loss (MSE for EU, mean KL term for KL).
    sigma : ndarray of shape (R,)
        ``sqrt(objfunc)`` (NaN for KL).
    objfunc_fold : ndarray of shape (R, nfolds)
        Held-out loss of each fold.
    folds : tuple of ndarray
        0-based column-major linear indices (``Y.reshape(-1, order="F")``) held out in each
        fold; shared by all ranks. (R's 1-based indices are these + 1.)
    nfolds : int
    best : int
        The rank with the smallest ``objfunc``.
    """

    rank: tuple
    objfunc: np.ndarray
    sigma: np.ndarray
    objfunc_fold: np.ndarray
    folds: tuple
    nfolds: int
    best: int


@dataclass(frozen=True)
class CVResult:
    """Column-wise K-fold cross-validation of one ``nmfkc`` rank.

    Attributes
    ----------
    objfunc : float
        Σ over folds of the held-out loss divided by the number of held-out cells.
    sigma : float
        ``sqrt(objfunc)`` (NaN for KL).
    objfunc_block : ndarray of shape (nfolds,)
        Held-out loss of each fold.
    block : ndarray of int of shape (N,)
        Fold of each column, 1..nfolds as in R.
    """

    objfunc: float
    sigma: float
    objfunc_block: np.ndarray
    block: np.ndarray


def _split_sizes(n: int, k: int) -> list[int]:
    base, rem = divmod(n, k)
    return [base + (1 if i < rem else 0) for i in range(k)]


def element_folds(valid_idx: np.ndarray, nfolds: int, seed: Optional[int], r_rng: bool) -> tuple:
    """Permute the valid linear indices and cut them into ``nfolds`` consecutive chunks.

    With ``r_rng`` the permutation is R's ``set.seed(seed); sample(valid_idx)``.
    """
    if r_rng:
        from ..rrng import RRandom

        perm = RRandom(123 if seed is None else seed).sample(valid_idx)
    else:
        perm = np.random.default_rng(seed).permutation(valid_idx)
    out, start = [], 0
    for s in _split_sizes(perm.shape[0], nfolds):
        out.append(perm[start:start + s].copy())
        start += s
    return tuple(out)


def column_blocks(N: int, nfolds: int, seed: Optional[int], shuffle: bool, r_rng: bool) -> np.ndarray:
    """Fold (1..nfolds) of each column, filled in permutation order, first N mod k larger."""
    if shuffle:
        if r_rng:
            from ..rrng import RRandom

            perm = RRandom(123 if seed is None else seed).sample_int(N)
        else:
            perm = np.random.default_rng(seed).permutation(N)
    else:
        perm = np.arange(N)
    block = np.zeros(N, dtype=np.int64)
    start = 0
    for i, s in enumerate(_split_sizes(N, nfolds)):
        block[perm[start:start + s]] = i + 1
        start += s
    return block


def _heldout_loss(y: np.ndarray, pred: np.ndarray, method: str) -> float:
    return float(np.mean(_OBJECTIVE[method](y, pred)))


def _ecv_task(item, Y, A, nan_mask, method, kwargs):
    """Fit one (rank, fold) with the fold's cells weighted 0; return the held-out loss."""
    q, test = item
    P, N = Y.shape
    W = np.ones((P, N))
    W[nan_mask] = 0.0
    Wf = W.reshape(-1, order="F")
    Wf[test] = 0.0
    W = Wf.reshape((P, N), order="F")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = nmfkc(np.where(nan_mask, np.nan, Y), A, rank=q, Y_weights=W, method=method, detail="fast", **kwargs)
    pred = fit.XB.reshape(-1, order="F")[test]
    y = Y.reshape(-1, order="F")[test]
    return _heldout_loss(y, pred, method)


def _check_common(rank, nfolds, seed, func):
    ranks = (rank,) if isinstance(rank, numbers.Integral) and not isinstance(rank, bool) else tuple(rank)
    if not ranks:
        raise param_error("rank", func, "an int or a non-empty sequence of ints >= 1", rank)
    for q in ranks:
        if isinstance(q, bool) or not isinstance(q, numbers.Integral) or q < 1:
            raise param_error("rank", func, "an int or a sequence of ints >= 1", rank)
    nfolds = check_int(nfolds, "nfolds", func, low=2)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise param_error("seed", func, "an int or None", seed)
    return tuple(int(q) for q in ranks), nfolds


def nmfkc_ecv(
    Y,
    A=None,
    rank: int | Sequence[int] = (1, 2, 3),
    *,
    nfolds: int = 5,
    seed: Optional[int] = 123,
    method: str = "EU",
    r_rng: bool = False,
    client=None,
    **nmfkc_kwargs,
) -> ECVResult:
    """Element-wise (Wold) cross-validation of ``nmfkc`` for rank selection (R ``nmfkc.ecv``).

    Parameters
    ----------
    Y : array-like of shape (P, N)
        Non-negative data (NaN = missing, never held out).
    A : array-like of shape (K, N) or None
        Covariates passed to every fit.
    rank : int or sequence of int, default (1, 2, 3)
        Ranks to evaluate on the same folds.
    nfolds : int, default 5
        Folds of the observed cells.
    seed : int or None, default 123
        Seed of the fold permutation; also passed to each ``nmfkc`` fit (as R forwards it).
    method : {"EU", "KL"}
        Loss of the fits and of the held-out score.
    r_rng : bool, default False
        Draw the permutation with R's generator (R parity); also forwarded to the fits.
    client : distributed.Client, False or None
        Where the rank × fold fits run.
    **nmfkc_kwargs
        Other :func:`dnmf.nmfkc` arguments (``epsilon``, ``maxit``, ``X_init``, …).

    Returns
    -------
    ECVResult

    Notes
    -----
    The observed cells (column-major order) are permuted and cut into ``nfolds`` consecutive
    chunks, the first ``n mod nfolds`` one cell larger. For each rank and fold, ``nmfkc`` is
    refitted on the full Y with the fold's cells weighted 0 (and filled with their row mean
    for the initialisation); the score is the mean squared error on those cells.

    Examples
    --------
    >>> from dnmf.datasets.orthodont import load_orthodont
    >>> from dnmf import nmfkc_ecv
    >>> Y, A, _ = load_orthodont()
    >>> round(float(nmfkc_ecv(Y, A, rank=1, r_rng=True, client=False).sigma[0]), 6)
    2.345796
    """
    func = "nmfkc_ecv"
    ranks, nfolds = _check_common(rank, nfolds, seed, func)
    method = check_option(method, "method", func, ("EU", "KL"))
    for bad in ("Y_weights", "rank", "detail"):
        if bad in nmfkc_kwargs:
            raise param_error(bad, func, "not given (the folds set the weights)", nmfkc_kwargs[bad])
    Yv, _, _ = as_data_matrix(Y, func)
    N = Yv.shape[1]
    if A is not None:
        A, _ = as_covariate_matrix(A, N, func)
    nan_mask = np.isnan(Yv)
    Y0 = np.where(nan_mask, 0.0, Yv)
    valid = np.flatnonzero(~nan_mask.reshape(-1, order="F"))
    if valid.shape[0] < nfolds:
        raise param_error("nfolds", func, f"at most the number of observed cells ({valid.shape[0]})", nfolds)
    folds = element_folds(valid, nfolds, seed, r_rng)
    kwargs = dict(nmfkc_kwargs)
    kwargs.setdefault("seed", seed)
    kwargs.setdefault("r_rng", r_rng)
    items = [(q, folds[k]) for q in ranks for k in range(nfolds)]
    with executor_for(client) as ex:
        losses = ex.map(_ecv_task, items, args=(Y0, A, nan_mask, method, kwargs))
    fold = np.array(losses, dtype=float).reshape(len(ranks), nfolds)
    obj = fold.mean(axis=1)
    sigma = np.sqrt(obj) if method == "EU" else np.full(len(ranks), np.nan)
    return ECVResult(
        rank=ranks,
        objfunc=obj,
        sigma=sigma,
        objfunc_fold=fold,
        folds=folds,
        nfolds=nfolds,
        best=int(ranks[int(np.argmin(obj))]),
    )


def _refit_B(X, Y_test, W_test, method, epsilon, maxit, B_L1=0.0):
    """MU for B with X fixed, C starting at 1; stop on the relative change of ΣC after 10 steps."""
    C = np.ones((X.shape[1], Y_test.shape[1]))
    mu_terms = _MU_TERMS[method]
    l1_den = B_L1 if method == "KL" else B_L1 / 2.0
    old = 0.0
    for it in range(1, maxit + 1):
        XB = X @ C
        num_m, den_m = mu_terms(Y_test, XB, W_test)
        num = X.T @ num_m
        den = X.T @ den_m
        if B_L1:
            den = den + l1_den
        C = C * (num / (den + EPS))
        new = float(C.sum())
        if it >= 10 and abs(new - old) / max(abs(new), 1.0) <= abs(epsilon):
            break
        old = new
    return X @ C


def _cv_task(j, Y, W, A, block, rank, method, A_kernel, kwargs):
    train, test = block != j, block == j
    Y_tr, W_tr, Y_te, W_te = Y[:, train], W[:, train], Y[:, test], W[:, test]
    if A is None:
        A_tr = A_te = None
    elif A_kernel:
        A_tr, A_te = A[np.ix_(train, train)], A[np.ix_(train, test)]
    else:
        A_tr, A_te = A[:, train], A[:, test]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = nmfkc(Y_tr, A_tr, rank=rank, Y_weights=W_tr, method=method, detail="minimal", **kwargs)
    if A is None:
        XB = _refit_B(fit.X, Y_te, W_te, method, fit.epsilon, fit.maxit, kwargs.get("C_L1", 0.0))
    else:
        XB = fit.X @ fit.C @ A_te
    if method == "EU":
        r = W_te * (Y_te - XB)
        loss = float(np.sum(r * r))
    else:
        loss = float(np.sum(_OBJECTIVE["KL"](Y_te, XB, W_te)))
    return loss, int((W_te > 0).sum())


def nmfkc_cv(
    Y,
    A=None,
    rank: int = 2,
    *,
    nfolds: int = 5,
    seed: Optional[int] = 123,
    shuffle: bool = True,
    method: str = "EU",
    A_kernel: bool = False,
    Y_weights=None,
    r_rng: bool = False,
    client=None,
    **nmfkc_kwargs,
) -> CVResult:
    """Column-wise K-fold cross-validation of ``nmfkc`` (R ``nmfkc.cv``).

    Parameters
    ----------
    Y : array-like of shape (P, N)
    A : array-like of shape (K, N), (N, N) kernel, or None
        With A, held-out columns are predicted as X·C·A_test; without A (identity), B of the
        held-out columns is refitted by MU with X fixed.
    rank : int, default 2
    nfolds : int, default 5
    seed : int or None, default 123
        Seed of the column permutation (R's ``set.seed(seed); sample(1:N)`` with ``r_rng``).
    shuffle : bool, default True
        False splits the columns in order (block CV for time series).
    method : {"EU", "KL"}
    A_kernel : bool, default False
        A is a symmetric N × N kernel: train on A[train, train], predict with A[train, test].
    Y_weights : array-like, optional
        Cell weights (as in :func:`dnmf.nmfkc`).
    r_rng : bool, default False
    client : distributed.Client, False or None
        Where the fold fits run.
    **nmfkc_kwargs
        Other :func:`dnmf.nmfkc` arguments.

    Returns
    -------
    CVResult

    Examples
    --------
    >>> from dnmf.datasets.orthodont import load_orthodont
    >>> from dnmf.covariates import nmfkc_cv
    >>> Y, A, _ = load_orthodont()
    >>> round(nmfkc_cv(Y, A, rank=1, r_rng=True, client=False).sigma, 6)
    2.472406
    """
    func = "nmfkc_cv"
    (rank,), nfolds = _check_common(rank, nfolds, seed, func)
    method = check_option(method, "method", func, ("EU", "KL"))
    Yv, _, _ = as_data_matrix(Y, func)
    N = Yv.shape[1]
    if nfolds > N:
        raise param_error("nfolds", func, f"at most the number of columns ({N})", nfolds)
    if A is not None:
        if A_kernel:
            A = np.asarray(A, dtype=float)
            if A.shape != (N, N) or not np.allclose(A, A.T):
                raise param_error("A", func, f"a symmetric ({N}, {N}) kernel when A_kernel=True", f"shape {A.shape}")
        else:
            A, _ = as_covariate_matrix(A, N, func)
            if A.shape[0] == N and np.array_equal(A, np.eye(N)):
                A = None
    if Y_weights is None:
        W = np.where(np.isnan(Yv), 0.0, 1.0)
    else:
        from .nmfkc import _weights

        _, W = _weights(Yv.copy(), Y_weights, func)
    Y0 = np.where(np.isnan(Yv), 0.0, Yv) * (W > 0)
    block = column_blocks(N, nfolds, seed, shuffle, r_rng)
    for bad in ("rank", "detail"):
        if bad in nmfkc_kwargs:
            raise param_error(bad, func, "not given in nmfkc_kwargs (set by nmfkc_cv)", nmfkc_kwargs[bad])
    kwargs = dict(nmfkc_kwargs)
    kwargs.setdefault("r_rng", r_rng)
    with executor_for(client) as ex:
        out = ex.map(_cv_task, list(range(1, nfolds + 1)), args=(Y0, W, A, block, rank, method, A_kernel, kwargs))
    per = np.array([o[0] for o in out])
    n_valid = sum(o[1] for o in out)
    obj = float(per.sum() / max(n_valid, 1))
    return CVResult(
        objfunc=obj,
        sigma=float(np.sqrt(obj)) if method == "EU" else float("nan"),
        objfunc_block=per,
        block=block,
    )
