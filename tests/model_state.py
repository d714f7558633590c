"""What a failed call must leave alone: a snapshot of a model and the check that nothing in it changed, and a
snapshot of a directory's files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def model_snapshot(model: nn.Module) -> dict[str, Any]:
    """Weights (keys and values), module classes per path, ``requires_grad`` per parameter, and for a PeftModel
    its adapters (name, r, alpha, targets) and the active one."""
    snap: dict[str, Any] = {
        "class": type(model).__name__,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": tuple((n, type(m).__name__) for n, m in model.named_modules()),
        "grads": tuple((n, p.requires_grad) for n, p in model.named_parameters()),
    }
    if hasattr(model, "peft_config"):
        snap["adapters"] = {
            n: (c.r, c.lora_alpha, tuple(sorted(c.target_modules))) for n, c in model.peft_config.items()
        }
        snap["active"] = getattr(model, "active_adapter", None)
    return snap


def assert_model_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    after = model_snapshot(model)
    assert after["class"] == before["class"]
    assert after["modules"] == before["modules"], "module tree changed"
    assert after["grads"] == before["grads"], "requires_grad changed"
    assert list(after["state"]) == list(before["state"]), "state_dict keys changed"
    changed = [k for k, v in before["state"].items() if not torch.equal(v, after["state"][k])]
    assert not changed, f"weights changed: {changed}"
    assert after.get("adapters") == before.get("adapters"), "adapters changed"
    assert after.get("active") == before.get("active"), "active adapter changed"


def tree_snapshot(root: Path) -> dict[str, bytes | None]:
    """Relative path -> file bytes (``None`` for a directory), hidden entries included."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, root)] = Path(full).read_bytes()
    return out
