"""What one training run's events have said so far: ``RunHistory`` and the text it is shown with.

Pure data: no ipywidgets, plotly or IPython. The widget and the text fallback both draw from one ``RunHistory``;
``fmt_loss``, ``fmt_duration`` and ``thin`` are the number formats and plot thinning they share.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

from ...core.errors import UsageError
from ...core.events import EVENT_KINDS, TrainingEvent
from ...display import fmt_bytes, fmt_count

__all__ = ["RunHistory", "fmt_duration", "fmt_loss", "thin"]

_FINISHED = frozenset({"done", "stopped", "oom", "error"})
_STEP_KEYS = ("lr", "tokens_per_s", "elapsed", "eta", "grad_norm")
# the device figures of start and step events (None on a CPU; left out of a step between two readings)
_DEVICE_KEYS = ("memory_allocated", "memory_peak", "memory_capacity", "gpu_utilization")
# how a run ended (the end event's state) -> the status shown
_END_STATES = {
    "finished": "done",
    "completed": "done",
    "stopped": "stopped",
    "early_stopped": "stopped",
    "oom": "oom",
    "failed": "error",
}
# the status a run ended with -> the label of the checkpoint written at its last step
_LAST_CHECKPOINT_LABELS = {"done": "end", "stopped": "stop", "oom": "oom"}
_MAX_TEXT = 2000  # characters of one sample shown
_STATUS_WORDS = {
    "waiting": "waiting for the first step…",
    "running": "training",
    "stopping": "stopping…",
    "stopped": "stopped",
    "done": "finished",
    "oom": "out of memory",
    "error": "failed",
}


# ------------------------------------------------------------------------------------------------ formatting


def fmt_duration(seconds: float | None) -> str:
    """65 -> '1:05', 3725 -> '1:02:05'."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    total = round(max(seconds, 0.0))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def fmt_loss(x: float | None) -> str:
    """4 significant digits, trailing zeros kept: 1.0 -> '1.000', 0.01234 -> '0.01234', 1234.5 -> '1234'."""
    if x is None:
        return "?"
    return f"{x:.0f}" if math.isfinite(x) and abs(x) >= 1000 else f"{x:#.4g}"


def _opt_float(value: Any) -> float | None:
    """None stays None; anything else must convert to float (bad data raises, and the observer reports it)."""
    return None if value is None else float(value)


def _clip(text: str, limit: int = _MAX_TEXT) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def thin(values: list, stride: int) -> list:
    """Every ``stride``-th value, always ending with the last one (what the plot shows of a long run)."""
    if stride <= 1:
        return list(values)
    out = values[::stride]
    if (len(values) - 1) % stride:
        out.append(values[-1])
    return out


# ------------------------------------------------------------------------------------------------ history


class RunHistory:
    """What one run's events have said so far, aggregated for display. It holds no UI and is updated on every event.

    The loss series keeps every logged step. ``loss`` holds None where the loss was not finite (a gap in the plot).
    ``smoothed`` is the bias-corrected EMA: ``m = (1-a)·m + a·loss``, shown as ``m / (1 - (1-a)^n)``.

    On a GPU the start and step events carry the device's memory (allocated, peak, capacity) and utilisation:
    ``memory_steps`` / ``memory_allocated`` / ``memory_peak`` are the readings, ``last`` holds the latest. Eval
    records keep their accuracy (None where the run computes none) beside the eval loss.

    A resumed run's start event may carry the records from before its checkpoint (``history``: dicts with step,
    loss, lr; ``evals``: dicts with step, eval_loss, accuracy): the series start with them, so the curve goes on
    where it stopped. ``resumed_at`` is then the checkpoint's step, and the ETA counts only the steps since.
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
        self.info: dict[str, Any] = {}  # the start event's data (without the earlier records of a resume)
        self.first_step = 0  # the step the run started at (a resumed run: its checkpoint's step)
        self.resumed_at: int | None = None  # the checkpoint's step when the run is a resume
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
        self.memory_steps: list[int] = []
        self.memory_allocated: list[int] = []
        self.memory_peak: list[int] = []
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
        self._ema = 0.0  # the bias-corrected EMA itself
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
        if event.epoch or event.kind == "start":  # an event without an epoch keeps the last one known
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
        self.info = {k: v for k, v in data.items() if k not in ("history", "evals")}
        if not self.total_steps and data.get("total_steps"):
            self.total_steps = int(data["total_steps"])
        self.first_step = self.step
        self.resumed_at = self.step if data.get("resumed_from") else None
        self._add_device(data)
        history, evals = data.get("history"), data.get("evals")
        if history is not None or evals is not None:
            self._load_earlier(history or (), evals or ())
        if self.status == "waiting":
            self.status = "running"

    def _load_earlier(self, history: Any, evals: Any) -> None:
        """Start the series with a resumed run's records from before its checkpoint (they replace any series)."""
        self.loss_steps, self.loss, self.smoothed, self.lr_steps, self.lr = [], [], [], [], []
        self.eval_steps, self.eval_loss, self.eval_accuracy = [], [], []
        self.nonfinite_losses, self._ema, self._ema_n = 0, 0.0, 0
        self.best_eval_loss, self.last_eval = None, None
        self.last.pop("loss", None)
        epoch = None
        for record in sorted(history, key=lambda r: int(r["step"])):
            step = int(record["step"])
            loss, lr = _opt_float(record.get("loss")), _opt_float(record.get("lr"))
            if loss is not None:
                self._add_loss(loss, step)
            if lr is not None:
                self.lr_steps.append(step)
                self.lr.append(lr)
            epoch = _opt_float(record.get("epoch")) or epoch
        for record in sorted(evals, key=lambda r: int(r["step"])):
            self._add_eval(int(record["step"]), record)
        if not self.epoch and epoch:  # a start event without the epoch: the last record's
            self.epoch = epoch

    def _on_step(self, data: Mapping[str, Any]) -> None:
        if self.status == "waiting":
            self.status = "running"
        loss = _opt_float(data.get("loss"))
        if loss is not None:
            self._add_loss(loss, self.step)
        lr = _opt_float(data.get("lr"))
        if lr is not None:
            self.lr_steps.append(self.step)
            self.lr.append(lr)
        tokens = data.get("tokens")
        if tokens:
            self.tokens += tokens if isinstance(tokens, float) else int(tokens)  # seconds of audio: a float
        for key in _STEP_KEYS:
            value = data.get(key)
            if value is not None:
                self.last[key] = value
        self._add_device(data)

    def _add_device(self, data: Mapping[str, Any]) -> None:
        """A reading of the device's figures: the latest numbers, and a point of the memory series."""
        if "memory_allocated" not in data:  # no reading at this step
            return
        allocated = data["memory_allocated"]
        if allocated is None:  # nothing measured (a CPU): say nothing about GPU memory
            for key in _DEVICE_KEYS:
                self.last.pop(key, None)
            return
        for key in _DEVICE_KEYS:
            value = data.get(key)
            if value is None:
                self.last.pop(key, None)
            else:
                self.last[key] = float(value) if key == "gpu_utilization" else int(value)
        self.memory_steps.append(self.step)
        self.memory_allocated.append(int(allocated))
        self.memory_peak.append(int(data.get("memory_peak") or allocated))

    @property
    def has_device_stats(self) -> bool:
        """True once a reading of the device's memory arrived (never on a CPU)."""
        return bool(self.memory_steps)

    @property
    def has_accuracy(self) -> bool:
        """True when some evaluation reported an accuracy."""
        return any(a is not None for a in self.eval_accuracy)

    def _add_loss(self, loss: float, step: int) -> None:
        self.last["loss"] = loss
        self.loss_steps.append(step)
        if math.isfinite(loss):
            # the bias-corrected EMA, updated as ema += w·(loss - ema) with w = a / (1 - (1-a)^n): the same
            # values as m / (1 - (1-a)^n), but the first one is the loss itself, exactly (w = 1), and a constant
            # loss stays constant (a one-point chart gets no axis spanning a rounding error)
            a = self.ema_alpha
            self._ema_n += 1
            weight = 1.0 if self._ema_n == 1 else a / (1 - (1 - a) ** self._ema_n)
            self._ema += weight * (loss - self._ema)
            self.loss.append(loss)
            self.smoothed.append(self._ema)
        else:
            self.nonfinite_losses += 1
            self.loss.append(None)
            self.smoothed.append(None)

    def _on_eval(self, data: Mapping[str, Any]) -> None:
        self._add_eval(self.step, data)

    def _add_eval(self, step: int, data: Mapping[str, Any]) -> None:
        value = _opt_float(data.get("eval_loss"))
        finite = value is not None and math.isfinite(value)
        self.eval_steps.append(step)
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
            "step": step,
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

    def _note_checkpoint(self, path: Any, reason: str) -> None:
        """The checkpoint an oom/stop event names. One already announced keeps its step and reason."""
        if path and (self.checkpoint is None or self.checkpoint[1] != str(path)):
            self.checkpoint = (self.step, str(path), reason)

    def _on_oom(self, data: Mapping[str, Any]) -> None:
        self.status = "oom"
        message = str(data.get("message") or "CUDA out of memory")
        self.problems.append(("oom", message, str(data.get("advice") or "")))
        self._note_checkpoint(data.get("checkpoint"), "oom")

    def _on_stop(self, data: Mapping[str, Any]) -> None:
        if self.status not in ("oom", "error"):
            self.status = "stopped"
        self.stopped = dict(data)
        self._note_checkpoint(data.get("checkpoint"), "stop")

    def _on_end(self, data: Mapping[str, Any]) -> None:
        """The run's outcome is the engine's (its ``state``): a Stop pressed here after the last step changed
        nothing, so that run is "finished" in every view. The checkpoint of the last step is labelled by that
        outcome — "end", "stop" or "oom" — whatever an earlier event called it; an older checkpoint keeps its
        label."""
        self.end = dict(data)
        outcome = _END_STATES.get(str(data.get("state")))
        if outcome is not None and self.status != "error":
            self.status = outcome
        elif self.status not in ("oom", "error", "stopped"):  # a source that does not say: what this view saw
            self.status = "stopped" if self.stopped is not None or self.status == "stopping" else "done"
        label = _LAST_CHECKPOINT_LABELS.get(self.status)
        path = data.get("checkpoint")
        if label is None or not path:
            return
        if self.checkpoint is None or self.checkpoint[1] != str(path) or self.checkpoint[0] == self.step:
            self.checkpoint = (self.step, str(path), label)

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
        """Seconds left: the engine's estimate when it gives one, else elapsed / steps done · steps left. The
        steps done are those of this run (a resumed run: since its checkpoint); None before the first."""
        if self.finished:
            return None
        if self.last.get("eta") is not None:
            return float(self.last["eta"])
        done = self.step - self.first_step
        if done > 0 and self.total_steps > self.step:
            return self.elapsed() / done * (self.total_steps - self.step)
        return None

    def tokens_per_s(self) -> float | None:
        """Throughput: the end event's, the engine's latest, or tokens counted / elapsed."""
        if self.end is not None and self.end.get("tokens_per_s") is not None:
            return float(self.end["tokens_per_s"])
        if self.last.get("tokens_per_s") is not None:
            return float(self.last["tokens_per_s"])
        elapsed = self.elapsed()
        return self.tokens / elapsed if self.tokens and elapsed > 0 else None

    @property
    def unit(self) -> str:
        """What the throughput counts (the start event's ``unit``): tokens, images or seconds of audio."""
        return str(self.info.get("unit") or "tokens")

    def rate_text(self, rate: float) -> str:
        """Throughput in the run's unit: '1,234 tok/s', '52 images/s', '3.5 s of audio/s'."""
        unit = self.unit
        if unit == "tokens":
            return f"{rate:,.0f} tok/s"
        if unit == "seconds of audio":
            return f"{rate:,.1f} s of audio/s"
        return f"{rate:,.0f} {unit}/s"

    def amount_text(self, amount: float) -> str:
        """An amount of the run's unit: '12.3K tokens', '480 images', '95.5 s of audio'."""
        if self.unit == "seconds of audio":
            return f"{amount:,.1f} s of audio"
        return f"{fmt_count(int(amount))} {self.unit}"

    def status_text(self) -> str:
        """The status in words: 'training', 'stopping…', 'finished', 'out of memory', ..."""
        return _STATUS_WORDS[self.status]

    def step_text(self) -> str:
        """'step 40/200' (or 'step 40' while the total is unknown)."""
        return f"step {self.step}/{self.total_steps}" if self.total_steps else f"step {self.step}"

    def line_text(self) -> str:
        """The compact terminal line: 'step 40/200 · loss 1.234 · 1,234 tok/s · ETA 0:12'."""
        parts = [self.step_text()]
        if "loss" in self.last:
            parts.append(f"loss {fmt_loss(self.last['loss'])}")
        tps = self.tokens_per_s()
        if tps is not None:
            parts.append(self.rate_text(tps))
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {fmt_duration(eta)}")
        return " · ".join(parts)

    def stats_text(self) -> str:
        """The full stats line: steps, epoch, time, throughput, GPU memory, loss, lr, latest eval."""
        parts = [self.step_text(), f"epoch {self.epoch:.2f}"]
        when = f"{fmt_duration(self.elapsed())} elapsed"
        eta = self.eta()
        if eta is not None:
            when += f" / ETA {fmt_duration(eta)}"
        parts.append(when)
        tps = self.tokens_per_s()
        if tps is not None:
            parts.append(self.rate_text(tps))
        gpu = self.gpu_text()
        if gpu:
            parts.append(gpu)
        if "loss" in self.last:
            smooth = next((s for s in reversed(self.smoothed) if s is not None), None)
            text = f"loss {fmt_loss(self.last['loss'])}"
            if smooth is not None and len(self.smoothed) > 1:
                text += f" (EMA {fmt_loss(smooth)})"
            parts.append(text)
        if "lr" in self.last:
            parts.append(f"lr {float(self.last['lr']):.2e}")
        if self.last_eval is not None:
            text = f"eval {fmt_loss(self.last_eval['eval_loss'])}"
            if self.last_eval["accuracy"] is not None:
                text += f", acc {self.last_eval['accuracy']:.3f}"
            if self.best_eval_loss is not None:
                text += f" (best {fmt_loss(self.best_eval_loss)})"
            parts.append(text)
        if self.nonfinite_losses:
            parts.append(f"{self.nonfinite_losses} non-finite loss value(s)")
        return " · ".join(parts)

    def gpu_text(self) -> str:
        """'GPU 3.00 GiB of 80.0 GiB (peak 4.00 GiB) · GPU util 87%' — '' when no reading came (a CPU)."""
        now = self.last.get("memory_allocated")
        if now is None:
            return ""
        text = f"GPU {fmt_bytes(now)}"
        capacity, peak = self.last.get("memory_capacity"), self.last.get("memory_peak")
        if capacity:
            text += f" of {fmt_bytes(capacity)}"
        if peak is not None:
            text += f" (peak {fmt_bytes(peak)})"
        utilization = self.last.get("gpu_utilization")
        if utilization is not None:
            text += f" · GPU util {utilization:.0f}%"
        return text

    def run_text(self) -> str:
        """What the start event said: '200 steps · 1,000 examples · 1.23M trainable params · cpu' ('' before it)."""
        parts = []
        info = self.info
        if self.total_steps:
            parts.append(f"{self.total_steps:,} steps")
        if self.resumed_at is not None:
            parts.append(f"resumed at step {self.resumed_at:,}")
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
        if self.resumed_at is not None:
            head += f" (resumed at {self.resumed_at:,})"
        parts = [f"{head} in {fmt_duration(self.elapsed())}"]
        final = end.get("final_loss", self.last.get("loss"))
        if final is not None:
            parts.append(f"final loss {fmt_loss(float(final))}")
        best = end.get("best_eval_loss", self.best_eval_loss)
        if best is not None:
            parts.append(f"best eval loss {fmt_loss(float(best))}")
        tokens = end.get("tokens") or self.tokens or 0
        tps = self.tokens_per_s()
        if tokens:
            parts.append(self.amount_text(tokens) + (f" at {self.rate_text(tps)}" if tps else ""))
        elif tps:
            parts.append(self.rate_text(tps))
        peak = end.get("memory_peak")
        if peak is None and self.memory_peak:
            peak = max(self.memory_peak)
        if peak is not None:
            parts.append(f"peak GPU memory {fmt_bytes(int(peak))}")
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
