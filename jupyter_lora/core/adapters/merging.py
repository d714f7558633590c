"""Folding an adapter into the base weights: ``merge`` returns the plain merged model, ``save_merged`` writes it to
disk and leaves the live model adapted. On a 4/8-bit base the merge goes through a dequantised copy in the compute
dtype, after checking that it fits in memory (and on disk)."""

from __future__ import annotations

import copy
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import targets
from ..errors import UsageError
from ..transaction import Transaction
from ..units import fmt_bytes
from .guards import require_adapter, require_adapters
from .peft_facts import (
    active_names,
    adapter_layers,
    base_layer_of,
    forget_wrapper,
    is_lora_layer,
    is_quantized,
    restore_grad_flags,
)

__all__ = ["merge", "save_merged"]


def _merge_backup(peft_model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """The base weights that merging ``names`` rewrites in place (copied to CPU so a failure can be undone)."""
    tensors = []
    for _, layer in adapter_layers(peft_model, names):
        tensors.append(base_layer_of(layer).weight)
        bias = getattr(layer.get_base_layer(), "bias", None)
        if isinstance(bias, torch.Tensor):
            tensors.append(bias)
    return tensors


def merge(model: nn.Module, name: str | None = None, *, dequantize: bool = False) -> nn.Module:
    """Fold the active adapter (or ``name``) into the base weights and return the plain, merged model.

    Other adapters on the model are dropped. The merged model runs at base speed and saves as a normal
    transformers model. On a 4/8-bit base, ``dequantize=True`` is the guided path: the base is dequantised to its
    compute dtype (bf16), the adapter added, and a plain bf16 model returned — after checking that it fits in
    memory. On any failure the adapted model is left as it was.
    """
    peft_model = require_adapters(model, "merge")
    if name is not None:
        require_adapter(peft_model, name)
    names = [name] if name is not None else active_names(peft_model)
    if is_quantized(peft_model):
        if not dequantize:
            raise UsageError(_quantized_merge_advice(peft_model))
        _check_dequantized_fits_memory(peft_model)
        _warn_rounding()
        undo: list = []
        try:
            with Transaction(peft_model):
                merged = _dequantized_merge(peft_model, names[0], undo)
        except BaseException:
            _repack(undo)
            raise
    else:
        with Transaction(peft_model, backup=_merge_backup(peft_model, names)):
            if name is not None and name not in active_names(peft_model):
                peft_model.set_adapter(name)
            merged = peft_model.merge_and_unload(safe_merge=True, adapter_names=names)
            for attr in ("peft_config", "_hf_peft_config_loaded"):
                merged.__dict__.pop(attr, None)
            restore_grad_flags(merged)
    forget_wrapper(merged)
    targets.invalidate(peft_model)
    targets.invalidate(merged)
    return merged


def save_merged(peft_model: nn.Module, name: str, directory: Path) -> None:
    """Write the model with adapter ``name`` merged into ``directory`` (transformers format), then restore the
    adapted model from the transaction's exact copies. A 4/8-bit base is dequantised to bf16 for this (after a
    disk-space check)."""
    quantized = is_quantized(peft_model)
    if quantized:
        need = _dequantized_bytes(peft_model)
        free = shutil.disk_usage(directory).free
        if need * 1.05 > free:
            raise UsageError(
                f"The merged bf16 model needs ≈ {fmt_bytes(need)} on disk; {fmt_bytes(free)} is free at "
                f"{str(directory.parent)!r}. Free space, choose another `path`, or save the adapter alone."
            )
        _check_dequantized_fits_memory(peft_model)
        _warn_rounding()
    transaction = Transaction(peft_model, backup=() if quantized else _merge_backup(peft_model, [name]))
    undo: list = []
    try:
        with transaction:
            if quantized:
                merged_model = _dequantized_merge(peft_model, name, undo)
            else:
                merged_model = peft_model.merge_and_unload(safe_merge=True, adapter_names=[name])
            state = merged_model.__dict__
            hidden = {k: state.pop(k) for k in ("peft_config", "_hf_peft_config_loaded") if k in state}
            try:
                merged_model.save_pretrained(str(directory), safe_serialization=True)
            finally:
                state.update(hidden)
            transaction.restore()
    finally:
        _repack(undo)


# --------------------------------------------------------------------------------------------------- 4/8-bit


def _dequantized_bytes(peft_model: nn.Module) -> int:
    """Bytes of the model once every parameter is in its compute dtype (bf16 for a QLoRA base)."""
    return targets.index_model(peft_model).base_params * 2


def _quantized_merge_advice(peft_model: nn.Module) -> str:
    size = fmt_bytes(_dequantized_bytes(peft_model))
    return (
        "This adapter sits on a 4/8-bit base; merging into the quantised weights would round the adapter away. "
        "Either save the adapter alone — jupyter_lora.save(model, path) / %lora save model PATH (small, loads on "
        "the 4-bit or the bf16 base) — or merge into a dequantised bf16 copy: jupyter_lora.merge(model, "
        f"dequantize=True) / %lora merge model --dequantize (needs ≈ {size} of memory), or write that merged model "
        f"straight to disk: jupyter_lora.save(model, path, merged=True) / %lora save model PATH --merged (≈ {size})."
    )


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _check_dequantized_fits_memory(peft_model: nn.Module) -> None:
    need = _dequantized_bytes(peft_model)
    device = next(peft_model.parameters()).device
    free = _free_memory(device)
    if need > free:
        raise UsageError(
            f"A dequantised merge needs ≈ {fmt_bytes(need)} on {device.type}, but only {fmt_bytes(free)} is free. "
            "Save the adapter alone (%lora save model PATH), or write the merged model to disk with "
            "%lora save model PATH --merged after freeing memory."
        )


def _warn_rounding() -> None:
    warnings.warn(
        "Merging into a dequantised 4/8-bit base: the merged bf16 model reproduces the adapted quantised model "
        "(what was trained), not the original full-precision base plus the adapter — their weights differ by the "
        "quantisation rounding.",
        UserWarning,
        stacklevel=3,
    )


def _dequantized_merge(peft_model: nn.Module, name: str, undo: list | None = None) -> nn.Module:
    """Adapter deltas computed on the quantised model, then the base unloaded (trained heads kept), dequantised
    by transformers (``model.dequantize()``) and the deltas added in the compute dtype."""
    if name not in active_names(peft_model):
        peft_model.set_adapter(name)
    deltas = {}
    with torch.no_grad():
        for path, module in peft_model.base_model.model.named_modules():
            if is_lora_layer(module) and name in module.lora_A:
                deltas[path] = module.get_delta_weight(name)
    base = peft_model.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        base.__dict__.pop(attr, None)
    dtype = _compute_dtype(base)
    unpacked = _unpack_cpu_4bit(base)
    if undo is not None:
        undo.extend(unpacked)
    base = base.dequantize(dtype=dtype) or base
    with torch.no_grad():
        for path, delta in deltas.items():
            weight = base.get_submodule(path).weight
            weight.add_(delta.to(weight.dtype))
    restore_grad_flags(base)
    return base


def _unpack_cpu_4bit(model: nn.Module) -> list[tuple[Any, Any, Any]]:
    """bitsandbytes' CPU kernel repacks 4-bit weights into its own layout on the first forward pass, and its
    dequantize does not read that layout back (transformers' dequantize would produce wrong weights). Convert
    them back to the standard layout first — what bitsandbytes itself does before saving a state dict."""
    functional = sys.modules.get("bitsandbytes.functional")
    inverse = getattr(functional, "_convert_weight_packed_for_cpu_inverse", None)
    undo: list[tuple[Any, Any, Any]] = []
    if inverse is None:
        return undo
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            undo.append((weight, weight.data, state))
            # The inverse rewrites the QuantState it is given; hand it a copy so the live one stays untouched.
            weight.data, weight.quant_state = inverse(weight.data, copy.deepcopy(state))
    return undo


def _repack(undo: list[tuple[Any, Any, Any]]) -> None:
    """Give the live quantised weights their CPU layout back (bit for bit what they were)."""
    for weight, data, state in undo:
        weight.data, weight.quant_state = data, state


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the merged model gets: 4-bit's compute dtype, else the dtype of the unquantised weights."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is not None and getattr(config, "load_in_4bit", False):
        dtype = getattr(config, "bnb_4bit_compute_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    floats = [p.dtype for p in model.parameters() if p.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.bfloat16
