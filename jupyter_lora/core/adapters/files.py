"""Adapters on disk: ``save`` (PEFT format, or the merged model), written atomically — staged in a hidden
directory beside the target and swapped into place in one step. Reading a saved adapter back is ``reading.py``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ..errors import UsageError
from .guards import require_adapter, require_adapters
from .merging import save_merged
from .peft_facts import active_names, adapts_embeddings

__all__ = ["fsync_tree", "install_staged", "save", "stage_dir"]


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
