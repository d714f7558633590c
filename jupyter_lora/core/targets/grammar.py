"""The target-spec grammar, pure (no model): splitting a spec into items, layer ranges, presets, and which paths
a name, dotted suffix, glob or ``re:`` regular expression matches."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import TargetError, UsageError

__all__ = ["PRESETS", "compile_regex", "match_paths", "parse_layers", "preset_name", "split_spec"]

PRESETS = ("attention", "mlp", "all-linear", "qv", "experts", "vision")


def split_spec(value: Any, what: str = "targets") -> tuple[str, ...]:
    """``"q_proj, v_proj"`` or ``["q_proj", "v_proj"]`` -> ``("q_proj", "v_proj")``. ``re:`` items keep commas
    inside braces (``re:x{1,2}``) because a regex is only split outside brackets."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = _split_top_level(value)
    elif isinstance(value, Iterable):
        items = []
        for item in value:
            if not isinstance(item, str):
                raise UsageError(
                    f"`{what}` must be module names (strings), got {item!r} ({type(item).__name__}) in "
                    f"{list(value)!r}. Write e.g. {what}: q_proj, v_proj."
                )
            items.extend(_split_top_level(item))
    else:
        raise UsageError(
            f"`{what}` must be a comma-separated string or a list of names, got {value!r} "
            f"({type(value).__name__}). Write e.g. {what}: q_proj, v_proj."
        )
    return tuple(i for i in items if i)


def _split_top_level(text: str) -> list[str]:
    out, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    out.append("".join(current).strip())
    return out


def parse_layers(value: Any, num_layers: int) -> tuple[int, ...] | None:
    """``"0-11, 20"`` / ``5`` / ``[0, 1, -1]`` / ``range(4)`` -> sorted layer indices, checked against the model.
    None, a blank string or an empty list -> None (every layer)."""
    if value is None or value == [] or (isinstance(value, str) and not value.strip()):
        return None
    if num_layers == 0:
        raise UsageError(
            f"`layers` was given ({value!r}) but this model has no repeated layer blocks to choose from. "
            "Remove `layers`, or select modules by name in `targets`."
        )
    items: list[Any]
    if isinstance(value, bool):
        raise UsageError(f"`layers` must be layer indices like 0-11, 20; got {value!r}.")
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        items = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple, range, set, frozenset)):
        items = list(value)
    else:
        raise UsageError(
            f'`layers` must be indices and ranges like "0-11, 20" or a list of ints, got {value!r} '
            f"({type(value).__name__})."
        )
    indices: set[int] = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise UsageError(f"`layers` items must be integers or ranges like 0-11; got {item!r}.")
        if isinstance(item, int):
            lo = hi = item
        else:
            m = re.fullmatch(r"\s*(-?\d+)\s*(?:(?:-|:|\.\.)\s*(-?\d+)\s*)?", item)
            if not m:
                raise UsageError(
                    f"`layers` item {item!r} is not an index or a range; write e.g. 0-11, 20 "
                    f"(the model has layers 0-{num_layers - 1})."
                )
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo < 0 and hi == lo:
            lo = hi = num_layers + lo
        if lo > hi:
            raise UsageError(f"`layers` range {item!r} runs backwards; write it low-high, e.g. {hi}-{lo}.")
        if lo < 0 or hi >= num_layers:
            raise UsageError(
                f"`layers` {item!r} is out of range: this model has {num_layers} layers, numbered "
                f"0-{num_layers - 1}."
            )
        indices.update(range(lo, hi + 1))
    return tuple(sorted(indices))


def preset_name(item: str) -> str | None:
    """The preset a spec item names (``"Attention"``, ``"all_linear"``, ``"all"`` -> ``"all-linear"``, ``"expert"``
    -> ``"experts"``), else None."""
    lowered = item.lower().replace("_", "-")
    if lowered == "all":
        return "all-linear"
    if lowered == "expert":
        return "experts"
    return lowered if lowered in PRESETS else None


def _is_glob(item: str) -> bool:
    return any(ch in item for ch in "*?[")


def match_paths(item: str, paths: Sequence[str]) -> list[str]:
    """The ``paths`` one spec item selects: ``re:`` a full-path regex, a glob (against the path or any dotted tail
    of it), else a name or dotted suffix (the path equals it or ends with ``.`` + it, PEFT's rule)."""
    if item.startswith("re:"):
        pattern = compile_regex(item[3:])
        return [p for p in paths if pattern.fullmatch(p)]
    if _is_glob(item):
        return [p for p in paths if fnmatch.fnmatchcase(p, item) or fnmatch.fnmatchcase(p, "*." + item)]
    dotted = "." + item
    return [p for p in paths if p == item or p.endswith(dotted)]


def compile_regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` (the part after ``re:``) compiled, or a ``TargetError`` that shows why it is not valid."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TargetError(f"`targets` regex re:{pattern} is not valid: {exc}. Fix the expression.") from None
