"""LoRA and QLoRA fine-tuning of the model in your notebook variable, with PEFT underneath.

>>> import jupyter_lora as jl
>>> p = jl.plan(model, r=16, targets="q_proj,v_proj")      # what would change; touches nothing
>>> model = jl.inject(model, r=16, targets="q_proj,v_proj")
>>> jl.preview_data(model, records, tok, seq=512)          # what training would see: masks, cuts, lengths
>>> jl.save(model, "adapters/run1")

Importing this package is cheap: torch, transformers and PEFT load on first use of a function that needs them.
Imported inside IPython (a notebook or a terminal), it teaches the shell to show results — plans, estimates,
adapter status, comparisons — as HTML tables and aligned text.
"""

from __future__ import annotations

import sys
import weakref
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from . import api as _api

__all__ = [
    "AdapterStatus",
    "Comparison",
    "Conversation",
    "DataPreview",
    "Generations",
    "LoraSpec",
    "MemoryEstimate",
    "Panel",
    "Plan",
    "ProgressCallback",
    "RunList",
    "Sweep",
    "SweepEvent",
    "SweepTable",
    "TrainingEvent",
    "TrainingRun",
    "UsageError",
    "chat",
    "compare",
    "delete",
    "disable",
    "enable",
    "estimate",
    "export",
    "find_targets",
    "generate",
    "inject",
    "last_run",
    "last_sweep",
    "load",
    "load_base",
    "make_spec",
    "merge",
    "panel",
    "plan",
    "prepare_hotswap",
    "preview_data",
    "resume",
    "resume_sweep",
    "runs",
    "save",
    "status",
    "sweep",
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
        prepare_hotswap,
        save,
        status,
        unload,
        use,
    )
    from .core.chat import Conversation
    from .core.compare import Comparison, compare
    from .core.errors import UsageError
    from .core.events import TrainingEvent
    from .core.export import export
    from .core.memory import MemoryEstimate, estimate
    from .core.plan import Plan, plan
    from .core.quant import load_base
    from .core.serve import Generations, generate
    from .core.spec import LoraSpec, make_spec
    from .core.sweep import Sweep, SweepEvent, SweepTable, last_sweep, resume_sweep, sweep
    from .core.targets import resolve as find_targets
    from .core.train import TrainingRun, last_run, resume, train
    from .core.train.runlist import RunList, runs
    from .data_preview import DataPreview, preview_data
    from .widgets.chat import chat
    from .widgets.panel import Panel, panel
    from .widgets.progress import ProgressCallback


def __getattr__(name: str) -> Any:
    value = getattr(_api, name)  # an AttributeError names this module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_api.__all__))


# ------------------------------------------------------------------------------------------------ IPython extension


# shells whose result formatters load_ipython_extension added (so unload_ipython_extension takes them away)
_FORMATTERS_FROM_EXTENSION: weakref.WeakSet[Any] = weakref.WeakSet()


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext jupyter_lora``: register ``%lora`` / ``%%lora`` (cheap: torch loads on first use)."""
    from .display import register_formatters
    from .magics.lora import LoraMagics

    if register_formatters(ipython):
        _FORMATTERS_FROM_EXTENSION.add(ipython)
    if any(isinstance(m, LoraMagics) for m in ipython.configurables):
        return
    magics = LoraMagics(shell=ipython)  # Magics.__init__ adds it to ipython.configurables (for %config)
    ipython.register_magics(magics)
    _enable_colab_widgets()
    print(f"jupyter_lora {__version__} · {_device_line()} · %lora help lists the commands")


def _device_line() -> str:
    """Where training would run, said without importing torch (it loads on first use)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return f"GPU: {torch.cuda.get_device_name(0)}"
        except Exception:  # a broken CUDA setup: say what torch can use
            pass
        return "no CUDA GPU (training runs on the CPU)"
    import os

    gpus = "/proc/driver/nvidia/gpus"
    if os.path.isdir(gpus) and os.listdir(gpus):
        return f"{len(os.listdir(gpus))} NVIDIA GPU(s)"
    return "no NVIDIA GPU seen (training runs on the CPU)"


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
    if ipython in _FORMATTERS_FROM_EXTENSION:
        from .display import unregister_formatters

        unregister_formatters(ipython)
        _FORMATTERS_FROM_EXTENSION.discard(ipython)


def _register_formatters_in_running_ipython() -> None:
    """Imported inside IPython: show results richly even without ``%load_ext`` (IPython is never imported here)."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    if shell is not None and hasattr(shell, "display_formatter"):
        from .display import register_formatters

        register_formatters(shell)


def _enable_colab_widgets() -> None:
    """In Colab, third-party widgets (anywidget, plotly FigureWidget) render only with its custom manager."""
    if "google.colab" in sys.modules:
        try:
            from google.colab import output

            output.enable_custom_widget_manager()
        except Exception:  # an older Colab runtime: widgets fall back to their text/HTML forms
            pass


_register_formatters_in_running_ipython()
