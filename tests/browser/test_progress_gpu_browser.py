"""The live progress chart of a real run in JupyterLab: the eval loss drawn as its own series, and — with a fake
GPU statistics source put into the kernel — the GPU memory panel under the chart and the GPU figures in the stats
line, while the run is still training."""

from __future__ import annotations

import pytest
from lab_helpers import kernel_eval, open_notebook, output_area, run_cell, write_notebook
from playwright.sync_api import Locator, Page, expect

pytestmark = pytest.mark.browser

TIMEOUT_MS = 120_000

SETUP = (
    "%load_ext jupyter_lora\n"
    "import jupyter_lora as jl\n"
    "from jupyter_lora.core.train.callback import RunCallback\n"
    "from jupyter_lora.testing import FakeGpuStats, tiny_model, tiny_tokenizer\n"
    "fake = FakeGpuStats(capacity=24 << 30)\n"
    "fake.install()  # every run from now on reports these figures, as on a 24 GiB GPU\n"
    "RunCallback.stats_interval = 0.0  # a reading on every logged step\n"
    "model = jl.inject(tiny_model('llama'), r=8, targets='all-linear')\n"
    "tok = tiny_tokenizer()\n"
    "texts = ['the quick brown fox jumps over the lazy dog.'] * 32\n"
)
TRAIN = (
    "%%lora train model\ndata: texts\ntokenizer: tok\nsteps: 100000\nlr: 1e-3\nbatch: 4\neval: 0.25\n"
    "eval_every: 5\noutput_dir: runs/gpu"
)


def _wait(page: Page, predicate, what: str, timeout_ms: int = TIMEOUT_MS) -> None:
    waited = 0
    while not predicate():
        if waited > timeout_ms:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(250)
        waited += 250


def _path_length(paths: Locator) -> int:
    return max((len(paths.nth(k).get_attribute("d") or "") for k in range(paths.count())), default=0)


def test_live_chart_shows_eval_loss_and_gpu_memory(page, notebook_dir, tmp_path, keep_screenshot):
    write_notebook(notebook_dir, [SETUP, TRAIN], "gpu_chart.ipynb")
    open_notebook(page, "gpu_chart.ipynb", n_cells=2)
    run_cell(page, 0)
    run_cell(page, 1)
    out = output_area(page, 1)
    plot = out.locator(".js-plotly-plot")
    expect(plot).to_be_visible(timeout=TIMEOUT_MS)
    stop = out.locator("button.jupyter-button", has_text="Stop")

    # the eval loss: markers of their own, more of them as the run goes on
    eval_points = plot.locator(".subplot.xy .scatterlayer .trace path.point")
    _wait(page, lambda: eval_points.count() >= 3, "three eval points")
    # the GPU memory panel under the chart: its axis up to the capacity, a line that grows with the run
    expect(plot.locator(".g-y3title", has_text="GPU GiB (of 24)")).to_be_attached()
    memory = plot.locator(".subplot.x2y3 .scatterlayer .trace path.js-line")
    _wait(page, lambda: _path_length(memory) > 100, "the GPU memory line")
    stats = out.locator(".widget-html", has_text="GPU util")
    expect(stats).to_contain_text("of 24 GiB")
    expect(stats).to_contain_text("GPU util 87%")
    expect(stop).to_be_enabled()  # all of it while the run is training
    assert kernel_eval(page, "fake.reads > 3 and jl.last_run(model).state") == "running"

    shot = tmp_path / "progress_gpu.png"
    out.locator(".jp-OutputArea-output").filter(has=page.locator(".js-plotly-plot")).first.screenshot(
        path=str(shot)
    )
    stop.click()
    expect(out.locator("button.jupyter-button", has_text="stopped")).to_be_visible(timeout=TIMEOUT_MS)
    expect(out).to_contain_text("peak GPU memory")
    expect(out).to_contain_text("checkpoint (stop)")
    keep_screenshot(shot)
