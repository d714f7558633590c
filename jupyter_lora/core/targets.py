"""Which modules of a model can take a LoRA adapter, and which ones a target spec selects.

Spellings (the same in the magic, the panel and the Python API), comma-separated or as a list:

* a module name or dotted suffix — ``q_proj``, ``self_attn.o_proj`` (PEFT's own rule: the path equals it or
  ends with ``.`` + it);
* a glob — ``*.attn.c_attn``, ``layers.1?.mlp.*``;
* a regular expression — ``re:.*\\.(q|v)_proj`` (matched against the whole path, as PEFT does);
* a preset — ``attention``, ``mlp``, ``all-linear``, or ``qv`` (PEFT's per-architecture default, usually the
  query and value projections).

``layers`` keeps only modules inside the given blocks (``"0-11, 20"``); ``exclude`` removes modules by the same
spellings. A spec item that selects nothing, or only modules that cannot take LoRA, is an error that says so.
"""

from __future__ import annotations

import fnmatch
import re
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .adapters.peft_facts import base_layer_of, is_modules_to_save_wrapper, is_tuner_layer
from .errors import TargetError, UsageError, did_you_mean
from .modelinfo import ADAPTER_PARAM, TaskInfo, base_model_of, detect_task, param_count, tied_duplicates

__all__ = [
    "PRESETS",
    "ModelIndex",
    "ModuleInfo",
    "index_model",
    "layer_of",
    "parse_layers",
    "resolve_targets",
    "split_spec",
    "unwrapped_modules",
]

PRESETS = ("attention", "mlp", "all-linear", "qv")
_LINEAR_KINDS = ("linear", "conv1d-gpt2", "linear4bit", "linear8bit")
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


@dataclass(frozen=True)
class ModuleInfo:
    """One module that can take LoRA. ``path`` is relative to the base (transformers) model."""

    path: str
    kind: str  # linear | conv1d-gpt2 | linear4bit | linear8bit | embedding | conv1d | conv2d | conv3d
    type_name: str
    in_features: int
    out_features: int
    kernel: int = 1  # product of a conv kernel's sizes
    kernel_size: tuple[int, ...] = ()
    groups: int = 1
    weight_params: int = 0
    bias_params: int = 0
    dtype: str = "float32"
    layer: int | None = None
    suffix: str = ""

    @property
    def is_linear(self) -> bool:
        return self.kind in _LINEAR_KINDS

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)


@dataclass
class ModelIndex:
    """Everything about a model's structure that planning needs, collected in one walk and cached."""

    modules: tuple[ModuleInfo, ...]
    by_path: dict[str, ModuleInfo]
    module_types: dict[str, str]  # every module path -> class name (for "cannot take LoRA" messages)
    children: dict[str, tuple[str, ...]]  # adaptable descendants of each container path
    num_layers: int
    task: TaskInfo
    model_type: str | None
    base_params: int  # PEFT-style total of the base model (tied once, 4-bit unpacked)
    module_params: dict[str, int] = field(default_factory=dict)  # path -> parameters (modules_to_save)
    is_meta: bool = False
    weight_dtype: Any = None  # the most common floating dtype among the parameters (None: none is floating)
    layer_lists: tuple[str, ...] = ()
    _resolved: dict[Any, tuple[str, ...]] = field(default_factory=dict, repr=False)


def _kind(module: nn.Module) -> tuple[str, int, int, int, int] | None:
    """(kind, in, out, kernel volume, groups) for a module PEFT's LoRA can adapt, else None."""
    name = type(module).__name__
    if name == "Linear4bit" and hasattr(module, "in_features"):
        return "linear4bit", module.in_features, module.out_features, 1, 1
    if name in ("Linear8bitLt", "Linear8bit") and hasattr(module, "in_features"):
        return "linear8bit", module.in_features, module.out_features, 1, 1
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features, 1, 1
    if name == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D: weight is (in, out)
        in_features, out_features = module.weight.shape
        return "conv1d-gpt2", int(in_features), int(out_features), 1, 1
    if isinstance(module, nn.Embedding):
        return "embedding", module.num_embeddings, module.embedding_dim, 1, 1
    for cls, kind in ((nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d")):
        if isinstance(module, cls):
            kernel = 1
            for k in module.kernel_size:
                kernel *= int(k)
            return kind, module.in_channels, module.out_channels, kernel, module.groups
    return None


_LAYER_LIST_TYPES = (nn.ModuleList, nn.Sequential)


def _layer_lists(model: nn.Module) -> list[str]:
    """Paths of the repeated-block containers: ModuleLists whose children are all one class."""
    lists = []
    for name, module in model.named_modules():
        if isinstance(module, _LAYER_LIST_TYPES) and len(module) > 1:
            classes = {type(child) for child in module}
            if len(classes) == 1:
                lists.append(name)
    # Keep the outermost ones: T5's block list, not each block's inner sub-layer list or MoE expert lists.
    outer = [p for p in lists if not any(p != q and p.startswith(q + ".") for q in lists)]
    return outer


def layer_of(path: str, layer_lists: Sequence[str]) -> int | None:
    """The index of the repeated block ``path`` lies in (``model.layers.3.mlp`` -> 3), or None outside them."""
    for prefix in layer_lists:
        head = prefix + "." if prefix else ""
        if path.startswith(head):
            rest = path[len(head) :].split(".", 1)[0]
            if rest.isdigit():
                return int(rest)
    return None


# Models are indexed once; the cache entry dies with the model and is rebuilt if its module count changes
# (our operations also drop it explicitly).
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[int, ModelIndex]] = weakref.WeakKeyDictionary()


def invalidate(model: nn.Module) -> None:
    """Forget the cached index of ``model`` (call after changing its structure)."""
    _CACHE.pop(model, None)
    _CACHE.pop(base_model_of(model), None)


def index_model(model: nn.Module) -> ModelIndex:
    """Walk ``model`` (or the base under a PEFT wrapper) once and describe what can take LoRA. Cached."""
    base = base_model_of(model)
    count = sum(1 for _ in base.modules())
    cached = _CACHE.get(base)
    if cached is not None and cached[0] == count:
        return cached[1]
    index = _build_index(base)
    _CACHE[base] = (count, index)
    return index


def unwrapped_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` as the base model had them: inside an adapted model each PEFT tuner layer is
    reported as its original layer, each modules_to_save wrapper as its original module, and PEFT's own children
    (lora_A, lora_B, the modules_to_save copies ...) are skipped."""
    skip: str | None = None  # pre-order: the children of an unwrapped module come right after it
    for path, module in model.named_modules():
        if skip is not None and path.startswith(skip):
            continue
        skip = None
        if is_modules_to_save_wrapper(module):
            skip = path + "." if path else ""
            module = module.original_module
        if is_tuner_layer(module):
            skip = path + "." if path else ""
            module = base_layer_of(module)
        yield path, module


def _build_index(base: nn.Module) -> ModelIndex:
    layer_lists = _layer_lists(base)
    modules: list[ModuleInfo] = []
    module_types: dict[str, str] = {}
    for path, module in unwrapped_modules(base):
        module_types[path] = type(module).__name__
        if not path:
            continue
        kind = _kind(module)
        if kind is None:
            continue
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        modules.append(
            ModuleInfo(
                path=path,
                kind=kind[0],
                type_name=type(module).__name__,
                in_features=int(kind[1]),
                out_features=int(kind[2]),
                kernel=kind[3],
                kernel_size=tuple(int(k) for k in getattr(module, "kernel_size", ())),
                groups=kind[4],
                weight_params=param_count(weight) if weight is not None else 0,
                bias_params=bias.numel() if isinstance(bias, nn.Parameter) else 0,
                dtype=str(weight.dtype).replace("torch.", "") if weight is not None else "float32",
                layer=layer_of(path, layer_lists),
                suffix=path.rsplit(".", 1)[-1],
            )
        )
    children: dict[str, list[str]] = {}
    for info in modules:
        parts = info.path.split(".")
        for i in range(1, len(parts)):
            children.setdefault(".".join(parts[:i]), []).append(info.path)
    num_layers = 0
    for prefix in layer_lists:
        num_layers = max(num_layers, len(base.get_submodule(prefix)))

    # Base total the way PEFT counts it (each tensor once), minus weights that transformers will tie.
    seen: dict[str, Any] = {n: p for n, p in base.named_parameters() if not ADAPTER_PARAM.search(n)}
    duplicates = tied_duplicates(base)
    base_params = sum(param_count(p) for name, p in seen.items() if name not in duplicates)
    task = detect_task(base)
    is_meta = any(p.is_meta for p in seen.values())
    floats = [p.dtype for p in seen.values() if p.dtype.is_floating_point]
    weight_dtype = max(set(floats), key=floats.count) if floats else None
    index = ModelIndex(
        modules=tuple(modules),
        by_path={m.path: m for m in modules},
        module_types=module_types,
        children={k: tuple(v) for k, v in children.items()},
        num_layers=num_layers,
        task=task,
        model_type=getattr(getattr(base, "config", None), "model_type", None),
        base_params=base_params,
        is_meta=is_meta,
        weight_dtype=weight_dtype,
        layer_lists=tuple(layer_lists),
    )
    return index


# ----------------------------------------------------------------------------------------------- spec parsing


def split_spec(value: Any, what: str = "targets") -> tuple[str, ...]:
    """``"q_proj, v_proj"`` or ``["q_proj", "v_proj"]`` -> ``("q_proj", "v_proj")``. ``re:`` items keep commas
    inside braces (``re:x{1,2}``) because a regex is only split outside brackets."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = _split_top_level(value)
    elif isinstance(value, Iterable):
        items = []
        for item in value:
            if not isinstance(item, str):
                raise UsageError(
                    f"`{what}` must be module names (strings), got {item!r} ({type(item).__name__}) in "
                    f"{list(value)!r}. Write e.g. {what}: q_proj, v_proj."
                )
            items.extend(_split_top_level(item))
    else:
        raise UsageError(
            f"`{what}` must be a comma-separated string or a list of names, got {value!r} "
            f"({type(value).__name__}). Write e.g. {what}: q_proj, v_proj."
        )
    return tuple(i for i in items if i)


def _split_top_level(text: str) -> list[str]:
    out, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    out.append("".join(current).strip())
    return out


def parse_layers(value: Any, num_layers: int) -> tuple[int, ...] | None:
    """``"0-11, 20"`` / ``5`` / ``[0, 1, -1]`` / ``range(4)`` -> sorted layer indices, checked against the model.
    None, a blank string or an empty list -> None (every layer)."""
    if value is None or value == [] or (isinstance(value, str) and not value.strip()):
        return None
    if num_layers == 0:
        raise UsageError(
            f"`layers` was given ({value!r}) but this model has no repeated layer blocks to choose from. "
            "Remove `layers`, or select modules by name in `targets`."
        )
    items: list[Any]
    if isinstance(value, bool):
        raise UsageError(f"`layers` must be layer indices like 0-11, 20; got {value!r}.")
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        items = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple, range, set, frozenset)):
        items = list(value)
    else:
        raise UsageError(
            f'`layers` must be indices and ranges like "0-11, 20" or a list of ints, got {value!r} '
            f"({type(value).__name__})."
        )
    indices: set[int] = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise UsageError(f"`layers` items must be integers or ranges like 0-11; got {item!r}.")
        if isinstance(item, int):
            lo = hi = item
        else:
            m = re.fullmatch(r"\s*(-?\d+)\s*(?:(?:-|:|\.\.)\s*(-?\d+)\s*)?", item)
            if not m:
                raise UsageError(
                    f"`layers` item {item!r} is not an index or a range; write e.g. 0-11, 20 "
                    f"(the model has layers 0-{num_layers - 1})."
                )
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo < 0 and hi == lo:
            lo = hi = num_layers + lo
        if lo > hi:
            raise UsageError(f"`layers` range {item!r} runs backwards; write it low-high, e.g. {hi}-{lo}.")
        if lo < 0 or hi >= num_layers:
            raise UsageError(
                f"`layers` {item!r} is out of range: this model has {num_layers} layers, numbered "
                f"0-{num_layers - 1}."
            )
        indices.update(range(lo, hi + 1))
    return tuple(sorted(indices))


# ----------------------------------------------------------------------------------------------- resolution


def _is_glob(item: str) -> bool:
    return any(ch in item for ch in "*?[")


def _match_item(item: str, paths: Sequence[str]) -> list[str]:
    if item.startswith("re:"):
        pattern = _compile(item[3:])
        return [p for p in paths if pattern.fullmatch(p)]
    if _is_glob(item):
        return [p for p in paths if fnmatch.fnmatchcase(p, item) or fnmatch.fnmatchcase(p, "*." + item)]
    dotted = "." + item
    return [p for p in paths if p == item or p.endswith(dotted)]


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TargetError(f"`targets` regex re:{pattern} is not valid: {exc}. Fix the expression.") from None


def _heads(index: ModelIndex) -> set[str]:
    heads = set(index.task.heads)
    if index.task.output_embeddings:
        heads.add(index.task.output_embeddings)
    return heads


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def preset_name(item: str) -> str | None:
    """The preset a spec item names (``"Attention"``, ``"all_linear"``, ``"all"`` -> ``"all-linear"``), else None."""
    lowered = item.lower().replace("_", "-")
    if lowered == "all":
        return "all-linear"
    return lowered if lowered in PRESETS else None


def preset_paths(index: ModelIndex, preset: str) -> list[str]:
    """Module paths a preset selects on this model (heads and output embeddings never included)."""
    heads = _heads(index)
    linear = [m for m in index.modules if m.is_linear and not _under(m.path, heads)]
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
    hits = [p for p in _match_item(item, paths) if p]
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
        pattern = _compile(item[3:])
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
    key = (_freeze(targets), _freeze(layers), _freeze(exclude))
    if key in index._resolved:
        return index._resolved[key]
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
            if not hits:
                raise TargetError(
                    f"`targets` preset {item!r} selects no module of this model "
                    f"({type(index).__name__} of type {index.model_type!r}). "
                    f"Name modules instead: {suffix_summary(index)}."
                )
        else:
            hits = _match_item(item, all_paths)
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
        hits = _match_item(item, list(index.module_types))
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
    index._resolved[key] = result
    return result


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple, set, frozenset, range)):
        return ("__seq__", *(_freeze(v) for v in value))
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


__all__ += ["compact_target_modules", "invalidate", "preset_name", "preset_paths", "suffix_summary"]


def resolve(
    model: nn.Module, targets: Any = None, layers: Any = None, exclude: Any = None
) -> tuple[str, ...]:
    """The module paths of ``model`` that a target spec selects (what the panel highlights as you type)."""
    from .modelinfo import require_module

    return resolve_targets(index_model(require_module(model)), targets, layers, exclude)


__all__ += ["resolve"]
