"""Where the progress display is shown: a Jupyter kernel, a terminal IPython, or plain Python.

IPython is imported only when something is displayed, or when it is already loaded (then a shell may be running).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["display", "get_ipython", "in_kernel"]


def get_ipython() -> Any:
    """The running IPython shell, or None (without importing IPython when nothing has imported it yet)."""
    if "IPython" not in sys.modules:  # nothing imported IPython: certainly no kernel, and no import cost
        return None
    from IPython import get_ipython as current_shell

    return current_shell()


def in_kernel() -> bool:
    """True inside a Jupyter kernel (the shell has a ``kernel``); False in a terminal IPython or plain Python."""
    return getattr(get_ipython(), "kernel", None) is not None


def display(obj: Any, **kwargs: Any) -> Any:
    """``IPython.display.display(obj, **kwargs)``: returns the display handle when ``display_id`` is given."""
    from IPython.display import display as ipython_display

    return ipython_display(obj, **kwargs)
