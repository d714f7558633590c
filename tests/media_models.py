"""Tiny image and audio models built from transformers configs, their processors made in code (nothing is
downloaded), and data they can learn: drawn squares and circles, sine tones of two pitches."""

from __future__ import annotations

import copy
import wave
from pathlib import Path

import numpy as np
import torch
import transformers as T

from jupyter_lora.testing import tiny_tokenizer

RATE = 16_000
PITCHES = {"low": 220.0, "high": 880.0}


def vit(seed: int = 0):
    torch.manual_seed(seed)
    config = T.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=2,
    )  # fmt: skip
    return T.ViTForImageClassification(config)


def vit_processor():
    return T.ViTImageProcessor(size={"height": 16, "width": 16})


def shapes(n: int, size: int = 16, seed: int = 0) -> list[dict]:
    """``n`` records, alternately a white square and a white circle on black (random place and size), as H×W×3
    uint8 arrays, labelled by name."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    records = []
    for i in range(n):
        circle = i % 2
        r = int(rng.integers(3, 6))
        cx, cy = rng.integers(r, size - r, 2)
        if circle:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        else:
            mask = (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
        image = np.zeros((size, size, 3), np.uint8)
        image[mask] = 255
        records.append({"image": image, "label": "circle" if circle else "square"})
    return records


def tone(pitch: float, seconds: float = 0.5, seed: int = 0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.5 * np.sin(2 * np.pi * pitch * t) + 0.01 * noise).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def whisper(seed: int = 0):
    torch.manual_seed(seed)
    config = T.WhisperConfig(
        vocab_size=100, num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=50,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1,
    )  # fmt: skip
    return T.WhisperForConditionalGeneration(config)


def whisper_processor():
    # 1-second windows: 100 frames of 16 mel bins, which the encoder's two convolutions halve to its 50 positions
    extractor = T.WhisperFeatureExtractor(feature_size=16, sampling_rate=RATE, chunk_length=1, hop_length=160)
    return T.WhisperProcessor(feature_extractor=extractor, tokenizer=tiny_tokenizer())


def wav2vec2(seed: int = 0):
    torch.manual_seed(seed)
    config = T.Wav2Vec2Config(
        vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, num_labels=2, classifier_proj_size=16,
    )  # fmt: skip
    return T.Wav2Vec2ForSequenceClassification(config)


def wav2vec2_extractor():
    return T.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=RATE, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )


def spoken(n: int) -> list[dict]:
    """``n`` records of a tone (a datasets Audio dict) and the name of its pitch as the transcript."""
    names = list(PITCHES)
    return [
        {"audio": {"array": tone(PITCHES[names[i % 2]], seed=i), "sampling_rate": RATE}, "text": names[i % 2]}
        for i in range(n)
    ]


def tones(n: int) -> list[dict]:
    """``n`` records of a tone of varying length (an array and a sampling_rate column) labelled by its pitch."""
    names = list(PITCHES)
    return [
        {"audio": tone(PITCHES[names[i % 2]], 0.25 + 0.05 * (i % 3), seed=i), "sampling_rate": RATE,
         "label": names[i % 2]}
        for i in range(n)
    ]  # fmt: skip


def adapted(build, labels=None):
    """(``build()`` with an adapter on every linear layer whose LoRA B is random, so it changes the outputs; an
    untouched copy of the base, in eval mode). ``labels``: class names for the classifier's config."""
    from chat_models import randomize_lora_b

    import jupyter_lora as jl

    base = build()
    if labels:
        base.config.id2label = dict(enumerate(labels))
        base.config.label2id = {name: i for i, name in enumerate(labels)}
    reference = copy.deepcopy(base).eval()
    model = jl.inject(base, r=4, targets="all-linear")
    randomize_lora_b(model)
    return model, reference
