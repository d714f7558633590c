"""The cached module index: it notices every change of the model's structure (injections, unloads, merges, a
replaced module, a deleted block, a cast, a bias removed, a meta model made real) and re-planning after a rank,
alpha or target change walks no module tree — one cheap check of the cache per panel update."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import jupyter_lora as jl
from jupyter_lora.core.targets import index as index_module
from jupyter_lora.core.targets import index_model
from jupyter_lora.testing import tiny_model


def _peft_counts(model, **settings):
    """(trainable, total) as PEFT reports them after injecting ``settings`` into ``model``."""
    return jl.inject(model, **settings).get_nb_trainable_parameters()


def _planned(model, **settings):
    p = jl.plan(model, **settings)
    return p.trainable_params, p.total_params


def test_a_module_replaced_by_the_user_is_seen():
    model = tiny_model("llama")
    jl.plan(model, r=4, targets="q_proj")  # indexed
    attn = model.model.layers[0].self_attn
    wider = 3 * attn.q_proj.out_features
    attn.q_proj = nn.Linear(attn.q_proj.in_features, wider, bias=False)  # as many modules as before
    assert index_model(model).by_path["model.layers.0.self_attn.q_proj"].out_features == wider
    planned = _planned(model, r=4, targets="q_proj")
    assert planned == _peft_counts(model, r=4, targets="q_proj")


def test_a_cast_is_seen_by_plan_and_estimate():
    model = tiny_model("llama")
    fp32 = jl.estimate(model, r=4)
    assert index_model(model).weight_dtype == torch.float32
    model.to(torch.bfloat16)  # the same parameter objects, a new dtype: nothing is registered
    index = index_model(model)
    assert index.weight_dtype == torch.bfloat16
    assert (
        jl.estimate(model, r=4).breakdown["weights"]
        == index.base_params * 2
        == fp32.breakdown["weights"] // 2
    )


def test_a_bias_set_to_none_is_seen():
    model = tiny_model("opt")
    jl.plan(model, r=4, targets="q_proj")
    layer = model.model.decoder.layers[0].self_attn.q_proj
    layer.bias = None  # torch sets a registered parameter to None without a registration
    assert index_model(model).base_params == sum(p.numel() for p in model.parameters())
    planned = _planned(model, r=4, targets="q_proj")
    assert planned == _peft_counts(model, r=4, targets="q_proj")


def test_deleted_and_inserted_blocks_are_seen():
    spare = tiny_model("llama").model.layers[0]
    model = tiny_model("llama", num_hidden_layers=3)
    assert index_model(model).num_layers == 3
    del model.model.layers[1]
    assert index_model(model).num_layers == 2
    assert jl.find_targets(model, "q_proj") == (
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    )
    model.model.layers.insert(0, spare)  # ModuleList.insert registers nothing
    assert index_model(model).num_layers == 3
    assert _planned(model, r=4, targets="all-linear") == _peft_counts(model, r=4, targets="all-linear")


def test_a_meta_model_made_real_is_seen():
    model = tiny_model("llama", meta=True)
    assert jl.plan(model, r=4).is_meta
    model.to_empty(device="cpu")
    assert not jl.plan(model, r=4).is_meta


@pytest.mark.parametrize("through", ["jupyter_lora", "peft"])
def test_inject_merge_and_unload_are_seen(through):
    import peft

    fresh = _planned(tiny_model("llama"), r=4, targets="all-linear")
    model = tiny_model("llama")
    before = index_model(model)
    assert _planned(model, r=4, targets="all-linear") == fresh
    if through == "peft":  # PEFT's own calls, which do not tell the cache
        adapted = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    else:
        adapted = jl.inject(model, r=2, targets="q_proj")
    injected = index_model(model)
    assert injected is not before
    second = jl.plan(adapted, r=4, targets="v_proj", name="second")
    assert second.other_adapters == ("default",)
    assert second.other_adapter_params == adapted.get_nb_trainable_parameters()[0]
    merged = adapted.merge_and_unload() if through == "peft" else jl.merge(adapted)
    assert index_model(merged) is not injected
    assert not any(".lora_" in path for path in index_model(merged).module_types)
    assert _planned(merged, r=4, targets="all-linear") == fresh
    adapted = jl.inject(merged, r=2, targets="q_proj")
    unloaded = adapted.unload() if through == "peft" else jl.unload(adapted)
    assert (
        _planned(unloaded, r=4, targets="all-linear")
        == fresh
        == _peft_counts(unloaded, r=4, targets="all-linear")
    )


def test_an_unrelated_registration_keeps_the_index():
    model = tiny_model("llama")
    first = index_model(model)
    other = tiny_model("gpt2")  # registers hundreds of modules and parameters elsewhere
    nn.Linear(4, 4)
    assert index_model(model) is first
    assert index_model(other) is not first


def test_an_estimate_after_a_registration_checks_again():
    model = tiny_model("llama")
    p = jl.plan(model, r=4)
    model.lm_head = nn.Linear(model.config.hidden_size, 2 * model.config.vocab_size, bias=False)
    e = jl.estimate(model, p)
    assert e.breakdown["weights"] == index_model(model).base_params * 4
    assert index_model(model).base_params == sum(p.numel() for p in model.parameters())


_WALKS = ("modules", "named_modules", "parameters", "named_parameters", "children", "named_children")


@pytest.fixture
def no_walks(monkeypatch):
    """Make every module-tree walk fail, once the test calls the fixture's result."""

    def forbid():
        def walk(self, *args, **kwargs):
            raise AssertionError(f"walked {type(self).__name__}")

        for name in _WALKS:
            monkeypatch.setattr(nn.Module, name, walk)

    return forbid


def test_re_planning_walks_no_module_tree(no_walks):
    from jupyter_lora.widgets.panel import Panel

    model = tiny_model("llama")
    panel = Panel(model, targets="all-linear")
    no_walks()
    panel.r.value = 13
    panel.alpha_lock.value = False
    panel.alpha.value = 5
    panel.tree.targets = "q_proj, v_proj, model.layers.1.mlp.down_proj"  # a spec never resolved before
    assert not panel.tree.error and panel.plan.spec.r == 13 and panel.plan.spec.lora_alpha == 5
    assert len(panel.plan.targets) == 2 * 2 + 1


def test_re_planning_an_adapted_model_walks_no_module_tree(no_walks):
    model = jl.inject(tiny_model("llama"), r=4, targets="q_proj")
    jl.estimate(model, jl.plan(model, r=4, targets="q_proj", name="second"))
    no_walks()
    for r in (8, 2, 64):
        p = jl.plan(model, r=r, alpha=3, targets="q_proj", name="second")
        jl.estimate(model, p)
    assert p.other_adapters == ("default",) and p.spec.r == 64


def test_one_check_of_the_cache_per_panel_update(monkeypatch):
    from jupyter_lora.widgets.panel import Panel

    panel = Panel(tiny_model("llama"), targets="all-linear")
    checks = []
    still_valid = index_module._Entry.still_valid
    monkeypatch.setattr(
        index_module._Entry, "still_valid", lambda self: checks.append(1) or still_valid(self)
    )
    panel.r.value = 24
    assert len(checks) == 1
    panel.tree.targets = "mlp"
    assert len(checks) == 2


@pytest.mark.parametrize("r", [1, 7, 12, 100])
@pytest.mark.parametrize(
    ("arch", "settings"),
    [
        ("llama", dict(targets="all-linear", variant="dora")),
        ("llama", dict(targets="embed_tokens, lm_head, q_proj")),
        ("vit", dict(targets="patch_embeddings.projection, q_proj", variant="dora")),
        ("gpt2", dict(targets="c_attn", bias="lora_only")),
    ],
)
def test_counts_and_bytes_at_any_rank(arch, settings, r, tmp_path):
    """The counts and file size worked out from the cached shapes for one rank equal PEFT's for that rank (the
    header's length changes with the digits of r and of every data offset)."""
    model = tiny_model(arch)
    jl.plan(model, r=3, **settings)  # another rank first: the shapes are cached
    planned = jl.plan(model, r=r, **settings)
    assert planned.adapter_params == sum(row.params for row in planned.modules if row.role == "lora")
    adapted = jl.inject(model, r=r, **settings)
    assert (planned.trainable_params, planned.total_params) == adapted.get_nb_trainable_parameters()
    path = jl.save(adapted, tmp_path / "a")
    assert os.path.getsize(path / "adapter_model.safetensors") == planned.adapter_bytes


def test_a_grouped_conv_at_several_ranks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, groups=4)
            self.head = nn.Linear(8, 2)

    model = Net()
    for r in (4, 8, 12):
        planned = jl.plan(model, r=r, targets="conv")
        assert planned.adapter_params == sum(row.params for row in planned.modules)
        assert (planned.trainable_params, planned.total_params) == _peft_counts(Net(), r=r, targets="conv")


def test_the_file_size_for_any_rank_equals_writing_the_header():
    """The size worked out per rank from the cached layout equals the size of the header written out in full, for
    mixed dtypes (their order in the file), grouped convolutions and ranks whose digits change the header."""
    from jupyter_lora.core.plan import _Layout, _safetensors_size

    entries = [
        ("base_model.model.a.lora_A.weight", "float32", (-1, 4096)),
        ("base_model.model.a.lora_B.weight", "float32", (11008, -1)),
        ("base_model.model.conv.lora_A.weight", "float32", (-1, 64, 3, 3)),
        ("base_model.model.conv.lora_B.weight", "float32", (128, -4, 1, 1)),
        ("base_model.model.conv.lora_magnitude_vector", "float32", (1, 128, 1, 1)),
        ("base_model.model.head.weight", "bfloat16", (10, 4096)),
        ("base_model.model.d.lora_embedding_A", "float64", (-1, 32000)),
        ("base_model.model.x.bias", "float16", (7,)),
    ]
    layout = _Layout(entries)
    for r in (1, 4, 9, 10, 99, 100, 128, 1000, 4096):
        filled = [(k, d, tuple(r // -n if n < 0 else n for n in shape)) for k, d, shape in entries]
        assert layout.size(r) == _safetensors_size(filled), r


def test_what_is_kept_per_target_spec_is_bounded():
    """Each spec typed into the panel is a selection; what is kept for them does not grow without end, and a spec
    dropped from the cache plans the same when it comes back."""
    model = tiny_model("llama", num_hidden_layers=4)
    first = jl.plan(model, r=4, targets="q_proj", layers="0")
    for k in range(100):
        exclude = (
            f"re:x{k}|model\\.layers\\.0\\.mlp\\.down_proj"  # a new spec each time, excluding one module
        )
        jl.plan(model, r=4, targets="all-linear", layers=f"0-{k % 4}", exclude=exclude)
    kept = index_model(model).memo["per selection"]
    assert len(kept) <= 64
    assert jl.plan(model, r=4, targets="q_proj", layers="0") == first
