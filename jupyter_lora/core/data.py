"""Training data: whatever the user holds (texts, records, a ``datasets.Dataset``, a pandas DataFrame, a file)
→ tokenized examples → deterministic, resumable batches.

Rules, in one place:

* Causal LM ids are ``[bos] + tokens(prompt) + tokens(response) + [eos]``; ``bos`` only when the tokenizer adds
  one by itself, ``eos`` only when it has one and the ids do not already end with it. The prompt part of the
  labels is -100; plain text has no prompt part. Prompt and response are joined as they are (no separator), the
  way TRL joins prompt/completion pairs; ``instruction`` and a non-empty ``input`` are joined with a newline.
* Chat ``messages`` go through ``tokenizer.apply_chat_template``; only the assistant turns are trained: the
  tokens the template wraps in ``{% generation %}`` when it has that block, else for assistant message ``i`` the
  tokens from ``len(template(messages[:i], add_generation_prompt=True))`` to ``len(template(messages[:i+1]))``
  — the reply plus whatever end-of-turn marker the template writes after it. No extra eos is appended.
* Everything is cut to ``seq`` tokens (``truncated`` counts the examples cut). An example left with nothing to
  learn (no label after the first token, e.g. a prompt longer than ``seq``) is dropped (``dropped`` counts it).
* The held-out eval split is a ``torch.randperm`` of the examples seeded by ``seed``; batch order in epoch ``e``
  is ``torch.randperm`` seeded by ``seed * 1000 + e``. Same inputs, same batches: a resumed run skips ``start``.

``datasets`` and ``pandas`` are optional and never imported: a Dataset is anything with ``column_names`` that
iterates as dicts, a DataFrame anything with ``columns`` and ``to_dict("records")``.
"""

from __future__ import annotations

import csv
import json
import math
import operator
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .errors import UsageError, close_matches, did_you_mean
from .modelinfo import base_model_of, normalize_task_type

__all__ = ["DATA_FILE_TYPES", "PreparedData", "find_tokenizer", "prepare_data"]

IGNORE_INDEX = -100  # the label transformers' losses skip

DATA_FILE_TYPES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt")

# Record columns we recognise. Causal LM: (prompt, response) pairs, checked in this order.
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
_LABEL_COLUMNS = ("label", "labels", "class", "category", "target")
_KNOWN_COLUMNS = sorted(
    {c for pair in _PAIRS for c in pair}
    | {c for pair in _CLS_TEXT_PAIRS for c in pair}
    | set(_CHAT_COLUMNS + _LM_TEXT_COLUMNS + _CLS_TEXT_COLUMNS + _LABEL_COLUMNS)
)
# ShareGPT-style turns ({"from": "human", "value": ...}) → role names the chat templates know.
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


# ----------------------------------------------------------------------------------------------- result


@dataclass
class PreparedData:
    """Tokenized train (and eval) examples with the collator and the batch order a training run uses.

    CAUSAL_LM examples are ``{"input_ids", "labels"}`` (labels = input_ids with the prompt set to -100);
    SEQ_CLS examples are ``{"input_ids", "label"}``. ``truncated`` counts the examples (train and eval) cut to
    ``seq``; ``dropped`` those skipped because nothing was left to learn. With ``packing`` each batch is one row
    without padding (``position_ids`` restart at 0 per example); pass ``forward_kwargs`` to the model with it.
    """

    task: str
    train: list[dict] = field(repr=False)
    eval: list[dict] | None = field(repr=False)
    label_names: tuple[str, ...]
    train_tokens: int
    truncated: int
    packing: bool = False
    pad_token_id: int = 0
    dropped: int = 0
    seq: int | None = None
    _flattener: Any = field(default=None, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        n_eval = len(self.eval) if self.eval else 0
        parts = [
            f"task={self.task}",
            f"train={len(self.train)} examples / {self.train_tokens:,} tokens",
            f"eval={n_eval}",
        ]
        if self.label_names:
            parts.append(f"labels={list(self.label_names)}")
        if self.truncated:
            parts.append(f"truncated={self.truncated}")
        if self.dropped:
            parts.append(f"dropped={self.dropped}")
        if self.packing:
            parts.append("packing=True")
        return f"PreparedData({', '.join(parts)})"

    @property
    def forward_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``model(**batch, **forward_kwargs)``: ``use_cache=False``.

        Training never needs the KV cache, and a packed batch needs it off: transformers only builds the
        block-diagonal mask from ``position_ids`` when ``attention_mask`` and ``past_key_values`` are both None,
        and with ``config.use_cache=True`` (the default) the model creates an empty cache itself — then the
        examples in a packed row attend to each other and the loss is wrong (masking_utils
        ``_preprocess_mask_arguments`` / ``find_packed_sequence_indices``).
        """
        return {"use_cache": False}

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Tensors for one batch: padded to the longest example (pad id, attention_mask 0, labels -100), or for
        a packed causal LM batch one row of ``input_ids``/``labels``/``position_ids`` with no padding."""
        if not examples:
            raise UsageError("`examples` is empty: collate needs at least one example.")
        if self.task == "SEQ_CLS":
            out = self._pad(examples, with_labels=False)
            out["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
            return out
        if self.packing:
            return self._flatten(examples)
        return self._pad(examples, with_labels=True)

    def _pad(self, examples: list[dict], with_labels: bool) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long) if with_labels else None
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
            if labels is not None:
                labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            out["labels"] = labels
        return out

    def _flatten(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        # transformers' DataCollatorWithFlattening does exactly what packing needs (checked in the tests): one
        # [1, total] row, position_ids restarting at 0 per example, and the first label of every example set to
        # -100 so no token is predicted across an example boundary. No attention_mask: with one, transformers
        # would not derive the per-example (block-diagonal) mask from position_ids.
        if self._flattener is None:
            from transformers import DataCollatorWithFlattening

            self._flattener = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        features = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in examples]
        return dict(self._flattener(features, return_tensors="pt"))

    def _split(self, split: str) -> list[dict]:
        if split == "train":
            return self.train
        if split == "eval":
            return self.eval or []
        raise UsageError(
            f"`split` must be 'train' or 'eval'; got {split!r}.{did_you_mean(split, ['train', 'eval'])}"
        )

    def num_batches(self, split: str, batch: int) -> int:
        """Number of batches of ``batch`` examples in ``split`` ("train"/"eval"); the last partial one counts."""
        batch = _positive_int(batch, "batch")
        return math.ceil(len(self._split(split)) / batch)

    def batches(
        self,
        split: str,
        batch: int,
        epoch: int = 0,
        seed: int = 0,
        start: int = 0,
        shuffle: bool = True,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Deterministic batches of ``split`` ("train"/"eval") for ``epoch``.

        Train order is ``torch.randperm`` with a generator seeded by ``seed * 1000 + epoch`` (eval, and
        ``shuffle=False``, keep the stored order). The first ``start`` batches are skipped (resuming a run);
        the last partial batch is kept.
        """
        examples = self._split(split)
        batch = _positive_int(batch, "batch")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise UsageError(f"`start` must be a batch index >= 0; got {start!r}.")
        if split == "train" and shuffle:
            generator = torch.Generator().manual_seed(int(seed) * 1000 + int(epoch))
            order = torch.randperm(len(examples), generator=generator).tolist()
        else:
            order = list(range(len(examples)))
        for begin in range(start * batch, len(order), batch):
            yield self.collate([examples[i] for i in order[begin : begin + batch]])


# ----------------------------------------------------------------------------------------------- public entry


def prepare_data(
    data: Any,
    tokenizer: Any,
    *,
    task: str = "CAUSAL_LM",
    seq: int = 512,
    eval: Any = None,
    eval_data: Any = None,
    packing: bool = False,
    seed: int = 0,
    label2id: Any = None,
    text_column: str | None = None,
    label_column: str | None = None,
) -> PreparedData:
    """Tokenize ``data`` for ``task`` ("CAUSAL_LM" or "SEQ_CLS") and hold out an eval split.

    ``data``: a list of strings or dicts (``text``; ``prompt``+``response``/``completion``;
    ``instruction``+``output`` (+``input``); ``question``+``answer``; chat ``messages``; for SEQ_CLS a text column
    and a ``label``), a dict of columns, a ``datasets.Dataset``, a pandas DataFrame, or a path to a .jsonl, .json,
    .csv, .tsv or .txt file. ``eval``: None/"auto" (10% up to 500 examples when there are at least 100, else
    none), a fraction in (0, 1), a number of examples, or 0/False; ``eval_data`` gives a separate eval set instead.
    ``label2id``: ``{name: id}`` (or a list of names) for string labels; default: the sorted unique labels.
    """
    if tokenizer is not None and not callable(tokenizer):
        raise UsageError(
            f"`tokenizer` must be a transformers tokenizer, got {type(tokenizer).__name__}. "
            "Pass the result of AutoTokenizer.from_pretrained(...)."
        )
    seq = _positive_int(seq, "seq")
    task = _data_task(task)
    if packing and task != "CAUSAL_LM":
        raise UsageError(f"`packing=True` is for causal LM training only (task {task}); set packing=False.")
    if label_column is not None and task != "SEQ_CLS":
        raise UsageError(
            f"`label_column`={label_column!r} is for SEQ_CLS (classification) data; the task is {task}. "
            "Drop label_column or pass task='SEQ_CLS'."
        )

    source = _load(data, "data")
    items = source.items
    pretokenized = bool(items) and isinstance(items[0], Mapping) and "input_ids" in items[0]
    if tokenizer is None and not pretokenized:
        raise UsageError(
            "`tokenizer` is missing: pass tokenizer=YOUR_TOKENIZER (in %%lora train: `tokenizer: VAR`), e.g. "
            "AutoTokenizer.from_pretrained(<the model's name or folder>)."
        )
    if eval_data is not None:
        if not (eval is None or eval is True or (isinstance(eval, str) and eval.strip().lower() == "auto")):
            raise UsageError(
                f"`eval`={eval!r} and `eval_data` are both given: pass eval_data for a separate eval set, or eval= "
                "to hold out part of data — not both."
            )
        eval_source = _load(eval_data, "eval_data")

    if task == "SEQ_CLS":
        train_ex, class_names = _cls_examples(source, text_column, label_column, "data")
        eval_ex = None
        if eval_data is not None:
            eval_ex, _ = _cls_examples(eval_source, text_column, label_column, "eval_data")
        ids, label_names = _label_ids(
            [ex.label for ex in train_ex] + [ex.label for ex in eval_ex or []], label2id, class_names
        )
        train_ex = [ex._replace(label=i) for ex, i in zip(train_ex, ids[: len(train_ex)], strict=True)]
        if eval_ex is not None:
            eval_ex = [ex._replace(label=i) for ex, i in zip(eval_ex, ids[len(train_ex) :], strict=True)]
    else:
        if label2id is not None:
            raise UsageError(
                "`label2id` is for SEQ_CLS (classification) data; drop it or pass task='SEQ_CLS'."
            )
        train_ex = _lm_examples(source, text_column, "data")
        eval_ex = _lm_examples(eval_source, text_column, "eval_data") if eval_data is not None else None
        label_names = ()
        if any(isinstance(ex, _Chat) for ex in train_ex + (eval_ex or [])):
            _check_chat_template(tokenizer)

    if eval_data is None:
        n_eval = _eval_count(eval, len(train_ex))
        train_ex, eval_ex = _split(train_ex, n_eval, seed)

    tokenize = _tokenize_cls if task == "SEQ_CLS" else _tokenize_lm
    train, truncated, dropped = tokenize(train_ex, tokenizer, seq)
    if not train:
        raise UsageError(
            f"No training example is left: all {dropped} have nothing to learn after cutting them to `seq`={seq} "
            "tokens (the prompt alone fills seq, or the chat template marks no assistant token). Raise seq or "
            "shorten the prompts."
        )
    eval_tok = None
    if eval_ex:
        eval_tok, eval_truncated, eval_dropped = tokenize(eval_ex, tokenizer, seq)
        truncated += eval_truncated
        dropped += eval_dropped
        eval_tok = eval_tok or None

    return PreparedData(
        task=task,
        train=train,
        eval=eval_tok,
        label_names=tuple(label_names),
        train_tokens=sum(len(ex["input_ids"]) for ex in train),
        truncated=truncated,
        packing=bool(packing),
        pad_token_id=_pad_id(tokenizer),
        dropped=dropped,
        seq=seq,
    )


def find_tokenizer(model: Any) -> Any | None:
    """The tokenizer saved beside ``model``'s weights, or None.

    Looks at ``model.config._name_or_path`` and ``model.name_or_path`` (under a PEFT wrapper too); only a local
    folder that holds tokenizer files is loaded (``local_files_only=True``), so the network is never touched.
    """
    base = base_model_of(model) if isinstance(model, torch.nn.Module) else model
    config = getattr(base, "config", None)
    candidates = [getattr(config, "_name_or_path", None), getattr(base, "name_or_path", None)]
    for path in dict.fromkeys(c for c in candidates if isinstance(c, (str, os.PathLike)) and c):
        path = os.fspath(path)
        if not os.path.isdir(path):
            continue
        if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
            continue
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception:  # a partial or foreign folder: the caller asks the user for tokenizer= instead
            continue
    return None


# ----------------------------------------------------------------------------------------------- checks


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"`{name}` must be a positive whole number; got {value!r}.")
    return value


def _data_task(task: Any) -> str:
    normalized = normalize_task_type(task)
    if normalized not in ("CAUSAL_LM", "SEQ_CLS"):
        raise UsageError(
            f"`task`={task!r}: data can be prepared for CAUSAL_LM or SEQ_CLS only. Pass task='CAUSAL_LM' or "
            "task='SEQ_CLS'."
        )
    return normalized


def _eval_count(eval: Any, n: int) -> int:
    """How many of ``n`` examples to hold out.

    None/"auto"/True: ``min(500, n // 10)`` when ``n >= 100``, else 0. A float f in (0, 1): ``max(1, round(f * n))``.
    An int k: k. 0, 0.0, False, "none": 0.
    """
    if isinstance(eval, str):
        key = eval.strip().lower()
        if key == "auto":
            eval = None
        elif key in ("none", "no", "off", "false", "0"):
            eval = 0
        else:
            raise UsageError(
                f"`eval` must be 'auto', a fraction in (0, 1), a number of examples or 0; got {eval!r}."
            )
    if eval is None or eval is True:
        return min(500, n // 10) if n >= 100 else 0
    if eval is False:
        return 0
    if isinstance(eval, float):
        if not 0 <= eval < 1:
            raise UsageError(
                f"`eval`={eval!r}: a fraction must be in [0, 1), e.g. eval=0.1; pass an int for a number of examples."
            )
        count = max(1, round(eval * n)) if eval > 0 else 0
    elif isinstance(eval, int):
        if eval < 0:
            raise UsageError(f"`eval`={eval!r}: the number of eval examples cannot be negative.")
        count = eval
    else:
        raise UsageError(
            f"`eval` must be 'auto', a fraction in (0, 1), a number of examples or 0; got {type(eval).__name__}."
        )
    if count >= n:
        raise UsageError(
            f"`eval`={eval!r} holds out {count} of the {n} examples and leaves none for training: pass a smaller "
            "eval, or eval_data= with a separate eval set."
        )
    return count


def _split(examples: list, n_eval: int, seed: int) -> tuple[list, list | None]:
    """Hold out ``n_eval`` examples chosen by ``torch.randperm`` seeded by ``seed``; both parts keep data order."""
    if n_eval <= 0:
        return examples, None
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(int(seed))).tolist()
    held = set(perm[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


# ----------------------------------------------------------------------------------------------- loading


class _Source(NamedTuple):
    items: list  # strings or mappings
    features: Any  # a Dataset's ``features`` (for ClassLabel names), else None


def _load(data: Any, what: str) -> _Source:
    """``data`` as a list of strings or of dicts, whatever container it came in."""
    if data is None:
        raise UsageError(
            f"`{what}` is missing: pass a list of texts or dicts, a Dataset, a DataFrame or a file path."
        )
    features = None
    if isinstance(data, (str, os.PathLike)):
        items = _read_file(data, what)
    elif isinstance(data, (bytes, bytearray)):
        raise UsageError(f"`{what}` is bytes; pass text (a list of strings) or a file path.")
    elif hasattr(data, "column_names"):  # datasets.Dataset (or DatasetDict)
        if isinstance(data.column_names, Mapping):
            splits = list(data.column_names)
            raise UsageError(
                f"`{what}` is a DatasetDict with splits {splits}; pass one split, e.g. data=ds['train']"
                f"{', eval_data=ds[' + repr(splits[1]) + ']' if len(splits) > 1 else ''}."
            )
        features = getattr(data, "features", None)
        items = list(data)
    elif hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas.DataFrame
        items = data.to_dict("records")
    elif isinstance(data, Mapping):
        items = _columns_to_records(data, what)
    elif hasattr(data, "tolist"):  # pandas.Series, numpy array of strings
        items = data.tolist()
    elif hasattr(data, "__iter__"):
        items = list(data)
    else:
        raise UsageError(
            f"`{what}` must be a list of texts or dicts, a Dataset, a DataFrame or a file path; got "
            f"{type(data).__name__}."
        )
    if not isinstance(items, list):
        items = list(items)
    return _Source(_check_items(items, what), features)


def _columns_to_records(data: Mapping, what: str) -> list[dict]:
    """``{"text": [...], "label": [...]}`` → one dict per row (columns must be lists of one length)."""
    lengths = {len(v) for v in data.values() if isinstance(v, (list, tuple))}
    if not data or len(lengths) != 1 or not all(isinstance(v, (list, tuple)) for v in data.values()):
        raise UsageError(
            f"`{what}` is a dict with keys {list(data)[:8]}; pass a list of records ([{{'text': ...}}, ...]) or a "
            "dict of equally long column lists ({'text': [...]})."
        )
    keys = list(data)
    return [dict(zip(keys, row, strict=True)) for row in zip(*(data[k] for k in keys), strict=True)]


def _check_items(items: list, what: str) -> list:
    if not items:
        raise UsageError(f"`{what}` is empty: give at least one example.")
    if all(isinstance(x, str) for x in items) or all(isinstance(x, Mapping) for x in items):
        return items
    # A list of conversations: [[{"role": ..., "content": ...}, ...], ...]
    if all(isinstance(x, (list, tuple)) and x and all(isinstance(m, Mapping) for m in x) for x in items):
        return [{"messages": list(x)} for x in items]
    kinds = Counter(type(x).__name__ for x in items)
    found = ", ".join(f"{n} {name}" for name, n in kinds.most_common())
    raise UsageError(
        f"`{what}` must hold only strings (texts) or only dicts (records); found {found}. Convert the examples, "
        "e.g. [{'text': ...}] or [{'prompt': ..., 'response': ...}]."
    )


def _read_file(path: Any, what: str) -> list:
    """Examples from a .jsonl/.ndjson (one JSON value a line), .json (a list), .csv/.tsv (a header row) or
    .txt (one example per non-empty line) file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(
            f"`{what}` file not found: {path!r} (relative paths start at {os.getcwd()}). Check the path, or pass "
            "the examples themselves (a list of strings or dicts)."
        )
    if os.path.isdir(path):
        raise UsageError(
            f"`{what}` {path!r} is a folder; pass one {'/'.join(DATA_FILE_TYPES)} file, or a Dataset "
            "(datasets.load_from_disk(path))."
        )
    ext = os.path.splitext(path)[1].lower()
    if ext not in DATA_FILE_TYPES:
        raise UsageError(
            f"`{what}` file {path!r} has the extension {ext or '(none)'!r}; supported: {', '.join(DATA_FILE_TYPES)}."
            f"{did_you_mean(ext, DATA_FILE_TYPES)}"
        )
    try:
        with open(path, encoding="utf-8", newline="" if ext in (".csv", ".tsv") else None) as f:
            if ext in (".jsonl", ".ndjson"):
                items = []
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise UsageError(
                            f"`{what}` file {path!r}: line {number} is not valid JSON ({exc.msg}, column "
                            f"{exc.colno}). Each line must be one JSON object."
                        ) from None
                return items
            if ext == ".json":
                try:
                    value = json.load(f)
                except json.JSONDecodeError as exc:
                    raise UsageError(
                        f"`{what}` file {path!r} is not valid JSON: {exc.msg} at line {exc.lineno}, column "
                        f"{exc.colno}. (One JSON object per line? Name it .jsonl.)"
                    ) from None
                if isinstance(value, Mapping):
                    return _columns_to_records(value, what)
                if not isinstance(value, list):
                    raise UsageError(
                        f"`{what}` file {path!r} must hold a JSON list of records; found {type(value).__name__}."
                    )
                return value
            if ext in (".csv", ".tsv"):
                reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
                try:
                    rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
                except csv.Error as exc:
                    raise UsageError(
                        f"`{what}` file {path!r}: line {reader.line_num} cannot be read as CSV ({exc})."
                    ) from None
                if reader.fieldnames is None:
                    raise UsageError(
                        f"`{what}` file {path!r} is empty: it needs a header row and at least one row."
                    )
                return rows
            return [line.rstrip("\r\n") for line in f if line.strip()]  # .txt
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"`{what}` file {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})."
        ) from None


# ----------------------------------------------------------------------------------------------- records → examples


class _Text(NamedTuple):
    text: str


class _Pair(NamedTuple):
    prompt: str
    response: str


class _Chat(NamedTuple):
    messages: list[dict]


class _Ids(NamedTuple):
    """An example given already tokenized (``input_ids``, optional ``labels``): used as it is."""

    ids: list[int]
    labels: list[int] | None


class _Labeled(NamedTuple):
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
        f"Rename the column or pass {hint}."
    )


def _lm_examples(source: _Source, text_column: str | None, what: str) -> list:
    """Causal LM examples (_Text, _Pair or _Chat); empty texts and empty responses are skipped."""
    items = source.items
    if isinstance(items[0], str):
        examples = [_Text(t) for t in items if t.strip()]
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
        kind: tuple = ("text", text_column)
    elif "input_ids" in columns:
        kind = ("ids", "input_ids")
    elif chat := next((c for c in _CHAT_COLUMNS if c in columns), None):
        kind = ("chat", chat)
    elif pair := next((p for p in _PAIRS if p[0] in columns and p[1] in columns), None):
        kind = ("pair", *pair)
    elif text := next((c for c in _LM_TEXT_COLUMNS if c in columns), None):
        kind = ("text", text)
    else:
        raise _no_known_columns(
            columns,
            "CAUSAL_LM",
            what,
            "`text`; `prompt`+`response`/`completion`; `instruction`+`output`; `question`+`answer`; `messages`",
            "text_column=",
        )

    examples: list = []
    for i, item in enumerate(items):
        if kind[0] == "text":
            text = _string(item, kind[1], i, what)
            if text.strip():
                examples.append(_Text(text))
        elif kind[0] == "ids":
            ids = item["input_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                raise UsageError(f"`{what}` record {i}: `input_ids` must be a list of token ids (ints).")
            labels = item.get("labels")
            if ids:
                examples.append(_Ids(list(ids), list(labels) if labels is not None else None))
        elif kind[0] == "pair":
            prompt, response = _string(item, kind[1], i, what), _string(item, kind[2], i, what)
            if kind[1] == "instruction":
                extra = _string(item, "input", i, what)
                prompt = f"{prompt}\n{extra}" if extra.strip() else prompt
            if response.strip():
                examples.append(_Pair(prompt, response))
        else:
            messages = _messages(item.get(kind[1]), i, kind[1], what)
            if messages:
                examples.append(_Chat(messages))
    if not examples:
        raise UsageError(f"`{what}` has no non-empty example in the column(s) {', '.join(kind[1:])}.")
    return examples


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


def _cls_examples(source: _Source, text_column: str | None, label_column: str | None, what: str):
    """Classification examples (_Labeled with the raw label) and a Dataset's ClassLabel names, if any."""
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
        raise _no_known_columns(
            columns, "SEQ_CLS", what, "`text`, `sentence`, `review`... and `label`", "text_column="
        )
    label_col = label_column or next((c for c in _LABEL_COLUMNS if c in columns), None)
    if label_col is None:
        others = [c for c in columns if c not in text_cols]
        raise UsageError(
            f"`{what}` has no label column for SEQ_CLS (columns: {', '.join(columns)}); add a `label` column or "
            f"pass label_column=.{did_you_mean(others[0], _LABEL_COLUMNS) if others else ''}"
        )
    examples = []
    for i, item in enumerate(items):
        text = _string(item, text_cols[0], i, what)
        pair = _string(item, text_cols[1], i, what) if len(text_cols) > 1 else None
        if not text.strip():
            continue
        label = item.get(label_col)
        if _missing(label) or (isinstance(label, str) and not label.strip()):
            raise UsageError(f"`{what}[{i}]` has no `{label_col}`; every SEQ_CLS example needs a label.")
        examples.append(_Labeled(text, pair, label))
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


def _as_int(value: Any) -> int | None:
    """``value`` as a class id when it is a whole number (int, numpy int, 3.0, "3"), else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        return int(value.strip()) if re.fullmatch(r"\s*-?\d+\s*", value) else None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _label_ids(
    labels: list, label2id: Any, class_names: tuple[str, ...] | None
) -> tuple[list[int], tuple[str, ...]]:
    """Class ids and ``label_names`` (id → name).

    With ``label2id`` (a ``{name: id}`` dict or a list of names): a label is looked up by name, or taken as the
    id when it is a whole number among the ids. Without: whole-number labels are the ids (names from a Dataset's
    ClassLabel, else "0", "1", ...); other labels get ids in sorted order of their text.
    """
    if label2id is not None:
        if isinstance(label2id, Mapping):
            mapping = {str(k): _as_int(v) for k, v in label2id.items()}
        elif isinstance(label2id, (list, tuple)):
            mapping = {str(name): i for i, name in enumerate(label2id)}
        else:
            raise UsageError(
                f"`label2id` must be a dict {{name: id}} or a list of names; got {type(label2id).__name__}."
            )
        if not mapping or any(v is None or v < 0 for v in mapping.values()):
            raise UsageError(f"`label2id` must map label names to ids 0, 1, ...; got {label2id!r:.80}.")
        id_set = set(mapping.values())
        ids = []
        for i, label in enumerate(labels):
            key = str(label).strip() if isinstance(label, str) else str(label)
            if key in mapping:
                ids.append(mapping[key])
            elif (as_int := _as_int(label)) is not None and as_int in id_set:
                ids.append(as_int)
            else:
                raise UsageError(
                    f"label {label!r} (example {i}) is not in `label2id` ({', '.join(map(repr, mapping))}).{did_you_mean(key, mapping)} "
                    "Add it to label2id or fix the data."
                )
        by_id = {v: k for k, v in mapping.items()}
        return ids, tuple(by_id.get(i, str(i)) for i in range(max(id_set) + 1))

    as_ints = [_as_int(label) for label in labels]
    if all(v is not None for v in as_ints):
        if min(as_ints) < 0:
            raise UsageError(
                f"label {min(as_ints)} is negative; class ids start at 0 (pass label2id= to name string labels)."
            )
        count = max(as_ints) + 1
        if class_names and len(class_names) >= count:
            return as_ints, tuple(class_names)
        return as_ints, tuple(str(i) for i in range(count))
    texts = [label.strip() if isinstance(label, str) else str(label) for label in labels]
    names = tuple(sorted(set(texts)))
    index = {name: i for i, name in enumerate(names)}
    return [index[t] for t in texts], names


# ----------------------------------------------------------------------------------------------- tokenizing


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


def _finish(ids: list[int], labels: list[int], seq: int, out: list[dict]) -> tuple[int, int]:
    """Cut to ``seq`` and keep the example if a label after the first token is left (the first is never
    predicted); returns (truncated, dropped) as 0/1."""
    cut = len(ids) > seq
    ids, labels = ids[:seq], labels[:seq]
    if not any(label != IGNORE_INDEX for label in labels[1:]):
        return int(cut), 1
    out.append({"input_ids": ids, "labels": labels})
    return int(cut), 0


def _tokenize_lm(examples: list, tokenizer: Any, seq: int) -> tuple[list[dict], int, int]:
    bos = _bos(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [eos] if isinstance(eos, int) else []

    def with_eos(ids: list[int]) -> list[int]:
        return ids + tail if tail and ids[-1:] != tail else ids

    texts = [ex.text for ex in examples if isinstance(ex, _Text)]
    prompts = [ex.prompt for ex in examples if isinstance(ex, _Pair)]
    responses = [ex.response for ex in examples if isinstance(ex, _Pair)]
    text_ids = iter(_encode(tokenizer, texts))
    prompt_ids = iter(_encode(tokenizer, prompts))
    response_ids = iter(_encode(tokenizer, responses))
    # The {% generation %} mask maps characters to tokens: it needs a fast (Rust) tokenizer.
    use_mask = _has_generation_block(tokenizer) and bool(getattr(tokenizer, "is_fast", False))

    out: list[dict] = []
    truncated = dropped = 0
    for ex in examples:
        if isinstance(ex, _Text):
            ids = with_eos(bos + next(text_ids))
            labels = list(ids)
        elif isinstance(ex, _Pair):
            prompt = bos + next(prompt_ids)
            response = with_eos(next(response_ids))
            ids = prompt + response
            labels = [IGNORE_INDEX] * len(prompt) + response
        elif isinstance(ex, _Ids):
            ids, labels = ex.ids, ex.labels if ex.labels is not None else list(ex.ids)
        else:
            ids, labels = _chat_tokens(tokenizer, ex.messages, use_mask)
        cut, skip = _finish(ids, labels, seq, out)
        truncated += cut
        dropped += skip
    return out, truncated, dropped


def _tokenize_cls(examples: list[_Labeled], tokenizer: Any, seq: int) -> tuple[list[dict], int, int]:
    """``{"input_ids", "label"}`` with the tokenizer's own special tokens ([CLS] ... [SEP]); over-long examples
    are re-tokenized with the tokenizer's truncation so the closing special token stays."""
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair for ex in examples] if examples and examples[0].text_pair is not None else None
    ids_list: list[list[int]] = []
    for begin in range(0, len(texts), 1024):
        kwargs = {"text_pair": pairs[begin : begin + 1024]} if pairs else {}
        ids_list.extend(list(ids) for ids in tokenizer(texts[begin : begin + 1024], **kwargs)["input_ids"])
    long = [i for i, ids in enumerate(ids_list) if len(ids) > seq]
    if long:
        kwargs = {"text_pair": [pairs[i] for i in long]} if pairs else {}
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=seq, **kwargs)["input_ids"]
        for i, ids in zip(long, cut, strict=True):
            ids_list[i] = list(ids)[:seq]
    out = [{"input_ids": ids, "label": int(ex.label)} for ids, ex in zip(ids_list, examples, strict=True)]
    return out, len(long), 0


# ----------------------------------------------------------------------------------------------- chat templates


def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):  # named templates: the default one formats plain conversations
        template = template.get("default") or next(iter(template.values()), None)
    return template if isinstance(template, str) else ""


def _check_chat_template(tokenizer: Any) -> None:
    if not _template_text(tokenizer) or not hasattr(tokenizer, "apply_chat_template"):
        raise UsageError(
            "`tokenizer` has no chat template, so `messages` cannot be formatted: use the tokenizer of an instruct/"
            "chat model, set tokenizer.chat_template = '...', or give prompt/response columns instead."
        )


def _has_generation_block(tokenizer: Any) -> bool:
    return bool(_GENERATION_BLOCK.search(_template_text(tokenizer)))


def _chat_tokens(tokenizer: Any, messages: list[dict], use_mask: bool) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels that train only the assistant turns (see the module rules)."""
    if use_mask:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"], strict=True)]
        return ids, labels

    def render(turns: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)

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
