"""Folding an adapter into the base weights: ``merge`` returns the plain merged model, ``save_merged`` writes it to
disk and leaves the live model adapted. On a 4/8-bit base the merge goes through a dequantised copy in the compute
dtype, after checking that it fits in memory (and on disk).

A merge rewrites the targeted base weights and must be undone exactly if it fails part-way. Copying those weights
first would cost as much memory as all of them (the whole model, on the host, for a GPU model), so ``Folds`` adds
each plain LoRA update in place, a block of rows at a time, and keeps only what subtracting the update again would
not give back bit for bit (a ``BitPatch``: a few percent of the elements, 3 bytes each). Extra memory: a few
blocks plus those patches, against PEFT's ``merge_and_unload`` which materialises each module's whole update (and,
checked, a copy of its weight). Layers whose merge is not a plain ``W + ΔW`` (DoRA, conv, quantised, biased) go
through PEFT's own merge after a CPU copy of their weights.

The same machinery gives back the base weights that PiSSA/OLoRA initialisation rewrote (they subtract the initial
adapter from the weight): ``record_rewritten`` keeps the initial A and B and the patches that make ``residual +
initial update`` exact, and ``restore_rewritten`` (used by unload) folds that back in.
"""

from __future__ import annotations

import copy
import math
import shutil
import sys
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import targets
from ..errors import UsageError
from ..transaction import BitPatch, Transaction
from ..units import fmt_bytes
from .guards import free_memory as _free_memory
from .guards import require_adapter, require_adapters
from .peft_facts import (
    LoraUpdate,
    active_names,
    adapter_layers,
    forget_wrapper,
    holds_adapter,
    is_lora_layer,
    is_quantized,
    lora_update,
    method_of,
    restore_grad_flags,
    retire_wrapper,
)

__all__ = [
    "Folds",
    "Rewritten",
    "forget_rewritten",
    "merge",
    "record_rewritten",
    "remember_rewritten",
    "restore_rewritten",
    "save_merged",
]

_BLOCK = 1 << 20  # elements per block: the merge's own extra memory is a few blocks (4 MiB each in fp32)


def _row_blocks(weight: torch.Tensor) -> list[tuple[int, int]]:
    rows = weight.shape[0]
    step = max(1, _BLOCK // max(1, weight[0].numel()))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


class Folds:
    """Adds LoRA updates into base weights in place, block by block, and keeps what it takes to take each one out
    again bit for bit; ``undo()`` does that, last first. ``nbytes``: the memory kept for undoing.

    The addition is PEFT's merge arithmetic (``W + get_delta_weight`` with PEFT's casts; the merged weights are
    bit-identical to ``merge_and_unload(safe_merge=True)``'s). It is done here rather than by PEFT's layer ``merge``
    because that computes a module's whole update at once, copies the weight, and cannot be undone exactly.

    The blocks' intermediate results go to buffers allocated once (allocating and freeing a few MiB per block
    would make the allocator return and re-fault that memory every time)."""

    def __init__(self) -> None:
        # ("fold", update, sign, fp32, blocks) or ("copy", weight, CPU copy of what was there); a block is
        # [start, stop, patch, values being written] and the values are dropped once they are written, so that
        # an interrupt (Ctrl-C) between two statements leaves no doubt about which blocks were written.
        self._log: list[tuple] = []
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held to undo what was done so far."""
        total = 0
        for entry in self._log:
            if entry[0] == "fold":
                total += sum(block[2].nbytes for block in entry[4] if block[2] is not None)
            else:
                total += entry[2].numel() * entry[2].element_size()
        return total

    def _buffer(self, role: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        key = (role, dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = self._buffers[key] = torch.empty(like.numel(), dtype=dtype, device=like.device)
        return buf[: like.numel()].view(like.shape)

    def _delta(
        self, update: LoraUpdate, block: torch.Tensor, start: int, stop: int, fp32: bool
    ) -> torch.Tensor:
        """Rows ``start:stop`` of the update, in fp32 (``fp32``) or cast as PEFT's merge casts it: to the factors'
        dtype, then to the weight's."""
        compute = torch.float32 if update.casts(fp32) else update.a.dtype
        delta = update.rows(start, stop, fp32, out=self._buffer("delta", block, compute))
        if not fp32:
            for i, dtype in enumerate((update.a.dtype, block.dtype)):
                if delta.dtype != dtype:
                    delta = self._buffer(f"cast{i}", block, dtype).copy_(delta)
        return delta

    def _shifted(
        self, role: str, block: torch.Tensor, delta: torch.Tensor, sign: int, fp32: bool
    ) -> torch.Tensor:
        """``block ± delta`` into buffer ``role``: in ``block``'s dtype (PEFT's merge), or in fp32 and cast back
        (PiSSA's residual)."""
        out = self._buffer(role, block)
        if fp32 and block.dtype != torch.float32:
            wide = self._buffer(role + "32", block, torch.float32).copy_(block)
            return out.copy_(wide.add_(delta, alpha=sign))
        return torch.add(block, delta, alpha=sign, out=out)

    def fold(
        self,
        update: LoraUpdate,
        sign: int = 1,
        fp32: bool = False,
        then: list[BitPatch | None] | None = None,
        label: str | None = None,
    ) -> None:
        """``weight += sign · update`` in place (in the weight's dtype as PEFT merges, or with ``fp32`` as PiSSA
        subtracts), each block's result then corrected by ``then[i]`` if given. With ``label`` (the adapter and
        module, for the message) a block that would hold NaN or inf is refused before it is written."""
        weight = update.weight.data
        blocks: list[list] = []
        self._log.append(("fold", update, sign, fp32, blocks))
        with torch.no_grad():
            for i, (start, stop) in enumerate(_row_blocks(weight)):
                old = weight[start:stop]
                delta = self._delta(update, old, start, stop, fp32)
                new = self._shifted("new", old, delta, sign, fp32)
                if then is not None and then[i] is not None:
                    then[i].apply(new)
                if label is not None:
                    low, high = torch.aminmax(new)
                    if not (math.isfinite(low.item()) and math.isfinite(high.item())):
                        raise UsageError(
                            f"Cannot merge: {label} would hold NaN or infinite values (the adapter's weights have "
                            "diverged, e.g. after a too high learning rate). The model is unchanged; train again or "
                            "load an earlier checkpoint."
                        )
                back = self._shifted("back", new, delta, -sign, fp32)
                block = [start, stop, BitPatch.between(old, back, self._buffer("mask", old, torch.bool)), new]
                blocks.append(block)
                old.copy_(new)
                block[3] = None

    def patches_towards(
        self, update: LoraUpdate, target: torch.Tensor, sign: int = 1, fp32: bool = False
    ) -> list[BitPatch | None]:
        """Per block, the patch that makes folding ``update`` into its weight give ``target`` exactly (``target``
        may live on the CPU); nothing is written. Pass the result as ``fold(..., then=...)``."""
        weight = update.weight.data
        patches = []
        with torch.no_grad():
            for start, stop in _row_blocks(weight):
                block = weight[start:stop]
                delta = self._delta(update, block, start, stop, fp32)
                new = self._shifted("new", block, delta, sign, fp32)
                wanted = target[start:stop].to(block.device)
                patches.append(BitPatch.between(wanted, new, self._buffer("mask", block, torch.bool)))
        return patches

    def replace(self, weight: nn.Parameter, value: torch.Tensor) -> None:
        """Copy ``value`` into ``weight``, keeping a CPU copy of what was there for ``undo``."""
        self._log.append(("copy", weight, weight.detach().to("cpu", copy=True)))
        with torch.no_grad():
            weight.data.copy_(value.to(weight.device))

    def keep_copy(self, layer: nn.Module) -> None:
        """Copy (to the CPU) every weight of ``layer``'s base layer, before PEFT merges that layer itself."""
        for p in layer.get_base_layer().parameters():
            self._log.append(("copy", p, p.detach().to("cpu", copy=True)))

    def undo(self) -> None:
        """Take out again everything done, last first, bit for bit."""
        with torch.no_grad():
            while self._log:
                entry = self._log.pop()
                if entry[0] == "copy":
                    _, p, saved = entry
                    if p.shape != saved.shape:
                        p.data = saved.to(p.device)
                    else:
                        p.data.copy_(saved.to(p.device))
                    continue
                _, update, sign, fp32, blocks = entry
                weight = update.weight.data
                while blocks:
                    start, stop, patch, writing = blocks.pop()
                    current = weight[start:stop]
                    if writing is not None and not _same_bits(current, writing):
                        continue  # interrupted before this block was written
                    delta = self._delta(update, current, start, stop, fp32)
                    back = self._shifted("back", current, delta, -sign, fp32)
                    if patch is not None:
                        patch.apply(back)
                    current.copy_(back)
        self._buffers = {}

    def discard(self) -> None:
        """Drop what was kept for undoing (what was done stays)."""
        self._log, self._buffers = [], {}


# base model -> the base weights that weight-rewriting initialisations (PiSSA, OLoRA) changed, oldest first
_REWRITTEN: weakref.WeakKeyDictionary[nn.Module, list[Rewritten]] = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class Rewritten:
    """A base weight that adapter ``name``'s initialisation rewrote (PiSSA and OLoRA subtract their initial update
    from it). The original is the weight plus that initial update (``update``, with copies of the initial A and B),
    made exact block by block by ``patches``; where the rewrite was not such an update, ``copy`` holds it (CPU)."""

    name: str
    weight: nn.Parameter
    update: LoraUpdate | None
    patches: list[BitPatch | None]
    copy: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Memory kept to give the original back."""
        if self.copy is not None:
            return self.copy.numel() * self.copy.element_size()
        factors = sum(t.numel() * t.element_size() for t in (self.update.a, self.update.b))
        return factors + sum(p.nbytes for p in self.patches if p is not None)


def record_rewritten(peft_model: nn.Module, name: str, originals: dict[int, torch.Tensor]) -> list[Rewritten]:
    """What it takes to give back the originals (``originals``: id of a base weight → a CPU copy from before adapter
    ``name`` was initialised) of the base weights that initialisation changed; unchanged ones need nothing."""
    records = []
    folds = Folds()
    for _, layer in adapter_layers(peft_model, [name]):
        weight = layer.get_base_layer().weight
        original = originals.get(id(weight))
        if original is None or BitPatch.between(original, weight.detach().cpu()) is None:
            continue
        update = lora_update(layer, name)
        if update is None or update.weight is not weight:
            records.append(Rewritten(name, weight, None, [], copy=original))
            continue
        update = update.detached()
        record = Rewritten(name, weight, update, folds.patches_towards(update, original, fp32=True))
        if record.nbytes >= original.numel() * original.element_size():  # a copy is smaller (tiny layers)
            record = Rewritten(name, weight, None, [], copy=original)
        records.append(record)
    return records


def remember_rewritten(base: nn.Module, records: list[Rewritten]) -> None:
    """Keep ``records`` (from ``record_rewritten``) with ``base`` until its originals are given back."""
    if records:
        _REWRITTEN.setdefault(base, []).extend(records)


def forget_rewritten(base: nn.Module) -> None:
    """Drop the records of ``base`` (its rewritten weights stay as they are: after a merge, that is right)."""
    _REWRITTEN.pop(base, None)


def restore_rewritten(base: nn.Module, names: list[str] | None = None) -> None:
    """Give back, bit for bit, the base weights that the initialisation of adapters ``names`` (default: all)
    rewrote, newest first. Takes part in the active ``Transaction``: undone with it. Refused when a later
    adapter's initialisation rewrote the same weights again (that one has to go first)."""
    records = _REWRITTEN.get(base, [])
    chosen = [r for r in records if names is None or r.name in names]
    if not chosen:
        return
    last = {id(r.weight): r for r in records}
    blocking = [last[id(r.weight)] for r in chosen if last[id(r.weight)].name not in {c.name for c in chosen}]
    if blocking:
        raise UsageError(
            f"Adapter {chosen[0].name!r} changed base weights at initialisation (PiSSA/OLoRA), and adapter "
            f"{blocking[0].name!r} changed them again after it; remove {blocking[0].name!r} first (or unload all: "
            "jupyter_lora.unload(model)) so that the base weights come back exactly."
        )
    folds = Folds()
    transaction = Transaction.active()
    if transaction is not None:
        transaction.on_restore(folds.undo)
    for record in reversed(chosen):
        if record.update is None:
            folds.replace(record.weight, record.copy)
        else:
            folds.fold(record.update, fp32=True, then=record.patches)
    remaining = [r for r in records if all(r is not c for c in chosen)]
    if transaction is not None:
        transaction.on_restore(lambda: _REWRITTEN.__setitem__(base, records))
    if remaining:
        _REWRITTEN[base] = remaining
    else:
        _REWRITTEN.pop(base, None)


def _merge_in_place(peft_model: nn.Module, names: list[str], folds: Folds) -> nn.Module:
    """Merge adapters ``names`` into the base weights and unload; every weight change is recorded in ``folds``.

    Each plain LoRA update is folded here (``Folds``); PEFT's ``merge_and_unload`` then finds those layers merged
    and only unloads (and merges, after a CPU copy, the layers it alone knows how to merge)."""
    with torch.no_grad():
        for path, layer in adapter_layers(peft_model, names):
            for name in names:
                if name in layer.merged_adapters or not holds_adapter(layer, name):
                    continue
                update = lora_update(layer, name)
                if update is None:
                    folds.keep_copy(layer)
                    layer.merge(safe_merge=True, adapter_names=[name])
                    continue
                label = f"adapter {name!r} on `{path.removeprefix('base_model.model.')}`"
                folds.fold(update, label=label)
                layer.merged_adapters.append(name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All adapters are already merged, nothing to do")
        merged = peft_model.merge_and_unload(safe_merge=True, adapter_names=names)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        merged.__dict__.pop(attr, None)
    return merged


def merge(model: nn.Module, name: str | None = None, *, dequantize: bool = False) -> nn.Module:
    """Fold the active adapter (or ``name``) into the base weights and return the plain, merged model.

    Other adapters on the model are dropped. The merged model runs at base speed and saves as a normal
    transformers model. On a 4/8-bit base, ``dequantize=True`` is the guided path: the base is dequantised to its
    compute dtype (bf16), the adapter added, and a plain bf16 model returned — after checking that it fits in
    memory. On any failure the adapted model is left as it was, bit for bit.
    """
    peft_model = require_adapters(model, "merge")
    if name is not None:
        require_adapter(peft_model, name)
    names = [name] if name is not None else active_names(peft_model)
    _check_mergeable(peft_model, names[0])
    if is_quantized(peft_model):
        if not dequantize:
            raise UsageError(_quantized_merge_advice(peft_model))
        _check_dequantized_fits_memory(peft_model)
        _warn_rounding()
        undo: list = []
        try:
            with Transaction(peft_model):
                merged = _dequantized_merge(peft_model, names[0], undo)
        except BaseException:
            _repack(undo)
            raise
    else:
        folds = Folds()
        transaction = Transaction(peft_model)
        transaction.on_restore(folds.undo)
        with transaction:
            if name is not None and name not in active_names(peft_model):
                peft_model.set_adapter(name)
            merged = _merge_in_place(peft_model, names, folds)
            restore_grad_flags(merged)
        folds.discard()
    forget_wrapper(merged)
    forget_rewritten(merged)  # the merged weights are the rewritten base plus the adapter: right as they are
    retire_wrapper(
        peft_model,
        "its adapter was merged into the base model. Use the merged model jupyter_lora.merge returned "
        "(model = jupyter_lora.merge(model)).",
    )
    targets.invalidate(peft_model)
    targets.invalidate(merged)
    return merged


def _check_mergeable(peft_model: nn.Module, name: str) -> None:
    """Prompt and prefix tuning add virtual tokens: there are no weights to merge them into."""
    config = peft_model.peft_config.get(name)
    if getattr(config, "is_prompt_learning", False):
        what = method_of(config).replace("_", " ")
        raise UsageError(
            f"{what[0].upper()}{what[1:]} adds virtual tokens; there are no weights to merge into — save the "
            "adapter (jupyter_lora.save) or keep it loaded."
        )


def save_merged(peft_model: nn.Module, name: str, directory: Path) -> None:
    """Write the model with adapter ``name`` merged into ``directory`` (transformers format), then take the merge out
    again exactly (``Folds``), leaving the adapted model as it was. A 4/8-bit base is dequantised to bf16 for this
    (after a disk-space check)."""
    _check_mergeable(peft_model, name)
    quantized = is_quantized(peft_model)
    if quantized:
        need = _dequantized_bytes(peft_model)
        free = shutil.disk_usage(directory).free
        if need * 1.05 > free:
            raise UsageError(
                f"The merged bf16 model needs ≈ {fmt_bytes(need)} on disk; {fmt_bytes(free)} is free at "
                f"{str(directory.parent)!r}. Free space, choose another `path`, or save the adapter alone."
            )
        _check_dequantized_fits_memory(peft_model)
        _warn_rounding()
    transaction = Transaction(peft_model)
    folds = Folds()
    transaction.on_restore(folds.undo)
    undo: list = []
    try:
        with transaction:
            if quantized:
                merged_model = _dequantized_merge(peft_model, name, undo)
            else:
                merged_model = _merge_in_place(peft_model, [name], folds)
            state = merged_model.__dict__
            hidden = {k: state.pop(k) for k in ("peft_config", "_hf_peft_config_loaded") if k in state}
            try:
                merged_model.save_pretrained(str(directory), safe_serialization=True)
            finally:
                state.update(hidden)
            transaction.restore()
    finally:
        _repack(undo)


# --------------------------------------------------------------------------------------------------- 4/8-bit


def _dequantized_bytes(peft_model: nn.Module) -> int:
    """Bytes of the model once every parameter is in its compute dtype (bf16 for a QLoRA base)."""
    return targets.index_model(peft_model).base_params * 2


def _quantized_merge_advice(peft_model: nn.Module) -> str:
    size = fmt_bytes(_dequantized_bytes(peft_model))
    return (
        "This adapter sits on a 4/8-bit base; merging into the quantised weights would round the adapter away. "
        "Either save the adapter alone — jupyter_lora.save(model, path) / %lora save model PATH (small, loads on "
        "the 4-bit or the bf16 base) — or merge into a dequantised bf16 copy: jupyter_lora.merge(model, "
        f"dequantize=True) / %lora merge model --dequantize (needs ≈ {size} of memory), or write that merged model "
        f"straight to disk: jupyter_lora.save(model, path, merged=True) / %lora save model PATH --merged (≈ {size})."
    )


def _check_dequantized_fits_memory(peft_model: nn.Module) -> None:
    need = _dequantized_bytes(peft_model)
    device = next(peft_model.parameters()).device
    free = _free_memory(device)
    if need > free:
        raise UsageError(
            f"A dequantised merge needs ≈ {fmt_bytes(need)} on {device.type}, but only {fmt_bytes(free)} is free. "
            "Save the adapter alone (%lora save model PATH), or write the merged model to disk with "
            "%lora save model PATH --merged after freeing memory."
        )


def _warn_rounding() -> None:
    warnings.warn(
        "Merging into a dequantised 4/8-bit base: the merged bf16 model reproduces the adapted quantised model "
        "(what was trained), not the original full-precision base plus the adapter — their weights differ by the "
        "quantisation rounding.",
        UserWarning,
        stacklevel=3,
    )


def _dequantized_merge(peft_model: nn.Module, name: str, undo: list | None = None) -> nn.Module:
    """Adapter deltas computed on the quantised model, then the base unloaded (trained heads kept), dequantised
    by transformers (``model.dequantize()``) and the deltas added in the compute dtype."""
    if name not in active_names(peft_model):
        peft_model.set_adapter(name)
    deltas = {}
    with torch.no_grad():
        for path, module in peft_model.base_model.model.named_modules():
            if is_lora_layer(module) and name in module.lora_A:
                deltas[path] = module.get_delta_weight(name)
    base = peft_model.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        base.__dict__.pop(attr, None)
    dtype = _compute_dtype(base)
    unpacked = _unpack_cpu_4bit(base)
    if undo is not None:
        undo.extend(unpacked)
    base = base.dequantize(dtype=dtype) or base
    with torch.no_grad():
        for path, delta in deltas.items():
            weight = base.get_submodule(path).weight
            weight.add_(delta.to(weight.dtype))
    restore_grad_flags(base)
    return base


def _unpack_cpu_4bit(model: nn.Module) -> list[tuple[Any, Any, Any]]:
    """bitsandbytes' CPU kernel repacks 4-bit weights into its own layout on the first forward pass, and its
    dequantize does not read that layout back (transformers' dequantize would produce wrong weights). Convert
    them back to the standard layout first — what bitsandbytes itself does before saving a state dict."""
    functional = sys.modules.get("bitsandbytes.functional")
    inverse = getattr(functional, "_convert_weight_packed_for_cpu_inverse", None)
    undo: list[tuple[Any, Any, Any]] = []
    if inverse is None:
        return undo
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            undo.append((weight, weight.data, state))
            # The inverse rewrites the QuantState it is given; hand it a copy so the live one stays untouched.
            weight.data, weight.quant_state = inverse(weight.data, copy.deepcopy(state))
    return undo


def _repack(undo: list[tuple[Any, Any, Any]]) -> None:
    """Give the live quantised weights their CPU layout back (bit for bit what they were)."""
    for weight, data, state in undo:
        weight.data, weight.quant_state = data, state


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the merged model gets: 4-bit's compute dtype, else the dtype of the unquantised weights."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is not None and getattr(config, "load_in_4bit", False):
        dtype = getattr(config, "bnb_4bit_compute_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    floats = [p.dtype for p in model.parameters() if p.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.bfloat16
