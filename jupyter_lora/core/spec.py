"""Validated LoRA settings: one frozen object built from keyword arguments (or a YAML body), checked up front
so that no operation starts on settings that would fail half-way.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import UsageError, did_you_mean
from .modelinfo import normalize_task_type

__all__ = ["INITS", "VARIANTS", "LoraSpec", "make_spec"]

VARIANTS = ("lora", "dora", "rslora")
# PEFT's init_lora_weights values that need nothing but the model (loftq/eva/corda need data or extra configs).
INITS = ("default", "gaussian", "pissa", "olora", "orthogonal", "mica", "zero")
_NEEDS_EXTRA = {
    "loftq": "LoftQ needs a loftq_config; quantise with `%lora base --4bit` and train on top instead",
    "eva": "EVA initialisation needs a data loader; use init: default (or pissa) here",
    "corda": "CorDA initialisation needs a calibration pass; use init: default (or pissa) here",
}
_BIAS = ("none", "all", "lora_only")


@dataclass(frozen=True)
class LoraSpec:
    """What to inject. ``alpha=None`` means 2·r. ``targets=None`` means PEFT's default for the architecture."""

    r: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    targets: Any = None
    layers: Any = None
    exclude: Any = None
    variant: str = "lora"
    init: str = "default"
    modules_to_save: Any = None
    bias: str = "none"
    task_type: str | None = "auto"

    @property
    def lora_alpha(self) -> float:
        return float(2 * self.r if self.alpha is None else self.alpha)

    @property
    def scaling(self) -> float:
        """The factor PEFT multiplies B·A by: alpha/r, or alpha/sqrt(r) for rsLoRA."""
        if self.variant == "rslora":
            return self.lora_alpha / math.sqrt(self.r)
        return self.lora_alpha / self.r

    def replace(self, **changes: Any) -> LoraSpec:
        """A new validated spec with ``changes`` applied."""
        return make_spec(**{**asdict(self), **changes})

    def structural_key(self) -> tuple:
        """The part of the spec that decides *which* modules are adapted (not r/alpha/dropout/variant)."""
        return (repr(self.targets), repr(self.layers), repr(self.exclude))


_FIELDS = tuple(f.name for f in fields(LoraSpec))
_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "target": "targets",
    "layers_to_transform": "layers",
    "exclude_modules": "exclude",
    "init_lora_weights": "init",
    "task": "task_type",
}


def make_spec(**kwargs: Any) -> LoraSpec:
    """Build a ``LoraSpec`` from keyword arguments, checking every value. Unknown keys get a did-you-mean."""
    values: dict[str, Any] = {}
    for key, value in kwargs.items():
        name = _ALIASES.get(key, key)
        if name not in _FIELDS:
            raise UsageError(
                f"Unknown LoRA setting `{key}`.{did_you_mean(key, _FIELDS + tuple(_ALIASES))} "
                f"Settings: {', '.join(_FIELDS)}."
            )
        if name in values and values[name] != value:
            raise UsageError(
                f"`{name}` was given twice with different values: {values[name]!r} and {value!r} (as `{key}`); "
                "keep one."
            )
        values[name] = value
    spec = LoraSpec(**values)
    return _validate(spec)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _validate(spec: LoraSpec) -> LoraSpec:
    r = spec.r
    if isinstance(r, float) and r.is_integer():
        r = int(r)
    if not _is_int(r):
        raise UsageError(
            f"`r` must be a whole number like 8 or 16, got {spec.r!r} ({type(spec.r).__name__})."
        )
    if r <= 0:
        raise UsageError(f"`r` must be at least 1, got {r}. Typical ranks are 4, 8, 16, 32, 64.")
    alpha = spec.alpha
    if isinstance(alpha, str) and alpha.strip().lower().replace(" ", "") in ("2r", "2*r"):
        alpha = None
    if alpha is not None:
        if not _is_number(alpha):
            raise UsageError(
                f"`alpha` must be a number (or omitted for 2·r), got {alpha!r} ({type(alpha).__name__})."
            )
        if not alpha > 0 or not math.isfinite(alpha):
            raise UsageError(f"`alpha` must be positive, got {alpha}. A common choice is 2·r = {2 * r}.")
    dropout = spec.dropout
    if not _is_number(dropout):
        raise UsageError(f"`dropout` must be a number in [0, 1), got {dropout!r} ({type(dropout).__name__}).")
    if not 0 <= dropout < 1:
        raise UsageError(f"`dropout` must be in [0, 1), got {dropout}. Typical values are 0, 0.05 or 0.1.")
    variant = str(spec.variant).strip().lower()
    if variant not in VARIANTS:
        raise UsageError(
            f"`variant` must be one of {', '.join(VARIANTS)}, got {spec.variant!r}.{did_you_mean(variant, VARIANTS)}"
        )
    init = spec.init
    if init is True:
        init = "default"
    elif init is False:
        init = "zero"
    init = str(init).strip().lower()
    if init in _NEEDS_EXTRA:
        raise UsageError(f"`init` {spec.init!r} is not available here: {_NEEDS_EXTRA[init]}.")
    if init not in INITS and not init.startswith("pissa_niter_"):
        raise UsageError(
            f"`init` must be one of {', '.join(INITS)} (or pissa_niter_N), got {spec.init!r}."
            f"{did_you_mean(init, INITS)}"
        )
    bias = str(spec.bias).strip().lower()
    if bias not in _BIAS:
        raise UsageError(
            f"`bias` must be one of {', '.join(_BIAS)}, got {spec.bias!r}.{did_you_mean(bias, _BIAS)}"
        )
    task_type = spec.task_type
    if not (isinstance(task_type, str) and task_type.lower() == "auto"):
        task_type = normalize_task_type(task_type)
    return replace(
        spec,
        r=int(r),
        alpha=None if alpha is None else float(alpha),
        dropout=float(dropout),
        variant=variant,
        init=init,
        bias=bias,
        task_type=task_type,
    )
