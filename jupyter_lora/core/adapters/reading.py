"""Reading a saved adapter directory back — what it holds, and whether it fits a model — before ``load`` touches
the model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .. import targets
from ..errors import AdapterMismatchError, UsageError, did_you_mean
from ..modelinfo import base_model_of

__all__ = ["check_adapter_fits", "read_adapter_dir"]


def read_adapter_dir(path: str | os.PathLike) -> tuple[Path, dict]:
    """``(directory, adapter_config.json contents)`` of the saved LoRA adapter at ``path`` (a directory, or a
    file in it); a ``UsageError`` that says what is there instead when it is not one."""
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"`path` must be a directory path, got {path!r}.")
    source = Path(path).expanduser()
    if not source.exists():
        parent = source.parent if str(source.parent) else Path(".")
        nearby = [p.name for p in parent.iterdir()] if parent.is_dir() else []
        raise UsageError(
            f"No saved adapter at `path` {str(source)!r}: it does not exist.{did_you_mean(source.name, nearby)}"
        )
    if source.is_file():
        source = source.parent
    config_file = source / "adapter_config.json"
    if not config_file.exists():
        if (source / "config.json").exists():
            raise UsageError(
                f"`path` {str(source)!r} holds a full model (config.json), not an adapter. Load it with "
                "AutoModel...from_pretrained(path), or point `load` at an adapter directory."
            )
        raise UsageError(
            f"`path` {str(source)!r} has no adapter_config.json, so it is not a saved PEFT adapter. Point it at "
            "the directory that `save` wrote."
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{str(config_file)!r} is not valid JSON ({exc}); the adapter files are damaged."
        ) from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise UsageError(
            f"The adapter at {str(source)!r} is of type {config.get('peft_type')!r}; only LoRA adapters load here."
        )
    return source, config


def _saved_shapes(source: Path) -> dict[str, tuple[int, ...]]:
    st_file = source / "adapter_model.safetensors"
    if st_file.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(st_file), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
        except Exception as exc:
            raise UsageError(
                f"{str(st_file)!r} cannot be read ({exc}); the adapter file is damaged."
            ) from None
    bin_file = source / "adapter_model.bin"
    if bin_file.exists():
        state = torch.load(bin_file, map_location="meta", weights_only=True)
        return {k: tuple(v.shape) for k, v in state.items()}
    raise UsageError(f"{str(source)!r} has adapter_config.json but no adapter_model.safetensors (or .bin).")


_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")


def check_adapter_fits(model: nn.Module, source: Path, config: dict) -> None:
    """Compare the tensors saved in ``source`` with the model's modules (names and shapes) before the model is
    touched; an ``AdapterMismatchError`` names what does not fit."""
    index = targets.index_model(model)
    missing: list[str] = []
    wrong: list[str] = []
    for key, shape in _saved_shapes(source).items():
        path = key.removeprefix("base_model.model.")
        marker = next((m for m in _LORA_MARKERS if m in path), None)
        if marker is None:  # a trained head, a bias or a saved embedding matrix
            module_path = path.rsplit(".", 1)[0].replace(".base_layer", "")
            if module_path not in index.module_types and module_path not in missing:
                missing.append(module_path)
            continue
        module_path = path.split(marker)[0]
        info = index.by_path.get(module_path)
        if info is None:
            if module_path not in missing:
                missing.append(module_path)
            continue
        expected = None
        if len(shape) == 2 and marker in (".lora_A.", ".lora_embedding_A"):
            expected = (shape[0], info.in_features)
        elif len(shape) == 2 and marker in (".lora_B.", ".lora_embedding_B"):
            expected = (info.out_features, shape[1])
        if expected is not None and tuple(shape) != expected:
            wrong.append(
                f"`{module_path}` is {info.in_features}→{info.out_features} but the adapter's "
                f"{marker.strip('.')} is {tuple(shape)}"
            )
    if not missing and not wrong:
        return
    problems = [*wrong[:2]]
    if missing:
        shown = ", ".join(f"`{m}`" for m in missing[:2])
        problems.append(f"{len(missing)} module(s) it adapts do not exist here, e.g. {shown}")
    saved_for = config.get("base_model_name_or_path")
    here = getattr(getattr(base_model_of(model), "config", None), "_name_or_path", "") or index.model_type
    origin = f" It was saved from {saved_for!r}; this model is {here!r}." if saved_for else ""
    raise AdapterMismatchError(
        f"The adapter at `path` {str(source)!r} does not fit this model: {'; '.join(problems)}.{origin} "
        "Load it into the base model it was trained on."
    )
