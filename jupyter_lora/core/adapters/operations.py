"""Adapter operations on a live model — inject, unload, switch, enable/disable, delete, load — each one PEFT
underneath and each one transactional: it either completes or leaves the model exactly as it was.

The model a user holds is either a plain transformers model or the ``PeftModel`` returned by ``inject``.
Operations that change which object the variable should hold (``inject`` on a plain model, ``unload``, ``load``)
return the new object; the magics put it back into the notebook variable.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch import nn

from .. import targets
from ..errors import UsageError
from ..modelinfo import base_model_of, require_module
from ..plan import Plan, check_adapter_name
from ..plan import plan as make_plan
from ..spec import LoraSpec
from ..transaction import Transaction
from .guards import check_not_training, require_adapter, require_adapters
from .peft_facts import (
    active_names,
    adapter_layers,
    base_layer_of,
    forget_wrapper,
    is_modules_to_save_wrapper,
    parameter_counts,
    register_wrapper,
    remember_grad_flags,
    restore_grad_flags,
    wrapper_for,
)
from .reading import check_adapter_fits, read_adapter_dir

__all__ = ["delete", "disable", "enable", "inject", "load", "unload", "unload_clean", "use"]

_WEIGHT_REWRITING_INITS = ("pissa", "olora", "orthogonal", "mica")


def _forget_indexes(*models: nn.Module | None) -> None:
    for m in models:
        if m is not None:
            targets.invalidate(m)


# --------------------------------------------------------------------------------------------------- inject


def inject(
    model: nn.Module,
    spec: LoraSpec | None = None,
    *,
    plan: Plan | None = None,
    replace: bool = False,
    name: str | None = None,
    **settings: Any,
) -> nn.Module:
    """Add a LoRA adapter called ``name`` (default "default") to ``model`` and make it the active, trainable one.

    Returns the adapted model (a ``peft.PeftModel``): ``model = jupyter_lora.inject(model, r=16)``. Injecting
    again under the same name replaces that adapter with the new settings — it never wraps twice or stacks.
    Settings: r, alpha (default 2·r), dropout, targets, layers, exclude, variant (lora|dora|rslora), init,
    modules_to_save, bias, task_type; or a ready ``LoraSpec`` as ``spec``.

    ``plan``: apply exactly this ``Plan`` (from ``jupyter_lora.plan``) instead of settings; it is refused when it
    was made for another model or the model has changed since. ``replace=True`` (here, or when the plan was made)
    also removes every other adapter, so the model holds this one alone (in a new PeftModel around the same base:
    keep the returned model). On any error the model is left exactly as it was.
    """
    require_module(model)
    if not isinstance(replace, bool):
        raise UsageError(f"`replace` must be True or False, got {replace!r}.")
    peft_model = wrapper_for(model)
    current = peft_model if peft_model is not None else model
    check_not_training(current, "inject an adapter")
    if plan is None:
        the_plan = make_plan(
            current, spec, name="default" if name is None else name, replace=replace, **settings
        )
    else:
        if spec is not None or settings:
            given = ", ".join(["spec"] * (spec is not None) + sorted(settings))
            raise UsageError(
                f"`plan` already fixes every setting; got {given} as well. Pass either plan=p or the settings."
            )
        if not isinstance(plan, Plan):
            raise UsageError(
                f"`plan` must be a Plan made by jupyter_lora.plan(model, ...), got {type(plan).__name__}."
            )
        if name is not None and name != plan.name:
            raise UsageError(
                f"`name` {name!r} differs from the plan's adapter name {plan.name!r}. Make the plan with "
                f"name={name!r}, or leave `name` out."
            )
        plan.check_applies_to(current)
        the_plan = plan
    return _apply(model, peft_model, the_plan, replace or the_plan.removes_others)


def _apply(model: nn.Module, peft_model: nn.Module | None, the_plan: Plan, replace: bool) -> nn.Module:
    from peft import get_peft_model

    config = the_plan.to_peft_config()
    base = base_model_of(peft_model) if peft_model is not None else model
    backup = []
    if the_plan.spec.init in _WEIGHT_REWRITING_INITS or the_plan.spec.init.startswith("pissa_niter_"):
        backup = [base_layer_of(base.get_submodule(p)).weight for p in the_plan.targets]
    roots = [r for r in (model, peft_model) if r is not None]
    name = the_plan.name
    with Transaction(*roots, backup=backup), warnings.catch_warnings():
        # PEFT calls a transformers API that transformers has deprecated; that notice is not for our users.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
        if peft_model is None:
            remember_grad_flags(model)
            result = get_peft_model(model, config, adapter_name=name)
        elif replace or (name in peft_model.peft_config and len(peft_model.peft_config) == 1):
            # The new adapter alone: back to the clean base, then wrap anew (same task class, fresh state).
            clean = unload_clean(peft_model)
            remember_grad_flags(clean)
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
        _check_against_plan(result, the_plan, alone=replace)
    register_wrapper(result)
    _forget_indexes(model, peft_model, result)
    return result


def _check_against_plan(peft_model: nn.Module, the_plan: Plan, alone: bool) -> None:
    injected = sorted(
        path.removeprefix("base_model.model.") for path, _ in adapter_layers(peft_model, [the_plan.name])
    )
    planned = sorted(the_plan.targets)
    removed = alone and not the_plan.removes_others  # removed now, though the plan counted them
    total = the_plan.total_params - (the_plan.other_adapter_params if removed else 0)
    counts = parameter_counts(peft_model)
    if injected != planned or counts != (the_plan.trainable_params, total):
        warnings.warn(
            f"PEFT adapted {len(injected)} modules with {counts[0]:,} trainable / {counts[1]:,} total parameters; "
            f"the plan said {len(planned)} modules, {the_plan.trainable_params:,} / {total:,}.",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------------- unload


def _restore_original_heads(peft_model: nn.Module) -> None:
    """Put each ``modules_to_save`` wrapper's original module back (PEFT's unload keeps the trained copy)."""
    root = peft_model.base_model.model
    for path, module in list(root.named_modules()):
        if is_modules_to_save_wrapper(module):
            parent_path, _, child = path.rpartition(".")
            setattr(root.get_submodule(parent_path), child, module.original_module)


def unload_clean(peft_model: nn.Module) -> nn.Module:
    """Take every adapter off ``peft_model`` and return its base exactly as it was before ``inject``: original
    task heads back in place, PEFT's attributes removed, ``requires_grad`` as it was. Not transactional on its
    own: callers run it inside a ``Transaction``."""
    _restore_original_heads(peft_model)
    base = peft_model.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        base.__dict__.pop(attr, None)
    restore_grad_flags(base)
    return base


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and return the base model exactly as it was before ``inject`` (task heads too)."""
    peft_model = require_adapters(model, "unload")
    with Transaction(peft_model):
        base = unload_clean(peft_model)
    forget_wrapper(base)
    _forget_indexes(peft_model, base)
    return base


# --------------------------------------------------------------------------------------------------- switch


def use(model: nn.Module, name: str) -> nn.Module:
    """Make adapter ``name`` the active (and trainable) one."""
    peft_model = require_adapters(model, "switch adapters")
    require_adapter(peft_model, name)
    with Transaction(peft_model):
        peft_model.set_adapter(name)
    return peft_model


def enable(model: nn.Module) -> nn.Module:
    """Turn the adapters back on after ``disable``."""
    peft_model = require_adapters(model, "enable adapters")
    peft_model.base_model.enable_adapter_layers()
    return peft_model


def disable(model: nn.Module) -> nn.Module:
    """Turn the adapters off: the model computes the base outputs until ``enable``."""
    peft_model = require_adapters(model, "disable adapters")
    peft_model.base_model.disable_adapter_layers()
    return peft_model


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name``. The last adapter cannot be deleted this way: ``unload`` returns the base."""
    peft_model = require_adapters(model, "delete an adapter")
    require_adapter(peft_model, name)
    if len(peft_model.peft_config) == 1:
        raise UsageError(
            f"{name!r} is the only adapter on this model; deleting it would leave an empty wrapper. Use "
            "model = jupyter_lora.unload(model) (or %lora unload) to get the base model back."
        )
    with Transaction(peft_model):
        if name in active_names(peft_model):
            peft_model.set_adapter(next(n for n in peft_model.peft_config if n != name))
        peft_model.delete_adapter(name)
    _forget_indexes(peft_model)
    return peft_model


# --------------------------------------------------------------------------------------------------- load


def load(
    model: nn.Module, path: str | os.PathLike, name: str = "default", trainable: bool = True
) -> nn.Module:
    """Load a saved LoRA adapter from ``path`` into ``model`` as ``name`` and make it active.

    Returns the adapted model (a PeftModel); loading under an existing name replaces that adapter. The adapter
    is checked against the model (module names and shapes) before anything changes.
    """
    require_module(model)
    check_adapter_name(name)
    peft_model = wrapper_for(model)
    check_not_training(peft_model if peft_model is not None else model, "load an adapter")
    source, config = read_adapter_dir(path)
    check_adapter_fits(peft_model if peft_model is not None else model, source, config)
    from peft import PeftModel

    roots = [r for r in (model, peft_model) if r is not None]
    with Transaction(*roots), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
        if peft_model is None:
            remember_grad_flags(model)
            result = PeftModel.from_pretrained(model, str(source), adapter_name=name, is_trainable=trainable)
        elif name in peft_model.peft_config and len(peft_model.peft_config) == 1:
            clean = unload_clean(peft_model)
            remember_grad_flags(clean)
            result = PeftModel.from_pretrained(clean, str(source), adapter_name=name, is_trainable=trainable)
        else:
            if name in peft_model.peft_config:
                if name in active_names(peft_model):
                    peft_model.set_adapter(next(n for n in peft_model.peft_config if n != name))
                peft_model.delete_adapter(name)
            peft_model.load_adapter(str(source), adapter_name=name, is_trainable=trainable)
            peft_model.set_adapter(name)
            result = peft_model
    register_wrapper(result)
    _forget_indexes(model, peft_model, result)
    return result
