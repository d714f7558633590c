"""Tokenisation of examples: causal LM (prompt masking), chat templates (assistant-only masking), classification.

* Causal LM ids are ``[bos] + tokens(prompt) + tokens(response) + [eos]``; ``bos`` only when the tokenizer adds
  one by itself, ``eos`` only when it has one and the ids do not already end with it. The prompt part of the
  labels is -100; plain text has no prompt part.
* Chat ``messages`` go through ``tokenizer.apply_chat_template``; only the assistant turns are trained: the
  tokens the template wraps in ``{% generation %}`` when it has that block, else for assistant message ``i`` the
  tokens from ``len(template(messages[:i], add_generation_prompt=True))`` to ``len(template(messages[:i+1]))``
  — the reply plus whatever end-of-turn marker the template writes after it. No extra eos is appended.
  A ``chat_template`` (Jinja text, or the name of one of the tokenizer's templates) replaces the tokenizer's own
  for this tokenisation; the tokenizer is not changed.
* Everything is cut to ``seq`` tokens (``truncated`` counts the examples cut). An example left with nothing to
  learn (no label after the first token, e.g. a prompt longer than ``seq``) is dropped (``dropped`` counts it).
  A ``notes`` list, when given, receives one ``Tokenized`` (length before the cut, cut, kept) per example.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import UsageError, did_you_mean
from .formats import IGNORE_INDEX, Ids, Labeled, Pair, Text
from .trace import Tokenized

__all__ = [
    "check_chat_template",
    "check_token_ids",
    "has_chat_template",
    "pad_token_id",
    "tokenize_cls",
    "tokenize_lm",
]

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos token, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def check_token_ids(examples: list[dict], tokenizer: Any, vocab_size: int, padding: bool) -> None:
    """Every id the tokenizer produced (and its pad id, when batches are padded) is a row of the model's
    embeddings; a tokenizer with tokens the model lacks (added tokens, embeddings not resized) is a UsageError —
    on a GPU the lookup would be a device-side assert that ends the CUDA context."""
    if not examples:
        return
    top = max(max(ex["input_ids"], default=0) for ex in examples)
    pad = pad_token_id(tokenizer)
    if top >= vocab_size:
        what, bad = "a token id", top
    elif padding and pad >= vocab_size:
        what, bad = "the pad id", pad
    else:
        return
    token = tokenizer.convert_ids_to_tokens(bad) if hasattr(tokenizer, "convert_ids_to_tokens") else None
    shown = f" ({token!r})" if isinstance(token, str) else ""
    raise UsageError(
        f"`tokenizer` gives {what} {bad}{shown}, outside the model's vocabulary (ids 0-{vocab_size - 1}): the "
        "tokenizer has tokens the model does not. Resize the model's embeddings first "
        "(model.resize_token_embeddings(len(tokenizer)), before injecting), or use the model's own tokenizer."
    )


def _encode(tokenizer: Any, texts: list[str], chunk: int = 1024) -> list[list[int]]:
    """Token ids of each text without special tokens, in batched tokenizer calls."""
    out: list[list[int]] = []
    for begin in range(0, len(texts), chunk):
        out.extend(
            list(ids)
            for ids in tokenizer(texts[begin : begin + chunk], add_special_tokens=False)["input_ids"]
        )
    return out


def _bos(tokenizer: Any) -> list[int]:
    """``[bos]`` when the tokenizer puts a bos token in front by itself (Llama), else ``[]`` (GPT-2, Qwen)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, int):
        return []
    with_special = list(tokenizer("a")["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def _finish(
    ids: list[int], labels: list[int], seq: int, out: list[dict], notes: list[Tokenized] | None
) -> tuple[int, int]:
    """Cut to ``seq`` and keep the example if a label after the first token is left (the first is never
    predicted); returns (truncated, dropped) as 0/1."""
    length, cut = len(ids), len(ids) > seq
    ids, labels = ids[:seq], labels[:seq]
    keep = any(label != IGNORE_INDEX for label in labels[1:])
    if notes is not None:
        notes.append(Tokenized(length, cut, keep))
    if not keep:
        return int(cut), 1
    out.append({"input_ids": ids, "labels": labels})
    return int(cut), 0


def tokenize_lm(
    examples: list,
    tokenizer: Any,
    seq: int,
    chat_template: str | None = None,
    notes: list[Tokenized] | None = None,
) -> tuple[list[dict], int, int]:
    """``{"input_ids", "labels"}`` for Text, Pair, Ids and Chat examples, cut to ``seq``; returns the examples
    kept and the counts truncated and dropped."""
    bos = _bos(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [eos] if isinstance(eos, int) else []

    def with_eos(ids: list[int]) -> list[int]:
        return ids + tail if tail and ids[-1:] != tail else ids

    texts = [ex.text for ex in examples if isinstance(ex, Text)]
    prompts = [ex.prompt for ex in examples if isinstance(ex, Pair)]
    responses = [ex.response for ex in examples if isinstance(ex, Pair)]
    text_ids = iter(_encode(tokenizer, texts))
    prompt_ids = iter(_encode(tokenizer, prompts))
    response_ids = iter(_encode(tokenizer, responses))
    # The {% generation %} mask maps characters to tokens: it needs a fast (Rust) tokenizer.
    use_mask = _has_generation_block(tokenizer, chat_template) and bool(getattr(tokenizer, "is_fast", False))

    out: list[dict] = []
    truncated = dropped = 0
    for ex in examples:
        if isinstance(ex, Text):
            ids = with_eos(bos + next(text_ids))
            labels = list(ids)
        elif isinstance(ex, Pair):
            prompt = bos + next(prompt_ids)
            response = with_eos(next(response_ids))
            ids = prompt + response
            labels = [IGNORE_INDEX] * len(prompt) + response
        elif isinstance(ex, Ids):
            ids, labels = ex.ids, ex.labels if ex.labels is not None else list(ex.ids)
        else:
            ids, labels = _chat_tokens(tokenizer, ex.messages, use_mask, chat_template)
        cut, skip = _finish(ids, labels, seq, out, notes)
        truncated += cut
        dropped += skip
    return out, truncated, dropped


def tokenize_cls(
    examples: list[Labeled], tokenizer: Any, seq: int, notes: list[Tokenized] | None = None
) -> tuple[list[dict], int, int]:
    """``{"input_ids", "label"}`` with the tokenizer's own special tokens ([CLS] ... [SEP]); over-long examples
    are re-tokenized with the tokenizer's truncation so the closing special token stays. Returns the examples and
    the counts truncated and dropped (always 0)."""
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair for ex in examples] if examples and examples[0].text_pair is not None else None
    ids_list: list[list[int]] = []
    for begin in range(0, len(texts), 1024):
        kwargs = {"text_pair": pairs[begin : begin + 1024]} if pairs else {}
        ids_list.extend(list(ids) for ids in tokenizer(texts[begin : begin + 1024], **kwargs)["input_ids"])
    long = [i for i, ids in enumerate(ids_list) if len(ids) > seq]
    if notes is not None:
        notes.extend(Tokenized(len(ids), len(ids) > seq, True) for ids in ids_list)
    if long:
        kwargs = {"text_pair": [pairs[i] for i in long]} if pairs else {}
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=seq, **kwargs)["input_ids"]
        for i, ids in zip(long, cut, strict=True):
            ids_list[i] = list(ids)[:seq]
    out = [{"input_ids": ids, "label": int(ex.label)} for ids, ex in zip(ids_list, examples, strict=True)]
    return out, len(long), 0


# ----------------------------------------------------------------------------------------------- chat templates


def _template_text(tokenizer: Any, chat_template: str | None = None) -> str:
    """The Jinja text that formats conversations: ``chat_template`` (a template's text, or the name of one of the
    tokenizer's templates, as ``apply_chat_template`` takes it), else the tokenizer's default template."""
    template = getattr(tokenizer, "chat_template", None)
    if chat_template is not None:
        if isinstance(template, Mapping) and chat_template in template:
            return template[chat_template]
        return chat_template
    if isinstance(template, Mapping):  # named templates: the default one formats plain conversations
        template = template.get("default") or next(iter(template.values()), None)
    return template if isinstance(template, str) else ""


def has_chat_template(tokenizer: Any, chat_template: str | None = None) -> bool:
    """Whether ``tokenizer`` (or ``chat_template``) gives a chat template, and it has ``apply_chat_template``."""
    return bool(_template_text(tokenizer, chat_template)) and hasattr(tokenizer, "apply_chat_template")


def check_chat_template(tokenizer: Any, chat_template: str | None = None) -> None:
    """Raise a UsageError unless ``tokenizer`` (or ``chat_template``) gives a chat template to format ``messages``
    with; a ``chat_template`` that is neither Jinja nor one of the tokenizer's named templates is refused too."""
    if chat_template is not None:
        names = getattr(tokenizer, "chat_template", None)
        names = list(names) if isinstance(names, Mapping) else []
        if chat_template not in names and "{" not in chat_template:
            known = f" The tokenizer's templates: {', '.join(names)}." if names else ""
            raise UsageError(
                f"`chat_template`={chat_template!r} is neither a Jinja template nor the name of one of the "
                f"tokenizer's templates.{did_you_mean(chat_template, names)}{known} Give the template's text "
                "(with {% for message in messages %}...) or leave chat_template out to use the tokenizer's own."
            )
    if not has_chat_template(tokenizer, chat_template):
        raise UsageError(
            "`tokenizer` has no chat template, so `messages` cannot be formatted: use the tokenizer of an instruct/"
            "chat model, give `chat_template` (a Jinja template), or give prompt/response columns instead."
        )


def _has_generation_block(tokenizer: Any, chat_template: str | None = None) -> bool:
    return bool(_GENERATION_BLOCK.search(_template_text(tokenizer, chat_template)))


def _chat_tokens(
    tokenizer: Any, messages: list[dict], use_mask: bool, chat_template: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels that train only the assistant turns (see the rules above)."""
    template = {"chat_template": chat_template} if chat_template is not None else {}
    if use_mask:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **template
        )
        ids = list(out["input_ids"])
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"], strict=True)]
        return ids, labels

    def render(turns: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt, **template)

    full = render(messages)
    ids = _encode(tokenizer, [full])[0]
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(messages[:i], prompt=True) if i else ""  # a conversation cannot be empty: start at 0
        upto = render(messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise UsageError(
                "`tokenizer`'s chat template does not render a conversation as a continuation of its first turns, "
                "so the assistant replies cannot be located: use a template with {% generation %} blocks, or give "
                "prompt/response columns instead of messages."
            )
        start, end = (len(_encode(tokenizer, [s])[0]) if s else 0 for s in (before, upto))
        labels[start:end] = ids[start:end]
    return ids, labels
