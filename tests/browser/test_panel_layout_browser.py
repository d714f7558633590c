"""The panel's layout in a real JupyterLab 1000 and 1400 px wide (the file browser open, so the notebook is
narrower still — about Colab's output width and less): with a long invalid target spec, a long error message, the
advanced training sections and the code open, no element of the panel sticks out of it or out of its container,
no text is clipped, and the sliders keep usable tracks; the same for the Data tab with a preview (its histogram
included) and the Chat tab. The Data tab's screenshot is the README's docs/panel_data.png (``make screenshots``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lab_helpers import kernel_eval, open_notebook, output_area, run_cell, write_notebook
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

LONG_SPEC = (
    "q_proj, v_porj, k_proj, o_porj, gate_proj, up_porj, down_proj, *.self_attn.q_proj, re:.*\\.mlp\\..*"
)
MISSING = "a_training_data_variable_with_a_rather_long_name_that_is_not_defined_in_this_notebook"
MIN_TRACK_PX = 100  # a slider track narrower than this is little more than its handle

# Every visible element of the panel with its box, its container's and the panel's, and its scroll/client widths.
_GEOMETRY = """(panel) => {
    const outer = panel.getBoundingClientRect();
    const name = (el) => el.tagName.toLowerCase()
        + (typeof el.className === 'string' && el.className.trim() ? '.' + el.className.trim().split(/\\s+/).join('.') : '')
        + ` "${(el.innerText || el.value || '').slice(0, 40).replace(/\\s+/g, ' ')}"`;
    const found = [];
    for (const el of panel.querySelectorAll('*')) {
        const box = el.getBoundingClientRect();
        const style = getComputedStyle(el);
        if (box.width === 0 || box.height === 0 || style.visibility === 'hidden') continue;
        const parent = el.parentElement.getBoundingClientRect();
        found.push({
            what: name(el), tag: el.tagName, cls: typeof el.className === 'string' ? el.className : '',
            left: box.left, right: box.right, outerLeft: outer.left, outerRight: outer.right,
            parentLeft: parent.left, parentRight: parent.right, parentWidth: parent.width,
            scroll: el.scrollWidth, client: el.clientWidth, overflowX: style.overflowX,
            drawn: el instanceof SVGElement,
        });
    }
    return found;
}"""


def _problems(elements: list[dict]) -> list[str]:
    problems = []
    for e in elements:
        if e["right"] > e["outerRight"] + 1 or e["left"] < e["outerLeft"] - 1:
            problems.append(f"{e['what']} sticks out of the panel: [{e['left']:.0f}, {e['right']:.0f}] outside "
                            f"[{e['outerLeft']:.0f}, {e['outerRight']:.0f}]")  # fmt: skip
        # a slider's handle rides on a zero-width origin at the end of its track: it is placed, not overflowing
        elif e["right"] > e["parentRight"] + 1 and e["parentWidth"] > 0 and "noUi-" not in e["cls"]:
            problems.append(f"{e['what']} overflows its container by {e['right'] - e['parentRight']:.0f} px")
        # text cut off (overflow: hidden, an ellipsis); inputs scroll their own text, scroll boxes scroll; the
        # parts of an SVG drawing (a chart's labels) are drawn, not laid out in boxes that could cut them
        scrolls = e["overflowX"] in ("auto", "scroll") or e["tag"] in ("INPUT", "TEXTAREA", "SELECT")
        if not scrolls and not e["drawn"] and e["client"] > 0 and e["scroll"] > e["client"] + 1:
            problems.append(f"{e['what']} is clipped: {e['scroll']} px of content in {e['client']} px")
    return problems


def _tracks(panel) -> list[float]:
    return panel.locator(".widget-slider .noUi-target").evaluate_all(
        "(els) => els.map((el) => el.getBoundingClientRect().width)"
    )


def _check_layout(page, panel, width: int, shot: Path, sliders: bool = True) -> None:
    page.wait_for_timeout(400)  # let the layout settle after the last change
    panel.screenshot(path=str(shot))
    problems = _problems(panel.evaluate(_GEOMETRY))
    assert problems == [], f"at {width} px ({shot}):\n" + "\n".join(problems[:20])
    if not sliders:
        return
    tracks = _tracks(panel)
    assert tracks and min(tracks) >= MIN_TRACK_PX, f"slider tracks at {width} px: {tracks} ({shot})"


@pytest.mark.parametrize("width", [1000, 1400])
def test_panel_layout_holds_with_a_long_invalid_spec(page, notebook_dir, tmp_path, width):
    page.set_viewport_size({"width": width, "height": 1000})
    cells = [
        "%load_ext jupyter_lora",
        "from jupyter_lora.testing import tiny_model\nmodel = tiny_model('llama')",
        "%lora panel model",
    ]
    name = f"layout{width}.ipynb"
    write_notebook(notebook_dir, cells, name)
    open_notebook(page, name, n_cells=len(cells))
    for i in range(len(cells)):
        run_cell(page, i)
    # the kernel runs this checkout's package (PYTHONPATH reaches it through the server)
    assert kernel_eval(page, "__import__('jupyter_lora').__file__").startswith(str(Path(__file__).parents[2]))
    panel = output_area(page, 2).locator(".jl-panel")
    expect(panel.locator(".jl-trainable")).to_be_visible(timeout=60_000)
    # the tree's footer counts base parameters, and says so
    expect(panel.locator(".jl-count")).to_have_text(
        "4 of 16 adaptable modules selected, holding 3.07K frozen base parameters"
    )
    _check_layout(page, panel, width, tmp_path / f"panel-{width}-start.png")

    # the spec that broke the layout: a long one with misspelled names, and its long error message
    panel.locator("input.jl-targets").fill(LONG_SPEC)
    expect(panel.locator(".jl-error")).to_contain_text("v_porj", timeout=20_000)
    expect(panel.locator(".jl-stale-note")).to_be_visible(timeout=20_000)
    _check_layout(page, panel, width, tmp_path / f"panel-{width}-spec.png")

    # a long error in the form (marked under the field at once) and in the panel's message line (Train refuses)
    panel.locator("input.jl-targets").fill("qv")
    panel.locator("input.jl-targets").press("Enter")
    expect(panel.locator(".jl-stale-note")).to_have_count(0, timeout=20_000)  # the kernel has the new spec
    panel.locator("button.jupyter-button", has_text="Inject").click()
    expect(panel.locator("button.jupyter-button", has_text="Re-inject")).to_be_visible(timeout=30_000)
    panel.locator(".jl-form-data input").fill(MISSING)
    expect(panel.locator(".jl-form-data .jl-form-error")).to_contain_text(MISSING, timeout=20_000)
    panel.locator("button.jupyter-button", has_text="Train").click()
    expect(panel.locator(".jl-panel-error")).to_contain_text(MISSING, timeout=20_000)
    # every advanced section open in turn, and the code
    titles = panel.locator(".jl-advanced .jupyter-widget-Collapse-header")
    assert titles.count() == 5, titles.all_inner_texts()
    for i in range(titles.count()):
        titles.nth(i).click()
        page.wait_for_timeout(200)
        _check_layout(page, panel, width, tmp_path / f"panel-{width}-section{i}.png")
    panel.locator("button.jupyter-button", has_text="Show as code").click()
    expect(panel.locator("textarea").first).to_be_visible(timeout=20_000)
    _check_layout(page, panel, width, tmp_path / f"panel-{width}-code.png")
    # the panel fits the notebook's output area: no horizontal scrolling there
    scroll, client = output_area(page, 2).evaluate("(el) => [el.scrollWidth, el.clientWidth]")
    assert scroll <= client + 1, (scroll, client)


RECORDS = (
    "records = [{'prompt': f'Question {i}: ', 'response': 'answer ' * (i * 5 % 9 + 1)} for i in range(40)]"
)
GREY = "rgb(158, 158, 158)"


def test_panel_tabs_preview_the_forms_data_and_open_the_chat(page, notebook_dir, tmp_path, keep_screenshot):
    """The Data tab previews the data the training form names with the form's settings (masked tokens greyed, the
    chart drawn, a wrong value as its one-line message); the Chat tab opens the chat for the panel's model. At
    1000 px, like the layout above, neither sticks out of the panel."""
    width = 1000
    page.set_viewport_size({"width": width, "height": 1000})
    cells = [
        "%load_ext jupyter_lora",
        "from jupyter_lora.testing import tiny_model, tiny_tokenizer\nmodel = tiny_model('llama')\n"
        f"tok = tiny_tokenizer()\n{RECORDS}",
        "panel = %lora panel model\npanel",
    ]
    write_notebook(notebook_dir, cells, "tabs.ipynb")
    open_notebook(page, "tabs.ipynb", n_cells=len(cells))
    for i in range(len(cells)):
        run_cell(page, i)
    panel = output_area(page, 2).locator(".jl-panel")
    tabs = panel.locator(".jl-tabs > .lm-TabBar .lm-TabBar-tab")
    expect(tabs).to_have_text(["Adapter", "Data", "Chat"], timeout=60_000)
    expect(panel.locator(".jl-trainable")).to_be_visible(timeout=60_000)  # the Adapter tab is open first

    # the training form names the data and a seq; nothing is previewed while typing
    panel.locator(".jl-form-data input").fill("records")
    panel.locator(".jl-form-seq input").fill("40")
    expect(panel.locator(".jl-form-data .jl-form-error")).to_have_count(0, timeout=20_000)
    tabs.nth(1).click()
    data = panel.locator(".jl-tab-data")
    expect(data.locator("button.jl-preview-button")).to_be_visible()
    expect(data.locator(".jl-data-preview")).to_have_count(0)
    data.locator("button.jl-preview-button").click()
    preview = data.locator(".jl-preview .jl-data-preview")
    expect(preview).to_contain_text("Data preview — causal LM, seq 40, batch 8", timeout=60_000)
    first = preview.locator(".jl-record").first
    masked = first.locator(".jl-tokens .jl-masked")
    expect(masked).to_have_text("Question 0: ")  # the prompt: label -100, greyed
    assert masked.evaluate("el => getComputedStyle(el).color") == GREY
    expect(first.locator(".jl-tokens .jl-trained")).to_have_text("answer <eos>")
    expect(preview.locator(".jl-record").nth(1).locator(".jl-cut")).to_have_text(
        " ✂ 15 more tokens cut at seq 40"
    )
    expect(preview.locator(".jl-hist .js-plotly-plot")).to_be_visible(timeout=30_000)  # its script ran
    assert kernel_eval(page, "panel.last_preview == __import__('jupyter_lora').preview_data(model, records, tok, "
                             "seq=40)")  # fmt: skip
    _check_layout(page, panel, width, tmp_path / "tabs-data.png", sliders=False)
    shot = tmp_path / "panel_data.png"  # the README's docs/panel_data.png (make screenshots)
    panel.screenshot(path=str(shot))
    keep_screenshot(shot)

    # a wrong value in the form: its one-line message in the Data tab, no preview left that looks current
    tabs.nth(0).click()
    panel.locator(".jl-form-seq input").fill("zero")
    expect(panel.locator(".jl-form-seq .jl-form-error")).to_contain_text("`seq` must be", timeout=20_000)
    tabs.nth(1).click()
    data.locator("button.jl-preview-button").click()
    error = data.locator(".jl-panel-error")
    expect(error).to_contain_text(
        "Fix the training settings first: `seq` must be a whole number", timeout=30_000
    )
    expect(data.locator(".jl-data-preview")).to_have_count(0)
    assert "Traceback" not in data.inner_text()

    # the Chat tab: the chat for the panel's model, built when opened
    assert kernel_eval(page, "panel.chat is None")
    tabs.nth(2).click()
    chat = panel.locator(".jl-tab-chat .jl-chat")
    expect(chat).to_be_visible(timeout=60_000)
    expect(chat.locator(".jl-chat-input textarea")).to_be_visible()
    for button in ("jl-chat-send", "jl-chat-stop", "jl-chat-clear"):
        expect(chat.locator(f"button.{button}")).to_be_visible()
    expect(chat.locator(".widget-slider")).to_have_count(3)
    assert kernel_eval(
        page, "panel.chat.conversation.model is model and panel.chat.conversation.tokenizer is tok"
    )
    _check_layout(
        page, panel, width, tmp_path / "tabs-chat.png", sliders=False
    )  # the hidden tab's are 0 wide
    tracks = _tracks(panel.locator(".jl-tab-chat"))
    assert len(tracks) == 3 and min(tracks) >= MIN_TRACK_PX, (
        f"the chat's slider tracks at {width} px: {tracks}"
    )
