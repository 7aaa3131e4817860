"""Embedding assessment (RcppML ``assess``, guided spec §4).

Clustering agreement (k-means → ARI, NMI), an approximate silhouette, stratified k-fold
classification (kNN, logistic regression, random forest) and batch-mixing metrics of an
embedding against known labels. scikit-learn fits the k-means and the classifiers; every random
choice takes the fixed ``seed``, so the same call gives the same numbers. Exact parity with R is
not attempted (R's Hartigan–Wong k-means and its RNG stream differ); spec §4.4.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .._validation import check_int, param_error
from ..models import NMFModel
from ._labels import as_factor
from .classify import CLASSIFIERS, _rows_as_samples, knn_scores, lr_scores, rf_scores, split_metrics

__all__ = ["Assessment", "assess", "approx_silhouette", "batch_knn_entropy", "stratified_folds", "METRIC_GROUPS"]

logger = logging.getLogger(__name__)

#: Metric groups of ``assess(metrics=...)``; ``"all"`` = the first four, plus batch_mixing with a batch.
METRIC_GROUPS = ("ari", "nmi", "silhouette", "classification", "batch_mixing")


def approx_silhouette(E: np.ndarray, y: np.ndarray, n_classes: int, seed: int, per_class: int = 200) -> float:
    """Mean silhouette with each class represented by ≤ ``per_class`` random reference members.

    For every sample i and class c, D_c = mean Euclidean distance from E_i to c's references;
    a_i = D_{y_i} (i may be among its own references), b_i = min_{c ≠ y_i} D_c,
    s_i = (b_i − a_i)/max(a_i, b_i) (0 when both are 0). 0 with fewer than 2 classes.
    """
    from sklearn.metrics import pairwise_distances

    present = [c for c in range(n_classes) if np.any(y == c)]
    if len(present) < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    D = np.full((E.shape[0], n_classes), np.inf)
    for c in present:
        members = np.flatnonzero(y == c)
        refs = members[rng.choice(members.size, size=min(per_class, members.size), replace=False)]
        D[:, c] = pairwise_distances(E, E[refs]).mean(axis=1)
    a = D[np.arange(E.shape[0]), y]
    D[np.arange(E.shape[0]), y] = np.inf
    b = D.min(axis=1)
    den = np.maximum(a, b)
    s = np.divide(b - a, den, out=np.zeros_like(a), where=den > 0)
    return float(s.mean())


def stratified_folds(y: np.ndarray, n_classes: int, n_folds: int, seed: int) -> np.ndarray:
    """Fold (0..n_folds−1) of each sample: per class, a random permutation of the folds repeated.

    Classes are visited in level order, each over its samples in their original order (§4.6).
    """
    rng = np.random.default_rng(seed)
    folds = np.empty(y.shape[0], dtype=np.int64)
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        folds[idx] = np.resize(rng.permutation(n_folds), idx.size)
    return folds


def batch_knn_entropy(E: np.ndarray, b: np.ndarray, n_batches: int, k: int, seed: int) -> float:
    """Mean normalized Shannon entropy of the batches among each sample's k nearest references.

    References: min(n, max(5000, 10k)) random samples (self excluded from its own neighbours);
    entropy divided by log(n_batches), so 1 = perfectly mixed (§4.7).
    """
    from sklearn.neighbors import NearestNeighbors

    n = E.shape[0]
    rng = np.random.default_rng(seed)
    refs = rng.permutation(n)[: min(n, max(5000, 10 * k))]
    k = min(k, n - 1)
    nn = NearestNeighbors(n_neighbors=min(k + 1, refs.size), algorithm="brute").fit(E[refs])
    idx = refs[nn.kneighbors(E, return_distance=False)]
    ent = np.empty(n)
    for i in range(n):
        neigh = idx[i][idx[i] != i][:k]
        p = np.bincount(b[neigh], minlength=n_batches) / neigh.size
        p = p[p > 0]
        ent[i] = -np.sum(p * np.log(p))
    return float(ent.mean() / np.log(n_batches))


def _embedding(x: Any, func: str) -> tuple[np.ndarray, np.ndarray]:
    """(E with rows = samples, non-negative factor matrix n × k for the composition plot)."""
    if isinstance(x, NMFModel):
        h = np.asarray(x.h, dtype=np.float64)
        return (np.asarray(x.d, dtype=np.float64)[:, None] * h).T, h.T
    if hasattr(x, "u") and hasattr(x, "d") and not isinstance(x, np.ndarray):  # an SVD result: U diag(d)
        E = np.asarray(x.u, dtype=np.float64) * np.asarray(x.d, dtype=np.float64)
        return E, np.abs(E)
    E = _rows_as_samples(x, func, name="x", what="an NMFModel or an n x k embedding")
    return E, np.abs(E)


def _metric_groups(metrics: Any, has_batch: bool, func: str) -> list[str]:
    if isinstance(metrics, str) and metrics == "all":
        return list(METRIC_GROUPS[:4]) + (["batch_mixing"] if has_batch else [])
    items = [metrics] if isinstance(metrics, str) else list(metrics)
    out = []
    for item in items:
        hits = [g for g in METRIC_GROUPS if isinstance(item, str) and item and g.startswith(item)]
        if len(hits) != 1:
            raise param_error("metrics", func, "'all' or (prefixes of) " + ", ".join(repr(g) for g in METRIC_GROUPS),
                              item)
        if hits[0] not in out:
            out.append(hits[0])
    return out


@dataclass(frozen=True)
class Assessment:
    """Result of :func:`assess` (RcppML ``nmf_assessment``).

    Attributes
    ----------
    metrics : dict
        In order: ``ari``, ``nmi``, ``silhouette``; per classifier ``accuracy_<clf>``,
        ``f1_<clf>``, ``precision_<clf>``, ``recall_<clf>``, ``auroc_<clf>`` (means over folds);
        ``accuracy_mean``, ``f1_mean``, ``precision_mean``, ``recall_mean``, ``auroc_mean``
        (means over all classifier × fold rows); ``batch_silhouette``, ``batch_knn_entropy``.
        Only the computed ones are present.
    classification : pandas.DataFrame
        One row per fold and classifier (fold-major): ``classifier``, ``fold`` (1-based),
        ``accuracy``, ``f1``, ``precision``, ``recall``, ``auroc``; NaN where a classifier failed.
    params : dict
        ``n_samples`` and ``n_features`` (after filtering), ``n_classes``, ``classes`` (kept
        levels), ``n_dropped``, ``metrics``, ``n_folds``, ``classifiers``, ``k_nn``, ``seed``,
        ``min_class_size``, ``has_batch``, ``backend`` ("cpu").
    embedding : ndarray of shape (n_samples, n_features)
        The assessed embedding (rows = kept samples).
    labels : ndarray of shape (n_samples,)
        Their labels.
    factors : ndarray of shape (n_samples, n_features)
        Non-negative per-sample factor values for the composition plot (``h.T`` for a model).
    """

    metrics: dict
    classification: pd.DataFrame
    params: dict
    embedding: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    factors: np.ndarray = field(repr=False)

    @property
    def table(self) -> pd.DataFrame:
        """The metrics as a one-row DataFrame (R's ``as.data.frame``)."""
        return pd.DataFrame([self.metrics])

    def __str__(self) -> str:
        m, p = self.metrics, self.params
        lines = ["Embedding Assessment",
                 f"  {p['n_samples']} samples, {p['n_features']} features, {p['n_classes']} classes"]
        if any(key in m for key in ("nmi", "ari", "silhouette")):
            lines += ["", "Clustering:"]
            for key, name in (("nmi", "NMI:        "), ("ari", "ARI:        "), ("silhouette", "Silhouette: ")):
                if key in m:
                    lines.append(f"  {name} {m[key]:.4f}")
        if "accuracy_mean" in m:
            lines += ["", f"Classification (stratified {p['n_folds']}-fold CV):",
                      f"  Mean Accuracy: {m['accuracy_mean']:.4f}", f"  Mean F1:       {m['f1_mean']:.4f}",
                      f"  Mean AUROC:    {m['auroc_mean']:.4f}"]
            for clf in p["classifiers"]:
                lines.append(f"    {clf:<4s}  Acc={m[f'accuracy_{clf}']:.4f}  F1={m[f'f1_{clf}']:.4f}")
        if "batch_silhouette" in m:
            lines += ["", "Batch Mixing:",
                      f"  Batch Silhouette: {m['batch_silhouette']:+.4f}  (lower = better mixing)",
                      f"  Batch kNN Entropy: {m['batch_knn_entropy']:.4f}  (higher = better mixing)"]
        return "\n".join(lines)

    def plot(self, method: str = "auto", figsize: tuple[float, float] = (11.0, 4.5)):
        """Embedding scatter coloured by label and stacked factor composition by label.

        Parameters
        ----------
        method : {"auto", "umap", "pca"}, default "auto"
            2-D projection of the embedding: UMAP when umap-learn is importable ("auto"), else
            PCA (scikit-learn). Seeded with ``params["seed"]``.
        figsize : (float, float)

        Returns
        -------
        matplotlib.figure.Figure
            Left: the projection, one colour per class. Right: for each class, the mean over its
            samples of each factor's share of the sample's total (a stacked bar per class).
        """
        from matplotlib.figure import Figure

        seed = self.params["seed"]
        if method not in ("auto", "umap", "pca"):
            raise param_error("method", "Assessment.plot", "one of 'auto', 'umap', 'pca'", method)
        umap = None
        if method in ("auto", "umap"):
            try:
                import umap
            except ImportError:
                if method == "umap":
                    raise
        if umap is not None:
            xy = umap.UMAP(n_components=2, random_state=seed).fit_transform(self.embedding)
            axis = "UMAP"
        else:
            from sklearn.decomposition import PCA

            xy = PCA(n_components=min(2, self.embedding.shape[1]), random_state=seed).fit_transform(self.embedding)
            if xy.shape[1] == 1:
                xy = np.column_stack([xy[:, 0], np.zeros(xy.shape[0])])
            axis = "PC"
        fig = Figure(figsize=figsize)
        ax1, ax2 = fig.subplots(1, 2)
        classes = list(self.params["classes"])
        for c in classes:
            sel = self.labels == c
            ax1.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, label=str(c))
        ax1.set_xlabel(f"{axis}1")
        ax1.set_ylabel(f"{axis}2")
        ax1.set_title("Embedding")
        ax1.legend(fontsize="small", markerscale=2, frameon=False)
        total = self.factors.sum(axis=1, keepdims=True)
        prop = np.divide(self.factors, total, out=np.zeros_like(self.factors), where=total > 0)
        comp = np.array([prop[self.labels == c].mean(axis=0) for c in classes])  # classes × factors
        bottom = np.zeros(len(classes))
        x = np.arange(len(classes))
        for f in range(comp.shape[1]):
            ax2.bar(x, comp[:, f], bottom=bottom, label=f"F{f + 1}")
            bottom += comp[:, f]
        ax2.set_xticks(x, [str(c) for c in classes], rotation=45, ha="right")
        ax2.set_ylabel("Mean factor proportion")
        ax2.set_title("Factor composition")
        ax2.legend(fontsize="small", ncol=2, frameon=False)
        fig.tight_layout()
        return fig


def assess(x: Any, labels: Any, batch: Any = None, *, metrics: str | list = "all", n_folds: int = 5,
           classifiers: tuple | list = ("knn", "lr", "rf"), k_nn: int = 15, seed: int = 42,
           min_class_size: int = 10, sil_samples_per_class: int = 200, batch_knn_k: int = 50) -> Assessment:
    """Assess how well an embedding separates known classes (RcppML ``assess``).

    Parameters
    ----------
    x : NMFModel, SVD result or array-like of shape (n, k)
        A model (embedding ``(diag(d) H)ᵀ``), an object with ``u`` and ``d`` (``U diag(d)``) or
        an n × k matrix / DataFrame with **rows as samples** (the transpose of what
        :func:`compute_target` and :func:`refine` take).
    labels : array-like of shape (n,)
        Class of each sample; missing labels are dropped.
    batch : array-like of shape (n,), optional
        Batch of each sample, for the batch-mixing metrics.
    metrics : "all" or list of str, default "all"
        Groups among ``"ari"``, ``"nmi"``, ``"silhouette"``, ``"classification"``,
        ``"batch_mixing"`` (unique prefixes accepted). "all" = the first four, plus batch mixing
        when ``batch`` has more than one level.
    n_folds : int, default 5
        Folds of the stratified cross-validation.
    classifiers : sequence of {"knn", "lr", "rf"}, default ("knn", "lr", "rf")
    k_nn : int, default 15
        Neighbours of the kNN classifier (capped at the training size).
    seed : int, default 42
        Seeds k-means, the silhouette references, the folds, the forest and the batch references.
    min_class_size : int, default 10
        Classes with fewer labeled samples are dropped (with their samples) before anything is
        computed; at least 2 must remain.
    sil_samples_per_class : int, default 200
        Reference members per class of the approximate silhouette.
    batch_knn_k : int, default 50
        Neighbours of the batch kNN entropy.

    Returns
    -------
    Assessment
        ``.metrics`` (dict, names as RcppML: ``nmi``, ``accuracy_knn``, …), ``.classification``
        (per-fold table), ``.params``, ``.table`` (one-row DataFrame) and ``.plot()``.

    Raises
    ------
    InputError
        ``labels``/``batch`` not of length n; fewer than 2 classes with ``min_class_size``
        samples; an unknown metric or classifier; out-of-range integers.

    Notes
    -----
    * ARI and NMI (geometric normalisation) compare the labels with scikit-learn ``KMeans``
      (C clusters, 10 starts, ≤ 100 iterations, ``random_state=seed``) on the embedding.
    * Silhouette: :func:`approx_silhouette`; batch silhouette the same with batches and
      ``seed + 1``; batch kNN entropy: :func:`batch_knn_entropy`.
    * Classification: folds from :func:`stratified_folds`; features standardized with the
      training means and standard deviations (n − 1; 0 → 1) except for the forest; per fold,
      accuracy and macro precision / recall / F1 / AUROC over all classes.

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.guided import assess
    >>> rng = np.random.default_rng(0)
    >>> E = np.r_[rng.normal(0, 1, (30, 3)), rng.normal(4, 1, (30, 3))]
    >>> res = assess(E, ["a"] * 30 + ["b"] * 30, classifiers=["knn"])
    >>> round(res.metrics["nmi"], 3), res.metrics["accuracy_knn"]
    (1.0, 1.0)
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    func = "assess"
    E, factors = _embedding(x, func)
    n = E.shape[0]
    codes, levels = as_factor(labels, n, "labels", func, n_what="nrow of embedding")
    b_codes = b_levels = None
    if batch is not None:
        b_codes, b_levels = as_factor(batch, n, "batch", func, n_what="nrow of embedding")
    groups = _metric_groups(metrics, batch is not None, func)
    n_folds = check_int(n_folds, "n_folds", func, low=2)
    k_nn = check_int(k_nn, "k_nn", func, low=1)
    seed = check_int(seed, "seed", func, low=0)
    min_class_size = check_int(min_class_size, "min_class_size", func, low=1)
    sil_samples_per_class = check_int(sil_samples_per_class, "sil_samples_per_class", func, low=1)
    batch_knn_k = check_int(batch_knn_k, "batch_knn_k", func, low=1)
    classifiers = [classifiers] if isinstance(classifiers, str) else list(classifiers)
    for clf in classifiers:
        if clf not in CLASSIFIERS:
            raise param_error("classifiers", func, "a list of " + ", ".join(repr(c) for c in CLASSIFIERS), clf)
    if "classification" in groups and not classifiers:
        raise param_error("classifiers", func, "at least one of " + ", ".join(repr(c) for c in CLASSIFIERS),
                          classifiers)

    # class filtering (§4.3): NA and small classes go
    counts = np.bincount(codes[codes >= 0], minlength=len(levels))
    kept = np.flatnonzero(counts >= min_class_size)
    if kept.size < 2:
        raise param_error("labels", func, f"at least 2 classes with >= {min_class_size} samples (min_class_size)",
                          f"{kept.size} such class(es); counts {dict(zip(map(str, levels), counts.tolist()))}",
                          described=True)
    keep = np.isin(codes, kept)
    n_dropped = int(n - keep.sum())
    if n_dropped:
        logger.info("assess: dropped %d samples (unlabeled or in classes with < %d samples)", n_dropped,
                    min_class_size)
    remap = np.full(len(levels), -1)
    remap[kept] = np.arange(kept.size)
    y = remap[codes[keep]]
    E, factors = E[keep], factors[keep]
    C = int(kept.size)
    classes = [levels[i] for i in kept]
    n = E.shape[0]

    out: dict[str, float] = {}
    if "ari" in groups or "nmi" in groups:
        pred = KMeans(n_clusters=C, n_init=10, max_iter=100, random_state=seed).fit_predict(E)
        if "ari" in groups:
            out["ari"] = float(adjusted_rand_score(y, pred))
        if "nmi" in groups:
            out["nmi"] = float(normalized_mutual_info_score(y, pred, average_method="geometric"))
    if "silhouette" in groups:
        out["silhouette"] = approx_silhouette(E, y, C, seed, sil_samples_per_class)

    rows = []
    if "classification" in groups:
        folds = stratified_folds(y, C, n_folds, seed)
        for f in range(n_folds):
            test, train = folds == f, folds != f
            if not test.any() or not train.any():
                continue
            mu = E[train].mean(axis=0)
            sd = E[train].std(axis=0, ddof=1) if train.sum() > 1 else np.zeros(E.shape[1])
            sd = np.where(sd == 0, 1.0, sd)
            Ztr, Zte = (E[train] - mu) / sd, (E[test] - mu) / sd
            for clf in classifiers:
                try:
                    if clf == "knn":
                        scores = knn_scores(Ztr, y[train], Zte, C, min(k_nn, int(train.sum())))
                    elif clf == "lr":
                        scores = lr_scores(Ztr, y[train], Zte, C)
                    else:
                        scores = rf_scores(E[train], y[train], E[test], C, seed)
                    m = split_metrics(y[test], scores, C)
                    row = {key: m[key] for key in ("accuracy", "f1", "precision", "recall", "auroc")}
                except (ValueError, np.linalg.LinAlgError) as e:  # a failed fit: a NaN row (§8)
                    logger.warning("assess: classifier %s failed in fold %d: %s", clf, f + 1, e)
                    row = dict.fromkeys(("accuracy", "f1", "precision", "recall", "auroc"), np.nan)
                rows.append({"classifier": clf, "fold": f + 1, **row})
    table = pd.DataFrame(rows, columns=["classifier", "fold", "accuracy", "f1", "precision", "recall", "auroc"])
    if rows:
        stats = ("accuracy", "f1", "precision", "recall", "auroc")
        for clf in classifiers:
            sub = table[table["classifier"] == clf]
            for s in stats:
                out[f"{s}_{clf}"] = float(np.nanmean(sub[s])) if sub[s].notna().any() else np.nan
        for s in stats:
            out[f"{s}_mean"] = float(np.nanmean(table[s])) if table[s].notna().any() else np.nan

    has_batch = False
    if "batch_mixing" in groups and b_codes is not None:
        bc = b_codes[keep]
        ok = bc >= 0
        b_present, bc_ok = np.unique(bc[ok], return_inverse=True)
        if b_present.size > 1:
            has_batch = True
            out["batch_silhouette"] = approx_silhouette(E[ok], bc_ok, b_present.size, seed + 1,
                                                        sil_samples_per_class)
            out["batch_knn_entropy"] = batch_knn_entropy(E[ok], bc_ok, b_present.size, batch_knn_k, seed)
    params = {"n_samples": n, "n_features": int(E.shape[1]), "n_classes": C, "classes": classes,
              "n_dropped": n_dropped, "metrics": groups, "n_folds": n_folds, "classifiers": classifiers,
              "k_nn": k_nn, "seed": seed, "min_class_size": min_class_size, "has_batch": has_batch,
              "backend": "cpu"}
    return Assessment(metrics=out, classification=table, params=params, embedding=E,
                      labels=np.asarray(classes, dtype=object)[y], factors=factors)
