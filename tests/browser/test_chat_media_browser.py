"""The chat view of an image classifier in a real JupyterLab: a PNG chosen in the file dialog of the Upload button
(Playwright's file chooser, as a user picks a file) reaches the kernel, which classifies it at once; the page shows
the image's thumbnail and the probabilities, adapter and base side by side, as the kernel computed them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from lab_helpers import kernel_eval, open_notebook, output_area, run_cell, write_notebook
from PIL import Image
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

TESTS = Path(__file__).resolve().parents[1]  # media_models.py, chat_models.py: the tiny ViT and its processor


def test_an_uploaded_png_is_classified_base_vs_adapter(page, notebook_dir, tmp_path, keep_screenshot):
    cells = [
        "%load_ext jupyter_lora",
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
        "import jupyter_lora as jl\n"
        "from chat_models import randomize_lora_b\n"
        "from media_models import vit, vit_processor\n"
        "base = vit()\nbase.config.id2label = {0: 'circle', 1: 'square'}\n"
        "model = jl.inject(base, r=4, targets='all-linear')\n"
        "randomize_lora_b(model)  # an adapter that changes the answer\n"
        "proc = vit_processor()",
        "chat = %lora chat model\nchat",
    ]
    write_notebook(notebook_dir, cells, "chat_media.ipynb")
    open_notebook(page, "chat_media.ipynb", n_cells=len(cells))
    for i in range(len(cells)):
        run_cell(page, i)
    view = output_area(page, 2)
    upload = view.locator("button.jl-media-upload")
    expect(upload).to_be_visible(timeout=60_000)
    assert kernel_eval(page, "__import__('jupyter_lora').__file__").startswith(str(TESTS.parent))
    assert kernel_eval(page, "type(chat).__name__") == "ClassifierWidget"

    yy, xx = np.mgrid[:32, :32]
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[(xx - 16) ** 2 + (yy - 16) ** 2 <= 100] = 255
    png = tmp_path / "circle.png"
    Image.fromarray(pixels).save(png)

    with page.expect_file_chooser() as chooser:
        upload.click()
    assert chooser.value.element.get_attribute("accept") == "image/*"
    chooser.value.set_files(str(png))

    table = view.locator(".jl-cls-table table.jl-cls")
    expect(table).to_be_visible(timeout=60_000)
    expect(upload).to_contain_text("(1)")
    labels = table.locator(".jl-cls-label").all_inner_texts()
    assert labels == ["circle", "square"]
    probs = kernel_eval(page, "{k: [round(p, 3) for p in v] for k, v in chat.result.probs.items()}")
    assert kernel_eval(page, "chat.result.text") == "image 32×32"
    assert kernel_eval(page, f"bytes(chat.upload.value[0]['content']) == open({str(png)!r}, 'rb').read()")
    for side in ("adapter", "base"):
        shown = [float(x) for x in table.locator(f"td.jl-cls-{side} .jl-cls-prob").all_inner_texts()]
        assert shown == pytest.approx(probs[side], abs=1e-9)
        assert sum(shown) == pytest.approx(1.0, abs=2e-3)
    assert probs["adapter"] != probs["base"]
    assert re.search(r"adapter 'default'", view.locator(".jl-cls-table th").nth(1).inner_text())

    thumb = view.locator("img.jl-media-thumb")
    expect(thumb).to_be_visible()
    assert thumb.evaluate("img => img.naturalWidth") == 32  # the uploaded PNG, decoded by the browser
    expect(view.locator(".jl-media-what")).to_contain_text("circle.png · image 32×32")
    expect(view.locator(".jl-chat-status")).to_have_text("")

    shot = tmp_path / "chat_media.png"
    view.screenshot(path=str(shot))
    keep_screenshot(shot)
