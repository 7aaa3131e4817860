"""dnmf: distributed non-negative matrix factorization on Dask.

Public API (all importable from ``dnmf``):

* core NMF: :func:`nmf`, :class:`NMFModel`, :class:`NMF` (scikit-learn dialect),
  :func:`cosine`, :func:`bipartite_match`, :class:`BipartiteMatch`, :func:`simulate_nmf`,
  :class:`SimulatedNMF`
* consensus: :func:`consensus_nmf`, :class:`ConsensusNMFResult`, :class:`ConsensusNMFSweep`
  (RcppML), :func:`cnmf_consensus`, :func:`cnmf_k_selection`, :class:`CNMFResult`,
  :class:`CNMFSelection` (cNMF)
* rank selection: ``nmf(A, k=[...], cv_seed=[...])`` → :class:`CVResult` (:mod:`dnmf.cv`),
  ``nmf(A, k="auto")`` (:func:`rank_search`, :class:`RankSearchResult`)
* guided NMF (:mod:`dnmf.guided`): :func:`compute_target`, :func:`refine`, :func:`assess`,
  :class:`Assessment`, :func:`classify_embedding`, :func:`classify_logistic`,
  :func:`classify_rf`, :class:`ClassifierEvaluation`, :func:`nnls`, :func:`bipartition`,
  :class:`Bipartition`, :func:`dclust`, :class:`DClustResult`
* losses (spec §6): :mod:`dnmf.losses` (the loss registry, ``evaluate``, ``mse``), :func:`suggest_loss`
* penalties (spec §8): :func:`laplacian` (a graph Laplacian for ``nmf(graph_W=..., graph_H=...)``)
* data: :mod:`dnmf.io` (``as_blocked``, ``write_zarr``), :mod:`dnmf.datasets`, :mod:`dnmf.anndata`,
  :mod:`dnmf.preprocess` (``normalize_total``, ``log1p``, ``select_features``, ``recipe``)
* covariates / random effects: :func:`nmfkc`, :func:`nmfkc_inference`, :func:`nmfkc_ecv`,
  :func:`nmfkc_cv`, :func:`nmfkc_kernel`, :func:`nmfkc_kernel_beta_nearest_med`,
  :func:`nmfkc_rank`, :func:`nmfkc_consensus`, :func:`nmfkc_dot`, :func:`nmfre`,
  :class:`NMFREResult`, :func:`nmfre_dfu_scan`, :func:`nmfre_inference`, :func:`nmfre_ecv`,
  :func:`nmfre_blocked`, :class:`NMFREBlockedResult`
* errors and warnings: :class:`DnmfError`, :class:`InputError`, :class:`ConfigError`,
  :class:`WorkerLostError`, :class:`CheckpointError`, :class:`ConvergenceWarning`
"""

from __future__ import annotations

import importlib

from .exceptions import CheckpointError, ConfigError, ConvergenceWarning, DnmfError, InputError, WorkerLostError

__version__ = "0.1.0"

# name -> module that defines it; imported on first access so `import dnmf` stays light.
_LAZY = {
    "nmf": "dnmf.core",
    "NMFModel": "dnmf.models",
    "cosine": "dnmf.models",
    "bipartite_match": "dnmf.models",
    "BipartiteMatch": "dnmf.models",
    "SimulatedNMF": "dnmf.simulate",
    "NMF": "dnmf.estimator",
    "simulate_nmf": "dnmf.simulate",
    "nmfkc": "dnmf.covariates",
    "nmfkc_inference": "dnmf.covariates",
    "nmfkc_ecv": "dnmf.covariates",
    "nmfkc_dot": "dnmf.dot",
    "nmfre": "dnmf.mixed",
    "NMFREResult": "dnmf.mixed",
    "nmfre_dfu_scan": "dnmf.mixed",
    "nmfre_inference": "dnmf.mixed",
    "nmfre_ecv": "dnmf.mixed",
    "nmfre_blocked": "dnmf.mixed",
    "NMFREBlockedResult": "dnmf.mixed",
    "nmfkc_cv": "dnmf.covariates",
    "nmfkc_kernel": "dnmf.covariates",
    "nmfkc_kernel_beta_nearest_med": "dnmf.covariates",
    "nmfkc_rank": "dnmf.covariates",
    "nmfkc_consensus": "dnmf.covariates",
    "consensus_nmf": "dnmf.consensus",
    "ConsensusNMFResult": "dnmf.consensus",
    "ConsensusNMFSweep": "dnmf.consensus",
    "cnmf_consensus": "dnmf.consensus",
    "cnmf_k_selection": "dnmf.consensus",
    "CNMFResult": "dnmf.consensus",
    "CNMFSelection": "dnmf.consensus",
    "io": "dnmf.io",
    "anndata": "dnmf.anndata",
    "preprocess": "dnmf.preprocess",
    "datasets": "dnmf.datasets",
    "CVResult": "dnmf.cv",
    "cv": "dnmf.cv",
    "rank_search": "dnmf.rank_search",
    "RankSearchResult": "dnmf.rank_search",
    "guided": "dnmf.guided",
    "compute_target": "dnmf.guided",
    "refine": "dnmf.guided",
    "assess": "dnmf.guided",
    "Assessment": "dnmf.guided",
    "classify_embedding": "dnmf.guided",
    "classify_logistic": "dnmf.guided",
    "classify_rf": "dnmf.guided",
    "ClassifierEvaluation": "dnmf.guided",
    "nnls": "dnmf.guided",
    "bipartition": "dnmf.guided",
    "Bipartition": "dnmf.guided",
    "dclust": "dnmf.guided",
    "DClustResult": "dnmf.guided",
    "suggest_loss": "dnmf.losses",
    "laplacian": "dnmf.solvers.penalties",
    "losses": "dnmf.losses",
}

__all__ = ["DnmfError", "InputError", "ConfigError", "WorkerLostError", "CheckpointError", "ConvergenceWarning",
           "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__ == f"dnmf.{name}" and not hasattr(module, name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dnmf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
