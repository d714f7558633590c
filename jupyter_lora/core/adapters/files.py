"""Adapters on disk: ``save`` (PEFT format, or the merged model), written atomically — staged in a hidden
directory beside the target and swapped into place in one step — and reading a saved adapter directory back
(what it holds, and whether it fits a model) before ``load`` touches the model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .. import targets
from ..errors import AdapterMismatchError, UsageError, did_you_mean
from ..modelinfo import base_model_of
from .guards import require_adapter, require_adapters
from .merging import save_merged
from .peft_facts import active_names, adapts_embeddings

__all__ = ["check_adapter_fits", "fsync_tree", "install_staged", "read_adapter_dir", "save", "stage_dir"]


# --------------------------------------------------------------------------------------------------- atomic writes


def _check_save_path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise UsageError(f"`path` must be a directory path, got {path!r}. E.g. save(model, 'adapters/run1').")
    target = Path(path).expanduser()
    for ancestor in target.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise UsageError(
                    f"Cannot save to `path` {str(target)!r}: {str(ancestor)!r} is a file, not a directory. "
                    "Choose a path inside a directory."
                )
            break
    if target.exists() and not target.is_dir():
        raise UsageError(
            f"`path` {str(target)!r} is an existing file; an adapter is saved as a directory. Choose a new "
            "directory name (e.g. add '_adapter')."
        )
    if target.is_dir() and any(target.iterdir()):
        known = {"adapter_config.json", "config.json"}
        if not any((target / k).exists() for k in known):
            raise UsageError(
                f"`path` {str(target)!r} is a non-empty directory that holds no saved model or adapter; saving "
                "would replace its contents. Choose an empty or new directory."
            )
    return target


def stage_dir(target: Path) -> Path:
    """A new empty directory beside ``target`` to write into before ``install_staged`` puts it in place."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=parent))
    except PermissionError:
        raise UsageError(
            f"Cannot save to `path` {str(target)!r}: no permission to write in {str(parent)!r}. Choose a directory you "
            "can write to (e.g. under your home or the notebook's folder)."
        ) from None
    except OSError as exc:
        raise UsageError(f"Cannot save to `path` {str(target)!r}: {exc.strerror or exc}.") from None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def install_staged(staged: Path, target: Path) -> None:
    """Make the directory ``staged`` appear at ``target`` in one step; the old ``target`` (if any) stays whole
    until then. ``staged`` must be on the same file system (a sibling of ``target``)."""
    if not target.exists():
        os.rename(staged, target)
        return
    if _exchange(staged, target):
        shutil.rmtree(staged, ignore_errors=True)
        return
    # Two renames: the previous save is kept aside until the new one is in place.
    old = target.with_name(f".{target.name}.previous-{os.getpid()}")
    os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------------------- save


def save(model: nn.Module, path: str | os.PathLike, merged: bool = False, name: str | None = None) -> Path:
    """Save the active adapter (or ``name``) to ``path`` in PEFT format (safetensors) — loadable with
    ``PeftModel.from_pretrained(base, path)``. ``merged=True`` saves the full model with the adapter folded in
    (the live model stays adapted). The write is atomic: a failure leaves any earlier save at ``path`` intact.
    """
    peft_model = require_adapters(model, "save")
    target = _check_save_path(path)
    name = name or active_names(peft_model)[0]
    require_adapter(peft_model, name)
    stage = stage_dir(target)
    try:
        if merged:
            save_merged(peft_model, name, stage)
            src = stage
        else:
            # PEFT's "auto" also writes the base embedding matrices when an embedding is adapted (the plan counts
            # them); say so explicitly to skip its warning and its Hub lookup for the other case.
            peft_model.save_pretrained(
                str(stage), selected_adapters=[name], safe_serialization=True,
                save_embedding_layers=True if adapts_embeddings(peft_model, name) else "auto",
            )  # fmt: skip
            src = stage if name == "default" else stage / name
            if src != stage:
                moved = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
                os.rmdir(moved)
                os.rename(src, moved)
                shutil.rmtree(stage)
                stage = src = moved
        fsync_tree(src)
        install_staged(src, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return target


# --------------------------------------------------------------------------------------------------- read


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
