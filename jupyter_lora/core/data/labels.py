"""Class ids for classification labels, and the label names a classifier head is given (id → name)."""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping
from typing import Any

from ..errors import UsageError, did_you_mean

__all__ = ["label_ids"]


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


def label_ids(
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
                f"label {min(as_ints)} is negative; class ids start at 0: number the classes 0, 1, ..., or label "
                "the records with class names (their order: the `labels` setting, labels=[...] in Python)."
            )
        count = max(as_ints) + 1
        if class_names and len(class_names) >= count:
            return as_ints, tuple(class_names)
        return as_ints, tuple(str(i) for i in range(count))
    mixed = sorted({str(label) for label, v in zip(labels, as_ints, strict=True) if v is not None})
    if mixed:  # class ids beside names: a mistake in the data, or ids whose names were meant to be given
        named = sorted({str(label) for label, v in zip(labels, as_ints, strict=True) if v is None})
        raise UsageError(
            f"labels mix class ids ({', '.join(mixed[:5])}) and names ({', '.join(map(repr, named[:5]))}): use one "
            "kind, or give the class names in id order with labels: [...] so both can be read."
        )
    texts = [label.strip() if isinstance(label, str) else str(label) for label in labels]
    names = tuple(sorted(set(texts)))
    index = {name: i for i, name in enumerate(names)}
    return [index[t] for t in texts], names
