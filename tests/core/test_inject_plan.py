"""``inject(model, plan=p)`` applies exactly the plan that was shown — to the model it was made for, unchanged
since — and ``replace=True`` leaves the new adapter alone on the model, all or nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from model_state import assert_model_unchanged, model_snapshot
from peft import PeftModel
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import jupyter_lora as jl
from jupyter_lora.core.adapters import operations
from jupyter_lora.core.errors import UsageError
from jupyter_lora.display import plan_html, plan_text
from jupyter_lora.testing import tiny_inputs, tiny_model

# ----------------------------------------------------------------------------------------------- helpers


def lora_paths(model: nn.Module, name: str) -> list[str]:
    return sorted(
        path.removeprefix("base_model.model.")
        for path, m in model.named_modules()
        if isinstance(m, BaseTunerLayer) and name in m.lora_A.keys() | m.lora_embedding_A.keys()
    )


def counts(model: nn.Module) -> tuple[int, int]:
    return model.get_nb_trainable_parameters()


def outputs(model: nn.Module) -> torch.Tensor:
    inputs = tiny_inputs(model.base_model.model if isinstance(model, PeftModel) else model)
    with torch.no_grad():
        return model(**inputs).logits


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Make every adapter non-zero (lora_B starts at zero), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def no_replanning(monkeypatch) -> None:
    def refuse(*args: Any, **kwargs: Any):
        raise AssertionError("inject(plan=...) planned again")

    monkeypatch.setattr(operations, "make_plan", refuse)


def two_adapters() -> nn.Module:
    model = jl.inject(tiny_model("llama"), r=4, targets="q_proj,v_proj", name="chat")
    model = jl.inject(model, r=2, targets="mlp", name="code", variant="dora")
    perturb(model)
    return model


# ----------------------------------------------------------------------------------------------- plan applied


PLANS = [
    ("llama-attention", "llama", None, dict(r=8, targets="attention")),
    ("llama-dora-layers", "llama", None, dict(r=4, targets="all-linear", layers="1", variant="dora")),
    ("bert-head-saved", "bert", None, dict(r=4, targets="query,value")),
    ("second-adapter", "llama", dict(r=2, targets="q_proj"), dict(r=4, targets="mlp", name="chat")),
    ("replaces-named", "llama", dict(r=2, targets="q_proj"), dict(r=8, targets="v_proj")),
]


@pytest.mark.parametrize(("arch", "first", "settings"), [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_the_plan_applied_is_the_plan_shown(monkeypatch, arch, first, settings):
    model = tiny_model(arch)
    if first is not None:
        model = jl.inject(model, **first)
    settings = dict(settings)
    name = settings.pop("name", "default")
    p = jl.plan(model, name=name, **settings)
    no_replanning(monkeypatch)

    adapted = jl.inject(model, plan=p)

    assert isinstance(adapted, PeftModel)
    assert lora_paths(adapted, name) == sorted(p.targets)
    assert counts(adapted) == (p.trainable_params, p.total_params)
    config = adapted.peft_config[name]
    assert (config.r, config.lora_alpha, config.use_dora) == (
        p.spec.r,
        p.spec.lora_alpha,
        p.spec.variant == "dora",
    )
    assert adapted.active_adapter == name
    saved = {path for path, m in adapted.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"}
    assert sorted(s.removeprefix("base_model.model.") for s in saved) == [
        r.path for r in p.modules if r.role == "modules_to_save"
    ]


def test_a_plan_made_from_the_base_applies_through_its_wrapper():
    base = tiny_model("llama")
    adapted = jl.inject(base, r=2, targets="q_proj")
    p = jl.plan(base, r=4, targets="v_proj", name="chat")  # the base, not the PeftModel the user now holds
    assert p.other_adapter_params == counts(adapted)[0]
    again = jl.inject(base, plan=p)
    assert again is adapted and sorted(again.peft_config) == ["chat", "default"]
    assert counts(again) == (p.trainable_params, p.total_params)


def test_training_the_weights_does_not_make_a_plan_stale():
    model = jl.inject(tiny_model("llama"), r=2, targets="q_proj")
    p = jl.plan(model, r=4, targets="v_proj", name="chat")
    perturb(model)
    assert "chat" in jl.inject(model, plan=p).peft_config


# ----------------------------------------------------------------------------------------------- refused


def _another_model(model: nn.Module) -> tuple[nn.Module, str]:
    return tiny_model("llama", seed=3), "made for another model"


def _adapter_added_since(model: nn.Module) -> tuple[nn.Module, str]:
    return jl.inject(model, r=2, targets="k_proj", name="other"), "no longer describes this model"


def _applied_once_already(model: nn.Module) -> tuple[nn.Module, str]:
    return jl.inject(model, plan=jl.plan(model, r=4, targets="q_proj")), "no longer describes this model"


def _structure_changed(model: nn.Module) -> tuple[nn.Module, str]:
    model.model.layers[0].mlp.down_proj = nn.Linear(model.config.intermediate_size, model.config.hidden_size)
    return model, "no longer describes this model"


STALE = {
    "another-model": _another_model,
    "adapter-added-since": _adapter_added_since,
    "applied-once-already": _applied_once_already,
    "module-replaced": _structure_changed,
}


@pytest.mark.parametrize("change", list(STALE.values()), ids=list(STALE))
def test_a_stale_plan_is_refused_and_changes_nothing(change):
    model = tiny_model("llama")
    p = jl.plan(model, r=4, targets="q_proj,v_proj")
    target, message = change(model)
    before = model_snapshot(target)
    with pytest.raises(UsageError, match=message) as info:
        jl.inject(target, plan=p)
    assert "jupyter_lora.plan(model" in str(info.value)  # says how to make a fresh plan
    assert_model_unchanged(before, target)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(r=8), r"`plan` already fixes every setting; got r"),
        (dict(name="chat"), r"`name` 'chat' differs from the plan's adapter name 'default'"),
        (dict(replace="yes"), r"`replace` must be True or False, got 'yes'"),
    ],
    ids=["plan-and-settings", "other-name", "replace-not-bool"],
)
def test_plan_with_contradicting_arguments_is_refused(kwargs, match):
    model = tiny_model("llama")
    p = jl.plan(model, r=4, targets="q_proj")
    before = model_snapshot(model)
    with pytest.raises(UsageError, match=match):
        jl.inject(model, plan=p, **kwargs)
    assert_model_unchanged(before, model)


def test_plan_must_be_a_plan():
    with pytest.raises(
        UsageError, match=r"`plan` must be a Plan made by jupyter_lora.plan\(model, \.\.\.\), got dict"
    ):
        jl.inject(tiny_model("llama"), plan={"r": 4})


# ----------------------------------------------------------------------------------------------- replace


def test_replace_leaves_the_new_adapter_alone():
    model = two_adapters()
    base = model.base_model.model
    p = jl.plan(model, r=4, targets="attention", name="solo")
    assert p.other_adapter_params > 0
    base_out = outputs(jl.unload(two_adapters()))

    adapted = jl.inject(model, plan=p, replace=True)

    assert list(adapted.peft_config) == ["solo"] and adapted.active_adapter == "solo"
    assert lora_paths(adapted, "solo") == sorted(p.targets)
    assert counts(adapted) == (p.trainable_params, p.total_params - p.other_adapter_params)
    assert not any("chat" in n or "code" in n for n, _ in adapted.named_parameters())
    assert torch.allclose(outputs(adapted), base_out, atol=1e-6)  # the new adapter starts at zero
    assert adapted.base_model.model is base
    assert [a.name for a in jl.status(base).adapters] == ["solo"]  # the base finds its new wrapper


def test_a_plan_made_with_replace_shows_and_applies_the_removal(monkeypatch):
    model = two_adapters()
    kept = jl.plan(model, r=4, targets="attention", name="solo")
    p = jl.plan(model, r=4, targets="attention", name="solo", replace=True)
    assert p.removes_others and p.other_adapters == ("chat", "code")
    assert p.trainable_params == kept.trainable_params
    assert p.total_params == kept.total_params - kept.other_adapter_params
    assert "removes the other adapters: 'chat', 'code'" in plan_text(p)
    assert "removes the other adapters: &#x27;chat&#x27;, &#x27;code&#x27;" in plan_html(p)
    no_replanning(monkeypatch)

    adapted = jl.inject(model, plan=p)

    assert list(adapted.peft_config) == ["solo"]
    assert counts(adapted) == (p.trainable_params, p.total_params)


def test_replace_under_an_existing_name_and_with_settings():
    model = two_adapters()
    adapted = jl.inject(model, r=8, targets="q_proj", name="chat", replace=True)
    assert list(adapted.peft_config) == ["chat"] and adapted.peft_config["chat"].r == 8
    plain = tiny_model("llama")
    alone = jl.inject(plain, r=4, targets="q_proj", replace=True)  # nothing else to remove
    assert list(alone.peft_config) == ["default"]


@pytest.mark.parametrize("fail_at", [1, 3], ids=["first-layer", "half-way"])
def test_replace_failing_changes_nothing(monkeypatch, fail_at):
    model = two_adapters()
    model = jl.use(model, "chat")
    before, out = model_snapshot(model), outputs(model)
    original = LoraModel._create_and_replace
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("forced failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(LoraModel, "_create_and_replace", failing)
    with pytest.raises(RuntimeError, match="forced failure"):
        jl.inject(model, r=4, targets="attention", name="solo", replace=True)
    assert calls["n"] == fail_at
    monkeypatch.undo()
    assert_model_unchanged(before, model)
    assert torch.equal(outputs(model), out)
    assert sorted(jl.status(model).active) == ["chat"]
    # still usable: the same call now succeeds
    assert list(jl.inject(model, r=4, targets="attention", name="solo", replace=True).peft_config) == ["solo"]
