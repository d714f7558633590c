"""Which modules of a model can take a LoRA adapter, and which ones a target spec selects.

Spellings (the same in the magic, the panel and the Python API), comma-separated or as a list:

* a module name or dotted suffix — ``q_proj``, ``self_attn.o_proj`` (PEFT's own rule: the path equals it or
  ends with ``.`` + it);
* a glob — ``*.attn.c_attn``, ``layers.1?.mlp.*``;
* a regular expression — ``re:.*\\.(q|v)_proj`` (matched against the whole path, as PEFT does);
* a preset — ``attention``, ``mlp``, ``all-linear``, ``qv`` (PEFT's per-architecture default, usually the
  query and value projections), or ``experts`` (every fused mixture-of-experts weight); on a vision-language model
  the linear presets adapt its language model only, and ``vision`` selects the linear layers of its vision tower and
  projector (``targets: qv, vision`` adapts both).

Fused expert weights (the 3-D ``gate_up_proj``/``down_proj`` parameters of a transformers MoE block's experts
module) are targets like modules, at ``<experts module>.<parameter>`` (``model.layers.0.mlp.experts.down_proj``):
names, dotted suffixes (``experts.down_proj``), globs, regexes, ``layers`` and ``exclude`` select them by that path,
and naming the experts module (``mlp.experts``) selects its weights. The linear presets do not include them (see
``resolver.preset_paths``).

``layers`` keeps only modules inside the given blocks (``"0-11, 20"``); ``exclude`` removes modules by the same
spellings. A spec item that selects nothing, or only modules that cannot take LoRA, is an error that says so.

- ``index``: the walk over a model that finds what can take LoRA (cached per model);
- ``grammar``: the spellings above, without a model;
- ``resolver``: a spec resolved on a model's index, with errors that name what the model has.
"""

from __future__ import annotations

from .grammar import PRESETS, parse_layers, preset_name, split_spec
from .index import (
    ModelIndex,
    ModuleInfo,
    index_is_current,
    index_model,
    invalidate,
    layer_of,
    unwrapped_modules,
)
from .resolver import (
    compact_target_modules,
    compact_target_parameters,
    experts_note,
    preset_paths,
    resolve,
    resolve_targets,
    selection_key,
    spec_key,
    suffix_summary,
)

__all__ = [
    "PRESETS",
    "ModelIndex",
    "ModuleInfo",
    "compact_target_modules",
    "compact_target_parameters",
    "experts_note",
    "index_is_current",
    "index_model",
    "invalidate",
    "layer_of",
    "parse_layers",
    "preset_name",
    "preset_paths",
    "resolve",
    "resolve_targets",
    "selection_key",
    "spec_key",
    "split_spec",
    "suffix_summary",
    "unwrapped_modules",
]
