"""Rank selection by speckled cross-validation (RcppML §5.5): a grid of ranks × cv seeds.

Every (replicate, rank) fit is a parallel task — an in-process :func:`dnmf.nmf` with a test
set on a worker — checkpointed as it finishes, so ``dnmf run CONFIG --resume`` skips the fits
an interrupted run finished. Replicate r holds out the entries of RcppML's hash with
``cv.cv_seed[r]`` (the same for every rank) and starts each rank from the engine's SplitMix64
W seeded ``cv_seed + k``, as RcppML; the table equals ``dnmf.nmf(A, k=cv.k,
cv_seed=cv.cv_seed, ...)`` and does not depend on the cluster or on an interruption.

Config sections::

    input: the factorize pipeline's input section (dataset, path, layer, normalize, ...)
    cv:    {k: [2, 3, ..., 12], cv_seed: [1, 2, 3], test_fraction: 0.1, mask_zeros: false,
            refit: true}
    model: the arguments of dnmf.nmf except k, seed, init and r_rng (tol, maxit, patience,
           L1, L2, ...), the same for every fit

``cv.refit`` fits the chosen rank on all data (no held-out set) on the job's cluster.

Outputs: ``tables/cv`` (rep, k, cv_seed, train_mse, test_mse, best_iter, total_iter and the
run attempt that computed the fit; with ``model.loss`` other than mse the loss columns are
``train_<loss>`` / ``test_<loss>``, mean losses in the fitted distribution), ``tables/mean`` (mean train and test MSE per k),
``selection`` (best_k: the rank of lowest mean test MSE, test_fraction), ``histories/``
(train and test MSE per iteration of every fit, as ``train_r<rep>_k<k>`` / ``test_r<rep>_k<k>``)
and, with ``refit``, ``model/`` (w, d, h, loss_history of the chosen rank); beside the store
``<run>-cv.png`` (test and train MSE against k, each replicate and their mean, best k marked)
and ``<run>-iterations.png`` (per-iteration test MSE of every rank of replicate 1).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

import dnmf
import dnmf.cv
import dnmf.params
from pipelines.factorize import FactorizeInput, check_ranks, load_input

#: nmf arguments the grid sets itself (the rank, the per-fit seed and start)
_SET_BY_CV = ("k", "seed", "init", "r_rng")


def _meta(doc: str, **kw) -> dict:
    return {"doc": doc, **kw}


@dataclass(frozen=True)
class CVSettings:
    """``cv:``: the grid and its held-out set."""

    k: tuple[int, ...] = field(default=tuple(range(2, 13)), metadata=_meta(
        "ranks to compare (distinct)", min=1, nonempty=True))
    cv_seed: tuple[int, ...] = field(default=(1, 2, 3), metadata=_meta(
        "one replicate per seed: its held-out entries, and the start seed cv_seed + k", min=0, nonempty=True))
    test_fraction: float = field(default=0.1, metadata=_meta(
        "fraction of entries held out (RcppML's hash; realised 1/floor(1/f))", min=0.0, min_open=True, max=1.0,
        max_open=True))
    mask_zeros: bool = field(default=False, metadata=_meta("zeros are missing: fit and hold out stored entries only"))
    refit: bool = field(default=True, metadata=_meta("fit the chosen rank on all data and write it as model/"))

    def validate(self) -> Iterator[tuple[str, str, Any]]:
        if len(set(self.k)) != len(self.k):
            yield ("k", "a list of distinct ranks", list(self.k))
        if len(set(self.cv_seed)) != len(self.cv_seed):
            yield ("cv_seed", "a list of distinct seeds", list(self.cv_seed))


#: ``model:``: :func:`dnmf.nmf`'s YAML parameters (declared once in :data:`dnmf.params.NMF_PARAMS`)
#: except those the grid sets per fit.
CVModel = dnmf.params.config_section(
    [p for p in dnmf.params.NMF_PARAMS if p.name not in _SET_BY_CV], "CVModel", module=__name__,
    doc="``model:`` of the cv pipeline: the arguments of :func:`dnmf.nmf` (except k, seed, init and r_rng) "
        "for every fit of the grid.")

SECTIONS = {"input": FactorizeInput, "cv": CVSettings, "model": CVModel}


def check_config(config) -> Iterator[tuple[str, str, Any]]:
    """Checks across sections: every rank at most min(m, n)."""
    yield from check_ranks(config.input, "cv.k", config.cv.k)


def fit_task(item, *, nmf_kwargs: dict, attempt: int) -> dict:
    """One fit ``(CVTask, A)`` of the grid, in-process on a worker, as a store payload."""
    task, A = item
    row = dnmf.cv.fit_task(task, A, nmf_kwargs, dnmf.nmf)
    return {**row, "attempt": int(attempt)}


def _from_payload(p) -> dict:
    out = dict(p)
    for key in ("rep", "k", "cv_seed", "best_iter", "total_iter", "attempt"):
        out[key] = int(np.asarray(out[key]))
    for key in out:
        if key.startswith(("train_", "test_")) and not key.endswith("_history"):  # train_mse, test_nb, …
            out[key] = float(np.asarray(out[key]))
    return out


def run(config, job) -> None:
    """The grid as checkpointed tasks → the CV table, the chosen k, plots and the refit model."""
    c = config.cv
    nmf_kwargs = dnmf.params.config_kwargs([p for p in dnmf.params.NMF_PARAMS if p.name not in _SET_BY_CV],
                                           config.model)
    nmf_kwargs.update(test_fraction=c.test_fraction, mask_zeros=c.mask_zeros)
    A = load_input(config.input, job, config.model.block_nnz).data
    job.add_seeds(cv=list(c.cv_seed))
    attempt = int(job.store.meta.get("attempts", 1))
    tasks = dnmf.cv.cv_tasks(c.k, c.cv_seed)
    shared = job.client.scatter(A, broadcast=True)  # sent once, not with every task
    fn = functools.partial(fit_task, nmf_kwargs=nmf_kwargs, attempt=attempt)
    payloads = job.run_tasks(fn, [(t, shared) for t in tasks], [f"r{t.rep}-k{t.k}" for t in tasks],
                             desc="cross-validation fits", to_payload=lambda p: p, from_payload=_from_payload)
    attempts = [p.pop("attempt") for p in payloads]
    result = dnmf.cv.CVResult.from_rows(payloads, c.test_fraction)
    table = result.table.assign(attempt=attempts)
    job.write_table("cv", table)
    mean = table.groupby("k", sort=True)[[result.train_column, result.test_column]].mean().reset_index()
    job.write_table("mean", mean)
    best = result.best_k
    job.write("selection", {"best_k": best, "test_fraction": c.test_fraction, "mask_zeros": c.mask_zeros})
    job.write("histories", {f"{side}_r{rep}_k{k}": hist[i] for (rep, k), hist in result.histories.items()
                            for i, side in enumerate(("train", "test"))})
    job.echo(f"cross-validation (test_fraction {c.test_fraction}):\n{mean.to_string(index=False)}\n"
             f"best k = {best} (lowest mean {result.test_column} over {len(c.cv_seed)} replicate(s))")
    job.save_figure(result.plot(), "cv")
    job.save_figure(_iterations_plot(result), "iterations")
    if c.refit:
        fit_kwargs = {key: v for key, v in nmf_kwargs.items() if key not in ("test_fraction",)}
        model = dnmf.nmf(A, best, seed=c.cv_seed[0] + best, client=job.client, **fit_kwargs)
        job.write("model", {"w": model.w, "d": model.d, "h": model.h,
                            "loss_history": np.asarray(model.misc["loss_history"]), "k": best})
        job.echo(f"refit at k = {best}: loss {model.misc['loss']:.6g} after {model.misc['iter']} iterations")


def _iterations_plot(result):
    """Per-iteration test MSE of every rank of the first replicate."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), constrained_layout=True)
    rep = int(result.table["rep"].min())
    for (r, k), (_, test) in sorted(result.histories.items()):
        if r == rep:
            ax.plot(np.arange(1, len(test) + 1), test, lw=1, label=f"k = {k}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("test MSE" if result.loss == "mse" else f"test {result.loss} loss")
    ax.set_title(f"replicate {rep}")
    ax.legend(fontsize="x-small", ncol=2)
    return fig
