"""Rank selection by speckled cross-validation (RcppML §5.5): ``nmf(A, k=[...], cv_seed=[...])``.

Every (replicate, rank) pair is one cross-validation fit (:func:`dnmf.nmf` with
``test_fraction``): the replicate's ``cv_seed`` fixes the held-out entries (the same for every
rank of the replicate), and the initial W is the engine's SplitMix64 uniform seeded with
``cv_seed + k`` (§5.5, §12.3), so the grid starts where RcppML's does. The fits are independent
tasks: on a Dask cluster with a matrix held in memory each fit runs whole on a worker (the matrix
is sent once); otherwise they run one after another, each on the blocked engine. A fit's result
does not depend on where it ran, so the table is the same on any number of workers.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ._validation import param_error
from .exceptions import InputError

__all__ = ["CVResult", "cross_validate", "splitmix64_uniform", "engine_init", "cv_tasks", "CVTask", "fit_task",
           "TABLE_COLUMNS"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64_uniform(seed: int, count: int) -> np.ndarray:
    """The first ``count`` uniforms of RcppML's SplitMix64 stream (§12.3), as float64.

    State ``s`` (0 → 12345); ``next()``: ``s += γ``, then the SplitMix64 mix; the uniform is
    ``float32(next()) / float32(2⁶⁴ − 1)`` computed in float32 (values in [0, 1]).
    """
    s = int(seed) % (1 << 64)
    s = np.uint64(12345 if s == 0 else s)
    t = np.arange(1, int(count) + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = s + t * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return (z.astype(np.float32) / np.float32(18446744073709551615.0)).astype(np.float64)


def engine_init(m: int, k: int, seed: int) -> np.ndarray:
    """RcppML's engine-level random W (m × k): ``Wt`` (k × m) filled column-major from
    :func:`splitmix64_uniform`, i.e. the k values of feature i are draws ``i·k … i·k + k − 1``."""
    return splitmix64_uniform(seed, m * k).reshape(m, k)


@dataclass(frozen=True)
class CVTask:
    """One fit of the grid: replicate ``rep`` (1-based) with hold-out seed ``cv_seed`` at rank ``k``."""

    rep: int
    k: int
    cv_seed: int

    @property
    def init_seed(self) -> int:
        """``cv_seed + k``: the SplitMix64 seed of the initial W (§5.5)."""
        return self.cv_seed + self.k


def cv_tasks(ks: Sequence[int], cv_seeds: Sequence[int]) -> list[CVTask]:
    """The grid in RcppML's order: replicates outer, ranks inner."""
    return [CVTask(rep, int(k), int(s)) for rep, s in enumerate(cv_seeds, start=1) for k in ks]


#: Columns of :attr:`CVResult.table` for squared error; another loss names its two loss columns
#: after itself (``train_nb``, ``test_nb``, see :func:`table_columns`).
TABLE_COLUMNS = ("rep", "k", "cv_seed", "train_mse", "test_mse", "best_iter", "total_iter")


def table_columns(loss: str = "mse") -> tuple[str, ...]:
    """The columns of a CV table of fits of ``loss``: its losses are ``train_<loss>``, ``test_<loss>``."""
    return ("rep", "k", "cv_seed", f"train_{loss}", f"test_{loss}", "best_iter", "total_iter")


def _row_loss(row: Mapping) -> str:
    """The loss a table row is in (from its ``test_<loss>`` key)."""
    keys = [key for key in row if key.startswith("test_") and key != "test_history"]
    return keys[0][len("test_"):] if keys else "mse"


def fit_task(task: CVTask, A, kwargs: Mapping, fit, client=False) -> dict:
    """Run one cross-validation fit with ``fit`` (:func:`dnmf.nmf`; whole and in-process by
    default) and return its row and histories."""
    model = fit(A, task.k, init=engine_init(A.shape[0], task.k, task.init_seed), seed=task.init_seed,
                cv_seed=task.cv_seed, client=client, **kwargs)
    return task_row(task, model)


def task_row(task: CVTask, model) -> dict:
    """The table row and histories of a grid fit."""
    misc = model.misc
    loss = misc.get("loss_type", "mse")
    return {
        "rep": task.rep, "k": task.k, "cv_seed": task.cv_seed,
        f"train_{loss}": float(misc["train_loss"]), f"test_{loss}": float(misc["test_loss"]),
        "best_iter": int(misc["best_iter"]), "total_iter": int(misc["iter"]),
        "train_history": np.asarray(misc["loss_history"]), "test_history": np.asarray(misc["test_loss_history"]),
    }


def _check_ks(k, shape, func: str) -> tuple[int, ...]:
    ks = list(k)
    if not ks or any(not isinstance(v, numbers.Integral) or isinstance(v, bool) for v in ks):
        raise param_error("k", func, "a non-empty list of int ranks", k)
    high = min(shape)
    bad = [int(v) for v in ks if not 1 <= v <= high]
    if bad:
        raise param_error("k", func, f"ranks in [1, min(m, n)] = [1, {high}] for a {shape[0]} × {shape[1]} matrix",
                          bad)
    if len(set(ks)) != len(ks):
        raise param_error("k", func, "distinct ranks", ks)
    return tuple(int(v) for v in ks)


@dataclass(frozen=True)
class CVResult:
    """The cross-validation table of a rank grid.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per fit: ``rep``, ``k``, ``cv_seed``, ``train_mse`` (last train MSE),
        ``test_mse`` (best test MSE), ``best_iter`` (1-based iteration of the best test loss;
        RcppML reports it 0-based + 2), ``total_iter``. Fits of another loss report their mean
        loss in that distribution as ``train_<loss>`` / ``test_<loss>`` (``test_nb``, ``test_kl``).
    histories : dict
        ``{(rep, k): (train loss per iteration, test loss per iteration)}``.
    test_fraction : float
        The held-out fraction asked for.
    loss : str
        The loss of the fits ("mse", "kl", "nb", …).
    """

    table: Any
    histories: Mapping = field(repr=False)
    test_fraction: float
    loss: str = "mse"
    _A: Any = field(repr=False, compare=False, default=None)
    _fit_kwargs: Mapping = field(repr=False, compare=False, default_factory=dict)
    _fit: Any = field(repr=False, compare=False, default=None)

    @property
    def train_column(self) -> str:
        """The table's train-loss column (``train_mse`` for squared error)."""
        return f"train_{self.loss}"

    @property
    def test_column(self) -> str:
        """The table's test-loss column (``test_mse`` for squared error)."""
        return f"test_{self.loss}"

    @property
    def mean_test(self):
        """Mean test loss over replicates, per rank (a pandas Series indexed by k)."""
        return self.table.groupby("k", sort=True)[self.test_column].mean()

    @property
    def best_k(self) -> int:
        """The rank with the lowest mean test loss over replicates (the smaller rank on a tie)."""
        mean = self.mean_test
        return int(mean.index[int(np.argmin(mean.to_numpy()))])

    def fit_best(self, **overrides):
        """Fit the model at :attr:`best_k` on all data (no held-out set) with the grid's options."""
        if self._A is None or self._fit is None:
            raise InputError("CVResult.fit_best needs the data; this result was built without it")
        kwargs = {key: v for key, v in self._fit_kwargs.items() if key not in ("test_fraction", "cv_seed")}
        kwargs.update(overrides)
        return self._fit(self._A, self.best_k, **kwargs)

    def plot(self, ax=None):
        """Test and train loss against k: each replicate thin, their mean thick, ``best_k`` marked.

        Returns the matplotlib Figure (two panels, or the figure of ``ax`` — a pair of axes).
        """
        if ax is None:
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
        else:
            axes = ax
            fig = axes[0].figure
        name = "MSE" if self.loss == "mse" else f"{self.loss} loss"
        for a, col, title in zip(axes, (self.test_column, self.train_column), (f"test {name}", f"train {name}")):
            for rep, part in self.table.groupby("rep", sort=True):
                part = part.sort_values("k")
                a.plot(part["k"], part[col], color="0.7", lw=0.8, marker=".", label=f"rep {rep}")
            mean = self.table.groupby("k", sort=True)[col].mean()
            a.plot(mean.index, mean.to_numpy(), color="C0", lw=2, marker="o", label="mean")
            a.axvline(self.best_k, color="C3", ls="--", lw=1, label=f"best k = {self.best_k}")
            a.set_xlabel("k")
            a.set_title(title)
        axes[0].legend(fontsize="small")
        return fig

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping], test_fraction: float, *, A=None, fit_kwargs: Mapping | None = None,
                  fit=None) -> "CVResult":
        """Assemble the result from the fits' rows (:func:`fit_task` outputs, in grid order)."""
        import pandas as pd

        rows = [dict(r) for r in rows]
        histories = {(r["rep"], r["k"]): (np.asarray(r.pop("train_history")), np.asarray(r.pop("test_history")))
                     for r in rows}
        loss = _row_loss(rows[0]) if rows else "mse"
        table = pd.DataFrame(rows, columns=list(table_columns(loss)))
        return cls(table=table, histories=histories, test_fraction=float(test_fraction), loss=loss, _A=A,
                   _fit_kwargs=dict(fit_kwargs or {}), _fit=fit)

    def __repr__(self) -> str:
        return f"CVResult(best_k={self.best_k}, fits={len(self.table)}, test_fraction={self.test_fraction})\n{self.table}"


def cross_validate(blocked, k: Sequence[int], fit, *, cv_seed=None, test_fraction: float = 0.0, seed=None,
                   client=None, func: str = "nmf", fit_shared=None, **kwargs) -> CVResult:
    """Rank cross-validation over ``k`` × ``cv_seed``: what ``nmf(A, k=[...])`` runs.

    Parameters
    ----------
    blocked : BlockedMatrix (m × n)
        The data, as :func:`dnmf.io.as_blocked` gives it.
    k : sequence of int
        Ranks to test.
    fit : callable
        :func:`dnmf.nmf` (passed in: this module sits above ``dnmf.core``).
    fit_shared : callable, optional
        ``fit_shared(blocked, tasks, kwargs, client) -> models``: the fits of one replicate
        sharing each pass over A (``dnmf.core._fit_shared``); used when the fits are not run as
        whole tasks. Without it the fits run one after another.
    cv_seed : int, sequence of int or None
        One replicate per seed (the held-out set and the initial W's seed ``cv_seed + k``).
        None: one replicate with ``seed`` (0 when ``seed`` is None).
    test_fraction : float
        Held-out fraction; 0 (the default) means 0.1, as RcppML.
    client : distributed.Client, False or None
        Where the fits run (see the module docstring).
    **kwargs
        Other :func:`dnmf.nmf` options (tol, maxit, L1, L2, mask, mask_zeros, patience, …);
        ``init`` and ``on_iteration`` are not allowed (each fit has its own start).

    Returns
    -------
    CVResult
    """
    from .engine.executor import get_executor

    for bad in ("init", "on_iteration", "checkpoint", "resume"):
        if kwargs.get(bad) not in (None, False):
            raise param_error(bad, func, "not given in rank cross-validation (each fit has its own start)",
                              kwargs[bad])
        kwargs.pop(bad, None)
    if seed is not None and not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0):
        raise param_error("seed", func, "None or a non-negative int", seed)
    if cv_seed is None:
        cv_seeds = (int(seed or 0),)
    elif isinstance(cv_seed, numbers.Integral) and not isinstance(cv_seed, bool):
        cv_seeds = (int(cv_seed),)
    else:
        cv_seeds = tuple(cv_seed)
        if not cv_seeds or any(not isinstance(s, numbers.Integral) or isinstance(s, bool) or s < 0 for s in cv_seeds):
            raise param_error("cv_seed", func, "None, a non-negative int or a non-empty list of them", cv_seed)
    tf = float(test_fraction) if test_fraction else 0.1
    ks = _check_ks(k, blocked.shape, func)
    kwargs = dict(kwargs, test_fraction=tf)
    tasks = cv_tasks(ks, cv_seeds)
    if kwargs.get("loss", "mse") != "mse" or any(kwargs.get(t) is not None for t in ("target_H", "target_W")):
        # the shared passes are the squared-error masked loop without targets; these fit one by one
        fit_shared = None
    executor = get_executor(client)
    try:
        if executor.distributed and blocked.in_memory:
            from .engine.kernel_cache import compile_for_workers, quiet_kwargs

            compile_for_workers(executor.client, lambda small: fit_task(tasks[0], small, quiet_kwargs(kwargs), fit),
                                blocked, tasks[0].k)
            rows = executor.map(fit_task, tasks, args=(blocked, kwargs, fit))
        elif fit_shared is not None:  # per replicate, its ranks sharing each pass over A

            def replicate(s: int) -> list:
                rep = [t for t in tasks if t.cv_seed == s]
                if s == 0:  # RcppML: cv_seed 0 is "not given", each rank holds out by its own seed k
                    return [fit_task(t, blocked, kwargs, fit, client) for t in rep]
                return [task_row(t, mdl) for t, mdl in zip(rep, fit_shared(blocked, rep, kwargs, client))]

            n_threads = 1 if executor.distributed else min(len(cv_seeds), getattr(executor, "n_threads", 1))
            if n_threads > 1:  # in-process: replicates on the thread pool (the kernels release the GIL)
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(n_threads) as pool:
                    parts = list(pool.map(replicate, cv_seeds))
            else:
                parts = [replicate(s) for s in cv_seeds]
            rows = [row for part in parts for row in part]
        else:
            rows = [fit_task(t, blocked, kwargs, fit, client) for t in tasks]
    finally:
        if not executor.distributed:
            executor.close()
    return CVResult.from_rows(rows, tf, A=blocked, fit_kwargs={**kwargs, "seed": seed, "client": client}, fit=fit)


def auto_rank(blocked, fit, args: dict, *, func: str = "nmf"):
    """``nmf(A, k="auto")`` (RcppML §5.6): search the rank by cross-validation, then fit it on all data.

    Each candidate r is a CV fit (``test_fraction``, 0.1 when 0) on the held-out set of
    ``cv_seed`` (``seed`` when None), started from the SplitMix64 W seeded ``seed + r`` (12345 when
    that is 0), scored by its *final* train and test loss; :func:`dnmf.rank_search.rank_search`
    picks the ranks (in [2, min(50, m, n)]). The returned model is fit at ``k_optimal`` with the
    caller's seed and init; ``misc["rank_search"]`` holds ``k_optimal``, ``k_low``, ``k_high``,
    ``overfitting_detected`` and ``table`` (every fit, in evaluation order).
    """
    from dataclasses import replace

    from .rank_search import rank_search

    args = dict(args)
    args.pop("k")
    for bad in ("checkpoint", "resume"):
        if args.get(bad) not in (None, False):
            raise param_error(bad, func, 'not given with k="auto"', args[bad])
    seed = args.get("seed")
    if seed is not None and not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        raise param_error("seed", func, 'None or an int with k="auto"', seed)
    cv_seed = args.pop("cv_seed")
    if cv_seed is not None and not (isinstance(cv_seed, numbers.Integral) and not isinstance(cv_seed, bool)):
        raise param_error("cv_seed", func, 'None or an int with k="auto"', cv_seed)
    tf = float(args.pop("test_fraction") or 0.1)
    seed_int = int(seed or 0)
    cvs = int(cv_seed) if cv_seed else seed_int
    m, n = blocked.shape
    search_kw = {key: v for key, v in args.items() if key not in ("seed", "init", "r_rng", "on_iteration")}

    def evaluate(r: int) -> tuple[float, float]:
        model = fit(blocked, r, init=engine_init(m, r, seed_int + r), seed=seed_int + r, cv_seed=cvs,
                    test_fraction=tf, **search_kw)
        return float(model.misc["loss_history"][-1]), float(model.misc["test_loss_history"][-1])

    result = rank_search(evaluate, k_min=2, k_max=max(2, min(50, m, n)))
    model = fit(blocked, result.k_optimal, **args)
    record = replace(model.misc.record, rank_search={**result.as_misc(), "table": result.table})
    return type(model)(w=model.w, d=model.d, h=model.h, misc=type(model.misc)(record))
