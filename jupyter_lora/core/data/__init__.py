"""Training data: whatever the user holds (texts, records, a ``datasets.Dataset``, a pandas DataFrame, a file)
→ tokenized examples → deterministic, resumable batches.

- ``sources``: reading a source into a list of texts or records;
- ``formats``: recognising the record format and turning records into examples;
- ``labels``: class ids and label names for classification;
- ``tokenize``: causal LM (prompt masking), chat (assistant-only masking) and classification tokenisation;
- ``prepared``: ``PreparedData`` — the eval split, padded or packed batches in a resumable order;
- ``trace``: what happened to each record on the way (for the data preview, ``preview``).

``prepare_data`` runs them in that order; ``find_tokenizer`` finds the tokenizer saved beside a model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import UsageError
from ..modelinfo import base_model_of, normalize_task_type
from .formats import Chat, cls_examples, lm_examples
from .labels import label_ids
from .prepared import PreparedData, eval_count, positive_setting, split_eval
from .processors import MEDIA_TASKS, find_processor, image_processor, text_tokenizer
from .sources import DATA_FILE_TYPES, load_source
from .tokenize import check_chat_template, check_token_ids, pad_token_id, tokenize_cls, tokenize_lm
from .trace import DataTrace

__all__ = [
    "DATA_FILE_TYPES",
    "DataTrace",
    "PreparedData",
    "find_processor",
    "find_tokenizer",
    "prepare_data",
    "vocab_size_of",
]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


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
    vocab_size: int | None = None,
    chat_template: str | None = None,
    trace: DataTrace | None = None,
    image_column: str | None = None,
    audio_column: str | None = None,
    decoder_start_token_id: int | None = None,
) -> PreparedData:
    """Tokenize ``data`` for ``task`` ("CAUSAL_LM" or "SEQ_CLS") and hold out an eval split.

    ``data``: a list of strings or dicts (``text``; ``prompt``+``response``/``completion``;
    ``instruction``+``output`` (+``input``); ``question``+``answer``; chat ``messages``; for SEQ_CLS a text column
    and a ``label``), a dict of columns, a ``datasets.Dataset``, a pandas DataFrame, or a path to a .jsonl, .json,
    .csv, .tsv or .txt file. ``eval``: None/"auto" (10% up to 500 examples when there are at least 100, else
    none), a fraction in (0, 1), a number of examples, or 0/False; ``eval_data`` gives a separate eval set instead.
    ``label2id``: ``{name: id}`` (or a list of names) for string labels; default: the sorted unique labels.
    ``vocab_size``: the model's number of token ids (``vocab_size_of(model)``); a token id outside it, given
    pre-tokenised or produced by the tokenizer, is a UsageError naming the record or the token.
    ``chat_template``: formats ``messages`` instead of the tokenizer's own template (Jinja text, or the name of one
    of its templates). ``trace``: a ``DataTrace`` to fill in with what happened to each record (the preview's).

    Images and audio (tasks IMAGE_CLS, AUDIO_CLS, ASR; ``tokenizer`` is then the model's processor): see
    ``media.prepare_media``; ``image_column`` / ``audio_column`` name the column holding them, and
    ``decoder_start_token_id`` is an encoder-decoder's (Whisper), taken off the front of the transcripts.
    """
    if tokenizer is not None and not callable(tokenizer):
        raise UsageError(
            f"`tokenizer` must be a transformers tokenizer, got {type(tokenizer).__name__}. "
            "Pass the result of AutoTokenizer.from_pretrained(...)."
        )
    seq = positive_setting("seq", seq)
    task = _data_task(task)
    if task in MEDIA_TASKS or (task == "CAUSAL_LM" and image_processor(tokenizer) is not None):
        return _prepare_media(
            data, tokenizer, task=task, seq=seq, eval=eval, eval_data=eval_data, packing=packing, seed=seed,
            label2id=label2id, text_column=text_column, label_column=label_column, vocab_size=vocab_size,
            chat_template=chat_template, trace=trace, image_column=image_column, audio_column=audio_column,
            decoder_start_token_id=decoder_start_token_id,
        )  # fmt: skip
    given = tokenizer
    tokenizer = text_tokenizer(tokenizer)  # a processor given for a text model: its tokenizer
    for name, value in (("image_column", image_column), ("audio_column", audio_column)):
        if value is not None:
            raise UsageError(
                f"`{name}`={value!r} is for image or audio records (tasks image_cls, audio_cls, asr); the task is "
                f"{task}. Drop {name}, or set the task of an image or audio model."
            )
    if packing and task != "CAUSAL_LM":
        raise UsageError(f"`packing=True` is for causal LM training only (task {task}); set packing=False.")
    if label_column is not None and task != "SEQ_CLS":
        raise UsageError(
            f"`label_column`={label_column!r} is for SEQ_CLS (classification) data; the task is {task}. "
            "Drop label_column or pass task='SEQ_CLS'."
        )

    source = load_source(data, "data")
    items = source.items
    if task == "CAUSAL_LM":  # images in the records need the model's processor: never train them as text
        from .vision_chat import refuse_images

        refuse_images(items, given)
    # what the trace records: record index of each example, records skipped, each tokenized example
    origins: dict[str, list[int] | None] = {"data": None, "eval_data": None}
    skipped: dict[str, list | None] = {"data": None, "eval_data": None}
    notes: dict[str, list | None] = {"train": None, "eval": None}
    if trace is not None:
        trace.records["data"] = len(items)
        for key in origins:
            origins[key], skipped[key] = [], trace.skipped.setdefault(key, [])
        for key in notes:
            notes[key] = trace.tokenized.setdefault(key, [])
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
        eval_source = load_source(eval_data, "eval_data")
        if trace is not None:
            trace.records["eval_data"] = len(eval_source.items)

    if task == "SEQ_CLS":
        train_ex, class_names = cls_examples(
            source, text_column, label_column, "data", origins["data"], skipped["data"]
        )
        eval_ex = None
        if eval_data is not None:
            eval_ex, _ = cls_examples(
                eval_source,
                text_column,
                label_column,
                "eval_data",
                origins["eval_data"],
                skipped["eval_data"],
            )
        ids, label_names = label_ids(
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
        train_ex = lm_examples(source, text_column, "data", vocab_size, origins["data"], skipped["data"])
        eval_ex = (
            lm_examples(
                eval_source, text_column, "eval_data", vocab_size, origins["eval_data"], skipped["eval_data"]
            )
            if eval_data is not None
            else None
        )
        label_names = ()
        if any(isinstance(ex, Chat) for ex in train_ex + (eval_ex or [])):
            check_chat_template(tokenizer, chat_template)

    if eval_data is None:
        n_eval = eval_count(eval, len(train_ex))
        train_ex, eval_ex = split_eval(train_ex, n_eval, seed)
        if trace is not None:  # the same split of the record indices
            train_origins, eval_origins = split_eval(origins["data"], n_eval, seed)
            trace.origins.update(train=train_origins, eval=eval_origins or [])
    elif trace is not None:
        trace.origins.update(train=origins["data"], eval=origins["eval_data"])

    def tokenize_examples(examples: list, split: str) -> tuple[list[dict], int, int]:
        if task == "SEQ_CLS":
            return tokenize_cls(examples, tokenizer, seq, notes[split])
        return tokenize_lm(examples, tokenizer, seq, chat_template, notes[split])

    train, truncated, dropped = tokenize_examples(train_ex, "train")
    if not train:
        raise UsageError(
            f"No training example is left: all {dropped} have nothing to learn after cutting them to `seq`={seq} "
            "tokens (the prompt alone fills seq, or the chat template marks no assistant token). Raise seq or "
            "shorten the prompts."
        )
    eval_tok = None
    if eval_ex:
        eval_tok, eval_truncated, eval_dropped = tokenize_examples(eval_ex, "eval")
        truncated += eval_truncated
        dropped += eval_dropped
        eval_tok = eval_tok or None
    if vocab_size is not None:
        check_token_ids(train + (eval_tok or []), tokenizer, vocab_size, padding=not packing)

    return PreparedData(
        task=task,
        train=train,
        eval=eval_tok,
        label_names=tuple(label_names),
        train_tokens=sum(len(ex["input_ids"]) for ex in train),
        truncated=truncated,
        packing=bool(packing),
        pad_token_id=pad_token_id(tokenizer),
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


def vocab_size_of(model: Any) -> int | None:
    """How many token ids ``model`` can embed: the rows of its input embeddings (resized ones included), else
    its config's ``vocab_size``; None when it has neither."""
    base = base_model_of(model) if isinstance(model, torch.nn.Module) else model
    get = getattr(base, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except (NotImplementedError, AttributeError):  # optional: audio and vision models may not have one
        embeddings = None
    rows = getattr(embeddings, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def _prepare_media(data: Any, processor: Any, **kwargs: Any) -> PreparedData:
    """Records with images or audio, through the model's processor (``media``: image and audio classification,
    speech recognition; ``vision_chat``: chat with images for vision-language models)."""
    if kwargs["task"] in MEDIA_TASKS:
        from .media import prepare_media

        return prepare_media(data, processor, **kwargs)
    from .vision_chat import prepare_vision_chat  # a causal LM with an image processor: chat with images

    return prepare_vision_chat(data, processor, text=prepare_data, **kwargs)


def _data_task(task: Any) -> str:
    key = str(task).strip().upper().replace("-", "_")
    if key in MEDIA_TASKS:
        return key
    normalized = normalize_task_type(task)
    if normalized not in ("CAUSAL_LM", "SEQ_CLS"):
        raise UsageError(
            f"`task`={task!r}: data can be prepared for CAUSAL_LM, SEQ_CLS, {', '.join(MEDIA_TASKS)} only. Pass "
            "one of those, e.g. task='CAUSAL_LM'."
        )
    return normalized
