"""What image, audio and speech models say about input they cannot use: the model's own auto class for a head of
the wrong size, the `labels` setting for negative ids, an image given to a speech model, floats outside [0, 1], and
a processor made for another checkpoint — each one line, before step 1, the model and files as they were."""

from __future__ import annotations

import io

import numpy as np
import pytest
import transformers as T
from PIL import Image

import jupyter_lora as jl
from jupyter_lora.core.chat import Conversation
from tests.media_models import (
    RATE,
    shapes,
    spoken,
    tone,
    tones,
    vit,
    vit_processor,
    wav2vec2,
    wav2vec2_extractor,
    whisper,
    whisper_processor,
)
from tests.model_state import assert_model_unchanged, model_snapshot, tree_snapshot

pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")


def _png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(shapes(1)[0]["image"]).save(out, format="PNG")
    return out.getvalue()


def _refused_training(tmp_path, model, data, processor, match):
    before, files = model_snapshot(model), tree_snapshot(tmp_path)
    with pytest.raises(jl.UsageError, match=match) as err:
        jl.train(
            model, data, processor=processor, steps=1, background=False, output_dir=str(tmp_path / "run")
        )
    assert "\n" not in str(err.value)
    assert_model_unchanged(before, model)
    assert tree_snapshot(tmp_path) == files
    return str(err.value)


def test_a_head_of_the_wrong_size_names_the_models_own_auto_class(tmp_path):
    three = [{**r, "label": ["a", "b", "c"][i % 3]} for i, r in enumerate(shapes(6))]
    message = _refused_training(
        tmp_path, jl.inject(vit(), r=4), three, vit_processor(), r"3 classes .* classifier head has 2"
    )
    assert "AutoModelForImageClassification.from_pretrained(..., num_labels=3" in message
    assert "SequenceClassification" not in message
    sounds = [{**r, "label": ["a", "b", "c"][i % 3]} for i, r in enumerate(tones(6))]
    message = _refused_training(
        tmp_path, jl.inject(wav2vec2(), r=4), sounds, wav2vec2_extractor(), r"3 classes"
    )
    assert "AutoModelForAudioClassification.from_pretrained(" in message


def test_a_negative_label_names_the_labels_setting(tmp_path):
    data = [{"image": r["image"], "label": -1 if i == 0 else i % 2} for i, r in enumerate(shapes(4))]
    message = _refused_training(
        tmp_path, jl.inject(vit(), r=4), data, vit_processor(), r"label -1 is negative"
    )
    assert "label2id" not in message and "`labels` setting" in message


def test_an_image_given_to_a_speech_model_is_said_to_be_an_image(tmp_path):
    speech = Conversation(jl.inject(whisper(), r=4), processor=whisper_processor())
    png = tmp_path / "g16.png"
    png.write_bytes(_png())
    for given in (_png(), str(png), {"bytes": _png(), "path": "g16.png"}):
        with pytest.raises(jl.UsageError, match=r"is an image \(PNG\), not audio") as err:
            speech.transcribe(given)
        assert "soundfile" not in str(err.value)
    model = jl.inject(whisper(), r=4)
    with pytest.raises(jl.UsageError, match=r"`prompt`: '.*g16.png' is an image \(PNG\), not audio"):
        jl.compare(model, str(png), processor=whisper_processor())
    # a real sound format that the standard library cannot read: the soundfile advice, naming the format
    flac = tmp_path / "clip.flac"
    flac.write_bytes(b"fLaC\x00\x00\x00\x22" + bytes(40))
    try:
        import soundfile  # noqa: F401
    except ImportError:
        with pytest.raises(jl.UsageError, match=r"clip.flac' is FLAC sound; .* needs the soundfile package"):
            speech.transcribe(str(flac))
    else:
        with pytest.raises(jl.UsageError, match=r"clip.flac' cannot be read as sound"):
            speech.transcribe(str(flac))
    # text in a file named like a sound file: neither an image nor the soundfile advice
    text = tmp_path / "notes.mp3"
    text.write_text("hello")
    with pytest.raises(jl.UsageError, match=r"notes.mp3' is not a sound file this can read") as err:
        speech.transcribe(str(text))
    assert "soundfile" not in str(err.value)


def test_a_sound_file_given_to_an_image_model_is_said_to_be_sound(tmp_path):
    from tests.media_models import write_wav

    chat = Conversation(jl.inject(vit(), r=4), processor=vit_processor())
    wav = write_wav(tmp_path / "beep.wav", tone(440.0))
    with pytest.raises(jl.UsageError, match=r"`input`: '.*beep.wav' is a sound file \(WAV\), not an image"):
        chat.classify(str(wav))
    with pytest.raises(jl.UsageError, match=r"`input`: 'upload.png' is not an image file PIL can read"):
        chat.classify({"bytes": b"just some text", "path": "upload.png"})


def test_floats_normalised_to_minus_one_one_are_refused_with_the_record(tmp_path):
    data = shapes(4)
    data[2] = {"image": data[2]["image"].astype(np.float32) / 127.5 - 1.0, "label": data[2]["label"]}
    message = _refused_training(
        tmp_path,
        jl.inject(vit(), r=4),
        data,
        vit_processor(),
        r"`data\[2\]`: the image's values run from -1\.00",
    )
    assert "floats in [0, 1]" in message and "(x + 1) / 2" in message
    chat = Conversation(jl.inject(vit(), r=4), processor=vit_processor())
    with pytest.raises(jl.UsageError, match=r"`input`: the image's values run from -1"):
        chat.classify(data[2]["image"])


def test_a_processor_for_another_image_size_is_refused_up_front(tmp_path):
    big = T.ViTImageProcessor(size={"height": 224, "width": 224})
    _refused_training(
        tmp_path,
        jl.inject(vit(), r=4),
        shapes(4),
        big,
        r"^The image processor makes 224×224 images and this model \(ViTForImageClassification\) takes 16×16 "
        r"\(config\.image_size\)",
    )
    chat = Conversation(jl.inject(vit(), r=4), processor=big)
    with pytest.raises(jl.UsageError, match=r"makes 224×224 images .* takes 16×16"):
        chat.classify(shapes(1)[0]["image"])
    # a model that reads any size (a convolutional one) is not refused
    resnet = T.ResNetForImageClassification(
        T.ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8, num_labels=2)
    )
    result = Conversation(resnet, processor=big).classify(shapes(1)[0]["image"])
    assert len(result.labels) == 2


def test_a_feature_extractor_for_another_mel_count_is_refused_up_front(tmp_path):
    extractor = T.WhisperFeatureExtractor(feature_size=32, sampling_rate=RATE, chunk_length=1, hop_length=160)
    processor = T.WhisperProcessor(feature_extractor=extractor, tokenizer=whisper_processor().tokenizer)
    _refused_training(
        tmp_path,
        jl.inject(whisper(), r=4),
        spoken(4),
        processor,
        r"^The feature extractor makes 32 mel bins and this model \(WhisperForConditionalGeneration\) takes 16 "
        r"\(config\.num_mel_bins\)",
    )
    speech = Conversation(jl.inject(whisper(), r=4), processor=processor)
    with pytest.raises(jl.UsageError, match=r"makes 32 mel bins .* takes 16"):
        speech.transcribe(tone(220.0))
    long = T.WhisperFeatureExtractor(feature_size=16, sampling_rate=RATE, chunk_length=30, hop_length=160)
    with pytest.raises(jl.UsageError, match=r"makes 3000 frames a clip and this model .* takes 100"):
        Conversation(
            jl.inject(whisper(), r=4),
            processor=T.WhisperProcessor(feature_extractor=long, tokenizer=whisper_processor().tokenizer),
        ).transcribe(tone(220.0))


def test_whisper_transcripts_print_no_generation_notices():
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()  # notices logged once per process show again
    model = jl.inject(whisper(), r=4)
    seen: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    hf_logger, level = logging.getLogger("transformers"), hf_logging.get_verbosity()
    hf_logger.addHandler(handler)
    hf_logging.set_verbosity_warning()  # transformers' default (another test may have quietened it)
    try:
        comparison = jl.compare(model, tone(220.0), processor=whisper_processor(), max_new_tokens=8)
        jl.compare(model, tone(220.0), processor=whisper_processor(), max_new_tokens=8)
        transcription = Conversation(model, processor=whisper_processor(), max_new_tokens=5).transcribe(
            tone(220.0)
        )
    finally:
        hf_logger.removeHandler(handler)
        hf_logging.set_verbosity(level)
    warned = [m for m in seen if "max_length" in m or "generation_config" in m]
    assert not warned, warned
    tokenizer = whisper_processor().tokenizer
    assert len(tokenizer(comparison.adapter, add_special_tokens=False)["input_ids"]) <= 8
    assert all(text is not None for text in transcription.texts.values())
