"""Adapters on a live model, each operation PEFT underneath and transactional (it completes, or leaves the model
and the files exactly as they were):

- ``operations``: inject, unload, use, enable, disable, delete, load;
- ``merging``: merge (a 4/8-bit base through a dequantised copy) and writing the merged model;
- ``files``: save, atomic directory installs;
- ``hotswap``: loading an adapter into an existing adapter's place, weights replaced in place;
- ``reading``: reading a saved adapter back and checking it fits a model before ``load``;
- ``inspection``: status — what adapters a model holds;
- ``guards``: the checks every operation makes first;
- ``peft_facts``: PEFT layers, active adapters, the wrapper of a base model, quantisation.

The public names load their module on first use, so that ``peft_facts`` can be imported on its own (the planner
needs it, and ``operations`` needs the planner).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module of this package that defines it
_WHERE = {
    "AdapterInfo": "inspection",
    "AdapterStatus": "inspection",
    "LayerStatus": "inspection",
    "status": "inspection",
    "delete": "operations",
    "disable": "operations",
    "enable": "operations",
    "inject": "operations",
    "load": "operations",
    "unload": "operations",
    "use": "operations",
    "merge": "merging",
    "prepare_hotswap": "hotswap",
    "save": "files",
}

__all__ = [
    "AdapterInfo",
    "AdapterStatus",
    "LayerStatus",
    "delete",
    "disable",
    "enable",
    "inject",
    "load",
    "merge",
    "prepare_hotswap",
    "save",
    "status",
    "unload",
    "use",
]

if TYPE_CHECKING:  # pragma: no cover
    from .files import save
    from .hotswap import prepare_hotswap
    from .inspection import AdapterInfo, AdapterStatus, LayerStatus, status
    from .merging import merge
    from .operations import delete, disable, enable, inject, load, unload, use


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
