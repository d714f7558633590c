"""Training: LoRA training of a live model with ``transformers.Trainer`` on a background thread, reporting
``TrainingEvent``s to observers.

``train(model, data, ...)`` returns a ``TrainingRun`` at once; ``run.stop()`` finishes the current step, writes the
Trainer's checkpoint and frees memory; ``resume(model)`` continues from it (the Trainer restores the adapter,
optimizer, scheduler, gradient scaler, RNG and data position) and reproduces the loss curve an uninterrupted run
would have had. Checkpoints are the Trainer's own: they resume in a plain ``Trainer(...).train(
resume_from_checkpoint=...)`` and a plain Trainer's checkpoint resumes here. A CUDA out-of-memory error is caught:
memory is freed, the training state saved, the adapter left intact, advice reported.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from ...settings import TRAIN_TASKS, TrainSettings, build
from .. import runs
from ..adapters.peft_facts import wrapper_for
from ..data.processors import CLASSIFY_TASKS, MEDIA_TASKS
from ..errors import UsageError
from ..modelinfo import base_model_of, detect_task, encoder_advice, require_module
from .checkpoints import check_checkpoint, history_of, latest_checkpoint, saved_settings, trainer_settings
from .engine import launch
from .run import TrainingRun
from .runlist import RUNS_DIR, run_name_prefix

__all__ = [
    "TrainConfig",
    "TrainingRun",
    "check_eval",
    "default_output_dir",
    "last_run",
    "latest_checkpoint",
    "make_train_config",
    "prepare_for",
    "preprocessor_for",
    "resume",
    "start_prepared",
    "task_of",
    "train",
]

# Training settings, declared with their help and checks in jupyter_lora.settings.
TrainConfig = TrainSettings


def make_train_config(**kwargs: Any) -> TrainConfig:
    """A validated ``TrainConfig``; unknown keys get a did-you-mean."""
    return build(TrainSettings, kwargs, "training setting")


def _peft_of(model: nn.Module) -> nn.Module:
    require_module(model)
    peft_model = wrapper_for(model)
    if peft_model is None:
        raise UsageError(
            "This model has no LoRA adapter to train. Inject one first: model = jupyter_lora.inject(model, r=16) "
            "(or a %%lora model cell), then train."
        )
    return peft_model


def task_of(model: nn.Module, task: str) -> str:
    """The task a run of ``model`` trains: the ``task`` setting, or the model's own when it is "auto"."""
    return _task(model, task)


def _task(peft_model: nn.Module, task: str) -> str:
    if task != "auto":
        return task
    from ..data.processors import training_task

    detected = training_task(peft_model)
    if detected is None:
        detected = detect_task(peft_model).task_type
    if detected not in TRAIN_TASKS.values():
        advice = encoder_advice(peft_model)
        if advice is not None:
            raise UsageError(f"This model cannot be trained here: {advice}.")
        raise UsageError(
            f"Training here covers causal LMs (text, or text and images), text, image and audio classifiers and "
            f"speech recognition; this model's task is {detected}. Set `task:` (causal_lm, seq_cls, image_cls, "
            "audio_cls, asr) if it is one of those."
        )
    return detected


def default_output_dir(model: nn.Module, stamp: str | None = None) -> Path:
    """Where a run of ``model`` writes its checkpoints when no ``output_dir`` is given, relative to the working
    directory: ``lora_runs/<model type>-<stamp>``, the stamp being the start time (``20250131-142500``)."""
    return RUNS_DIR / f"{run_name_prefix(model)}{stamp or time.strftime('%Y%m%d-%H%M%S')}"


def _check_output_dir(path: Path) -> Path:
    """``output_dir`` must be a directory this process can write (checked before step 1, nothing written), and
    hold no other run's checkpoints: the Trainer's checkpoint rotation would delete them."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"`output_dir` {str(path)!r} is a file; give a directory for the checkpoints.")
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith("checkpoint-"))
        if found:
            shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise UsageError(
                f"`output_dir` {str(path)!r} already holds another run's checkpoints ({shown}), which this run's "
                "checkpoint rotation would delete. Continue that run with resume(model, output_dir) / %lora resume, "
                "or give a new output_dir."
            )
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"`output_dir` {str(path)!r} cannot be written ({str(probe)!r} is not writable).")
    return path


def _trainer_args(trainer_args: Any) -> dict:
    if trainer_args is None:
        return {}
    if not isinstance(trainer_args, dict) or not all(isinstance(k, str) for k in trainer_args):
        raise UsageError(
            f"`trainer_args` must be a mapping of TrainingArguments fields to values, e.g. "
            f"{{'adam_beta2': 0.99}}; got {trainer_args!r:.60}."
        )
    return dict(trainer_args)


def check_eval(config: TrainConfig, prepared: Any) -> None:
    """Early stopping and keep-best judge the adapter on held-out data: without any, say so before step 1."""
    if prepared.eval:
        return
    asked = [name for name in ("early_stop", "keep_best") if getattr(config, name)]
    if asked:
        raise UsageError(
            f"`{asked[0]}` needs evaluation data, and none is held out (eval: {config.eval!r} on "
            f"{len(prepared.train)} examples; eval: auto holds out 10% from 100 examples on). Give eval: 0.1 "
            "(a share of the data), a number of examples, or eval_data=."
        )


def _observer_list(observers: Any) -> list:
    if observers is None:
        return []
    if callable(observers):
        return [observers]
    return list(observers)


def _not_training(base: nn.Module, doing: str) -> None:
    busy = runs.busy_message(base, "resume" if doing == "resuming" else "train")
    if busy is not None:
        raise UsageError(busy)
    if runs.active_run(base) is not None:
        raise UsageError(f"This model is already training. Stop that run first (run.stop() or %lora stop model) "
                         f"before {doing}.")  # fmt: skip


def preprocessor_for(peft_model: nn.Module, task: str, tokenizer: Any, processor: Any) -> Any:
    """What turns the run's records into the model's inputs: the tokenizer for text, the processor for images,
    audio and vision-language models (given, or found beside the model's weights)."""
    from ..data import find_tokenizer
    from ..data.processors import pick_preprocessor

    chosen = pick_preprocessor(peft_model, task, tokenizer, processor)
    return chosen if chosen is not None else find_tokenizer(peft_model)


def prepare_for(
    peft_model: nn.Module, config: TrainConfig, data: Any, tokenizer: Any, eval_data: Any, trace: Any = None
) -> Any:
    """``data`` (and ``eval_data``) as the run's tokenized examples for the model's task. ``trace``: a
    ``DataTrace`` that records what happened to each record (the data preview passes one)."""
    from ..data import prepare_data, vocab_size_of

    task = _task(peft_model, config.task)
    base = base_model_of(peft_model)
    label2id = None
    if task in CLASSIFY_TASKS:
        label2id = list(config.labels) if config.labels else named_labels(base.config)
    elif config.labels:
        raise UsageError(
            "`labels` names the classes of a classifier (task seq_cls, image_cls or audio_cls); drop it for this "
            "model."
        )
    # token ids the model cannot embed are refused here (on CUDA they would end the process's CUDA context)
    seq, media = config.seq, {}
    if task in MEDIA_TASKS:
        from ..data.media import check_processor_fits

        check_processor_fits(base, tokenizer, task)
        media = {"image_column": config.image_column, "audio_column": config.audio_column,
                 "decoder_start_token_id": getattr(base.config, "decoder_start_token_id", None)}  # fmt: skip
        # a transcript longer than the decoder's positions would fail at the first step: cut it like `seq` does
        seq = min(seq, getattr(base.config, "max_target_positions", None) or seq)
    prepared = prepare_data(
        data, tokenizer, task=task, seq=seq, eval=config.eval, eval_data=eval_data, packing=config.packing,
        seed=config.seed, label2id=label2id, vocab_size=vocab_size_of(peft_model), text_column=config.text_column,
        label_column=config.label_column, chat_template=config.chat_template, trace=trace, **media,
    )  # fmt: skip
    if task in CLASSIFY_TASKS:
        _check_classes(base.config, prepared.label_names, task)
    if hasattr(prepared.collator, "accept"):  # batches hold only what the model's forward takes
        from ..data.vision_chat import forward_inputs

        prepared.collator.accept(forward_inputs(base))
    return prepared


# The auto class that loads a classifier of each task with a head of another size.
_AUTO_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "IMAGE_CLS": "AutoModelForImageClassification",
                 "AUDIO_CLS": "AutoModelForAudioClassification"}  # fmt: skip


def _check_classes(config: Any, label_names: tuple[str, ...], task: str = "SEQ_CLS") -> None:
    """The classifier head has a logit for every class the data uses (else the loss fails at the first step)."""
    count = getattr(config, "num_labels", None)
    if not count or len(label_names) <= count:
        return
    shown = ", ".join(label_names[:8]) + (", ..." if len(label_names) > 8 else "")
    names = (
        ", ".join(str(config.id2label.get(i, i)) for i in range(count))
        if getattr(config, "id2label", None)
        else ""
    )
    raise UsageError(
        f"The data has {len(label_names)} classes ({shown}) but the model's classifier head has {count}"
        f"{f' ({names})' if names else ''}. Load the model with num_labels={len(label_names)} (e.g. "
        f"{_AUTO_CLASSES.get(task, _AUTO_CLASSES['SEQ_CLS'])}.from_pretrained(..., num_labels={len(label_names)}, "
        "ignore_mismatched_sizes=True)) or fix the labels."
    )


def named_labels(config: Any) -> dict[str, int] | None:
    """The model's ``label2id`` when its classes have names; None for transformers' placeholders (LABEL_0, ...),
    which name nothing: then the data's own labels decide the ids."""
    label2id = getattr(config, "label2id", None) or {}
    if all(name == f"LABEL_{i}" for name, i in label2id.items()):
        return None
    return dict(label2id)


def _name_classes(peft_model: nn.Module, label_names: tuple[str, ...]) -> None:
    """Give a classifier whose classes have no names the names the run trained it with (``labels`` setting or
    the data's labels), so its predictions, ``compare`` and a saved config read them."""
    config = base_model_of(peft_model).config
    count = getattr(config, "num_labels", 0)
    if not label_names or named_labels(config) is not None or len(label_names) > count:
        return
    if label_names == tuple(str(i) for i in range(len(label_names))):
        return  # whole-number labels without names: nothing to add
    names = {i: (label_names[i] if i < len(label_names) else f"LABEL_{i}") for i in range(count)}
    config.id2label = names
    config.label2id = {name: i for i, name in names.items()}


def train(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    processor: Any = None,
    eval_data: Any = None,
    observers: Any = (),
    background: bool = True,
    trainer_args: dict | None = None,
    callbacks: list | None = None,
    **settings: Any,
) -> TrainingRun:
    """Train the active LoRA adapter of ``model`` on ``data`` with ``transformers.Trainer``; returns a
    ``TrainingRun`` at once (``background``) or when done. ``data``: texts, records (text | prompt+response |
    messages | text+label), a datasets.Dataset, a DataFrame, or a .jsonl/.json/.csv/.txt path. Settings: see
    ``jupyter_lora.settings.TrainSettings`` (steps, epochs, lr, batch, seq, grad_accum, eval, eval_every,
    save_every, output_dir, packing, ckpt, samples, early_stop, keep_best, report_to, ...). ``trainer_args``: any
    other ``TrainingArguments`` field; ``callbacks``: your own ``TrainerCallback``s. ``processor``: the model's
    processor for image, audio and vision-language models (default: the one saved beside the model)."""
    config = make_train_config(**settings)
    peft_model = _peft_of(model)
    base = base_model_of(peft_model)
    _not_training(base, "training again")
    tokenizer = preprocessor_for(peft_model, _task(peft_model, config.task), tokenizer, processor)
    if config.samples and tokenizer is None:
        raise UsageError("`samples` need a tokenizer to generate with; pass tokenizer=.")
    output_dir = _check_output_dir(
        Path(config.output_dir) if config.output_dir else default_output_dir(peft_model)
    )
    trainer_args = _trainer_args(trainer_args)
    prepared = prepare_for(peft_model, config, data, tokenizer, eval_data)
    check_eval(config, prepared)
    run = TrainingRun(peft_model, prepared, config, tokenizer, _observer_list(observers), output_dir)
    run.trainer_args, run.callbacks = trainer_args, list(callbacks or ())
    started = launch(run, background, run.trainer_args, run.callbacks)
    _name_classes(peft_model, prepared.label_names)
    return started


def start_prepared(
    model: nn.Module,
    prepared: Any,
    config: TrainConfig,
    tokenizer: Any,
    output_dir: Path,
    *,
    observers: Any = (),
    background: bool = True,
    trainer_args: dict | None = None,
    callbacks: list | None = None,
    resume_from: Path | None = None,
) -> TrainingRun:
    """Start a run of ``model`` as it is — a PeftModel of any PEFT method, or a plain model whose trainable
    parameters are set (full fine-tuning, a task head) — on data already prepared (``prepare_for``), with checked
    settings; ``resume_from``: a checkpoint of this run to continue from (not checked here). The engine under
    ``train`` and ``resume``, for callers that prepare once and train several models (a sweep)."""
    _not_training(base_model_of(model), "training again")
    check_eval(config, prepared)
    run = TrainingRun(model, prepared, config, tokenizer, _observer_list(observers), Path(output_dir),
                      resume_from=resume_from)  # fmt: skip
    run.trainer_args, run.callbacks = _trainer_args(trainer_args), list(callbacks or ())
    if resume_from is not None:
        from .checkpoints import read_state

        state = read_state(Path(resume_from))
        run.resume_step = int(state.get("global_step", 0))
        run.history, run.evals = history_of(state)
        if run.evals:
            run.best_eval_loss = min(e["eval_loss"] for e in run.evals)
    started = launch(run, background, run.trainer_args, run.callbacks)
    _name_classes(model, prepared.label_names)
    return started


def resume(
    model: nn.Module,
    checkpoint: str | os.PathLike | None = None,
    *,
    data: Any = None,
    tokenizer: Any = None,
    processor: Any = None,
    eval_data: Any = None,
    observers: Any = (),
    background: bool = True,
    trainer_args: dict | None = None,
    callbacks: list | None = None,
    **overrides: Any,
) -> TrainingRun:
    """Continue training ``model`` from ``checkpoint`` (default: the last one of its last run in this session) — a
    checkpoint written here or by a plain ``transformers.Trainer``. The data, tokenizer and settings of that run
    are reused unless given; ``overrides`` may change e.g. ``steps`` (to extend a finished run). The checkpoint is
    checked against the model before anything changes: a mismatch is a one-line error, nothing is modified."""
    require_module(model)
    if wrapper_for(model) is None and checkpoint is not None:
        # a run's directory stands for its latest checkpoint, as check_checkpoint reads it
        held = Path(checkpoint)
        if not (held / "adapter_config.json").exists():
            held = latest_checkpoint(held) or held
        if (held / "adapter_config.json").exists():
            raise UsageError(
                f"This model holds no adapter yet; the checkpoint's adapter comes first: %lora load model {held} "
                "(jupyter_lora.load), then resume with the run's data: a %%lora resume cell with `data: VAR` "
                f"(resume(model, {str(held)!r}, data=...))."
            )
    peft_model = _peft_of(model)
    base = base_model_of(peft_model)
    _not_training(base, "resuming")
    last = runs.last_run(base)
    if checkpoint is None:
        checkpoint = (last.checkpoint if last is not None else None) or (
            latest_checkpoint(last.output_dir) if last is not None else None
        )
        if checkpoint is None:
            raise UsageError(
                "No checkpoint to resume from: this model has no earlier run in this session. Give the checkpoint "
                "directory: resume(model, 'lora_runs/.../checkpoint-100', data=...)."
            )
    path, state = check_checkpoint(Path(checkpoint), peft_model)
    saved = saved_settings(path)
    if not saved and last is not None:
        saved = asdict(last.config)
    if not saved:  # a plain Trainer's checkpoint: continue the run it belongs to (its steps and batch)
        saved = trainer_settings(state)
    config = make_train_config(**{**saved, "output_dir": str(path.parent), **overrides})
    if config.steps is not None and config.steps <= int(state.get("global_step", 0)):
        raise UsageError(
            f"`steps` ({config.steps}) must be more than the checkpoint's step {state.get('global_step')} to "
            "continue: the run is complete. To extend it, give more steps (resume(model, steps=N), or `steps: N` in "
            "the body of a %%lora resume cell)."
        )
    if data is None:
        if last is None or last.data is None:
            raise UsageError(
                "`data` is needed to resume a run from another session: a %%lora resume MODEL CHECKPOINT cell with "
                "`data: VAR` in its body, or resume(model, ckpt, data=...)."
            )
        prepared = last.data
        if tokenizer is not None or processor is not None:
            tokenizer = preprocessor_for(peft_model, prepared.task, tokenizer, processor)
        else:
            tokenizer = last.tokenizer
        trainer_args = trainer_args if trainer_args is not None else last.trainer_args
        callbacks = callbacks if callbacks is not None else last.callbacks
    else:
        if tokenizer is None and processor is None and last is not None and last.tokenizer is not None:
            tokenizer = last.tokenizer  # the preprocessor of the run in this session, else the model's own
        else:
            tokenizer = preprocessor_for(peft_model, _task(peft_model, config.task), tokenizer, processor)
        prepared = prepare_for(peft_model, config, data, tokenizer, eval_data)
    run = TrainingRun(peft_model, prepared, config, tokenizer, _observer_list(observers), path.parent,
                      resume_from=path)  # fmt: skip
    run.trainer_args, run.callbacks = _trainer_args(trainer_args), list(callbacks or ())
    check_eval(config, prepared)
    run.resume_step = int(state.get("global_step", 0))
    run.history, run.evals = history_of(state)  # the curve before the checkpoint continues on the chart
    if run.evals:
        run.best_eval_loss = min(e["eval_loss"] for e in run.evals)
    return launch(run, background, run.trainer_args, run.callbacks)


def last_run(model: nn.Module) -> TrainingRun | None:
    """The most recent training run of ``model`` in this session (running or not), or None."""
    require_module(model)
    peft_model = wrapper_for(model)
    return runs.last_run(peft_model if peft_model is not None else model)
