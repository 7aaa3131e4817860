"""Classifiers and per-split metrics shared by :func:`assess` and the ``classify_*`` helpers.

Guided spec §4.6 and §4.9: kNN (votes of the k nearest training samples), one-vs-rest logistic
regression (unpenalized binomial GLMs, probabilities renormalized), random forest (500 trees);
macro precision / recall / F1 over all classes and a one-vs-rest AUROC without tie correction.
scikit-learn does the fitting; every random choice takes a fixed ``seed``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .._validation import check_float, check_int, check_option, param_error
from ._labels import as_factor

__all__ = ["CLASSIFIERS", "ClassifierEvaluation", "classify_embedding", "classify_logistic", "classify_rf",
           "auroc_ovr", "split_metrics"]


def knn_scores(Xtr, ytr, Xte, n_classes: int, k: int, metric: str = "euclidean", seed: int | None = None) -> np.ndarray:
    """Vote fractions (n_test × C) of the k nearest training samples (brute force, stable ties)."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric).fit(Xtr)
    idx = nn.kneighbors(Xte, return_distance=False)
    votes = np.zeros((Xte.shape[0], n_classes))
    np.add.at(votes, (np.repeat(np.arange(Xte.shape[0]), k), ytr[idx].ravel()), 1.0)
    return votes / k


def lr_scores(Xtr, ytr, Xte, n_classes: int, seed: int | None = None) -> np.ndarray:
    """One-vs-rest unpenalized logistic regression probabilities, rows renormalized to sum 1."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    P = np.zeros((Xte.shape[0], n_classes))
    for c in range(n_classes):
        yc = ytr == c
        if yc.all() or not yc.any():  # a single outcome: the GLM's fitted probability is constant
            P[:, c] = float(yc.all())
            continue
        with warnings.catch_warnings():  # separable classes (R's glm warnings are suppressed too)
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            model = LogisticRegression(C=np.inf, max_iter=1000).fit(Xtr, yc)
        P[:, c] = model.predict_proba(Xte)[:, 1]
    s = P.sum(axis=1, keepdims=True)
    return np.divide(P, s, out=P.copy(), where=s > 0)


def rf_scores(Xtr, ytr, Xte, n_classes: int, seed: int | None = None) -> np.ndarray:
    """Random-forest class probabilities (500 trees, ⌊√k⌋ features per split)."""
    from sklearn.ensemble import RandomForestClassifier

    rf = RandomForestClassifier(n_estimators=500, max_features="sqrt", random_state=seed, n_jobs=1).fit(Xtr, ytr)
    P = np.zeros((Xte.shape[0], n_classes))
    P[:, rf.classes_] = rf.predict_proba(Xte)
    return P


#: Classifier names accepted by :func:`assess` (k-nearest neighbours, logistic regression, random forest).
CLASSIFIERS = ("knn", "lr", "rf")


def auroc_ovr(score: np.ndarray, positive: np.ndarray) -> float:
    """AUROC by counting, for each negative, the positives ranked above it (guided spec §4.6).

    Scores are sorted decreasingly with a stable sort (ties keep the given order; no tie
    correction). 0.5 when only one outcome occurs.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.5
    p = positive[np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")]
    return float(np.cumsum(p)[~p].sum() / (n_pos * n_neg))


def split_metrics(y_true: np.ndarray, scores: np.ndarray, n_classes: int) -> dict:
    """Accuracy, macro precision/recall/F1 over all classes, macro AUROC, from a score matrix.

    The prediction is the first class of maximal score (ties → lowest class index).
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    pred = np.argmax(scores, axis=1)
    labels = np.arange(n_classes)
    p, r, f, support = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    auc = np.array([auroc_ovr(scores[:, c], y_true == c) for c in labels])
    return {"accuracy": float(accuracy_score(y_true, pred)), "f1": float(f.mean()), "precision": float(p.mean()),
            "recall": float(r.mean()), "auroc": float(auc.mean()), "pred": pred, "per_class": (p, r, f, support),
            "per_class_auc": auc}


@dataclass(frozen=True)
class ClassifierEvaluation:
    """One train/test evaluation of a classifier on an embedding (RcppML ``fn_classifier_eval``).

    Attributes
    ----------
    accuracy : float
    per_class : pandas.DataFrame
        Columns ``class``, ``precision``, ``recall``, ``f1``, ``support`` (test samples), one row per class.
    macro_precision, macro_recall, macro_f1 : float
        Unweighted means over the classes.
    weighted_f1 : float
        Support-weighted mean F1.
    auc : float
        Macro one-vs-rest AUROC (no tie correction, see :func:`auroc_ovr`).
    per_class_auc : ndarray of shape (n_classes,)
    confusion : pandas.DataFrame
        Counts, rows = true class, columns = predicted class.
    predictions, test_labels : ndarray
        Predicted and true class labels of the test samples.
    train_idx, test_idx : ndarray of int
        0-based sample indices.
    method : str
        ``"knn"``, ``"logistic"`` or ``"rf"``.
    n_classes : int
    k : int or None
        Neighbours (kNN only).
    distance : str or None
        ``"euclidean"`` or ``"cosine"`` (kNN only).
    """

    accuracy: float
    per_class: pd.DataFrame
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_f1: float
    auc: float
    per_class_auc: np.ndarray
    confusion: pd.DataFrame
    predictions: np.ndarray
    test_labels: np.ndarray
    train_idx: np.ndarray
    test_idx: np.ndarray
    method: str
    n_classes: int
    k: int | None = None
    distance: str | None = None


def _rows_as_samples(embedding: Any, func: str, name: str = "embedding", what: str = "an n x k matrix") -> np.ndarray:
    """``embedding`` as a finite float64 n × k array (rows = samples), or an InputError naming ``name``."""
    try:
        E = np.asarray(embedding.to_numpy() if hasattr(embedding, "to_numpy") else embedding, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise param_error(name, func, f"{what} (rows = samples)", type(embedding).__name__, described=True) from e
    if E.ndim != 2:
        raise param_error(name, func, f"{what}, 2-D (rows = samples)", f"an array with {E.ndim} dimension(s)",
                          described=True)
    if not np.all(np.isfinite(E)):
        raise param_error(name, func, "a finite matrix", "a matrix with NaN or Inf", described=True)
    return E


def _split(n: int, test_idx: Any, test_fraction: float, seed: int | None, func: str) -> tuple[np.ndarray, np.ndarray]:
    if test_idx is None:
        test_fraction = check_float(test_fraction, "test_fraction", func, low=0.0, high=1.0, low_open=True,
                                    high_open=True)
        n_test = max(1, int(round(n * test_fraction)))
        test = np.sort(np.random.default_rng(seed).choice(n, size=n_test, replace=False))
    else:
        test = np.unique(np.asarray(test_idx, dtype=np.int64).ravel())
        if test.size == 0 or test.min() < 0 or test.max() >= n:
            raise param_error("test_idx", func, f"a non-empty set of 0-based indices in [0, {n - 1}]",
                              f"{test.size} indices in [{test.min() if test.size else '-'}, "
                              f"{test.max() if test.size else '-'}]", described=True)
    train = np.setdiff1d(np.arange(n), test)
    if train.size == 0:
        raise param_error("test_idx", func, "to leave at least one training sample", "every sample", described=True)
    return train, test


def _evaluate(embedding, labels, test_idx, test_fraction, seed, func, method, scorer, **extra) -> ClassifierEvaluation:
    E = _rows_as_samples(embedding, func)
    n = E.shape[0]
    codes, levels = as_factor(labels, n, "labels", func, n_what="nrow(embedding)")
    if np.any(codes < 0):
        raise param_error("labels", func, "labels without missing values", f"{int(np.sum(codes < 0))} missing",
                          described=True)
    C = len(levels)
    train, test = _split(n, test_idx, test_fraction, seed, func)
    scores = scorer(E[train], codes[train], E[test], C)
    m = split_metrics(codes[test], scores, C)
    p, r, f, support = m["per_class"]
    lv = np.asarray(levels, dtype=object)
    per_class = pd.DataFrame({"class": lv, "precision": p, "recall": r, "f1": f, "support": support})
    confusion = pd.crosstab(pd.Categorical(lv[codes[test]], categories=lv),
                            pd.Categorical(lv[m["pred"]], categories=lv), dropna=False,
                            rownames=["true"], colnames=["predicted"])
    weighted = float(np.sum(f * support) / support.sum()) if support.sum() else 0.0
    return ClassifierEvaluation(
        accuracy=m["accuracy"], per_class=per_class, macro_precision=m["precision"], macro_recall=m["recall"],
        macro_f1=m["f1"], weighted_f1=weighted, auc=m["auroc"], per_class_auc=m["per_class_auc"],
        confusion=confusion, predictions=lv[m["pred"]], test_labels=lv[codes[test]], train_idx=train,
        test_idx=test, method=method, n_classes=C, **extra)


def classify_embedding(embedding: Any, labels: Any, test_idx: Any = None, *, k: int = 5,
                       distance: str = "euclidean", test_fraction: float = 0.2,
                       seed: int | None = None) -> ClassifierEvaluation:
    """k-nearest-neighbour classification of samples from an embedding, one train/test split.

    Parameters
    ----------
    embedding : array-like of shape (n, k_dims)
        Rows are samples (e.g. ``model.h.T``).
    labels : array-like of shape (n,)
        Class labels (a pandas Categorical keeps its levels; otherwise sorted unique values).
    test_idx : array-like of int, optional
        0-based test sample indices; drawn at random (``test_fraction`` of n, at least 1) when omitted.
    k : int, default 5
        Neighbours; capped at n − 1. An error if the training set has fewer than k samples.
    distance : {"euclidean", "cosine"}, default "euclidean"
    test_fraction : float in (0, 1), default 0.2
    seed : int, optional
        Seed of the random test split.

    Returns
    -------
    ClassifierEvaluation
        With ``method="knn"``; the scores behind the AUROC are the neighbour vote fractions.

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.guided import classify_embedding
    >>> E = np.r_[np.zeros((10, 2)), np.ones((10, 2))] + np.linspace(0, 0.1, 20)[:, None]
    >>> classify_embedding(E, ["a"] * 10 + ["b"] * 10, seed=0, k=3).accuracy
    1.0
    """
    func = "classify_embedding"
    distance = check_option(distance, "distance", func, ("euclidean", "cosine"))
    E = _rows_as_samples(embedding, func)
    k = min(check_int(k, "k", func, low=1), max(E.shape[0] - 1, 1))

    def scorer(Xtr, ytr, Xte, C):
        if Xtr.shape[0] < k:
            raise param_error("k", func, f"at most the number of training samples ({Xtr.shape[0]})", k)
        return knn_scores(Xtr, ytr, Xte, C, k, metric=distance)

    return _evaluate(E, labels, test_idx, test_fraction, seed, func, "knn", scorer, k=k, distance=distance)


def classify_logistic(embedding: Any, labels: Any, test_idx: Any = None, *, test_fraction: float = 0.2,
                      seed: int | None = None) -> ClassifierEvaluation:
    """One-vs-rest logistic-regression classification from an embedding, one train/test split.

    Parameters and result as :func:`classify_embedding` (``method="logistic"``); one unpenalized
    binomial GLM per class on the raw embedding, probabilities renormalized to sum 1.
    """
    return _evaluate(embedding, labels, test_idx, test_fraction, seed, "classify_logistic", "logistic",
                     lambda Xtr, ytr, Xte, C: lr_scores(Xtr, ytr, Xte, C))


def classify_rf(embedding: Any, labels: Any, test_idx: Any = None, *, test_fraction: float = 0.2,
                seed: int | None = None) -> ClassifierEvaluation:
    """Random-forest classification (500 trees) from an embedding, one train/test split.

    Parameters and result as :func:`classify_embedding` (``method="rf"``); ``seed`` also seeds
    the forest (None: scikit-learn's fresh randomness).
    """
    return _evaluate(embedding, labels, test_idx, test_fraction, seed, "classify_rf", "rf",
                     lambda Xtr, ytr, Xte, C: rf_scores(Xtr, ytr, Xte, C, seed))
