"""The module tree: an anywidget whose front end (``js/module_tree.js``, plain DOM) shows the model's modules with
repeated blocks folded, highlights what a target spec matches as you type, and turns checkbox clicks into spec
text. Python resolves the spec (``jupyter_lora.find_targets``) and sends back ``selected``; ``tree_rows`` builds
the ``nodes`` the front end draws.
"""

from __future__ import annotations

import re
import weakref
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import anywidget
import traitlets

if TYPE_CHECKING:
    from torch import nn

    from jupyter_lora.core.targets import ModelIndex

__all__ = ["ModuleTree", "front_end_source", "panel_stylesheet", "tree_rows"]

# Rows are built once per model index: the entry dies with the model and is rebuilt when the index is.
_ROWS: weakref.WeakKeyDictionary[nn.Module, tuple[ModelIndex, list[dict]]] = weakref.WeakKeyDictionary()


def tree_rows(model: nn.Module) -> list[dict]:
    """The module hierarchy of ``model`` (its base, PEFT layers unwrapped) as a flat pre-order list for the tree:
    ``{id, path, name, type, params, kind, parent, depth, shape, layer}``; ``params`` counts everything under the
    node once, ``kind`` is "" for modules that cannot take LoRA. Cached with the model's index."""
    from jupyter_lora.core.modelinfo import base_model_of, param_count
    from jupyter_lora.core.targets import index_model, layer_of, unwrapped_modules

    index = index_model(model)
    base = base_model_of(model)
    cached = _ROWS.get(base)
    if cached is not None and cached[0] is index:
        return cached[1]
    rows: list[dict] = []
    ids: dict[str, int] = {}
    own: list[int] = []
    seen: set[int] = set()
    from jupyter_lora.display import expert_shape

    experts: dict[str, list] = {}  # experts module path -> its fused expert weights (rows of their own)
    for m in index.modules:
        if m.kind == "experts":
            experts.setdefault(m.module_path, []).append(m)
    for path, module in unwrapped_modules(base):
        parent = ids.get(path.rsplit(".", 1)[0] if "." in path else "", -1) if path else -1
        info = index.by_path.get(path)
        rows.append({
            "id": len(rows), "path": path, "name": path.rsplit(".", 1)[-1] if path else type(base).__name__,
            "type": type(module).__name__, "params": 0, "kind": info.kind if info else "", "parent": parent,
            "depth": path.count(".") + 1 if path else 0,
            "shape": f"{info.in_features}→{info.out_features}" if info else "",
            "layer": layer_of(path, index.layer_lists) if path else None,
        })  # fmt: skip
        ids[path] = rows[-1]["id"]
        fresh = [p for p in module.parameters(recurse=False) if id(p) not in seen]  # tied weights count once
        seen.update(id(p) for p in fresh)
        weights = experts.get(path, ())
        own.append(sum(param_count(p) for p in fresh) - sum(w.weight_params for w in weights))
        for w in weights:  # a fused expert weight is a row under its experts module, counted there once
            rows.append({
                "id": len(rows), "path": w.path, "name": w.suffix, "type": "Parameter", "params": 0,
                "kind": w.kind, "parent": ids[path], "depth": w.path.count(".") + 1,
                "shape": expert_shape(w.param_shape), "layer": w.layer,
            })  # fmt: skip
            own.append(w.weight_params)
    # Parameters of each node = its own + its descendants' (children come after their parent in pre-order).
    totals = list(own)
    for row in reversed(rows):
        if row["parent"] >= 0:
            totals[row["parent"]] += totals[row["id"]]
    for row, total in zip(rows, totals, strict=True):
        row["params"] = total
    _ROWS[base] = (index, rows)
    return rows


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


@lru_cache(maxsize=1)
def panel_stylesheet() -> str:
    """The panel's CSS (``js/panel.css``): the layout rules that ipywidgets' layout traits cannot say (gaps,
    wrapping of long messages, the mark on an invalid field). The panel sends it with its module tree."""
    return (_js_dir() / "panel.css").read_text()


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
    presets = traitlets.List(["qv", "attention", "mlp", "all-linear", "experts"]).tag(sync=True)
    num_layers = traitlets.Int(0).tag(sync=True)

    def __repr__(self) -> str:  # cheap: never dump the node list
        return (
            f"ModuleTree({len(self.nodes)} modules, {len(self.selected)} selected, targets={self.targets!r})"
        )
