"""The whole 4/8-bit path on CPU with bitsandbytes: load → inject → count → train a few steps → guided merge →
reload → outputs within tolerance. (bitsandbytes' CPU kernels are slow but correct; tiny model.)"""

from __future__ import annotations

import pytest
import torch

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError
from jupyter_lora.testing import tiny_inputs, tiny_model, tiny_tokenizer

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.mark.parametrize("bits", [4, 8])
def test_load_inject_count_train_merge_reload(checkpoint, tmp_path, bits):
    from transformers import AutoModelForCausalLM

    model, info = jl.load_base(checkpoint, bits)
    assert info.bits == bits and info.dtype == "bfloat16" and info.memory_after >= info.memory_before
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Linear4bit" if bits == 4 else "Linear8bitLt") in kinds
    assert model.model.norm.weight.dtype == torch.bfloat16, "no fp32 upcast of norms"
    assert model.lm_head.weight.dtype == torch.bfloat16, "no fp32 upcast of the LM head"
    assert not any(p.requires_grad for p in model.parameters())

    planned = jl.plan(model, r=8, targets="all-linear")
    model = jl.inject(model, r=8, targets="all-linear")
    assert model.get_nb_trainable_parameters() == (planned.trainable_params, planned.total_params)
    assert planned.total_params - planned.trainable_params == sum(
        p.numel() for p in tiny_model("llama", hidden_size=64, intermediate_size=128).parameters()
    )

    run = jl.train(model, ["the quick brown fox jumps over the lazy dog."] * 16, tokenizer=tiny_tokenizer(),
                   steps=8, lr=5e-3, batch=4, eval=0, scheduler="constant", warmup=0, output_dir=str(tmp_path / "run"),
                   background=False)  # fmt: skip
    losses = [h["loss"] for h in run.history]
    assert run.state == "finished" and losses[-1] < losses[0]
    assert not model.base_model.model.is_gradient_checkpointing, (
        "checkpointing (auto-on for k-bit) turned off after"
    )

    inputs = tiny_inputs(model)
    adapted = _logits(model, inputs)
    with pytest.raises(UsageError, match="dequantize=True"):
        jl.merge(model)

    with pytest.warns(UserWarning, match="dequantised 4/8-bit base"):
        path = jl.save(model, tmp_path / "merged", merged=True)
    assert (path / "model.safetensors").exists() and not (path / "adapter_config.json").exists()
    assert torch.allclose(_logits(model, inputs), adapted, atol=2e-2), "the live model stays adapted"
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in reloaded.modules())
    scale = adapted.abs().max()
    assert (_logits(reloaded, inputs) - adapted).abs().max() < 0.03 * scale

    with pytest.warns(UserWarning, match="dequantised"):
        merged = jl.merge(model, dequantize=True)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert (_logits(merged, inputs) - adapted).abs().max() < 0.03 * scale


def test_dequantized_merge_that_does_not_fit_changes_nothing(checkpoint, monkeypatch):
    from jupyter_lora.core.adapters import merging

    model, _ = jl.load_base(checkpoint, 4)
    model = jl.inject(model, r=4)
    before = [type(m).__name__ for m in model.modules()]
    monkeypatch.setattr(merging, "_free_memory", lambda device: 1024)
    with pytest.raises(UsageError, match=r"needs .* only 1 KiB is free"):
        jl.merge(model, dequantize=True)
    assert [type(m).__name__ for m in model.modules()] == before


def test_adapter_from_a_4bit_run_loads_on_the_bf16_base(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = jl.load_base(checkpoint, 4)
    inputs = tiny_inputs(model)
    base_4bit = _logits(model, inputs)
    model = jl.inject(model, r=4, targets="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    effect_4bit = _logits(model, inputs) - base_4bit
    jl.save(model, tmp_path / "adapter")
    bf16 = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    base_bf16 = _logits(bf16, inputs)
    bf16 = jl.load(bf16, tmp_path / "adapter")
    effect_bf16 = _logits(bf16, inputs) - base_bf16
    # The adapter does the same thing on the full-precision base, up to the quantisation error of the base.
    assert effect_4bit.abs().max() > 0.1
    assert (effect_bf16 - effect_4bit).abs().max() < 0.25 * effect_4bit.abs().max()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"bits": 3}, "`bits` must be 4, 8"), ({"dtype": "fp8"}, "`dtype` must be bf16"),
     ({"quant_type": "nf5"}, "`quant_type` must be nf4 or fp4")],
    ids=["bits", "dtype", "quant-type"],
)  # fmt: skip
def test_load_base_bad_input(checkpoint, kwargs, match):
    with pytest.raises(UsageError, match=match):
        jl.load_base(checkpoint, **kwargs)


def test_load_base_missing_path_and_missing_bitsandbytes(tmp_path, checkpoint, monkeypatch):
    with pytest.raises(UsageError, match="Cannot load a model from"):
        jl.load_base(tmp_path / "nothing-here", 4)
    from jupyter_lora.core import quant

    monkeypatch.setattr(quant, "is_bnb_available", lambda: False)
    with pytest.raises(UsageError, match=r"pip install 'jupyter-lora\[qlora\]'"):
        jl.load_base(checkpoint, 4)


def test_base_magic(checkpoint):
    from IPython import get_ipython
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython() or get_ipython()
    if "jupyter_lora" not in ip.extension_manager.loaded:
        ip.extension_manager.load_extension("jupyter_lora")
    note = ip.run_line_magic("lora", f"base qmodel {checkpoint} --4bit")
    assert "4-bit nf4" in repr(note) and "memory" in repr(note)
    assert any(type(m).__name__ == "Linear4bit" for m in ip.user_ns["qmodel"].modules())
    ip.user_ns.pop("qmodel")


def test_merged_save_that_does_not_fit_on_disk_writes_nothing(checkpoint, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    model, _ = jl.load_base(checkpoint, 4)
    model = jl.inject(model, r=4)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(UsageError, match="on disk; 100 B is free"):
        jl.save(model, tmp_path / "merged", merged=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no staging directory left behind"
