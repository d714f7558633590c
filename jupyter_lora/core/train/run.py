"""``TrainingRun``: the handle of one training run — control (stop, wait), what it reported (history, evals,
samples, the last checkpoint) and its state. The run itself is a ``transformers.Trainer`` on a thread
(``engine.py``); events reach the run's observers through ``TrainingRun.emit``."""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..events import TrainingEvent

__all__ = ["TrainingRun"]


class TrainingRun:
    """A training run on a background thread. ``stop()``, ``wait()``, ``history``, ``evals``, ``state``.

    ``state``: created | running | stopping | finished | stopped | early_stopped | oom | failed.
    """

    def __init__(self, model: nn.Module, data: Any, config: Any, tokenizer: Any, observers: list,
                 output_dir: Path, resume_from: Path | None = None):  # fmt: skip
        self.model = model
        self.data = data
        self.config = config
        self.tokenizer = tokenizer
        self.output_dir = Path(output_dir)
        self.resume_from = resume_from
        self.observers: list = list(observers)
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.samples: list[dict] = []
        self.state = "created"
        self.error: BaseException | None = None
        self.checkpoint: Path | None = None
        self.best_eval_loss: float | None = None
        self.step = 0
        self.total_steps = 0
        self.epoch = 0.0
        self.started = time.perf_counter()
        self.stop_requested = threading.Event()
        self.finished = threading.Event()
        self.thread: threading.Thread | None = None
        self._failed_observers: set[int] = set()
        self.resume_step = 0
        self.snapshot: dict = {}
        self.created_output_dir = False
        self.precision = "fp32"
        self.ckpt = False
        self.trainer_args: dict = {}
        self.callbacks: list = []
        self.diverged: str | None = None  # why the run ended on a NaN/inf loss

    # --- control

    def stop(self, wait: bool = True, timeout: float | None = None) -> TrainingRun:
        """Finish the current step, save a checkpoint, free memory. With ``wait``, block until that is done."""
        if self.state == "running":
            self.state = "stopping"
        self.stop_requested.set()
        if wait:
            self._join(timeout)
        return self

    def _join(self, timeout: float | None) -> None:
        """Wait for the end of the run and of its thread (a process may exit right after)."""
        self.finished.wait(timeout)
        if (
            self.finished.is_set()
            and self.thread is not None
            and self.thread is not threading.current_thread()
        ):
            self.thread.join(timeout)

    def wait(self, timeout: float | None = None) -> TrainingRun:
        """Block until the run ends (or ``timeout`` seconds pass); re-raises a crash of the training thread."""
        self._join(timeout)
        if self.state == "failed" and self.error is not None:
            raise self.error
        return self

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    @property
    def running(self) -> bool:
        return self.state in ("running", "stopping")

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started

    def add_observer(self, observer) -> None:
        self.observers.append(observer)

    def __repr__(self) -> str:
        last = self.history[-1] if self.history else {}
        loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
        best = f", best eval {self.best_eval_loss:.4f}" if self.best_eval_loss is not None else ""
        return f"<TrainingRun {self.state}: step {self.step}/{self.total_steps}{loss}{best}>"

    # --- events

    def emit(self, kind: str, **data: Any) -> None:
        """Send one event to every observer; an observer that raises is reported once and detached."""
        event = TrainingEvent(
            kind, self.step, self.total_steps, self.epoch, time.perf_counter() - self.started, data
        )
        for observer in list(self.observers):
            if id(observer) in self._failed_observers:
                continue
            try:
                observer(event)
            except Exception as exc:  # a broken display must never stop training
                self._failed_observers.add(id(observer))
                warnings.warn(
                    f"A training observer failed and was detached: {exc!r}", RuntimeWarning, stacklevel=2
                )
