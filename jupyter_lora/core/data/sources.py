"""Reading a data source — texts, records, a dict of columns, a ``datasets.Dataset``, a pandas DataFrame, a list of
conversations, or a .jsonl/.ndjson/.json/.csv/.tsv/.txt file — into one list of strings or of dicts.

``datasets`` and ``pandas`` are never imported: a Dataset is anything with ``column_names`` that iterates as dicts,
a DataFrame anything with ``columns`` and ``to_dict("records")``.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any, NamedTuple

from ..errors import UsageError, did_you_mean

__all__ = ["DATA_FILE_TYPES", "Source", "load_source"]

DATA_FILE_TYPES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt")


class Source(NamedTuple):
    """The examples of one source, as a list of strings or of mappings, and a Dataset's ``features`` (for its
    ClassLabel names; None for other sources)."""

    items: list
    features: Any


def load_source(data: Any, what: str) -> Source:
    """``data`` as a list of strings or of dicts, whatever container it came in; ``what`` names it in errors."""
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
    return Source(_check_items(items, what), features)


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
