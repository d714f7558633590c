"""``TextProgress``: training progress without widgets.

In a notebook it is an HTML block (progress bar, stats, a loss sparkline, samples, summary) updated in place through
a display handle; in a terminal it prints one compact line per update. IPython loads only when something is shown.
"""

from __future__ import annotations

import html
import math
import sys
from collections.abc import Callable
from typing import Any, Literal, TextIO

from ...core.errors import UsageError
from ...core.events import TrainingEvent
from . import frontend
from .history import RunHistory, fmt_loss, thin
from .observer import DEFAULT_MIN_INTERVAL, ThrottledObserver

__all__ = ["TERMINAL_MIN_INTERVAL", "TextProgress", "text_output"]

TERMINAL_MIN_INTERVAL = 1.0  # printed lines: one per second is as fast as anyone reads a scrolling terminal


def text_output(output: str, min_interval: float | None) -> tuple[str, float]:
    """Where a text view writes ("notebook": one HTML block updated in place; "terminal": printed lines) and how
    often it refreshes there; ``output="auto"`` picks the notebook inside a kernel."""
    if output not in ("auto", "notebook", "terminal"):
        raise UsageError(f"`output` must be 'auto', 'notebook' or 'terminal', got {output!r}.")
    if output == "auto":
        output = "notebook" if frontend.in_kernel() else "terminal"
    if min_interval is None:
        min_interval = DEFAULT_MIN_INTERVAL if output == "notebook" else TERMINAL_MIN_INTERVAL
    return output, min_interval


# the progress bar's colour: green when finished, amber when stopped, red only for a failure
_STATUS_COLORS = {
    "stopping": "#ef6c00",
    "stopped": "#ef6c00",
    "done": "#2e7d32",
    "oom": "#c62828",
    "error": "#c62828",
}


def _one_line(text: str, limit: int) -> str:
    flat = " ⏎ ".join(str(text).splitlines())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class TextProgress(ThrottledObserver):
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
        self.output, min_interval = text_output(output, min_interval)
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
                self._handle = frontend.display(self, display_id=True)
            else:  # another view of the same display id: updates reach both
                frontend.display(self, display_id=self._handle.display_id)

    def _repr_html_(self) -> str:
        with self._lock:
            return self._html()

    def __repr__(self) -> str:
        with self._lock:
            h = self.history
            lines = [h.header_text(self.title), f"{h.line_text()} [{h.status_text()}]"]
            lines += [
                f"{kind}: {message}" + (f" — {advice}" if advice else "")
                for kind, message, advice in h.problems
            ]
            if h.summary_text():
                lines.append(h.summary_text())
            if self.observer_error:
                lines.append(self.observer_error_text())
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
            text = f"eval at step {e['step']}: loss {fmt_loss(e['eval_loss'])}"
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
            self._print(self.observer_error_text())
        elif self._handle is not None:
            self._handle.update(self)

    def _html(self) -> str:
        h = self.history
        total = max(h.total_steps, h.step, 1)
        color = _STATUS_COLORS.get(h.status, "#1f77b4")
        bar = (
            f"<div style='display:flex;align-items:center;gap:8px'>"
            f"<progress value='{min(h.step, total)}' max='{total}' style='width:320px;accent-color:{color}'></progress>"
            f"<span>{html.escape(h.step_text())}</span> <i style='color:#666'>{h.status_text()}</i></div>"
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
            parts.append(f"<div style='color:#888'><i>{html.escape(self.observer_error_text())}</i></div>")
        parts.append(h.samples_html())
        if h.summary_text():
            parts.append(f"<div><b>{html.escape(h.summary_text())}</b></div>")
        return "<div class='jl-progress'>" + "".join(parts) + "</div>"


def _sparkline_svg(h: RunHistory, width: int = 320, height: int = 60) -> str:
    """The smoothed train loss (blue) and eval losses (red dots) as a small inline SVG ('' before two points).
    The x axis runs from 0 to the last step drawn."""
    points = [(x, y) for x, y in zip(h.loss_steps, h.smoothed, strict=True) if y is not None]
    evals = [(x, y) for x, y in zip(h.eval_steps, h.eval_loss, strict=True) if y is not None]
    if len(points) < 2:
        return ""
    points = thin(points, math.ceil(len(points) / width))
    ys = [y for _, y in points] + [y for _, y in evals]
    lo, hi = min(ys), max(ys)
    span_y = (hi - lo) or 1.0
    span_x = max([points[-1][0], *(x for x, _ in evals), 1])

    def xy(x: float, y: float) -> tuple[str, str]:
        return f"{2 + (width - 4) * x / span_x:.1f}", f"{2 + (height - 4) * (hi - y) / span_y:.1f}"

    line = " ".join(",".join(xy(x, y)) for x, y in points)
    dots = "".join("<circle cx='{}' cy='{}' r='2.5' fill='#d62728'/>".format(*xy(x, y)) for x, y in evals)
    return (
        f"<svg width='{width}' height='{height}' style='border:1px solid #eee'>"
        f"<title>loss {fmt_loss(hi)} … {fmt_loss(lo)}</title>"
        f"<polyline fill='none' stroke='#1f77b4' stroke-width='1.5' points='{line}'/>{dots}</svg>"
    )
