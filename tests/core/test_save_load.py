"""Saving and loading: PEFT format both ways, named adapters, atomic replacement, switching and status."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel

import jupyter_lora as jl
from jupyter_lora.core.adapters import files
from jupyter_lora.display import status_html, status_text
from jupyter_lora.testing import tiny_inputs, tiny_model


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _trained(arch="llama", seed=1, **settings):
    model = jl.inject(tiny_model(arch), r=4, **settings)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_saved_adapter_loads_with_plain_peft(tmp_path):
    model = _trained(targets="all-linear")
    inputs = tiny_inputs(model)
    path = jl.save(model, tmp_path / "run1")
    assert (path / "adapter_model.safetensors").exists()
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]  # fmt: skip
    peft = PeftModel.from_pretrained(tiny_model("llama"), str(path))
    assert torch.allclose(_logits(peft, inputs), _logits(model, inputs), atol=1e-5)


def test_adapter_made_with_plain_peft_loads_here(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(tiny_model("gpt2"), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    peft.save_pretrained(str(tmp_path / "p"))
    inputs = tiny_inputs(peft)
    loaded = jl.load(tiny_model("gpt2"), tmp_path / "p", name="imported")
    assert jl.status(loaded).active == ("imported",)
    assert torch.allclose(_logits(loaded, inputs), _logits(peft, inputs), atol=1e-5)


def test_named_adapters_save_switch_and_load(tmp_path):
    model = _trained(targets="q_proj")
    inputs = tiny_inputs(model)
    first = _logits(model, inputs)
    model = jl.inject(model, r=2, targets="v_proj", name="second")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.second" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    second = _logits(model, inputs)
    assert not torch.allclose(first, second)
    jl.save(model, tmp_path / "second")  # the active one
    jl.save(model, tmp_path / "first", name="default")
    assert json.loads((tmp_path / "second" / "adapter_config.json").read_text())["r"] == 2

    jl.use(model, "default")
    assert torch.allclose(_logits(model, inputs), first, atol=1e-6)
    jl.disable(model)
    assert torch.allclose(_logits(model, inputs), _logits(tiny_model("llama"), inputs), atol=1e-6)
    jl.enable(model)
    assert torch.allclose(_logits(model, inputs), first, atol=1e-6)

    fresh = jl.load(tiny_model("llama"), tmp_path / "first", name="a")
    fresh = jl.load(fresh, tmp_path / "second", name="b")
    assert jl.status(fresh).active == ("b",)
    assert torch.allclose(_logits(fresh, inputs), second, atol=1e-5)
    jl.use(fresh, "a")
    assert torch.allclose(_logits(fresh, inputs), first, atol=1e-5)
    jl.delete(fresh, "b")
    assert list(fresh.peft_config) == ["a"]


def test_load_under_an_existing_name_replaces_it(tmp_path):
    model = _trained(targets="q_proj")
    jl.save(model, tmp_path / "a")
    other = _trained(targets="v_proj", seed=9)
    inputs = tiny_inputs(model)
    replaced = jl.load(other, tmp_path / "a")
    assert list(replaced.peft_config) == ["default"]
    assert torch.allclose(_logits(replaced, inputs), _logits(model, inputs), atol=1e-5)
    assert not any(n.endswith("v_proj") for n, m in replaced.named_modules() if hasattr(m, "lora_A"))


def test_loaded_adapter_is_trainable_unless_asked(tmp_path):
    jl.save(_trained(targets="q_proj"), tmp_path / "a")
    loaded = jl.load(tiny_model("llama"), tmp_path / "a")
    assert loaded.get_nb_trainable_parameters()[0] > 0
    frozen = jl.load(tiny_model("llama"), tmp_path / "a", trainable=False)
    assert frozen.get_nb_trainable_parameters()[0] == 0


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_save_replaces_an_earlier_save_in_one_step(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = tmp_path / "adapter"
    jl.save(_trained(targets="q_proj"), target)
    model = _trained(targets="v_proj", seed=3)
    jl.save(model, target)
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["target_modules"] == ["v_proj"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"], "no staging or backup directories left behind"


def test_merged_save_is_a_full_model_and_leaves_the_live_model_adapted(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _trained(targets="all-linear")
    inputs = tiny_inputs(model)
    before = _logits(model, inputs)
    path = jl.save(model, tmp_path / "merged", merged=True)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert not (path / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(path))
    assert torch.allclose(_logits(merged, inputs), before, atol=1e-4)
    assert torch.equal(_logits(model, inputs), before)
    assert jl.status(model).adapters[0].name == "default"


def test_status_reports_adapters_and_counts():
    plain = tiny_model("llama")
    s = jl.status(plain)
    assert s.adapters == () and "No LoRA adapter" in status_text(s)
    model = jl.inject(plain, r=4, targets="attention")
    model = jl.inject(model, r=2, targets="mlp", name="mlp-only", variant="dora")
    s = jl.status(model)
    assert [a.name for a in s.adapters] == ["default", "mlp-only"]
    assert s.active == ("mlp-only",)
    dora = s.adapters[1]
    assert (dora.variant, dora.r, dora.modules) == ("dora", 2, 6)
    assert (s.trainable_params, s.total_params) == model.get_nb_trainable_parameters()
    assert s.enabled is True and s.merged == ()
    assert len(s.layers) == 14
    assert "mlp-only" in status_text(s) and "<table" in status_html(s)


def test_unload_returns_the_original_base():
    base = tiny_model("bert")
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = _trained("bert", targets="query")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(1.0)
    unloaded = jl.unload(model)
    assert type(unloaded).__name__ == "BertForSequenceClassification"
    state = unloaded.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_a_named_adapter_is_saved_with_its_model_card(tmp_path):
    model = jl.inject(tiny_model("llama"), r=4, name="style")
    target = jl.save(model, tmp_path / "style")
    assert (target / "README.md").is_file() and (target / "adapter_config.json").is_file()
    assert not (target / "style").exists()


def test_status_shows_rank_and_alpha_patterns_and_layers_of_a_loaded_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    from jupyter_lora.display import render_text

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 8},
                        alpha_pattern={"v_proj": 2.5}, layers_to_transform=[0], layers_pattern="layers")  # fmt: skip
    get_peft_model(tiny_model("llama"), config).save_pretrained(tmp_path / "peft")
    loaded = jl.load(tiny_model("llama"), tmp_path / "peft")
    info = jl.status(loaded).adapters[0]
    assert (info.rank_pattern, info.alpha_pattern, info.layers) == ({"q_proj": 8}, {"v_proj": 2.5}, (0,))
    text = render_text(jl.status(loaded))
    assert "4 (q_proj: 8)" in text and "8 (v_proj: 2.5)" in text and "(layers 0)" in text


def test_an_adapter_limited_to_some_layers_is_saved_with_peft_layer_settings(tmp_path):
    import json

    from peft import PeftModel

    model = jl.inject(tiny_model("llama"), r=4, targets="q_proj, v_proj", layers=[0])
    randomize = next(p for n, p in model.named_parameters() if "lora_B" in n)
    torch.nn.init.normal_(randomize)
    config = json.loads((jl.save(model, tmp_path / "a") / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert (config["layers_to_transform"], config["layers_pattern"]) == ([0], "layers")
    inputs = tiny_inputs(model)
    plain = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, model(**inputs).logits)
    assert jl.status(model).adapters[0].modules == 2
