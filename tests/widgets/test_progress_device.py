"""The progress display's GPU figures (a memory panel under the chart, numbers in the stats line), the eval accuracy
series, and the one label of a run's last checkpoint — built without a kernel, driven with synthetic events and with
real tiny runs whose GPU figures come from a fake statistics source."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest

import jupyter_lora as jl
from jupyter_lora.core.events import TrainingEvent
from jupyter_lora.core.train.callback import RunCallback
from jupyter_lora.testing import fake_gpu_stats, tiny_model, tiny_tokenizer
from jupyter_lora.widgets.progress import ProgressWidget, RunHistory, TextProgress

GIB = 1 << 30
TEXT = ["the quick brown fox jumps over the lazy dog."] * 24
pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")


def ev(kind: str, step: int, total: int = 10, **data: Any) -> TrainingEvent:
    return TrainingEvent(kind, step, total, step / total, float(step), data)


def gpu(allocated: float, peak: float, capacity: float | None = 80, utilization: float | None = 87.0) -> dict:
    return {"memory_allocated": int(allocated * GIB), "memory_peak": int(peak * GIB),
            "memory_capacity": None if capacity is None else int(capacity * GIB),
            "gpu_utilization": utilization}  # fmt: skip


CPU = dict.fromkeys(("memory_allocated", "memory_peak", "memory_capacity", "gpu_utilization"))


def traces(w: ProgressWidget) -> dict[str, Any]:
    return {t.name: t for t in w.figure.data}


def points(trace: Any) -> int:
    return 0 if trace.x is None else len(trace.x)


# ----------------------------------------------------------------------------------------------- GPU figures


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_gpu_readings_draw_a_memory_panel_and_fill_the_stats_line():
    clock = Clock()
    w = ProgressWidget(min_interval=0, clock=clock)
    base_height = w.figure.layout.height
    w(ev("start", 0, total_steps=10, device="cuda:0", **gpu(1.0, 1.0)))
    clock.t = 1.0
    w(ev("step", 1, loss=2.0, **gpu(3.0, 3.5)))
    clock.t = 1.5
    w(ev("step", 2, loss=1.9))  # between two readings: no figures, no point
    clock.t = 2.0
    w(ev("step", 3, loss=1.8, **gpu(3.25, 4.0, utilization=91.0)))

    t = traces(w)
    assert list(t["GPU memory"].x) == [0, 1, 3]
    np.testing.assert_allclose(t["GPU memory"].y, [1.0, 3.0, 3.25])
    np.testing.assert_allclose(t["GPU peak"].y, [1.0, 3.5, 4.0])
    assert (t["GPU memory"].xaxis, t["GPU memory"].yaxis) == ("x2", "y3")
    layout = w.figure.layout
    assert layout.yaxis3.visible and layout.xaxis2.visible and layout.xaxis2.matches == "x"
    assert tuple(layout.yaxis3.range) == (0, 80) and "of 80" in layout.yaxis3.title.text
    assert layout.yaxis.domain[0] > layout.yaxis3.domain[1]  # the panel sits under the chart
    assert layout.height > base_height
    stats = w.stats.value
    assert "GPU 3.25 GiB of 80 GiB (peak 4 GiB) · GPU util 91%" in stats


def test_the_memory_panel_follows_at_most_once_a_second_while_steps_come_in():
    clock = Clock()
    w = ProgressWidget(min_interval=0, clock=clock)
    memory = traces(w)["GPU memory"]
    w(ev("step", 1, loss=1.0, **gpu(1.0, 1.0)))  # the first reading: at once
    assert points(memory) == 1
    for step in range(2, 6):
        clock.t += 0.2
        w(ev("step", step, loss=1.0, **gpu(1.0 + step / 10, 2.0)))
    assert points(memory) == 1 and w.history.memory_steps == [1, 2, 3, 4, 5]
    assert "GPU 1.5 GiB" in w.stats.value  # the stats line is not held back
    clock.t += 0.2  # a second since the last drawing
    w(ev("step", 6, loss=1.0, **gpu(1.6, 2.0)))
    assert list(memory.x) == [1, 2, 3, 4, 5, 6]
    w(ev("step", 7, loss=1.0, **gpu(1.7, 2.0)))
    w(ev("eval", 7, eval_loss=1.0))  # any other event draws everything
    assert list(memory.x) == [1, 2, 3, 4, 5, 6, 7]


def test_without_utilisation_only_memory_is_shown():
    h = RunHistory()
    h.record(ev("step", 1, loss=1.0, **gpu(2.0, 2.5, utilization=None)))
    assert h.gpu_text() == "GPU 2 GiB of 80 GiB (peak 2.5 GiB)"
    assert "util" not in h.stats_text()


def test_a_cpu_run_shows_nothing_about_a_gpu():
    w = ProgressWidget(min_interval=0)
    w(ev("start", 0, total_steps=10, device="cpu", **CPU))
    for step in range(1, 4):
        w(ev("step", step, loss=1.0, **CPU))
    w(ev("end", 3, steps=3, state="finished", memory_peak=None))
    layout = w.figure.layout
    assert not layout.yaxis3.visible and not layout.xaxis2.visible
    assert points(traces(w)["GPU memory"]) == 0
    assert "GPU" not in w.stats.value and "GPU" not in w.summary.value
    assert "GPU" not in repr(w)


def test_the_summary_names_the_runs_peak():
    h = RunHistory()
    h.record(ev("step", 1, loss=1.0, **gpu(2.0, 2.5)))
    h.record(ev("end", 1, steps=1, state="finished", memory_peak=6 * GIB))
    assert "peak GPU memory 6 GiB" in h.summary_text()


def test_a_view_drawn_late_shows_the_memory_panel():
    w = ProgressWidget(min_interval=10.0)
    w(ev("start", 0, total_steps=10, **gpu(1.0, 1.0)))
    for step in range(1, 10):
        w(ev("step", step, loss=1.0, **gpu(2.0, 2.0)))
    w(ev("end", 9, steps=9, state="finished"))
    assert w.figure._widget_layout["yaxis3"]["visible"] is True
    memory = next(t for t in w.figure._widget_data if t["name"] == "GPU memory")
    assert len(memory["x"]) == 10


# ----------------------------------------------------------------------------------------------- eval series


def test_eval_loss_and_accuracy_are_series_of_their_own():
    w = ProgressWidget(min_interval=0)
    for step in (1, 2, 3, 4):
        w(ev("step", step, loss=1.0))
        if step % 2 == 0:
            w(ev("eval", step, eval_loss=1.0 / step, accuracy=0.5 + step / 10))
    t = traces(w)
    assert list(t["eval loss"].x) == [2, 4]
    np.testing.assert_allclose(t["eval loss"].y, [0.5, 0.25])
    assert list(t["eval accuracy"].x) == [2, 4] and t["eval accuracy"].yaxis == "y4"
    np.testing.assert_allclose(t["eval accuracy"].y, [0.7, 0.9])
    assert w.figure.layout.yaxis4.visible and tuple(w.figure.layout.yaxis4.range) == (0, 1)
    assert "eval 0.2500, acc 0.900" in w.stats.value


def test_no_accuracy_axis_without_an_accuracy():
    w = ProgressWidget(min_interval=0)
    w(ev("eval", 2, eval_loss=0.5, accuracy=None))
    assert not w.figure.layout.yaxis4.visible and points(traces(w)["eval accuracy"]) == 0


# ----------------------------------------------------------------------------------------------- the last checkpoint


LAST_CHECKPOINT_CASES = [
    # Stop clicked here after the last checkpoint was written: the engine says the run finished
    ([("checkpoint", 10, {"path": "o/checkpoint-10", "reason": "end"}),
      ("end", 10, {"steps": 10, "checkpoint": "o/checkpoint-10", "state": "finished"})], "end", "done"),
    # an engine that called the stop's checkpoint "end" before it said the run stopped
    ([("checkpoint", 7, {"path": "o/checkpoint-7", "reason": "end"}),
      ("stop", 7, {"reason": "user", "checkpoint": "o/checkpoint-7"}),
      ("end", 7, {"steps": 7, "checkpoint": "o/checkpoint-7", "state": "stopped"})], "stop", "stopped"),
    # an early stop at step 7 after the checkpoint of step 5: that one keeps its label
    ([("checkpoint", 5, {"path": "o/checkpoint-5", "reason": "every"}),
      ("stop", 7, {"reason": "early_stop", "checkpoint": "o/checkpoint-5"}),
      ("end", 7, {"steps": 7, "checkpoint": "o/checkpoint-5", "state": "early_stopped"})], "every", "stopped"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("events", "label", "status"),
    LAST_CHECKPOINT_CASES,
    ids=["stop-after-the-last-step", "stop-checkpoint-said-end", "older-checkpoint"],
)
def test_one_label_for_the_last_checkpoint_in_every_view(events, label, status):
    clicked = ProgressWidget(stop=lambda: None, min_interval=0)
    other = ProgressWidget(min_interval=0)
    text = TextProgress(output="terminal", file=io.StringIO(), min_interval=0)
    for view in (clicked, other, text):
        view(ev("step", events[0][1], loss=1.0))
    clicked.stop_button.click()
    for kind, step, data in events:
        for view in (clicked, other, text):
            view(ev(kind, step, **data))
    texts = {view.history.checkpoint_text() for view in (clicked, other, text)}
    assert len(texts) == 1 and f"checkpoint ({label})" in texts.pop()
    assert {view.history.status for view in (clicked, other, text)} == {status}


def test_real_runs_label_their_last_checkpoint_by_their_outcome(tmp_path):
    """A Stop clicked in one view during the last step, and one mid-run: every view shows the same label."""
    for at, label, head in ((6, "end", "finished: 6 steps"), (3, "stop", "stopped (user) at step 3/6")):
        model = jl.inject(tiny_model("llama"), r=4, targets="q_proj")
        clicked = ProgressWidget(stop=lambda m=model: jl.last_run(m).stop(wait=False), min_interval=0)
        other = TextProgress(output="terminal", file=io.StringIO(), min_interval=0)

        def click(event, at=at, clicked=clicked):
            if event.kind == "step" and event.step == at:
                clicked.stop_button.click()

        run = jl.train(model, TEXT, tokenizer=tiny_tokenizer(), steps=6, batch=4, eval=0, lr=1e-3,
                       observers=[clicked, other, click], output_dir=str(tmp_path / str(at)))  # fmt: skip
        run.wait(60)
        for view in (clicked, other):
            assert f"checkpoint ({label}) at step {at}" in view.history.checkpoint_text()
            assert view.history.summary_text().startswith(head)


# ----------------------------------------------------------------------------------------------- real runs


def test_a_run_with_gpu_figures_draws_them_live(tmp_path, monkeypatch):
    monkeypatch.setattr(RunCallback, "stats_interval", 0.0)
    w = ProgressWidget(min_interval=0)
    with fake_gpu_stats(capacity=24 * GIB) as fake:
        jl.train(jl.inject(tiny_model("llama"), r=4, targets="q_proj"), TEXT, tokenizer=tiny_tokenizer(), steps=8,
                 batch=4, eval=0.25, eval_every=4, lr=1e-3, observers=[w], output_dir=str(tmp_path),
                 background=False)  # fmt: skip
    t = traces(w)
    assert list(t["GPU memory"].x) == list(range(0, 9))  # the start's reading and one per logged step
    assert max(t["GPU peak"].y) == pytest.approx(fake._peak / GIB)
    assert list(t["eval loss"].x) == [4, 8]
    assert w.figure.layout.yaxis3.visible and tuple(w.figure.layout.yaxis3.range) == (0, 24)
    assert "GPU util 87%" in w.stats.value and "of 24 GiB" in w.stats.value


def test_a_cpu_run_draws_no_memory_panel(tmp_path):
    w = ProgressWidget(min_interval=0)
    jl.train(jl.inject(tiny_model("llama"), r=4, targets="q_proj"), TEXT, tokenizer=tiny_tokenizer(), steps=4,
             batch=4, eval=0.25, eval_every=2, lr=1e-3, observers=[w], output_dir=str(tmp_path),
             background=False)  # fmt: skip
    assert w.history.status == "done" and list(traces(w)["eval loss"].x) == [2, 4]
    assert not w.figure.layout.yaxis3.visible and "GPU" not in w.stats.value
