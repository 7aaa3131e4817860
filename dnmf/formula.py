"""Formula mode of ``nmfkc`` / ``nmfre``: ``"y1 + y2 ~ x1 + x2"`` with a data frame (spec §2).

Upstream's ``.nmfkc_parse_formula`` (R/nmfkc.R) with ``data``: the data frame has one row per
unit (sample); the left-hand columns become the rows of Y and the right-hand columns the rows
of A, both transposed so that units are columns (Y is P × N, A is K × N). No intercept is
added — as in R, put a column of ones in the frame and name it on the right to get one.

* ``.`` on one side means "every column not named on the other side" (not on both sides).
* A right-hand side of ``0`` or ``-1`` (or ``0 + .`` …), or an empty one, omits A (plain NMF).
* ``0`` and ``-1`` terms inside a longer right-hand side are dropped.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import numpy as np

from ._validation import param_error
from .exceptions import InputError

logger = logging.getLogger(__name__)

__all__ = ["is_formula", "normalize_formula", "parse_formula", "resolve_formula", "formula_inputs",
           "new_covariates"]

_OMIT = {"0", "-1", "0 + .", "-1 + .", ". + 0", ". + -1"}


def is_formula(obj: Any) -> bool:
    """True for a formula string such as ``"y1 + y2 ~ x1"``."""
    return isinstance(obj, str) and "~" in obj


def normalize_formula(formula: str) -> str:
    """R's deparsed spacing: ``"y1+y2~x"`` → ``"y1 + y2 ~ x"``."""
    return re.sub(r"\s*~\s*", " ~ ", re.sub(r"\s*\+\s*", " + ", " ".join(formula.split()))).strip()


def _terms(side: str) -> list[str]:
    cols = [c for c in re.split(r"[ +~]", side) if c != ""]
    return [c for c in cols if c not in ("0", "-1")]


def parse_formula(formula: str, columns, func: str) -> tuple[list[str], Optional[list[str]]]:
    """The Y columns and the A columns (None when A is omitted) named by ``formula``."""
    if formula.count("~") != 1:
        raise InputError(f"The 'Y' parameter of {func} must be a formula with one '~' such as "
                         f"'y1 + y2 ~ x1 + x2'. Got {formula!r} instead.")
    lhs, rhs = (" ".join(s.split()) for s in formula.split("~"))
    all_cols = [str(c) for c in columns]
    y_dot = lhs == "."
    a_missing = rhs == "" or rhs in _OMIT
    a_dot = not a_missing and rhs == "."
    if y_dot and a_dot:
        raise InputError(f"Formula error in {func}: '.' cannot be used on both the left (Y) and right (A) sides.")
    Y_cols = None if y_dot else _terms(lhs)
    A_cols = None if (a_missing or a_dot) else _terms(rhs)
    used = list(dict.fromkeys((Y_cols or []) + (A_cols or [])))
    remaining = [c for c in all_cols if c not in used]
    if y_dot:
        Y_cols = remaining
        if not Y_cols:
            raise InputError(f"Formula error in {func}: '.' for Y leaves no columns.")
    elif a_dot:
        A_cols = remaining
        if not A_cols:
            raise InputError(f"Formula error in {func}: '.' for A leaves no columns.")
    if not Y_cols:
        raise InputError(f"Formula error in {func}: the left-hand side {lhs!r} names no columns.")
    for what, cols in (("Y", Y_cols), ("A", A_cols or [])):
        missing = [c for c in cols if c not in all_cols]
        if missing:
            raise InputError(f"Formula error in {func}: {what} columns not found in data: {', '.join(missing)}. "
                             f"Valid columns: {', '.join(all_cols)}.")
    return Y_cols, A_cols


def _block(data, cols: list[str], what: str, func: str):
    import pandas as pd

    block = data[cols]
    try:
        values = block.to_numpy(dtype=float)
    except (TypeError, ValueError) as e:
        bad = [c for c in cols if not pd.api.types.is_numeric_dtype(data[c]) and not pd.api.types.is_bool_dtype(data[c])]
        raise InputError(f"Formula error in {func}: {what} columns must be numeric; not numeric: "
                         f"{', '.join(bad) or ', '.join(cols)}.") from e
    index = [str(i) for i in data.index]
    return pd.DataFrame(values.T, index=cols, columns=index)


def resolve_formula(formula: str, data, func: str):
    """``(Y, A, formula_meta)`` from a formula and a data frame with one row per unit.

    Y is a DataFrame (len(Y_cols) × n_rows) indexed by the Y column names, A likewise or None,
    and ``formula_meta`` is ``{"formula", "Y_cols", "A_cols"}`` (R's ``formula.meta``).
    """
    import pandas as pd

    if data is None:
        raise InputError(f"The 'data' parameter of {func} must be a pandas DataFrame when Y is a formula. "
                         "Got None instead.")
    if not isinstance(data, pd.DataFrame):
        if isinstance(data, dict):
            data = pd.DataFrame(data)
        else:
            raise InputError(f"The 'data' parameter of {func} must be a pandas DataFrame (or a dict of columns). "
                             f"Got {type(data).__name__} instead.")
    data = data.rename(columns=str)
    Y_cols, A_cols = parse_formula(formula, data.columns, func)
    Y = _block(data, Y_cols, "Y", func)
    A = None if A_cols is None else _block(data, A_cols, "A", func)
    if A is None:
        logger.info("%s: A (covariate matrix) is omitted; fitting plain NMF Y ~ X B.", func)
    norm = normalize_formula(formula)
    meta = {"formula": norm, "Y_cols": tuple(Y_cols), "A_cols": None if A_cols is None else tuple(A_cols)}
    return Y, A, meta


def formula_inputs(Y, A, data, func: str):
    """``(Y, A, formula_meta)`` for a fit that takes ``Y`` as a matrix or a formula string.

    A formula takes Y and A from ``data`` (and then A must not be given; ``formula_meta`` as in
    :func:`resolve_formula`); a matrix Y passes through with ``formula_meta=None`` and must
    come without ``data``. Shared by ``nmfkc`` and ``nmfre``.
    """
    if is_formula(Y):
        if A is not None:
            raise param_error("A", func, "None when Y is a formula (A comes from the right-hand side)",
                              "an array", described=True)
        return resolve_formula(Y, data, func)
    if data is not None:
        raise param_error("data", func, "None unless Y is a formula string such as 'y1 + y2 ~ x1'",
                          "a data frame", described=True)
    return Y, A, None


def new_covariates(meta: dict, newdata, func: str = "predict") -> np.ndarray:
    """A (K × M) for ``predict(newdata=...)`` from the stored ``formula_meta``."""
    import pandas as pd

    if meta.get("A_cols") is None:
        raise InputError(f"{func}: the model was fitted without covariates; 'newdata' cannot be used.")
    newdata = pd.DataFrame(newdata).rename(columns=str)
    missing = [c for c in meta["A_cols"] if c not in newdata.columns]
    if missing:
        raise InputError(f"{func}: 'newdata' is missing required columns: {', '.join(missing)}.")
    return newdata[list(meta["A_cols"])].to_numpy(dtype=float).T
