"""The browser-test infrastructure on widgets that exist today: an ipywidgets slider, the %%lora HTML summary and
the training progress widget (bar, plotly chart, Stop), whose screenshot is the README's docs/progress.png
(``make screenshots``)."""

from __future__ import annotations

import re

import pytest
from lab_helpers import kernel_eval, open_notebook, output_area, output_text, run_cell, write_notebook
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.browser

TRAIN_TIMEOUT_MS = 120_000

SETUP = (
    "%load_ext jupyter_lora\n"
    "import jupyter_lora as jl\n"
    "from jupyter_lora.testing import tiny_model, tiny_tokenizer\n"
    "model = jl.inject(tiny_model('llama'), r=8, targets='all-linear')\n"
    "tok = tiny_tokenizer()\n"
    "texts = ['the quick brown fox jumps over the lazy dog.'] * 16\n"
)


def _bar_width(bar) -> float:
    style = bar.get_attribute("style") or ""
    found = re.search(r"width:\s*([\d.]+)%", style)
    return float(found.group(1)) if found else 0.0


def _wait_bar(page: Page, bar, predicate, timeout_ms: int = TRAIN_TIMEOUT_MS) -> float:
    waited = 0
    while True:
        width = _bar_width(bar)
        if predicate(width):
            return width
        if waited > timeout_ms:
            raise AssertionError(f"progress bar stuck at {width}%")
        page.wait_for_timeout(200)
        waited += 200


def test_slider_moved_by_keyboard_reaches_the_kernel(page, notebook_dir):
    write_notebook(
        notebook_dir,
        [
            "import ipywidgets as w\n"
            "s = w.IntSlider(value=0, min=0, max=10)\n"
            "l = w.Label('start')\n"
            "w.dlink((s, 'value'), (l, 'value'), transform=lambda v: f'value={v}')\n"  # through the kernel
            "w.VBox([s, l])"
        ],
        "slider.ipynb",
    )
    open_notebook(page, "slider.ipynb", n_cells=1)
    run_cell(page, 0)
    out = output_area(page, 0)
    readout = out.locator(".widget-slider .widget-readout")
    expect(readout).to_have_text("0")
    handle = out.locator(".widget-slider .noUi-handle")
    handle.focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    expect(readout).to_have_text("3")
    expect(out.locator(".widget-label", has_text="value=")).to_have_text("value=3")  # round trip via Python
    assert kernel_eval(page, "s.value") == 3


def test_lora_cell_magic_shows_the_plan_table(page, notebook_dir):
    write_notebook(
        notebook_dir,
        [
            "%load_ext jupyter_lora",
            "from jupyter_lora.testing import tiny_model\nmodel = tiny_model('llama')",
            "%%lora model\nr: 8\ntargets: q_proj, v_proj",
        ],
        "magic.ipynb",
    )
    open_notebook(page, "magic.ipynb", n_cells=3)
    for i in range(3):
        run_cell(page, i)
    out = output_area(page, 2)
    expect(out.locator("table").first).to_contain_text("q_proj")
    expect(out).to_contain_text("trainable")
    assert "v_proj" in output_text(page, 2)
    assert kernel_eval(page, "type(model).__name__") == "PeftModelForCausalLM"


def test_training_progress_widget_and_stop(page, notebook_dir, tmp_path, keep_screenshot):
    write_notebook(
        notebook_dir,
        [
            SETUP,
            "%%lora train model\ndata: texts\ntokenizer: tok\nsteps: 40\nlr: 1e-3\nbatch: 4\neval: 0\n"
            "output_dir: runs/short",
            "%%lora train model\ndata: texts\ntokenizer: tok\nsteps: 100000\nlr: 1e-3\nbatch: 2\neval: 0\n"
            "output_dir: runs/long",
        ],
        "train.ipynb",
    )
    open_notebook(page, "train.ipynb", n_cells=3)
    run_cell(page, 0)

    # a short run to the end: the bar reaches 100 %, the chart has its traces
    run_cell(page, 1)
    short = output_area(page, 1)
    bar = short.locator(".widget-hprogress .progress-bar")
    expect(bar).to_be_attached(timeout=TRAIN_TIMEOUT_MS)
    _wait_bar(page, bar, lambda w: w >= 100)
    plot = short.locator(".js-plotly-plot")
    expect(plot).to_be_visible()
    expect(plot.locator(".scatterlayer .trace path.js-line").first).to_be_attached()
    expect(short.locator("button.jupyter-button", has_text="finished")).to_be_visible(
        timeout=TRAIN_TIMEOUT_MS
    )
    assert kernel_eval(page, "(jl.last_run(model).state, jl.last_run(model).step)") == ("finished", 40)
    paths = plot.locator(".scatterlayer .trace path.js-line")
    assert paths.count() >= 2  # loss, its EMA (and the learning rate)
    assert all(len(paths.nth(k).get_attribute("d") or "") > 20 for k in range(2))
    widget = short.locator(".jp-OutputArea-output").filter(has=page.locator(".widget-hprogress")).first
    widget.scroll_into_view_if_needed()
    shot = tmp_path / "progress.png"
    widget.screenshot(path=str(shot))

    # a long run stopped from its Stop button
    run_cell(page, 2)
    long = output_area(page, 2)
    long_bar = long.locator(".widget-hprogress .progress-bar")
    expect(long_bar).to_be_attached(timeout=TRAIN_TIMEOUT_MS)
    _wait_bar(page, long_bar, lambda w: w > 0)
    stop = long.locator("button.jupyter-button", has_text="Stop")
    expect(stop).to_be_enabled()
    stop.click()
    expect(long.locator("button.jupyter-button", has_text="stopped")).to_be_visible(timeout=TRAIN_TIMEOUT_MS)
    state, step = kernel_eval(page, "(jl.last_run(model).state, jl.last_run(model).step)")
    assert state == "stopped" and 0 < step < 100000

    keep_screenshot(shot)
