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
    "compact_target_parameters",
    "experts_note",
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


def _expert_owners(index: ModelIndex) -> dict[str, tuple[str, ...]]:
    """``{experts module path: its fused expert weights' paths}`` (kept with the index)."""

    def owners() -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for m in index.modules:
            if m.kind == "experts":
                out.setdefault(m.module_path, []).append(m.path)
        return {k: tuple(v) for k, v in out.items()}

    return index.remember("expert owners", owners)


def _routing_gates(index: ModelIndex) -> set[str]:
    """Linear layers that route tokens in a mixture-of-experts block: a ``gate``/``router`` (or ``*_gate``, Qwen2-MoE's
    ``shared_expert_gate``) beside the experts module. They decide which experts run, with an output as wide as
    the number of experts (or 1); presets leave them alone — adapting a router shifts the load between experts
    instead of adapting what the experts compute. Named explicitly they can still be targeted."""

    def gates() -> set[str]:
        blocks = {p.rsplit(".", 1)[0] for p in _expert_owners(index) if "." in p}
        out = set()
        for m in index.modules:
            parent, _, leaf = m.path.rpartition(".")
            if m.is_linear and parent in blocks and ("gate" in leaf or "router" in leaf):
                out.add(m.path)
        return out

    return index.remember("routing gates", gates)


def peft_remapped(index: ModelIndex) -> set[str]:
    """Linear layers PEFT cannot adapt on this model: for MoE architectures whose experts transformers 5 fused,
    PEFT rewrites every ``target_modules`` entry named like a transformers-4 expert projection (``gate_proj``,
    ``up_proj``, ``down_proj``, ``w1``…, the router ``gate``) into the fused expert weights — also when it names a
    dense MLP or a shared expert (DeepSeek-V3's first layers, its ``shared_experts``), and again when the adapter is
    loaded. Such a layer would silently become the experts, so presets leave it out and naming it is refused.
    Read from PEFT's own conversion tables; none when PEFT has none."""

    def remapped() -> set[str]:
        if not _expert_owners(index):  # a model without fused experts: nothing to remap (and no PEFT import)
            return set()
        try:
            from peft.utils import transformers_weight_conversion as conversion

            base_type = conversion._MODEL_TO_CONVERSION_PATTERN.get(index.model_type or "")
            if base_type is None or conversion.get_checkpoint_conversion_mapping(index.model_type) is None:
                return set()
            if not conversion._MOE_FUSED_TARGETS.get(base_type):
                return set()
            names = set(conversion._MOE_TARGET_MODULE_MAPPING.get(base_type, {}))
        except (ImportError, AttributeError):  # pragma: no cover - another PEFT version
            return set()
        return {m.path for m in index.modules if m.kind != "experts" and m.suffix in names}

    return index.remember("peft remapped", remapped)


def preset_paths(index: ModelIndex, preset: str) -> list[str]:
    """Module paths a preset selects on this model (heads and output embeddings never included).

    ``experts`` is every fused expert weight of every mixture-of-experts block (``…experts.gate_up_proj``,
    ``…experts.down_proj``). The linear presets (``all-linear``, ``mlp``, ...) do not include them, as PEFT's own
    ``all-linear`` does not: an expert weight is not a Linear layer, its adapter is one low-rank pair per expert
    (the adapter grows with the number of experts), and PEFT adapts it without dropout or DoRA — so adding the
    experts is a choice made by name (``targets: all-linear, experts``), which the plan points out
    (``experts_note``). Routing gates are left out of every preset (``_routing_gates``).

    On a vision-language model the linear presets adapt its language model only; ``vision`` selects the linear
    layers outside it (the vision tower and the projector). On a dual encoder (CLIP, SigLIP) they cover both
    towers, and ``vision`` selects its vision tower."""
    if preset == "experts":
        return [m.path for m in index.modules if m.kind == "experts"]
    heads = _heads(index)
    skip = _routing_gates(index) | peft_remapped(index) | set(index.weight_read_directly)
    linear = [m for m in index.modules if m.is_linear and not _under(m.path, heads) and m.path not in skip]
    if preset == "vision":
        if index.vision_parts:  # a dual encoder: its vision tower
            return [m.path for m in linear if _under(m.path, index.vision_parts)]
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


def experts_note(index: ModelIndex, targets: Any, paths: Sequence[str]) -> str:
    """A sentence for the plan when a linear preset (``all-linear``, ``mlp``) was used on a mixture-of-experts
    model and left its fused expert weights out, else ""."""
    experts = preset_paths(index, "experts")
    if not experts:
        return ""
    presets = {preset_name(i) for i in split_spec(targets, "targets")}
    chosen = set(paths)
    left = [p for p in experts if p not in chosen]
    if not left or not presets & {"all-linear", "mlp"}:
        return ""
    owners = len({index.by_path[p].module_path for p in left})
    names = sorted({index.by_path[p].suffix for p in left})
    note = (
        f"the fused MoE experts are not included: {len(left)} expert weights ({', '.join(names)}) in {owners} "
        f"experts module(s) are not Linear layers; add them with targets: {_with_experts(targets)}"
    )
    remapped = peft_remapped(index)
    if remapped:
        shown = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in remapped}))
        note += (
            f"; {len(remapped)} Linear layers named {shown} are left out too (PEFT would turn them into the "
            "fused experts for this architecture)"
        )
    return note


def _with_experts(targets: Any) -> str:
    items = list(split_spec(targets, "targets"))
    return ", ".join([*items, "experts"])


def _peft_default_targets(index: ModelIndex) -> list[str] | None:
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return mapping.get(index.model_type or "")


def suffix_summary(index: ModelIndex, limit: int = 12) -> str:
    """``q_proj ×32, k_proj ×32, ...`` — adaptable names grouped by last component, for error messages (fused
    expert weights as ``experts.gate_up_proj``)."""
    counts = Counter(
        f"experts.{m.suffix}" if m.kind == "experts" else m.suffix
        for m in index.modules
        if m.path not in index.weight_read_directly
    )
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
            + (", or use a preset (attention, mlp, all-linear, experts)." if contained else ".")
            if contained
            else ""
        )
        return TargetError(
            f"`{what}` {item!r} matches {len(hits)} module(s) of type {', '.join(kinds)}, which cannot take LoRA "
            f"(LoRA adapts Linear, Conv1D, Embedding and Conv layers, and fused MoE expert weights)."
            f"{inside}{suggestions} "
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
            f"(attention, mlp, all-linear, qv, experts). Adaptable modules: {suffix_summary(index)}."
        )
    if not items:
        items = ("qv",)
        if not preset_paths(index, "qv"):
            direct = sorted({owner for owner in index.weight_read_directly.values()})
            why = (
                f" ({', '.join(direct)} reads its projections' weights directly, so LoRA cannot adapt them)"
                if direct
                else ""
            )
            raise TargetError(
                f"`targets` is needed: no default query/value modules found for model type "
                f"{index.model_type!r}{why}. Name modules or a preset (attention, mlp, all-linear, experts). "
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
                hint = (
                    " Its MLP experts are fused weights: target them with the `experts` preset."
                    if preset == "mlp" and preset_paths(index, "experts")
                    else ""
                )
                what = (
                    f"this model (type {index.model_type!r}) has no mixture-of-experts layers"
                    if preset == "experts"
                    else f"it selects no module of this model (type {index.model_type!r})"
                )
                raise TargetError(
                    f"`targets` preset {item!r}: {what}.{hint} Name modules instead: {suffix_summary(index)}."
                )
        else:
            hits = match_paths(item, all_paths) or _owned_experts(index, item)
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
        hits = match_paths(
            item, [*index.module_types, *(m.path for m in index.modules if m.kind == "experts")]
        )
        if preset_name(item) == "experts":
            hits = preset_paths(index, "experts")
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
    remapped = sorted(p for p in selected if p in peft_remapped(index))
    if remapped:
        leaf = remapped[0].rsplit(".", 1)[-1]
        raise TargetError(
            f"`targets` selects `{remapped[0]}`, which PEFT cannot adapt on a {index.model_type} model: PEFT reads a "
            f"Linear named `{leaf}` as an expert projection of transformers 4 and adapts the fused experts instead "
            f"(also when loading the adapter). Target the experts with `experts`, or leave it out (exclude: {leaf})."
        )
    unused = sorted(p for p in selected if p in index.weight_read_directly)
    if unused:
        owner = index.weight_read_directly[unused[0]]
        leaf = unused[0].rsplit(".", 1)[-1]
        raise TargetError(
            f"`targets` selects `{unused[0]}`, whose weight {owner} reads directly instead of calling the layer, so "
            f"a LoRA adapter there would not change the model's outputs (and merging it would). Leave it out "
            f"(exclude: {leaf}) or target other modules: {suffix_summary(index)}."
        )
    order = {p: i for i, p in enumerate(all_paths)}
    result = tuple(sorted(selected, key=order.__getitem__))
    index.resolved[key] = result
    return result


def _owned_experts(index: ModelIndex, item: str) -> list[str]:
    """The fused expert weights of the experts modules ``item`` names (``mlp.experts``, ``layers.0.*.experts``):
    an experts module is targeted through its weights."""
    owners = _expert_owners(index)
    return [p for owner in match_paths(item, list(owners)) for p in owners[owner]]


def selection_key(targets: Any = None, layers: Any = None, exclude: Any = None) -> tuple[Any, Any, Any]:
    """The key ``resolve_targets`` caches a selection under: small and hashable, so that what is kept per selection
    is found without hashing its (maybe hundreds of) module paths."""
    return (spec_key(targets), spec_key(layers), spec_key(exclude))


def spec_key(value: Any) -> Any:
    """A spec value (text, or a list of items) as a hashable key for caches."""
    if isinstance(value, (list, tuple, set, frozenset, range)):
        return ("__seq__", *(spec_key(v) for v in value))
    return value


def compact_target_parameters(index: ModelIndex, paths: Sequence[str]) -> list[str]:
    """The shortest PEFT ``target_parameters`` list that selects exactly the fused expert weights ``paths``: the
    parameter names (``gate_up_proj``) when every expert weight of that name is chosen and no other parameter of
    the model has that name, else the full paths. PEFT matches a parameter when its path equals an entry or ends
    with ``.`` + it."""
    chosen = set(paths)
    suffixes = sorted({index.by_path[p].suffix for p in paths})
    by_suffix = {m.path for m in index.modules if m.kind == "experts" and m.suffix in suffixes}
    if by_suffix == chosen and not set(suffixes) & index.clashing_param_names:
        return suffixes
    return list(paths)


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
