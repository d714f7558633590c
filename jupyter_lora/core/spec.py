"""What to inject: a ``LoraSpec`` built from keyword arguments (or a YAML body) and checked up front against the
declarations in ``jupyter_lora.settings``, so that no operation starts on settings that would fail half-way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..settings import INITS, VARIANTS, LoraSettings, build, canonical
from .errors import UsageError

__all__ = ["INITS", "VARIANTS", "LoraSpec", "make_spec", "spec_with"]


@dataclass(frozen=True)
class LoraSpec(LoraSettings):
    """What to inject (fields and their help: ``jupyter_lora.settings.LoraSettings``). ``alpha=None`` means 2·r;
    ``targets=None`` means PEFT's default for the architecture."""

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
        """A new validated spec with ``changes`` applied (any spelling of a setting)."""
        changes = canonical(changes, tuple(f.name for f in fields(self)), "LoRA setting")
        return make_spec(**{**asdict(self), **changes})


def make_spec(**kwargs: Any) -> LoraSpec:
    """Build a ``LoraSpec`` from keyword arguments, checking every value. Unknown keys get a did-you-mean."""
    return build(LoraSpec, kwargs, "LoRA setting")


def spec_with(spec: Any, settings: Mapping[str, Any]) -> LoraSpec:
    """The spec to use: ``spec`` (a ``LoraSpec`` or None) with ``settings`` applied. Anything else given as
    ``spec`` — text such as ``"r=4"`` or ``"q_proj"``, a dict — is a UsageError that shows the keywords meant."""
    if spec is None:
        return make_spec(**settings)
    if not isinstance(spec, LoraSpec):
        raise UsageError(_not_a_spec(spec))
    return spec.replace(**settings) if settings else spec


# `key=value` / `key: value` items of a text, a value running to the next item (so `targets=q_proj,v_proj` is one).
_ITEM = re.compile(r"([A-Za-z_]\w*)\s*[=:]\s*(.*?)\s*(?=[,;\s]+[A-Za-z_]\w*\s*[=:]|[,;\s]*$)")


def _keyword(key: str, value: str) -> str:
    value = value.strip("\"'")
    try:
        float(value)
    except ValueError:
        return f"{key}={value!r}"
    return f"{key}={value}"


def _not_a_spec(spec: Any) -> str:
    what = "`spec` takes a LoraSpec (jupyter_lora.make_spec(...), or plan.spec)"
    if isinstance(spec, str) and re.search(r"[=:]", spec):
        shown = ", ".join(_keyword(k, v) for k, v in _ITEM.findall(spec)) or "r=16"
        return (
            f"{what}, not text: got {spec!r}. Give settings as keywords: plan(model, {shown}) or "
            f"inject(model, {shown})."
        )
    if isinstance(spec, str):
        return (
            f"{what}, not text: got {spec!r}. To choose the modules to adapt, give targets: "
            f"plan(model, targets={spec!r}) or inject(model, targets={spec!r})."
        )
    if isinstance(spec, Mapping):
        shown = ", ".join(f"{k}={v!r}" for k, v in spec.items()) or "r=16"
        return f"{what}, got a {type(spec).__name__}: {spec!r:.80}. Give settings as keywords: plan(model, {shown})."
    return (
        f"{what}, got {type(spec).__name__}: {spec!r:.80}. Give settings as keywords, e.g. plan(model, r=16)."
    )
