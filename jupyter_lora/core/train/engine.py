"""The run on ``transformers.Trainer``: ``TrainingArguments`` from the settings, a ``Trainer`` subclass for the
chunked causal-LM loss, and the thread that runs it — with Stop (finish the step, checkpoint), CUDA out-of-memory
recovery (free, checkpoint, advice) and the model's modes, cache and checkpointing put back afterwards."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import inspect
import math
import os
import threading
from dataclasses import fields
from typing import Any

import torch
from torch import nn
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from .. import runs
from ..adapters.peft_facts import is_quantized
from ..data.processors import CLASSIFY_TASKS
from ..errors import UsageError, did_you_mean
from ..loss import chunked_causal_lm_loss, supports_chunked_loss
from ..modelinfo import base_model_of
from .callback import RunCallback, write_settings
from .run import TrainingRun

__all__ = ["LoraTrainer", "launch", "trainer_fields", "training_arguments"]

# The optimizer setting -> transformers' optimizer name (fused AdamW on CUDA: one kernel for all parameters).
_OPTIM = {
    "adamw": "adamw_torch",
    "adamw8bit": "adamw_bnb_8bit",
    "paged_adamw8bit": "paged_adamw_8bit",
    "paged_adamw": "paged_adamw_32bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
}


# transformers 5.x renamed gradient_checkpointing to activation_checkpointing (the old name warns)
_CKPT = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}
    else "gradient_checkpointing"
)


class LoraTrainer(Trainer):
    """``Trainer`` with the chunked causal-LM loss (``core/loss.py``): the loss is a sum over label tokens divided
    by the tokens of the whole accumulated batch, so accumulation equals one large batch."""

    def __init__(self, *args: Any, chunked_loss: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.chunked_loss = chunked_loss
        if chunked_loss:
            self.loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.chunked_loss or return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The mixed-precision autocast that accelerate puts around the model's forward is bypassed when the loss
        # calls the backbone itself: enter it here, or the fp32 adapter weights pull every LoRA product to fp32.
        with self.accelerator.autocast():
            return chunked_causal_lm_loss(
                self.accelerator.unwrap_model(model), inputs, divide_by=num_items_in_batch
            )


def _precision(config: Any, device: torch.device) -> str:
    if config.precision != "auto":
        return config.precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def total_steps(config: Any, examples: int) -> int:
    """Optimizer steps a run makes: ``steps``, or ``epochs`` over ``examples`` in batches of ``batch`` ×
    ``grad_accum`` (what the Trainer computes)."""
    if config.steps:
        return int(config.steps)
    per_epoch = max(1, math.ceil(examples / config.batch) // config.grad_accum)
    return max(1, math.ceil(per_epoch * config.epochs))


def training_arguments(run: TrainingRun, device: torch.device, ckpt: bool, **extra: Any) -> TrainingArguments:
    """``TrainingArguments`` for ``run`` from its settings; ``extra`` (the ``trainer_args`` setting) passes any
    other field of ``TrainingArguments`` through."""
    args = trainer_fields(run, device, ckpt, **extra)
    try:
        return TrainingArguments(**args)
    except (ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(
            f"The training settings (with `trainer_args`) do not fit together: {first}"
        ) from None


def trainer_fields(run: TrainingRun, device: torch.device, ckpt: bool, **extra: Any) -> dict[str, Any]:
    """The ``TrainingArguments`` fields for ``run`` (plain values: an exported job writes them to job.json)."""
    cfg = run.config
    total = total_steps(cfg, len(run.data.train))
    has_eval = bool(run.data.eval)
    eval_every = cfg.eval_every or max(1, total // 10)
    keep_best = cfg.keep_best if cfg.keep_best is not None else bool(cfg.early_stop)
    keep_best = keep_best and has_eval
    save_every = cfg.save_every
    if keep_best:  # the Trainer keeps the best adapter as a checkpoint: save at every evaluation
        save_every = eval_every
    precision = _precision(cfg, device)
    cuda = device.type == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch % world:
        raise UsageError(
            f"`batch` ({cfg.batch}) must be a multiple of the number of processes ({world}): it is the batch of "
            "all processes together, split evenly between them."
        )
    optim = "adamw_torch_fused" if cfg.optim == "adamw" and cuda else _OPTIM[cfg.optim]
    args = dict(
        output_dir=str(run.output_dir),
        max_steps=total,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch // world,  # `batch` is the global batch, as on one device
        per_device_eval_batch_size=max(1, cfg.batch // world),
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup,
        lr_scheduler_type=cfg.scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm is not None else 0.0,
        optim=optim,
        optim_args="momentum=0.9" if cfg.optim == "sgd" else None,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_every,
        save_strategy="steps" if save_every else "no",
        save_steps=save_every or 500,
        save_total_limit=cfg.keep_checkpoints,
        load_best_model_at_end=keep_best,
        metric_for_best_model="eval_loss" if keep_best else None,
        greater_is_better=False if keep_best else None,
        logging_steps=cfg.log_every or (5 if cuda else 1),
        # a NaN/inf check of every step's loss is a host sync per step; a NaN shows in the logged loss anyway
        logging_nan_inf_filter=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        **{_CKPT: bool(ckpt), f"{_CKPT}_kwargs": _checkpoint_kwargs(ckpt, device)},
        # Liger's fused kernels through the Trainer's own switch (patches RMSNorm, SwiGLU, RoPE and the LM loss)
        use_liger_kernel=use_liger(cfg.kernels, run.model, device),
        remove_unused_columns=False,  # the collator turns examples into model inputs
        dataloader_pin_memory=cuda,
        disable_tqdm=True,  # the run's own progress display shows it
        report_to=cfg.report_to,
        run_name=cfg.run_name,
        prediction_loss_only=run.data.task not in CLASSIFY_TASKS,
        save_only_model=False,
    )
    owned = sorted(set(extra) & set(args))
    if owned:
        raise UsageError(
            f"`trainer_args` sets `{owned[0]}`, which the training settings already set (steps, lr, batch, "
            "output_dir, ...): change the setting itself, so that the run, its checkpoints and resume agree."
        )
    unknown = sorted(set(extra) - {f.name for f in fields(TrainingArguments)})
    if unknown:
        names = [f.name for f in fields(TrainingArguments)]
        raise UsageError(
            f"`trainer_args`: TrainingArguments has no field `{unknown[0]}`.{did_you_mean(unknown[0], names)}"
        )
    args.update(extra)
    return args


def checkpointing(config: Any, model: nn.Module) -> bool | str:
    """The ``ckpt`` setting for ``model``: True, False or "offload" (auto: on for 4/8-bit bases)."""
    if config.ckpt == "auto":
        return is_quantized(model)
    return config.ckpt


def _checkpoint_kwargs(ckpt: bool | str, device: torch.device) -> dict | None:
    if not ckpt:
        return None
    # On a CPU the checkpoints are in host memory already: offloading is plain checkpointing there.
    if ckpt == "offload" and device.type != "cpu":
        from transformers import PreTrainedModel

        if "offload" not in inspect.signature(PreTrainedModel.activation_checkpointing_enable).parameters:
            raise UsageError(
                "`ckpt: offload` needs a transformers version whose activation checkpointing can offload "
                "(pip install -U transformers); or set ckpt: true."
            )
        return {"use_reentrant": False, "offload": True}
    return {"use_reentrant": False}


def use_liger(kernels: str, model: nn.Module | None, device: torch.device) -> bool:
    """Whether the run uses Liger's kernels: ``kernels: liger`` (checked: CUDA, the package, the architecture),
    or ``auto`` where all three hold."""
    if kernels == "none":
        return False
    problem = None
    model_type = getattr(getattr(base_model_of(model), "config", None), "model_type", None) if model else None
    if device.type != "cuda":
        problem = "Liger's kernels run on CUDA GPUs"
    elif importlib.util.find_spec("liger_kernel") is None:
        problem = "the liger-kernel package is not installed (pip install 'jupyter-lora[kernels]')"
    else:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            problem = f"Liger has no kernels for {model_type!r} models"
    if problem is None:
        return True
    if kernels == "liger":
        raise UsageError(f"`kernels: liger` cannot be used here: {problem}. Set kernels: auto or none.")
    return False


def _accuracy(prediction) -> dict[str, float]:
    logits = (
        prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    )
    return {"accuracy": float((logits.argmax(-1) == prediction.label_ids).mean())}


def _reset_accelerate_precision(precision: str) -> None:
    """accelerate keeps the first mixed-precision choice for the whole (single) process; a notebook may train in
    bf16 and then in fp32, so its single-process state is cleared when the choice changes."""
    from accelerate.state import AcceleratorState

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    state = AcceleratorState._shared_state
    if (
        state
        and state.get("_mixed_precision") not in (None, mixed)
        and int(os.environ.get("WORLD_SIZE", "1")) == 1
    ):
        AcceleratorState._reset_state()


# report_to -> the package its Trainer integration needs
_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def _check_tracker(report_to: str) -> None:
    package = _TRACKER_PACKAGES.get(report_to)
    if package is not None and importlib.util.find_spec(package) is None:
        raise UsageError(
            f"`report_to: {report_to}` needs the {package} package, which is not installed: pip install {package}"
            + (" (or pip install 'jupyter-lora[track]')" if package == "tensorboard" else "")
            + ". Or set report_to: none."
        )


def build_trainer(
    run: TrainingRun, trainer_args: dict | None = None, callbacks: list | None = None
) -> LoraTrainer:
    """The Trainer for ``run`` (not started)."""
    cfg = run.config
    _check_tracker(cfg.report_to)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and not torch.cuda.is_available():
        # accelerate would fall back to plain data parallelism on CPU: say so instead of training differently
        raise UsageError(
            "FSDP was asked for (accelerate_fsdp.yaml) but this machine has no CUDA GPU, and FSDP shards the model "
            "over GPUs. Run the job with accelerate_ddp.yaml or torchrun here, or FSDP on a GPU machine."
        )
    model = run.model
    device = _device_of(model)
    if device.type == "cuda" and not torch.cuda.is_available():  # pragma: no cover
        device = torch.device("cpu")
    run.ckpt = checkpointing(cfg, model)
    args = training_arguments(run, device, run.ckpt, **(trainer_args or {}))
    run.precision = _precision(cfg, device)
    _reset_accelerate_precision(run.precision)
    possible = (
        run.data.task == "CAUSAL_LM"
        and supports_chunked_loss(model)
        and int(os.environ.get("WORLD_SIZE", "1")) == 1
    )
    if cfg.chunked_loss is True and not possible:
        raise UsageError(
            "`chunked_loss: true` works for single-process causal-LM training of "
            "llama/mistral/qwen2/qwen3/phi3/gemma-style models; set it to auto or false here."
        )
    if cfg.chunked_loss is True and args.use_liger_kernel:
        raise UsageError(
            "`chunked_loss: true` and Liger's kernels both replace the LM loss (Liger fuses it with the LM head): "
            "set chunked_loss: auto, or kernels: none."
        )
    chunked = (
        possible
        and not args.use_liger_kernel
        and (cfg.chunked_loss is True or (cfg.chunked_loss == "auto" and device.type == "cuda"))
    )
    tokens: list[int] = []

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = run.data.collate(examples)
        tokens.append(run.data.units(batch))
        batch.update(run.data.forward_kwargs if run.data.task == "CAUSAL_LM" else {})
        return batch

    found = [RunCallback(run, tokens, device)]
    if cfg.early_stop and run.data.eval:
        found.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stop))
    for callback in callbacks or ():
        if not (
            isinstance(callback, TrainerCallback)
            or (isinstance(callback, type) and issubclass(callback, TrainerCallback))
        ):
            raise UsageError(
                f"`callbacks` must be transformers.TrainerCallback objects, got {callback!r:.60}."
            )
    try:
        trainer = LoraTrainer(
        model=model, args=args, train_dataset=run.data.train, eval_dataset=run.data.eval or None,
        data_collator=collate, compute_metrics=_accuracy if run.data.task in CLASSIFY_TASKS else None,
        # the run's callback last: it sees a stop any other callback asked for at this step, and checkpoints it
        callbacks=found[1:] + list(callbacks or ()) + found[:1], chunked_loss=chunked,
        )  # fmt: skip
    except UsageError:
        raise
    except Exception as exc:  # a tracker that cannot start, a field combination the Trainer refuses, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UsageError(
            f"The Trainer could not be set up with these settings: {type(exc).__name__}: {first}"
        ) from None
    trainer.remove_callback(PrinterCallback)  # the run's own progress display shows the logs
    return trainer


def launch(
    run: TrainingRun, background: bool, trainer_args: dict | None = None, callbacks: list | None = None
):
    """Start ``run``: on a thread (``background``), or in this thread's place — a foreground run still trains on
    a thread so that Ctrl-C becomes a Stop (finish the step, checkpoint) instead of an exception mid-step."""
    base = base_model_of(run.model)
    run.created_output_dir = not run.output_dir.exists()
    trainer = build_trainer(run, trainer_args, callbacks)  # every mistake in the settings shows before step 1
    if not runs.register(base, run):
        raise UsageError(
            "This model is already training. Stop that run first (run.stop() or %lora stop model)."
        )
    # the adapter as it is, put back if the run fails before its first step (e.g. a checkpoint that loads badly)
    run.snapshot = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    run.state = "running"
    run.thread = threading.Thread(
        target=_run, args=(run, trainer, base), name="jupyter-lora-train", daemon=True
    )
    run.thread.start()
    if not background:
        try:
            while not run.finished.wait(0.1):
                pass
        except KeyboardInterrupt:
            run.stop(wait=True)
        if run.state == "failed" and run.error is not None:
            raise run.error
    return run


def _run(run: TrainingRun, trainer: LoraTrainer, base: nn.Module) -> None:
    model = run.model
    modes = [(m, m.training) for m in model.modules()]
    use_cache = getattr(getattr(base, "config", None), "use_cache", None)
    ckpt_was = _checkpointing_on(base)
    try:
        # RunCallback.on_train_end records how the run ended (finished, stopped, early-stopped)
        trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    except torch.OutOfMemoryError as exc:
        _on_oom(run, trainer, exc)
    except Exception as exc:
        run.state = "failed"
        run.error = _before_first_step(run, trainer, exc)
        run.emit("error", message=str(run.error), type=type(exc).__name__)
    finally:
        _cleanup(trainer, model, base, modes, use_cache, ckpt_was)
        runs.finish(base)
        run.finished.set()


def _before_first_step(run: TrainingRun, trainer: LoraTrainer, exc: Exception) -> Exception:
    """A run that fails before it trained a step changed nothing it keeps: the adapter is put back, an empty
    ``output_dir`` it made is removed, and the error becomes one line (the settings, the checkpoint or the data
    did not fit). A failure later in a run is a bug or a crash: it stays as it is."""
    started = run.resume_step if run.resume_from else 0
    if int(getattr(trainer.state, "global_step", 0) or 0) > started:
        return exc
    with torch.no_grad():
        for name, param in run.model.named_parameters():
            if name in run.snapshot:
                param.copy_(run.snapshot[name])
    if run.created_output_dir and run.output_dir.is_dir() and not any(run.output_dir.iterdir()):
        run.output_dir.rmdir()
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    where = f"resuming from {run.resume_from}" if run.resume_from else "starting the run"
    return UsageError(f"{where[0].upper()}{where[1:]} failed before the first step ({type(exc).__name__}: {first}); "
                      "the adapter is as it was.")  # fmt: skip


def _on_oom(run: TrainingRun, trainer: LoraTrainer, exc: BaseException) -> None:
    cfg = run.config
    with contextlib.suppress(Exception):
        trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    path = None
    with contextlib.suppress(Exception):
        # The Trainer's own checkpoint of the last finished step (adapter, optimizer, scheduler, RNG, state).
        trainer._save_checkpoint(trainer.model, trial=None)
        path = run.output_dir / f"checkpoint-{trainer.state.global_step}"
        write_settings(path, run)
        run.checkpoint = path
    tips = []
    if cfg.batch > 1:
        tips.append(f"batch: {max(1, cfg.batch // 2)} with grad_accum: {cfg.grad_accum * 2}")
    if cfg.seq > 256:
        tips.append(f"seq: {cfg.seq // 2}")
    if not run.ckpt:
        tips.append("ckpt: true")
    if not is_quantized(run.model):
        tips.append("a 4-bit base (%lora base VAR ID --4bit)")
    advice = "Out of GPU memory at step {}. The adapter and model are intact{}. Try {}.".format(
        run.step + 1, f"; state saved in {path}" if path else "", "; ".join(tips) or "a smaller model"
    )
    run.state = "oom"
    run.emit("oom", message=str(exc).splitlines()[0] if str(exc) else "CUDA out of memory", advice=advice,
             checkpoint=str(path) if path else None)  # fmt: skip
    run.emit("end", steps=run.step, final_loss=run.history[-1]["loss"] if run.history else None,
             best_eval_loss=run.best_eval_loss, elapsed=run.elapsed(), tokens=0, tokens_per_s=0.0,
             checkpoint=str(path) if path else None, state="oom")  # fmt: skip


def _cleanup(trainer, model, base, modes, use_cache, ckpt_was) -> None:
    if getattr(trainer.args, _CKPT, False) and not ckpt_was:
        with contextlib.suppress(Exception):
            base.gradient_checkpointing_disable()
    if use_cache is not None and getattr(base, "config", None) is not None:
        base.config.use_cache = use_cache
    for module, mode in modes:
        module.training = mode
    trainer.optimizer = None
    trainer.lr_scheduler = None
    with contextlib.suppress(Exception):
        trainer.accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _checkpointing_on(base: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if name in dir(type(base)):
            return bool(getattr(base, name))
    return False
