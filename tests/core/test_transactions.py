"""Adapter operations are all-or-nothing: a failure forced half-way through PEFT's work leaves the model (and the
files on disk) exactly as they were, and the original exception reaches the caller.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import peft.peft_model
import pytest
import torch
import transformers.modeling_utils
from model_state import tree_snapshot
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.model import LoraModel
from torch import nn

import jupyter_lora as jl
from jupyter_lora.core.adapters import files as adapter_files
from jupyter_lora.core.modelinfo import base_model_of
from jupyter_lora.testing import tiny_inputs, tiny_model

# ----------------------------------------------------------------------------------------------- helpers


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Weights (keys and values), module classes per path, requires_grad per parameter, the transformers
    config, and for a PeftModel its adapters and the active one."""
    snap: dict[str, Any] = {
        "class": type(model).__name__,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": tuple((name, type(m).__name__) for name, m in model.named_modules()),
        "grads": tuple((name, p.requires_grad) for name, p in model.named_parameters()),
        "config": base_model_of(model).config.to_dict(),
    }
    if isinstance(model, peft.peft_model.PeftModel):
        snap["peft_config"] = tuple(model.peft_config)
        snap["active"] = model.active_adapter
        snap["layer_active"] = tuple(
            (name, tuple(m.active_adapters), tuple(m.merged_adapters))
            for name, m in model.named_modules()
            if isinstance(m, LoraLinear)
        )
    return snap


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def assert_same(before: dict[str, Any], model: nn.Module, *, grads: bool = True, config: bool = True) -> None:
    after = snapshot(model)
    assert after["class"] == before["class"]
    assert after["modules"] == before["modules"], "module tree changed"
    if grads:
        assert after["grads"] == before["grads"], "requires_grad changed"
    assert list(after["state"]) == list(before["state"]), "state_dict keys changed"
    changed = [k for k, v in before["state"].items() if not _identical(v, after["state"][k])]
    assert not changed, f"weights changed: {changed}"
    if config:
        assert after["config"] == before["config"], "model config changed"
    for key in ("peft_config", "active", "layer_active"):
        assert after.get(key) == before.get(key), f"{key} changed"


def outputs(model: nn.Module) -> torch.Tensor:
    inputs = tiny_inputs(base_model_of(model))
    with torch.no_grad():
        return model(**inputs).logits


def perturb_lora(model: nn.Module, seed: int = 1) -> None:
    """Make every adapter non-zero (lora_B starts at zero), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def fail_on_call(monkeypatch, owner: Any, attr: str, n: int, before=None) -> dict[str, int]:
    """Replace ``owner.attr`` with a wrapper that raises RuntimeError on its ``n``-th call (after running
    ``before(*args, **kwargs)`` if given, to do part of the work first)."""
    original = getattr(owner, attr)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            if before is not None:
                before(original, *args, **kwargs)
            raise RuntimeError(f"forced failure in {attr} (call {n})")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)
    return calls


def lora(model: nn.Module, **settings: Any) -> nn.Module:
    settings.setdefault("r", 4)
    settings.setdefault("targets", "q_proj,k_proj,v_proj,o_proj")
    return jl.inject(model, **settings)


# ----------------------------------------------------------------------------------------------- inject


def test_inject_failing_half_way_leaves_plain_model(monkeypatch):
    model = tiny_model("llama")
    before, out = snapshot(model), outputs(model)
    calls = fail_on_call(monkeypatch, LoraModel, "_create_and_replace", 3)
    with pytest.raises(RuntimeError, match="forced failure"):
        lora(model)
    assert calls["n"] == 3  # it really failed half-way (8 modules targeted)
    assert_same(before, model)
    assert torch.equal(outputs(model), out)
    assert jl.status(model).adapters == ()
    monkeypatch.undo()
    # still usable: a later inject works and wraps the untouched base
    adapted = lora(model)
    assert len(jl.status(adapted).adapters) == 1
    assert torch.allclose(outputs(adapted), out)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_rewriting_init_failing_half_way_restores_base_weights(monkeypatch, init):
    """PiSSA/OLoRA rewrite each targeted base weight in place as its layer is created: a failure on the third
    layer must put the first two weights back."""
    model = tiny_model("llama")
    before, out = snapshot(model), outputs(model)
    calls = fail_on_call(monkeypatch, LoraModel, "_create_and_replace", 3)
    with pytest.raises(RuntimeError, match="forced failure"):
        lora(model, init=init)
    assert calls["n"] == 3
    assert_same(before, model)
    assert torch.equal(outputs(model), out)


def test_reinject_failing_half_way_keeps_old_adapter(monkeypatch):
    model = lora(tiny_model("llama"), targets="q_proj,v_proj")
    perturb_lora(model)
    before, out = snapshot(model), outputs(model)
    calls = fail_on_call(monkeypatch, LoraModel, "_create_and_replace", 3)
    with pytest.raises(RuntimeError, match="forced failure"):
        lora(model, r=8, targets="q_proj,k_proj,v_proj")  # same name: replaces "default"
    assert calls["n"] == 3
    assert_same(before, model)
    assert torch.equal(outputs(model), out)
    assert [a.name for a in jl.status(model).adapters] == ["default"]


def test_reinject_one_of_two_failing_half_way(monkeypatch):
    model = lora(tiny_model("llama"), name="chat")
    model = lora(model, name="code", targets="q_proj,v_proj")
    perturb_lora(model)
    model = jl.use(model, "chat")
    before, out = snapshot(model), outputs(model)
    calls = fail_on_call(monkeypatch, LoraModel, "_create_and_replace", 2)
    with pytest.raises(RuntimeError, match="forced failure"):
        lora(model, name="chat", r=8)  # delete "chat" (active), add it anew: fails half-way
    assert calls["n"] == 2
    assert_same(before, model)
    assert torch.equal(outputs(model), out)


def test_second_adapter_failing_half_way(monkeypatch):
    model = lora(tiny_model("llama"))
    perturb_lora(model)
    before, out = snapshot(model), outputs(model)
    calls = fail_on_call(monkeypatch, LoraModel, "_create_and_replace", 2)
    with pytest.raises(RuntimeError, match="forced failure"):
        lora(model, name="chat")
    assert calls["n"] == 2
    assert_same(before, model)
    assert torch.equal(outputs(model), out)
    assert "chat" not in model.peft_config
    monkeypatch.undo()
    assert "chat" in lora(model, name="chat").peft_config


# ----------------------------------------------------------------------------------------------- merge


def test_merge_failing_half_way(monkeypatch):
    model = lora(tiny_model("llama"))
    perturb_lora(model)
    before, out = snapshot(model), outputs(model)
    base_weights = {
        n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and "base_layer" in n
    }
    calls = fail_on_call(monkeypatch, LoraLinear, "merge", 2)
    with pytest.raises(RuntimeError, match="forced failure"):
        jl.merge(model)
    assert calls["n"] == 2  # the first layer was merged before the failure
    assert_same(before, model)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in base_weights.items())
    assert torch.allclose(outputs(model), out)
    assert jl.status(model).merged == ()
    monkeypatch.undo()
    assert torch.allclose(outputs(jl.merge(model)), out, atol=1e-5)


def test_merge_of_diverged_adapter_fails_cleanly():
    """A real half-way failure: PEFT's safe merge refuses NaN weights in the second layer."""
    model = lora(tiny_model("llama"))
    perturb_lora(model)
    second = [m for m in model.modules() if isinstance(m, LoraLinear)][1]
    with torch.no_grad():
        second.lora_B["default"].weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN"):
        jl.merge(model)
    assert_same(before, model)


# ----------------------------------------------------------------------------------------------- load


def _half_then_fail(original, model, state, *args, **kwargs):
    keys = sorted(state)
    original(model, {k: state[k] for k in keys[: len(keys) // 2]}, *args, **kwargs)


@pytest.mark.parametrize("start", ["plain", "replace-only", "add-second", "replace-one-of-two"])
def test_load_failing_half_way(monkeypatch, tmp_path, start):
    donor = lora(tiny_model("llama"))
    perturb_lora(donor, seed=7)
    jl.save(donor, tmp_path / "adapter")

    model = tiny_model("llama")
    name = "default"
    if start != "plain":
        model = lora(model)
        perturb_lora(model)
    if start == "add-second":
        name = "chat"
    if start == "replace-one-of-two":
        model = lora(model, name="chat", targets="q_proj,v_proj")
        perturb_lora(model, seed=3)
        name = "chat"
    before, out = snapshot(model), outputs(model)
    files = tree_snapshot(tmp_path)

    calls = fail_on_call(monkeypatch, peft.peft_model, "set_peft_model_state_dict", 1, before=_half_then_fail)
    with pytest.raises(RuntimeError, match="forced failure"):
        jl.load(model, tmp_path / "adapter", name=name)
    assert calls["n"] == 1
    assert_same(before, model)
    assert torch.equal(outputs(model), out)
    assert tree_snapshot(tmp_path) == files


# ----------------------------------------------------------------------------------------------- save


def _partial_write(original, tensors, filename, *args, **kwargs):
    Path(filename).write_bytes(b"\x00" * 100)  # a torn file, as a full disk would leave


@pytest.mark.parametrize("adapter", ["default", "chat"])
def test_save_failing_half_way_keeps_previous_save(monkeypatch, tmp_path, adapter):
    model = lora(tiny_model("llama"), name=adapter)
    target = tmp_path / "run1"
    jl.save(model, target)
    perturb_lora(model)  # the next save would write different bytes
    files = tree_snapshot(tmp_path)
    before = snapshot(model)

    calls = fail_on_call(monkeypatch, peft.peft_model, "safe_save_file", 1, before=_partial_write)
    with pytest.raises(RuntimeError, match="forced failure"):
        jl.save(model, target)
    assert calls["n"] == 1
    assert (
        tree_snapshot(tmp_path) == files
    )  # previous save byte-identical, no '.run1.saving-*' left beside it
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    assert_same(before, model)


def test_save_failing_at_install_keeps_previous_save(monkeypatch, tmp_path):
    """The final swap fails (no RENAME_EXCHANGE, then the second rename fails): the old save comes back."""
    model = lora(tiny_model("llama"))
    target = tmp_path / "run1"
    jl.save(model, target)
    perturb_lora(model)
    files = tree_snapshot(tmp_path)
    monkeypatch.setattr(adapter_files, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if Path(dst) == target and Path(src).name.startswith(".run1.saving-"):
            raise RuntimeError("forced failure in rename")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(RuntimeError, match="forced failure"):
        jl.save(model, target)
    monkeypatch.undo()
    assert tree_snapshot(tmp_path) == files
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_merged_save_failing_half_way(monkeypatch, tmp_path):
    target = tmp_path / "merged"
    earlier = lora(tiny_model("llama"))
    perturb_lora(earlier, seed=2)
    jl.save(earlier, target, merged=True)  # an earlier merged save at the same path
    model = lora(tiny_model("llama"))
    perturb_lora(model)
    files = tree_snapshot(tmp_path)
    before, out = snapshot(model), outputs(model)
    calls = fail_on_call(monkeypatch, transformers.modeling_utils, "safe_save_file", 1, before=_partial_write)
    with pytest.raises(RuntimeError, match="forced failure"):
        jl.save(model, target, merged=True)
    assert calls["n"] == 1
    # still adapted, nothing merged (transformers records `architectures`/`dtype` in the config before writing)
    assert_same(before, model, config=False)
    assert torch.equal(outputs(model), out)
    assert tree_snapshot(tmp_path) == files


def test_merged_save_leaves_live_model_adapted(tmp_path):
    model = lora(tiny_model("llama"))
    perturb_lora(model)
    before, out = snapshot(model), outputs(model)
    jl.save(model, tmp_path / "merged", merged=True)
    # (transformers' save_pretrained records `architectures` and `dtype` in the live config, as for any save)
    assert_same(before, model, config=False)
    assert torch.equal(outputs(model), out)
    assert jl.status(model).merged == ()
    assert sorted(os.listdir(tmp_path)) == ["merged"]
    # and the files hold the merged model: same outputs without any adapter
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, LoraLinear) for m in reloaded.modules())
    assert torch.allclose(outputs(reloaded), out, atol=1e-5)
    # the live model keeps training: its adapter is still trainable, its base frozen
    grads = dict(before["grads"])
    assert any(v for n, v in grads.items() if "lora_" in n)
    assert not any(v for n, v in grads.items() if "base_layer" in n)


# ----------------------------------------------------------------------------------------------- unload


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_unload_gives_back_the_original_model(arch):
    model = tiny_model(arch)
    targets = {"llama": "q_proj,v_proj", "gpt2": "c_attn", "bert": "query,value"}[arch]
    original = snapshot(model)
    original_out = outputs(model)
    adapted = jl.inject(model, r=4, targets=targets)
    if arch == "bert":
        # SEQ_CLS: the classifier head is trained as a full copy (modules_to_save)
        assert "classifier" in adapted.peft_config["default"].modules_to_save
    perturb_lora(adapted)  # lora_B and the trained head copy now differ from the original
    assert not torch.allclose(outputs(adapted), original_out)

    base = jl.unload(adapted)
    assert base is model
    assert_same(original, base, grads=False)
    assert torch.equal(outputs(base), original_out)
    if arch == "gpt2":
        assert base.lm_head.weight is base.transformer.wte.weight  # tying survives


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_unload_restores_requires_grad(arch):
    """``unload`` promises the base model 'exactly as it was before inject': PEFT froze every base
    parameter on inject, and the user's model must come back trainable as it was."""
    model = tiny_model(arch)
    original = snapshot(model)
    adapted = jl.inject(model, r=4, targets="q_proj,v_proj" if arch == "llama" else "query,value")
    base = jl.unload(adapted)
    frozen = [
        n for (n, g), (_, g0) in zip(snapshot(base)["grads"], original["grads"], strict=True) if g != g0
    ]
    assert not frozen, f"requires_grad differs after unload for {len(frozen)} parameters, e.g. {frozen[:3]}"


def test_unload_failing_half_way(monkeypatch):
    model = lora(tiny_model("bert"), targets="query,value")
    perturb_lora(model)
    before, out = snapshot(model), outputs(model)
    calls = fail_on_call(monkeypatch, LoraModel, "_replace_module", 2)
    with pytest.raises(RuntimeError, match="forced failure"):
        jl.unload(model)
    assert calls["n"] == 2
    assert_same(before, model)
    assert torch.equal(outputs(model), out)
