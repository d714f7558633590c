"""Plans: exact counts for every layer kind and variant, bytes on disk, multiple adapters, nothing touched."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import jupyter_lora as jl
from jupyter_lora.display import plan_html, plan_text
from jupyter_lora.testing import tiny_inputs, tiny_model


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


CASES = [
    ("llama", dict(targets="all-linear")),
    ("llama", dict(targets="attention", variant="dora")),
    ("llama", dict(targets="all-linear", variant="rslora", alpha=8)),
    ("llama", dict(targets="embed_tokens, lm_head")),
    ("llama", dict(targets="embed_tokens", variant="dora")),
    ("gpt2", dict(targets="all-linear", bias="lora_only")),
    ("gpt2", dict(targets="c_attn", variant="dora")),
    ("opt", dict(targets="all-linear", bias="all")),
    ("vit", dict(targets="patch_embeddings.projection, q_proj", variant="dora")),
    ("vit", dict(targets="patch_embeddings.projection")),
    ("bert", dict(targets="query, value", modules_to_save="pooler")),
    ("t5", dict(targets="q, v", layers="1")),
    ("falcon", dict(targets="query_key_value", dropout=0.1, init="gaussian")),
]


@pytest.mark.parametrize(
    ("arch", "settings"), CASES, ids=[f"{a}-{'-'.join(map(str, s.values()))}" for a, s in CASES]
)
def test_counts_and_bytes_match_peft(arch, settings, tmp_path):
    model = tiny_model(arch)
    planned = jl.plan(model, r=4, **settings)
    adapted = jl.inject(model, r=4, **settings)
    assert (planned.trainable_params, planned.total_params) == adapted.get_nb_trainable_parameters()
    path = jl.save(adapted, tmp_path / "a")
    size = os.path.getsize(path / "adapter_model.safetensors")
    if settings.get("bias") == "all":
        assert abs(size - planned.adapter_bytes) / size < 0.03
    else:
        assert size == planned.adapter_bytes


def test_conv_with_groups():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, groups=2)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    planned = jl.plan(Net(), r=4, targets="conv")
    adapted = jl.inject(Net(), r=4, targets="conv")
    assert (planned.trainable_params, planned.total_params) == adapted.get_nb_trainable_parameters()


def test_plan_touches_nothing():
    model = tiny_model("bert")
    state, types = _snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    jl.plan(model, r=8, targets="all-linear", variant="dora", bias="all")
    after_state, after_types = _snapshot(model)
    assert types == after_types
    assert all(torch.equal(state[k], after_state[k]) for k in state)
    assert flags == [p.requires_grad for p in model.parameters()]


def test_alpha_default_and_scaling():
    model = tiny_model("llama")
    p = jl.plan(model, r=8)
    assert p.spec.lora_alpha == 16 and p.spec.scaling == 2
    p = jl.plan(model, r=16, alpha=16, variant="rslora")
    assert p.spec.scaling == pytest.approx(4.0)
    config = p.to_peft_config()
    assert config.use_rslora and config.r == 16 and config.lora_alpha == 16


def test_plan_on_adapted_model_counts_other_adapters_and_replacement():
    model = jl.inject(tiny_model("llama"), r=4, targets="q_proj")
    second = jl.plan(model, r=2, targets="v_proj", name="second")
    assert not second.replaces
    model = jl.inject(model, r=2, targets="v_proj", name="second")
    assert (second.trainable_params, second.total_params) == model.get_nb_trainable_parameters()
    again = jl.plan(model, r=8, targets="all-linear", name="default")
    assert again.replaces
    model = jl.inject(model, r=8, targets="all-linear", name="default")
    assert (again.trainable_params, again.total_params) == model.get_nb_trainable_parameters()
    assert set(model.peft_config) == {"default", "second"}


def test_reinject_replaces_instead_of_stacking():
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    adapted = jl.inject(model, r=4, targets="q_proj")
    again = jl.inject(adapted, r=8, targets="v_proj")
    assert type(again).__name__.startswith("PeftModel")
    assert type(again.base_model.model).__name__ == "LlamaForCausalLM", "never a PeftModel inside a PeftModel"
    lora_layers = [n for n, m in again.named_modules() if hasattr(m, "lora_A")]
    assert all(n.endswith("v_proj") for n in lora_layers) and len(lora_layers) == 2
    assert again.peft_config["default"].r == 8
    # Passing the old base reference again finds its wrapper instead of wrapping twice.
    third = jl.inject(model, r=2, targets="q_proj")
    assert type(third.base_model.model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.allclose(third(**inputs).logits, tiny_model("llama")(**inputs).logits, atol=1e-6)


def test_groups_and_rendering():
    p = jl.plan(tiny_model("distilbert"), r=4, targets="attention")
    groups = {g.name: g for g in p.groups()}
    assert groups["q_lin"].count == 2 and groups["q_lin"].params == 2 * 4 * (32 + 32)
    assert groups["pre_classifier"].role == "modules_to_save"
    text = plan_text(p)
    assert "trainable" in text and "q_lin" in text and "pre_classifier" in text
    html = plan_html(p)
    assert "<table" in html and "q_lin" in html


def test_user_strings_are_escaped_in_html():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("x<b>", nn.Linear(4, 4))

    html = plan_html(jl.plan(Net(), targets="re:x<b>"))
    assert "x&lt;b&gt;" in html and "x<b>" not in html


def test_meta_model_plan_needs_no_weights():
    model = tiny_model("llama", meta=True)
    p = jl.plan(model, r=16, targets="all-linear")
    assert p.is_meta and p.trainable_params > 0
    assert all(t.is_meta for t in model.parameters())
