"""Consensus over random NMF restarts for choosing k: RcppML's consensus_nmf or cNMF's programs.

One parallel task per rank runs all ``reps`` restarts of that rank (:func:`dnmf.consensus_nmf`
or :func:`dnmf.cnmf_consensus` in-process on a worker) and is checkpointed as it finishes, so
``dnmf run CONFIG --resume`` skips the ranks an interrupted run finished. Every restart's seed
is fixed by ``consensus.seed`` (restart i uses seed + i, the same for every rank), so the results
do not depend on the cluster, on the order in which tasks finish or on an interruption.

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
stability, error for cnmf), ``selection`` (chosen k, criterion, method, and in ``attempts``
the attempt that computed each rank), ``k<k>/`` per rank (consensus matrix, clusters, leaf
order, linkage and each restart's final loss; or programs, usage, the restart programs with
their local density, kept flags and k-means labels), ``tables/clusters`` (each object's cluster
at the chosen k; for cnmf each sample's dominant program) and beside the store
``<run>-statistics.png`` (the statistics against k with the chosen k marked; for cnmf
stability and error against k) and ``<run>-consensus.png`` (the ordered consensus heatmap at the
chosen k; for cnmf ``<run>-density.png``, the local-density histogram of the restart programs).
The consensus matrices are dense N × N (N objects of ``consensus.axis``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np

import dnmf
import dnmf.params
from pipelines.factorize import FactorizeInput, input_shape, load_input

METHODS = ("hard", "knn_jaccard", "cnmf")
#: criteria a method accepts; the first is what ``auto`` means
CRITERIA = {"hard": ("cophenetic", "dispersion", "pac"), "knn_jaccard": ("cophenetic", "dispersion", "pac"),
            "cnmf": ("stability", "error")}
#: nmf arguments the consensus sets itself (the rank per task, the seed per restart)
_SET_BY_CONSENSUS = ("k", "seed")


def _meta(doc: str, **kw) -> dict:
    return {"doc": doc, **kw}


@dataclass(frozen=True)
class ConsensusSettings:
    """``consensus:``: the ranks, the restarts and how the consensus is formed and k chosen."""

    k: tuple[int, ...] = field(default=(2, 3, 4, 5, 6), metadata=_meta(
        "ranks to compare (distinct), one parallel task each", min=1, nonempty=True))
    reps: int = field(default=50, metadata=_meta("restarts per rank", min=1))
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
#: except ``k`` and ``seed``, which the consensus sets per task and per restart.
ConsensusModel = dnmf.params.config_section(
    [p for p in dnmf.params.NMF_PARAMS if p.name not in _SET_BY_CONSENSUS], "ConsensusModel", module=__name__,
    doc="``model:`` of the consensus pipeline: the arguments of :func:`dnmf.nmf` (except k and seed) "
        "for every restart.")


SECTIONS = {"input": FactorizeInput, "consensus": ConsensusSettings, "cnmf": CNMFSettings,
            "model": ConsensusModel}


def check_config(config) -> Iterator[tuple[str, str, Any]]:
    """Checks across sections: every rank at most min(m, n); cNMF's neighbourhood not empty."""
    c = config.consensus
    try:
        shape = input_shape(config.input)
    except (OSError, ValueError, KeyError) as e:
        yield ("input.path", "a readable matrix file or store", config.input.path, f"({type(e).__name__})")
        return
    if shape is not None and config.input.n_top_features is not None:
        shape = (min(shape[0], config.input.n_top_features), shape[1])
    if shape is not None and max(c.k) > min(shape):
        m, n = shape
        yield ("consensus.k", f"ranks in [1, {min(shape)}] (at most min(m, n) of the {m} × {n} input)", list(c.k))
    if c.method == "cnmf":
        n_nb = int(config.cnmf.local_neighborhood_size * c.reps)
        if n_nb < 1 or n_nb >= c.reps * min(c.k):
            yield ("cnmf.local_neighborhood_size", f"a fraction with 1 ≤ int(local_neighborhood_size · reps) < "
                   f"reps · min(k) = {c.reps * min(c.k)} (reps = {c.reps})", config.cnmf.local_neighborhood_size)


# ---------------------------------------------------------------------------------------------
# One task per rank
# ---------------------------------------------------------------------------------------------


def rank_task(k: int, *, A, settings: ConsensusSettings, cnmf: CNMFSettings, nmf_kwargs: dict,
              attempt: int) -> dict:
    """All restarts of rank ``k`` (in-process on a worker) as a store payload.

    ``attempt`` (the run's attempt number) is recorded, so a resumed run shows which ranks it
    took from the checkpoint.
    """
    s = settings
    if s.method == "cnmf":
        r = dnmf.cnmf_consensus(A, k, s.reps, density_threshold=cnmf.density_threshold,
                                local_neighborhood_size=cnmf.local_neighborhood_size, seed=s.seed, client=False,
                                kmeans_seed=cnmf.kmeans_seed, **nmf_kwargs)
        out = {name: getattr(r, name) for name in ("programs", "usage", "stability", "error", "n_neighbors",
                                                   "replicate_programs", "local_density", "kept", "labels")}
    else:
        r = dnmf.consensus_nmf(A, k, s.reps, s.method, s.knn, s.seed, client=False, axis=s.axis, **nmf_kwargs)
        out = {name: getattr(r, name) for name in ("consensus", "clusters", "cophenetic", "dispersion", "pac",
                                                   "linkage", "order")}
        out["loss"] = np.array([float(m.misc["loss"]) for m in r.models])
    return {**out, "attempt": int(attempt)}


def _result(k: int, p: dict, settings: ConsensusSettings, cnmf: CNMFSettings):
    """The library's per-rank result rebuilt from a task payload (restart models are not kept)."""
    s = settings
    seeds = tuple(s.seed + i for i in range(1, s.reps + 1))
    if s.method == "cnmf":
        return dnmf.CNMFResult(
            programs=p["programs"], usage=p["usage"], stability=float(p["stability"]), error=float(p["error"]), k=k,
            reps=s.reps, density_threshold=cnmf.density_threshold,
            local_neighborhood_size=cnmf.local_neighborhood_size, n_neighbors=int(p["n_neighbors"]),
            replicate_programs=p["replicate_programs"], local_density=p["local_density"],
            kept=np.asarray(p["kept"], dtype=bool), labels=p["labels"], seeds=seeds)
    return dnmf.ConsensusNMFResult(
        consensus=p["consensus"], clusters=p["clusters"], cophenetic=float(p["cophenetic"]),
        dispersion=float(p["dispersion"]), pac=float(p["pac"]), linkage=p["linkage"], order=p["order"], models=(),
        k=k, reps=s.reps, method=s.method, knn=s.knn if s.method == "knn_jaccard" else None, axis=s.axis,
        seeds=seeds)


def _names(A, axis: str, n: int) -> list[str]:
    """Names of the clustered objects (the input's row or column names), else positions."""
    names = getattr(A, "row_names" if axis == "features" else "col_names", None)
    return [str(v) for v in names] if names is not None and len(names) == n else [str(i) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def run(config, job) -> None:
    """Restarts per rank as checkpointed tasks → statistics table, chosen k, consensus or programs, plots."""
    import pandas as pd

    s, cn = config.consensus, config.cnmf
    nmf_kwargs = dnmf.params.config_kwargs([p for p in dnmf.params.NMF_PARAMS if p.name not in _SET_BY_CONSENSUS],
                                           config.model)
    A = load_input(config.input, job, config.model.block_nnz).data
    job.add_seeds(consensus=s.seed, **({"kmeans": cn.kmeans_seed} if s.method == "cnmf" else {}))
    attempt = int(job.store.meta.get("attempts", 1))
    fn = functools.partial(rank_task, A=A, settings=s, cnmf=cn, nmf_kwargs=nmf_kwargs, attempt=attempt)
    ks = list(s.k)
    payloads = job.run_tasks(fn, ks, [f"k{q}" for q in ks], desc=f"consensus ({s.method}, {s.reps} restarts per k)",
                             to_payload=lambda p: p, from_payload=lambda p: p)
    results = {q: _result(q, p, s, cn) for q, p in zip(ks, payloads)}
    sweep = (dnmf.CNMFSelection if s.method == "cnmf" else dnmf.ConsensusNMFSweep)(ks=tuple(ks), results=results)
    criterion = s.chosen_criterion
    best = sweep.best_k(criterion)
    table = sweep.table
    job.write_table("statistics", table)
    job.write("selection", {"k": best, "criterion": criterion, "method": s.method, "axis": s.axis, "reps": s.reps,
                            "attempts": {str(q): int(p["attempt"]) for q, p in zip(ks, payloads)}})
    for q, p in zip(ks, payloads):
        job.write(f"k{q}", {key: v for key, v in p.items() if key != "attempt"})
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
