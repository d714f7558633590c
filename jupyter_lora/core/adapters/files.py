"""Adapters on disk: ``save`` (PEFT format, or the merged model), written atomically — staged in a hidden
directory beside the target and swapped into place in one step. A save replaces only what an earlier save wrote
there (recorded in a small manifest); anything else in the directory is kept. Reading a saved adapter back is
``reading.py``."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import UsageError
from ..units import fmt_bytes
from .guards import require_adapter, require_adapters
from .merging import save_merged
from .peft_facts import active_names, adapts_embeddings

__all__ = ["MANIFEST", "disk_errors", "fsync_tree", "install_staged", "os_error_message", "save", "stage_dir"]

_log = logging.getLogger(__name__)

#: The file every save writes beside what it saves: which kind of save it was and the names it wrote (with each
#: file's size and modification time). A later save to the same directory replaces exactly those names, and only
#: while they are unchanged. Recognising saves by the file names PEFT and transformers use would be guesswork:
#: a directory with ``config.json`` may be anyone's model, the names change with sharding and library versions,
#: and a file we wrote may have been edited since; the manifest knows.
MANIFEST = ".jupyter_lora_save.json"

_KINDS = {"adapter": "an adapter", "merged": "a merged model"}


# --------------------------------------------------------------------------------------------------- the target


def _check_save_path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise UsageError(f"`path` must be a directory path, got {path!r}. E.g. save(model, 'adapters/run1').")
    target = Path(path).expanduser()
    _check_name_lengths(target)
    if target.is_symlink() and target.is_dir():  # a link to storage elsewhere: the save lands there
        target = target.resolve()
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
    return target


def _check_name_lengths(target: Path) -> None:
    """Refuse a name longer than the file system allows before anything is written."""
    existing = next((p for p in (target, *target.parents) if _exists(p)), Path("."))
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in target.parts:
        size = len(os.fsencode(part))
        if size > limit:
            shown = str(target).replace(part, part[:24] + "…")
            raise UsageError(
                f"`path` {shown!r} has a name of {len(part)} characters ({size} bytes); this file system allows "
                f"at most {limit} bytes per name. Choose a shorter name."
            )


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _shown(names: list[str], root: Path, limit: int = 5) -> str:
    """'notes.md, eval_logs/' (directories with a slash), at most ``limit`` names then how many more."""
    marked = [n + "/" if (root / n).is_dir() and not (root / n).is_symlink() else n for n in sorted(names)]
    more = f" and {len(marked) - limit} more" if len(marked) > limit else ""
    return ", ".join(marked[:limit]) + more


@dataclass
class _Contents:
    """What a directory holds, from the point of view of a new save into it."""

    # "adapter" or "merged": the kind of the save recorded there; None: no save of ours
    kind: str | None = None
    ours: list[str] = field(default_factory=list)  # names that save wrote, unchanged since
    changed: list[str] = field(default_factory=list)  # names that save wrote, changed since
    others: list[str] = field(default_factory=list)  # everything else: the user's files, kept by every save


def _entry_facts(path: Path) -> dict:
    info = path.lstat()
    if stat.S_ISDIR(info.st_mode):
        return {"dir": True}
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _read_contents(target: Path) -> _Contents:
    if not target.is_dir():
        return _Contents()
    names = sorted(os.listdir(target))
    try:
        manifest = json.loads((target / MANIFEST).read_text())
        kind, written = manifest["kind"], manifest["files"]
        if kind not in _KINDS or not isinstance(written, dict):
            raise ValueError(kind)
    except (OSError, ValueError, KeyError, TypeError):
        return _Contents(others=names)
    contents = _Contents(kind=kind)
    for name in names:
        if name == MANIFEST:
            continue
        if name not in written:
            contents.others.append(name)
        elif _entry_facts(target / name) == written[name]:
            contents.ours.append(name)
        else:
            contents.changed.append(name)
    return contents


def _check_replaceable(target: Path, contents: _Contents, kind: str, overwrite: bool) -> None:
    """The refusals that can be made before anything is written."""
    if overwrite:
        return
    t = str(target)
    if contents.kind is None and contents.others:
        raise UsageError(
            f"`path` {t!r} is a non-empty directory that holds no save of jupyter_lora "
            f"({_shown(contents.others, target)}); saving there could replace these files. Choose an empty or new "
            "directory, or pass overwrite=True (`--overwrite` in %lora save) to save beside them (files of the same name are replaced)."
        )
    if contents.kind is not None and contents.kind != kind:
        switch = "merged=True" if contents.kind == "merged" else "merged=False"
        earlier = _shown(contents.ours + contents.changed, target)
        raise UsageError(
            f"`path` {t!r} holds {_KINDS[contents.kind]} saved earlier ({earlier}); saving "
            f"{_KINDS[kind]} there would replace it. Choose another `path`, save with {switch} to update it, or "
            "pass overwrite=True (`--overwrite` in %lora save) to replace it (other files in the directory are kept)."
        )
    if contents.changed:
        raise UsageError(
            f"`path` {t!r}: {_shown(contents.changed, target)} changed after the last save there; saving again "
            "would replace the changes. Move the files away, or pass overwrite=True (`--overwrite` in %lora save) to replace them."
        )


# --------------------------------------------------------------------------------------------------- staging


_HOST = hashlib.sha1(socket.gethostname().encode(errors="replace")).hexdigest()[:8]
# A leftover is stale when its process (on this host) is gone, or when it is older than any save takes (its
# owner cannot be asked: another host, an older version, a reused process id).
_STALE_AFTER_S = 24 * 3600


def _sibling_prefix(target: Path) -> str:
    """'.NAME.' — the start of every hidden directory a save to ``target`` makes beside it (a long name is
    shortened and made unique with a hash, so that the hidden names stay within the file system's limit)."""
    name = target.name
    if len(os.fsencode(name)) > 120:
        digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:12]
        while len(os.fsencode(name)) > 100:
            name = name[:-1]
        name = f"{name}~{digest}"
    return f".{name}."


def _sibling(target: Path, role: str) -> Path:
    """A free hidden name beside ``target`` for ``role`` ('saving' or 'previous'); it names this host and process
    so that a later save can tell a leftover of a killed save from the work of a live one."""
    return target.with_name(f"{_sibling_prefix(target)}{role}-{_HOST}.{os.getpid()}.{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _leftovers(target: Path) -> Iterator[tuple[Path, str]]:
    """Hidden directories beside ``target`` left by saves that were killed: (path, 'saving' or 'previous')."""
    prefix = _sibling_prefix(target)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
            continue
        rest = entry.name[len(prefix) :]
        ours = re.fullmatch(r"(saving|previous)-([0-9a-f]{8})\.(\d+)\.[0-9a-f]{8}", rest)
        # names of earlier versions: tempfile.mkdtemp's 'saving-XXXXXXXX', 'previous-PID'
        legacy = re.fullmatch(r"(saving)-[0-9a-z_]{8}|(previous)-\d+", rest)
        if not (ours or legacy):
            continue
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if ours:
            role = ours[1]
            dead = ours[2] == _HOST and os.name == "posix" and not _alive(int(ours[3]))
        else:
            role, dead = legacy[1] or legacy[2], False
        if dead or age > _STALE_AFTER_S:
            yield Path(entry.path), role


def _recover(target: Path) -> None:
    """Put back the previous save if a killed save left ``target`` missing (moved aside, the new one not yet in
    place), and remove the staging directories of killed saves to ``target``."""
    if not _exists(target):
        previous = [(p.stat().st_mtime, p) for p, role in _leftovers(target) if role == "previous"]
        if previous:
            os.rename(max(previous)[1], target)
            _log.info("Restored the save at %s that an interrupted save had moved aside.", target)
    _remove_stale_stages(target)


def _remove_stale_stages(target: Path) -> None:
    for path, role in list(_leftovers(target)):
        if role == "saving":
            shutil.rmtree(path, ignore_errors=True)


def _adopt_mode(directory: Path, target: Path) -> None:
    """Give ``directory`` the mode (and group, where allowed) of the existing ``target``, so that a re-save keeps a
    shared directory shared. A new directory keeps the mode it was made with (0o777 less the umask)."""
    try:
        info = target.stat()
    except OSError:
        return
    if not stat.S_ISDIR(info.st_mode):
        return
    try:
        if directory.stat().st_gid != info.st_gid:
            os.chown(directory, -1, info.st_gid)
        os.chmod(directory, stat.S_IMODE(info.st_mode))  # after chown, which may clear the setgid bit
    except OSError:
        pass


def stage_dir(target: Path) -> Path:
    """A new empty directory beside ``target`` to write into before ``install_staged`` puts it in place. It has
    the mode ``target`` has, or for a new target the mode any new directory gets (0o777 less the umask). Staging
    directories of killed saves to ``target`` are removed first."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_stages(target)
        while True:
            stage = _sibling(target, "saving")
            try:
                os.mkdir(stage, 0o777)  # the umask applies, as for any directory PEFT or transformers makes
                break
            except FileExistsError:
                continue
    except PermissionError:
        raise UsageError(
            f"Cannot save to `path` {str(target)!r}: no permission to write in {str(parent)!r}. Choose a directory you "
            "can write to (e.g. under your home or the notebook's folder)."
        ) from None
    except OSError as exc:
        raise UsageError(
            os_error_message(target, exc) or f"Cannot save to `path` {str(target)!r}: {exc}."
        ) from None
    _adopt_mode(stage, target)
    return stage


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


def install_staged(staged: Path, target: Path, replaced: Collection[str] = ()) -> None:
    """Make the directory ``staged`` appear at ``target`` in one step; the old ``target`` (if any) stays whole
    until then. ``staged`` must be on the same file system (a sibling of ``target``). Of the old directory, only
    the names in ``replaced`` and those ``staged`` also holds are dropped: anything else found there (a file the
    user added while the save was being written) is moved into the new directory."""
    if not target.exists():
        os.rename(staged, target)
        _fsync_dir(target.parent)
        return
    old = _sibling(target, "previous")
    if _exchange(staged, target):
        try:
            os.rename(staged, old)
        except OSError:
            old = staged  # the old directory now has the staging name: sort it out from there
    else:
        # Two renames: the previous save is kept aside until the new one is in place (a save killed in between
        # leaves no `target`; the next save to it puts the previous one back).
        os.rename(target, old)
        try:
            os.rename(staged, target)
        except BaseException:
            os.rename(old, target)
            raise
    _fsync_dir(target.parent)
    try:
        _move_missing(old, target, skip=set(replaced))
        trash = _sibling(target, "saving")  # a kill while deleting leaves a leftover the next save removes
        os.rename(old, trash)
    except OSError as exc:  # the new directory is in place; the old one stays where it is, whole
        warnings.warn(
            f"Saved to {str(target)!r}, but what was there before could not be sorted out ({exc.strerror or exc}); "
            f"it is kept in {str(old)!r}.",
            UserWarning,
            stacklevel=2,
        )
        return
    shutil.rmtree(trash, ignore_errors=True)


def _move_missing(old: Path, new: Path, skip: Collection[str] = ()) -> None:
    """Move into ``new`` every entry of ``old`` that ``new`` lacks (except the names in ``skip``), through
    directories both hold."""
    for entry in os.scandir(old):
        if entry.name in skip:
            continue
        there = new / entry.name
        if not os.path.lexists(there):
            os.rename(entry.path, there)
        elif entry.is_dir(follow_symlinks=False) and there.is_dir() and not there.is_symlink():
            _move_missing(Path(entry.path), there)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync directories
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------- keeping files


def _keep(source: Path, into: Path) -> None:
    """Make ``into`` hold what ``source`` holds, as hard links (copies where the file system has none), so that the
    directory swapped in keeps the user's files while the old one stays whole until the swap."""
    if not source.is_dir() or source.is_symlink():
        _link(source, into)
        return

    def fail(exc: OSError) -> None:
        raise exc

    made = []
    for dirpath, dirnames, filenames in os.walk(source, onerror=fail):
        here = Path(dirpath)
        out = into / os.path.relpath(here, source)
        os.mkdir(out)
        made.append((here, out))
        for name in [d for d in dirnames if (here / d).is_symlink()]:
            dirnames.remove(name)
            filenames.append(name)
        for name in filenames:
            _link(here / name, out / name)
    for here, out in reversed(made):
        shutil.copystat(here, out)
        _adopt_mode(out, here)


def _link(source: Path, into: Path) -> None:
    try:
        os.link(source, into, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        shutil.copy2(source, into, follow_symlinks=False)


# --------------------------------------------------------------------------------------------------- errors


def os_error_message(target: Path, exc: BaseException) -> str | None:
    """A one-line message for a disk or file-system error while saving to ``target``; None for other errors."""
    code = getattr(exc, "errno", None)
    if code is None:  # safetensors reports I/O errors as "... (os error 28)"
        found = re.search(r"\(os error (\d+)\)", str(exc))
        code = int(found[1]) if found else None
    t = str(target)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        try:
            left = shutil.disk_usage(target.parent).free
        except OSError:
            left = None
        # ENOSPC also means no inodes (or a quota) left while bytes are free: quote the bytes only when few remain
        free = (
            f" ({fmt_bytes(left)} free in {str(target.parent)!r})"
            if left is not None and left < 2**30
            else ""
        )
        reason = {
            errno.EDQUOT: "the disk quota is used up",
            errno.EFBIG: "a file is too large for the file system",
        }
        return (
            f"Cannot save to `path` {t!r}: {reason.get(code, 'no space left on the device (bytes or inodes)')}"
            f"{free}; nothing was changed there. Free some space, or choose a `path` on another disk."
        )
    if code == errno.ENAMETOOLONG:
        return (
            f"Cannot save to `path` {t!r}: a name is too long for the file system. Choose a shorter `path`."
        )
    if code == errno.EROFS:
        return (
            f"Cannot save to `path` {t!r}: the file system is read-only. Choose a directory you can write to."
        )
    if code in (errno.EACCES, errno.EPERM):
        what = getattr(exc, "filename", None) or str(target.parent)
        return f"Cannot save to `path` {t!r}: no permission to write {str(what)!r}. Choose a directory you can write to."
    return None


@contextmanager
def disk_errors(target: Path) -> Iterator[None]:
    """Turn a full disk, a name too long, a read-only file system or a missing permission into a UsageError."""
    try:
        yield
    except UsageError:
        raise
    except Exception as exc:
        message = os_error_message(target, exc) if isinstance(exc, OSError) or _is_safetensors(exc) else None
        if message is None:
            raise
        raise UsageError(message) from None


def _is_safetensors(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("safetensors")


# --------------------------------------------------------------------------------------------------- save


def save(
    model: nn.Module,
    path: str | os.PathLike,
    merged: bool = False,
    name: str | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save the active adapter (or ``name``) to ``path`` in PEFT format (safetensors) — loadable with
    ``PeftModel.from_pretrained(base, path)``. ``merged=True`` saves the full model with the adapter folded in
    (the live model stays adapted).

    Saving again to the same ``path`` replaces what the earlier save wrote there (a hidden manifest lists it) and
    keeps every other file in the directory (notes, logs). A save is refused, and nothing changes, when ``path``
    holds files but no save of this package, holds the other kind (an adapter where a merged model was saved, or
    the reverse), or holds files of the earlier save that were changed since. ``overwrite=True`` saves anyway: the
    earlier save's files and any file of the same name as a new one are replaced (a warning names the ones that
    were not from a save of this kind); other files are still kept.

    The write is atomic: a failure, a full disk or a killed process leaves any earlier save at ``path`` intact.
    A new directory gets the mode any new directory gets (0o777 less the umask); a re-save keeps the mode the
    directory had.
    """
    peft_model = require_adapters(model, "save")
    if not isinstance(overwrite, bool):
        raise UsageError(f"`overwrite` must be True or False, got {overwrite!r}.")
    target = _check_save_path(path)
    name = name or active_names(peft_model)[0]
    require_adapter(peft_model, name)
    kind = "merged" if merged else "adapter"
    with disk_errors(target):
        _recover(target)
        contents = _read_contents(target)
    _check_replaceable(target, contents, kind, overwrite)
    stage = stage_dir(target)
    try:
        with disk_errors(target):
            stage = src = _write(peft_model, name, merged, stage, target)
            written = sorted(os.listdir(src))
            in_the_way = sorted(set(written) & set(contents.others + contents.changed))
            if in_the_way and not overwrite:
                raise UsageError(
                    f"`path` {str(target)!r} holds {_shown(in_the_way, target)}, not written by an earlier save, "
                    "and the new save writes files of the same name. Move them away, or pass overwrite=True (`--overwrite` in %lora save) to "
                    "replace them."
                )
            fsync_tree(src)
            facts = {n: _entry_facts(src / n) for n in written}
            manifest = {"saved_by": "jupyter_lora", "kind": kind, "files": facts}
            (src / MANIFEST).write_text(json.dumps(manifest, indent=1))
            for kept in sorted(set(contents.others + contents.changed) - set(written)):
                _keep(target / kept, src / kept)
            _fsync_file(src / MANIFEST)
            _fsync_dir(src)
            install_staged(src, target, replaced=contents.ours)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _report(target, contents, kind, in_the_way)
    return target


def _write(peft_model: nn.Module, name: str, merged: bool, stage: Path, target: Path) -> Path:
    """Write the save into ``stage``; returns the directory that holds it (a sibling of ``target``)."""
    if merged:
        save_merged(peft_model, name, stage)
        return stage
    # PEFT's "auto" also writes the base embedding matrices when an embedding is adapted (the plan counts
    # them); say so explicitly to skip its warning and its Hub lookup for the other case.
    peft_model.save_pretrained(
        str(stage), selected_adapters=[name], safe_serialization=True,
        save_embedding_layers=True if adapts_embeddings(peft_model, name) else "auto",
    )  # fmt: skip
    if name == "default":
        return stage
    # PEFT writes a named adapter into a subdirectory of that name: that subdirectory is the save.
    moved = _sibling(target, "saving")
    os.rename(stage / name, moved)
    card = (
        stage / "README.md"
    )  # PEFT writes the model card beside the subdirectory: it belongs to the save too
    if card.is_file() and not (moved / "README.md").exists():
        os.rename(card, moved / "README.md")
    shutil.rmtree(stage, ignore_errors=True)
    _adopt_mode(moved, target)
    return moved


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _report(target: Path, contents: _Contents, kind: str, in_the_way: list[str]) -> None:
    """Say what the save replaced: a warning for what ``overwrite=True`` replaced beyond an earlier save of the
    same kind, a log line for a plain re-save."""
    forced = sorted(in_the_way + (contents.ours if contents.kind not in (None, kind) else []))
    if forced:
        warnings.warn(
            f"save(overwrite=True) replaced in {str(target)!r}: {', '.join(forced)}.",
            UserWarning,
            stacklevel=3,
        )
    elif contents.ours:
        _log.info("Replaced the earlier save in %s: %s.", target, ", ".join(contents.ours))
