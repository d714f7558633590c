"""Parameter counts, discovery and memory estimates on 4-bit and 8-bit (bitsandbytes) bases, loaded on the CPU the
way users load them: ``from_pretrained(dir, quantization_config=BitsAndBytesConfig(...))``."""

from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes")

import torch

import jupyter_lora as jl
from jupyter_lora.core.targets import index_model
from jupyter_lora.testing import tiny_config

# Hidden 64 so that every quantised weight is a whole number of 64-element 4-bit blocks.
_SIZES = dict(hidden_size=64, intermediate_size=128)
_LINEARS_PER_LAYER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _bnb_config(bits: int):
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-weight tiny Llama saved with save_pretrained; returns (directory, unquantised model)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama", **_SIZES)).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path, model


def _load(path, bits: int):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=_bnb_config(bits), device_map="cpu")


@pytest.fixture(params=[4, 8], ids=["4bit", "8bit"])
def bits(request):
    return request.param


def test_quantised_load_works_on_cpu(checkpoint, bits):
    path, _ = checkpoint
    model = _load(path, bits)
    expected = "Linear4bit" if bits == 4 else "Linear8bitLt"
    names = {type(m).__name__ for m in model.modules()}
    assert expected in names
    assert getattr(model, f"is_loaded_in_{bits}bit", False)


def test_plan_counts_equal_peft_after_inject(checkpoint, bits):
    path, _ = checkpoint
    model = _load(path, bits)
    the_plan = jl.plan(model, r=8, targets="all-linear")
    adapted = jl.inject(model, r=8, targets="all-linear")
    trainable, total = adapted.get_nb_trainable_parameters()
    assert (the_plan.trainable_params, the_plan.total_params) == (trainable, total)
    # r·(in+out) for each of the 7 block linears in each of the 2 layers (lm_head excluded by the preset).
    h, i = _SIZES["hidden_size"], _SIZES["intermediate_size"]
    kv = h // 4 * 2  # 4 heads, 2 KV heads
    per_layer = 8 * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    assert trainable == 2 * per_layer


def test_quantised_total_equals_unquantised_total(checkpoint, bits):
    path, reference = checkpoint
    model = _load(path, bits)
    ours = jl.plan(model, r=8, targets="all-linear")
    unquantised = jl.plan(reference, r=8, targets="all-linear")
    assert ours.base_params == unquantised.base_params
    assert ours.total_params == unquantised.total_params
    assert ours.trainable_params == unquantised.trainable_params
    naive = sum(p.numel() for p in model.parameters())
    reference_naive = sum(p.numel() for p in reference.parameters())
    if bits == 4:
        # Params4bit packs two 4-bit weights per uint8 element: a plain numel() sum undercounts.
        assert naive < reference_naive
        assert naive < ours.base_params
    else:
        assert naive == reference_naive == ours.base_params


def test_discovery_reports_quantised_kinds(checkpoint, bits):
    path, reference = checkpoint
    model = _load(path, bits)
    kind = "linear4bit" if bits == 4 else "linear8bit"
    infos = index_model(model).modules
    by_suffix = {}
    for info in infos:
        by_suffix.setdefault(info.suffix, set()).add(info.kind)
    for suffix in _LINEARS_PER_LAYER:
        assert by_suffix[suffix] == {kind}, suffix
    # transformers keeps the output embeddings unquantised.
    assert by_suffix["lm_head"] == {"linear"}
    assert by_suffix["embed_tokens"] == {"embedding"}
    # Shapes and (unpacked) weight sizes are those of the unquantised layers.
    ref = {m.path: m for m in index_model(reference).modules}
    for info in infos:
        assert (info.in_features, info.out_features) == ref[info.path].shape
        assert info.weight_params == ref[info.path].weight_params, info.path


def _quantised_linear_params(index) -> int:
    out_emb = index.task.output_embeddings
    return sum(m.weight_params for m in index.modules if m.is_linear and m.path != out_emb)


@pytest.mark.parametrize("source", ["config", "model"])
def test_estimate_4bit_weights_factor(checkpoint, source):
    _, reference = checkpoint
    src = tiny_config("llama", **_SIZES) if source == "config" else reference
    bf16 = jl.estimate(src, dtype="bf16", ckpt=False)
    nf4 = jl.estimate(src, dtype="bf16", quant="4bit", ckpt=False)  # same activations: compare the weights
    assert nf4.quant == "nf4" and bf16.quant is None
    index = index_model(reference)
    q = _quantised_linear_params(index)
    rest = index.base_params - q
    assert bf16.breakdown["weights"] == index.base_params * 2
    assert bf16.breakdown["quant_constants"] == 0
    # NF4 + double quant: 0.5 byte/weight + 1/64 (8-bit absmax per block) + fp32 absmax per 256 blocks ≈ 0.516.
    per_param = (nf4.breakdown["weights"] + nf4.breakdown["quant_constants"] - rest * 2) / q
    assert per_param == pytest.approx(0.516, abs=0.01)
    assert nf4.breakdown["weights"] < bf16.breakdown["weights"]
    # Everything that is not a weight of the base does not change.
    for key in ("adapter", "gradients", "optimizer", "activations", "logits"):
        assert nf4.breakdown[key] == bf16.breakdown[key], key


def test_estimate_4bit_factor_on_7b_shape():
    from jupyter_lora.testing import llama_config

    config = llama_config("llama-2-7b")
    bf16 = jl.estimate(config, dtype="bf16", ckpt=False)
    nf4 = jl.estimate(config, dtype="bf16", quant="4bit", ckpt=False)
    q = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    rest = 6_738_415_616 - q  # embeddings, lm_head, norms stay bf16
    expected = q * 0.516 + rest * 2
    assert nf4.breakdown["weights"] + nf4.breakdown["quant_constants"] == pytest.approx(expected, rel=0.01)
    ratio = bf16.breakdown["weights"] / (nf4.breakdown["weights"] + nf4.breakdown["quant_constants"])
    assert 3.3 < ratio < 3.7


def test_estimate_of_loaded_quantised_model_matches_its_real_size(checkpoint, bits):
    """A model that is already 4-bit (8-bit) must be estimated as such: its weights take a quarter (half) of
    their 16-bit size whether or not the caller repeats quant=..."""
    path, _ = checkpoint
    model = _load(path, bits)
    key = "4bit" if bits == 4 else "8bit"
    explicit = jl.estimate(model, quant=key)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    assert explicit.breakdown["weights"] == real
    implicit = jl.estimate(model)
    assert implicit.quant == explicit.quant == ("nf4" if bits == 4 else "int8")
    assert implicit.breakdown["weights"] == explicit.breakdown["weights"] == real
