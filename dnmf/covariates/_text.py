"""Text output of ``nmfkc`` fits: R's ``print.nmf`` and ``print.summary.nmfkc`` (spec §7.2–7.3).

Also the R-style number formatting (``format(x, digits=)``) and the "Call:" string, which
mirrors R's ``deparse(match.call())``: ``nmfkc(Y = Y, A = A, rank = 2)``. Array arguments are
shown by their parameter name (R shows the caller's expression, which Python does not keep).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import numpy as np

__all__ = ["RawArg", "r_format", "r_deparse", "format_call", "convergence_text", "format_print", "format_summary",
           "HINT_LINE"]

HINT_LINE = "Use coef() for the coefficient matrix, summary() for diagnostics."


def r_format(x: float, digits: int = 4) -> str:
    """R's ``format(x, digits=digits)`` for one number (no ``scipen``).

    The fewest significant digits (at most ``digits``) that show x rounded to ``digits``
    significant digits, in fixed notation unless scientific is shorter.
    """
    if x is None:
        return "NULL"
    x = float(x)
    if math.isnan(x):
        return "NA"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    if x == 0:
        return "0"
    target = float(f"{x:.{digits - 1}e}")
    sig = digits
    for s in range(1, digits + 1):
        if float(f"{x:.{s - 1}e}") == target:
            sig = s
            break
    e = int(math.floor(math.log10(abs(target))))
    mant, ex = f"{target:.{sig - 1}e}".split("e")
    sci = f"{mant}e{int(ex):+03d}"
    fixed = f"{x:.{max(0, sig - 1 - e)}f}"
    return fixed if len(fixed) <= len(sci) else sci


class RawArg(str):
    """Text shown as is in a deparsed call (a formula)."""


def r_deparse(name: str, value: Any) -> str:
    """One argument of a deparsed call: scalars by value, arrays / frames by parameter name."""
    if isinstance(value, RawArg):
        return str(value)
    if value is None:
        return "NULL"
    if isinstance(value, (bool, np.bool_)):
        return "TRUE" if value else "FALSE"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        return f"{v:.15g}" if v != int(v) or abs(v) >= 1e15 else str(int(v))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return name


def format_call(func: str, args: Iterable[tuple[str, Any]]) -> str:
    """``func(name = value, ...)`` like R's ``deparse(match.call())`` (arguments as given)."""
    return f"{func}(" + ", ".join(f"{k} = {r_deparse(k, v)}" for k, v in args) + ")"


def convergence_text(fit) -> str:
    """Upstream ``.print.convergence``: ``<iter> / <maxit> (converged)  epsilon = %g``."""
    status = "(converged)" if fit.converged else "(NOT converged)"
    return f"{fit.n_iter} / {fit.maxit} {status}  epsilon = {fit.epsilon:g}"


def _call_block(call: str) -> list[str]:
    return ["", "Call:", call, ""] if call else [""]


def format_print(fit) -> str:
    """``print(fit)`` (upstream ``print.nmf``): call, formula, model, convergence, R², hint."""
    lines = _call_block(fit.call)
    meta = getattr(fit, "formula_meta", None)
    if meta is not None:
        lines.append(f"Formula:     {meta['formula']}")
    lines.append(f"Model:       {fit.dims}")
    lines.append(f"Convergence: {convergence_text(fit)}")
    if fit.r_squared is not None and np.isfinite(fit.r_squared):
        lines.append(f"R-squared:   {r_format(fit.r_squared, 4)}")
    elif np.isfinite(fit.objfunc):
        lines.append(f"Objective:   {r_format(fit.objfunc, 4)}")
    lines += ["", HINT_LINE, ""]
    return "\n".join(lines)


def format_summary(fit, digits: int = 4) -> str:
    """``print(summary(fit))`` (upstream ``print.summary.nmfkc``).

    R's ``cat(a, b, "\\n")`` puts one space between pieces, so most lines end in a space
    before the newline; kept so the text matches R's byte for byte.
    """
    f = lambda v: r_format(v, digits)  # noqa: E731
    lines = _call_block(fit.call)
    meta = getattr(fit, "formula_meta", None)
    if meta is not None:
        lines.append(f"Formula:     {meta['formula']} ")
    lines += [
        f"Dimensions: {fit.dims} ",
        f"Rank (Q):    {fit.rank} ",
        f"Runtime:     {r_deparse('runtime', round(fit.runtime, 1))}sec ",
        f"Method:      {fit.method} ",
        f"Iterations: {convergence_text(fit)}",
        f"Missing:     {fit.n_missing} ({100.0 * fit.n_missing / fit.n_total:.1f}%) ",
        "",
        "Statistics:",
        f"  Objective function:   {f(fit.objfunc)} ",
        f"  R-squared (cor^2):    {f(fit.r_squared)} ",
        f"  R-squared (uncentered):     {f(fit.r_squared_uncentered)} ",
        f"  R-squared (centered): {f(fit.r_squared_centered)} ",
        f"  Residual Std Error:   {f(fit.sigma)} ",
        f"  Mean Absolute Error:  {f(fit.mae)} ",
    ]
    crit = fit.criterion or {}
    if "ICp" in crit and crit["ICp"] is not None:
        lines.append("  ICp:" + " " * 18 + f"{f(crit['ICp'])} ")
    er = crit.get("effective_rank")
    if er is not None and np.isfinite(er):
        lines.append(f"  Effective Rank:      {er:.2f} / {fit.rank}")
    lines += ["", "Structure Diagnostics:"]
    lines.append(f"  Basis (X) Sparsity:    {100 * float(np.mean(fit.X < 1e-4)):.1f}% (< 1e-4)")
    if fit.B_prob is not None:
        lines.append(f"  Coef (B) Sparsity:     {100 * float(np.mean(fit.B_prob < 1e-4)):.1f}% (< 1e-4)")
        ent, crisp = crit.get("B_prob_entropy_mean"), crit.get("B_prob_max_mean")
        if ent is not None:
            lines.append(f"  Clustering Entropy:    {f(ent)} (range: 0-1, closer to 0 is better)")
            lines.append(f"  Clustering Crispness:  {f(crisp)} (range: 0-1, closer to 1 is better)")
    lines.append("")
    return "\n".join(lines)
