"""Adapter operations on a live model — inject, unload, switch, enable/disable, delete, load — each one PEFT
underneath and each one transactional: it either completes or leaves the model exactly as it was.

The model a user holds is either a plain transformers model or the ``PeftModel`` returned by ``inject``.
Operations that change which object the variable should hold (``inject`` on a plain model, ``unload``, ``load``)
return the new object; the magics put it back into the notebook variable.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import targets
from ..errors import UsageError
from ..modelinfo import base_model_of, require_module, wrapper_fits
from ..plan import Plan, check_adapter_name
from ..plan import plan as make_plan
from ..spec import LoraSpec
from ..transaction import Transaction
from .guards import check_fits_memory, check_not_training, require_adapter, require_adapters
from .merging import record_rewritten, remember_rewritten, restore_rewritten
from .peft_facts import (
    active_names,
    adapted_paths,
    base_layer_of,
    forget_wrapper,
    is_modules_to_save_wrapper,
    parameter_counts,
    register_wrapper,
    remember_grad_flags,
    restore_grad_flags,
    retire_wrapper,
    wrapper_for,
)
from .reading import check_adapter_fits, check_adapter_loaded, read_adapter

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
    _check_fits_memory(base_model_of(current), the_plan)
    return _apply(model, peft_model, the_plan, replace or the_plan.removes_others)


def _rewrites_weights(the_plan: Plan) -> bool:
    """Whether the plan's initialisation may rewrite the targeted base weights (PiSSA, OLoRA subtract the initial
    adapter from them)."""
    return the_plan.spec.init in _WEIGHT_REWRITING_INITS or the_plan.spec.init.startswith("pissa_niter_")


def _check_fits_memory(base: nn.Module, the_plan: Plan) -> None:
    """Refuse an adapter that would not fit, before PEFT allocates any of it: its weights (and trained copies of
    ``modules_to_save``) on the devices of the modules they go to, plus, for an initialisation that rewrites base
    weights, host copies of those weights."""
    need: dict[torch.device, int] = {}
    for row in the_plan.modules:
        module = base.get_submodule(row.module_path)
        weight = next(module.parameters(), None)
        device = weight.device if weight is not None else torch.device("cpu")
        need[device] = need.get(device, 0) + row.params * getattr(torch, row.dtype).itemsize
        if row.role == "lora" and weight is not None and _rewrites_weights(the_plan):
            host = torch.device("cpu")
            need[host] = need.get(host, 0) + weight.numel() * weight.element_size()
    check_fits_memory(
        need,
        f"An adapter with r={the_plan.spec.r} on {len(the_plan.targets)} modules",
        "Choose a smaller `r` or fewer `targets`, or free memory (e.g. del models no longer needed).",
    )


def _keep_originals(base: nn.Module, the_plan: Plan, transaction: Transaction) -> dict[int, torch.Tensor]:
    """CPU copies of the targeted base weights, by ``id``, before an initialisation that may rewrite them; the
    transaction puts them back if the inject fails."""
    weights = [base_layer_of(base.get_submodule(p)).weight for p in the_plan.targets]
    copies = [(w, w.detach().to("cpu", copy=True)) for w in weights]

    def put_back() -> None:
        with torch.no_grad():
            for weight, copy in copies:
                if weight.shape == copy.shape:
                    weight.data.copy_(copy)
                else:
                    weight.data = copy.to(weight.device)

    transaction.on_restore(put_back)
    return {id(w): c for w, c in copies}


def _apply(model: nn.Module, peft_model: nn.Module | None, the_plan: Plan, replace: bool) -> nn.Module:
    from peft import get_peft_model

    config = the_plan.to_peft_config()
    rewrites = _rewrites_weights(the_plan)
    roots = [r for r in (model, peft_model) if r is not None]
    name = the_plan.name
    records = []
    with Transaction(*roots) as transaction, warnings.catch_warnings():
        # PEFT calls a transformers API that transformers has deprecated; that notice is not for our users.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
        if peft_model is None:
            base = model
            originals = _keep_originals(base, the_plan, transaction) if rewrites else {}
            remember_grad_flags(base)
            result = get_peft_model(base, config, adapter_name=name)
        elif replace or (name in peft_model.peft_config and len(peft_model.peft_config) == 1):
            # The new adapter alone: back to the clean base, then wrap anew (same task class, fresh state).
            base = unload_clean(peft_model)
            originals = _keep_originals(base, the_plan, transaction) if rewrites else {}
            remember_grad_flags(base)
            result = get_peft_model(base, config, adapter_name=name)
        else:
            base = base_model_of(peft_model)
            if name in peft_model.peft_config:
                restore_rewritten(base, [name])
                if peft_model.active_adapter == name:
                    other = next(n for n in peft_model.peft_config if n != name)
                    peft_model.set_adapter(other)
                peft_model.delete_adapter(name)
            originals = _keep_originals(base, the_plan, transaction) if rewrites else {}
            peft_model.add_adapter(name, config)
            peft_model.set_adapter(name)
            result = peft_model
        _check_against_plan(result, the_plan, alone=replace)
        if rewrites:
            records = record_rewritten(result, name, originals)
    remember_rewritten(base, records)
    if peft_model is not None and result is not peft_model:
        retire_wrapper(peft_model)  # also one made outside this package, which register_wrapper does not know
    register_wrapper(result)
    _forget_indexes(model, peft_model, result)
    return result


def _check_against_plan(peft_model: nn.Module, the_plan: Plan, alone: bool) -> None:
    injected = sorted(adapted_paths(peft_model, [the_plan.name]))
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
    task heads back in place, PEFT's attributes removed, ``requires_grad`` as it was, and base weights that a
    PiSSA/OLoRA initialisation rewrote given back bit for bit. Not transactional on its own: callers run it
    inside a ``Transaction`` (it takes part in the active one)."""
    _restore_original_heads(peft_model)
    base = peft_model.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        base.__dict__.pop(attr, None)
    restore_grad_flags(base)
    restore_rewritten(base)
    return base


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and return the base model exactly as it was before ``inject`` (task heads too, and
    the base weights a PiSSA/OLoRA initialisation changed)."""
    peft_model = require_adapters(model, "unload")
    with Transaction(peft_model):
        base = unload_clean(peft_model)
    forget_wrapper(base)
    retire_wrapper(
        peft_model,
        "its adapters were unloaded. Use the base model jupyter_lora.unload returned (model = "
        "jupyter_lora.unload(model)).",
    )
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
    """Remove adapter ``name`` (giving back the base weights its PiSSA/OLoRA initialisation changed). The last
    adapter cannot be deleted this way: ``unload`` returns the base."""
    peft_model = require_adapters(model, "delete an adapter")
    require_adapter(peft_model, name)
    if len(peft_model.peft_config) == 1:
        raise UsageError(
            f"{name!r} is the only adapter on this model; deleting it would leave an empty wrapper. Use "
            "model = jupyter_lora.unload(model) (or %lora unload) to get the base model back."
        )
    with Transaction(peft_model):
        restore_rewritten(base_model_of(peft_model), [name])
        if name in active_names(peft_model):
            peft_model.set_adapter(next(n for n in peft_model.peft_config if n != name))
        peft_model.delete_adapter(name)
    _forget_indexes(peft_model)
    return peft_model


# --------------------------------------------------------------------------------------------------- load


def _load_changed_weights(model: nn.Module, weights: Path) -> nn.Module:
    """A sweep's full or head run saved the weights it changed (``weights.safetensors``, no adapter config): put
    them into the base model in place, after checking every name and shape (nothing changes on a mismatch)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        saved = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(
            f"`path` {str(weights.parent)!r}: weights.safetensors cannot be read ({exc})."
        ) from None
    base = base_model_of(model)
    state = base.state_dict(keep_vars=True)
    missing = [k for k in saved if k not in state]
    wrong = [k for k in saved if k in state and tuple(saved[k].shape) != tuple(state[k].shape)]
    if missing or wrong:
        first = (
            missing[0]
            if missing
            else f"{wrong[0]} {tuple(saved[wrong[0]].shape)} vs {tuple(state[wrong[0]].shape)}"
        )
        raise UsageError(
            f"`path` {str(weights.parent)!r} holds weights of another model ({len(missing)} not in this one, "
            f"{len(wrong)} of another shape; e.g. {first}). Load them into the model the sweep trained."
        )
    with torch.no_grad():
        for key, tensor in saved.items():
            state[key].data.copy_(tensor.to(device=state[key].device, dtype=state[key].dtype))
    return model


def load(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    trainable: bool = True,
    *,
    hotswap: bool = False,
) -> nn.Module:
    """Load a saved LoRA adapter from ``path`` into ``model`` as ``name`` and make it active.

    ``path`` is a directory written by ``save`` (or by PEFT), or a Hub id ``"user/name"``, fetched through the
    Hugging Face cache (offline, with HF_HUB_OFFLINE, from the cache only); a local directory of that name wins.
    Returns the adapted model (a PeftModel); loading under an existing name replaces that adapter.

    The adapter is checked before anything changes — its files on their own (finite floating-point tensors
    that agree with the config), then against the model (modules, shapes, task, heads) — and once PEFT has
    built it, that every tensor came from the file; on any problem the model is left exactly as it was.
    Loading never changes the base weights: the initialisation named in the config (PiSSA, OLoRA, LoftQ...)
    is not run, since the saved tensors replace the initial ones.

    ``hotswap=True``: the model already holds an adapter ``name`` of the same targets and ranks, and the saved
    adapter's weights are copied into its tensors in place — no module is created or replaced, so a model
    compiled with ``torch.compile`` does not recompile (see ``prepare_hotswap`` for other ranks). The same checks
    come first, then that the adapter fits that place; a difference (targets, rank, DoRA...) is named.
    """
    require_module(model)
    check_adapter_name(name)
    if not isinstance(trainable, bool):
        raise UsageError(f"`trainable` must be True or False, got {trainable!r}.")
    if not isinstance(hotswap, bool):
        raise UsageError(f"`hotswap` must be True or False, got {hotswap!r}.")
    if hotswap:
        from .hotswap import hotswap_load

        return hotswap_load(model, path, name)
    peft_model = wrapper_for(model)
    current = peft_model if peft_model is not None else model
    check_not_training(current, "load an adapter")
    weights = Path(os.fspath(path)) / "weights.safetensors" if isinstance(path, (str, os.PathLike)) else None
    if weights is not None and weights.is_file() and not weights.with_name("adapter_config.json").exists():
        return _load_changed_weights(current, weights)
    adapter = read_adapter(path)
    config = adapter.peft_config(trainable)
    check_adapter_fits(current, adapter, config)
    if not wrapper_fits(current, config.task_type):
        # PEFT's wrapper for the saved task type would hand this model input_ids it does not read (a Whisper
        # adapter saved as SEQ_2_SEQ_LM): the plain PeftModel passes the model's own inputs through.
        config.task_type = None
    from peft import PeftModel

    source = str(adapter.source)
    roots = [r for r in (model, peft_model) if r is not None]
    with Transaction(*roots), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
        # check_adapter_loaded says which tensors are missing, in one line; PEFT's own notice would repeat it.
        warnings.filterwarnings("ignore", category=UserWarning, message="Found missing adapter keys")
        if peft_model is None or (name in peft_model.peft_config and len(peft_model.peft_config) == 1):
            base = model if peft_model is None else unload_clean(peft_model)
            remember_grad_flags(base)
            result = PeftModel.from_pretrained(
                base, source, adapter_name=name, is_trainable=trainable, config=config
            )
        else:
            if name in peft_model.peft_config:
                if name in active_names(peft_model):
                    peft_model.set_adapter(next(n for n in peft_model.peft_config if n != name))
                restore_rewritten(
                    base_model_of(peft_model), [name]
                )  # a PiSSA/OLoRA adapter's base weights back
                peft_model.delete_adapter(name)
            # PEFT's load_adapter reads the config from the files; an adapter added first from our config
            # (initialisation off) is filled instead.
            peft_model.add_adapter(name, config)
            peft_model.load_adapter(source, adapter_name=name, is_trainable=trainable)
            peft_model.set_adapter(name, inference_mode=not trainable)
            result = peft_model
        check_adapter_loaded(result, name, adapter)
    register_wrapper(result)
    _forget_indexes(model, peft_model, result)
    return result
