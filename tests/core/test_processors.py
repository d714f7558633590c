"""Which preprocessor a run uses: the task from the model's class, the processor given or saved beside the model,
and the one-line errors when none fits."""

from __future__ import annotations

import pytest
import transformers
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

import jupyter_lora as jl
from jupyter_lora.core.data.processors import (
    find_processor,
    image_processor,
    is_processor,
    pick_preprocessor,
    text_tokenizer,
    training_task,
)
from jupyter_lora.settings import validate_one
from jupyter_lora.testing import tiny_model, tiny_tokenizer


def _vit():
    config = ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=2,
    )  # fmt: skip
    return ViTForImageClassification(config)


@pytest.mark.parametrize(
    ("cls", "config", "task"),
    [
        ("ViTForImageClassification", "ViTConfig", "IMAGE_CLS"),
        ("WhisperForConditionalGeneration", "WhisperConfig", "ASR"),
        ("Wav2Vec2ForCTC", "Wav2Vec2Config", "ASR"),
        ("Wav2Vec2ForSequenceClassification", "Wav2Vec2Config", "AUDIO_CLS"),
        ("LlavaForConditionalGeneration", "LlavaConfig", "CAUSAL_LM"),
        ("LlamaForCausalLM", "LlamaConfig", "CAUSAL_LM"),
        ("BertForSequenceClassification", "BertConfig", "SEQ_CLS"),
    ],
)
def test_the_task_comes_from_the_class(cls, config, task):
    model_cls = getattr(transformers, cls)
    model = model_cls.__new__(model_cls)  # the class decides; no weights needed
    assert training_task(model) == task


def test_task_spellings():
    assert validate_one("task", "image-classification") == "IMAGE_CLS"
    assert validate_one("task", "speech_recognition") == "ASR"
    assert validate_one("task", "Audio_CLS") == "AUDIO_CLS"
    with pytest.raises(jl.UsageError, match=r"`task` must be one of auto, .*got 'imag_cls'.*image_cls"):
        validate_one("task", "imag_cls")


def test_the_processor_saved_beside_the_model_is_found(tmp_path):
    model = _vit()
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    assert find_processor(model) is None
    model.config._name_or_path = str(tmp_path)
    found = find_processor(model)
    assert is_processor(found) and image_processor(found) is found and found.size["height"] == 16
    assert pick_preprocessor(model, "IMAGE_CLS", None, None).size == found.size


def test_an_image_model_without_a_processor_says_how_to_give_one():
    with pytest.raises(
        jl.UsageError, match=r"reads images and needs its processor.*processor=AutoImageProcessor"
    ):
        pick_preprocessor(_vit(), "IMAGE_CLS", None, None)


def test_a_tokenizer_is_not_a_processor():
    tok = tiny_tokenizer()
    assert not is_processor(tok) and text_tokenizer(tok) is tok
    with pytest.raises(jl.UsageError, match=r"`processor` must be a transformers processor.*tokenizer="):
        pick_preprocessor(_vit(), "IMAGE_CLS", None, tok)


def test_a_text_model_keeps_its_tokenizer_when_a_processor_is_about():
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    assert pick_preprocessor(model, "CAUSAL_LM", tok, None) is tok
    image_proc = ViTImageProcessor()
    assert pick_preprocessor(model, "CAUSAL_LM", tok, image_proc) is tok
