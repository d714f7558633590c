"""The progress chart of a real run, as JupyterLab draws it in a narrow and a wide window: the chart is as wide as
the output area (not plotly's 700 px default: at 1000 px the learning-rate axis and the last steps were cut off),
follows the window when it is resized, and the loss curves are drawn down to their lowest point and up to the
final step, nothing painted over them (a hidden subplot's background once covered the chart's bottom quarter)."""

from __future__ import annotations

import pytest
from lab_helpers import open_notebook, output_area, run_cell, write_notebook
from playwright.sync_api import Locator, Page, expect

pytestmark = pytest.mark.browser

TIMEOUT_MS = 240_000
SETUP = (
    "%load_ext jupyter_lora\n"
    "import jupyter_lora as jl\n"
    "from jupyter_lora.testing import tiny_model, tiny_tokenizer\n"
    "model = jl.inject(tiny_model('llama'), r=8, targets='all-linear')\n"
    "tok = tiny_tokenizer()\n"
    "texts = [f'note {i}: the quick brown fox jumps over the lazy dog {i % 7}.' for i in range(200)]\n"
)
# on a (fake) GPU the memory panel appears under the chart: the chart grows taller, and keeps fitting the width
GPU = (
    "from jupyter_lora.core.train.callback import RunCallback\n"
    "from jupyter_lora.testing import FakeGpuStats\n"
    "FakeGpuStats(capacity=24 << 30).install()\n"
    "RunCallback.stats_interval = 0.0\n"
)
TRAIN = (
    "%%lora train model\ndata: texts\ntokenizer: tok\nsteps: 60\nbatch: 2\nseq: 16\neval_every: 20\n"
    "output_dir: runs/{run}"
)

# What the page drew: the chart's size against its container and the output area, the loss axis's range against
# the loss data (train loss, its EMA, eval loss) read back from the plot, where the lowest and the final loss points
# are, and whatever opaque shape was painted over them after the loss curves.
MEASURE = """(gd, area) => {
  const fl = gd._fullLayout, xa = fl.xaxis, ya = fl.yaxis;
  const svg = gd.querySelector('svg.main-svg').getBoundingClientRect();
  const box = area.getBoundingClientRect();
  const loss = gd.data.filter(t => (t.yaxis || 'y') === 'y' && t.y && t.y.length);
  const points = loss.flatMap(t => Array.from(t.y, (y, i) => [Number(t.x[i]), Number(y)]))
                     .filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const lowest = points.reduce((a, b) => (b[1] < a[1] ? b : a));
  const raw = loss.find(t => t.name === 'train loss');
  const final = [Number(raw.x[raw.x.length - 1]), Number(raw.y[raw.y.length - 1])];
  const firstLine = gd.querySelector('.subplot.xy .scatterlayer .trace');
  const screen = ([x, y]) => [svg.left + xa._offset + xa.l2p(x), svg.top + ya._offset + ya.l2p(y)];
  const covers = ([sx, sy]) => Array.from(gd.querySelectorAll('svg.main-svg rect, svg.main-svg path'))
    .filter(e => firstLine.compareDocumentPosition(e) & Node.DOCUMENT_POSITION_FOLLOWING)
    .filter(e => !e.closest('.trace'))
    .filter(e => {
      const s = getComputedStyle(e), fill = s.fill;
      if (!fill || fill === 'none' || /rgba\\(.*,\\s*0\\)$/.test(fill) || fill === 'transparent') return false;
      if (Number(s.fillOpacity) === 0 || Number(s.opacity) === 0) return false;
      const r = e.getBoundingClientRect();
      return r.width > 0 && r.height > 0 && r.left <= sx && sx <= r.right && r.top <= sy && sy <= r.bottom;
    })
    .map(e => ((e.closest('.subplot') || e).getAttribute('class') + ' ' + e.tagName + '.' + e.getAttribute('class')));
  const plotArea = [svg.top + ya._offset, svg.top + ya._offset + ya._length,
                    svg.left + xa._offset, svg.left + xa._offset + xa._length];
  return {
    svg: [svg.left, svg.right, svg.width], container: gd.clientWidth, area: [box.left, box.right],
    range: ya.range.slice(), min: lowest[1], max: Math.max(...points.map(p => p[1])),
    lowest: screen(lowest), final: screen(final), plotArea,
    coverLowest: covers(screen(lowest)), coverFinal: covers(screen(final)),
  };
}"""


def _measure(plot: Locator, area: Locator) -> dict:
    return plot.evaluate(MEASURE, area.element_handle())


def _fitted(page: Page, plot: Locator, area: Locator) -> dict:
    """The measurements once the chart has its container's width (or, after 10 s, as they are)."""
    for _ in range(40):
        m = _measure(plot, area)
        if abs(m["svg"][2] - m["container"]) <= 2:
            break
        page.wait_for_timeout(250)
    return m


def _check(m: dict, width: int) -> None:
    left, right, svg_width = m["svg"]
    assert abs(svg_width - m["container"]) <= 2, (
        f"at {width} px the chart is {svg_width} px in {m['container']}"
    )
    inside = m["area"][0] - 1 <= left and right <= m["area"][1] + 1
    assert inside, f"at {width} px the chart {m['svg']} overflows the output area {m['area']}"
    low, high = m["range"]
    assert low <= m["min"] and m["max"] <= high, f"loss axis {m['range']} vs data {m['min']}..{m['max']}"
    top, bottom, x0, x1 = m["plotArea"]
    for name in ("lowest", "final"):
        x, y = m[name]
        inside = x0 - 1 <= x <= x1 + 1 and top - 1 <= y <= bottom + 1
        assert inside, f"the {name} loss is drawn at {m[name]}, outside the plot area {m['plotArea']}"
        cover = m[f"cover{name.title()}"]
        assert not cover, f"the {name} loss point is painted over by {cover}"


@pytest.mark.parametrize(
    ("width", "then", "gpu"), [(1000, 1400, False), (1400, 1000, False), (1400, 1000, True)]
)
def test_progress_chart_fits_and_shows_the_whole_loss_curve(page, notebook_dir, width, then, gpu, tmp_path):
    page.set_viewport_size({"width": width, "height": 1000})
    name = f"chart_fit_{width}{'_gpu' if gpu else ''}.ipynb"
    setup = SETUP + (GPU if gpu else "")
    write_notebook(notebook_dir, [setup, TRAIN.format(run=name.removesuffix(".ipynb"))], name)
    open_notebook(page, name, n_cells=2)
    run_cell(page, 0)
    run_cell(page, 1)
    out = output_area(page, 1)
    expect(out.locator("button.jupyter-button", has_text="finished")).to_be_visible(timeout=TIMEOUT_MS)
    plot = out.locator(".js-plotly-plot")
    expect(plot).to_be_visible()
    if gpu:
        expect(plot.locator(".g-y3title", has_text="GPU GiB (of 24)")).to_be_attached()
    page.wait_for_timeout(500)  # the last redraw
    measured = _fitted(page, plot, out)
    out.screenshot(path=str(tmp_path / name.replace(".ipynb", ".png")))
    _check(measured, width)

    # the window resized: the chart follows its output area
    page.set_viewport_size({"width": then, "height": 1000})
    page.wait_for_timeout(500)
    _check(_fitted(page, plot, out), then)
