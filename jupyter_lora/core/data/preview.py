"""The data preview: what training would make of ``data`` before a run starts — the first records as the model sees
them (template applied, masked tokens, the cut at ``seq``), token lengths, truncation, padding or packing, the
eval split and the records dropped, with the reason.

Everything comes from the code a training run executes: ``prepare_for`` (the run's ``prepare_data`` call, with the
model's task, label names and vocabulary) fills a ``DataTrace`` on the way, and the batches are made by
``PreparedData.batches`` / ``collate``. Nothing here tokenizes or masks on its own; the preview only decodes the
token ids training produced, to show them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..errors import UsageError
from ..modelinfo import require_module
from .formats import IGNORE_INDEX
from .processors import MEDIA_TASKS
from .trace import DataTrace

__all__ = ["DataReport", "Drop", "RecordView", "Segment", "report_data"]


class Segment(NamedTuple):
    """A run of consecutive tokens with the same role, decoded: ``trained`` is False for tokens whose label is
    -100 (the loss skips them), True for tokens with a label, None where there are no per-token labels
    (classification: the whole text is the input)."""

    text: str
    trained: bool | None
    tokens: int


class Drop(NamedTuple):
    """A record that trains nothing: its source ("data" or "eval_data"), its index there and why."""

    source: str
    record: int
    reason: str


@dataclass(frozen=True)
class RecordView:
    """One record of ``data`` as the model sees it.

    ``split``: "train" or "eval" (None when the record gave no example: see ``dropped``). ``input_ids`` and
    ``labels`` are the example's own, exactly as training holds them (cut to ``seq``; ``labels`` is None for
    classification, whose class is ``label``). ``segments`` are those ids decoded in runs of trained and masked
    tokens. ``length``: tokens before the cut; ``cut``: how many of them ``seq`` cut off.
    """

    record: int
    split: str | None
    input_ids: tuple[int, ...]
    labels: tuple[int, ...] | None
    segments: tuple[Segment, ...]
    length: int
    cut: int
    label: str | None = None
    dropped: str | None = None


@dataclass(frozen=True)
class DataReport:
    """What training would make of a data set (see ``report_data``).

    ``records``: the first records of ``data``. ``lengths``: the token length of every tokenized example (train,
    then eval) before the cut to ``seq``; ``truncated`` of them were cut. ``train`` / ``eval``: examples in each
    split; ``eval_from``: "split" (held out of ``data``), "eval_data", or None (no eval). ``tokens``: the train
    examples' tokens after the cut; ``target_tokens``: the tokens the loss is computed on (a label that is not
    -100, after the first token of each example). ``rows``: the batches of one epoch. ``padding_efficiency``:
    the share of real (not padding) tokens in padded batches of ``batch``; ``packing_efficiency``: the share in
    the packed rows, None when packing is off.
    """

    task: str
    seq: int
    batch: int
    packing: bool
    records: tuple[RecordView, ...]
    n_records: int
    n_eval_records: int | None
    train: int
    eval: int
    eval_from: str | None
    lengths: tuple[int, ...]
    truncated: int
    tokens: int
    target_tokens: int | None
    dropped: tuple[Drop, ...]
    rows: int
    padding_efficiency: float
    packing_efficiency: float | None
    label_names: tuple[str, ...] = ()
    # images and audio: (name, value) facts in words — images and their sizes, clips and their lengths, classes
    media: tuple[tuple[str, str], ...] = ()

    @property
    def truncated_share(self) -> float:
        """The share of tokenized examples cut by ``seq`` (0 to 1)."""
        return self.truncated / len(self.lengths) if self.lengths else 0.0

    def drop_reasons(self) -> dict[str, list[Drop]]:
        """The dropped records grouped by reason, most frequent first."""
        groups: dict[str, list[Drop]] = {}
        for drop in self.dropped:
            groups.setdefault(drop.reason, []).append(drop)
        return dict(sorted(groups.items(), key=lambda item: -len(item[1])))

    def __repr__(self) -> str:
        return (
            f"DataReport(task={self.task}, seq={self.seq}, train={self.train}, eval={self.eval}, "
            f"truncated={self.truncated}, dropped={len(self.dropped)})"
        )


def report_data(
    model: Any,
    data: Any,
    tokenizer: Any = None,
    *,
    eval_data: Any = None,
    n: int = 3,
    processor: Any = None,
    **settings: Any,
) -> DataReport:
    """What ``train(model, data, tokenizer=tokenizer, eval_data=eval_data, **settings)`` would train on, found by
    running the same preparation (nothing trains, the model and the data are not changed). ``settings``: the
    training settings (``seq``, ``packing``, ``eval``, ``seed``, ``batch``, ``task``, ``text_column``,
    ``label_column``, ``chat_template``, ...), checked as training checks them. ``n``: how many of the first
    records to show. The model needs no adapter yet. ``processor``: an image or audio model's processor (default:
    the one saved beside the model); its data is summarised (images and sizes, clips and lengths, classes)."""
    from ..train import check_eval, make_train_config, prepare_for, preprocessor_for, task_of
    from . import find_tokenizer

    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UsageError(f"`n` (records shown) must be a whole number >= 0, e.g. n=3; got {n!r}.")
    config = make_train_config(**settings)
    require_module(model)
    task = task_of(model, config.task)
    if task in MEDIA_TASKS or processor is not None:
        tokenizer = preprocessor_for(model, task, tokenizer, processor)
    tokenizer = tokenizer if tokenizer is not None else find_tokenizer(model)
    trace = DataTrace()
    prepared = prepare_for(model, config, data, tokenizer, eval_data, trace=trace)
    check_eval(config, prepared)
    if prepared.task in MEDIA_TASKS:
        return _media_report(prepared, trace, config, eval_data)

    eval_from = None if not prepared.eval else ("eval_data" if eval_data is not None else "split")
    sources = {"train": "data", "eval": "eval_data" if eval_data is not None else "data"}
    placed: dict[int, tuple[str, int]] = {}  # record of `data` -> (split, index among the split's examples)
    dropped = [Drop(source, s.record, s.reason) for source, found in trace.skipped.items() for s in found]
    for split in ("train", "eval"):
        kept = 0
        for record, note in zip(trace.origins.get(split, []), trace.tokenized.get(split, []), strict=True):
            if note.kept:
                if sources[split] == "data":
                    placed[record] = (split, kept)
                kept += 1
            else:
                dropped.append(Drop(sources[split], record, _drop_reason(note.cut, config.seq)))
    dropped.sort(key=lambda d: (d.source != "data", d.record))

    skipped_here = {d.record: d.reason for d in dropped if d.source == "data"}
    notes = {
        (split, record): note
        for split in ("train", "eval")
        if sources[split] == "data"
        for record, note in zip(trace.origins.get(split, []), trace.tokenized.get(split, []), strict=True)
    }
    records = []
    for record in range(min(n, trace.records["data"])):
        if record not in placed:
            note = notes.get(("train", record)) or notes.get(("eval", record))
            length = note.length if note is not None else 0
            cut = max(0, length - config.seq)
            records.append(
                RecordView(
                    record, None, (), None, (), length, cut, dropped=skipped_here.get(record, "dropped")
                )
            )
            continue
        split, index = placed[record]
        example = (prepared.train if split == "train" else prepared.eval)[index]
        records.append(_view(record, split, example, notes[(split, record)], prepared, tokenizer, config.seq))

    lengths = tuple(note.length for split in ("train", "eval") for note in trace.tokenized.get(split, []))
    targets = None
    if prepared.task == "CAUSAL_LM":
        targets = sum(sum(1 for label in ex["labels"][1:] if label != IGNORE_INDEX) for ex in prepared.train)
    padded = dataclasses.replace(prepared, packing=False)
    return DataReport(
        task=prepared.task,
        seq=config.seq,
        batch=config.batch,
        packing=prepared.packing,
        records=tuple(records),
        n_records=trace.records["data"],
        n_eval_records=trace.records.get("eval_data"),
        train=len(prepared.train),
        eval=len(prepared.eval or ()),
        eval_from=eval_from,
        lengths=lengths,
        truncated=prepared.truncated,
        tokens=prepared.train_tokens,
        target_tokens=targets,
        dropped=tuple(dropped),
        rows=prepared.num_batches("train", config.batch),
        padding_efficiency=_real_share(padded, config.batch, config.seed),
        packing_efficiency=_real_share(prepared, config.batch, config.seed) if prepared.packing else None,
        label_names=prepared.label_names,
    )


def _media_report(prepared: Any, trace: DataTrace, config: Any, eval_data: Any) -> DataReport:
    """The report of image or audio data: the split, the records skipped and the facts ``describe_media`` finds
    (no token views: the records are images or sound)."""
    from .media import describe_media

    dropped = tuple(
        Drop(source, s.record, s.reason) for source, found in trace.skipped.items() for s in found
    )
    return DataReport(
        task=prepared.task, seq=config.seq, batch=config.batch, packing=False, records=(),
        n_records=trace.records["data"], n_eval_records=trace.records.get("eval_data"), train=len(prepared.train),
        eval=len(prepared.eval or ()), eval_from=None if not prepared.eval else ("eval_data" if eval_data is not None else "split"),
        lengths=(), truncated=prepared.truncated, tokens=prepared.train_tokens, target_tokens=None, dropped=dropped,
        rows=prepared.num_batches("train", config.batch), padding_efficiency=1.0, packing_efficiency=None,
        label_names=prepared.label_names, media=tuple(describe_media(prepared)),
    )  # fmt: skip


def _drop_reason(cut: bool, seq: int) -> str:
    if cut:
        return f"nothing to learn in the first `seq`={seq} tokens (the prompt fills them)"
    return "no token to learn (every label is -100: no response, or no assistant turn the template marks)"


def _real_share(prepared: Any, batch: int, seed: int) -> float:
    """Real tokens / token slots over one epoch of the train batches ``prepared`` makes (what the training
    engine counts as tokens: the attention mask's ones, or the whole row of a packed batch)."""
    real = slots = 0
    for rows in prepared.batches("train", batch, seed=seed):
        ids = rows["input_ids"]
        mask = rows.get("attention_mask")
        slots += ids.numel()
        real += int(mask.sum()) if mask is not None else ids.numel()
    return real / slots if slots else 0.0


def _view(
    record: int, split: str, example: dict, note: Any, prepared: Any, tokenizer: Any, seq: int
) -> RecordView:
    ids = list(example["input_ids"])
    labels = example.get("labels")
    if labels is not None:
        flags: list[bool | None] = [label != IGNORE_INDEX for label in labels]
    else:
        flags = [None] * len(ids)
    label = None
    if "label" in example:
        names = prepared.label_names
        label = names[example["label"]] if example["label"] < len(names) else str(example["label"])
    return RecordView(
        record=record,
        split=split,
        input_ids=tuple(ids),
        labels=tuple(labels) if labels is not None else None,
        segments=tuple(_segments(tokenizer, ids, flags)),
        length=note.length,
        cut=max(0, note.length - seq) if note.cut else 0,
        label=label,
    )


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if tokenizer is None:  # pre-tokenised data without a tokenizer: the ids themselves
        return " ".join(map(str, ids)) + (" " if ids else "")
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _segments(tokenizer: Any, ids: list[int], flags: list[bool | None]) -> list[Segment]:
    """``ids`` decoded in runs of equal ``flags``. Each run's text is what decoding up to its end adds to the
    text decoded up to its start, so that characters split across tokens (bytes of one UTF-8 character, a
    word's leading space) land where the whole text has them; a run decoded alone is the fallback."""
    out: list[Segment] = []
    start, before = 0, ""
    for end in range(1, len(ids) + 1):
        if end < len(ids) and flags[end] == flags[start]:
            continue
        upto = _decode(tokenizer, ids[:end])
        text = upto[len(before) :] if upto.startswith(before) else _decode(tokenizer, ids[start:end])
        out.append(Segment(text, flags[start], end - start))
        start, before = end, upto
    return out
