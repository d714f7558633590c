"""Target discovery and the spec grammar: names, suffixes, globs, regexes, presets, layers, exclude.

The shared table (tests/fixtures/target_cases.json) is also read by js/tests/targets.test.mjs: the module tree's
highlighter must select what the resolver selects, on the tree rows the panel sends (tests/fixtures/target_rows.json,
checked here against what the panel builds; `python tests/core/test_targets.py` rewrites it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from torch import nn

import jupyter_lora as jl
from jupyter_lora.core.errors import TargetError, UsageError
from jupyter_lora.core.targets import (
    index_model,
    parse_layers,
    preset_name,
    resolve,
    resolve_targets,
    split_spec,
    unwrapped_modules,
)
from jupyter_lora.testing import tiny_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TABLE = json.loads((FIXTURES / "target_cases.json").read_text(encoding="utf-8"))
ROWS_FILE = FIXTURES / "target_rows.json"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("q_proj", {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}),
        ("q_proj, v_proj", {f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")}),
        (["q_proj", "v_proj"], {f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")}),
        ("self_attn.o_proj", {f"model.layers.{i}.self_attn.o_proj" for i in range(2)}),
        ("model.layers.1.mlp.up_proj", {"model.layers.1.mlp.up_proj"}),
        ("*.mlp.*_proj", {f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")}),
        ("layers.0.*", {f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                          "mlp.down_proj")}),
        (r"re:.*\.(q|k)_proj", {f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "k_proj")}),
        ("re:model\\.layers\\.[0-1]\\.mlp\\.down_proj", {f"model.layers.{i}.mlp.down_proj" for i in range(2)}),
        ("lm_head", {"lm_head"}),
        ("embed_tokens", {"model.embed_tokens"}),
    ],
    ids=["name", "comma-list", "list", "dotted-suffix", "full-path", "glob", "glob-prefix", "regex", "regex-full",
         "lm-head-explicit", "embedding"],
)  # fmt: skip
def test_spec_spellings(llama, spec, expected):
    assert set(jl.find_targets(llama, spec)) == expected


def test_layers_and_exclude(llama):
    both = jl.find_targets(llama, "attention", layers="1")
    assert both and all(".layers.1." in p for p in both)
    assert jl.find_targets(llama, "attention", layers=[0, 1]) == jl.find_targets(llama, "attention")
    assert jl.find_targets(llama, "attention", layers="-1") == both
    kept = jl.find_targets(llama, "all-linear", exclude="mlp.down_proj, k_proj")
    assert not [p for p in kept if p.endswith(("down_proj", "k_proj"))]
    assert len(kept) == 2 * 7 - 4


def test_all_linear_never_takes_the_lm_head_but_a_name_can(llama):
    assert "lm_head" not in jl.find_targets(llama, "all-linear")
    assert jl.find_targets(llama, "all-linear, lm_head")[-1] == "lm_head"


def test_results_are_in_model_order(llama):
    paths = jl.find_targets(llama, "v_proj, q_proj")
    order = [n for n, _ in llama.named_modules()]
    assert list(paths) == sorted(paths, key=order.index)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0-1", (0, 1)), ("1", (1,)), (0, (0,)), ([1, 0], (0, 1)), (range(2), (0, 1)), ("0, 1", (0, 1)),
     ("-1", (1,)), (None, None)],
    ids=["range", "single", "int", "list", "py-range", "comma", "negative", "none"],
)  # fmt: skip
def test_parse_layers(value, expected):
    assert parse_layers(value, 2) == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [("0-5", "out of range.*2 layers"), ("1-0", "backwards"), ("a-b", "not an index or a range"),
     (True, "layer indices"), (2.5, "indices and ranges")],
    ids=["out-of-range", "backwards", "letters", "bool", "float"],
)  # fmt: skip
def test_parse_layers_errors(value, match):
    with pytest.raises(UsageError, match=match):
        parse_layers(value, 2)


def test_split_spec_keeps_regex_commas():
    assert split_spec("q_proj, re:.*\\.(q|v){1,2}_proj") == ("q_proj", "re:.*\\.(q|v){1,2}_proj")


def test_errors_name_the_module_and_suggest(llama):
    with pytest.raises(TargetError, match=r"`targets` 'q_prj'.*Did you mean `q_proj`.*q_proj ×2"):
        jl.find_targets(llama, "q_prj")
    with pytest.raises(TargetError, match="LlamaRMSNorm, which cannot take LoRA"):
        jl.find_targets(llama, "post_attention_layernorm")
    with pytest.raises(TargetError, match="contains `k_proj`, `o_proj`, `q_proj`, `v_proj`"):
        jl.find_targets(llama, "self_attn")
    with pytest.raises(TargetError, match=r"must match the full path.*re:\.\*q_proj\.\*"):
        jl.find_targets(llama, "re:q_proj")
    with pytest.raises(TargetError, match="matches no module"):
        jl.find_targets(llama, "*.nothing_here")


def test_partly_wrong_list_is_an_error_not_a_silent_subset(llama):
    with pytest.raises(TargetError, match="'v_prj'"):
        jl.find_targets(llama, "q_proj, v_prj")


def test_discovery_kinds_and_shapes():
    kinds = {m.kind for m in index_model(tiny_model("gpt2")).modules}
    assert {"conv1d-gpt2", "embedding", "linear"} <= kinds
    vit = index_model(tiny_model("vit"))
    patch = next(m for m in vit.modules if m.kind == "conv2d")
    assert (patch.in_features, patch.out_features, patch.kernel) == (3, 32, 64)
    llama = index_model(tiny_model("llama"))
    q = llama.by_path["model.layers.1.self_attn.q_proj"]
    assert (q.in_features, q.out_features, q.layer, q.suffix) == (32, 32, 1, "q_proj")
    assert llama.num_layers == 2


def test_custom_module_with_conv_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 8, 3, groups=2)
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.norm = nn.LayerNorm(8)

    net = Net()
    assert jl.find_targets(net, "conv") == ("conv",)
    assert jl.find_targets(net, "blocks.*", layers="1-2") == ("blocks.1", "blocks.2")
    with pytest.raises(TargetError, match="needed"):
        jl.find_targets(net)


def test_index_is_cached_and_rebuilt_after_a_structure_change(llama):
    first = index_model(llama)
    assert index_model(llama) is first
    model = tiny_model("llama")
    before = index_model(model)
    adapted = jl.inject(model, r=4, targets="q_proj")
    after = index_model(adapted)
    assert after is not before
    # The adapted model indexes like its base: same adaptable paths.
    assert [m.path for m in after.modules] == [m.path for m in before.modules]


# ----------------------------------------------------------------------------------------------- the shared table


@cache
def _shape_model(shape: str) -> nn.Module:
    spec = TABLE["shapes"][shape]
    return tiny_model(spec["arch"], **spec["config"])


def _panel_rows(shape: str) -> dict:
    """What the panel sends the tree for a shape (tree_rows is the widgets' view of the model)."""
    from jupyter_lora.widgets.tree import tree_rows

    model = _shape_model(shape)
    index = index_model(model)
    return {"block_lists": list(index.layer_lists), "num_layers": index.num_layers, "rows": tree_rows(model)}


def _dump_rows() -> str:
    parts = []
    for shape in TABLE["shapes"]:
        state = _panel_rows(shape)
        rows = ",\n".join("      " + json.dumps(row, ensure_ascii=False) for row in state["rows"])
        parts.append(
            f'  "{shape}": {{\n    "block_lists": {json.dumps(state["block_lists"])}, '
            f'"num_layers": {state["num_layers"]},\n    "rows": [\n{rows}\n    ]\n  }}'
        )
    return "{\n" + ",\n".join(parts) + "\n}\n"


CASES = TABLE["cases"]


@pytest.mark.parametrize("shape", list(TABLE["shapes"]))
def test_stored_rows_are_what_the_panel_sends(shape):
    stored = json.loads(ROWS_FILE.read_text(encoding="utf-8"))[shape]
    assert stored == _panel_rows(shape), (
        f"{ROWS_FILE.name} is out of date for {shape!r}: rewrite it with `python tests/core/test_targets.py`"
    )


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_table_resolve(case):
    model = _shape_model(case["shape"])
    options = {key: case[key] for key in ("layers", "exclude") if key in case}
    if "error" in case:
        with pytest.raises(UsageError, match=case["error"]):
            resolve(model, case["targets"], **options)
    else:
        assert resolve(model, case["targets"], **options) == tuple(case["expected"])


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_table_highlight(case):
    """The tree's half of a case by the resolver's rules: each item that is not a preset resolved alone (one that
    selects nothing highlights nothing), inside the layers when the layers field is valid; no exclude."""
    index = index_model(_shape_model(case["shape"]))
    items = split_spec(case["targets"])
    assert [n for n in dict.fromkeys(preset_name(i) for i in items) if n] == case.get("presets", [])
    highlight: set[str] = set()
    flagged = []
    for item in (i for i in items if preset_name(i) is None):
        try:
            highlight.update(resolve_targets(index, item))
        except TargetError:
            flagged.append(item)
    assert sorted(flagged) == sorted(case.get("unmatched", []) + case.get("invalid", []))
    try:
        layers = parse_layers(case.get("layers"), index.num_layers)
    except UsageError:
        layers = None
    if layers is not None:
        highlight = {p for p in highlight if index.by_path[p].layer in layers}
    default = [] if "error" in case else case["expected"]
    assert highlight == set(case.get("highlight", default))


LAYER_CASES = TABLE["layers"]


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c["id"] for c in LAYER_CASES])
def test_table_layers(case):
    if "error" in case:
        with pytest.raises(UsageError, match=case["error"]):
            parse_layers(case["layers"], case["num_layers"])
    else:
        expected = None if case["expected"] is None else tuple(case["expected"])
        assert parse_layers(case["layers"], case["num_layers"]) == expected


def test_an_adapted_model_walks_like_its_base():
    """PEFT's tuner layers and modules_to_save wrappers are reported as the layers they wrap."""
    model = tiny_model("bert")
    before = [(path, type(module)) for path, module in unwrapped_modules(model)]
    adapted = jl.inject(model, r=4, targets="query, value", modules_to_save="classifier")
    base = adapted.base_model.model
    assert [(path, type(module)) for path, module in unwrapped_modules(base)] == before
    assert any(".lora_A" in path for path, _ in base.named_modules())


def test_a_plain_model_is_indexed_without_importing_peft():
    code = (
        "import sys, torch; from jupyter_lora.core.targets import resolve; "
        "net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)); "
        "print(resolve(net, '*'), 'peft' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "('0', '1') False"


if __name__ == "__main__":
    ROWS_FILE.write_text(_dump_rows(), encoding="utf-8")
