"""4/8-bit (QLoRA) bases: loading them without wasting memory, and bitsandbytes, imported only when 4/8-bit is
asked for (PEFT's ``is_bnb_available`` pattern)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .errors import UsageError
from .units import fmt_bytes

__all__ = ["BaseLoad", "hide_hub_kernel_hint", "is_bnb_available", "load_base", "require_bitsandbytes"]


@lru_cache(maxsize=1)
def is_bnb_available() -> bool:
    """Whether bitsandbytes is installed (without importing it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


class _HideHubKernelHint(logging.Filter):
    """bitsandbytes (0.50, CPU build) logs at import that it failed to fetch an optional kernel from the Hugging
    Face Hub and suggests `pip install kernels`; on an offline or GPU-less machine that is noise that points users
    at a download. Only that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


_HINT_FILTER = _HideHubKernelHint()


def hide_hub_kernel_hint() -> None:
    """Drop bitsandbytes' import-time hint about a Hub kernel (see ``_HideHubKernelHint``). Called before code
    that imports bitsandbytes: our own import, and PEFT's and transformers', which import it when it is installed.
    Does nothing once bitsandbytes is imported or when it is not installed."""
    if "bitsandbytes" in sys.modules or not is_bnb_available():
        return
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _HINT_FILTER not in logger.filters:
        logger.addFilter(_HINT_FILTER)


def require_bitsandbytes(purpose: str) -> Any:
    """Import bitsandbytes for ``purpose`` or raise a UsageError with the install command."""
    hide_hub_kernel_hint()
    if not is_bnb_available():
        raise UsageError(
            f"{purpose} need bitsandbytes, which is not installed: pip install 'jupyter-lora[qlora]' "
            "(or pip install bitsandbytes)."
        )
    try:
        import bitsandbytes
    except Exception as exc:  # installed but broken (no usable backend on this machine)
        raise UsageError(f"{purpose} need bitsandbytes, which failed to load here: {exc}") from None
    return bitsandbytes


# ------------------------------------------------------------------------------------------------ loading a base

_COMPUTE = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
            "fp32": "float32", "float32": "float32"}  # fmt: skip


@dataclass(frozen=True)
class BaseLoad:
    """What ``load_base`` did: where from, how quantised, and memory before/after (bytes; GPU when the model is
    on CUDA, else the process's resident memory)."""

    source: str
    bits: int | None
    quant_type: str | None
    dtype: str
    device: str
    memory_before: int
    memory_after: int
    seconds: float

    @property
    def memory_used(self) -> int:
        return self.memory_after - self.memory_before

    def __repr__(self) -> str:
        quant = f"{self.bits}-bit {self.quant_type}" if self.bits else "unquantised"
        return (f"Loaded {self.source} ({quant}, {self.dtype}) on {self.device} in {self.seconds:.1f} s: memory "
                f"{fmt_bytes(self.memory_before)} → {fmt_bytes(self.memory_after)} (+{fmt_bytes(self.memory_used)})")  # fmt: skip


def _memory(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.memory_allocated())
    import psutil

    return int(psutil.Process().memory_info().rss)


def load_base(
    source: str | os.PathLike,
    bits: int | None = 4,
    *,
    dtype: str = "bf16",
    quant_type: str = "nf4",
    double_quant: bool = True,
    device_map: Any = None,
    task: str | None = None,
    **kwargs: Any,
) -> tuple[Any, BaseLoad]:
    """Load a base model for (Q)LoRA: ``bits=4`` (NF4, double quantisation, ``dtype`` compute), ``8`` (LLM.int8)
    or None. Returns ``(model, BaseLoad)``.

    Unlike ``peft.prepare_model_for_kbit_training`` nothing is upcast to fp32: norms, embeddings and the LM head
    stay in ``dtype`` (the fp32 copies and fp32 logits are what made HF's QLoRA peak higher than bf16 LoRA); all
    base weights are frozen. The training engine turns gradient checkpointing on for 4/8-bit bases by default.
    """
    import time

    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BitsAndBytesConfig,
    )

    from .sources import read_config

    if bits not in (None, 4, 8):
        raise UsageError(f"`bits` must be 4, 8 or None (unquantised), got {bits!r}.")
    key = str(dtype).lower().replace("torch.", "")
    if key not in _COMPUTE:
        raise UsageError(f"`dtype` must be bf16, fp16 or fp32 (the compute dtype), got {dtype!r}.")
    torch_dtype = getattr(torch, _COMPUTE[key])
    if quant_type not in ("nf4", "fp4"):
        raise UsageError(f"`quant_type` must be nf4 or fp4, got {quant_type!r}.")
    cuda = torch.cuda.is_available()
    if torch_dtype == torch.bfloat16 and cuda and not torch.cuda.is_bf16_supported():
        raise UsageError("`dtype` bf16 is not supported by this GPU; use dtype='fp16'.")
    config = None
    if bits is not None:
        require_bitsandbytes("4/8-bit bases")
        if bits == 4:
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch_dtype)  # fmt: skip
        else:
            config = BitsAndBytesConfig(load_in_8bit=True)
    text = os.fspath(source)
    model_config = read_config(
        text,
        "load a model",
        "Give a local directory with config.json and weights, or a model id reachable from here.",
    )
    architectures = getattr(model_config, "architectures", None) or []
    wants_cls = (task or "").upper() in ("SEQ_CLS", "CLASSIFICATION") or any(
        a.endswith("ForSequenceClassification") for a in architectures
    )
    auto = AutoModelForSequenceClassification if wants_cls else AutoModelForCausalLM
    device = "cuda" if cuda else "cpu"
    if device_map is None:
        device_map = {"": 0} if cuda else "cpu"
    before = _memory(device)
    start = time.perf_counter()
    model = auto.from_pretrained(
        text, quantization_config=config, dtype=torch_dtype, device_map=device_map, **kwargs
    )
    for p in model.parameters():
        p.requires_grad_(False)
    info = BaseLoad(text, bits, quant_type if bits == 4 else ("int8" if bits == 8 else None), _COMPUTE[key], device,
                    before, _memory(device), time.perf_counter() - start)  # fmt: skip
    return model, info
