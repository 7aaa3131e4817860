"""The df scan of Engine A below the fit: table rows, the automatic rule, R's print and the
loop over rates (spec/nmfre.md §4.1).

Every rate is an independent, deterministic fit (each re-initialises from the same start), so
the rates run as parallel tasks through :func:`dnmf.engine.executor.get_executor`.
:func:`run_dfu_scan` takes the fit at one rate as an argument: :func:`dnmf.nmfre` (automatic
scan, ``df_rate=None``) and :func:`dnmf.mixed.scan.nmfre_dfu_scan` both pass
:func:`dnmf.mixed.nmfre.fit_at_rate`, so this module sits below both and imports neither.

The automatic choice follows the code, not the 2026-03 vignette's prose (§4.1, §12.16):

1. the **largest** rate among rows with ``safeguard & hit & converged``;
2. else the **smallest** rate among rows with ``safeguard & ~hit & converged``;
3. else NaN (then :func:`dnmf.nmfre` stops with an error).

``safeguard`` is ``dfU/dfU_cap < 0.99`` (the cap is not binding at the end) and ``hit`` means
the cap bound in at least one iteration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .._validation import check_float, param_error
from ..covariates._common import executor_for
from ._core import DEFAULT_RATES, validate_inputs

logger = logging.getLogger(__name__)

__all__ = ["run_dfu_scan", "DfUScanResult", "scan_row", "choose_rate", "r_format_table", "COLUMNS", "R_NAMES"]

COLUMNS = ("rate", "dfU_cap", "dfU", "safeguard", "hit", "converged", "tau2", "sigma2", "ICC")
R_NAMES = ("rate", "dfU.cap", "dfU", "safeguard", "hit", "converged", "tau2", "sigma2", "ICC")


def _r_round(x: float, digits: int) -> float:
    return float(np.round(x, digits)) if np.isfinite(x) else float("nan")


def scan_row(rate: float, fit) -> dict:
    """One row of the scan table from an Engine-A fit at ``rate`` (spec §4.1 table)."""
    cap = fit.dfU_cap
    if np.isfinite(fit.dfU) and np.isfinite(cap) and cap > 0:
        safeguard = bool(fit.dfU / cap < 0.99)
    else:
        safeguard = None
    return {
        "rate": float(rate),
        "dfU_cap": float(cap),
        "dfU": _r_round(fit.dfU, 2),
        "safeguard": safeguard,
        "hit": bool(fit.dfU_hit_cap),
        "converged": bool(fit.converged),
        "tau2": _r_round(fit.tau2, 3),
        "sigma2": _r_round(fit.sigma2, 3),
        "ICC": _r_round(fit.ICC, 4),
    }


def choose_rate(table) -> float:
    """The automatic ``cap_rate`` of a scan table (NaN when no row qualifies)."""
    sg = np.array([v is not None and v == v and bool(v) for v in table["safeguard"]], dtype=bool)
    hit = table["hit"].to_numpy(dtype=bool)
    conv = table["converged"].to_numpy(dtype=bool)
    first = table.loc[sg & hit & conv, "rate"]
    if len(first):
        return float(first.max())
    second = table.loc[sg & ~hit & conv, "rate"]
    if len(second):
        return float(second.min())
    return float("nan")


def _r_decimals(values: np.ndarray, digits: int = 7) -> int:
    """Decimals R's ``format`` gives a numeric column: enough for every value at ``digits`` significant."""
    dec = 0
    for v in values:
        if not np.isfinite(v) or v == 0:
            continue
        e = int(np.floor(np.log10(abs(v))))
        s = f"{v:.{max(0, digits - 1 - e)}f}".rstrip("0")
        dec = max(dec, len(s.split(".")[1]) if "." in s else 0)
    return dec


def r_format_table(table, names: Sequence[str] = R_NAMES) -> str:
    """The table as R's ``print.data.frame`` shows it (row names 1..n left-justified)."""
    cols = []
    for col, name in zip(table.columns, names):
        v = table[col].to_numpy()
        if v.dtype == object or v.dtype == bool:
            cells = ["NA" if x is None else ("TRUE" if x else "FALSE") for x in v]
        else:
            v = v.astype(float)
            d = _r_decimals(v)
            cells = ["NA" if not np.isfinite(x) else f"{x:.{d}f}" for x in v]
        w = max(len(name), *(len(c) for c in cells))
        cols.append([name.rjust(w)] + [c.rjust(w) for c in cells])
    rn = [""] + [str(i + 1) for i in range(len(table))]
    rw = max(len(r) for r in rn)
    lines = []
    for i in range(len(rn)):
        lines.append(rn[i].ljust(rw) + " " + " ".join(c[i] for c in cols))
    return "\n".join(lines)


@dataclass(frozen=True)
class DfUScanResult:
    """Result of :func:`nmfre_dfu_scan`.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per rate: ``rate, dfU_cap, dfU (2 d.p.), safeguard, hit, converged,
        tau2 (3 d.p.), sigma2 (3 d.p.), ICC (4 d.p.)``.
    cap_rate : float
        The automatic choice (NaN when none qualifies).
    fits : tuple of NMFREResult
        The fit at each rate.
    """

    table: object
    cap_rate: float
    fits: tuple = ()

    def __str__(self) -> str:
        return r_format_table(self.table)


def run_dfu_scan(
    fit_at_rate,
    rates: Optional[Sequence[float]],
    Y,
    A=None,
    rank: int = 2,
    X_init=None,
    C_init=None,
    U_init=None,
    *,
    wild_bootstrap: bool = False,
    client=None,
    **kwargs,
) -> DfUScanResult:
    """The body of :func:`dnmf.mixed.scan.nmfre_dfu_scan` (same parameters after the first).

    ``fit_at_rate(rate, Y, A, kw)`` fits Engine A at one rate (a module-level function, so it
    travels to Dask workers).
    """
    import pandas as pd

    func = "nmfre_dfu_scan"
    if rates is None:
        rates = DEFAULT_RATES
    try:
        rates = [check_float(r, "rates", func, low=0.0, low_open=True) for r in rates]
    except TypeError as e:
        raise param_error("rates", func, "a sequence of positive floats", rates) from e
    if not rates:
        raise param_error("rates", func, "a non-empty sequence of positive floats", rates)
    inp = validate_inputs(Y, A, func)
    if "engine" in kwargs and kwargs["engine"] != "cap":
        raise param_error("engine", func, "'cap' (the scan refits the df-cap engine)", kwargs["engine"])
    kw = dict(kwargs, rank=rank, X_init=X_init, C_init=C_init, U_init=U_init, wild_bootstrap=wild_bootstrap,
              client=False, engine="cap")
    Ydf = _with_names(inp)
    with executor_for(client) as ex:
        fits = ex.map(fit_at_rate, rates, args=(Ydf[0], Ydf[1], kw))
    table = pd.DataFrame([scan_row(r, f) for r, f in zip(rates, fits)], columns=list(COLUMNS))
    table["safeguard"] = table["safeguard"].astype(object)
    rate = choose_rate(table)
    logger.info("nmfre_dfu_scan: cap_rate=%s", rate)
    return DfUScanResult(table=table, cap_rate=rate, fits=tuple(fits))


def _with_names(inp):
    """Y and A as DataFrames carrying the labels of the validated inputs (so fits keep names)."""
    import pandas as pd

    Y = pd.DataFrame(inp.Y, index=list(inp.feature_names) if inp.feature_names else None,
                     columns=list(inp.sample_names) if inp.sample_names else None)
    A = pd.DataFrame(inp.A, index=list(inp.covariate_names) if inp.covariate_names else None) \
        if inp.A_given else None
    return Y, A
