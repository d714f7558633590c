"""inject, plan, save/load, merge and unload on models whose input is not token ids — images (ViT, CLIP, SigLIP),
audio features (Whisper, Speech2Text, AST) and raw audio (wav2vec2, HuBERT) — each run on its own inputs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError
from jupyter_lora.core.modelinfo import base_model_of, detect_task

_VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=16,
    patch_size=8,
)
_TEXT = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=16,
)
_AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
              conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
              vocab_size=20, num_labels=3)  # fmt: skip


def _whisper_config() -> T.WhisperConfig:
    return T.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=32,
        vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, num_labels=3,
    )  # fmt: skip


def _speech2text_config() -> T.Speech2TextConfig:
    return T.Speech2TextConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, input_feat_per_channel=8, input_channels=1, conv_channels=16,
        conv_kernel_sizes=(5, 5), num_conv_layers=2, max_source_positions=64, max_target_positions=32,
        vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip


def _features(g):
    return {"input_features": torch.randn(2, 8, 32, generator=g)}


def _features_decoder(g):
    return {**_features(g), "decoder_input_ids": torch.tensor([[1, 5, 6], [1, 7, 8]])}


def _pixels(g):
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def _pixels_text(g):
    return {**_pixels(g), "input_ids": torch.randint(3, 100, (2, 6), generator=g)}


def _samples(g):
    return {"input_values": torch.randn(2, 400, generator=g)}


ARCHITECTURES = {
    "WhisperForConditionalGeneration": (lambda: T.WhisperForConditionalGeneration(_whisper_config()), _features_decoder),
    "WhisperModel": (lambda: T.WhisperModel(_whisper_config()), _features_decoder),
    "WhisperForAudioClassification": (lambda: T.WhisperForAudioClassification(_whisper_config()), _features),
    "Speech2TextForConditionalGeneration": (
        lambda: T.Speech2TextForConditionalGeneration(_speech2text_config()),
        lambda g: {"input_features": torch.randn(2, 20, 8, generator=g), "decoder_input_ids": torch.tensor([[2, 5], [2, 7]])},
    ),
    "CLIPModel": (
        lambda: T.CLIPModel(T.CLIPConfig(text_config=_TEXT, vision_config=_VISION, projection_dim=16)), _pixels_text
    ),
    "CLIPVisionModel": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**_VISION)), _pixels),
    "SiglipModel": (lambda: T.SiglipModel(T.SiglipConfig(text_config=_TEXT, vision_config=_VISION)), _pixels_text),
    "ViTModel": (lambda: T.ViTModel(T.ViTConfig(**_VISION)), _pixels),
    "ViTForImageClassification": (lambda: T.ViTForImageClassification(T.ViTConfig(**_VISION, num_labels=3)), _pixels),
    "ASTForAudioClassification": (
        lambda: T.ASTForAudioClassification(
            T.ASTConfig(**{**_VISION, "patch_size": 16}, num_mel_bins=32, max_length=48, frequency_stride=16,
                        time_stride=16, num_labels=3)
        ),
        lambda g: {"input_values": torch.randn(2, 48, 32, generator=g)},
    ),
    "Wav2Vec2Model": (lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(**_AUDIO)), _samples),
    "Wav2Vec2ForCTC": (lambda: T.Wav2Vec2ForCTC(T.Wav2Vec2Config(**_AUDIO)), _samples),
    "Wav2Vec2ForSequenceClassification": (
        lambda: T.Wav2Vec2ForSequenceClassification(T.Wav2Vec2Config(**_AUDIO)), _samples
    ),
    "HubertForCTC": (lambda: T.HubertForCTC(T.HubertConfig(**_AUDIO)), _samples),
}  # fmt: skip
NAMES = sorted(ARCHITECTURES)


def _build(name: str):
    make, inputs = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = make().eval()
    return model, inputs(torch.Generator().manual_seed(1))


def _out(model, inputs, positional: bool = False) -> torch.Tensor:
    main = base_model_of(model).main_input_name
    with torch.no_grad():
        if positional:
            rest = {k: v for k, v in inputs.items() if k != main}
            out = model(inputs[main], **rest)
        else:
            out = model(**inputs)
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise AssertionError(type(out))


def _randomize_b(peft_model) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_inject_keeps_outputs_on_the_models_own_inputs(name, targets):
    model, inputs = _build(name)
    before = _out(model, inputs)
    settings = {"r": 4} if targets is None else {"r": 4, "targets": targets}
    the_plan = jl.plan(model, **settings)
    peft_model = jl.inject(model, plan=the_plan).eval()
    assert torch.equal(_out(peft_model, inputs), before)  # B is zero at init
    assert torch.equal(_out(peft_model, inputs, positional=True), before)
    assert peft_model.get_nb_trainable_parameters() == (the_plan.trainable_params, the_plan.total_params)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("preset", ["attention", "mlp", "all-linear", "qv"])
def test_plan_with_each_preset(name, preset):
    model, _ = _build(name)
    try:
        the_plan = jl.plan(model, targets=preset)
    except UsageError as exc:  # a preset may select nothing here; it must say so, not crash
        assert preset in str(exc) or "match" in str(exc), exc
        return
    assert the_plan.targets and the_plan.trainable_params > 0


@pytest.mark.parametrize("name", NAMES)
def test_merge_and_unload(name):
    model, inputs = _build(name)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = jl.inject(model, r=4).eval()
    _randomize_b(peft_model)
    adapted = _out(peft_model, inputs)
    unloaded = jl.unload(peft_model)
    assert unloaded.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in unloaded.state_dict().items())

    model, inputs = _build(name)
    peft_model = jl.inject(model, r=4).eval()
    _randomize_b(peft_model)
    merged = jl.merge(peft_model)
    torch.testing.assert_close(_out(merged, inputs), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_save_and_peft_from_pretrained_round_trip(name, tmp_path):
    from peft import PeftModel

    model, inputs = _build(name)
    peft_model = jl.inject(model, r=4).eval()
    _randomize_b(peft_model)
    adapted = _out(peft_model, inputs)
    jl.save(peft_model, tmp_path / "adapter")
    fresh, _ = _build(name)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert torch.equal(_out(reloaded, inputs), adapted)
    fresh, _ = _build(name)
    loaded = jl.load(fresh, tmp_path / "adapter").eval()
    assert torch.equal(_out(loaded, inputs), adapted)


def test_generate_after_inject_on_speech_seq2seq():
    model, inputs = _build("WhisperForConditionalGeneration")
    features = {"input_features": inputs["input_features"]}
    with torch.no_grad():
        before = model.generate(**features, max_new_tokens=3, do_sample=False)
    peft_model = jl.inject(model, r=4).eval()
    with torch.no_grad():
        after = peft_model.generate(**features, max_new_tokens=3, do_sample=False)
    assert torch.equal(after, before)


def test_tasks_and_heads_of_audio_models():
    ctc, _ = _build("Wav2Vec2ForCTC")
    assert detect_task(ctc).kind == "CTC" and detect_task(ctc).heads == ("lm_head",)
    audio_cls, _ = _build("WhisperForAudioClassification")
    info = detect_task(audio_cls)
    # the encoder is the pretrained backbone (under a name other than base_model_prefix), not a fresh head
    assert info.kind == "AUDIO_CLS" and "encoder" not in info.heads and "classifier" in info.heads
    whisper, _ = _build("WhisperForConditionalGeneration")
    info = detect_task(whisper)
    assert info.kind == "SEQ_2_SEQ_LM" and info.task_type is None and info.main_input == "input_features"


def test_a_task_type_whose_wrapper_cannot_pass_the_inputs_is_refused():
    model, _ = _build("WhisperForConditionalGeneration")
    with pytest.raises(UsageError, match="input_features"):
        jl.plan(model, task_type="SEQ_2_SEQ_LM")


def test_an_adapter_saved_with_a_text_task_type_loads_into_a_speech_model(tmp_path):
    model, inputs = _build("WhisperForConditionalGeneration")
    peft_model = jl.inject(model, r=4).eval()
    _randomize_b(peft_model)
    adapted = _out(peft_model, inputs)
    jl.save(peft_model, tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["task_type"] = "SEQ_2_SEQ_LM"  # as written by code that took the task from the model class
    config_path.write_text(json.dumps(config))
    fresh, _ = _build("WhisperForConditionalGeneration")
    loaded = jl.load(fresh, tmp_path / "a").eval()
    assert torch.equal(_out(loaded, inputs), adapted)


def test_compare_on_a_speech_model_says_it_takes_audio():
    model, _ = _build("WhisperForConditionalGeneration")
    peft_model = jl.inject(model, r=4)
    with pytest.raises(UsageError, match=r"reads audio and needs its processor.*processor="):
        jl.compare(peft_model, "hello", tokenizer=lambda text, **_: {"input_ids": torch.tensor([[1, 5]])})
