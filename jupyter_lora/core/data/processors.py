"""The model's preprocessor: a tokenizer for text, or a transformers processor for images and audio (an image
processor, a feature extractor, or a multimodal processor holding one of those and a tokenizer).

- ``training_task(model)``: what a run trains the model for, from its class (transformers' auto mappings);
- ``find_processor(model)``: the processor saved beside a model's weights (local folders only, never the network);
- ``text_tokenizer`` / ``image_processor`` / ``feature_extractor``: the part of a processor a step needs.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..errors import UsageError
from ..modelinfo import base_model_of

__all__ = [
    "CLASSIFY_TASKS",
    "MEDIA_TASKS",
    "feature_extractor",
    "find_processor",
    "image_processor",
    "is_processor",
    "is_vision_language",
    "pick_preprocessor",
    "text_tokenizer",
    "training_task",
]

# Tasks that train a classifier head on labels (the classes get names; eval reports accuracy).
CLASSIFY_TASKS = ("SEQ_CLS", "IMAGE_CLS", "AUDIO_CLS")

# Tasks whose inputs are images or audio: the processor turns each record into the model's own inputs.
MEDIA_TASKS = ("IMAGE_CLS", "AUDIO_CLS", "ASR")

# transformers' auto mapping -> the task a run trains (checked in this order: a class can sit in several).
_TASK_MAPPINGS = (
    (
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
        "CAUSAL_LM",
    ),  # vision-language chat: an LM that sees images
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "ASR"),
    ("MODEL_FOR_CTC_MAPPING_NAMES", "ASR"),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "AUDIO_CLS"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "IMAGE_CLS"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
)

_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "feature_extractor_config.json")


def _mapping(name: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in getattr(modeling_auto, name, {}).values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


def training_task(model: nn.Module) -> str | None:
    """The task a training run trains ``model`` for ("CAUSAL_LM", "SEQ_CLS", "IMAGE_CLS", "AUDIO_CLS", "ASR"),
    from its class; None when its class is none of these."""
    name = type(base_model_of(model)).__name__
    for mapping, task in _TASK_MAPPINGS:
        if name in _mapping(mapping):
            return task
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForImageClassification", "IMAGE_CLS"),
        ("ForAudioClassification", "AUDIO_CLS"),
        ("ForCTC", "ASR"),
        ("ForSpeechSeq2Seq", "ASR"),
    ):
        if name.endswith(suffix):
            return task
    return None


def is_vision_language(model: nn.Module) -> bool:
    """A language model that also reads images (its config has a vision tower: LLaVA, Qwen2-VL, SmolVLM, ...)."""
    config = getattr(base_model_of(model), "config", None)
    return getattr(config, "vision_config", None) is not None and training_task(model) == "CAUSAL_LM"


def _is_a(obj: Any, module: str, cls: str) -> bool:
    import importlib

    try:
        return isinstance(obj, getattr(importlib.import_module(module), cls))
    except (ImportError, AttributeError):
        return False


def is_processor(obj: Any) -> bool:
    """A transformers processor, image processor or feature extractor (not a plain tokenizer)."""
    return (
        _is_a(obj, "transformers.processing_utils", "ProcessorMixin")
        or _is_a(obj, "transformers.image_processing_base", "ImageProcessingMixin")
        or _is_a(obj, "transformers.feature_extraction_utils", "FeatureExtractionMixin")
    )


def text_tokenizer(preprocessor: Any) -> Any:
    """The tokenizer a preprocessor holds (a processor's ``tokenizer``), the tokenizer itself, or None."""
    if preprocessor is None:
        return None
    if _is_a(preprocessor, "transformers.processing_utils", "ProcessorMixin"):
        return getattr(preprocessor, "tokenizer", None)
    return None if is_processor(preprocessor) else preprocessor


def image_processor(preprocessor: Any) -> Any:
    """The image processor a preprocessor is or holds, or None."""
    if _is_a(preprocessor, "transformers.image_processing_base", "ImageProcessingMixin"):
        return preprocessor
    return getattr(preprocessor, "image_processor", None) if is_processor(preprocessor) else None


def feature_extractor(preprocessor: Any) -> Any:
    """The audio feature extractor a preprocessor is or holds, or None."""
    if _is_a(preprocessor, "transformers.feature_extraction_utils", "FeatureExtractionMixin") and not _is_a(
        preprocessor, "transformers.image_processing_base", "ImageProcessingMixin"
    ):
        return preprocessor
    return getattr(preprocessor, "feature_extractor", None) if is_processor(preprocessor) else None


def find_processor(model: Any) -> Any | None:
    """The processor saved beside ``model``'s weights (``AutoProcessor``, else ``AutoImageProcessor`` /
    ``AutoFeatureExtractor``), or None. Only local folders are read (``local_files_only=True``)."""
    base = base_model_of(model) if isinstance(model, nn.Module) else model
    config = getattr(base, "config", None)
    candidates = [getattr(config, "_name_or_path", None), getattr(base, "name_or_path", None)]
    for path in dict.fromkeys(c for c in candidates if isinstance(c, (str, os.PathLike)) and c):
        path = os.fspath(path)
        if not os.path.isdir(path) or not any(
            os.path.isfile(os.path.join(path, f)) for f in _PROCESSOR_FILES
        ):
            continue
        import transformers

        for loader in ("AutoProcessor", "AutoImageProcessor", "AutoFeatureExtractor"):
            try:
                found = getattr(transformers, loader).from_pretrained(path, local_files_only=True)
            except Exception:  # a partial or foreign folder: try the narrower loader, then ask the user
                continue
            if is_processor(found):
                return found
    return None


def pick_preprocessor(model: nn.Module, task: str, tokenizer: Any, processor: Any) -> Any:
    """The one preprocessor a run uses: ``processor`` (or a processor passed as ``tokenizer``) for image, audio
    and vision-language models, the tokenizer for text; found beside the model when not given."""
    if processor is not None and not is_processor(processor):
        raise UsageError(
            f"`processor` must be a transformers processor (AutoProcessor, AutoImageProcessor or "
            f"AutoFeatureExtractor), got {type(processor).__name__}. A tokenizer goes in tokenizer=."
        )
    if processor is not None and tokenizer is not None and text_tokenizer(processor) not in (None, tokenizer):
        raise UsageError(
            "Both `tokenizer` and `processor` are given and the processor holds its own tokenizer: pass only "
            "processor=."
        )
    media = task in MEDIA_TASKS or (task == "CAUSAL_LM" and is_vision_language(model))
    if not media:
        return tokenizer if tokenizer is not None else text_tokenizer(processor)
    chosen = processor if processor is not None else (tokenizer if is_processor(tokenizer) else None)
    if chosen is None:
        chosen = find_processor(model)
    if chosen is None and task == "CAUSAL_LM":
        return tokenizer  # a vision-language model trained on text only
    if chosen is None:
        kind = "AutoImageProcessor" if task == "IMAGE_CLS" else "AutoProcessor"
        raise UsageError(
            f"This model ({type(base_model_of(model)).__name__}, task {task}) reads "
            f"{'images' if task == 'IMAGE_CLS' else 'audio'} and needs its processor, and none was found beside "
            f"its weights: pass processor={kind}.from_pretrained(<the model's name or folder>) (in %%lora train: "
            "`processor: VAR`)."
        )
    return chosen
