"""The panel's Python side without a kernel: change traits as the front end would, check the numbers, the model
after the buttons, and the errors shown in the panel."""

from __future__ import annotations

import pytest

import jupyter_lora as jl
from jupyter_lora.magics.parse import Inject, parse
from jupyter_lora.testing import tiny_model
from jupyter_lora.widgets.panel import Panel, _pow2


@pytest.fixture
def ns():
    return {"model": tiny_model("llama")}


def _panel(ns, **kw):
    return Panel(ns["model"], variable="model", namespace=ns, **kw)


def test_summary_follows_the_rank_slider(ns):
    panel = _panel(ns, targets="all-linear")
    first = panel.plan.trainable_params
    assert f"{first:,}" in panel.summary.value
    panel.r.value = 32
    assert panel.plan.trainable_params == 2 * first
    assert f"{2 * first:,}" in panel.summary.value
    assert panel.plan.spec.lora_alpha == 64, "alpha = 2r while locked"
    assert panel.plan == jl.plan(ns["model"], r=32, targets="all-linear")


def test_alpha_unlocked_and_pow2_snapping(ns):
    panel = _panel(ns)
    panel.alpha_lock.value = False
    panel.alpha.value = 7
    panel.r.value = 12
    assert panel.plan.spec.lora_alpha == 7
    panel.pow2.value = True
    assert panel.r.value == 16
    assert [_pow2(v) for v in (1, 3, 5, 6, 100, 200, 256)] == [1, 4, 4, 8, 128, 256, 256]


def test_targets_and_layers_from_the_tree(ns):
    panel = _panel(ns)
    assert set(panel.tree.selected) == set(jl.find_targets(ns["model"]))  # the default (qv)
    panel.tree.targets = "mlp"
    assert {p.rsplit(".", 1)[-1] for p in panel.tree.selected} == {"gate_proj", "up_proj", "down_proj"}
    panel.tree.layers = "1"
    assert all(".layers.1." in p for p in panel.tree.selected) and len(panel.tree.selected) == 3
    panel.tree.targets = "re:.*\\.q_proj"
    assert panel.tree.selected == ["model.layers.1.self_attn.q_proj"]


def test_a_bad_spec_shows_an_error_and_keeps_the_last_plan(ns):
    panel = _panel(ns, targets="q_proj")
    good = panel.plan
    panel.tree.targets = "q_prj"
    assert "Did you mean `q_proj`" in panel.tree.error
    assert panel.plan is good and panel.tree.selected == list(good.targets)
    panel.tree.targets = "q_proj, v_proj"
    assert panel.tree.error == "" and len(panel.tree.selected) == 4


def test_memory_bar_follows_batch_seq_and_4bit(ns):
    panel = _panel(ns)
    small = panel.estimate.total_bytes
    panel.seq.value = "4096"  # the training form's box, read as a cell body reads it
    assert panel.estimate.total_bytes > small and panel.estimate.seq == 4096
    full = panel.estimate.breakdown["weights"]
    panel.quant.value = "4bit"
    assert panel.estimate.breakdown["weights"] < full
    assert "jl-membar" in panel.summary.value


def test_buttons_inject_merge_unload_and_state(ns, tmp_path):
    panel = _panel(ns, targets="attention")
    assert panel.merge_button.disabled and panel.save_button.disabled and panel.unload_button.disabled
    panel.inject_button.click()
    model = ns["model"]
    assert type(model).__name__.startswith("PeftModel") and panel.model is model
    assert panel.inject_button.description == "Re-inject" and not panel.merge_button.disabled
    assert model.get_nb_trainable_parameters() == (panel.plan.trainable_params, panel.plan.total_params)
    panel.r.value = 4
    panel.inject_button.click()
    assert ns["model"].peft_config["default"].r == 4 and list(ns["model"].peft_config) == ["default"]
    panel.save_path.value = str(tmp_path / "a")
    panel.save_button.click()
    assert (tmp_path / "a" / "adapter_model.safetensors").exists() and "saved to" in panel.error.value
    panel.merge_button.click()
    assert type(ns["model"]).__name__ == "LlamaForCausalLM"
    assert panel.merge_button.disabled and panel.inject_button.description == "Inject"
    panel.inject_button.click()
    panel.unload_button.click()
    assert type(ns["model"]).__name__ == "LlamaForCausalLM" and not jl.status(ns["model"]).adapters


def test_errors_appear_inside_the_panel(ns, tmp_path):
    panel = _panel(ns)
    panel.inject_button.click()
    (tmp_path / "file.txt").write_text("x")
    panel.save_path.value = str(tmp_path / "file.txt")
    panel.save_button.click()  # must not raise
    assert "jl-panel-error" in panel.error.value and "is an existing file" in panel.error.value
    panel.data.value = "missing"
    assert "no variable `missing`" in panel.form_errors["data"]  # marked at once, under the field
    panel.train_button.click()
    assert (
        "Fix the training settings first" in panel.error.value
        and "no variable `missing`" in panel.error.value
    )


def test_show_as_code_round_trips_through_the_magic_grammar(ns):
    panel = _panel(ns, targets="attention", layers="1", r=8)
    panel.alpha_lock.value = False
    panel.alpha.value = 12
    panel.variant.value = "dora"
    panel.code_button.value = True
    text = panel.code_inject.value
    command = parse(text.splitlines()[0][2 + len("lora") :].strip(), "\n".join(text.splitlines()[1:]))
    assert isinstance(command, Inject) and command.model == "model"
    again = jl.plan(ns["model"], **command.settings)
    assert again.targets == panel.plan.targets and again.trainable_params == panel.plan.trainable_params
    assert (again.spec.r, again.spec.lora_alpha, again.spec.variant) == (8, 12.0, "dora")


def test_tree_nodes_describe_the_model(ns):
    panel = _panel(ns)
    nodes = panel.tree.nodes
    assert nodes[0]["params"] == sum(p.numel() for p in ns["model"].parameters())
    q = next(n for n in nodes if n["path"] == "model.layers.0.self_attn.q_proj")
    assert (q["kind"], q["shape"], q["layer"]) == ("linear", "32→32", 0)
    assert panel.tree.block_lists == ["model.layers"] and panel.tree.num_layers == 2
    assert "ModuleTree(" in repr(panel.tree) and "Panel for `model`" in repr(panel)


def test_panel_magic(ip_shell):
    ip_shell.run_cell("from jupyter_lora.testing import tiny_model\nmodel = tiny_model('llama')")
    panel = ip_shell.run_line_magic("lora", "panel model")
    assert isinstance(panel, Panel)
    panel.inject_button.click()
    assert type(ip_shell.user_ns["model"]).__name__.startswith("PeftModel")


@pytest.fixture
def ip_shell():
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython() or __import__("IPython").get_ipython()
    manager = ip.extension_manager
    if "jupyter_lora" not in manager.loaded:
        manager.load_extension("jupyter_lora")
    yield ip
    ip.user_ns.pop("model", None)


def test_the_panel_opens_on_the_adapter_the_model_holds(ns):
    ns["model"] = jl.inject(ns["model"], r=8, alpha=8, targets="attention", dropout=0.1)
    held = jl.plan(ns["model"], r=8, alpha=8, targets="attention", dropout=0.1, replace=True)
    panel = _panel(ns, r=16, targets="qv")  # what %lora panel passes: the notebook's defaults
    assert (panel.r.value, panel.plan.spec.lora_alpha, panel.plan.spec.dropout) == (8, 8, 0.1)
    assert set(panel.plan.target_modules) == set(held.target_modules)
    assert panel.plan.trainable_params == held.trainable_params


def test_an_invalid_spec_marks_the_figures_stale_and_inject_refuses(ns):
    panel = _panel(ns, targets="qv")
    before = jl.plan(ns["model"], r=16, targets="qv")
    panel.tree.targets = "q_proj, v_porj"
    assert (
        panel.tree.error
        and "jl-stale" in panel.summary.value
        and "last valid settings" in panel.summary.value
    )
    panel.inject()
    assert "fix the settings above first" in panel.error.value and panel.error.value.count("v_porj") == 0
    assert ns["model"] is not None and not hasattr(ns["model"], "peft_config"), "nothing was injected"
    panel.tree.targets = "qv"
    assert "jl-stale" not in panel.summary.value and panel.plan == before


def test_inject_confirms_and_the_summary_says_what_the_model_holds(ns):
    panel = _panel(ns, targets="qv")
    assert "new adapter" in panel.summary.value
    panel.inject()
    assert "Injected adapter 'default' into `model`: r=16" in panel.error.value
    assert "the adapter the model holds" in panel.summary.value and "replaces" not in panel.summary.value
    panel.r.value = 8
    assert "Re-inject replaces the adapter" in panel.summary.value
    panel.inject()
    assert "Re-injected adapter 'default'" in panel.error.value and "r=8" in panel.error.value
    reopened = _panel(ns)
    assert "the adapter the model holds" in reopened.summary.value


def test_the_panel_follows_its_variable_whatever_changed_it(ns):
    panel = _panel(ns, targets="qv")
    panel.inject()
    ns["model"] = jl.merge(ns["model"])  # what %lora merge model does in another cell
    assert panel.follow()
    assert panel.model is ns["model"] and panel.inject_button.description == "Inject"
    assert all(
        b.disabled for b in (panel.merge_button, panel.save_button, panel.unload_button, panel.train_button)
    )
    assert "new adapter" in panel.summary.value
    ns["model"] = jl.inject(ns["model"], r=4, targets="qv")  # an inject from a cell
    panel.follow()
    assert panel.inject_button.description == "Re-inject" and not panel.merge_button.disabled
    ns["model"] = "something else"
    panel.merge_button.click()  # an action checks first
    assert "no longer holds a model" in panel.error.value and panel.inject_button.disabled


def test_the_panel_follows_after_every_cell_in_the_shell():
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    shell.user_ns["pm"] = tiny_model("llama")
    panel = Panel(shell.user_ns["pm"], variable="pm", namespace=shell.user_ns, targets="qv")
    shell.run_cell("import jupyter_lora as jl\npm = jl.inject(pm, r=4, targets='qv')")
    assert panel.model is shell.user_ns["pm"] and panel.inject_button.description == "Re-inject"
    del shell.user_ns["pm"]


@pytest.mark.parametrize(
    ("targets", "shown"), [("qv, experts", "q_proj, v_proj, experts"), ("experts", "experts")]
)
def test_the_panel_opens_on_a_held_expert_adapter_and_re_inject_keeps_it(targets, shown):
    ns = {"model": jl.inject(tiny_model("mixtral"), r=4, targets=targets)}
    held = jl.status(ns["model"])
    panel = _panel(ns, targets="qv")
    assert panel.tree.targets == shown
    assert {p for p in panel.tree.selected if p.endswith(("gate_up_proj", "down_proj"))}, (
        "expert weights ticked"
    )
    assert panel.plan.trainable_params == held.trainable_params
    assert "the adapter the model holds" in panel.summary.value
    panel.inject()
    after = jl.status(ns["model"])
    assert (after.trainable_params, after.total_params) == (held.trainable_params, held.total_params)
    assert "experts" in panel.as_code()


def test_a_plan_without_the_held_expert_weights_is_not_called_the_held_adapter():
    ns = {"model": jl.inject(tiny_model("mixtral"), r=4, targets="qv, experts")}
    panel = _panel(ns)
    panel.tree.targets = "q_proj, v_proj"
    assert "Re-inject replaces the adapter" in panel.summary.value
