"""Small matplotlib helpers shared by the result classes' ``plot`` methods (no pyplot state)."""

from __future__ import annotations

__all__ = ["figure_axes"]


def figure_axes(ax, figsize):
    """``(fig, ax)``: a new Figure of ``figsize`` with one subplot when ``ax`` is None, else ``ax``'s
    figure and ``ax`` itself."""
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=figsize)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    return fig, ax
