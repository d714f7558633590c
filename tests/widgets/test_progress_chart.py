"""The progress chart's layout as plotly will draw it: every subplot the traces make has a place of its own (no
hidden subplot lies over the loss curves), and the chart has no fixed width but a companion that fits it to the
output area. Built without a kernel or browser, driven with synthetic events; tests/browser checks the drawing."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from jupyter_lora.core.events import TrainingEvent
from jupyter_lora.widgets.progress import ProgressWidget

GIB = 1 << 30
STEPS = 150


def ev(kind: str, step: int, **data: Any) -> TrainingEvent:
    return TrainingEvent(kind, step, STEPS, step / 90, step * 0.2, data)


def loss_at(step: int) -> float:  # 4.85 down to about 4.81, as the tiny model's first steps
    return 4.81 + 0.04 * math.exp(-step / 60) + 0.01 * math.sin(step)


def gpu(allocated: float) -> dict:
    return {"memory_allocated": int(allocated * GIB), "memory_peak": int(allocated * GIB),
            "memory_capacity": 24 * GIB, "gpu_utilization": 80.0}  # fmt: skip


def run(w: ProgressWidget, *, on_gpu: bool, until: int = STEPS) -> None:
    device = gpu(1.0) if on_gpu else {}
    w(ev("start", 0, total_steps=STEPS, **device))
    for step in range(1, until + 1):
        w(ev("step", step, loss=loss_at(step), lr=2e-4 * min(1.0, step / 10), **device))
        if step % 20 == 0:
            w(ev("eval", step, eval_loss=loss_at(step) - 0.01))
    if until == STEPS:
        w(ev("end", STEPS, steps=STEPS, state="finished"))


def subplot_domains(data: list[dict], layout: dict) -> dict[str, list[float]]:
    """The vertical domain of each subplot the traces make plotly draw (a subplot per x/y axis pair; an axis
    overlaying another shares that one's subplot). Each subplot gets its own plot background, drawn over the
    subplots before it."""

    def axis(ref: str) -> dict:
        name = ref[0] + "axis" + ref[1:]
        return layout.get(name) or {}

    domains = {}
    for trace in data:
        x, y = trace.get("xaxis") or "x", trace.get("yaxis") or "y"
        base = axis(y).get("overlaying") or y
        domains[x + base] = list(axis(base).get("domain") or [0.0, 1.0])
    return domains


def assert_no_subplot_overlaps(data: list[dict], layout: dict) -> None:
    domains = sorted(subplot_domains(data, layout).items(), key=lambda item: item[1])
    for (a, (_, top_a)), (b, (bottom_b, _)) in itertools.pairwise(domains):
        assert top_a <= bottom_b, f"subplot {a} {dict(domains)[a]} overlaps {b} {dict(domains)[b]}"


def figure_states(w: ProgressWidget) -> list[tuple[list[dict], dict]]:
    """The figure as the kernel holds it, and as a view drawn now (late, or after a reload) starts from."""
    state = w.figure.to_dict()
    return [(state["data"], state["layout"]), (w.figure._widget_data, w.figure._widget_layout)]


def test_a_cpu_run_draws_the_loss_chart_alone():
    w = ProgressWidget(min_interval=0)
    run(w, on_gpu=False)
    for data, layout in figure_states(w):
        assert list(subplot_domains(data, layout)) == ["xy"]  # no hidden memory panel over the loss curves
        assert_no_subplot_overlaps(data, layout)
    assert w.figure.layout.yaxis.range is None and w.figure.layout.yaxis.autorange is not False


@pytest.mark.parametrize("until", [0, 1, STEPS])
def test_the_memory_panel_has_a_place_of_its_own(until):
    w = ProgressWidget(min_interval=0)
    run(w, on_gpu=True, until=until)
    for data, layout in figure_states(w):
        assert_no_subplot_overlaps(data, layout)
    memory = {t.name: (t.xaxis, t.yaxis) for t in w.figure.data if t.name.startswith("GPU")}
    assert memory == {"GPU memory": ("x2", "y3"), "GPU peak": ("x2", "y3")}
    assert w.figure.layout.yaxis3.visible


def test_the_chart_has_no_fixed_width_and_fits_the_output_area():
    from jupyter_lora.widgets.progress.fit import ChartFit

    w = ProgressWidget()
    assert w.figure.layout.width is None and w.figure.layout.autosize is not False
    children = list(w.box.children)
    fit = children[children.index(w.figure) + 1]
    assert isinstance(fit, ChartFit)  # beside the chart, in the same box: it sizes the chart to that box
    assert "ResizeObserver" in fit._esm and "Plotly.relayout" in fit._esm
