"""User-facing errors.

A ``UsageError`` is a mistake the user can fix: it names the parameter, shows the value received, says what to
do and, for misspelled names, offers close matches. The notebook layer shows it as one line without a traceback
(IPython's own ``UsageError``); the core never imports IPython, so it has its own base class here.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "AdapterMismatchError",
    "NoAdapterError",
    "TargetError",
    "UsageError",
    "close_matches",
    "did_you_mean",
]


class UsageError(ValueError):
    """A mistake in what the user asked for. The model and files are left as they were."""


class TargetError(UsageError):
    """A target spec that matches nothing, or names a module that cannot take LoRA."""


class NoAdapterError(UsageError):
    """An operation that needs an adapter was called on a model without one (or with an unknown name)."""


class AdapterMismatchError(UsageError):
    """A saved adapter does not fit the model it is loaded into."""


def close_matches(word: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The candidates closest to ``word`` (difflib), best first."""
    return difflib.get_close_matches(str(word), sorted(set(candidates)), n=n, cutoff=cutoff)


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """`` did you mean `x`?`` (with a leading space) or an empty string when nothing is close."""
    matches = close_matches(word, candidates, n=n)
    if not matches:
        return ""
    if len(matches) == 1:
        return f" Did you mean `{matches[0]}`?"
    return " Did you mean " + ", ".join(f"`{m}`" for m in matches[:-1]) + f" or `{matches[-1]}`?"
