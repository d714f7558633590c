"""``jupyter_lora.estimate`` (core/memory.py): its sources, its component arithmetic, its errors and renderings."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

import jupyter_lora as jl
from jupyter_lora import UsageError
from jupyter_lora.display import estimate_html, estimate_text
from jupyter_lora.testing import llama_config, tiny_config, tiny_model

GiB = 1024**3


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def est(llama):
    return jl.estimate(llama, r=8, targets="all-linear", seq=128, batch=2)


# ------------------------------------------------------------------------------------------------ sources


def test_model_config_and_directory_give_the_same_estimate(tmp_path):
    config = tiny_config("llama")
    config.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    model = tiny_model("llama").to(torch.bfloat16)
    kwargs = dict(r=8, targets="all-linear", seq=64, batch=2)
    from_model = jl.estimate(model, **kwargs)
    from_config = jl.estimate(config, **kwargs)
    from_dir = jl.estimate(tmp_path, **kwargs)
    from_str = jl.estimate(str(tmp_path), **kwargs)
    assert from_model.breakdown == from_config.breakdown == from_dir.breakdown == from_str.breakdown
    assert from_model.inference == from_config.inference == from_dir.inference
    assert from_model.dims == from_config.dims == from_dir.dims
    assert (
        (from_model.trainable_params, from_model.total_params)
        == (from_config.trainable_params, from_config.total_params)
        == (from_dir.trainable_params, from_dir.total_params)
    )
    assert from_model.dtype == from_config.dtype == from_dir.dtype == "bfloat16"


def test_fp32_model_is_estimated_in_its_own_dtype(llama):
    fp32 = jl.estimate(llama, seq=64, batch=2)
    bf16 = jl.estimate(llama, seq=64, batch=2, dtype="bf16")
    assert fp32.dtype == "float32"
    assert fp32.breakdown["weights"] == 2 * bf16.breakdown["weights"]


def test_config_without_dtype_assumes_bf16_and_says_so():
    e = jl.estimate(tiny_config("llama"))
    assert e.dtype == "bfloat16"
    assert any("bf16" in n for n in e.notes)


def test_70b_config_is_estimated_without_materialising_weights():
    import psutil

    proc = psutil.Process()
    before = proc.memory_info().rss
    start = time.perf_counter()
    e = jl.estimate(llama_config("llama-2-70b"), r=16, targets="all-linear", seq=4096, batch=1, ckpt=True)
    elapsed = time.perf_counter() - start
    grown = proc.memory_info().rss - before
    assert elapsed < 10, f"estimate on a 70B config took {elapsed:.1f} s"
    assert grown < 2 * GiB, f"RSS grew by {grown / GiB:.1f} GiB: weights were materialised?"
    base = 68_976_648_192  # Llama-2-70B
    assert e.total_params - e.trainable_params == base
    assert e.breakdown["weights"] == base * 2
    assert 125 * GiB < e.breakdown["weights"] < 131 * GiB
    # 80 layers × (q,k,v,o,gate,up,down), r=16
    per_layer = 16 * ((8192 * 2) + (8192 + 1024) * 2 + (8192 * 2) + (8192 + 28672) * 2 + (28672 + 8192))
    assert e.trainable_params == 80 * per_layer


def test_llama_7b_bf16_weights():
    e = jl.estimate(llama_config("llama-2-7b"))
    assert e.dtype == "bfloat16"
    assert e.total_params - e.trainable_params == 6_738_415_616
    assert 12.5 * GiB <= e.breakdown["weights"] <= 13.5 * GiB
    assert e.breakdown["weights"] == 6_738_415_616 * 2


def test_adapted_model_is_estimated_for_the_adapter_it_holds():
    settings = dict(r=8, targets="all-linear", variant="dora", dropout=0.1)
    before = jl.estimate(tiny_model("llama"), seq=64, batch=2, **settings)
    adapted = jl.inject(tiny_model("llama"), **settings)
    after = jl.estimate(adapted, seq=64, batch=2)
    assert (after.trainable_params, after.total_params) == adapted.get_nb_trainable_parameters()
    assert after.breakdown == before.breakdown


def test_tied_embeddings_count_once_on_meta():
    real = jl.estimate(tiny_model("gpt2"), dtype="bf16")
    meta = jl.estimate(tiny_model("gpt2", meta=True), dtype="bf16")
    unique = sum(p.numel() for p in tiny_model("gpt2").parameters())
    assert real.breakdown["weights"] == meta.breakdown["weights"] == unique * 2


# ------------------------------------------------------------------------------------------------ components


def test_total_is_the_sum_of_the_breakdown(est):
    assert est.total_bytes == sum(est.breakdown.values())
    assert est.allocated_bytes == est.total_bytes - est.breakdown["cuda_context"]
    assert est.inference_bytes == sum(est.inference.values())
    assert all(isinstance(v, int) and v >= 0 for v in est.breakdown.values())


def test_adamw_is_8_bytes_per_trainable_param(llama):
    adamw = jl.estimate(llama, r=8, targets="all-linear", optim="adamw")
    assert adamw.trainable_params > 0
    assert adamw.breakdown["optimizer"] == 8 * adamw.trainable_params
    eight = jl.estimate(llama, r=8, targets="all-linear", optim="adamw8bit")
    assert eight.trainable_params == adamw.trainable_params
    assert 0 < eight.breakdown["optimizer"] < adamw.breakdown["optimizer"]
    sgd = jl.estimate(llama, r=8, targets="all-linear", optim="sgd")
    assert sgd.breakdown["optimizer"] == 4 * sgd.trainable_params  # one momentum buffer: training uses 0.9
    # Only the optimizer term changes.
    for key in adamw.breakdown:
        if key != "optimizer":
            assert adamw.breakdown[key] == eight.breakdown[key] == sgd.breakdown[key], key


def test_adamw8bit_is_about_2_bytes_per_param_on_7b():
    config = llama_config("llama-2-7b")
    e = jl.estimate(config, r=16, targets="all-linear", optim="adamw8bit")
    assert e.breakdown["optimizer"] / e.trainable_params == pytest.approx(2.0, abs=0.01)


def test_adapter_and_gradients_are_fp32_lora_params(llama):
    e = jl.estimate(llama, r=8, targets="all-linear")
    p = jl.plan(llama, r=8, targets="all-linear")
    assert e.trainable_params == p.trainable_params
    assert e.breakdown["adapter"] == e.breakdown["gradients"] == 4 * p.adapter_params


def test_gradient_checkpointing_reduces_activations():
    config = llama_config("llama-2-7b")
    plain = jl.estimate(config, seq=2048, batch=4)
    ckpt = jl.estimate(config, seq=2048, batch=4, ckpt=True)
    assert ckpt.breakdown["activations"] < plain.breakdown["activations"] / 4
    assert ckpt.total_bytes < plain.total_bytes
    for key in ("weights", "adapter", "optimizer", "logits"):
        assert ckpt.breakdown[key] == plain.breakdown[key], key


def test_offloaded_checkpoints_leave_one_layer_on_the_device():
    config = llama_config("llama-2-7b")
    ckpt = jl.estimate(config, seq=4096, batch=4, ckpt=True)
    offload = jl.estimate(config, seq=4096, batch=4, ckpt="offload")
    hidden, layers, tokens = 4096, 32, 4096 * 4
    # the difference is the layer inputs of all but one layer (bf16), kept in host memory instead
    saved = ckpt.breakdown["activations"] - offload.breakdown["activations"]
    assert saved == pytest.approx((layers - 1) * 2 * hidden * tokens, rel=0.35)
    assert offload.offload and "(offload)" in repr(offload) and any("offloaded" in n for n in offload.notes)
    with pytest.raises(UsageError, match="Did you mean `offload`"):
        jl.estimate(config, ckpt="ofload")


@pytest.mark.parametrize("ckpt", [False, True])
def test_activations_scale_linearly_with_batch(llama, ckpt):
    acts = {b: jl.estimate(llama, seq=128, batch=b, ckpt=ckpt).breakdown["activations"] for b in (1, 2, 8)}
    assert acts[2] == pytest.approx(2 * acts[1], rel=0.01)
    assert acts[8] == pytest.approx(8 * acts[1], rel=0.01)
    logits = {b: jl.estimate(llama, seq=128, batch=b, ckpt=ckpt).breakdown["logits"] for b in (1, 8)}
    assert logits[8] == pytest.approx(8 * logits[1], rel=0.01)


def test_logits_for_causal_lm_and_none_for_sequence_classification(llama):
    causal = jl.estimate(llama, seq=128, batch=2, dtype="bf16")
    vocab = llama.config.vocab_size
    assert causal.breakdown["logits"] >= 128 * 2 * vocab * 2  # at least one bf16 copy of the logits
    bert = tiny_model("bert")
    cls = jl.estimate(bert, seq=128, batch=2)
    assert cls.breakdown["logits"] == 0
    # The classifier head is trained fully (modules_to_save) and counted as trainable.
    assert cls.trainable_params > jl.plan(bert).adapter_params


def test_liger_logits_are_one_chunk_as_its_fused_loss_makes_them(monkeypatch):
    """Where training would run Liger's fused linear cross-entropy, the estimate holds the logits of one chunk:
    tokens / ceil(vocab / hidden), rounded up to a power of two (on an H200 the estimate assumed chunked logits
    and came out 17-27% above the measured peak); with kernels: none it keeps the chunked-loss term."""
    from jupyter_lora.core.train import engine

    model = tiny_model("llama")
    monkeypatch.setattr(engine, "use_liger", lambda kernels, model, device: kernels != "none")
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    fused = jl.estimate(model, seq=256, batch=4, dtype="bf16", chunked_loss=False)
    plain = jl.estimate(model, seq=256, batch=4, dtype="bf16", chunked_loss=False, kernels="none")
    share = -(-1024 // -(-vocab // hidden))
    chunk = 1 << (share - 1).bit_length()
    assert chunk < 1024
    assert fused.breakdown["logits"] == plain.breakdown["logits"] * chunk // 1024
    assert any("Liger" in note for note in fused.notes)


def test_4bit_shrinks_the_weights(llama):
    bf16 = jl.estimate(llama, dtype="bf16")
    nf4 = jl.estimate(llama, dtype="bf16", quant="4bit")
    int8 = jl.estimate(llama, dtype="bf16", quant="8bit")
    assert nf4.quant == "nf4" and int8.quant == "int8"
    assert nf4.breakdown["weights"] < int8.breakdown["weights"] < bf16.breakdown["weights"]
    assert nf4.breakdown["quant_constants"] > 0 and int8.breakdown["quant_constants"] > 0
    assert nf4.total_bytes < bf16.total_bytes


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(seq=0), "`seq`"),
        (dict(batch=-1), "`batch`"),
        (dict(batch=2.5), "`batch`"),
        (dict(optim="adam_w"), "Did you mean `adamw`"),
        (dict(dtype="fp8"), "`dtype`"),
        (dict(quant="3bit"), "`quant`"),
        (dict(attention="paged"), "`attention`"),
    ],
)
def test_bad_arguments_raise_usage_error(llama, kwargs, fragment):
    with pytest.raises(UsageError) as info:
        jl.estimate(llama, **kwargs)
    assert fragment in str(info.value)
    value = next(iter(kwargs.values()))
    assert repr(value) in str(info.value)


def test_missing_path_raises_usage_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UsageError) as info:
        jl.estimate(missing)
    assert str(missing) in str(info.value)


def test_directory_without_config_raises_usage_error(tmp_path):
    with pytest.raises(UsageError):
        jl.estimate(tmp_path)


def test_wrong_source_type_raises_usage_error():
    with pytest.raises(UsageError, match="estimate"):
        jl.estimate(42)


# ------------------------------------------------------------------------------------------------ rendering


def test_text_rendering(est):
    text = estimate_text(est)
    assert "Training" in text
    lines = text.splitlines()
    assert any(line.split()[:1] == ["total"] for line in lines)
    assert "base weights" in text


def test_html_rendering_escapes(est):
    html = estimate_html(est)
    assert "<table" in html
    assert "total" in html
    hostile = dataclasses.replace(
        est,
        notes=("<script>alert(1)</script>",),
        gpu_name="<b>GPU & co</b>",
        gpu_capacity_bytes=80 * GiB,
    )
    html = estimate_html(hostile)
    assert "<script>" not in html and "<b>GPU" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;GPU &amp; co&lt;/b&gt;" in html
    assert "fits" in html
