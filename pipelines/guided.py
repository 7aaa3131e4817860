"""Guided NMF (RcppML guided spec): a baseline fit, a label-guided model, and both assessed.

The labels are a column of the input's ``obs`` table (an AnnData file or store, or a bundled
data set, whose ``obs`` annotates the samples — the columns of the features × samples matrix).

Config sections::

    input: the factorize pipeline's input section (dataset, path, layer, normalize, ...)
    model: the arguments of dnmf.nmf (k, tol, maxit, seed, r_rng, L1, L2, ...), for both fits
    guide:
      labels: island          # obs column with each sample's class (required)
      mode: target            # target: refit with target_H = compute_target(baseline.h, labels)
                              #   and target_lambda = lambda_ (negative: remove the labels' structure);
                              # refine: dnmf.refine(baseline, labels, lambda_) (post hoc, no refit)
      lambda_: 0.1            # target: target_lambda (H side, non-zero); refine: lambda_ in [0, 1]
      whiten: true            # OAS-ZCA whitening of the class target (compute_target / refine)
      batch: null             # obs column of batches, for assess's batch-mixing metrics
      metrics: [all]          # assess's metric groups ("all": ari, nmi, silhouette, classification,
                              #   plus batch_mixing with a batch)
      classifiers: [knn, lr]  # assess's classifiers (knn, lr, rf)
      n_folds: 5, k_nn: 15, seed: 42, min_class_size: 10   # assess's settings
      plot_method: auto       # 2-D projection of the assess plots: auto (UMAP if installed, else
                              #   PCA), umap or pca

The key is ``lambda_`` (as :func:`dnmf.refine`'s argument): ``lambda`` is a Python keyword and
cannot name a config field.

Both fits run on the job's cluster with ``model.seed`` (``seed: null`` draws one entropy for
the run, used by both fits), so in mode target the guided model is exactly ``dnmf.nmf(A,
**model, target_H=dnmf.compute_target(baseline.h, labels, whiten), target_lambda=lambda_)`` from
the same start as the baseline, as RcppML's vignette (``set.seed(42)`` before each fit). The
fits are not checkpointed: a resumed run refits them (seconds on data of this size).

Outputs: ``baseline/`` and ``model/`` (the guided model; w, d, h, loss_history, tol_history
and the coordinates feature, sample and factor, with Zarr ``dimension_names`` as the factorize
pipeline's ``model/``), ``guide/`` (mode, lambda_, labels column, whiten and, in mode target,
the target matrix ``target``: factor × sample), ``tables/assess`` (one row per model —
``model`` (baseline, guided), the assess metrics (nmi, ari, silhouette, accuracy_knn, ...),
``mse`` (:meth:`dnmf.NMFModel.evaluate`: mean squared error over all entries) and
``mse_ratio`` (the model's mse over the baseline's)), ``tables/classification`` (the per-fold
classifier rows of both, with a ``model`` column), and beside the store
``<run>-assess-baseline.png`` and ``<run>-assess-guided.png`` (:meth:`dnmf.Assessment.plot`:
the embedding coloured by label and the factor composition per label).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np
import pandas as pd

import dnmf
import dnmf.anndata
import dnmf.datasets
import dnmf.params
from pipelines import factorize
from pipelines.factorize import FactorizeInput, load_input

#: assess's metric groups, and "all" (dnmf.guided.METRIC_GROUPS; a test checks they agree).
METRICS = ("all", "ari", "nmi", "silhouette", "classification", "batch_mixing")
MODES = ("target", "refine")


def _meta(doc: str, **kw) -> dict:
    return {"doc": doc, **kw}


@dataclass(frozen=True)
class GuideSettings:
    """``guide:``: the labels, how they guide the model, and how both models are assessed."""

    labels: str = field(metadata=_meta("obs column of the input with each sample's class"))
    mode: Literal["target", "refine"] = field(default="target", metadata=_meta(
        "target: refit with target_H = compute_target(baseline.h, labels) and target_lambda = lambda_; "
        "refine: dnmf.refine(baseline, labels, lambda_)"))
    lambda_: float = field(default=0.1, metadata=_meta(
        "strength: mode target — target_lambda (non-zero; negative removes the labels' structure); "
        "mode refine — the fraction of H's energy added, in [0, 1]"))
    whiten: bool = field(default=True, metadata=_meta("OAS-ZCA whitening of the class target"))
    batch: str | None = field(default=None, metadata=_meta(
        "obs column of batches for assess's batch-mixing metrics (null: none)"))
    metrics: tuple[Literal[METRICS], ...] = field(default=("all",), metadata=_meta(
        "assess's metric groups: all, ari, nmi, silhouette, classification, batch_mixing", nonempty=True))
    classifiers: tuple[Literal["knn", "lr", "rf"], ...] = field(default=("knn", "lr"), metadata=_meta(
        "assess's classifiers (kNN, logistic regression, random forest)", nonempty=True))
    n_folds: int = field(default=5, metadata=_meta("folds of assess's stratified cross-validation", min=2))
    k_nn: int = field(default=15, metadata=_meta("neighbours of the kNN classifier", min=1))
    seed: int = field(default=42, metadata=_meta("seed of assess (k-means, folds, forest)", min=0))
    min_class_size: int = field(default=10, metadata=_meta(
        "classes with fewer labelled samples are left out of the assessment", min=1))
    plot_method: Literal["auto", "umap", "pca"] = field(default="auto", metadata=_meta(
        "2-D projection of the assess plots: auto (UMAP when umap-learn is installed, else PCA), umap, pca"))

    def validate(self) -> Iterator[tuple[str, str, Any]]:
        if self.mode == "target" and self.lambda_ == 0:
            yield ("lambda_", "a non-zero float for mode 'target' (> 0 enriches, < 0 removes the labels' "
                   "structure)", self.lambda_)
        if self.mode == "refine" and not 0.0 <= self.lambda_ <= 1.0:
            yield ("lambda_", "a float in [0, 1] for mode 'refine' (the fraction of H's energy added)", self.lambda_)
        if "batch_mixing" in self.metrics and self.batch is None:
            yield ("metrics", "metric groups without 'batch_mixing' when guide.batch is null", list(self.metrics))
        if self.batch is not None and self.batch == self.labels:
            yield ("batch", "an obs column other than guide.labels", self.batch)

    def assess_kwargs(self) -> dict:
        """Keyword arguments of :func:`dnmf.assess` (besides the model, labels and batch)."""
        return {"metrics": "all" if "all" in self.metrics else list(self.metrics),
                "classifiers": list(self.classifiers), "n_folds": self.n_folds, "k_nn": self.k_nn,
                "seed": self.seed, "min_class_size": self.min_class_size}


#: ``model:``: :func:`dnmf.nmf`'s YAML parameters (declared once in :data:`dnmf.params.NMF_PARAMS`),
#: for the baseline and the guided fit.
GuidedModel = dnmf.params.config_section(
    dnmf.params.NMF_PARAMS, "GuidedModel", module=__name__,
    doc="``model:`` of the guided pipeline: the arguments of :func:`dnmf.nmf` for the baseline and the guided fit.")

SECTIONS = {"input": FactorizeInput, "model": GuidedModel, "guide": GuideSettings}


# ---------------------------------------------------------------------------------------------
# The input's obs table
# ---------------------------------------------------------------------------------------------


def input_obs(inp: FactorizeInput) -> pd.DataFrame | None:
    """The ``obs`` table (one row per sample) of the input without reading its values (None: none).

    Bundled data sets: their ``obs``; ``.h5ad`` files and AnnData Zarr stores: their ``obs``
    group; a store written by ``dnmf convert``: an index of its sample names (no columns);
    anything else (matrix files, synthetic inputs): None.
    """
    if inp.dataset is not None:
        data = getattr(dnmf.datasets, f"load_{inp.dataset}")()
        obs = getattr(data, "obs", None)
        return obs if isinstance(obs, pd.DataFrame) else None
    if inp.path is None or inp.synthetic is not None or not inp.path.lower().endswith((".h5ad", ".zarr")):
        return None
    ann = dnmf.anndata.read_annotations(inp.path)
    if ann is not None:
        return ann[0]
    return pd.DataFrame(index=pd.Index([], dtype=object))


def _columns(obs: pd.DataFrame) -> str:
    return ", ".join(repr(str(c)) for c in obs.columns) if len(obs.columns) else "none"


def check_config(config) -> Iterator[tuple[str, str, Any]]:
    """Checks across sections: k fits the input; guide.labels (and batch) are obs columns of it."""
    yield from factorize.check_config(config)
    g = config.guide
    try:
        obs = input_obs(config.input)
    except (OSError, ValueError, KeyError, ImportError) as e:
        yield ("guide.labels", "an obs column of a readable input", g.labels, f"(reading obs: {type(e).__name__})")
        return
    if obs is None:
        yield ("guide.labels", "an obs column of the input, but this input has no obs table (use an AnnData "
               ".h5ad / .zarr input or a bundled data set)", g.labels)
        return
    for key, col in (("guide.labels", g.labels), ("guide.batch", g.batch)):
        if col is not None and col not in obs.columns:
            yield (key, f"one of the input's obs columns ({_columns(obs)})", col)
            return
    counts = obs[g.labels].value_counts(dropna=True)
    big = int((counts >= g.min_class_size).sum())
    if big < 2:
        yield ("guide.labels", f"an obs column with at least 2 classes of >= {g.min_class_size} samples "
               "(guide.min_class_size)", g.labels,
               f"(its classes: {', '.join(f'{k}: {v}' for k, v in counts.items()) or 'none'})")


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def _entropy(cfg, job) -> int | None:
    """For ``model.seed: null``: one entropy for the run (both fits start from it), kept in the store."""
    if cfg.seed is not None:
        return None
    entropy = (job.store.meta.get("seeds") or {}).get("nmf_entropy") if job.resume else None
    if entropy is None:
        entropy = str(np.random.SeedSequence().entropy)
        job.add_seeds(nmf=None, nmf_entropy=entropy)
    return int(entropy)


def _fit(A, kwargs: dict, entropy: int | None, job, desc: str, **extra):
    """One ``dnmf.nmf`` fit on the job's cluster (``model.seed``, or a fresh SeedSequence of ``entropy``)."""
    seed = kwargs["seed"] if entropy is None else np.random.SeedSequence(entropy)
    bar = job.progress(desc, kwargs["maxit"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dnmf.ConvergenceWarning)
        model = dnmf.nmf(A, **{**kwargs, "seed": seed}, **extra, client=job.client,
                         on_iteration=job.iteration_callback(bar))
    misc = model.misc
    bar.close(f"loss {misc['loss']:.6g}, {'converged' if misc['converged'] else 'not converged'}")
    for w in caught:
        if issubclass(w.category, dnmf.ConvergenceWarning):
            job.echo(f"warning ({desc}): {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def _model_record(model) -> dict:
    m, n, k = model.shape
    misc = model.misc
    rec = {"w": model.w, "d": model.d, "h": model.h,
           "loss_history": np.asarray(misc.get("loss_history", ()), dtype=float),
           "tol_history": np.asarray(misc.get("tol_history", ()), dtype=float),
           "shape": [m, n], "k": k, "iter": int(misc.get("iter", 0)), "loss": float(misc.get("loss", np.nan))}
    rows, cols = model.feature_names, model.sample_names
    rec["feature"] = np.asarray([str(r) for r in rows]) if rows is not None else np.arange(m)
    rec["sample"] = np.asarray([str(c) for c in cols]) if cols is not None else np.arange(n)
    rec["factor"] = np.arange(k)
    return rec


def run(config, job) -> None:
    """Baseline fit → guided model (target refit or refine) → assess both → tables and plots."""
    cfg, g = config.model, config.guide
    loaded = load_input(config.input, job, cfg.block_nnz)
    obs = loaded.obs if loaded.obs is not None else input_obs(config.input)
    labels = obs[g.labels].to_numpy()
    batch = None if g.batch is None else obs[g.batch].to_numpy()
    A = loaded.data
    kwargs = dnmf.params.config_kwargs(dnmf.params.NMF_PARAMS, cfg)
    entropy = _entropy(cfg, job)
    baseline = _fit(A, kwargs, entropy, job, "baseline fit")
    job.add_seeds(nmf=cfg.seed, nmf_entropy=str(baseline.misc["seed_entropy"]))
    guide_record = {"mode": g.mode, "lambda_": g.lambda_, "labels": g.labels, "whiten": g.whiten}
    if g.mode == "target":
        target = dnmf.compute_target(baseline.h, labels, whiten=g.whiten)
        guided = _fit(A, kwargs, entropy, job, "guided fit", target_H=target, target_lambda=g.lambda_)
        guide_record["target"] = target
    else:
        guided = dnmf.refine(baseline, labels, g.lambda_, whiten=g.whiten)
    job.store.write_group("baseline", _model_record(baseline), dims=factorize.MODEL_DIMS)
    job.store.write_group("model", _model_record(guided), dims=factorize.MODEL_DIMS)
    job.store.write_group("guide", guide_record, dims={"target": ("factor", "sample")})

    rows, folds, results = [], [], {}
    mse_base = baseline.evaluate(A)
    for name, model in (("baseline", baseline), ("guided", guided)):
        res = dnmf.assess(model, labels, batch, **g.assess_kwargs())
        mse = mse_base if model is baseline else guided.evaluate(A)
        rows.append({"model": name, **res.metrics, "mse": mse, "mse_ratio": mse / mse_base})
        folds.append(res.classification.assign(model=name))
        results[name] = res
    table = pd.DataFrame(rows)
    job.write_table("assess", table)
    job.write_table("classification", pd.concat(folds, ignore_index=True))
    shown = [c for c in ("model", "nmi", "ari", "silhouette", "accuracy_knn", "accuracy_mean", "mse_ratio")
             if c in table.columns]
    job.echo(f"guided NMF ({g.mode}, lambda_ {g.lambda_}) on obs column {g.labels!r}:\n"
             f"{table[shown].to_string(index=False, float_format=lambda v: f'{v:.3f}')}")
    for name, res in results.items():
        fig = res.plot(method=g.plot_method)
        what = "baseline" if name == "baseline" else f"guided ({g.mode}, lambda_ = {g.lambda_:g})"
        fig.suptitle(f"{config.name}: {what}, k = {guided.k}, by {g.labels}")
        fig.tight_layout()  # again, now with room for the title
        job.save_figure(fig, f"assess-{name}")
