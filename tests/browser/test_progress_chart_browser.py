"""The progress widget's chart as JupyterLab draws it: a front end that joins after the run ended (the widget shown
late, the page reloaded) draws the whole run, a resumed run's chart continues the curve from before its
checkpoint, and the axes carry readable labels (a one-point chart has no 19-digit loss label; learning rates are in
exponent notation)."""

from __future__ import annotations

import re

import pytest
from lab_helpers import open_notebook, output_area, run_cell, write_notebook
from playwright.sync_api import Locator, expect

pytestmark = pytest.mark.browser

# A whole run fed to a widget that is not displayed: the run is over before any front end draws it.
FINISHED_RUN = (
    "import math\n"
    "from jupyter_lora.core.events import TrainingEvent as E\n"
    "from jupyter_lora.widgets.progress import ProgressWidget\n"
    "def loss(s): return 2.5 * math.exp(-s / 15) + 1.5 + 0.1 * math.sin(s)\n"
    "def lr(s): return 1e-3 * min(1, s / 5) * (0.5 + 0.5 * math.cos(math.pi * s / 100))\n"
    "w = ProgressWidget(stop=lambda: None)\n"
    "w(E('start', 0, 40, 0.0, 0.0, {'total_steps': 40}))\n"
    "for s in range(1, 41):\n"
    "    w(E('step', s, 40, s / 20, s * 0.01, {'loss': loss(s), 'lr': lr(s)}))\n"
    "w(E('eval', 40, 40, 2.0, 0.4, {'eval_loss': 1.9}))\n"
    "w(E('end', 40, 40, 2.0, 0.41, {'steps': 40, 'elapsed': 0.41, 'state': 'finished'}))"
)
# A resumed run as the engine reports it: the records before the checkpoint (step 60) come with the start event.
RESUMED_RUN = (
    "history = [{'step': s, 'loss': loss(s), 'lr': lr(s), 'tokens': 0, 'epoch': s / 20, 'time': 0.0}\n"
    "           for s in range(1, 61)]\n"
    "r = ProgressWidget()\n"
    "r(E('start', 60, 100, 3.0, 0.2, {'total_steps': 100, 'resumed_from': 'runs/x/checkpoint-60',\n"
    "                                 'history': history, 'evals': [{'step': 50, 'eval_loss': 1.8}]}))\n"
    "r(E('step', 61, 100, 3.05, 0.5, {'loss': loss(61), 'lr': lr(61)}))\n"
    "r"
)
ONE_POINT = (
    "one = ProgressWidget(min_interval=0)\n"
    "one(E('step', 1, 400, 0.01, 0.3, {'loss': 4.873530864715576172, 'lr': 8.82e-4}))\n"
    "one"
)


def _line_lengths(plot: Locator) -> list[int]:
    paths = plot.locator(".scatterlayer .trace path.js-line")
    return [len(paths.nth(k).get_attribute("d") or "") for k in range(paths.count())]


def _ticks(plot: Locator, axis: str) -> list[str]:
    return [t.strip() for t in plot.locator(f".{axis}tick text").all_text_contents()]


def _check_labels(plot: Locator) -> None:
    for label in _ticks(plot, "y"):
        assert len(label) <= 6, f"loss axis label {label!r}"
    lr_ticks = _ticks(plot, "y2")
    assert lr_ticks and all(re.fullmatch(r"0|\d(\.\d+)?e[−-]\d+|0e\+0", t) for t in lr_ticks), lr_ticks


def test_progress_chart_late_view_resume_and_labels(page, notebook_dir, tmp_path, keep_screenshot):
    write_notebook(notebook_dir, [FINISHED_RUN, "w", RESUMED_RUN, ONE_POINT], "progress_chart.ipynb")
    open_notebook(page, "progress_chart.ipynb", n_cells=4)
    run_cell(page, 0)
    # a new front end (the page reloaded, same kernel): it knows the widget only from the kernel's state
    open_notebook(page, "progress_chart.ipynb", n_cells=4)

    # displayed after the run ended: the whole curve, the outcome in green
    run_cell(page, 1)
    late = output_area(page, 1)
    plot = late.locator(".js-plotly-plot")
    expect(plot).to_be_visible()
    expect(late.locator("button.jupyter-button.mod-success", has_text="finished")).to_be_visible()
    expect(plot.locator(".scatterlayer .trace path.js-line").first).to_be_attached()
    lengths = _line_lengths(plot)  # loss, its EMA, the learning rate: 40 points each
    assert len(lengths) >= 3 and min(lengths) > 100, lengths
    expect(plot.locator(".scatterlayer .trace path.point")).to_have_count(1)  # the eval marker
    _check_labels(plot)
    shot = tmp_path / "progress_chart.png"
    late.screenshot(path=str(shot))

    # a resumed run: the curve from step 1, a marker at the resume, an ETA from the steps since
    run_cell(page, 2)
    resumed = output_area(page, 2)
    plot = resumed.locator(".js-plotly-plot")
    expect(plot).to_be_visible()
    expect(plot.locator(".annotation-text", has_text="resumed")).to_be_attached()
    assert min(_line_lengths(plot)) > 150  # 61 points each, not the one since the resume
    xs = [float(t.replace(",", "")) for t in _ticks(plot, "x")]
    assert xs[0] == 0 and 55 <= xs[-1] <= 70, xs  # the steps so far, not the planned 100
    expect(resumed).to_contain_text("resumed at step 60")
    expect(resumed).to_contain_text("step 61/100 · epoch 3.05")
    expect(resumed).to_contain_text("ETA 0:20")  # 1 step since the resume in 0.5 s, 39 to go
    _check_labels(plot)

    # one point: a dot, and axis labels of a few digits
    run_cell(page, 3)
    plot = output_area(page, 3).locator(".js-plotly-plot")
    expect(plot).to_be_visible()
    expect(plot.locator(".scatterlayer .trace path.point")).to_have_count(1)
    _check_labels(plot)

    keep_screenshot(shot)
