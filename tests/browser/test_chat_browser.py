"""The chat widget in a real JupyterLab: a message typed into the box and sent streams its reply into the page
word by word while the kernel stays free, and Stop ends it. Its screenshot is the README's docs/chat.png
(``make screenshots``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from lab_helpers import kernel_eval, open_notebook, output_area, run_cell, write_notebook
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

TESTS = Path(__file__).resolve().parents[1]  # chat_models.py: the tiny chat model and tokenizer of the tests


def _reply(chat) -> str:
    return chat.locator(".jl-chat-streaming").inner_text().replace("▍", "").strip()


def _wait_for_more(page, chat, shown: str, timeout: float = 60.0) -> str:
    """Wait until the reply in the page is longer than ``shown``; return it."""
    deadline = time.monotonic() + timeout
    while len(text := _reply(chat)) <= len(shown):
        assert time.monotonic() < deadline, f"the reply did not grow past {shown!r}"
        page.wait_for_timeout(100)
    return text


def test_chat_streams_a_reply_and_stop_ends_it(page, notebook_dir, tmp_path, keep_screenshot):
    cells = [
        "%load_ext jupyter_lora",
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
        "from chat_models import adapted_lm, chat_tokenizer, talk_slowly\n"
        "model, _ = adapted_lm(max_position_embeddings=4096)\n"
        "talk_slowly(model, 0.03)  # a random model that writes words, slowly and without end\n"
        "tok = chat_tokenizer()",
        "chat = %lora chat model temperature=1 max_new_tokens=3000\nchat",
    ]
    write_notebook(notebook_dir, cells, "chat.ipynb")
    open_notebook(page, "chat.ipynb", n_cells=len(cells))
    for i in range(len(cells)):
        run_cell(page, i)
    chat = output_area(page, 2)
    expect(chat.locator(".jl-chat")).to_be_visible(timeout=60_000)
    assert kernel_eval(page, "__import__('jupyter_lora').__file__").startswith(str(TESTS.parent))

    chat.locator(".jl-chat-input textarea").fill("Hello there")
    chat.locator("button.jl-chat-send").click()
    expect(chat.locator(".jl-chat-user").first).to_have_text("Hello there", timeout=30_000)
    stop = chat.locator("button.jl-chat-stop")
    expect(stop).to_be_enabled(timeout=30_000)

    # the reply streams in: text appears, then more of it
    expect(chat.locator(".jl-chat-streaming")).to_be_visible(timeout=30_000)
    first = _wait_for_more(page, chat, "")
    _wait_for_more(page, chat, first)
    assert _reply(chat).startswith(first)
    # ... while the kernel runs other cells
    assert kernel_eval(page, "chat.generating") is True

    stop.click()
    status = chat.locator(".jl-chat-status")
    expect(status).to_contain_text("stopped", timeout=30_000)
    expect(chat.locator(".jl-chat-stopped-mark")).to_be_visible()
    expect(chat.locator("button.jl-chat-send")).to_be_enabled()
    expect(stop).to_be_disabled()
    shown = chat.locator(".jl-chat-reply").last.inner_text().replace("[stopped]", "").strip()
    page.wait_for_timeout(1500)
    assert chat.locator(".jl-chat-reply").last.inner_text().replace("[stopped]", "").strip() == shown

    assert kernel_eval(page, "chat.generating") is False
    assert kernel_eval(
        page, "[(t.stopped, len(t.replies['adapter']) > 0) for t in chat.conversation.turns]"
    ) == [(True, True)]
    assert kernel_eval(page, "chat.conversation.turns[0].replies['adapter'].strip()") == shown
    assert kernel_eval(page, "len(tok(chat.conversation.turns[0].replies['adapter'])['input_ids']) < 3000")

    # side by side: the next message is answered by the adapter and by the base model, each in its column
    kernel_eval(page, "setattr(chat.controls['max_new_tokens'], 'value', 30)")
    chat.locator("button", has_text="side by side").click()
    expect(chat.locator(".jl-chat-col.jl-chat-base")).to_be_visible(timeout=30_000)
    chat.locator(".jl-chat-input textarea").fill("And the base model?")
    chat.locator("button.jl-chat-send").click()
    expect(chat.locator(".jl-chat-col.jl-chat-base .jl-chat-user").last).to_have_text("And the base model?")
    expect(status).not_to_contain_text("generating", timeout=120_000)
    expect(chat.locator("button.jl-chat-send")).to_be_enabled()
    turns = kernel_eval(page, "[sorted(t.replies) for t in chat.conversation.turns]")
    assert turns == [["adapter"], ["adapter", "base"]]
    for side in ("adapter", "base"):
        shown = chat.locator(f".jl-chat-col.jl-chat-{side} .jl-chat-reply").last.inner_text().strip()
        assert shown == kernel_eval(page, f"chat.conversation.turns[1].replies[{side!r}].strip()")

    shot = tmp_path / "chat.png"
    chat.screenshot(path=str(shot))
    keep_screenshot(shot)
