"""Merging and unloading give exact results without copying the model: a merge that fails part-way is undone bit
for bit while keeping only a small undo record, PiSSA/OLoRA's rewritten base weights come back bit for bit on
unload, a stale adapted model (one a later operation replaced) is refused, and an adapter too large for the free
memory is refused before anything is allocated.
"""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from model_state import tree_snapshot
from peft.tuners.lora.model import LoraModel
from torch import nn
from torch.profiler import ProfilerActivity, profile

import jupyter_lora as jl
from jupyter_lora.core.adapters import guards, merging
from jupyter_lora.core.adapters.peft_facts import wrapper_for
from jupyter_lora.core.errors import UsageError
from jupyter_lora.core.modelinfo import base_model_of
from jupyter_lora.core.transaction import BitPatch
from jupyter_lora.testing import tiny_inputs, tiny_model, tiny_tokenizer

_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# ----------------------------------------------------------------------------------------------- helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t`` (so that -0.0 ≠ 0.0 and NaN payloads count)."""
    t = t.detach().contiguous()
    return t.view(_INTS[t.element_size()]) if t.dtype.is_floating_point else t


def state_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: bits(v).clone() for k, v in model.state_dict().items()}


def differing(before: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    after = state_bits(model)
    assert list(after) == list(before), "state_dict keys changed"
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


def base_state_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    """Bits of every base tensor of an adapted (or plain) model, named as in the plain model."""
    base = base_model_of(model)
    return {
        k.replace(".base_layer.", "."): bits(v).clone()
        for k, v in base.state_dict().items()
        if "lora_" not in k and ".modules_to_save." not in k
    }


def perturb_lora(model: nn.Module, scale: float = 0.5, seed: int = 1) -> None:
    """Make every adapter non-zero (lora_B starts at zero), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def adapted(dtype: torch.dtype = torch.float32, arch: str = "llama", **settings: Any) -> nn.Module:
    settings.setdefault("r", 4)
    settings.setdefault("targets", "all-linear")
    model = jl.inject(tiny_model(arch).to(dtype), **settings)
    perturb_lora(model)
    return model


def peak_allocated(fn) -> int:
    """The most bytes that torch had allocated on the CPU, above what it held before, while ``fn()`` ran."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def fail_on_call(
    monkeypatch, owner: Any, attr: str, n: int, error: type[BaseException] = RuntimeError
) -> dict:
    """Replace ``owner.attr`` with a wrapper that raises ``error`` on its ``n``-th call."""
    original = getattr(owner, attr)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error(f"forced failure in {attr} (call {n})")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)
    return calls


# ----------------------------------------------------------------------------------------------- BitPatch


def _recomputed(original: torch.Tensor, kind: str) -> torch.Tensor:
    """What an inverse computation might give back for ``original``."""
    g = torch.Generator().manual_seed(0)
    if kind == "add-subtract":  # (w + d) - d: a few elements lose a bit
        d = (torch.randn(original.shape, generator=g) * 0.3).to(original.dtype)
        return (original + d) - d
    if kind == "identical":
        return original.clone()
    out = original.clone()
    flat = out.view(-1)
    if kind == "signed-zero-and-nan":
        flat[0] = 0.0  # the original holds -0.0 there
        flat[1] = float("nan")
        flat[2] = -flat[2]  # a sign flip: a huge difference of bit patterns
        flat[-1] = 1e4
    if kind == "unrelated":  # denser than a copy
        return torch.randn(original.shape, generator=g).to(original.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(7,), (300, 700)], ids=["small", "spans-segments"])
@pytest.mark.parametrize("kind", ["add-subtract", "identical", "signed-zero-and-nan", "unrelated"])
def test_bit_patch_restores_the_exact_bits(dtype, shape, kind):
    g = torch.Generator().manual_seed(1)
    original = torch.randn(shape, generator=g).to(dtype)
    original.view(-1)[0] = -0.0
    recomputed = _recomputed(original, kind)
    patch = BitPatch.between(original, recomputed)
    if kind == "identical":
        assert patch is None
        return
    assert patch is not None
    patch.apply(recomputed)
    assert torch.equal(bits(recomputed), bits(original))


def test_bit_patch_of_a_near_miss_is_small():
    original = torch.randn(512, 512, generator=torch.Generator().manual_seed(2))
    d = original * 0.01
    patch = BitPatch.between(original, (original + d) - d)
    assert 0 < patch.nbytes < original.numel() * original.element_size() * 0.05


# ----------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize(
    "arch, dtype",
    [("llama", torch.float32), ("llama", torch.bfloat16), ("gpt2", torch.float32)],
    ids=["llama-fp32", "llama-bf16", "gpt2-fan_in_fan_out"],
)
def test_merge_gives_the_weights_peft_merge_gives(arch, dtype):
    targets = {"llama": "all-linear", "gpt2": "c_attn,c_proj,c_fc"}[arch]
    ours = jl.merge(adapted(dtype, arch, targets=targets))
    theirs = adapted(dtype, arch, targets=targets).merge_and_unload(safe_merge=True)
    assert differing(state_bits(theirs), ours) == []


def test_merge_keeps_no_copy_of_the_targeted_weights():
    """Undoing a failed merge must not cost a copy of every targeted weight (on a GPU model: host memory the
    size of the model): the merge works in blocks and keeps only the bits subtraction cannot give back."""
    model = jl.inject(
        tiny_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=6),
        r=4,
        targets="all-linear",
    )
    perturb_lora(model, scale=0.02)
    targeted = sum(
        m.get_base_layer().weight.numel() * m.get_base_layer().weight.element_size()
        for m in model.modules()
        if isinstance(m, peft.tuners.lora.layer.LoraLayer)
    )
    peak = peak_allocated(lambda: jl.merge(model))
    assert peak < 0.5 * targeted, (
        f"merge allocated {peak:,} bytes at its peak; the targeted weights are {targeted:,}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_failing_after_every_layer_is_folded_is_undone_bit_for_bit(monkeypatch, dtype):
    """The failure comes when every update has been added: each weight has to come back from (w + d) - d, which
    loses bits (checked below), plus the kept patch."""
    model = adapted(dtype)
    before = state_bits(model)
    theirs = adapted(dtype)
    theirs.merge_and_unload(safe_merge=True)
    layer = next(m for m in model.modules() if isinstance(m, peft.tuners.lora.layer.Linear))
    delta = layer.get_delta_weight("default").to(dtype)
    merged = next(m for m in theirs.modules() if isinstance(m, nn.Linear) and m.weight.shape == delta.shape)
    assert not torch.equal(bits(merged.weight - delta), bits(layer.get_base_layer().weight)), (
        "nothing was lost"
    )

    calls = fail_on_call(monkeypatch, LoraModel, "_unload_and_optionally_merge", 1)
    with pytest.raises(RuntimeError, match="forced failure"):
        jl.merge(model)
    assert calls["n"] == 1
    assert differing(before, model) == []
    assert jl.status(model).merged == ()


def test_merge_interrupted_inside_a_layer_is_undone_bit_for_bit(monkeypatch):
    """An interrupt (Ctrl-C) between two blocks of one layer: the blocks written so far are taken out again."""
    monkeypatch.setattr(merging, "_BLOCK", 256)  # several blocks per layer
    model = adapted()
    before = state_bits(model)
    calls = fail_on_call(monkeypatch, BitPatch, "between", 11, error=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        jl.merge(model)
    assert calls["n"] == 11
    assert differing(before, model) == []


def test_save_merged_leaves_the_model_bit_for_bit(tmp_path):
    model = adapted(torch.bfloat16)
    before = state_bits(model)
    jl.save(model, tmp_path / "merged", merged=True)
    assert differing(before, model) == []


# ----------------------------------------------------------------------------------------------- PiSSA / OLoRA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_unload_gives_back_every_base_tensor_after_a_weight_rewriting_init(init, dtype):
    model = tiny_model("llama").to(dtype)
    original = state_bits(model)
    out = model(**tiny_inputs(model)).logits
    adapted_model = jl.inject(model, r=4, init=init, targets="all-linear")
    rewritten = [k for k, v in base_state_bits(adapted_model).items() if not torch.equal(v, original[k])]
    assert rewritten, f"{init} rewrote no base weight: nothing to test"
    perturb_lora(adapted_model)  # training changes the adapter, not what unload must give back
    base = jl.unload(adapted_model)
    assert base is model
    assert differing(original, base) == []
    assert torch.equal(base(**tiny_inputs(base)).logits, out)


def test_reinject_after_pissa_starts_from_the_original_base():
    model = tiny_model("llama")
    original = state_bits(model)
    first = jl.inject(model, r=4, init="pissa")
    second = jl.inject(first, r=8)  # replaces the PiSSA adapter: default init on the original weights
    assert all(torch.equal(v, original[k]) for k, v in base_state_bits(second).items())
    assert differing(original, jl.unload(second)) == []


def test_loading_over_a_pissa_adapter_of_the_same_name_gives_back_its_base_weights(tmp_path):
    model = tiny_model("llama")
    original = state_bits(model)
    jl.save(jl.inject(tiny_model("llama"), r=4), tmp_path / "plain")
    both = jl.inject(jl.inject(model, r=4, name="plain"), r=4, init="pissa", name="principal")
    jl.load(both, tmp_path / "plain", name="principal")  # replaces the PiSSA adapter by name
    assert all(torch.equal(v, original[k]) for k, v in base_state_bits(both).items())
    assert differing(original, jl.unload(both)) == []


def test_delete_gives_back_the_base_weights_of_a_pissa_adapter():
    model = tiny_model("llama")
    original = state_bits(model)
    both = jl.inject(jl.inject(model, r=4, name="plain"), r=4, init="pissa", name="principal")
    jl.delete(both, "principal")
    assert all(torch.equal(v, original[k]) for k, v in base_state_bits(both).items())


def test_delete_refuses_an_adapter_whose_weights_a_later_one_rewrote_again():
    model = jl.inject(
        jl.inject(tiny_model("llama"), r=4, init="pissa", name="first"), r=4, init="olora", name="second"
    )
    before = state_bits(model)
    with pytest.raises(UsageError, match="remove 'second' first"):
        jl.delete(model, "first")
    assert differing(before, model) == []


def test_reinject_after_pissa_failing_half_way_keeps_the_residual(monkeypatch):
    """Re-injecting first gives the original weights back, then PEFT fails: the PiSSA model must come back as it
    was, residual weights included."""
    model = jl.inject(tiny_model("llama"), r=4, init="pissa")
    perturb_lora(model)
    before = state_bits(model)
    calls = fail_on_call(monkeypatch, LoraModel, "_create_and_replace", 3)
    with pytest.raises(RuntimeError, match="forced failure"):
        jl.inject(model, r=8)
    assert calls["n"] == 3
    assert differing(before, model) == []
    monkeypatch.undo()
    original_model = tiny_model("llama")
    assert differing(state_bits(original_model), jl.unload(model)) == []


def test_merge_of_pissa_adapter_keeps_the_residual_plus_the_adapter():
    model = jl.inject(tiny_model("llama"), r=4, init="pissa")
    perturb_lora(model, scale=0.05)
    inputs = tiny_inputs(base_model_of(model))
    with torch.no_grad():
        out = model(**inputs).logits
        merged = jl.merge(model)
        assert torch.allclose(merged(**inputs).logits, out, atol=1e-5)


# ----------------------------------------------------------------------------------------------- stale models


def _reinject(old: nn.Module) -> nn.Module:
    return jl.inject(old, r=16)


def _unload(old: nn.Module) -> nn.Module:
    return jl.unload(old)


def _merge(old: nn.Module) -> nn.Module:
    return jl.merge(old)


OPERATIONS = {
    "save": lambda m, path: jl.save(m, path / "adapter"),
    "merge": lambda m, path: jl.merge(m),
    "train": lambda m, path: jl.train(m, ["hello world"] * 4, tokenizer=tiny_tokenizer(), steps=1, background=False,
                                      output_dir=str(path / "run")),
    "status": lambda m, path: jl.status(m),
    "inject": lambda m, path: jl.inject(m, r=2),
    "unload": lambda m, path: jl.unload(m),
    "plan": lambda m, path: jl.plan(m, r=2),
}  # fmt: skip


@pytest.mark.parametrize("op", list(OPERATIONS))
@pytest.mark.parametrize("replaced_by", [_reinject, _unload, _merge], ids=["reinject", "unload", "merge"])
def test_a_stale_adapted_model_is_refused(tmp_path, replaced_by, op):
    old = jl.inject(tiny_model("llama"), r=4)
    perturb_lora(old)
    current = replaced_by(old)
    current_state = state_bits(current)
    files = tree_snapshot(tmp_path)
    with pytest.raises(UsageError, match="out of date") as info:
        OPERATIONS[op](old, tmp_path)
    assert "\n" not in str(info.value)
    assert tree_snapshot(tmp_path) == files
    assert differing(current_state, current) == []


def test_a_peft_model_made_elsewhere_is_stale_once_reinjected():
    old = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    jl.inject(old, r=8)
    with pytest.raises(UsageError, match="out of date"):
        jl.status(old)


def test_the_model_a_reinject_returned_saves_an_adapter_that_loads(tmp_path):
    old = jl.inject(tiny_model("llama"), r=4)
    new = jl.inject(old, r=16)
    perturb_lora(new)
    jl.save(new, tmp_path / "adapter")
    loaded = jl.load(tiny_model("llama"), tmp_path / "adapter")
    assert {a.r for a in jl.status(loaded).adapters} == {16}
    inputs = tiny_inputs(base_model_of(new))
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, new(**inputs).logits, atol=1e-6)


# ----------------------------------------------------------------------------------------------- memory


def test_inject_refuses_an_adapter_that_does_not_fit(monkeypatch):
    model = tiny_model("llama")
    before = state_bits(model)
    created = fail_on_call(monkeypatch, LoraModel, "_create_and_replace", 1)
    monkeypatch.setattr(guards, "free_memory", lambda device: 1000)
    plan = jl.plan(model, r=64)
    with pytest.raises(
        UsageError, match=r"r=64 on \d+ modules needs ≈ .* on cpu, but only 1000 B is free"
    ) as info:
        jl.inject(model, r=64)
    assert "\n" not in str(info.value)
    assert created["n"] == 0, "PEFT began to build the adapter"
    assert wrapper_for(model) is None
    assert differing(before, model) == []
    assert plan.adapter_bytes > 1000


def test_inject_counts_the_host_copies_a_weight_rewriting_init_needs(monkeypatch):
    model = tiny_model("llama")
    adapter = sum(row.params * 4 for row in jl.plan(model, r=4).modules)
    monkeypatch.setattr(guards, "free_memory", lambda device: adapter + 1)
    jl.unload(jl.inject(model, r=4))  # the adapter alone fits
    with pytest.raises(UsageError, match="needs ≈"):
        jl.inject(model, r=4, init="pissa")  # plus a copy of each targeted weight does not
    assert wrapper_for(model) is None
