"""Live training progress: observers of the engine's ``TrainingEvent`` stream.

* ``ProgressWidget``: ipywidgets + a plotly ``FigureWidget`` (train loss raw and smoothed, eval loss, learning rate),
  a Stop button, the latest samples, errors with advice and a summary line.
* ``TextProgress``: the same information without widgets. In a notebook it is an HTML block updated in place through
  a display handle; in a terminal it prints one compact line per update.
* ``progress_observer`` picks one of them; ``ProgressCallback`` feeds either from a ``transformers.Trainer``.

Observers are plain callables, called from the training thread. A call records the event in ``RunHistory`` (a few
list appends and an EMA update) and reads the clock. The display is refreshed ("flushed") at most once per
``min_interval`` seconds (0.2 s, as in transformers' NotebookProgressBar). It is always refreshed on eval, sample,
checkpoint, oom, stop, error and end events, so the final state is exact. Nothing raised while recording or drawing
reaches the training loop: the first such error is shown in the error pane, and later ones are only counted.
``measure_observer_cost()`` times both paths, and benchmarks/ calls it.

Importing this module is cheap. ipywidgets and plotly load when a ``ProgressWidget`` is built, and IPython when
something is displayed. transformers loads on first access to ``ProgressCallback``.
"""

from __future__ import annotations

import functools
import gc
import html
import io
import logging
import math
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any, Literal, TextIO

from ..core.errors import UsageError
from ..core.events import EVENT_KINDS, TrainingEvent
from ..display import fmt_bytes, fmt_count

__all__ = [
    "ProgressCallback",  # noqa: F822 - built on first access (module __getattr__), so no transformers import
    "ProgressWidget",
    "RunHistory",
    "TextProgress",
    "measure_observer_cost",
    "progress_observer",
]

logger = logging.getLogger(__name__)

DEFAULT_MIN_INTERVAL = 0.2  # seconds between display refreshes (at most 5 per second)
TERMINAL_MIN_INTERVAL = 1.0  # printed lines: one per second is as fast as anyone reads a scrolling terminal
_ALWAYS_FLUSH = frozenset(EVENT_KINDS) - {"step"}
_FINISHED = frozenset({"done", "stopped", "oom", "error"})
_STEP_KEYS = (
    "lr",
    "tokens_per_s",
    "elapsed",
    "eta",
    "memory_allocated",
    "memory_peak",
    "grad_norm",
)
_MAX_TEXT = 2000  # characters of one sample shown


# ------------------------------------------------------------------------------------------------ formatting


def _fmt_duration(seconds: float | None) -> str:
    """65 -> '1:05', 3725 -> '1:02:05'."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    total = round(max(seconds, 0.0))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _fmt_loss(x: float | None) -> str:
    """4 significant digits, trailing zeros kept: 1.0 -> '1.000', 0.01234 -> '0.01234', 1234.5 -> '1234'."""
    if x is None:
        return "?"
    return f"{x:.0f}" if math.isfinite(x) and abs(x) >= 1000 else f"{x:#.4g}"


def _opt_float(value: Any) -> float | None:
    """None stays None; anything else must convert to float (bad data raises, and the observer reports it)."""
    return None if value is None else float(value)


def _one_line(text: str, limit: int) -> str:
    flat = " ⏎ ".join(str(text).splitlines())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _clip(text: str, limit: int = _MAX_TEXT) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _thin(values: list, stride: int) -> list:
    """Every ``stride``-th value, always ending with the last one (what the plot shows of a long run)."""
    if stride <= 1:
        return list(values)
    out = values[::stride]
    if (len(values) - 1) % stride:
        out.append(values[-1])
    return out


def _describe(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    text = f"{type(error).__name__}: {error}"
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    if frames:
        last = frames[-1]
        text += f" (in {os.path.basename(last.filename)}:{last.lineno}, {last.name})"
    return text


# ------------------------------------------------------------------------------------------------ history


class RunHistory:
    """What one run's events have said so far, aggregated for display. It holds no UI and is updated on every event.

    The loss series keeps every logged step. ``loss`` holds None where the loss was not finite (a gap in the plot).
    ``smoothed`` is the bias-corrected EMA: ``m = (1-a)·m + a·loss``, shown as ``m / (1 - (1-a)^n)``.
    """

    def __init__(self, *, ema_alpha: float = 0.1) -> None:
        if not 0 < ema_alpha <= 1:
            raise UsageError(f"`ema_alpha` must be in (0, 1], got {ema_alpha!r}.")
        self.ema_alpha = float(ema_alpha)
        self.status = "waiting"  # waiting | running | stopping | stopped | done | oom | error
        self.step = 0
        self.total_steps = 0
        self.epoch = 0.0
        self.time = 0.0
        self.events = 0
        self.info: dict[str, Any] = {}  # the start event's data
        self.last: dict[str, Any] = {}  # latest step data: loss, lr, tokens_per_s, eta, memory, ...
        self.tokens = 0
        self.loss_steps: list[int] = []
        self.loss: list[float | None] = []
        self.smoothed: list[float | None] = []
        self.nonfinite_losses = 0
        self.lr_steps: list[int] = []
        self.lr: list[float] = []
        self.eval_steps: list[int] = []
        self.eval_loss: list[float | None] = []
        self.eval_accuracy: list[float | None] = []
        self.best_eval_loss: float | None = None
        self.last_eval: dict[str, Any] | None = None
        self.samples: list[tuple[str, str]] = []
        self.samples_step: int | None = None
        self.samples_version = 0
        self.checkpoint: tuple[int, str, str] | None = None  # (step, path, reason)
        self.problems: list[tuple[str, str, str]] = []  # (kind, message, advice): run errors and OOM
        self.stopped: dict[str, Any] | None = None  # the stop event's data
        self.stop_requested = False  # Stop was pressed here
        self.end: dict[str, Any] | None = None
        self._ema = 0.0
        self._ema_n = 0

    # ---- recording

    def record(self, event: TrainingEvent) -> None:
        """Fold one event in. Unknown kinds are ignored (newer engines may emit more); malformed data raises."""
        data = event.data if event.data is not None else {}
        if not isinstance(data, Mapping):
            raise TypeError(f"event data must be a mapping, got {type(data).__name__}")
        self.events += 1
        self.step = int(event.step)
        if event.total_steps:
            self.total_steps = int(event.total_steps)
        self.epoch = float(event.epoch or 0.0)
        self.time = float(event.time or 0.0)
        handler = getattr(self, f"_on_{event.kind}", None) if event.kind in EVENT_KINDS else None
        if handler is not None:
            handler(data)

    def request_stop(self) -> None:
        """The Stop button was pressed: shown as "stopping" until the engine's stop/end event arrives."""
        self.stop_requested = True
        if self.status in ("waiting", "running"):
            self.status = "stopping"

    def _on_start(self, data: Mapping[str, Any]) -> None:
        self.info = dict(data)
        if not self.total_steps and data.get("total_steps"):
            self.total_steps = int(data["total_steps"])
        if self.status == "waiting":
            self.status = "running"

    def _on_step(self, data: Mapping[str, Any]) -> None:
        if self.status == "waiting":
            self.status = "running"
        loss = _opt_float(data.get("loss"))
        if loss is not None:
            self._add_loss(loss)
        lr = _opt_float(data.get("lr"))
        if lr is not None:
            self.lr_steps.append(self.step)
            self.lr.append(lr)
        tokens = data.get("tokens")
        if tokens:
            self.tokens += int(tokens)
        for key in _STEP_KEYS:
            value = data.get(key)
            if value is not None:
                self.last[key] = value
        if (
            "memory_allocated" in data and data["memory_allocated"] is None
        ):  # CPU: say nothing about GPU memory
            self.last.pop("memory_allocated", None)
            self.last.pop("memory_peak", None)

    def _add_loss(self, loss: float) -> None:
        self.last["loss"] = loss
        self.loss_steps.append(self.step)
        if math.isfinite(loss):
            a = self.ema_alpha
            self._ema_n += 1
            self._ema = (1 - a) * self._ema + a * loss
            self.loss.append(loss)
            self.smoothed.append(self._ema / (1 - (1 - a) ** self._ema_n))
        else:
            self.nonfinite_losses += 1
            self.loss.append(None)
            self.smoothed.append(None)

    def _on_eval(self, data: Mapping[str, Any]) -> None:
        value = _opt_float(data.get("eval_loss"))
        finite = value is not None and math.isfinite(value)
        self.eval_steps.append(self.step)
        self.eval_loss.append(value if finite else None)
        self.eval_accuracy.append(_opt_float(data.get("accuracy")))
        best = _opt_float(data.get("best_eval_loss"))
        if best is None and finite:
            best = value if self.best_eval_loss is None else min(self.best_eval_loss, value)
        if best is not None:
            self.best_eval_loss = best
        improved = data.get("improved")
        if improved is None:
            improved = finite and best is not None and value <= best
        self.last_eval = {
            "step": self.step,
            "eval_loss": value,
            "accuracy": self.eval_accuracy[-1],
            "improved": bool(improved),
        }

    def _on_sample(self, data: Mapping[str, Any]) -> None:
        samples = data.get("samples") or []
        self.samples = [(str(s.get("prompt", "")), str(s.get("text", ""))) for s in samples]
        self.samples_step = self.step
        self.samples_version += 1

    def _on_checkpoint(self, data: Mapping[str, Any]) -> None:
        if data.get("path"):
            self.checkpoint = (self.step, str(data["path"]), str(data.get("reason") or ""))

    def _on_oom(self, data: Mapping[str, Any]) -> None:
        self.status = "oom"
        message = str(data.get("message") or "CUDA out of memory")
        self.problems.append(("oom", message, str(data.get("advice") or "")))
        if data.get("checkpoint"):
            self.checkpoint = (self.step, str(data["checkpoint"]), "oom")

    def _on_stop(self, data: Mapping[str, Any]) -> None:
        if self.status not in ("oom", "error"):
            self.status = "stopped"
        self.stopped = dict(data)
        if data.get("checkpoint"):
            self.checkpoint = (self.step, str(data["checkpoint"]), "stop")

    def _on_end(self, data: Mapping[str, Any]) -> None:
        self.end = dict(data)
        if self.status not in ("oom", "error", "stopped"):
            stopped = self.stopped is not None or self.status == "stopping" or data.get("state") == "stopped"
            self.status = "stopped" if stopped else "done"
        if data.get("checkpoint"):
            self.checkpoint = (self.step, str(data["checkpoint"]), "end")

    def _on_error(self, data: Mapping[str, Any]) -> None:
        self.status = "error"
        kind = data.get("type") or data.get("exception") or data.get("exception_type") or "Error"
        message = f"{kind}: {data.get('message') or ''}".rstrip(": ")
        self.problems.append(("error", message, str(data.get("advice") or "")))

    # ---- derived values

    @property
    def finished(self) -> bool:
        """True once the run stopped, ended or failed."""
        return self.status in _FINISHED

    def elapsed(self) -> float:
        """Seconds since the run started, from the latest event."""
        if self.end is not None and self.end.get("elapsed") is not None:
            return float(self.end["elapsed"])
        return self.time or float(self.last.get("elapsed") or 0.0)

    def eta(self) -> float | None:
        """Seconds left: the engine's estimate when it gives one, else elapsed/step · steps left."""
        if self.finished:
            return None
        if self.last.get("eta") is not None:
            return float(self.last["eta"])
        if self.step > 0 and self.total_steps > self.step:
            return self.elapsed() / self.step * (self.total_steps - self.step)
        return None

    def tokens_per_s(self) -> float | None:
        """Throughput: the end event's, the engine's latest, or tokens counted / elapsed."""
        if self.end is not None and self.end.get("tokens_per_s") is not None:
            return float(self.end["tokens_per_s"])
        if self.last.get("tokens_per_s") is not None:
            return float(self.last["tokens_per_s"])
        elapsed = self.elapsed()
        return self.tokens / elapsed if self.tokens and elapsed > 0 else None

    def step_text(self) -> str:
        """'step 40/200' (or 'step 40' while the total is unknown)."""
        return f"step {self.step}/{self.total_steps}" if self.total_steps else f"step {self.step}"

    def line_text(self) -> str:
        """The compact terminal line: 'step 40/200 · loss 1.234 · 1,234 tok/s · ETA 0:12'."""
        parts = [self.step_text()]
        if "loss" in self.last:
            parts.append(f"loss {_fmt_loss(self.last['loss'])}")
        tps = self.tokens_per_s()
        if tps is not None:
            parts.append(f"{tps:,.0f} tok/s")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {_fmt_duration(eta)}")
        return " · ".join(parts)

    def stats_text(self) -> str:
        """The full stats line: steps, epoch, time, throughput, GPU memory, loss, lr, latest eval."""
        parts = [self.step_text(), f"epoch {self.epoch:.2f}"]
        when = f"{_fmt_duration(self.elapsed())} elapsed"
        eta = self.eta()
        if eta is not None:
            when += f" / ETA {_fmt_duration(eta)}"
        parts.append(when)
        tps = self.tokens_per_s()
        if tps is not None:
            parts.append(f"{tps:,.0f} tok/s")
        now, peak = self.last.get("memory_allocated"), self.last.get("memory_peak")
        if now is not None:
            parts.append(f"GPU {fmt_bytes(now)}" + (f" (peak {fmt_bytes(peak)})" if peak is not None else ""))
        if "loss" in self.last:
            smooth = next((s for s in reversed(self.smoothed) if s is not None), None)
            text = f"loss {_fmt_loss(self.last['loss'])}"
            if smooth is not None and len(self.smoothed) > 1:
                text += f" (EMA {_fmt_loss(smooth)})"
            parts.append(text)
        if "lr" in self.last:
            parts.append(f"lr {float(self.last['lr']):.2e}")
        if self.last_eval is not None:
            text = f"eval {_fmt_loss(self.last_eval['eval_loss'])}"
            if self.last_eval["accuracy"] is not None:
                text += f", acc {self.last_eval['accuracy']:.3f}"
            if self.best_eval_loss is not None:
                text += f" (best {_fmt_loss(self.best_eval_loss)})"
            parts.append(text)
        if self.nonfinite_losses:
            parts.append(f"{self.nonfinite_losses} non-finite loss value(s)")
        return " · ".join(parts)

    def run_text(self) -> str:
        """What the start event said: '200 steps · 1,000 examples · 1.23M trainable params · cpu' ('' before it)."""
        parts = []
        info = self.info
        if self.total_steps:
            parts.append(f"{self.total_steps:,} steps")
        if info.get("examples"):
            examples = f"{int(info['examples']):,} examples"
            if info.get("eval_examples"):
                examples += f" (+{int(info['eval_examples']):,} eval)"
            parts.append(examples)
        if info.get("trainable_params"):
            parts.append(f"{fmt_count(int(info['trainable_params']))} trainable params")
        for key in ("task", "device"):
            if info.get(key):
                parts.append(str(info[key]))
        return " · ".join(parts)

    def header_text(self, title: str) -> str:
        """'<title> · 200 steps · 1,000 examples · ...'."""
        return " · ".join(p for p in (title, self.run_text()) if p)

    def checkpoint_text(self) -> str:
        """'checkpoint (every) at step 40: out/checkpoint-40', or '' when none."""
        if self.checkpoint is None:
            return ""
        step, path, reason = self.checkpoint
        return f"checkpoint{f' ({reason})' if reason else ''} at step {step}: {path}"

    def summary_text(self) -> str:
        """One line at the end: how it finished, steps, time, losses, tokens, checkpoint. '' while running."""
        if not self.finished:
            return ""
        end = self.end or {}
        steps = int(end.get("steps", self.step))
        if self.status == "done":
            head = f"finished: {steps:,} steps"
        elif self.status == "stopped":
            reason = (self.stopped or {}).get("reason") or ("user" if self.stop_requested else "")
            head = f"stopped{f' ({reason})' if reason else ''} at step {steps}" + (
                f"/{self.total_steps}" if self.total_steps else ""
            )
        elif self.status == "oom":
            head = f"out of memory at step {steps}"
        else:
            head = f"failed at step {steps}"
        parts = [f"{head} in {_fmt_duration(self.elapsed())}"]
        final = end.get("final_loss", self.last.get("loss"))
        if final is not None:
            parts.append(f"final loss {_fmt_loss(float(final))}")
        best = end.get("best_eval_loss", self.best_eval_loss)
        if best is not None:
            parts.append(f"best eval loss {_fmt_loss(float(best))}")
        tokens = int(end.get("tokens") or self.tokens or 0)
        tps = self.tokens_per_s()
        if tokens:
            parts.append(f"{fmt_count(tokens)} tokens" + (f" at {tps:,.0f} tok/s" if tps else ""))
        elif tps:
            parts.append(f"{tps:,.0f} tok/s")
        checkpoint = end.get("checkpoint") or (self.checkpoint[1] if self.checkpoint else None)
        if checkpoint:
            parts.append(f"checkpoint {checkpoint}")
        return " · ".join(parts)

    # ---- HTML pieces (user strings escaped)

    def samples_html(self) -> str:
        """The latest samples as an escaped two-column table ('' when there are none)."""
        if not self.samples:
            return ""
        cell = "style='vertical-align:top;padding:2px 8px;border-top:1px solid #ddd;white-space:pre-wrap'"
        rows = "".join(
            f"<tr><td {cell}>{html.escape(_clip(p, 500))}</td><td {cell}>{html.escape(_clip(t))}</td></tr>"
            for p, t in self.samples
        )
        return (
            f"<div class='jl-samples'><b>samples at step {self.samples_step}</b>"
            f"<table><tr><th style='text-align:left'>prompt</th><th style='text-align:left'>generated</th></tr>"
            f"{rows}</table></div>"
        )

    def problems_html(self) -> str:
        """Run errors and OOM reports with their advice ('' when there are none)."""
        blocks = []
        for kind, message, advice in self.problems:
            color = "#e65100" if kind == "oom" else "#c62828"
            label = "out of memory" if kind == "oom" else "error"
            text = f"<b style='color:{color}'>{label}</b>: {html.escape(message)}"
            if advice:
                text += f"<div style='margin-left:1em'>{html.escape(advice)}</div>"
            blocks.append(f"<div class='jl-problem'>{text}</div>")
        return "".join(blocks)


# ------------------------------------------------------------------------------------------------ observers


def _get_ipython() -> Any:
    if "IPython" not in sys.modules:  # nothing imported IPython: certainly no kernel, and no import cost
        return None
    from IPython import get_ipython

    return get_ipython()


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (the shell has a ``kernel``); False in a terminal IPython or plain Python."""
    return getattr(_get_ipython(), "kernel", None) is not None


@functools.lru_cache(maxsize=1)
def _widgets_available() -> bool:
    try:
        import ipywidgets  # noqa: F401
        import plotly.graph_objects  # noqa: F401
    except ImportError:
        return False
    return True


def _array_maker() -> Callable[[list], Any]:
    """float64 arrays when numpy is there: plotly validates and sends them as one binary buffer (about 30× faster
    per redraw than lists, which it walks element by element); None becomes NaN, a gap. Lists without numpy."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - plotly works without numpy, only slower
        return list
    return functools.partial(np.array, dtype=np.float64)


def _display(obj: Any, **kwargs: Any) -> Any:
    from IPython.display import display

    return display(obj, **kwargs)


class _ThrottledObserver:
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

    def _observer_error_text(self) -> str:
        if self.observer_error is None:
            return ""
        more = f" (and {self.observer_errors - 1} more)" if self.observer_errors > 1 else ""
        return f"progress display error (training continues): {self.observer_error}{more}"

    def _render(self, event: TrainingEvent | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _show_observer_error(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


_BAR_STYLE = {
    "waiting": "",
    "running": "info",
    "stopping": "warning",
    "stopped": "warning",
    "done": "success",
    "oom": "danger",
    "error": "danger",
}
_STATUS_WORDS = {
    "waiting": "waiting for the first step…",
    "running": "training",
    "stopping": "stopping…",
    "stopped": "stopped",
    "done": "finished",
    "oom": "out of memory",
    "error": "failed",
}
_TRACE_NAMES = ("train loss", "train loss (EMA)", "eval loss", "learning rate")


class ProgressWidget(_ThrottledObserver):
    """Live progress of one training run as ipywidgets: header, progress bar + Stop, stats, a plotly chart,
    errors, latest samples and a final summary. Call it with each ``TrainingEvent``, from any thread.

    ``stop``: called once when Stop is clicked (the run handle's ``.stop()``). Without it there is no button.
    The chart's traces are, in order: train loss (raw), train loss (EMA), eval loss, learning rate (right axis).
    At most ``max_points`` points per trace are drawn (evenly thinned). The history keeps every one.
    """

    def __init__(
        self,
        stop: Callable[[], Any] | None = None,
        title: str | None = None,
        *,
        min_interval: float | None = None,
        max_points: int = 2000,
        ema_alpha: float = 0.1,
        clock: Callable[[], float] | None = None,
        height: int = 320,
    ) -> None:
        super().__init__(
            title, DEFAULT_MIN_INTERVAL if min_interval is None else min_interval, clock, ema_alpha
        )
        if max_points < 2:
            raise UsageError(f"`max_points` must be at least 2, got {max_points!r}.")
        self.max_points = int(max_points)
        self._stop = stop
        self.stop_requested = False
        self._drawn: dict[str, Any] = {}
        self._build(height)
        self.flush()

    # ---- building

    def _build(self, height: int) -> None:
        import ipywidgets as widgets
        import plotly.graph_objects as go

        self._array = _array_maker()
        self.header = widgets.HTML()
        self.bar = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="60%"))
        self.stop_button = widgets.Button(
            description="Stop",
            icon="stop",
            button_style="danger",
            tooltip="finish the current step, save a checkpoint and stop",
            layout=widgets.Layout(width="auto", display=None if self._stop else "none"),
        )
        self.stop_button.on_click(self._on_stop_click)
        self.stats = widgets.HTML()
        color = "#1f77b4"
        self.figure = go.FigureWidget(
            data=[
                go.Scatter(
                    name=_TRACE_NAMES[0], mode="lines", line={"width": 1, "color": color}, opacity=0.3
                ),
                go.Scatter(name=_TRACE_NAMES[1], mode="lines", line={"width": 2, "color": color}),
                go.Scatter(name=_TRACE_NAMES[2], mode="markers", marker={"size": 8, "color": "#d62728"}),
                go.Scatter(
                    name=_TRACE_NAMES[3],
                    mode="lines",
                    yaxis="y2",
                    line={"width": 1, "dash": "dot", "color": "#2ca02c"},
                ),
            ],
            layout={
                "height": height,
                "margin": {"l": 55, "r": 70, "t": 30, "b": 40},
                "template": "plotly_white",
                "uirevision": "progress",  # keep the user's zoom across updates
                "xaxis": {"title": {"text": "step"}, "rangemode": "tozero"},
                "yaxis": {"title": {"text": "loss"}},
                "yaxis2": {
                    "title": {"text": "learning rate"},
                    "overlaying": "y",
                    "side": "right",
                    "showgrid": False,
                    "exponentformat": "e",
                    "rangemode": "tozero",
                },
                "legend": {"orientation": "h", "y": 1.12, "x": 0},
            },
        )
        self.errors = widgets.HTML()
        self.samples = widgets.HTML()
        self.summary = widgets.HTML()
        self.box = widgets.VBox(
            [
                self.header,
                widgets.HBox([self.bar, self.stop_button]),
                self.stats,
                self.figure,
                self.errors,
                self.samples,
                self.summary,
            ]
        )

    # ---- showing

    def show(self) -> None:
        """Display the widget in the current cell."""
        _display(self.box)

    def _ipython_display_(self) -> None:
        self.show()

    def __repr__(self) -> str:
        h = self.history
        return f"<ProgressWidget {self.title!r}: {h.line_text()} [{_STATUS_WORDS[h.status]}]>"

    # ---- Stop

    def _on_stop_click(self, _button: Any = None) -> None:
        with self._lock:
            if self.stop_requested or self._stop is None or self.history.finished:
                return
            self.stop_requested = True
            self.history.request_stop()
            with self.stop_button.hold_sync(), self.bar.hold_sync():
                self.stop_button.disabled = True
                self.stop_button.description = "stopping…"
                self.stop_button.icon = "hourglass-half"
                self.bar.bar_style = _BAR_STYLE["stopping"]
        try:
            self._stop()
        except Exception as exc:  # clicks run on the kernel thread, where widget callback errors vanish
            self.report_error(exc)

    # ---- drawing

    def _render(self, event: TrainingEvent | None) -> None:
        h = self.history
        widgets = (
            self.header,
            self.bar,
            self.stats,
            self.stop_button,
            self.errors,
            self.samples,
            self.summary,
        )
        with ExitStack() as stack:
            for widget in widgets:
                stack.enter_context(widget.hold_sync())
            run = h.run_text()
            self.header.value = f"<b>{html.escape(self.title)}</b>" + (
                f" <span style='color:#666'>· {html.escape(run)}</span>" if run else ""
            )
            total = max(h.total_steps, h.step, 1)
            self.bar.max = total
            self.bar.value = min(h.step, total)
            self.bar.bar_style = _BAR_STYLE[h.status]
            status = _STATUS_WORDS[h.status]
            checkpoint = h.checkpoint_text()
            self.stats.value = (
                f"<span style='font-variant-numeric:tabular-nums'>{html.escape(h.stats_text())}</span>"
                f" <i style='color:#666'>{html.escape(status)}</i>"
                + (f"<div style='color:#666'>{html.escape(checkpoint)}</div>" if checkpoint else "")
            )
            if h.finished:
                self.stop_button.disabled = True
                self.stop_button.description = _STATUS_WORDS[h.status]
                self.stop_button.icon = ""
            if self._drawn.get("samples") != h.samples_version:
                self.samples.value = h.samples_html()
                self._drawn["samples"] = h.samples_version
            self.errors.value = self._errors_html()
            summary = h.summary_text()
            self.summary.value = f"<b>{html.escape(summary)}</b>" if summary else ""
        self._render_figure()

    def _render_figure(self) -> None:
        h = self.history
        raw, smooth, evals, lr = self.figure.data
        n_loss, n_eval, n_lr = len(h.loss_steps), len(h.eval_steps), len(h.lr_steps)
        total = h.total_steps
        if (n_loss, n_eval, n_lr, total) == self._drawn.get("figure"):
            return
        arr = self._array
        with self.figure.batch_update():
            if n_loss != self._drawn.get("loss"):
                stride = math.ceil(n_loss / self.max_points)
                xs = arr(_thin(h.loss_steps, stride))
                raw.x, raw.y = xs, arr(_thin(h.loss, stride))
                smooth.x, smooth.y = xs, arr(_thin(h.smoothed, stride))
            if n_eval != self._drawn.get("eval"):
                evals.x, evals.y = arr(h.eval_steps), arr(h.eval_loss)
            if n_lr != self._drawn.get("lr"):
                stride = math.ceil(n_lr / self.max_points)
                lr.x, lr.y = arr(_thin(h.lr_steps, stride)), arr(_thin(h.lr, stride))
            if total and total != self._drawn.get("total"):
                self.figure.layout.xaxis.range = [0, total]
        self._drawn.update(
            figure=(n_loss, n_eval, n_lr, total), loss=n_loss, eval=n_eval, lr=n_lr, total=total
        )

    def _errors_html(self) -> str:
        text = self.history.problems_html()
        if self.observer_error is not None:
            text += f"<div style='color:#888'><i>{html.escape(self._observer_error_text())}</i></div>"
        return text

    def _show_observer_error(self) -> None:
        self.errors.value = self._errors_html()


class TextProgress(_ThrottledObserver):
    """Progress without widgets. The observer interface and throttling are the same as ``ProgressWidget``.

    ``output="notebook"``: an HTML block (progress bar, stats, a loss sparkline, samples, summary), displayed
    with ``display(..., display_id=True)`` and updated in place. ``output="terminal"``: one compact line per
    update (``step 40/200 · loss 1.234 · 1,234 tok/s · ETA 0:12``), a line per eval, sample, checkpoint and
    problem, and a final summary. ``"auto"`` picks notebook inside a Jupyter kernel and terminal otherwise.
    The default ``min_interval`` is 0.2 s in a notebook and 1 s in a terminal (each update prints a line there).
    """

    def __init__(
        self,
        title: str | None = None,
        *,
        output: Literal["auto", "notebook", "terminal"] = "auto",
        min_interval: float | None = None,
        file: TextIO | None = None,
        clock: Callable[[], float] | None = None,
        ema_alpha: float = 0.1,
    ) -> None:
        if output not in ("auto", "notebook", "terminal"):
            raise UsageError(f"`output` must be 'auto', 'notebook' or 'terminal', got {output!r}.")
        if output == "auto":
            output = "notebook" if _in_kernel() else "terminal"
        self.output = output
        if min_interval is None:
            min_interval = DEFAULT_MIN_INTERVAL if output == "notebook" else TERMINAL_MIN_INTERVAL
        super().__init__(title, min_interval, clock, ema_alpha)
        self._file = file
        self._handle: Any = None

    # ---- showing

    def show(self) -> None:
        """Notebook: display the block (later updates replace it in place). Terminal: nothing to do."""
        with self._lock:
            if self.output != "notebook":
                return
            if self._handle is None:
                self._handle = _display(self, display_id=True)
            else:  # another view of the same display id: updates reach both
                _display(self, display_id=self._handle.display_id)

    def _repr_html_(self) -> str:
        with self._lock:
            return self._html()

    def __repr__(self) -> str:
        with self._lock:
            h = self.history
            lines = [h.header_text(self.title), f"{h.line_text()} [{_STATUS_WORDS[h.status]}]"]
            lines += [
                f"{kind}: {message}" + (f" — {advice}" if advice else "")
                for kind, message, advice in h.problems
            ]
            if h.summary_text():
                lines.append(h.summary_text())
            if self.observer_error:
                lines.append(self._observer_error_text())
            return "\n".join(lines)

    # ---- drawing

    def _render(self, event: TrainingEvent | None) -> None:
        if self.output == "notebook":
            if self._handle is None:
                self.show()
            else:
                self._handle.update(self)
        else:
            self._print_event(event)

    def _print(self, text: str) -> None:
        print(text, file=self._file if self._file is not None else sys.stdout, flush=True)

    def _print_event(self, event: TrainingEvent | None) -> None:
        h = self.history
        kind = event.kind if event is not None else "step"
        if kind == "start":
            self._print(h.header_text(self.title))
        elif kind == "step":
            self._print(h.line_text())
        elif kind == "eval" and h.last_eval is not None:
            e = h.last_eval
            text = f"eval at step {e['step']}: loss {_fmt_loss(e['eval_loss'])}"
            if e["accuracy"] is not None:
                text += f", accuracy {e['accuracy']:.3f}"
            self._print(text + (" (best so far)" if e["improved"] else ""))
        elif kind == "sample":
            for prompt, text in h.samples:
                self._print(f"sample: {_one_line(prompt, 60)!s} → {_one_line(text, 160)}")
        elif kind == "checkpoint":
            self._print(h.checkpoint_text())
        elif kind in ("oom", "error") and h.problems:
            problem_kind, message, advice = h.problems[-1]
            self._print(f"{'out of memory' if problem_kind == 'oom' else 'error'}: {message}")
            if advice:
                self._print(f"  advice: {advice}")
        elif kind == "end":
            self._print(h.summary_text())

    def _show_observer_error(self) -> None:
        if self.output == "terminal":
            self._print(self._observer_error_text())
        elif self._handle is not None:
            self._handle.update(self)

    def _html(self) -> str:
        h = self.history
        total = max(h.total_steps, h.step, 1)
        color = {"done": "#2e7d32", "oom": "#c62828", "error": "#c62828"}.get(h.status, "#1f77b4")
        bar = (
            f"<div style='display:flex;align-items:center;gap:8px'>"
            f"<progress value='{min(h.step, total)}' max='{total}' style='width:320px;accent-color:{color}'></progress>"
            f"<span>{html.escape(h.step_text())}</span> <i style='color:#666'>{_STATUS_WORDS[h.status]}</i></div>"
        )
        parts = [
            f"<div><b>{html.escape(self.title)}</b> <span style='color:#666'>"
            f"{html.escape(h.run_text())}</span></div>",
            bar,
            f"<div>{html.escape(h.stats_text())}</div>",
            _sparkline_svg(h),
        ]
        if h.checkpoint_text():
            parts.append(f"<div style='color:#666'>{html.escape(h.checkpoint_text())}</div>")
        parts.append(h.problems_html())
        if self.observer_error:
            parts.append(f"<div style='color:#888'><i>{html.escape(self._observer_error_text())}</i></div>")
        parts.append(h.samples_html())
        if h.summary_text():
            parts.append(f"<div><b>{html.escape(h.summary_text())}</b></div>")
        return "<div class='jl-progress'>" + "".join(parts) + "</div>"


def _sparkline_svg(h: RunHistory, width: int = 320, height: int = 60) -> str:
    """The smoothed train loss (blue) and eval losses (red dots) as a small inline SVG ('' before two points)."""
    points = [(x, y) for x, y in zip(h.loss_steps, h.smoothed, strict=True) if y is not None]
    evals = [(x, y) for x, y in zip(h.eval_steps, h.eval_loss, strict=True) if y is not None]
    if len(points) < 2:
        return ""
    points = _thin(points, math.ceil(len(points) / width))
    ys = [y for _, y in points] + [y for _, y in evals]
    lo, hi = min(ys), max(ys)
    span_y = (hi - lo) or 1.0
    span_x = max(h.total_steps, points[-1][0], 1)

    def xy(x: float, y: float) -> tuple[str, str]:
        return f"{2 + (width - 4) * x / span_x:.1f}", f"{2 + (height - 4) * (hi - y) / span_y:.1f}"

    line = " ".join(",".join(xy(x, y)) for x, y in points)
    dots = "".join("<circle cx='{}' cy='{}' r='2.5' fill='#d62728'/>".format(*xy(x, y)) for x, y in evals)
    return (
        f"<svg width='{width}' height='{height}' style='border:1px solid #eee'>"
        f"<title>loss {_fmt_loss(hi)} … {_fmt_loss(lo)}</title>"
        f"<polyline fill='none' stroke='#1f77b4' stroke-width='1.5' points='{line}'/>{dots}</svg>"
    )


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
    if mode == "widget" or (mode == "auto" and _in_kernel() and _widgets_available()):
        return ProgressWidget(stop=stop, title=title, min_interval=min_interval)
    return TextProgress(title=title, min_interval=min_interval)


# ------------------------------------------------------------------------------------------------ cost


def _synthetic_step(step: int, total: int) -> TrainingEvent:
    loss = 2.0 * math.exp(-step / 300) + 0.3 + 0.05 * math.sin(step)
    data = {
        "loss": loss,
        "lr": 2e-4 * (1 - step / total),
        "tokens": 4096,
        "tokens_per_s": 12_000.0,
        "elapsed": step * 0.3,
        "eta": (total - step) * 0.3,
        "memory_allocated": 3 << 30,
        "memory_peak": 4 << 30,
        "grad_norm": 1.0,
    }
    return TrainingEvent("step", step, total, step / total, step * 0.3, data)


def measure_observer_cost(n_steps: int = 2000, kind: str = "widget", repeat: int = 3) -> dict[str, float]:
    """What one ``observer(event)`` call costs the training thread, in µs per step event.

    ``record_us``: record plus clock check, no redraw (``min_interval=inf``), the usual path. ``flush_us``:
    every event redraws (``min_interval=0``), averaged while the history grows to ``n_steps``. ``flush_last_us``
    is the same for the last 10% of events, with the longest history. ``kind``: "widget" (``ProgressWidget``,
    no front end attached, so comm messages are built but not sent) or "text" (``TextProgress`` printing
    terminal lines to a buffer). Best of ``repeat`` runs; the cyclic GC is paused while timing, as in ``timeit``.
    benchmarks/ prints these numbers; a redraw at most 5 times a second costs at most 5·flush_us per second.
    """
    if kind not in ("widget", "text"):
        raise UsageError(f"`kind` must be 'widget' or 'text', got {kind!r}.")
    events = [_synthetic_step(i, n_steps) for i in range(1, n_steps + 1)]
    start = TrainingEvent("start", 0, n_steps, 0.0, 0.0, {"total_steps": n_steps})

    def make(interval: float) -> _ThrottledObserver:
        if kind == "widget":
            return ProgressWidget(stop=lambda: None, min_interval=interval)
        return TextProgress(output="terminal", min_interval=interval, file=io.StringIO())

    def run(interval: float) -> list[float]:
        observer = make(interval)
        observer(start)
        times = []
        clock = time.perf_counter
        enabled = gc.isenabled()
        gc.disable()
        try:
            for event in events:
                t0 = clock()
                observer(event)
                times.append(clock() - t0)
        finally:
            if enabled:
                gc.enable()
        if observer.observer_error:  # pragma: no cover - would make the numbers meaningless
            raise RuntimeError(observer.observer_error)
        return times

    record_runs = [run(math.inf) for _ in range(repeat)]
    flush_runs = [run(0.0) for _ in range(repeat)]
    tail = max(1, n_steps // 10)
    return {
        "n_steps": float(n_steps),
        "record_us": min(statistics.fmean(r) for r in record_runs) * 1e6,
        "record_median_us": min(statistics.median(r) for r in record_runs) * 1e6,
        "flush_us": min(statistics.fmean(r) for r in flush_runs) * 1e6,
        "flush_last_us": min(statistics.fmean(r[-tail:]) for r in flush_runs) * 1e6,
    }


# ------------------------------------------------------------------------------------------------ transformers


def _progress_callback_class() -> type:
    from transformers import TrainerCallback

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
                    sum(p.numel() for p in model.parameters() if p.requires_grad)
                    if model is not None
                    else None
                )
                loader = kwargs.get("train_dataloader")
                dataset = getattr(loader, "dataset", None)
                examples = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
                if self._show and _in_kernel() and hasattr(self.observer, "show"):
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

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
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

    ProgressCallback.__module__ = __name__
    return ProgressCallback


def __getattr__(name: str) -> Any:
    # ProgressCallback subclasses transformers.TrainerCallback: built on first access so that importing this
    # module does not import transformers (and torch).
    if name == "ProgressCallback":
        cls = _progress_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
