"""What to inject: a ``LoraSpec`` built from keyword arguments (or a YAML body) and checked up front against the
declarations in ``jupyter_lora.settings``, so that no operation starts on settings that would fail half-way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..settings import INITS, VARIANTS, LoraSettings, build, canonical

__all__ = ["INITS", "VARIANTS", "LoraSpec", "make_spec"]


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
