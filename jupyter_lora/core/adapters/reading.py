"""Reading a saved adapter back — from a directory, or from the Hugging Face Hub by id — and checking it before
``load`` touches the model: the files on their own (a config PEFT accepts, finite floating-point tensors whose
ranks agree with the config), then against the model (modules, shapes, task, heads, base weights), then, once
PEFT has built the layers, that every tensor PEFT expects came from the file.

A saved adapter never changes the base model's weights: the initialisation named in its config (PiSSA, OLoRA,
CorDA, LoftQ... which rewrite the base) is not run — the saved tensors replace the initial ones anyway — and a
file that carries base weights of its own is refused unless they equal the model's.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...settings import TASK_TYPES, validate_one
from .. import targets
from ..errors import AdapterMismatchError, UsageError, did_you_mean
from ..modelinfo import ADAPTER_PARAM, base_model_of, detect_task
from .peft_facts import is_modules_to_save_wrapper

__all__ = ["SavedAdapter", "check_adapter_fits", "check_adapter_loaded", "read_adapter"]

_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")
# Config settings under which building the adapter changes the base model itself, which unload cannot undo.
# (an empty KaSA config means KaSA with its defaults; an empty replication list means none)
_BASE_CHANGING = {
    "kasa_config": ("KaSA truncates the base weights with an SVD", lambda v: v is not None),
    "layer_replication": ("layer replication rebuilds the model's stack of layers", bool),
}
# Task types whose PEFT wrapper assumes a model of that kind (generation, a classifier head, a span head...).
_TASK_BOUND = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


@dataclass(frozen=True)
class SavedAdapter:
    """A saved LoRA adapter, read and checked on its own (no model yet)."""

    source: Path  # the directory that holds it (a snapshot in the Hub cache for a Hub id)
    label: str  # the `path` as given, for messages
    config: dict[str, Any]  # adapter_config.json as saved
    shapes: dict[str, tuple[int, ...]]  # every saved tensor's shape, by key
    others: dict[str, torch.Tensor]  # the saved tensors that are not LoRA weights (heads, base weights)

    def peft_config(self, trainable: bool) -> Any:
        """A fresh ``LoraConfig`` for PEFT to build the adapter's layers from: the saved settings with the
        initialisation switched off (the saved tensors replace the initial ones, and an initialisation such as
        PiSSA would rewrite the base weights)."""
        from peft import LoraConfig

        settings = dict(self.config)
        settings.pop("runtime_config", None)  # as PEFT's from_pretrained does: runtime settings are not saved
        # The per-method initialisation settings are used only when an adapter is first created.
        settings.update(loftq_config={}, eva_config=None, corda_config=None, lora_ga_config=None)
        settings.update(init_lora_weights=True, inference_mode=not trainable)
        try:
            return LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**settings))
        except (TypeError, ValueError, ImportError) as exc:
            raise UsageError(
                f"The adapter at `path` {self.label!r} has settings PEFT refuses in adapter_config.json: "
                f"{_one_line(exc)}. Fix the file, or save the adapter again."
            ) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _examples(items: list[str], n: int = 2) -> str:
    shown = ", ".join(f"`{i}`" for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


# --------------------------------------------------------------------------------------------------- locating


def _nearby(source: Path) -> list[str]:
    parent = source.parent if str(source.parent) else Path(".")
    return [p.name for p in parent.iterdir()] if parent.is_dir() else []


def _is_hub_id(path: Any) -> bool:
    if not isinstance(path, str) or path.count("/") != 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def _from_hub(repo_id: str, source: Path) -> Path:
    """The cached snapshot of the Hub adapter ``repo_id``, downloaded first unless offline (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = constants.is_offline_mode()
    here = f"`path` {repo_id!r} is not a local directory, and"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(_FILES), local_files_only=offline))
    except GatedRepoError:
        raise UsageError(
            f"{here} the Hub repository {repo_id!r} is gated: accept its terms on huggingface.co and log in "
            "(`hf auth login`), then load it again."
        ) from None
    except RepositoryNotFoundError:
        raise UsageError(
            f"{here} no Hub repository {repo_id!r} is reachable with your login. Check the id (and log in with "
            f"`hf auth login` if it is private).{did_you_mean(source.name, _nearby(source))}"
        ) from None
    except LocalEntryNotFoundError:
        why = (
            "is not in the local Hub cache while HF_HUB_OFFLINE is set. Download it once while online (unset "
            "HF_HUB_OFFLINE)"
            if offline
            else "cannot be fetched: the Hub is unreachable and it is not in the local Hub cache. Check the "
            "connection"
        )
        raise UsageError(
            f"{here} the Hub adapter {repo_id!r} {why}, or point `path` at a saved adapter directory."
            f"{did_you_mean(source.name, _nearby(source))}"
        ) from None
    except HfHubHTTPError as exc:
        raise UsageError(
            f"{here} the Hub refused {repo_id!r}: {_one_line(exc)}. Try again, or point `path` at a saved "
            "adapter directory."
        ) from None


def _locate(path: Any) -> tuple[Path, str]:
    """``(directory, label)`` of the adapter ``path`` names: a local directory (or a file in one) wins; else a
    Hub id ``"user/name"`` resolved through the Hub cache."""
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"`path` must be a directory path or a Hub id 'user/name', got {path!r}.")
    source = Path(path).expanduser()
    if source.exists():
        return (source.parent if source.is_file() else source), str(source)
    if _is_hub_id(path):
        return _from_hub(path, source), path
    raise UsageError(
        f"No saved adapter at `path` {str(source)!r}: it does not exist.{did_you_mean(source.name, _nearby(source))}"
    )


# --------------------------------------------------------------------------------------------------- the config


def _read_config(source: Path, label: str) -> dict[str, Any]:
    config_file = source / "adapter_config.json"
    if not config_file.exists():
        if (source / "config.json").exists():
            raise UsageError(
                f"`path` {label!r} holds a full model (config.json), not an adapter. Load it with "
                "AutoModel...from_pretrained(path), or point `load` at an adapter directory."
            )
        raise UsageError(
            f"`path` {label!r} has no adapter_config.json, so it is not a saved PEFT adapter. Point it at "
            "the directory that `save` wrote."
        )
    damaged = f"The adapter at `path` {label!r} is damaged: adapter_config.json"
    if not config_file.is_file():
        what = "a directory" if config_file.is_dir() else "not a regular file"
        raise UsageError(f"{damaged} is {what}, not a file of settings. Save the adapter again.")
    try:
        config = json.loads(config_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{damaged} is not UTF-8 text. Save the adapter again.") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{damaged} is not valid JSON ({exc}). Save the adapter again.") from None
    except OSError as exc:
        raise UsageError(f"{damaged} cannot be read: {exc.strerror or exc}.") from None
    if not isinstance(config, dict):
        raise UsageError(
            f"{damaged} holds a JSON {type(config).__name__}, not an object of settings. Save the adapter again."
        )
    return config


def _names_problem(value: Any, regex: bool) -> str | None:
    """What is wrong with a module-name setting (a list of names, or where ``regex``: one regular expression)."""
    if value is None:
        return None
    if isinstance(value, str) and regex:
        try:
            re.compile(value)
        except re.error as exc:
            return f"is not a valid regular expression ({exc})"
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return "must be a list of module names" + (" or one regular expression" if regex else "")
    return None


def _check_config(config: dict[str, Any], label: str) -> None:
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise UsageError(
            f"The adapter at `path` {label!r} is of type {config.get('peft_type')!r}; only LoRA adapters load here."
        )

    def bad(problem: str) -> UsageError:
        return UsageError(
            f"The adapter at `path` {label!r} has a bad setting in adapter_config.json: {problem} Fix it in the "
            "file, or save the adapter again."
        )

    # PEFT's key -> ours in settings.py (which checks the value); `r` must be there, the others have defaults
    for key, ours in (("r", "r"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout")):
        if key not in config and key != "r":
            continue
        value = config.get(key)
        try:
            if value is None:
                raise UsageError(f"`{ours}` must be a number, got None.")
            validate_one(ours, value)
        except UsageError as exc:
            raise bad(str(exc).replace(f"`{ours}`", f"`{key}`", 1)) from None
    for key, ours in (("rank_pattern", "r"), ("alpha_pattern", "alpha")):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise bad(f"`{key}` must map module names to numbers, got {pattern!r}.")
        for module, value in pattern.items():
            try:
                re.compile(module)
                validate_one(ours, value)
            except re.error as exc:
                raise bad(
                    f"`{key}` has {module!r}, which is not a valid regular expression ({exc})."
                ) from None
            except UsageError as exc:
                raise bad(f"`{key}` for {module!r}: {exc}") from None
    for key, regex in (("target_modules", True), ("modules_to_save", False), ("exclude_modules", True)):
        problem = _names_problem(config.get(key), regex)
        if problem:
            raise bad(f"`{key}` {problem}, got {config.get(key)!r}.")
    task = config.get("task_type")
    tasks = sorted({t for t in TASK_TYPES.values() if t})
    if task is not None and task not in tasks:
        raise bad(
            f"`task_type` {task!r} is not one of PEFT's task types.{did_you_mean(str(task).upper(), tasks)}"
        )
    for key, (what, is_set) in _BASE_CHANGING.items():
        if is_set(config.get(key)):
            raise UsageError(
                f"The adapter at `path` {label!r} sets `{key}`: {what} when it loads, which changes the base "
                "model for good (unload cannot undo it), so it is not loaded here. Load it with peft into a copy "
                "of the model you can discard."
            )


# --------------------------------------------------------------------------------------------------- the tensors


def _read_tensors(source: Path, label: str) -> dict[str, torch.Tensor]:
    st_file = source / "adapter_model.safetensors"
    if st_file.exists():
        from safetensors.torch import load_file

        try:
            return load_file(str(st_file))
        except Exception as exc:
            raise UsageError(
                f"The adapter at `path` {label!r} is damaged: adapter_model.safetensors cannot be read "
                f"({_one_line(exc)}). Save the adapter again."
            ) from None
    bin_file = source / "adapter_model.bin"
    if bin_file.exists():
        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UsageError(
                f"The adapter at `path` {label!r} is refused: its adapter_model.bin holds Python objects besides "
                "tensors, and unpickling them could run code. Get the adapter as adapter_model.safetensors "
                "from a source you trust."
            ) from None
        except Exception as exc:
            raise UsageError(
                f"The adapter at `path` {label!r} is damaged: adapter_model.bin cannot be read "
                f"({_one_line(exc)}). Save the adapter again."
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UsageError(
                f"The adapter at `path` {label!r} is damaged: adapter_model.bin holds a "
                f"{type(state).__name__}, not a dictionary of tensors. Save the adapter again."
            )
        return state
    raise UsageError(
        f"`path` {label!r} has adapter_config.json but no adapter_model.safetensors (or .bin). Save the adapter "
        "again."
    )


def _is_adapter_key(key: str) -> bool:
    """A tensor PEFT keeps per adapter (LoRA and DoRA weights, trainable-token deltas), not a module's own."""
    return any(part.startswith("lora_") or part == "token_adapter" for part in key.split("."))


def _rank_of(path: str, config: dict[str, Any]) -> int:
    from peft.utils.other import get_pattern_key

    pattern = config.get("rank_pattern") or {}
    return int(pattern.get(get_pattern_key(list(pattern), path), config["r"]))


def _check_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any], label: str) -> None:
    not_float: list[str] = []
    not_finite: list[str] = []
    wrong_rank: dict[str, str] = {}  # module path -> what is wrong
    for key, value in tensors.items():
        path = key.removeprefix("base_model.model.")
        if not value.is_floating_point():
            not_float.append(f"{path} ({str(value.dtype).removeprefix('torch.')})")
        elif not torch.isfinite(
            value if value.element_size() > 1 else value.float()
        ).all():  # float8: no isfinite
            not_finite.append(path)
        marker = next((m for m in _LORA_MARKERS[:4] if m in path), None)
        if marker is None or value.dim() < 2:
            continue
        module_path = path.split(marker)[0]
        rank = value.shape[0] if "_A" in marker else value.shape[1]
        expected = _rank_of(module_path, config)
        # a fused expert weight (target_parameters) holds r per expert: r × experts rows (checked against the
        # model's experts once there is a model, in _check_modules)
        per_expert = bool(config.get("target_parameters")) and rank % max(expected, 1) == 0
        if rank != expected and not per_expert:
            wrong_rank.setdefault(module_path, f"`{module_path}` has rank {rank} where it says r={expected}")
    problems = []
    if not_finite:
        problems.append(f"{len(not_finite)} tensor(s) hold NaN or inf, e.g. {_examples(not_finite)}")
    if not_float:
        problems.append(f"{len(not_float)} tensor(s) are not floating point, e.g. {_examples(not_float)}")
    if wrong_rank:
        first = next(iter(wrong_rank.values()))
        problems.append(f"{len(wrong_rank)} module(s) disagree with adapter_config.json, e.g. {first}")
    if problems:
        raise UsageError(
            f"The adapter at `path` {label!r} cannot be loaded: {'; '.join(problems)}. Its files are damaged or "
            "do not belong together: save the adapter again from the trained model."
        )


def read_adapter(path: str | os.PathLike) -> SavedAdapter:
    """Read and check the saved LoRA adapter at ``path`` — a directory (or a file in it), or a Hub id
    ``"user/name"`` (through the Hub cache; offline with HF_HUB_OFFLINE) — without any model: a ``UsageError``
    says what is wrong with it."""
    source, label = _locate(path)
    config = _read_config(source, label)
    _check_config(config, label)
    tensors = _read_tensors(source, label)
    _check_tensors(tensors, config, label)
    adapter = SavedAdapter(
        source=source,
        label=label,
        config=config,
        shapes={k: tuple(v.shape) for k, v in tensors.items()},
        others={k: v for k, v in tensors.items() if not _is_adapter_key(k)},
    )
    adapter.peft_config(trainable=False)  # PEFT's own checks of the settings, before any model is touched
    return adapter


# --------------------------------------------------------------------------------------------------- against a model


def _check_modules(index: targets.ModelIndex, adapter: SavedAdapter) -> list[str]:
    """What does not fit between the LoRA tensors and the model's modules (names and shapes)."""
    missing: list[str] = []
    wrong: list[str] = []
    experts = _expert_targets(index, adapter.config)
    for key, shape in adapter.shapes.items():
        path = key.removeprefix("base_model.model.")
        marker = next((m for m in _LORA_MARKERS if m in path), None)
        if marker is None:
            continue
        module_path = path.split(marker)[0]
        info = experts.get(module_path) or index.by_path.get(module_path)
        if info is None:
            if module_path not in missing:
                missing.append(module_path)
            continue
        expected = None
        rank = _rank_of(module_path, adapter.config) * (info.experts if info.kind == "experts" else 1)
        if info.kind == "experts" and shape[0 if "_A" in marker else -1] != rank:
            wrong.append(
                f"`{info.path}` has {info.experts} experts but the adapter's {marker.strip('.')} is "
                f"{tuple(shape)} (r={rank // info.experts} × {info.experts} experts expected)"
            )
        if len(shape) == 2 and marker in (".lora_A.", ".lora_embedding_A"):
            expected = (shape[0], info.in_features)
        elif len(shape) == 2 and marker in (".lora_B.", ".lora_embedding_B"):
            expected = (info.out_features, shape[1])
        if expected is not None and tuple(shape) != expected:
            wrong.append(
                f"`{module_path}` is {info.in_features}→{info.out_features} but the adapter's "
                f"{marker.strip('.')} is {tuple(shape)}"
            )
    problems = wrong[:2]
    if missing:
        problems.append(f"{len(missing)} module(s) it adapts do not exist here, e.g. {_examples(missing)}")
    return problems


def _expert_targets(index: targets.ModelIndex, config: dict[str, Any]) -> dict[str, Any]:
    """Where the saved tensors of the fused expert weights the adapter names (``target_parameters``) sit, as
    PEFT nests them (``experts``, ``experts.base_layer``, ...) -> that weight's index entry."""
    names = config.get("target_parameters") or []
    if not names:
        return {}
    from ..plan import _expert_prefixes

    chosen = [
        m
        for m in index.modules
        if m.kind == "experts" and any(m.path == n or m.path.endswith("." + n) for n in names)
    ]
    prefixes = _expert_prefixes(chosen)
    return {prefixes[m.path].removeprefix("base_model.model.").rstrip("."): m for m in chosen}


def _saved_heads(base: nn.Module, adapter: SavedAdapter) -> dict[str, nn.Module]:
    """The modules PEFT will wrap for ``modules_to_save`` (its rule: the path ends with a listed name)."""
    names = adapter.config.get("modules_to_save") or []  # a list of names (checked in read_adapter)
    heads: dict[str, nn.Module] = {}
    for path, module in base.named_modules():
        if not path or any(
            p.startswith(("lora_", "base_layer", "modules_to_save", "original_module"))
            for p in path.split(".")
        ):
            continue
        if any(path.endswith(n) for n in names) and not any(path.startswith(f"{h}.") for h in heads):
            heads[path] = module.original_module if is_modules_to_save_wrapper(module) else module
    return heads


def _base_tensors(base: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors by their plain path (PEFT's ``base_layer`` step removed, adapters left out)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict(keep_vars=True).items():
        if ADAPTER_PARAM.search(f".{key}") or ".original_module." in f".{key}":
            continue
        out.setdefault(key.replace(".base_layer", ""), value)
    return out


def _same(saved: torch.Tensor, current: torch.Tensor) -> bool:
    if current.device.type == "meta" or tuple(saved.shape) != tuple(current.shape):
        return False
    return torch.equal(saved.to(device=current.device, dtype=current.dtype), current.detach())


def check_adapter_fits(model: nn.Module, adapter: SavedAdapter, peft_config: Any) -> None:
    """Check the saved adapter against ``model`` before the model is touched: the modules it adapts exist with
    the saved shapes, its task type suits the model, its target modules exist, the heads it trains are saved,
    and any base weights it carries equal the model's (loading must not change them). ``peft_config`` is the
    config ``load`` will hand PEFT."""
    index = targets.index_model(model)
    base = base_model_of(model)
    label = adapter.label
    here = getattr(getattr(base, "config", None), "_name_or_path", "") or index.model_type
    saved_for = adapter.config.get("base_model_name_or_path")
    origin = f" It was saved from {saved_for!r}; this model is {here!r}." if saved_for else ""

    problems = _check_modules(index, adapter)
    if problems:
        raise AdapterMismatchError(
            f"The adapter at `path` {label!r} does not fit this model: {'; '.join(problems)}.{origin} "
            "Load it into the base model it was trained on."
        )

    task, model_task = adapter.config.get("task_type"), detect_task(model).task_type
    if task in _TASK_BOUND and model_task is not None and task != model_task:
        raise AdapterMismatchError(
            f"The adapter at `path` {label!r} does not fit this model: it was saved for `task_type` {task!r} and "
            f"this model is a {type(base).__name__} ({model_task}); PEFT would wrap it as the wrong kind of "
            f'model. Load it into a {task} model, or set "task_type": "{model_task}" in its '
            "adapter_config.json if it was trained on this kind of model."
        )

    _check_targets(base, index, adapter, peft_config)

    heads = _saved_heads(base, adapter)
    unsaved = [
        f"{path}.{name}"
        for path, module in heads.items()
        for name in module.state_dict()
        if f"base_model.model.{path}.{name}" not in adapter.shapes
    ]
    if unsaved:
        raise UsageError(
            f"The adapter at `path` {label!r} is damaged: adapter_config.json lists `modules_to_save` "
            f"{adapter.config.get('modules_to_save')!r}, but the file holds no weights for "
            f"{_examples(unsaved)}. Save the adapter again from the trained model."
        )

    current = _base_tensors(base) if adapter.others else {}
    overwrites: list[str] = []
    nowhere: list[str] = []
    for key, tensor in adapter.others.items():
        path = key.removeprefix("base_model.model.").replace(".base_layer", "")
        if any(path.startswith(f"{h}.") for h in heads):
            continue
        if path not in current:
            nowhere.append(path)
        elif not _same(tensor, current[path]):
            overwrites.append(path)
    if overwrites:
        raise AdapterMismatchError(
            f"The adapter at `path` {label!r} carries base weights that differ from this model's, and loading "
            f"would overwrite them: {_examples(overwrites)}.{origin} Load it into the model it was saved from."
        )
    if nowhere:
        raise AdapterMismatchError(
            f"The adapter at `path` {label!r} does not fit this model: it holds {len(nowhere)} tensor(s) this "
            f"model has no place for, e.g. {_examples(nowhere)}.{origin} Load it into the base model it was "
            "trained on."
        )


def _check_targets(
    base: nn.Module, index: targets.ModelIndex, adapter: SavedAdapter, peft_config: Any
) -> None:
    """The config's ``target_modules`` must select some module of the model (PEFT's own matching)."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND

    wanted = peft_config.target_modules
    if wanted is None or peft_config.target_parameters is not None:
        return
    if isinstance(wanted, str) and wanted.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        return
    paths = [path for path, _ in base.named_modules() if path]
    if any(check_target_module_exists(peft_config, path) for path in paths):  # excluded modules are falsy
        return
    names = sorted(wanted) if not isinstance(wanted, str) else [wanted]
    suffixes = sorted({info.path.rsplit(".", 1)[-1] for info in index.modules})
    hint = (
        did_you_mean(names[0], suffixes)
        or f" This model's adaptable modules: {targets.suffix_summary(index)}."
    )
    raise AdapterMismatchError(
        f"The adapter at `path` {adapter.label!r} does not fit this model: its adapter_config.json targets "
        f"`target_modules` {names!r}, and no module of this model has such a name.{hint}"
    )


# --------------------------------------------------------------------------------------------------- after PEFT


def check_adapter_loaded(peft_model: nn.Module, name: str, adapter: SavedAdapter) -> None:
    """After PEFT has built adapter ``name`` from the config and filled it from the file: every tensor PEFT
    keeps for it must have come from the file (no lora_B, DoRA magnitude or head left at its initial value),
    and every LoRA tensor in the file must have been used. Raised inside ``load``'s transaction, so the model
    is put back as it was."""
    from peft import get_peft_model_state_dict

    expected = set(get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False))
    saved = set(adapter.shapes)
    missing = sorted(k.removeprefix("base_model.model.") for k in expected - saved)
    unused = sorted(k.removeprefix("base_model.model.") for k in saved - expected if _is_adapter_key(k))
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} tensor(s) the config calls for are missing from the file, e.g. {_examples(missing)}"
        )
    if unused:
        problems.append(
            f"{len(unused)} tensor(s) in the file belong to no module the config adapts, e.g. {_examples(unused)}"
        )
    if problems:
        raise UsageError(
            f"The adapter at `path` {adapter.label!r} is incomplete or inconsistent: {'; '.join(problems)}. Its "
            "config and weights do not belong together: save the adapter again from the trained model."
        )
