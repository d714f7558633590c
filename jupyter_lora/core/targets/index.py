"""The module index: one walk over a model that records every module a LoRA adapter can take (its kind, shape,
parameters and the repeated block it lies in) — and every fused mixture-of-experts weight (a 3-D parameter of an
experts module, which PEFT adapts through ``target_parameters``), the model's task and heads, and its honest
parameter total.
Cached per model until its structure changes.

Whether the cached index still describes the model is checked without walking it (``named_modules`` is slow:
about 1 ms for the 1,645 modules of a 405B-shaped Llama, and more under load). A counter goes up whenever torch
registers a module or a parameter anywhere (``setattr``, ``add_module``, ``register_parameter``: how a user
replaces a layer and how PEFT injects, unloads and merges), through torch's global registration hooks. Changes that
register nothing — a ``del``, a ``ModuleList`` item deleted or inserted, ``model.to(dtype)``, ``to_empty``,
``m.bias = None`` — are caught by comparing flat lists kept from the walk: the number of children of each module
that has some, the identity and dtype of each parameter (weak references: the cache keeps nothing alive); about
0.3 ms for that model. Only when the counter moved are all children and names compared one by one, and the model is
walked again only when something differs."""

from __future__ import annotations

import functools
import inspect
import operator
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from ..adapters.peft_facts import base_layer_of, is_modules_to_save_wrapper, is_tuner_layer
from ..modelinfo import ADAPTER_PARAM, TaskInfo, base_model_of, detect_task, param_count, tied_duplicates

__all__ = [
    "ModelIndex",
    "ModuleInfo",
    "index_is_current",
    "index_model",
    "invalidate",
    "layer_of",
    "unwrapped_modules",
]

_LINEAR_KINDS = ("linear", "conv1d-gpt2", "linear4bit", "linear8bit")


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
    experts: int = 0  # kind "experts": the number of experts in the fused parameter (its first dimension)
    param_shape: tuple[int, ...] = ()  # kind "experts": the parameter's shape as stored (experts, a, b)

    @property
    def is_linear(self) -> bool:
        return self.kind in _LINEAR_KINDS

    @property
    def module_path(self) -> str:
        """The module that holds what is adapted: ``path`` itself, or for fused experts the experts module
        (``…mlp.experts`` for ``…mlp.experts.gate_up_proj``)."""
        return self.path.rsplit(".", 1)[0] if self.kind == "experts" else self.path

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
    # names of fused expert weights that some other parameter also ends with (PEFT's target_parameters matching
    # by name would take that one too)
    clashing_param_names: frozenset[str] = frozenset()
    # A vision-language model's language model (``model.language_model``, ``model.text_model``): the presets adapt
    # only what lies under these paths (see ``language_parts``); empty for every other model.
    language_parts: tuple[str, ...] = ()
    # A dual encoder's vision tower (CLIP's, SigLIP's ``vision_model``): what the ``vision`` preset adapts there;
    # the other presets cover both towers. Empty for every other model.
    vision_parts: tuple[str, ...] = ()
    # Linear layers whose weight the module holding them reads directly and never calls (WavLM's attention hands
    # q/k/v/out_proj.weight to torch's multi_head_attention_forward): path -> that module's class name. A LoRA
    # adapter there would not change the outputs, and merging it would.
    weight_read_directly: dict[str, str] = field(default_factory=dict)
    resolved: dict[Any, tuple[str, ...]] = field(default_factory=dict, repr=False)  # spec -> paths (a cache)
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)  # see ``remember``

    def remember(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, kept with this index under ``key``: for facts that change only with the model's
        structure (what the index's checks see), worked out once instead of on every re-plan."""
        try:
            return self.memo[key]
        except KeyError:
            value = self.memo[key] = compute()
            return value


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


def _expert_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The fused expert weights a module holds itself: 3-D floating parameters (experts × a × b), as transformers'
    MoE blocks keep them (``MixtralExperts.gate_up_proj``). PEFT adapts them with ``target_parameters``. A module
    counts as holding experts when its class says so or its ``num_experts`` is the parameters' first dimension;
    2-D expert biases (gpt-oss ``gate_up_proj_bias``) are not weights and are left out."""
    if not module._parameters:
        return []
    count = getattr(module, "num_experts", None)
    named = "expert" in type(module).__name__.lower()
    return [
        (name, p)
        for name, p in module._parameters.items()
        if p is not None
        and p.ndim == 3
        and p.dtype.is_floating_point
        and (named or (isinstance(count, int) and p.shape[0] == count))
    ]


def _expert_infos(path: str, module: nn.Module, layer_lists: Sequence[str]) -> list[ModuleInfo]:
    """One ``ModuleInfo`` (kind "experts") per fused expert weight of ``module``, with PEFT's in/out features:
    a parameter stored (experts, out, in) unless the module says ``is_transposed`` (then (experts, in, out))."""
    infos = []
    transposed = bool(getattr(module, "is_transposed", False))
    for name, p in _expert_params(module):
        experts, a, b = (int(d) for d in p.shape)
        in_features, out_features = (a, b) if transposed else (b, a)
        infos.append(
            ModuleInfo(
                path=f"{path}.{name}",
                kind="experts",
                type_name=type(module).__name__,
                in_features=in_features,
                out_features=out_features,
                weight_params=param_count(p),
                dtype=str(p.dtype).replace("torch.", ""),
                layer=layer_of(path, layer_lists),
                suffix=name,
                experts=experts,
                param_shape=(experts, a, b),
            )
        )
    return infos


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


def language_parts(model: nn.Module) -> tuple[str, ...]:
    """The paths of a vision-language model's language model: the outermost transformers models inside it built
    from its text config (``config.get_text_config()``). Empty for a model without a ``vision_config``, one whose
    language model is not a module of its own, and a dual encoder (CLIP, SigLIP: its text tower generates no
    text, see ``dual_encoder_parts``)."""
    config = getattr(model, "config", None)
    if getattr(config, "vision_config", None) is None or not hasattr(config, "get_text_config"):
        return ()
    text_type = type(config.get_text_config())
    if text_type is type(config) or not _generates_text(model, config):
        return ()
    from transformers import PreTrainedModel

    return _built_from(model, text_type, PreTrainedModel)


def dual_encoder_parts(model: nn.Module) -> tuple[str, ...]:
    """The vision tower of a dual encoder (a text and a vision tower side by side, no language-model head that
    generates text: CLIP, SigLIP, ALIGN...): the outermost modules built from its ``vision_config``. Empty for
    every other model."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None)
    text = getattr(config, "text_config", None)
    if vision is None or text is None or _generates_text(model, config):
        return ()
    return _built_from(model, type(vision), nn.Module)  # CLIP's vision_model is a plain module with a config


def _generates_text(model: nn.Module, config: object) -> bool:
    """Whether the text side of a model with a ``vision_config`` is a language model that generates text (LLaVA,
    Idefics3 — with or without their head), not a text encoder (CLIP's): the model can generate, or its text
    config is one of transformers' causal language models."""
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate():
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    return getattr(text, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _built_from(model: nn.Module, config_type: type, module_type: type) -> tuple[str, ...]:
    """The outermost modules of ``model`` of ``module_type`` whose ``config`` is a ``config_type``."""
    found: list[str] = []
    for path, module in model.named_modules():
        inner = any(path.startswith(p + ".") for p in found)
        if (
            path
            and not inner
            and isinstance(module, module_type)
            and isinstance(getattr(module, "config", None), config_type)
        ):
            found.append(path)
    return tuple(found)


def layer_of(path: str, layer_lists: Sequence[str]) -> int | None:
    """The index of the repeated block ``path`` lies in (``model.layers.3.mlp`` -> 3), or None outside them."""
    for prefix in layer_lists:
        head = prefix + "." if prefix else ""
        if path.startswith(head):
            rest = path[len(head) :].split(".", 1)[0]
            if rest.isdigit():
                return int(rest)
    return None


# ----------------------------------------------------------------------------------------------- the cache

_generation = 0  # registrations of modules and parameters in this process (any model)


def _registered(*_: Any) -> None:
    """torch's global registration hook: count, and leave the module or parameter as it is (return None).

    Not while torch.compile traces a forward: a forward that builds a module on the fly (Llama slices its layer
    list) would make the counter part of the compiled graph's guards, and every call would recompile. Nothing
    built inside a traced forward is part of the model's tree, so the cache has nothing to notice there."""
    global _generation
    if torch.compiler.is_compiling():
        return
    _generation += 1


_HOOKS = (
    register_module_module_registration_hook(_registered),
    register_module_parameter_registration_hook(_registered),
)


def _ref(obj: Any) -> Callable[[], Any]:
    return weakref.ref(obj) if obj is not None else _none


def _none() -> None:  # the "reference" of a child slot that holds None
    return None


class _Entry:
    """A cached index with the facts that tell whether it still describes its model."""

    __slots__ = (
        "children", "containers", "counts", "dtypes", "generation", "holders", "index", "modules", "names", "params",
    )  # fmt: skip

    def __init__(self, base: nn.Module):
        self.generation = _generation  # before the walk: a registration during it is seen at the next check
        modules = list(base.modules())
        self.modules = [weakref.ref(m) for m in modules]
        self.children = [_ref(c) for m in modules for c in m._modules.values()]
        self.names = [(tuple(m._modules), tuple(m._parameters)) for m in modules]
        # Without a registration, a module can only lose children or parameters (del, ModuleList.__delitem__,
        # `m.bias = None`) or have them replaced in place (ModuleList.insert, Module._apply): only the modules that
        # hold some need watching.
        containers = [m for m in modules if m._modules]
        self.containers = [weakref.ref(m) for m in containers]
        self.counts = [len(m._modules) for m in containers]
        holders = [m for m in modules if m._parameters]
        self.holders = [weakref.ref(m) for m in holders]
        params = _params(holders)
        self.params = [weakref.ref(p) for p in params]
        # torch keeps a parameter object when it changes its dtype (model.half()); off the meta device it makes
        # new ones (to_empty).
        self.dtypes = list(map(_DTYPE, params))
        self.index = _build_index(base)

    def still_valid(self) -> bool:
        """Whether the model is as it was: no walk when nothing was registered since the last check."""
        try:
            if [len(ref()._modules) for ref in self.containers] != self.counts:
                return False
            params = _params([ref() for ref in self.holders])
        except AttributeError:  # a module is gone
            return False
        if len(params) != len(self.params) or not all(map(operator.is_, params, [r() for r in self.params])):
            return False
        if list(map(_DTYPE, params)) != self.dtypes:
            return False
        if self.generation != _generation:  # something was registered somewhere: compare children and names
            generation = _generation
            modules = [ref() for ref in self.modules]
            if any(m is None for m in modules):
                return False
            children = [c for m in modules for c in m._modules.values()]
            if not all(map(operator.is_, children, [r() for r in self.children])):
                return False
            if [(tuple(m._modules), tuple(m._parameters)) for m in modules] != self.names:
                return False
            self.generation = generation
        return True


_DTYPE = operator.attrgetter("dtype")


def _params(modules: list[nn.Module]) -> list[nn.Parameter]:
    # `m.bias = None` sets a registered parameter to None without a registration: it leaves this list.
    return [p for m in modules for p in m._parameters.values() if p is not None]


# Models are indexed once; the entry dies with the model (a weak key).
_CACHE: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


def invalidate(model: nn.Module) -> None:
    """Forget the cached index of ``model`` (call after changing its structure)."""
    _CACHE.pop(model, None)
    _CACHE.pop(base_model_of(model), None)


def index_model(model: nn.Module) -> ModelIndex:
    """Walk ``model`` (or the base under a PEFT wrapper) once and describe what can take LoRA. Cached: later calls
    check that the model is unchanged (see the module's docstring) and walk it again only when it is not."""
    base = base_model_of(model)
    entry = _CACHE.get(base)
    if entry is None or not entry.still_valid():
        entry = _CACHE[base] = _Entry(base)
    return entry.index


def index_is_current(model: nn.Module, index: ModelIndex) -> bool:
    """Whether ``index`` is the cached index of ``model`` and no module or parameter was registered anywhere since
    it was last checked — a constant-time test, to reuse a check made a moment before (a plan's, in the estimate
    of that plan). It does not see the changes that register nothing; ``index_model`` does."""
    entry = _CACHE.get(base_model_of(model))
    return entry is not None and entry.index is index and entry.generation == _generation


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


@functools.lru_cache(maxsize=512)
def _weights_read_not_called(cls: type) -> frozenset[str]:
    """Names of child layers whose ``.weight`` the methods of ``cls`` read (``self.q_proj.weight``) but which they
    never call (``self.q_proj(``), from the class's source (and its bases' outside torch); empty without source."""
    sources = []
    for klass in cls.__mro__:
        if klass.__module__.startswith(("torch.", "builtins")):
            continue
        try:
            sources.append(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
    text = "\n".join(sources)
    read = set(re.findall(r"self\.(\w+)\.weight\b", text))
    return frozenset(name for name in read if not re.search(rf"self\.{name}\s*\(", text))


def _build_index(base: nn.Module) -> ModelIndex:
    layer_lists = _layer_lists(base)
    modules: list[ModuleInfo] = []
    module_types: dict[str, str] = {}
    by_path: dict[str, nn.Module] = {}
    weight_read_directly: dict[str, str] = {}
    for path, module in unwrapped_modules(base):
        module_types[path] = type(module).__name__
        by_path[path] = module
        if not path:
            continue
        kind = _kind(module)
        if kind is None:
            modules.extend(_expert_infos(path, module, layer_lists))
            continue
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        parent_path, _, name = path.rpartition(".")
        parent = by_path.get(parent_path)
        if kind[0] in _LINEAR_KINDS and parent is not None and name in _weights_read_not_called(type(parent)):
            weight_read_directly[path] = type(parent).__name__
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
        parts = info.path.split(".")  # an expert weight lies under its experts module
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
    expert_paths = {m.path for m in modules if m.kind == "experts"}
    expert_names = {m.suffix for m in modules if m.kind == "experts"}
    unwrapped = (re.sub(r"(\.base_layer)+\.", ".", n) for n in seen) if expert_names else ()
    clashing = frozenset(
        n.rsplit(".", 1)[-1]
        for n in unwrapped
        if n.rsplit(".", 1)[-1] in expert_names and n not in expert_paths
    )
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
        clashing_param_names=clashing,
        language_parts=language_parts(base),
        vision_parts=dual_encoder_parts(base),
        weight_read_directly=weight_read_directly,
    )
    return index
