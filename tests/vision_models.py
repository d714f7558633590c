"""Tiny vision-language models for tests: LLaVA, Qwen2-VL, Idefics3 (SmolVLM's architecture) and Gemma 3 built from
configs, processors built in code (an image processor, a character tokenizer with each family's image tokens, a chat
template that places the images), and red/blue square records."""

from __future__ import annotations

import torch
import transformers as T
from PIL import Image

from jupyter_lora.testing import tiny_tokenizer

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
