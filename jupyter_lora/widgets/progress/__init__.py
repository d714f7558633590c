"""Live training progress: observers of the engine's ``TrainingEvent`` stream.

* ``ProgressWidget`` (``widget``): ipywidgets + a plotly ``FigureWidget`` (train loss raw and smoothed, eval loss,
  learning rate), a Stop button, the latest samples, errors with advice and a summary line.
* ``TextProgress`` (``text``): the same information without widgets. In a notebook it is an HTML block updated in
  place through a display handle; in a terminal it prints one compact line per update.
* ``RunHistory`` (``history``): what the events have said so far, the data both of them draw.
* ``progress_observer`` picks one of them; ``ProgressCallback`` (``callback``) feeds either from a
  ``transformers.Trainer``.

Observers are throttled (``observer``): every event is recorded, the display is redrawn at most every
``min_interval`` seconds and always on events other than step, and nothing raised while drawing reaches training.

Importing this package is cheap. ipywidgets and plotly load when a ``ProgressWidget`` is built, and IPython when
something is displayed. transformers loads on first access to ``ProgressCallback``.
"""

from __future__ import annotations

from typing import Any

from .factory import progress_observer
from .history import RunHistory
from .observer import DEFAULT_MIN_INTERVAL, ThrottledObserver
from .text import TERMINAL_MIN_INTERVAL, TextProgress
from .widget import ProgressWidget

__all__ = [
    "DEFAULT_MIN_INTERVAL",
    "TERMINAL_MIN_INTERVAL",
    "ProgressCallback",  # loaded on first access (module __getattr__), so no transformers import
    "ProgressWidget",
    "RunHistory",
    "TextProgress",
    "ThrottledObserver",
    "progress_observer",
]


def __getattr__(name: str) -> Any:
    # ProgressCallback subclasses transformers.TrainerCallback: its module is imported on first access so that
    # importing this package does not import transformers (and torch).
    if name == "ProgressCallback":
        from .callback import ProgressCallback

        globals()[name] = ProgressCallback
        return ProgressCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
