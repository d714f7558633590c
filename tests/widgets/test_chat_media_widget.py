"""The chat widgets of image, audio and speech models without a kernel or browser: a file set on the ``FileUpload``
as the front end sends it (``set_state`` with the upload's JSON), a path typed in the box, and the thumbnail, clip
length, probabilities table and transcripts shown; mistakes in the status line, with the model unchanged."""

from __future__ import annotations

import html
import io
import re

import ipywidgets as w
import numpy as np
import pytest
from media_models import (
    PITCHES,
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
from jupyter_lora.widgets.chat import ClassifierWidget, TranscriptWidget


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _upload(widget, name: str, mime: str, data: bytes) -> None:
    """What the front end sends when a file is chosen: the upload's JSON state (content as a memoryview)."""
    widget.upload.set_state(
        {
            "value": [
                {
                    "name": name,
                    "type": mime,
                    "size": len(data),
                    "content": memoryview(data),
                    "last_modified": 0,
                }
            ]
        }
    )


def _shown_probs(widget) -> dict[str, list[float]]:
    """side -> the probabilities the table shows, in label order."""
    table = widget.table.value
    sides = re.findall(r"<th class='jl-cls-(\w+)'>", table)
    probs = [float(x) for x in re.findall(r"class='jl-cls-prob'>([\d.]+)<", table)]
    return {side: probs[k :: len(sides)] for k, side in enumerate(sides)}


def test_an_uploaded_image_shows_its_thumbnail_and_the_probabilities(tmp_path):
    model = adapted(vit, labels=("circle", "square"))[0]
    ns = {"model": model}
    widget = jl.chat(model, processor=vit_processor(), variable="model", namespace=ns)
    assert isinstance(widget, ClassifierWidget)
    assert widget.upload.accept == "image/*" and not hasattr(widget, "text")
    assert widget.upload in widget.box.children[1].children and widget.path in widget.box.children[1].children

    circle = _png(shapes(2)[1]["image"])
    _upload(widget, "circle.png", "image/png", circle)  # classified at once
    result = widget.result
    assert result is not None, widget.status.value
    want = widget.conversation.classify(circle)
    assert result.probs == want.probs and result.labels == ("circle", "square")
    assert re.findall(r"class='jl-cls-label'>(\w+)<", widget.table.value) == ["circle", "square"]
    shown = _shown_probs(widget)
    assert list(shown) == ["adapter", "base"]
    for side in shown:
        assert shown[side] == pytest.approx([round(p, 3) for p in result.probs[side]], abs=1e-9)
    assert result.probs["adapter"] != pytest.approx(result.probs["base"], abs=1e-4)
    thumb, what = widget.preview.children
    assert isinstance(thumb, w.Image) and thumb.value == circle and thumb.format == "png"
    assert "circle.png · image 16×16" in html.unescape(what.value)

    # a path typed in the box wins over the upload; its file's bytes are the thumbnail
    square = tmp_path / "square.jpg"
    Image.fromarray(shapes(1)[0]["image"]).save(square, format="JPEG")
    widget.path.value = str(square)
    widget.classify_button.click()
    assert widget.result.probs == widget.conversation.classify(str(square)).probs != result.probs
    assert widget.preview.children[0].value == square.read_bytes()
    assert widget.preview.children[0].format == "jpeg"

    # from Python: an array is drawn as a PNG
    widget.classify(shapes(1)[0]["image"])
    assert Image.open(io.BytesIO(widget.preview.children[0].value)).size == (16, 16)


def test_mistakes_show_in_the_status_line_and_change_nothing(tmp_path):
    model = adapted(vit)[0]
    widget = jl.chat(model, processor=vit_processor())
    before = model_snapshot(model)
    widget.classify_button.click()
    assert "Upload an image or type the path of one, then press Classify." in widget.status.value
    widget.path.value = str(tmp_path / "missing.png")
    widget.classify_button.click()
    assert "`input`: image file not found" in widget.status.value and widget.result is None
    widget.path.value = ""
    _upload(widget, "notes.png", "image/png", b"not an image at all")
    assert "is not an image file PIL can read" in widget.status.value
    assert widget.result is None and widget.table.value == "" and widget.preview.children == ()
    assert_model_unchanged(before, model)
    _upload(widget, "fine.png", "image/png", _png(shapes(1)[0]["image"]))
    assert widget.status.value == "" and widget.result is not None


def test_an_uploaded_clip_shows_its_length_and_the_probabilities(tmp_path):
    model = adapted(wav2vec2, labels=("high", "low"))[0]
    widget = jl.chat(model, processor=wav2vec2_extractor())
    assert isinstance(widget, ClassifierWidget) and widget.upload.accept == "audio/*"
    wav = write_wav(tmp_path / "low.wav", tone(PITCHES["low"], 0.75)).read_bytes()
    _upload(widget, "low.wav", "audio/wav", wav)
    assert widget.result is not None, widget.status.value
    assert widget.result.probs == widget.conversation.classify(wav).probs
    assert sum(widget.result.probs["adapter"]) == pytest.approx(1.0, abs=1e-6)
    player, what = widget.preview.children
    assert isinstance(player, w.Audio) and player.value == wav
    assert "<div class='jl-media-duration'>0.75 s</div>" in what.value
    assert list(_shown_probs(widget)) == ["adapter", "base"]

    _upload(widget, "shape.png", "image/png", _png(shapes(1)[0]["image"]))
    assert "'shape.png' is an image (PNG), not audio" in widget.status.value, widget.status.value
    assert widget.result is None and widget.table.value == "" and widget.preview.children == ()


def test_speech_recognition_shows_each_clips_transcripts_side_by_side(tmp_path):
    model = adapted(whisper)[0]
    ns = {"speech": model}
    widget = jl.chat(model, processor=whisper_processor(), max_new_tokens=5, variable="speech", namespace=ns)
    assert isinstance(widget, TranscriptWidget) and widget.upload.accept == "audio/*"
    high = write_wav(tmp_path / "high.wav", tone(PITCHES["high"])).read_bytes()
    _upload(widget, "high.wav", "audio/wav", high)
    first = widget.result
    assert first is not None, widget.status.value
    assert first.texts == widget.conversation.transcribe(high).texts
    assert first.texts["adapter"] != first.texts["base"]

    widget.max_new_tokens.value = 2  # the slider is the conversation's setting
    assert widget.conversation.settings["max_new_tokens"] == 2
    widget.path.value = str(write_wav(tmp_path / "low.wav", tone(PITCHES["low"], 0.3)))
    widget.transcribe_button.click()
    second = widget.result
    assert [name for name, _ in widget.results] == ["high.wav", str(tmp_path / "low.wav")]
    assert "0.30 s" in widget.preview.children[-1].value

    shown = widget.transcript.value
    for side in ("adapter", "base"):
        column = shown.split(f"<div class='jl-chat-col jl-chat-{side}'>")[1].split("<div class='jl-chat-col")[
            0
        ]
        texts = [html.unescape(t) for t in re.findall(r"jl-asr-text'>(.*?)</div>", column)]
        assert texts == [r.texts[side] or "<i>(empty)</i>" for r in (first, second)]
        assert "high.wav · audio 0.50 s" in column
    assert "adapter &#x27;default&#x27;" in shown or "adapter 'default'" in shown

    before = model_snapshot(model)
    _upload(widget, "shape.png", "image/png", _png(shapes(1)[0]["image"]))
    assert widget.status.value and len(widget.results) == 2
    assert_model_unchanged(before, model)


def test_an_error_after_a_good_image_clears_what_was_shown_and_names_the_upload(tmp_path):
    widget = jl.chat(adapted(vit)[0], processor=vit_processor())
    good = _png(shapes(1)[0]["image"])
    for name, bad, said in (
        ("notes.png", b"just text, not an image", "'notes.png' is not an image file PIL can read"),
        ("cut.png", good[: len(good) // 2], "'cut.png' cannot be"),
        (
            "beep.wav",
            write_wav(tmp_path / "b.wav", tone(440.0)).read_bytes(),
            "is a sound file (WAV), not an",
        ),
    ):
        _upload(widget, "g16.png", "image/png", good)
        assert widget.result is not None and "g16.png · image 16×16" in html.unescape(
            widget.preview.children[-1].value
        )
        assert widget.table.value
        _upload(widget, name, "image/png", bad)
        assert said in widget.status.value, widget.status.value
        assert "(bytes)" not in widget.status.value
        assert widget.result is None and widget.table.value == "" and widget.preview.children == ()


def test_enter_in_the_path_box_runs_the_model_once(tmp_path):
    widget = jl.chat(adapted(vit)[0], processor=vit_processor())
    assert widget.path.continuous_update is False  # the value arrives on Enter
    image = tmp_path / "a.png"
    image.write_bytes(_png(shapes(1)[0]["image"]))
    calls = []
    classify = widget.conversation.classify
    widget.conversation.classify = lambda x: calls.append(x) or classify(x)
    widget.path.value = str(image)  # what Enter sends
    assert calls == [str(image)] and widget.result is not None
    assert "a.png · image 16×16" in html.unescape(widget.preview.children[-1].value)
    widget.classify_button.click()  # the press that made the box lose focus: already run
    assert len(calls) == 1
    widget.classify_button.click()  # a press of its own runs it again
    assert len(calls) == 2

    speech = jl.chat(adapted(whisper)[0], processor=whisper_processor(), max_new_tokens=2)
    speech.path.value = str(write_wav(tmp_path / "low.wav", tone(PITCHES["low"], 0.3)))
    assert [name for name, _ in speech.results] == [str(tmp_path / "low.wav")]
    speech.path.value = str(image)
    assert "is an image (PNG), not audio" in speech.status.value and speech.preview.children == ()
    assert len(speech.results) == 1


def test_the_panels_chat_tab_opens_the_upload_view_with_the_notebooks_processor():
    model = adapted(vit)[0]
    ns = {"model": model, "proc": vit_processor()}
    panel = jl.panel(model, variable="model", namespace=ns)
    chat = panel.open_chat()
    assert isinstance(chat, ClassifierWidget), panel.chat_message.value
    assert chat.conversation.processor is ns["proc"] and chat.upload.accept == "image/*"
    _upload(chat, "x.png", "image/png", _png(shapes(1)[0]["image"]))
    assert chat.result is not None and list(chat.result.probs) == ["adapter", "base"]
    assert panel.open_chat() is chat  # opening the tab again keeps it
