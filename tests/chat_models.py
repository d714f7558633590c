"""Tiny models and tokenizers for the chat's tests: a tokenizer with a chat template, an adapter that changes the
outputs, and a random model made to write words without end (to watch a reply stream, and stop it)."""

from __future__ import annotations

import copy
import time

import torch

import jupyter_lora as jl
from jupyter_lora.testing import tiny_model, tiny_tokenizer

# A small chat template in the usual shape: role markers, the end-of-turn token, the generation prompt.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB = 98  # the tiny tokenizer's ids: every id the model generates decodes to a character


def chat_tokenizer():
    """The tiny character tokenizer with ``TEMPLATE`` as its chat template."""
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def randomize_lora_b(model, seed: int = 1) -> None:
    """LoRA B starts at zero (the adapter changes nothing); give it values so that it does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def adapted_lm(arch: str = "llama", **overrides):
    """(a tiny model with an adapter that changes its outputs, an untouched copy of its base model)."""
    if arch == "llama":
        overrides.setdefault("max_position_embeddings", 256)
    base = tiny_model(arch, vocab_size=VOCAB, **overrides)
    reference = copy.deepcopy(base)
    model = jl.inject(base, r=4, targets="all-linear")
    randomize_lora_b(model)
    return model, reference


def talk_slowly(model, seconds: float) -> None:
    """Make the random model write words (spaces likely: the streamer sends text a word at a time) without end
    (no end-of-sequence token), each token ``seconds`` late: a reply long enough to watch it stream and stop it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    space, eos = tiny_tokenizer().convert_tokens_to_ids(" "), base.generation_config.eos_token_id

    def hook(module, args, out):
        time.sleep(seconds)
        out = out.clone()
        out[..., space] += 4.0
        out[..., eos] = float("-inf")
        return out

    base.lm_head.register_forward_hook(hook)
