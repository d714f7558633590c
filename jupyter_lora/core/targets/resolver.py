"""Resolving a target spec on a model's index: presets per architecture, the modules each item selects, layer
and exclude filters, and errors that say what the model has instead (did-you-mean, the adaptable names)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from ..errors import TargetError, did_you_mean
from ..modelinfo import require_module
from .grammar import PRESETS, compile_regex, match_paths, parse_layers, preset_name, split_spec
from .index import ModelIndex, index_model

__all__ = [
    "compact_target_modules",
    "preset_paths",
    "resolve",
    "resolve_targets",
    "spec_key",
    "suffix_summary",
]

# Query/value projections (or fused qkv) by the names architectures give them, for models PEFT has no default for.
_QV_NAMES = (
    "q_proj",
    "v_proj",
    "query",
    "value",
    "q_lin",
    "v_lin",
    "q",
    "v",
    "qkv_proj",
    "query_key_value",
    "c_attn",
    "Wqkv",
    "qkv",
    "in_proj",
)
_ATTENTION_RE = re.compile(r"attn|attention", re.IGNORECASE)


def _heads(index: ModelIndex) -> set[str]:
    heads = set(index.task.heads)
    if index.task.output_embeddings:
        heads.add(index.task.output_embeddings)
    return heads


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def preset_paths(index: ModelIndex, preset: str) -> list[str]:
    """Module paths a preset selects on this model (heads and output embeddings never included). On a
    vision-language model the presets adapt its language model only; ``vision`` selects the linear layers outside
    it (the vision tower and the projector)."""
    heads = _heads(index)
    linear = [m for m in index.modules if m.is_linear and not _under(m.path, heads)]
    if preset == "vision":
        parts = index.language_parts
        return [m.path for m in linear if parts and not _under(m.path, parts)]
    if index.language_parts:
        linear = [m for m in linear if _under(m.path, index.language_parts)]
    if preset == "all-linear":
        return [m.path for m in linear]
    if preset == "attention":
        return [m.path for m in linear if any(_ATTENTION_RE.search(part) for part in m.path.split("."))]
    if preset == "mlp":
        in_blocks = [m for m in linear if m.layer is not None]
        return [m.path for m in in_blocks if not any(_ATTENTION_RE.search(p) for p in m.path.split("."))]
    if preset == "qv":
        names = _peft_default_targets(index) or _QV_NAMES
        return [m.path for m in linear if m.suffix in names or any(m.path.endswith("." + n) for n in names)]
    raise AssertionError(preset)


def _peft_default_targets(index: ModelIndex) -> list[str] | None:
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return mapping.get(index.model_type or "")


def suffix_summary(index: ModelIndex, limit: int = 12) -> str:
    """``q_proj ×32, k_proj ×32, ...`` — adaptable names grouped by last component, for error messages."""
    counts = Counter(m.suffix for m in index.modules)
    items = [f"{name} ×{n}" if n > 1 else name for name, n in counts.most_common()]
    more = f", … ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _not_adaptable_error(item: str, index: ModelIndex, what: str) -> TargetError:
    paths = list(index.module_types)
    hits = [p for p in match_paths(item, paths) if p]
    suggestions = did_you_mean(item, [m.suffix for m in index.modules] + list(PRESETS))
    if hits:
        kinds = sorted({index.module_types[p] for p in hits})
        contained = sorted({index.by_path[c].suffix for p in hits for c in index.children.get(p, ())})
        inside = (
            f" It contains {', '.join(f'`{c}`' for c in contained[:8])}; target those"
            + (", or use a preset (attention, mlp, all-linear)." if contained else ".")
            if contained
            else ""
        )
        return TargetError(
            f"`{what}` {item!r} matches {len(hits)} module(s) of type {', '.join(kinds)}, which cannot take LoRA "
            f"(LoRA adapts Linear, Conv1D, Embedding and Conv layers).{inside}{suggestions} "
            f"Adaptable modules: {suffix_summary(index)}."
        )
    if item.startswith("re:"):
        pattern = compile_regex(item[3:])
        partial = [m.path for m in index.modules if pattern.search(m.path)]
        if partial:
            return TargetError(
                f"`{what}` {item!r} matches no whole module path (a regex must match the full path, as in PEFT; "
                f"it matches part of {len(partial)}, e.g. `{partial[0]}`). Try `re:.*{item[3:]}.*`."
            )
    return TargetError(
        f"`{what}` {item!r} matches no module of this model.{suggestions} "
        f"Adaptable modules: {suffix_summary(index)}."
    )


def resolve_targets(
    index: ModelIndex,
    targets: Any = None,
    layers: Any = None,
    exclude: Any = None,
) -> tuple[str, ...]:
    """The adaptable module paths a spec selects, in model order. Raises ``TargetError`` for any item that
    selects nothing, instead of ignoring it. Cached per (targets, layers, exclude) on the index."""
    key = selection_key(targets, layers, exclude)
    if key in index.resolved:
        return index.resolved[key]
    items = split_spec(targets, "targets")
    if targets is not None and not items:
        raise TargetError(
            "`targets` is empty. Name modules (q_proj, v_proj), a glob, re:<regex>, or a preset "
            f"(attention, mlp, all-linear, qv). Adaptable modules: {suffix_summary(index)}."
        )
    if not items:
        items = ("qv",)
        if not preset_paths(index, "qv"):
            raise TargetError(
                f"`targets` is needed: no default query/value modules found for model type "
                f"{index.model_type!r}. Name modules or a preset (attention, mlp, all-linear). "
                f"Adaptable modules: {suffix_summary(index)}."
            )
    all_paths = [m.path for m in index.modules]
    selected: set[str] = set()
    for item in items:
        preset = preset_name(item)
        if preset is not None:
            hits = preset_paths(index, preset)
            if not hits and preset == "vision":
                raise TargetError(
                    f"`targets` preset 'vision' adapts the vision tower of a vision-language model; this model "
                    f"(type {index.model_type!r}) has none. Drop it, or name modules: {suffix_summary(index)}."
                )
            if not hits:
                raise TargetError(
                    f"`targets` preset {item!r} selects no module of this model "
                    f"({type(index).__name__} of type {index.model_type!r}). "
                    f"Name modules instead: {suffix_summary(index)}."
                )
        else:
            hits = match_paths(item, all_paths)
            if not hits:
                raise _not_adaptable_error(item, index, "targets")
        selected.update(hits)

    layer_set = parse_layers(layers, index.num_layers)
    if layer_set is not None:
        chosen = set(layer_set)
        selected = {p for p in selected if index.by_path[p].layer in chosen}
        if not selected:
            raise TargetError(
                f"`layers` {layers!r} keeps none of the targeted modules: {', '.join(items)} lie outside "
                f"layers {layers}. The model has layers 0-{index.num_layers - 1}."
            )
    for item in split_spec(exclude, "exclude"):
        hits = match_paths(item, list(index.module_types))
        if not hits:
            suggestion = did_you_mean(item, [m.suffix for m in index.modules])
            raise TargetError(
                f"`exclude` {item!r} matches no module of this model.{suggestion} "
                f"Adaptable modules: {suffix_summary(index)}."
            )
        selected -= {p for p in selected if _under(p, hits)}
    if not selected:
        raise TargetError(
            f"`exclude` {exclude!r} removes every targeted module; nothing is left to adapt. "
            "Narrow `exclude` or widen `targets`."
        )
    order = {p: i for i, p in enumerate(all_paths)}
    result = tuple(sorted(selected, key=order.__getitem__))
    index.resolved[key] = result
    return result


def selection_key(targets: Any = None, layers: Any = None, exclude: Any = None) -> tuple[Any, Any, Any]:
    """The key ``resolve_targets`` caches a selection under: small and hashable, so that what is kept per selection
    is found without hashing its (maybe hundreds of) module paths."""
    return (spec_key(targets), spec_key(layers), spec_key(exclude))


def spec_key(value: Any) -> Any:
    """A spec value (text, or a list of items) as a hashable key for caches."""
    if isinstance(value, (list, tuple, set, frozenset, range)):
        return ("__seq__", *(spec_key(v) for v in value))
    return value


def compact_target_modules(index: ModelIndex, paths: Sequence[str]) -> list[str]:
    """The shortest PEFT ``target_modules`` list that selects exactly ``paths``: the suffixes when they pick the
    same set (readable adapter_config.json), else the full paths."""
    chosen = set(paths)
    suffixes = sorted({index.by_path[p].suffix for p in paths})
    by_suffix = {m.path for m in index.modules if m.suffix in suffixes}
    if by_suffix == chosen:
        # PEFT matches a name also against non-adaptable modules with the same suffix; they must not exist.
        clash = [
            p
            for p, t in index.module_types.items()
            if p and p.rsplit(".", 1)[-1] in suffixes and p not in chosen
        ]
        if not clash:
            return suffixes
    return list(paths)


def resolve(
    model: nn.Module, targets: Any = None, layers: Any = None, exclude: Any = None
) -> tuple[str, ...]:
    """The module paths of ``model`` that a target spec selects (what the panel highlights as you type)."""
    return resolve_targets(index_model(require_module(model)), targets, layers, exclude)
