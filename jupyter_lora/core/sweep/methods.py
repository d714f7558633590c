"""How a sweep run's model is made from the base, and put back: LoRA through ``inject`` (the product's planner
and target resolver), full fine-tuning and head-only training on the plain model, and PEFT's other methods
(prompt/prefix tuning, IA3, LoHa, LoKr) through their PEFT configs. ``BaseSnapshot`` keeps the base's tensors on
the CPU and puts them back bit for bit between runs."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...settings import keys
from ..adapters.peft_facts import forget_wrapper, register_wrapper, retire_wrapper
from ..errors import UsageError
from ..modelinfo import base_model_of, detect_task, is_peft_model

__all__ = ["LORA_FAMILY", "BaseSnapshot", "applies", "counts", "head_paths", "save_run", "unwrap", "wrap"]

LORA_FAMILY = ("lora",)  # methods whose adapters one PeftModel can hold side by side with `inject`/`load`
_PROMPT = {"prompt_tuning": "PromptTuningConfig", "prefix_tuning": "PrefixTuningConfig"}
_TUNERS = {"ia3": "IA3Config", "loha": "LoHaConfig", "lokr": "LoKrConfig"}
_WEIGHTS = "weights.safetensors"  # a full/head run's changed weights

# Which settings a method uses. Training settings apply to every method. The others say how the method's model is
# made, and a setting applies to a method when that method's PEFT config takes the field it becomes: LoRA goes
# through `inject`, which passes every inject setting into PEFT's LoraConfig (and `quant` is LoRA on a 4-bit
# base); full fine-tuning and head-only training have no PEFT config and use none of them; PEFT's other methods
# get the fields below that their config class declares (`_peft_fields`), and `wrap` passes exactly those.
_FIELD_OF = {"r": "r", "alpha": "alpha", "dropout": "rank_dropout", "targets": "target_modules",
             "layers": "target_modules", "exclude": "target_modules",
             "num_virtual_tokens": "num_virtual_tokens"}  # fmt: skip


def _peft_fields(method: str) -> frozenset[str]:
    """The fields of ``method``'s PEFT config class (prompt/prefix tuning, IA3, LoHa, LoKr)."""
    import dataclasses

    import peft

    return frozenset(f.name for f in dataclasses.fields(getattr(peft, {**_PROMPT, **_TUNERS}[method])))


def applies(method: str, setting: str) -> bool:
    """Whether a run of ``method`` uses ``setting`` (the rule above): a sweep drops the others from its runs."""
    if setting in keys("train") or setting == "method":
        return True
    if method in LORA_FAMILY:
        return setting in keys("inject") or setting == "quant"
    if method in ("full", "head"):
        return False
    return setting in _FIELD_OF and _FIELD_OF[setting] in _peft_fields(method)


class BaseSnapshot:
    """Every tensor of the base (parameters and buffers) copied to CPU memory, with ``requires_grad`` and the
    class names of the config; ``restore`` puts them back bit for bit."""

    def __init__(self, base: nn.Module):
        self.base = base
        with torch.no_grad():
            self.tensors = {
                n: t.detach().to("cpu", copy=True) for n, t in base.state_dict(keep_vars=True).items()
            }
        self.grads = {n: p.requires_grad for n, p in base.named_parameters()}
        config = getattr(base, "config", None)
        self.labels = (
            dict(getattr(config, "id2label", None) or {}),
            dict(getattr(config, "label2id", None) or {}),
        )

    def restore(self) -> None:
        with torch.no_grad():
            for name, tensor in self.base.state_dict(keep_vars=True).items():
                saved = self.tensors[name]
                if tensor.shape == saved.shape and tensor.dtype == saved.dtype:
                    tensor.data.copy_(saved)
                else:
                    tensor.data = saved.to(tensor.device, copy=True)
        for name, param in self.base.named_parameters():
            param.requires_grad_(self.grads.get(name, param.requires_grad))
        config = getattr(self.base, "config", None)
        if config is not None and self.labels[0]:
            config.id2label, config.label2id = dict(self.labels[0]), dict(self.labels[1])

    def changed(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The base tensors of ``model`` (the base itself) that differ from the snapshot."""
        out = {}
        for name, tensor in model.state_dict().items():
            saved = self.tensors.get(name)
            if saved is None or saved.shape != tensor.shape or not torch.equal(saved, tensor.detach().cpu()):
                out[name] = tensor.detach().cpu().contiguous()
        return out


def head_paths(base: nn.Module) -> tuple[str, ...]:
    """The fresh task head(s) of a classifier (``classifier``, ``score``, ...); () for a model without one."""
    return detect_task(base).heads


def check_method(base: nn.Module, method: str, where: str) -> None:
    """Refuse, before any run, a method this model cannot train."""
    info = detect_task(base)
    if method == "head" and not info.heads:
        raise UsageError(
            f"{where}: `method: head` trains the task head alone, and this {type(base).__name__} has no fresh task "
            "head (a language model's output layer is its tied LM head). Use lora or full for it."
        )
    if method in _PROMPT and info.task_type is None:
        raise UsageError(
            f"{where}: `method: {method}` needs a PEFT task type, and this {type(base).__name__} has none PEFT "
            "supports for it. Use lora, ia3, loha or lokr."
        )


def _lora_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k in keys("inject")}


def _targets(base: nn.Module, settings: dict[str, Any]) -> list[str]:
    from ..plan import plan

    chosen = {k: settings[k] for k in ("targets", "layers", "exclude") if settings.get(k) is not None}
    return sorted(plan(base, **chosen).targets)


def wrap(base: nn.Module, method: str, settings: dict[str, Any], seed: int) -> nn.Module:
    """The model a run of ``method`` trains, made from ``base`` (which must be as the snapshot holds it). The
    random initialisation is seeded with ``seed``, so that a run equals a lone run seeded the same."""
    torch.manual_seed(seed)
    if method == "lora":
        from ..adapters import inject

        return inject(base, **_lora_settings(settings))
    if method in ("full", "head"):
        heads = head_paths(base)
        for name, param in base.named_parameters():
            param.requires_grad_(method == "full" or name.split(".")[0] in heads)
        return base
    import peft

    task = detect_task(base)
    fields = _peft_fields(method)  # the settings `applies` says this method uses become these fields
    extra: dict[str, Any] = {"task_type": task.task_type}
    if "num_virtual_tokens" in fields:
        extra["num_virtual_tokens"] = settings["num_virtual_tokens"]
    if "target_modules" in fields:
        extra["target_modules"] = _targets(base, settings)
    if "r" in fields:
        extra.update(r=settings["r"], alpha=settings.get("alpha") or 2 * settings["r"],
                     rank_dropout=settings.get("dropout", 0.0))  # fmt: skip
    if method == "ia3":
        extra["feedforward_modules"] = []  # scale every target's output (PEFT's attention form)
    if method in _TUNERS and not task.task_type and task.heads:
        extra["modules_to_save"] = list(task.heads)
    config = getattr(peft, {**_PROMPT, **_TUNERS}[method])(**extra)
    from ..adapters.peft_facts import remember_grad_flags

    remember_grad_flags(base)
    wrapped = peft.get_peft_model(base, config)
    register_wrapper(wrapped)
    return wrapped


def unwrap(model: nn.Module, snapshot: BaseSnapshot) -> nn.Module:
    """Take the run's method off and give the base back exactly as the snapshot holds it."""
    base = base_model_of(model)
    if is_peft_model(model):
        from ..adapters.operations import unload_clean
        from ..adapters.peft_facts import is_prompt_learning

        if is_prompt_learning(model):
            # PEFT put its own generation hook on the base instance: take it off
            for attr in ("prepare_inputs_for_generation", "peft_config", "_hf_peft_config_loaded"):
                base.__dict__.pop(attr, None)
            _original_heads_back(base)
        else:
            with contextlib.suppress(Exception):
                base = unload_clean(model)
        forget_wrapper(base)
        retire_wrapper(model, "a sweep ran on its base and took this run's adapter off again. Use the model the "
                              "sweep holds (sweep.model).")  # fmt: skip
        from .. import targets

        targets.invalidate(model)
        targets.invalidate(base)
    snapshot.restore()
    return base


def _original_heads_back(base: nn.Module) -> None:
    """Put back the task heads PEFT wrapped for a prompt-learning run of a classifier (its trained copy of the
    head sits in a ``ModulesToSaveWrapper`` on the base itself, which has no tuner to unload it)."""
    from ..adapters.peft_facts import is_modules_to_save_wrapper

    for path, module in list(base.named_modules()):
        if is_modules_to_save_wrapper(module):
            parent_path, _, child = path.rpartition(".")
            setattr(base.get_submodule(parent_path), child, module.original_module)


def counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)``: PEFT's own count for a PeftModel, else the plain model's parameters."""
    if is_peft_model(model):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    from ..adapters.peft_facts import parameter_counts

    return parameter_counts(model)


def save_run(model: nn.Module, method: str, target: Path, snapshot: BaseSnapshot) -> int:
    """Write the run's result to ``target`` atomically: the adapter in PEFT format, or for full/head the base
    tensors the run changed as safetensors; returns the bytes of the weights file."""
    if is_peft_model(model):
        from ..adapters import save

        save(model, target, overwrite=True)
    else:
        from safetensors.torch import save_file

        from ..adapters.files import fsync_tree, install_staged, stage_dir

        stage = stage_dir(target)
        try:
            save_file(snapshot.changed(model), str(stage / _WEIGHTS), metadata={"method": method})
            fsync_tree(stage)
            install_staged(stage, target)
        except BaseException:
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
            raise
    return sum(p.stat().st_size for p in target.glob("*.safetensors"))


def load_weights(base: nn.Module, directory: Path) -> None:
    """Put a full/head run's saved weights into ``base`` (in place)."""
    from safetensors.torch import load_file

    saved = load_file(str(directory / _WEIGHTS))
    state = base.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in saved.items():
            state[name].data.copy_(tensor.to(state[name].device))


def load_adapter(base: nn.Module, method: str, directory: Path, name: str) -> nn.Module:
    """A saved run's adapter on ``base`` as adapter ``name``: LoRA through ``load`` (checked against the model),
    PEFT's other methods through ``PeftModel.from_pretrained``."""
    if method in LORA_FAMILY:
        from ..adapters import load

        return load(base, directory, name=name)
    from peft import PeftModel

    from ..adapters.peft_facts import remember_grad_flags

    remember_grad_flags(base)
    wrapped = PeftModel.from_pretrained(base, str(directory), adapter_name=name)
    register_wrapper(wrapped)
    return wrapped
