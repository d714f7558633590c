"""``ProgressCallback``: the progress display for a user's own ``transformers.Trainer``.

Importing this module imports transformers; ``jupyter_lora.widgets.progress`` loads it on first access to
``ProgressCallback``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from transformers import TrainerCallback

from ...core.events import TrainingEvent
from . import frontend
from .factory import progress_observer

__all__ = ["ProgressCallback"]

logger = logging.getLogger(__name__)


class ProgressCallback(TrainerCallback):
    """Show a ``transformers.Trainer`` run with the same progress display:
    ``Trainer(..., callbacks=[ProgressCallback()])``.

    Trainer hooks become ``TrainingEvent``s: on_train_begin → start, on_step_end → step (progress and ETA),
    on_log → step with loss / learning_rate / grad_norm (and eval when the logs hold ``eval_loss``),
    on_evaluate → eval (once per step), on_save → checkpoint, on_train_end → stop (if Stop was pressed) and end.
    Stop sets ``control.should_training_stop`` at the next on_step_end. The click is only handled while the
    kernel is free, so run ``trainer.train()`` in a thread for a live Stop button. A blocking cell stops with
    the kernel interrupt instead.

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
        self._stop_event = threading.Event()
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
        # display at on_train_begin (inside a kernel): by default only an observer built here
        self._show = observer is None if show is None else show
        self._t0: float | None = None
        self._last_eval_step: int | None = None
        self._last_loss: float | None = None
        self._best_eval: float | None = None
        self._train_loss: float | None = None
        self._tokens_per_s: float | None = None

    def stop(self) -> None:
        """Ask the Trainer to stop after the current step (what the Stop button calls)."""
        self._stop_event.set()

    @property
    def stop_requested(self) -> bool:
        """True once ``stop()`` was called."""
        return self._stop_event.is_set()

    # ---- plumbing

    def _elapsed(self) -> float:
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    def _emit(self, kind: str, state: Any, /, **data: Any) -> None:
        event = TrainingEvent(
            kind,
            int(state.global_step or 0),
            int(state.max_steps or 0),
            float(state.epoch or 0.0),
            self._elapsed(),
            data,
        )
        self.observer(event)

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # never into the Trainer's loop
            report = getattr(self.observer, "report_error", None)
            if report is not None:
                report(exc)
            else:  # pragma: no cover
                logger.debug("ProgressCallback error", exc_info=True)

    def _tps(self, state: Any) -> float | None:
        tokens = getattr(state, "num_input_tokens_seen", 0) or 0
        elapsed = self._elapsed()
        if tokens and elapsed > 0:
            return tokens / elapsed
        return self._tokens_per_s

    @staticmethod
    def _memory() -> dict[str, int]:
        torch = sys.modules.get("torch")  # already imported by the Trainer; never imported here
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return {}
        return {
            "memory_allocated": int(torch.cuda.memory_allocated()),
            "memory_peak": int(torch.cuda.max_memory_allocated()),
        }

    # ---- hooks

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        def begin() -> None:
            self._t0 = time.monotonic()
            model = kwargs.get("model")
            trainable = (
                sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else None
            )
            loader = kwargs.get("train_dataloader")
            dataset = getattr(loader, "dataset", None)
            examples = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
            if self._show and frontend.in_kernel() and hasattr(self.observer, "show"):
                self.observer.show()
            self._emit(
                "start",
                state,
                total_steps=int(state.max_steps or 0),
                examples=examples,
                trainable_params=trainable,
                config={
                    "learning_rate": getattr(args, "learning_rate", None),
                    "batch": getattr(args, "per_device_train_batch_size", None),
                    "grad_accum": getattr(args, "gradient_accumulation_steps", None),
                },
            )

        self._guard(begin)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        def step_end() -> None:
            if self._stop_event.is_set():
                control.should_training_stop = True
            self._emit("step", state, tokens_per_s=self._tps(state))

        self._guard(step_end)
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        def log() -> None:
            values = logs or {}
            if "train_tokens_per_second" in values:
                self._tokens_per_s = float(values["train_tokens_per_second"])
            if "loss" in values:
                self._last_loss = float(values["loss"])
                self._emit(
                    "step",
                    state,
                    loss=values["loss"],
                    lr=values.get("learning_rate"),
                    grad_norm=values.get("grad_norm"),
                    tokens_per_s=self._tps(state),
                    **self._memory(),
                )
            if "eval_loss" in values:
                self._eval(state, values)
            if "train_loss" in values:
                self._train_loss = float(values["train_loss"])

        self._guard(log)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any
    ) -> None:
        self._guard(lambda: self._eval(state, metrics or {}))

    def _eval(self, state: Any, metrics: Mapping[str, Any]) -> None:
        if "eval_loss" not in metrics or self._last_eval_step == state.global_step:
            return
        self._last_eval_step = state.global_step
        value = float(metrics["eval_loss"])
        improved = self._best_eval is None or value < self._best_eval
        self._best_eval = value if improved else self._best_eval
        self._emit(
            "eval",
            state,
            eval_loss=value,
            accuracy=metrics.get("eval_accuracy"),
            best_eval_loss=self._best_eval,
            improved=improved,
        )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        path = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
        self._guard(lambda: self._emit("checkpoint", state, path=path, reason="every"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        def end() -> None:
            stopped = self._stop_event.is_set()
            if stopped:
                self._emit("stop", state, reason="user", checkpoint=None)
            tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            self._emit(
                "end",
                state,
                steps=int(state.global_step or 0),
                final_loss=self._last_loss if self._last_loss is not None else self._train_loss,
                best_eval_loss=self._best_eval,
                elapsed=self._elapsed(),
                tokens=tokens,
                tokens_per_s=self._tps(state),
                checkpoint=getattr(state, "best_model_checkpoint", None),
                state="stopped" if stopped else "completed",
            )

        self._guard(end)
