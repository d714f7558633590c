"""The memory estimate of image and audio encoders against the activation memory a training step really keeps:
the bytes of every tensor autograd saves for backward (counted once per storage), on the CPU, fp32."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError

# The estimate follows what a CUDA step keeps (SDPA saves q, k, v, the output and a logsumexp); on the CPU the
# same kernels keep about as much. Measured ratios (estimate / measured) for these configs: ViT 0.88,
# Whisper 0.84, wav2vec2 0.95 (0.78 with its feature encoder frozen): within this factor of the measurement.
TOLERANCE = 0.30
_NO_DROPOUT = dict(attn_implementation="sdpa")


def _saved_bytes(model, inputs) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
        value = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        loss = value.float().pow(2).mean()
    loss.backward()
    return sum(storages.values())


def _estimate_and_measure(model, inputs, seq: int = 8, **options) -> tuple[int, int, tuple[str, ...]]:
    torch.manual_seed(0)
    peft_model = jl.inject(model, r=8, dropout=0.0)
    peft_model.train()
    measured = _saved_bytes(peft_model, inputs)
    batch = next(iter(inputs.values())).shape[0]
    est = jl.estimate(peft_model, seq=seq, batch=batch, dtype="fp32", ckpt=False, **options)
    return est.breakdown["activations"], measured, est.notes


def _assert_close(estimate: int, measured: int) -> None:
    assert abs(estimate / measured - 1) <= TOLERANCE, f"estimate {estimate:,} B vs measured {measured:,} B"


def test_vit_activations_are_those_of_its_patches():
    config = T.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=224,
        patch_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_NO_DROPOUT,
    )  # fmt: skip
    torch.manual_seed(0)
    model = T.ViTModel(config, add_pooling_layer=False)
    estimate, measured, notes = _estimate_and_measure(model, {"pixel_values": torch.randn(2, 3, 224, 224)})
    _assert_close(estimate, measured)
    assert any("196 patches" in n and "+ 1 token" in n and "seq is not used" in n for n in notes), notes


def test_whisper_activations_are_those_of_its_encoder_frames_and_decoder_text():
    config = T.WhisperConfig(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=256, decoder_ffn_dim=256, num_mel_bins=16, max_source_positions=300, vocab_size=200,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, dropout=0.0, **_NO_DROPOUT,
    )  # fmt: skip
    torch.manual_seed(0)
    model = T.WhisperForConditionalGeneration(config)
    inputs = {"input_features": torch.randn(2, 16, 600), "decoder_input_ids": torch.randint(3, 200, (2, 32))}
    estimate, measured, notes = _estimate_and_measure(model, inputs, seq=32)
    _assert_close(estimate, measured)
    assert any("300 frames" in n and "600 mel frames" in n for n in notes), notes


def test_wav2vec2_activations_follow_the_audio_length_through_the_conv_feature_extractor():
    config = T.Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, conv_dim=(64,) * 7,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
        mask_time_prob=0.0, **_NO_DROPOUT,
    )  # fmt: skip
    torch.manual_seed(0)
    model = T.Wav2Vec2Model(config)
    estimate, measured, notes = _estimate_and_measure(
        model, {"input_values": torch.randn(2, 16000 * 2)}, audio_seconds=2
    )
    _assert_close(estimate, measured)
    assert any("99 frames from 2 s" in n for n in notes), notes
    # freezing the feature encoder takes its saved outputs away, in the estimate as in the measurement
    torch.manual_seed(0)
    frozen = T.Wav2Vec2Model(config)
    frozen.freeze_feature_encoder()
    estimate_f, measured_f, _ = _estimate_and_measure(
        frozen, {"input_values": torch.randn(2, 16000 * 2)}, audio_seconds=2
    )
    _assert_close(estimate_f, measured_f)
    assert estimate_f < estimate / 2


def test_audio_seconds_must_be_positive():
    model = T.Wav2Vec2Model(T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, conv_dim=(16,) * 7))  # fmt: skip
    with pytest.raises(UsageError, match="audio_seconds"):
        jl.estimate(model, audio_seconds=0)


def test_audio_seconds_is_a_setting_of_the_estimate_line(tmp_path):
    """`%lora estimate MODEL --audio-seconds 5` (and `audio_seconds:` in a body) reach the estimate; a bad value
    is the schema's one-line error."""
    from jupyter_lora.magics import parse as p

    command = p.parse("estimate model --audio-seconds 5", None)
    assert command.options["audio_seconds"] == 5.0
    command = p.parse("estimate model", "audio_seconds: 12")
    assert command.options["audio_seconds"] == 12
    model = T.Wav2Vec2Model(T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, conv_dim=(16,) * 7))  # fmt: skip
    with pytest.raises(UsageError, match=r"`audio_seconds`.*-1"):
        jl.estimate(model, audio_seconds=-1)
    assert jl.estimate(model, audio_seconds=5).total_bytes < jl.estimate(model, audio_seconds=10).total_bytes


@pytest.mark.parametrize("family", ["llava", "idefics3", "gemma3"])
def test_a_vision_language_model_counts_the_image_tokens_its_processor_puts_in_the_text(family):
    from PIL import Image

    from tests.vision_models import build

    model, processor = build(family)
    image_token = model.config.image_token_id if hasattr(model.config, "image_token_id") else None
    image_token = image_token if image_token is not None else model.config.image_token_index
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages)
    ids = processor(text=text, images=[Image.new("RGB", (32, 32), (255, 0, 0))])["input_ids"][0]
    real = sum(int(i) == image_token for i in ids)
    notes = " ".join(jl.estimate(model, seq=64).notes)
    assert f"seq 64 text tokens + {real} image tokens" in notes


def test_an_image_encoder_estimate_says_what_replaces_seq_has_no_kv_cache_and_notes_unused_audio_seconds():
    from tests.media_models import vit

    estimate = jl.estimate(vit(), batch=8, audio_seconds=5)
    assert "batch 8 × 16 patches" in repr(estimate) and "seq 512" not in repr(estimate)
    assert "kv_cache" not in estimate.inference
    assert any("audio_seconds 5 is not used: this model has no audio input" in n for n in estimate.notes)
    assert "kv_cache" in jl.estimate(jl.testing.tiny_model("llama")).inference
