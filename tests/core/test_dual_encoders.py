"""Dual encoders (CLIP, SigLIP): presets cover both towers, ``vision`` is the vision tower, and training or chatting
with one says plainly what is not supported and what works."""

from __future__ import annotations

import pytest
import transformers as T

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError

H = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TOWERS = dict(text_config=dict(**H, vocab_size=99), vision_config=dict(**H, image_size=32, patch_size=8))


def clip():
    return T.CLIPModel(T.CLIPConfig(**TOWERS, projection_dim=16))


def siglip():
    return T.SiglipModel(T.SiglipConfig(**TOWERS))


def _towers(plan) -> set[str]:
    return {p.split(".")[0] for p in plan.targets}


@pytest.mark.parametrize("build", [clip, siglip])
def test_presets_cover_both_towers_and_vision_is_the_vision_tower(build):
    model = build()
    assert {"text_model", "vision_model"} <= _towers(jl.plan(model, targets="qv"))
    assert {"text_model", "vision_model"} <= _towers(jl.plan(model, targets="all-linear"))
    assert _towers(jl.plan(model, targets="vision")) == {"vision_model"}


@pytest.mark.parametrize(
    "build", [clip, lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**TOWERS["vision_config"]))]
)
def test_training_or_chatting_says_what_is_not_supported_and_what_works(build):
    model = jl.inject(build(), r=4)
    for call in (lambda: jl.train(model, data=[{"text": "a"}]), lambda: jl.chat(model)):
        with pytest.raises(UsageError) as caught:
            call()
        text = str(caught.value)
        assert "task is None" not in text
        assert "inject, save and load, and merge" in text and "CLIPForImageClassification" in text
        if isinstance(model.base_model.model, T.CLIPModel):
            assert "contrastive (image-text) training is not supported" in text
