"""The settings schema is the one source: every declared setting (and each of its aliases) is accepted by the
Python API, by the ``%%lora`` YAML of the commands that take it, has a panel control where the panel shows it, a
``%config LoraMagics`` default where it declares one, and is listed by ``%lora help``. Plus one test for each
place where copies of a key list used to disagree."""

from __future__ import annotations

import inspect

import pytest
import torch
import yaml

import jupyter_lora as jl
from jupyter_lora.core.spec import make_spec
from jupyter_lora.core.train import make_train_config
from jupyter_lora.magics import parse as p
from jupyter_lora.settings import SETTINGS, InputSettings, keys, panel_keys, validate_one
from jupyter_lora.testing import tiny_model, tiny_tokenizer

# A value of each setting that suits the tiny Llama used here where the declared example does not.
VALUES = {
    "layers": "0",
    "exclude": "k_proj",
    "targets": "q_proj, k_proj",
    "modules_to_save": None,
    "task_type": "CAUSAL_LM",
    "data": ["some text"],
    "tokenizer": None,
    "eval_data": None,
    "output_dir": "runs/x",
    "adapter": "off",  # the model here holds no adapter: side by side would be refused
}


def _value(name: str):
    if name in VALUES:
        return VALUES[name]
    return yaml.load(SETTINGS[name].example, Loader=p.yaml_loader())


def _spellings():
    return [(name, spelling) for name, s in SETTINGS.items() for spelling in (name, *s.aliases)]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_every_setting_has_help_an_example_and_a_valid_default():
    for name, s in SETTINGS.items():
        assert s.help and s.example, name
        assert s.scopes and set(s.scopes) <= {"inject", "train", "estimate", "chat", "sweep"}, name
        if s.kind != "object":
            assert validate_one(name, s.default) == s.default, f"{name}: the default fails its own checks"
        assert validate_one(name, _value(name)) is not None or _value(name) is None, name


@pytest.mark.parametrize(("name", "spelling"), _spellings(), ids=lambda x: str(x))
def test_the_api_accepts_every_setting_and_alias(name, spelling, model):
    s = SETTINGS[name]
    value = _value(name)
    if "chat" in s.scopes:  # a chat setting (some are training settings too): the chat takes it
        conversation = jl.Conversation(model, tiny_tokenizer(), **{spelling: value})
        assert conversation.settings[name] == validate_one(name, value)
    if "inject" in s.scopes:
        spec = make_spec(**{spelling: value, **({"targets": "q_proj, k_proj"} if name == "exclude" else {})})
        assert getattr(spec, name) == validate_one(name, value)
        assert jl.plan(model, **{spelling: value}).spec == jl.plan(model, **{name: value}).spec
    elif "train" in s.scopes and s.kind != "object" and name != "progress":
        assert getattr(make_train_config(**{spelling: value}), name) == validate_one(name, value)
        if "estimate" in s.scopes:
            assert jl.estimate(model, **{spelling: value}) is not None
    elif "estimate" in s.scopes:
        assert jl.estimate(model, **{spelling: value}) is not None
    elif "sweep" in s.scopes:  # a sweep's own setting: a run of a sweep takes it
        from jupyter_lora.core.sweep.grid import plan_runs, sweep_keys

        if name in sweep_keys():
            method = {"method": "prompt_tuning"} if name == "num_virtual_tokens" else {}  # lora takes none
            assert plan_runs(None, [{spelling: value, **method}], {})[0].settings[name] == validate_one(
                name, value
            )
        else:  # keep: an argument of sweep() itself
            assert name in inspect.signature(jl.sweep).parameters
    elif "chat" in s.scopes:
        pass  # checked above
    elif name == "progress":  # how %%lora train shows progress: a notebook option, not an API argument
        assert s.trait == "progress"
    else:  # what a run reads: the data, the tokenizer, held-out data
        assert spelling == name and name in inspect.signature(jl.train).parameters
        assert {f for f in InputSettings.__dataclass_fields__} >= {name}


@pytest.mark.parametrize(("name", "spelling"), _spellings(), ids=lambda x: str(x))
def test_the_yaml_of_each_command_accepts_it(name, spelling):
    s = SETTINGS[name]
    body = f"{spelling}: {yaml.safe_dump(_value(name), default_flow_style=True).strip().removesuffix('...')}"
    body = body.strip()
    for scope, line, extra in (("inject", "model", ""), ("train", "train model", "data: texts\n"),
                               ("estimate", "estimate model", ""), ("chat", "chat model", "")):  # fmt: skip
        if scope not in s.scopes:
            with pytest.raises(jl.UsageError, match=f"`{spelling}` is a setting of .*not of this cell"):
                p.parse(line, extra + body if name != "data" else body)
            continue
        command = p.parse(line, extra + body if name != "data" else body)
        given = {**getattr(command, "settings", {}), **getattr(command, "options", {})}
        assert name in given, (scope, spelling)


def test_help_lists_every_setting_and_alias():
    for name, s in SETTINGS.items():
        assert f"{name}: {s.example}" in p.USAGE, name
        for alias in s.aliases:
            assert alias in p.USAGE, alias
        for choice in s.choices if s.kind == "choice" else ():
            assert str(choice) in p.USAGE, (name, choice)


def test_every_declared_default_is_a_config_option():
    from jupyter_lora.magics.lora import LoraMagics

    traits = LoraMagics.class_traits(config=True)
    for name, s in SETTINGS.items():
        if s.trait:
            assert traits[s.trait].default_value == s.default, name
    assert {s.trait for s in SETTINGS.values() if s.trait} <= set(traits)


def test_the_panel_has_a_control_for_every_panel_setting(model):
    panel = jl.Panel(model)
    assert set(panel.controls) == set(panel_keys())
    for name in panel_keys():
        s = SETTINGS[name]
        control = panel.controls[name]
        if s.kind in ("choice", "auto_bool"):
            values = [v for _, v in control.options]
            assert set(s.choices) <= set(values), name
        elif s.panel_range and hasattr(control, "min"):
            assert (control.min, control.max) == s.panel_range[:2], name
        if s.kind in ("int", "float", "choice", "auto_bool") and name != "alpha" and s.default is not None:
            assert control.value == s.default, name


# --- the disagreements one schema removes, one test each ------------------------------------------------------


def test_target_spelling_is_accepted_by_the_cell_as_by_the_api(model):
    assert p.parse("model", "target: q_proj").settings == {"targets": "q_proj"}
    assert jl.plan(model, target="q_proj").targets == jl.plan(model, targets="q_proj").targets


def test_every_init_is_offered_by_the_panel_and_listed_in_help(model):
    panel = jl.Panel(model)
    offered = [v for _, v in panel.init.options]
    assert "mica" in offered and set(offered) == set(SETTINGS["init"].choices)
    assert "mica" in p.USAGE
    panel.init.value = "mica"
    assert panel.plan.spec.init == "mica"


def test_estimate_options_are_the_training_options():
    # `%lora estimate --optim X` accepts exactly the optimizers training accepts
    for optim in SETTINGS["optim"].choices:
        assert make_train_config(optim=optim).optim == optim
        assert p.parse(f"estimate model --optim {optim}").options["optim"] == optim
    with pytest.raises(jl.UsageError):
        p.parse("estimate model --optim adam")


def test_estimates_describe_the_run_training_would_start(model):
    trained = make_train_config()
    m = jl.estimate(model, jl.plan(model))
    assert (m.seq, m.batch, m.optim) == (trained.seq, trained.batch, trained.optim)
    assert m.ckpt is False  # ckpt auto: off for a bf16/fp32 base ...
    assert (
        jl.estimate(model, jl.plan(model), quant="4bit").ckpt is True
    )  # ... on for a 4-bit one, as in training
    assert keys("estimate") == tuple(k for k in SETTINGS if "estimate" in SETTINGS[k].scopes) and set(
        p.ESTIMATE_OPTIONS
    ) == {"seq", "batch", "ckpt", "optim", "dtype", "quant", "audio_seconds"}


# --- what a first user found -----------------------------------------------------------------------------------


def test_a_setting_of_another_command_says_where_it_belongs():
    with pytest.raises(jl.UsageError, match=r"`lr` is a setting of `%%lora train`, not of this cell"):
        p.parse("model", "lr: 1e-4")
    with pytest.raises(jl.UsageError, match=r"`r` is a setting of a `%%lora MODEL` cell"):
        p.parse("train model", "data: x\nr: 4")


def test_estimate_options_in_capitals():
    assert p.parse("estimate model --optim AdamW").options == {"optim": "adamw"}


def test_other_spellings_change_a_given_spec(model):
    spec = make_spec(r=4, targets="q_proj")
    assert jl.plan(model, spec, lora_alpha=8).spec.alpha == 8
    assert (
        jl.plan(model, spec, target_modules="v_proj").targets == jl.plan(model, r=4, targets="v_proj").targets
    )


def test_mica_rank_beyond_a_module_is_refused_when_planned(model):
    smallest = min(
        min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    with pytest.raises(jl.UsageError, match="init: mica needs r ≤"):
        jl.plan(model, r=smallest * 4, init="mica", targets="all-linear")


def test_sgd_keeps_a_momentum_buffer_in_the_estimate(model):
    p_ = jl.plan(model, r=4)
    assert jl.estimate(model, p_, optim="sgd").breakdown["optimizer"] == 4 * p_.trainable_params


def test_the_panel_keeps_values_beyond_its_usual_ranges(model):
    panel = jl.Panel(model, r=512, init="pissa_niter_4", train_settings={"lr": 1e-4})
    assert panel.plan.spec.r == 512 and panel.plan.spec.init == "pissa_niter_4"
    assert panel.form["steps"].value == ""  # not set: train by epochs
    assert panel.form["lr"].value == "0.0001" and panel.training_settings() == {"lr": 1e-4}
    with pytest.raises(jl.UsageError, match="`lr`"):
        jl.Panel(model, train_settings={"lr": "fast"})


def test_estimate_refuses_a_plan_it_cannot_use(model):
    other = tiny_model("gpt2")
    with pytest.raises(jl.UsageError, match="`plan` must be a plan"):
        jl.estimate(model, "notaplan")
    with pytest.raises(jl.UsageError, match="made for another model"):
        jl.estimate(model, jl.plan(other))
    with pytest.raises(jl.UsageError, match="either `plan` or adapter settings"):
        jl.estimate(model, jl.plan(model), r=64)


def test_labels_read_as_typed_on_a_line_or_in_a_form_field():
    from jupyter_lora.settings import validate_one

    for typed in ("neg, pos", "[neg, pos]", "['neg', 'pos']", ["neg", "pos"]):
        assert validate_one("labels", typed) == ("neg", "pos")
