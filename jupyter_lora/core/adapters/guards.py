"""The checks every adapter operation makes before it touches a model: that the model holds adapters, that a named
adapter exists, and that no background run is training the model."""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import runs
from ..errors import NoAdapterError, UsageError, did_you_mean
from ..modelinfo import require_module
from .peft_facts import wrapper_for

__all__ = ["check_not_training", "require_adapter", "require_adapters"]


def check_not_training(model: nn.Module, action: str) -> None:
    """Refuse to change (or read half-updated weights of) a model that a background run is training."""
    run = runs.active_run(model)
    if run is not None:
        raise UsageError(
            f"Cannot {action} while this model is training (step {run.step}/{run.total_steps}). Stop the run first: "
            "run.stop() or %lora stop model — it saves a checkpoint."
        )


def require_adapters(model: Any, action: str) -> nn.Module:
    """The PeftModel of ``model``, which must hold at least one adapter and not be training; ``action`` says what
    the caller is about to do, for the message."""
    require_module(model)
    peft_model = wrapper_for(model)
    check_not_training(peft_model if peft_model is not None else model, action)
    if peft_model is None or not getattr(peft_model, "peft_config", None):
        raise NoAdapterError(
            f"Cannot {action}: this model has no LoRA adapter. Inject one first: "
            "model = jupyter_lora.inject(model, r=16, targets='q_proj,v_proj') (or a %%lora cell)."
        )
    return peft_model


def require_adapter(peft_model: nn.Module, name: str, what: str = "name") -> None:
    """Raise ``NoAdapterError`` (with close matches) unless ``peft_model`` holds an adapter called ``name``."""
    names = list(peft_model.peft_config)
    if name not in names:
        raise NoAdapterError(
            f"`{what}` {name!r}: no adapter of that name on this model.{did_you_mean(name, names)} "
            f"Adapters: {', '.join(repr(n) for n in names)}."
        )
