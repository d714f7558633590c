"""What an injection would do, without doing it: the modules, the parameter counts PEFT will report, the bytes the
saved adapter will take. Works on meta-device models. Re-planning with new r/alpha/dropout/variant reuses the cached
module index, the target resolution and, per resolved target set, the shapes the counts and the file size need
(``_Targets``, ``_Layout``), so it follows a slider on a 405B-shaped model without walking it.
"""

from __future__ import annotations

import functools
import json
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from .adapters.peft_facts import base_layer_of, is_modules_to_save_wrapper, registered_wrapper
from .errors import UsageError, did_you_mean
from .modelinfo import (
    ADAPTER_PARAM,
    base_model_of,
    embedding_layers,
    fingerprint,
    is_peft_model,
    param_count,
    require_module,
    wrapper_fits,
)
from .spec import LoraSpec, spec_with
from .targets import (
    ModelIndex,
    compact_target_modules,
    compact_target_parameters,
    experts_note,
    index_model,
    resolve_targets,
    selection_key,
    spec_key,
)

__all__ = ["Plan", "PlanGroup", "PlanRow", "adapter_param_names", "check_adapter_name", "plan"]

# The names PEFT itself adds to modules_to_save for a task type (PeftModelFor... constructors).
_PEFT_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
_DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1}
_SAFETENSORS_DTYPE = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass(frozen=True)
class PlanRow:
    """One module in a plan. ``params`` are the trainable parameters it adds (LoRA A+B, DoRA magnitude, bias)
    or, for a ``modules_to_save`` row, the size of the trained copy. A fused mixture-of-experts weight (kind
    "experts", ``path`` ending in the parameter's name) has ``experts`` low-rank pairs, one per expert, of
    ``in_features``→``out_features`` each; ``shape`` is the weight as stored (experts, a, b)."""

    path: str
    kind: str
    in_features: int
    out_features: int
    params: int
    role: str = "lora"  # lora | modules_to_save
    layer: int | None = None
    magnitude: int = 0
    dtype: str = "float32"
    experts: int = 0
    shape: tuple[int, ...] = ()

    @property
    def group(self) -> str:
        return self.path.rsplit(".", 1)[-1] if self.role == "lora" else self.path

    @property
    def module_path(self) -> str:
        """The module that receives the adapter (for a fused expert weight, its experts module)."""
        return self.path.rsplit(".", 1)[0] if self.kind == "experts" else self.path


@dataclass(frozen=True)
class PlanGroup:
    """Rows with the same module name and shape, for the per-target table."""

    name: str
    kind: str
    count: int
    in_features: int
    out_features: int
    params: int
    role: str
    experts: int = 0
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What ``inject`` would do with these settings (nothing is changed by making a plan).

    ``total_params`` counts the model after injection: with the other adapters it already holds
    (``other_adapters``, ``other_adapter_params`` parameters), unless the plan ``removes_others``. A plan
    remembers the model it was made for and the model's structure then, so that ``inject(model, plan=p)`` applies
    it only to that model, unchanged.
    """

    spec: LoraSpec
    name: str
    task_type: str | None
    modules: tuple[PlanRow, ...]
    modules_to_save: tuple[str, ...]
    target_modules: tuple[str, ...]
    trainable_params: int
    total_params: int
    base_params: int
    adapter_params: int
    adapter_bytes: int
    model_type: str | None = None
    is_meta: bool = False
    replaces: bool = False
    num_layers: int = 0
    other_adapters: tuple[str, ...] = ()
    other_adapter_params: int = 0
    removes_others: bool = False
    # fused mixture-of-experts weights, given to PEFT as ``target_parameters`` (``target_modules`` holds the rest)
    target_parameters: tuple[str, ...] = ()
    # why the fused experts are left out, when a linear preset was used on a model that has them (else "")
    experts_note: str = ""
    fingerprint: int = field(default=0, compare=False, repr=False)
    base_ref: Callable[[], nn.Module | None] | None = field(default=None, compare=False, repr=False)
    # The module index the plan was made from (an estimate of the plan reuses it while it is current).
    index: ModelIndex | None = field(default=None, compare=False, repr=False)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    @functools.cached_property
    def targets(self) -> tuple[str, ...]:
        """Paths of the modules that receive LoRA."""
        return tuple(r.path for r in self.modules if r.role == "lora")

    def groups(self) -> list[PlanGroup]:
        """Rows grouped by module name and shape (``q_proj ×32 4096→4096``)."""
        groups: OrderedDict[tuple, list[PlanRow]] = OrderedDict()
        for row in self.modules:
            key = (row.group, row.kind, row.in_features, row.out_features, row.role, row.experts, row.shape)
            groups.setdefault(key, []).append(row)
        return [
            PlanGroup(
                name=k[0],
                kind=k[1],
                count=len(rows),
                in_features=k[2],
                out_features=k[3],
                params=sum(r.params for r in rows),
                role=k[4],
                experts=k[5],
                shape=k[6],
            )
            for k, rows in groups.items()
        ]

    def to_peft_config(self):
        """The ``peft.LoraConfig`` that injects exactly this plan."""
        from peft import LoraConfig

        init: Any = {"default": True, "zero": False}.get(self.spec.init, self.spec.init)
        parameters = {"target_parameters": list(self.target_parameters)} if self.target_parameters else {}
        return LoraConfig(
            r=self.spec.r,
            lora_alpha=self.spec.lora_alpha,
            lora_dropout=self.spec.dropout,
            **self._targets_for_peft(),
            **parameters,
            modules_to_save=list(self.modules_to_save) or None,
            bias=self.spec.bias,
            use_dora=self.spec.variant == "dora",
            use_rslora=self.spec.variant == "rslora",
            init_lora_weights=init,
            task_type=self.task_type,
            # GPT-2 style Conv1D stores its weight transposed; PEFT needs to be told.
            fan_in_fan_out=any(r.kind == "conv1d-gpt2" for r in self.modules),
        )

    def _targets_for_peft(self) -> dict[str, Any]:
        """``target_modules`` as PEFT stores it: the module paths, or — for a plan limited to some layers — the
        module names with PEFT's ``layers_to_transform``/``layers_pattern``, when those select exactly the same
        modules (checked with PEFT's own matching), so the saved config reads as a user would write it."""
        explicit = {"target_modules": list(self.target_modules)}
        base = self.base_ref() if self.base_ref is not None else None
        rows = [r for r in self.modules if r.role == "lora" and r.kind != "experts"]
        layers = sorted({r.layer for r in rows if r.layer is not None})
        if base is None or not layers or any(r.layer is None for r in rows):
            return explicit
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists

        from .targets import index_model

        lists = index_model(base).layer_lists
        if len(lists) != 1 or len(layers) == (self.num_layers or 0):
            return explicit
        compact = {
            "target_modules": sorted({p.rsplit(".", 1)[-1] for p in self.target_modules}),
            "layers_to_transform": layers,
            "layers_pattern": lists[0].rsplit(".", 1)[-1],
        }
        probe = LoraConfig(**compact)
        chosen = {
            name for name, _ in base.named_modules() if name and check_target_module_exists(probe, name)
        }
        return compact if chosen == set(self.target_modules) else explicit

    def check_applies_to(self, model: nn.Module) -> None:
        """Raise a ``UsageError`` unless ``model`` is the model this plan was made for, unchanged since (the same
        modules, parameter shapes and adapters). ``model`` is the PeftModel when the base has one."""
        base = self.base_ref() if self.base_ref is not None else None
        if base is None or base is not base_model_of(model):
            raise UsageError(
                "`plan` was made for another model. Make the plan from this model: "
                "p = jupyter_lora.plan(model, ...), then jupyter_lora.inject(model, plan=p)."
            )
        if fingerprint(model) != self.fingerprint:
            raise UsageError(
                "`plan` no longer describes this model: its modules or adapters changed after the plan was made "
                "(another inject, load, merge or delete?). Make the plan again: p = jupyter_lora.plan(model, ...)."
            )

    def __repr__(self) -> str:
        variant = "" if self.spec.variant == "lora" else f" {self.spec.variant}"
        return (
            f"Plan(LoRA{variant} {self.name!r}: r={self.spec.r} on {len(self.targets)} modules, trainable "
            f"{self.trainable_params:,} of {self.total_params:,})"
        )


def adapter_param_names(model: nn.Module) -> dict[str, set[str]]:
    """``{adapter name: {parameter names}}`` of the PEFT adapter weights in ``model``."""
    out: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        m = ADAPTER_PARAM.search(name)
        if m:
            out.setdefault(m.group(2), set()).add(name)
    return out


def _adapter_dtype(dtype: str) -> str:
    # PEFT creates LoRA weights in the base layer's float dtype and then (autocast_adapter_dtype=True, its
    # default) upcasts fp16/bf16 ones to fp32; quantised bases keep the fp32 they were created in.
    return dtype if dtype in ("float32", "float64") else "float32"


class _Targets:
    """The modules a target spec selected, with what a plan for any r or variant needs from them: the row of each
    module less its r-dependent counts, and the sums those counts come from. Kept on the index per selection."""

    def __init__(self, index: ModelIndex, paths: tuple[str, ...]):
        infos = [index.by_path[p] for p in paths]
        self.paths = paths
        self.infos = infos
        self.rows = [
            {"path": i.path, "kind": i.kind, "in_features": i.in_features, "out_features": i.out_features,
             "role": "lora", "layer": i.layer, "dtype": _adapter_dtype(i.dtype), "experts": i.experts,
             "shape": i.param_shape}
            for i in infos
        ]  # fmt: skip
        # A module's LoRA parameters: r·per_r + out·(r // groups) for a conv (lora_B is grouped), + out for DoRA.
        # A fused expert weight gets one pair per expert: PEFT's lora_A is (r·experts)×in, lora_B out×(r·experts).
        conv = [i.kind in ("conv1d", "conv2d", "conv3d") for i in infos]
        self.per_r = [
            i.in_features * i.kernel if c else (i.in_features + i.out_features) * max(1, i.experts)
            for i, c in zip(infos, conv, strict=True)
        ]
        self.experts = [i for i in infos if i.kind == "experts"]
        self.groups = [i.groups if c else 0 for i, c in zip(infos, conv, strict=True)]
        self.outs = [i.out_features for i in infos]
        self.per_r_total = sum(self.per_r)
        self.out_total = sum(self.outs)
        self.grouped_outs: dict[int, int] = {}  # groups -> the out_features of the convs with those groups
        for g, o in zip(self.groups, self.outs, strict=True):
            if g:
                self.grouped_outs[g] = self.grouped_outs.get(g, 0) + o
        self.smallest = min((min(i.in_features, i.out_features) for i in infos), default=0)

    def check(self, spec: LoraSpec) -> None:
        if self.experts:
            _check_experts_spec(spec, self.experts[0])
        if spec.init != "mica" or spec.r <= self.smallest:
            return
        info = next(i for i in self.infos if spec.r > min(i.in_features, i.out_features))
        smallest = min(info.in_features, info.out_features)
        raise UsageError(
            f"`r` {spec.r} is larger than the smallest dimension of `{info.path}` ({info.in_features}→{info.out_features}); "
            f"init: mica needs r ≤ {smallest} there. Use r: {smallest} or less, or another init."
        )

    def lora_params(self, spec: LoraSpec) -> int:
        """The LoRA parameters of all the modules (A, B, DoRA magnitudes), from the sums: no loop over modules."""
        r = spec.r
        total = r * self.per_r_total + sum((r // g) * outs for g, outs in self.grouped_outs.items())
        return total + (self.out_total if spec.variant == "dora" else 0)

    def plan_rows(self, spec: LoraSpec) -> list[PlanRow]:
        r, dora = spec.r, spec.variant == "dora"
        rows = []
        for fixed, per_r, groups, out in zip(self.rows, self.per_r, self.groups, self.outs, strict=True):
            magnitude = out if dora else 0
            params = r * per_r + (out * (r // groups) if groups else 0) + magnitude
            rows.append(_row(fixed, params, magnitude))
        return rows


# What PEFT's LoRA on a fused expert weight (``ParamWrapper``) supports: it rebuilds the weight as W + ΔW, so there
# is no input to drop out, no DoRA magnitude, and only initialisations that need no base ``.weight``.
_EXPERT_INITS = ("default", "gaussian", "zero")


def _check_experts_spec(spec: LoraSpec, info: Any) -> None:
    """Refuse, before PEFT would fail half-way, the settings PEFT cannot apply to fused expert weights."""
    where = f"fused MoE expert weights (`{info.path}` …)"
    fix = "or leave the experts out of `targets`."
    if spec.dropout:
        raise UsageError(
            f"`dropout` {spec.dropout:g} cannot apply to {where}: PEFT adapts them as W + ΔW, with no input to "
            f"drop out. Use dropout: 0, {fix}"
        )
    if spec.variant == "dora":
        raise UsageError(
            f"`variant` dora cannot apply to {where}: PEFT has no DoRA for them. Use lora or rslora, {fix}"
        )
    if spec.init not in _EXPERT_INITS:
        raise UsageError(
            f"`init` {spec.init} cannot apply to {where}: PEFT initialises them only as "
            f"{', '.join(_EXPERT_INITS)}. Use one of those, {fix}"
        )


_new = object.__new__


def _row(fixed: dict[str, Any], params: int, magnitude: int) -> PlanRow:
    # Filled the way copy and pickle fill an instance: PlanRow's generated __init__ sets each of its nine fields
    # through object.__setattr__ (it is frozen), which made this loop 4-6× slower — over 1 ms of each re-plan of a
    # 405B-shaped model's 882 targets.
    row = _new(PlanRow)
    values = row.__dict__
    values.update(fixed)
    values["params"] = params
    values["magnitude"] = magnitude
    return row


def _resolve_modules_to_save(
    index: ModelIndex, spec: LoraSpec, task_type: str | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names for PEFT's modules_to_save, module paths they wrap) — matched the way PEFT matches them
    (``path.endswith(name)``), outermost module only. Kept on the index per setting."""
    key = ("modules_to_save", spec_key(spec.modules_to_save), spec.task_type, task_type)
    return index.remember(key, lambda: _match_modules_to_save(index, spec, task_type))


def _match_modules_to_save(
    index: ModelIndex, spec: LoraSpec, task_type: str | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    names: list[str] = []
    user = []
    if spec.modules_to_save is not None:
        from .targets import split_spec

        user = list(split_spec(spec.modules_to_save, "modules_to_save"))
    names.extend(user)
    heads = list(index.task.heads) if spec.task_type == "auto" or task_type == index.task.task_type else []
    for head in heads:
        if head not in names:
            names.append(head)
    auto = list(_PEFT_TASK_HEADS.get(task_type or "", ()))
    paths = [p for p in index.module_types if p]
    wrapped: list[str] = []
    for name in names + auto:
        hits = [p for p in paths if p.endswith(name)]
        if not hits and name in user:
            raise UsageError(
                f"`modules_to_save` {name!r} matches no module of this model."
                f"{did_you_mean(name.rsplit('.', 1)[-1], [p.rsplit('.', 1)[-1] for p in paths])} "
                "Name a module to train fully, e.g. the classifier head."
            )
        for p in hits:
            if not any(p == w or p.startswith(w + ".") for w in wrapped):
                wrapped = [w for w in wrapped if not w.startswith(p + ".")]
                wrapped.append(p)
    order = {p: i for i, p in enumerate(paths)}
    wrapped.sort(key=order.__getitem__)
    return tuple(names), tuple(wrapped)


def _safetensors_size(entries: list[tuple[str, str, tuple[int, ...]]]) -> int:
    """Bytes of a safetensors file holding ``(key, dtype, shape)`` tensors: 8-byte length, JSON header padded to
    8 bytes, then the data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in sorted(entries, key=lambda e: (-_DTYPE_BYTES[e[1]], e[0])):
        n = 1
        for d in shape:
            n *= d
        size = n * _DTYPE_BYTES[dtype]
        header[key] = {
            "dtype": _SAFETENSORS_DTYPE.get(dtype, dtype.upper()),
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    length = len(text.encode())
    length += (8 - length % 8) % 8
    return 8 + length + offset


_POWERS_OF_TEN = np.array([10**k for k in range(1, 19)], dtype=np.int64)


def _digits(values: np.ndarray) -> int:
    """The total number of decimal digits of non-negative integers."""
    return int(np.searchsorted(_POWERS_OF_TEN, values, side="right").sum()) + len(values)


@dataclass(frozen=True)
class _RankTimes:
    """A dimension of ``r · n`` in a layout entry's shape (a fused expert weight's ``r · experts``)."""

    n: int


class _Layout:
    """``_safetensors_size`` for entries whose shapes hold r, for any r, without writing the header. A dimension
    ``-g`` in a shape stands for ``r // g`` (``-1``: r), a ``_RankTimes(n)`` for ``r · n``. The order of the tensors
    does not depend on r, so the header is the same text but for the digits of the r-dependent dimensions and of
    the data offsets; those are counted with numpy."""

    def __init__(self, entries: Sequence[tuple[str, str, tuple[Any, ...]]]):
        ordered = sorted(entries, key=lambda e: (-_DTYPE_BYTES[e[1]], e[0]))
        coef, div, mul = [], [], []
        fixed = len('{"__metadata__":{"format":"pt"}}')
        for key, dtype, shape in ordered:
            held = [(d.n, 1) if isinstance(d, _RankTimes) else (1, -d) for d in shape if _holds_r(d)]
            assert len(held) <= 1, shape
            n = _DTYPE_BYTES[dtype]
            for d in shape:
                n *= 1 if _holds_r(d) else d
            coef.append(n)
            mul.append(held[0][0] if held else 1)
            div.append(held[0][1] if held else 0)
            dims = ",".join("" if _holds_r(d) else str(d) for d in shape)  # r's digits are added per r
            st = _SAFETENSORS_DTYPE.get(dtype, dtype.upper())
            fixed += len(f',{json.dumps(key)}:{{"dtype":"{st}","shape":[{dims}],"data_offsets":[,]}}')
        self.fixed = fixed
        self.coef = np.array(coef, dtype=np.int64)
        self.mul = np.array(mul, dtype=np.int64)
        self.div = np.array(div, dtype=np.int64)
        self.holds_r = self.div > 0

    def size(self, r: int) -> int:
        """Bytes of the file for rank ``r``: equal to ``_safetensors_size`` of the entries with r filled in."""
        if not len(self.coef):
            return _safetensors_size([])
        dims = np.where(self.holds_r, (r * self.mul) // np.maximum(self.div, 1), 1)
        sizes = self.coef * dims
        ends = np.cumsum(sizes)
        length = self.fixed + _digits(ends - sizes) + _digits(ends) + _digits(dims[self.holds_r])
        length += (8 - length % 8) % 8
        return 8 + length + int(ends[-1])


def _holds_r(d: Any) -> bool:
    return isinstance(d, _RankTimes) or d < 0


def _expert_prefixes(infos: Sequence[Any]) -> dict[str, str]:
    """Where PEFT puts the LoRA tensors of each targeted fused expert weight. PEFT wraps the experts module once per
    targeted weight, in the order the module holds its parameters, each wrapper around the one before (the
    module's path, then ``.base_layer`` inside it): the weight wrapped last sits at the module's path, the one
    before it one ``.base_layer`` deeper, and so on."""
    by_owner: dict[str, list[Any]] = {}
    for info in infos:
        if info.kind == "experts":
            by_owner.setdefault(info.module_path, []).append(info)
    prefixes = {}
    for owner, chosen in by_owner.items():  # the index lists a module's weights in the module's order
        for depth, info in enumerate(reversed(chosen)):
            prefixes[info.path] = f"base_model.model.{owner}{'.base_layer' * depth}."
    return prefixes


def _adapter_entries(targets: _Targets, dora: bool) -> list[tuple[str, str, tuple[Any, ...]]]:
    """The LoRA tensors of the saved adapter, with -1 / -groups standing for r / r // groups in their shapes and
    ``_RankTimes(experts)`` for a fused expert weight's r · experts."""
    entries: list[tuple[str, str, tuple[Any, ...]]] = []
    expert_prefixes = _expert_prefixes(targets.infos)
    for info, row in zip(targets.infos, targets.rows, strict=True):
        prefix, dtype = f"base_model.model.{info.path}.", row["dtype"]
        conv = info.kind in ("conv1d", "conv2d", "conv3d")
        if info.kind == "experts":
            prefix, rank = expert_prefixes[info.path], _RankTimes(info.experts)
            entries.append((prefix + "lora_A.weight", dtype, (rank, info.in_features)))
            entries.append((prefix + "lora_B.weight", dtype, (info.out_features, rank)))
            continue
        if info.kind == "embedding":
            entries.append((prefix + "lora_embedding_A", dtype, (-1, info.in_features)))
            entries.append((prefix + "lora_embedding_B", dtype, (info.out_features, -1)))
        elif conv:
            ones = (1,) * len(info.kernel_size)
            entries.append((prefix + "lora_A.weight", dtype, (-1, info.in_features, *info.kernel_size)))
            entries.append((prefix + "lora_B.weight", dtype, (info.out_features, -info.groups, *ones)))
        else:
            entries.append((prefix + "lora_A.weight", dtype, (-1, info.in_features)))
            entries.append((prefix + "lora_B.weight", dtype, (info.out_features, -1)))
        if dora:
            shape = (1, info.out_features, *(1,) * len(info.kernel_size)) if conv else (info.out_features,)
            entries.append((prefix + "lora_magnitude_vector", dtype, shape))
    return entries


def plan(
    model: nn.Module,
    spec: LoraSpec | None = None,
    *,
    name: str = "default",
    replace: bool = False,
    **settings: Any,
) -> Plan:
    """Describe what ``inject(model, name=name, replace=replace, **settings)`` would do. Touches nothing.

    ``settings`` are the LoRA settings (r, alpha, dropout, targets, layers, exclude, variant, init,
    modules_to_save, bias, task_type); or pass a ready ``LoraSpec`` as ``spec``. ``replace=True``: the other
    adapters the model holds are removed, so the counts are those of the model with this adapter alone.
    """
    if not isinstance(replace, bool):
        raise UsageError(f"`replace` must be True or False, got {replace!r}.")
    require_module(model)
    spec = spec_with(spec, settings)
    check_adapter_name(name)
    wrapper = registered_wrapper(model)
    if wrapper is not None:  # a base adapted earlier is planned through its wrapper, as inject does
        model = wrapper
    index = index_model(model)
    task_type = index.task.task_type if spec.task_type == "auto" else spec.task_type
    if task_type is not None and spec.task_type != "auto" and not wrapper_fits(model, task_type):
        main = index.task.main_input
        raise UsageError(
            f"`task_type` {task_type} does not fit this model: PEFT's {task_type} wrapper hands the model "
            f"input_ids, and {type(base_model_of(model)).__name__} reads `{main}`. Leave task_type: auto (the plain "
            "PeftModel, which passes the model's own inputs through)."
        )
    paths = resolve_targets(index, spec.targets, spec.layers, spec.exclude)
    expert_paths = [p for p in paths if index.by_path[p].kind == "experts"]
    module_paths = [p for p in paths if index.by_path[p].kind != "experts"] if expert_paths else paths
    save_names, save_paths = _resolve_modules_to_save(index, spec, task_type)
    conflict = (
        [p for p in paths if any(p == s or p.startswith(s + ".") for s in save_paths)] if save_paths else []
    )
    if conflict:
        raise UsageError(
            f"`{conflict[0]}` is both a LoRA target and inside `modules_to_save` ({', '.join(save_paths)}); a module "
            "is either adapted with LoRA or trained fully. Remove it from one of them (e.g. `exclude`)."
        )

    # What is kept per selection is keyed by the spec that selected it (the key of the resolution cache).
    selection = selection_key(spec.targets, spec.layers, spec.exclude)
    targets = _per_selection(index, ("targets", selection), lambda: _Targets(index, paths))
    targets.check(spec)
    rows = targets.plan_rows(spec)
    adapter_params = targets.lora_params(spec)
    base = base_model_of(model)
    layout, bias_trainable = _per_selection(
        index,
        ("layout", selection, spec.variant == "dora", save_paths, spec.bias),
        lambda: _layout(index, base, targets, spec, save_paths),
    )

    trainable = adapter_params
    extra_total = adapter_params
    for path in save_paths:
        n = _module_size(index, base, path)
        rows.append(
            PlanRow(
                path=path,
                kind=index.module_types[path],
                in_features=0,
                out_features=0,
                params=n,
                role="modules_to_save",
                layer=None,
                dtype="float32",
            )
        )
        trainable += n
        extra_total += n
    trainable += bias_trainable

    other_names, others, replaces = index.remember(
        ("other adapters", id(model), _adapter_names(model), name), lambda: _other_adapters(model, name)
    )
    total = index.base_params + (0 if replace else others) + extra_total
    return Plan(
        spec=spec,
        name=name,
        task_type=task_type,
        modules=tuple(rows),
        modules_to_save=save_names,
        target_modules=tuple(
            _per_selection(index, ("compact", selection), lambda: compact_target_modules(index, module_paths))
        ),
        target_parameters=tuple(
            _per_selection(
                index,
                ("compact parameters", selection),
                lambda: compact_target_parameters(index, expert_paths),
            )
        ),
        experts_note=_per_selection(
            index, ("experts note", selection), lambda: experts_note(index, spec.targets, paths)
        ),
        trainable_params=trainable,
        total_params=total,
        base_params=index.base_params,
        adapter_params=adapter_params,
        adapter_bytes=layout.size(spec.r),
        model_type=index.model_type,
        is_meta=index.is_meta,
        replaces=replaces,
        num_layers=index.num_layers,
        other_adapters=other_names,
        other_adapter_params=others,
        removes_others=replace and bool(other_names),
        fingerprint=index.remember(
            ("fingerprint", id(model), _adapter_names(model)), lambda: fingerprint(model)
        ),
        base_ref=weakref.ref(base),
        index=index,
    )


_SELECTIONS_KEPT = 64  # per index: a few hundred KB each on a 405B-shaped model, for the specs used last


def _per_selection(index: ModelIndex, key: Any, compute: Callable[[], Any]) -> Any:
    """``index.remember`` for what is kept per target selection, the least recently used dropped beyond a bound
    (each spec typed into the panel is a selection)."""
    kept: OrderedDict[Any, Any] = index.remember("per selection", OrderedDict)
    if key in kept:
        kept.move_to_end(key)
        return kept[key]
    value = kept[key] = compute()
    if len(kept) > _SELECTIONS_KEPT:
        kept.popitem(last=False)
    return value


def _adapter_names(model: nn.Module) -> tuple[str, ...]:
    """The adapters a PeftModel is configured with (they are part of what a plan of it depends on)."""
    return tuple(getattr(model, "peft_config", None) or ()) if is_peft_model(model) else ()


def _layout(
    index: ModelIndex, base: nn.Module, targets: _Targets, spec: LoraSpec, save_paths: tuple[str, ...]
) -> tuple[_Layout, int]:
    """The saved file's layout for these targets (any r), and the bias parameters that become trainable."""
    entries = _adapter_entries(targets, spec.variant == "dora")
    entries.extend(_saved_embedding_entries(base, targets.paths))
    for path in save_paths:
        for pname, p in _module_params(base, path):
            entries.append(
                (f"base_model.model.{path}.{pname}", str(p.dtype).replace("torch.", ""), tuple(p.shape))
            )
    bias_trainable, bias_entries = _bias_params(base, spec, targets.paths, save_paths)
    entries.extend(bias_entries)
    return _Layout(entries), bias_trainable


def check_adapter_name(name: Any) -> None:
    """Raise a ``UsageError`` unless ``name`` is usable as an adapter name: letters, digits, _ or -, and not a
    name torch's ``ModuleDict`` / ``ParameterDict`` already use (PEFT keeps each layer's adapters in those, keyed
    by the adapter name, so ``train``, ``to`` or ``keys`` fail half-way through an injection)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name or ""):
        raise UsageError(
            f"`name` must be a short adapter name of letters, digits, _ or -, got {name!r}. E.g. name: chat."
        )
    if any(hasattr(kind(), name) for kind in (nn.ModuleDict, nn.ParameterDict)):
        raise UsageError(
            f"`name` {name!r} cannot name an adapter: PEFT keeps each layer's adapters in a torch ModuleDict keyed "
            f"by name, where `{name}` is already a method or attribute. Choose another, e.g. name: {name}_lora."
        )


def _module_params(base: nn.Module, path: str):
    module = base.get_submodule(path)
    if is_modules_to_save_wrapper(module):
        module = module.original_module
    return list(module.named_parameters())


def _module_size(index: ModelIndex, base: nn.Module, path: str) -> int:
    """Parameters of the module at ``path`` (cached on the index)."""
    if path not in index.module_params:
        index.module_params[path] = sum(param_count(p) for _, p in _module_params(base, path))
    return index.module_params[path]


def _saved_embedding_entries(base: nn.Module, paths) -> list[tuple[str, str, tuple[int, ...]]]:
    """PEFT's save (save_embedding_layers="auto") also writes the full input/output embedding matrices when a
    module named embed_tokens or lm_head is adapted — often the largest part of such an adapter file."""
    if not any(p.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head") for p in paths):
        return []
    wanted = {id(base_layer_of(layer)) for layer in embedding_layers(base) if layer is not None}
    entries = []
    for path in paths:
        module = base.get_submodule(path)
        module = base_layer_of(module)
        if id(module) in wanted:
            w = module.weight
            entries.append(
                (
                    f"base_model.model.{path}.base_layer.weight",
                    str(w.dtype).replace("torch.", ""),
                    tuple(w.shape),
                )
            )
    return entries


def _bias_params(base: nn.Module, spec: LoraSpec, paths, save_paths):
    """Bias parameters that become trainable: PEFT's bias="all" frees every parameter named ``*.bias`` outside
    the modules_to_save (their copies are trained instead), "lora_only" the biases of the adapted modules."""
    if spec.bias == "none":
        return 0, []
    targets = set(paths)
    params = []
    for name, p in base.named_parameters():
        if not name.endswith(".bias") or ADAPTER_PARAM.search(name):
            continue
        module_path = name[: -len(".bias")]
        if spec.bias == "lora_only" and module_path not in targets:
            continue
        if any(module_path == s or module_path.startswith(s + ".") for s in save_paths):
            continue
        params.append((name, p, module_path in targets))
    # An adapted module's own weights live under `<path>.base_layer.` in the saved state dict.
    entries = [
        (f"base_model.model.{n[:-5]}.base_layer.bias" if wrapped else f"base_model.model.{n}",
         str(p.dtype).replace("torch.", ""), tuple(p.shape))
        for n, p, wrapped in params
    ]  # fmt: skip
    return sum(p.numel() for _, p, _ in params), entries


def _other_adapters(model: nn.Module, name: str) -> tuple[tuple[str, ...], int, bool]:
    """The adapters other than ``name`` already in ``model``, their parameters, and whether ``name`` exists."""
    if not is_peft_model(model):
        return (), 0, False
    names = adapter_param_names(model)
    params = dict(model.named_parameters())
    others = sum(param_count(params[n]) for adapter, ns in names.items() if adapter != name for n in ns)
    configured = getattr(model, "peft_config", {})
    return tuple(n for n in configured if n != name), others, name in configured
