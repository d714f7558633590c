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
    "compare": "jupyter_lora.core.compare",
    "Comparison": "jupyter_lora.core.compare",
    "UsageError": "jupyter_lora.core.errors",
    "train": "jupyter_lora.core.train",
    "resume": "jupyter_lora.core.train",
    "last_run": "jupyter_lora.core.train",
    "TrainingRun": "jupyter_lora.core.train",
    "TrainingEvent": "jupyter_lora.core.events",
    "ProgressCallback": "jupyter_lora.widgets.progress",
    "Panel": "jupyter_lora.widgets.panel",
    "load_base": "jupyter_lora.core.quant",
    "export": "jupyter_lora.core.export",
}
_RENAMED = {"find_targets": "resolve"}

__all__ = [
    "AdapterStatus",
    "Comparison",
    "LoraSpec",
    "MemoryEstimate",
    "Panel",
    "Plan",
    "ProgressCallback",
    "TrainingEvent",
    "TrainingRun",
    "UsageError",
    "compare",
    "delete",
    "disable",
    "enable",
    "estimate",
    "export",
    "find_targets",
    "inject",
    "last_run",
    "load",
    "load_base",
    "make_spec",
    "merge",
    "plan",
    "resume",
    "save",
    "status",
    "train",
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
    from .core.compare import Comparison, compare
    from .core.errors import UsageError
    from .core.events import TrainingEvent
    from .core.export import export
    from .core.memory import MemoryEstimate, estimate
    from .core.plan import Plan, plan
    from .core.quant import load_base
    from .core.spec import LoraSpec, make_spec
    from .core.targets import resolve as find_targets
    from .core.train import TrainingRun, last_run, resume, train
    from .widgets.panel import Panel
    from .widgets.progress import ProgressCallback


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jupyter_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# ------------------------------------------------------------------------------------------------ IPython extension


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext jupyter_lora``: register ``%lora`` / ``%%lora`` (cheap: torch loads on first use)."""
    from .magics.lora import LoraMagics

    if any(isinstance(m, LoraMagics) for m in ipython.configurables):
        return
    magics = LoraMagics(shell=ipython)  # Magics.__init__ adds it to ipython.configurables (for %config)
    ipython.register_magics(magics)
    _enable_colab_widgets()


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext jupyter_lora``: remove everything ``load_ipython_extension`` added."""
    from .magics.lora import LoraMagics

    manager = ipython.magics_manager
    for kind in ("line", "cell"):
        table = manager.magics[kind]
        if "lora" in table and getattr(table["lora"], "__self__", None).__class__ is LoraMagics:
            del table["lora"]
    manager.registry.pop("LoraMagics", None)
    ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, LoraMagics)]


def _enable_colab_widgets() -> None:
    """In Colab, third-party widgets (anywidget, plotly FigureWidget) render only with its custom manager."""
    import sys

    if "google.colab" in sys.modules:
        try:
            from google.colab import output

            output.enable_custom_widget_manager()
        except Exception:  # an older Colab runtime: widgets fall back to their text/HTML forms
            pass
