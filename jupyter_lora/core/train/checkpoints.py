"""The Trainer's checkpoints, read safely: find the newest one, read its state (JSON), and check that it fits the
model before a resume changes anything — adapter tensors against the live adapter (from the safetensors header,
no tensor loaded), and every pickled file of the Trainer (optimizer, scheduler, RNG, gradient scaler) read with
``torch.load(weights_only=True)`` so that no checkpoint file can run code."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.peft_facts import active_names
from ..errors import UsageError

__all__ = [
    "check_checkpoint",
    "history_of",
    "latest_checkpoint",
    "read_state",
    "saved_settings",
    "trainer_settings",
]

_STATE = "trainer_state.json"
_ADAPTER = "adapter_model.safetensors"
_PICKLED = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")
_NUMBERED = re.compile(r"^checkpoint-(\d+)$")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` directory under ``output_dir`` (None if there is none)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _NUMBERED.match(p.name)) and (p / _STATE).is_file()
    ]
    return max(found)[1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json`` as a dict (a UsageError when it is not readable JSON)."""
    try:
        state = json.loads((path / _STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"`checkpoint` {str(path)!r}: {_STATE} cannot be read ({exc}).") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise UsageError(f"`checkpoint` {str(path)!r}: {_STATE} is not a Trainer state (no global_step).")
    return state


def saved_settings(path: Path) -> dict[str, Any]:
    """The training settings a checkpoint written here records (``jupyter_lora.json``; {} for a plain Trainer's)."""
    file = path / "jupyter_lora.json"
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8")).get("config", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise UsageError(f"`checkpoint` {str(path)!r}: {file.name} cannot be read ({exc}).") from None
    if not isinstance(config, dict):
        raise UsageError(f"`checkpoint` {str(path)!r}: {file.name} holds no settings.")
    return config


def history_of(state: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The loss and eval records of a run up to its checkpoint, from the Trainer's ``log_history``."""
    history, evals = [], []
    for entry in state.get("log_history") or ():
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        try:
            if "loss" in entry:
                history.append({"step": entry["step"], "loss": float(entry["loss"]),
                                "lr": float(entry.get("learning_rate", 0.0)), "tokens": 0,
                                "epoch": float(entry.get("epoch", 0.0)), "time": 0.0})  # fmt: skip
            if "eval_loss" in entry:
                record = {"step": entry["step"], "eval_loss": float(entry["eval_loss"]),
                          "epoch": float(entry.get("epoch", 0.0))}  # fmt: skip
                if "eval_accuracy" in entry:
                    record["accuracy"] = float(entry["eval_accuracy"])
                evals.append(record)
        except (TypeError, ValueError):  # a record that is not numbers: the chart leaves it out
            continue
    return history, evals


def check_checkpoint(path: Path, peft_model: nn.Module) -> tuple[Path, dict[str, Any]]:
    """``path`` (a checkpoint, or a run directory holding checkpoints) checked against ``peft_model``; returns the
    checkpoint directory and its Trainer state. Raises a UsageError naming what does not fit; reads, never
    writes."""
    if not path.exists():
        raise UsageError(
            f"`checkpoint` {str(path)!r} does not exist; give a checkpoint-N directory or its run directory."
        )
    if path.is_dir() and not (path / _STATE).exists():
        inner = latest_checkpoint(path)
        path = inner if inner is not None else path
    if not path.is_dir() or not (path / _STATE).is_file():
        raise UsageError(f"`checkpoint` {str(path)!r} is not a training checkpoint (no {_STATE}).")
    state = read_state(path)
    name = active_names(peft_model)[0]
    folder = path if name == "default" else path / name
    weights = folder / _ADAPTER
    if not weights.is_file():
        raise UsageError(
            f"`checkpoint` {str(path)!r} has no adapter weights for adapter {name!r} ({weights.name})."
        )
    _check_tensors(path, weights, peft_model, name)
    _check_pickles(path)
    if not (path / "optimizer.pt").is_file():
        warnings.warn(
            f"`checkpoint` {str(path)!r} has no optimizer.pt: the run continues with a fresh optimizer, so its loss "
            "curve will differ from an uninterrupted run's.",
            UserWarning,
            stacklevel=3,
        )
    return path, state


def trainer_settings(state: dict[str, Any]) -> dict[str, Any]:
    """Settings a plain Trainer's checkpoint implies (its ``trainer_state.json``): the planned steps and the batch,
    so that resuming it continues the run it belongs to."""
    found: dict[str, Any] = {}
    for key, setting in (("max_steps", "steps"), ("train_batch_size", "batch"), ("logging_steps", "log_every"),
                         ("save_steps", "save_every")):  # fmt: skip
        value = state.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found[setting] = value
    return found


def _check_tensors(path: Path, weights: Path, peft_model: nn.Module, name: str) -> None:
    from peft import get_peft_model_state_dict
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(
            f"`checkpoint` {str(path)!r}: {weights.name} is not a safetensors file ({exc})."
        ) from None
    live = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model, adapter_name=name).items()}
    missing = sorted(set(live) - set(saved))
    extra = sorted(set(saved) - set(live))
    shapes = sorted(k for k in set(live) & set(saved) if live[k] != saved[k])
    if missing or extra or shapes:
        problems = []
        if shapes:
            k = shapes[0]
            problems.append(
                f"{len(shapes)} tensors of another shape (e.g. {k}: {saved[k]} saved, {live[k]} here)"
            )
        if missing:
            problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if extra:
            problems.append(f"{len(extra)} tensors this adapter does not have (e.g. {extra[0]})")
        raise UsageError(
            f"`checkpoint` {str(path)!r} does not fit this model's adapter {name!r}: {'; '.join(problems)}. It was "
            "written for another adapter (rank or targets); inject the same settings, or resume the model it came from."
        )


def _check_pickles(path: Path) -> None:
    from transformers.trainer_pt_utils import safe_globals

    for file in _PICKLED:
        found = list(path.glob(file)) + list(path.glob(file.replace(".", "_*.")))  # rng_state_0.pth, ...
        for item in found:
            try:
                with safe_globals():
                    torch.load(item, map_location="cpu", weights_only=True)
            except Exception as exc:
                if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
                    raise UsageError(
                        f"`checkpoint` {str(path)!r}: {item.name} holds Python objects, not only tensors. Checkpoint "
                        "files are never unpickled beyond plain tensors; resume from a checkpoint you trust."
                    ) from None
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                raise UsageError(
                    f"`checkpoint` {str(path)!r}: {item.name} is damaged ({why}); resume from an earlier checkpoint."
                ) from None
