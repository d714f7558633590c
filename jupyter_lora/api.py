"""The public Python API by name, each name resolved on first use from the module that defines it (so that
``import jupyter_lora`` loads no torch). The top-level package re-exports it; the notebook layers (magics, widgets)
call it as ``api.inject(...)`` — the same functions a user calls as ``jupyter_lora.inject(...)``.
"""

from __future__ import annotations

import importlib
from typing import Any

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
    "compare": "jupyter_lora.core.compare",
    "Comparison": "jupyter_lora.core.compare",
    "generate": "jupyter_lora.core.serve",
    "Generations": "jupyter_lora.core.serve",
    "prepare_hotswap": "jupyter_lora.core.adapters",
    "chat": "jupyter_lora.widgets.chat",
    "Conversation": "jupyter_lora.core.chat",
    "UsageError": "jupyter_lora.core.errors",
    "train": "jupyter_lora.core.train",
    "resume": "jupyter_lora.core.train",
    "last_run": "jupyter_lora.core.train",
    "runs": "jupyter_lora.core.train.runlist",
    "RunList": "jupyter_lora.core.train.runlist",
    "TrainingRun": "jupyter_lora.core.train",
    "TrainingEvent": "jupyter_lora.core.events",
    "ProgressCallback": "jupyter_lora.widgets.progress",
    "Panel": "jupyter_lora.widgets.panel",
    "panel": "jupyter_lora.widgets.panel",
    "load_base": "jupyter_lora.core.quant",
    "export": "jupyter_lora.core.export",
    "sweep": "jupyter_lora.core.sweep",
    "resume_sweep": "jupyter_lora.core.sweep",
    "last_sweep": "jupyter_lora.core.sweep",
    "Sweep": "jupyter_lora.core.sweep",
    "SweepTable": "jupyter_lora.core.sweep",
    "SweepEvent": "jupyter_lora.core.sweep",
    "preview_data": "jupyter_lora.data_preview",
    "DataPreview": "jupyter_lora.data_preview",
}
_RENAMED = {"find_targets": "resolve"}


__all__ = list(_LAZY)  # resolved on first use by __getattr__


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jupyter_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
