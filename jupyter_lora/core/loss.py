"""Causal-LM loss without the full logits tensor.

transformers computes ``logits = lm_head(hidden)`` for every token and then upcasts them to fp32 for the loss: at
batch 8 × seq 1024 and a 32k vocabulary that is 1 GiB per fp32 copy, several copies at the peak. Here the loss is
computed over chunks of tokens, each chunk's logits made, used and dropped inside ``torch.utils.checkpoint`` — so
backward recomputes them one chunk at a time instead of keeping them all. Same numbers (a sum of per-token
cross-entropies), a fraction of the memory. The fused kernels of liger-kernel / cut-cross-entropy do the same on
the GPU without the recomputation; this pure-PyTorch version runs everywhere, which is why it is written here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .modelinfo import base_model_of, embedding_layers, is_peft_model

__all__ = ["CHUNKED_LOSS_MODEL_TYPES", "chunked_causal_lm_loss", "supports_chunked_loss"]

# Architectures whose LM forward is exactly `lm_head(backbone(...).last_hidden_state)` then cross-entropy: no logit
# soft-capping or scaling (Gemma 2/3, Cohere, Granite have those and use the standard path).
CHUNKED_LOSS_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2", "starcoder2", "stablelm"}
)


def _parts(peft_model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    base = base_model_of(peft_model)
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = embedding_layers(base)[1]
    if backbone is None or head is None:
        return None
    return backbone, head


def supports_chunked_loss(peft_model: nn.Module) -> bool:
    """Whether ``chunked_causal_lm_loss`` computes exactly this model's loss (not for prompt learning: the
    virtual tokens come from PEFT's wrapper, which the chunked loss does not call)."""
    if is_peft_model(peft_model) and getattr(peft_model.active_peft_config, "is_prompt_learning", False):
        return False
    base = base_model_of(peft_model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    return model_type in CHUNKED_LOSS_MODEL_TYPES and _parts(peft_model) is not None


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(
    peft_model: nn.Module, batch: dict[str, Any], chunk_tokens: int = 4096, divide_by: Any = None
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (input_ids, labels, attention_mask or position_ids), as the
    model's own forward would return it, computed ``chunk_tokens`` tokens at a time. ``divide_by``: the label
    tokens of the whole accumulated batch (the Trainer's ``num_items_in_batch``) instead of this batch's."""
    backbone, head = _parts(peft_model)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    labels = batch["labels"]
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    count = (y != -100).sum().clamp(min=1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        part_y = y[start : start + chunk_tokens]
        part_h = h[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, part_h, part_y, head, use_reentrant=False)
        else:
            total = total + _chunk_loss(part_h, part_y, head)
    return total / (divide_by if divide_by is not None else count)
