"""The sweep leaderboard in a real JupyterLab: a ``%%lora sweep`` of three short runs on a tiny model updates the
board live (rows go pending → running → finished, the loss curves grow while the runs train, a point per finished
run on the metric chart, one best row), and Stop on a second sweep ends it with the stopped state shown."""

from __future__ import annotations

import time

import pytest
from lab_helpers import kernel_eval, open_notebook, output_area, run_cell, write_notebook
from playwright.sync_api import Locator, Page, expect

pytestmark = pytest.mark.browser

SETUP = (
    "import warnings\n"
    "warnings.filterwarnings('ignore')\n"
    "import jupyter_lora as jl\n"
    "from jupyter_lora.testing import tiny_model, tiny_tokenizer\n"
    "model = tiny_model('llama')\n"
    "tok = tiny_tokenizer()\n"
    "texts = ['the quick brown fox jumps over the lazy dog.'] * 24"
)
SHARED = "data: texts\ntokenizer: tok\nseq: 32\nbatch: 4\nlr: 3e-3\neval: 8\nkeep: none\nprogress: widget\n"
SWEEP = (
    "%%lora sweep model\n" + SHARED + "grid: {r: [2, 4, 8]}\nsteps: 30\neval_every: 10\noutput_dir: {out}/a"
)
LONG_SWEEP = (
    "%%lora sweep model\n" + SHARED + "grid: {r: [2, 4]}\nsteps: 2000\neval_every: 1000\noutput_dir: {out}/b"
)

# what the board shows now: each row's status, its status text, and for each loss trace the points it holds
# (plotly's own data) and the length of its drawn line (the DOM)
_SAMPLE = """(area) => {
    const rows = [...area.querySelectorAll('table.jl-sweep-board tr.jl-row')];
    const plots = area.querySelectorAll('.js-plotly-plot');
    const loss = plots[0];
    return {
        statuses: rows.map(r => r.dataset.status),
        texts: rows.map(r => r.querySelector('.jl-status').textContent.trim()),
        points: loss && loss.data ? loss.data.map(t => (t.x ? t.x.length : 0)) : [],
        drawn: loss ? [...loss.querySelectorAll('.scatterlayer .trace path.js-line')]
                        .reduce((n, p) => n + (p.getAttribute('d') || '').length, 0) : 0,
    };
}"""


def _sample(area: Locator) -> dict:
    return area.evaluate(_SAMPLE)


def _board(page: Page, i: int) -> Locator:
    area = output_area(page, i)
    expect(area.locator("table.jl-sweep-board")).to_be_visible(timeout=60_000)
    return area


def test_sweep_leaderboard_updates_live_and_stops(page, notebook_dir, tmp_path, keep_screenshot):
    out = tmp_path / "sweeps"
    out.mkdir()
    cells = [
        "%load_ext jupyter_lora",
        SETUP,
        SWEEP.replace("{out}", str(out)),
        LONG_SWEEP.replace("{out}", str(out)),
    ]
    write_notebook(notebook_dir, cells, "sweep_board.ipynb")
    open_notebook(page, "sweep_board.ipynb", n_cells=4)
    run_cell(page, 0)
    run_cell(page, 1)
    started = time.monotonic()
    run_cell(page, 2)  # returns at once: the sweep runs in the background
    area = _board(page, 2)
    samples = []
    while time.monotonic() - started < 240:
        sample = _sample(area)
        samples.append(sample)
        if sample["statuses"] == ["finished"] * 3:
            break
        page.wait_for_timeout(150)
    took = time.monotonic() - started
    final = samples[-1]
    assert final["statuses"] == ["finished"] * 3, samples[-3:]
    # every row was seen in order: the last one pending, running, then finished
    seen = [s["statuses"][2] for s in samples]
    assert "pending" in seen and "running" in seen, seen
    assert seen.index("pending") < seen.index("running") < seen.index("finished")
    assert any(t.startswith("running · step") for s in samples for t in s["texts"]), samples
    # the curves grew while the runs trained: a running run's trace held more points from sample to sample, and
    # the drawn lines grew with them
    growth = []
    for k in range(3):
        counts = [s["points"][k] for s in samples if s["statuses"][k] == "running" and len(s["points"]) == 3]
        growth.append(len(set(counts)))
    assert max(growth) >= 3, (growth, samples)
    drawn = [s["drawn"] for s in samples]
    assert len({d for d in drawn if d}) >= 3 and drawn[-1] >= max(drawn), drawn
    assert final["points"] == [30, 30, 30]
    # one point per finished run on the metric chart, one best row
    expect(area.locator(".js-plotly-plot").nth(1).locator(".scatterlayer .trace path.point")).to_have_count(3)
    expect(area.locator("tr.jl-row.jl-best")).to_have_count(1)
    expect(area.locator(".jl-sweep-note")).to_contain_text("Sweep finished: 3/3 runs finished")
    print(f"first sweep: {len(samples)} samples over {took:.1f} s; points per running trace: {growth}")
    page.screenshot(path=str(tmp_path / "sweep_board.png"), full_page=True)
    keep_screenshot(tmp_path / "sweep_board.png")

    # a second sweep, stopped while its first run trains
    run_cell(page, 3)
    board = _board(page, 3)
    expect(board.locator("tr.jl-row").first).to_have_attribute("data-status", "running", timeout=60_000)
    expect(board.locator("tr.jl-row").first.locator(".jl-status")).to_contain_text("step", timeout=60_000)
    board.locator("button.jupyter-button", has_text="Stop sweep").click()
    expect(board.locator("button.jupyter-button", has_text="sweep stopped")).to_be_visible(timeout=60_000)
    statuses = _sample(board)["statuses"]
    assert statuses == ["stopped", "not-run"], statuses
    expect(board.locator(".jl-sweep-note")).to_contain_text("`%lora resume model` continues the sweep")
    assert kernel_eval(page, "jl.last_sweep(model).state") == "stopped"
