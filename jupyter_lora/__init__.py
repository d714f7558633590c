"""LoRA and QLoRA fine-tuning of the model in your notebook variable, with PEFT underneath.

>>> import jupyter_lora as jl
>>> p = jl.plan(model, r=16, targets="q_proj,v_proj")      # what would change; touches nothing
>>> model = jl.inject(model, r=16, targets="q_proj,v_proj")
>>> jl.save(model, "adapters/run1")

Importing this package is cheap: torch, transformers and PEFT load on first use of a function that needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "plan": "jupyter_lora.core.plan",
    "Plan": "jupyter_lora.core.plan",
    "estimate": "jupyter_lora.core.memory",
    "MemoryEstimate": "jupyter_lora.core.memory",
    "inject": "jupyter_lora.core.adapters",
    "merge": "jupyter_lora.core.adapters",
    "unload": "jupyter_lora.core.adapters",
    "save": "jupyter_lora.core.adapters",
    "load": "jupyter_lora.core.adapters",
    "use": "jupyter_lora.core.adapters",
    "enable": "jupyter_lora.core.adapters",
    "disable": "jupyter_lora.core.adapters",
    "delete": "jupyter_lora.core.adapters",
    "status": "jupyter_lora.core.adapters",
    "AdapterStatus": "jupyter_lora.core.adapters",
    "LoraSpec": "jupyter_lora.core.spec",
    "make_spec": "jupyter_lora.core.spec",
    "find_targets": "jupyter_lora.core.targets",
    "UsageError": "jupyter_lora.core.errors",
}
_RENAMED = {"find_targets": "resolve"}

__all__ = [
    "AdapterStatus",
    "LoraSpec",
    "MemoryEstimate",
    "Plan",
    "UsageError",
    "delete",
    "disable",
    "enable",
    "estimate",
    "find_targets",
    "inject",
    "load",
    "make_spec",
    "merge",
    "plan",
    "save",
    "status",
    "unload",
    "use",
]

if TYPE_CHECKING:  # pragma: no cover
    from .core.adapters import (
        AdapterStatus,
        delete,
        disable,
        enable,
        inject,
        load,
        merge,
        save,
        status,
        unload,
        use,
    )
    from .core.errors import UsageError
    from .core.memory import MemoryEstimate, estimate
    from .core.plan import Plan, plan
    from .core.spec import LoraSpec, make_spec
    from .core.targets import resolve as find_targets


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jupyter_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
