"""The runs and checkpoints on disk, read from the checkpoints themselves: each ``checkpoint-N`` directory's
``trainer_state.json`` (the Trainer's own record: step, loss and eval-loss history) and its files (time written,
size, where the adapter weights are). Nothing is kept on the side: what is listed is what the directories hold.

``runs(model)`` looks where that model's runs go: the output directory of its last run in this session and the
runs named after its architecture in the default runs directory (``lora_runs/<model type>-<time>``). ``runs(path)``
looks in one directory: a checkpoint, a run directory (holding checkpoints) or a directory of runs. ``runs()``
looks in the default runs directory and the output directories of this session's runs. A directory that is not
a run, or a checkpoint that cannot be read, is listed with a one-word reason instead of its figures.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .. import runs as run_registry
from ..errors import UsageError
from ..modelinfo import base_model_of
from .checkpoints import history_of

__all__ = ["RUNS_DIR", "CheckpointRow", "RunList", "run_name_prefix", "runs"]

RUNS_DIR = Path("lora_runs")  # where a run without an output_dir writes: lora_runs/<model type>-<time>
_STATE = "trainer_state.json"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_NUMBERED = re.compile(r"^checkpoint-(\d+)$")


def run_name_prefix(model: nn.Module) -> str:
    """The start of the default run directory's name for ``model``: its model type and a dash ("llama-")."""
    name = getattr(getattr(base_model_of(model), "config", None), "model_type", None) or "model"
    return f"{name}-"


@dataclass(frozen=True)
class CheckpointRow:
    """One checkpoint (or one run directory without a usable checkpoint: then ``problem`` says why, in a word).

    ``adapter``: the directory ``load`` takes (the checkpoint itself, or its sub-directory named after a
    non-default adapter, ``adapter_name``). ``written``: when ``trainer_state.json`` was written (seconds since
    the epoch). ``size``: bytes of every file in the checkpoint. ``best``: the Trainer's best checkpoint of the run.
    """

    run: Path
    checkpoint: Path | None = None
    step: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    written: float | None = None
    size: int | None = None
    problem: str | None = None
    adapter: Path | None = None
    adapter_name: str | None = None
    best: bool = False

    @property
    def usable(self) -> bool:
        """True for a checkpoint that can be resumed from and loaded (no problem found)."""
        return self.problem is None and self.checkpoint is not None


@dataclass(frozen=True)
class RunList:
    """The runs and checkpoints found in ``searched``: ``rows`` grouped by run (runs with a usable checkpoint
    first, the most recently written first), checkpoints by step. ``variable``: the model variable the resume/load code of the renderings names."""

    rows: tuple[CheckpointRow, ...]
    searched: tuple[Path, ...]
    variable: str = "model"

    @property
    def checkpoints(self) -> list[CheckpointRow]:
        """The usable checkpoints."""
        return [row for row in self.rows if row.usable]

    @property
    def latest(self) -> CheckpointRow | None:
        """The most recently written usable checkpoint (the highest step among equals), or None."""
        return max(self.checkpoints, key=lambda r: (r.written or 0.0, r.step or 0), default=None)

    @property
    def run_dirs(self) -> list[Path]:
        """The run directories, in the order listed."""
        return list(dict.fromkeys(row.run for row in self.rows))

    def __repr__(self) -> str:
        where = ", ".join(str(p) for p in self.searched) or "nowhere"
        return f"<RunList: {len(self.run_dirs)} runs, {len(self.checkpoints)} checkpoints in {where}>"


def runs(path_or_model: Any = None, *, variable: str = "model") -> RunList:
    """The runs and checkpoints on disk, as a ``RunList`` (a table in a notebook): for a model, where its runs
    went (its last run's output_dir, and its runs in ``lora_runs/``); for a directory, what it holds; for None,
    ``lora_runs/`` and this session's runs. ``variable`` names the model in the resume/load code shown."""
    if not isinstance(variable, str) or not variable.isidentifier():
        raise UsageError(f"`variable` must be a variable name, got {variable!r}.")
    if isinstance(path_or_model, nn.Module):
        return _collect(_model_dirs(path_or_model), variable)
    if path_or_model is None:
        dirs = [(RUNS_DIR, "root", None)]
        for run in run_registry.recent_runs():
            if getattr(
                run, "output_dir", None
            ):  # a run registered without one (not the engine's) has no files
                dirs.append((Path(run.output_dir), "run", None))
        return _collect(dirs, variable)
    if not isinstance(path_or_model, (str, os.PathLike)):
        raise UsageError(
            f"`path_or_model` must be a model, a directory or None, got {type(path_or_model).__name__}: "
            f"{path_or_model!r:.60}."
        )
    path = Path(path_or_model)
    if not path.exists():
        raise UsageError(
            f"`path` {str(path)!r} does not exist; give a run directory, a directory of runs (e.g. "
            f"{str(RUNS_DIR)!r}) or a model."
        )
    if not path.is_dir():
        raise UsageError(f"`path` {str(path)!r} is a file; give a run directory or a directory of runs.")
    return _collect([(path, "any", None)], variable)


def _model_dirs(model: nn.Module) -> list[tuple[Path, str, str | None]]:
    dirs: list[tuple[Path, str, str | None]] = []
    last = run_registry.last_run(model)
    if last is not None:
        dirs.append((Path(last.output_dir), "run", None))
    dirs.append((RUNS_DIR, "root", run_name_prefix(model)))
    return dirs


def _collect(dirs: list[tuple[Path, str, str | None]], variable: str) -> RunList:
    """``dirs``: (directory, what it is — "run", "root" (a directory of runs) or "any" — and for a root the
    prefix of the runs' names to list)."""
    groups: dict[Path, list[CheckpointRow]] = {}  # resolved run directory -> its rows

    def add_run(run: Path) -> None:
        key = run.resolve()
        if key not in groups:
            groups[key] = _run_rows(run)

    searched: list[Path] = []
    for path, kind, prefix in dirs:
        if path in searched:
            continue
        searched.append(path)
        if kind == "root":
            for child in _subdirs(path):
                if prefix is None or child.name.startswith(prefix):
                    add_run(child)
        elif kind == "any" and _is_checkpoint(path):
            groups[path.resolve()] = [_checkpoint_row(path.parent, path)]
        elif kind == "any" and not _checkpoint_dirs(path) and any(_holds_a_run(c) for c in _subdirs(path)):
            for child in _subdirs(path):  # a directory of runs
                add_run(child)
        else:
            add_run(path)

    def order(item: tuple[Path, list[CheckpointRow]]) -> tuple:
        # runs with a usable checkpoint first, the most recently written first; then the rest
        rows = item[1]
        usable = any(r.usable for r in rows)
        return (not usable, -max((r.written or 0.0 for r in rows), default=0.0), str(item[0]))

    ordered = sorted(groups.items(), key=order)
    rows = tuple(row for _, group in ordered for row in group)
    return RunList(rows, tuple(searched), variable)


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except OSError:
        return []


def _holds_a_run(path: Path) -> bool:
    return _is_checkpoint(path) or bool(_checkpoint_dirs(path))


def _is_checkpoint(path: Path) -> bool:
    return (path / _STATE).is_file() or bool(_NUMBERED.match(path.name))


def _checkpoint_dirs(run: Path) -> list[tuple[int, Path]]:
    try:
        found = [(int(m.group(1)), p) for p in run.iterdir() if (m := _NUMBERED.match(p.name)) and p.is_dir()]
    except OSError:
        return []
    return sorted(found)


def _run_rows(run: Path) -> list[CheckpointRow]:
    """The rows of one run directory: one per checkpoint, or one saying why there is none."""
    if not run.exists():
        return [CheckpointRow(run, problem="missing")]
    try:
        entries = list(run.iterdir())
    except OSError:
        return [CheckpointRow(run, problem="unreadable")]
    checkpoints = _checkpoint_dirs(run)
    if checkpoints:
        return [_checkpoint_row(run, path) for _, path in checkpoints]
    if (run / _STATE).is_file():  # a checkpoint directory under another name
        return [_checkpoint_row(run.parent, run)]
    return [CheckpointRow(run, problem="empty" if not entries else "foreign", written=_mtime(run))]


def _checkpoint_row(run: Path, path: Path) -> CheckpointRow:
    numbered = _NUMBERED.match(path.name)
    step = int(numbered.group(1)) if numbered else None
    base = {"run": run, "checkpoint": path, "step": step, "written": _mtime(path), "size": _size(path)}
    state_file = path / _STATE
    if not state_file.is_file():
        return CheckpointRow(**base, problem="incomplete")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except OSError:
        return CheckpointRow(**base, problem="unreadable")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return CheckpointRow(**base, problem="damaged")
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return CheckpointRow(**base, problem="foreign")
    base["step"] = state["global_step"]
    base["written"] = _mtime(state_file)
    history, evals = history_of(state)
    train = [r["loss"] for r in history if r["step"] <= state["global_step"]]
    evals = [r["eval_loss"] for r in evals if r["step"] <= state["global_step"]]
    best = state.get("best_model_checkpoint")
    base.update(
        train_loss=train[-1] if train else None,
        eval_loss=evals[-1] if evals else None,
        best=isinstance(best, str) and Path(best).name == path.name,
    )
    adapter, name = _adapter_of(path)
    if adapter is None:
        return CheckpointRow(**base, problem="no-adapter")
    return CheckpointRow(**base, adapter=adapter, adapter_name=name)


def _adapter_of(path: Path) -> tuple[Path | None, str | None]:
    """Where the checkpoint's adapter weights are: the checkpoint itself (the adapter "default"), or the
    sub-directory named after another adapter."""
    if any((path / w).is_file() for w in _WEIGHTS):
        return path, None
    for sub in _subdirs(path):
        if any((sub / w).is_file() for w in _WEIGHTS):
            return sub, sub.name
    return None, None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _size(path: Path) -> int | None:
    total = 0
    try:
        for root, _, files in os.walk(path, onerror=None, followlinks=False):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    continue
    except OSError:
        return None
    return total
