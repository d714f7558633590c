"""The module tree: an anywidget whose front end (``js/module_tree.js``, plain DOM) shows the model's modules with
repeated blocks folded, highlights what a target spec matches as you type, and turns checkbox clicks into spec
text. Python resolves the spec (``jupyter_lora.find_targets``) and sends back ``selected``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import anywidget
import traitlets

__all__ = ["ModuleTree", "front_end_source"]

_MARKER = "// @inline tree_logic.js"


def _js_dir() -> Path:
    installed = Path(__file__).resolve().parent.parent / "_js"  # wheel: js/ is shipped as jupyter_lora/_js
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "js"  # source checkout / editable install


@lru_cache(maxsize=1)
def front_end_source() -> tuple[str, str]:
    """(ESM, CSS) of the tree. anywidget loads one module, so the pure logic in tree_logic.js (a separate file
    for ``node --test``) is inlined at the marker line, its ``export`` keywords dropped."""
    root = _js_dir()
    logic = re.sub(r"^export ", "", (root / "tree_logic.js").read_text(), flags=re.M)
    entry = (root / "module_tree.js").read_text()
    if _MARKER not in entry:
        raise RuntimeError(f"{root / 'module_tree.js'} lacks the line {_MARKER!r}")
    return entry.replace(_MARKER, logic, 1), (root / "module_tree.css").read_text()


class ModuleTree(anywidget.AnyWidget):
    """The synced state of the tree; see ``js/module_tree.js`` for the front end."""

    _esm = traitlets.Unicode(front_end_source()[0]).tag(sync=True)
    _css = traitlets.Unicode(front_end_source()[1]).tag(sync=True)

    nodes = traitlets.List().tag(sync=True)
    block_lists = traitlets.List().tag(sync=True)
    targets = traitlets.Unicode("").tag(sync=True)
    layers = traitlets.Unicode("").tag(sync=True)
    selected = traitlets.List().tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    presets = traitlets.List(["qv", "attention", "mlp", "all-linear"]).tag(sync=True)
    num_layers = traitlets.Int(0).tag(sync=True)

    def __repr__(self) -> str:  # cheap: never dump the node list
        return (
            f"ModuleTree({len(self.nodes)} modules, {len(self.selected)} selected, targets={self.targets!r})"
        )
