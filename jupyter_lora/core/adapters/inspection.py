"""What adapters a model holds — names, active, merged, sizes, per model and per layer — as data
(``AdapterStatus``), from PEFT's ``get_model_status`` / ``get_layer_status``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .. import targets
from ..errors import UsageError
from ..modelinfo import ADAPTER_PARAM, base_model_of, param_count, require_module
from .peft_facts import (
    active_names,
    adapted_paths,
    is_prompt_learning,
    method_of,
    parameter_counts,
    variant_of,
    wrapper_for,
)

__all__ = ["AdapterInfo", "AdapterStatus", "LayerStatus", "config_targets", "held_settings", "status"]


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
    r: int | None  # None for methods without a rank (IA3, prompt/prefix tuning)
    alpha: float | None
    variant: str  # lora | dora | rslora for LoRA; else the PEFT method (ia3, loha, lokr, prompt_tuning, ...)
    modules: int
    params: int
    targets: tuple[str, ...]
    rank_pattern: dict = field(default_factory=dict)  # module pattern -> r, where it differs from `r`
    alpha_pattern: dict = field(default_factory=dict)
    layers: tuple[int, ...] | None = None  # PEFT's layers_to_transform (None: every layer)


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
        """Names of the active adapters."""
        return tuple(a.name for a in self.adapters if a.active)

    def __repr__(self) -> str:
        names = ", ".join(repr(a.name) for a in self.adapters)
        return (
            f"AdapterStatus({self.model_type or 'model'}: adapters [{names}], active {list(self.active)}, "
            f"trainable {self.trainable_params:,} of {self.total_params:,})"
        )


def _layers(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def config_targets(config: Any) -> tuple[str, ...]:
    """What a PEFT config names as its targets, as items of a target spec: ``target_modules`` (a regular
    expression as ``re:…``) and the fused expert weights of ``target_parameters``."""
    tm = getattr(config, "target_modules", None)
    if isinstance(tm, str):
        names: tuple[str, ...] = (f"re:{tm}",)
    else:
        names = tuple(sorted(str(t) for t in tm or ()))
    return names + tuple(sorted(str(t) for t in getattr(config, "target_parameters", None) or ()))


def held_settings(model: nn.Module, name: str) -> dict[str, Any]:
    """The inject settings that make the LoRA adapter ``name`` that ``model`` holds again — r, alpha, dropout,
    variant, layers and a ``targets`` spec that selects exactly the modules and fused expert weights it adapts
    on this model ({} when the model holds no such LoRA adapter). The spec is the config's own names where they
    select exactly those (``experts`` for all the expert weights), else the adapted paths, compacted."""
    peft_model = wrapper_for(model)
    config = getattr(peft_model, "peft_config", {}).get(name) if peft_model is not None else None
    if config is None or method_of(config) != "lora":
        return {}
    found: dict[str, Any] = {
        "r": int(config.r),
        "alpha": float(config.lora_alpha),
        "dropout": float(config.lora_dropout),
        "variant": variant_of(config),
        "layers": _layers(getattr(config, "layers_to_transform", None)),
    }
    held = adapted_paths(peft_model, [name])
    if not held:
        return found
    found["targets"], found["layers"] = _held_spec(base_model_of(peft_model), config, held, found["layers"])
    return found


def _held_spec(
    base: nn.Module, config: Any, held: list[str], layers: tuple[int, ...] | None
) -> tuple[str, tuple[int, ...] | None]:
    index = targets.index_model(base)
    wanted = set(held)
    experts = [p for p in held if p in index.by_path and index.by_path[p].kind == "experts"]
    modules = [p for p in held if p not in set(experts)]
    named = config_targets(config)
    in_config = tuple(t for t in named if t not in set(getattr(config, "target_parameters", None) or ()))
    candidates: list[tuple[tuple[str, ...], tuple[int, ...] | None]] = []
    if experts:  # every expert weight (of the chosen layers): the preset reads best
        candidates.append(((*in_config, "experts"), layers))
    candidates.append((named, layers))
    if all(p in index.by_path for p in held):
        compact = tuple(targets.compact_target_modules(index, modules)) if modules else ()
        if experts:
            candidates.append(((*compact, "experts"), None))
        parameters = tuple(targets.compact_target_parameters(index, experts)) if experts else ()
        candidates.append(((*compact, *parameters), None))
    candidates.append((tuple(held), None))
    for items, chosen_layers in candidates:
        try:
            selected = targets.resolve_targets(index, ", ".join(items), chosen_layers)
        except UsageError:
            continue
        if set(selected) == wanted:
            return ", ".join(items), chosen_layers
    return ", ".join(held), None


def status(model: nn.Module) -> AdapterStatus:
    """What adapters ``model`` holds (names, active, merged, sizes), per model and per layer."""
    require_module(model)
    peft_model = wrapper_for(model)
    model_type = getattr(getattr(base_model_of(model), "config", None), "model_type", None)
    if peft_model is None:
        total = targets.index_model(model).base_params
        trainable = sum(param_count(p) for p in model.parameters() if p.requires_grad)
        return AdapterStatus(model_type, (), None, (), trainable, total)
    from peft import get_layer_status, get_model_status

    if is_prompt_learning(peft_model):  # virtual tokens: no adapted layers for PEFT's status to list
        return _prompt_status(peft_model, model_type)
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
    per_adapter: dict[str, int] = {}
    modules: dict[str, int] = {}
    for pname, p in peft_model.named_parameters():
        m = ADAPTER_PARAM.search(pname)
        if m:
            per_adapter[m.group(2)] = per_adapter.get(m.group(2), 0) + param_count(p)
    for row in layer_rows:
        for n in row.available:
            modules[n] = modules.get(n, 0) + 1
    active = set(active_names(peft_model))
    infos = []
    for name, cfg in peft_model.peft_config.items():
        method = method_of(cfg)
        r = getattr(cfg, "r", None)
        alpha = getattr(cfg, "lora_alpha", getattr(cfg, "alpha", None))
        infos.append(
            AdapterInfo(
                name=name,
                active=name in active,
                r=None if r is None else int(r),
                alpha=None if alpha is None else float(alpha),
                variant=variant_of(cfg) if method == "lora" else method,
                modules=modules.get(name, 0),
                params=per_adapter.get(name, 0),
                targets=config_targets(cfg),
                rank_pattern=dict(getattr(cfg, "rank_pattern", None) or {}),
                alpha_pattern=dict(getattr(cfg, "alpha_pattern", None) or {}),
                layers=_layers(getattr(cfg, "layers_to_transform", None)),
            )
        )
    trainable, total = parameter_counts(peft_model)
    enabled = model_status.enabled if isinstance(model_status.enabled, bool) else None
    merged = model_status.merged_adapters if isinstance(model_status.merged_adapters, list) else []
    return AdapterStatus(model_type, tuple(infos), enabled, tuple(merged), trainable, total, layer_rows)


def _prompt_status(peft_model: nn.Module, model_type: str | None) -> AdapterStatus:
    """Status of a prompt/prefix-tuning model: its virtual tokens, counted as PEFT counts them."""
    trainable, total = peft_model.get_nb_trainable_parameters()
    active = set(active_names(peft_model))
    infos = tuple(
        AdapterInfo(
            name=name,
            active=name in active,
            r=None,
            alpha=None,
            variant=method_of(cfg),
            modules=0,
            params=int(trainable) if name in active else 0,
            targets=(f"{cfg.num_virtual_tokens} virtual tokens",),
        )
        for name, cfg in peft_model.peft_config.items()
    )
    return AdapterStatus(model_type, infos, None, (), int(trainable), int(total))
