"""Record formats: recognising what the records of a source hold and turning them into examples, with an error
that names the record and the column when one does not fit.

Causal LM records are texts (``text``/``content``), prompt+response pairs (``prompt``+``response``/``completion``,
``instruction``+``output`` (+``input``), ``question``+``answer``, ``input``+``output``), chat ``messages`` (or
ShareGPT ``conversations``) or pre-tokenised ``input_ids`` (+``labels``). Sequence classification records are a
text (or a text pair) and a label. Prompt and response are joined as they are (no separator), the way TRL joins
prompt/completion pairs; ``instruction`` and a non-empty ``input`` are joined with a newline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from ..errors import UsageError, close_matches, did_you_mean
from .sources import Source
from .trace import Skipped

__all__ = [
    "IGNORE_INDEX",
    "LABEL_COLUMNS",
    "Chat",
    "Ids",
    "Labeled",
    "Pair",
    "Text",
    "cls_examples",
    "lm_examples",
]

IGNORE_INDEX = -100  # the label transformers' losses skip

# Causal LM: (prompt, response) pairs, checked in this order.
_PAIRS = (
    ("prompt", "response"),
    ("prompt", "completion"),
    ("instruction", "output"),
    ("question", "answer"),
    ("input", "output"),
)
_CHAT_COLUMNS = ("messages", "conversations")
_LM_TEXT_COLUMNS = ("text", "content")
# Sequence classification: a text column (or a text pair) and a label column.
_CLS_TEXT_COLUMNS = (
    "text",
    "sentence",
    "review",
    "content",
    "document",
    "comment",
    "tweet",
    "utterance",
    "input",
)
_CLS_TEXT_PAIRS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"))
LABEL_COLUMNS = ("label", "labels", "class", "category", "target")
_KNOWN_COLUMNS = sorted(
    {c for pair in _PAIRS for c in pair}
    | {c for pair in _CLS_TEXT_PAIRS for c in pair}
    | set(_CHAT_COLUMNS + _LM_TEXT_COLUMNS + _CLS_TEXT_COLUMNS + LABEL_COLUMNS)
)
# ShareGPT-style turns ({"from": "human", "value": ...}) → role names the chat templates know.
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class Text(NamedTuple):
    """A causal LM example trained on all of its text."""

    text: str


class Pair(NamedTuple):
    """A causal LM example trained on the response only."""

    prompt: str
    response: str


class Chat(NamedTuple):
    """A conversation (``[{"role", "content"}]``, at least one assistant turn) trained on the assistant turns."""

    messages: list[dict]


class Ids(NamedTuple):
    """An example given already tokenized (``input_ids``, optional ``labels``): used as it is."""

    ids: list[int]
    labels: list[int] | None


class Labeled(NamedTuple):
    """A classification example: a text, an optional second text, and its label (raw, or the class id)."""

    text: str
    text_pair: str | None
    label: Any


def _columns(items: list[Mapping]) -> list[str]:
    """Union of the record keys, in order of first appearance."""
    return list(dict.fromkeys(str(k) for item in items for k in item))


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))  # pandas writes NaN for missing


def _string(item: Mapping, column: str, index: int, what: str) -> str:
    value = item.get(column)
    if _missing(value):
        return ""
    if not isinstance(value, str):
        raise UsageError(
            f"`{what}[{index}]['{column}']` is {type(value).__name__} ({value!r:.40}); it must be text (a string)."
        )
    return value


def _no_known_columns(columns: list[str], task: str, what: str, expected: str, hint: str) -> UsageError:
    suggestion = ""
    for column in columns:
        matches = close_matches(column, _KNOWN_COLUMNS, n=1)
        if matches:
            suggestion = f" `{column}`: did you mean `{matches[0]}`?"
            break
    found = ", ".join(f"`{c}`" for c in columns[:12]) or "none"
    return UsageError(
        f"`{what}` records have the columns {found}, none of which {task} data uses ({expected}).{suggestion} "
        f"Rename the column to one of those{hint}."
    )


def _track(
    examples: list, before: int, index: int, origins: list | None, skipped: list | None, reason: str
) -> None:
    """Record where record ``index`` went: the example it became (``origins``) or why it gave none."""
    if len(examples) > before:
        if origins is not None:
            origins.append(index)
    elif skipped is not None:
        skipped.append(Skipped(index, reason))


def lm_examples(
    source: Source,
    text_column: str | None,
    what: str,
    vocab_size: int | None = None,
    origins: list[int] | None = None,
    skipped: list[Skipped] | None = None,
) -> list:
    """Causal LM examples (Text, Pair, Chat or Ids) of ``source``, in the format its columns show (``text_column``
    forces plain text); empty texts and empty responses are skipped. ``what`` names the source in errors.
    ``vocab_size``: the model's number of token ids; pre-tokenised ids (and labels) outside it are refused.
    ``origins`` / ``skipped``, when given, receive the record index of each example / the records skipped."""
    items = source.items
    if isinstance(items[0], str):
        examples: list = []
        for i, text in enumerate(items):
            before = len(examples)
            if text.strip():
                examples.append(Text(text))
            _track(examples, before, i, origins, skipped, "empty text")
        if not examples:
            raise UsageError(f"`{what}` has only empty texts: give at least one non-empty example.")
        return examples
    columns = _columns(items)
    if text_column is not None:
        if text_column not in columns:
            raise UsageError(
                f"`text_column`={text_column!r} is not a column of `{what}` (columns: {', '.join(columns)})."
                f"{did_you_mean(text_column, columns)}"
            )
        kind: tuple | None = ("text", text_column)
    else:
        kind = _lm_kind(columns)
    if kind is None:
        raise _no_known_columns(
            columns,
            "CAUSAL_LM",
            what,
            "`text`; `prompt`+`response`/`completion`; `instruction`+`output`; `question`+`answer`; `messages`",
            " (e.g. records = [{'text': r['body']} for r in records])",
        )

    column = kind[2] if kind[0] == "pair" else kind[1]  # the one whose emptiness skips a record
    reason = f"no turns in `{column}`" if kind[0] == "chat" else f"empty `{column}`"
    examples = []
    for i, item in enumerate(items):
        before = len(examples)
        if text_column is None and any(_missing(item.get(c)) for c in kind[1:]):
            own = _lm_kind([str(c) for c, v in item.items() if not _missing(v)])
            if own is not None and own != kind:
                raise UsageError(
                    f"`{what}` mixes record formats: the records use {_describe(kind)}, but record {i} uses "
                    f"{_describe(own)}. Give one format per dataset (e.g. turn every record into `text`), or "
                    "train on each separately."
                )
        if kind[0] == "text":
            text = _string(item, kind[1], i, what)
            if text.strip():
                examples.append(Text(text))
        elif kind[0] == "ids":
            ids = item["input_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                raise UsageError(f"`{what}` record {i}: `input_ids` must be a list of token ids (ints).")
            labels = item.get("labels")
            if vocab_size is not None:
                _check_ids(ids, labels, vocab_size, i, what)
            if ids:
                examples.append(Ids(list(ids), list(labels) if labels is not None else None))
        elif kind[0] == "pair":
            prompt, response = _string(item, kind[1], i, what), _string(item, kind[2], i, what)
            if kind[1] == "instruction":
                extra = _string(item, "input", i, what)
                prompt = f"{prompt}\n{extra}" if extra.strip() else prompt
            if response.strip():
                examples.append(Pair(prompt, response))
        else:
            messages = _messages(item.get(kind[1]), i, kind[1], what)
            if messages:
                examples.append(Chat(messages))
        _track(examples, before, i, origins, skipped, reason)
    if not examples:
        raise UsageError(f"`{what}` has no non-empty example in the column(s) {', '.join(kind[1:])}.")
    return examples


def _lm_kind(columns: list[str]) -> tuple | None:
    """The causal-LM record format ``columns`` show: ("ids", col), ("chat", col), ("pair", a, b), ("text", col)."""
    if "input_ids" in columns:
        return ("ids", "input_ids")
    if chat := next((c for c in _CHAT_COLUMNS if c in columns), None):
        return ("chat", chat)
    if pair := next((p for p in _PAIRS if p[0] in columns and p[1] in columns), None):
        return ("pair", *pair)
    if text := next((c for c in _LM_TEXT_COLUMNS if c in columns), None):
        return ("text", text)
    return None


def _describe(kind: tuple) -> str:
    return "+".join(f"`{c}`" for c in kind[1:])


def _check_ids(ids: Any, labels: Any, vocab_size: int, index: int, what: str) -> None:
    """Every id of a pre-tokenised record is a row of the model's embeddings (labels may also be -100): an id
    outside them fails inside the embedding lookup, on a GPU as a device-side assert that ends the CUDA context."""
    columns = (("input_ids", ids, ()), ("labels", labels, (IGNORE_INDEX,)))
    for column, values, allowed in columns:
        if not isinstance(values, (list, tuple)):
            continue
        bad = next(
            (t for t in values if isinstance(t, int) and not 0 <= t < vocab_size and t not in allowed), None
        )
        if bad is not None:
            also = "; -100 marks a token not trained on" if allowed else ""
            raise UsageError(
                f"`{what}` record {index}: `{column}` holds token id {bad}, outside the model's vocabulary "
                f"(ids 0-{vocab_size - 1}{also}). Tokenize with the model's own tokenizer, or make room for new ids "
                "first: model.resize_token_embeddings(len(tokenizer))."
            )


def _messages(value: Any, index: int, column: str, what: str) -> list[dict]:
    """Validated chat turns ``[{"role", "content"}]`` (ShareGPT ``from``/``value`` turns are renamed)."""
    if _missing(value) or (isinstance(value, (list, tuple)) and not value):
        return []
    where = f"`{what}[{index}]['{column}']`"
    if not isinstance(value, (list, tuple)):
        raise UsageError(
            f"{where} is {type(value).__name__}; it must be a list of {{'role', 'content'}} dicts."
        )
    messages = []
    for turn in value:
        if isinstance(turn, Mapping) and "role" in turn:
            messages.append(dict(turn))
        elif isinstance(turn, Mapping) and "from" in turn and "value" in turn:
            role = _SHAREGPT_ROLES.get(str(turn["from"]).lower(), str(turn["from"]))
            messages.append({"role": role, "content": turn["value"]})
        else:
            raise UsageError(
                f"{where} has a turn without a role: {turn!r:.60}; each turn needs 'role' and 'content'."
            )
    if not any(m.get("role") == "assistant" for m in messages):
        roles = ", ".join(dict.fromkeys(str(m.get("role")) for m in messages))
        raise UsageError(
            f"{where} has no assistant turn (roles: {roles}), so there is nothing to train on: every conversation "
            "needs at least one {'role': 'assistant', ...} reply."
        )
    return messages


def cls_examples(
    source: Source,
    text_column: str | None,
    label_column: str | None,
    what: str,
    origins: list[int] | None = None,
    skipped: list[Skipped] | None = None,
) -> tuple[list[Labeled], tuple[str, ...] | None]:
    """Classification examples (Labeled with the raw label) and a Dataset's ClassLabel names, if any.
    ``origins`` / ``skipped``, when given, receive the record index of each example / the records skipped."""
    items = source.items
    if isinstance(items[0], str):
        raise UsageError(
            f"`{what}` is a list of texts without labels; SEQ_CLS needs records with a text and a `label`, e.g. "
            "[{'text': ..., 'label': ...}]."
        )
    columns = _columns(items)
    for name, value in (("text_column", text_column), ("label_column", label_column)):
        if value is not None and value not in columns:
            raise UsageError(
                f"`{name}`={value!r} is not a column of `{what}` (columns: {', '.join(columns)})."
                f"{did_you_mean(value, columns)}"
            )
    text_cols: tuple[str, ...] | None
    if text_column is not None:
        text_cols = (text_column,)
    else:
        text_cols = next((p for p in _CLS_TEXT_PAIRS if p[0] in columns and p[1] in columns), None)
        if text_cols is None:
            single = next((c for c in _CLS_TEXT_COLUMNS if c in columns), None)
            text_cols = (single,) if single else None
    if text_cols is None:
        raise _no_known_columns(columns, "SEQ_CLS", what, "`text`, `sentence`, `review`... and `label`", "")
    label_col = label_column or next((c for c in LABEL_COLUMNS if c in columns), None)
    if label_col is None:
        others = [c for c in columns if c not in text_cols]
        raise UsageError(
            f"`{what}` has no label column for SEQ_CLS (columns: {', '.join(columns)}); add a `label` column or "
            f"pass label_column=.{did_you_mean(others[0], LABEL_COLUMNS) if others else ''}"
        )
    examples = []
    for i, item in enumerate(items):
        text = _string(item, text_cols[0], i, what)
        pair = _string(item, text_cols[1], i, what) if len(text_cols) > 1 else None
        if not text.strip():
            _track(examples, len(examples), i, origins, skipped, f"empty `{text_cols[0]}`")
            continue
        label = item.get(label_col)
        if _missing(label) or (isinstance(label, str) and not label.strip()):
            raise UsageError(f"`{what}[{i}]` has no `{label_col}`; every SEQ_CLS example needs a label.")
        examples.append(Labeled(text, pair, label))
        if origins is not None:
            origins.append(i)
    if not examples:
        raise UsageError(
            f"`{what}` has only empty texts in `{text_cols[0]}`: give at least one non-empty example."
        )
    names = getattr(_get(source.features, label_col), "names", None)
    return examples, (tuple(str(n) for n in names) if isinstance(names, (list, tuple)) else None)


def _get(mapping: Any, key: str) -> Any:
    try:
        return mapping[key] if mapping is not None else None
    except (KeyError, TypeError, IndexError):
        return None
