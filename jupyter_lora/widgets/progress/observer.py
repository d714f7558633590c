"""The observer protocol shared by the progress displays: record every event, redraw when due, never raise.

Observers are plain callables, called from the training thread. A call records the event in ``RunHistory`` (a few
list appends and an EMA update) and reads the clock. The display is refreshed ("flushed") at most once per
``min_interval`` seconds (0.2 s, as in transformers' NotebookProgressBar). It is always refreshed on eval, sample,
checkpoint, oom, stop, error and end events, so the final state is exact. Nothing raised while recording or drawing
reaches the training loop: the first such error is shown in the error pane, and later ones are only counted.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Callable

from ...core.errors import UsageError
from ...core.events import EVENT_KINDS, TrainingEvent
from .history import RunHistory

__all__ = ["DEFAULT_MIN_INTERVAL", "ThrottledObserver"]

logger = logging.getLogger(__name__)

DEFAULT_MIN_INTERVAL = 0.2  # seconds between display refreshes (at most 5 per second)
_ALWAYS_FLUSH = frozenset(EVENT_KINDS) - {"step"}


def _describe(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    text = f"{type(error).__name__}: {error}"
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    if frames:
        last = frames[-1]
        text += f" (in {os.path.basename(last.filename)}:{last.lineno}, {last.name})"
    return text


class ThrottledObserver:
    """Record every event at once. Redraw at most every ``min_interval`` s, and always on events other than step."""

    _default_title = "LoRA training"

    def __init__(
        self,
        title: str | None,
        min_interval: float,
        clock: Callable[[], float] | None,
        ema_alpha: float,
    ) -> None:
        if not min_interval >= 0:
            raise UsageError(f"`min_interval` must be >= 0 seconds, got {min_interval!r}.")
        self.title = str(title) if title else self._default_title
        self.min_interval = float(min_interval)
        self.history = RunHistory(ema_alpha=ema_alpha)
        self.flushes = 0  # how many times the display was redrawn
        self.observer_error: str | None = None  # the first error raised inside this observer
        self.observer_errors = 0
        self._clock = clock or time.monotonic
        self._last_flush = -math.inf
        self._lock = threading.RLock()  # events arrive on the training thread, clicks on the kernel thread

    def __call__(self, event: TrainingEvent) -> None:
        """Record ``event`` and redraw when due. Never raises: errors go to the error pane."""
        try:
            with self._lock:
                self.history.record(event)
                now = self._clock()
                if event.kind in _ALWAYS_FLUSH or now - self._last_flush >= self.min_interval - 1e-9:
                    self._flush(event, now)
        except Exception as exc:
            self.report_error(exc)

    def flush(self) -> None:
        """Redraw now, whatever the interval."""
        try:
            with self._lock:
                self._flush(None, self._clock())
        except Exception as exc:
            self.report_error(exc)

    def _flush(self, event: TrainingEvent | None, now: float) -> None:
        self._last_flush = now
        self.flushes += 1
        self._render(event)

    def report_error(self, error: BaseException | str) -> None:
        """Show an error from the display itself (or from a Stop callable) once. Later ones are counted, never raised."""
        try:
            with self._lock:
                self.observer_errors += 1
                if self.observer_error is None:
                    self.observer_error = _describe(error)
                    logger.debug("progress observer error", exc_info=isinstance(error, BaseException))
                    self._show_observer_error()
        except Exception:  # pragma: no cover - the display is broken beyond showing errors; training goes on
            pass

    def observer_error_text(self) -> str:
        """The error line the display shows ('' when there was none)."""
        if self.observer_error is None:
            return ""
        more = f" (and {self.observer_errors - 1} more)" if self.observer_errors > 1 else ""
        return f"progress display error (training continues): {self.observer_error}{more}"

    def _render(self, event: TrainingEvent | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _show_observer_error(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
