"""The checks every adapter operation makes before it touches a model: that the model holds adapters (and is not a
stale wrapper, see ``peft_facts.retire_wrapper``), that a named adapter exists, that no background run is training
the model, and that what it is about to allocate fits in the memory that is free."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import runs
from ..errors import NoAdapterError, UsageError, did_you_mean
from ..modelinfo import require_module
from ..units import fmt_bytes
from .peft_facts import wrapper_for

__all__ = ["check_fits_memory", "check_not_training", "free_memory", "require_adapter", "require_adapters"]


def check_not_training(model: nn.Module, action: str) -> None:
    """Refuse to change (or read half-updated weights of) a model that a background run or a sweep is training."""
    busy = runs.busy_message(model, action)
    if busy is not None:
        raise UsageError(busy)
    run = runs.active_run(model)
    if run is not None:
        # a run that has not counted its steps yet (it is preparing its first step) says so instead of "step 0/0"
        where = f"step {run.step}/{run.total_steps}" if run.total_steps else "starting"
        raise UsageError(
            f"Cannot {action} while this model is training ({where}). Stop the run first: "
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


def free_memory(device: torch.device) -> int:
    """Bytes that can be allocated on ``device`` now: free GPU memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits_memory(need: Mapping[torch.device, int], what: str, advice: str) -> None:
    """Refuse, before anything is allocated, when ``need`` (bytes per device) exceeds the memory free there;
    ``what`` names what needs it, ``advice`` says how to need less."""
    for device, nbytes in need.items():
        if device.type == "meta" or nbytes <= 0:
            continue
        free = free_memory(device)
        if nbytes > free:
            raise UsageError(
                f"{what} needs ≈ {fmt_bytes(nbytes)} on {device.type}, but only {fmt_bytes(free)} is free. {advice}"
            )
