"""The model a memory estimate is about: resolved from what was given (the model itself, a transformers config,
or a local path / model id whose config is read and built on the meta device, no weights loaded), and the facts
about it that the formulas read (its sizes, how it is loaded quantised, its weight dtype)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import UsageError, did_you_mean
from .modelinfo import base_model_of
from .targets import ModelIndex, index_model

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "loaded_quantization",
    "model_dims",
    "model_from_config",
    "read_config",
    "resolve_source",
    "resolve_weight_dtype",
]

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


# Seconds the Hub may take to answer (per connect/read) before it counts as unreachable; Hub answers take well
# under a second, and an offline machine then fails at once instead of retrying for ~25 s.
HUB_TIMEOUT = 1.5


def read_config(source: str | os.PathLike, purpose: str, fix: str) -> PretrainedConfig:
    """The transformers config at ``source`` (a local directory with config.json, or a model id). When it cannot
    be read, a UsageError: ``Cannot <purpose> from <source>: <why>`` followed by ``fix``, what to give instead.
    A model id is looked up on the Hub with one short request first: when the Hub cannot be reached and the
    config is not in the local cache, the error comes at once (huggingface_hub would retry for half a minute)."""
    from transformers import AutoConfig

    text = os.fspath(source)
    if not os.path.isdir(os.path.expanduser(text)):
        _check_hub_reachable(text, purpose, fix)
    try:
        return AutoConfig.from_pretrained(text)
    except (OSError, ValueError) as exc:
        raise UsageError(f"Cannot {purpose} from {text!r}: {str(exc).splitlines()[0]} {fix}") from None


def _check_hub_reachable(model_id: str, purpose: str, fix: str) -> None:
    """Raise a UsageError when the Hub does not answer one request for ``model_id``'s config.json within
    ``HUB_TIMEOUT`` and the local cache has no copy. Anything the Hub answers (a 404, a gated repo), an id it
    would refuse, and offline mode (HF_HUB_OFFLINE=1: the cache only) are left to transformers to report."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    if constants.HF_HUB_OFFLINE:
        return
    try:
        url = hf_hub_url(model_id, "config.json")
        get_hf_file_metadata(url, timeout=HUB_TIMEOUT)
    except (HfHubHTTPError, HFValidationError):
        return  # the Hub answered, or the id is malformed: transformers says which, without retrying
    except Exception as exc:  # a network error of whichever HTTP client huggingface_hub uses
        try:
            cached = try_to_load_from_cache(model_id, "config.json")
        except HFValidationError:
            cached = None
        if isinstance(cached, str):
            return  # transformers falls back to the cached copy without retrying
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"Cannot {purpose} from {model_id!r}: the Hub ({constants.ENDPOINT}) cannot be reached from here "
            f"({why}) and its config.json is not in the local cache. {fix}"
        ) from None


def model_from_config(config: Any) -> nn.Module:
    """A meta-device model (no weights) of the architecture ``config`` describes."""
    import transformers
    from accelerate import init_empty_weights

    model_cls = None
    for name in getattr(config, "architectures", None) or ():
        model_cls = getattr(transformers, name, None)
        if model_cls is not None:
            break
    with init_empty_weights():
        if model_cls is not None:
            return model_cls(config)
        for auto in (
            transformers.AutoModelForCausalLM,
            transformers.AutoModelForSeq2SeqLM,
            transformers.AutoModel,
        ):
            try:
                return auto.from_config(config)
            except ValueError:
                continue
    raise UsageError(f"Cannot build a model for config of type {type(config).__name__}.")


def resolve_source(source: Any, what: str) -> nn.Module:
    """``source`` as a model: a torch module as is; a transformers config, or a local path / model id read as a
    config, built on the meta device. ``what`` names the caller in the error for any other kind of value."""
    from transformers import PretrainedConfig

    if isinstance(source, nn.Module):
        return source
    if isinstance(source, PretrainedConfig):
        return model_from_config(source)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        # A Hub id is "name" or "org/name"; anything else that is not on disk is a path that does not exist.
        looks_like_path = text.startswith((".", "~", "/")) or text.count("/") > 1 or "\\" in text
        if looks_like_path and not os.path.exists(os.path.expanduser(text)):
            raise UsageError(
                f"`source` {text!r} does not exist. Give a local model directory (with config.json), a model id, "
                "a transformers config object, or the model itself."
            )
        config = read_config(
            text,
            "read a model config",
            "Give a local model directory (with config.json), a model id reachable from here, a config object, "
            "or the model itself.",
        )
        return model_from_config(config)
    raise UsageError(
        f"`{what}` takes a model, a transformers config, or a path/model id; got {type(source).__name__}."
    )


# ------------------------------------------------------------------------------------------------ facts


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_dims(model: nn.Module, index: ModelIndex | None = None) -> dict[str, Any]:
    """The sizes the memory formulas read, from the (text) config and the module index (``index``: the one of
    ``model`` just checked, if the caller holds it): hidden, intermediate, layers, heads, kv_heads, head_dim, vocab,
    whether the MLP is gated and the norms are RMSNorm, model_type."""
    base = base_model_of(model)
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    index = index if index is not None else index_model(model)
    suffixes = index.remember("suffixes", lambda: {m.suffix for m in index.modules})
    h = int(_first(config, "hidden_size", "n_embd", "d_model", "dim", default=0) or 0)
    heads = int(_first(config, "num_attention_heads", "n_head", "num_heads", "n_heads", default=1) or 1)
    kv_heads = _first(config, "num_key_value_heads", "num_kv_heads", default=None)
    if kv_heads is None:
        kv_heads = 1 if getattr(config, "multi_query", False) else heads
    head_dim = int(_first(config, "head_dim", default=0) or (h // heads if heads else 0))
    layers = int(
        _first(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers", default=index.num_layers)
    )
    if getattr(config, "is_encoder_decoder", False):
        layers += int(_first(config, "num_decoder_layers", default=layers) or 0)
    inter = _first(config, "intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim", "ffn_hidden_size")
    inter = int(inter) if inter else 4 * h
    gated = bool(suffixes & {"gate_proj", "gate_up_proj", "w3", "wi_0", "gate"})
    rms = index.remember("rms", lambda: "rms" in " ".join(index.module_types.values()).lower())
    return {
        "hidden": h,
        "intermediate": inter,
        "layers": layers or index.num_layers,
        "heads": heads,
        "kv_heads": int(kv_heads),
        "head_dim": head_dim,
        "vocab": int(_first(config, "vocab_size", default=0) or 0),
        "gated_mlp": gated,
        "rms_norm": rms,
        "model_type": index.model_type,
    }


def loaded_quantization(model: nn.Module, index: ModelIndex) -> tuple[str | None, bool]:
    """(quantisation, double quant) of a model that is already loaded quantised, from its bitsandbytes config or
    its layers; (None, True) for an ordinary model."""
    config = getattr(getattr(base_model_of(model), "config", None), "quantization_config", None)
    if config is not None:
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        if get("load_in_4bit"):
            return str(get("bnb_4bit_quant_type", "nf4") or "nf4"), bool(
                get("bnb_4bit_use_double_quant", False)
            )
        if get("load_in_8bit"):
            return "int8", False
    kinds = {m.kind for m in index.modules}
    if "linear4bit" in kinds:
        return "nf4", True
    if "linear8bit" in kinds:
        return "int8", False
    return None, True


def resolve_weight_dtype(
    model: nn.Module, dtype: Any, notes: list[str], index: ModelIndex | None = None
) -> torch.dtype:
    """The weight dtype to estimate for: ``dtype`` as given (bf16, fp16, fp32 or a torch dtype), else the model's;
    a meta model's from its config, else bf16 (which it adds to ``notes``). ``index``: as for ``model_dims``."""
    if dtype is not None:
        if isinstance(dtype, torch.dtype):
            return dtype
        key = str(dtype).lower().replace("torch.", "")
        if key not in _DTYPES:
            raise UsageError(
                f"`dtype` must be bf16, fp16 or fp32, got {dtype!r}.{did_you_mean(key, _DTYPES)}"
            )
        return _DTYPES[key]
    index = index if index is not None else index_model(model)
    if index.weight_dtype is None:
        return torch.bfloat16
    if index.is_meta:
        configured = getattr(getattr(base_model_of(model), "config", None), "dtype", None)
        if isinstance(configured, torch.dtype):
            return configured
        if isinstance(configured, str) and configured.replace("torch.", "") in _DTYPES:
            return _DTYPES[configured.replace("torch.", "")]
        notes.append("config names no dtype: assumed bf16 weights")
        return torch.bfloat16
    return index.weight_dtype
