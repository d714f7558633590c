"""Mixture-of-experts models: their fused expert weights (3-D ``gate_up_proj``/``down_proj`` parameters of an experts
module) are LoRA targets through PEFT's ``target_parameters`` — selected by the ``experts`` preset or by name, counted
and sized exactly as PEFT injects and saves them, merged exactly, shown per expert, estimated with only the routed
experts' activations live, and trained."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from model_state import assert_model_unchanged, model_snapshot
from peft import PeftModel

import jupyter_lora as jl
from jupyter_lora.core.errors import TargetError, UsageError
from jupyter_lora.core.targets import index_model
from jupyter_lora.display import plan_text
from jupyter_lora.testing import tiny_inputs, tiny_model, tiny_tokenizer

FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss")
pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _randomize_lora_b(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _inject(arch: str, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the inject's own check: PEFT did what the plan said
        return jl.inject(tiny_model(arch), **settings)


# ----------------------------------------------------------------------------------------------- targets


def test_the_experts_preset_selects_every_fused_expert_weight():
    model = tiny_model("mixtral")
    assert jl.find_targets(model, "experts") == (
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
    )
    info = index_model(model).by_path["model.layers.0.mlp.experts.gate_up_proj"]
    # stored (experts, 2·I, h): PEFT's in/out per expert are h -> 2·I
    assert (info.kind, info.experts, info.param_shape, info.in_features, info.out_features) == (
        "experts", 4, (4, 128, 32), 32, 128,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("targets", "layers", "exclude", "expected"),
    [
        ("gate_up_proj", None, None, ["0.mlp.experts.gate_up_proj", "1.mlp.experts.gate_up_proj"]),
        ("experts.down_proj", "1", None, ["1.mlp.experts.down_proj"]),
        ("layers.0.*.experts.*", None, None, ["0.mlp.experts.gate_up_proj", "0.mlp.experts.down_proj"]),
        (r"re:.*\.1\.mlp\.experts\.gate_up_proj", None, None, ["1.mlp.experts.gate_up_proj"]),
        ("mlp.experts", None, "down_proj", ["0.mlp.experts.gate_up_proj", "1.mlp.experts.gate_up_proj"]),
        ("q_proj, experts", "0", "gate_up_proj", ["0.self_attn.q_proj", "0.mlp.experts.down_proj"]),
    ],
)
def test_names_globs_regexes_layers_and_exclude_select_expert_weights(targets, layers, exclude, expected):
    got = jl.find_targets(tiny_model("mixtral"), targets, layers=layers, exclude=exclude)
    assert got == tuple(f"model.layers.{p}" for p in expected)


def test_all_linear_leaves_experts_and_routing_gates_out_and_the_plan_says_how_to_add_them():
    model = tiny_model("qwen2_moe")
    paths = jl.find_targets(model, "all-linear")
    assert not any(".experts." in p for p in paths)
    assert not any(p.endswith("shared_expert_gate") for p in paths)  # the shared expert's gate routes
    assert any(p.endswith("shared_expert.down_proj") for p in paths)  # the shared expert is an ordinary MLP
    p = jl.plan(model, targets="all-linear")
    assert "targets: all-linear, experts" in p.experts_note
    assert "targets: all-linear, experts" in plan_text(p)
    both = jl.plan(model, targets="all-linear, experts")
    assert both.experts_note == "" and set(both.targets) == set(paths) | set(
        jl.find_targets(model, "experts")
    )
    assert "shared_expert_gate" in " ".join(jl.find_targets(model, "shared_expert_gate"))  # by name, it can


def test_errors_name_the_experts_preset():
    with pytest.raises(TargetError, match="Did you mean `experts`"):
        jl.plan(tiny_model("llama"), targets="expertz")
    with pytest.raises(TargetError, match="has no mixture-of-experts layers"):
        jl.plan(tiny_model("llama"), targets="experts")
    with pytest.raises(TargetError, match="`experts` preset"):
        jl.plan(tiny_model("mixtral"), targets="mlp")


@pytest.mark.parametrize(
    ("settings", "match"),
    [(dict(dropout=0.1), "dropout"), (dict(variant="dora"), "dora"), (dict(init="pissa"), "init")],
)
def test_settings_peft_cannot_apply_to_experts_are_refused_up_front(settings, match):
    model = tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=match):
        jl.inject(model, targets="experts", **settings)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_layers_peft_would_turn_into_experts_are_refused_by_name_and_left_out_of_presets():
    """DeepSeek-V3's dense first layer and shared experts have Linear gate/up/down projections, which PEFT rewrites
    into the fused experts' target_parameters for this architecture."""
    model = tiny_model("deepseek_v3")
    with pytest.raises(TargetError, match="PEFT reads a Linear named `down_proj`"):
        jl.plan(model, targets="down_proj")
    assert jl.find_targets(model, "down_proj", exclude="mlp.down_proj, shared_experts") == (
        "model.layers.1.mlp.experts.down_proj",
    )
    p = jl.plan(model, targets="all-linear")
    assert not any(t.endswith(("gate_proj", "up_proj", "down_proj")) for t in p.targets)
    assert "PEFT would turn them into the fused experts" in p.experts_note


# ----------------------------------------------------------------------------------------------- counts, files


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("targets", ["experts", "all-linear, experts", "down_proj"])
def test_counts_and_file_size_equal_peft_at_several_ranks(arch, targets, tmp_path):
    if arch == "deepseek_v3" and targets == "down_proj":
        targets = "experts.down_proj"
    for r in (2, 7):
        planned = jl.plan(tiny_model(arch), r=r, targets=targets)
        model = _inject(arch, r=r, targets=targets)
        assert model.get_nb_trainable_parameters() == (planned.trainable_params, planned.total_params)
        assert planned.adapter_params == sum(row.params for row in planned.modules)
        jl.save(model, tmp_path / f"{r}")
        assert os.path.getsize(tmp_path / f"{r}" / "adapter_model.safetensors") == planned.adapter_bytes


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "qwen2_moe"])
def test_save_then_peft_from_pretrained_gives_the_same_outputs(arch, tmp_path):
    model = _inject(arch, r=4, targets="all-linear, experts")
    _randomize_lora_b(model)
    inputs = tiny_inputs(model)
    expected = _logits(model, inputs)
    jl.save(model, tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_model(arch), str(tmp_path / "a"))
    assert torch.allclose(_logits(loaded, inputs), expected, atol=1e-5)
    assert not torch.allclose(_logits(tiny_model(arch), inputs), expected, atol=1e-3)  # the adapter matters


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "olmoe"])
def test_save_then_load_here_gives_the_same_outputs(arch, tmp_path):
    model = _inject(arch, r=4, targets="all-linear, experts")
    _randomize_lora_b(model)
    inputs = tiny_inputs(model)
    expected = _logits(model, inputs)
    jl.save(model, tmp_path / "a")
    loaded = jl.load(tiny_model(arch), tmp_path / "a")
    assert torch.allclose(_logits(loaded, inputs), expected, atol=1e-5)
    assert jl.find_targets(loaded, "experts")  # the experts are still found under their adapters


def test_an_expert_adapter_for_another_number_of_experts_is_refused_and_nothing_changes(tmp_path):
    model = _inject("mixtral", r=4, targets="experts")
    jl.save(model, tmp_path / "a")
    other = tiny_model("mixtral", num_local_experts=8)
    before = model_snapshot(other)
    with pytest.raises(UsageError, match=r"has 8 experts but the adapter's lora_A is \(16, 32\)"):
        jl.load(other, tmp_path / "a")
    assert_model_unchanged(before, other)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_merge_is_exact_and_a_merged_save_leaves_the_model_bit_for_bit(arch, tmp_path):
    model = _inject(arch, r=4, targets="experts, q_proj")
    _randomize_lora_b(model)
    inputs = tiny_inputs(model)
    adapted = _logits(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    jl.save(model, tmp_path / "merged", merged=True)  # merges, writes, takes the merge out again
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    merged = jl.merge(model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_logits(merged, inputs), adapted, atol=1e-5)


def test_an_adapted_model_is_indexed_and_planned_as_its_base():
    base = tiny_model("mixtral")
    planned = jl.plan(base, r=4, targets="experts")
    model = jl.inject(base, r=4, targets="experts")
    index = index_model(model)
    assert [m.path for m in index.modules if m.kind == "experts"] == list(planned.targets)
    model(**tiny_inputs(model))  # PEFT parametrizes the weights during a forward and takes that off again
    again = jl.plan(model, r=4, targets="experts")
    assert (again.targets, again.adapter_params, again.adapter_bytes) == (
        planned.targets, planned.adapter_params, planned.adapter_bytes,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- display, tree


def test_plan_table_and_module_tree_show_expert_weights_per_expert():
    from jupyter_lora.widgets.tree import tree_rows

    model = tiny_model("mixtral")
    text = plan_text(jl.plan(model, r=4, targets="experts"))
    assert "4 experts × 128×32" in text and "4 experts × 32×64" in text
    rows = {row["path"]: row for row in tree_rows(model)}
    weight = rows["model.layers.0.mlp.experts.gate_up_proj"]
    assert (weight["kind"], weight["shape"], weight["params"]) == (
        "experts",
        "4 experts × 128×32",
        4 * 128 * 32,
    )
    assert rows[weight["path"].rsplit(".", 1)[0]]["id"] == weight["parent"]
    # every parameter still counted once: the experts module holds exactly its two weights
    assert rows["model.layers.0.mlp.experts"]["params"] == 4 * 128 * 32 + 4 * 32 * 64
    assert rows[""]["params"] == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- memory


def test_memory_counts_only_the_routed_experts_and_the_rebuilt_adapted_weights():
    model = tiny_model("mixtral")  # 4 experts of width 64, 2 per token
    plain = jl.estimate(model, targets="q_proj", seq=64, batch=2)
    assert plain.dims["intermediate"] == 2 * 64
    adapted = jl.estimate(model, targets="q_proj, experts", seq=64, batch=2)
    weights = sum(index_model(model).by_path[p].weight_params for p in jl.find_targets(model, "experts")) * 4
    largest = 4 * 128 * 32 * 4
    assert adapted.breakdown["activations"] - plain.breakdown["activations"] == weights + largest
    r = jl.plan(model, targets="q_proj, experts").spec.r
    assert adapted.breakdown["adapter"] - plain.breakdown["adapter"] == 4 * r * 4 * 2 * (
        (32 + 128) + (64 + 32)
    )
    shared = jl.estimate(tiny_model("qwen2_moe"), targets="q_proj", seq=64, batch=2)
    assert shared.dims["intermediate"] == 2 * 48 + 40  # two routed experts and the shared one


# ----------------------------------------------------------------------------------------------- training


def test_training_expert_targets_lowers_the_loss(tmp_path):
    model = jl.inject(tiny_model("mixtral"), r=8, targets="experts")
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    run = jl.train(model, ["the quick brown fox jumps over the lazy dog."] * 16, tokenizer=tiny_tokenizer(),
                   steps=30, lr=3e-2, batch=4, eval=0, scheduler="constant", warmup=0,
                   output_dir=str(tmp_path), background=False)  # fmt: skip
    losses = [h["loss"] for h in run.history]
    assert run.state == "finished" and losses[-1] < 0.95 * losses[0]  # experts alone on a random model: ~10%
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)


@pytest.mark.parametrize(
    ("targets", "layers", "spec"),
    [
        ("qv, experts", None, "q_proj, v_proj, experts"),
        ("experts", None, "experts"),
        ("qv, experts", "0", "q_proj, v_proj, experts"),
        ("q_proj, layers.1.mlp.experts", None, None),  # some of the expert weights: their paths
    ],
)
def test_a_held_expert_adapter_reads_back_as_a_spec_that_makes_it_again(targets, layers, spec):
    from jupyter_lora.core.adapters.inspection import held_settings

    model = jl.inject(tiny_model("mixtral"), r=4, targets=targets, layers=layers)
    held = held_settings(model, "default")
    if spec is not None:
        assert held["targets"] == spec
    again = jl.plan(tiny_model("mixtral"), r=4, targets=held["targets"], layers=held["layers"])
    assert sorted(again.targets) == sorted(
        jl.plan(tiny_model("mixtral"), r=4, targets=targets, layers=layers).targets
    )
    assert again.trainable_params == jl.status(model).trainable_params
    assert {"gate_up_proj", "down_proj"} <= {
        t.rsplit(".", 1)[-1] for t in jl.status(model).adapters[0].targets
    }
    fresh = jl.estimate(tiny_model("mixtral"), r=4, targets=targets, layers=layers)
    assert (
        jl.estimate(model).breakdown == fresh.breakdown
    )  # the estimate of the adapted model counts its experts


def test_the_experts_preset_on_a_dense_model_says_it_has_no_mixture_of_experts_layers():
    with pytest.raises(TargetError, match="has no mixture-of-experts layers") as caught:
        jl.plan(tiny_model("llama"), targets="experts")
    assert "ModelIndex" not in str(caught.value)
