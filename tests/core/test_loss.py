"""The chunked causal-LM loss gives the model's own loss and gradients without materialising all logits."""

from __future__ import annotations

import pytest
import torch

import jupyter_lora as jl
from jupyter_lora.core.data import prepare_data
from jupyter_lora.core.errors import UsageError
from jupyter_lora.core.loss import chunked_causal_lm_loss, supports_chunked_loss
from jupyter_lora.testing import tiny_model, tiny_tokenizer

TEXTS = ["the quick brown fox", "jumps over", "the lazy dog and the cat", "hello"]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "phi3"])
def test_chunked_loss_matches_the_model(arch, packing):
    model = jl.inject(tiny_model(arch), r=4, targets="all-linear, lm_head")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    data = prepare_data(TEXTS, tiny_tokenizer(), seq=64, eval=0, packing=packing)
    batch = data.collate(data.train)
    assert supports_chunked_loss(model)

    reference = model(**batch, **data.forward_kwargs).loss
    reference.backward()
    expected = _grads(model)
    model.zero_grad()

    loss = chunked_causal_lm_loss(model, batch, chunk_tokens=7)  # several chunks, a ragged last one
    loss.backward()
    got = _grads(model)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


def test_training_with_chunked_loss_follows_the_same_curve(tmp_path):
    settings = dict(steps=6, lr=1e-3, batch=2, eval=0, seed=0, tokenizer=tiny_tokenizer(), background=False)
    plain = jl.train(jl.inject(tiny_model("llama"), r=4), TEXTS * 3, output_dir=str(tmp_path / "a"),
                     chunked_loss=False, **settings)  # fmt: skip
    chunked = jl.train(jl.inject(tiny_model("llama"), r=4), TEXTS * 3, output_dir=str(tmp_path / "b"),
                       chunked_loss=True, **settings)  # fmt: skip
    assert [h["loss"] for h in chunked.history] == pytest.approx([h["loss"] for h in plain.history], rel=1e-4)


def test_unsupported_models_are_refused_when_forced():
    model = jl.inject(tiny_model("gpt2"), r=4)
    assert not supports_chunked_loss(model)
    with pytest.raises(UsageError, match="chunked_loss: true"):
        jl.train(
            model, TEXTS, tokenizer=tiny_tokenizer(), steps=1, eval=0, chunked_loss=True, background=False
        )


def test_chunked_loss_runs_under_the_same_mixed_precision_as_the_model(tmp_path):
    """The Trainer's mixed precision wraps the model's forward; the chunked loss calls the backbone itself and must
    run in the same autocast, else the fp32 adapter weights pull every LoRA product (and its saved input) to fp32:
    measured on an H200, 16% slower and 4.6 GiB more memory than the model's own loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=500)  # fmt: skip
    data = [{"input_ids": torch.randint(3, 500, (32,)).tolist()} for _ in range(8)]
    dtypes = {}
    for chunked in (False, True):
        model = jl.inject(LlamaForCausalLM(config).to(torch.bfloat16), r=8, targets="all-linear")
        seen = set()
        for name, module in model.named_modules():
            if name.endswith("lora_A.default"):
                module.register_forward_hook(lambda mod, args, out, seen=seen: seen.add(out.dtype))
        jl.train(model, data, steps=2, batch=4, seq=32, eval=0, precision="bf16", chunked_loss=chunked,
                 output_dir=str(tmp_path / str(chunked)), background=False)  # fmt: skip
        dtypes[chunked] = seen
    assert dtypes[True] == dtypes[False] == {torch.bfloat16}
