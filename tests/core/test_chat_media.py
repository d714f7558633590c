"""``Conversation`` for image and audio models: ``classify`` an image or a clip given in any form a training record
takes, ``transcribe`` a clip, base vs adapter; the base side is the untouched model's own output, and every refusal
is one line that leaves the model as it was."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from media_models import (
    PITCHES,
    RATE,
    adapted,
    shapes,
    tone,
    vit,
    vit_processor,
    wav2vec2,
    wav2vec2_extractor,
    whisper,
    whisper_processor,
    write_wav,
)
from model_state import assert_model_unchanged, model_snapshot
from PIL import Image

import jupyter_lora as jl
from jupyter_lora.core import runs
from jupyter_lora.core.chat import Conversation, Transcription


def _probs(model, inputs) -> list[float]:
    with torch.no_grad():
        return model(**inputs).logits.softmax(-1)[0].tolist()


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------------------------- image classifier


def test_an_image_in_every_form_a_record_takes_gives_base_and_adapter_probabilities(tmp_path):
    model, reference = adapted(vit, labels=("circle", "square"))
    conversation = Conversation(model, processor=vit_processor())
    assert conversation.kind == "classification" and conversation.media == "image"
    array = shapes(2)[1]["image"]
    path = tmp_path / "circle.png"
    path.write_bytes(_png(array))
    pil = Image.fromarray(array)

    want = dict(vit_processor()(images=[pil], return_tensors="pt"))
    with torch.no_grad():
        adapter_want = model(**want).logits.softmax(-1)[0].tolist()
    base_want = _probs(reference, want)

    forms = {
        "pil": pil,
        "array": array,
        "tensor": torch.from_numpy(array).permute(2, 0, 1),  # C×H×W
        "path": str(path),
        "pathlib": path,
        "bytes": path.read_bytes(),
        "datasets Image dict": {"bytes": path.read_bytes(), "path": None},
        "record": {"image": str(path), "label": "circle"},
    }
    for form, value in forms.items():
        result = conversation.classify(value)
        assert result.text == "image 16×16", form
        assert result.labels == ("circle", "square"), form
        assert sum(result.probs["adapter"]) == pytest.approx(1.0, abs=1e-6), form
        assert sum(result.probs["base"]) == pytest.approx(1.0, abs=1e-6), form
        assert result.probs["base"] == pytest.approx(base_want, abs=1e-5), form
        assert result.probs["adapter"] == pytest.approx(adapter_want, abs=1e-5), form
        assert result.probs["adapter"] != pytest.approx(result.probs["base"], abs=1e-4), form
        assert result.adapter_name == "default"

    # a model without an adapter answers as itself
    plain = Conversation(reference, processor=vit_processor()).classify(pil)
    assert list(plain.probs) == ["base"] and plain.probs["base"] == pytest.approx(base_want, abs=1e-5)


def test_the_processor_saved_beside_the_model_is_found(tmp_path):
    vit().save_pretrained(tmp_path)
    vit_processor().save_pretrained(tmp_path)
    from transformers import ViTForImageClassification

    model = jl.inject(ViTForImageClassification.from_pretrained(tmp_path), r=4, targets="all-linear")
    conversation = Conversation(model)
    assert type(conversation.processor).__name__.startswith("ViTImageProcessor")
    assert sum(conversation.classify(shapes(1)[0]["image"]).probs["base"]) == pytest.approx(1.0, abs=1e-6)

    with pytest.raises(
        jl.UsageError, match=r"reads images and needs its processor.*AutoImageProcessor"
    ) as info:
        Conversation(jl.inject(vit(), r=4, targets="all-linear"))
    assert "\n" not in str(info.value)
    with pytest.raises(
        jl.UsageError, match=r"needs a processor with an image processor; got Wav2Vec2Feature"
    ):
        Conversation(model, processor=wav2vec2_extractor())


# ----------------------------------------------------------------------------------------------- audio classifier


def test_a_clip_in_every_form_gives_base_and_adapter_probabilities(tmp_path):
    model, reference = adapted(wav2vec2, labels=("high", "low"))
    conversation = Conversation(model, processor=wav2vec2_extractor())
    assert conversation.kind == "classification" and conversation.media == "audio"
    samples = tone(PITCHES["low"], 0.5)
    wav = write_wav(tmp_path / "low.wav", samples)
    # what the wav file holds (16-bit PCM), as the feature extractor would see it
    pcm = np.clip(samples, -1, 1) * 32767
    pcm = pcm.astype("<i2").astype(np.float32) / 32768.0
    want = dict(wav2vec2_extractor()(pcm, sampling_rate=RATE, return_tensors="pt"))
    base_want = _probs(reference, want)
    with torch.no_grad():
        adapter_want = model(**want).logits.softmax(-1)[0].tolist()

    forms = {
        "path": str(wav),
        "bytes": wav.read_bytes(),
        "Audio dict": {"array": pcm, "sampling_rate": RATE},
        "array": pcm,  # no rate: the feature extractor's
        "tensor": torch.from_numpy(pcm),
        "record": {"audio": pcm, "sampling_rate": RATE, "label": "low"},
    }
    for form, value in forms.items():
        result = conversation.classify(value)
        assert result.text == "audio 0.50 s", form
        assert result.labels == ("high", "low"), form
        assert sum(result.probs["adapter"]) == pytest.approx(1.0, abs=1e-6), form
        assert result.probs["base"] == pytest.approx(base_want, abs=1e-4), form
        assert result.probs["adapter"] == pytest.approx(adapter_want, abs=1e-4), form
        assert result.probs["adapter"] != pytest.approx(result.probs["base"], abs=1e-4), form


# ----------------------------------------------------------------------------------------------- speech recognition


def _greedy(model, processor, samples, max_new_tokens):
    features = processor.feature_extractor(samples, sampling_rate=RATE, return_tensors="pt")["input_features"]
    with torch.no_grad():
        ids = model.generate(input_features=features, max_new_tokens=max_new_tokens, do_sample=False)[0]
    return processor.tokenizer.decode(ids, skip_special_tokens=True)


def test_transcribe_gives_the_transcript_with_and_without_the_adapter(tmp_path):
    model, reference = adapted(whisper)
    processor = whisper_processor()
    conversation = Conversation(model, processor=processor, max_new_tokens=6)
    assert conversation.kind == "transcription" and conversation.media == "audio"
    samples = tone(PITCHES["high"])
    result = conversation.transcribe({"array": samples, "sampling_rate": RATE})
    assert isinstance(result, Transcription) and result.input == "audio 0.50 s"
    assert list(result.texts) == ["adapter", "base"]
    assert result.texts["base"] == _greedy(reference, processor, samples, 6)
    with torch.no_grad():
        features = processor.feature_extractor(samples, sampling_rate=RATE, return_tensors="pt")
        ids = model.generate(input_features=features["input_features"], max_new_tokens=6, do_sample=False)[0]
    assert result.texts["adapter"] == processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert result.texts["adapter"] != result.texts["base"]

    # max_new_tokens is the setting's; a wav file gives the same transcript as its samples
    conversation.configure(max_new_tokens=2)
    wav = write_wav(tmp_path / "high.wav", samples)
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").astype(np.float32) / 32768.0
    short = conversation.transcribe(str(wav))
    assert short.texts["base"] == _greedy(reference, processor, pcm, 2)
    assert len(short.texts["base"]) < len(result.texts["base"])

    plain = Conversation(reference, processor=processor, max_new_tokens=6).transcribe(samples)
    assert plain.texts == {"base": result.texts["base"]}


# ----------------------------------------------------------------------------------------------- refusals


@pytest.fixture
def vit_chat():
    model, _ = adapted(vit)
    return Conversation(model, processor=vit_processor())


def _refused(conversation, call, value, pattern):
    model = conversation.model
    model.train()  # the flags must come back as they were, too
    before = model_snapshot(model)
    with pytest.raises(jl.UsageError, match=pattern) as info:
        getattr(conversation, call)(value)
    assert "\n" not in str(info.value)
    assert_model_unchanged(before, model)
    assert all(m.training for m in model.modules())


def test_wrong_inputs_are_one_line_and_change_nothing(vit_chat, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    _refused(
        vit_chat,
        "classify",
        "a photo of a cat",
        r"\(ViTForImageClassification\) reads images, not text.*'a photo",
    )
    _refused(vit_chat, "classify", str(broken), r"`input`: '.*broken.png' is not an image file PIL can read")
    _refused(vit_chat, "classify", str(tmp_path / "gone.png"), r"`input`: image file not found: '.*gone.png'")
    _refused(vit_chat, "classify", {"text": "hi"}, r"record with keys \['text'\]; it needs one of image")
    _refused(vit_chat, "send", "hello", r"classifies images: it gives class probabilities, not replies")
    _refused(
        vit_chat, "transcribe", shapes(1)[0], r"classifies images.*not transcripts\. Use classify\(image\)"
    )

    audio = Conversation(adapted(wav2vec2)[0], processor=wav2vec2_extractor())
    image = Image.fromarray(shapes(1)[0]["image"])
    _refused(audio, "classify", image, r"`input`: Image of shape \(16, 16, 3\) is not audio")
    _refused(audio, "classify", "loud noise", r"reads audio, not text: give a clip")
    _refused(audio, "classify", str(tmp_path / "gone.wav"), r"audio file not found: '.*gone.wav'")
    not_wav = tmp_path / "noise.wav"
    not_wav.write_bytes(b"RIFF....WAVEjunk")
    _refused(audio, "classify", str(not_wav), r"noise.wav' cannot be read as a WAV file")
    _refused(
        audio, "classify", {"array": tone(220.0), "sampling_rate": 8000}, r"sampled at 8000 Hz.*expects 16000"
    )

    speech = Conversation(adapted(whisper)[0], processor=whisper_processor())
    _refused(speech, "classify", tone(220.0), r"recognises speech.*not class probabilities\. Use transcribe")
    _refused(speech, "send", "hi", r"recognises speech.*Use transcribe\(audio\)")
    _refused(speech, "transcribe", image, r"is not audio")


def test_a_model_in_training_is_refused(vit_chat):
    class Running:  # what the engine registers for a run in progress
        done, step, total_steps = False, 2, 8

    image = shapes(1)[0]["image"]
    assert runs.register(vit_chat.model, Running())
    try:
        _refused(vit_chat, "classify", image, r"Cannot classify while this model is training \(step 2/8\)")
        with pytest.raises(jl.UsageError, match=r"training \(step 2/8\)"):
            jl.chat(vit_chat.model, processor=vit_processor())
    finally:
        runs.finish(vit_chat.model)
    assert sum(vit_chat.classify(image).probs["adapter"]) == pytest.approx(1.0, abs=1e-6)

    speech = Conversation(adapted(whisper)[0], processor=whisper_processor(), max_new_tokens=2)
    assert runs.register(speech.model, Running())
    try:
        _refused(speech, "transcribe", tone(220.0), r"Cannot transcribe while this model is training")
    finally:
        runs.finish(speech.model)


def test_the_chat_follows_a_model_of_the_same_task_only(vit_chat):
    merged = jl.merge(vit_chat.model)
    vit_chat.use_model(merged)
    assert list(vit_chat.classify(shapes(1)[0]["image"]).probs) == ["base"]
    with pytest.raises(
        jl.UsageError,
        match=r"This chat is for task IMAGE_CLS and the new model \(WhisperForConditional.*\) is for ASR",
    ):
        vit_chat.use_model(whisper())
    assert vit_chat.model is merged
