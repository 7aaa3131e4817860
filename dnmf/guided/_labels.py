"""Label handling shared by the guided-NMF helpers: R's ``as.factor`` in pandas terms."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .._validation import param_error

__all__ = ["as_factor"]


def as_factor(labels: Any, n: int, name: str, func: str, *, n_what: str = "ncol(H)") -> tuple[np.ndarray, list]:
    """Coerce ``labels`` to integer codes and levels like R's ``as.factor``.

    Parameters
    ----------
    labels : array-like of shape (n,)
        Class labels; ``None``/NaN/``pd.NA`` mark unlabeled samples. A pandas Categorical (or a
        Series of category dtype) keeps its own level order, unused levels included; anything
        else gets the sorted unique non-missing values as levels.
    n : int
        Expected length.
    name, func : str
        Parameter and function named in the error.
    n_what : str
        How the expected length is described in the error ("ncol(H)", "the number of samples").

    Returns
    -------
    codes : ndarray of int64, shape (n,)
        Level index per sample, −1 for a missing label.
    levels : list
        The levels, in order.
    """
    if labels is None:
        raise param_error(name, func, f"a vector of length {n} ({n_what})", None)
    if isinstance(labels, pd.Series):
        labels = labels.array
    if isinstance(labels, pd.Categorical):
        cat = pd.Categorical(labels)
    else:
        arr = np.asarray(labels, dtype=object) if not isinstance(labels, np.ndarray) else labels
        if arr.ndim != 1:
            raise param_error(name, func, f"a 1-D vector of length {n} ({n_what})",
                              f"an array of shape {arr.shape}", described=True)
        cat = pd.Categorical(arr)
    if len(cat) != n:
        raise param_error(name, func, f"a vector of length {n} ({n_what})", f"length {len(cat)}", described=True)
    return np.asarray(cat.codes, dtype=np.int64), list(cat.categories)
