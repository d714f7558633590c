"""The 4-bit and 8-bit flow on CUDA in bf16 (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import jupyter_lora as jl
from jupyter_lora.testing import tiny_inputs, tiny_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)  # fmt: skip
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("bits", [4, 8])
def test_kbit_flow_on_cuda(checkpoint, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    model, info = jl.load_base(checkpoint, bits)
    assert info.device == "cuda" and info.memory_after > info.memory_before
    planned = jl.plan(model, r=8, targets="all-linear")
    model = jl.inject(model, r=8, targets="all-linear")
    assert model.get_nb_trainable_parameters() == (planned.trainable_params, planned.total_params)
    run = jl.train(model, ["the quick brown fox jumps over the lazy dog."] * 32, tokenizer=tiny_tokenizer(),
                   steps=20, lr=3e-3, batch=8, eval=0, scheduler="constant", warmup=0, output_dir=str(tmp_path),
                   background=False)  # fmt: skip
    assert run.history[-1]["loss"] < run.history[0]["loss"]
    inputs = {k: v.cuda() for k, v in tiny_inputs(model).items()}
    with torch.no_grad():
        adapted = model(**inputs).logits.float()
    with pytest.warns(UserWarning, match="dequantised"):
        path = jl.save(model, tmp_path / "merged", merged=True)
    merged = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        got = merged(**inputs).logits.float()
    assert (got - adapted).abs().max() < 0.05 * adapted.abs().max()
