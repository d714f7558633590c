"""The live sweep leaderboard: an observer of a sweep's ``SweepEvent`` stream (``jupyter_lora.core.sweep``).

* ``SweepBoard``: what the events have said so far — one row per run, each run's loss curve, the run in progress
  and its step, the outcome — and the HTML and text both displays draw. Pure data: no ipywidgets, plotly or IPython.
* ``SweepWidget``: the leaderboard as ipywidgets (the best row marked ★, a Stop button) with two small plotly
  ``FigureWidget``s: the training loss of every run overlaid (one trace per run, the current one growing live) and
  the sweep's metric against trainable parameters (log x, one point per finished run).
* ``SweepText``: the same without widgets: an HTML block updated in place in a notebook, a line per run in a
  terminal.
* ``sweep_observer`` picks one of them for the front end, as ``progress_observer`` does for a training run.

Observers are throttled like the progress displays: every event is recorded at once; the display is redrawn at most
every ``min_interval`` seconds on training steps and at once on every other event, so the final state is exact.
Nothing raised while recording or drawing reaches the sweep. Importing this module is cheap: ipywidgets and plotly
load when a ``SweepWidget`` is built.
"""

from __future__ import annotations

import html
import math
import sys
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any, Literal, TextIO

from ..core.errors import UsageError
from ..core.units import fmt_bytes
from .progress import frontend
from .progress.history import fmt_duration, fmt_loss, thin
from .progress.observer import DEFAULT_MIN_INTERVAL, ThrottledObserver
from .progress.text import text_output
from .progress.widget import show_stopping, widgets_available

__all__ = ["SweepBoard", "SweepText", "SweepWidget", "sweep_observer"]

# what the board says about the sweep as a whole
_STATE_WORDS = {
    "waiting": "waiting for the first run…",
    "running": "running",
    "stopping": "stopping…",
    "finished": "finished",
    "stopped": "stopped",
    "failed": "failed",
}
_ENDED = frozenset({"finished", "stopped", "failed"})
_BUTTON_STYLE = {"stopping": "warning", "stopped": "warning", "finished": "success", "failed": "danger"}
_STATUS_COLORS = {"running": "#1f77b4", "finished": "#2e7d32", "stopped": "#ef6c00", "failed": "#c62828"}
_METRIC_LABELS = {"eval_loss": "eval loss", "accuracy": "accuracy", "train_loss": "training loss",
                  "time_s": "training time (s)", "tokens_per_s": "tokens/s"}  # fmt: skip
_DEFAULT_RESUME = "`%lora resume MODEL` (or `jupyter_lora.resume_sweep(model)`)"
_MAX_REASON = 300  # characters of a failed run's reason shown under its status (all of it in the tooltip)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def _settings_text(row: Mapping[str, Any], varying: tuple[str, ...]) -> str:
    """``method lora · r 8``: what sets a run apart from the others."""
    parts = [f"method {row.get('method')}"]
    parts += [f"{k} {_show(row.get(k))}" for k in varying if row.get(k) is not None]
    return " · ".join(parts)


# ------------------------------------------------------------------------------------------------ the data


class SweepBoard:
    """What a sweep's events have said so far, for display; updated on every event, holds no UI.

    ``rows``: the table's rows (the ``SweepTable`` columns and the varying settings); the running run's row also
    takes its latest eval loss and accuracy as they come. ``curves``: run index -> (steps, losses) of its training
    loss (None where it was not finite). ``state``: waiting | running | stopping | finished | stopped | failed.
    ``version`` changes whenever something in the table does; ``points_version`` whenever a run's row is final.
    """

    def __init__(self, resume_hint: str | None = None) -> None:
        self.resume_hint = resume_hint or _DEFAULT_RESUME
        self.state = "waiting"
        self.planned: list[dict] = []
        self.varying: tuple[str, ...] = ()  # the settings that differ from run to run, ``method`` aside
        self.metric = "eval_loss"
        self.sweep_dir: str | None = None
        self.plan_note = ""  # the settings a method does not use, dropped from its runs
        self.rows: list[dict] = []
        self.curves: dict[int, tuple[list[int], list[float | None]]] = {}
        self.current: int | None = None  # the index of the run in progress
        self.step = 0
        self.total_steps = 0
        self.stop_requested = False
        self.kept: list[str] = []
        self.not_kept: dict[str, str] = {}
        self.events = 0
        self.version = 0
        self.points_version = 0

    # ---- recording

    def record(self, event: Any) -> None:
        """Fold one ``SweepEvent`` in. Unknown kinds are ignored (a newer sweep may send more); malformed data
        raises (the observer reports it)."""
        self.events += 1
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            data = event.data if event.data is not None else {}
            if not isinstance(data, Mapping):
                raise TypeError(f"sweep event data must be a mapping, got {type(data).__name__}")
            handler(event.index, data)
            self.version += 1

    def request_stop(self) -> None:
        """Stop was pressed: shown as "stopping…" until the sweep ends."""
        self.stop_requested = True
        if self.state in ("waiting", "running"):
            self.state = "stopping"
            self.version += 1

    def _on_sweep_start(self, _index: Any, data: Mapping[str, Any]) -> None:
        self.planned = [dict(p) for p in data.get("planned", ())]
        self.varying = tuple(k for k in data.get("varying", ()) if k != "method")
        self.metric = data.get("metric") or self.metric
        self.sweep_dir = data.get("sweep_dir")
        rows = data.get("rows")
        if rows is None:
            rows = [{"run": p["name"], "method": p.get("method"), "status": "pending"} for p in self.planned]
        self.rows = [dict(r) for r in rows]  # a resumed sweep's finished rows are here at once
        self.plan_note = str(data.get("note") or "")
        self.curves = {i: ([], []) for i in range(len(self.rows))}
        for i, curve in (data.get("curves") or {}).items():  # the runs that ended before a resume
            if 0 <= int(i) < len(self.rows):
                self.curves[int(i)] = ([int(s) for s, _ in curve], [_finite(v) for _, v in curve])
        self.current, self.step, self.total_steps = None, 0, 0
        if self.state == "waiting":
            self.state = "running"
        self.points_version += 1

    def _on_run_start(self, index: int, _data: Mapping[str, Any]) -> None:
        self.rows[index]["status"] = "running"
        self.current, self.step, self.total_steps = index, 0, 0
        self.curves[index] = ([], [])

    def _on_train(self, index: int, data: Mapping[str, Any]) -> None:
        inner = data["event"]
        self.step = int(inner.step)
        if inner.total_steps:
            self.total_steps = int(inner.total_steps)
        info = inner.data or {}
        steps, losses = self.curves.setdefault(index, ([], []))
        if inner.kind == "start" and info.get("history"):  # a resumed run: its curve goes on from before
            earlier = sorted(
                (r for r in info["history"] if r.get("loss") is not None), key=lambda r: r["step"]
            )
            steps[:] = [int(r["step"]) for r in earlier]
            losses[:] = [_finite(r["loss"]) for r in earlier]
        elif inner.kind == "step" and info.get("loss") is not None:
            steps.append(self.step)
            losses.append(_finite(info["loss"]))
        elif inner.kind == "eval":
            row = self.rows[index]
            if info.get("eval_loss") is not None:
                row["eval_loss"] = float(info["eval_loss"])
            if info.get("accuracy") is not None:
                row["accuracy"] = float(info["accuracy"])

    def _on_run_end(self, index: int, data: Mapping[str, Any]) -> None:
        self.rows[index] = dict(data["row"])
        if self.current == index:
            self.current = None
        self.points_version += 1

    def _on_sweep_end(self, _index: Any, data: Mapping[str, Any]) -> None:
        table = data.get("table")
        if table is not None:
            self.rows = [dict(r) for r in table.rows]
        self.state = data.get("state") or "finished"
        self.kept = list(data.get("kept") or ())
        self.not_kept = dict(data.get("not_kept") or {})
        self.current = None
        self.points_version += 1

    # ---- reading

    @property
    def finished(self) -> bool:
        """True once the sweep has ended (finished, stopped or failed)."""
        return self.state in _ENDED

    def _table(self) -> Any:
        from ..core.sweep.table import SweepTable  # the sweep has loaded torch already when there are rows

        return SweepTable(self.rows, self.varying, self.metric, note=self.plan_note)

    def best(self) -> dict | None:
        """The best finished row by the sweep's metric (the rule of ``SweepTable.best``), or None."""
        if not any(r.get("status") == "finished" for r in self.rows):
            return None
        return self._table().best

    def best_label(self) -> str:
        """``best by eval loss`` or ``best by training loss (no eval split)``: ``SweepTable.best_label``."""
        if not self.rows:
            return f"best by {_METRIC_LABELS.get(self.metric, self.metric)}"
        return self._table().best_label

    def chart_metric(self) -> str:
        """The metric the chart plots: the one "best" is judged by (``SweepTable.best_metric``)."""
        return self._table().best_metric if self.rows else self.metric

    def points(self) -> list[dict]:
        """The finished runs with trainable parameters and a value of the chart's metric."""
        metric = self.chart_metric()
        return [r for r in self.rows if r.get("status") == "finished" and _number(r.get(metric))
                and _number(r.get("trainable_params")) and r["trainable_params"] > 0]  # fmt: skip

    def status_of(self, index: int) -> tuple[str, str, str]:
        """(word, text, reason) of run ``index``: word is pending | running | finished | stopped | not-run |
        failed; text what the table shows; reason a failed run's whole reason ('' otherwise)."""
        status = str(self.rows[index].get("status") or "pending")
        if status.startswith("failed"):
            reason = status.partition(":")[2].strip() or str(self.rows[index].get("error") or "")
            return "failed", "failed", reason
        if status == "running":
            total = self.total_steps if self.current == index else 0
            word = "stopping…" if self.stop_requested else "running"
            text = f"{word} · step {self.step}/{total}" if total else word
            return "running", text, ""
        if status == "stopped":
            return "stopped", "stopped (checkpoint saved)", ""
        return status.replace(" ", "-"), status, ""

    def counts_text(self) -> str:
        words = [self.status_of(i)[0] for i in range(len(self.rows))]
        order = ("finished", "running", "stopped", "failed", "not-run", "pending")
        return ", ".join(f"{words.count(w)} {w.replace('-', ' ')}" for w in order if w in words)

    def status_line(self) -> str:
        """``5 runs · 2 finished, 1 running, 2 pending · running``."""
        parts = [f"{len(self.rows)} runs" if self.rows else "", self.counts_text(), _STATE_WORDS[self.state]]
        return " · ".join(p for p in parts if p)

    def header_text(self, title: str) -> str:
        return f"{title} · {self.status_line()}"

    def note_text(self) -> str:
        """What happened, once the sweep has ended: the outcome, what the model holds, how to resume."""
        if self.state == "stopped":
            stopped = [r for r in self.rows if r.get("status") == "stopped"]
            waiting = sum(r.get("status") in ("not run", "pending") for r in self.rows)
            which = f"{stopped[0]['run']} saved a checkpoint" if stopped else "no run was in progress"
            rest = f"; {waiting} run{'s' if waiting != 1 else ''} not run" if waiting else ""
            return (f"Sweep stopped: {which}{rest}. The model holds the base as before. {self.resume_hint} "
                    "continues the sweep (finished runs are kept).")  # fmt: skip
        if self.state == "finished":
            done = sum(r.get("status") == "finished" for r in self.rows)
            failed = sum(str(r.get("status", "")).startswith("failed") for r in self.rows)
            best = self.best()
            text = f"Sweep finished: {done}/{len(self.rows)} runs finished"
            text += f" ({failed} failed)." if failed else "."
            if best is not None:
                label = self.best_label()
                text += f" {label[0].upper()}{label[1:]}: {best['run']}."
            text += f" The model holds: {', '.join(self.kept) if self.kept else 'the base'}."
            text += "".join(f" Not kept: {run} ({why})." for run, why in self.not_kept.items())
            return text
        if self.state == "failed":
            return "Sweep failed; the model holds the base as before. `sweep.wait()` raises the error."
        return ""

    # ---- rendering (shared by the widget and the text fallback)

    def headers(self) -> list[str]:
        return ["run", "method", *self.varying, "trainable", "size", "eval loss", "accuracy", "time", "tokens/s",
                "peak memory", "status"]  # fmt: skip

    def cells(self, index: int) -> list[str]:
        from ..core.sweep.table import cell  # the sweep has loaded torch already when there are rows

        r = self.rows[index]
        params = r.get("trainable_params")
        return [
            str(r.get("run")), str(r.get("method")), *(cell(r, k) for k in self.varying),
            f"{params:,}" if _number(params) else "",
            fmt_bytes(r["adapter_bytes"]) if _number(r.get("adapter_bytes")) else "",
            fmt_loss(r["eval_loss"]) if _number(r.get("eval_loss")) else "",
            f"{r['accuracy']:.3f}" if _number(r.get("accuracy")) else "",
            fmt_duration(r["time_s"]) if _number(r.get("time_s")) else "",
            f"{r['tokens_per_s']:,.0f}" if _number(r.get("tokens_per_s")) else "",
            _memory_text(r), self.status_of(index)[1],
        ]  # fmt: skip

    def table_html(self) -> str:
        best = self.best()
        best_run = best["run"] if best is not None else None
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers())
        body = []
        for i, row in enumerate(self.rows):
            cells = self.cells(i)
            word, text, reason = self.status_of(i)
            is_best = row.get("run") == best_run and best_run is not None
            run = ("★ " if is_best else "") + cells[0]
            tds = [f"<td class='jl-run'>{html.escape(run)}</td>"]
            tds += [f"<td>{html.escape(c)}</td>" for c in cells[1:-1]]
            status = html.escape(text)
            if reason:
                short = reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 1] + "…"
                status += f"<div class='jl-reason'>{html.escape(short)}</div>"
            color = _STATUS_COLORS.get(word, "#666")
            tds.append(f"<td class='jl-status' title='{html.escape(reason or text, quote=True)}' "
                       f"style='color:{color}'>{status}</td>")  # fmt: skip
            classes = f"jl-row jl-status-{word}" + (" jl-best" if is_best else "")
            style = " style='background:#fff8e1;font-weight:600'" if is_best else ""
            body.append(f"<tr class='{classes}' data-run='{html.escape(str(row.get('run')), quote=True)}' "
                        f"data-status='{word}'{style}>{''.join(tds)}</tr>")  # fmt: skip
        caption = html.escape(f"{self.best_label()} ★" + (f" · {self.plan_note}" if self.plan_note else ""))
        return (
            "<table class='jl-sweep-board' style='border-collapse:collapse;font-variant-numeric:tabular-nums'>"
            f"<caption style='caption-side:bottom;text-align:left;color:#666'>{caption}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            "<style>.jl-sweep-board td,.jl-sweep-board th{padding:2px 8px;text-align:left;border-bottom:1px solid"
            " #eee;vertical-align:top}.jl-sweep-board .jl-reason{font-size:85%;color:#c62828;max-width:36em;"
            "white-space:normal}</style>"
        )

    def table_text(self) -> str:
        headers = self.headers()
        best = self.best()
        body = []
        for i, row in enumerate(self.rows):
            cells = self.cells(i)
            if best is not None and row.get("run") == best["run"]:
                cells[0] = "★ " + cells[0]
            reason = self.status_of(i)[2]
            if reason:
                cells[-1] += f": {reason}"
            body.append(cells)
        widths = [max([len(h), *(len(c[k]) for c in body)]) for k, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
        return "\n".join(line.rstrip() for line in lines)


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _memory_text(row: Mapping[str, Any]) -> str:
    peak, source = row.get("peak_memory"), row.get("memory_source")
    if not _number(peak):
        return ""
    if source == "measured":
        return f"{fmt_bytes(peak)} (measured)"
    return f"≈ {fmt_bytes(peak)} (estimate)"


def _is_step(event: Any) -> bool:
    inner = event.data.get("event") if event.kind == "train" and isinstance(event.data, Mapping) else None
    return inner is not None and inner.kind == "step"


# ------------------------------------------------------------------------------------------------ observers


class _SweepObserver(ThrottledObserver):
    """Record every sweep event at once; redraw at most every ``min_interval`` s on training steps, and at once on
    every other event. Never raises into the sweep."""

    _default_title = "LoRA sweep"

    def __init__(self, title: str | None, min_interval: float, clock: Callable[[], float] | None,
                 resume_hint: str | None) -> None:  # fmt: skip
        super().__init__(title, min_interval, clock, ema_alpha=0.1)
        self.board = SweepBoard(resume_hint)
        self.history = self.board  # what the events have said: one object, drawn by the display

    def __call__(self, event: Any) -> None:
        try:
            with self._lock:
                self.board.record(event)
                now = self._clock()
                if not _is_step(event) or now - self._last_flush >= self.min_interval - 1e-9:
                    self._flush(event, now)
        except Exception as exc:
            self.report_error(exc)

    def observer_error_text(self) -> str:
        return super().observer_error_text().replace("training continues", "the sweep continues")


class SweepWidget(_SweepObserver):
    """The live leaderboard of a sweep as ipywidgets: header, Stop button, the table (best row ★, failed runs with
    their reason), the loss curves of every run overlaid (one trace per run, legend = run names) and the sweep's
    metric against trainable parameters (log x; one point per finished run, its settings on hover; the best a
    star). Call it with each ``SweepEvent``, from any thread.

    ``stop``: called once when Stop is clicked (``lambda: sweep.stop(wait=False)``; the run in progress finishes
    its step and saves a checkpoint). Without it there is no button. ``resume_hint``: how the note names the
    command that continues a stopped sweep. At most ``max_points`` points per loss curve are drawn.
    """

    def __init__(
        self,
        stop: Callable[[], Any] | None = None,
        title: str | None = None,
        *,
        min_interval: float | None = None,
        max_points: int = 1000,
        clock: Callable[[], float] | None = None,
        height: int = 280,
        resume_hint: str | None = None,
    ) -> None:
        super().__init__(title, DEFAULT_MIN_INTERVAL if min_interval is None else min_interval, clock,
                         resume_hint)  # fmt: skip
        if max_points < 2:
            raise UsageError(f"`max_points` must be at least 2, got {max_points!r}.")
        self.max_points = int(max_points)
        self._stop = stop
        self.stop_requested = False
        self._drawn: dict[str, Any] = {}
        self._build(int(height))
        self.flush()

    # ---- building

    def _build(self, height: int) -> None:
        import ipywidgets as widgets
        import plotly.graph_objects as go

        from .progress.fit import ChartFit
        from .progress.widget import array_maker

        self._array = array_maker()
        self.header = widgets.HTML()
        self.stop_button = widgets.Button(
            description="Stop sweep",
            icon="stop",
            button_style="danger",
            tooltip="the run in progress finishes its step and saves a checkpoint; the sweep ends (resume continues)",
            layout=widgets.Layout(width="auto", display=None if self._stop else "none"),
        )
        self.stop_button.on_click(self._on_stop_click)
        self.table = widgets.HTML()
        small = {"height": height, "template": "plotly_white", "margin": {"l": 55, "r": 20, "t": 40, "b": 45}}
        self.loss_figure = go.FigureWidget(
            layout={
                **small,
                "title": {"text": "training loss", "font": {"size": 13}},
                "uirevision": "losses",
                "xaxis": {"title": {"text": "step"}, "rangemode": "tozero"},
                "yaxis": {"title": {"text": "loss"}, "hoverformat": ".4~g"},
                "legend": {"font": {"size": 10}},
            }
        )
        self.metric_figure = go.FigureWidget(
            data=[go.Scatter(name="finished runs", mode="markers+text", textposition="top center",
                             textfont={"size": 10}, marker={"size": 10, "color": "#1f77b4"}, cliponaxis=False)],
            layout={**small, "title": {"text": "metric vs trainable parameters", "font": {"size": 13}},
                    "uirevision": "points", "showlegend": False,
                    "xaxis": {"title": {"text": "trainable parameters"}, "type": "log"},
                    "yaxis": {"title": {"text": "metric"}}},
        )  # fmt: skip
        self.note = widgets.HTML()
        self.errors = widgets.HTML()
        half = {"width": "50%", "min_width": "320px"}
        charts = widgets.HBox(
            [
                widgets.VBox([self.loss_figure, ChartFit()], layout=widgets.Layout(**half)),
                widgets.VBox([self.metric_figure, ChartFit()], layout=widgets.Layout(**half)),
            ],
            layout=widgets.Layout(flex_flow="row wrap"),
        )
        self.box = widgets.VBox(
            [widgets.HBox([self.header, self.stop_button]), self.table, charts, self.note, self.errors]
        )
        self.box.add_class("jl-sweep-widget")

    # ---- showing

    def show(self) -> None:
        """Display the widget in the current cell, drawn up to the latest event."""
        self.flush()
        frontend.display(self.box)

    def _ipython_display_(self) -> None:
        self.show()

    def __repr__(self) -> str:
        return f"<SweepWidget {self.board.header_text(self.title)!r}>"

    # ---- Stop

    def _on_stop_click(self, _button: Any = None) -> None:
        with self._lock:
            if self.stop_requested or self._stop is None or self.board.finished:
                return
            self.stop_requested = True
            self.board.request_stop()
            show_stopping(self.stop_button)
        try:
            self._stop()
        except Exception as exc:  # clicks run on the kernel thread, where widget callback errors vanish
            self.report_error(exc)
        self.flush()

    # ---- drawing

    def _render(self, event: Any) -> None:
        b = self.board
        with ExitStack() as stack:
            for widget in (self.header, self.table, self.stop_button, self.note, self.errors):
                stack.enter_context(widget.hold_sync())
            self.header.value = (
                f"<b>{html.escape(self.title)}</b> <span style='color:#666'>"
                + html.escape(b.status_line())
                + "</span>"
            )
            if self._drawn.get("table") != b.version:
                self.table.value = b.table_html()
                self._drawn["table"] = b.version
            if b.finished:
                self.stop_button.disabled = True
                self.stop_button.description = f"sweep {b.state}"
                self.stop_button.icon = ""
                self.stop_button.button_style = _BUTTON_STYLE[b.state]
            note = b.note_text()
            self.note.value = f"<div class='jl-sweep-note'><b>{html.escape(note)}</b></div>" if note else ""
            self.errors.value = self._errors_html()
        self._render_losses()
        self._render_points()

    def _render_losses(self) -> None:
        from .progress.widget import sync_figure_state

        b, figure = self.board, self.loss_figure
        names = [str(r.get("run")) for r in b.rows]
        layout_changed = False
        if [t.name for t in figure.data] != names:  # a new sweep: one trace per run, in the plan's order
            import plotly.graph_objects as go

            figure.data = ()
            figure.add_traces([go.Scatter(name=n, mode="lines", line={"width": 1.5}) for n in names])
            self._drawn["curves"] = {}
            layout_changed = True
        drawn = self._drawn.setdefault("curves", {})
        changed = False
        with figure.batch_update():
            for i, trace in enumerate(figure.data):
                steps, losses = b.curves.get(i, ([], []))
                mark = (len(steps), steps[-1] if steps else None, i == b.current)
                if drawn.get(i) == mark:
                    continue
                stride = math.ceil(len(steps) / self.max_points) or 1
                trace.x, trace.y = self._array(thin(steps, stride)), self._array(thin(losses, stride))
                trace.line.width = 2.5 if i == b.current else 1.5
                trace.mode = "lines+markers" if len(steps) == 1 else "lines"
                drawn[i] = mark
                changed = True
        if changed or layout_changed:
            sync_figure_state(figure, layout=layout_changed)

    def _render_points(self) -> None:
        from .progress.widget import sync_figure_state

        b = self.board
        mark = (b.points_version, b.metric, b.version if b.finished else None)
        if self._drawn.get("points") == mark:
            return
        metric = b.chart_metric()
        rows = b.points()
        best = b.best()
        best_run = best["run"] if best is not None else None
        label = _METRIC_LABELS.get(metric, metric)
        figure = self.metric_figure
        with figure.batch_update():
            trace = figure.data[0]
            trace.x = [r["trainable_params"] for r in rows]
            trace.y = [r[metric] for r in rows]
            trace.text = [("★ " if r["run"] == best_run else "") + str(r["run"]) for r in rows]
            trace.customdata = [_settings_text(r, b.varying) for r in rows]
            trace.hovertemplate = (f"<b>%{{text}}</b><br>%{{customdata}}<br>trainable %{{x:,}}<br>{label} "
                                   "%{y:.4~g}<extra></extra>")  # fmt: skip
            trace.marker.symbol = ["star" if r["run"] == best_run else "circle" for r in rows]
            trace.marker.size = [16 if r["run"] == best_run else 10 for r in rows]
            figure.layout.yaxis.title.text = label
            figure.layout.title.text = f"{label} vs trainable parameters"
        sync_figure_state(figure, layout=True)
        self._drawn["points"] = mark

    def _errors_html(self) -> str:
        if self.observer_error is None:
            return ""
        return f"<div style='color:#888'><i>{html.escape(self.observer_error_text())}</i></div>"

    def _show_observer_error(self) -> None:
        self.errors.value = self._errors_html()


class SweepText(_SweepObserver):
    """The leaderboard without widgets (the observer interface and throttling are the same as ``SweepWidget``).

    ``output="notebook"``: the header, table and note as an HTML block, displayed with
    ``display(..., display_id=True)`` and updated in place. ``output="terminal"``: a line when a run starts, a
    line per finished run and the table at the end. ``"auto"``: notebook inside a Jupyter kernel, else terminal.
    """

    def __init__(
        self,
        title: str | None = None,
        *,
        output: Literal["auto", "notebook", "terminal"] = "auto",
        min_interval: float | None = None,
        file: TextIO | None = None,
        clock: Callable[[], float] | None = None,
        resume_hint: str | None = None,
    ) -> None:
        self.output, min_interval = text_output(output, min_interval)
        super().__init__(title, min_interval, clock, resume_hint)
        self._file = file
        self._handle: Any = None
        self._lines: Callable[[Any], None] | None = None

    def show(self) -> None:
        """Notebook: display the block (later updates replace it in place). Terminal: nothing to do."""
        with self._lock:
            if self.output != "notebook":
                return
            if self._handle is None:
                self._handle = frontend.display(self, display_id=True)
            else:
                frontend.display(self, display_id=self._handle.display_id)

    def _repr_html_(self) -> str:
        with self._lock:
            b = self.board
            note = b.note_text()
            error = self.observer_error_text()
            return (
                f"<div class='jl-sweep-text'><div><b>{html.escape(self.title)}</b> <span style='color:#666'>"
                f"{html.escape(b.status_line())}</span></div>"
                + (b.table_html() if b.rows else "")
                + (f"<div><b>{html.escape(note)}</b></div>" if note else "")
                + (f"<div style='color:#888'><i>{html.escape(error)}</i></div>" if error else "")
                + "</div>"
            )

    def __repr__(self) -> str:
        with self._lock:
            b = self.board
            lines = [b.header_text(self.title)]
            if b.rows:
                lines.append(b.table_text())
            if b.note_text():
                lines.append(b.note_text())
            if self.observer_error:
                lines.append(self.observer_error_text())
            return "\n".join(lines)

    def _print(self, text: str) -> None:
        print(text, file=self._file if self._file is not None else sys.stdout, flush=True)

    def _render(self, event: Any) -> None:
        if self.output == "notebook":
            if self._handle is None:
                self.show()
            else:
                self._handle.update(self)
            return
        if event is None:
            return
        if self._lines is None:
            # the sweep's own lines (the sweep has loaded torch already)
            from ..core.sweep import text_observer

            self._lines = text_observer(self._print)
        if event.kind == "run_start":
            self._print(f"[{event.index + 1}] {event.name}: running ({event.data.get('method')})")
        elif event.kind in ("sweep_start", "run_end", "sweep_end"):
            self._lines(event)
            if event.kind == "sweep_end" and self.board.state == "stopped":
                self._print(self.board.note_text())

    def _show_observer_error(self) -> None:
        if self.output == "terminal":
            self._print(self.observer_error_text())
        elif self._handle is not None:
            self._handle.update(self)


def sweep_observer(
    stop: Callable[[], Any] | None = None,
    title: str | None = None,
    mode: Literal["auto", "widget", "text"] = "auto",
    *,
    min_interval: float | None = None,
    resume_hint: str | None = None,
) -> SweepWidget | SweepText:
    """The leaderboard for this front end, to pass in ``jupyter_lora.sweep(..., observers=[board])``.
    ``"widget"``: a ``SweepWidget`` (needs ipywidgets + plotly); ``"text"``: a ``SweepText``; ``"auto"``: the
    widget inside a Jupyter kernel with both importable, else text. ``stop`` backs the widget's Stop button::

        board = sweep_observer(stop=lambda: sw.stop(wait=False))
        sw = jupyter_lora.sweep(model, data, grid={"r": [4, 8, 16]}, observers=[board])
        board.show()
    """
    if mode not in ("auto", "widget", "text"):
        raise UsageError(f"`mode` must be 'auto', 'widget' or 'text', got {mode!r}.")
    if mode == "widget" or (mode == "auto" and frontend.in_kernel() and widgets_available()):
        return SweepWidget(stop=stop, title=title, min_interval=min_interval, resume_hint=resume_hint)
    return SweepText(title=title, min_interval=min_interval, resume_hint=resume_hint)
