"""The activation memory of image and audio encoders, for ``memory.estimate``: how many positions each encoder runs
over (image patches, audio frames), read from the model's config rather than from ``seq``.

An encoder is a stack of transformer layers (a "tower") whose sequence is fixed by its input:

* a ViT-style image encoder: ``(image_size / patch_size)²`` patches, plus its class (and distillation) tokens;
  AST cuts a spectrogram into patches with strides: ``f · t`` patches plus two tokens;
* Whisper's audio encoder: ``max_source_positions`` frames (30 s of audio: 3000 mel frames, halved by the
  stride-2 conv stem); its decoder runs over the text (``seq``) and attends to every encoder frame;
* wav2vec2 / HuBERT: the raw samples (16 kHz) through the conv feature extractor, each conv layer
  ``⌊(n − kernel) / stride⌋ + 1``, so about one frame per 20 ms;
* a vision-language model: the vision tower over its patches, and the language model over the text tokens plus
  the image tokens the vision tower hands it.

A tower keeps activations for backward only when gradients flow through it: when the adapter has modules in it
(frozen layers below the first adapted module see inputs without gradients, and keep nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..settings import SETTINGS
from .modelinfo import base_model_of

__all__ = ["AUDIO_SECONDS", "SAMPLING_RATE", "Tower", "media_towers"]

SAMPLING_RATE = 16_000  # what wav2vec2, HuBERT and Whisper's feature extractors take
AUDIO_SECONDS = SETTINGS[
    "audio_seconds"
].default  # Whisper's fixed window; the default clip for other encoders


@dataclass(frozen=True)
class Tower:
    """One transformer stack of a model and the positions it runs over per example.

    ``prefix``: the module path of its layers (the adapter's modules under it make it keep activations);
    ``dims``: its sizes, as ``sources.model_dims`` gives them for a text model; ``positions``: its sequence
    length per example; ``cross``: positions of another tower each layer attends to (a decoder's encoder frames);
    ``what``: a short description for the estimate's notes.
    """

    name: str
    prefix: str
    dims: dict[str, Any]
    positions: int
    what: str
    cross: int = 0


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _dims(config: Any, layers: int, rms: bool, gated: bool, prefix: str = "") -> dict[str, Any]:
    """A tower's sizes from its config (``prefix``: ``encoder_`` / ``decoder_`` for Whisper's per-side keys)."""
    h = int(_get(config, "hidden_size", "d_model", "embed_dim", default=0) or 0)
    heads = int(_get(config, f"{prefix}attention_heads", "num_attention_heads", "num_heads", default=1) or 1)
    inter = _get(config, f"{prefix}ffn_dim", "intermediate_size", "mlp_dim", default=None)
    return {
        "hidden": h,
        "intermediate": int(inter) if inter else 4 * h,
        "layers": layers,
        "heads": heads,
        "kv_heads": int(_get(config, "num_key_value_heads", default=heads) or heads),
        "head_dim": h // heads if heads else 0,
        "vocab": int(_get(config, "vocab_size", default=0) or 0),
        "gated_mlp": gated,
        "rms_norm": rms,
        "model_type": getattr(config, "model_type", None),
    }


def _extra_tokens(model: nn.Module, prefix: str) -> int:
    """Class / distillation tokens a vision embedding prepends (parameters named for them)."""
    n = 0
    for name, _ in model.named_parameters():
        if (name.startswith(prefix) and name.rsplit(".", 1)[-1] in ("cls_token", "class_embedding")) or (
            name.startswith(prefix) and name.rsplit(".", 1)[-1] == "distillation_token"
        ):
            n += 1
    return n


def image_positions(config: Any, model: nn.Module, prefix: str = "") -> tuple[int, str] | None:
    """(positions, description) of a ViT-style encoder: its patches plus the tokens it prepends."""
    size, patch = _get(config, "image_size"), _get(config, "patch_size")
    if not patch:  # a text model: decided from the config alone, without walking its parameters
        return None
    extra = _extra_tokens(model, prefix)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    if size and patch:
        side = int(size) // int(patch)
        return (
            side * side + extra,
            f"{side * side} patches of a {size}×{size} image (patch {patch}) + {extra} token(s)",
        )
    mel, length = _get(config, "num_mel_bins"), _get(config, "max_length")
    f_stride, t_stride = _get(config, "frequency_stride"), _get(config, "time_stride")
    if mel and length and f_stride and t_stride and patch:  # AST: strided patches of a spectrogram
        f = (int(mel) - int(patch)) // int(f_stride) + 1
        t = (int(length) - int(patch)) // int(t_stride) + 1
        return f * t + extra, f"{f * t} spectrogram patches ({f}×{t}) + {extra} token(s)"
    return None


def audio_frames(config: Any, seconds: float) -> int:
    """Frames a wav2vec2-style conv feature extractor makes of ``seconds`` of 16 kHz audio."""
    n = int(seconds * SAMPLING_RATE)
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=False):
        n = max(0, (n - int(kernel)) // int(stride) + 1)
    return n


def _trains_feature_encoder(model: nn.Module) -> bool:
    """Whether a wav2vec2-style conv feature encoder makes its output require grad in training (transformers'
    ``_requires_grad``, turned off by ``freeze_feature_encoder()``)."""
    return any(getattr(m, "_requires_grad", False) and hasattr(m, "conv_layers") for m in model.modules())


def feature_encoder_elements(model: nn.Module, config: Any, seconds: float) -> int:
    """Elements a wav2vec2-style conv feature encoder keeps for backward per example when gradients pass through
    it (0 once frozen): each conv's input, its output (which a norm keeps; group norm on the first layer only,
    layer norm on all), the GELU's input, and the feature projection's LayerNorm input and Linear input."""
    if not _trains_feature_encoder(base_model_of(model)):
        return 0
    n = int(seconds * SAMPLING_RATE)
    previous = n  # the raw samples, one channel
    total = 0
    norm = getattr(config, "feat_extract_norm", "group")
    for i, (kernel, stride) in enumerate(zip(config.conv_kernel, config.conv_stride, strict=False)):
        n = max(0, (n - int(kernel)) // int(stride) + 1)
        channels = int(config.conv_dim[i])
        has_norm = norm == "layer" or i == 0
        total += previous + channels * n * (2 if has_norm else 1)
        previous = channels * n
    return total + 2 * previous


def _prefixes(layer_lists: tuple[str, ...], *words: str) -> list[str]:
    return [
        p
        for p in layer_lists
        if any(w in p.split(".") or any(w in part for part in p.split(".")) for w in words)
    ]


def media_towers(
    model: nn.Module, layer_lists: tuple[str, ...], rms: bool, gated: bool, seq: int, audio_seconds: float
) -> tuple[list[Tower], list[str]] | None:
    """The towers of an image, audio or vision-language model and notes on their sequences; None for a text
    model (the text formulas apply)."""
    base = base_model_of(model)
    config = getattr(base, "config", None)
    if config is None:
        return None
    towers: list[Tower] = []
    notes: list[str] = []
    if (
        _get(config, "max_source_positions")
        and _get(config, "num_mel_bins")
        and _get(config, "encoder_layers")
    ):
        frames = int(config.max_source_positions)
        enc = _prefixes(layer_lists, "encoder")
        towers.append(
            Tower("encoder", enc[0] if enc else "", _dims(config, int(config.encoder_layers), rms, gated, "encoder_"),
                  frames, f"{frames} frames (30 s: {2 * frames} mel frames through the stride-2 conv stem)")
        )  # fmt: skip
        dec = _prefixes(layer_lists, "decoder")
        if dec:
            towers.append(
                Tower("decoder", dec[0], _dims(config, int(config.decoder_layers), rms, gated, "decoder_"), seq,
                      f"seq {seq} text tokens, attending to {frames} frames", cross=frames)
            )  # fmt: skip
        notes.append(f"audio encoder: {towers[0].what}; seq is the decoder's text only" if dec else
                     f"audio encoder: {towers[0].what}; seq is not used")  # fmt: skip
        return towers, notes
    if _get(config, "conv_stride") and _get(config, "conv_kernel") and _get(config, "num_hidden_layers"):
        frames = audio_frames(config, audio_seconds)
        layers = int(config.num_hidden_layers)
        prefix = layer_lists[0] if layer_lists else ""
        what = f"{frames} frames from {audio_seconds:g} s of 16 kHz audio (conv feature extractor)"
        towers.append(Tower("encoder", prefix, _dims(config, layers, rms, gated), frames, what))
        notes.append(f"audio encoder: {what}; seq is not used")
        if _trains_feature_encoder(base):
            notes.append(
                "the conv feature extractor keeps its outputs for backward (transformers lets gradients through it "
                "in training); model.freeze_feature_encoder() before training saves that memory"
            )
        return towers, notes
    vision = getattr(config, "vision_config", None)
    if vision is None:
        image = image_positions(config, base)
        if image is None:
            return None
        layers = int(_get(config, "num_hidden_layers", default=0) or 0)
        prefix = layer_lists[0] if layer_lists else ""
        towers.append(Tower("image encoder", prefix, _dims(config, layers, rms, gated), image[0], image[1]))
        notes.append(f"image encoder: {image[1]}; seq is not used")
        return towers, notes
    vision_lists = _prefixes(layer_lists, "vision")
    v_prefix = vision_lists[0] if vision_lists else ""
    image = image_positions(vision, base, v_prefix.split(".")[0] if v_prefix else "")
    if image is None:
        return None
    v_layers = int(_get(vision, "num_hidden_layers", "depth", default=0) or 0)
    towers.append(Tower("vision tower", v_prefix, _dims(vision, v_layers, rms, False), image[0], image[1]))
    text = getattr(config, "text_config", None)
    text_lists = [p for p in layer_lists if p not in vision_lists]
    if text is not None and text_lists:
        t_layers = int(_get(text, "num_hidden_layers", default=0) or 0)
        image_tokens = _image_tokens(config, vision, image[0])
        if _lm_head(base):
            positions = seq + image_tokens
            what = f"seq {seq} text tokens + {image_tokens} image tokens"
        else:  # a dual encoder (CLIP, SigLIP): the text tower reads the text alone
            positions, what = seq, f"seq {seq} text tokens"
        towers.append(Tower("text", text_lists[0], _dims(text, t_layers, rms, gated), positions, what))
        notes.append(f"vision tower: {image[1]}; language side: {what}")
    else:
        notes.append(f"vision tower: {image[1]}")
    return towers, notes


def _patch_grid(vision: Any) -> int | None:
    """The patches a ViT-style vision tower cuts one image into (``(image_size / patch_size)²``)."""
    size, patch = _get(vision, "image_size"), _get(vision, "patch_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return (int(size) // int(patch)) ** 2 if size and patch else None


def _image_tokens(config: Any, vision: Any, tower_positions: int) -> int:
    """The image tokens one image puts in a vision-language model's language sequence, decided as its processor
    decides them: Gemma 3's ``mm_tokens_per_image``; Idefics3's patch grid shrunk by pixel shuffle
    (``scale_factor²``); LLaVA-style models the vision tower's patch grid as the feature-select strategy keeps it
    (``default`` drops the class token, ``full`` keeps it) — their ``image_seq_length`` is only the processor's
    default, for 336-pixel images; else the count the config itself gives (``image_seq_length``,
    ``num_image_tokens``, ``num_query_tokens``), else the tower's positions."""
    if _get(config, "mm_tokens_per_image"):
        return int(config.mm_tokens_per_image)
    grid = _patch_grid(vision)
    scale = _get(config, "scale_factor")
    if grid and scale:
        return max(1, grid // (int(scale) ** 2))
    strategy = _get(config, "vision_feature_select_strategy")
    if grid and strategy in ("default", "full"):
        return grid if strategy == "default" else tower_positions
    own = _get(config, "image_seq_length", "num_image_tokens", "num_query_tokens")
    return int(own) if own else tower_positions


def _lm_head(model: nn.Module) -> bool:
    from .modelinfo import embedding_layers

    return embedding_layers(model)[1] is not None
