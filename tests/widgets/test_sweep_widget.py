"""The sweep leaderboard, built without a kernel or browser and fed the events of real sweeps of a tiny model.

Assertions are on widget state: the table's rows and statuses (its HTML), the loss-curve traces, the points of the
metric chart, the best mark, the Stop button and the note; on the text fallback's lines; and on the throttling.
"""

from __future__ import annotations

import io
import re
import threading
from dataclasses import replace

import pytest

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError
from jupyter_lora.core.events import TrainingEvent
from jupyter_lora.core.sweep import SweepEvent
from jupyter_lora.testing import tiny_model, tiny_tokenizer
from jupyter_lora.widgets.progress import frontend
from jupyter_lora.widgets.sweep import SweepText, SweepWidget, sweep_observer

pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")

TEXT = ["the quick brown fox jumps over the lazy dog."] * 24
SHARED = dict(steps=4, lr=3e-3, batch=4, eval=8, eval_every=2, seq=32)
# three runs: two methods that finish and one whose targets match nothing (it fails with that reason)
RUNS = [{"r": 4}, {"method": "ia3"}, {"targets": "no_such_proj"}]


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The events of a real three-run sweep, and the sweep."""
    events: list[SweepEvent] = []
    sw = jl.sweep(tiny_model("llama"), TEXT, runs=RUNS, tokenizer=tiny_tokenizer(), keep="best",
                  output_dir=tmp_path_factory.mktemp("sweep") / "s", observers=[events.append], background=False,
                  **SHARED)  # fmt: skip
    return events, sw


def _n(values) -> int:
    return 0 if values is None else len(values)


def _statuses(widget: SweepWidget) -> list[str]:
    return re.findall(r"data-status='([^']+)'", widget.table.value)


def _status_cells(widget: SweepWidget) -> list[str]:
    return [re.sub(r"<[^>]+>", " ", c).strip() for c in re.findall(r"<td class='jl-status'[^>]*>(.*?)</td>",
                                                                   widget.table.value)]  # fmt: skip


def _best_rows(widget: SweepWidget) -> list[str]:
    return re.findall(r"<tr class='[^']*jl-best'[^>]*data-run='([^']+)'", widget.table.value)


def test_rows_statuses_traces_points_and_best_follow_the_events(recorded):
    events, sw = recorded
    widget = SweepWidget(stop=lambda: None, min_interval=0)
    names = [r["run"] for r in sw.table.rows]
    seen_running = seen_step = False
    for event in events:
        widget(event)
        if event.kind == "sweep_start":
            assert _statuses(widget) == ["pending"] * 3
            assert [t.name for t in widget.loss_figure.data] == names  # one trace per run, legend = run names
            assert all(_n(t.x) == 0 for t in widget.loss_figure.data)
            assert _n(widget.metric_figure.data[0].x) == 0
        elif event.kind == "run_start" and event.index == 0:
            assert _statuses(widget) == ["running", "pending", "pending"]
            seen_running = True
        elif event.kind == "train" and event.index == 1 and event.data["event"].kind == "step":
            step = event.data["event"].step
            assert _statuses(widget) == ["finished", "running", "pending"]
            assert f"running · step {step}/4" in _status_cells(widget)[1]
            assert len(widget.loss_figure.data[1].x) == step  # the current run's curve grows step by step
            assert len(widget.loss_figure.data[0].x) == 4 and widget.loss_figure.data[1].line.width == 2.5
            assert len(widget.metric_figure.data[0].x) == 1  # the first run's point
            seen_step = True
    assert seen_running and seen_step
    assert widget.observer_error is None
    assert _statuses(widget) == ["finished", "finished", "failed"]
    failed = re.search(r"<td class='jl-status' title='([^']*)'", widget.table.value.split("data-run='03")[1])
    assert "no_such_proj" in failed.group(1)  # the reason, as a tooltip (and as text under the status)
    assert "matches no module" in _status_cells(widget)[2]
    best = sw.best["run"]
    assert _best_rows(widget) == [best] and f"★ {best}" in widget.table.value
    points = widget.metric_figure.data[0]
    by_run = {r["run"]: r for r in sw.table.rows}
    assert list(points.x) == [by_run[n]["trainable_params"] for n in names[:2]]  # finished runs only
    assert list(points.y) == [by_run[n]["eval_loss"] for n in names[:2]]
    assert list(points.marker.symbol) == ["star" if n == best else "circle" for n in names[:2]]
    assert "method ia3" in points.customdata[1] and widget.metric_figure.layout.xaxis.type == "log"
    assert [len(t.x) for t in widget.loss_figure.data] == [4, 4, 0]
    assert widget.stop_button.disabled and widget.stop_button.description == "sweep finished"
    assert f"Best by eval loss: {best}" in widget.note.value and "1 failed" in widget.note.value
    # the row shows what the sweep's table says
    row = by_run[best]
    assert f"{row['trainable_params']:,}" in widget.table.value and "(estimate)" in widget.table.value


def test_stop_stops_the_sweep_and_a_resumed_sweep_shows_the_finished_rows_at_once(tmp_path):
    model = tiny_model("llama")
    second_run_stepping = threading.Event()

    def watch(event):
        if event.kind == "train" and event.index == 1 and event.data["event"].kind == "step":
            second_run_stepping.set()

    calls = []
    holder = {}

    def stop():
        calls.append(1)
        holder["sweep"].stop(wait=False)

    widget = SweepWidget(stop=stop, resume_hint="`%lora resume model`")
    holder["sweep"] = sw = jl.sweep(model, TEXT, grid={"r": [4, 8, 16]}, tokenizer=tiny_tokenizer(), keep="none",
                                    output_dir=tmp_path / "s", observers=[widget, watch], background=True,
                                    **dict(SHARED, steps=40))  # fmt: skip
    assert second_run_stepping.wait(120)
    widget.stop_button.click()
    assert widget.stop_button.disabled and widget.stop_button.description == "stopping…"
    widget.stop_button.click()  # a second click does nothing
    sw.wait(120)
    assert calls == [1] and sw.state == "stopped"
    assert _statuses(widget) == ["finished", "stopped", "not-run"]
    assert "stopped (checkpoint saved)" in _status_cells(widget)[1]
    assert widget.stop_button.description == "sweep stopped"
    note = widget.note.value
    assert "Sweep stopped" in note and "`%lora resume model` continues the sweep" in note

    resumed = SweepWidget(min_interval=0)
    first: list[list[str]] = []

    def at_start(event):
        if event.kind == "sweep_start":
            first.append(_statuses(resumed))
            first.append([str(len(resumed.metric_figure.data[0].x))])

    again = jl.resume_sweep(model, observers=[resumed, at_start], background=False)
    assert first[0] == ["finished", "pending", "pending"] and first[1] == ["1"]  # at once, before any run
    assert again.state == "finished" and _statuses(resumed) == ["finished"] * 3
    # the stopped run went on from its checkpoint: its curve starts with the steps before it
    steps = list(resumed.loss_figure.data[1].x)
    assert steps[0] == 1 and steps[-1] == 40 and len(steps) == 40


def _step_events(n: int) -> list[SweepEvent]:
    plan = [{"index": 0, "name": "01-a", "method": "lora", "settings": {"r": 4}}]
    rows = [{"run": "01-a", "method": "lora", "r": 4, "status": "pending"}]
    events = [SweepEvent("sweep_start", None, None, {"planned": plan, "varying": ["r"], "sweep_dir": "x",
                                                      "metric": "eval_loss", "rows": rows}),
              SweepEvent("run_start", 0, "01-a", {"settings": {"r": 4}, "method": "lora"})]  # fmt: skip
    for s in range(1, n + 1):
        inner = TrainingEvent("step", s, n, s / n, s * 0.01, {"loss": 3.0 - s / n})
        events.append(SweepEvent("train", 0, "01-a", {"event": inner}))
    return events


def test_throttling_records_every_step_and_redraws_at_most_every_interval():
    clock = FakeClock()
    widget = SweepWidget(clock=clock, min_interval=0.2, max_points=10_000)
    start = widget.flushes
    events = _step_events(1010)
    for event in events:
        clock.t += 0.01  # 100 steps a second
        widget(event)
    redraws = widget.flushes - start
    # 10 s of steps at one redraw per 0.2 s, plus the two sweep events that always redraw
    assert 48 <= redraws <= 55, redraws
    assert len(widget.board.curves[0][0]) == 1010  # every step recorded
    drawn = len(widget.loss_figure.data[0].x)
    assert 990 <= drawn < 1010  # the curve drawn lags by less than one interval
    # a step inside the interval does not redraw; any other event does, and draws everything
    widget(replace(events[-1], data={"event": replace(events[-1].data["event"], step=1011)}))
    assert widget.flushes - start == redraws
    widget(SweepEvent("run_end", 0, "01-a", {"row": {"run": "01-a", "method": "lora", "r": 4,
                                                      "status": "finished", "trainable_params": 10,
                                                      "eval_loss": 1.0}}))  # fmt: skip
    assert widget.flushes - start == redraws + 1 and len(widget.loss_figure.data[0].x) == 1011
    assert _statuses(widget) == ["finished"]


def test_the_loss_curves_are_thinned_to_max_points():
    widget = SweepWidget(min_interval=0, max_points=100)
    for event in _step_events(1000):
        widget(event)
    xs = list(widget.loss_figure.data[0].x)
    assert len(xs) <= 101 and xs[-1] == 1000 and len(widget.board.curves[0][0]) == 1000


def test_text_fallback_in_a_terminal_and_in_a_notebook(recorded, monkeypatch):
    events, sw = recorded
    out = io.StringIO()
    text = SweepText(output="terminal", file=out)
    for event in events:
        text(event)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Sweep of 3 runs")
    assert "[1] 01-lora-r_4: running (lora)" in lines
    assert any(line.startswith("[3] 03-lora-targets_no_such_proj: failed: ") for line in lines)
    assert not any("step" in line for line in lines if line.startswith("[")), lines  # no line per step
    assert "★" in repr(text) and "failed: " in repr(text)

    shown = []

    class Handle:
        display_id = "h"

        def update(self, obj):
            shown.append(obj._repr_html_())

    def fake_display(obj, **kwargs):
        shown.append(obj._repr_html_())
        return Handle()

    monkeypatch.setattr(frontend, "display", fake_display)
    block = SweepText(output="notebook", min_interval=0)
    block.show()
    for event in events:
        block(event)
    assert len(shown) > len([e for e in events if e.kind != "train"])  # updated in place as events come
    final = shown[-1]
    assert final.count("data-status='finished'") == 2 and "data-status='failed'" in final
    assert f"★ {sw.best['run']}" in final and "Sweep finished" in final


def test_a_broken_event_is_reported_on_the_display_and_never_raised(recorded):
    events, _ = recorded
    widget = SweepWidget(min_interval=0)
    widget(events[0])
    widget(SweepEvent("run_end", 0, "x", {"no_row": 1}))  # malformed: no row
    widget(SweepEvent("run_end", 0, "x", {"no_row": 1}))
    assert "KeyError" in widget.observer_error and "the sweep continues" in widget.errors.value
    assert "(and 1 more)" in widget.observer_error_text()
    widget(SweepEvent("some_new_kind", None, None, {}))  # unknown kinds are ignored
    assert widget.observer_errors == 2


def test_sweep_observer_picks_the_display():
    assert isinstance(sweep_observer(mode="widget"), SweepWidget)
    assert isinstance(sweep_observer(mode="text"), SweepText)
    assert isinstance(sweep_observer(), SweepText)  # no kernel here
    assert sweep_observer(mode="widget").stop_button.layout.display == "none"  # no stop: no button
    assert sweep_observer(stop=lambda: None, mode="widget").stop_button.layout.display is None
    with pytest.raises(UsageError, match="`mode` must be"):
        sweep_observer(mode="fancy")
