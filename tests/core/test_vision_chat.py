"""Vision-language chat training on tiny LLaVA, Qwen2-VL, Idefics3 (SmolVLM's architecture) and Gemma 3 models built
from configs, with processors built in code (an image processor, the character tokenizer with each family's image
tokens, a chat template that places the images)."""

from __future__ import annotations

import pytest
import torch

import jupyter_lora as jl
from jupyter_lora.core.chat import Conversation
from jupyter_lora.core.data import prepare_data
from jupyter_lora.core.errors import TargetError, UsageError
from jupyter_lora.core.targets import index_model, resolve
from jupyter_lora.testing import tiny_model
from tests.vision_models import BLUE, FAMILIES, GEN_TEMPLATE, RED, build, logits, records, square

pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")

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
