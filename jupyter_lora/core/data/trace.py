"""What preparing data did with each record — which example it became, which split it went to, its length before
the cut to ``seq``, and why a record trains nothing — recorded for the data preview while ``prepare_data`` runs.
Training passes no trace and records nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["DataTrace", "Skipped", "Tokenized"]


class Skipped(NamedTuple):
    """A record that gave no example (an empty text, an empty response, a conversation without turns)."""

    record: int
    reason: str


class Tokenized(NamedTuple):
    """One tokenized example: its length before the cut to ``seq``, whether it was cut, whether it was kept (an
    example left with no token to learn is dropped)."""

    length: int
    cut: bool
    kept: bool


@dataclass
class DataTrace:
    """Filled in by ``prepare_data(..., trace=DataTrace())``.

    ``records``: how many records each source held (``"data"``, ``"eval_data"``). ``skipped``: per source, the
    records that gave no example. ``origins``: per split (``"train"``, ``"eval"``), the record index of each
    example, in the order the split holds them. ``tokenized``: per split, one ``Tokenized`` per example, in the
    same order; the kept ones are the split's examples in ``PreparedData``.
    """

    records: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, list[Skipped]] = field(default_factory=dict)
    origins: dict[str, list[int]] = field(default_factory=dict)
    tokenized: dict[str, list[Tokenized]] = field(default_factory=dict)
