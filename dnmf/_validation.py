"""Parameter validation with one message template (CONVENTIONS §9).

"The 'tol' parameter of nmf must be a float in [0, inf). Got -1 instead."
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable

import numpy as np

from .exceptions import InputError


def param_error(name: str, func: str, expected: str, got: Any, *, described: bool = False) -> InputError:
    """Build the standard InputError for parameter ``name`` of ``func``.

    ``got`` is shown with ``repr`` (the value the user passed) unless ``described``, where it is
    a description written out as is ("an all-zero 30 × 20 matrix"). The parts are kept on the
    error (``parameter``, ``expected``, ``got``, ``described``) so that a wrapper with its own
    parameter names (the scikit-learn estimator) can re-issue it in its dialect.
    """
    shown = got if described else repr(got)
    err = InputError(f"The '{name}' parameter of {func} must be {expected}. Got {shown} instead.")
    err.parameter, err.expected, err.got, err.described = name, expected, got, described
    return err


def check_int(value: Any, name: str, func: str, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as int if it is an integer in [low, high], else raise InputError."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise param_error(name, func, f"an int in [{lo}, {hi}]", value)
    return int(value)


def check_float(
    value: Any,
    name: str,
    func: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as float if it is a finite real in the interval, else raise InputError."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if ok and low is not None and (value < low or (low_open and value == low)):
        ok = False
    if ok and high is not None and (value > high or (high_open and value == high)):
        ok = False
    if not ok:
        lo = "-inf" if low is None else repr(float(low))
        hi = "inf" if high is None else repr(float(high))
        bracket = "(" if low_open or low is None else "["
        close = "]" if high is not None and not high_open else ")"
        raise param_error(name, func, f"a float in {bracket}{lo}, {hi}{close}", value)
    return float(value)


def check_option(value: Any, name: str, func: str, options: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``options``, else raise InputError listing them."""
    options = list(options)
    if not isinstance(value, str) or value not in options:
        raise param_error(name, func, "one of " + ", ".join(repr(o) for o in options), value)
    return value


def check_pair(value: Any, name: str, func: str, *, low: float | None = 0.0, high: float | None = None,
               high_open: bool = False) -> tuple[float, float]:
    """Normalize an RcppML-style (W-side, H-side) pair; a scalar is recycled to both sides."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value, value)
    try:
        a, b = value
    except (TypeError, ValueError):
        raise param_error(name, func, "a float or a pair of floats (W side, H side)", value) from None
    return tuple(check_float(v, name, func, low=low, high=high, high_open=high_open) for v in (a, b))


def check_bool_pair(value: Any, name: str, func: str) -> tuple[bool, bool]:
    """Normalize a (W-side, H-side) pair of booleans; a scalar is recycled."""
    if isinstance(value, (bool, np.bool_)):
        return (bool(value), bool(value))
    try:
        a, b = value
    except (TypeError, ValueError):
        raise param_error(name, func, "a bool or a pair of bools (W side, H side)", value) from None
    if not all(isinstance(v, (bool, np.bool_)) for v in (a, b)):
        raise param_error(name, func, "a bool or a pair of bools (W side, H side)", value)
    return (bool(a), bool(b))
