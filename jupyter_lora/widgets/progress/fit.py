"""``ChartFit``: keeps the progress chart as wide as its output area (front end: ``js/chart_fit.js``).

plotly's ``FigureWidget`` draws its chart before the chart is in the page, so plotly sizes it to its 700 px default
and never measures again (the chart is cut off in a narrower output area). This widget, put in the same box as the
figure, sets the chart's width (in that view only) to the box's when the chart is put in, when the box's size changes
and after each redraw. plotly has no setting for this (its ``responsive`` config follows window resizes only, and
only while the chart has no height of its own).
"""

from __future__ import annotations

from functools import lru_cache

import anywidget
import traitlets

from ..tree import _js_dir

__all__ = ["ChartFit"]


@lru_cache(maxsize=1)
def front_end_source() -> str:
    return (_js_dir() / "chart_fit.js").read_text()


class ChartFit(anywidget.AnyWidget):
    """Fits the plotly charts beside it (in the same box) to the box's width; draws nothing itself."""

    _esm = traitlets.Unicode(front_end_source()).tag(sync=True)
