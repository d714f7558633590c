"""All-or-nothing model changes.

PEFT changes a model in place, module by module. If something fails half-way (a bad module, an OOM while
merging, a corrupt file while loading), the model would be left half-adapted. ``Transaction`` records the
module tree (every module's attribute dict and the containers in it), each parameter's ``requires_grad``, and,
when an operation will rewrite weights in place (merge, PiSSA init), a CPU copy of those weights. On an exception
it puts everything back exactly and re-raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["Transaction"]


def _copy_container(value: Any) -> Any:
    if isinstance(value, dict):
        return value.copy()
    if isinstance(value, (list, set)):
        return value.copy()
    return None


class Transaction:
    """``with Transaction(model, backup=[weights...]):`` — on an exception the model is restored as it was."""

    def __init__(self, *roots: nn.Module, backup: Iterable[torch.Tensor] = ()):
        self._roots = roots
        self._backup_tensors = list(backup)

    def __enter__(self) -> Transaction:
        self._modules: list[tuple[nn.Module, dict[str, tuple[Any, Any]]]] = []
        seen: set[int] = set()
        for root in self._roots:
            for module in root.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                saved = {k: (v, _copy_container(v)) for k, v in module.__dict__.items()}
                self._modules.append((module, saved))
        # transformers keeps state on the config too (dequantize() drops quantization_config): copy it shallowly.
        self._configs = []
        for module, _ in self._modules:
            config = module.__dict__.get("config")
            if (
                config is not None
                and hasattr(config, "to_dict")
                and all(c is not config for c, _ in self._configs)
            ):
                self._configs.append((config, dict(config.__dict__)))
        params: dict[int, nn.Parameter] = {}
        for root in self._roots:
            for p in root.parameters():
                params[id(p)] = p
        self._grads = [(p, p.requires_grad) for p in params.values()]
        self._backups = [(t, t.detach().to("cpu", copy=True)) for t in self._backup_tensors]
        return self

    def restore(self) -> None:
        """Put the model back as it was when the transaction began."""
        for module, saved in self._modules:
            d = module.__dict__
            for key in [k for k in d if k not in saved]:
                del d[key]
            for key, (obj, content) in saved.items():
                if content is not None:
                    if isinstance(obj, dict):
                        obj.clear()
                        obj.update(content)
                    elif isinstance(obj, list):
                        obj[:] = content
                    else:
                        obj.clear()
                        obj.update(content)
                d[key] = obj
        for config, saved in self._configs:
            config.__dict__.clear()
            config.__dict__.update(saved)
        for p, flag in self._grads:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        with torch.no_grad():
            for tensor, copy in self._backups:
                if tensor.shape != copy.shape:
                    tensor.data = copy.to(tensor.device)
                else:
                    tensor.copy_(copy.to(tensor.device))

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.restore()
        self._modules = []
        self._backups = []
        return False
