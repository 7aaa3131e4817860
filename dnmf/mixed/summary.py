"""Text output of NMF-RE fits: R's ``summary.nmfre`` and ``print`` (spec/nmfre.md §7).

* Engine "cap" fits print the 2026-03 (reference commit ``56d65eb``) summary of §7.1,
  character for character.
* Engine "ecm" fits print the HEAD summary of §7.2.

One deliberate difference from upstream: the CI heading uses the stored ``wild_level``
(upstream always prints "95%" because it never stores the level, §12.10).
"""

from __future__ import annotations

import math

import numpy as np

from ..covariates._common import stars

__all__ = ["format_summary", "format_print", "format_coef_lines", "r_format_digits1", "format_pvalue", "stars"]

SIGNIF_LINE = "Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1"


def r_format_digits1(x: float) -> str:
    """R's ``format(x, digits=1)`` for a positive scalar: fixed unless scientific is shorter."""
    if not np.isfinite(x):
        return "NA" if np.isnan(x) else ("Inf" if x > 0 else "-Inf")
    if x == 0:
        return "0"
    mant, exp = f"{x:.0e}".split("e")
    sci = f"{mant}e{int(exp):+03d}"
    val = float(sci)
    e = int(math.floor(math.log10(abs(val))))
    fixed = f"{val:.{max(0, -e)}f}"
    return fixed if len(fixed) <= len(sci) else sci


def format_pvalue(p: float) -> str:
    """``  <2e-16`` below 2.2e-16, ``      NA`` when not finite, else C ``%.4g`` right-justified to 8."""
    if not np.isfinite(p):
        return "      NA"
    if p < 2.2e-16:
        return "  <2e-16"
    return f"{p:.4g}".rjust(8)


def format_coef_lines(table, side: str, rows=None) -> list[str]:
    """Header and rows of the coefficient block (spec §7.1 item 5)."""
    if rows is None:
        rows = range(len(table))
    rows = list(rows)
    labels = [f"{table['Covariate'].iloc[i]}:{table['Basis'].iloc[i]}" for i in rows]
    width = max(len(s) for s in labels) if labels else 0
    show_boot = bool(np.any(np.isfinite(table["BSE"].to_numpy(dtype=float))))
    pname = "Pr(>z)" if side == "one.sided" else "Pr(>|z|)"
    heads = ["Estimate".rjust(9), "Std. Error".rjust(10)]
    if show_boot:
        heads.append("(Boot)".rjust(6))
    heads += ["z value".rjust(7), pname.rjust(8), ""]
    out = [" " * width + " " + " ".join(heads)]
    for lab, i in zip(labels, rows):
        r = table.iloc[i]
        fields = [f"{r['Estimate']:9.3f}", f"{r['SE']:10.3f}"]
        if show_boot:
            fields.append(f"{r['BSE']:6.3f}")
        fields += [f"{r['z_value']:7.2f}", format_pvalue(r["p_value"]), stars(r["p_value"])]
        out.append(lab.rjust(width) + " " + " ".join(fields))
    return out


def _ci_lines(fit, rows) -> list[str]:
    t = fit.coefficients
    level = 100 * (fit.wild_level if fit.wild_level is not None else 0.95)
    labels = [f"{t['Covariate'].iloc[i]}:{t['Basis'].iloc[i]}" for i in rows]
    out = ["", f"{level:.0f}% Bootstrap CI:"]
    for lab, i in zip(labels, rows):
        out.append(f"  {lab}: [{t['CI_low'].iloc[i]:9.3f}, {t['CI_high'].iloc[i]:9.3f}]")
    return out


def _header(fit) -> str:
    P, N, Q, K = fit.shape
    return f"NMF-RE: Y({P},{N}) = X({P},{Q}) [C({Q},{K}) A + U({Q},{N})]"


def _variance_lines(fit, with_cap: bool) -> list[str]:
    out = [
        "",
        "Variance components:",
        f"  sigma2 = {fit.sigma2:.4g}  (residual)",
        f"  tau2   = {fit.tau2:.4g}  (random effect)",
        f"  lambda = {fit.lambda_:.4g}  (sigma2 / tau2)",
        f"  ICC    = {fit.ICC:.4f}  (tau2*tr(X'X) / (tau2*tr(X'X) + sigma2*P))",
    ]
    if with_cap and np.isfinite(fit.dfU_cap):
        out.append(f"  dfU    = {fit.dfU:.2f} <= {fit.dfU_cap:.2f} (cap rate = {fit.dfU_cap_rate:.2f})")
    else:
        out.append(f"  dfU    = {fit.dfU:.2f}")
    return out


def _summary_cap(fit, show_ci: bool) -> str:
    status = "converged" if fit.converged else "NOT converged"
    r2 = f"R-squared: {fit.r_squared:.4f} (XB+blup)"
    if np.isfinite(fit.r_squared_fixed):
        r2 += f", {fit.r_squared_fixed:.4f} (XB)"
    lines = [_header(fit), f"Iterations: {fit.n_iter} ({status}, epsilon = {r_format_digits1(fit.epsilon)})", r2]
    lines += _variance_lines(fit, with_cap=True)
    if fit.coefficients is not None:
        lines += ["", "Coefficients:"]
        lines += format_coef_lines(fit.coefficients, fit.C_p_side)
        lines += ["---", SIGNIF_LINE]
        if show_ci:
            lines += _ci_lines(fit, range(len(fit.coefficients)))
    return "\n".join(lines)


def convergence_text(fit) -> str:
    """Upstream ``.print.convergence``: ``<iter> / <maxit> (converged)  epsilon = …`` (+ outer)."""
    status = "converged" if fit.converged else "NOT converged"
    s = f"{fit.n_iter} / {fit.maxit} ({status})  epsilon = {fit.epsilon:g}"
    if not fit.converged:
        s += f"  [{fit.stop_reason}]"
    if fit.outer_iter is not None:
        s += f"  outer {fit.outer_iter} / {fit.outer_maxit}"
    return s


def _effective_rank(B: np.ndarray) -> float:
    v = B.var(axis=1, ddof=1)
    p = v / v.sum() if v.sum() > 0 else np.full(len(v), 1.0 / len(v))
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def _summary_ecm(fit, show_ci: bool, max_coef: int, by: str) -> str:
    lines = [_header(fit), "Iterations: " + convergence_text(fit)]
    lines.append(f"R-squared (cor^2):    {fit.r_squared_cor2:.4f} (XB+blup), {fit.r_squared_fixed_cor2:.4f} (XB)")
    lines.append(f"R-squared (uncentered):     {fit.r_squared_uncentered:.4f} (XB+blup), "
                 f"{fit.r_squared_fixed_uncentered:.4f} (XB)")
    lines.append(f"R-squared (centered): {fit.r_squared_centered:.4f} (XB+blup), "
                 f"{fit.r_squared_fixed_centered:.4f} (XB)")
    Q = fit.shape[2]
    if Q >= 2:
        er = _effective_rank(fit.B_blup)
        lines.append(f"Effective Rank:       {er:.2f} / {Q}  ({100 * er / Q:.1f}%)")
    lines += _variance_lines(fit, with_cap=False)
    t = fit.coefficients
    if t is None:
        lines += ["", "Coefficients (Theta): run nmfre_inference(fit, Y, A) for SE / p-values."]
        return "\n".join(lines)
    Qn = len(fit.basis_names)
    idx = list(range(len(t)))
    if by == "covariate":
        idx.sort(key=lambda i: (i // Qn, i % Qn))
    else:
        idx.sort(key=lambda i: (i % Qn, i // Qn))
    note = None
    if len(idx) > max_coef:
        keep = [i for i in idx if np.isfinite(t["p_value"].iloc[i]) and t["p_value"].iloc[i] < 0.05]
        note = f"(showing {len(keep)} of {len(idx)} coefficients; use x.coefficients for all)"
        idx = keep
    lines += ["", "Coefficients:"]
    if idx:
        lines += format_coef_lines(t, fit.C_p_side, idx)
    if note:
        lines.append(note)
    lines += ["---", SIGNIF_LINE]
    kind = "sign-free (real-valued)" if fit.C_signed else "non-negative"
    lines.append(f"C (= Theta) update: {kind}; p-values {fit.C_p_side}")
    if show_ci:
        lines += _ci_lines(fit, idx)
    return "\n".join(lines)


def format_summary(fit, show_ci: bool = False, max_coef: int = 20, by: str = "covariate") -> str:
    """``summary(fit)`` text: §7.1 layout for engine "cap", §7.2 for engine "ecm"."""
    from .._validation import check_int, check_option

    by = check_option(by, "by", "NMFREResult.summary", ("covariate", "basis"))
    max_coef = check_int(max_coef, "max_coef", "NMFREResult.summary", low=1)
    if fit.engine == "cap":
        return _summary_cap(fit, bool(show_ci))
    return _summary_ecm(fit, bool(show_ci), max_coef, by)


def format_print(fit) -> str:
    """``print(fit)`` (upstream ``print.nmf``): call, model, convergence, R², hint."""
    meta = getattr(fit, "formula_meta", None)
    return "\n".join([
        "",
        "Call:",
        fit.call,
        "",
        *([f"Formula:     {meta['formula']}"] if meta is not None else []),
        f"Model:       {fit.dims}",
        f"Convergence: {convergence_text(fit)}",
        f"R-squared:   {fit.r_squared:.4g}",
        "",
        "Use .coef() for the coefficient matrix, .summary() for diagnostics.",
        "",
    ])
