"""``%lora data`` in a real JupyterLab: the preview greys the masked tokens (label -100), marks the cut at ``seq``
and draws the token-length histogram with plotly — in the first preview of the page (which carries plotly.js)
and in a later one (which draws with the plotly.js already on the page). Its screenshot is the README's
docs/data_preview.png (``make screenshots``)."""

from __future__ import annotations

import pytest
from lab_helpers import open_notebook, output_area, run_cell, write_notebook
from playwright.sync_api import Locator, expect

pytestmark = pytest.mark.browser

SETUP = (
    "from jupyter_lora.testing import tiny_model, tiny_tokenizer\n"
    "model = tiny_model('llama')\n"
    "tok = tiny_tokenizer()\n"
    "records = [{'prompt': f'Question {i}: ', 'response': 'answer ' * (i * 5 % 9 + 1)} for i in range(40)]"
)
GREY = "rgb(158, 158, 158)"


def _color(locator: Locator) -> str:
    return locator.evaluate("el => getComputedStyle(el).color")


def _check_chart(preview: Locator) -> None:
    plot = preview.locator(".jl-hist .js-plotly-plot")
    expect(plot).to_be_visible(timeout=30_000)
    expect(plot.locator(".barlayer .point").first).to_be_attached()
    assert plot.locator(".barlayer .point").count() >= 3
    expect(preview.locator(".jl-hist-text")).to_be_hidden()  # the text histogram is for script-less viewers


def test_data_preview_greys_masked_tokens_and_draws_the_histogram(
    page, notebook_dir, tmp_path, keep_screenshot
):
    cells = [
        "%load_ext jupyter_lora",
        SETUP,
        "%lora data model records --n 2 seq=40",
        "%lora data model records --n 1 seq=80 packing=true",
    ]
    write_notebook(notebook_dir, cells, "data_preview.ipynb")
    open_notebook(page, "data_preview.ipynb", n_cells=len(cells))
    for i in range(3):
        run_cell(page, i)
    preview = output_area(page, 2).locator(".jl-data-preview")
    expect(preview).to_be_visible(timeout=60_000)
    expect(preview).to_contain_text("Data preview — causal LM, seq 40, batch 8")
    expect(preview).to_contain_text("are longer than seq 40")

    records = preview.locator(".jl-record")
    expect(records).to_have_count(2)
    first = records.nth(0)
    masked = first.locator(".jl-tokens .jl-masked")
    trained = first.locator(".jl-tokens .jl-trained")
    expect(masked).to_have_count(1)
    expect(masked).to_have_text("Question 0: ")  # the prompt: label -100
    expect(trained).to_have_text("answer <eos>")  # the response and eos: trained on
    assert _color(masked) == GREY
    assert _color(trained) != GREY
    # record 1 is longer than seq: "Question 1: " (12) + "answer " * 6 (42) + eos = 55 tokens; the cut is marked
    second = records.nth(1)
    expect(second.locator(".jl-record-head")).to_contain_text(
        "record 1 · train · 40 tokens (of 55: 15 cut by seq 40)"
    )
    expect(second.locator(".jl-tokens .jl-masked")).to_have_text("Question 1: ")
    expect(second.locator(".jl-tokens .jl-cut")).to_have_text(" ✂ 15 more tokens cut at seq 40")
    expect(first.locator(".jl-cut")).to_have_count(0)

    _check_chart(preview)
    shot = tmp_path / "data_preview.png"
    preview.screenshot(path=str(shot))

    # a later preview on the same page draws with the plotly.js the first one brought
    run_cell(page, 3)
    later = output_area(page, 3).locator(".jl-data-preview")
    expect(later).to_contain_text("packed row")
    expect(later).to_contain_text("100% real tokens")
    _check_chart(later)
    keep_screenshot(shot)
