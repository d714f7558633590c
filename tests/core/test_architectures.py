"""The architecture matrix: every supported family, tiny and offline, through plan -> inject -> merge -> save/load.

For each architecture: the plan's counts equal PEFT's after injection (also when planned on a meta-device copy),
outputs are unchanged right after injection (B = 0), the merged model computes what the adapter computed, a
save -> load round trip into a fresh base reproduces the outputs, and the presets pick the expected modules.
"""

from __future__ import annotations

import pytest
import torch

import jupyter_lora as jl
from jupyter_lora.core.targets import index_model, preset_paths
from jupyter_lora.testing import ARCHITECTURES, minilm_path, tiny_inputs, tiny_model

# architecture -> (suffixes the `attention` preset selects, suffixes the `mlp` preset selects)
PRESET_SUFFIXES = {
    "gpt2": ({"c_attn", "c_proj"}, {"c_fc", "c_proj"}),
    "llama": ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}),
    "mistral": ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}),
    "qwen2": ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}),
    "gemma": ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}),
    "phi3": ({"qkv_proj", "o_proj"}, {"gate_up_proj", "down_proj"}),
    "falcon": ({"query_key_value", "dense"}, {"dense_h_to_4h", "dense_4h_to_h"}),
    "gpt_neox": ({"query_key_value", "dense"}, {"dense_h_to_4h", "dense_4h_to_h"}),
    "opt": ({"q_proj", "k_proj", "v_proj", "out_proj"}, {"fc1", "fc2"}),
    "bloom": ({"query_key_value", "dense"}, {"dense_h_to_4h", "dense_4h_to_h"}),
    "bert": ({"query", "key", "value", "dense"}, {"dense"}),
    "roberta": ({"query", "key", "value", "dense"}, {"dense"}),
    "distilbert": ({"q_lin", "k_lin", "v_lin", "out_lin"}, {"lin1", "lin2"}),
    "t5": ({"q", "k", "v", "o"}, {"wi", "wo"}),
    "vit": ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"fc1", "fc2"}),
}
TASK_HEADS = {"bert": ("classifier",), "roberta": ("classifier",), "distilbert": ("pre_classifier", "classifier"),
              "vit": ("classifier",)}  # fmt: skip


def _output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _randomize_lora_b(model, seed: int = 1) -> None:
    """Give every LoRA B (zero at init) random values, so the adapter really changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_matrix_covers_the_required_families():
    assert set(PRESET_SUFFIXES) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("targets", ["all-linear", "attention", None])
def test_plan_counts_equal_peft_after_inject(arch, targets):
    model = tiny_model(arch)
    planned = jl.plan(model, r=4, targets=targets)
    on_meta = jl.plan(tiny_model(arch, meta=True), r=4, targets=targets)
    adapted = jl.inject(model, r=4, targets=targets)
    peft_counts = adapted.get_nb_trainable_parameters()
    assert (planned.trainable_params, planned.total_params) == peft_counts
    assert (on_meta.trainable_params, on_meta.total_params) == peft_counts
    injected = {
        n.removeprefix("base_model.model.") for n, m in adapted.named_modules() if hasattr(m, "lora_A")
    }
    assert injected == set(planned.targets)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inject_merge_save_load_round_trip(arch, tmp_path):
    inputs = tiny_inputs(tiny_model(arch))
    base_out = _output(tiny_model(arch), inputs)

    model = jl.inject(tiny_model(arch), r=4, targets="all-linear")
    assert torch.allclose(_output(model, inputs), base_out, atol=1e-6), "B = 0 must leave outputs unchanged"

    _randomize_lora_b(model)
    adapted_out = _output(model, inputs)
    assert not torch.allclose(adapted_out, base_out, atol=1e-4), "the randomized adapter must change outputs"

    jl.save(model, tmp_path / "adapter")
    reloaded = jl.load(tiny_model(arch), tmp_path / "adapter")
    assert torch.allclose(_output(reloaded, inputs), adapted_out, atol=1e-5)

    merged = jl.merge(model)
    assert not hasattr(merged, "peft_config")
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    assert torch.allclose(_output(merged, inputs), adapted_out, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_presets_select_the_expected_modules(arch):
    model = tiny_model(arch)
    index = index_model(model)
    attention, mlp = PRESET_SUFFIXES[arch]
    attention_paths = preset_paths(index, "attention")
    mlp_paths = preset_paths(index, "mlp")
    assert {p.rsplit(".", 1)[-1] for p in attention_paths} == attention
    assert {p.rsplit(".", 1)[-1] for p in mlp_paths} == mlp
    assert not set(attention_paths) & set(mlp_paths)
    all_linear = set(preset_paths(index, "all-linear"))
    assert set(attention_paths) | set(mlp_paths) <= all_linear
    # Never the LM head or a task head.
    excluded = set(TASK_HEADS.get(arch, ()))
    if index.task.output_embeddings:
        excluded.add(index.task.output_embeddings)
    assert not {p for p in all_linear if any(p == h or p.startswith(h + ".") for h in excluded)}
    # Every block is covered by the attention preset.
    assert {index.by_path[p].layer for p in attention_paths} == set(range(index.num_layers))


@pytest.mark.parametrize("arch", sorted(TASK_HEADS))
def test_fresh_task_heads_are_trained_and_saved(arch, tmp_path):
    model = tiny_model(arch)
    planned = jl.plan(model, r=4, targets="attention")
    head_rows = [r for r in planned.modules if r.role == "modules_to_save"]
    assert {r.path for r in head_rows} == set(TASK_HEADS[arch])
    adapted = jl.inject(model, r=4, targets="attention")
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    for head in TASK_HEADS[arch]:
        assert any(f".{head}.modules_to_save." in n for n in trainable), head
    jl.save(adapted, tmp_path / "a")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    for head in TASK_HEADS[arch]:
        assert any(f".{head}." in k for k in keys), head


def test_task_type_override_drops_the_head():
    model = tiny_model("bert")
    auto = jl.plan(model, r=4, targets="query")
    assert auto.task_type == "SEQ_CLS"
    plain = jl.plan(model, r=4, targets="query", task_type="feature_extraction")
    assert plain.task_type == "FEATURE_EXTRACTION"
    assert not [r for r in plain.modules if r.role == "modules_to_save"]
    assert plain.trainable_params < auto.trainable_params


def test_gpt2_meta_plan_counts_tied_embeddings_once():
    meta = tiny_model("gpt2", meta=True)
    naive = sum(p.numel() for p in meta.parameters())
    real = tiny_model("gpt2")
    assert naive > sum(p.numel() for p in real.parameters()), "on meta the LM head is a separate tensor"
    assert jl.plan(meta, r=4).total_params == jl.inject(real, r=4).get_nb_trainable_parameters()[1]


def test_pretrained_minilm_offline(tmp_path):
    from transformers import AutoModel

    path = minilm_path()
    model = AutoModel.from_pretrained(path).eval()
    assert jl.plan(model).task_type == "FEATURE_EXTRACTION"
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2023, 2003, 102]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    base_out = _output(model, inputs)

    planned = jl.plan(model, r=8, targets="attention")
    adapted = jl.inject(model, r=8, targets="attention")
    assert (planned.trainable_params, planned.total_params) == adapted.get_nb_trainable_parameters()
    assert planned.total_params - planned.trainable_params == 22_713_216  # all-MiniLM-L6-v2's parameter count
    assert torch.allclose(_output(adapted, inputs), base_out, atol=1e-6)

    _randomize_lora_b(adapted)
    adapted_out = _output(adapted, inputs)
    jl.save(adapted, tmp_path / "minilm-lora")
    reloaded = jl.load(AutoModel.from_pretrained(path).eval(), tmp_path / "minilm-lora")
    assert torch.allclose(_output(reloaded, inputs), adapted_out, atol=1e-5)
    merged = jl.merge(adapted)
    assert torch.allclose(_output(merged, inputs), adapted_out, atol=1e-4)
