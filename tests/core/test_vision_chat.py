"""Vision-language chat training on tiny LLaVA, Qwen2-VL, Idefics3 (SmolVLM's architecture) and Gemma 3 models built
from configs, with processors built in code (an image processor, the character tokenizer with each family's image
tokens, a chat template that places the images)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from PIL import Image

import jupyter_lora as jl
from jupyter_lora.core.chat import Conversation
from jupyter_lora.core.data import prepare_data
from jupyter_lora.core.errors import TargetError, UsageError
from jupyter_lora.core.targets import index_model, resolve
from jupyter_lora.testing import tiny_model, tiny_tokenizer

# "|" ends a turn; IMG is replaced by each family's image placeholder.
CONTENT = (
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMG{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
)
TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0]|upper }}:" + CONTENT + "{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}|{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
)
# The same with the assistant's reply in a {% generation %} block (the "|" after it is not trained).
GEN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0]|upper }}:{% if m['role'] == 'assistant' %}{% generation %}"
    + CONTENT
    + "{{ eos_token }}{% endgeneration %}{% else %}"
    + CONTENT
    + "{% endif %}|{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)
pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")

H = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(**H, vocab_size=128, max_position_embeddings=256, pad_token_id=0)


def _tokenizer(*tokens: str, **named: str):
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(tokens)})
    if named:  # tokens the processor reads as tokenizer attributes (tokenizer.boi_token, ...)
        tok = T.PreTrainedTokenizerFast(
            tokenizer_object=tok._tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
            extra_special_tokens=named,
        )  # fmt: skip
    return tok


class _ImageOnlyQwen2VLProcessor(T.Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor, which needs torchvision (not installed here)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


def llava(template=TEMPLATE):
    tok = _tokenizer("<image>")
    config = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(**H, image_size=32, patch_size=8),
        text_config=T.LlamaConfig(**TEXT, num_key_value_heads=2),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    processor = T.LlavaProcessor(
        image_processor=T.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template.replace("IMG", "<image>"),
    )  # fmt: skip
    return T.LlavaForConditionalGeneration, config, processor


def qwen2_vl(template=TEMPLATE):
    names = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
    tok = _tokenizer(*names)
    ids = tok.convert_tokens_to_ids(names)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    config = T.Qwen2VLConfig(
        text_config=dict(**TEXT, num_key_value_heads=2, bos_token_id=None, eos_token_id=1, rope_parameters=rope),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2),
        vision_start_token_id=ids[0], image_token_id=ids[1], vision_end_token_id=ids[2], video_token_id=ids[3],
    )  # fmt: skip
    image_processor = T.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 256, "longest_edge": 256}
    )
    processor = _ImageOnlyQwen2VLProcessor(
        image_processor=image_processor, tokenizer=tok,
        chat_template=template.replace("IMG", "<|vision_start|><|image_pad|><|vision_end|>"),
    )  # fmt: skip
    return T.Qwen2VLForConditionalGeneration, config, processor


def idefics3(template=TEMPLATE):
    tok = _tokenizer("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
    config = T.Idefics3Config(
        vision_config=dict(**H, image_size=32, patch_size=8),
        text_config=dict(model_type="llama", **TEXT, num_key_value_heads=2),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    image_processor = T.Idefics3ImageProcessorPil(
        size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False
    )
    processor = T.Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=4,
        chat_template=template.replace("IMG", "<image>"),
    )  # fmt: skip
    return T.Idefics3ForConditionalGeneration, config, processor


def gemma3(template=TEMPLATE):
    tok = _tokenizer("<boi>", "<img>", "<eoi>", boi_token="<boi>", image_token="<img>", eoi_token="<eoi>")
    ids = tok.convert_tokens_to_ids(["<boi>", "<img>", "<eoi>"])
    config = T.Gemma3Config(
        text_config=dict(**TEXT, num_key_value_heads=1, head_dim=8, sliding_window=64),
        vision_config=dict(**H, image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=ids[0], image_token_index=ids[1], eoi_token_index=ids[2],
    )  # fmt: skip
    processor = T.Gemma3Processor(
        image_processor=T.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
        image_seq_length=4, chat_template=template.replace("IMG", "<boi>"),
    )  # fmt: skip
    return T.Gemma3ForConditionalGeneration, config, processor


FAMILIES = {"llava": llava, "qwen2_vl": qwen2_vl, "idefics3": idefics3, "gemma3": gemma3}


def build(family: str, template: str = TEMPLATE, seed: int = 0):
    model_cls, config, processor = FAMILIES[family](template)
    torch.manual_seed(seed)
    return model_cls(config).eval(), processor


def square(color) -> Image.Image:
    return Image.new("RGB", (16, 16), color)


RED, BLUE = (255, 0, 0), (0, 0, 255)


def records(n: int = 8) -> list[dict]:
    """Red and blue squares answered "red"/"blue": half in transformers' format, half in the shorthand."""
    out = []
    for k in range(n):
        color, word = (RED, "red") if k % 2 == 0 else (BLUE, "blue")
        if k % 4 < 2:
            user = [{"type": "image", "image": square(color)}, {"type": "text", "text": "color?"}]
            out.append(
                {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": word}]}
            )
        else:
            turns = [{"role": "user", "content": "<image>color?"}, {"role": "assistant", "content": word}]
            out.append({"messages": turns, "images": [square(color)]})
    return out


def logits(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


# ----------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("family", list(FAMILIES))
def test_presets_adapt_the_language_model_and_vision_adds_the_tower(family):
    model, _ = build(family)
    parts = index_model(model).language_parts
    assert len(parts) == 1 and parts[0].startswith("model.")
    for spec in (None, "attention", "mlp", "all-linear"):
        paths = resolve(model, spec)
        assert paths and all(p.startswith(parts[0] + ".") for p in paths), (spec, paths)
    vision = resolve(model, "vision")
    assert vision and not any(p.startswith(parts[0] + ".") for p in vision)
    assert set(resolve(model, "qv, vision")) == set(resolve(model, None)) | set(vision)


def test_the_vision_preset_on_a_text_model_says_it_has_no_vision_tower():
    with pytest.raises(TargetError, match=r"preset 'vision' adapts the vision tower .* has none"):
        resolve(tiny_model("llama"), "vision")


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_merge_save_round_trip(family, tmp_path):
    model, processor = build(family)
    data = records()
    prepared = prepare_data(data, processor, seq=128, eval=0)
    tok = processor.tokenizer
    for example in prepared.train[:2]:  # labels: the assistant's reply and end of turn only, no image token
        trained = tok.decode([t for t in example["labels"] if t != -100])
        assert trained in ("red<eos>|", "blue<eos>|")
    batch = prepared.collate(prepared.train[:3])
    assert batch["input_ids"].shape == batch["labels"].shape
    before = logits(model, batch)

    peft_model = jl.inject(model, r=8, alpha=32)
    lora = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    part = index_model(peft_model).language_parts[0]
    assert lora and all(f"{part}." in n for n in lora)  # the default adapts the language model only
    assert torch.equal(logits(peft_model, batch), before)  # B = 0: outputs unchanged at init

    run = jl.train(peft_model, data, processor=processor, steps=24, lr=5e-2, batch=4, eval=0, background=False,
                   output_dir=str(tmp_path / "run"))  # fmt: skip
    losses = [h["loss"] for h in run.history]
    assert run.state == "finished" and len(losses) >= 10
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    adapted = logits(peft_model, batch)
    assert not torch.allclose(adapted, before)

    jl.save(peft_model, tmp_path / "adapter")
    fresh, _ = build(family)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(loaded, batch), adapted, rtol=0, atol=1e-5)

    merged = jl.merge(peft_model)
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=1e-4, atol=1e-4)


def test_a_generation_block_trains_only_the_reply():
    _, processor = build("llava", GEN_TEMPLATE)
    prepared = prepare_data(records(4), processor, seq=128, eval=0)
    tok = processor.tokenizer
    example = prepared.train[0]
    assert tok.decode([t for t in example["labels"] if t != -100]) in ("red<eos>", "blue<eos>")
    image_id = tok.convert_tokens_to_ids("<image>")
    assert example["input_ids"].count(image_id) == 16
    assert all(
        label == -100
        for t, label in zip(example["input_ids"], example["labels"], strict=True)
        if t == image_id
    )


def test_two_turns_train_both_replies_and_batches_pad_on_the_right():
    _, processor = build("qwen2_vl")
    turns = [
        {"role": "user", "content": "<image>color?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and this? <image>"}, {"role": "assistant", "content": "blue"},
    ]  # fmt: skip
    data = [{"messages": turns, "images": [square(RED), square(BLUE)]}, records(1)[0]]
    prepared = prepare_data(data, processor, seq=128, eval=0)
    tok = processor.tokenizer
    assert tok.decode([t for t in prepared.train[0]["labels"] if t != -100]) == "red<eos>|blue<eos>|"
    batch = prepared.collate(prepared.train)
    assert batch["image_grid_thw"].shape[0] == 3
    short = len(prepared.train[1]["input_ids"])
    assert batch["attention_mask"][1, short:].sum() == 0 and (batch["labels"][1, short:] == -100).all()


# ----------------------------------------------------------------------------------------------- seq


def test_seq_cuts_after_the_images_and_refuses_to_cut_them():
    _, processor = build("llava")
    data = [{"messages": [{"role": "user", "content": "<image>" + "x" * 30}, {"role": "assistant", "content": "red"}],
             "images": [square(RED)]}]  # fmt: skip
    full = prepare_data(data, processor, seq=256, eval=0).train[0]
    cut_at = len(full["input_ids"]) - 2
    prepared = prepare_data(data, processor, seq=cut_at, eval=0)
    assert prepared.truncated == 1 and len(prepared.train[0]["input_ids"]) == cut_at
    assert prepared.collate(prepared.train)["input_ids"].shape[1] == cut_at
    with pytest.raises(UsageError, match=r"`data` record 0 .*image tokens.*seq`=10 would cut into them"):
        prepare_data(data, processor, seq=10, eval=0)


# ----------------------------------------------------------------------------------------------- errors


def test_images_without_an_image_processor_are_refused():
    _, processor = build("llava")
    with pytest.raises(UsageError, match=r"record 0 holds images.*no image processor"):
        prepare_data(records(2), processor.tokenizer, seq=64, eval=0)


def test_an_image_that_cannot_be_read_names_the_record_and_why(tmp_path):
    _, processor = build("idefics3")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    data = records(2)
    data[1] = {"messages": data[1]["messages"], "images": [str(broken)]} if "images" in data[1] else data[1]
    data.append({"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "red"}],
                 "images": [str(broken)]})  # fmt: skip
    with pytest.raises(UsageError, match=r"record 2: image 0 \('.*broken.png'\) cannot be read: .*Error"):
        prepare_data(data, processor, seq=64, eval=0)
    data[2]["images"] = [str(tmp_path / "missing.png")]
    with pytest.raises(UsageError, match=r"record 2: image 0 .* cannot be read: FileNotFoundError"):
        prepare_data(data, processor, seq=64, eval=0)


def test_more_images_than_placeholders_and_the_reverse_are_refused():
    _, processor = build("gemma3")
    turns = [{"role": "user", "content": "<image>color?"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(UsageError, match="record 1 has 2 images in `images` but only 1 placeholder"):
        prepare_data(
            [records(1)[0], {"messages": turns, "images": [square(RED)] * 2}], processor, seq=64, eval=0
        )
    two = [{"role": "user", "content": "<image><image>?"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(UsageError, match="record 0 has more image placeholders"):
        prepare_data([{"messages": two, "images": [square(RED)]}], processor, seq=64, eval=0)


# ----------------------------------------------------------------------------------------------- chat


def test_chat_and_compare_with_an_image():
    model, processor = build("gemma3")
    peft_model = jl.inject(model, r=4)
    with torch.no_grad():  # an adapter that changes the replies
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    conv = Conversation(
        peft_model, processor=processor, adapter="side_by_side", temperature=0, max_new_tokens=4
    )
    turn = conv.send("color?", images=[square(RED)])
    assert set(turn.replies) == {"adapter", "base"} and turn.replies["adapter"] != turn.replies["base"]
    assert len(turn.images) == 1
    prompt = conv.prompt("and now?", images=[square(BLUE)])
    assert prompt.count("<boi>") == 2 and prompt.endswith("and now?|A:")  # the earlier image stays in
    comparison = jl.compare(peft_model, "color?", images=[square(RED)], processor=processor, max_new_tokens=4)
    assert comparison.adapter == turn.replies["adapter"] and comparison.base == turn.replies["base"]
    with pytest.raises(UsageError, match="needs the model's processor"):
        Conversation(peft_model, tokenizer=processor.tokenizer).send("color?", images=[square(RED)])
    with pytest.raises(UsageError, match=r"`images\[0\]` cannot be read: FileNotFoundError"):
        conv.send("color?", images=["/no/such/image.png"])


def test_export_refuses_data_with_images(tmp_path):
    model, processor = build("llava")
    peft_model = jl.inject(model, r=4)
    with pytest.raises(UsageError, match="`export` writes jobs for text data"):
        jl.export(peft_model, tmp_path / "job", records(4), tokenizer=processor, steps=2, eval=0)
    assert not (tmp_path / "job").exists()


def test_text_records_train_as_text_with_the_processors_tokenizer():
    _, processor = build("idefics3")
    prepared = prepare_data(["red is a color", "blue is a color"], processor, seq=64, eval=0)
    assert prepared.collator is None  # the text path: its own padding, no pixels
    assert processor.tokenizer.decode(prepared.train[0]["input_ids"]).startswith("red is a color")
