"""Image and audio records: the shapes an image or a clip may take, the columns found or named, and the one-line
errors for what cannot be trained on — each leaving the model and the files as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import jupyter_lora as jl
from jupyter_lora.core.data import prepare_data
from jupyter_lora.data_preview import preview_data
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
    write_wav,
)
from tests.model_state import assert_model_unchanged, model_snapshot, tree_snapshot

pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")


def test_every_image_shape_gives_the_same_pixels(tmp_path):
    array = shapes(1)[0]["image"]
    Image.fromarray(array).save(tmp_path / "a.png")
    forms = [
        array,  # H×W×C uint8
        np.moveaxis(array, -1, 0),  # C×H×W
        array.astype(np.float32) / 255,  # floats in [0, 1]
        torch.from_numpy(array),
        Image.fromarray(array),
        str(tmp_path / "a.png"),
        {"bytes": (tmp_path / "a.png").read_bytes(), "path": None},  # a datasets Image dict
    ]
    data = [{"img": form, "y": i % 2} for i, form in enumerate(forms)]
    prepared = prepare_data(data, vit_processor(), task="IMAGE_CLS", eval=0, label_column="y")
    assert prepared.unit == "images" and prepared.train_units == len(forms)
    assert all(ex["size"] == (16, 16) for ex in prepared.train)
    pixels = prepared.collate(prepared.train)["pixel_values"]
    assert pixels.shape == (len(forms), 3, 16, 16)
    for row in pixels[1:]:
        torch.testing.assert_close(row, pixels[0])


def test_audio_forms_and_a_wav_file_agree(tmp_path):
    clip = tone(440.0, 0.3)
    path = write_wav(tmp_path / "a.wav", clip)
    data = [
        {"speech": clip, "sampling_rate": RATE, "label": 0},
        {"speech": {"array": clip, "sampling_rate": RATE}, "sampling_rate": None, "label": 1},
        {"speech": str(path), "sampling_rate": None, "label": 0},
        {"speech": (clip * 32767).astype(np.int16), "sampling_rate": RATE, "label": 1},  # PCM integers
    ]
    prepared = prepare_data(data, wav2vec2_extractor(), task="AUDIO_CLS", eval=0)
    assert prepared.train_units == pytest.approx(4 * 0.3)
    values = prepared.collate(prepared.train)["input_values"]
    for row in values[1:]:
        torch.testing.assert_close(row, values[0], atol=2e-3, rtol=0)  # 16-bit rounding only


def test_prepared_media_splits_by_seed_and_keeps_no_decoded_features():
    prepared = prepare_data(tones(20), wav2vec2_extractor(), task="AUDIO_CLS", eval=5, seed=3)
    again = prepare_data(tones(20), wav2vec2_extractor(), task="AUDIO_CLS", eval=5, seed=3)
    other = prepare_data(tones(20), wav2vec2_extractor(), task="AUDIO_CLS", eval=5, seed=4)
    held = [ex["record"] for ex in prepared.eval]
    assert held == [ex["record"] for ex in again.eval] != [ex["record"] for ex in other.eval]
    assert len(prepared.train) == 15
    assert all(
        set(ex) == {"source", "record", "media", "rate", "seconds", "size", "label"} for ex in prepared.train
    )
    assert "seconds of audio" in repr(prepared)


def test_the_preview_summarises_media(tmp_path):
    report = preview_data(vit(), shapes(12), processor=vit_processor(), eval=0.25)
    text = repr(report)
    print(text)
    assert "images" in text and "16×16" in text and "circle 6" in text and "square 6" in text
    assert "9 train · 3 eval" in text
    audio = repr(preview_data(whisper(), spoken(4), processor=whisper_processor(), eval=0))
    assert "4 clips, 2.0 s in all" in audio and "transcripts" in audio
    assert "<" in report._repr_html_()


# ------------------------------------------------------------------------------------------------ errors


def _bad_png(tmp_path):
    path = tmp_path / "broken.png"
    Image.fromarray(shapes(1)[0]["image"]).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])  # the header, and pixel data cut short
    return path


ERRORS = [
    (
        "wrong-image-column",
        "image",
        lambda tmp: [{"picture_file": r["image"], "y": r["label"]} for r in shapes(4)],
        {},
        r"no `image` column for the images; columns: picture_file, y — set image_column: NAME \(`picture_file`\?\)",
    ),
    (
        "misspelled-image-column",
        "image",
        lambda tmp: shapes(4),
        {"image_column": "imag"},
        r"`image_column`='imag' is not a column of `data` \(columns: image, label\)\. Did you mean `image`\?",
    ),
    (
        "no-label-column",
        "image",
        lambda tmp: [{"image": r["image"]} for r in shapes(4)],
        {},
        r"no `label` column for the class labels; columns: image — set label_column",
    ),
    (
        "undecodable-image-file",
        "image",
        lambda tmp: [*shapes(3), {"image": str(_bad_png(tmp)), "label": "circle"}],
        {},
        r"`data\[3\]`: the image '.*broken.png' cannot be",
    ),
    (
        "not-an-image-file",
        "image",
        lambda tmp: [{"image": str(write_wav(tmp / "x.wav", tone(440.0))), "label": 0}, *shapes(3)],
        {},
        r"`data\[0\]`: '.*x.wav' is a sound file \(WAV\), not an image",
    ),
    (
        "missing-image-file",
        "image",
        lambda tmp: [*shapes(2), {"image": "nowhere.png", "label": 0}],
        {},
        r"`data\[2\]`: image file not found: 'nowhere.png'",
    ),
    (
        "wrong-sampling-rate",
        "audio",
        lambda tmp: [*tones(3), {"audio": tone(440.0), "sampling_rate": 8000, "label": "low"}],
        {},
        r"`data\[3\]`: the audio is sampled at 8000 Hz and the model's feature extractor expects 16000 Hz\. "
        r"Resample it first",
    ),
    (
        "wrong-wav-rate",
        "audio",
        lambda tmp: [{"audio": str(write_wav(tmp / "slow.wav", tone(440.0), rate=22050)), "label": 0}],
        {},
        r"`data\[0\]`: the audio is sampled at 22050 Hz .* expects 16000 Hz",
    ),
    (
        "broken-wav",
        "audio",
        lambda tmp: (
            [{"audio": str(tmp / "noise.wav"), "label": 0}]
            if (tmp / "noise.wav").write_bytes(b"RIFF....garbage")
            else []
        ),
        {},
        r"`data\[0\]`: '.*noise.wav' cannot be read as a WAV file",
    ),
    (
        "audio-not-samples",
        "audio",
        lambda tmp: [{"audio": "a text, not a clip", "label": 0}],
        {},
        r"`data\[0\]`: audio file not found: 'a text, not a clip'",
    ),
    (
        "missing-processor",
        "image-no-processor",
        lambda tmp: shapes(4),
        {},
        r"reads images and needs its processor.*processor=AutoImageProcessor",
    ),
    (
        "audio-column-for-images",
        "image",
        lambda tmp: shapes(4),
        {"audio_column": "image"},
        r"`audio_column`='image' is for audio records; this is image_cls data: set image_column",
    ),
]


@pytest.mark.parametrize(
    ("kind", "make", "settings", "match"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_bad_media_is_refused_before_step_one(tmp_path, kind, make, settings, match):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = make(data_dir)
    if kind.startswith("image"):
        model, processor = jl.inject(vit(), r=4), vit_processor()
    else:
        model, processor = jl.inject(wav2vec2(), r=4), wav2vec2_extractor()
    if kind == "image-no-processor":
        processor = None
    before, files = model_snapshot(model), tree_snapshot(tmp_path)
    with pytest.raises(jl.UsageError, match=match) as err:
        jl.train(
            model,
            data,
            processor=processor,
            steps=2,
            background=False,
            output_dir=str(tmp_path / "run"),
            **settings,
        )
    assert "\n" not in str(err.value)
    assert_model_unchanged(before, model)
    assert tree_snapshot(tmp_path) == files


def test_asr_needs_a_processor_with_a_tokenizer(tmp_path):
    model = jl.inject(whisper(), r=4)
    before = model_snapshot(model)
    with pytest.raises(jl.UsageError, match=r"Speech recognition needs a processor that holds a tokenizer"):
        jl.train(
            model,
            spoken(4),
            processor=whisper_processor().feature_extractor,
            steps=1,
            output_dir=str(tmp_path / "r"),
        )
    assert_model_unchanged(before, model)
    assert not (tmp_path / "r").exists()


def test_whisper_refuses_clips_longer_than_its_window():
    long = [{"audio": tone(440.0, 1.5), "sampling_rate": RATE, "text": "low"}]
    with pytest.raises(
        jl.UsageError, match=r"`data\[0\]` is 1.5 s long and this feature extractor reads the first 1 s"
    ):
        prepare_data(long, whisper_processor(), task="ASR")
