"""Chat records with images, for vision-language models (LLaVA, Qwen2-VL, SmolVLM/Idefics3, Gemma 3, ...): the
model's processor renders and tokenizes them; only the assistant turns are trained.

* Records: chat ``messages`` whose content may be a list of parts in transformers' format (``{"type": "image",
  "image": PIL image | array | path | URL}``, ``{"type": "text", "text": ...}``), or the shorthand
  ``{"messages": [...], "images": [...]}`` where ``{"type": "image"}`` parts or ``<image>`` in a text take the
  images in order. Every image is decoded once here (a failure names the record); paths and URLs are kept as they
  are and read again when their batch is built, decoded images are kept.
* Tokens: the processor's chat template renders the conversation, the processor expands each image into the
  model's image tokens and tokenizes. Labels follow ``tokenize._chat_tokens``: the ``{% generation %}`` spans when
  the template has them, else for assistant message ``i`` the text from the rendering of the turns before it (with
  the generation prompt) to the rendering up to it. Those character spans are mapped onto the tokens with the
  tokenizer's offsets, shifted by what each image's expansion added (the processor reports both). Image tokens
  and everything outside the assistant spans are -100.
* ``seq``: a conversation longer than ``seq`` is cut after its last image token; one whose image tokens do not fit
  in ``seq`` is refused (a model fails on a cut image), naming the record.
* Batches: the processor is applied to the batch's texts and images (``VisionChatCollator``): it pads the text and
  lays the pixels out as the model takes them (stacked, concatenated patches, a padded image grid), and adds the
  inputs its model needs (``image_grid_thw``, ``pixel_attention_mask``, ``token_type_ids``). Only the inputs the
  model's ``forward`` names are kept. Doing it per batch, not per record, keeps memory at one batch of pixels.
"""

from __future__ import annotations

import bisect
import io
import os
from collections.abc import Mapping
from typing import Any

from ..errors import UsageError
from .formats import IGNORE_INDEX, Chat, lm_examples
from .prepared import PreparedData, eval_count, split_eval
from .processors import text_tokenizer
from .sources import load_source
from .tokenize import _GENERATION_BLOCK, check_token_ids, pad_token_id
from .trace import DataTrace, Tokenized

__all__ = [
    "PLACEHOLDER",
    "VisionChatCollator",
    "chat_images",
    "forward_inputs",
    "load_image",
    "prepare_vision_chat",
    "refuse_images",
]

PLACEHOLDER = "<image>"  # where an image of the record's `images` goes in a text turn (the shorthand format)
_IMAGE_KEYS = ("image", "url", "path", "base64")


# ----------------------------------------------------------------------------------------------- images


def load_image(value: Any) -> Any:
    """``value`` as something the image processor takes: a PIL image (from a path, URL, base64 text, bytes or a
    ``datasets`` ``{"bytes", "path"}`` dict) or the array/tensor itself (checked to be H×W or H×W×C / C×H×W).
    Raises ValueError/OSError saying why it cannot be read."""
    from PIL import Image

    if isinstance(value, Image.Image):
        value.load()  # a lazily opened file: read it now, so that a broken one fails here
        return value
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
        image.load()
        return image
    if isinstance(value, (str, os.PathLike)):
        from transformers.image_utils import load_image as hf_load_image

        text = os.fspath(value)
        if (
            not text.startswith(("http://", "https://", "data:"))
            and not os.path.isfile(text)
            and len(text) < 512
        ):
            raise FileNotFoundError(f"no file {text!r}")
        return hf_load_image(text)
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        dims = tuple(int(n) for n in shape)
        if len(dims) == 2 or (len(dims) == 3 and (dims[-1] in (1, 3, 4) or dims[0] in (1, 3, 4))):
            return value
        raise ValueError(
            f"an array of shape {dims} is not an image (H×W, H×W×C or C×H×W with 1, 3 or 4 channels)"
        )
    raise ValueError(f"{type(value).__name__} is not an image (give a PIL image, an array, a path or a URL)")


def _kept(value: Any, decoded: Any) -> Any:
    """What an example keeps of an image: a path or URL stays a path (read again per batch: memory stays small),
    anything else its decoded form."""
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else decoded


# ----------------------------------------------------------------------------------------------- records


def chat_images(messages: list[dict], images: Any, where: str) -> tuple[list[dict], list[Any]]:
    """The conversation in transformers' format (content as a list of parts, ``{"type": "image"}`` for each image)
    and its images in order. ``images``: the record's ``images`` column (the shorthand), filling the ``<image>``
    placeholders and the image parts that carry no image of their own. ``where`` names the record in errors."""
    extra = list(images) if isinstance(images, (list, tuple)) else ([] if images is None else [images])
    pending = iter(extra)
    used = 0
    found: list[Any] = []
    out: list[dict] = []
    for turn in messages:
        content = turn.get("content")
        parts: list[dict] = []
        if isinstance(content, str):
            pieces = content.split(PLACEHOLDER) if extra else [content]
            for k, piece in enumerate(pieces):
                if k:
                    parts.append({"type": "image"})
                if piece:
                    parts.append({"type": "text", "text": piece})
        elif isinstance(content, (list, tuple)):
            for part in content:
                if isinstance(part, str):
                    parts.append({"type": "text", "text": part})
                elif isinstance(part, Mapping) and part.get("type") in ("image", "image_url"):
                    value = next((part[k] for k in _IMAGE_KEYS if part.get(k) is not None), None)
                    if value is None and isinstance(part.get("image_url"), Mapping):  # OpenAI's {"url": ...}
                        value = part["image_url"].get("url")
                    parts.append(
                        {"type": "image", "image": value} if value is not None else {"type": "image"}
                    )
                elif isinstance(part, Mapping) and part.get("type") == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                else:
                    raise UsageError(
                        f"{where}: a content part {part!r:.60} is neither text nor an image; give "
                        "{'type': 'text', 'text': ...} or {'type': 'image', 'image': ...} parts."
                    )
        elif content is None:
            parts = []
        else:
            raise UsageError(
                f"{where}: a turn's content is {type(content).__name__}; give text or a list of parts."
            )
        for part in parts:
            if part["type"] != "image":
                continue
            if "image" not in part:
                value = next(pending, None)
                if value is None:
                    raise UsageError(
                        f"{where} has more image placeholders ({PLACEHOLDER} or {{'type': 'image'}}) than images "
                        f"({len(extra)} in `images`): give one image per placeholder."
                    )
                used += 1
                part["image"] = value
            found.append(part["image"])
        out.append({**turn, "content": parts})
    if used < len(extra):
        raise UsageError(
            f"{where} has {len(extra)} images in `images` but only {used} placeholder(s) for them: put "
            f"{PLACEHOLDER} in the text (or a {{'type': 'image'}} part) where each image goes."
        )
    return out, found


def refuse_images(items: list, preprocessor: Any) -> None:
    """A UsageError when records hold images (an ``images`` column, or image parts in ``messages``) and the
    preprocessor has no image processor to read them: they would be trained as text, the images dropped."""
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            return
        turns = item.get("messages") or item.get("conversations")
        parts = [p for t in turns or () if isinstance(t, Mapping) for p in _parts(t.get("content"))]
        if item.get("images") is not None or any(p.get("type") in ("image", "image_url") for p in parts):
            raise UsageError(
                f"`data` record {index} holds images, and the "
                f"{'tokenizer' if preprocessor is None else type(preprocessor).__name__} given has no image "
                "processor to read them: pass the model's processor, processor=AutoProcessor.from_pretrained(<the "
                "model's name or folder>) (in %%lora train: `processor: VAR`), on a vision-language model."
            )


def _parts(content: Any) -> list[Mapping]:
    return [p for p in content if isinstance(p, Mapping)] if isinstance(content, (list, tuple)) else []


# ----------------------------------------------------------------------------------------------- tokens


def _template(processor: Any, chat_template: str | None) -> str:
    template = chat_template if chat_template is not None else getattr(processor, "chat_template", None)
    if isinstance(template, Mapping):
        template = template.get("default") or next(iter(template.values()), None)
    if not isinstance(template, str) or not template:
        raise UsageError(
            f"The processor ({type(processor).__name__}) has no chat template, so `messages` cannot be formatted: "
            "set processor.chat_template (a Jinja template that places the images), or give `chat_template`."
        )
    return template


def _render(processor: Any, messages: list[dict], template: str, prompt: bool = False) -> str:
    return processor.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=prompt
    )


def _assistant_spans(
    processor: Any, messages: list[dict], template: str, text: str, where: str
) -> list[tuple]:
    """Character spans of the rendered conversation that the assistant turns train on (module docstring)."""
    if _GENERATION_BLOCK.search(template):
        from transformers.utils.chat_template_utils import render_jinja_template

        tokenizer = text_tokenizer(processor)
        _, spans = render_jinja_template(
            conversations=[messages], chat_template=template, return_assistant_tokens_mask=True,
            **tokenizer.special_tokens_map,
        )  # fmt: skip
        return [tuple(s) for s in spans[0]]
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(processor, messages[:i], template, prompt=True) if i else ""
        upto = _render(processor, messages[: i + 1], template)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise UsageError(
                f"{where}: the chat template does not render a conversation as a continuation of its first turns, "
                "so the assistant replies cannot be located: use a template with {% generation %} blocks."
            )
        spans.append((len(before), len(upto)))
    return spans


def _encode(processor: Any, text: str, images: list, special: bool, **kwargs: Any) -> Any:
    return processor(text=[text], images=[images] if images else None, add_special_tokens=special, **kwargs)


def _adds_special(processor: Any, text: str) -> bool:
    """Whether the processor adds the tokenizer's special tokens: not when the rendering starts with bos (as
    transformers' ``apply_chat_template`` decides)."""
    bos = getattr(text_tokenizer(processor), "bos_token", None)
    return not (isinstance(bos, str) and bos and text.startswith(bos))


def _tokens(
    processor: Any, text: str, images: list, spans: list[tuple], where: str
) -> tuple[list, list, list]:
    """Token ids, labels, and the positions of the image tokens, of one rendered conversation."""
    try:
        out = _encode(processor, text, images, _adds_special(processor, text), return_offsets_mapping=True,
                      return_text_replacement_offsets=True)  # fmt: skip
    except NotImplementedError:
        raise UsageError(
            "Locating the assistant replies among the image tokens needs a fast tokenizer (character offsets); "
            f"this processor's tokenizer ({type(text_tokenizer(processor)).__name__}) has none."
        ) from None
    except (ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(f"{where}: the processor could not read it ({first}).") from None
    ids = [int(t) for t in out["input_ids"][0]]
    offsets = [tuple(int(c) for c in pair) for pair in out["offset_mapping"][0]]
    replaced = list((out.get("text_replacement_offsets") or [[]])[0])
    # Where each image's expansion lies in the expanded text, and how many characters the expansions before a
    # point of the rendered text added (transformers maps its own assistant masks the same way).
    new_spans = [tuple(r["new_span"]) for r in replaced]
    ends = [r["span"][1] for r in replaced]
    gained = [0]
    for r in replaced:
        gained.append(r["new_span"][1] - r["span"][1])

    def shift(char: int) -> int:
        return char + gained[bisect.bisect_right(ends, char)]

    labels = [IGNORE_INDEX] * len(ids)
    image_at = [k for k, (a, b) in enumerate(offsets) if any(a < e and b > s for s, e in new_spans)]
    images_set = set(image_at)
    for start, end in spans:
        lo, hi = shift(start), shift(end)
        for k, (a, b) in enumerate(offsets):
            if a < hi and b > lo and k not in images_set:
                labels[k] = ids[k]
    return ids, labels, image_at


# ----------------------------------------------------------------------------------------------- batches


class VisionChatCollator:
    """Examples → one batch: the processor applied to the batch's texts and images (padding on the right, each
    row cut to ``seq`` as its example was), the stored labels laid over the padded ids. ``model_inputs``: the
    argument names of the model's ``forward`` (set by the training run); other outputs of the processor are
    dropped."""

    def __init__(self, processor: Any, seq: int, special: bool, model_inputs: Any = None):
        self.processor = processor
        self.seq = seq
        self.special = special
        self.model_inputs = set(model_inputs) if model_inputs else None

    def accept(self, model_inputs: Any) -> None:
        """Keep only these inputs (the model's ``forward`` arguments) in the batches."""
        self.model_inputs = set(model_inputs) if model_inputs else None

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        images = [[load_image(x) for x in ex["images"]] for ex in examples]
        out = self.processor(
            text=[ex["text"] for ex in examples], images=images if any(images) else None, padding="longest",
            padding_side="right", truncation=True, max_length=self.seq, return_tensors="pt",
            add_special_tokens=self.special,
        )  # fmt: skip
        ids = out["input_ids"]
        labels = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long)
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            if ids[row, :n].tolist() != ex["input_ids"]:
                raise UsageError(
                    "The processor tokenized an example differently in a batch than alone (its template or "
                    "tokenizer changed since the data was prepared?): prepare the data again."
                )
            labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        batch = {k: v for k, v in out.items() if self.model_inputs is None or k in self.model_inputs}
        batch["labels"] = labels
        return batch


def forward_inputs(model: Any) -> tuple[str, ...]:
    """The named arguments of ``model``'s ``forward`` (what a batch may hold)."""
    import inspect

    from ..modelinfo import base_model_of

    params = inspect.signature(base_model_of(model).forward).parameters.values()
    return tuple(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


# ----------------------------------------------------------------------------------------------- preparing


def prepare_vision_chat(
    data: Any,
    processor: Any,
    *,
    seq: int,
    eval: Any = None,
    eval_data: Any = None,
    packing: bool = False,
    seed: int = 0,
    vocab_size: int | None = None,
    chat_template: str | None = None,
    trace: DataTrace | None = None,
    text: Any = None,
    **_: Any,
) -> PreparedData:
    """``prepare_data`` for a vision-language model's processor (see the module docstring). Records that are not
    chat ``messages`` (texts, prompt/response pairs) are prepared as text with the processor's tokenizer, by
    ``text`` (``prepare_data``)."""
    source = load_source(data, "data")
    items = source.items
    chat = (
        bool(items)
        and isinstance(items[0], Mapping)
        and any(c in items[0] for c in ("messages", "conversations"))
    )
    if not chat:
        return text(
            data, text_tokenizer(processor), seq=seq, eval=eval, eval_data=eval_data, packing=packing, seed=seed,
            vocab_size=vocab_size, chat_template=chat_template, trace=trace,
        )  # fmt: skip
    if packing:
        raise UsageError(
            "`packing` joins text examples into one row; examples with images keep a row each: set packing: false."
        )
    if text_tokenizer(processor) is None:
        raise UsageError(
            f"The processor ({type(processor).__name__}) has no tokenizer for the text of `messages`."
        )
    template = _template(processor, chat_template)
    special: list[bool] = []  # whether the processor adds special tokens (the same for every rendering)

    def tokenized(pairs: list[tuple], notes: list | None) -> tuple[list[dict], int, int]:
        out: list[dict] = []
        truncated = dropped = 0
        for example, index, items, name in pairs:
            where = f"`{name}` record {index}"
            messages, raw = chat_images(example.messages, items[index].get("images"), where)
            decoded = []
            for k, value in enumerate(raw):
                try:
                    decoded.append(load_image(value))
                except Exception as exc:  # any reader's failure: name the record, the image and why
                    raise UsageError(
                        f"{where}: image {k} ({_shown(value)}) cannot be read: {type(exc).__name__}: "
                        f"{str(exc).strip()[:160]}. Fix or drop that record."
                    ) from None
            for part in (p for m in messages for p in m["content"] if p["type"] == "image"):
                part.pop("image")  # the template needs only where each image goes; the images travel apart
            text = _render(processor, messages, template)
            if not special:
                special.append(_adds_special(processor, text))
            spans = _assistant_spans(processor, messages, template, text, where)
            ids, labels, image_at = _tokens(processor, text, decoded, spans, where)
            length, cut = len(ids), len(ids) > seq
            if cut and image_at and image_at[-1] >= seq:
                raise UsageError(
                    f"{where} takes {length} tokens, {len(image_at)} of them image tokens up to position "
                    f"{image_at[-1]}, and `seq`={seq} would cut into them (the model needs every image token): "
                    f"raise seq to at least {image_at[-1] + 1} (all of it: {length}), or use smaller images."
                )
            ids, labels = ids[:seq], labels[:seq]
            keep = any(label != IGNORE_INDEX for label in labels[1:])
            if notes is not None:
                notes.append(Tokenized(length, cut, keep))
            truncated += int(cut)
            if not keep:
                dropped += 1
                continue
            kept = [_kept(v, d) for v, d in zip(raw, decoded, strict=True)]
            out.append({"input_ids": ids, "labels": labels, "text": text, "images": kept})
        return out, truncated, dropped

    def chats(source: Any, what: str) -> list[tuple]:
        origins: list[int] = []
        skipped = trace.skipped.setdefault(what, []) if trace is not None else None
        found = lm_examples(source, None, what, vocab_size, origins, skipped)
        return [
            (ex, i, source.items, what) for ex, i in zip(found, origins, strict=True) if isinstance(ex, Chat)
        ]

    if trace is not None:
        trace.records["data"] = len(items)
    train_ex = chats(source, "data")
    if eval_data is not None:
        if not (eval is None or eval is True or (isinstance(eval, str) and eval.strip().lower() == "auto")):
            raise UsageError(
                f"`eval`={eval!r} and `eval_data` are both given: pass eval_data for a separate eval set, or eval= "
                "to hold out part of data — not both."
            )
        eval_source = load_source(eval_data, "eval_data")
        if trace is not None:
            trace.records["eval_data"] = len(eval_source.items)
        eval_ex = chats(eval_source, "eval_data")
    else:
        train_ex, eval_ex = split_eval(train_ex, eval_count(eval, len(train_ex)), seed)
    if trace is not None:
        trace.origins.update(train=[p[1] for p in train_ex], eval=[p[1] for p in eval_ex or []])

    def run(pairs: list[tuple], split: str) -> tuple[list[dict], int, int]:
        notes = trace.tokenized.setdefault(split, []) if trace is not None else None
        return tokenized(pairs, notes)

    train, truncated, dropped = run(train_ex, "train")
    if not train:
        raise UsageError(
            f"No training example is left: all {dropped} have nothing to learn within `seq`={seq} tokens (or the "
            "chat template marks no assistant token). Raise seq."
        )
    evals, t, d = run(eval_ex or [], "eval")
    tokenizer = text_tokenizer(processor)
    if vocab_size is not None:
        check_token_ids(train + evals, tokenizer, vocab_size, padding=True)
    return PreparedData(
        task="CAUSAL_LM", train=train, eval=evals or None, label_names=(),
        train_tokens=sum(len(ex["input_ids"]) for ex in train), truncated=truncated + t, packing=False,
        pad_token_id=pad_token_id(tokenizer), dropped=dropped + d, seq=seq,
        collator=VisionChatCollator(processor, seq, bool(special and special[0])),
    )  # fmt: skip


def _shown(value: Any) -> str:
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        return repr(text if len(text) <= 80 else text[:77] + "...")
    return type(value).__name__
