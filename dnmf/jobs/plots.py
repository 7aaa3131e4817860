"""PNG plots of a run (matplotlib's Agg canvas; no pyplot state, no display needed).

Each function returns a :class:`matplotlib.figure.Figure`; :func:`save_png` writes one.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

__all__ = ["save_png", "convergence", "factor_heatmap", "top_features", "growth_curves", "random_effects"]


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path, dpi: int = 110) -> str:
    """Write ``fig`` as a PNG at ``path``; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.savefig(str(path), dpi=dpi, format="png")
    return str(path)


def convergence(loss: Sequence[float], *, tol: Sequence[float] | None = None, title: str = "Convergence",
                ylabel: str = "loss (SSE)"):
    """Loss per iteration (log scale when positive), with the relative change on a second panel."""
    loss = np.asarray(loss, dtype=float)
    it = np.arange(1, len(loss) + 1)
    panels = 2 if tol is not None and len(tol) else 1
    fig = _figure((5.5, 3.2 * panels))
    ax = fig.add_subplot(panels, 1, 1)
    ax.plot(it, loss, "-o", ms=2.5, lw=1.2, color="tab:blue")
    if len(loss) and np.all(loss > 0):
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if panels == 2:
        tol = np.asarray(tol, dtype=float)
        ax2 = fig.add_subplot(2, 1, 2)
        ok = tol > 0
        ax2.semilogy(np.arange(1, len(tol) + 1)[ok], tol[ok], "-o", ms=2.5, lw=1.2, color="tab:orange")
        ax2.set_xlabel("iteration")
        ax2.set_ylabel("relative loss change")
    fig.tight_layout()
    return fig


def factor_heatmap(w: np.ndarray, *, row_names: Sequence[str] | None = None, top: int = 5,
                   title: str = "Top features per factor"):
    """Heatmap of W (m × k) on the union of each factor's ``top`` features, columns scaled to max 1."""
    w = np.asarray(w, dtype=float)
    m, k = w.shape
    top = max(1, min(top, m))
    rows: list[int] = []
    for r in range(k):
        for i in np.argsort(-w[:, r], kind="stable")[:top]:
            if i not in rows:
                rows.append(int(i))
    sub = w[rows]
    sub = sub / np.maximum(sub.max(axis=0, keepdims=True), 1e-300)
    fig = _figure((1.2 + 0.45 * k, 1.5 + 0.16 * len(rows)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(sub, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xticks(range(k))
    ax.set_xticklabels([str(r + 1) for r in range(k)])
    ax.set_xlabel("factor")
    ax.set_yticks(range(len(rows)))
    labels = [str(row_names[i]) for i in rows] if row_names is not None else [str(i) for i in rows]
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="W / max(W column)")
    fig.tight_layout()
    return fig


def top_features(table, *, title: str = "Top features per factor", ncols: int = 5):
    """One horizontal bar chart per factor of its top features, labelled by name.

    ``table`` is :meth:`dnmf.models.NMFModel.top_features`'s DataFrame (columns ``factor``,
    ``rank``, ``feature``, ``weight``); bars are the ``weight`` (the feature's share of the
    factor), the top feature on top.
    """
    factors = sorted(int(f) for f in table["factor"].unique())
    k = len(factors)
    ncols = max(1, min(ncols, k))
    nrows = -(-k // ncols)
    n_top = int(table["rank"].max()) if len(table) else 1
    fig = _figure((2.3 * ncols, 0.6 + (0.16 * n_top + 0.5) * nrows))
    for i, f in enumerate(factors):
        rows = table[table["factor"] == f].sort_values("rank")
        ax = fig.add_subplot(nrows, ncols, i + 1)
        y = np.arange(len(rows))
        ax.barh(y, rows["weight"].to_numpy(dtype=float), color="tab:blue")
        ax.set_yticks(y)
        ax.set_yticklabels([str(v) for v in rows["feature"]], fontsize=6)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(f"factor {f + 1}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def numeric_axis(names: Sequence[str] | None, n: int) -> tuple[np.ndarray, str]:
    """x values from feature names carrying one number each ("Age 8" → 8), else 1..n."""
    if names is not None and len(names) == n:
        nums = [re.findall(r"-?\d+(?:\.\d+)?", str(s)) for s in names]
        if all(len(v) == 1 for v in nums):
            label = re.sub(r"\s*-?\d+(?:\.\d+)?\s*", "", str(names[0])) or "feature"
            return np.array([float(v[0]) for v in nums]), label
    return np.arange(1, n + 1, dtype=float), "feature"


def growth_curves(Y: np.ndarray, XB: np.ndarray, XB_blup: np.ndarray, *, feature_names=None,
                  group: np.ndarray | None = None, group_labels: tuple[str, str] = ("group 1", "group 0"),
                  title: str = "NMF-RE growth curves"):
    """Observed columns of Y (points), fixed-effect fits XΘA (solid) and BLUP fits X(ΘA+U) (dotted).

    ``group`` (length N, 0/1) switches the marker of the observed points (× for 1, ○ for 0).
    """
    Y, XB, XB_blup = (np.asarray(v, dtype=float) for v in (Y, XB, XB_blup))
    P, N = Y.shape
    x, xlabel = numeric_axis(feature_names, P)
    fig = _figure((6, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for j in range(N):
        marker = "x" if group is not None and group[j] == 1 else "o"
        ax.plot(x, Y[:, j], marker, color="0.6", ms=4, mfc="none")
    for j in range(N):
        ax.plot(x, XB_blup[:, j], ":", color="steelblue", lw=0.8)
    for j in range(N):
        ax.plot(x, XB[:, j], "-", color="red", lw=2)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="red", lw=2, label="fixed effect XΘA"),
               Line2D([], [], color="steelblue", ls=":", label="fixed + random (BLUP)")]
    if group is not None:
        handles += [Line2D([], [], ls="", marker="x", color="0.6", label=f"{group_labels[0]} (observed)"),
                    Line2D([], [], ls="", marker="o", mfc="none", color="0.6", label=f"{group_labels[1]} (observed)")]
    else:
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="0.6", label="observed"))
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("value")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def random_effects(U: np.ndarray, *, sample_names=None, basis_names=None, group: np.ndarray | None = None,
                   group_labels: tuple[str, str] = ("group 1", "group 0"), title: str = "Random effects U"):
    """One bar chart per basis row of U (Q × N), bars coloured by ``group`` when given."""
    U = np.asarray(U, dtype=float)
    Q, N = U.shape
    fig = _figure((max(5.0, 0.22 * N + 1.5), 2.6 * Q + 0.6))
    names = [str(s) for s in sample_names] if sample_names is not None else [str(j + 1) for j in range(N)]
    colors = ["steelblue" if group is not None and group[j] == 1 else "salmon" if group is not None else "0.5"
              for j in range(N)]
    for q in range(Q):
        ax = fig.add_subplot(Q, 1, q + 1)
        ax.bar(np.arange(N), U[q], color=colors)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(np.arange(N))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
        ax.set_ylabel("U" if basis_names is None else str(basis_names[q]))
        if q == 0:
            ax.set_title(title)
            if group is not None:
                from matplotlib.patches import Patch

                ax.legend(handles=[Patch(color="steelblue", label=group_labels[0]),
                                   Patch(color="salmon", label=group_labels[1])], fontsize=7)
    fig.tight_layout()
    return fig
