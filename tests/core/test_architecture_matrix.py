"""One end-to-end pass per architecture, beyond those the other tests train: image classifiers (DeiT, BEiT, DINOv2,
Swin), audio classifiers (HuBERT, WavLM, AST, Whisper's encoder), speech recognition (Data2VecAudio-CTC,
Speech2Text), mixture-of-experts language models (Qwen3-MoE, OLMoE, GraniteMoE) and vision-language models
(PaliGemma, LLaVA-NeXT, Qwen2.5-VL), each built tiny from its config with its processor made in code.

Each case: inject (outputs unchanged: LoRA B starts at zero) -> train a few steps on data it can learn (the loss
falls) -> save, then ``PeftModel.from_pretrained`` and ``jupyter_lora.load`` on a fresh base give the trained
outputs, and unloading gives the base back exactly -> with a random B, ``merge`` gives the adapted outputs."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers as T
from peft import PeftModel

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError
from jupyter_lora.testing import tiny_model, tiny_tokenizer
from tests.media_models import RATE, shapes, spoken, tones, wav2vec2_extractor, whisper_processor
from tests.vision_models import BLUE, RED, TEMPLATE, TEXT, H, _tokenizer, records, square

pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")

VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=64, num_labels=2)  # fmt: skip
# raw-audio encoders: two convolutions (stride 5·4), one layer
AUDIO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
             conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
             num_labels=2, classifier_proj_size=16)  # fmt: skip
WHISPER = dict(vocab_size=100, num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1,
               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
               max_source_positions=50, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=1,
               decoder_start_token_id=1)  # fmt: skip


@dataclass
class Case:
    build: Callable[[], Any]  # a fresh base model (seeded: every call gives the same weights)
    processor: Any
    data: list
    inputs: dict  # the model's own inputs, for comparing outputs
    settings: dict  # train settings beyond the shared ones
    targets: str | None = None
    processor_arg: str = "processor"  # text models take their tokenizer as tokenizer=


def _seeded(make):
    def build():
        torch.manual_seed(0)
        return make().eval()

    return build


# ----------------------------------------------------------------------------------------------- images


def _image_case(make, processor) -> Case:
    data = shapes(32, size=32)
    pixels = processor(images=[r["image"] for r in data[:4]], return_tensors="pt")["pixel_values"]
    return Case(_seeded(make), processor, data, {"pixel_values": pixels}, {"lr": 1e-2})


def deit():
    size = {"height": 32, "width": 32}
    return _image_case(
        lambda: T.DeiTForImageClassification(T.DeiTConfig(**VIT)),
        T.DeiTImageProcessorPil(size=size, crop_size=size),
    )


def beit():
    size = {"height": 32, "width": 32}
    return _image_case(
        lambda: T.BeitForImageClassification(T.BeitConfig(**VIT)),
        T.BeitImageProcessorPil(size=size, crop_size=size, do_center_crop=False),
    )


def dinov2():
    return _image_case(
        lambda: T.Dinov2ForImageClassification(T.Dinov2Config(**VIT)),
        T.BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )


def swin():
    config = dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                  num_labels=2)  # fmt: skip
    return _image_case(
        lambda: T.SwinForImageClassification(T.SwinConfig(**config)),
        T.ViTImageProcessorPil(size={"height": 32, "width": 32}),
    )


# ----------------------------------------------------------------------------------------------- audio


def _audio_case(make, extractor, padding=True, targets=None, steps=30) -> Case:
    data = tones(32)
    features = extractor(
        [r["audio"] for r in data[:4]], sampling_rate=RATE, padding=padding, return_tensors="pt"
    )
    inputs = {k: v for k, v in features.items() if k in ("input_values", "input_features", "attention_mask")}
    return Case(_seeded(make), extractor, data, inputs, {"label_column": "label", "steps": steps}, targets)


def hubert():
    return _audio_case(
        lambda: T.HubertForSequenceClassification(T.HubertConfig(**AUDIO)), wav2vec2_extractor(), steps=15
    )


def _wavlm():
    return T.WavLMForSequenceClassification(T.WavLMConfig(**AUDIO, num_buckets=16, max_bucket_distance=64))


def wavlm():
    # its attention's q/k/v/out projections cannot take LoRA (see the test below): the MLPs and the rest
    return _audio_case(_wavlm, wav2vec2_extractor(), targets="all-linear", steps=15)


def ast():
    config = T.ASTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_mel_bins=16,
        max_length=32, patch_size=8, frequency_stride=8, time_stride=8, num_labels=2,
    )  # fmt: skip
    extractor = T.ASTFeatureExtractor(num_mel_bins=16, max_length=32, sampling_rate=RATE)
    return _audio_case(lambda: T.ASTForAudioClassification(config), extractor)


def whisper_cls():
    extractor = whisper_processor().feature_extractor
    return _audio_case(
        lambda: T.WhisperForAudioClassification(T.WhisperConfig(**WHISPER, num_labels=2)),
        extractor,
        padding="max_length",  # Whisper's encoder reads whole windows
    )


# ----------------------------------------------------------------------------------------------- speech recognition


def _char_tokenizer(tmp_path):
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: 3 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(vocab))
    return T.Wav2Vec2CTCTokenizer(str(path), pad_token="<pad>", unk_token="<unk>", word_delimiter_token="|")


def data2vec_ctc(tmp_path):
    tok = _char_tokenizer(tmp_path)
    processor = T.Wav2Vec2Processor(feature_extractor=wav2vec2_extractor(), tokenizer=tok)
    kwargs = {k: v for k, v in AUDIO.items() if k not in ("num_labels", "num_conv_pos_embeddings")}
    config = T.Data2VecAudioConfig(
        **kwargs, num_conv_pos_embeddings=1, conv_pos_kernel_size=16, vocab_size=len(tok),
        pad_token_id=tok.pad_token_id, ctc_loss_reduction="mean",
    )  # fmt: skip
    data = spoken(24)
    features = processor.feature_extractor(
        [r["audio"]["array"] for r in data[:4]], sampling_rate=RATE, padding=True, return_tensors="pt"
    )
    inputs = {"input_values": features["input_values"], "attention_mask": features["attention_mask"]}
    return Case(_seeded(lambda: T.Data2VecAudioForCTC(config)), processor, data, inputs, {"steps": 12})


def speech2text(tmp_path):
    extractor = T.Speech2TextFeatureExtractor(feature_size=16, num_mel_bins=16, sampling_rate=RATE)
    tok = tiny_tokenizer()
    processor = T.Speech2TextProcessor(feature_extractor=extractor, tokenizer=tok)
    config = T.Speech2TextConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, input_feat_per_channel=16, input_channels=1, conv_channels=16,
        conv_kernel_sizes=(5, 5), num_conv_layers=2, max_source_positions=64, max_target_positions=32,
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
    )  # fmt: skip
    data = spoken(24)
    features = extractor(
        [r["audio"]["array"] for r in data[:4]], sampling_rate=RATE, padding=True, return_tensors="pt"
    )
    inputs = {
        "input_features": features["input_features"],
        "attention_mask": features["attention_mask"],
        "decoder_input_ids": torch.full((4, 1), tok.eos_token_id),
    }
    return Case(_seeded(lambda: T.Speech2TextForConditionalGeneration(config)), processor, data, inputs, {})


# ----------------------------------------------------------------------------------------------- mixture of experts

SENTENCES = ["the quick brown fox jumps over the lazy dog."] * 16


def _moe_case(make) -> Case:
    tok = tiny_tokenizer()
    inputs = tok(SENTENCES[:2], return_tensors="pt")
    settings = {"lr": 3e-2, "batch": 4}
    return Case(_seeded(make), tok, SENTENCES, dict(inputs), settings, "qv, experts", "tokenizer")


def qwen3_moe():
    return _moe_case(lambda: tiny_model("qwen3_moe"))


def olmoe():
    return _moe_case(lambda: tiny_model("olmoe"))


def granitemoe():
    config = T.GraniteMoeConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    return _moe_case(lambda: T.GraniteMoeForCausalLM(config))


# ----------------------------------------------------------------------------------------------- vision-language


def _vlm_case(make, processor) -> Case:
    data = records(8)
    prompts, images = [], []
    for color in (RED, BLUE):
        turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "color?"}]}]
        prompts.append(processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False))
        images.append([square(color)])
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    return Case(_seeded(make), processor, data, dict(inputs), {"lr": 5e-2, "batch": 4, "steps": 24})


def paligemma():
    tok = _tokenizer("<image>")
    tok.bos_token = tok.eos_token  # PaliGemma's prompt starts with it
    image_id = tok.convert_tokens_to_ids("<image>")
    config = T.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", **H, image_size=32, patch_size=8, projection_dim=32),
        text_config=dict(model_type="gemma", **TEXT, num_key_value_heads=1, head_dim=8),
        image_token_id=image_id, projection_dim=32,
    )  # fmt: skip
    processor = T.PaliGemmaProcessor(
        image_processor=T.SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_seq_length=16),
        tokenizer=tok, chat_template=TEMPLATE.replace("IMG", "<image>"),
    )  # fmt: skip
    return _vlm_case(lambda: T.PaliGemmaForConditionalGeneration(config), processor)


def llava_next():
    tok = _tokenizer("<image>")
    config = T.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", **H, image_size=32, patch_size=8),
        text_config=dict(model_type="llama", **TEXT, num_key_value_heads=2),
        image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=[[32, 32]],
    )  # fmt: skip
    image_processor = T.LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32]]
    )
    processor = T.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=TEMPLATE.replace("IMG", "<image>"),
    )  # fmt: skip
    return _vlm_case(lambda: T.LlavaNextForConditionalGeneration(config), processor)


class _ImageOnlyQwen2_5_VLProcessor(T.Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without its video processor, which needs torchvision (not installed here)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


def qwen2_5_vl():
    names = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
    tok = _tokenizer(*names)
    ids = tok.convert_tokens_to_ids(names)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    config = T.Qwen2_5_VLConfig(
        text_config=dict(**TEXT, num_key_value_heads=2, bos_token_id=None, eos_token_id=1, rope_parameters=rope),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=16, out_hidden_size=32,
                           fullatt_block_indexes=[1]),
        vision_start_token_id=ids[0], image_token_id=ids[1], vision_end_token_id=ids[2], video_token_id=ids[3],
    )  # fmt: skip
    image_processor = T.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 256, "longest_edge": 256}
    )
    processor = _ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tok,
        chat_template=TEMPLATE.replace("IMG", "<|vision_start|><|image_pad|><|vision_end|>"),
    )  # fmt: skip
    return _vlm_case(lambda: T.Qwen2_5_VLForConditionalGeneration(config), processor)


CASES = {
    "deit": deit, "beit": beit, "dinov2": dinov2, "swin": swin,
    "hubert": hubert, "wavlm": wavlm, "ast": ast, "whisper-cls": whisper_cls,
    "data2vec-ctc": data2vec_ctc, "speech2text": speech2text,
    "qwen3_moe": qwen3_moe, "olmoe": olmoe, "granitemoe": granitemoe,
    "paligemma": paligemma, "llava_next": llava_next, "qwen2_5_vl": qwen2_5_vl,
}  # fmt: skip
NEEDS_TMP = {"data2vec-ctc", "speech2text"}


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _randomize_lora_b(model) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("arch", list(CASES))
def test_inject_train_save_load_merge(arch, tmp_path):
    case = CASES[arch](tmp_path) if arch in NEEDS_TMP else CASES[arch]()
    base = case.build()
    before = _logits(base, case.inputs)

    # 1. inject: LoRA B is zero, so the outputs are unchanged
    model = jl.inject(base, r=8, alpha=16, targets=case.targets)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model, case.inputs), before, rtol=0, atol=0)

    # 2. a few steps on data it can learn: the loss falls
    settings = {"steps": 30, "lr": 5e-3, "batch": 8, **case.settings}
    run = jl.train(
        model, case.data, **{case.processor_arg: case.processor}, eval=0, log_every=1, seed=0, warmup=0, scheduler="constant",
        background=False, output_dir=str(tmp_path / "run"), **settings,
    )  # fmt: skip
    assert run.state == "finished"
    losses = [h["loss"] for h in run.history]
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    print(f"{arch}: loss {first:.3f} -> {last:.3f}")
    assert len(losses) == settings["steps"] and last < first, losses

    # 3. save, then PEFT and jupyter_lora each load it onto a fresh base and give the trained outputs
    model.eval()
    trained = _logits(model, case.inputs)
    assert not torch.equal(trained, before)
    jl.save(model, tmp_path / "adapter")
    peft_loaded = PeftModel.from_pretrained(case.build(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_logits(peft_loaded, case.inputs), trained, rtol=0, atol=1e-5)
    loaded = jl.load(case.build(), tmp_path / "adapter")
    loaded.eval()
    load_diff = _max_diff(_logits(loaded, case.inputs), trained)
    assert load_diff <= 1e-5
    # unloading gives the base back exactly (task heads the run trained included)
    torch.testing.assert_close(_logits(jl.unload(loaded), case.inputs), before, rtol=0, atol=0)

    # 4. merge with a random B (so the adapter matters): the merged model gives the adapted outputs
    _randomize_lora_b(model)
    adapted = _logits(model, case.inputs)
    assert _max_diff(adapted, before) > 1e-3
    merged = jl.merge(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    merge_diff = _max_diff(_logits(merged, case.inputs), adapted)
    print(f"{arch}: merge max |diff| {merge_diff:.2e}, load max |diff| {load_diff:.2e}")
    assert merge_diff <= 1e-4 * max(1.0, adapted.abs().max().item())


def test_layers_whose_weight_is_read_directly_are_left_out_and_refused_by_name():
    """WavLM's attention hands its projections' weights to torch's multi_head_attention_forward and never calls the
    layers: a LoRA adapter there would leave the outputs as they are while training, and change them when merged."""
    model = _seeded(_wavlm)()
    attention = "wavlm.encoder.layers.0.attention"
    direct = {f"{attention}.{n}" for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
    for preset in ("attention", "all-linear"):
        assert not direct & set(jl.find_targets(model, preset))
    assert f"{attention}.gru_rel_pos_linear" in jl.find_targets(model, "attention")  # called: adaptable
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        UsageError, match=r"`targets` is needed: .*WavLMAttention reads its projections' weights"
    ):
        jl.inject(model)
    with pytest.raises(
        UsageError, match=r"selects `.*attention.q_proj`, whose weight WavLMAttention reads directly"
    ):
        jl.inject(model, targets="q_proj, v_proj")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any("lora" in n for n, _ in model.named_parameters())
