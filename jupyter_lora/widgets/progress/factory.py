"""``progress_observer``: the progress display that suits the front end (a widget in a kernel, else text)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from ...core.errors import UsageError
from . import frontend
from .text import TextProgress
from .widget import ProgressWidget, widgets_available

__all__ = ["progress_observer"]


def progress_observer(
    stop: Callable[[], Any] | None = None,
    title: str | None = None,
    mode: Literal["auto", "widget", "text"] = "auto",
    *,
    min_interval: float | None = None,
) -> ProgressWidget | TextProgress:
    """The progress display for this front end. ``"widget"``: a ``ProgressWidget`` (needs ipywidgets + plotly);
    ``"text"``: a ``TextProgress``; ``"auto"``: the widget inside a Jupyter kernel with both importable, else text.

    ``stop`` (the run handle's ``.stop()``) backs the widget's Stop button. The text fallback has no button.
    """
    if mode not in ("auto", "widget", "text"):
        raise UsageError(f"`mode` must be 'auto', 'widget' or 'text', got {mode!r}.")
    if mode == "widget" or (mode == "auto" and frontend.in_kernel() and widgets_available()):
        return ProgressWidget(stop=stop, title=title, min_interval=min_interval)
    return TextProgress(title=title, min_interval=min_interval)
