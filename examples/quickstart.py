"""Quickstart: plan, estimate, inject, train (the package's engine), compare, save, load and merge a LoRA adapter —
offline, on CPU, on a small Llama built from a config (random weights). Run with `make demo`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import jupyter_lora as jl
from jupyter_lora.display import render_text
from jupyter_lora.testing import tiny_tokenizer
from jupyter_lora.widgets.progress import TextProgress


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    print(f"model: Llama, {sum(p.numel() for p in model.parameters()):,} parameters (random weights)\n")

    # 1. What would an adapter on the attention projections of layers 1-3 do? Nothing changes yet.
    plan = jl.plan(model, r=8, targets="attention", layers="1-3")
    print(render_text(plan), end="\n\n")

    # 2. How much GPU memory would training take (batch 8 x seq 512, bf16)?
    print(render_text(jl.estimate(model, plan, seq=512, batch=8, dtype="bf16")), end="\n\n")

    # 3. Inject (all linear layers, and the LM head: this toy model's head is random). The variable now holds a
    #    PeftModel; outputs are unchanged until it trains (B starts at 0).
    batch = torch.randint(0, config.vocab_size, (8, 64))
    with torch.no_grad():
        before = model(batch).logits
    model = jl.inject(model, r=8, targets="all-linear, lm_head")
    with torch.no_grad():
        assert torch.allclose(model(batch).logits, before, atol=1e-6)

    # 4. Train with the package's engine (in a notebook it runs in the background with a live widget; here it
    #    prints progress lines). The data is one sentence repeated: easy to see the adapter learn it.
    tok = tiny_tokenizer()
    texts = ["the quick brown fox jumps over the lazy dog. " * 4] * 8
    with tempfile.TemporaryDirectory() as runs:
        run = jl.train(model, texts, tokenizer=tok, steps=100, lr=1e-3, batch=4, eval=0, scheduler="constant",
                       warmup=0, output_dir=runs, observers=[TextProgress(output="terminal")], background=False)  # fmt: skip
    print(f"loss {run.history[0]['loss']:.3f} -> {run.history[-1]['loss']:.3f}")
    print(render_text(jl.compare(model, "the quick brown", tokenizer=tok, max_new_tokens=20)), end="\n\n")
    batch = tok(texts[:2], return_tensors="pt")["input_ids"]

    # 5. Save (atomic, PEFT format), load into a fresh copy of the base, merge.
    with tempfile.TemporaryDirectory() as tmp:
        path = jl.save(model, Path(tmp) / "adapter")
        print("saved:", sorted(p.name for p in path.iterdir()))
        with torch.no_grad():
            adapted = model(batch).logits
        torch.manual_seed(0)
        fresh = jl.load(LlamaForCausalLM(config), path)
        with torch.no_grad():
            print(
                "reloaded adapter reproduces outputs:",
                torch.allclose(fresh(batch).logits, adapted, atol=1e-5),
            )
        merged = jl.merge(fresh)
        with torch.no_grad():
            print(
                "merged model reproduces outputs:   ",
                torch.allclose(merged(batch).logits, adapted, atol=1e-4),
            )
        print("merged model type:", type(merged).__name__)
    print("\n" + render_text(jl.status(model)))


if __name__ == "__main__":
    main()
