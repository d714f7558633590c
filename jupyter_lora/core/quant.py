"""bitsandbytes, loaded only when 4/8-bit is asked for (PEFT's ``is_bnb_available`` pattern)."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from typing import Any

from .errors import UsageError

__all__ = ["is_bnb_available", "require_bitsandbytes"]


@lru_cache(maxsize=1)
def is_bnb_available() -> bool:
    """Whether bitsandbytes is installed (without importing it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def require_bitsandbytes(purpose: str) -> Any:
    """Import bitsandbytes for ``purpose`` or raise a UsageError with the install command."""
    if not is_bnb_available():
        raise UsageError(
            f"{purpose} need bitsandbytes, which is not installed: pip install 'jupyter-lora[qlora]' "
            "(or pip install bitsandbytes)."
        )
    try:
        import bitsandbytes
    except Exception as exc:  # installed but broken (no usable backend on this machine)
        raise UsageError(f"{purpose} need bitsandbytes, which failed to load here: {exc}") from None
    return bitsandbytes
