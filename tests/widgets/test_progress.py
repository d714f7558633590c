"""The training progress observers, built without a kernel or browser and driven with synthetic ``TrainingEvent``s.

Assertions are on widget state (progress value, plotly trace data, HTML panes, button state), on the text fallback's
printed lines, and on a ``transformers.Trainer`` run translated by ``ProgressCallback``.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jupyter_lora.core.errors import UsageError
from jupyter_lora.core.events import TrainingEvent
from jupyter_lora.widgets import progress as P
from jupyter_lora.widgets.progress import (
    ProgressWidget,
    RunHistory,
    TextProgress,
    frontend,
    progress_observer,
)

_spec = importlib.util.spec_from_file_location(
    "observer_cost", Path(__file__).resolve().parents[2] / "benchmarks" / "observer_cost.py"
)
observer_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(observer_cost)

TOTAL = 100
EVAL_AT = (25, 50, 75, 100)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def loss_at(step: int) -> float:
    return 2.5 * math.exp(-step / 40) + 0.4 + 0.1 * math.sin(step)


def lr_at(step: int) -> float:
    return 2e-4 * min(1.0, step / 10) * (1 - step / (TOTAL + 1))


def ev(kind: str, step: int, time_: float = 0.0, total: int = TOTAL, **data: Any) -> TrainingEvent:
    return TrainingEvent(kind, step, total, step / total, time_, data)


def run_events(total: int = TOTAL, dt: float = 0.5) -> list[TrainingEvent]:
    """start, ``total`` steps (loss, lr, tokens, throughput, ETA, memory), evals, a sample, a checkpoint, end."""
    events = [
        ev(
            "start",
            0,
            total=total,
            total_steps=total,
            examples=1000,
            eval_examples=50,
            trainable_params=1_234_567,
            task="causal-lm",
            device="cuda:0",
        )
    ]
    for step in range(1, total + 1):
        t = step * dt
        events.append(
            ev(
                "step",
                step,
                t,
                total=total,
                loss=loss_at(step),
                lr=lr_at(step),
                tokens=512,
                tokens_per_s=1234.0,
                elapsed=t,
                eta=(total - step) * dt,
                memory_allocated=3 << 30,
                memory_peak=4 << 30,
                grad_norm=None,
            )
        )
        if step in EVAL_AT:
            events.append(ev("eval", step, t, total=total, eval_loss=1.0 / step**0.1, improved=True))
        if step == 50:
            events.append(
                ev(
                    "sample",
                    step,
                    t,
                    total=total,
                    samples=[{"prompt": "<script>alert(1)</script>", "text": "Tom & Jerry <b>bold</b>"}],
                )
            )
            events.append(ev("checkpoint", step, t, total=total, path="out/checkpoint-50", reason="every"))
    end = total * dt
    events.append(
        ev(
            "end",
            total,
            end,
            total=total,
            steps=total,
            final_loss=loss_at(total),
            best_eval_loss=1.0 / 100**0.1,
            elapsed=end,
            tokens=512 * total,
            tokens_per_s=1234.0,
            checkpoint="out/final",
            state="completed",
        )
    )
    return events


def reference_ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, m = [], 0.0
    for n, x in enumerate(values, start=1):
        m = alpha * x + (1 - alpha) * m
        out.append(m / (1 - (1 - alpha) ** n))
    return out


def traces(w: ProgressWidget) -> dict[str, Any]:
    return {t.name: t for t in w.figure.data}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ----------------------------------------------------------------------------------------------- ProgressWidget


def test_widget_full_run_state(clock):
    w = ProgressWidget(stop=lambda: None, title="run <1>", clock=clock)
    for e in run_events():
        clock.t = e.time
        w(e)

    assert w.observer_error is None
    assert (w.bar.value, w.bar.max, w.bar.bar_style) == (TOTAL, TOTAL, "success")
    assert "run &lt;1&gt;" in w.header.value and "1.23M trainable params" in w.header.value

    t = traces(w)
    steps = list(range(1, TOTAL + 1))
    losses = [loss_at(s) for s in steps]
    assert list(t["train loss"].x) == steps
    np.testing.assert_allclose(t["train loss"].y, losses)
    np.testing.assert_allclose(t["train loss (EMA)"].y, reference_ema(losses), rtol=1e-12)
    assert t["train loss (EMA)"].y[0] == pytest.approx(losses[0])  # bias correction: no pull towards 0
    assert list(t["eval loss"].x) == list(EVAL_AT)
    np.testing.assert_allclose(t["eval loss"].y, [1.0 / s**0.1 for s in EVAL_AT])
    assert t["eval loss"].mode == "markers"
    assert t["learning rate"].yaxis == "y2" and len(t["learning rate"].x) == TOTAL
    np.testing.assert_allclose(t["learning rate"].y, [lr_at(s) for s in steps])

    assert "<script>" not in w.samples.value and "&lt;script&gt;alert(1)&lt;/script&gt;" in w.samples.value
    assert "Tom &amp; Jerry &lt;b&gt;bold&lt;/b&gt;" in w.samples.value
    assert "samples at step 50" in w.samples.value
    summary = w.summary.value
    assert summary.startswith("<b>finished: 100 steps in 0:50")
    assert "best eval loss" in summary and "51.2K tokens at 1,234 tok/s" in summary and "out/final" in summary
    assert (w.stop_button.disabled, w.stop_button.description) == (True, "finished")
    assert "ETA" not in w.stats.value  # finished: no ETA any more


def test_widget_stats_mid_run(clock):
    w = ProgressWidget(title="run", clock=clock)
    for e in [e for e in run_events() if e.step <= 40 and e.kind != "end"]:  # start, 40 steps, eval at 25
        clock.t = e.time
        w(e)
    w.flush()
    stats = w.stats.value
    assert "step 40/100" in stats and "epoch 0.40" in stats
    assert "0:20 elapsed / ETA 0:30" in stats
    assert "1,234 tok/s" in stats
    assert "GPU 3 GiB (peak 4 GiB)" in stats
    assert f"loss {loss_at(40):#.4g}" in stats and "EMA" in stats and f"lr {lr_at(40):.2e}" in stats
    assert w.bar.bar_style == "info" and w.summary.value == ""
    assert w.stop_button.layout.display == "none"  # no stop callable: no button


def test_throttling_burst_then_exact_final_state(clock):
    w = ProgressWidget(stop=lambda: None, clock=clock)
    events = run_events()
    steps = [e for e in events if e.kind == "step"]
    w(events[0])  # start: always drawn
    before = w.flushes
    for i, e in enumerate(steps):
        clock.t = i * 0.001  # 100 steps within 0.1 s
        w(e)
    step_flushes = w.flushes - before
    assert step_flushes <= 1
    assert w.bar.value < TOTAL  # the display really lagged behind...
    assert len(w.history.loss) == TOTAL  # ...while the history recorded everything at once
    w(ev("end", TOTAL, 0.1, steps=TOTAL, elapsed=0.1))
    assert w.flushes - before == step_flushes + 1
    assert w.bar.value == TOTAL and len(traces(w)["train loss"].x) == TOTAL
    np.testing.assert_allclose(traces(w)["train loss"].y, [loss_at(s) for s in range(1, TOTAL + 1)])


def test_throttling_at_most_five_per_second(clock):
    w = ProgressWidget(clock=clock)
    before = w.flushes
    for step in range(1, 201):  # 20 steps/s for 10 s
        clock.t = step * 0.05
        w(ev("step", step, clock.t, total=200, loss=1.0))
    assert w.flushes - before == 50  # every 4th step (0.2 s), float jitter tolerated


def test_always_flushed_kinds(clock):
    w = ProgressWidget(clock=clock, min_interval=1000)
    w(ev("step", 1, loss=2.0))  # the first step is drawn
    for kind, data in [
        ("eval", {"eval_loss": 1.5}),
        ("sample", {"samples": []}),
        ("checkpoint", {"path": "p", "reason": "every"}),
        ("oom", {"message": "m", "advice": "a"}),
        ("stop", {"reason": "user"}),
        ("error", {"message": "boom", "type": "RuntimeError"}),
        ("end", {}),
    ]:
        before = w.flushes
        w(ev(kind, 2, **data))
        assert w.flushes == before + 1, kind
    before = w.flushes
    w(ev("step", 3, loss=2.0))
    assert w.flushes == before


def test_decimation_keeps_the_last_point(clock):
    w = ProgressWidget(clock=clock, max_points=10)
    for step in range(1, 101):
        w(ev("step", step, loss=float(step), lr=1e-4))
    w.flush()
    raw = traces(w)["train loss"]
    assert len(raw.x) <= 11 and raw.x[0] == 1 and raw.x[-1] == 100 and raw.y[-1] == 100
    assert len(w.history.loss) == 100


def test_nonfinite_loss_is_a_gap(clock):
    w = ProgressWidget(clock=clock, min_interval=0)
    for step, loss in enumerate([2.0, float("nan"), 1.0, float("inf")], start=1):
        w(ev("step", step, loss=loss))
    y = traces(w)["train loss"].y
    assert y[0] == 2.0 and math.isnan(y[1]) and y[2] == 1.0 and math.isnan(y[3])
    assert traces(w)["train loss (EMA)"].y[2] == pytest.approx(reference_ema([2.0, 1.0])[1])
    assert "2 non-finite loss value(s)" in w.stats.value and w.observer_error is None


def test_oom_and_error_panes(clock):
    w = ProgressWidget(stop=lambda: None, clock=clock)
    w(ev("step", 5, loss=1.0))
    w(ev("oom", 5, message="CUDA out of memory <x>", advice="use --batch 4 or --ckpt", checkpoint="out/oom"))
    assert "out of memory" in w.errors.value and "CUDA out of memory &lt;x&gt;" in w.errors.value
    assert "use --batch 4 or --ckpt" in w.errors.value
    assert w.bar.bar_style == "danger" and w.stop_button.disabled
    w(ev("end", 5))
    assert w.summary.value.startswith("<b>out of memory at step 5") and "out/oom" in w.summary.value

    w3 = ProgressWidget(clock=clock)
    w3(ev("end", 4, state="stopped"))
    assert w3.summary.value.startswith("<b>stopped at step 4/100")

    w2 = ProgressWidget(clock=clock)
    w2(ev("error", 3, message="shape mismatch", type="RuntimeError"))
    assert "RuntimeError: shape mismatch" in w2.errors.value and "failed at step 3" in w2.summary.value


# ----------------------------------------------------------------------------------------------- a view drawn late


def state_traces(w: ProgressWidget) -> dict[str, dict[str, Any]]:
    """The traces a front end that draws the figure now starts from (its synced state), arrays decoded."""
    out = {}
    for trace in w.figure.get_state()["_widget_data"]:
        decoded = dict(trace)
        for key in ("x", "y"):
            value = trace.get(key)
            if isinstance(value, dict) and "buffer" in value:
                decoded[key] = np.frombuffer(value["buffer"], dtype=value["dtype"]).reshape(value["shape"])
        out[trace["name"]] = decoded
    return out


def test_a_view_drawn_after_the_run_shows_the_whole_run(clock):
    """The figure's state, what a view drawn later starts from, holds every point received: a run that ends
    before the front end draws the widget still shows its curve."""
    w = ProgressWidget(stop=lambda: None, clock=clock)  # built (the comm opens); no view yet
    events = run_events()
    for i, e in enumerate(events):
        clock.t = i * 0.001  # the whole run within 0.2 s: step redraws are throttled
        w(e)
    assert w.history.status == "done"
    state = state_traces(w)
    steps = list(range(1, TOTAL + 1))
    assert list(state["train loss"]["x"]) == steps
    np.testing.assert_allclose(state["train loss"]["y"], [loss_at(s) for s in steps])
    np.testing.assert_allclose(state["train loss (EMA)"]["y"], traces(w)["train loss (EMA)"].y)
    assert list(state["eval loss"]["x"]) == list(EVAL_AT)
    assert len(state["learning rate"]["x"]) == TOTAL


def test_show_draws_what_was_received_before(monkeypatch, clock):
    shown = []
    monkeypatch.setattr(frontend, "display", lambda obj, **kw: shown.append(obj))
    w = ProgressWidget(clock=clock)
    w(ev("start", 0, total_steps=TOTAL))
    for step in range(1, 31):  # within one interval: the display lags behind the history
        w(ev("step", step, loss=loss_at(step), lr=lr_at(step)))
    assert w.bar.value < 30
    w.show()
    assert shown == [w.box]
    assert w.bar.value == 30 and "step 30/100" in w.stats.value
    assert list(state_traces(w)["train loss"]["x"]) == list(range(1, 31))


# ----------------------------------------------------------------------------------------------- a resumed run


def resumed_start(at: int = 60, epoch: float = 0.6, **extra: Any) -> TrainingEvent:
    """A resumed run's start event with the records from before its checkpoint, in the engine's format."""
    from jupyter_lora.core.train.checkpoints import history_of

    log = [
        {"step": s, "loss": loss_at(s), "learning_rate": lr_at(s), "epoch": s / TOTAL}
        for s in range(1, at + 1)
    ]
    log += [{"step": s, "eval_loss": 1.0 / s**0.1, "epoch": s / TOTAL} for s in EVAL_AT if s <= at]
    history, evals = history_of({"log_history": log})
    data = {"total_steps": TOTAL, "resumed_from": f"out/checkpoint-{at}", "history": history, "evals": evals}
    return TrainingEvent("start", at, TOTAL, epoch, 0.5, {**data, **extra})


def test_a_resumed_run_continues_the_earlier_curve(clock):
    w = ProgressWidget(stop=lambda: None, clock=clock, min_interval=0)
    w(resumed_start(60))
    for step in range(61, 71):
        clock.t = step
        w(ev("step", step, (step - 60) * 0.5, loss=loss_at(step), lr=lr_at(step)))

    t = traces(w)
    losses = [loss_at(s) for s in range(1, 71)]
    assert list(t["train loss"].x) == list(range(1, 71))
    np.testing.assert_allclose(t["train loss"].y, losses)
    # one EMA through the old and new points, not a new one from the resume
    np.testing.assert_allclose(t["train loss (EMA)"].y, reference_ema(losses), rtol=1e-12)
    np.testing.assert_allclose(t["learning rate"].y, [lr_at(s) for s in range(1, 71)])
    assert list(t["eval loss"].x) == [25, 50]
    assert w.history.best_eval_loss == pytest.approx(1.0 / 50**0.1)
    assert "resumed at step 60" in w.header.value
    (mark,) = w.figure.layout.shapes
    assert (mark.x0, mark.x1) == (60, 60)
    assert [s["x0"] for s in w.figure.get_state()["_widget_layout"]["shapes"]] == [60]  # for a late view too
    assert list(state_traces(w)["train loss"]["x"]) == list(range(1, 71))
    assert "step 70/100 · epoch 0.70" in w.stats.value


def test_a_resumed_run_has_no_eta_before_its_first_step_and_counts_only_its_own_steps(clock):
    h = RunHistory()
    h.record(resumed_start(60))
    assert h.eta() is None and "ETA" not in h.stats_text()  # nothing done since the resume yet
    h.record(ev("step", 70, 20.0, loss=1.0))  # 10 steps in 20 s, no estimate from the engine
    assert h.eta() == pytest.approx(20.0 / 10 * 30)
    assert "0:20 elapsed / ETA 1:00" in h.stats_text()


def test_a_resumed_run_takes_the_epoch_of_its_records_when_the_start_event_has_none():
    h = RunHistory()
    h.record(resumed_start(60, epoch=0.0))
    assert "epoch 0.60" in h.stats_text()
    h.record(ev("step", 61, 1.0, loss=1.0))  # the step event's own epoch
    assert "epoch 0.61" in h.stats_text()


def test_a_resumed_run_summary_and_a_fresh_start_of_the_same_widget(clock):
    w = ProgressWidget(clock=clock, min_interval=0)
    w(resumed_start(60))
    w(ev("end", TOTAL, 20.0, steps=TOTAL, elapsed=20.0))
    assert w.summary.value.startswith("<b>finished: 100 steps (resumed at 60) in 0:20")
    fresh = RunHistory()
    fresh.record(ev("start", 0, total_steps=TOTAL, resumed_from=None))
    assert fresh.resumed_at is None and "resumed" not in fresh.run_text()


# ----------------------------------------------------------------------------------------------- the chart's look


def test_one_point_has_a_loss_and_ema_that_agree_exactly(clock):
    """The first smoothed value is the loss itself, bit for bit, and a constant loss stays constant: a one-point
    chart does not get a loss axis spanning a rounding error (labelled with the loss's 19 digits)."""
    w = ProgressWidget(clock=clock, min_interval=0)
    w(ev("step", 1, loss=4.873530864715576172, lr=8.82e-4))
    t = traces(w)
    assert t["train loss (EMA)"].y[0] == t["train loss"].y[0] == 4.873530864715576172
    assert "markers" in t["train loss (EMA)"].mode  # one point is drawn as a dot
    for step in range(2, 50):
        w(ev("step", step, loss=4.873530864715576172))
    assert set(traces(w)["train loss (EMA)"].y) == {4.873530864715576172}
    assert traces(w)["train loss (EMA)"].mode == "lines"


def _luminance(color: str) -> float:
    r, g, b = (int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_chart_axes_and_line_styles(clock):
    w = ProgressWidget(clock=clock, min_interval=0)
    w(ev("start", 0, total=400, total_steps=400))
    for step in range(1, 5):
        w(ev("step", step, total=400, loss=loss_at(step), lr=lr_at(step)))
    layout = w.figure.layout
    # 4 of 400 steps fill the x axis (the bar shows the total)
    assert layout.xaxis.range is None and layout.xaxis.autorange is not False
    # learning rates in exponent notation, on round ticks of their own (not the loss grid's)
    assert layout.yaxis2.tickmode == "auto" and layout.yaxis2.tickformat.endswith("e")
    assert layout.yaxis2.hoverformat.endswith("e")
    raw, smooth = traces(w)["train loss"], traces(w)["train loss (EMA)"]
    assert raw.opacity in (None, 1) and raw.line.width >= 1.5  # visible...
    assert _luminance(smooth.line.color) < _luminance(raw.line.color) < 0.85  # ...and lighter than the EMA


@pytest.mark.parametrize(
    ("events", "style"),
    [
        ([("end", {"steps": 4})], "success"),
        ([("stop", {"reason": "user"}), ("end", {})], "warning"),
        ([("error", {"message": "boom", "type": "RuntimeError"}), ("end", {})], "danger"),
        ([("oom", {"message": "CUDA out of memory"}), ("end", {})], "danger"),
    ],
    ids=["finished", "stopped", "error", "oom"],
)
def test_the_outcome_button_is_red_only_for_a_failure(clock, events, style):
    w = ProgressWidget(stop=lambda: None, clock=clock)
    assert w.stop_button.button_style == "danger"  # Stop itself
    w(ev("step", 4, loss=1.0))
    for kind, data in events:
        w(ev(kind, 4, **data))
    assert w.stop_button.disabled and w.stop_button.button_style == style


def test_stopping_is_amber(clock):
    w = ProgressWidget(stop=lambda: None, clock=clock)
    w(ev("step", 4, loss=1.0))
    w.stop_button.click()
    assert (w.stop_button.description, w.stop_button.button_style) == ("stopping…", "warning")


# ----------------------------------------------------------------------------------------------- checkpoint label


def stopped_run_events() -> list[TrainingEvent]:
    """What the engine reports when Stop is pressed at step 7: the Stop checkpoint, then stop and end naming it."""
    path = "out/checkpoint-7"
    return [
        ev("step", 7, 3.5, loss=1.0),
        ev("checkpoint", 7, 3.6, path=path, reason="stop"),
        ev("stop", 7, 3.6, reason="user", checkpoint=path),
        ev("end", 7, 3.7, steps=7, checkpoint=path, state="stopped"),
    ]


def test_the_stop_checkpoint_is_labelled_stop_to_the_end(clock, capsys):
    w = ProgressWidget(stop=lambda: None, clock=clock)
    t = TextProgress(output="terminal", clock=clock, min_interval=0)
    for e in stopped_run_events():
        w(e)
        t(e)
    assert w.history.checkpoint_text() == "checkpoint (stop) at step 7: out/checkpoint-7"
    assert "checkpoint (stop) at step 7" in w.stats.value
    assert "checkpoint (stop) at step 7: out/checkpoint-7" in capsys.readouterr().out
    assert t.history.checkpoint_text() == w.history.checkpoint_text()


def test_a_finished_run_labels_its_last_checkpoint_end():
    h = RunHistory()
    h.record(ev("checkpoint", 50, path="out/checkpoint-50", reason="every"))
    h.record(ev("end", 100, steps=100, checkpoint="out/checkpoint-100"))
    assert h.checkpoint_text() == "checkpoint (end) at step 100: out/checkpoint-100"


# ----------------------------------------------------------------------------------------------- Stop


def test_stop_button_calls_stop_once_and_disables(clock):
    calls = []
    w = ProgressWidget(stop=lambda: calls.append(1), clock=clock)
    w(ev("step", 10, loss=1.0))
    assert not w.stop_button.disabled and w.stop_button.layout.display is None
    w.stop_button.click()
    w.stop_button.click()
    assert calls == [1]
    assert w.stop_button.disabled and w.stop_button.description == "stopping…"
    assert w.history.status == "stopping" and w.bar.bar_style == "warning"
    w(ev("step", 11, loss=1.0))  # the engine finishes its step
    w(ev("stop", 11, reason="user", checkpoint="out/checkpoint-11"))
    w(ev("end", 11, steps=11))
    assert w.stop_button.description == "stopped" and w.stop_button.disabled
    assert w.summary.value.startswith("<b>stopped (user) at step 11/100")
    assert "out/checkpoint-11" in w.summary.value


def test_stop_callable_that_raises_is_shown(clock):
    def stop():
        raise RuntimeError("run already finished")

    w = ProgressWidget(stop=stop, clock=clock)
    w.stop_button.click()  # must not raise
    assert "RuntimeError: run already finished" in w.errors.value


# ----------------------------------------------------------------------------------------------- robustness


def test_observer_exception_is_caught_shown_once_and_counted(clock):
    w = ProgressWidget(clock=clock, min_interval=0)
    w(ev("step", 1, loss=1.0))
    w(ev("step", 2, loss="not a number"))  # malformed: must not raise
    assert "ValueError" in w.errors.value and "not a number" in w.errors.value
    assert "training continues" in w.errors.value
    w(TrainingEvent("step", 3, TOTAL, 0.0, 0.0, ["not", "a", "mapping"]))  # type: ignore[arg-type]
    w(TrainingEvent("step", None, TOTAL, 0.0, 0.0, {}))  # type: ignore[arg-type]
    assert w.observer_errors == 3 and w.observer_error.startswith("ValueError")
    w(ev("step", 4, loss=0.5))  # keeps going
    assert w.bar.value == 4 and "(and 2 more)" in w.errors.value
    assert list(traces(w)["train loss"].x) == [1, 4]


def test_render_exception_is_caught(clock, monkeypatch):
    w = ProgressWidget(clock=clock)

    def broken() -> str:
        raise KeyError("stats")

    monkeypatch.setattr(w.history, "stats_text", broken)
    w(ev("eval", 1, eval_loss=1.0))
    assert "KeyError" in w.errors.value and len(w.history.eval_steps) == 1


def test_end_after_stop_click_without_stop_event_is_stopped(clock):
    w = ProgressWidget(stop=lambda: None, clock=clock)
    w(ev("step", 3, loss=1.0))
    w.stop_button.click()
    w(ev("end", 3, steps=3))
    assert w.history.status == "stopped" and w.summary.value.startswith("<b>stopped (user) at step 3/100")


def test_unknown_kind_is_ignored(clock):
    w = ProgressWidget(clock=clock)
    w(ev("telemetry", 3, anything=1))
    assert w.observer_error is None and w.history.step == 3


def test_events_from_a_background_thread_and_stop_from_the_main_thread():
    stop_requested = threading.Event()
    w = ProgressWidget(stop=stop_requested.set, title="threaded", min_interval=0.01)
    started = threading.Event()

    def train() -> None:
        w(ev("start", 0, total=1000, total_steps=1000))
        t0 = time.monotonic()
        for step in range(1, 1001):
            if stop_requested.is_set():
                w(ev("stop", step - 1, time.monotonic() - t0, total=1000, reason="user"))
                break
            w(ev("step", step, time.monotonic() - t0, total=1000, loss=1.0 / step, lr=1e-4))
            if step == 50:
                started.set()
            time.sleep(0.0005)
        w(ev("end", w.history.step, time.monotonic() - t0, total=1000, steps=w.history.step))

    thread = threading.Thread(target=train)
    thread.start()
    assert started.wait(10)
    w.stop_button.click()  # the kernel thread, while the training thread emits
    thread.join(10)
    assert not thread.is_alive() and w.observer_error is None
    last = w.history.step
    assert 50 <= last < 1000
    assert w.bar.value == last and len(traces(w)["train loss"].x) == last
    assert w.summary.value.startswith(f"<b>stopped (user) at step {last}/1000")


def test_show_and_ipython_display(monkeypatch, clock):
    shown = []
    monkeypatch.setattr(frontend, "display", lambda obj, **kw: shown.append(obj))
    w = ProgressWidget(clock=clock)
    w.show()
    w._ipython_display_()
    assert shown == [w.box, w.box]
    assert repr(w).startswith("<ProgressWidget 'LoRA training': step 0")


def test_bad_settings_are_usage_errors():
    with pytest.raises(UsageError, match="min_interval"):
        ProgressWidget(min_interval=-1)
    with pytest.raises(UsageError, match="max_points"):
        ProgressWidget(max_points=1)
    with pytest.raises(UsageError, match="ema_alpha"):
        RunHistory(ema_alpha=0)
    with pytest.raises(UsageError, match="output"):
        TextProgress(output="html")
    with pytest.raises(UsageError, match="mode"):
        progress_observer(mode="gui")


# ----------------------------------------------------------------------------------------------- TextProgress


def test_text_terminal_prints_throttled_lines_and_summary(capsys, clock):
    t = TextProgress(title="cli run", output="terminal", clock=clock)  # terminal default: 1 line per second
    assert t.min_interval == P.TERMINAL_MIN_INTERVAL
    for e in run_events(dt=0.1):  # 100 steps over 10 s
        clock.t = e.time
        t(e)
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0]
        == "cli run · 100 steps · 1,000 examples (+50 eval) · 1.23M trainable params · causal-lm · cuda:0"
    )
    step_lines = [line for line in out if line.startswith("step ")]
    steps = [int(line.split()[1].split("/")[0]) for line in step_lines]
    assert 7 <= len(steps) <= 10 and all(b - a >= 10 for a, b in itertools.pairwise(steps))  # >= 1 s apart
    pattern = r"step \d+/100 · loss \d\.\d{3,4} · 1,234 tok/s · ETA \d:\d\d"
    assert all(re.fullmatch(pattern, line) for line in step_lines), step_lines
    assert sum(line.startswith("eval at step") for line in out) == len(EVAL_AT)
    assert "sample: <script>alert(1)</script> → Tom & Jerry <b>bold</b>" in out
    assert "checkpoint (every) at step 50: out/checkpoint-50" in out
    assert out[-1].startswith("finished: 100 steps in 0:10 · final loss") and "out/final" in out[-1]
    assert "finished" in repr(t) and "cli run" in repr(t)


def test_text_terminal_shows_problems_and_observer_errors(capsys, clock):
    t = TextProgress(output="terminal", clock=clock, min_interval=0)
    t(ev("oom", 7, message="CUDA out of memory", advice="try --batch 2"))
    t(ev("step", 8, loss=object()))
    t(ev("step", 9, loss=object()))
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["out of memory: CUDA out of memory", "  advice: try --batch 2"]
    assert len(out) == 3 and out[2].startswith("progress display error (training continues): TypeError")
    assert t.observer_errors == 2


def test_text_notebook_updates_one_display(monkeypatch, clock):
    shown, updates = [], []

    class Handle:
        display_id = "abc"

        def update(self, obj: Any) -> None:
            updates.append(obj._repr_html_())

    def fake_display(obj, **kwargs):
        shown.append(kwargs)
        return Handle()

    monkeypatch.setattr(frontend, "display", fake_display)
    t = TextProgress(title="nb <run>", output="notebook", clock=clock)
    assert t.min_interval == P.DEFAULT_MIN_INTERVAL
    t.show()
    for e in run_events():
        clock.t = e.time
        t(e)
    assert shown == [{"display_id": True}]
    assert t.flushes == len(updates) and 1 < len(updates) < 150
    final = t._repr_html_()
    assert updates[-1] == final
    assert "nb &lt;run&gt;" in final and "<progress value='100' max='100'" in final
    assert "&lt;script&gt;" in final and "<script>" not in final
    assert "<svg" in final and "<polyline" in final and final.count("<circle") == len(EVAL_AT)
    assert "finished: 100 steps" in final
    t.show()  # a second view shares the display id
    assert shown[-1] == {"display_id": "abc"}


def test_text_notebook_first_flush_displays(monkeypatch, clock):
    shown = []
    monkeypatch.setattr(frontend, "display", lambda obj, **kw: shown.append(kw) or None)
    t = TextProgress(output="notebook", clock=clock)
    t(ev("start", 0, total_steps=TOTAL))
    assert shown == [{"display_id": True}]


def test_text_notebook_sparkline_spans_the_steps_so_far_and_colours_the_outcome(monkeypatch, clock):
    monkeypatch.setattr(frontend, "display", lambda obj, **kw: None)
    t = TextProgress(output="notebook", clock=clock, min_interval=0)
    t(ev("start", 0, total=400, total_steps=400))
    for step in range(1, 5):
        t(ev("step", step, total=400, loss=loss_at(step)))
    html_ = t._repr_html_()
    points = re.search(r"<polyline[^>]* points='([^']*)'", html_).group(1).split()
    assert [float(p.split(",")[0]) for p in (points[0], points[-1])] == [pytest.approx(81.0), 318.0]
    t(ev("stop", 4, total=400, reason="user"))
    assert "accent-color:#ef6c00" in t._repr_html_()  # stopped: amber, not the red of a failure


# ----------------------------------------------------------------------------------------------- progress_observer


def test_progress_observer_without_kernel_is_text():
    assert frontend.in_kernel() is False
    obs = progress_observer(stop=lambda: None, title="x")
    assert isinstance(obs, TextProgress) and obs.output == "terminal" and obs.title == "x"
    assert isinstance(progress_observer(mode="text"), TextProgress)
    assert isinstance(progress_observer(mode="widget"), ProgressWidget)


def test_progress_observer_in_a_kernel_is_the_widget(monkeypatch):
    class Shell:
        kernel = object()

    monkeypatch.setattr(frontend, "get_ipython", lambda: Shell())
    calls = []
    obs = progress_observer(stop=lambda: calls.append(1), title="k", min_interval=0.5)
    assert isinstance(obs, ProgressWidget) and obs.min_interval == 0.5
    obs.stop_button.click()
    assert calls == [1]
    assert isinstance(progress_observer(mode="text"), TextProgress)


def test_measure_observer_cost_smoke():
    cost = observer_cost.measure_observer_cost(n_steps=60, repeat=1)
    assert 0 < cost["record_us"] < cost["flush_us"]
    assert observer_cost.measure_observer_cost(n_steps=20, kind="text", repeat=1)["record_us"] > 0


def test_importing_progress_is_cheap():
    code = (
        "import sys, jupyter_lora.widgets.progress as p; "
        "print(sorted(m for m in ('torch', 'transformers', 'ipywidgets', 'plotly') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------- ProgressCallback


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def test_callback_translates_trainer_hooks(transformers, tmp_path):
    from jupyter_lora.widgets.progress import ProgressCallback

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = transformers.TrainerState(max_steps=50)
    control = transformers.TrainerControl()
    cb = ProgressCallback(mode="widget", title="hf")
    assert isinstance(cb, transformers.TrainerCallback)
    w = cb.observer
    assert isinstance(w, ProgressWidget) and w.title == "hf"

    cb.on_train_begin(args, state, control)
    for step in range(1, 51):
        state.global_step, state.epoch = step, step / 25
        assert cb.on_step_end(args, state, control) is control
        if control.should_training_stop:
            break
        if step % 10 == 0:
            cb.on_log(
                args, state, control, logs={"loss": 2.0 / step, "learning_rate": 1e-3 / step, "epoch": 0.1}
            )
        if step == 20:
            metrics = {"eval_loss": 0.5, "eval_runtime": 0.1, "epoch": state.epoch}
            cb.on_log(args, state, control, logs=dict(metrics))  # the Trainer logs eval metrics...
            cb.on_evaluate(args, state, control, metrics=metrics)  # ...then calls on_evaluate: one marker
            (tmp_path / "checkpoint-20").mkdir()  # what the Trainer writes before on_save
            cb.on_save(args, state, control)
        if step == 35:
            w.stop_button.click()
            assert not control.should_training_stop  # set at the next on_step_end
    assert control.should_training_stop and state.global_step == 36
    cb.on_log(args, state, control, logs={"train_loss": 0.9, "train_runtime": 1.0})
    cb.on_train_end(args, state, control)

    t = traces(w)
    assert list(t["train loss"].x) == [10, 20, 30]
    np.testing.assert_allclose(t["train loss"].y, [0.2, 0.1, 2.0 / 30])
    np.testing.assert_allclose(t["learning rate"].y, [1e-4, 5e-5, 1e-3 / 30])
    assert list(t["eval loss"].x) == [20] and list(t["eval loss"].y) == [0.5]
    assert (w.bar.value, w.bar.max) == (36, 50)
    assert w.history.epoch == pytest.approx(36 / 25)
    assert "checkpoint-20" in w.stats.value
    assert w.summary.value.startswith("<b>stopped (user) at step 36/50")
    assert "final loss 0.06667" in w.summary.value and "best eval loss 0.5000" in w.summary.value
    assert w.observer_error is None


def test_callback_errors_stay_out_of_the_trainer(transformers, tmp_path):
    from jupyter_lora.widgets.progress import ProgressCallback

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = transformers.TrainerState(max_steps=5), transformers.TrainerControl()
    cb = ProgressCallback(mode="widget")
    cb.on_log(args, state, control, logs={"loss": "garbage"})
    cb.on_log(args, state, control, logs={"eval_loss": None})
    assert cb.on_step_end(args, state, control) is control  # and the next hook still works
    assert cb.observer.observer_errors == 2 and "ValueError" in cb.observer.errors.value


def test_callback_shows_its_widget_in_a_kernel(transformers, tmp_path, monkeypatch):
    from jupyter_lora.widgets.progress import ProgressCallback

    class Shell:
        kernel = object()

    shown = []
    monkeypatch.setattr(frontend, "get_ipython", lambda: Shell())
    monkeypatch.setattr(frontend, "display", lambda obj, **kw: shown.append(obj))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = transformers.TrainerState(max_steps=5), transformers.TrainerControl()
    cb = ProgressCallback()  # auto: the widget, since we are "in a kernel"
    cb.on_train_begin(args, state, control)
    assert shown == [cb.observer.box]
    mine = ProgressWidget()
    ProgressCallback(observer=mine).on_train_begin(args, state, control)  # the caller shows their own
    assert shown == [cb.observer.box]


def test_callback_with_a_real_trainer(transformers, tmp_path):
    torch = pytest.importorskip("torch")
    from jupyter_lora.widgets.progress import ProgressCallback

    class Regression(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, labels):
            return {"loss": ((self.lin(x).squeeze(-1) - labels) ** 2).mean()}

    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, generator=g), "labels": torch.randn((), generator=g)} for _ in range(32)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        per_device_train_batch_size=4,
        max_steps=12,
        logging_steps=3,
        eval_strategy="steps",
        eval_steps=6,
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    cb = ProgressCallback(mode="widget")
    trainer = transformers.Trainer(
        model=Regression(), args=args, train_dataset=data, eval_dataset=data[:8], callbacks=[cb]
    )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # keep the test output quiet
    trainer.train()
    w = cb.observer
    assert w.observer_error is None
    assert list(traces(w)["train loss"].x) == [3, 6, 9, 12]
    assert list(traces(w)["eval loss"].x) == [6, 12]
    assert (w.bar.value, w.bar.max) == (12, 12)
    assert w.history.info["examples"] == 32 and w.history.info["trainable_params"] == 5
    assert w.summary.value.startswith("<b>finished: 12 steps")


def test_callback_attach_stop_saves_a_checkpoint(transformers, tmp_path):
    """``attach`` takes the place of the Trainer's tqdm bar; Stop ends train() after the step with a checkpoint
    that a plain Trainer resumes from."""
    torch = pytest.importorskip("torch")
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as TqdmCallback

    from jupyter_lora.widgets.progress import ProgressCallback

    class Regression(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, labels):
            return {"loss": ((self.lin(x).squeeze(-1) - labels) ** 2).mean()}

    class PressStop(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                cb.stop()  # what the Stop button does, during step 4: it is the last one

    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, generator=g), "labels": torch.randn((), generator=g)} for _ in range(32)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4, max_steps=20,
        logging_steps=1, save_strategy="no", use_cpu=True, remove_unused_columns=False,
    )  # fmt: skip
    trainer = transformers.Trainer(model=Regression(), args=args, train_dataset=data, callbacks=[PressStop()])
    cb = ProgressCallback(mode="widget").attach(trainer)
    names = [type(c) for c in trainer.callback_handler.callbacks]
    assert TqdmCallback not in names and PrinterCallback not in names and ProgressCallback in names
    trainer.train()
    run = cb.run
    assert run.state == "stopped" and run.step == 4 and [h["step"] for h in run.history] == [1, 2, 3, 4]
    assert run.checkpoint == tmp_path / "checkpoint-4" and (run.checkpoint / "trainer_state.json").is_file()
    w = cb.observer
    assert w.summary.value.startswith("<b>stopped (user) at step 4/20") and w.observer_error is None
    resumed = transformers.Trainer(model=Regression(), args=args, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(run.checkpoint))
    assert resumed.state.global_step == 20
