"""Consensus over random NMF restarts for choosing k: RcppML's consensus_nmf or cNMF's programs.

Every restart of every rank is a parallel task (an in-process :func:`dnmf.nmf` on a worker)
checkpointed as it finishes, so ``dnmf run CONFIG --resume`` skips the restarts an interrupted
run finished. Restart i of every rank uses seed ``consensus.seed + i`` (RcppML), fixed before
submission, so the results do not depend on the cluster, on the order in which tasks finish or
on an interruption, and equal :func:`dnmf.consensus_nmf` / :func:`dnmf.cnmf_k_selection` called
with the same arguments. The consensus of each rank is then formed on the client
(:meth:`dnmf.ConsensusNMFResult.from_models`, :meth:`dnmf.CNMFResult.from_models`).

Config sections::

    input:     the factorize pipeline's input section (dataset, path, layer, normalize, ...)
    consensus: {k: [2, 3, 4, 5, 6], reps: 50, method: hard, knn: 10, axis: features,
                seed: 1, criterion: auto}
    cnmf:      {density_threshold: 0.5, local_neighborhood_size: 0.3, kmeans_seed: 1}
    model:     the arguments of dnmf.nmf except k and seed, the same for every restart

``consensus.method``: ``hard`` or ``knn_jaccard`` (co-clustering of the objects of
``consensus.axis`` across restarts, spec §9) or ``cnmf`` (the programs of all restarts pooled,
outliers dropped by local density, median programs, usages refit; ``cnmf:`` applies).
``consensus.criterion`` chooses k from the statistics table: ``auto`` is the highest
cophenetic correlation (hard, knn_jaccard) or stability (cnmf); ``dispersion`` (highest),
``pac`` (lowest) and ``error`` (lowest, cnmf) are the others.

Outputs: ``tables/statistics`` (one row per k: k, cophenetic, dispersion, PAC — or k,
stability, error for cnmf), ``selection`` (chosen k, criterion, method), ``tables/restarts``
(one row per restart: k, restart, seed, final loss, iterations, converged, and the attempt of
the run that computed it), ``k<k>/`` per rank (consensus matrix, clusters, leaf order, linkage
and the statistics; or programs, usage, stability, error, the restart programs with their local
density, kept flags and k-means labels), ``tables/clusters`` (each object's cluster at the
chosen k; for cnmf each sample's dominant program) and beside the store
``<run>-statistics.png`` (the statistics against k with the chosen k marked; for cnmf
stability and error against k) and ``<run>-consensus.png`` (the ordered consensus heatmap at the
chosen k; for cnmf ``<run>-density.png``, the local-density histogram of the restart programs).
The consensus matrices are dense N × N (N objects of ``consensus.axis``); the restarts' factors
live in the checkpoint only while the run is incomplete.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np

import dnmf
import dnmf.params
from pipelines.factorize import FactorizeInput, check_ranks, load_input

#: criteria a method accepts; the first is what ``auto`` means
CRITERIA = {"hard": ("cophenetic", "dispersion", "pac"), "knn_jaccard": ("cophenetic", "dispersion", "pac"),
            "cnmf": ("stability", "error")}
#: nmf arguments the consensus sets itself (the rank from consensus.k, the seed per restart)
_SET_BY_CONSENSUS = ("k", "seed")


def _meta(doc: str, **kw) -> dict:
    return {"doc": doc, **kw}


@dataclass(frozen=True)
class ConsensusSettings:
    """``consensus:``: the ranks, the restarts and how the consensus is formed and k chosen."""

    k: tuple[int, ...] = field(default=(2, 3, 4, 5, 6), metadata=_meta(
        "ranks to compare (distinct)", min=1, nonempty=True))
    reps: int = field(default=50, metadata=_meta("restarts per rank, one parallel task each", min=1))
    method: Literal["hard", "knn_jaccard", "cnmf"] = field(default="hard", metadata=_meta(
        "hard or knn_jaccard: consensus_nmf's co-clustering (spec §9); cnmf: cNMF's consensus programs"))
    knn: int = field(default=10, metadata=_meta("neighbours per object (knn_jaccard)", min=1))
    axis: Literal["features", "samples"] = field(default="features", metadata=_meta(
        "objects clustered (hard, knn_jaccard): features (rows of A, through W; RcppML) or samples "
        "(columns, through H)"))
    seed: int = field(default=1, metadata=_meta("restart i of every rank uses seed + i (RcppML)", min=0))
    criterion: Literal["auto", "cophenetic", "dispersion", "pac", "stability", "error"] = field(
        default="auto", metadata=_meta("statistic that chooses k (auto: cophenetic, or stability for cnmf)"))

    def validate(self) -> Iterator[tuple[str, str, Any]]:
        if len(set(self.k)) != len(self.k):
            yield ("k", "a list of distinct ranks", list(self.k))
        if self.method == "cnmf" and self.reps < 2:
            yield ("reps", "an int in [2, inf) for method cnmf", self.reps)
        allowed = CRITERIA[self.method]
        if self.criterion != "auto" and self.criterion not in allowed:
            yield ("criterion", f"one of 'auto', {', '.join(repr(c) for c in allowed)} for method {self.method!r}",
                   self.criterion)

    @property
    def chosen_criterion(self) -> str:
        return CRITERIA[self.method][0] if self.criterion == "auto" else self.criterion


@dataclass(frozen=True)
class CNMFSettings:
    """``cnmf:``: cNMF's outlier filter and clustering (used when consensus.method is cnmf)."""

    density_threshold: float = field(default=0.5, metadata=_meta(
        "drop restart programs whose local density is not below it (2 keeps all)", min=0.0))
    local_neighborhood_size: float = field(default=0.30, metadata=_meta(
        "neighbours for the local density, as a fraction of reps", min=0.0, min_open=True))
    kmeans_seed: int = field(default=1, metadata=_meta("random_state of the k-means (cNMF fixes 1)", min=0))


#: ``model:``: :func:`dnmf.nmf`'s YAML parameters (declared once in :data:`dnmf.params.NMF_PARAMS`)
#: except ``k`` and ``seed``, which the consensus sets per rank and per restart.
ConsensusModel = dnmf.params.config_section(
    [p for p in dnmf.params.NMF_PARAMS if p.name not in _SET_BY_CONSENSUS], "ConsensusModel", module=__name__,
    doc="``model:`` of the consensus pipeline: the arguments of :func:`dnmf.nmf` (except k and seed) "
        "for every restart.")


SECTIONS = {"input": FactorizeInput, "consensus": ConsensusSettings, "cnmf": CNMFSettings,
            "model": ConsensusModel}


def check_config(config) -> Iterator[tuple[str, str, Any]]:
    """Checks across sections: every rank at most min(m, n); cNMF's neighbourhood not empty."""
    c = config.consensus
    errors = list(check_ranks(config.input, "consensus.k", c.k))
    yield from errors
    if any(e[0] == "input.path" for e in errors):
        return
    if c.method == "cnmf":
        n_nb = int(config.cnmf.local_neighborhood_size * c.reps)
        if n_nb < 1 or n_nb >= c.reps * min(c.k):
            yield ("cnmf.local_neighborhood_size", f"a fraction with 1 ≤ int(local_neighborhood_size · reps) < "
                   f"reps · min(k) = {c.reps * min(c.k)} (reps = {c.reps})", config.cnmf.local_neighborhood_size)


# ---------------------------------------------------------------------------------------------
# One task per restart
# ---------------------------------------------------------------------------------------------


def restart_task(item, *, nmf_kwargs: dict, attempt: int) -> dict:
    """One restart ``(k, seed, A)`` fitted in-process on a worker, as a store payload.

    ``attempt`` (the run's attempt number) is recorded, so a resumed run shows which restarts
    it took from the checkpoint.
    """
    k, seed, A = item
    model = dnmf.nmf(A, k, seed=seed, client=False, **nmf_kwargs)
    misc = model.misc
    return {"w": model.w, "d": model.d, "h": model.h, "loss": float(misc["loss"]), "iter": int(misc["iter"]),
            "converged": bool(misc["converged"]), "attempt": int(attempt)}


def _model(p: dict, A) -> Any:
    """The restart's NMFModel from its payload (with the input's names, as nmf gives them)."""
    return dnmf.NMFModel(w=p["w"], d=p["d"], h=p["h"], misc={
        "loss": p["loss"], "row_names": getattr(A, "row_names", None), "col_names": getattr(A, "col_names", None)})


def _names(A, axis: str, n: int) -> list[str]:
    """Names of the clustered objects (the input's row or column names), else positions."""
    names = getattr(A, "row_names" if axis == "features" else "col_names", None)
    return [str(v) for v in names] if names is not None and len(names) == n else [str(i) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

_CONSENSUS_ARRAYS = ("consensus", "clusters", "cophenetic", "dispersion", "pac", "linkage", "order")
_CNMF_ARRAYS = ("programs", "usage", "stability", "error", "n_neighbors", "replicate_programs", "local_density",
                "kept", "labels")


def run(config, job) -> None:
    """Restarts as checkpointed tasks → statistics per k, chosen k, consensus or programs, plots."""
    import pandas as pd

    s, cn = config.consensus, config.cnmf
    if job.client is False:
        raise dnmf.InputError("The consensus pipeline runs its restarts as parallel tasks on a Dask cluster; "
                              "run it with a client or the config's cluster (not client=False).")
    nmf_kwargs = dnmf.params.config_kwargs([p for p in dnmf.params.NMF_PARAMS if p.name not in _SET_BY_CONSENSUS],
                                           config.model)
    A = load_input(config.input, job, config.model.block_nnz).data
    job.add_seeds(consensus=s.seed, **({"kmeans": cn.kmeans_seed} if s.method == "cnmf" else {}))
    attempt = int(job.store.meta.get("attempts", 1))
    ks, seeds = list(s.k), [s.seed + i for i in range(1, s.reps + 1)]  # restart i: seed + i, every rank
    shared = job.client.scatter(A, broadcast=True)  # sent once, not with every task
    items = [(q, seed, shared) for q in ks for seed in seeds]
    keys = [f"k{q}-r{i}" for q in ks for i in range(1, s.reps + 1)]
    fn = functools.partial(restart_task, nmf_kwargs=nmf_kwargs, attempt=attempt)
    payloads = job.run_tasks(fn, items, keys, desc=f"consensus restarts ({s.method})",
                             to_payload=lambda p: p, from_payload=lambda p: p)
    job.write_table("restarts", pd.DataFrame({
        "k": [q for q, _, _ in items], "restart": [i for _ in ks for i in range(1, s.reps + 1)],
        "seed": [seed for _, seed, _ in items], "loss": [p["loss"] for p in payloads],
        "iter": [p["iter"] for p in payloads], "converged": [bool(p["converged"]) for p in payloads],
        "attempt": [p["attempt"] for p in payloads]}))
    n_stopped = sum(not p["converged"] for p in payloads)
    if n_stopped:
        job.echo(f"warning: {n_stopped} of {len(payloads)} restarts stopped at model.maxit={config.model.maxit} "
                 "before converging; increase model.maxit or model.tol")

    results = {}
    for j, q in enumerate(ks):
        models = [_model(p, A) for p in payloads[j * s.reps:(j + 1) * s.reps]]
        if s.method == "cnmf":
            results[q] = dnmf.CNMFResult.from_models(
                A, models, density_threshold=cn.density_threshold,
                local_neighborhood_size=cn.local_neighborhood_size, kmeans_seed=cn.kmeans_seed, seeds=tuple(seeds))
        else:
            results[q] = dnmf.ConsensusNMFResult.from_models(models, method=s.method, knn=s.knn, axis=s.axis,
                                                             seeds=tuple(seeds))
    sweep = (dnmf.CNMFSelection if s.method == "cnmf" else dnmf.ConsensusNMFSweep)(ks=tuple(ks), results=results)
    criterion = s.chosen_criterion
    best = sweep.best_k(criterion)
    table = sweep.table
    job.write_table("statistics", table)
    job.write("selection", {"k": best, "criterion": criterion, "method": s.method, "axis": s.axis, "reps": s.reps})
    for q in ks:
        names = _CNMF_ARRAYS if s.method == "cnmf" else _CONSENSUS_ARRAYS
        job.write(f"k{q}", {name: getattr(results[q], name) for name in names})
    chosen = results[best]
    if s.method == "cnmf":
        usage = chosen.usage
        clusters = pd.DataFrame({"sample": _names(A, "samples", usage.shape[1]),
                                 "program": np.argmax(usage, axis=0).astype(np.int64)})
    else:
        clusters = pd.DataFrame({"object": _names(A, s.axis, chosen.clusters.size), "cluster": chosen.clusters})
    job.write_table("clusters", clusters)
    job.echo(f"consensus ({s.method}):\n{table.to_string(index=False)}\nchosen k = {best} (by {criterion})")
    fig = sweep.plot()
    fig.axes[0].axvline(best, color="grey", ls="--", lw=1)  # the chosen k
    job.save_figure(fig, "statistics")
    job.save_figure(chosen.plot(), "density" if s.method == "cnmf" else "consensus")
