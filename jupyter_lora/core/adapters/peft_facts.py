"""Facts about PEFT on a live model: which modules are PEFT layers, which adapters they hold (and, for plain LoRA,
the update each adds to its base weight), which adapter is active, which PeftModel wraps a base model (and
which wrappers an operation has made stale), and whether the base is quantised.

PEFT and bitsandbytes types are looked up in ``sys.modules``: a model can only hold their layers once they have
been imported, so asking never imports them.
"""

from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from ..modelinfo import base_model_of, is_peft_model, param_count

__all__ = [
    "LoraUpdate",
    "active_names",
    "adapted_paths",
    "adapter_layers",
    "adapts_embeddings",
    "base_layer_of",
    "forget_wrapper",
    "holds_adapter",
    "is_lora_layer",
    "is_modules_to_save_wrapper",
    "is_prompt_learning",
    "is_quantized",
    "is_tuner_layer",
    "lora_update",
    "method_of",
    "parameter_counts",
    "register_wrapper",
    "registered_wrapper",
    "remember_grad_flags",
    "restore_grad_flags",
    "retire_wrapper",
    "variant_of",
    "wrapper_for",
]

# base model -> the PeftModel wrapping it, so that passing the (already adapted) base again finds its wrapper
# instead of wrapping twice.
_WRAPPERS: weakref.WeakKeyDictionary[nn.Module, weakref.ReferenceType] = weakref.WeakKeyDictionary()
# base model -> {parameter name: requires_grad} as it was before PEFT froze it, so unload can give it back.
_GRAD_FLAGS: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()
# PeftModel -> why it no longer describes its base (a later operation unloaded, merged or re-wrapped that base).
_RETIRED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def _loaded_type(module_name: str, name: str) -> type | None:
    module = sys.modules.get(module_name)
    return getattr(module, name, None) if module is not None else None


def _is_instance(obj: object, module_name: str, *names: str) -> bool:
    types = tuple(t for t in (_loaded_type(module_name, n) for n in names) if t is not None)
    return bool(types) and isinstance(obj, types)


# --------------------------------------------------------------------------------------------------- layers


def is_tuner_layer(module: nn.Module) -> bool:
    """True for a layer that PEFT put in place of an original one (any PEFT method)."""
    return _is_instance(module, "peft.tuners.tuners_utils", "BaseTunerLayer")


def is_lora_layer(module: nn.Module) -> bool:
    """True for a PEFT LoRA layer (``lora_A``/``lora_B`` around a ``base_layer``), quantised ones included."""
    return _is_instance(module, "peft.tuners.lora.layer", "LoraLayer")


def is_modules_to_save_wrapper(module: nn.Module) -> bool:
    """True for PEFT's ``ModulesToSaveWrapper``: a fully trained copy of a module beside the original."""
    return _is_instance(module, "peft.utils.other", "ModulesToSaveWrapper")


def base_layer_of(module: nn.Module) -> nn.Module:
    """The original layer under a PEFT layer, or ``module`` itself."""
    return module.get_base_layer() if is_tuner_layer(module) else module


def holds_adapter(module: nn.Module, name: str) -> bool:
    """Whether the LoRA layer ``module`` holds weights of adapter ``name`` (linear/conv or embedding)."""
    return name in module.lora_A or name in getattr(module, "lora_embedding_A", {})


def adapter_layers(model: nn.Module, names: Iterable[str]) -> Iterator[tuple[str, nn.Module]]:
    """``(path, layer)`` of the LoRA layers in ``model`` that hold any of the adapters ``names``."""
    names = list(names)
    for path, module in model.named_modules():
        if is_lora_layer(module) and any(holds_adapter(module, n) for n in names):
            yield path, module


def adapted_paths(model: nn.Module, names: Iterable[str]) -> list[str]:
    """What the adapters ``names`` adapt, as plan rows name it: the module path (``base_model.model.`` dropped) of
    each LoRA layer, and for PEFT's ``ParamWrapper`` (a fused expert weight, targeted by ``target_parameters``) the
    experts module's path without PEFT's ``.base_layer`` nesting, plus the parameter's name."""
    out = []
    for path, layer in adapter_layers(model, names):
        path = path.removeprefix("base_model.model.")
        parameter = getattr(layer, "parameter_name", None)
        if parameter is not None:
            path = re.sub(r"(\.base_layer)+$", "", path) + "." + parameter
        out.append(path)
    return out


def adapts_embeddings(peft_model: nn.Module, name: str) -> bool:
    """Whether adapter ``name`` adapts an input or output embedding (``embed_tokens``/``lm_head``), which PEFT
    then saves along with the adapter."""
    return any(
        path.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head")
        for path, _ in adapter_layers(peft_model, [name])
    )


@dataclass(frozen=True)
class LoraUpdate:
    """A plain LoRA adapter on one layer: merging adds ``scaling · B @ A`` to ``weight`` (transposed for
    ``fan_in_fan_out`` layers and embeddings), and that is all it changes."""

    weight: nn.Parameter
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    transposed: bool

    def casts(self, fp32: bool = False) -> bool:
        """Whether ``rows`` computes in fp32 although the factors are not (PEFT does so for 16-bit factors on the
        CPU, and casts the result back to the factors' dtype)."""
        return fp32 or (self.weight.device.type == "cpu" and self.a.dtype in (torch.float16, torch.bfloat16))

    def rows(
        self, start: int, stop: int, fp32: bool = False, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``start:stop`` of the update, computed as PEFT's ``get_delta_weight`` computes the whole of it, or in
        fp32 with ``fp32=True`` (as PiSSA/OLoRA initialisation subtracts it); on the device of ``weight``, in fp32
        where ``casts(fp32)``, else in the factors' dtype (casting back is the caller's). ``out``: a contiguous
        tensor of that shape and dtype to write into."""
        device = self.weight.device
        a, b = self.a.to(device), self.b.to(device)
        if self.casts(fp32):
            a, b = a.float(), b.float()
        if self.transposed:  # the weight's rows are the product's columns
            part = torch.matmul(b, a[:, start:stop], out=None if out is None else out.T)
            part = part.T if out is None else out
        else:
            part = torch.matmul(b[start:stop], a, out=out)
        return part.mul_(self.scaling)

    def detached(self) -> LoraUpdate:
        """The same update with copies of ``A`` and ``B`` on the CPU (for when the adapter moves on)."""
        return LoraUpdate(self.weight, self.a.detach().to("cpu", copy=True), self.b.detach().to("cpu", copy=True),
                          self.scaling, self.transposed)  # fmt: skip


def lora_update(layer: nn.Module, name: str) -> LoraUpdate | None:
    """The update adapter ``name`` adds to ``layer``'s base weight when merged, where PEFT merges it as a plain
    ``W + scaling · B @ A``: LoRA ``Linear`` and ``Embedding`` layers with a floating-point, contiguous 2-D weight.
    None for everything else (DoRA and other variants, adapters with a bias, convolutions, quantised layers)."""
    lora = sys.modules.get("peft.tuners.lora.layer")
    if (
        lora is None
        or name in getattr(layer, "lora_variant", {})
        or getattr(layer, "lora_bias", {}).get(name)
    ):
        return None
    if type(layer) is lora.Linear and name in layer.lora_A:
        a, b, transposed = layer.lora_A[name].weight, layer.lora_B[name].weight, bool(layer.fan_in_fan_out)
    elif type(layer) is lora.Embedding and name in layer.lora_embedding_A:
        a, b, transposed = layer.lora_embedding_A[name], layer.lora_embedding_B[name], True
    else:
        return None
    weight = layer.get_base_layer().weight
    shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
    if (
        type(weight) is not nn.Parameter
        or not weight.dtype.is_floating_point
        or weight.is_meta
        or not weight.is_contiguous()
        or tuple(weight.shape) != shape
    ):
        return None
    return LoraUpdate(weight, a, b, float(layer.scaling[name]), transposed)


def is_prompt_learning(peft_model: nn.Module) -> bool:
    """Whether the active adapter of a PeftModel is prompt learning (prompt, prefix or p-tuning): virtual tokens
    before the input, no weights of the base to change or merge into."""
    config = peft_model.peft_config.get(active_names(peft_model)[0])
    return bool(getattr(config, "is_prompt_learning", False))


def method_of(config: object) -> str:
    """The PEFT method a config describes, as the sweep's ``method`` names it (lora, ia3, loha, lokr,
    prompt_tuning, prefix_tuning, ...)."""
    peft_type = getattr(config, "peft_type", None)
    return str(getattr(peft_type, "value", peft_type) or "lora").lower()


def active_names(peft_model: nn.Module) -> list[str]:
    """The names of the active adapters of a PeftModel."""
    active = peft_model.active_adapter  # PEFT's own property: also for prompt learning (no tuner model)
    return [active] if isinstance(active, str) else list(active)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters, counted as PEFT counts them (packed 4-bit weights unpacked)."""
    trainable = total = 0
    for _, p in model.named_parameters():
        n = param_count(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes 4-bit or 8-bit layers."""
    return any(_is_instance(m, "bitsandbytes.nn", "Linear4bit", "Linear8bitLt") for m in model.modules())


# --------------------------------------------------------------------------------------------------- wrappers


def register_wrapper(peft_model: nn.Module) -> None:
    """Remember that ``peft_model`` wraps its base, so that the base passed again finds this wrapper. A wrapper
    registered for the same base before becomes stale (see ``retire_wrapper``)."""
    base = base_model_of(peft_model)
    ref = _WRAPPERS.get(base)
    previous = ref() if ref is not None else None
    if previous is not None and previous is not peft_model:
        retire_wrapper(previous)
    _WRAPPERS[base] = weakref.ref(peft_model)


def retire_wrapper(peft_model: nn.Module, reason: str | None = None) -> None:
    """Mark ``peft_model`` stale: every operation on it is refused, with ``reason`` (what happened to its base and
    which model to use instead; by default, that a later inject or load wrapped the base anew)."""
    _RETIRED[peft_model] = reason or (
        "a later inject or load wrapped its base model anew, so its settings no longer describe the layers. Use "
        "the model that call returned (model = jupyter_lora.inject(model, ...) keeps the variable current)."
    )


def _check_current(peft_model: nn.Module) -> None:
    reason = _RETIRED.get(peft_model)
    if reason is not None:
        raise UsageError(f"This adapted model is out of date: {reason}")


def forget_wrapper(base: nn.Module) -> None:
    """Forget the wrapper of ``base`` (after it was unloaded or merged)."""
    _WRAPPERS.pop(base, None)


def registered_wrapper(model: nn.Module) -> nn.Module | None:
    """The PeftModel for ``model``: itself, or the live wrapper registered for this base; else None. A stale
    PeftModel (see ``retire_wrapper``) is refused with the reason."""
    if is_peft_model(model):
        _check_current(model)
        return model
    ref = _WRAPPERS.get(model)
    wrapper = ref() if ref is not None else None
    if wrapper is not None and base_model_of(wrapper) is model:
        return wrapper
    return None


def wrapper_for(model: nn.Module) -> nn.Module | None:
    """The PeftModel for ``model`` (see ``registered_wrapper``), or None for a plain model. A model that holds PEFT
    layers without a PeftModel around it (adapted elsewhere) is refused: it cannot be changed safely here."""
    wrapper = registered_wrapper(model)
    if wrapper is not None:
        return wrapper
    if any(is_tuner_layer(m) for m in model.modules()):
        raise UsageError(
            "This model already holds LoRA layers but is not a PeftModel (it was adapted elsewhere, e.g. with "
            "transformers' model.add_adapter). Pass the PeftModel, or start from a fresh base model."
        )
    return None


def remember_grad_flags(base: nn.Module) -> None:
    """Keep ``requires_grad`` of every parameter of ``base`` before PEFT freezes it."""
    _GRAD_FLAGS[base] = {n: p.requires_grad for n, p in base.named_parameters()}


def restore_grad_flags(base: nn.Module) -> None:
    """Give the parameters of ``base`` the ``requires_grad`` they had before it was wrapped."""
    flags = _GRAD_FLAGS.get(base)
    if flags:
        for n, p in base.named_parameters():
            if n in flags and p.requires_grad != flags[n]:
                p.requires_grad_(flags[n])


def variant_of(config: object) -> str:
    """The LoRA variant a PEFT ``LoraConfig`` describes, as the ``variant`` setting names it."""
    if getattr(config, "use_dora", False):
        return "dora"
    return "rslora" if getattr(config, "use_rslora", False) else "lora"
