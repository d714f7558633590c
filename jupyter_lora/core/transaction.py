"""All-or-nothing model changes.

PEFT changes a model in place, module by module. If something fails half-way (a bad module, an OOM while
merging, a corrupt file while loading), the model would be left half-adapted. ``Transaction`` records the
module tree (every module's attribute dict and the containers in it) and each parameter's ``requires_grad``;
weights that an operation rewrites are either copied first (``backup``: a CPU copy of each) or put back by the
operation's own undo steps (``on_restore``: inject keeps CPU copies of the weights PiSSA/OLoRA may rewrite,
merging keeps only the bits it cannot recompute, see ``BitPatch``). On an exception it puts everything back
exactly and re-raises.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["BitPatch", "Transaction"]

_ACTIVE = threading.local()  # .stack: the transactions running on this thread, innermost last
_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SEGMENT_BITS = 16  # positions are kept as 16-bit offsets into segments of 65,536 elements


def _copy_container(value: Any) -> Any:
    if isinstance(value, dict):
        return value.copy()
    if isinstance(value, (list, set)):
        return value.copy()
    return None


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """A flat integer view of ``tensor``'s bit patterns (it shares the storage: writing it writes the tensor)."""
    if not tensor.is_contiguous():
        raise ValueError("BitPatch needs contiguous tensors")
    return tensor.view(-1).view(_INTS[tensor.element_size()])


class BitPatch:
    """Where a recomputed tensor differs, bit for bit, from the original it stands for, and what the original held
    there — so that ``patch.apply(recomputed)`` turns it back into the original exactly.

    Undoing ``w + d`` as ``(w + d) - d`` gives ``w`` back except where rounding lost a bit (near a power of two,
    mostly: 1–15 % of the elements, growing with ``d``). Only those elements are kept, on the CPU: where they are
    (2 bytes of offset each, or one bit per element when they are many) and the difference of bit patterns (1
    byte; the original bits where it is larger) — or a plain copy of the original when that is smaller. Make one
    with ``BitPatch.between(original, recomputed)`` (None when they are identical); both must be contiguous, of
    the same shape, dtype and device.
    """

    def __init__(self, numel: int, *, copy: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                 offsets: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 steps: torch.Tensor | None = None, wide: torch.Tensor | None = None) -> None:  # fmt: skip
        self.numel = numel
        self._copy, self._counts, self._offsets, self._mask = copy, counts, offsets, mask
        self._steps, self._wide = steps, wide

    @classmethod
    def between(
        cls, original: torch.Tensor, recomputed: torch.Tensor, scratch: torch.Tensor | None = None
    ) -> BitPatch | None:
        """The patch that turns ``recomputed`` into ``original``; None when they are already bit-identical.
        ``scratch``: a bool tensor of at least their size to work in (else one is allocated)."""
        old, new = _bits(original), _bits(recomputed)
        differs = torch.ne(old, new, out=None if scratch is None else scratch.view(-1)[: old.numel()])
        count = int(torch.count_nonzero(differs))
        if count == 0:
            return None
        numel = old.numel()
        if 3 * count >= numel * original.element_size():
            return cls(numel, copy=old.to("cpu", copy=True))
        where = differs.nonzero().squeeze(1)
        step = old[where].long() - new[where].long()  # may wrap for 64-bit patterns; apply wraps back alike
        wide = (step > 127) | (step < -127)
        steps = torch.where(wide, -128, step).to("cpu", torch.int8)
        wide_bits = old[where[wide]].cpu()
        if 16 * count > numel:  # one bit per element is smaller than 2 bytes per differing one
            return cls(numel, mask=_pack_bits(differs).cpu(), steps=steps, wide=wide_bits)
        segments = -(-numel // (1 << _SEGMENT_BITS))
        return cls(
            numel,
            counts=torch.bincount(where >> _SEGMENT_BITS, minlength=segments).to("cpu", torch.int32),
            offsets=((where & 0xFFFF) - 32768).to("cpu", torch.int16),
            steps=steps,
            wide=wide_bits,
        )

    @property
    def nbytes(self) -> int:
        """Memory this patch holds."""
        kept = (self._copy, self._counts, self._offsets, self._mask, self._steps, self._wide)
        return sum(t.numel() * t.element_size() for t in kept if t is not None)

    def apply(self, recomputed: torch.Tensor) -> None:
        """Turn ``recomputed`` (in place) into the original this patch was made for."""
        bits = _bits(recomputed)
        if bits.numel() != self.numel:
            raise ValueError(f"BitPatch for {self.numel} elements applied to {bits.numel()}")
        device = bits.device
        if self._copy is not None:
            bits.copy_(self._copy.to(device))
            return
        if self._mask is not None:
            where = _unpack_bits(self._mask.to(device), self.numel).nonzero().squeeze(1)
        else:
            starts = torch.arange(self._counts.numel(), device=device, dtype=torch.int64) << _SEGMENT_BITS
            where = torch.repeat_interleave(starts, self._counts.to(device))
            where += self._offsets.to(device).long() + 32768
        steps = self._steps.to(device).long()
        values = bits[where].long() + steps
        values[steps == -128] = self._wide.to(device).long()
        bits[where] = values.to(bits.dtype)


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as bytes, eight flags to a byte (first flag in the lowest bit)."""
    flags = flags.view(torch.uint8)
    if flags.numel() % 8:
        flags = torch.cat([flags, flags.new_zeros(8 - flags.numel() % 8)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flags.device)
    return (flags.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(1) & weights).ne(0).view(-1)[:numel]


class Transaction:
    """``with Transaction(model, backup=[weights...]):`` — on an exception the model is restored as it was.

    ``on_restore(undo)`` adds a step of the operation's own to the restore (run last first, after the module tree
    is back and before the backed-up weights are). ``Transaction.active()`` is the innermost transaction running on
    this thread, for helpers that take part in their caller's transaction."""

    def __init__(self, *roots: nn.Module, backup: Iterable[torch.Tensor] = ()):
        self._roots = roots
        self._backup_tensors = list(backup)
        self._undo: list[Callable[[], None]] = []

    def on_restore(self, undo: Callable[[], None]) -> None:
        """Run ``undo()`` when the transaction restores the model."""
        self._undo.append(undo)

    @staticmethod
    def active() -> Transaction | None:
        """The innermost transaction running on this thread, or None."""
        stack = getattr(_ACTIVE, "stack", None)
        return stack[-1] if stack else None

    def __enter__(self) -> Transaction:
        self._modules: list[tuple[nn.Module, dict[str, tuple[Any, Any]]]] = []
        seen: set[int] = set()
        for root in self._roots:
            for module in root.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                saved = {k: (v, _copy_container(v)) for k, v in module.__dict__.items()}
                self._modules.append((module, saved))
        # transformers keeps state on the config too (dequantize() drops quantization_config): copy it shallowly.
        self._configs = []
        for module, _ in self._modules:
            config = module.__dict__.get("config")
            if (
                config is not None
                and hasattr(config, "to_dict")
                and all(c is not config for c, _ in self._configs)
            ):
                self._configs.append((config, dict(config.__dict__)))
        params: dict[int, nn.Parameter] = {}
        for root in self._roots:
            for p in root.parameters():
                params[id(p)] = p
        self._grads = [(p, p.requires_grad) for p in params.values()]
        self._backups = [(t, t.detach().to("cpu", copy=True)) for t in self._backup_tensors]
        if not hasattr(_ACTIVE, "stack"):
            _ACTIVE.stack = []
        _ACTIVE.stack.append(self)
        return self

    def restore(self) -> None:
        """Put the model back as it was when the transaction began."""
        for module, saved in self._modules:
            d = module.__dict__
            for key in [k for k in d if k not in saved]:
                del d[key]
            for key, (obj, content) in saved.items():
                if content is not None:
                    if isinstance(obj, dict):
                        obj.clear()
                        obj.update(content)
                    elif isinstance(obj, list):
                        obj[:] = content
                    else:
                        obj.clear()
                        obj.update(content)
                d[key] = obj
        for config, saved in self._configs:
            config.__dict__.clear()
            config.__dict__.update(saved)
        for p, flag in self._grads:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        while self._undo:  # the operation's own steps, last first; then the weights as they were at the start
            self._undo.pop()()
        with torch.no_grad():
            for tensor, copy in self._backups:
                if tensor.shape != copy.shape:
                    tensor.data = copy.to(tensor.device)
                else:
                    tensor.copy_(copy.to(tensor.device))

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None:
                self.restore()
        finally:
            _ACTIVE.stack.remove(self)
        self._modules = []
        self._backups = []
        self._undo = []
        return False
