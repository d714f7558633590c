"""``ProgressCallback``: the progress display for a user's own ``transformers.Trainer``.

It is the package's one event source (``core.train.callback.RunCallback``) pointed at a display: the same
translation of Trainer hooks into ``TrainingEvent``s that ``jupyter_lora.train`` uses. Importing this module imports
transformers; ``jupyter_lora.widgets.progress`` loads it on first access to ``ProgressCallback``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Literal

from ...core.events import TrainingEvent
from ...core.train.callback import RunCallback, observed_run
from . import frontend
from .factory import progress_observer

__all__ = ["ProgressCallback"]

logger = logging.getLogger(__name__)

_HOOKS = ("on_train_begin", "on_log", "on_step_end", "on_save", "on_train_end")


class ProgressCallback(RunCallback):
    """Show a ``transformers.Trainer`` run with the same progress display:
    ``Trainer(..., callbacks=[ProgressCallback()])``, or ``ProgressCallback().attach(trainer)``, which also
    removes the Trainer's own tqdm bar / log printer so that progress is not shown twice.

    Stop finishes the current step, saves a checkpoint in ``output_dir`` and ends ``train()``. The click is only
    handled while the kernel is free, so run ``trainer.train()`` in a thread for a live Stop button; a blocking
    cell stops with the kernel interrupt instead. ``run`` holds what was reported (``history``, ``evals``,
    ``checkpoint``, ``state``).

    ``observer``: any observer (default: ``progress_observer(stop=self.stop, title=..., mode=...)``).
    ``show``: display it at on_train_begin when inside a kernel (default: only an observer built here).
    """

    def __init__(
        self,
        observer: Callable[[TrainingEvent], None] | None = None,
        *,
        title: str | None = None,
        mode: Literal["auto", "widget", "text"] = "auto",
        min_interval: float | None = None,
        show: bool | None = None,
    ) -> None:
        self.observer = (
            observer
            if observer is not None
            else progress_observer(
                stop=self.stop,
                title=title or "transformers.Trainer",
                mode=mode,
                min_interval=min_interval,
            )
        )
        super().__init__(observed_run([self.observer]))
        # display at on_train_begin (inside a kernel): by default only an observer built here
        self._show = observer is None if show is None else show
        for name in _HOOKS:  # a display problem is reported on the display, never raised into the Trainer
            setattr(self, name, self._guarded(getattr(self, name)))

    def stop(self) -> None:
        """Ask the Trainer to stop after the current step (what the Stop button calls)."""
        self.run.stop_requested.set()

    @property
    def stop_requested(self) -> bool:
        """True once ``stop()`` was called."""
        return self.run.stop_requested.is_set()

    def attach(self, trainer: Any) -> ProgressCallback:
        """Add this callback to ``trainer`` in place of its tqdm bar and log printer; returns ``self``."""
        from transformers.trainer_callback import PrinterCallback
        from transformers.trainer_callback import ProgressCallback as TqdmCallback

        trainer.remove_callback(TqdmCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(self)
        return self

    def _guarded(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(hook)
        def call(args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            try:
                return hook(args, state, control, **kwargs)
            except Exception as exc:  # never into the Trainer's loop
                report = getattr(self.observer, "report_error", None)
                if report is not None:
                    report(exc)
                else:  # pragma: no cover
                    logger.debug("ProgressCallback error", exc_info=True)
                return None

        return call

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._show and frontend.in_kernel() and hasattr(self.observer, "show"):
            self.observer.show()
        super().on_train_begin(args, state, control, **kwargs)
