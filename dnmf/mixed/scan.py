"""``nmfre_dfu_scan``: refit Engine A at several df rates and pick one (spec/nmfre.md §4.1).

The table, the automatic rule and the loop live in :mod:`dnmf.mixed.scan_table` (below the
fit, which runs the same scan when ``df_rate=None``); this module adds the public function on
top of :func:`dnmf.mixed.nmfre.fit_at_rate` and keeps the names it has always exported.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .nmfre import fit_at_rate
from .scan_table import (  # noqa: F401 - importable from here, as before
    COLUMNS,
    R_NAMES,
    DfUScanResult,
    choose_rate,
    r_format_table,
    run_dfu_scan,
    scan_row,
)

__all__ = ["nmfre_dfu_scan", "DfUScanResult", "scan_row", "choose_rate", "r_format_table"]


def nmfre_dfu_scan(
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
    """Fit Engine A at each df rate and tabulate dfU, the cap flags and the variances (§4.1).

    Parameters
    ----------
    rates : sequence of float, optional
        Positive df rates; None means 0.1, 0.2, …, 1.0.
    Y : array-like of shape (P, N)
    A : array-like of shape (K, N), optional
    rank : int, default 2
    X_init, C_init, U_init : array-like, optional
        Starting values shared by every rate (default: each fit initialises with nmfkc).
    wild_bootstrap : bool, default False
        Upstream forwards its default True to every fit; it changes no table entry, so it is
        off here.
    client : distributed.Client, optional
        The rates run as parallel tasks (default: the active client, else a thread pool).
    **kwargs
        Forwarded to :func:`dnmf.nmfre` (``epsilon``, ``maxit``, ``seed``, ``prefix``, …).

    Returns
    -------
    DfUScanResult
        ``str()`` prints the table as R does.

    Examples
    --------
    >>> scan = dnmf.nmfre_dfu_scan(None, Y, A, rank=1)  # doctest: +SKIP
    >>> scan.cap_rate                                    # doctest: +SKIP
    0.3
    """
    return run_dfu_scan(fit_at_rate, rates, Y, A, rank, X_init, C_init, U_init,
                        wild_bootstrap=wild_bootstrap, client=client, **kwargs)
