"""Hot-swap: a saved adapter loaded into the place of an adapter the model already holds, its weights copied into
the existing tensors (PEFT's ``hotswap_adapter_from_state_dict``). No module is created or replaced, so a model
compiled with ``torch.compile`` keeps its compiled code: the LoRA layers, their ``lora_A``/``lora_B`` modules and
their parameter objects stay the same objects.

The new adapter must fit the place exactly — the same modules, the same ranks (or, after ``prepare_hotswap``, ranks
up to the padded one), the settings PEFT compares (``check_hotswap_configs_compatible``: rsLoRA, dropout, alpha
pattern, DoRA) — and carry LoRA weights only. A different alpha is fine: PEFT updates the scaling (a tensor after
``prepare_hotswap``, so a compiled model does not recompile either).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from ..errors import AdapterMismatchError, UsageError
from ..transaction import Transaction
from .guards import check_not_training, require_adapter, require_adapters
from .peft_facts import adapter_layers, register_wrapper
from .reading import SavedAdapter, _examples, _one_line, check_adapter_fits, read_adapter

__all__ = ["hotswap_load", "prepare_hotswap"]


def _slot_key(key: str, name: str) -> tuple[str, str, str] | None:
    """``(key, module path, part)`` when ``key`` is a tensor of adapter ``name`` (``...q_proj.lora_A.name.weight``,
    ``...embed_tokens.lora_embedding_A.name``), else None."""
    found = re.match(rf"^(.+)\.(lora_\w+)\.{re.escape(name)}(?:\.weight)?$", key)
    return (key, found[1], found[2]) if found else None


def _slot_scalings_are_tensors(peft_model: nn.Module, name: str) -> bool:
    """Whether ``prepare_hotswap`` prepared the place: its scalings are tensors (PEFT fills them in place)."""
    return any(
        isinstance(layer.scaling.get(name), torch.Tensor) for _, layer in adapter_layers(peft_model, [name])
    )


def _state_dict(peft_model: nn.Module, adapter: SavedAdapter, name: str) -> dict[str, torch.Tensor]:
    """The file's tensors under the keys of the model's adapter ``name`` (PEFT's own renaming)."""
    from peft.utils.hotswap import _insert_adapter_name_into_state_dict
    from peft.utils.save_and_load import load_peft_weights

    weights = load_peft_weights(str(adapter.source), device="cpu")
    return _insert_adapter_name_into_state_dict(weights, adapter_name=name, parameter_prefix="lora_")


def _check_fits_slot(
    peft_model: nn.Module, name: str, adapter: SavedAdapter, config: Any, state: dict
) -> None:
    """The new adapter replaces ``name`` in place only when it fits it exactly; say what differs."""
    from peft.utils.hotswap import check_hotswap_configs_compatible

    label = f"The adapter at `path` {adapter.label!r} cannot replace adapter {name!r} in place"
    fix = f"Load it under another name (load(model, path, name=...)) or without hotswap, which rebuilds {name!r}."
    slot_config = peft_model.peft_config[name]
    if adapter.others or slot_config.modules_to_save:
        what = _examples(sorted(k.removeprefix("base_model.model.") for k in adapter.others)) or "its heads"
        raise AdapterMismatchError(
            f"{label}: hot-swap replaces LoRA weights only, and this adapter also carries {what} "
            f"(`modules_to_save`). {fix}"
        )
    try:
        check_hotswap_configs_compatible(slot_config, config)
    except ValueError as exc:
        found = re.search(r"for (\w+), (.*) != (.*)$", str(exc))
        what = (
            f"`{found[1]}` is {found[3]} in the file and {found[2]} in {name!r}" if found else _one_line(exc)
        )
        raise AdapterMismatchError(f"{label}: {what}. {fix}") from None
    slot = dict(peft_model.state_dict(keep_vars=True))
    ours = {k for k in slot if _slot_key(k, name)}
    theirs = set(state)
    missing = sorted({_slot_key(k, name)[1] for k in ours - theirs})
    extra = sorted({k.split(".lora_")[0] for k in theirs - ours})
    if missing or extra:
        parts = []
        if extra:
            parts.append(f"it adapts {len(extra)} module(s) {name!r} does not, e.g. {_short(extra)}")
        if missing:
            parts.append(f"it leaves out {len(missing)} module(s) {name!r} adapts, e.g. {_short(missing)}")
        raise AdapterMismatchError(f"{label}: the targets differ — {'; '.join(parts)}. {fix}")
    padded = _slot_scalings_are_tensors(peft_model, name)
    for key in sorted(theirs):
        have, new = tuple(slot[key].shape), tuple(state[key].shape)
        if have == new:
            continue
        if padded and len(have) == len(new) and all(n <= h for h, n in zip(have, new, strict=True)):
            continue  # PEFT copies it into the zero-padded tensor
        at = 1 if "_B" in _slot_key(key, name)[2] else 0  # lora_A is (r, in), lora_B (out, r)
        raise AdapterMismatchError(
            f"{label}: the rank differs — {_short([_slot_key(key, name)[1]])} has r={have[at]} in {name!r} and "
            f"r={new[at]} in the file. {fix} To swap adapters of different ranks into a compiled model, call "
            "jupyter_lora.prepare_hotswap(model, r=<the largest rank>) before compiling."
        )
    if padded and config.r != slot_config.r and (config.rank_pattern or config.alpha_pattern):
        raise AdapterMismatchError(
            f"{label}: its rank {config.r} differs from the padded {slot_config.r}, and it has per-module ranks or "
            f"alphas (`rank_pattern`/`alpha_pattern`), which a padded place cannot record. {fix}"
        )


def _short(paths: list[str]) -> str:
    return _examples([p.removeprefix("base_model.model.") for p in paths], 1)


def hotswap_load(model: nn.Module, adapter_path: Any, name: str) -> nn.Module:
    """``load(model, path, name, hotswap=True)``: the saved adapter's weights copied into adapter ``name``'s
    tensors. Checked before anything changes (the files, the fit to the model, the fit to the place); on any
    error the model is left exactly as it was."""
    from peft.utils.hotswap import hotswap_adapter_from_state_dict

    peft_model = require_adapters(model, "hot-swap an adapter")
    require_adapter(peft_model, name)
    check_not_training(peft_model, "hot-swap an adapter")
    if any(name in layer.merged_adapters for _, layer in adapter_layers(peft_model, [name])):
        raise UsageError(
            f"Cannot hot-swap adapter {name!r}: it is merged into the base weights. Unmerge it first "
            "(model.unmerge_adapter())."
        )
    adapter = read_adapter(adapter_path)
    slot_config = peft_model.peft_config[name]
    config = adapter.peft_config(trainable=not slot_config.inference_mode)
    check_adapter_fits(peft_model, adapter, config)
    state = _state_dict(peft_model, adapter, name)
    _check_fits_slot(peft_model, name, adapter, config, state)

    params = dict(peft_model.state_dict(keep_vars=True))
    # PEFT finds the place's tensors by substring ("lora_" and the name in the key), so the tensors of an adapter
    # whose name contains this one ("code2" beside "code") would be zeroed as "missing": they are put back after.
    bystanders = [p for k, p in params.items() if "lora_" in k and name in k and k not in state]
    slot_tensors = [params[k] for k in state]
    with Transaction(peft_model, backup=[*slot_tensors, *bystanders]):
        kept = [(p, p.detach().clone()) for p in bystanders]
        hotswap_adapter_from_state_dict(peft_model, state, name, config, parameter_prefix="lora_")
        with torch.no_grad():
            for p, copy in kept:
                p.copy_(copy)
        _record_config(peft_model, name, config, slot_config)
    register_wrapper(peft_model)
    return peft_model


def _record_config(peft_model: nn.Module, name: str, config: Any, slot_config: Any) -> None:
    """Keep the new adapter's settings as the place's (status and save read them). In a place padded to a larger
    rank, the rank stays the padded one and alpha is set so that alpha/r is the new adapter's scaling."""
    config.inference_mode = slot_config.inference_mode
    if config.r != slot_config.r:
        root = (lambda r: math.sqrt(r)) if config.use_rslora else (lambda r: r)
        config.lora_alpha = config.lora_alpha * root(slot_config.r) / root(config.r)
        config.r = slot_config.r
    peft_model.peft_config[name] = config


def prepare_hotswap(model: nn.Module, r: int | None = None) -> nn.Module:
    """Get a model ready to be compiled and then take hot-swapped adapters of other ranks and alphas without
    recompiling (PEFT's ``prepare_model_for_compiled_hotswap``): scalings become tensors, and with ``r`` every
    adapter's LoRA weights are padded with zeros to rank ``r`` (the largest rank you will swap in). Call it after
    the first adapter is loaded and before ``torch.compile``; outputs do not change."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    peft_model = require_adapters(model, "prepare hot-swapping")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise UsageError(f"`r` must be a positive whole number (the largest rank to swap in), got {r!r}.")
    largest = max(int(c.r) for c in peft_model.peft_config.values())
    if r is not None and r < largest:
        raise UsageError(
            f"`r`={r} is below the rank the model's adapters already have ({largest}): pass r >= {largest}."
        )
    if getattr(model, "_compiled_call_impl", None) is not None or hasattr(model, "_orig_mod"):
        raise UsageError(
            "`prepare_hotswap` must run before torch.compile: call it on the model, then compile."
        )
    with Transaction(peft_model):
        prepare_model_for_compiled_hotswap(peft_model, target_rank=r, config=peft_model.peft_config)
    return peft_model
