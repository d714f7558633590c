"""Helpers that drive a notebook in a real JupyterLab through Playwright (see conftest.py for the fixtures).

Import them in a browser test with ``from lab_helpers import ...``: pytest puts ``tests/browser`` on ``sys.path``
(its default "prepend" import mode). ``from conftest import ...`` is not reliable, as pytest keeps only the last
imported of the project's several ``conftest`` modules under that name.
"""

from __future__ import annotations

import ast
import re
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nbformat
from playwright.sync_api import Locator, Page, expect

__all__ = [
    "TOKEN",
    "accept_dialogs",
    "append_cell",
    "cell",
    "cells",
    "kernel_eval",
    "open_notebook",
    "output_area",
    "output_text",
    "run_cell",
    "write_notebook",
]

# The token of the session's JupyterLab (conftest starts the server with it; open_notebook puts it in the URL).
TOKEN = secrets.token_hex(16)

NOTEBOOK_TIMEOUT_MS = 90_000  # page load + kernel start (2 busy cores in CI)
CELL_TIMEOUT_MS = 120_000  # a cell that imports torch + transformers on a busy machine
_PROMPT_DONE = re.compile(r"\[\d+\]")


def write_notebook(directory: str | Path, cells: Iterable[str], name: str = "test.ipynb") -> Path:
    """Write a notebook of code cells with python3 kernelspec metadata (so JupyterLab asks for no kernel)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    path = Path(directory) / name
    nbformat.write(nb, path)
    return path


def cells(page: Page) -> Locator:
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")


def cell(page: Page, i: int) -> Locator:
    """Cell ``i`` (0-based; -1 is the last) of the notebook on screen."""
    all_cells = cells(page)
    return all_cells.last if i == -1 else all_cells.nth(i)


def output_area(page: Page, i: int) -> Locator:
    """The output area of cell ``i``: look for output text and widgets only in here (the source has the words too)."""
    return cell(page, i).locator(".jp-Cell-outputArea")


def output_text(page: Page, i: int) -> str:
    return output_area(page, i).inner_text()


def accept_dialogs(page: Page) -> int:
    """Accept every open JupyterLab dialog (kernel picker, "file changed", ...); return how many."""
    accepted = 0
    for _ in range(5):
        button = page.locator(".jp-Dialog button.jp-mod-accept")
        if not button.count():
            break
        button.first.click()
        accepted += 1
        page.wait_for_timeout(200)
    return accepted


def _notebook_ready(page: Page) -> bool:
    return page.evaluate(
        """() => {
            const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
            if (!panel) return false;
            const indicator = panel.querySelector('.jp-Notebook-ExecutionIndicator');
            const kernel = panel.querySelector('.jp-Toolbar-kernelName');
            const name = kernel ? kernel.textContent.trim() : '';
            return !!indicator && indicator.getAttribute('data-status') === 'idle'
                && name !== '' && name !== 'No Kernel' && !document.querySelector('.jp-Dialog');
        }"""
    )


def open_notebook(page: Page, name: str, n_cells: int | None = None) -> None:
    """Open ``name`` (relative to the server's root) with a fresh workspace and wait until its kernel is idle, its
    kernel name is shown, no dialog is open (accepting any) and its cells are rendered (``n_cells`` if given)."""
    page.goto(f"lab/tree/{name}?reset&token={TOKEN}")
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_MS / 1000
    while True:
        accept_dialogs(page)
        if _notebook_ready(page):
            break
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{name}: the kernel did not become idle in {NOTEBOOK_TIMEOUT_MS / 1000:.0f} s"
            )
        page.wait_for_timeout(250)
    if n_cells is None:
        expect(cells(page).first).to_be_visible(timeout=NOTEBOOK_TIMEOUT_MS)
    else:
        expect(cells(page)).to_have_count(n_cells, timeout=NOTEBOOK_TIMEOUT_MS)


def _prompt(page: Page, i: int) -> Locator:
    return cell(page, i).locator(".jp-InputArea-prompt")


def run_cell(page: Page, i: int, timeout_ms: int = CELL_TIMEOUT_MS) -> Locator:
    """Run cell ``i`` (click it, then its editor, Shift+Enter) and wait for its prompt to show a new ``[n]``.
    Returns the cell (the notebook may have grown a new empty cell below it, so keep indices of earlier cells)."""
    target = cell(page, i)
    target.scroll_into_view_if_needed()
    before = _prompt(page, i).inner_text().strip()
    target.click()
    target.locator(".jp-InputArea-editor .cm-content").click()
    page.keyboard.press("Shift+Enter")
    prompt = target.locator(".jp-InputArea-prompt")
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        text = prompt.inner_text().strip()
        if _PROMPT_DONE.search(text) and text != before:
            return target
        if time.monotonic() > deadline:
            raise AssertionError(f"cell {i} did not finish in {timeout_ms / 1000:.0f} s (prompt {text!r})")
        page.wait_for_timeout(100)


def append_cell(page: Page, source: str) -> int:
    """Add a code cell holding ``source`` at the end of the notebook; return its index (the cell is not run)."""
    n = cells(page).count()
    last = cell(page, -1)
    last.scroll_into_view_if_needed()
    last.locator(".jp-InputArea-prompt").click()  # selects the cell without entering its editor
    page.keyboard.press("Escape")
    page.keyboard.press("b")  # command mode: insert a cell below, selected
    expect(cells(page)).to_have_count(n + 1)
    new = cell(page, n)
    new.locator(".jp-InputArea-editor .cm-content").click()
    # insert_text types no keys: no auto-indent, no auto-closed brackets
    page.keyboard.insert_text(source)
    expect(new.locator(".jp-InputArea-editor .cm-content")).to_contain_text(source.splitlines()[0])
    return n


def kernel_eval(page: Page, expr: str, timeout_ms: int = CELL_TIMEOUT_MS) -> Any:
    """Evaluate ``expr`` in the notebook's kernel through a new cell at the end of the notebook and return its
    value: ``ast.literal_eval`` of its repr (numbers, strings, lists, ...), else the repr itself as a string.
    Raises AssertionError with the cell's output when evaluating fails."""
    tag = secrets.token_hex(4)
    # The source spells "<" as \x3c, so a traceback quoting the source line holds no marker.
    i = append_cell(page, f"print('\\x3c{tag}>' + repr({expr}) + '\\x3c/{tag}>')")
    run_cell(page, i, timeout_ms)
    text = output_text(page, i)
    found = re.search(f"<{tag}>(.*?)</{tag}>", text, re.S)
    if found is None:
        raise AssertionError(f"kernel_eval({expr!r}) failed:\n{text}")
    value = found.group(1)
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
