"""The panel's training form, its "Show as code" and its figures, without a kernel: the form is the settings
schema (every training setting, its kind, choices, help and checks), wrong values are marked with the schema's own
message, Train uses the form and says where it writes, the code shown parses back to the same settings, and the
adapter's size and memory parts are the same figures in the ``%%lora`` summary and the panel."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import ipywidgets as w
import pytest

import jupyter_lora as jl
import jupyter_lora.settings as settings_module
from jupyter_lora.core.errors import UsageError
from jupyter_lora.display import adapter_size, fmt_bytes, memory_parts, summary_text
from jupyter_lora.magics.parse import Inject, Train, parse, read_value
from jupyter_lora.settings import SETTINGS, form_sections, keys, validate, validate_one
from jupyter_lora.testing import tiny_model, tiny_tokenizer
from jupyter_lora.widgets.panel import Panel

TEXT = ["the quick brown fox jumps over the lazy dog."] * 16


@pytest.fixture
def ns():
    return {"model": tiny_model("llama")}


def _panel(ns, **kw):
    return Panel(ns["model"], variable="model", namespace=ns, **kw)


def _message(name: str, text: str) -> str:
    """What the schema says about ``text`` typed for ``name`` (read as a cell body reads it)."""
    with pytest.raises(UsageError) as caught:
        validate_one(name, read_value(text, name))
    return str(caught.value)


def _parse_cell(text: str):
    line, _, body = text.partition("\n")
    assert line.startswith("%%lora ")
    return parse(line.removeprefix("%%lora "), body)


# ----------------------------------------------------------------------------------------------- the form


def test_the_form_is_the_schema_every_training_setting_with_its_kind_choices_and_help(ns):
    panel = _panel(ns)
    expected = {n for n in keys("train") if SETTINGS[n].form is not None}
    assert set(panel.form) == expected and "progress" not in panel.form  # the panel shows its own progress
    for name, control in panel.form.items():
        s = SETTINGS[name]
        assert s.help in control.tooltip and s.describe() in control.tooltip, name
        if s.kind in ("choice", "auto_bool"):
            assert isinstance(control, w.Dropdown), name
            assert set(s.choices) <= {v for _, v in control.options}, name
            assert control.value == s.default, name
        elif s.kind == "bool" and not s.nullable:
            assert isinstance(control, w.Checkbox) and control.value == s.default, name
        elif s.kind == "bool":
            assert isinstance(control, w.Dropdown) and control.value is None and control.index == 0, name
        else:  # typed as a cell body reads it: empty means the default, which the placeholder shows
            assert isinstance(control, w.Text) and control.value == "", name
            shown = s.example if s.default in (None, ()) or s.kind == "object" else str(s.default)
            assert shown.split(".")[0] in control.placeholder, (name, control.placeholder)
    # the basic section shows at once; the others are collapsed sections of the accordion, titled by the schema
    basic = next(names for section, _, advanced, names in form_sections() if not advanced)
    assert {"data", "lr", "steps", "batch", "seq", "output_dir"} <= set(basic)
    assert panel.advanced.selected_index is None
    assert list(panel.advanced.titles) == [t for _, t, advanced, _ in form_sections() if advanced]
    inside = {id(c) for grid in panel.advanced.children for item in grid.children for c in item.children}
    assert all((id(panel.form[n]) in inside) == (n not in basic) for n in panel.form)
    wanted = {"lr", "steps", "epochs", "warmup", "scheduler", "eval", "eval_every", "early_stop", "batch",
              "grad_accum", "seq", "packing", "ckpt", "optim", "report_to", "run_name", "output_dir"}  # fmt: skip
    assert wanted <= set(panel.form)


def test_a_setting_added_to_the_schema_appears_in_the_form(ns, monkeypatch):
    new = dataclasses.replace(SETTINGS["weight_decay"], name="label_smoothing", help="label smoothing factor",
                              form="", trait=None, default=0.0, maximum=1.0)  # fmt: skip
    monkeypatch.setitem(settings_module.SETTINGS, "label_smoothing", new)
    assert form_sections()[-1][0] == "more" and "label_smoothing" in form_sections()[-1][3]
    panel = _panel(ns)
    assert "label smoothing factor" in panel.form["label_smoothing"].tooltip
    panel.form["label_smoothing"].value = "2"
    assert panel.form_errors["label_smoothing"] == _message("label_smoothing", "2")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("lr", "0"),
        ("lr", "fast"),
        ("batch", "0"),
        ("steps", "ten"),
        ("steps", "1.5"),
        ("epochs", "-1"),
        ("seq", "[512]"),
        ("warmup", "-0.1"),
        ("eval", "1.5"),
        ("eval_every", "0"),
        ("early_stop", "0"),
        ("grad_accum", "two"),
        ("max_grad_norm", "0"),
        ("samples", "{a: 1}"),
        ("keep_checkpoints", "0"),
    ],
)
def test_a_wrong_value_is_marked_at_once_with_the_schemas_message(ns, name, text):
    panel = _panel(ns)
    panel.form[name].value = text
    assert panel.form_errors[name] == _message(name, text)
    item = panel._form_items[name]
    assert "jl-invalid" in item._dom_classes
    assert panel.form_errors[name].split("`")[1] == name  # the message names the setting...
    assert "jl-form-error" in item.children[1].value and item.children[1].layout.display != "none"
    panel.form[name].value = ""  # ... and goes when the field is right again (empty: the default)
    assert name not in panel.form_errors and "jl-invalid" not in item._dom_classes
    assert item.children[1].layout.display == "none"


def test_a_value_that_cannot_be_read_and_a_warning_are_shown_too(ns):
    panel = _panel(ns)
    panel.form["samples"].value = "[unclosed"
    assert panel.form_errors["samples"].startswith("`samples`: '[unclosed' cannot be read as a value (")
    assert panel.form_errors["samples"].endswith('E.g. samples: ["Once upon a time"].')
    panel.form["samples"].value = ""
    panel.form["lr"].value = "0.01"  # allowed, but outside the usual range: the schema's warning as a note
    assert "lr" not in panel.form_errors and panel.training_settings().get("lr") == 0.01
    note = panel._form_messages["lr"].value
    assert "jl-form-note" in note and "outside the usual LoRA range" in note


def test_the_memory_figure_follows_the_forms_batch_seq_ckpt_and_optim(ns):
    panel = _panel(ns)
    small = panel.estimate.total_bytes
    panel.batch.value = "32"
    panel.seq.value = "2048"
    assert (panel.estimate.batch, panel.estimate.seq) == (32, 2048) and panel.estimate.total_bytes > small
    big = panel.estimate.total_bytes
    panel.ckpt.value = True
    assert panel.estimate.ckpt and panel.estimate.total_bytes < big
    panel.optim.value = "sgd"
    assert panel.estimate.optim == "sgd"
    panel.batch.value = "0"  # wrong: the figures stay those of the last valid batch, marked as such
    assert panel.estimate.batch == 32 and "jl-stale" in panel.summary.value
    panel.batch.value = "16"
    assert panel.estimate.batch == 16 and "jl-stale" not in panel.summary.value


def test_panel_settings_start_the_form(ns):
    panel = _panel(
        ns, lr=1e-4, batch_size=4, data="texts", train_settings={"steps": 30, "scheduler": "linear"}
    )
    assert panel.form["lr"].value == "0.0001" and panel.form["batch"].value == "4"
    assert panel.form["data"].value == "texts" and panel.form_errors["data"].startswith("`data`: no variable")
    assert panel.form["steps"].value == "30" and panel.form["scheduler"].value == "linear"
    with pytest.raises(UsageError, match="`batch` must be a positive whole number"):
        _panel(ns, batch=0)
    unusual = _panel(ns, lr=1e-2)  # allowed but unusual: no warning escapes, the field's note says it
    assert "outside the usual LoRA range" in unusual._form_messages["lr"].value


# ----------------------------------------------------------------------------------------------- train


@pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")
def test_train_uses_the_form_and_says_where_it_writes(ns, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns.update(texts=TEXT, tok=tiny_tokenizer())
    panel = _panel(ns, targets="qv")
    assert (
        "lora_runs/llama-&lt;start time&gt;" in panel.output_line.value
    )  # where, before an output_dir is set
    assert str(tmp_path) in panel.output_line.value
    panel.inject()
    form = {"data": "texts", "steps": "3", "lr": "3e-3", "batch": "2", "seq": "32", "eval": "0",
            "scheduler": "constant", "warmup": "0", "output_dir": "runs/first"}  # fmt: skip
    for name, text in form.items():
        panel.form[name].value = text
    assert f"{tmp_path / 'runs/first'}" in panel.output_line.value  # before it trains
    panel.train_button.click()
    assert panel.error.value == "", panel.error.value
    run = panel.run
    assert run is not None and run.output_dir == Path("runs/first")
    seen_while = panel.output_line.value  # the run is "running" from the moment train() returns
    run.wait(timeout=120)
    assert run.state == "finished", run.state
    assert "training: checkpoints go to" in seen_while and str(tmp_path / "runs/first") in seen_while
    config = run.config
    assert (config.steps, config.lr, config.batch, config.seq, config.eval, config.scheduler, config.warmup) == (
        3, 3e-3, 2, 32, 0, "constant", 0.0,
    )  # fmt: skip
    assert (tmp_path / "runs/first").is_dir()
    assert "the last run wrote to" in panel.output_line.value
    assert panel.run.tokenizer is ns["tok"]  # the one tokenizer in the notebook, as the magic finds it


def test_train_refuses_while_a_field_is_wrong_and_names_it(ns):
    ns.update(texts=TEXT)
    panel = _panel(ns)
    panel.inject()
    panel.form["data"].value = "texts"
    panel.form["lr"].value = "0"
    panel.form["batch"].value = "none"
    panel.train()
    assert (
        "Fix the training settings first: `lr` must be" in panel.error.value
        and "1 more marked" in panel.error.value
    )
    assert panel.run is None
    panel.form["data"].value = ""
    panel.form["lr"].value = ""
    panel.form["batch"].value = ""
    panel.train()
    assert "Name the training data in the `data` field" in panel.error.value and panel.run is None


def test_a_data_variable_defined_after_the_panel_is_found(ns):
    panel = _panel(ns)
    panel.form["data"].value = "later"
    assert "data" in panel.form_errors
    ns["later"] = TEXT
    panel._after_cell()
    assert "data" not in panel.form_errors


# ----------------------------------------------------------------------------------------------- show as code


def _set_everything(panel):
    panel.tree.targets = "attention"
    panel.tree.layers = "1"
    panel.r.value = 8
    panel.alpha_lock.value = False
    panel.alpha.value = 12
    panel.dropout.value = 0.05
    panel.variant.value = "dora"
    form = {
        "data": "texts", "tokenizer": "tok", "lr": "1e-4", "steps": "50", "warmup": "10", "scheduler": "linear",
        "eval": "0.2", "eval_every": "5", "early_stop": "2", "batch": "4", "grad_accum": "2", "seq": "256",
        "output_dir": "runs/a b: c", "run_name": "123", "samples": '["Once upon a time", "it: was"]',
        "trainer_args": "{logging_first_step: true}", "max_grad_norm": "0.5", "epochs": "1",  # = the default
    }  # fmt: skip
    for name, text in form.items():
        panel.form[name].value = text
    panel.form["packing"].value = True
    panel.form["ckpt"].value = True
    panel.form["optim"].value = "adafactor"
    panel.form["report_to"].value = "tensorboard"
    panel.form["keep_best"].value = False


def test_show_as_code_parses_back_to_the_same_settings(ns):
    ns.update(texts=TEXT, tok=tiny_tokenizer())
    panel = _panel(ns)
    _set_everything(panel)
    assert panel.form_errors == {}
    panel.code_button.value = True
    trained = panel.training_settings()
    assert "epochs" not in trained and "dropout" not in panel.inject_cell().split("\n", 1)[0]  # only changes
    assert trained["output_dir"] == "runs/a b: c" and trained["samples"] == ("Once upon a time", "it: was")

    command = _parse_cell(panel.code_train.value)
    assert isinstance(command, Train) and command.model == "model"
    assert validate(command.settings, "train") == validate(trained, "train")
    assert set(command.settings) == set(trained)  # nothing more, nothing less: the non-default values

    command = _parse_cell(panel.code_inject.value)
    assert isinstance(command, Inject) and command.model == "model"
    injected = {k: v for k, v in panel.settings().items() if v != SETTINGS[k].default}
    assert validate(command.settings, "inject") == validate(injected, "inject")
    assert jl.plan(ns["model"], **command.settings) == panel.plan

    # the Python calls say the same: inject's and train's keywords (variables by name)
    calls = {}
    for node in ast.walk(ast.parse(panel.code_python.value)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            args = [a.id if isinstance(a, ast.Name) else ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: k.value.id if isinstance(k.value, ast.Name) else ast.literal_eval(k.value)
                      for k in node.keywords}  # fmt: skip
            calls[node.func.attr] = (args, kwargs)
    assert calls["inject"][0] == ["model"] and validate(calls["inject"][1], "inject") == validate(
        injected, "inject"
    )
    args, kwargs = calls["train"]
    assert args == ["model", "texts"]
    assert validate(kwargs, "train") == validate({k: v for k, v in trained.items() if k != "data"}, "train")


def test_show_as_code_follows_the_controls_and_writes_only_changes(ns):
    panel = _panel(ns, targets="qv")
    panel.code_button.value = True
    assert panel.code.layout.display == ""
    assert (
        panel.code_train.value == "%%lora train model\ndata: null  # the variable holding the training data"
    )
    assert "jl.train(model, data)" in panel.code_python.value
    panel.form["lr"].value = "0.0002"  # the default, typed: not a change
    assert "lr" not in panel.code_train.value
    panel.form["steps"].value = "77"
    assert "steps: 77" in panel.code_train.value and "steps=77" in panel.code_python.value
    panel.r.value = 4
    assert "r: 4" in panel.code_inject.value and "r=4" in panel.code_python.value
    panel.code_button.value = False
    assert panel.code.layout.display == "none"


# ----------------------------------------------------------------------------------------------- one figure


@pytest.fixture
def ip_shell():
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython() or __import__("IPython").get_ipython()
    if "jupyter_lora" not in ip.extension_manager.loaded:
        ip.extension_manager.load_extension("jupyter_lora")
    yield ip
    ip.user_ns.pop("model", None)


def _legend(panel) -> dict[str, str]:
    found = re.findall(
        r"class='jl-legend-\w+'.*?</span> ([^<]+?) ([\d.]+ [KMGT]?i?B)</span>", panel.summary.value
    )
    return dict(found)


@pytest.mark.parametrize("targets", ["qv", "all-linear, lm_head"])
def test_the_adapter_size_and_memory_parts_are_the_same_figures_everywhere(ip_shell, tmp_path, targets):
    ip_shell.run_cell("from jupyter_lora.testing import tiny_model\nmodel = tiny_model('llama')")
    summary = ip_shell.run_cell_magic("lora", "model", f"r: 8\ntargets: {targets}")
    plan = summary.plan
    size = adapter_size(plan)
    # the one correct figure: the safetensors file that saving writes, byte for byte
    saved = jl.save(ip_shell.user_ns["model"], tmp_path / "a")
    assert (saved / "adapter_model.safetensors").stat().st_size == plan.adapter_bytes
    assert size == fmt_bytes(plan.adapter_bytes)
    text = summary_text(summary)
    assert f"adapter {size} on disk" in text and f"adapter {size} on disk" in summary._repr_html_()

    panel = ip_shell.run_line_magic("lora", "panel model")  # opens on the adapter the model holds
    assert panel.plan.adapter_bytes == plan.adapter_bytes
    shown = re.search(r"class='jl-adapter-bytes'>([^<]+)</span> on disk", panel.summary.value).group(1)
    assert shown == size
    # the memory legend and the summary's table: the same parts, labels and figures (one function for both)
    rows = dict(re.findall(r"^(\S.*?)\s{2,}(\S.*)$", text.split("GPU memory to train", 1)[1], re.M)[2:])
    legend = _legend(panel)
    assert legend == {label: fmt_bytes(v) for _, label, v in memory_parts(panel.estimate) if v}
    assert {k: v for k, v in rows.items() if k in legend} == legend and len(legend) >= 6
    assert legend["adapter weights"] == rows["adapter weights"]
    assert sum(v for _, _, v in memory_parts(summary.estimate)) == summary.estimate.total_bytes
