"""``ProgressWidget``: live progress of one training run as ipywidgets and a plotly ``FigureWidget``.

Train loss raw and smoothed, eval loss (and accuracy) and learning rate on one chart — with, on a GPU, a small
panel under it of the device's memory over the steps — a progress bar with a Stop button, a stats line, errors
with advice, the latest samples and a summary line. ipywidgets and plotly load when a widget is built.
"""

from __future__ import annotations

import copy
import functools
import html
import math
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from ...core.errors import UsageError
from ...core.events import TrainingEvent
from . import frontend
from .history import thin
from .observer import DEFAULT_MIN_INTERVAL, ThrottledObserver

__all__ = ["ProgressWidget", "array_maker", "show_stopping", "sync_figure_state", "widgets_available"]


@functools.lru_cache(maxsize=1)
def widgets_available() -> bool:
    """True when ipywidgets and plotly can both be imported (checked once)."""
    try:
        import ipywidgets  # noqa: F401
        import plotly.graph_objects  # noqa: F401
    except ImportError:
        return False
    return True


def array_maker() -> Callable[[list], Any]:
    """float64 arrays when numpy is there: plotly validates and sends them as one binary buffer (about 30× faster
    per redraw than lists, which it walks element by element); None becomes NaN, a gap. Lists without numpy."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - plotly works without numpy, only slower
        return list
    return functools.partial(np.array, dtype=np.float64)


_BAR_STYLE = {
    "waiting": "",
    "running": "info",
    "stopping": "warning",
    "stopped": "warning",
    "done": "success",
    "oom": "danger",
    "error": "danger",
}
# the Stop button, which shows the outcome once the run is over: red only for a failure
_BUTTON_STYLE = {
    "stopping": "warning",
    "stopped": "warning",
    "done": "success",
    "oom": "danger",
    "error": "danger",
}
_TRACE_NAMES = (
    "train loss",
    "train loss (EMA)",
    "eval loss",
    "learning rate",
    "eval accuracy",
    "GPU memory",
    "GPU peak",
)
_MEMORY_TRACES = _TRACE_NAMES[5:]  # drawn in the GPU memory panel
_LOSS_COLOR = "#1f77b4"
_RAW_LOSS_COLOR = "#9cc3e4"  # the loss's blue, lightened: drawn under the EMA, visible but quieter
_LR_FORMAT = ".2~e"  # 2e-4, 8.82e-4: learning rates in exponent notation, on the axis and in hover labels
_LOSS_FORMAT = ".4~g"  # hover labels: 4 significant digits, like the stats line
_GIB = float(1 << 30)
_MEMORY_COLOR = "#9467bd"
_MEMORY_PANEL = 110  # pixels the GPU memory panel adds under the chart
_MEMORY_REDRAW_INTERVAL = 1.0  # seconds between two redraws of the memory panel while steps come in
# the vertical split once the memory panel is shown: the loss chart above, the memory panel below
_CHART_DOMAIN, _PANEL_DOMAIN = [0.36, 1.0], [0.0, 0.25]


def _in_gib(values: Any) -> Any:
    """Bytes as GiB: one division of the whole array (element by element for a plain list, without numpy)."""
    return values / _GIB if hasattr(values, "dtype") else [v / _GIB for v in values]


def sync_figure_state(figure: Any, *, layout: bool) -> None:
    """Make ``figure``'s synced state hold its current data (and layout).

    A FigureWidget sends each later change as a one-off message that only views already drawn apply; a view drawn
    afterwards (the widget displayed late, the front end busy until the run ended, the page reloaded) starts from
    the state ``_widget_data`` / ``_widget_layout``, which plotly fills only when the figure is built. Kept current
    here, a view drawn at any time shows everything received so far.
    """
    if hasattr(figure, "_widget_data"):
        figure._widget_data = copy.deepcopy(figure._data)
    if layout and hasattr(figure, "_widget_layout"):
        figure._widget_layout = copy.deepcopy(figure._layout_obj._props)


def show_stopping(button: Any) -> None:
    """A Stop button once clicked: disabled, "stopping…", until the run (or sweep) has stopped."""
    with button.hold_sync():
        button.disabled = True
        button.description = "stopping…"
        button.icon = "hourglass-half"
        button.button_style = _BUTTON_STYLE["stopping"]


class ProgressWidget(ThrottledObserver):
    """Live progress of one training run as ipywidgets: header, progress bar + Stop, stats, a plotly chart,
    errors, latest samples and a final summary. Call it with each ``TrainingEvent``, from any thread.

    ``stop``: called once when Stop is clicked (the run handle's ``.stop()``). Without it there is no button.
    The chart's traces are, in order: train loss (raw), train loss (EMA), eval loss, learning rate (right axis),
    eval accuracy (an axis of its own, shown once an evaluation reports one), and GPU memory allocated and its
    peak, in GiB, in a panel under the chart that appears with the first reading of the device (never on a CPU;
    its axis runs up to the device's capacity). At most ``max_points`` points per trace are drawn (evenly
    thinned; a quarter of that in the memory panel). The history keeps every one.
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
        self._height = int(height)
        self._memory_drawn_at = -math.inf
        self._build(height)
        self.flush()

    # ---- building

    def _build(self, height: int) -> None:
        import ipywidgets as widgets
        import plotly.graph_objects as go

        from .fit import ChartFit

        self._array = array_maker()
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
        self.figure = go.FigureWidget(
            data=[
                go.Scatter(name=_TRACE_NAMES[0], mode="lines", line={"width": 1.5, "color": _RAW_LOSS_COLOR}),
                go.Scatter(name=_TRACE_NAMES[1], mode="lines", line={"width": 2.5, "color": _LOSS_COLOR}),
                go.Scatter(name=_TRACE_NAMES[2], mode="markers", marker={"size": 8, "color": "#d62728"}),
                go.Scatter(
                    name=_TRACE_NAMES[3],
                    mode="lines",
                    yaxis="y2",
                    line={"width": 1, "dash": "dot", "color": "#2ca02c"},
                ),
                go.Scatter(
                    name=_TRACE_NAMES[4],
                    mode="lines+markers",
                    yaxis="y4",
                    marker={"size": 7, "symbol": "diamond", "color": "#ff7f0e"},
                    line={"width": 1, "color": "#ff7f0e"},
                ),
                # the GPU memory traces join the panel's axes (x2, y3) when the panel is shown: a trace on
                # them makes plotly draw that subplot, and the hidden panel's background, whose domain lies
                # inside the loss chart's, would cover the bottom quarter of the loss curves
                go.Scatter(
                    name=_TRACE_NAMES[5],
                    mode="lines",
                    line={"width": 1.5, "color": _MEMORY_COLOR},
                    fill="tozeroy",
                ),
                go.Scatter(
                    name=_TRACE_NAMES[6],
                    mode="lines",
                    line={"width": 1, "dash": "dot", "color": _MEMORY_COLOR},
                ),
            ],
            layout={
                "height": height,
                "margin": {"l": 55, "r": 70, "t": 30, "b": 40},
                "template": "plotly_white",
                "uirevision": "progress",  # keep the user's zoom across updates
                # the steps so far, not the planned total (the progress bar shows that)
                "xaxis": {"title": {"text": "step"}, "rangemode": "tozero", "autorange": True},
                "yaxis": {"title": {"text": "loss"}, "hoverformat": _LOSS_FORMAT},
                "yaxis2": {
                    "title": {"text": "learning rate"},
                    "overlaying": "y",
                    "side": "right",
                    "showgrid": False,
                    "tickmode": "auto",  # its own round ticks, not the loss axis's grid mapped onto it
                    "tickformat": _LR_FORMAT,
                    "hoverformat": _LR_FORMAT,
                    "rangemode": "tozero",
                },
                # eval accuracy: its own axis, beside the learning rate's, shown once there is an accuracy
                "yaxis4": {
                    "title": {"text": "accuracy"},
                    "overlaying": "y",
                    "side": "right",
                    "anchor": "free",
                    "autoshift": True,
                    "showgrid": False,
                    "range": [0, 1],
                    "tickformat": ".0%",
                    "visible": False,
                },
                # the GPU memory panel: hidden until the first reading of the device
                "xaxis2": {"matches": "x", "anchor": "y3", "visible": False},
                "yaxis3": {
                    "title": {"text": "GPU GiB"},
                    "domain": _PANEL_DOMAIN,
                    "rangemode": "tozero",
                    "hoverformat": ".2f",
                    "visible": False,
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
                ChartFit(),  # the chart as wide as the output area
                self.errors,
                self.samples,
                self.summary,
            ]
        )

    # ---- showing

    def show(self) -> None:
        """Display the widget in the current cell, drawn up to the latest event (however recent)."""
        self.flush()
        frontend.display(self.box)

    def _ipython_display_(self) -> None:
        self.show()

    def __repr__(self) -> str:
        h = self.history
        return f"<ProgressWidget {self.title!r}: {h.line_text()} [{h.status_text()}]>"

    # ---- Stop

    def _on_stop_click(self, _button: Any = None) -> None:
        with self._lock:
            if self.stop_requested or self._stop is None or self.history.finished:
                return
            self.stop_requested = True
            self.history.request_stop()
            with self.bar.hold_sync():
                show_stopping(self.stop_button)
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
            status = h.status_text()
            checkpoint = h.checkpoint_text()
            self.stats.value = (
                f"<span style='font-variant-numeric:tabular-nums'>{html.escape(h.stats_text())}</span>"
                f" <i style='color:#666'>{html.escape(status)}</i>"
                + (f"<div style='color:#666'>{html.escape(checkpoint)}</div>" if checkpoint else "")
            )
            if h.finished:
                self.stop_button.disabled = True
                self.stop_button.description = h.status_text()
                self.stop_button.icon = ""
                self.stop_button.button_style = _BUTTON_STYLE[h.status]
            if self._drawn.get("samples") != h.samples_version:
                self.samples.value = h.samples_html()
                self._drawn["samples"] = h.samples_version
            self.errors.value = self._errors_html()
            summary = h.summary_text()
            self.summary.value = f"<b>{html.escape(summary)}</b>" if summary else ""
        self._render_figure(final=event is None or event.kind != "step")

    def _render_figure(self, final: bool = True) -> None:
        h = self.history
        raw, smooth, evals, lr, accuracy, memory, peak = self.figure.data
        # a series is appended to, or replaced as a whole (a resumed run's earlier records): its length and last
        # step tell whether it changed
        drawn = {
            "loss": (len(h.loss_steps), h.loss_steps[-1] if h.loss_steps else None),
            "eval": (len(h.eval_steps), h.eval_steps[-1] if h.eval_steps else None),
            "lr": (len(h.lr_steps), h.lr_steps[-1] if h.lr_steps else None),
            "memory": (len(h.memory_steps), h.memory_steps[-1] if h.memory_steps else None),
            "resumed": h.resumed_at,
            "panel": (h.has_device_stats, h.last.get("memory_capacity")),
            "accuracy": h.has_accuracy,
        }
        changed = {key for key, value in drawn.items() if key not in self._drawn or self._drawn[key] != value}
        now = self._clock()
        if "memory" in changed and not final and now - self._memory_drawn_at < _MEMORY_REDRAW_INTERVAL:
            # the memory panel follows at most once a second on step redraws (two more traces each time)
            changed.discard("memory")
            drawn["memory"] = self._drawn.get("memory")
        if not changed:
            return
        arr = self._array
        with self.figure.batch_update():
            if "loss" in changed:
                stride = math.ceil(len(h.loss_steps) / self.max_points)
                xs = arr(thin(h.loss_steps, stride))
                raw.x, raw.y = xs, arr(thin(h.loss, stride))
                smooth.x, smooth.y = xs, arr(thin(h.smoothed, stride))
                smooth.mode = "lines+markers" if len(h.loss_steps) == 1 else "lines"  # one point: a dot
            if "eval" in changed:
                evals.x, evals.y = arr(h.eval_steps), arr(h.eval_loss)
                if h.has_accuracy:
                    accuracy.x, accuracy.y = arr(h.eval_steps), arr(h.eval_accuracy)
            if "memory" in changed:
                # a small panel: a quarter of the points does (and keeps each redraw cheap)
                stride = math.ceil(len(h.memory_steps) / max(2, self.max_points // 4))
                xs = arr(thin(h.memory_steps, stride))
                memory.x, memory.y = xs, _in_gib(arr(thin(h.memory_allocated, stride)))
                peak.x, peak.y = xs, _in_gib(arr(thin(h.memory_peak, stride)))
                if h.memory_steps:
                    self._memory_drawn_at = now
            if "panel" in changed and h.has_device_stats:
                self._show_memory_panel(h.last.get("memory_capacity"))
            if "accuracy" in changed and h.has_accuracy:
                self.figure.layout.yaxis4.visible = True
            if "lr" in changed:
                stride = math.ceil(len(h.lr_steps) / self.max_points)
                lr.x, lr.y = arr(thin(h.lr_steps, stride)), arr(thin(h.lr, stride))
            if "resumed" in changed:
                self._mark_resume(h.resumed_at)
        sync_figure_state(self.figure, layout=bool(changed & {"resumed", "panel", "accuracy"}))
        self._drawn.update(drawn)

    def _show_memory_panel(self, capacity: int | None) -> None:
        """Make room under the chart for the GPU memory panel; its axis runs up to the device's capacity."""
        layout = self.figure.layout
        layout.height = self._height + _MEMORY_PANEL
        layout.yaxis.domain = _CHART_DOMAIN
        layout.xaxis.showticklabels = False
        layout.xaxis.title.text = None
        layout.xaxis2.update(visible=True, title={"text": "step"})
        layout.yaxis3.visible = True
        for trace in self.figure.data:
            if trace.name in _MEMORY_TRACES:
                trace.update(xaxis="x2", yaxis="y3")
        if capacity:
            layout.yaxis3.update(
                range=[0, capacity / _GIB], title={"text": f"GPU GiB (of {capacity / _GIB:.0f})"}
            )

    def _mark_resume(self, step: int | None) -> None:
        """A dotted line at the step a resumed run continued from (none for a fresh run)."""
        layout = self.figure.layout
        if step is None:
            layout.shapes, layout.annotations = (), ()
            return
        line = {"color": "#888", "width": 1, "dash": "dot"}
        layout.shapes = [
            {"type": "line", "xref": "x", "yref": "paper", "x0": step, "x1": step, "y0": 0, "y1": 1, "line": line}
        ]  # fmt: skip
        layout.annotations = [
            {"x": step, "xref": "x", "y": 1, "yref": "paper", "text": "resumed", "showarrow": False,
             "xanchor": "left", "yanchor": "top", "font": {"size": 10, "color": "#888"}}
        ]  # fmt: skip

    def _errors_html(self) -> str:
        text = self.history.problems_html()
        if self.observer_error is not None:
            text += f"<div style='color:#888'><i>{html.escape(self.observer_error_text())}</i></div>"
        return text

    def _show_observer_error(self) -> None:
        self.errors.value = self._errors_html()
