"""Guided NMF, post-hoc side (RcppML 1.0 guided spec §1, §3–§5; rcppml spec §10.2).

* :func:`compute_target` — class targets from labels (OAS-ZCA whitened centroids).
* :func:`apply_target` — how a target changes one side's Gram and right-hand side (§2.3/§2.4).
* :func:`nnls` — non-negative least squares for one factor given the other, with targets.
* :func:`refine` — post-hoc centroid correction of an embedding, with optional W-refit cycles.
* :func:`assess` — clustering, silhouette, classification and batch-mixing metrics of an
  embedding (:class:`Assessment`); :func:`classify_embedding`, :func:`classify_logistic`,
  :func:`classify_rf` — single-split classifier evaluations (:class:`ClassifierEvaluation`).
* :func:`bipartition`, :func:`dclust` — rank-2 NMF divisive clustering, subtrees in parallel.
"""

from .assessment import METRIC_GROUPS, Assessment, assess
from .classify import ClassifierEvaluation, classify_embedding, classify_logistic, classify_rf
from .correct import refine
from .divisive import Bipartition, Cluster, DClustResult, bipartition, dclust
from .solve import NNLS_SOLVERS, nnls
from .target import compute_target
from ..solvers.targets import apply_target, target_gram

__all__ = ["compute_target", "apply_target", "target_gram", "nnls", "NNLS_SOLVERS", "refine",
           "assess", "Assessment", "METRIC_GROUPS", "classify_embedding", "classify_logistic", "classify_rf",
           "ClassifierEvaluation", "bipartition", "Bipartition", "dclust", "DClustResult", "Cluster"]
