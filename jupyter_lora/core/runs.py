"""Which training run belongs to which model: the run training it now (one at a time) and its most recent run.

The training engine registers a run when it starts and reports when it ends; adapter operations ask whether a
model is being trained before they change it. Runs are kept per base model (the model under a PEFT wrapper), so
the wrapper and the base it wraps have the same runs.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from torch import nn

from .modelinfo import base_model_of

__all__ = [
    "active_run",
    "active_sweep",
    "busy_message",
    "finish",
    "last_run",
    "recent_runs",
    "register",
    "register_sweep",
]

# base model -> the run training it, and -> its most recent run (for resume without arguments)
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
_LAST: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
# base model -> its most recent sweep (which trains it, run after run, until it is done)
_SWEEPS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


_LOCK = threading.Lock()


def register(model: nn.Module, run: Any) -> bool:
    """Record ``run`` as the run training ``model`` now and as its most recent run — unless another run is
    training it already (checked and recorded at once, so two threads cannot both start): then False."""
    base = base_model_of(model)
    with _LOCK:
        current = _ACTIVE.get(base)
        if current is not None and current is not run and not current.done:
            return False
        _ACTIVE[base] = run
        _LAST[base] = run
    return True


def finish(model: nn.Module) -> None:
    """Record that the run training ``model`` has ended (it stays its most recent run)."""
    _ACTIVE.pop(base_model_of(model), None)


def active_run(model: nn.Module) -> Any | None:
    """The run training ``model`` right now, or None when nothing is training it."""
    run = _ACTIVE.get(base_model_of(model))
    return run if run is not None and not run.done else None


def last_run(model: nn.Module) -> Any | None:
    """The most recent run of ``model`` in this session (running or not), or None."""
    return _LAST.get(base_model_of(model))


def recent_runs() -> list[Any]:
    """The most recent run of every model of this session that is still alive."""
    with _LOCK:
        return list(_LAST.values())


def register_sweep(model: nn.Module, sweep: Any) -> None:
    """Record ``sweep`` as the sweep of ``model``: until it is done, operations on the model are refused."""
    _SWEEPS[base_model_of(model)] = sweep


def active_sweep(model: nn.Module) -> Any | None:
    """The sweep running on ``model`` now, or None; None too on the sweep's own thread (its runs change the
    model)."""
    sweep = _SWEEPS.get(base_model_of(model))
    if sweep is None or sweep.done or threading.current_thread() is getattr(sweep, "thread", None):
        return None
    return sweep


def busy_message(model: nn.Module, action: str) -> str | None:
    """Why ``action`` cannot happen now — a sweep is running on the model — or None."""
    sweep = active_sweep(model)
    if sweep is None:
        return None
    return (f"Cannot {action} while a sweep is running on this model ({sweep.progress_text()}). Stop the sweep "
            "first: jupyter_lora.last_sweep(model).stop() or the leaderboard's Stop button — the run in progress "
            "saves a checkpoint.")  # fmt: skip
