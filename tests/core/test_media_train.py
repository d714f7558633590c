"""Training on images and audio on CPU with tiny models: a ViT tells squares from circles, Whisper transcribes tones
by pitch, wav2vec2 classifies them; each learns (seeded), reports its eval (accuracy for classifiers) and its
throughput in images or seconds of audio, and its saved adapter loads back to the same outputs."""

from __future__ import annotations

import statistics

import pytest
import torch

import jupyter_lora as jl
from jupyter_lora.widgets.progress.history import RunHistory
from tests.media_models import (
    PITCHES,
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

# Tiny random models need a higher learning rate than LoRA on a pretrained model.
pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")


def _train(model, data, processor, tmp_path, steps=24, **settings):
    events = []
    run = jl.train(
        model, data, processor=processor, steps=steps, lr=5e-3, batch=8, eval=8, eval_every=steps // 2,
        background=False, output_dir=str(tmp_path / "run"), seed=0, observers=events.append, **settings,
    )  # fmt: skip
    losses = [h["loss"] for h in run.history]
    return run, losses, events


def _fell(losses, k=5):
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    print(f"loss {first:.3f} -> {last:.3f}")
    return last < first


def _round_trip(model, fresh, inputs, tmp_path):
    """The saved adapter, loaded into a fresh copy of the base model, gives the trained model's outputs."""
    model.eval()
    with torch.no_grad():
        want = model(**inputs).logits
    jl.save(model, tmp_path / "adapter")
    loaded = jl.load(fresh, tmp_path / "adapter")
    loaded.eval()
    with torch.no_grad():
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, want)


def _history(events):
    history = RunHistory()
    for event in events:
        history.record(event)
    return history


def test_a_vit_learns_squares_from_circles(tmp_path):
    model = jl.inject(vit(), r=8, targets="all-linear")
    processor = vit_processor()
    run, losses, events = _train(model, shapes(48), processor, tmp_path)
    assert run.state == "finished"
    assert run.data.unit == "images" and run.data.label_names == ("circle", "square")
    assert len(run.data.train) == 40 and run.data.train_units == 40
    assert _fell(losses)
    accuracy = [e["accuracy"] for e in run.evals]
    print("eval accuracy", accuracy)
    assert len(accuracy) == 2 and all(0 <= a <= 1 for a in accuracy)
    start = next(e for e in events if e.kind == "start")
    assert start.data["unit"] == "images"
    history = _history(events)
    assert history.tokens == 24 * 8  # images seen: 24 steps of 8
    assert "images/s" in history.line_text() and "tok/s" not in history.summary_text()
    assert "192 images at" in history.summary_text()
    # the classes got the data's names
    assert jl.compare(model, shapes(1)[0], processor=processor).labels == ("circle", "square")
    inputs = run.data.collator.inputs(run.data.eval[:4], with_labels=False)
    _round_trip(model, vit(), inputs, tmp_path)


def test_whisper_learns_to_transcribe_tones(tmp_path):
    model = jl.inject(whisper(), r=8, targets="all-linear")
    processor = whisper_processor()
    run, losses, events = _train(model, spoken(24), processor, tmp_path)
    assert run.state == "finished" and run.data.task == "ASR"
    assert run.data.unit == "seconds of audio" and run.data.train_units == pytest.approx(16 * 0.5)
    # labels: the transcript and the end-of-text token, never the decoder start token (the model adds it)
    example = run.data.train[0]
    tok = processor.tokenizer
    assert example["labels"] == tok(list(PITCHES)[example["record"] % 2])["input_ids"] + [tok.eos_token_id]
    assert _fell(losses)
    assert [e["step"] for e in run.evals] == [12, 24]
    assert "s of audio/s" in _history(events).line_text()
    batch = run.data.collate(run.data.eval[:4])
    assert batch["input_features"].shape == (4, 16, 100)
    assert batch["labels"].shape[0] == 4
    comparison = jl.compare(
        model, {"array": tone(PITCHES["low"]), "sampling_rate": RATE}, processor=processor
    )
    assert comparison.kind == "generation" and isinstance(comparison.adapter, str)
    inputs = {
        "input_features": batch["input_features"],
        "decoder_input_ids": torch.ones((4, 1), dtype=torch.long),
    }
    _round_trip(model, whisper(), inputs, tmp_path)


def test_wav2vec2_learns_pitches_from_arrays_and_wav_files(tmp_path):
    records = tones(32)
    for i in range(0, 32, 4):  # every fourth clip from a .wav file (16-bit PCM), read with the wave module
        records[i]["audio"] = str(write_wav(tmp_path / f"clip{i}.wav", records[i]["audio"]))
        del records[i]["sampling_rate"]
    records = [{**r, "sampling_rate": r.get("sampling_rate")} for r in records]
    model = jl.inject(wav2vec2(), r=8, targets="all-linear")
    processor = wav2vec2_extractor()
    run, losses, _ = _train(model, records, processor, tmp_path, label_column="label")
    assert run.state == "finished" and run.data.task == "AUDIO_CLS"
    assert run.data.label_names == ("high", "low")
    assert _fell(losses)
    print("eval accuracy", [e["accuracy"] for e in run.evals])
    assert all("accuracy" in e for e in run.evals)
    batch = run.data.collate(run.data.eval)
    assert set(batch) == {"input_values", "attention_mask", "labels"}
    lengths = sorted(set(batch["attention_mask"].sum(-1).tolist()))
    assert len(lengths) > 1 and batch["input_values"].shape[1] == max(lengths)  # padded to the longest clip
    comparison = jl.compare(model, str(tmp_path / "clip0.wav"), processor=processor)
    assert comparison.kind == "classification" and comparison.labels == ("high", "low")
    assert sum(comparison.adapter_probs) == pytest.approx(1.0)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    _round_trip(model, wav2vec2(), inputs, tmp_path)
