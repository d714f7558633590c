"""Adapter operations on a live model — inject, merge, unload, save, load, switch — each one PEFT underneath,
each one transactional: it either completes or leaves the model (and the files) exactly as they were.

The model a user holds is either a plain transformers model or the ``PeftModel`` returned by ``inject``.
Operations that change which object the variable should hold (``inject`` on a plain model, ``merge``,
``unload``) return the new object; the magics put it back into the notebook variable.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import targets as _targets
from .errors import AdapterMismatchError, NoAdapterError, UsageError, did_you_mean
from .modelinfo import base_model_of, is_peft_model, param_count, require_module
from .plan import Plan, plan
from .spec import LoraSpec
from .transaction import Transaction

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
    "save",
    "status",
    "unload",
    "use",
]

# base model -> the PeftModel wrapping it, so that passing the (already adapted) base again finds its wrapper
# instead of wrapping twice.
_WRAPPERS: weakref.WeakKeyDictionary[nn.Module, weakref.ReferenceType] = weakref.WeakKeyDictionary()
# base model -> {parameter name: requires_grad} as it was before PEFT froze it, so unload can give it back.
_GRAD_FLAGS: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()
_WEIGHT_REWRITING_INITS = ("pissa", "olora", "orthogonal", "mica")


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _wrapper_for(model: nn.Module) -> nn.Module | None:
    """The PeftModel for ``model``: itself, or the wrapper that ``inject`` put around this base earlier."""
    if is_peft_model(model):
        return model
    ref = _WRAPPERS.get(model)
    wrapper = ref() if ref is not None else None
    if wrapper is not None and wrapper.base_model.model is model:
        return wrapper
    if any(_is_lora_layer(m) for m in model.modules()):
        raise UsageError(
            "This model already holds LoRA layers but is not a PeftModel (it was adapted elsewhere, e.g. with "
            "transformers' model.add_adapter). Pass the PeftModel, or start from a fresh base model."
        )
    return None


def _check_not_training(model: nn.Module, action: str) -> None:
    """Refuse to change (or read half-updated weights of) a model that a background run is training."""
    import sys

    train = sys.modules.get("jupyter_lora.core.train")
    if train is None:
        return
    run = train._ACTIVE.get(base_model_of(model))
    if run is not None and not run.done:
        raise UsageError(
            f"Cannot {action} while this model is training (step {run.step}/{run.total_steps}). Stop the run first: "
            "run.stop() or %lora stop model — it saves a checkpoint."
        )


def _require_adapters(model: Any, action: str) -> nn.Module:
    require_module(model)
    peft_model = _wrapper_for(model)
    _check_not_training(peft_model if peft_model is not None else model, action)
    if peft_model is None or not getattr(peft_model, "peft_config", None):
        raise NoAdapterError(
            f"Cannot {action}: this model has no LoRA adapter. Inject one first: "
            "model = jupyter_lora.inject(model, r=16, targets='q_proj,v_proj') (or a %%lora cell)."
        )
    return peft_model


def _check_adapter_name(peft_model: nn.Module, name: str, what: str = "name") -> None:
    names = list(peft_model.peft_config)
    if name not in names:
        raise NoAdapterError(
            f"`{what}` {name!r}: no adapter of that name on this model.{did_you_mean(name, names)} "
            f"Adapters: {', '.join(repr(n) for n in names)}."
        )


def _invalidate(*models: nn.Module | None) -> None:
    for m in models:
        if m is not None:
            _targets.invalidate(m)


def _remember_grad_flags(base: nn.Module) -> None:
    _GRAD_FLAGS[base] = {n: p.requires_grad for n, p in base.named_parameters()}


def _restore_grad_flags(base: nn.Module) -> None:
    flags = _GRAD_FLAGS.get(base)
    if flags:
        for n, p in base.named_parameters():
            if n in flags and p.requires_grad != flags[n]:
                p.requires_grad_(flags[n])


def _register(peft_model: nn.Module) -> None:
    _WRAPPERS[peft_model.base_model.model] = weakref.ref(peft_model)


def _counts(peft_model: nn.Module) -> tuple[int, int]:
    trainable = total = 0
    for _, p in peft_model.named_parameters():
        n = param_count(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# --------------------------------------------------------------------------------------------------- inject


def inject(
    model: nn.Module, spec: LoraSpec | None = None, *, name: str = "default", **settings: Any
) -> nn.Module:
    """Add a LoRA adapter called ``name`` to ``model`` and make it the active, trainable one.

    Returns the adapted model (a ``peft.PeftModel``): ``model = jupyter_lora.inject(model, r=16)``. Injecting
    again under the same name replaces that adapter with the new settings — it never wraps twice or stacks.
    Settings: r, alpha (default 2·r), dropout, targets, layers, exclude, variant (lora|dora|rslora), init,
    modules_to_save, bias, task_type. On any error the model is left exactly as it was.
    """
    require_module(model)
    peft_model = _wrapper_for(model)
    _check_not_training(peft_model if peft_model is not None else model, "inject an adapter")
    the_plan = plan(peft_model if peft_model is not None else model, spec, name=name, **settings)
    return _apply_plan(model, peft_model, the_plan)


def _apply_plan(model: nn.Module, peft_model: nn.Module | None, the_plan: Plan) -> nn.Module:
    from peft import get_peft_model

    config = the_plan.to_peft_config()
    base = base_model_of(peft_model) if peft_model is not None else model
    backup = []
    if the_plan.spec.init in _WEIGHT_REWRITING_INITS or the_plan.spec.init.startswith("pissa_niter_"):
        backup = [_weight_of(base.get_submodule(p)) for p in the_plan.targets]
    roots = [r for r in (model, peft_model) if r is not None]
    name = the_plan.name
    with Transaction(*roots, backup=backup), warnings.catch_warnings():
        # PEFT calls a transformers API that transformers has deprecated; that notice is not for our users.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
        if peft_model is None:
            _remember_grad_flags(model)
            result = get_peft_model(model, config, adapter_name=name)
        elif name in peft_model.peft_config and len(peft_model.peft_config) == 1:
            # Replacing the only adapter: back to the clean base, then wrap anew (same task class, fresh state).
            clean = _unload_clean(peft_model)
            _remember_grad_flags(clean)
            result = get_peft_model(clean, config, adapter_name=name)
        else:
            if name in peft_model.peft_config:
                if peft_model.active_adapter == name:
                    other = next(n for n in peft_model.peft_config if n != name)
                    peft_model.set_adapter(other)
                peft_model.delete_adapter(name)
            peft_model.add_adapter(name, config)
            peft_model.set_adapter(name)
            result = peft_model
        _check_against_plan(result, the_plan)
    _register(result)
    _invalidate(model, peft_model, result)
    return result


def _weight_of(module: nn.Module) -> torch.Tensor:
    module = getattr(module, "base_layer", module)
    return module.weight


def _check_against_plan(peft_model: nn.Module, the_plan: Plan) -> None:
    injected = sorted(
        name.removeprefix("base_model.model.")
        for name, m in peft_model.named_modules()
        if _is_lora_layer(m) and the_plan.name in m.lora_A.keys() | getattr(m, "lora_embedding_A", {}).keys()
    )
    planned = sorted(the_plan.targets)
    counts = _counts(peft_model)
    if injected != planned or counts != (the_plan.trainable_params, the_plan.total_params):
        warnings.warn(
            f"PEFT adapted {len(injected)} modules with {counts[0]:,} trainable / {counts[1]:,} total parameters; "
            f"the plan said {len(planned)} modules, {the_plan.trainable_params:,} / {the_plan.total_params:,}.",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------------- unload/merge


def _restore_original_heads(peft_model: nn.Module) -> None:
    """Put each ``modules_to_save`` wrapper's original module back (PEFT's unload keeps the trained copy)."""
    for name, module in list(peft_model.base_model.model.named_modules()):
        if type(module).__name__ == "ModulesToSaveWrapper":
            parent_name, _, child = name.rpartition(".")
            parent = peft_model.base_model.model.get_submodule(parent_name)
            setattr(parent, child, module.original_module)


def _unload_clean(peft_model: nn.Module) -> nn.Module:
    _restore_original_heads(peft_model)
    base = peft_model.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        base.__dict__.pop(attr, None)
    _restore_grad_flags(base)
    return base


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and return the base model exactly as it was before ``inject`` (task heads too)."""
    peft_model = _require_adapters(model, "unload")
    with Transaction(peft_model):
        base = _unload_clean(peft_model)
    _WRAPPERS.pop(base, None)
    _invalidate(peft_model, base)
    return base


def _merge_backup(peft_model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """The base weights that merging ``names`` rewrites in place (copied to CPU so a failure can be undone)."""
    tensors = []
    for module in peft_model.modules():
        if _is_lora_layer(module) and any(
            n in module.lora_A or n in getattr(module, "lora_embedding_A", {}) for n in names
        ):
            tensors.append(_weight_of(module))
            bias = getattr(module.get_base_layer(), "bias", None)
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
    peft_model = _require_adapters(model, "merge")
    if name is not None:
        _check_adapter_name(peft_model, name)
    names = [name] if name is not None else _active_names(peft_model)
    if _is_quantized(peft_model):
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
        _WRAPPERS.pop(merged, None)
        _invalidate(peft_model, merged)
        return merged
    with Transaction(peft_model, backup=_merge_backup(peft_model, names)):
        if name is not None and name not in _active_names(peft_model):
            peft_model.set_adapter(name)
        merged = peft_model.merge_and_unload(safe_merge=True, adapter_names=names)
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            merged.__dict__.pop(attr, None)
        _restore_grad_flags(merged)
    _WRAPPERS.pop(merged, None)
    _invalidate(peft_model, merged)
    return merged


def _dequantized_bytes(peft_model: nn.Module) -> int:
    """Bytes of the model once every parameter is in its compute dtype (bf16 for a QLoRA base)."""
    from .targets import index_model

    return index_model(peft_model).base_params * 2


def _quantized_merge_advice(peft_model: nn.Module) -> str:
    from ..display import fmt_bytes

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
    from ..display import fmt_bytes

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
    if name not in _active_names(peft_model):
        peft_model.set_adapter(name)
    deltas = {}
    with torch.no_grad():
        for path, module in peft_model.base_model.model.named_modules():
            if _is_lora_layer(module) and name in module.lora_A:
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
    _restore_grad_flags(base)
    return base


def _unpack_cpu_4bit(model: nn.Module) -> list[tuple[Any, Any, Any]]:
    """bitsandbytes' CPU kernel repacks 4-bit weights into its own layout on the first forward pass, and its
    dequantize does not read that layout back (transformers' dequantize would produce wrong weights). Convert
    them back to the standard layout first — what bitsandbytes itself does before saving a state dict."""
    import sys

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


def _is_quantized(model: nn.Module) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def _active_names(peft_model: nn.Module) -> list[str]:
    active = peft_model.base_model.active_adapter
    return [active] if isinstance(active, str) else list(active)


# --------------------------------------------------------------------------------------------------- switch


def use(model: nn.Module, name: str) -> nn.Module:
    """Make adapter ``name`` the active (and trainable) one."""
    peft_model = _require_adapters(model, "switch adapters")
    _check_adapter_name(peft_model, name)
    with Transaction(peft_model):
        peft_model.set_adapter(name)
    return peft_model


def enable(model: nn.Module) -> nn.Module:
    """Turn the adapters back on after ``disable``."""
    peft_model = _require_adapters(model, "enable adapters")
    peft_model.base_model.enable_adapter_layers()
    return peft_model


def disable(model: nn.Module) -> nn.Module:
    """Turn the adapters off: the model computes the base outputs until ``enable``."""
    peft_model = _require_adapters(model, "disable adapters")
    peft_model.base_model.disable_adapter_layers()
    return peft_model


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name``. The last adapter cannot be deleted this way: ``unload`` returns the base."""
    peft_model = _require_adapters(model, "delete an adapter")
    _check_adapter_name(peft_model, name)
    if len(peft_model.peft_config) == 1:
        raise UsageError(
            f"{name!r} is the only adapter on this model; deleting it would leave an empty wrapper. Use "
            "model = jupyter_lora.unload(model) (or %lora unload) to get the base model back."
        )
    with Transaction(peft_model):
        if name in _active_names(peft_model):
            peft_model.set_adapter(next(n for n in peft_model.peft_config if n != name))
        peft_model.delete_adapter(name)
    _invalidate(peft_model)
    return peft_model


# --------------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class LayerStatus:
    """One adapted module: which adapters it holds, which are active and merged."""

    path: str
    kind: str
    enabled: bool
    active: tuple[str, ...]
    merged: tuple[str, ...]
    available: tuple[str, ...]


@dataclass(frozen=True)
class AdapterInfo:
    """One named adapter on the model."""

    name: str
    active: bool
    r: int
    alpha: float
    variant: str
    modules: int
    params: int
    targets: tuple[str, ...]


@dataclass(frozen=True)
class AdapterStatus:
    """The adapters on a model, from PEFT's ``get_model_status``/``get_layer_status``, as data."""

    model_type: str | None
    adapters: tuple[AdapterInfo, ...]
    enabled: bool | None
    merged: tuple[str, ...]
    trainable_params: int
    total_params: int
    layers: tuple[LayerStatus, ...] = field(default=(), repr=False)

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters if a.active)

    def _repr_html_(self) -> str:
        from ..display import status_html

        return status_html(self)

    def __repr__(self) -> str:
        from ..display import status_text

        return status_text(self)


def status(model: nn.Module) -> AdapterStatus:
    """What adapters ``model`` holds (names, active, merged, sizes), per model and per layer."""
    require_module(model)
    peft_model = _wrapper_for(model)
    model_type = getattr(getattr(base_model_of(model), "config", None), "model_type", None)
    if peft_model is None:
        total = _targets.index_model(model).base_params
        trainable = sum(param_count(p) for p in model.parameters() if p.requires_grad)
        return AdapterStatus(model_type, (), None, (), trainable, total)
    from peft import get_layer_status, get_model_status

    model_status = get_model_status(peft_model)
    layer_rows = tuple(
        LayerStatus(
            path=row.name.removeprefix("model."),
            kind=row.module_type,
            enabled=row.enabled,
            active=tuple(row.active_adapters),
            merged=tuple(row.merged_adapters),
            available=tuple(row.available_adapters),
        )
        for row in get_layer_status(peft_model)
    )
    from .modelinfo import ADAPTER_PARAM

    per_adapter: dict[str, int] = {}
    modules: dict[str, int] = {}
    for pname, p in peft_model.named_parameters():
        m = ADAPTER_PARAM.search(pname)
        if m:
            per_adapter[m.group(2)] = per_adapter.get(m.group(2), 0) + param_count(p)
    for row in layer_rows:
        for n in row.available:
            modules[n] = modules.get(n, 0) + 1
    active = set(_active_names(peft_model))
    infos = []
    for name, cfg in peft_model.peft_config.items():
        variant = (
            "dora"
            if getattr(cfg, "use_dora", False)
            else "rslora"
            if getattr(cfg, "use_rslora", False)
            else "lora"
        )
        tm = cfg.target_modules
        infos.append(
            AdapterInfo(
                name=name,
                active=name in active,
                r=int(cfg.r),
                alpha=float(cfg.lora_alpha),
                variant=variant,
                modules=modules.get(name, 0),
                params=per_adapter.get(name, 0),
                targets=tuple(sorted(tm)) if isinstance(tm, (set, list, tuple)) else (str(tm),),
            )
        )
    trainable, total = _counts(peft_model)
    enabled = model_status.enabled if isinstance(model_status.enabled, bool) else None
    merged = model_status.merged_adapters if isinstance(model_status.merged_adapters, list) else []
    return AdapterStatus(model_type, tuple(infos), enabled, tuple(merged), trainable, total, layer_rows)


# --------------------------------------------------------------------------------------------------- save


def _check_save_path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise UsageError(f"`path` must be a directory path, got {path!r}. E.g. save(model, 'adapters/run1').")
    target = Path(path).expanduser()
    for ancestor in target.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise UsageError(
                    f"Cannot save to `path` {str(target)!r}: {str(ancestor)!r} is a file, not a directory. "
                    "Choose a path inside a directory."
                )
            break
    if target.exists() and not target.is_dir():
        raise UsageError(
            f"`path` {str(target)!r} is an existing file; an adapter is saved as a directory. Choose a new "
            "directory name (e.g. add '_adapter')."
        )
    if target.is_dir() and any(target.iterdir()):
        known = {"adapter_config.json", "config.json"}
        if not any((target / k).exists() for k in known):
            raise UsageError(
                f"`path` {str(target)!r} is a non-empty directory that holds no saved model or adapter; saving "
                "would replace its contents. Choose an empty or new directory."
            )
    return target


def _stage_dir(target: Path) -> Path:
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=parent))
    except PermissionError:
        raise UsageError(
            f"Cannot save to `path` {str(target)!r}: no permission to write in {str(parent)!r}. Choose a directory you "
            "can write to (e.g. under your home or the notebook's folder)."
        ) from None
    except OSError as exc:
        raise UsageError(f"Cannot save to `path` {str(target)!r}: {exc.strerror or exc}.") from None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _install(staged: Path, target: Path) -> None:
    """Make ``staged`` appear at ``target`` in one step; the old ``target`` (if any) stays whole until then."""
    if not target.exists():
        os.rename(staged, target)
        return
    if _exchange(staged, target):
        shutil.rmtree(staged, ignore_errors=True)
        return
    # Two renames: the previous save is kept aside until the new one is in place.
    old = target.with_name(f".{target.name}.previous-{os.getpid()}")
    os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def save(model: nn.Module, path: str | os.PathLike, merged: bool = False, name: str | None = None) -> Path:
    """Save the active adapter (or ``name``) to ``path`` in PEFT format (safetensors) — loadable with
    ``PeftModel.from_pretrained(base, path)``. ``merged=True`` saves the full model with the adapter folded in
    (the live model stays adapted). The write is atomic: a failure leaves any earlier save at ``path`` intact.
    """
    peft_model = _require_adapters(model, "save")
    target = _check_save_path(path)
    name = name or _active_names(peft_model)[0]
    _check_adapter_name(peft_model, name)
    stage = _stage_dir(target)
    try:
        if merged:
            _save_merged(peft_model, name, stage)
            src = stage
        else:
            # PEFT's "auto" also writes the base embedding matrices when an embedding is adapted (the plan counts
            # them); say so explicitly to skip its warning and its Hub lookup for the other case.
            embeddings = _targets_embeddings(peft_model, name)
            peft_model.save_pretrained(
                str(stage), selected_adapters=[name], safe_serialization=True,
                save_embedding_layers=True if embeddings else "auto",
            )  # fmt: skip
            src = stage if name == "default" else stage / name
            if src != stage:
                moved = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
                os.rmdir(moved)
                os.rename(src, moved)
                shutil.rmtree(stage)
                stage = src = moved
        _fsync_tree(src)
        _install(src, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return target


def _targets_embeddings(peft_model: nn.Module, name: str) -> bool:
    return any(
        path.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head")
        for path, m in peft_model.named_modules()
        if _is_lora_layer(m) and (name in m.lora_A or name in getattr(m, "lora_embedding_A", {}))
    )


def _save_merged(peft_model: nn.Module, name: str, directory: Path) -> None:
    """Merge into the base, save it, then restore the adapted model from the transaction's exact copies. A
    4/8-bit base is dequantised to bf16 for this (after a disk-space check)."""
    quantized = _is_quantized(peft_model)
    if quantized:
        from ..display import fmt_bytes

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


# --------------------------------------------------------------------------------------------------- load


def _read_adapter_dir(path: str | os.PathLike) -> tuple[Path, dict]:
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"`path` must be a directory path, got {path!r}.")
    source = Path(path).expanduser()
    if not source.exists():
        parent = source.parent if str(source.parent) else Path(".")
        nearby = [p.name for p in parent.iterdir()] if parent.is_dir() else []
        raise UsageError(
            f"No saved adapter at `path` {str(source)!r}: it does not exist.{did_you_mean(source.name, nearby)}"
        )
    if source.is_file():
        source = source.parent
    config_file = source / "adapter_config.json"
    if not config_file.exists():
        if (source / "config.json").exists():
            raise UsageError(
                f"`path` {str(source)!r} holds a full model (config.json), not an adapter. Load it with "
                "AutoModel...from_pretrained(path), or point `load` at an adapter directory."
            )
        raise UsageError(
            f"`path` {str(source)!r} has no adapter_config.json, so it is not a saved PEFT adapter. Point it at "
            "the directory that `save` wrote."
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{str(config_file)!r} is not valid JSON ({exc}); the adapter files are damaged."
        ) from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise UsageError(
            f"The adapter at {str(source)!r} is of type {config.get('peft_type')!r}; only LoRA adapters load here."
        )
    return source, config


def _saved_shapes(source: Path) -> dict[str, tuple[int, ...]]:
    st_file = source / "adapter_model.safetensors"
    if st_file.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(st_file), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
        except Exception as exc:
            raise UsageError(
                f"{str(st_file)!r} cannot be read ({exc}); the adapter file is damaged."
            ) from None
    bin_file = source / "adapter_model.bin"
    if bin_file.exists():
        state = torch.load(bin_file, map_location="meta", weights_only=True)
        return {k: tuple(v.shape) for k, v in state.items()}
    raise UsageError(f"{str(source)!r} has adapter_config.json but no adapter_model.safetensors (or .bin).")


_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")


def _check_fits(model: nn.Module, source: Path, config: dict) -> None:
    """Compare the saved tensors with the model's modules (names and shapes) before touching the model."""
    index = _targets.index_model(model)
    missing: list[str] = []
    wrong: list[str] = []
    for key, shape in _saved_shapes(source).items():
        path = key.removeprefix("base_model.model.")
        marker = next((m for m in _LORA_MARKERS if m in path), None)
        if marker is None:  # a trained head, a bias or a saved embedding matrix
            module_path = path.rsplit(".", 1)[0].replace(".base_layer", "")
            if module_path not in index.module_types and module_path not in missing:
                missing.append(module_path)
            continue
        module_path = path.split(marker)[0]
        info = index.by_path.get(module_path)
        if info is None:
            if module_path not in missing:
                missing.append(module_path)
            continue
        expected = None
        if len(shape) == 2 and marker in (".lora_A.", ".lora_embedding_A"):
            expected = (shape[0], info.in_features)
        elif len(shape) == 2 and marker in (".lora_B.", ".lora_embedding_B"):
            expected = (info.out_features, shape[1])
        if expected is not None and tuple(shape) != expected:
            wrong.append(
                f"`{module_path}` is {info.in_features}→{info.out_features} but the adapter's "
                f"{marker.strip('.')} is {tuple(shape)}"
            )
    if not missing and not wrong:
        return
    problems = [*wrong[:2]]
    if missing:
        shown = ", ".join(f"`{m}`" for m in missing[:2])
        problems.append(f"{len(missing)} module(s) it adapts do not exist here, e.g. {shown}")
    saved_for = config.get("base_model_name_or_path")
    here = getattr(getattr(base_model_of(model), "config", None), "_name_or_path", "") or index.model_type
    origin = f" It was saved from {saved_for!r}; this model is {here!r}." if saved_for else ""
    raise AdapterMismatchError(
        f"The adapter at `path` {str(source)!r} does not fit this model: {'; '.join(problems)}.{origin} "
        "Load it into the base model it was trained on."
    )


def load(
    model: nn.Module, path: str | os.PathLike, name: str = "default", trainable: bool = True
) -> nn.Module:
    """Load a saved LoRA adapter from ``path`` into ``model`` as ``name`` and make it active.

    Returns the adapted model (a PeftModel); loading under an existing name replaces that adapter. The adapter
    is checked against the model (module names and shapes) before anything changes.
    """
    require_module(model)
    from .plan import _check_name

    _check_name(name)
    _check_not_training(model if _wrapper_for(model) is None else _wrapper_for(model), "load an adapter")
    source, config = _read_adapter_dir(path)
    peft_model = _wrapper_for(model)
    _check_fits(peft_model if peft_model is not None else model, source, config)
    from peft import PeftModel

    roots = [r for r in (model, peft_model) if r is not None]
    with Transaction(*roots), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
        if peft_model is None:
            _remember_grad_flags(model)
            result = PeftModel.from_pretrained(model, str(source), adapter_name=name, is_trainable=trainable)
        elif name in peft_model.peft_config and len(peft_model.peft_config) == 1:
            clean = _unload_clean(peft_model)
            _remember_grad_flags(clean)
            result = PeftModel.from_pretrained(clean, str(source), adapter_name=name, is_trainable=trainable)
        else:
            if name in peft_model.peft_config:
                if name in _active_names(peft_model):
                    peft_model.set_adapter(next(n for n in peft_model.peft_config if n != name))
                peft_model.delete_adapter(name)
            peft_model.load_adapter(str(source), adapter_name=name, is_trainable=trainable)
            peft_model.set_adapter(name)
            result = peft_model
    _register(result)
    _invalidate(model, peft_model, result)
    return result
