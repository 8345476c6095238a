"""Figures drawn without pyplot, so plotting never changes the caller's matplotlib."""

from __future__ import annotations

from typing import Any


def agg_figure(**kwargs: Any):
    """``matplotlib.figure.Figure(**kwargs)`` on its own Agg canvas.

    ``savefig`` writes a PNG whatever backend the process uses (a notebook's, a GUI's), the
    backend is not switched, and pyplot never holds the figure, so it needs no closing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure
