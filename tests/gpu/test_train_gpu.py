"""Training on CUDA in bf16 (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import jupyter_lora as jl
from jupyter_lora.testing import tiny_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")]


def _model(vocab=32000):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab)  # fmt: skip
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16)


def test_bf16_training_on_cuda_learns(tmp_path):
    model = jl.inject(_model(128), r=8, targets="all-linear, lm_head")
    run = jl.train(model, ["the quick brown fox jumps over the lazy dog."] * 32, tokenizer=tiny_tokenizer(),
                   steps=40, lr=3e-3, batch=8, eval=0, scheduler="constant", warmup=0, output_dir=str(tmp_path),
                   background=False)  # fmt: skip
    assert run.state == "finished"
    assert run.history[-1]["loss"] < 0.6 * run.history[0]["loss"]
    assert all(h["loss"] == h["loss"] for h in run.history), "no NaN"
    assert next(p for p in model.parameters()).dtype == torch.bfloat16


def _reset_peak() -> int:
    """Free what earlier runs left, start the peak count here, and return the bytes already allocated (the
    model under test), so that peaks compare the runs alone."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def test_chunked_loss_lowers_peak_memory_on_cuda(tmp_path):
    data = [{"input_ids": torch.randint(3, 32000, (1024,)).tolist()} for _ in range(16)]
    peaks = {}
    for chunked in (False, True):
        model = jl.inject(_model(), r=8, targets="all-linear")
        before = _reset_peak()
        # kernels: none — where liger-kernel is installed, auto would replace both losses with Liger's fused one
        jl.train(model, data, steps=3, batch=8, seq=1024, eval=0, chunked_loss=chunked, kernels="none",
                 output_dir=str(tmp_path / str(chunked)), background=False)  # fmt: skip
        peaks[chunked] = torch.cuda.max_memory_allocated() - before
        del model
    # 8 × 1024 tokens × 32000 vocab × 4 bytes = 1 GiB per fp32 logits copy, which the chunked loss never holds.
    assert peaks[True] < peaks[False] - 2**30


def test_fp16_checkpoints_hold_the_gradient_scaler_and_resume(tmp_path):
    """Colab's T4 trains in fp16: the GradScaler state is part of every checkpoint and comes back on resume."""
    model = jl.inject(_model(128).float(), r=8, targets="all-linear")
    run = jl.train(model, ["the quick brown fox jumps over the lazy dog."] * 32, tokenizer=tiny_tokenizer(),
                   steps=4, lr=1e-3, batch=8, eval=0, precision="fp16", output_dir=str(tmp_path),
                   background=False)  # fmt: skip
    assert run.state == "finished" and (run.checkpoint / "scaler.pt").exists()
    more = jl.resume(model, steps=6, background=False)
    assert more.state == "finished" and more.step == 6


def test_offloaded_checkpoints_lower_peak_memory_and_train_the_same(tmp_path):
    """``ckpt: offload`` keeps the layer inputs in pinned host memory: less device memory than plain
    checkpointing, the same losses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    data = [{"input_ids": torch.randint(3, 1000, (2048,)).tolist()} for _ in range(8)]
    peaks, curves = {}, {}
    for ckpt in (True, "offload"):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=8, vocab_size=1000)  # fmt: skip
        model = jl.inject(LlamaForCausalLM(config).to("cuda", torch.bfloat16), r=8, targets="all-linear")
        before = _reset_peak()
        run = jl.train(model, data, steps=3, batch=4, seq=2048, eval=0, ckpt=ckpt, output_dir=str(tmp_path / str(ckpt)),
                       background=False, scheduler="constant", warmup=0, kernels="none")  # fmt: skip
        peaks[ckpt], curves[ckpt] = (
            torch.cuda.max_memory_allocated() - before,
            [h["loss"] for h in run.history],
        )
        del model, run  # the run holds its model: kept, the first model would count in the second run's peak
    # 8 layers × 4 × 2048 tokens × 1024 hidden × 2 bytes = 128 MiB of checkpoints, all but ~one layer's offloaded
    assert peaks["offload"] < peaks[True] - 64 * 2**20
    assert curves["offload"] == pytest.approx(curves[True], rel=2e-2)


def test_step_events_carry_the_gpus_own_memory_figures(tmp_path):
    """The progress widget's GPU panel reads torch.cuda's counters through the run's events (no fake source)."""
    events = []
    model = jl.inject(_model(128), r=8, targets="all-linear")
    run = jl.train(model, ["the quick brown fox jumps over the lazy dog."] * 32, tokenizer=tiny_tokenizer(),
                   steps=6, batch=8, eval=0, output_dir=str(tmp_path), background=False, observers=events.append)  # fmt: skip
    assert run.state == "finished"
    start = next(e.data for e in events if e.kind == "start")
    capacity = torch.cuda.get_device_properties(0).total_memory
    assert start["memory_capacity"] == capacity and 0 < start["memory_allocated"] < capacity
    logged = [e.data for e in events if e.kind == "step" and e.data.get("memory_allocated") is not None]
    assert logged and all(0 < d["memory_allocated"] <= d["memory_peak"] <= capacity for d in logged)
    assert next(e.data for e in events if e.kind == "end")["memory_peak"] >= logged[-1]["memory_allocated"]
